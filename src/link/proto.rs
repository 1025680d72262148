//! The peer wire format: length-prefixed binary frames between two gateways, as a
//! tokio-util [`Decoder`]/[`Encoder`] ([`FrameCodec`]). docs/PROTOCOL.md is the
//! normative description; this file implements it.
//!
//! ```text
//! frame   = u32 BE length (bytes after this field, >= 1) | u8 type | body
//! str     = u16 BE byte length | UTF-8 bytes
//! samples = u32 BE count | count × (str point | i64 BE unix µs | quality | value) | [paths]
//! paths   = u16 BE n | n × (u8 hops | hops × str) | count × u16 BE index   (version 2)
//! quality = u8 0 good | 1 stale | 2 comm_fail | 3 exception + u8 code
//! value   = u8 0 none | 1 bool + u8 (0/1) | 2 i64 | 3 u64 | 4 f64 (IEEE bits) | 5 str
//! tunnel  = str name | u32 BE length | length bytes          (frame type 8)
//! ```
//!
//! Invariants: decoding never panics and never allocates from an untrusted length
//! before checking it (an announced frame larger than the limit is an error before any
//! buffer grows, a sample count only pre-allocates what the body can actually hold);
//! every error names the frame type and the byte offset inside the body. The sample
//! block ([`encode_samples`]/[`decode_samples`]) is the same bytes the spool stores, so
//! there is exactly one sample format.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::point::value::{Sample, Value};
pub use crate::spool::block::{ProtoError, decode_samples, encode_samples, samples_count};
use crate::spool::block::{Reader, put_str, put_value};

/// Protocol version carried in [`Frame::Hello`]; peers with a different version are
/// refused. Version 2 added the relay path table to the sample block.
pub const VERSION: u16 = 2;

/// Default limit for one frame (type byte + body): 1 MiB.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// Frame type bytes.
mod ty {
    pub(super) const HELLO: u8 = 1;
    pub(super) const BATCH: u8 = 2;
    pub(super) const ACK: u8 = 3;
    pub(super) const WRITE: u8 = 4;
    pub(super) const WRITE_RESULT: u8 = 5;
    pub(super) const HEARTBEAT: u8 = 6;
    pub(super) const CLOSE: u8 = 7;
    pub(super) const TUNNEL: u8 = 8;
}

/// One message between two peers. See docs/PROTOCOL.md for semantics.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// First frame both ways: protocol version, sender name, and the last sequence
    /// number the sender has applied from the other side.
    Hello {
        /// Protocol version ([`VERSION`]).
        version: u16,
        /// The sender's gateway name.
        name: String,
        /// Highest batch seq applied from the receiver of this hello (0 = none).
        resume: u64,
    },
    /// A batch of samples; `seq` strictly increases per direction.
    Batch {
        /// Batch sequence number (>= 1).
        seq: u64,
        /// (point name, sample) pairs.
        samples: Vec<(String, Sample)>,
    },
    /// Cumulative acknowledgement: every batch with seq <= `seq` is applied.
    Ack {
        /// Highest applied seq.
        seq: u64,
    },
    /// A request to write a point the sender was granted.
    Write {
        /// Request id, echoed in the result.
        id: u64,
        /// Point name.
        point: String,
        /// Value to write.
        value: Value,
    },
    /// Outcome of a [`Frame::Write`].
    WriteResult {
        /// The request id.
        id: u64,
        /// `Ok` or the reason it failed.
        result: Result<(), String>,
    },
    /// Keeps an idle link alive and proves the peer is there.
    Heartbeat,
    /// Orderly close with a reason; the sender closes the connection after it.
    Close {
        /// Why.
        reason: String,
    },
    /// Bytes of a serial tunnel (one packet as cut by the sender). Live traffic: never
    /// spooled, acked or resent.
    Tunnel {
        /// The tunnel's name (the same on both gateways).
        name: String,
        /// The packet (may be empty; the receiver ignores an empty one).
        data: Bytes,
    },
}

impl Frame {
    /// The frame type name used in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Batch { .. } => "batch",
            Frame::Ack { .. } => "ack",
            Frame::Write { .. } => "write",
            Frame::WriteResult { .. } => "write_result",
            Frame::Heartbeat => "heartbeat",
            Frame::Close { .. } => "close",
            Frame::Tunnel { .. } => "tunnel",
        }
    }
}

