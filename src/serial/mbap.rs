//! Modbus-TCP field devices as a bus (`port = "modbus-tcp://host:502"`): the MBAP framing
//! a bus speaks to a meter, drive, remote I/O or PLC that is a Modbus-TCP server itself.
//!
//! The bus engine owns the connection as it owns a serial line (one transaction at a
//! time, retries, reconnect with back-off); this framing owns the wire format: each
//! transaction gets the next transaction id (wrapping, never 0 twice in a row... it is
//! simply a u16 counter), and only a frame carrying that id, protocol id 0, the unit id
//! asked and a reply that fits the request is taken as the answer.
//!
//! Invariants:
//! - a late answer to an earlier transaction (its id is one of the [`RECENT`] issued before
//!   the current one) is skipped whole as [`SkipReason::Late`], any other foreign frame as
//!   [`SkipReason::Foreign`], while the timeout keeps running: never data;
//! - a retry resends the same frame, with the same transaction id: it is the same
//!   transaction, and an answer to the first attempt arriving late is a valid answer to
//!   the retry (the request was the same);
//! - a header whose length field no Modbus reply can have (under 2, over 254) means the
//!   stream is not Modbus-TCP or is out of step: everything buffered is dropped as noise
//!   (MBAP has no frame marker to resynchronise on);
//! - `silent` is ignored: MBAP frames say their length.

use std::sync::atomic::{AtomicU16, Ordering::Relaxed};

use tokio_modbus::Request;

use crate::serial::framing::{Decoded, Framing, SkipReason};
use crate::serial::pdu::PduError;

/// Bytes of an MBAP header, unit id included.
const HEADER: usize = 7;

/// How many transaction ids before the current one a reply may carry and still be our
/// late reply (at one transaction per millisecond, the last second's): an id further back,
/// or never issued, is someone else's frame.
pub const RECENT: u16 = 1024;

/// Modbus-TCP (MBAP) framing for a bus of Modbus-TCP devices.
#[derive(Debug, Default)]
pub struct Mbap {
    /// The transaction id of the request last encoded.
    current: AtomicU16,
    /// Ids issued so far, up to [`RECENT`].
    issued: AtomicU16,
}

impl Mbap {
    /// The transaction id the next reply must carry.
    pub fn current(&self) -> u16 {
        self.current.load(Relaxed)
    }
}

impl Framing for Mbap {
    fn encode(&self, unit: u8, request: &Request<'_>, out: &mut Vec<u8>) -> Result<(), PduError> {
        // Only the bus task encodes and decodes: a plain increment is race-free.
        let tid = self.current.load(Relaxed).wrapping_add(1);
        encode_with_id(tid, unit, request, out)?;
        self.current.store(tid, Relaxed);
        self.issued.store(self.issued.load(Relaxed).saturating_add(1).min(RECENT), Relaxed);
        Ok(())
    }

    fn decode(&self, unit: u8, request: &Request<'_>, buf: &[u8], _silent: bool) -> Decoded {
        let (tid, protocol, total) = match header(buf) {
            Header::Incomplete => return Decoded::Incomplete,
            Header::Noise => return Decoded::Skip { len: buf.len(), why: SkipReason::Noise },
            Header::Frame { tid, protocol, len, .. } => (tid, protocol, len),
        };
        if protocol != 0 {
            return Decoded::Skip { len: total, why: SkipReason::Foreign };
        }
        if tid != self.current() {
            let back = self.current().wrapping_sub(tid);
            let ours = back <= self.issued.load(Relaxed).saturating_sub(1);
            return Decoded::Skip {
                len: total,
                why: if ours { SkipReason::Late } else { SkipReason::Foreign },
            };
        }
        crate::serial::rtu::check_reply(unit, request, buf[HEADER - 1], &buf[HEADER..total], total)
    }
}

/// Encodes `request` for `unit` as one MBAP frame carrying transaction id `tid` (a bus
/// that pipelines picks its own ids: `bus::inflight`).
pub fn encode_with_id(tid: u16, unit: u8, request: &Request<'_>, out: &mut Vec<u8>) -> Result<(), PduError> {
    let mut pdu = Vec::with_capacity(crate::serial::pdu::MAX_PDU);
    crate::serial::pdu::encode_request(request, &mut pdu)?;
    out.extend_from_slice(&tid.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    // At most 253 PDU bytes (encode_request checks): the length fits.
    out.extend_from_slice(&u16::try_from(pdu.len() + 1).unwrap_or(u16::MAX).to_be_bytes());
    out.push(unit);
    out.extend_from_slice(&pdu);
    Ok(())
}

/// The MBAP header of the frame at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Not all of the frame is there yet.
    Incomplete,
    /// A length no Modbus reply can have: the stream is out of step, drop it all.
    Noise,
    /// A whole frame of `len` bytes (header included; the PDU is `buf[7..len]`).
    Frame {
        /// Transaction id.
        tid: u16,
        /// Protocol id (0 is Modbus).
        protocol: u16,
        /// Unit id.
        unit: u8,
        /// Bytes of the frame.
        len: usize,
    },
}

