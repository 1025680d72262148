//! Modbus PDUs on the wire: encoding requests and responses to bytes, and knowing how long
//! a PDU is from its first bytes (serial lines have no length field).
//!
//! The PDU types are tokio-modbus' [`Request`] and [`Response`]; tokio-modbus decodes
//! bytes into them, but does not expose its encoders, so they live here. Every length is
//! checked against the protocol limits before anything is built: callers get an error,
//! never a panic or a silently truncated frame.

use tokio_modbus::{ExceptionCode, Request, Response};

/// Most registers one read may ask for (FC3/FC4).
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most bits one read may ask for (FC1/FC2).
pub const MAX_READ_BITS: u16 = 2000;
/// Most registers one FC16 write may carry.
pub const MAX_WRITE_REGISTERS: u16 = 123;
/// Most coils one FC15 write may carry.
pub const MAX_WRITE_BITS: u16 = 1968;
/// Most registers the write half of FC23 may carry.
pub const MAX_RW_WRITE_REGISTERS: u16 = 121;
/// Largest PDU the protocol allows.
pub const MAX_PDU: usize = 253;

/// A request that cannot be put on the wire.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PduError {
    /// A count outside what the function code allows.
    #[error("function 0x{function:02X}: quantity {quantity} outside 1..={max}")]
    Quantity {
        /// Function code.
        function: u8,
        /// Requested quantity.
        quantity: usize,
        /// Protocol maximum.
        max: u16,
    },
    /// Address plus quantity past 0xFFFF.
    #[error("function 0x{function:02X}: address {address} + quantity {quantity} passes 65535")]
    Range {
        /// Function code.
        function: u8,
        /// First address.
        address: u16,
        /// Quantity.
        quantity: usize,
    },
    /// A PDU longer than 253 bytes.
    #[error("function 0x{function:02X}: pdu of {len} bytes exceeds 253")]
    TooLong {
        /// Function code.
        function: u8,
        /// Encoded length.
        len: usize,
    },
}

fn check(function: u8, address: u16, quantity: usize, max: u16) -> Result<(), PduError> {
    if quantity == 0 || quantity > usize::from(max) {
        return Err(PduError::Quantity { function, quantity, max });
    }
    if usize::from(address) + quantity > 0x1_0000 {
        return Err(PduError::Range { function, address, quantity });
    }
    Ok(())
}

fn put_u16(buf: &mut Vec<u8>, v: u16) {
    buf.extend_from_slice(&v.to_be_bytes());
}

fn put_bits(buf: &mut Vec<u8>, bits: &[bool]) {
    for chunk in bits.chunks(8) {
        let byte = chunk.iter().enumerate().fold(0u8, |b, (i, &on)| if on { b | (1 << i) } else { b });
        buf.push(byte);
    }
}

/// Number of bytes that hold `bits` packed bits.
fn packed_len(bits: usize) -> usize {
    bits.div_ceil(8)
}

/// Checks a request against the protocol limits for its function code.
pub fn validate_request(req: &Request<'_>) -> Result<(), PduError> {
    let f = req.function_code().value();
    match req {
        Request::ReadCoils(a, q) | Request::ReadDiscreteInputs(a, q) => {
            check(f, *a, usize::from(*q), MAX_READ_BITS)
        }
        Request::ReadHoldingRegisters(a, q) | Request::ReadInputRegisters(a, q) => {
            check(f, *a, usize::from(*q), MAX_READ_REGISTERS)
        }
        Request::WriteMultipleCoils(a, bits) => check(f, *a, bits.len(), MAX_WRITE_BITS),
        Request::WriteMultipleRegisters(a, words) => check(f, *a, words.len(), MAX_WRITE_REGISTERS),
        Request::ReadWriteMultipleRegisters(ra, rq, wa, words) => {
            check(f, *ra, usize::from(*rq), MAX_READ_REGISTERS)?;
            check(f, *wa, words.len(), MAX_RW_WRITE_REGISTERS)
        }
        Request::Custom(_, data) if data.len() + 1 > MAX_PDU => {
            Err(PduError::TooLong { function: f, len: data.len() + 1 })
        }
        _ => Ok(()),
    }
}

