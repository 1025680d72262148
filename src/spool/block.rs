//! The sample block: `u32 count | count × sample | [paths]`, the one sample format
//! shared by the spool (which stores exactly these bytes) and the peer wire format
//! (`crate::link::proto`, whose batch frames carry them), with the bounds-checked
//! [`Reader`] and the codec error both use.
//!
//! ```text
//! samples = u32 BE count | count × (str point | i64 BE unix µs | quality | value) | [paths]
//! str     = u16 BE byte length | UTF-8 bytes
//! quality = u8 0 good | 1 stale | 2 comm_fail | 3 exception + u8 code
//! value   = u8 0 none | 1 bool + u8 (0/1) | 2 i64 | 3 u64 | 4 f64 (IEEE bits) | 5 str
//! paths   = u16 BE n (>= 1) | n × (u8 hops (>= 1) | hops × str gateway)
//!           | count × u16 BE index (0: no path, i: the i-th path of the table)
//! ```
//!
//! The path table (protocol version 2) carries the relay path of relayed samples
//! ([`Sample::via`]). It is written only when some sample has a path, so a block of
//! local samples is byte for byte a version-1 block, and every version-1 block (an old
//! spool file's) decodes as a block without paths.
//!
//! Invariants: decoding never panics and never allocates from an untrusted length before
//! checking it (a sample or path count only pre-allocates what the body can actually
//! hold); every error names the frame type and the byte offset inside the body; a
//! gateway name in a path is never empty and never holds `/` (it prefixes point names).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};

use crate::point::value::{Quality, Sample, Value, Via};

/// Most gateways one relay path may name (the `u8 hops` of the path table).
pub const MAX_HOPS: usize = u8::MAX as usize;

/// Smallest possible encoded sample (empty point name, tag `none`, quality `good`):
/// bounds how many samples a body can hold, so a forged count cannot make us allocate.
const MIN_SAMPLE_LEN: usize = 2 + 8 + 1 + 1;

