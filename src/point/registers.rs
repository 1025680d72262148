//! Typed points to and from Modbus registers: word and byte order, scale and offset,
//! strings, bits, and the range checks a write needs.
//!
//! Invariants: nothing here panics on bad input. A register slice of the wrong length,
//! a bit index past 15, a value outside its type's range or a value of the wrong kind is
//! a [`CodecError`], never an index out of bounds or a silent wrap. Decoding applies
//! `raw * scale + offset`; encoding undoes it exactly (`(v - offset) / scale`, rounded
//! to nearest for integer types) and then range-checks the raw number. An f32 decodes to
//! the f64 with the same shortest decimal form, so 123.456f32 reads as 123.456.
//!
//! Order model: a value is first laid out as its big-endian bytes `A B C D ..`; the
//! [`WordOrder`] says how those bytes travel in registers. `Cdab`/`Dcba` reverse the word
//! order, `Badc`/`Dcba` swap the two bytes inside every word. For 16-bit types only the
//! byte swap matters; strings keep their words in register order (only the byte swap
//! applies), since a string has no "most significant word".

use std::fmt;
use std::str::FromStr;

use crate::point::names::{self, Named};
use crate::point::value::{DataType, Quality, Value, WordOrder};

/// A value that cannot be decoded from, or encoded to, registers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The register slice does not match the type's width.
    #[error("{data_type} needs {expected} registers, got {got}")]
    Length {
        /// The point's data type.
        data_type: DataType,
        /// Registers the type occupies.
        expected: u16,
        /// Registers supplied.
        got: usize,
    },
    /// A bit index past the 16 bits of a register.
    #[error("bit index {0} outside 0..=15")]
    BitIndex(u8),
    /// A value outside what the type can hold (after undoing scale and offset).
    #[error("value {value} out of range for {data_type}")]
    OutOfRange {
        /// The value asked for, as given.
        value: String,
        /// The point's data type.
        data_type: DataType,
    },
    /// A value of the wrong kind for the type (text for a number, a number for a string).
    #[error("value {value} cannot be written as {data_type}")]
    Kind {
        /// The value asked for, as given.
        value: String,
        /// The point's data type.
        data_type: DataType,
    },
    /// A string longer than the point's fixed length.
    #[error("text of {len} bytes does not fit {data_type}")]
    TooLong {
        /// Length of the text in bytes (UTF-8).
        len: usize,
        /// The point's data type.
        data_type: DataType,
    },
    /// A scale of zero cannot be undone for a write.
    #[error("scale 0 cannot be inverted to write {data_type}")]
    ZeroScale {
        /// The point's data type.
        data_type: DataType,
    },
    /// One bit of a register cannot be written without the other 15: the caller must
    /// read the register and write it back (or use FC22 with [`bit_masks`]).
    #[error("{data_type} is one bit of a register: writing it needs a read-modify-write")]
    NeedsReadModifyWrite {
        /// The point's data type.
        data_type: DataType,
    },
    /// An unrecognised word order name.
    #[error("unknown word order {0:?}: expected abcd, dcba, badc or cdab")]
    UnknownOrder(String),
}

impl DataType {
    /// How many registers a value of this type occupies (in a coil/discrete table every
    /// point is one bit, and a `Bool` counts as 1 there too).
    pub fn width(&self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 | DataType::Bit(_) => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::Str(bytes) => bytes.div_ceil(2),
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        match self {
            DataType::Bit(n) => write!(f, "{name}({n})"),
            DataType::Str(n) => write!(f, "{name}({n})"),
            _ => write!(f, "{name}"),
        }
    }
}

impl FromStr for WordOrder {
    type Err = CodecError;

    /// Any case: `CDAB` is `cdab`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        names::parse(&s.to_ascii_lowercase()).ok_or_else(|| CodecError::UnknownOrder(s.to_string()))
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quality::Good => f.write_str("good"),
            Quality::Stale => f.write_str("stale"),
            Quality::CommFail => f.write_str("comm_fail"),
            Quality::Exception(code) => write!(f, "exception 0x{code:02X}"),
        }
    }
}