/// Cuts the first frame out of `buf` by its MBAP header.
pub fn header(buf: &[u8]) -> Header {
    if buf.len() < 6 {
        return Header::Incomplete;
    }
    let length = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    if !(2..=254).contains(&length) {
        return Header::Noise;
    }
    let len = 6 + length;
    if buf.len() < len {
        return Header::Incomplete;
    }
    Header::Frame {
        tid: u16::from_be_bytes([buf[0], buf[1]]),
        protocol: u16::from_be_bytes([buf[2], buf[3]]),
        unit: buf[HEADER - 1],
        len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_modbus::{ExceptionCode, Response};

    fn reply(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut f = tid.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
        f.push(unit);
        f.extend_from_slice(pdu);
        f
    }

    #[test]
    fn each_transaction_gets_the_next_id_and_only_its_answer_is_taken() {
        let m = Mbap::default();
        let req = Request::ReadHoldingRegisters(4, 2);
        let mut out = Vec::new();
        m.encode(7, &req, &mut out).expect("encodes");
        assert_eq!(out, [0, 1, 0, 0, 0, 6, 7, 3, 0, 4, 0, 2]);
        out.clear();
        m.encode(7, &req, &mut out).expect("encodes");
        assert_eq!(&out[..2], [0, 2], "the next transaction id");

        // The late answer to transaction 1, then the answer to 2, in one read.
        let mut buf = reply(1, 7, &[3, 4, 0, 1, 0, 2]);
        buf.extend(reply(2, 7, &[3, 4, 0, 3, 0, 4]));
        let Decoded::Skip { len, why } = m.decode(7, &req, &buf, false) else { panic!("stale answer taken") };
        assert_eq!((len, why), (13, SkipReason::Late), "an id we issued before: a late reply");
        // An id never issued is someone else's.
        assert!(matches!(
            m.decode(7, &req, &reply(3, 7, &[3, 4, 0, 1, 0, 2]), false),
            Decoded::Skip { why: SkipReason::Foreign, .. }
        ));
        assert_eq!(
            m.decode(7, &req, &buf[len..], false),
            Decoded::Reply { len: 13, reply: Ok(Response::ReadHoldingRegisters(vec![3, 4])) }
        );
        // Another unit, another protocol, a reply that does not fit: never data.
        for bad in [reply(2, 8, &[3, 4, 0, 3, 0, 4]), reply(2, 7, &[3, 2, 0, 3])] {
            assert!(matches!(m.decode(7, &req, &bad, false), Decoded::Skip { .. }), "{bad:?}");
        }
        let mut other = reply(2, 7, &[3, 4, 0, 3, 0, 4]);
        other[3] = 1;
        assert!(matches!(m.decode(7, &req, &other, false), Decoded::Skip { .. }));
        // Exceptions are answers; a frame cut short waits; an impossible length is noise.
        assert_eq!(
            m.decode(7, &req, &reply(2, 7, &[0x83, 2]), false),
            Decoded::Reply { len: 9, reply: Err(ExceptionCode::IllegalDataAddress) }
        );
        assert_eq!(m.decode(7, &req, &buf[13..20], false), Decoded::Incomplete);
        assert_eq!(
            m.decode(7, &req, &[0, 2, 0, 0, 0x10, 0, 7], false),
            Decoded::Skip { len: 7, why: SkipReason::Noise }
        );
    }

    #[test]
    fn the_transaction_id_wraps() {
        let m = Mbap { current: AtomicU16::new(u16::MAX), issued: AtomicU16::new(RECENT) };
        let mut out = Vec::new();
        m.encode(1, &Request::ReadCoils(0, 1), &mut out).expect("encodes");
        assert_eq!(&out[..2], [0, 0]);
        assert_eq!(m.current(), 0);
        // The id before the wrap is still recognised as ours.
        let late = [0xFF, 0xFF, 0, 0, 0, 4, 1, 1, 1, 1];
        assert!(matches!(
            m.decode(1, &Request::ReadCoils(0, 1), &late, false),
            Decoded::Skip { why: SkipReason::Late, .. }
        ));
    }
}
