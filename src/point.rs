//! Point values and their register encodings: the typed value model ([`value`]), typed
//! values to and from Modbus registers ([`registers`]), fields taken out of raw
//! (non-Modbus) replies ([`extract`]), and the one name table of each closed set of
//! values users write ([`names`]). Pure data and functions: no I/O, no tasks.

pub mod extract;
pub mod names;
pub mod registers;
pub mod value;