impl fmt::Display for Value {
    /// Floats print in their shortest form that reads back to the same number, in
    /// exponent form when very small or very large (see [`PLAIN_FLOATS`]); text prints
    /// as-is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) if *x != 0.0 && !PLAIN_FLOATS.contains(&x.abs()) => write!(f, "{x:e}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => f.write_str(s),
        }
    }
}

/// Magnitudes a float value prints in plain decimals; outside them (and not 0, inf or
/// NaN) it prints in exponent form, so a denormal f32 reads `6.42855e-40` instead of 45
/// zeros, and `1e20` does not print 21 digits that were never measured. The upper bound
/// is where f64 stops holding every integer exactly.
pub const PLAIN_FLOATS: std::ops::Range<f64> = 1e-5..1e16;

/// True when the order swaps the bytes inside each word.
fn swaps_bytes(order: WordOrder) -> bool {
    matches!(order, WordOrder::Badc | WordOrder::Dcba)
}

/// True when the order sends the least significant word first.
fn swaps_words(order: WordOrder) -> bool {
    matches!(order, WordOrder::Cdab | WordOrder::Dcba)
}

/// The value's big-endian bytes from its registers as they came off the wire.
fn to_be_bytes(order: WordOrder, words: &[u16], reverse_words: bool) -> Vec<u8> {
    let word_bytes = |w: &u16| {
        if swaps_bytes(order) { w.to_le_bytes() } else { w.to_be_bytes() }
    };
    if reverse_words && swaps_words(order) {
        words.iter().rev().flat_map(word_bytes).collect()
    } else {
        words.iter().flat_map(word_bytes).collect()
    }
}

/// The registers to put on the wire for a value's big-endian bytes (the inverse of
/// [`to_be_bytes`]). `bytes` has an even length.
fn from_be_bytes(order: WordOrder, bytes: &[u8], reverse_words: bool) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let pair = [c[0], c.get(1).copied().unwrap_or(0)];
            if swaps_bytes(order) { u16::from_le_bytes(pair) } else { u16::from_be_bytes(pair) }
        })
        .collect();
    if reverse_words && swaps_words(order) {
        words.reverse();
    }
    words
}

fn check_bit(n: u8) -> Result<(), CodecError> {
    if n > 15 { Err(CodecError::BitIndex(n)) } else { Ok(()) }
}

/// True when scale and offset change the raw number.
fn scaled(scale: f64, offset: f64) -> bool {
    scale != 1.0 || offset != 0.0
}

/// The f64 that prints like `x` does: 123.456f32 becomes 123.456, not 123.45600128173828,
/// so readings look as the device meant them. It narrows back to exactly `x` (checked;
/// otherwise the plain widening is used), so a decoded value re-encodes bit-identically.
fn widen_f32(x: f32) -> f64 {
    match x.to_string().parse::<f64>() {
        Ok(y) if (y as f32).to_bits() == x.to_bits() => y,
        _ => f64::from(x),
    }
}

