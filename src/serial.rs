//! What travels on a field line, byte by byte: the line's character framing ([`line`]),
//! the seam between the bus and a field protocol ([`framing`]), Modbus PDUs ([`pdu`]),
//! checksums ([`checksum`]), and the framings themselves: Modbus-RTU ([`rtu`]),
//! Modbus-ASCII ([`ascii`]), Modbus-TCP to field devices ([`mbap`]) and raw ASCII/binary
//! device protocols ([`raw`]).
//! Codecs only: the bus (`crate::bus`) owns the line and its timing.

pub mod ascii;
pub mod checksum;
pub mod framing;
pub mod line;
pub mod mbap;
pub mod pdu;
pub mod raw;
pub mod rs485;
pub mod rtu;
