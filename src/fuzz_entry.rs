//! The entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`), one per decoder of
//! bytes from outside, kept in the library so that the same functions replay the committed
//! corpora (`fuzz/corpus/<target>/`) as ordinary tests without a nightly compiler
//! (`tests::corpora_replay`).
//!
//! Each entry takes arbitrary bytes, drives the decoder the way the gateway does, and
//! checks what must hold whatever the input: no panic, a decoder never asks to drop more
//! bytes than it holds or to drop none, and what decodes re-encodes to the same thing.
//! Invariant: entries do no I/O and finish in time linear in the input.

#![doc(hidden)]

use bytes::BytesMut;
use tokio_modbus::Request;
use tokio_util::codec::{Decoder, Encoder};

use crate::config;
use crate::link::proto;
use crate::point::extract::{self, BinField, BinKind, Extract, TextField, TextKind};
use crate::point::value::{DataType, WordOrder};
use crate::serial::checksum::{CheckFormat, Checksum, ChecksumRule};
use crate::serial::framing::Decoded;
use crate::serial::raw::{self, FrameEnd, FrameRule};
use crate::serial::{ascii, rtu};
use crate::server::mbap;
use crate::spool::block;

/// The entry of one fuzz target.
pub type Entry = fn(&[u8]);

/// The fuzz targets, by name: the directory of their corpus and their entry.
pub const TARGETS: [(&str, Entry); 6] = [
    ("mbap", mbap_requests),
    ("serial", serial_frames),
    ("peer", peer_frames),
    ("spool_block", spool_block),
    ("config", config_toml),
    ("simconfig", simulation_toml),
];

/// The Modbus-TCP server's input: MBAP frames as the connection reads them, each
/// request PDU judged as the server judges it.
pub fn mbap_requests(data: &[u8]) {
    // The split point lets the fuzzer cut frames across reads.
    let (cut, data) = match data.split_first() {
        Some((c, d)) => (usize::from(*c), d),
        None => return,
    };
    let mut codec = mbap::MbapCodec;
    let mut buf = BytesMut::new();
    let cut = cut.min(data.len());
    for chunk in [&data[..cut], &data[cut..]] {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let _ = mbap::decode_request(&frame.pdu);
                    let _ = frame.exception(tokio_modbus::ExceptionCode::IllegalFunction);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
    let _ = mbap::decode_request(data);
}

/// A request the bus could have sent, chosen by one byte: the reply finders check the
/// reply against it.
fn request(sel: u8) -> Request<'static> {
    let a = u16::from(sel) * 7;
    let q = u16::from(sel % 125) + 1;
    match sel % 8 {
        0 => Request::ReadCoils(a, q * 8),
        1 => Request::ReadDiscreteInputs(a, q),
        2 => Request::ReadHoldingRegisters(a, q),
        3 => Request::ReadInputRegisters(a, q),
        4 => Request::WriteSingleCoil(a, sel & 1 == 1),
        5 => Request::WriteSingleRegister(a, u16::from(sel) << 3),
        6 => Request::WriteMultipleRegisters(a, vec![1, 2, 3].into()),
        _ => Request::WriteMultipleCoils(a, vec![true, false, true].into()),
    }
}

/// Feeds `buf` to a reply finder as the bus does (drop what it skips, stop at a reply or
/// when it needs more), then once more as if the line had gone silent.
fn drain(buf: &[u8], mut decode: impl FnMut(&[u8], bool) -> Decoded) {
    for silent in [false, true] {
        let mut at = 0;
        while at < buf.len() {
            let rest = &buf[at..];
            match decode(rest, silent) {
                Decoded::Incomplete => break,
                Decoded::Reply { len, .. } => {
                    assert!(
                        len >= 1 && len <= rest.len(),
                        "reply of {len} bytes in a buffer of {}",
                        rest.len()
                    );
                    at += len;
                }
                Decoded::Skip { len, .. } => {
                    assert!(
                        len >= 1 && len <= rest.len(),
                        "skip of {len} bytes in a buffer of {}",
                        rest.len()
                    );
                    at += len;
                }
            }
        }
    }
}