/// Decodes one point from exactly `data_type.width()` registers.
///
/// Integers decode to `Int` (signed types) or `UInt` (unsigned), floats to `Float`; with
/// a scale or offset every numeric type becomes `Float(raw * scale + offset)`. NaN and
/// infinities decode as floats. An f32 widens to the f64 with the same shortest decimal
/// form (123.456f32 decodes as 123.456). Bools and bits ignore scale and offset.
pub fn decode_registers(
    data_type: DataType,
    order: WordOrder,
    scale: f64,
    offset: f64,
    words: &[u16],
) -> Result<Value, CodecError> {
    let width = data_type.width();
    if words.len() != usize::from(width) {
        return Err(CodecError::Length { data_type, expected: width, got: words.len() });
    }
    // The value as one big-endian number; the length check above makes it exactly the
    // type's width (at most 8 bytes for the numeric types that use it).
    let number = || to_be_bytes(order, words, true).iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let raw = match data_type {
        DataType::Bool => return Ok(Value::Bool(words[0] != 0)),
        DataType::Bit(n) => {
            check_bit(n)?;
            return Ok(Value::Bool(words[0] & (1 << n) != 0));
        }
        DataType::Str(len) => {
            let bytes = to_be_bytes(order, words, false);
            let mut bytes = &bytes[..usize::from(len)];
            while let [rest @ .., 0 | b' '] = bytes {
                bytes = rest;
            }
            return Ok(Value::Text(String::from_utf8_lossy(bytes).into_owned()));
        }
        DataType::U16 | DataType::U32 | DataType::U64 => Value::UInt(number()),
        DataType::I16 => Value::Int(i64::from(number() as u16 as i16)),
        DataType::I32 => Value::Int(i64::from(number() as u32 as i32)),
        DataType::I64 => Value::Int(number() as i64),
        DataType::F32 => Value::Float(widen_f32(f32::from_bits(number() as u32))),
        DataType::F64 => Value::Float(f64::from_bits(number())),
    };
    if !scaled(scale, offset) {
        return Ok(raw);
    }
    let x = match raw {
        Value::Int(i) => i as f64,
        Value::UInt(u) => u as f64,
        Value::Float(x) => x,
        other => return Ok(other),
    };
    // A decimal scale (0.1, 0.01, ...) divides by its exact inverse, so -97 x 0.1 reads
    // -9.7 rather than -9.700000000000001.
    let inverse = 1.0 / scale;
    let scaled = if inverse.abs() >= 1.0 && (inverse - inverse.round()).abs() < 1e-9 {
        x / inverse.round()
    } else {
        x * scale
    };
    Ok(Value::Float(scaled + offset))
}

/// Decodes one coil or discrete input.
pub fn decode_bit(bit: bool) -> Value {
    Value::Bool(bit)
}

/// A raw number to encode: exact integers stay exact (u64/i64 would lose precision in
/// an f64).
enum Raw {
    Int(i128),
    Float(f64),
}