/// Appends the request PDU (function code first) to `buf`.
pub fn encode_request(req: &Request<'_>, buf: &mut Vec<u8>) -> Result<(), PduError> {
    validate_request(req)?;
    buf.push(req.function_code().value());
    match req {
        Request::ReadCoils(a, q)
        | Request::ReadDiscreteInputs(a, q)
        | Request::ReadHoldingRegisters(a, q)
        | Request::ReadInputRegisters(a, q) => {
            put_u16(buf, *a);
            put_u16(buf, *q);
        }
        Request::WriteSingleCoil(a, on) => {
            put_u16(buf, *a);
            put_u16(buf, if *on { 0xFF00 } else { 0x0000 });
        }
        Request::WriteSingleRegister(a, w) => {
            put_u16(buf, *a);
            put_u16(buf, *w);
        }
        Request::WriteMultipleCoils(a, bits) => {
            put_u16(buf, *a);
            put_u16(buf, bits.len() as u16);
            buf.push(packed_len(bits.len()) as u8);
            put_bits(buf, bits);
        }
        Request::WriteMultipleRegisters(a, words) => {
            put_u16(buf, *a);
            put_u16(buf, words.len() as u16);
            buf.push((words.len() * 2) as u8);
            words.iter().for_each(|w| put_u16(buf, *w));
        }
        Request::MaskWriteRegister(a, and, or) => {
            put_u16(buf, *a);
            put_u16(buf, *and);
            put_u16(buf, *or);
        }
        Request::ReadWriteMultipleRegisters(ra, rq, wa, words) => {
            put_u16(buf, *ra);
            put_u16(buf, *rq);
            put_u16(buf, *wa);
            put_u16(buf, words.len() as u16);
            buf.push((words.len() * 2) as u8);
            words.iter().for_each(|w| put_u16(buf, *w));
        }
        Request::ReportServerId => {}
        Request::ReadDeviceIdentification(code, object) => {
            buf.extend_from_slice(&[0x0E, code.value(), *object]);
        }
        Request::Custom(_, data) => buf.extend_from_slice(data),
    }
    Ok(())
}

/// Appends the response PDU to `buf`. `Response::ReadCoils`/`ReadDiscreteInputs` are
/// packed from exactly the bits given.
pub fn encode_response(rsp: &Response, buf: &mut Vec<u8>) {
    buf.push(rsp.function_code().value());
    match rsp {
        Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
            buf.push(packed_len(bits.len()) as u8);
            put_bits(buf, bits);
        }
        Response::ReadHoldingRegisters(words)
        | Response::ReadInputRegisters(words)
        | Response::ReadWriteMultipleRegisters(words) => {
            buf.push((words.len() * 2) as u8);
            words.iter().for_each(|w| put_u16(buf, *w));
        }
        Response::WriteSingleCoil(a, on) => {
            put_u16(buf, *a);
            put_u16(buf, if *on { 0xFF00 } else { 0x0000 });
        }
        Response::WriteSingleRegister(a, w) => {
            put_u16(buf, *a);
            put_u16(buf, *w);
        }
        Response::WriteMultipleCoils(a, q) | Response::WriteMultipleRegisters(a, q) => {
            put_u16(buf, *a);
            put_u16(buf, *q);
        }
        Response::MaskWriteRegister(a, and, or) => {
            put_u16(buf, *a);
            put_u16(buf, *and);
            put_u16(buf, *or);
        }
        Response::ReportServerId(id, running, data) => {
            buf.push((data.len() + 2) as u8);
            buf.push(*id);
            buf.push(if *running { 0xFF } else { 0x00 });
            buf.extend_from_slice(data);
        }
        // Device identification and custom replies are passed through as raw bytes by
        // the callers that need them; nothing in the gateway builds them.
        Response::ReadDeviceIdentification(_) => {}
        Response::Custom(_, data) => buf.extend_from_slice(data),
    }
}

