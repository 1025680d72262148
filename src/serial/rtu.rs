//! Modbus RTU framing: the CRC-16 and the ADU (`unit | pdu | crc-lo crc-hi`), with the
//! line timing the serial-line spec requires (character time and the t3.5 silence).

use std::time::Duration;

use crate::serial::framing::{Decoded, Framing, SkipReason};
use crate::serial::line::{Line, Parity};
use crate::serial::pdu::PduError;

/// CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF), sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    crate::serial::checksum::crc16_modbus(data)
}

/// Appends `unit`, the PDU and the CRC: one complete RTU frame.
pub fn frame(unit: u8, pdu: &[u8], buf: &mut Vec<u8>) {
    let start = buf.len();
    buf.push(unit);
    buf.extend_from_slice(pdu);
    let crc = crc16(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// True when `frame` (unit .. crc) carries a correct CRC.
pub fn crc_ok(frame: &[u8]) -> bool {
    frame.len() >= 4 && {
        let (body, crc) = frame.split_at(frame.len() - 2);
        crc16(body).to_le_bytes() == [crc[0], crc[1]]
    }
}

/// Bits on the wire per character: start + data + parity + stop.
pub fn bits_per_char(line: &Line) -> u32 {
    1 + u32::from(line.data_bits) + u32::from(line.parity != Parity::None) + u32::from(line.stop_bits)
}

/// Time one character takes on the wire.
pub fn char_time(line: &Line) -> Duration {
    Duration::from_nanos(u64::from(bits_per_char(line)) * 1_000_000_000 / u64::from(line.baud.max(1)))
}

/// Time `bytes` characters take on the wire.
pub fn wire_time(line: &Line, bytes: usize) -> Duration {
    char_time(line) * bytes as u32
}

/// The inter-frame silence: 3.5 character times, fixed at 1.75 ms above 19200 baud
/// (Modbus over serial line spec v1.02, §2.5.1.1).
pub fn t35(line: &Line) -> Duration {
    if line.baud > 19_200 { Duration::from_micros(1750) } else { char_time(line) * 7 / 2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_spec_example() {
        // Serial line spec §6.2.2 example: 02 07 -> CRC 0x1241, sent 41 12.
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
        let mut buf = Vec::new();
        frame(0x01, &[0x03, 0x00, 0x00, 0x00, 0x0A], &mut buf);
        assert_eq!(buf, [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]);
        assert!(crc_ok(&buf));
        buf[3] ^= 1;
        assert!(!crc_ok(&buf));
    }

    #[test]
    fn pause_before_the_byte_count_is_not_the_end() {
        let req = tokio_modbus::Request::ReadHoldingRegisters(0, 1);
        assert!(matches!(decode_reply(1, &req, &[1, 3], true), Decoded::Incomplete));
        let mut reply = Vec::new();
        frame(1, &[3, 2, 0, 7], &mut reply);
        assert!(matches!(decode_reply(1, &req, &reply, true), Decoded::Reply { len: 7, .. }));
    }

    #[test]
    fn timing() {
        let l = Line { baud: 9600, data_bits: 8, parity: Parity::Even, stop_bits: 1 };
        assert_eq!(bits_per_char(&l), 11);
        assert_eq!(t35(&l).as_micros(), 4010);
        let fast = Line { baud: 115_200, ..l };
        assert_eq!(t35(&fast), Duration::from_micros(1750));
    }
}

/// Finds the reply to `request` sent to `unit` at the start of `buf` (Modbus serial line
/// spec: frames from other units or for other functions are discarded while the response
/// timeout keeps running; a CRC error is never data).
pub fn decode_reply(unit: u8, request: &tokio_modbus::Request<'_>, buf: &[u8], silent: bool) -> Decoded {
    let [addr, function, ..] = *buf else {
        return Decoded::Incomplete;
    };
    let want = request.function_code().value();
    let len = match crate::serial::pdu::pdu_len(&buf[1..], false) {
        Some(n) => match request {
            // FC8 answers with as many bytes as it was asked (sub-function 0 loops back any
            // amount of data), not always 4 data bytes.
            tokio_modbus::Request::Custom(8, data) if function == 8 && addr == unit => 1 + 1 + data.len() + 2,
            _ => 1 + n + 2,
        },
        // Only the byte count is missing: the next bytes tell the length, so a silence
        // here is a pause inside the frame (an adapter's chunking), not its end.
        None if buf.len() < 4 && matches!(function, 1..=4 | 12 | 17 | 20 | 21 | 23 | 24 | 43) => {
            return Decoded::Incomplete;
        }
        // A function we cannot length: the frame ends where the line went silent.
        None if silent && addr == unit && function & 0x7F == want => buf.len(),
        None if silent || function & 0x7F == 0 => {
            return Decoded::Skip { len: 1, why: SkipReason::Noise };
        }
        None => return Decoded::Incomplete,
    };
    if len > 256 {
        return Decoded::Skip { len: 1, why: SkipReason::Noise };
    }
    if buf.len() < len {
        // Serial drivers and USB adapters deliver frames in chunks with gaps longer than
        // t3.5, so a frame whose length is known is never cut short by silence. But the
        // "frame" may be noise claiming a long length: if a complete reply stands later in
        // the buffer, resynchronise to it.
        if silent {
            let complete =
                |i: &usize| matches!(decode_reply(unit, request, &buf[*i..], false), Decoded::Reply { .. });
            if let Some(i) = (1..buf.len()).find(complete) {
                return Decoded::Skip { len: i, why: SkipReason::Noise };
            }
        }
        return Decoded::Incomplete;
    }
    let frame = &buf[..len];
    if !crc_ok(frame) {
        let why = if addr == unit && function & 0x7F == want { SkipReason::Crc } else { SkipReason::Noise };
        return Decoded::Skip { len: 1, why };
    }
    check_reply(unit, request, addr, &frame[1..len - 2], len)
}

/// Judges an intact frame of `len` bytes (its CRC or LRC already checked) from `addr`
/// carrying `pdu`, against the request sent to `unit`: shared by the Modbus serial
/// framings. Another unit or function is [`SkipReason::Foreign`]; a reply whose length or
/// echo does not fit the request is [`SkipReason::Mismatch`]; a malformed exception is a
/// mismatch too.
pub fn check_reply(
    unit: u8,
    request: &tokio_modbus::Request<'_>,
    addr: u8,
    pdu: &[u8],
    len: usize,
) -> Decoded {
    let want = request.function_code().value();
    let skip = |why| Decoded::Skip { len, why };
    let Some(&function) = pdu.first() else {
        return skip(SkipReason::Mismatch);
    };
    if addr != unit || function & 0x7F != want {
        return skip(SkipReason::Foreign);
    }
    if function & 0x80 != 0 {
        return match *pdu {
            [_, code] => Decoded::Reply { len, reply: Err(tokio_modbus::ExceptionCode::new(code)) },
            _ => skip(SkipReason::Mismatch),
        };
    }
    if crate::serial::pdu::expected_response_len(request).is_some_and(|n| n != pdu.len()) {
        return skip(SkipReason::Mismatch);
    }
    // A function the gateway does not interpret (relayed for a Modbus-TCP master) is
    // answered with the device's bytes as they are: tokio-modbus would refuse replies the
    // spec allows, e.g. FC17 with a server id longer than one byte (device specific).
    if let tokio_modbus::Request::Custom(..) = request {
        let reply = tokio_modbus::Response::Custom(function, bytes::Bytes::copy_from_slice(&pdu[1..]));
        return Decoded::Reply { len, reply: Ok(reply) };
    }
    match tokio_modbus::Response::try_from(bytes::Bytes::copy_from_slice(pdu)) {
        Ok(rsp) if echo_matches(request, &rsp) => Decoded::Reply { len, reply: Ok(rsp) },
        _ => skip(SkipReason::Mismatch),
    }
}

/// Write replies echo the request; a different echo is not the answer to this request.
fn echo_matches(req: &tokio_modbus::Request<'_>, rsp: &tokio_modbus::Response) -> bool {
    use tokio_modbus::{Request as Q, Response as R};
    match (req, rsp) {
        (Q::WriteSingleCoil(a, v), R::WriteSingleCoil(b, w)) => a == b && v == w,
        (Q::WriteSingleRegister(a, v), R::WriteSingleRegister(b, w)) => a == b && v == w,
        (Q::WriteMultipleCoils(a, v), R::WriteMultipleCoils(b, n)) => a == b && v.len() == usize::from(*n),
        (Q::WriteMultipleRegisters(a, v), R::WriteMultipleRegisters(b, n)) => {
            a == b && v.len() == usize::from(*n)
        }
        (Q::MaskWriteRegister(a, x, y), R::MaskWriteRegister(b, u, v)) => a == b && x == u && y == v,
        _ => true,
    }
}

/// Modbus RTU as a bus framing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rtu;

impl Framing for Rtu {
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

    fn decode(&self, unit: u8, request: &tokio_modbus::Request<'_>, buf: &[u8], silent: bool) -> Decoded {
        decode_reply(unit, request, buf, silent)
    }

    fn frame_unit(&self, buf: &[u8]) -> Option<u8> {
        buf.first().copied()
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;
    use tokio_modbus::{Request, Response};

    fn adu(unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        frame(unit, pdu, &mut b);
        b
    }

    #[test]
    fn finds_reply_after_noise_and_foreign_frames() {
        let req = Request::ReadHoldingRegisters(0, 2);
        let good = adu(1, &[0x03, 0x04, 0x00, 0x01, 0x00, 0x02]);
        assert_eq!(decode_reply(1, &req, &good[..5], false), Decoded::Incomplete);
        let Decoded::Reply { len, reply } = decode_reply(1, &req, &good, false) else { panic!() };
        assert_eq!((len, reply), (9, Ok(Response::ReadHoldingRegisters(vec![1, 2]))));
        // Another unit's reply: skipped whole.
        let other = adu(2, &[0x03, 0x04, 0x00, 0x01, 0x00, 0x02]);
        assert_eq!(decode_reply(1, &req, &other, false), Decoded::Skip { len: 9, why: SkipReason::Foreign });
        // Bad CRC: one byte dropped, never data.
        let mut bad = good.clone();
        bad[4] ^= 0xFF;
        assert_eq!(decode_reply(1, &req, &bad, false), Decoded::Skip { len: 1, why: SkipReason::Crc });
        // Right unit and function but a different register count: not our answer.
        let wrong_len = adu(1, &[0x03, 0x02, 0x00, 0x01]);
        assert_eq!(
            decode_reply(1, &req, &wrong_len, false),
            Decoded::Skip { len: 7, why: SkipReason::Mismatch }
        );
        // Exception.
        let exc = adu(1, &[0x83, 0x02]);
        assert!(matches!(decode_reply(1, &req, &exc, false), Decoded::Reply { len: 5, reply: Err(_) }));
    }

    #[test]
    fn custom_functions_reply_raw() {
        // FC17 Report Server ID: the server id is device specific (here 8 bytes, as
        // pymodbus sends it), then the run indicator; tokio-modbus cannot decode that.
        let req = Request::Custom(0x11, Vec::new().into());
        let mut pdu = vec![0x11, 9];
        pdu.extend_from_slice(b"Pymodbus");
        pdu.push(0xFF);
        let wire = adu(1, &pdu);
        assert_eq!(
            decode_reply(1, &req, &wire, false),
            Decoded::Reply {
                len: wire.len(),
                reply: Ok(Response::Custom(0x11, bytes::Bytes::copy_from_slice(&pdu[1..])))
            }
        );
        // A function with no length rule (user-defined 0x41): framed by the silence.
        let req = Request::Custom(0x41, vec![1].into());
        let wire = adu(1, &[0x41, 1, 2, 3]);
        assert_eq!(decode_reply(1, &req, &wire, false), Decoded::Incomplete);
        assert!(matches!(
            decode_reply(1, &req, &wire, true),
            Decoded::Reply { reply: Ok(Response::Custom(0x41, _)), .. }
        ));
    }

    /// FC24 (FIFO queue, 2-byte byte count), FC20/21 (file records), FC12 (event log) and
    /// FC43/14 (device identification) say their own length: a reply delivered in
    /// chunks with a silence between them (a USB adapter, a device server) is waited
    /// for, not cut at the silence and lost to a CRC error.
    #[test]
    fn replies_that_say_their_length_survive_a_pause() {
        let id = [0x2B, 0x0E, 1, 1, 0, 0, 2, 0, 2, b'A', b'B', 1, 3, b'X', b'Y', b'Z'];
        let cases: [(Request<'_>, Vec<u8>); 4] = [
            (Request::Custom(0x18, vec![0, 0].into()), vec![0x18, 0, 6, 0, 2, 0, 1, 0, 2]),
            (Request::Custom(0x14, vec![7, 6, 0, 1, 0, 0, 0, 1].into()), vec![0x14, 4, 3, 6, 0, 9]),
            (Request::Custom(0x0C, Vec::new().into()), vec![0x0C, 6, 0, 0, 0, 1, 0, 1]),
            (Request::Custom(0x2B, vec![0x0E, 1, 0].into()), id.to_vec()),
        ];
        for (req, pdu) in cases {
            let wire = adu(1, &pdu);
            for cut in 2..wire.len() {
                assert_eq!(
                    decode_reply(1, &req, &wire[..cut], true),
                    Decoded::Incomplete,
                    "{pdu:02X?} cut at {cut}"
                );
            }
            let want = Response::Custom(pdu[0], bytes::Bytes::copy_from_slice(&pdu[1..]));
            assert_eq!(
                decode_reply(1, &req, &wire, false),
                Decoded::Reply { len: wire.len(), reply: Ok(want) }
            );
        }
    }

    #[test]
    fn diagnostics_reply_is_as_long_as_the_request() {
        // FC8 sub-function 0 (return query data) with 6 data bytes loops them all back.
        let req = Request::Custom(8, vec![0, 0, 1, 2, 3, 4, 5, 6].into());
        let pdu = [8, 0, 0, 1, 2, 3, 4, 5, 6];
        let wire = adu(1, &pdu);
        assert_eq!(decode_reply(1, &req, &wire[..8], false), Decoded::Incomplete);
        assert_eq!(
            decode_reply(1, &req, &wire, false),
            Decoded::Reply {
                len: wire.len(),
                reply: Ok(Response::Custom(8, bytes::Bytes::copy_from_slice(&pdu[1..])))
            }
        );
        let req = Request::Custom(8, vec![0, 0, 0xA5, 0x37].into());
        let wire = adu(1, &[8, 0, 0, 0xA5, 0x37]);
        assert!(matches!(decode_reply(1, &req, &wire, false), Decoded::Reply { .. }));
    }

    /// Every reply is judged against its request (application protocol spec §6): the
    /// byte count against the quantity, write echoes field by field, exceptions by unit
    /// and function. A reply that does not fit is never taken as the answer.
    #[test]
    fn replies_are_judged_against_their_request() {
        let skip = |why| Decoded::Skip { len: 0, why };
        let judge =
            |req: &Request<'_>, unit: u8, pdu: &[u8]| match decode_reply(1, req, &adu(unit, pdu), false) {
                Decoded::Skip { why, .. } => skip(why),
                d => d,
            };
        let mismatch = skip(SkipReason::Mismatch);
        // FC1: 9 coils take 2 bytes, not 1 (nor 3).
        let coils = Request::ReadCoils(0, 9);
        assert_eq!(judge(&coils, 1, &[1, 1, 0xFF]), mismatch);
        assert_eq!(judge(&coils, 1, &[1, 3, 0xFF, 1, 0]), mismatch);
        assert!(matches!(judge(&coils, 1, &[1, 2, 0xFF, 1]), Decoded::Reply { reply: Ok(_), .. }));
        // FC23: the byte count follows the read quantity.
        let rw = Request::ReadWriteMultipleRegisters(0, 2, 5, vec![7].into());
        assert_eq!(judge(&rw, 1, &[0x17, 2, 0, 1]), mismatch);
        assert_eq!(
            judge(&rw, 1, &[0x17, 4, 0, 1, 0, 2]),
            Decoded::Reply { len: 9, reply: Ok(Response::ReadWriteMultipleRegisters(vec![1, 2])) }
        );
        // Write echoes: address, value, quantity, masks.
        let coil = Request::WriteSingleCoil(4, true);
        assert_eq!(judge(&coil, 1, &[5, 0, 4, 0, 0]), mismatch);
        assert_eq!(judge(&coil, 1, &[5, 0, 4, 0x12, 0x34]), mismatch);
        let many = Request::WriteMultipleCoils(4, vec![true; 10].into());
        assert_eq!(judge(&many, 1, &[15, 0, 4, 0, 9]), mismatch);
        assert_eq!(judge(&many, 1, &[15, 0, 5, 0, 10]), mismatch);
        let regs = Request::WriteMultipleRegisters(4, vec![1, 2].into());
        assert_eq!(judge(&regs, 1, &[16, 0, 4, 0, 3]), mismatch);
        assert!(matches!(judge(&regs, 1, &[16, 0, 4, 0, 2]), Decoded::Reply { reply: Ok(_), .. }));
        let mask = Request::MaskWriteRegister(4, 0xF2, 0x25);
        assert_eq!(judge(&mask, 1, &[22, 0, 4, 0, 0xF2, 0, 0x24]), mismatch);
        // Exceptions: from another unit or for another function they are someone else's.
        let read = Request::ReadHoldingRegisters(0, 1);
        assert_eq!(judge(&read, 2, &[0x83, 2]), skip(SkipReason::Foreign));
        assert_eq!(judge(&read, 1, &[0x84, 2]), skip(SkipReason::Foreign));
        assert_eq!(
            judge(&read, 1, &[0x83, 4]),
            Decoded::Reply { len: 5, reply: Err(tokio_modbus::ExceptionCode::ServerDeviceFailure) }
        );
    }

    #[test]
    fn write_echo_must_match() {
        let req = Request::WriteSingleRegister(5, 7);
        let echo = adu(1, &[0x06, 0x00, 0x05, 0x00, 0x07]);
        assert!(matches!(decode_reply(1, &req, &echo, false), Decoded::Reply { reply: Ok(_), .. }));
        let other = adu(1, &[0x06, 0x00, 0x06, 0x00, 0x07]);
        assert!(matches!(
            decode_reply(1, &req, &other, false),
            Decoded::Skip { why: SkipReason::Mismatch, .. }
        ));
    }
}