/// Encodes one point for a write: the inverse of [`decode_registers`].
///
/// Scale and offset are undone first (`(v - offset) / scale`, rounded to nearest for
/// integer types); a raw number outside the type's range is an error, never a wrap.
/// `Bit(n)` cannot be written on its own ([`CodecError::NeedsReadModifyWrite`]); a
/// `Bool` register is written as 1 or 0; text is padded with NULs to the string length.
pub fn encode_registers(
    data_type: DataType,
    order: WordOrder,
    scale: f64,
    offset: f64,
    value: &Value,
) -> Result<Vec<u16>, CodecError> {
    let kind = || CodecError::Kind { value: value.to_string(), data_type };
    let out_of_range = || CodecError::OutOfRange { value: value.to_string(), data_type };
    match data_type {
        DataType::Bit(n) => {
            check_bit(n)?;
            return Err(CodecError::NeedsReadModifyWrite { data_type });
        }
        DataType::Bool => {
            let on = match value {
                Value::Bool(b) => *b,
                Value::Int(0) | Value::UInt(0) => false,
                Value::Int(1) | Value::UInt(1) => true,
                _ => return Err(kind()),
            };
            return Ok(vec![u16::from(on)]);
        }
        DataType::Str(len) => {
            let Value::Text(s) = value else {
                return Err(kind());
            };
            if s.len() > usize::from(len) {
                return Err(CodecError::TooLong { len: s.len(), data_type });
            }
            let mut bytes = s.as_bytes().to_vec();
            bytes.resize(usize::from(data_type.width()) * 2, 0);
            return Ok(from_be_bytes(order, &bytes, false));
        }
        _ => {}
    }

    let raw = if scaled(scale, offset) {
        if scale == 0.0 {
            return Err(CodecError::ZeroScale { data_type });
        }
        let v = value_as_f64(value).ok_or_else(kind)?;
        Raw::Float((v - offset) / scale)
    } else {
        match value {
            Value::Int(i) => Raw::Int(i128::from(*i)),
            Value::UInt(u) => Raw::Int(i128::from(*u)),
            Value::Float(x) => Raw::Float(*x),
            Value::Bool(_) | Value::Text(_) => return Err(kind()),
        }
    };

    let bytes: Vec<u8> = match data_type {
        DataType::F32 => {
            let x = match raw {
                Raw::Int(i) => i as f64,
                Raw::Float(x) => x,
            };
            if x.is_finite() && x.abs() > f64::from(f32::MAX) {
                return Err(out_of_range());
            }
            (x as f32).to_be_bytes().to_vec()
        }
        DataType::F64 => match raw {
            Raw::Int(i) => (i as f64).to_be_bytes().to_vec(),
            Raw::Float(x) => x.to_be_bytes().to_vec(),
        },
        _ => {
            let i = match raw {
                Raw::Int(i) => i,
                Raw::Float(x) if x.is_finite() => x.round() as i128,
                Raw::Float(_) => return Err(out_of_range()),
            };
            let fits = |min: i128, max: i128| (min..=max).contains(&i);
            // Each arm range-checks before the narrowing cast, so the casts are exact.
            match data_type {
                DataType::U16 if fits(0, u16::MAX.into()) => (i as u16).to_be_bytes().to_vec(),
                DataType::I16 if fits(i16::MIN.into(), i16::MAX.into()) => (i as i16).to_be_bytes().to_vec(),
                DataType::U32 if fits(0, u32::MAX.into()) => (i as u32).to_be_bytes().to_vec(),
                DataType::I32 if fits(i32::MIN.into(), i32::MAX.into()) => (i as i32).to_be_bytes().to_vec(),
                DataType::U64 if fits(0, u64::MAX.into()) => (i as u64).to_be_bytes().to_vec(),
                DataType::I64 if fits(i64::MIN.into(), i64::MAX.into()) => (i as i64).to_be_bytes().to_vec(),
                _ => return Err(out_of_range()),
            }
        }
    };
    Ok(from_be_bytes(order, &bytes, true))
}

/// The `(and, or)` masks of an FC22 mask-write that sets bit `bit` of a register to `on`
/// and leaves the other 15 alone: the one-request way to write a [`DataType::Bit`].
pub fn bit_masks(bit: u8, on: bool) -> Result<(u16, u16), CodecError> {
    check_bit(bit)?;
    let mask = 1u16 << bit;
    Ok((!mask, if on { mask } else { 0 }))
}

/// `word` with bit `bit` set to `on`: the modify step of a read-modify-write.
pub fn with_bit(word: u16, bit: u8, on: bool) -> Result<u16, CodecError> {
    check_bit(bit)?;
    let mask = 1u16 << bit;
    Ok(if on { word | mask } else { word & !mask })
}