/// Appends an exception PDU (function | 0x80, code).
pub fn encode_exception(function: u8, code: ExceptionCode, buf: &mut Vec<u8>) {
    buf.push(function | 0x80);
    buf.push(u8::from(code));
}

/// How many bytes the PDU starting at `pdu[0]` has, judged from the bytes seen so far.
///
/// `Some(n)` once the length is known (possibly more than `pdu.len()`), `None` while more
/// bytes are needed to tell, or when the function code has no length rule we know (the
/// caller then frames by silence). `request` is true for a PDU sent by a master.
///
/// Silence is a poor frame end behind USB adapters and device servers, which deliver a
/// frame in chunks with gaps longer than t3.5: every function whose frame says its own
/// length has a rule here. A device identification reply (FC43/14) says it object by
/// object: until its last object header has arrived, `n` is one past the next header
/// byte needed (more than `pdu.len()`, so the caller waits), then exact.
pub fn pdu_len(pdu: &[u8], request: bool) -> Option<usize> {
    let function = *pdu.first()?;
    if function & 0x80 != 0 {
        return Some(2);
    }
    let byte = |i: usize| pdu.get(i).map(|b| usize::from(*b));
    match (function, request) {
        (1..=6, true) => Some(5),
        (1..=4, false) => byte(1).map(|n| 2 + n),
        (5 | 6 | 15 | 16, false) => Some(5),
        (15 | 16, true) => byte(5).map(|n| 6 + n),
        (22, _) => Some(7),
        (23, true) => byte(9).map(|n| 10 + n),
        (23, false) => byte(1).map(|n| 2 + n),
        (17, true) => Some(1),
        (17, false) => byte(1).map(|n| 2 + n),
        (7, true) | (11, true) | (12, true) => Some(1),
        (7, false) => Some(2),
        (8, _) => Some(5),
        (11, false) => Some(5),
        (12, false) | (20 | 21, _) => byte(1).map(|n| 2 + n),
        (24, true) => Some(3),
        (24, false) => Some(3 + usize::from(u16::from_be_bytes([*pdu.get(1)?, *pdu.get(2)?]))),
        (43, true) if byte(1)? == 0x0E => Some(4),
        (43, false) if byte(1)? == 0x0E => {
            // Function, MEI type, code, conformity, more follows, next id, object count;
            // then each object: id, length, value.
            let count = match byte(6) {
                Some(n) => n,
                None => return Some(7),
            };
            let mut at = 7;
            for _ in 0..count {
                match byte(at + 1) {
                    Some(n) => at += 2 + n,
                    None => return Some(at + 2),
                }
            }
            Some(at)
        }
        _ => None,
    }
}

/// The exact length of the normal (non-exception) reply to `req`, when the request fixes it.
pub fn expected_response_len(req: &Request<'_>) -> Option<usize> {
    Some(match req {
        Request::ReadCoils(_, q) | Request::ReadDiscreteInputs(_, q) => 2 + packed_len(usize::from(*q)),
        Request::ReadHoldingRegisters(_, q)
        | Request::ReadInputRegisters(_, q)
        | Request::ReadWriteMultipleRegisters(_, q, _, _) => 2 + 2 * usize::from(*q),
        Request::WriteSingleCoil(..)
        | Request::WriteSingleRegister(..)
        | Request::WriteMultipleCoils(..)
        | Request::WriteMultipleRegisters(..) => 5,
        Request::MaskWriteRegister(..) => 7,
        _ => return None,
    })
}

