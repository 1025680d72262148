//! The seam between a bus and the field protocol spoken on it: the bus owns the line
//! (queue, timing, retries, reopen); a [`Framing`] owns how a request is put on the wire
//! and how its reply is recognised among the bytes that come back. A new serial protocol
//! is a new type implementing this trait, not a branch in the bus.
//!
//! Requests and replies are tokio-modbus PDUs. Protocols that are not Modbus carry their
//! bytes as `Request::Custom` / `Response::Custom`.

use tokio_modbus::Request;

use crate::serial::pdu::PduError;

/// How one field protocol frames requests and finds replies.
pub trait Framing: Send + Sync + std::fmt::Debug + 'static {
    /// Appends the complete wire frame of `request` for `unit` to `out`.
    fn encode(&self, unit: u8, request: &Request<'_>, out: &mut Vec<u8>) -> Result<(), PduError>;

    /// Looks for the reply to `request` at the start of `buf`. `silent` is true when the
    /// line has been quiet for the inter-frame silence since the last byte in `buf`, for
    /// protocols whose frames end with silence.
    fn decode(&self, unit: u8, request: &Request<'_>, buf: &[u8], silent: bool) -> Decoded;

    /// True when a reply names the unit that sent it (Modbus: the address byte), so a
    /// late reply from one unit can never answer a request to another and the bus may
    /// serve other units while one may still answer late. False (raw devices) makes the
    /// whole bus one unit for that purpose.
    fn replies_name_unit(&self) -> bool {
        true
    }

    /// The unit a frame starting at `buf[0]` names, when the bytes say (for telling whether
    /// a frame cut short came from the unit asked).
    fn frame_unit(&self, buf: &[u8]) -> Option<u8> {
        let _ = buf;
        None
    }
}

/// What the bytes received so far say about the reply to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Not enough bytes yet.
    Incomplete,
    /// A complete, valid reply of `len` bytes: a response or a Modbus exception.
    Reply {
        /// Bytes the frame took.
        len: usize,
        /// The device's answer.
        reply: Result<tokio_modbus::Response, tokio_modbus::ExceptionCode>,
    },
    /// Bytes to throw away, and why (the search for the reply goes on).
    Skip {
        /// Bytes to drop from the front of the buffer.
        len: usize,
        /// Why they are dropped.
        why: SkipReason,
    },
}

/// Why received bytes were not taken as the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// A frame with a bad CRC (one byte dropped to resynchronise).
    Crc,
    /// A valid frame from another unit or for another function (someone else's traffic).
    Foreign,
    /// A valid frame whose length or echo does not fit the request.
    Mismatch,
    /// Bytes that do not start any frame we know.
    Noise,
}
