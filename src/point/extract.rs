//! Points out of a raw reply frame (see `crate::serial::raw`): text fields by regex captures, or
//! binary fields at byte offsets.
//!
//! Invariants: extraction never panics and never guesses. A reply the regex does not
//! match, an empty capture, a text that is not a number of the field's kind, a binary
//! field past the end of the frame: each is an error naming the field, and no value is
//! taken from that frame. Scale and offset follow `crate::point::registers`: `raw * scale + offset`,
//! and any scaled number becomes `Float`.
//!
//! Numbers in text (scales, meters, NMEA) are read leniently but exactly: surrounding
//! spaces, a leading `+` or `-`, spaces between the sign and the digits (`"+  12.50"`),
//! `.` as the decimal point and an exponent are accepted; a comma is refused (it would
//! be ambiguous between a decimal comma and a thousands separator), as are `inf`/`nan`.

use std::fmt;
use std::str::FromStr;

use regex::bytes::Regex;

use crate::point::registers::{CodecError, decode_registers};
use crate::point::value::{DataType, Value, WordOrder};

/// Why points cannot be taken from a reply, or an extraction rule cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExtractError {
    /// A regex that does not compile.
    #[error("bad regex {pattern:?}: {message}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The regex crate's message.
        message: String,
    },
    /// A field names a capture group the pattern does not have.
    #[error("regex {pattern:?} has no capture group {name:?}")]
    UnknownCapture {
        /// The pattern.
        pattern: String,
        /// The capture asked for.
        name: String,
    },
    /// The reply does not match the regex.
    #[error("reply {frame} does not match regex {pattern:?}")]
    NoMatch {
        /// The pattern.
        pattern: String,
        /// The reply, escaped and shortened.
        frame: String,
    },
    /// The regex matched without this (optional) capture.
    #[error("capture {name:?} is empty in reply {frame}")]
    MissingCapture {
        /// The capture.
        name: String,
        /// The reply, escaped and shortened.
        frame: String,
    },
    /// A captured text is not a value of the field's kind.
    #[error("capture {name:?}: {text:?} is not {kind}")]
    BadText {
        /// The capture.
        name: String,
        /// What it captured.
        text: String,
        /// The kind wanted.
        kind: TextKind,
    },
    /// A binary field reaches past the end of the reply.
    #[error("field at byte {at}: {need} bytes needed, reply has {len}")]
    OutOfFrame {
        /// The field's offset.
        at: usize,
        /// Bytes the field takes.
        need: usize,
        /// The reply's length.
        len: usize,
    },
    /// A binary field that cannot be decoded as its type.
    #[error("field at byte {at}: {source}")]
    Codec {
        /// The field's offset.
        at: usize,
        /// Why.
        source: CodecError,
    },
    /// An unknown text kind name.
    #[error("unknown text kind {0:?} (valid: number, int, text, bool)")]
    UnknownKind(String),
}

/// What a captured text is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TextKind {
    /// A decimal number, always a `Float`.
    Number,
    /// An integer: `Int`, or `Float` when scaled.
    Int,
    /// The text as it is.
    Text,
    /// `1 0 true false on off yes no` (any case).
    Bool,
}

impl FromStr for TextKind {
    type Err = ExtractError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "number" => Ok(TextKind::Number),
            "int" => Ok(TextKind::Int),
            "text" => Ok(TextKind::Text),
            "bool" => Ok(TextKind::Bool),
            _ => Err(ExtractError::UnknownKind(s.to_string())),
        }
    }
}

impl fmt::Display for TextKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TextKind::Number => "a number",
            TextKind::Int => "an integer",
            TextKind::Text => "text",
            TextKind::Bool => "a bool",
        })
    }
}

/// One point taken from a regex capture.
#[derive(Debug, Clone, PartialEq)]
pub struct TextField {
    /// The capture group: its name, or its number (`"1"`) for unnamed groups.
    pub capture: String,
    /// The point it feeds (an index the caller defines).
    pub point: usize,
    /// How the text is read.
    pub kind: TextKind,
    /// Multiplier for numbers.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
}

