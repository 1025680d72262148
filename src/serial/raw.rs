//! Raw serial protocols (HMS Anybus-style "custom request/response" and streaming
//! devices): requests are configured byte templates, replies are frames found by a
//! [`FrameRule`] and checked by a [`ChecksumRule`], and points are pulled out of a frame
//! by a regex or by binary field offsets (`crate::point::extract`).
//!
//! Requests travel through the bus as `Request::Custom(0, bytes)`, already complete
//! (address and checksum in place, see [`build_request`]); a reply is
//! `Response::Custom(0, frame)` holding the whole frame, start marker and terminator
//! included.
//!
//! Invariants: nothing here panics on any input. No frame is longer than [`MAX_FRAME`];
//! longer runs are noise. A frame with a bad checksum is [`SkipReason::Crc`], never data.
//! A skip or reply always consumes at least one byte and never more than the buffer, so a
//! caller looping on [`find_frame`] always makes progress. Delimited frames (terminator,
//! fixed length, length field) ignore line silence: USB adapters deliver one frame in
//! bursts, so a pause does not end a frame; only [`FrameEnd::Silence`] uses it.

use bytes::Bytes;
use tokio_modbus::{Request, Response};

use crate::point::value::Value;
use crate::serial::checksum::{Checksum, ChecksumRule};
use crate::serial::framing::{Decoded, Framing, SkipReason};
use crate::serial::pdu::PduError;

/// Longest frame accepted, in bytes.
pub const MAX_FRAME: usize = 1024;

/// Longest start marker or terminator, in bytes.
pub const MAX_MARKER: usize = 64;

/// Why a raw-protocol setting or reply cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RawError {
    /// A bad escape, hex digit or placeholder in a configured text.
    #[error("{text:?}: {what} at character {at}")]
    Text {
        /// The whole text.
        text: String,
        /// 1-based character position of the problem.
        at: usize,
        /// What is wrong.
        what: String,
    },
    /// A value that cannot be written with a command template's format.
    #[error("cannot write {value} with {{{spec}}}: {what}")]
    Format {
        /// The placeholder's contents.
        spec: String,
        /// The value.
        value: String,
        /// What is wrong.
        what: String,
    },
    /// A request template uses `{address}` but no address is configured.
    #[error("request template uses {{address}} but no address is set")]
    NoAddress,
    /// A frame rule that cannot frame anything.
    #[error("frame rule: {0}")]
    Rule(String),
    /// A request template too short to hold its checksum rule's parts.
    #[error("request of {len} bytes is too short for its checksum rule (needs {need})")]
    TooShort {
        /// The request's length before the checksum.
        len: usize,
        /// Bytes the rule's skip, gap and trailer need.
        need: usize,
    },
}

/// Where a reply frame ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEnd {
    /// After these bytes (e.g. CR LF).
    Terminator(Vec<u8>),
    /// After this many bytes in all (start marker included).
    Fixed(usize),
    /// A length field gives the frame's total length as `value + adjust`.
    LengthField {
        /// Offset of the field from the frame start (start marker included).
        offset: usize,
        /// Width of the field: 1 or 2 bytes.
        width: u8,
        /// Byte order of a 2-byte field.
        big_endian: bool,
        /// Added to the value to give the total frame length.
        adjust: i32,
    },
    /// At a silence on the line (everything buffered when the line goes quiet).
    Silence,
}

/// How reply frames are delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRule {
    /// Bytes every frame starts with; anything before them is noise.
    pub start: Option<Vec<u8>>,
    /// Where the frame ends.
    pub end: FrameEnd,
}

