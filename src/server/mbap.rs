//! Modbus-TCP on the wire, server side: MBAP frames as a tokio-util codec, and request
//! PDUs decoded with the checks the Modbus application protocol spec (v1.1b3, §6) puts
//! on a server, each failure mapped to the exception the spec names.
//!
//! MBAP header (7 bytes, big-endian): transaction id u16, protocol id u16 (0 = Modbus),
//! length u16 (bytes that follow: unit id + PDU, 2..=254), unit id u8; then the PDU.
//!
//! Frames longer than that are still framed up to [`MAX_LENGTH`], so that an oversized
//! request answers 0x03 the way the spec's state diagrams want, instead of losing the
//! connection: the conformance probes "FC16 of 124 registers" and "FC23 writing 122"
//! are well-formed requests of 254 PDU bytes (length 255). Such a frame's PDU is longer
//! than [`pdu::MAX_PDU`], which [`decode_request`] answers 0x03.
//!
//! Invariants: decoding never panics and never allocates more than one frame's bytes
//! (the length field is checked before anything is buffered); a header that breaks the
//! rules (a length outside 2..=[`MAX_LENGTH`]) is an error, after which the stream cannot
//! be re-synchronised (MBAP has no frame marker) and the connection must be closed; a
//! well-framed frame with a protocol id other than 0 is discarded without an answer (the
//! TCP implementation guide's rule for a bad MBAP header) and decoding carries on; a
//! well-framed but bad PDU is not an error here but an exception answer
//! ([`decode_request`]); at end of input (the master's FIN) an incomplete frame is
//! dropped, not an error, so the frames before it are still answered.

use std::borrow::Cow;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_modbus::{ExceptionCode, Request};
use tokio_util::codec::{Decoder, Encoder};
use tracing::debug;

use crate::serial::pdu;

/// Bytes in an MBAP header, unit id included.
pub const HEADER_LEN: usize = 7;

/// The longest MBAP length field framed: the unit id and the largest PDU any request
/// layout can claim (FC23: 10 bytes before a byte count of at most 255). Longer is not
/// Modbus at all.
pub const MAX_LENGTH: u16 = 1 + 10 + 255;

/// Why a byte stream is not Modbus-TCP.
#[derive(Debug, thiserror::Error)]
pub enum MbapError {
    /// The protocol id is not 0 (the decoder discards such frames; kept for encoders
    /// and callers that judge a header themselves).
    #[error("mbap protocol id {0} is not 0 (modbus)")]
    Protocol(u16),
    /// The length field is outside 2..=[`MAX_LENGTH`] (or, encoding, 2..=254).
    #[error("mbap length {0} cannot be a modbus frame")]
    Length(u16),
    /// Reading or writing the socket failed.
    #[error("modbus-tcp i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// One MBAP frame: a request from a master, or our answer to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Transaction id, echoed in the answer.
    pub transaction: u16,
    /// Unit id.
    pub unit: u8,
    /// The PDU, function code first. A request's may be longer than 253 bytes (up to
    /// [`MAX_LENGTH`] - 1): framed, but never valid.
    pub pdu: Bytes,
}

impl Frame {
    /// The exception answer to `self` with `code`.
    pub fn exception(&self, code: ExceptionCode) -> Frame {
        let function = self.pdu.first().copied().unwrap_or(0);
        let mut buf = Vec::with_capacity(2);
        pdu::encode_exception(function & 0x7F, code, &mut buf);
        Frame { transaction: self.transaction, unit: self.unit, pdu: buf.into() }
    }

    /// The answer to `self` carrying `pdu`.
    pub fn answer(&self, pdu: Vec<u8>) -> Frame {
        Frame { transaction: self.transaction, unit: self.unit, pdu: pdu.into() }
    }
}

/// The MBAP codec: decodes request frames, encodes answer frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct MbapCodec;

impl Decoder for MbapCodec {
    type Item = Frame;
    type Error = MbapError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, MbapError> {
        loop {
            // The length field is judged as soon as it is in (a master that sends a bad
            // one and waits is closed at once, not after the idle timeout).
            if src.len() < 6 {
                return Ok(None);
            }
            let length = u16::from_be_bytes([src[4], src[5]]);
            if !(2..=MAX_LENGTH).contains(&length) {
                return Err(MbapError::Length(length));
            }
            let total = 6 + usize::from(length);
            if src.len() < total {
                src.reserve(total - src.len());
                return Ok(None);
            }
            let transaction = src.get_u16();
            let protocol = src.get_u16();
            src.advance(2);
            let unit = src.get_u8();
            let pdu = src.split_to(total - HEADER_LEN).freeze();
            if protocol == 0 {
                return Ok(Some(Frame { transaction, unit, pdu }));
            }
            // Not Modbus, but framed: the TCP implementation guide discards such an
            // indication without an answer; the stream stays in step, so carry on.
            debug!(transaction, protocol, "mbap frame of another protocol discarded");
        }
    }

