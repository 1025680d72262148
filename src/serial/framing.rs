//! The seam between a bus and the field protocol spoken on it: the bus owns the line
//! (queue, timing, retries, reopen); a [`Framing`] owns how a request is put on the wire
//! and how its reply is recognised among the bytes that come back. A new serial protocol
//! is a new type implementing this trait, not a branch in the bus.
//!
//! Requests and replies are tokio-modbus PDUs. Protocols that are not Modbus carry their
//! bytes as `Request::Custom` / `Response::Custom`.

use tokio_modbus::Request;

use crate::point::names::Named;
use crate::serial::pdu::PduError;

/// The field protocol spoken on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Modbus RTU (binary frames, CRC-16, t3.5 silence between frames).
    ModbusRtu,
    /// Modbus ASCII (`:` hex LRC CR LF frames); same devices and points as RTU.
    ModbusAscii,
    /// Modbus-TCP devices reached over TCP (`modbus-tcp://host:port`): MBAP frames, no
    /// line timing; same devices and points as RTU.
    ModbusTcp,
    /// Raw serial devices with their own request/response or streaming protocols
    /// (`model::Bus::raw_devices`; no Modbus devices).
    Raw,
}

impl Named for Protocol {
    const NAMES: &'static [(Self, &'static str)] = &[
        (Protocol::ModbusRtu, "modbus-rtu"),
        (Protocol::ModbusAscii, "modbus-ascii"),
        (Protocol::Raw, "raw"),
        (Protocol::ModbusTcp, "modbus-tcp"),
    ];
}
crate::point::names::named_impls!(Protocol);

/// A Modbus framing on a serial line by its short name, as the simulator's `protocol`
/// and `poll --protocol` write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModbusSerial {
    /// Modbus-RTU (binary frames, CRC).
    #[default]
    Rtu,
    /// Modbus-ASCII (`:` hex LRC CR LF frames).
    Ascii,
}

impl Named for ModbusSerial {
    const NAMES: &'static [(Self, &'static str)] =
        &[(ModbusSerial::Rtu, "rtu"), (ModbusSerial::Ascii, "ascii")];
}
crate::point::names::named_impls!(ModbusSerial);

impl ModbusSerial {
    /// The bus protocol of this framing.
    pub fn protocol(self) -> Protocol {
        match self {
            ModbusSerial::Rtu => Protocol::ModbusRtu,
            ModbusSerial::Ascii => Protocol::ModbusAscii,
        }
    }
}

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
    /// A reply to an earlier request of ours, which the framing tells apart (a Modbus-TCP
    /// transaction id we issued before the current one): a late reply.
    Late,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::names;

    #[test]
    fn protocol_names_read_back() {
        for (p, n) in Protocol::NAMES {
            assert_eq!(names::parse::<Protocol>(n), Some(*p));
        }
        assert_eq!(Protocol::NAMES.len(), 4);
        assert_eq!(Protocol::ModbusTcp.to_string(), "modbus-tcp");
        assert_eq!(ModbusSerial::Ascii.to_string(), "ascii");
        assert_eq!(ModbusSerial::Ascii.protocol(), Protocol::ModbusAscii);
    }
}
