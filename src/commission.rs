//! One-shot reads for commissioning (`m2m-gateway poll`, like mbpoll): the same bus engine
//! as the gateway — timing, CRC checks, stale-input discard — driven from the command line,
//! with the registers decoded as a chosen type and printed for people or as JSON.

use std::time::Duration;

use serde::Serialize;
use tokio_modbus::{Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{self, BusError, Priority};
use crate::codec;
use crate::model::{Bus, Line, Protocol};
use crate::value::{DataType, Table, Value, WordOrder};

/// What to read and how to show it.
#[derive(Debug, Clone)]
pub struct PollSpec {
    /// Serial device path.
    pub port: String,
    /// Line settings.
    pub line: Line,
    /// Unit id.
    pub unit: u8,
    /// Table.
    pub table: Table,
    /// First zero-based address.
    pub address: u16,
    /// Number of values (of `data_type`) to read.
    pub count: u16,
    /// Type each value is decoded as.
    pub data_type: DataType,
    /// Word order.
    pub order: WordOrder,
    /// Scale applied to numbers.
    pub scale: f64,
    /// Response timeout.
    pub timeout: Duration,
    /// Retries.
    pub retries: u8,
}

/// The result of one read.
#[derive(Debug, Clone, Serialize)]
pub struct PollResult {
    /// Unit id.
    pub unit: u8,
    /// Table read.
    pub table: Table,
    /// First address.
    pub address: u16,
    /// Decoded values, one per `count`.
    pub values: Vec<Value>,
    /// Raw registers (empty for bit tables).
    pub raw: Vec<u16>,
    /// Round-trip time in milliseconds.
    pub millis: f64,
}

/// Why a commissioning read failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The bus refused or the device did not answer properly.
    #[error("unit {unit}: {source}")]
    Bus {
        /// Unit id.
        unit: u8,
        /// Cause.
        source: BusError,
    },
    /// The registers cannot be decoded as asked.
    #[error("cannot decode: {0}")]
    Decode(String),
    /// More than one request's worth of data.
    #[error("{count} x {data_type:?} needs {needed} {what}; one request carries at most {max}")]
    TooMany {
        /// Count asked.
        count: u16,
        /// Type asked.
        data_type: DataType,
        /// Registers/bits needed.
        needed: u32,
        /// Unit of `needed`.
        what: &'static str,
        /// Protocol limit.
        max: u16,
    },
}

impl PollSpec {
    /// The read request this spec needs.
    pub fn request(&self) -> Result<Request<'static>, PollError> {
        let bits = matches!(self.table, Table::Coils | Table::Discrete);
        let width = if bits { 1 } else { u32::from(self.data_type.width()) };
        let needed = u32::from(self.count) * width;
        let (max, what) = if bits {
            (crate::pdu::MAX_READ_BITS, "bits")
        } else {
            (crate::pdu::MAX_READ_REGISTERS, "registers")
        };
        if needed == 0 || needed > u32::from(max) {
            return Err(PollError::TooMany {
                count: self.count,
                data_type: self.data_type,
                needed,
                what,
                max,
            });
        }
        let n = needed as u16;
        Ok(match self.table {
            Table::Coils => Request::ReadCoils(self.address, n),
            Table::Discrete => Request::ReadDiscreteInputs(self.address, n),
            Table::Holding => Request::ReadHoldingRegisters(self.address, n),
            Table::Input => Request::ReadInputRegisters(self.address, n),
        })
    }
}

/// A bus engine on one port for a sequence of commissioning reads.
pub struct Poll {
    handle: bus::BusHandle,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Poll {
    /// Opens the port described by `spec` (the bus task opens it; errors surface on read).
    pub fn open(spec: &PollSpec) -> Self {
        let bus = Bus {
            name: "poll".into(),
            port: spec.port.clone(),
            line: spec.line,
            protocol: Protocol::ModbusRtu,
            timeout: spec.timeout,
            retries: spec.retries,
            queue_depth: 1,
            reopen_max: Duration::from_secs(1),
            devices: Vec::new(),
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = bus::spawn(&bus, shutdown.clone(), &tracker);
        Self { handle, shutdown, tracker }
    }

    /// Reads once and decodes.
    pub async fn read(&self, spec: &PollSpec) -> Result<PollResult, PollError> {
        let request = spec.request()?;
        let started = std::time::Instant::now();
        let rsp = self
            .handle
            .transact(spec.unit, request, Priority::PassThrough, spec.timeout, spec.retries)
            .await
            .map_err(|source| PollError::Bus { unit: spec.unit, source })?;
        let millis = started.elapsed().as_secs_f64() * 1000.0;
        let (values, raw) = match rsp {
            Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
                (bits.iter().take(usize::from(spec.count)).map(|b| Value::Bool(*b)).collect(), Vec::new())
            }
            Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => {
                let width = usize::from(spec.data_type.width());
                let values = words
                    .chunks(width)
                    .map(|w| codec::decode_registers(spec.data_type, spec.order, spec.scale, 0.0, w))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| PollError::Decode(e.to_string()))?;
                (values, words)
            }
            other => return Err(PollError::Decode(format!("unexpected response {other:?}"))),
        };
        Ok(PollResult { unit: spec.unit, table: spec.table, address: spec.address, values, raw, millis })
    }

    /// Stops the bus task.
    pub async fn close(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Human-readable lines for a result, mbpoll style.
pub fn render(spec: &PollSpec, r: &PollResult) -> String {
    let width = if matches!(spec.table, Table::Coils | Table::Discrete) { 1 } else { spec.data_type.width() };
    let mut out = format!(
        "unit {} {:?} from {} ({} value(s), {:.1} ms)\n",
        r.unit,
        r.table,
        r.address,
        r.values.len(),
        r.millis
    )
    .to_lowercase();
    for (i, v) in r.values.iter().enumerate() {
        let addr = u32::from(r.address) + i as u32 * u32::from(width);
        let raw = r.raw.get(i * usize::from(width)..(i + 1) * usize::from(width)).unwrap_or_default();
        let hex: Vec<String> = raw.iter().map(|w| format!("0x{w:04X}")).collect();
        if hex.is_empty() {
            out.push_str(&format!("[{addr}]: {v}\n"));
        } else {
            out.push_str(&format!("[{addr}]: {v}  ({})\n", hex.join(" ")));
        }
    }
    out
}