impl FrameRule {
    /// Checks the rule can frame something: markers of at most [`MAX_MARKER`] bytes, a
    /// non-empty terminator, a fixed length in
    /// `1..=MAX_FRAME` covering the start marker, a 1- or 2-byte length field.
    pub fn validate(&self) -> Result<(), RawError> {
        let start = self.start.as_ref().map_or(0, Vec::len);
        if start > MAX_MARKER {
            return Err(RawError::Rule(format!("start marker of {start} bytes is longer than {MAX_MARKER}")));
        }
        match &self.end {
            FrameEnd::Terminator(t) if t.len() > MAX_MARKER => {
                Err(format!("terminator of {} bytes is longer than {MAX_MARKER}", t.len()))
            }
            FrameEnd::Terminator(t) if t.is_empty() => Err("empty terminator".into()),
            FrameEnd::Fixed(n) if *n == 0 || *n > MAX_FRAME || *n < start => {
                Err(format!("fixed length {n} outside {}..={MAX_FRAME}", start.max(1)))
            }
            FrameEnd::LengthField { width, .. } if !matches!(width, 1 | 2) => {
                Err(format!("length field width {width} is not 1 or 2"))
            }
            FrameEnd::LengthField { offset, .. } if *offset >= MAX_FRAME => {
                Err(format!("length field offset {offset} past {MAX_FRAME}"))
            }
            _ => Ok(()),
        }
        .map_err(RawError::Rule)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Looks for one complete frame at the start of `buf` (for a request's reply, or in a
/// stream). `silent` is true when the line has been quiet since the last byte in `buf`.
///
/// Bytes before the start marker are noise. A terminated frame with another start marker
/// inside restarts at that marker. A frame with a bad checksum is skipped whole when
/// delimited by a terminator or silence, and by one byte otherwise (to resynchronise).
pub fn find_frame(rule: &FrameRule, checksum: &ChecksumRule, buf: &[u8], silent: bool) -> Decoded {
    let noise = |len: usize| Decoded::Skip { len: len.clamp(1, buf.len().max(1)), why: SkipReason::Noise };
    if buf.is_empty() {
        return Decoded::Incomplete;
    }
    let start = rule.start.as_deref().unwrap_or(&[]);
    if !start.is_empty() {
        match find(buf, start) {
            Some(0) => {}
            Some(p) => return noise(p),
            None => {
                // Keep a tail that may be the first bytes of the marker.
                let keep = (1..start.len()).rev().find(|&k| buf.ends_with(&start[..k])).unwrap_or(0);
                return match buf.len() - keep {
                    0 => Decoded::Incomplete,
                    n => noise(n),
                };
            }
        }
    }
    let len = match &rule.end {
        FrameEnd::Terminator(end) => {
            if end.is_empty() {
                return noise(buf.len());
            }
            let from = start.len();
            let window = &buf[..buf.len().min(MAX_FRAME)];
            let Some(body) = window.get(from..) else {
                return noise(1);
            };
            match find(body, end) {
                // A bare terminator (a blank line) is not a frame.
                Some(0) if from == 0 => return noise(end.len()),
                Some(i) => {
                    if let Some(p) = find(&buf[from..from + i], start).filter(|_| from > 0) {
                        return noise(from + p);
                    }
                    from + i + end.len()
                }
                None if buf.len() < MAX_FRAME => return Decoded::Incomplete,
                None if from > 0 => return noise(1),
                None => return noise((buf.len() + 1).saturating_sub(end.len())),
            }
        }
        FrameEnd::Fixed(n) => {
            let n = (*n).max(start.len()).max(1);
            if n > MAX_FRAME {
                return noise(buf.len());
            }
            if buf.len() < n {
                return Decoded::Incomplete;
            }
            n
        }
        FrameEnd::LengthField { offset, width, big_endian, adjust } => {
            let end = offset.saturating_add(usize::from((*width).clamp(1, 2)));
            let Some(field) = buf.get(*offset..end) else {
                return if end > MAX_FRAME { noise(buf.len()) } else { Decoded::Incomplete };
            };
            let value = match (field, big_endian) {
                ([a], _) => u16::from(*a),
                ([a, b], true) => u16::from_be_bytes([*a, *b]),
                ([a, b], false) => u16::from_le_bytes([*a, *b]),
                _ => 0,
            };
            let total = i64::from(value) + i64::from(*adjust);
            let Ok(total) = usize::try_from(total) else {
                return noise(1);
            };
            if total < end.max(1) || total > MAX_FRAME {
                return noise(1);
            }
            if buf.len() < total {
                return Decoded::Incomplete;
            }
            total
        }
        FrameEnd::Silence => {
            if buf.len() > MAX_FRAME {
                return noise(buf.len());
            }
            if !silent {
                return Decoded::Incomplete;
            }
            buf.len()
        }
    };
    let frame = &buf[..len];
    if !checksum.verify(frame) {
        let len = match rule.end {
            FrameEnd::Terminator(_) | FrameEnd::Silence => len,
            FrameEnd::Fixed(_) | FrameEnd::LengthField { .. } => 1,
        };
        return Decoded::Skip { len, why: SkipReason::Crc };
    }
    Decoded::Reply { len, reply: Ok(Response::Custom(0, Bytes::copy_from_slice(frame))) }
}

/// A raw request/response protocol as a bus framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFraming {
    /// How replies are delimited.
    pub framing: FrameRule,
    /// How replies are checked.
    pub checksum: ChecksumRule,
}

impl RawFraming {
    /// Checks the frame rule, and that a fixed-length frame can hold its checksum.
    pub fn validate(&self) -> Result<(), RawError> {
        self.framing.validate()?;
        match self.framing.end {
            FrameEnd::Fixed(n) if n < self.checksum.min_len() => Err(RawError::Rule(format!(
                "fixed length {n} cannot hold the {} checksum rule's {} bytes",
                self.checksum.kind,
                self.checksum.min_len()
            ))),
            _ => Ok(()),
        }
    }
}

impl Framing for RawFraming {
    /// Sends the bytes of a `Request::Custom` as they are (unit is not used: any device
    /// address is in the bytes). Any other request cannot be sent on a raw bus.
    fn encode(&self, _unit: u8, request: &Request<'_>, out: &mut Vec<u8>) -> Result<(), PduError> {
        match request {
            Request::Custom(_, bytes) => {
                out.extend_from_slice(bytes);
                Ok(())
            }
            // No PduError variant says "not on this protocol"; a zero quantity is the
            // nearest honest refusal (the integrator may add a dedicated variant).
            other => Err(PduError::Quantity { function: other.function_code().value(), quantity: 0, max: 0 }),
        }
    }

    /// The first frame per the rule; unit and request are not used (raw replies carry no
    /// Modbus address or function to match).
    fn decode(&self, _unit: u8, _request: &Request<'_>, buf: &[u8], silent: bool) -> Decoded {
        find_frame(&self.framing, &self.checksum, buf, silent)
    }
}

/// The complete request: `template` with every `{address}` replaced by `address`, then
/// the checksum inserted per `checksum` (before its trailer; see [`ChecksumRule::apply`]).
pub fn build_request(
    template: &[u8],
    address: Option<&str>,
    checksum: &ChecksumRule,
) -> Result<Vec<u8>, RawError> {
    const PLACEHOLDER: &[u8] = b"{address}";
    let mut out = Vec::with_capacity(template.len() + 8);
    let mut rest = template;
    while let Some(i) = find(rest, PLACEHOLDER) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(address.ok_or(RawError::NoAddress)?.as_bytes());
        rest = &rest[i + PLACEHOLDER.len()..];
    }
    out.extend_from_slice(rest);
    let need = checksum.skip.saturating_add(checksum.gap).saturating_add(checksum.trailer);
    if checksum.kind != Checksum::None && out.len() < need {
        return Err(RawError::TooShort { len: out.len(), need });
    }
    checksum.apply(&mut out);
    Ok(out)
}

/// Turns escapes into bytes: `\r \n \t \0 \\` and `\xHH`. Other characters are taken as
/// their UTF-8 bytes.
pub fn unescape(s: &str) -> Result<Vec<u8>, RawError> {
    scan(s, None)
}

/// Reads hex bytes such as `"01 03 00 00"`, `"010300"` or `"0x01 0x03"`: pairs of hex
/// digits, spaces, commas or colons between bytes.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, RawError> {
    let err =
        |at: usize, what: &str| RawError::Text { text: s.to_string(), at: at + 1, what: what.to_string() };
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            c if c.is_whitespace() || c == ',' || c == ':' => i += 1,
            '0' if matches!(chars.get(i + 1), Some('x' | 'X')) => i += 2,
            c if c.is_ascii_hexdigit() => match chars.get(i + 1).and_then(|d| d.to_digit(16)) {
                Some(lo) => {
                    let hi = c.to_digit(16).unwrap_or(0);
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                None => return Err(err(i, "odd number of hex digits")),
            },
            c => return Err(err(i, &format!("{c:?} is not a hex digit"))),
        }
    }
    Ok(out)
}