/// Serial replies: the RTU and ASCII reply finders, the raw-protocol frame finders with
/// every kind of frame end, every checksum in every format, and the extraction of values
/// from a frame. The first two bytes pick the request, unit and rules.
pub fn serial_frames(data: &[u8]) {
    let [sel, unit, buf @ ..] = data else { return };
    let (sel, unit) = (*sel, *unit);
    let req = request(sel);
    drain(buf, |b, silent| rtu::decode_reply(unit, &req, b, silent));
    drain(buf, |b, _| ascii::decode_reply(unit, &req, b));
    let _ = rtu::crc_ok(buf);

    let formats = [CheckFormat::BigEndian, CheckFormat::LittleEndian, CheckFormat::Hex];
    let format = formats[usize::from(unit % 3)];
    for (_, kind) in Checksum::ALL {
        let value = kind.compute(buf);
        let rule = ChecksumRule {
            kind,
            format,
            skip: usize::from(sel % 4),
            gap: usize::from(unit % 2),
            trailer: usize::from(sel % 3),
        };
        let _ = rule.verify(buf);
        for f in formats {
            let _ = kind.read(f, buf);
            // What is appended reads back.
            let mut out = Vec::new();
            kind.append(value, f, &mut out);
            if kind != Checksum::None {
                assert_eq!(
                    kind.read(f, &out),
                    Some(value & width_mask(kind.width())),
                    "{} {f:?}",
                    kind.name()
                );
            }
        }
        let mut framed = buf.to_vec();
        rule.apply(&mut framed);
        if framed.len() >= rule.min_len() && kind != Checksum::None && buf.len() >= rule.skip + rule.trailer {
            let _ = rule.verify(&framed);
        }
    }

    let ends = [
        FrameEnd::Terminator(vec![b'\r', b'\n']),
        FrameEnd::Terminator(vec![sel]),
        FrameEnd::Fixed(usize::from(unit % 64) + 1),
        FrameEnd::LengthField {
            offset: usize::from(sel % 8),
            width: 1 + (unit & 1),
            big_endian: sel & 1 == 0,
            adjust: i32::from(unit as i8),
        },
        FrameEnd::Silence,
    ];
    let end = ends[usize::from(sel) % ends.len()].clone();
    let start = (sel & 0x10 != 0).then(|| vec![unit]);
    let rule = FrameRule { start, end };
    if rule.validate().is_ok() {
        let check =
            ChecksumRule { kind: Checksum::ALL[usize::from(unit) % 9].1, format, ..ChecksumRule::NONE };
        drain(buf, |b, silent| raw::find_frame(&rule, &check, b, silent));
    }

    let types = [
        DataType::Bool,
        DataType::U16,
        DataType::I16,
        DataType::U32,
        DataType::I32,
        DataType::U64,
        DataType::I64,
        DataType::F32,
        DataType::F64,
        DataType::Bit(sel % 20),
        DataType::Str(u16::from(unit % 40)),
    ];
    let orders = [WordOrder::Abcd, WordOrder::Dcba, WordOrder::Cdab, WordOrder::Badc];
    let mut fields: Vec<BinField> = types
        .iter()
        .enumerate()
        .map(|(i, t)| BinField {
            at: (usize::from(sel) + i) % 32,
            kind: BinKind::Data(*t),
            order: orders[(i + usize::from(unit)) % 4],
            scale: 1.0,
            offset: 0.0,
            point: i,
        })
        .collect();
    for (i, kind) in [BinKind::U8, BinKind::I8, BinKind::Bit8(unit % 9)].into_iter().enumerate() {
        fields.push(BinField {
            at: usize::from(unit) % 16,
            kind,
            order: WordOrder::Abcd,
            scale: 0.5,
            offset: 1.0,
            point: 20 + i,
        });
    }
    let _ = extract::extract(&Extract::Binary { fields }, buf);
    let text =
        |capture: &str, kind| TextField { capture: capture.into(), point: 0, kind, scale: 1.0, offset: 0.0 };
    let regexes = [
        (r"(?-u)T=(?<t>[-+0-9.eE]+)", vec![text("t", TextKind::Number)]),
        (
            r"(?-u)(\d+),(\w+),(.)",
            vec![text("1", TextKind::Int), text("2", TextKind::Text), text("3", TextKind::Bool)],
        ),
    ];
    for (pattern, fields) in regexes {
        if let Ok(rule) = Extract::regex(pattern, fields) {
            let _ = extract::extract(&rule, buf);
        }
    }
    if let Ok(s) = std::str::from_utf8(buf) {
        let _ = extract::parse_number(s);
        let _ = extract::parse_int(s);
        let _ = raw::unescape(s);
        let _ = raw::parse_hex(s);
    }
}

