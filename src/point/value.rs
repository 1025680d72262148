//! Typed point values: the Modbus tables, the data types a point can have, how its
//! registers are ordered on the wire, and the quality every sample carries.
//!
//! Invariants: decoding never panics — a register slice of the wrong length is an error,
//! never an index out of bounds; scale and offset turn any numeric type into `Float`.

use serde::{Deserialize, Serialize};

use crate::point::names::Named;

/// One of the four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Read/write single bits (FC1 read, FC5/FC15 write).
    Coils,
    /// Read-only single bits (FC2).
    Discrete,
    /// Read/write 16-bit registers (FC3 read, FC6/FC16 write).
    Holding,
    /// Read-only 16-bit registers (FC4).
    Input,
}

impl Named for Table {
    const NAMES: &'static [(Self, &'static str)] = &[
        (Table::Coils, "coils"),
        (Table::Discrete, "discrete"),
        (Table::Holding, "holding"),
        (Table::Input, "input"),
    ];
}
crate::point::names::named_impls!(Table);

/// The data type of a point, with its width in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// One bit of a coil/discrete table (or a register != 0).
    Bool,
    /// Unsigned 16-bit register.
    U16,
    /// Signed 16-bit register.
    I16,
    /// Unsigned 32-bit over two registers.
    U32,
    /// Signed 32-bit over two registers.
    I32,
    /// Unsigned 64-bit over four registers.
    U64,
    /// Signed 64-bit over four registers.
    I64,
    /// IEEE-754 single over two registers.
    F32,
    /// IEEE-754 double over four registers.
    F64,
    /// One bit (0 = least significant) of a 16-bit register.
    Bit(u8),
    /// A fixed-length string of this many bytes (two per register, padding trimmed).
    Str(u16),
}

impl Named for DataType {
    /// `bit` and `string` name every bit number and length: the table's `Bit(0)` and
    /// `Str(0)` stand for their variants (a name names a variant, see [`Named`]).
    const NAMES: &'static [(Self, &'static str)] = &[
        (DataType::Bool, "bool"),
        (DataType::U16, "u16"),
        (DataType::I16, "i16"),
        (DataType::U32, "u32"),
        (DataType::I32, "i32"),
        (DataType::U64, "u64"),
        (DataType::I64, "i64"),
        (DataType::F32, "f32"),
        (DataType::F64, "f64"),
        (DataType::Bit(0), "bit"),
        (DataType::Str(0), "string"),
    ];
}

impl DataType {
    /// True for the numeric types, `u16` to `f64`.
    pub fn is_numeric(self) -> bool {
        !matches!(self, DataType::Bool | DataType::Bit(_) | DataType::Str(_))
    }
}

impl<'de> Deserialize<'de> for DataType {
    /// A `type` key as written, by name only: `bit` reads as `Bit(0)` and `string` as
    /// `Str(0)`, the bit number and length coming from their own keys.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::point::names::deserialize_among(d, &crate::point::names::all::<DataType>())
    }
}

/// Byte and word order of a multi-register value, named after the wire order of the
/// bytes of the big-endian value `A B C D` (Modbus' own order is ABCD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WordOrder {
    /// Big-endian words, big-endian bytes (the Modbus default).
    #[default]
    Abcd,
    /// Little-endian words, little-endian bytes.
    Dcba,
    /// Big-endian words, bytes swapped inside each word.
    Badc,
    /// Little-endian words ("word swap"), big-endian bytes inside each word.
    Cdab,
}

impl Named for WordOrder {
    const NAMES: &'static [(Self, &'static str)] = &[
        (WordOrder::Abcd, "abcd"),
        (WordOrder::Dcba, "dcba"),
        (WordOrder::Badc, "badc"),
        (WordOrder::Cdab, "cdab"),
    ];
}
crate::point::names::named_impls!(WordOrder);

/// A decoded value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A bit.
    Bool(bool),
    /// A signed integer (all signed types).
    Int(i64),
    /// An unsigned integer (all unsigned types).
    UInt(u64),
    /// A float (f32/f64, and any type with a scale or offset).
    Float(f64),
    /// A string.
    Text(String),
}

/// How far a sample can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    /// Read from the device in time.
    Good,
    /// Not refreshed within its staleness limit; the value is the last one read.
    Stale,
    /// The device or line does not answer; the value is the last one read.
    CommFail,
    /// The device answered the read with this Modbus exception code.
    Exception(u8),
}

/// A value with the time it was read and its quality: what the image keeps per point
/// and what travels to peers.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The value (for a bad quality: the last good value, if any was ever read).
    pub value: Option<Value>,
    /// When the device was read (wall clock, carried to peers unchanged).
    pub at: std::time::SystemTime,
    /// Quality of the value.
    pub quality: Quality,
    /// For a point received from a peer: the gateways the value has passed through,
    /// origin first, ending with the peer that delivered it here (`None`: a local
    /// point, or a value on its way to the first hop). Relaying never sends a value to
    /// a gateway on this path, and a receiver drops a value whose path names it (a loop).
    pub via: Option<Via>,
}

/// A relay path: gateway names, origin first (see [`Sample::via`]).
pub type Via = std::sync::Arc<[std::sync::Arc<str>]>;