/// The type of a binary field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinKind {
    /// One unsigned byte.
    U8,
    /// One signed byte.
    I8,
    /// Bit n (0 = least significant) of one byte.
    Bit8(u8),
    /// A point type as in registers, read from the frame's bytes taken as big-endian
    /// 16-bit words, in the field's [`WordOrder`]; `Str(n)` takes exactly n bytes.
    Data(DataType),
}

impl BinKind {
    /// Bytes the field takes in the frame.
    pub fn size(&self) -> usize {
        match self {
            BinKind::U8 | BinKind::I8 | BinKind::Bit8(_) => 1,
            BinKind::Data(DataType::Str(n)) => usize::from(*n),
            BinKind::Data(t) => 2 * usize::from(t.width()),
        }
    }
}

/// One point taken from bytes of a binary frame.
#[derive(Debug, Clone, PartialEq)]
pub struct BinField {
    /// Offset of the first byte from the frame start (start marker included).
    pub at: usize,
    /// The type.
    pub kind: BinKind,
    /// Byte order: `Abcd` big-endian, `Dcba` little-endian, `Cdab`/`Badc` mixed.
    pub order: WordOrder,
    /// Multiplier for numbers.
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
    /// The point it feeds (an index the caller defines).
    pub point: usize,
}

/// A compiled byte regex that compares by its pattern text (so configurations holding
/// one compare as values); it derefs to the [`Regex`].
#[derive(Debug, Clone)]
pub struct Pattern(Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl std::ops::Deref for Pattern {
    type Target = Regex;
    fn deref(&self) -> &Regex {
        &self.0
    }
}

/// How points are taken from a reply frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Extract {
    /// Captures of a regex matched anywhere in the frame (bytes, so any frame can be
    /// matched; `(?-u)` lets `.` match bytes that are not UTF-8).
    Regex {
        /// The compiled pattern.
        re: Pattern,
        /// The fields.
        fields: Vec<TextField>,
    },
    /// Fields at byte offsets.
    Binary {
        /// The fields.
        fields: Vec<BinField>,
    },
}

impl Extract {
    /// A regex extraction: compiles `pattern` and checks every field's capture exists.
    pub fn regex(pattern: &str, fields: Vec<TextField>) -> Result<Self, ExtractError> {
        let re = compile_regex(pattern)?;
        check_captures(&re, &fields)?;
        Ok(Extract::Regex { re, fields })
    }
}

/// Compiles a pattern; the error names it and carries the regex crate's message.
pub fn compile_regex(pattern: &str) -> Result<Pattern, ExtractError> {
    Regex::new(pattern)
        .map(Pattern)
        .map_err(|e| ExtractError::Regex { pattern: pattern.to_string(), message: e.to_string() })
}

fn group(re: &Regex, capture: &str) -> Option<usize> {
    match capture.parse::<usize>() {
        Ok(i) => (i < re.captures_len()).then_some(i),
        Err(_) => re.capture_names().position(|n| n == Some(capture)),
    }
}

/// Checks that every field's capture is a group of `re`.
pub fn check_captures(re: &Regex, fields: &[TextField]) -> Result<(), ExtractError> {
    match fields.iter().find(|f| group(re, &f.capture).is_none()) {
        Some(f) => {
            Err(ExtractError::UnknownCapture { pattern: re.as_str().to_string(), name: f.capture.clone() })
        }
        None => Ok(()),
    }
}

/// A reply shown in an error: escaped, at most 64 bytes.
fn preview(frame: &[u8]) -> String {
    let mut s = frame[..frame.len().min(64)].escape_ascii().to_string();
    if frame.len() > 64 {
        s.push_str("...");
    }
    format!("\"{s}\"")
}

/// The sign and the rest of a number's text, with the spaces around and after the sign
/// removed.
fn split_sign(s: &str) -> (bool, &str) {
    let t = s.trim();
    match t.as_bytes().first() {
        Some(b'+') => (false, t[1..].trim_start()),
        Some(b'-') => (true, t[1..].trim_start()),
        _ => (false, t),
    }
}

