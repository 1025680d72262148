//! Point values and their register encodings: the typed value model ([`value`]), typed
//! values to and from Modbus registers ([`registers`]), and fields taken out of raw
//! (non-Modbus) replies ([`extract`]). Pure data and functions: no I/O, no tasks.

pub mod extract;
pub mod registers;
pub mod value;
