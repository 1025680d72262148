//! One-shot reads for commissioning (`m2m-gateway poll`, like mbpoll): the same bus engine
//! as the gateway — timing, CRC checks, stale-input discard — driven from the command line,
//! with the registers decoded as a chosen type and printed for people or as JSON; the
//! same reads over Modbus-TCP ([`Poll::connect_tcp`], e.g. against our own server); and
//! one raw request to a raw serial device ([`raw_once`]), its reply shown in hex and text.
//!
//! Over TCP every request runs under the timeout, and a timeout drops the connection
//! (the next read reconnects), so a late reply is never taken for the next request's.

use std::time::Duration;

use serde::Serialize;
use tokio_modbus::{Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{self, BusError, Priority};
use crate::model::{Bus, Line, Protocol};
use crate::point::registers;
use crate::point::value::{DataType, Table, Value, WordOrder};

/// What to read and how to show it.
#[derive(Debug, Clone)]
pub struct PollSpec {
    /// Serial device path, `tcp://host:port` of a serial device server, or
    /// `modbus-tcp://host:port` of a Modbus-TCP device.
    pub port: String,
    /// Line settings.
    pub line: Line,
    /// Field protocol: Modbus-RTU or -ASCII on a serial port, Modbus-TCP with a
    /// `modbus-tcp://` port.
    pub protocol: Protocol,
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
    /// The adapter echoes what is sent.
    pub local_echo: bool,
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
    /// Round-trip time in milliseconds, in whole microseconds ([`millis`]).
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
    /// A Modbus-TCP connection or request failed.
    #[error("{addr}: {reason}")]
    Tcp {
        /// The server address as given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The Modbus-TCP server answered with an exception.
    #[error("unit {unit}: exception {}", crate::serial::pdu::exception_text(u8::from(*code)))]
    Exception {
        /// Unit id.
        unit: u8,
        /// The exception.
        code: tokio_modbus::ExceptionCode,
    },
    /// A raw request got no reply (or the bus refused it).
    #[error("raw request: {0}")]
    Raw(BusError),
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
            (crate::serial::pdu::MAX_READ_BITS, "bits")
        } else {
            (crate::serial::pdu::MAX_READ_REGISTERS, "registers")
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

/// A bus engine on one port, or a Modbus-TCP connection, for a sequence of
/// commissioning reads.
pub struct Poll {
    via: Via,
}

enum Via {
    Serial { handle: bus::BusHandle, shutdown: CancellationToken, tracker: TaskTracker },
    Tcp { addr: String, ctx: tokio::sync::Mutex<Option<tokio_modbus::client::Context>> },
}

/// The bus a commissioning read runs on: the line as given, spec timing, one request at a
/// time, no retries, reopened quickly; Modbus-RTU with no devices of its own.
fn commissioning_bus(port: &str, line: Line, timeout: Duration) -> Bus {
    Bus {
        name: "poll".into(),
        port: port.to_owned(),
        line,
        protocol: Protocol::ModbusRtu,
        frame_gap: crate::serial::rtu::t35(&line),
        local_echo: false,
        timeout,
        retries: 0,
        queue_depth: 1,
        reopen_max: Duration::from_secs(1),
        max_in_flight: 1,
        devices: Vec::new(),
        broadcast: false,
        rs485: None,
        raw_devices: Vec::new(),
    }
}

impl Poll {
    /// Opens the port described by `spec` (the bus task opens it; errors surface on read).
    pub fn open(spec: &PollSpec) -> Self {
        let base = commissioning_bus(&spec.port, spec.line, spec.timeout);
        let bus = Bus {
            local_echo: spec.local_echo,
            retries: spec.retries,
            protocol: spec.protocol,
            // No line to keep silent on a Modbus-TCP connection.
            frame_gap: if spec.protocol == Protocol::ModbusTcp { Duration::ZERO } else { base.frame_gap },
            ..base
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = bus::spawn(&bus, shutdown.clone(), &tracker);
        Self { via: Via::Serial { handle, shutdown, tracker } }
    }

    /// Reads through the Modbus-TCP server at `addr` (`host:port`) instead of a serial
    /// port; the connection is made by the first read (and again after a failure).
    pub fn connect_tcp(addr: &str) -> Self {
        Self { via: Via::Tcp { addr: addr.to_owned(), ctx: tokio::sync::Mutex::new(None) } }
    }

    /// Reads once and decodes.
    pub async fn read(&self, spec: &PollSpec) -> Result<PollResult, PollError> {
        let request = spec.request()?;
        let started = std::time::Instant::now();
        let rsp = match &self.via {
            Via::Serial { handle, .. } => handle
                .transact(spec.unit, request, Priority::PassThrough, spec.timeout, spec.retries)
                .await
                .map_err(|source| PollError::Bus { unit: spec.unit, source })?,
            Via::Tcp { addr, ctx } => tcp_read(addr, ctx, spec, request).await?,
        };
        let millis = millis(started.elapsed());
        let (values, raw) = match rsp {
            Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
                (bits.iter().take(usize::from(spec.count)).map(|b| Value::Bool(*b)).collect(), Vec::new())
            }
            Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => {
                let width = usize::from(spec.data_type.width());
                let values = words
                    .chunks(width)
                    .map(|w| registers::decode_registers(spec.data_type, spec.order, spec.scale, 0.0, w))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| PollError::Decode(e.to_string()))?;
                (values, words)
            }
            other => return Err(PollError::Decode(format!("unexpected response {other:?}"))),
        };
        Ok(PollResult { unit: spec.unit, table: spec.table, address: spec.address, values, raw, millis })
    }

    /// Stops the bus task (or drops the connection).
    pub async fn close(self) {
        if let Via::Serial { shutdown, tracker, .. } = self.via {
            shutdown.cancel();
            tracker.close();
            tracker.wait().await;
        }
    }
}

/// One request over Modbus-TCP, connecting first when needed; `spec.retries` more
/// attempts after a timeout or a broken connection, each on a fresh connection.
async fn tcp_read(
    addr: &str,
    ctx: &tokio::sync::Mutex<Option<tokio_modbus::client::Context>>,
    spec: &PollSpec,
    request: Request<'static>,
) -> Result<Response, PollError> {
    use tokio::time::timeout;
    use tokio_modbus::client::Client;
    use tokio_modbus::slave::SlaveContext;
    let fail = |reason: String| PollError::Tcp { addr: addr.to_owned(), reason };
    let mut guard = ctx.lock().await;
    let mut attempt = 0;
    loop {
        let outcome: Result<Response, PollError> = async {
            if guard.is_none() {
                let socket = timeout(spec.timeout, tokio::net::lookup_host(addr))
                    .await
                    .map_err(|_| fail("cannot resolve: timed out".into()))?
                    .map_err(|e| fail(format!("cannot resolve: {e}")))?
                    .next()
                    .ok_or_else(|| fail("cannot resolve: no address".into()))?;
                let c = timeout(spec.timeout, tokio_modbus::client::tcp::connect(socket))
                    .await
                    .map_err(|_| fail(format!("no connection within {:?}", spec.timeout)))?
                    .map_err(|e| fail(format!("cannot connect: {e}")))?;
                *guard = Some(c);
            }
            let c = guard.as_mut().ok_or_else(|| fail("not connected".into()))?;
            c.set_slave(tokio_modbus::Slave(spec.unit));
            match timeout(spec.timeout, c.call(request.clone())).await {
                Err(_) => Err(fail(format!("unit {}: no reply within {:?}", spec.unit, spec.timeout))),
                // What came back is no Modbus-TCP frame (tokio-util says "bytes remaining on
                // stream" when the other end closes after bytes it cannot frame): something
                // else listens there, which its message alone does not say.
                Ok(Err(tokio_modbus::Error::Transport(e)))
                    if e.kind() == std::io::ErrorKind::InvalidData || e.to_string() == "bytes remaining on stream" =>
                {
                    Err(fail(format!(
                        "unit {}: the answer is not Modbus-TCP: is this a Modbus-TCP server? (a peer link port or the status page answers like this)",
                        spec.unit
                    )))
                }
                Ok(Err(e)) => Err(fail(format!("unit {}: {e}", spec.unit))),
                Ok(Ok(Err(code))) => Err(PollError::Exception { unit: spec.unit, code }),
                Ok(Ok(Ok(rsp))) => Ok(rsp),
            }
        }
        .await;
        match outcome {
            Err(PollError::Tcp { .. }) if attempt < spec.retries => {
                *guard = None;
                attempt += 1;
            }
            Err(e @ PollError::Tcp { .. }) => {
                // A late reply must not answer the next request: start afresh.
                *guard = None;
                return Err(e);
            }
            other => return other,
        }
    }
}

/// A round-trip time in milliseconds, in whole microseconds: `2.457`, not the
/// `2.4565889999999997` a nanosecond count divided in floating point prints in JSON.
/// (Below 2^53 µs, about 285 years, the quotient is the f64 nearest to that decimal, so
/// it prints with at most three decimals.)
pub fn millis(elapsed: Duration) -> f64 {
    let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    micros as f64 / 1000.0
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

/// One raw request for commissioning a raw serial device (`m2m-gateway poll --raw`).
#[derive(Debug, Clone)]
pub struct RawSpec {
    /// Serial device path.
    pub port: String,
    /// Line settings.
    pub line: Line,
    /// The bytes sent, complete.
    pub request: Vec<u8>,
    /// How the reply is delimited (no checksum is checked: the reply is shown as it is).
    pub framing: crate::serial::raw::FrameRule,
    /// Line silence that ends a reply for `FrameEnd::Silence`.
    pub silence: Duration,
    /// Response timeout.
    pub timeout: Duration,
}

/// The reply to a raw request.
#[derive(Debug, Clone, Serialize)]
pub struct RawResult {
    /// The bytes sent.
    pub sent: Vec<u8>,
    /// The reply frame.
    pub reply: Vec<u8>,
    /// Round-trip time in milliseconds, in whole microseconds ([`millis`]).
    pub millis: f64,
}

/// Sends one raw request through the bus engine and returns the reply frame.
pub async fn raw_once(spec: &RawSpec) -> Result<RawResult, PollError> {
    let framing = crate::serial::raw::RawFraming {
        framing: spec.framing.clone(),
        checksum: crate::serial::checksum::ChecksumRule::NONE,
    };
    let device = crate::model::RawDevice {
        name: "raw".into(),
        id: 1,
        mode: crate::model::RawMode::Poll { request: spec.request.clone(), interval: Duration::from_secs(1) },
        framing,
        send_checksum: crate::serial::checksum::ChecksumRule::NONE,
        timeout: spec.timeout,
        silence: spec.silence,
        extract: crate::point::extract::Extract::Binary { fields: Vec::new() },
        points: Vec::new(),
        commands: Vec::new(),
    };
    let bus = Bus {
        protocol: Protocol::Raw,
        raw_devices: vec![device],
        ..commissioning_bus(&spec.port, spec.line, spec.timeout)
    };
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handle = bus::spawn(&bus, shutdown.clone(), &tracker);
    let started = std::time::Instant::now();
    let request = Request::Custom(0, std::borrow::Cow::Owned(spec.request.clone()));
    let outcome = handle.transact(1, request, Priority::PassThrough, spec.timeout, 0).await;
    let millis = millis(started.elapsed());
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    match outcome.map_err(PollError::Raw)? {
        Response::Custom(_, frame) => {
            Ok(RawResult { sent: spec.request.clone(), reply: frame.to_vec(), millis })
        }
        other => Err(PollError::Decode(format!("unexpected response {other:?}"))),
    }
}

/// The reply of a raw request for people: hex and escaped text.
pub fn render_raw(r: &RawResult) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<Vec<_>>().join(" ");
    format!(
        "sent  {} bytes: {}  \"{}\"\nreply {} bytes in {:.1} ms: {}  \"{}\"\n",
        r.sent.len(),
        hex(&r.sent),
        r.sent.escape_ascii(),
        r.reply.len(),
        r.millis,
        hex(&r.reply),
        r.reply.escape_ascii()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_times_print_in_whole_microseconds() {
        // 2.456589 ms as a float product prints 2.4565889999999997.
        let t = Duration::from_nanos(2_456_589);
        assert_eq!(serde_json::to_string(&millis(t)).expect("json"), "2.456");
        assert_eq!(millis(Duration::from_micros(11_595_566)).to_string(), "11595.566");
        assert_eq!(millis(Duration::from_micros(700)).to_string(), "0.7");
        assert_eq!(millis(Duration::ZERO).to_string(), "0");
        // Every microsecond count below a minute prints with at most three decimals.
        for micros in (0..60_000_000u64).step_by(7_919) {
            let text = millis(Duration::from_micros(micros)).to_string();
            let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
            assert!(decimals <= 3, "{micros} µs printed as {text}");
        }
    }
}