/// An exception code as an operator reads it: `0x02 (illegal data address)`.
pub fn exception_text(code: u8) -> String {
    let name = match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x07 => "negative acknowledge",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    };
    format!("0x{code:02X} ({name})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn enc(req: Request<'_>) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_request(&req, &mut buf).expect("valid request");
        buf
    }

    // Byte vectors from the examples in the Modbus Application Protocol spec v1.1b3, §6.
    #[test]
    fn spec_examples_requests() {
        assert_eq!(enc(Request::ReadCoils(19, 19)), [0x01, 0x00, 0x13, 0x00, 0x13]);
        assert_eq!(enc(Request::ReadHoldingRegisters(107, 3)), [0x03, 0x00, 0x6B, 0x00, 0x03]);
        assert_eq!(enc(Request::WriteSingleCoil(172, true)), [0x05, 0x00, 0xAC, 0xFF, 0x00]);
        let coils = [true, false, true, true, false, false, true, true, true, false];
        assert_eq!(
            enc(Request::WriteMultipleCoils(19, Cow::Borrowed(&coils))),
            [0x0F, 0x00, 0x13, 0x00, 0x0A, 0x02, 0xCD, 0x01]
        );
        assert_eq!(
            enc(Request::WriteMultipleRegisters(1, Cow::Borrowed(&[0x000A, 0x0102]))),
            [0x10, 0x00, 0x01, 0x00, 0x02, 0x04, 0x00, 0x0A, 0x01, 0x02]
        );
        assert_eq!(
            enc(Request::MaskWriteRegister(4, 0x00F2, 0x0025)),
            [0x16, 0x00, 0x04, 0x00, 0xF2, 0x00, 0x25]
        );
    }

    #[test]
    fn spec_examples_responses() {
        let mut buf = Vec::new();
        encode_response(&Response::ReadHoldingRegisters(vec![0x022B, 0x0000, 0x0064]), &mut buf);
        assert_eq!(buf, [0x03, 0x06, 0x02, 0x2B, 0x00, 0x00, 0x00, 0x64]);
        buf.clear();
        let bits = [true, false, true, true, false, false, true, true, true, true, false, true];
        encode_response(&Response::ReadCoils(bits.to_vec()), &mut buf);
        assert_eq!(buf, [0x01, 0x02, 0xCD, 0x0B]);
    }

    #[test]
    fn limits_are_errors_not_panics() {
        let mut buf = Vec::new();
        assert!(encode_request(&Request::ReadHoldingRegisters(0, 126), &mut buf).is_err());
        assert!(encode_request(&Request::ReadHoldingRegisters(0, 0), &mut buf).is_err());
        assert!(encode_request(&Request::ReadCoils(0, 2001), &mut buf).is_err());
        assert!(encode_request(&Request::ReadHoldingRegisters(0xFFFF, 2), &mut buf).is_err());
        assert!(buf.is_empty());
    }

    #[test]
    fn lengths() {
        assert_eq!(pdu_len(&[0x03], false), None);
        assert_eq!(pdu_len(&[0x03, 0x06], false), Some(8));
        assert_eq!(pdu_len(&[0x83], false), Some(2));
        assert_eq!(pdu_len(&[0x10, 0, 1, 0, 2, 4], true), Some(10));
        assert_eq!(expected_response_len(&Request::ReadCoils(0, 9)), Some(4));
        // Functions whose frames say their length, so no silence is needed to end them.
        assert_eq!(pdu_len(&[0x18, 0, 6], false), Some(9));
        assert_eq!(pdu_len(&[0x18, 0], false), None);
        assert_eq!(pdu_len(&[0x18], true), Some(3));
        assert_eq!(pdu_len(&[0x14, 7], true), Some(9));
        assert_eq!(pdu_len(&[0x15, 9], false), Some(11));
        assert_eq!(pdu_len(&[0x0C, 8], false), Some(10));
        assert_eq!(pdu_len(&[0x2B, 0x0E], true), Some(4));
        assert_eq!(pdu_len(&[0x2B, 0x0D], true), None);
        // FC43/14 reply with two objects: "AB" and "XYZ".
        let id = [0x2B, 0x0E, 1, 1, 0, 0, 2, 0, 2, b'A', b'B', 1, 3, b'X', b'Y', b'Z'];
        assert_eq!(pdu_len(&id, false), Some(id.len()));
        assert_eq!(pdu_len(&id[..4], false), Some(7));
        assert_eq!(pdu_len(&id[..8], false), Some(9));
        assert_eq!(pdu_len(&id[..12], false), Some(13));
        assert_eq!(pdu_len(&id[..13], false), Some(16));
    }
}