/// Checks the version of a peer's hello against ours.
pub fn check_version(peer: u16) -> Result<(), ProtoError> {
    if peer == VERSION { Ok(()) } else { Err(ProtoError::VersionMismatch { peer, ours: VERSION }) }
}

/// Codec for [`Frame`]s with a maximum frame size (type byte + body).
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameCodec {
    /// A codec refusing frames longer than `max_frame` bytes (type byte + body), both
    /// when decoding and when encoding. Clamped to what the u32 prefix can express.
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame: max_frame.clamp(1, u32::MAX as usize) }
    }

    /// The configured limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        let Some(prefix) = src.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len == 0 {
            return Err(ProtoError::Empty);
        }
        if len > self.max_frame {
            return Err(ProtoError::Oversized { announced: len, max: self.max_frame });
        }
        if src.len() < 4 + len {
            // Safe to reserve now: len is bounded by max_frame.
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let frame = src.split_to(len);
        decode_frame(frame[0], &frame[1..]).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(ProtoError::EofInFrame(src.len())),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let start = dst.len();
        dst.put_u32(0); // patched below
        let result = encode_body(frame, dst);
        let len = dst.len() - start - 4;
        if let Err(e) = result {
            dst.truncate(start);
            return Err(e);
        }
        if len > self.max_frame {
            dst.truncate(start);
            return Err(ProtoError::TooLong { what: "frame", len, max: self.max_frame });
        }
        let len = u32::try_from(len).map_err(|_| ProtoError::TooLong {
            what: "frame",
            len,
            max: u32::MAX as usize,
        })?;
        dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

/// Writes a whole batch frame from an already encoded sample block (as stored by the
/// spool), without decoding it: the fast path from spool to socket.
pub fn encode_batch_raw(
    seq: u64,
    samples_block: &[u8],
    max_frame: usize,
    dst: &mut BytesMut,
) -> Result<(), ProtoError> {
    let len = 1 + 8 + samples_block.len();
    if len > max_frame.min(u32::MAX as usize) {
        return Err(ProtoError::TooLong { what: "frame", len, max: max_frame });
    }
    dst.reserve(4 + len);
    dst.put_u32(len as u32);
    dst.put_u8(ty::BATCH);
    dst.put_u64(seq);
    dst.put_slice(samples_block);
    Ok(())
}

fn encode_body(frame: &Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
    match frame {
        Frame::Hello { version, name, resume } => {
            dst.put_u8(ty::HELLO);
            dst.put_u16(*version);
            put_str(dst, name, "hello name")?;
            dst.put_u64(*resume);
        }
        Frame::Batch { seq, samples } => {
            dst.put_u8(ty::BATCH);
            dst.put_u64(*seq);
            encode_samples(samples, dst)?;
        }
        Frame::Ack { seq } => {
            dst.put_u8(ty::ACK);
            dst.put_u64(*seq);
        }
        Frame::Write { id, point, value } => {
            dst.put_u8(ty::WRITE);
            dst.put_u64(*id);
            put_str(dst, point, "write point")?;
            put_value(dst, Some(value))?;
        }
        Frame::WriteResult { id, result } => {
            dst.put_u8(ty::WRITE_RESULT);
            dst.put_u64(*id);
            match result {
                Ok(()) => dst.put_u8(0),
                Err(reason) => {
                    dst.put_u8(1);
                    put_str(dst, reason, "write error")?;
                }
            }
        }
        Frame::Heartbeat => dst.put_u8(ty::HEARTBEAT),
        Frame::Close { reason } => {
            dst.put_u8(ty::CLOSE);
            put_str(dst, reason, "close reason")?;
        }
        Frame::Tunnel { name, data } => {
            dst.put_u8(ty::TUNNEL);
            put_str(dst, name, "tunnel name")?;
            let len = u32::try_from(data.len()).map_err(|_| ProtoError::TooLong {
                what: "tunnel data",
                len: data.len(),
                max: u32::MAX as usize,
            })?;
            dst.put_u32(len);
            dst.put_slice(data);
        }
    }
    Ok(())
}

fn decode_frame(ty: u8, body: &[u8]) -> Result<Frame, ProtoError> {
    let name = match ty {
        ty::HELLO => "hello",
        ty::BATCH => "batch",
        ty::ACK => "ack",
        ty::WRITE => "write",
        ty::WRITE_RESULT => "write_result",
        ty::HEARTBEAT => "heartbeat",
        ty::CLOSE => "close",
        ty::TUNNEL => "tunnel",
        other => return Err(ProtoError::UnknownType(other)),
    };
    let mut r = Reader::new(body, name);
    let frame = match ty {
        ty::HELLO => {
            Frame::Hello { version: r.u16("version")?, name: r.string("name")?, resume: r.u64("resume")? }
        }
        ty::BATCH => Frame::Batch { seq: r.u64("seq")?, samples: r.samples()? },
        ty::ACK => Frame::Ack { seq: r.u64("seq")? },
        ty::WRITE => {
            let id = r.u64("id")?;
            let point = r.string("point")?;
            let offset = r.pos;
            let value = r.value()?.ok_or(ProtoError::BadTag {
                frame: name,
                what: "value (none is not writable)",
                tag: 0,
                offset,
            })?;
            Frame::Write { id, point, value }
        }
        ty::WRITE_RESULT => {
            let id = r.u64("id")?;
            let offset = r.pos;
            let result = match r.u8("result tag")? {
                0 => Ok(()),
                1 => Err(r.string("error")?),
                tag => {
                    return Err(ProtoError::BadTag { frame: name, what: "result", tag, offset });
                }
            };
            Frame::WriteResult { id, result }
        }
        ty::HEARTBEAT => Frame::Heartbeat,
        ty::TUNNEL => {
            let name = r.string("name")?;
            let len = r.u32("data length")? as usize;
            // take() checks the length against the body before anything is copied.
            Frame::Tunnel { name, data: Bytes::copy_from_slice(r.take(len, "data")?) }
        }
        _ => Frame::Close { reason: r.string("reason")? },
    };
    r.finish()?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::value::Quality;
    use crate::spool::block::from_micros;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::time::SystemTime;

    fn at(micros: i64) -> SystemTime {
        from_micros(micros).expect("in range")
    }

    fn sample(value: Option<Value>, micros: i64, quality: Quality) -> Sample {
        Sample { value, at: at(micros), quality, via: None }
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello { version: VERSION, name: "gw-nord".into(), resume: 42 },
            Frame::Batch {
                seq: 7,
                samples: vec![
                    ("a/b/bool".into(), sample(Some(Value::Bool(true)), 1, Quality::Good)),
                    ("int".into(), sample(Some(Value::Int(-5)), -1_000_000, Quality::Stale)),
                    (
                        "uint".into(),
                        sample(Some(Value::UInt(u64::MAX)), 1_700_000_000_000_000, Quality::CommFail),
                    ),
                    ("f".into(), sample(Some(Value::Float(-1.5)), 0, Quality::Exception(2))),
                    ("ünïcode".into(), sample(Some(Value::Text("héllo".into())), 5, Quality::Good)),
                    ("none".into(), sample(None, 6, Quality::CommFail)),
                    (
                        "relayed".into(),
                        Sample {
                            via: Some(vec![std::sync::Arc::from("site-a"), "hub".into()].into()),
                            ..sample(Some(Value::Float(3.5)), 7, Quality::Good)
                        },
                    ),
                ],
            },
            Frame::Batch { seq: 8, samples: vec![] },
            Frame::Ack { seq: u64::MAX },
            Frame::Write { id: 3, point: "valve".into(), value: Value::Float(2.25) },
            Frame::WriteResult { id: 3, result: Ok(()) },
            Frame::WriteResult { id: 4, result: Err("not granted".into()) },
            Frame::Heartbeat,
            Frame::Close { reason: "shutdown".into() },
            Frame::Tunnel { name: "press-1".into(), data: Bytes::from_static(&[0, 0xff, 0x0d, 0x0a]) },
            Frame::Tunnel { name: "t".into(), data: Bytes::new() },
        ]
    }

    fn encode_all(frames: &[Frame]) -> BytesMut {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for f in frames {
            codec.encode(f, &mut buf).expect("encode");
        }
        buf
    }

    #[test]
    fn round_trip_every_frame() {
        let frames = all_frames();
        let mut buf = encode_all(&frames);
        let mut codec = FrameCodec::default();
        for f in &frames {
            assert_eq!(codec.decode(&mut buf).expect("decode").as_ref(), Some(f));
        }
        assert!(buf.is_empty());
        assert!(codec.decode_eof(&mut buf).expect("eof").is_none());
    }

    #[test]
    fn known_bytes() {
        assert_eq!(&encode_all(&[Frame::Heartbeat])[..], &[0, 0, 0, 1, 6]);
        let tunnel = Frame::Tunnel { name: "t1".into(), data: Bytes::from_static(&[0x00, 0xff]) };
        assert_eq!(&encode_all(&[tunnel])[..], &[0, 0, 0, 11, 8, 0, 2, b't', b'1', 0, 0, 0, 2, 0x00, 0xff]);
        assert_eq!(&encode_all(&[Frame::Ack { seq: 0x0102 }])[..], &[0, 0, 0, 9, 3, 0, 0, 0, 0, 0, 0, 1, 2]);
        let batch = Frame::Batch {
            seq: 1,
            samples: vec![("p".into(), sample(Some(Value::Int(-1)), 2, Quality::Good))],
        };
        #[rustfmt::skip]
        let expected = [
            0, 0, 0, 34, 2,               // length 34, type batch
            0, 0, 0, 0, 0, 0, 0, 1,       // seq 1
            0, 0, 0, 1,                   // 1 sample
            0, 1, b'p',                   // point "p"
            0, 0, 0, 0, 0, 0, 0, 2,       // at = 2 µs
            0,                            // good
            2, 255, 255, 255, 255, 255, 255, 255, 255, // int -1
        ];
        assert_eq!(&encode_all(&[batch])[..], &expected);
        // The same sample relayed from its origin "a": the path table follows (PROTOCOL.md).
        let via: crate::point::value::Via = vec![std::sync::Arc::from("a")].into();
        let relayed = Frame::Batch {
            seq: 1,
            samples: vec![(
                "p".into(),
                Sample { via: Some(via), ..sample(Some(Value::Int(-1)), 2, Quality::Good) },
            )],
        };
        let mut with_path = expected.to_vec();
        with_path[3] = 42;
        with_path.extend_from_slice(&[0, 1, 1, 0, 1, b'a', 0, 1]);
        assert_eq!(&encode_all(&[relayed])[..], &with_path[..]);
    }

    #[test]
    fn oversized_is_refused_before_allocating() {
        let mut codec = FrameCodec::new(100);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 101, 6][..]);
        let cap = buf.capacity();
        match codec.decode(&mut buf) {
            Err(ProtoError::Oversized { announced: 101, max: 100 }) => {}
            other => panic!("expected oversized, got {other:?}"),
        }
        assert_eq!(buf.capacity(), cap);
        let mut huge = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(matches!(FrameCodec::default().decode(&mut huge), Err(ProtoError::Oversized { .. })));
        // And the encoder refuses to produce one.
        let big = Frame::Close { reason: "x".repeat(200) };
        let mut out = BytesMut::new();
        assert!(matches!(codec.encode(&big, &mut out), Err(ProtoError::TooLong { what: "frame", .. })));
        assert!(out.is_empty());
    }

    #[test]
    fn errors_name_frame_and_offset() {
        let decode = |bytes: &[u8]| FrameCodec::default().decode(&mut BytesMut::from(bytes));
        assert!(matches!(decode(&[0, 0, 0, 0]), Err(ProtoError::Empty)));
        assert!(matches!(decode(&[0, 0, 0, 1, 99]), Err(ProtoError::UnknownType(99))));
        let e = decode(&[0, 0, 0, 5, 3, 0, 0, 0, 0]).expect_err("truncated ack");
        assert_eq!(e.to_string(), "truncated ack frame: seq needs 8 bytes at body offset 0, 4 left");
        let e = decode(&[0, 0, 0, 3, 6, 1, 2]).expect_err("trailing");
        assert_eq!(e.to_string(), "2 trailing bytes after heartbeat frame body at body offset 0");
        let e = decode(&[0, 0, 0, 4, 7, 0, 1, 0xff]).expect_err("utf8");
        assert_eq!(e.to_string(), "invalid utf-8 in reason of close frame at body offset 2");
        let mut write = vec![0, 0, 0, 13, 4];
        write.extend_from_slice(&[0; 8]); // id
        write.extend_from_slice(&[0, 1, b'p']); // point
        write.push(9); // bad value tag at body offset 11
        let e = decode(&write).expect_err("bad tag");
        assert_eq!(e.to_string(), "bad value tag 9 in write frame at body offset 11");
        // Tunnel "t" announcing 3 data bytes with 2 left; then one extra byte.
        let e = decode(&[0, 0, 0, 10, 8, 0, 1, b't', 0, 0, 0, 3, 0xaa, 0xbb]).expect_err("truncated data");
        assert_eq!(e.to_string(), "truncated tunnel frame: data needs 3 bytes at body offset 7, 2 left");
        let e = decode(&[0, 0, 0, 10, 8, 0, 1, b't', 0, 0, 0, 1, 0xaa, 0xbb]).expect_err("trailing");
        assert_eq!(e.to_string(), "1 trailing bytes after tunnel frame body at body offset 8");
        let e = decode(&[0, 0, 0, 10, 5, 0, 0, 0, 0, 0, 0, 0, 1, 2]).expect_err("result tag");
        assert!(matches!(e, ProtoError::BadTag { what: "result", tag: 2, offset: 8, .. }));
    }

    #[test]
    fn forged_sample_count_does_not_allocate() {
        // batch claiming u32::MAX samples with an empty rest: truncated, not OOM.
        let mut b = vec![0, 0, 0, 13, 2];
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&[0xff; 4]);
        let e = FrameCodec::default().decode(&mut BytesMut::from(&b[..])).expect_err("truncated");
        assert!(matches!(e, ProtoError::Truncated { what: "point name", .. }));
    }

    #[test]
    fn eof_inside_frame_is_an_error() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 9, 3, 0][..]);
        assert!(matches!(FrameCodec::default().decode_eof(&mut buf), Err(ProtoError::EofInFrame(6))));
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let frames = all_frames();
        let bytes = encode_all(&frames);
        for split in 0..=bytes.len() {
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in [&bytes[..split], &bytes[split..]] {
                buf.extend_from_slice(chunk);
                while let Some(f) = codec.decode(&mut buf).expect("valid frames") {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "split at {split}");
            assert!(buf.is_empty());
        }
        // Byte by byte, too.
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in bytes.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = codec.decode(&mut buf).expect("valid frames") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x6d32_6d00);
        let valid = encode_all(&all_frames());
        for i in 0..20_000 {
            let mut bytes: Vec<u8> = match i % 3 {
                // Pure noise.
                0 => (0..rng.random_range(0..64)).map(|_| rng.random()).collect(),
                // A plausible header with a random type and body.
                1 => {
                    let body_len: usize = rng.random_range(0..80);
                    let mut v = ((body_len + 1) as u32).to_be_bytes().to_vec();
                    v.push(rng.random_range(0..10));
                    v.extend((0..body_len).map(|_| rng.random::<u8>()));
                    v
                }
                // Valid frames with a few bytes flipped.
                _ => {
                    let mut v = valid.to_vec();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..v.len());
                        v[at] = rng.random();
                    }
                    v
                }
            };
            let mut codec = FrameCodec::new(4096);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let _ = decode_samples(&bytes);
            bytes.clear();
        }
    }

    #[test]
    fn sample_block_round_trip_and_raw_batch() {
        let samples = vec![
            ("x".to_string(), sample(Some(Value::UInt(1)), 10, Quality::Good)),
            ("y".to_string(), sample(None, -10, Quality::Exception(4))),
        ];
        let mut block = BytesMut::new();
        encode_samples(&samples, &mut block).expect("encode");
        assert_eq!(samples_count(&block).expect("count"), 2);
        assert_eq!(decode_samples(&block).expect("decode"), samples);
        let mut raw = BytesMut::new();
        encode_batch_raw(9, &block, DEFAULT_MAX_FRAME, &mut raw).expect("raw");
        let via_codec = encode_all(&[Frame::Batch { seq: 9, samples }]);
        assert_eq!(raw, via_codec);
    }

    #[test]
    fn long_strings_are_refused_on_encode() {
        let f = Frame::Close { reason: "x".repeat(70_000) };
        let mut out = BytesMut::new();
        let e = FrameCodec::default().encode(&f, &mut out).expect_err("too long");
        assert_eq!(e.to_string(), "cannot encode close reason: 70000 bytes, at most 65535");
        assert!(out.is_empty());
    }

    #[test]
    fn version_check() {
        assert!(check_version(VERSION).is_ok());
        assert_eq!(
            check_version(1).expect_err("mismatch").to_string(),
            "protocol version mismatch: peer speaks version 1, we speak 2"
        );
    }
}
