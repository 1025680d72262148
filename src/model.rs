//! The validated, typed configuration the runtime works from. Nothing here is optional
//! "until runtime": every default is resolved and every reference checked by
//! [`crate::config`] before a model exists.

use std::time::Duration;

use crate::value::{DataType, Table, WordOrder};

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Model {
    /// Gateway-wide settings.
    pub gateway: Gateway,
    /// Every serial bus with its devices and points.
    pub buses: Vec<Bus>,
}

/// Gateway-wide settings.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// This gateway's name; peers see its points as `name/point`.
    pub name: String,
    /// How often each bus logs its one-line summary at info level.
    pub summary_interval: Duration,
}

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Character framing of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// Bits per second.
    pub baud: u32,
    /// Data bits per character (7 or 8).
    pub data_bits: u8,
    /// Parity.
    pub parity: Parity,
    /// Stop bits (1 or 2).
    pub stop_bits: u8,
}

/// The field protocol spoken on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Modbus RTU (binary frames, CRC-16, t3.5 silence between frames).
    ModbusRtu,
}

/// One serial line, owned by one task.
#[derive(Debug, Clone)]
pub struct Bus {
    /// Unique bus name.
    pub name: String,
    /// Device path (`/dev/ttyUSB0`, `/dev/serial/by-id/...`).
    pub port: String,
    /// Character framing.
    pub line: Line,
    /// Field protocol.
    pub protocol: Protocol,
    /// Default response timeout for the devices on this bus.
    pub timeout: Duration,
    /// Retries after a timeout or a corrupt reply before a transaction fails.
    pub retries: u8,
    /// Most transactions waiting in the bus queue; more are refused, not queued.
    pub queue_depth: usize,
    /// Longest wait between attempts to reopen a port that failed.
    pub reopen_max: Duration,
    /// The devices on this bus.
    pub devices: Vec<Device>,
}

/// One field device (a Modbus unit) on a bus.
#[derive(Debug, Clone)]
pub struct Device {
    /// Unique device name; point names are `device.point`.
    pub name: String,
    /// Modbus unit id, 1..=247.
    pub unit: u8,
    /// Response timeout (the bus default unless overridden).
    pub timeout: Duration,
    /// Extra pause before each request to this device, for slow turnaround.
    pub turnaround: Duration,
    /// Most registers in one read (1..=125).
    pub max_registers: u16,
    /// Most bits in one read (1..=2000).
    pub max_bits: u16,
    /// Largest run of unwanted registers/bits read to merge two requests into one.
    pub max_gap: u16,
    /// Longest pause between re-probes of a device that stopped answering.
    pub backoff_max: Duration,
    /// The points read from this device.
    pub points: Vec<Point>,
}

/// One typed value read from a device.
#[derive(Debug, Clone)]
pub struct Point {
    /// Full name, `device.point`.
    pub name: String,
    /// Table the point lives in.
    pub table: Table,
    /// Zero-based protocol address (the configured address base already applied).
    pub address: u16,
    /// Data type.
    pub data_type: DataType,
    /// Byte/word order for multi-register types.
    pub order: WordOrder,
    /// Multiplier applied to the raw number (1.0 = none).
    pub scale: f64,
    /// Added after scaling (0.0 = none).
    pub offset: f64,
    /// How often the point is read.
    pub interval: Duration,
    /// After this long without a good read the value is reported stale.
    pub stale_after: Duration,
    /// Engineering unit, for display only.
    pub unit: Option<String>,
}
