//! Modbus ASCII framing (Modbus over serial line spec v1.02, §2.5.2): a frame is `:`,
//! then unit, PDU and LRC as uppercase hex digits, then CR LF.
//!
//! Invariants: a frame whose hex is malformed (odd length, a non-hex character, no CR
//! before the LF) or whose LRC is wrong is [`SkipReason::Crc`] and never data; a `:`
//! inside a frame restarts the frame, as the spec requires, and the broken start is
//! noise. Decoding accepts lowercase hex; encoding always writes uppercase. The spec's
//! one-second inter-character timeout is the bus's response timeout's business.

use crate::serial::checksum::Checksum;
use crate::serial::framing::{Decoded, Framing, SkipReason};
use crate::serial::pdu::{MAX_PDU, PduError};

/// Longest ASCII frame: `:` + hex of unit, a 253-byte PDU and LRC + CR LF.
pub const MAX_FRAME: usize = 1 + 2 * (1 + MAX_PDU + 1) + 2;

/// Appends the ASCII frame of `pdu` for `unit`: `:`, hex(unit, pdu, LRC), CR LF.
pub fn frame(unit: u8, pdu: &[u8], out: &mut Vec<u8>) {
    let mut bin = Vec::with_capacity(pdu.len() + 2);
    bin.push(unit);
    bin.extend_from_slice(pdu);
    bin.push(Checksum::Lrc.compute(&bin) as u8);
    out.push(b':');
    out.extend_from_slice(hex::encode_upper(&bin).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Finds the reply to `request` sent to `unit` at the start of `buf`.
pub fn decode_reply(unit: u8, request: &tokio_modbus::Request<'_>, buf: &[u8]) -> Decoded {
    let noise = |len| Decoded::Skip { len, why: SkipReason::Noise };
    match buf.iter().position(|&b| b == b':') {
        None if buf.is_empty() => return Decoded::Incomplete,
        None => return noise(buf.len()),
        Some(0) => {}
        Some(start) => return noise(start),
    }
    let limit = buf.len().min(MAX_FRAME);
    let lf = match buf[1..limit].iter().position(|&b| b == b':' || b == b'\n') {
        Some(i) if buf[1 + i] == b':' => return noise(1 + i),
        Some(i) => 1 + i,
        None if buf.len() >= MAX_FRAME => return noise(1),
        None => return Decoded::Incomplete,
    };
    let len = lf + 1;
    let corrupt = Decoded::Skip { len, why: SkipReason::Crc };
    let Some(digits) = buf[1..lf].strip_suffix(b"\r") else {
        return corrupt;
    };
    let Ok(bin) = hex::decode(digits) else {
        return corrupt;
    };
    let [addr, ref pdu @ .., _lrc] = *bin else {
        return corrupt;
    };
    if pdu.is_empty() || bin.iter().fold(0u8, |s, b| s.wrapping_add(*b)) != 0 {
        return corrupt;
    }
    crate::serial::rtu::check_reply(unit, request, addr, pdu, len)
}

/// Modbus ASCII as a bus framing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ascii;

impl Framing for Ascii {
    fn encode(
        &self,
        unit: u8,
        request: &tokio_modbus::Request<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), PduError> {
        let mut pdu = Vec::with_capacity(256);
        crate::serial::pdu::encode_request(request, &mut pdu)?;
        frame(unit, &pdu, out);
        Ok(())
    }

    /// ASCII frames end with CR LF, never with silence: `silent` is ignored.
    fn decode(&self, unit: u8, request: &tokio_modbus::Request<'_>, buf: &[u8], _silent: bool) -> Decoded {
        decode_reply(unit, request, buf)
    }

    fn frame_unit(&self, buf: &[u8]) -> Option<u8> {
        match buf {
            [b':', hi, lo, ..] => hex::decode([*hi, *lo]).ok().map(|b| b[0]),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_modbus::{ExceptionCode, Request, Response};

    fn enc(unit: u8, req: &Request<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        Ascii.encode(unit, req, &mut out).expect("encodes");
        out
    }

    fn ascii(unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(unit, pdu, &mut out);
        out
    }

    #[test]
    fn encodes_known_frames() {
        // Application protocol spec §6.3 example (read holding 108..110) to unit 1:
        // LRC = -(01+03+00+6B+00+03) = 0x8E.
        let req = Request::ReadHoldingRegisters(0x6B, 3);
        assert_eq!(enc(1, &req), b":0103006B00038E\r\n");
        // Unit 247, read 10 registers from 5001 (0x1389): the frame Wikipedia shows.
        let req = Request::ReadHoldingRegisters(0x1389, 10);
        assert_eq!(enc(0xF7, &req), b":F7031389000A60\r\n");
        // Uppercase hex for every digit.
        assert_eq!(ascii(0x0A, &[0x06, 0xBE, 0xEF]), b":0A06BEEF43\r\n");
    }

    #[test]
    fn decodes_spec_reply() {
        let req = Request::ReadHoldingRegisters(0x6B, 3);
        // The spec's reply 03 06 02 2B 00 00 00 64 from unit 1: LRC 0x65.
        let reply = b":010306022B0000006465\r\n";
        assert_eq!(ascii(1, &[0x03, 0x06, 0x02, 0x2B, 0, 0, 0, 0x64]), reply);
        let want = Decoded::Reply {
            len: reply.len(),
            reply: Ok(Response::ReadHoldingRegisters(vec![0x022B, 0, 0x64])),
        };
        assert_eq!(decode_reply(1, &req, reply), want);
        // Lowercase hex is accepted.
        let lower = reply.to_ascii_lowercase();
        assert_eq!(decode_reply(1, &req, &lower), want);
        // Every prefix is incomplete.
        for n in 1..reply.len() {
            assert_eq!(decode_reply(1, &req, &reply[..n]), Decoded::Incomplete, "{n}");
        }
        // Noise before the colon is skipped first, then the frame is found.
        let mut noisy = b"\x00\xFFxx".to_vec();
        noisy.extend_from_slice(reply);
        assert_eq!(decode_reply(1, &req, &noisy), Decoded::Skip { len: 4, why: SkipReason::Noise });
        assert_eq!(decode_reply(1, &req, &noisy[4..]), want);
    }

    #[test]
    fn rejects_corrupt_frames_as_crc() {
        let req = Request::ReadHoldingRegisters(0x6B, 3);
        let crc = |b: &[u8]| Decoded::Skip { len: b.len(), why: SkipReason::Crc };
        for bad in [
            &b":010306022B0000006466\r\n"[..], // LRC off by one
            b":010306022B000000646\r\n",       // odd digit count
            b":010306022B00000064G5\r\n",      // not hex
            b":010306022B0000006465\n",        // no CR
            b":01\r\n",                        // too short for unit + LRC + function
            b":\r\n",
        ] {
            assert_eq!(decode_reply(1, &req, bad), crc(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn colon_restarts_a_frame() {
        let req = Request::ReadHoldingRegisters(0x6B, 3);
        let mut buf = b":0103".to_vec();
        buf.extend_from_slice(b":010306022B0000006465\r\n");
        assert_eq!(decode_reply(1, &req, &buf), Decoded::Skip { len: 5, why: SkipReason::Noise });
        assert!(matches!(decode_reply(1, &req, &buf[5..]), Decoded::Reply { .. }));
    }

    #[test]
    fn foreign_mismatch_exception() {
        let req = Request::ReadHoldingRegisters(0, 2);
        let other_unit = ascii(2, &[0x03, 0x04, 0, 1, 0, 2]);
        assert_eq!(
            decode_reply(1, &req, &other_unit),
            Decoded::Skip { len: other_unit.len(), why: SkipReason::Foreign }
        );
        let other_fn = ascii(1, &[0x04, 0x04, 0, 1, 0, 2]);
        assert!(matches!(decode_reply(1, &req, &other_fn), Decoded::Skip { why: SkipReason::Foreign, .. }));
        let short = ascii(1, &[0x03, 0x02, 0, 1]);
        assert!(matches!(decode_reply(1, &req, &short), Decoded::Skip { why: SkipReason::Mismatch, .. }));
        let exc = ascii(1, &[0x83, 0x02]);
        assert_eq!(exc, b":0183027A\r\n");
        assert_eq!(
            decode_reply(1, &req, &exc),
            Decoded::Reply { len: exc.len(), reply: Err(ExceptionCode::IllegalDataAddress) }
        );
        // Write echo must match the request.
        let req = Request::WriteSingleRegister(5, 7);
        let echo = ascii(1, &[0x06, 0, 5, 0, 7]);
        assert!(matches!(Ascii.decode(1, &req, &echo, false), Decoded::Reply { reply: Ok(_), .. }));
        let wrong = ascii(1, &[0x06, 0, 6, 0, 7]);
        assert!(matches!(decode_reply(1, &req, &wrong), Decoded::Skip { why: SkipReason::Mismatch, .. }));
    }

    #[test]
    fn oversize_and_noise_without_colon() {
        let req = Request::ReadHoldingRegisters(0, 2);
        assert_eq!(decode_reply(1, &req, b"abc"), Decoded::Skip { len: 3, why: SkipReason::Noise });
        let mut long = vec![b':'];
        long.resize(MAX_FRAME, b'0');
        assert_eq!(decode_reply(1, &req, &long), Decoded::Skip { len: 1, why: SkipReason::Noise });
        assert_eq!(decode_reply(1, &req, &long[..MAX_FRAME - 1]), Decoded::Incomplete);
    }
}