    /// At end of input, the frames still buffered are decoded; a frame cut short by the
    /// master's FIN can never complete and is dropped, so it does not cost the answers
    /// to the requests before it (the default turns it into an error).
    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, MbapError> {
        let frame = self.decode(src)?;
        if frame.is_none() && !src.is_empty() {
            debug!(bytes = src.len(), "incomplete mbap frame at end of input discarded");
            src.clear();
        }
        Ok(frame)
    }
}

impl Encoder<Frame> for MbapCodec {
    type Error = MbapError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), MbapError> {
        // Our own PDUs are at most 253 bytes; a longer one would be a bug, not a frame.
        let length = u16::try_from(frame.pdu.len() + 1)
            .ok()
            .filter(|l| *l <= 254)
            .ok_or(MbapError::Length(u16::MAX))?;
        dst.reserve(HEADER_LEN + frame.pdu.len());
        dst.put_u16(frame.transaction);
        dst.put_u16(0);
        dst.put_u16(length);
        dst.put_u8(frame.unit);
        dst.put_slice(&frame.pdu);
        Ok(())
    }
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

/// Checks quantity (0x03) then address range (0x02), in the spec's order.
fn span(address: u16, quantity: u16, max: u16) -> Result<(), ExceptionCode> {
    if quantity == 0 || quantity > max {
        return Err(ExceptionCode::IllegalDataValue);
    }
    if u32::from(address) + u32::from(quantity) > 0x1_0000 {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(())
}

fn unpack(bytes: &[u8], count: usize) -> Vec<bool> {
    (0..count).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect()
}

/// Decodes a request PDU the way a server must judge it: an unsupported function is
/// `IllegalFunction` (0x01); a wrong length, quantity or byte count, or a PDU longer than
/// 253 bytes, is `IllegalDataValue` (0x03); a range past address 65535 is
/// `IllegalDataAddress` (0x02).
/// Function codes the gateway does not know (1..=0x7F, device identification 0x2B too)
/// are returned as `Request::Custom` for a device to judge.
pub fn decode_request(p: &[u8]) -> Result<Request<'static>, ExceptionCode> {
    use ExceptionCode::{IllegalDataValue, IllegalFunction};
    let Some(&function) = p.first() else {
        return Err(IllegalFunction);
    };
    let len_is = |n: usize| if p.len() == n { Ok(()) } else { Err(IllegalDataValue) };
    if p.len() > pdu::MAX_PDU && !matches!(function, 0 | 0x80..=0xFF) {
        // Quantities first: "FC16 of 124 registers" is refused for its quantity, and a
        // PDU no quantity could explain for its length; either way 0x03.
        return Err(IllegalDataValue);
    }
    let req = match function {
        1..=4 => {
            len_is(5)?;
            let (a, q) = (be16(p, 1), be16(p, 3));
            let max = if function <= 2 { pdu::MAX_READ_BITS } else { pdu::MAX_READ_REGISTERS };
            span(a, q, max)?;
            match function {
                1 => Request::ReadCoils(a, q),
                2 => Request::ReadDiscreteInputs(a, q),
                3 => Request::ReadHoldingRegisters(a, q),
                _ => Request::ReadInputRegisters(a, q),
            }
        }
        5 => {
            len_is(5)?;
            let on = match be16(p, 3) {
                0xFF00 => true,
                0x0000 => false,
                _ => return Err(IllegalDataValue),
            };
            Request::WriteSingleCoil(be16(p, 1), on)
        }
        6 => {
            len_is(5)?;
            Request::WriteSingleRegister(be16(p, 1), be16(p, 3))
        }
        15 | 16 => {
            if p.len() < 6 {
                return Err(IllegalDataValue);
            }
            let (a, q, count) = (be16(p, 1), be16(p, 3), usize::from(p[5]));
            let bits = function == 15;
            let (max, want) = if bits {
                (pdu::MAX_WRITE_BITS, usize::from(q).div_ceil(8))
            } else {
                (pdu::MAX_WRITE_REGISTERS, 2 * usize::from(q))
            };
            if q == 0 || q > max || count != want {
                return Err(IllegalDataValue);
            }
            len_is(6 + count)?;
            span(a, q, max)?;
            let data = &p[6..];
            if bits {
                Request::WriteMultipleCoils(a, Cow::Owned(unpack(data, usize::from(q))))
            } else {
                Request::WriteMultipleRegisters(a, Cow::Owned(data.chunks(2).map(|c| be16(c, 0)).collect()))
            }
        }
        22 => {
            len_is(7)?;
            Request::MaskWriteRegister(be16(p, 1), be16(p, 3), be16(p, 5))
        }
        23 => {
            if p.len() < 10 {
                return Err(IllegalDataValue);
            }
            let (ra, rq, wa, wq, count) = (be16(p, 1), be16(p, 3), be16(p, 5), be16(p, 7), usize::from(p[9]));
            if wq == 0 || wq > pdu::MAX_RW_WRITE_REGISTERS || count != 2 * usize::from(wq) {
                return Err(IllegalDataValue);
            }
            len_is(10 + count)?;
            span(ra, rq, pdu::MAX_READ_REGISTERS)?;
            span(wa, wq, pdu::MAX_RW_WRITE_REGISTERS)?;
            let words = p[10..].chunks(2).map(|c| be16(c, 0)).collect();
            Request::ReadWriteMultipleRegisters(ra, rq, wa, Cow::Owned(words))
        }
        // Exception replies are not requests; 0 is no function code (the spec's range is
        // 1..=127), so no device is asked about it.
        0 | 0x80..=0xFF => return Err(IllegalFunction),
        f => Request::Custom(f, Cow::Owned(p[1..].to_vec())),
    };
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, MbapError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = MbapCodec.decode(&mut buf)? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn frames_round_trip_and_split_anywhere() {
        // Read holding registers 107..=109 of unit 0x11, transaction 1.
        let wire = [0x00, 0x01, 0x00, 0x00, 0x00, 0x06, 0x11, 0x03, 0x00, 0x6B, 0x00, 0x03];
        let frames = decode_all(&wire).expect("valid");
        assert_eq!(frames.len(), 1);
        assert_eq!((frames[0].transaction, frames[0].unit), (1, 0x11));
        assert_eq!(&frames[0].pdu[..], &wire[7..]);
        let mut codec = MbapCodec;
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().chain(wire.iter()).enumerate() {
            buf.put_u8(*b);
            let got = codec.decode(&mut buf).expect("valid");
            assert_eq!(got.is_some(), i == 11 || i == 23, "byte {i}");
        }
        let mut out = BytesMut::new();
        codec.encode(frames[0].clone(), &mut out).expect("encodes");
        assert_eq!(&out[..], &wire);
        let exc = frames[0].exception(ExceptionCode::GatewayTargetDevice);
        assert_eq!(&exc.pdu[..], &[0x83, 0x0B]);
    }

    #[test]
    fn bad_headers_are_errors() {
        // Another protocol id: that frame is dropped unanswered, the next one decodes.
        let frames = decode_all(&[0, 1, 0, 1, 0, 6, 1, 3, 0, 0, 0, 1, 0, 2, 0, 0, 0, 6, 1, 3, 0, 0, 0, 1])
            .expect("framed");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].transaction, 2);
        assert!(decode_all(&[0, 1, 0, 1, 0, 6, 1, 3, 0]).expect("incomplete").is_empty());
        assert!(matches!(decode_all(&[0, 1, 0, 0, 0, 1, 1]), Err(MbapError::Length(1))));
        assert!(matches!(decode_all(&[0, 1, 0, 0, 0x01, 0x0B, 1]), Err(MbapError::Length(267))));
        // An oversized request (FC16 of 124 registers, length 255) is framed whole, so it
        // can be answered 0x03 and the next frame decodes.
        let mut wire = vec![0, 3, 0, 0, 0, 255, 1, 0x10, 0, 0, 0, 124, 248];
        wire.extend([0; 248]);
        wire.extend([0, 4, 0, 0, 0, 6, 1, 3, 0, 0, 0, 1]);
        let frames = decode_all(&wire).expect("framed");
        assert_eq!(
            frames.iter().map(|f| (f.transaction, f.pdu.len())).collect::<Vec<_>>(),
            [(3, 254), (4, 5)]
        );
        assert_eq!(decode_request(&frames[0].pdu), Err(ExceptionCode::IllegalDataValue));
        assert!(decode_all(&[0, 1, 0, 0, 0, 6]).expect("short").is_empty());
        // The length is judged before the unit id arrives.
        assert!(matches!(decode_all(&[0, 1, 0, 0, 0, 0]), Err(MbapError::Length(0))));
        // At end of input a cut frame is dropped; whole frames before it still decode.
        let mut buf = BytesMut::from(&[0, 9, 0, 0, 0, 6, 1, 3, 0, 0, 0, 1, 0, 10, 0][..]);
        assert_eq!(MbapCodec.decode_eof(&mut buf).expect("framed").map(|f| f.transaction), Some(9));
        assert_eq!(MbapCodec.decode_eof(&mut buf).expect("cut frame dropped"), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn requests_are_judged_like_a_server() {
        use ExceptionCode::*;
        assert_eq!(decode_request(&[3, 0, 0x6B, 0, 3]), Ok(Request::ReadHoldingRegisters(107, 3)));
        assert_eq!(decode_request(&[3, 0, 0, 0, 126]), Err(IllegalDataValue));
        assert_eq!(decode_request(&[1, 0, 0, 0x07, 0xD1]), Err(IllegalDataValue));
        assert_eq!(decode_request(&[1, 0, 0, 0x07, 0xD0]), Ok(Request::ReadCoils(0, 2000)));
        assert_eq!(decode_request(&[3, 0xFF, 0xFF, 0, 2]), Err(IllegalDataAddress));
        assert_eq!(decode_request(&[3, 0, 0, 0]), Err(IllegalDataValue));
        assert_eq!(decode_request(&[5, 0, 1, 0x12, 0x34]), Err(IllegalDataValue));
        // Device identification goes to the device; its reply comes back byte for byte.
        assert_eq!(
            decode_request(&[0x2B, 0x0E, 1, 0]),
            Ok(Request::Custom(0x2B, Cow::Owned(vec![0x0E, 1, 0])))
        );
        assert_eq!(decode_request(&[0x83, 1]), Err(IllegalFunction));
        assert_eq!(decode_request(&[0]), Err(IllegalFunction));
        assert_eq!(decode_request(&[0, 1, 2]), Err(IllegalFunction));
        assert_eq!(
            decode_request(&[8, 0, 0, 0xA5, 0x37]),
            Ok(Request::Custom(8, Cow::Owned(vec![0, 0, 0xA5, 0x37])))
        );
        // Spec example: write coils 20..=29.
        let coils = [true, false, true, true, false, false, true, true, true, false];
        assert_eq!(
            decode_request(&[0x0F, 0x00, 0x13, 0x00, 0x0A, 0x02, 0xCD, 0x01]),
            Ok(Request::WriteMultipleCoils(19, Cow::Owned(coils.to_vec())))
        );
        // A quantity the bytes cannot hold (tokio-modbus' own decoder would panic here).
        assert_eq!(decode_request(&[0x0F, 0, 0, 0, 100, 1, 0xFF]), Err(IllegalDataValue));
        assert_eq!(decode_request(&[0x10, 0, 0, 0x80, 0, 0]), Err(IllegalDataValue));
        assert_eq!(
            decode_request(&[0x10, 0, 1, 0, 1, 2, 0, 7]),
            Ok(Request::WriteMultipleRegisters(1, Cow::Owned(vec![7])))
        );
        assert_eq!(decode_request(&[0x10, 0, 1, 0, 1, 2, 0]), Err(IllegalDataValue));
        assert_eq!(
            decode_request(&[0x17, 0, 3, 0, 6, 0, 0x0E, 0, 3, 6, 0, 0xFF, 0, 0xFF, 0, 0xFF]),
            Ok(Request::ReadWriteMultipleRegisters(3, 6, 14, Cow::Owned(vec![0xFF; 3])))
        );
        // Limits at their edges: FC15 1..=1968 coils, FC16 1..=123 registers, FC23
        // writing 1..=121, each byte count exactly what the quantity needs.
        let with = |head: &[u8], n: usize| [head, &vec![0; n][..]].concat();
        assert!(decode_request(&with(&[0x0F, 0, 0, 0x07, 0xB0, 246], 246)).is_ok());
        assert_eq!(decode_request(&with(&[0x0F, 0, 0, 0x07, 0xB1, 247], 247)), Err(IllegalDataValue));
        assert!(decode_request(&with(&[0x10, 0, 0, 0, 123, 246], 246)).is_ok());
        assert_eq!(decode_request(&with(&[0x10, 0, 0, 0, 124, 248], 248)), Err(IllegalDataValue));
        assert!(decode_request(&with(&[0x17, 0, 0, 0, 125, 0, 0, 0, 121, 242], 242)).is_ok());
        assert_eq!(decode_request(&with(&[0x17, 0, 0, 0, 1, 0, 0, 0, 122, 244], 244)), Err(IllegalDataValue));
        assert_eq!(decode_request(&with(&[0x17, 0, 0, 0, 126, 0, 0, 0, 1, 2], 2)), Err(IllegalDataValue));
        assert_eq!(decode_request(&[0x10, 0xFF, 0xFF, 0, 2, 4, 0, 1, 0, 2]), Err(IllegalDataAddress));
        assert_eq!(
            decode_request(&[0x16, 0, 4, 0, 0xF2, 0, 0x25]),
            Ok(Request::MaskWriteRegister(4, 0xF2, 0x25))
        );
    }
}