fn width_mask(width: usize) -> u32 {
    if width >= 4 { u32::MAX } else { (1u32 << (8 * width)) - 1 }
}

/// The peer link's input after TLS: frames (the hello first), as the link reads them,
/// batches with their relay path tables (protocol version 2); every frame that decodes
/// encodes back to the same bytes' meaning.
pub fn peer_frames(data: &[u8]) {
    let mut codec = proto::FrameCodec::new(4096);
    let mut buf = BytesMut::from(data);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                if let proto::Frame::Hello { version, .. } = &frame {
                    let _ = proto::check_version(*version);
                }
                let mut again = BytesMut::new();
                if codec.encode(&frame, &mut again).is_ok() {
                    let encoded = again.clone();
                    let back =
                        codec.decode(&mut again).expect("re-encoded frame decodes").expect("whole frame");
                    // Compared as bytes: a float sample may be NaN, which is not equal to itself.
                    let mut twice = BytesMut::new();
                    codec.encode(&back, &mut twice).expect("a decoded frame encodes");
                    assert_eq!(twice, encoded, "frame changed through encode and decode");
                }
            }
            Ok(None) => break,
            Err(_) => return,
        }
    }
    let _ = codec.decode_eof(&mut buf);
}

/// The spool's sample block reader: a block read back from disk (or from a batch frame).
/// A block that decodes has the count it announces and re-encodes to a block that
/// decodes the same.
pub fn spool_block(data: &[u8]) {
    let count = block::samples_count(data);
    if let Ok(samples) = block::decode_samples(data) {
        assert_eq!(count.ok(), u32::try_from(samples.len()).ok(), "count and samples disagree");
        let mut again = BytesMut::new();
        if block::encode_samples(&samples, &mut again).is_ok() {
            let back = block::decode_samples(&again).expect("re-encoded block decodes");
            assert_eq!(back.len(), samples.len());
            for ((n1, s1), (n2, s2)) in back.iter().zip(&samples) {
                assert_eq!(n1, n2);
                assert_eq!((s1.at, s1.quality, &s1.via), (s2.at, s2.quality, &s2.via));
                // NaN != NaN: compare the encodings instead of the values.
                assert_eq!(format!("{:?}", s1.value), format!("{:?}", s2.value));
            }
        }
    }
}

/// The gateway's configuration file: parsed and validated, never a panic.
pub fn config_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = config::parse(text, "fuzz.toml");
    }
}

/// The simulator's configuration file: parsed and validated, never a panic.
pub fn simulation_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(sim) = toml::from_str::<crate::sim::SimConfig>(text)
    {
        let _ = sim.validate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every committed corpus file and crash reproducer through its target's entry.
    #[test]
    fn corpora_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        for (name, entry) in TARGETS {
            let mut replayed = 0;
            for sub in ["corpus", "regressions"] {
                let Ok(dir) = std::fs::read_dir(root.join(sub).join(name)) else { continue };
                for file in dir {
                    let path = file.expect("corpus entry").path();
                    let bytes = std::fs::read(&path).expect("corpus file");
                    let result = std::panic::catch_unwind(|| entry(&bytes));
                    assert!(result.is_ok(), "fuzz target {name} fails on {}", path.display());
                    replayed += 1;
                }
            }
            assert!(replayed > 0, "no corpus replayed for fuzz target {name}");
        }
    }
}