/// The numeric value of a number, for deadbands and scaling; `None` for bools and text,
/// which have no distance and are compared by equality.
pub fn value_as_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Int(i) => Some(*i as f64),
        Value::UInt(u) => Some(*u as f64),
        Value::Float(x) => Some(*x),
        Value::Bool(_) | Value::Text(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::value::Table;
    use WordOrder::{Abcd, Badc, Cdab, Dcba};

    fn dec(t: DataType, o: WordOrder, w: &[u16]) -> Value {
        decode_registers(t, o, 1.0, 0.0, w).expect("decodes")
    }

    fn enc(t: DataType, o: WordOrder, v: Value) -> Vec<u16> {
        encode_registers(t, o, 1.0, 0.0, &v).expect("encodes")
    }

    /// Decodes and re-encodes `words` in `order`, checking both directions.
    fn both(t: DataType, o: WordOrder, words: &[u16], v: Value) {
        assert_eq!(dec(t, o, words), v, "decode {t} {o}");
        assert_eq!(enc(t, o, v), words, "encode {t} {o}");
    }

    #[test]
    fn widths() {
        assert_eq!(DataType::Bool.width(), 1);
        assert_eq!(DataType::Bit(15).width(), 1);
        assert_eq!(DataType::I16.width(), 1);
        assert_eq!(DataType::F32.width(), 2);
        assert_eq!(DataType::U64.width(), 4);
        assert_eq!(DataType::Str(0).width(), 0);
        assert_eq!(DataType::Str(7).width(), 4);
        assert_eq!(DataType::Str(8).width(), 4);
    }

    #[test]
    fn f32_all_orders() {
        // 123.456f32 = 0x42F6E979.
        let v = Value::Float(123.456);
        both(DataType::F32, Abcd, &[0x42F6, 0xE979], v.clone());
        both(DataType::F32, Cdab, &[0xE979, 0x42F6], v.clone());
        both(DataType::F32, Badc, &[0xF642, 0x79E9], v.clone());
        both(DataType::F32, Dcba, &[0x79E9, 0xF642], v);
    }

    #[test]
    fn sixteen_bit() {
        both(DataType::U16, Abcd, &[0x1234], Value::UInt(0x1234));
        both(DataType::U16, Cdab, &[0x1234], Value::UInt(0x1234));
        both(DataType::U16, Badc, &[0x3412], Value::UInt(0x1234));
        both(DataType::U16, Dcba, &[0x3412], Value::UInt(0x1234));
        both(DataType::I16, Abcd, &[0xFFFE], Value::Int(-2));
        both(DataType::I16, Cdab, &[0x8000], Value::Int(-32768));
        both(DataType::I16, Badc, &[0xFEFF], Value::Int(-2));
        both(DataType::I16, Dcba, &[0x0080], Value::Int(-32768));
    }

    #[test]
    fn thirty_two_bit() {
        both(DataType::U32, Abcd, &[0x1234, 0x5678], Value::UInt(0x1234_5678));
        both(DataType::U32, Cdab, &[0x5678, 0x1234], Value::UInt(0x1234_5678));
        both(DataType::U32, Badc, &[0x3412, 0x7856], Value::UInt(0x1234_5678));
        both(DataType::U32, Dcba, &[0x7856, 0x3412], Value::UInt(0x1234_5678));
        // -2 = 0xFFFFFFFE
        both(DataType::I32, Abcd, &[0xFFFF, 0xFFFE], Value::Int(-2));
        both(DataType::I32, Cdab, &[0xFFFE, 0xFFFF], Value::Int(-2));
        both(DataType::I32, Badc, &[0xFFFF, 0xFEFF], Value::Int(-2));
        both(DataType::I32, Dcba, &[0xFEFF, 0xFFFF], Value::Int(-2));
    }

    #[test]
    fn sixty_four_bit() {
        let u = Value::UInt(0x0102_0304_0506_0708);
        both(DataType::U64, Abcd, &[0x0102, 0x0304, 0x0506, 0x0708], u.clone());
        both(DataType::U64, Cdab, &[0x0708, 0x0506, 0x0304, 0x0102], u.clone());
        both(DataType::U64, Badc, &[0x0201, 0x0403, 0x0605, 0x0807], u.clone());
        both(DataType::U64, Dcba, &[0x0807, 0x0605, 0x0403, 0x0201], u);
        // -2 = 0xFFFF_FFFF_FFFF_FFFE
        let i = Value::Int(-2);
        both(DataType::I64, Abcd, &[0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE], i.clone());
        both(DataType::I64, Cdab, &[0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], i.clone());
        both(DataType::I64, Badc, &[0xFFFF, 0xFFFF, 0xFFFF, 0xFEFF], i.clone());
        both(DataType::I64, Dcba, &[0xFEFF, 0xFFFF, 0xFFFF, 0xFFFF], i);
        // 1.0f64 = 0x3FF0_0000_0000_0000; -123.456 = 0xC05E_DD2F_1A9F_BE77
        both(DataType::F64, Abcd, &[0x3FF0, 0, 0, 0], Value::Float(1.0));
        let f = Value::Float(-123.456);
        both(DataType::F64, Abcd, &[0xC05E, 0xDD2F, 0x1A9F, 0xBE77], f.clone());
        both(DataType::F64, Cdab, &[0xBE77, 0x1A9F, 0xDD2F, 0xC05E], f.clone());
        both(DataType::F64, Badc, &[0x5EC0, 0x2FDD, 0x9F1A, 0x77BE], f.clone());
        both(DataType::F64, Dcba, &[0x77BE, 0x9F1A, 0x2FDD, 0x5EC0], f);
        // Extremes stay exact: no trip through f64.
        both(DataType::U64, Abcd, &[0xFFFF; 4], Value::UInt(u64::MAX));
        both(DataType::I64, Abcd, &[0x8000, 0, 0, 0], Value::Int(i64::MIN));
    }

    #[test]
    fn non_finite_floats_decode() {
        let nan = dec(DataType::F32, Abcd, &[0x7FC0, 0x0000]);
        assert!(matches!(nan, Value::Float(x) if x.is_nan()));
        assert_eq!(dec(DataType::F32, Abcd, &[0xFF80, 0x0000]), Value::Float(f64::NEG_INFINITY));
    }

    #[test]
    fn bools_and_bits() {
        assert_eq!(dec(DataType::Bool, Abcd, &[0]), Value::Bool(false));
        assert_eq!(dec(DataType::Bool, Abcd, &[0x0100]), Value::Bool(true));
        assert_eq!(dec(DataType::Bit(0), Abcd, &[0x0001]), Value::Bool(true));
        assert_eq!(dec(DataType::Bit(1), Abcd, &[0x0001]), Value::Bool(false));
        assert_eq!(dec(DataType::Bit(15), Abcd, &[0x8000]), Value::Bool(true));
        assert_eq!(
            decode_registers(DataType::Bit(16), Abcd, 1.0, 0.0, &[0xFFFF]),
            Err(CodecError::BitIndex(16))
        );
        // Scale does not turn a bool into a number.
        assert_eq!(decode_registers(DataType::Bool, Abcd, 10.0, 1.0, &[1]), Ok(Value::Bool(true)));
        assert_eq!(decode_bit(true), Value::Bool(true));
        assert_eq!(enc(DataType::Bool, Abcd, Value::Bool(true)), [1]);
        assert_eq!(enc(DataType::Bool, Abcd, Value::UInt(0)), [0]);
        assert_eq!(
            encode_registers(DataType::Bit(3), Abcd, 1.0, 0.0, &Value::Bool(true)),
            Err(CodecError::NeedsReadModifyWrite { data_type: DataType::Bit(3) })
        );
        assert_eq!(bit_masks(3, true), Ok((0xFFF7, 0x0008)));
        assert_eq!(bit_masks(3, false), Ok((0xFFF7, 0)));
        assert_eq!(with_bit(0x00F0, 4, false), Ok(0x00E0));
        assert_eq!(with_bit(0x0000, 15, true), Ok(0x8000));
        assert!(with_bit(0, 16, true).is_err());
    }

    #[test]
    fn strings() {
        // "AB C" + NUL padding: bytes in register order, high byte first.
        let w = [0x4142, 0x2043, 0x0000];
        assert_eq!(dec(DataType::Str(6), Abcd, &w), Value::Text("AB C".into()));
        assert_eq!(dec(DataType::Str(6), Cdab, &w), Value::Text("AB C".into()));
        let swapped = [0x4241, 0x4320, 0x0000];
        assert_eq!(dec(DataType::Str(6), Badc, &swapped), Value::Text("AB C".into()));
        assert_eq!(dec(DataType::Str(6), Dcba, &swapped), Value::Text("AB C".into()));
        // Trailing spaces trimmed, odd length ignores the last byte of the last word.
        assert_eq!(dec(DataType::Str(3), Abcd, &[0x4F4B, 0x2058]), Value::Text("OK".into()));
        // Invalid UTF-8 is replaced, not an error.
        assert_eq!(dec(DataType::Str(2), Abcd, &[0xFF41]), Value::Text("\u{FFFD}A".into()));
        assert_eq!(enc(DataType::Str(6), Abcd, Value::Text("AB C".into())), [0x4142, 0x2043, 0x0000]);
        assert_eq!(enc(DataType::Str(5), Dcba, Value::Text("ABC".into())), [0x4241, 0x0043, 0x0000]);
        assert_eq!(
            encode_registers(DataType::Str(2), Abcd, 1.0, 0.0, &Value::Text("ABC".into())),
            Err(CodecError::TooLong { len: 3, data_type: DataType::Str(2) })
        );
        assert!(matches!(
            encode_registers(DataType::Str(2), Abcd, 1.0, 0.0, &Value::UInt(1)),
            Err(CodecError::Kind { .. })
        ));
    }

    #[test]
    fn wrong_length_is_an_error() {
        for (t, n) in [
            (DataType::F32, 1),
            (DataType::F32, 3),
            (DataType::U64, 2),
            (DataType::U16, 0),
            (DataType::Str(4), 1),
        ] {
            let words = vec![0u16; n];
            let err = decode_registers(t, Abcd, 1.0, 0.0, &words).expect_err("length");
            assert_eq!(err, CodecError::Length { data_type: t, expected: t.width(), got: n });
        }
        assert_eq!(
            CodecError::Length { data_type: DataType::F32, expected: 2, got: 1 }.to_string(),
            "f32 needs 2 registers, got 1"
        );
    }

    #[test]
    fn scale_and_offset() {
        // 0.1 degree steps with -40 offset: raw 650 -> 25.0.
        let v = decode_registers(DataType::I16, Abcd, 0.1, -40.0, &[650]).expect("decodes");
        let Value::Float(x) = v else { panic!("scaled value is a float: {v:?}") };
        assert!((x - 25.0).abs() < 1e-9);
        assert_eq!(encode_registers(DataType::I16, Abcd, 0.1, -40.0, &Value::Float(25.0)), Ok(vec![650]));
        // Rounded to nearest, not truncated.
        assert_eq!(encode_registers(DataType::U16, Abcd, 0.1, 0.0, &Value::Float(12.34)), Ok(vec![123]));
        assert_eq!(encode_registers(DataType::U16, Abcd, 0.1, 0.0, &Value::Float(12.36)), Ok(vec![124]));
        // An integer input goes through the scale too.
        assert_eq!(
            encode_registers(DataType::U32, Cdab, 0.01, 0.0, &Value::Int(1000)),
            Ok(vec![0x86A0, 0x0001])
        );
        // Round trip for every numeric type and order.
        for t in [
            DataType::U16,
            DataType::I16,
            DataType::U32,
            DataType::I32,
            DataType::U64,
            DataType::I64,
            DataType::F32,
            DataType::F64,
        ] {
            for o in [Abcd, Badc, Cdab, Dcba] {
                let w = encode_registers(t, o, 0.5, 10.0, &Value::Float(60.0)).expect("encodes");
                assert_eq!(w.len(), usize::from(t.width()));
                assert_eq!(decode_registers(t, o, 0.5, 10.0, &w), Ok(Value::Float(60.0)), "{t} {o}");
            }
        }
        assert_eq!(
            encode_registers(DataType::U16, Abcd, 0.0, 1.0, &Value::Float(1.0)),
            Err(CodecError::ZeroScale { data_type: DataType::U16 })
        );
    }

    #[test]
    fn out_of_range_is_an_error() {
        let err = |t, v: Value| encode_registers(t, Abcd, 1.0, 0.0, &v).expect_err("range");
        assert_eq!(err(DataType::U16, Value::Int(70000)).to_string(), "value 70000 out of range for u16");
        assert!(matches!(err(DataType::U16, Value::Int(-1)), CodecError::OutOfRange { .. }));
        assert!(matches!(err(DataType::I16, Value::Int(32768)), CodecError::OutOfRange { .. }));
        assert!(matches!(err(DataType::I64, Value::UInt(u64::MAX)), CodecError::OutOfRange { .. }));
        assert!(matches!(err(DataType::U64, Value::Float(1.9e19)), CodecError::OutOfRange { .. }));
        assert!(matches!(err(DataType::U32, Value::Float(f64::NAN)), CodecError::OutOfRange { .. }));
        assert!(matches!(err(DataType::F32, Value::Float(1e39)), CodecError::OutOfRange { .. }));
        assert!(matches!(err(DataType::U16, Value::Text("1".into())), CodecError::Kind { .. }));
        // Scaling can push an in-range value out of range: 7000 / 0.1 = 70000.
        assert!(matches!(
            encode_registers(DataType::U16, Abcd, 0.1, 0.0, &Value::Float(7000.0)),
            Err(CodecError::OutOfRange { .. })
        ));
        // The edges themselves fit.
        assert_eq!(enc(DataType::U16, Abcd, Value::Float(65535.4)), [0xFFFF]);
        assert_eq!(enc(DataType::I16, Abcd, Value::Int(-32768)), [0x8000]);
    }

    #[test]
    fn display_and_parse() {
        assert_eq!("CDAB".parse::<WordOrder>(), Ok(Cdab));
        assert_eq!("dcba".parse::<WordOrder>(), Ok(Dcba));
        assert!("abdc".parse::<WordOrder>().is_err());
        for o in [Abcd, Badc, Cdab, Dcba] {
            assert_eq!(o.to_string().parse::<WordOrder>(), Ok(o));
        }
        assert_eq!(DataType::Str(10).to_string(), "string(10)");
        assert_eq!(DataType::Bit(3).to_string(), "bit(3)");
        assert_eq!(Table::Discrete.to_string(), "discrete");
        assert_eq!(Quality::Exception(2).to_string(), "exception 0x02");
        assert_eq!(Value::Float(0.1).to_string(), "0.1");
        assert_eq!(Value::Float(-273.15).to_string(), "-273.15");
        assert_eq!(Value::Float(0.0).to_string(), "0");
        assert_eq!(Value::Float(0.00001).to_string(), "0.00001");
        assert_eq!(Value::Float(0.000001).to_string(), "1e-6");
        assert_eq!(Value::Float(9_007_199_254_740_992.0).to_string(), "9007199254740992");
        assert_eq!(Value::Float(1e16).to_string(), "1e16");
        assert_eq!(Value::Float(-1.5e300).to_string(), "-1.5e300");
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "inf");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
        // A denormal f32 off the wire (issue 11): two small counters read as one f32.
        assert_eq!(dec(DataType::F32, Abcd, &[0x0007, 0x0005]).to_string(), "6.42855e-40");
        assert_eq!(dec(DataType::F32, Abcd, &[0x3DCC, 0xCCCD]).to_string(), "0.1");
        assert_eq!(Value::Text("a b".into()).to_string(), "a b");
        assert_eq!(Value::Int(-5).to_string(), "-5");
    }

    #[test]
    fn as_f64() {
        assert_eq!(value_as_f64(&Value::Int(-3)), Some(-3.0));
        assert_eq!(value_as_f64(&Value::UInt(3)), Some(3.0));
        assert_eq!(value_as_f64(&Value::Float(2.5)), Some(2.5));
        assert_eq!(value_as_f64(&Value::Bool(true)), None);
        assert_eq!(value_as_f64(&Value::Text("1".into())), None);
    }
}