/// Reads a decimal number as devices print it (see the module doc): `"+0012.50"`,
/// `" -3"`, `"+  1.5e3"`; `None` for anything else.
pub fn parse_number(s: &str) -> Option<f64> {
    let (negative, rest) = split_sign(s);
    let digits_first = rest.starts_with(|c: char| c.is_ascii_digit() || c == '.');
    let plain = rest.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if !digits_first || !plain {
        return None;
    }
    let x: f64 = rest.parse().ok()?;
    Some(if negative { -x } else { x })
}

/// Reads an integer: optional sign (spaces allowed after it), digits.
pub fn parse_int(s: &str) -> Option<i64> {
    let (negative, rest) = split_sign(s);
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let magnitude: i128 = rest.parse().ok()?;
    i64::try_from(if negative { -magnitude } else { magnitude }).ok()
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

fn scaled(x: f64, scale: f64, offset: f64) -> Value {
    Value::Float(x * scale + offset)
}

fn text_value(field: &TextField, text: &str) -> Option<Value> {
    let plain = field.scale == 1.0 && field.offset == 0.0;
    Some(match field.kind {
        TextKind::Number => scaled(parse_number(text)?, field.scale, field.offset),
        TextKind::Int if plain => Value::Int(parse_int(text)?),
        TextKind::Int => scaled(parse_int(text)? as f64, field.scale, field.offset),
        TextKind::Text => Value::Text(text.to_string()),
        TextKind::Bool => Value::Bool(parse_bool(text)?),
    })
}

fn bin_value(field: &BinField, frame: &[u8]) -> Result<Value, ExtractError> {
    let need = field.kind.size();
    let bytes = field
        .at
        .checked_add(need)
        .and_then(|end| frame.get(field.at..end))
        .ok_or(ExtractError::OutOfFrame { at: field.at, need, len: frame.len() })?;
    let codec = |source| ExtractError::Codec { at: field.at, source };
    let one = |t, w: u16| decode_registers(t, WordOrder::Abcd, field.scale, field.offset, &[w]);
    match (field.kind, bytes) {
        (BinKind::U8, [b]) => one(DataType::U16, u16::from(*b)).map_err(codec),
        (BinKind::I8, [b]) => one(DataType::I16, *b as i8 as i16 as u16).map_err(codec),
        (BinKind::Bit8(n), [b]) if n < 8 => Ok(Value::Bool(b & (1 << n) != 0)),
        (BinKind::Bit8(n), _) => Err(codec(CodecError::BitIndex(n))),
        (BinKind::Data(t), bytes) => {
            let words: Vec<u16> =
                bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])).collect();
            decode_registers(t, field.order, field.scale, field.offset, &words).map_err(codec)
        }
        (_, _) => Err(ExtractError::OutOfFrame { at: field.at, need, len: frame.len() }),
    }
}

/// The points of one reply frame, in field order; any field that fails fails the frame.
pub fn extract(rule: &Extract, frame: &[u8]) -> Result<Vec<(usize, Value)>, ExtractError> {
    match rule {
        Extract::Regex { re, fields } => {
            let caps = re.captures(frame).ok_or_else(|| ExtractError::NoMatch {
                pattern: re.as_str().to_string(),
                frame: preview(frame),
            })?;
            fields
                .iter()
                .map(|f| {
                    let m = group(re, &f.capture).and_then(|i| caps.get(i)).ok_or_else(|| {
                        ExtractError::MissingCapture { name: f.capture.clone(), frame: preview(frame) }
                    })?;
                    let text = String::from_utf8_lossy(m.as_bytes());
                    let value = text_value(f, &text).ok_or_else(|| ExtractError::BadText {
                        name: f.capture.clone(),
                        text: text.to_string(),
                        kind: f.kind,
                    })?;
                    Ok((f.point, value))
                })
                .collect()
        }
        Extract::Binary { fields } => fields.iter().map(|f| Ok((f.point, bin_value(f, frame)?))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_compare_by_their_text() {
        let a = compile_regex(r"T=(\d+)").expect("compiles");
        assert_eq!(a, compile_regex(r"T=(\d+)").expect("compiles"), "compiled twice, equal");
        assert_ne!(a, compile_regex(r"T=(\d*)").expect("compiles"));
        assert!(a.is_match(b"T=12"), "derefs to the regex");
    }
}