/// Errors of the wire format.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The length prefix announces more than the configured limit.
    #[error("oversized frame: announced {announced} bytes, limit is {max} bytes")]
    Oversized {
        /// Announced length (type byte + body).
        announced: usize,
        /// Configured limit.
        max: usize,
    },
    /// A length prefix of 0: not even a type byte.
    #[error("empty frame: length prefix is 0, a frame needs at least a type byte")]
    Empty,
    /// The type byte is not one of ours.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The body ended before a field was complete.
    #[error("truncated {frame} frame: {what} needs {need} bytes at body offset {offset}, {have} left")]
    Truncated {
        /// Frame type name.
        frame: &'static str,
        /// The field being read.
        what: &'static str,
        /// Offset of the field in the body.
        offset: usize,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the body.
        have: usize,
    },
    /// A string is not UTF-8.
    #[error("invalid utf-8 in {what} of {frame} frame at body offset {offset}")]
    InvalidUtf8 {
        /// Frame type name.
        frame: &'static str,
        /// The field being read.
        what: &'static str,
        /// Offset of the string bytes in the body.
        offset: usize,
    },
    /// The body is longer than its fields.
    #[error("{count} trailing bytes after {frame} frame body at body offset {offset}")]
    TrailingBytes {
        /// Frame type name.
        frame: &'static str,
        /// Number of bytes not consumed.
        count: usize,
        /// Offset of the first unconsumed byte.
        offset: usize,
    },
    /// A tag byte (value, quality, bool, result) has an unknown value.
    #[error("bad {what} tag {tag} in {frame} frame at body offset {offset}")]
    BadTag {
        /// Frame type name.
        frame: &'static str,
        /// Which tag.
        what: &'static str,
        /// The byte found.
        tag: u8,
        /// Offset of the tag in the body.
        offset: usize,
    },
    /// A sample time outside what `SystemTime` can hold.
    #[error("time {micros} µs in {frame} frame at body offset {offset} is out of range")]
    TimeRange {
        /// Frame type name.
        frame: &'static str,
        /// The value read.
        micros: i64,
        /// Offset of the field in the body.
        offset: usize,
    },
    /// Encoding: a string longer than a u16 length can announce.
    #[error("cannot encode {what}: {len} bytes, at most {max}")]
    TooLong {
        /// What was too long (a point name, a frame, ...).
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks version {peer}, we speak {ours}")]
    VersionMismatch {
        /// Version in the peer's hello.
        peer: u16,
        /// Our protocol version.
        ours: u16,
    },
    /// A relay path that breaks the rules of the path table.
    #[error("bad relay path in {frame} frame at body offset {offset}: {what}")]
    BadPath {
        /// Frame type name.
        frame: &'static str,
        /// What is wrong.
        what: String,
        /// Offset of the field in the body.
        offset: usize,
    },
    /// The stream ended inside a frame.
    #[error("connection closed inside a frame ({0} bytes of an incomplete frame)")]
    EofInFrame(usize),
    /// I/O error of the underlying stream.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends the sample block (`u32 count | samples`) to `dst`; the spool stores exactly
/// these bytes. On error `dst` may hold a partial block: truncate it.
pub fn encode_samples(samples: &[(String, Sample)], dst: &mut BytesMut) -> Result<(), ProtoError> {
    let count = u32::try_from(samples.len()).map_err(|_| ProtoError::TooLong {
        what: "sample count",
        len: samples.len(),
        max: u32::MAX as usize,
    })?;
    dst.reserve(4 + samples.len() * 24);
    dst.put_u32(count);
    for (point, sample) in samples {
        put_str(dst, point, "point name")?;
        dst.put_i64(to_micros(sample.at));
        match sample.quality {
            Quality::Good => dst.put_u8(0),
            Quality::Stale => dst.put_u8(1),
            Quality::CommFail => dst.put_u8(2),
            Quality::Exception(code) => {
                dst.put_u8(3);
                dst.put_u8(code);
            }
        }
        put_value(dst, sample.value.as_ref())?;
    }
    encode_paths(samples, dst)
}

/// The path table of a block, when some sample has a relay path.
fn encode_paths(samples: &[(String, Sample)], dst: &mut BytesMut) -> Result<(), ProtoError> {
    let via = |s: &Sample| s.via.as_ref().filter(|v| !v.is_empty()).cloned();
    if !samples.iter().any(|(_, s)| via(s).is_some()) {
        return Ok(());
    }
    let mut table: Vec<Via> = Vec::new();
    let mut index: HashMap<Via, u16> = HashMap::new();
    let mut indices = Vec::with_capacity(samples.len());
    for (_, s) in samples {
        let Some(v) = via(s) else {
            indices.push(0);
            continue;
        };
        if v.len() > MAX_HOPS {
            return Err(ProtoError::TooLong { what: "relay path", len: v.len(), max: MAX_HOPS });
        }
        let i = match index.get(&v) {
            Some(i) => *i,
            None => {
                let i = u16::try_from(table.len() + 1).map_err(|_| ProtoError::TooLong {
                    what: "relay path table",
                    len: table.len() + 1,
                    max: u16::MAX as usize,
                })?;
                table.push(v.clone());
                index.insert(v, i);
                i
            }
        };
        indices.push(i);
    }
    dst.put_u16(table.len() as u16);
    for path in &table {
        dst.put_u8(path.len() as u8);
        for gateway in path.iter() {
            put_str(dst, gateway, "relay path gateway")?;
        }
    }
    for i in indices {
        dst.put_u16(i);
    }
    Ok(())
}

/// Decodes a whole sample block as written by [`encode_samples`] (no trailing bytes).
pub fn decode_samples(block: &[u8]) -> Result<Vec<(String, Sample)>, ProtoError> {
    let mut r = Reader::new(block, "samples");
    let samples = r.samples()?;
    r.finish()?;
    Ok(samples)
}

/// Number of samples in a sample block, read from its count prefix without decoding.
pub fn samples_count(block: &[u8]) -> Result<u32, ProtoError> {
    Reader::new(block, "samples").u32("sample count")
}

pub(crate) fn put_str(dst: &mut BytesMut, s: &str, what: &'static str) -> Result<(), ProtoError> {
    let len = u16::try_from(s.len()).map_err(|_| ProtoError::TooLong {
        what,
        len: s.len(),
        max: u16::MAX as usize,
    })?;
    dst.put_u16(len);
    dst.put_slice(s.as_bytes());
    Ok(())
}

pub(crate) fn put_value(dst: &mut BytesMut, value: Option<&Value>) -> Result<(), ProtoError> {
    match value {
        None => dst.put_u8(0),
        Some(Value::Bool(b)) => {
            dst.put_u8(1);
            dst.put_u8(u8::from(*b));
        }
        Some(Value::Int(i)) => {
            dst.put_u8(2);
            dst.put_i64(*i);
        }
        Some(Value::UInt(u)) => {
            dst.put_u8(3);
            dst.put_u64(*u);
        }
        Some(Value::Float(f)) => {
            dst.put_u8(4);
            dst.put_u64(f.to_bits());
        }
        Some(Value::Text(s)) => {
            dst.put_u8(5);
            put_str(dst, s, "text value")?;
        }
    }
    Ok(())
}

/// Unix microseconds, saturating at the i64 range (times before 1970 are negative).
pub(crate) fn to_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

pub(crate) fn from_micros(micros: i64) -> Option<SystemTime> {
    let d = Duration::from_micros(micros.unsigned_abs());
    if micros >= 0 { UNIX_EPOCH.checked_add(d) } else { UNIX_EPOCH.checked_sub(d) }
}

/// A bounds-checked cursor over one frame body; every read names its field.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pub(crate) pos: usize,
    frame: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], frame: &'static str) -> Self {
        Self { buf, pos: 0, frame }
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        let have = self.buf.len() - self.pos;
        if have < n {
            return Err(ProtoError::Truncated { frame: self.frame, what, offset: self.pos, need: n, have });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, ProtoError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    pub(crate) fn string(&mut self, what: &'static str) -> Result<String, ProtoError> {
        let len = self.u16(what)? as usize;
        let offset = self.pos;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(ProtoError::InvalidUtf8 { frame: self.frame, what, offset }),
        }
    }

    pub(crate) fn bad_tag(&self, what: &'static str, tag: u8, offset: usize) -> ProtoError {
        ProtoError::BadTag { frame: self.frame, what, tag, offset }
    }

    pub(crate) fn value(&mut self) -> Result<Option<Value>, ProtoError> {
        let offset = self.pos;
        Ok(Some(match self.u8("value tag")? {
            0 => return Ok(None),
            1 => {
                let offset = self.pos;
                match self.u8("bool")? {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(self.bad_tag("bool", b, offset)),
                }
            }
            2 => Value::Int(self.i64("int value")?),
            3 => Value::UInt(self.u64("uint value")?),
            4 => Value::Float(f64::from_bits(self.u64("float value")?)),
            5 => Value::Text(self.string("text value")?),
            tag => return Err(self.bad_tag("value", tag, offset)),
        }))
    }

    pub(crate) fn quality(&mut self) -> Result<Quality, ProtoError> {
        let offset = self.pos;
        Ok(match self.u8("quality")? {
            0 => Quality::Good,
            1 => Quality::Stale,
            2 => Quality::CommFail,
            3 => Quality::Exception(self.u8("exception code")?),
            tag => return Err(self.bad_tag("quality", tag, offset)),
        })
    }

    pub(crate) fn samples(&mut self) -> Result<Vec<(String, Sample)>, ProtoError> {
        let count = self.u32("sample count")? as usize;
        // Never trust the count for allocation: cap by what the remaining bytes can hold.
        let fits = (self.buf.len() - self.pos) / MIN_SAMPLE_LEN;
        let mut out = Vec::with_capacity(count.min(fits));
        for _ in 0..count {
            let point = self.string("point name")?;
            let offset = self.pos;
            let micros = self.i64("time")?;
            let at =
                from_micros(micros).ok_or(ProtoError::TimeRange { frame: self.frame, micros, offset })?;
            let quality = self.quality()?;
            let value = self.value()?;
            out.push((point, Sample { value, at, quality, via: None }));
        }
        // The block ends the body: bytes after the samples are its path table.
        if self.pos < self.buf.len() {
            self.paths(&mut out)?;
        }
        Ok(out)
    }

    /// Reads the path table after the samples of `out` and sets their paths.
    fn paths(&mut self, out: &mut [(String, Sample)]) -> Result<(), ProtoError> {
        let offset = self.pos;
        let n = usize::from(self.u16("path count")?);
        if n == 0 {
            return Err(self.bad_path("an empty path table is written as no table", offset));
        }
        // A path is at least 3 bytes (one hop, an empty name is refused below).
        let mut table: Vec<Via> = Vec::with_capacity(n.min((self.buf.len() - self.pos) / 3));
        for _ in 0..n {
            let offset = self.pos;
            let hops = usize::from(self.u8("path length")?);
            if hops == 0 {
                return Err(self.bad_path("a path names at least one gateway", offset));
            }
            let mut path = Vec::with_capacity(hops.min((self.buf.len() - self.pos) / 2));
            for _ in 0..hops {
                let offset = self.pos;
                let gateway = self.string("relay path gateway")?;
                if gateway.is_empty() || gateway.contains('/') {
                    return Err(
                        self.bad_path(format!("gateway name {gateway:?} is empty or holds '/'"), offset)
                    );
                }
                path.push(Arc::<str>::from(gateway));
            }
            table.push(path.into());
        }
        for (_, sample) in out.iter_mut() {
            let offset = self.pos;
            let i = usize::from(self.u16("path index")?);
            if i > n {
                return Err(
                    self.bad_path(format!("path index {i} beyond the {n} paths of the table"), offset)
                );
            }
            sample.via = i.checked_sub(1).map(|i| table[i].clone());
        }
        Ok(())
    }

    fn bad_path(&self, what: impl Into<String>, offset: usize) -> ProtoError {
        ProtoError::BadPath { frame: self.frame, what: what.into(), offset }
    }

    pub(crate) fn finish(&self) -> Result<(), ProtoError> {
        let count = self.buf.len() - self.pos;
        if count == 0 {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes { frame: self.frame, count, offset: self.pos })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(hops: &[&str]) -> Option<Via> {
        Some(hops.iter().map(|h| Arc::<str>::from(*h)).collect::<Vec<_>>().into())
    }

    fn sample(v: i64, via: Option<Via>) -> Sample {
        Sample { value: Some(Value::Int(v)), at: from_micros(2).expect("time"), quality: Quality::Good, via }
    }

    /// A version-1 block as docs/PROTOCOL.md shows it: one sample `p` = int -1 at 2 µs.
    const V1_BLOCK: [u8; 25] =
        [0, 0, 0, 1, 0, 1, b'p', 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 255, 255, 255, 255, 255, 255, 255, 255];

    #[test]
    fn a_version_1_block_decodes_without_paths_and_local_blocks_stay_version_1() {
        let decoded = decode_samples(&V1_BLOCK).expect("v1 block");
        assert_eq!(
            decoded,
            vec![("p".to_string(), Sample { value: Some(Value::Int(-1)), ..sample(0, None) })]
        );
        let mut again = BytesMut::new();
        encode_samples(&decoded, &mut again).expect("encode");
        assert_eq!(&again[..], &V1_BLOCK[..], "no path: no table, the version-1 bytes");
    }

    #[test]
    fn paths_round_trip_through_a_shared_table() {
        let samples = vec![
            ("x".to_string(), sample(1, via(&["site-a"]))),
            ("y".to_string(), sample(2, None)),
            ("z".to_string(), sample(3, via(&["site-a", "hub-b"]))),
            ("w".to_string(), sample(4, via(&["site-a"]))),
        ];
        let mut block = BytesMut::new();
        encode_samples(&samples, &mut block).expect("encode");
        assert_eq!(decode_samples(&block).expect("decode"), samples);
        // The table after the 4 samples: 2 distinct paths, then one index per sample.
        let mut local = BytesMut::new();
        let plain: Vec<_> =
            samples.iter().map(|(p, s)| (p.clone(), Sample { via: None, ..s.clone() })).collect();
        encode_samples(&plain, &mut local).expect("encode");
        #[rustfmt::skip]
        let table = [
            0, 2,                                           // 2 paths
            1, 0, 6, b's', b'i', b't', b'e', b'-', b'a',    // [site-a]
            2, 0, 6, b's', b'i', b't', b'e', b'-', b'a', 0, 5, b'h', b'u', b'b', b'-', b'b',
            0, 1, 0, 0, 0, 2, 0, 1,                         // indices
        ];
        assert_eq!(&block[..local.len()], &local[..]);
        assert_eq!(&block[local.len()..], &table[..]);
        // An empty path is no path.
        let empty = vec![("x".to_string(), sample(1, via(&[])))];
        let mut b = BytesMut::new();
        encode_samples(&empty, &mut b).expect("encode");
        assert_eq!(decode_samples(&b).expect("decode")[0].1.via, None);
    }

    #[test]
    fn bad_path_tables_are_named_errors() {
        let with = |tail: &[u8]| {
            let mut b = V1_BLOCK.to_vec();
            b.extend_from_slice(tail);
            decode_samples(&b).expect_err("bad table").to_string()
        };
        assert_eq!(
            with(&[0, 0]),
            "bad relay path in samples frame at body offset 25: an empty path table is written as no table"
        );
        assert_eq!(
            with(&[0, 1, 0]),
            "bad relay path in samples frame at body offset 27: a path names at least one gateway"
        );
        assert!(
            with(&[0, 1, 1, 0, 3, b'a', b'/', b'b', 0, 1])
                .contains("gateway name \"a/b\" is empty or holds '/'")
        );
        assert!(with(&[0, 1, 1, 0, 0, 0, 1]).contains("gateway name \"\""));
        assert_eq!(
            with(&[0, 1, 1, 0, 1, b'a', 0, 2]),
            "bad relay path in samples frame at body offset 31: path index 2 beyond the 1 paths of the table"
        );
        assert!(with(&[0, 1, 1, 0, 1, b'a']).starts_with("truncated samples frame: path index"));
        assert!(with(&[0, 1, 1, 0, 1, b'a', 0, 1, 9]).starts_with("1 trailing bytes"));
        // A forged path count with nothing behind it: truncated, not a large allocation.
        assert!(with(&[0xff, 0xff]).starts_with("truncated samples frame: path length"));
    }

    #[test]
    fn over_long_paths_are_refused_on_encode() {
        let hops: Vec<String> = (0..=MAX_HOPS).map(|i| format!("g{i}")).collect();
        let long = via(&hops.iter().map(String::as_str).collect::<Vec<_>>());
        let mut b = BytesMut::new();
        let e = encode_samples(&[("x".to_string(), sample(1, long))], &mut b).expect_err("too long");
        assert_eq!(e.to_string(), "cannot encode relay path: 256 bytes, at most 255");
    }
}