/// A write command's bytes: `template` with escapes (as [`unescape`]) and the value put
/// in for `{value}`. Placeholders: `{value}` (as is: bools as 1/0, numbers in shortest
/// form, text verbatim), `{value:SPEC}` with SPEC = `[+][0][W][.N]` for numbers (`+` always
/// signs, `0W` zero-pads to W characters, `W` space-pads, `.N` gives N decimals), and `{{`
/// `}}` for literal braces. Unknown placeholders are errors.
pub fn format_command(template: &str, value: &Value) -> Result<Vec<u8>, RawError> {
    scan(template, Some(value))
}

/// The one scanner behind [`unescape`] (braces are plain) and [`format_command`].
fn scan(text: &str, value: Option<&Value>) -> Result<Vec<u8>, RawError> {
    let err = |at: usize, what: String| RawError::Text { text: text.to_string(), at: at + 1, what };
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '\\' => {
                let Some(&e) = chars.get(i) else {
                    return Err(err(i - 1, "backslash at the end".into()));
                };
                i += 1;
                match e {
                    'r' => out.push(b'\r'),
                    'n' => out.push(b'\n'),
                    't' => out.push(b'\t'),
                    '0' => out.push(0),
                    '\\' => out.push(b'\\'),
                    'x' => {
                        let digit = |k: usize| chars.get(k).and_then(|d| d.to_digit(16));
                        let (Some(hi), Some(lo)) = (digit(i), digit(i + 1)) else {
                            return Err(err(i - 2, "\\x needs two hex digits".into()));
                        };
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    other => return Err(err(i - 2, format!("unknown escape \\{other}"))),
                }
            }
            '{' | '}' if value.is_some() && chars.get(i) == Some(&c) => {
                out.push(c as u8);
                i += 1;
            }
            '}' if value.is_some() => return Err(err(i - 1, "unmatched }".into())),
            '{' => {
                let Some(value) = value else {
                    out.push(b'{');
                    continue;
                };
                let Some(close) = chars[i..].iter().position(|&d| d == '}') else {
                    return Err(err(i - 1, "unclosed {".into()));
                };
                let inner: String = chars[i..i + close].iter().collect();
                let spec = match inner.split_once(':') {
                    None if inner == "value" => "",
                    Some(("value", spec)) => spec,
                    _ => return Err(err(i - 1, format!("unknown placeholder {{{inner}}}"))),
                };
                let formatted = format_value(value, spec).map_err(|what| match what {
                    FormatFail::Spec => err(i - 1, format!("bad format {{{inner}}}")),
                    FormatFail::Value(what) => {
                        RawError::Format { spec: inner.clone(), value: value.to_string(), what }
                    }
                })?;
                out.extend_from_slice(formatted.as_bytes());
                i += close + 1;
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    Ok(out)
}

enum FormatFail {
    Spec,
    Value(String),
}

/// Formats `value` per SPEC `[+][0][W][.N]` (see [`format_command`]).
fn format_value(value: &Value, spec: &str) -> Result<String, FormatFail> {
    let mut rest = spec;
    let plus = rest.strip_prefix('+').inspect(|r| rest = r).is_some();
    let zero = rest.len() > 1 && rest.starts_with('0') && rest[1..].starts_with(|c: char| c.is_ascii_digit());
    if zero {
        rest = &rest[1..];
    }
    let (width, precision) = match rest.split_once('.') {
        Some((w, p)) => (w, Some(p)),
        None => (rest, None),
    };
    let num = |s: &str| s.parse::<usize>().ok().filter(|n| *n <= 64);
    let width = match width {
        "" => 0,
        w => num(w).ok_or(FormatFail::Spec)?,
    };
    let precision = match precision {
        None => None,
        Some(p) => Some(num(p).ok_or(FormatFail::Spec)?),
    };
    let (negative, digits) = match *value {
        Value::Text(ref t) if spec.is_empty() => return Ok(t.clone()),
        Value::Text(_) => return Err(FormatFail::Value("text takes no format".into())),
        Value::Float(x) if !x.is_finite() => {
            return Err(FormatFail::Value("not a finite number".into()));
        }
        Value::Float(x) => (
            x < 0.0,
            match precision {
                Some(p) => format!("{:.p$}", x.abs()),
                None => format!("{}", x.abs()),
            },
        ),
        Value::Bool(b) => (false, u8::from(b).to_string()),
        Value::Int(i) => (i < 0, i.unsigned_abs().to_string()),
        Value::UInt(u) => (false, u.to_string()),
    };
    let mut digits = digits;
    if let (Some(p), Value::Bool(_) | Value::Int(_) | Value::UInt(_)) = (precision, value)
        && p > 0
    {
        digits.push('.');
        digits.extend(std::iter::repeat_n('0', p));
    }
    // A value that rounds to zero is not negative ("-0.0").
    let negative = negative && digits.bytes().any(|b| b.is_ascii_digit() && b != b'0');
    let sign = if negative {
        "-"
    } else if plus {
        "+"
    } else {
        ""
    };
    let pad = width.saturating_sub(sign.len() + digits.len());
    Ok(if zero {
        format!("{sign}{}{digits}", "0".repeat(pad))
    } else {
        format!("{}{sign}{digits}", " ".repeat(pad))
    })
}

/// The framing of a raw bus: each device's frame rule and checksum, picked by the job's
/// pseudo unit id. Requests are sent as they are (`Request::Custom`).
#[derive(Debug, Clone)]
pub struct RawBusFraming {
    by_unit: Vec<(u8, RawFraming)>,
}

impl RawBusFraming {
    /// The framing of the raw devices of one bus: each device's pseudo unit id and its
    /// frame rule.
    pub fn new(by_unit: Vec<(u8, RawFraming)>) -> Self {
        Self { by_unit }
    }
}

impl Framing for RawBusFraming {
    fn encode(&self, unit: u8, request: &Request<'_>, out: &mut Vec<u8>) -> Result<(), PduError> {
        match self.by_unit.iter().find(|(u, _)| *u == unit) {
            Some((_, f)) => f.encode(unit, request, out),
            // Unit 0 (a command without reply) or a one-off request: the bytes as they are.
            None => match request {
                Request::Custom(_, bytes) => {
                    out.extend_from_slice(bytes);
                    Ok(())
                }
                other => {
                    Err(PduError::Quantity { function: other.function_code().value(), quantity: 0, max: 0 })
                }
            },
        }
    }

    fn decode(&self, unit: u8, request: &Request<'_>, buf: &[u8], silent: bool) -> Decoded {
        match self.by_unit.iter().find(|(u, _)| *u == unit) {
            Some((_, f)) => f.decode(unit, request, buf, silent),
            None => Decoded::Skip { len: buf.len().max(1), why: SkipReason::Noise },
        }
    }

    /// Raw replies carry no address the bus can read: a late reply from one device could
    /// pass for another's, so the bus is held as a whole while any reply may still come.
    fn replies_name_unit(&self) -> bool {
        false
    }
}
