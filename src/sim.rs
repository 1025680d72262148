//! Field-device simulator: Modbus-RTU (or Modbus-ASCII) slaves on a half-duplex line, or
//! raw serial devices (`sim/raw.rs`), for tests, benchmarks and `m2m-gateway demo`/`simulate`.
//!
//! Units can also be served as Modbus-TCP servers (`simtcp.rs`, [`Simulator::serve_tcp`]).
//!
//! This file owns the RTU slave loop ([`Simulator::serve`]): framing the input, applying
//! faults, pacing replies; and the handle tests use ([`SimHandle`]). Its siblings own the
//! TOML format (`sim/config.rs`, [`SimConfig`]), the register maps and what a request does
//! to them (`sim/map.rs`), and the pty it usually runs on (`sim/port.rs`, [`VirtualPort`]);
//! their public items are re-exported here, so users only ever name `sim::`.
//!
//! Invariants:
//! - bad input never ends [`Simulator::serve`] and never panics: a frame with a bad CRC
//!   costs one byte and the parser resynchronises at the next offset; an incomplete frame
//!   is given up after a silence (t3.5 with `[line]`, 2 ms without); the input buffer is
//!   capped at [`INPUT_CAP`] bytes (oldest dropped).
//! - like a real bus: frames for units that are not simulated, and broadcasts (unit 0),
//!   are never answered; a request touching an unmapped address answers exception 0x02
//!   and changes nothing (writes are all-or-nothing).
//! - with `[line]` a reply takes its wire time: bytes leave on an absolute schedule
//!   (`start + k * char_time`), so sleep overshoot never accumulates; bytes the master
//!   sends while a reply is on the wire are dropped, as a collision would.
//! - with `[line]` on a pty (which delivers a request at once) the request's own wire
//!   time is emulated too: the reply starts no earlier than
//!   `first byte + wire(request) + t3.5 + turnaround`, as on a real line where the slave
//!   sees the frame end at the t3.5 silence after its last character. The start and the last reply byte are timed
//!   with [`crate::serial::line::sleep_until_precise`], not the 1 ms tokio timer, so the emulated
//!   line is faithful to well under a millisecond.
//! - with `[line]` every answered exchange is recorded ([`Exchange`]; the most recent
//!   [`EXCHANGE_CAP`] are kept) so benchmarks can measure throughput and the silence the
//!   master leaves between a reply and its next request.
//! - no lock is held across an `.await`; the register map is a plain struct behind a
//!   `std::sync::Mutex` shared by the serve loop and every [`SimHandle`].

mod config;
mod map;
mod port;
mod raw;
mod tcp;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use crate::point::value::Table;
use crate::serial::rtu;

pub(crate) use crate::sim::config::entry_len;
pub use crate::sim::config::{
    Fault, GenKind, InitValue, LineConfig, RegisterConfig, SimConfig, SimType, UnitConfig, load, quick,
};
pub use crate::sim::map::{BusStats, UnitStats};
pub(crate) use crate::sim::map::{Unit, build as build_units, execute};
pub use crate::sim::port::{VirtualPort, run_virtual};
pub use crate::sim::raw::{RawFault, RawSimConfig, RawSimStats};
pub use crate::sim::tcp::run_tcp;

/// Most bytes of unframed input kept; older bytes are dropped as garbage.
pub const INPUT_CAP: usize = 512;
/// Most [`Exchange`]s kept (the oldest are dropped).
pub const EXCHANGE_CAP: usize = 1 << 20;
/// Silence that ends an unframed input when the config has no `[line]`.
const IDLE_SILENCE: Duration = Duration::from_millis(2);

/// Everything that can go wrong loading a simulation or running it.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The config file could not be read.
    #[error("cannot read simulator config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this format (message has line and column).
    #[error("simulator config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error.
        message: String,
    },
    /// The config parsed but describes an impossible simulation; every problem is listed.
    #[error("simulator config {path}: {}", problems.join("; "))]
    Invalid {
        /// The file (empty for configs built in code).
        path: PathBuf,
        /// One line per problem, each naming its unit and register entry.
        problems: Vec<String>,
    },
    /// A fault spec that does not parse.
    #[error(
        "bad fault {spec:?}: expected silent | late <duration> | queued <duration> | corrupt-crc | wrong-unit <id> | noise <bytes> | exception <code> | drop-every <n> | drop-byte <n>"
    )]
    Fault {
        /// The text given.
        spec: String,
    },
    /// A handle call named a unit that is not simulated.
    #[error("unit {0} is not simulated")]
    UnknownUnit(u8),
    /// A register call on a bit table or a bit call on a register table.
    #[error("unit {unit}: table {table} does not hold {wanted}")]
    WrongTable {
        /// Unit.
        unit: u8,
        /// Table named.
        table: Table,
        /// "registers" or "bits".
        wanted: &'static str,
    },
    /// The pseudo-terminal could not be created or its link made.
    #[error("virtual port {what}: {message}")]
    Port {
        /// What was being done.
        what: String,
        /// The OS error.
        message: String,
    },
    /// A real serial port (`simulate --device`) could not be opened.
    #[error("cannot open serial port {}: {message}", path.display())]
    Device {
        /// The port.
        path: std::path::PathBuf,
        /// The OS error.
        message: String,
    },
    /// Reading or writing the line failed.
    #[error("simulator line i/o: {0}")]
    Io(#[from] std::io::Error),
}

// ---------------------------------------------------------------------------------------
// Runtime
// ---------------------------------------------------------------------------------------

struct State {
    units: std::collections::BTreeMap<u8, Unit>,
    bus: BusStats,
    exchanges: std::collections::VecDeque<Exchange>,
    /// Modbus-TCP connections work on their requests in parallel (sim/tcp.rs).
    tcp_parallel: bool,
    /// Requests read and not yet answered, per Modbus-TCP connection, added up.
    tcp_outstanding: u64,
}

/// One answered request as the simulated line saw it (recorded with `[line]` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// When the request's first byte arrived.
    pub request_at: Instant,
    /// Request frame length in bytes.
    pub request_len: usize,
    /// Reply frame length in bytes (noise before it included).
    pub reply_len: usize,
    /// When the reply's last byte was handed to the line (just before the write: the
    /// master cannot have seen it earlier, so a master's silence is measured from here).
    pub reply_end: Instant,
}

struct Shared {
    state: Mutex<State>,
    /// Time zero of every generator.
    epoch: Instant,
    /// Raw serial devices, served instead of the units when the config has `[[raw]]`.
    raw: Option<crate::sim::raw::RawSim>,
    /// Bumped by [`SimHandle::reset_connections`]: every Modbus-TCP connection is reset.
    resets: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the map half-updated in a way that matters to
        // a simulator; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A set of simulated RTU slaves sharing one line. Cheap to clone: clones share the
/// register maps, faults and counters.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    timing: Option<LineConfig>,
    /// Pace replies in software (off on a real UART, which paces itself).
    pace: bool,
    /// Frame the units' messages as Modbus ASCII instead of RTU.
    ascii: bool,
    /// Send every byte received straight back, like a 2-wire RS-485 adapter whose
    /// receiver hears its own transmitter.
    echo: bool,
}

/// Control and inspection of a running simulation (tests set values and faults here).
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

/// A reply decided under the lock, before it is framed.
pub(crate) struct Decision {
    /// The unit id the reply carries (another one with the wrong-unit fault).
    pub(crate) unit: u8,
    /// The reply PDU.
    pub(crate) pdu: Vec<u8>,
    /// Extra wait before replying (the late fault).
    pub(crate) delay: Duration,
    /// Break the frame's check (CRC or LRC; ignored on Modbus-TCP, which has none).
    corrupt: bool,
    /// Random bytes before the frame (ignored on Modbus-TCP: MBAP cannot resynchronise).
    noise: usize,
    /// The reply is queued behind the delay (the queued fault; on Modbus-TCP every reply
    /// is: a connection is served in order).
    queued: bool,
    /// One byte of the frame is lost (ignored on Modbus-TCP, which cannot lose one).
    drop_byte: bool,
}

/// A reply decided under the lock, sent after it is released.
struct Outgoing {
    bytes: Vec<u8>,
    delay: Duration,
    /// Answered from the unit's receive queue ([`Fault::Queued`]): the serve loop keeps
    /// reading while it waits.
    queued: bool,
}

/// When the request being answered arrived, for pacing and the exchange record.
#[derive(Clone, Copy)]
struct Arrival {
    /// First byte read.
    at: Instant,
    /// Frame length.
    len: usize,
}

/// Input framing state: bytes not yet part of a frame (no I/O; see module invariants).
#[derive(Default)]
struct Framer {
    /// Modbus ASCII frames (`:` hex LRC CR LF) instead of RTU.
    ascii: bool,
    buf: Vec<u8>,
    /// Bytes dropped since the counters were last updated.
    garbage: u64,
}

#[derive(Debug, PartialEq)]
enum Event {
    Frame(Vec<u8>),
    CrcError(u8),
}

impl Framer {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > INPUT_CAP {
            self.drop_front(self.buf.len() - INPUT_CAP);
        }
    }

    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        self.buf.drain(..n);
        self.garbage += n as u64;
    }

    /// The next frame or CRC error in the buffer. `silent`: the line has been quiet for
    /// t3.5, so an incomplete frame will never complete and is given up a byte at a time.
    fn next(&mut self, silent: bool) -> Option<Event> {
        if self.ascii {
            return self.next_ascii();
        }
        loop {
            let len = self.buf.len();
            if len < 2 {
                if silent {
                    self.drop_front(len);
                }
                return None;
            }
            let unit = self.buf[0];
            if unit > 247 {
                self.drop_front(1);
                continue;
            }
            // FC8 requests carry any amount of data (sub-function 0 loops it back): like
            // functions with no length rule, the silence delimits them.
            let rule =
                if self.buf[1] == 8 { None } else { crate::serial::pdu::pdu_len(&self.buf[1..], true) };
            match rule {
                Some(n) => {
                    let total = n + 3;
                    if len < total {
                        if !silent {
                            return None;
                        }
                        self.drop_front(1);
                        continue;
                    }
                    if rtu::crc_ok(&self.buf[..total]) {
                        return Some(Event::Frame(self.buf.drain(..total).collect()));
                    }
                    self.drop_front(1);
                    return Some(Event::CrcError(unit));
                }
                None if !silent => return None,
                // A known function whose length byte has not arrived: incomplete.
                None if matches!(self.buf[1], 15 | 16 | 23) => self.drop_front(1),
                // No length rule: the silence delimits the frame.
                None => {
                    if rtu::crc_ok(&self.buf) {
                        return Some(Event::Frame(std::mem::take(&mut self.buf)));
                    }
                    self.drop_front(1);
                    return Some(Event::CrcError(unit));
                }
            }
        }
    }
}

impl Framer {
    /// The next ASCII frame, handed on as RTU-shaped bytes (unit, PDU, two placeholder
    /// CRC bytes) so one frame handler serves both; a bad LRC or bad hex is a CRC error.
    fn next_ascii(&mut self) -> Option<Event> {
        let start = self.buf.iter().position(|&b| b == b':');
        self.drop_front(start.unwrap_or(self.buf.len()));
        let lf = self.buf.iter().position(|&b| b == b'\n')?;
        // A ':' inside restarts the frame (the spec's rule); the broken start is garbage.
        if let Some(p) = self.buf[1..lf].iter().rposition(|&b| b == b':') {
            self.drop_front(p + 1);
            return self.next_ascii();
        }
        let frame: Vec<u8> = self.buf.drain(..=lf).collect();
        let bin = frame[1..].strip_suffix(b"\r\n").and_then(|digits| hex::decode(digits).ok());
        let unit = bin.as_ref().and_then(|b| b.first().copied()).unwrap_or(0);
        match bin {
            Some(mut bin) if bin.len() >= 3 && bin.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0 => {
                // LRC out, two placeholder bytes in where the RTU CRC would be.
                bin.pop();
                bin.extend_from_slice(&[0, 0]);
                Some(Event::Frame(bin))
            }
            _ => Some(Event::CrcError(unit)),
        }
    }
}

/// Functions a broadcast may carry (writes only, as the spec says).
fn broadcastable(function: u8) -> bool {
    matches!(function, 5 | 6 | 15 | 16 | 22)
}

impl Simulator {
    /// Builds the register maps. Entries a config that skipped [`SimConfig::validate`]
    /// gets wrong are logged and left out; use [`load`] to have them reported instead.
    pub fn new(config: SimConfig) -> Self {
        let (units, problems) = build_units(&config);
        for p in problems {
            tracing::warn!(problem = %p, "simulator config entry skipped");
        }
        let raw = (!config.raw.is_empty()).then(|| crate::sim::raw::RawSim::new(&config.raw));
        Simulator {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    units,
                    bus: BusStats::default(),
                    exchanges: std::collections::VecDeque::new(),
                    tcp_parallel: false,
                    tcp_outstanding: 0,
                }),
                epoch: Instant::now(),
                raw,
                resets: tokio::sync::watch::Sender::new(0),
            }),
            timing: config.line,
            pace: true,
            ascii: config.protocol == crate::serial::framing::ModbusSerial::Ascii,
            echo: config.echo,
        }
    }

    /// A handle on the shared state.
    pub fn handle(&self) -> SimHandle {
        SimHandle { shared: self.shared.clone() }
    }

    /// True when Modbus-TCP requests are worked on in parallel ([`SimHandle::set_tcp_parallel`]).
    pub(crate) fn tcp_parallel(&self) -> bool {
        self.shared.lock().tcp_parallel
    }

    /// A Modbus-TCP request was read (`+1`) or answered (`-1`): keeps the count of
    /// requests outstanding and its high-water mark (`BusStats::tcp_most_outstanding`).
    pub(crate) fn tcp_outstanding(&self, up: bool) {
        let mut st = self.shared.lock();
        if up {
            st.tcp_outstanding += 1;
            st.bus.tcp_most_outstanding = st.bus.tcp_most_outstanding.max(st.tcp_outstanding);
        } else {
            st.tcp_outstanding = st.tcp_outstanding.saturating_sub(1);
        }
    }

    /// Watches [`SimHandle::reset_connections`], and counts the connection (simtcp.rs).
    pub(crate) fn tcp_connected(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.lock().bus.tcp_connections += 1;
        self.shared.resets.subscribe()
    }

    /// The emulated line, if any.
    pub fn line(&self) -> Option<LineConfig> {
        self.timing
    }

    /// Answers requests arriving on `io` until `shutdown` or end of input. Never returns
    /// on bad input; returns `Err` only when the stream itself fails (a pty whose other
    /// side is closed is waited out, not an error).
    pub async fn serve<S>(self, mut io: S, shutdown: CancellationToken) -> Result<(), SimError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let silence = self.timing.map_or(IDLE_SILENCE, |l| rtu::t35(&l.line()));
        if let Some(raw) = &self.shared.raw {
            let turnaround = self.timing.map_or(Duration::ZERO, |l| l.turnaround);
            return raw.serve(io, silence, turnaround, shutdown).await;
        }
        let mut framer = Framer { ascii: self.ascii, ..Framer::default() };
        let mut chunk = [0u8; 256];
        let mut silent = false;
        // Replies of units with a receive queue ([`Fault::Queued`]), due in order.
        let mut queue: std::collections::VecDeque<(Instant, Outgoing, Arrival)> = Default::default();
        // When the first byte still in the framer arrived.
        let mut first_at = Instant::now();
        loop {
            while let Some(event) = framer.next(silent) {
                let out = match event {
                    Event::CrcError(unit) => {
                        self.count_crc_error(unit);
                        None
                    }
                    Event::Frame(f) => {
                        let arrival = Arrival { at: first_at, len: f.len() };
                        // What is left behind the frame arrived after it.
                        first_at =
                            self.timing.map_or(first_at, |l| first_at + rtu::wire_time(&l.line(), f.len()));
                        self.on_frame(&f).map(|out| (out, arrival))
                    }
                };
                match out {
                    None => {}
                    Some((out, arrival)) if out.queued => {
                        let heard = match self.timing.filter(|_| self.pace) {
                            Some(l) => {
                                arrival.at + rtu::wire_time(&l.line(), arrival.len) + rtu::t35(&l.line())
                            }
                            None => Instant::now(),
                        };
                        let turnaround = self.timing.map_or(Duration::ZERO, |l| l.turnaround);
                        let busy = queue.back().map_or(heard, |(due, _, _)| (*due).max(heard));
                        queue.push_back((busy + turnaround + out.delay, out, arrival));
                    }
                    Some((out, arrival)) => {
                        tokio::select! {
                            // Cancel-safety: a reply cut short by shutdown is what a device
                            // losing power mid-frame sends; nothing else is lost.
                            _ = shutdown.cancelled() => return Ok(()),
                            r = self.send(&mut io, out, arrival, &mut framer) => r?,
                        }
                    }
                }
            }
            silent = false;
            self.count_garbage(&mut framer);
            let pending = !framer.buf.is_empty();
            let read = async {
                if pending {
                    tokio::time::timeout(silence, io.read(&mut chunk)).await
                } else {
                    Ok(io.read(&mut chunk).await)
                }
            };
            let due = queue.front().map(|(due, _, _)| *due);
            let read = tokio::select! {
                // Cancel-safety: `read` is cancel-safe, no accepted byte is lost.
                _ = shutdown.cancelled() => return Ok(()),
                r = read => r,
                // Cancel-safety: a dropped sleep only ends early; the reply stays queued.
                () = crate::serial::line::sleep_until_precise(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    if let Some((_, out, arrival)) = queue.pop_front() {
                        let at = Instant::now();
                        io.write_all(&out.bytes).await?;
                        io.flush().await?;
                        self.record(arrival, out.bytes.len(), at);
                    }
                    continue;
                }
            };
            match read {
                Err(_elapsed) => silent = true,
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => {
                    if framer.buf.is_empty() {
                        first_at = Instant::now();
                    }
                    if self.echo {
                        io.write_all(&chunk[..n]).await?;
                    }
                    framer.push(&chunk[..n]);
                }
                // EIO: a pty master whose slave side nobody holds; wait for a reopen.
                Ok(Err(e)) if e.raw_os_error() == Some(5) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Serves a real serial device (e.g. a USB adapter cabled to a gateway) with the
    /// `[line]` settings (9600 8E1 without `[line]`) until `shutdown`; `ready` is called
    /// once the port is open. The UART paces the bytes, so only the turnaround and fault
    /// delays are applied here.
    pub async fn serve_device(
        mut self,
        path: &Path,
        shutdown: CancellationToken,
        ready: impl FnOnce(&Path),
    ) -> Result<(), SimError> {
        let line = self.timing.unwrap_or(LineConfig {
            baud: 9600,
            parity: crate::model::Parity::Even,
            data_bits: 8,
            stop_bits: 1,
            turnaround: Duration::ZERO,
        });
        let port = tokio_serial::new(path.to_string_lossy(), line.baud)
            .data_bits(if line.data_bits == 7 {
                tokio_serial::DataBits::Seven
            } else {
                tokio_serial::DataBits::Eight
            })
            .stop_bits(if line.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .parity(line.parity.into())
            .open_native_async()
            .map_err(|e| SimError::Device { path: path.to_path_buf(), message: e.to_string() })?;
        ready(path);
        self.timing = Some(line);
        self.pace = false;
        self.serve(port, shutdown).await
    }

    fn count_garbage(&self, framer: &mut Framer) {
        if framer.garbage > 0 {
            self.shared.lock().bus.garbage_bytes += std::mem::take(&mut framer.garbage);
        }
    }

    fn count_crc_error(&self, unit: u8) {
        let mut st = self.shared.lock();
        st.bus.crc_errors += 1;
        if let Some(u) = st.units.get_mut(&unit) {
            u.stats.crc_errors_seen += 1;
        }
    }

    /// Applies a good frame (RTU-shaped: unit, PDU, two CRC bytes, not checked here) to
    /// the map and decides the reply, faults included.
    pub(crate) fn decide(&self, frame: &[u8]) -> Option<Decision> {
        let t = self.shared.epoch.elapsed();
        let mut st = self.shared.lock();
        st.bus.frames_received += 1;
        let id = *frame.first()?;
        let p = frame.get(1..frame.len().saturating_sub(2))?;
        let function = *p.first()?;
        // One line per request at debug level: what a test (or a commissioning engineer
        // with `-v`) counts and times.
        tracing::debug!(unit = id, function, "request");
        if id == 0 {
            if broadcastable(function) {
                for unit in st.units.values_mut() {
                    if matches!(unit.fault, Some(Fault::Silent | Fault::Exception(_))) {
                        continue;
                    }
                    unit.stats.requests += 1;
                    if let Ok((_, true)) = execute(unit, p, t) {
                        unit.stats.writes += 1;
                    }
                }
            }
            return None;
        }
        let unit = st.units.get_mut(&id)?;
        unit.stats.requests += 1;
        let (mut delay, mut reply_id, mut corrupt, mut noise) = (Duration::ZERO, id, false, 0);
        let (mut queued, mut drop_byte) = (false, false);
        let pdu = match unit.fault {
            Some(Fault::Silent) => return None,
            Some(Fault::DropEvery(n)) if n > 0 && unit.stats.requests % u64::from(n) == 0 => {
                return None;
            }
            Some(Fault::Exception(code)) => vec![function | 0x80, code],
            fault => {
                match fault {
                    Some(Fault::Late(d)) => delay = d,
                    Some(Fault::Queued(d)) => (delay, queued) = (d, true),
                    Some(Fault::DropByte(n)) => drop_byte = n > 0 && unit.stats.answered % u64::from(n) == 0,
                    Some(Fault::CorruptCrc) => corrupt = true,
                    Some(Fault::WrongUnit(u)) => reply_id = u,
                    Some(Fault::NoiseBefore(n)) => noise = n,
                    _ => {}
                }
                match execute(unit, p, t) {
                    Ok((pdu, wrote)) => {
                        unit.stats.writes += u64::from(wrote);
                        pdu
                    }
                    Err(code) => vec![function | 0x80, code],
                }
            }
        };
        unit.stats.answered += 1;
        Some(Decision { unit: reply_id, pdu, delay, corrupt, noise, queued, drop_byte })
    }

    /// Applies a good frame to the map and frames the reply for the line (faults
    /// included).
    fn on_frame(&self, frame: &[u8]) -> Option<Outgoing> {
        let Decision { unit: reply_id, pdu, delay, corrupt, noise, queued, drop_byte } =
            self.decide(frame)?;
        let mut bytes: Vec<u8> = (0..noise).map(|_| rand::random::<u8>()).collect();
        if self.ascii {
            crate::serial::ascii::frame(reply_id, &pdu, &mut bytes);
            // The LRC's low digit, changed to another hex digit: a clean LRC error.
            let at = bytes.len().saturating_sub(3);
            if let Some(digit) = bytes.get_mut(at).filter(|_| corrupt) {
                *digit = if *digit == b'0' { b'1' } else { b'0' };
            }
        } else {
            rtu::frame(reply_id, &pdu, &mut bytes);
            if corrupt && let Some(last) = bytes.last_mut() {
                *last ^= 0xA5;
            }
        }
        if drop_byte {
            bytes.remove(bytes.len() / 2);
        }
        Some(Outgoing { bytes, delay, queued })
    }

    /// Sends a reply: after the request's emulated wire time, t3.5 and the turnaround
    /// (and a fault's delay), then, with `[line]`, paced to its wire time on an absolute
    /// schedule. Bytes arriving while the reply is on the wire are dropped (a collision
    /// on a half-duplex line).
    async fn send<S>(
        &self,
        io: &mut S,
        out: Outgoing,
        arrival: Arrival,
        framer: &mut Framer,
    ) -> Result<(), SimError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let turnaround = self.timing.map_or(Duration::ZERO, |l| l.turnaround);
        // On a pty the request arrived at once; on a real UART its wire time has passed.
        let heard = match self.timing.filter(|_| self.pace) {
            Some(l) => arrival.at + rtu::wire_time(&l.line(), arrival.len) + rtu::t35(&l.line()),
            None => Instant::now(),
        };
        let start = heard.max(Instant::now()) + turnaround + out.delay;
        crate::serial::line::sleep_until_precise(start).await;
        let Some(line) = self.timing.filter(|_| self.pace) else {
            let at = Instant::now();
            io.write_all(&out.bytes).await?;
            io.flush().await?;
            self.record(arrival, out.bytes.len(), at);
            return Ok(());
        };
        let ct = rtu::char_time(&line.line()).max(Duration::from_nanos(1));
        let n = out.bytes.len();
        let end = start + ct * u32::try_from(n).unwrap_or(u32::MAX);
        let (mut sent, mut listening, mut scratch) = (0, true, [0u8; 64]);
        // When the last write began: from then on the master may see the reply's end.
        let mut last_write = start;
        while sent < n {
            // Byte k has left the wire at start + (k + 1) * ct.
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(start);
            let due = usize::try_from(elapsed.as_nanos() / ct.as_nanos()).unwrap_or(n).min(n);
            if due > sent {
                last_write = now;
                io.write_all(&out.bytes[sent..due]).await?;
                io.flush().await?;
                sent = due;
                continue;
            }
            // The last byte is timed precisely (it is what the master waits for). The
            // ones before only need to flow: the 1 ms timer is good enough for them, and
            // near the end the precise sleeps go at most 1 ms at a time, so the reply
            // never pauses longer than a chunk of a real UART would (a pause of t3.5
            // would end the frame for the master).
            let next = start + ct * u32::try_from(sent + 1).unwrap_or(u32::MAX);
            let now = Instant::now();
            let precise = end.saturating_duration_since(now) < Duration::from_millis(3);
            let wake = async {
                if precise {
                    crate::serial::line::sleep_until_precise(
                        end.min(next.max(now + Duration::from_millis(1))),
                    )
                    .await;
                } else {
                    tokio::time::sleep_until(next).await;
                }
            };
            tokio::select! {
                () = wake => {}
                // Cancel-safety: `read` is cancel-safe; what it got is dropped anyway.
                r = io.read(&mut scratch), if listening => match r {
                    Ok(k) if k > 0 => framer.garbage += k as u64,
                    _ => listening = false,
                },
            }
        }
        self.record(arrival, n, last_write);
        self.count_garbage(framer);
        Ok(())
    }

    /// Records an answered exchange (with `[line]` only: without it there is no timing
    /// worth recording).
    fn record(&self, arrival: Arrival, reply_len: usize, reply_end: Instant) {
        if self.timing.is_none() {
            return;
        }
        let ex = Exchange { request_at: arrival.at, request_len: arrival.len, reply_len, reply_end };
        let mut st = self.shared.lock();
        if st.exchanges.len() >= EXCHANGE_CAP {
            st.exchanges.pop_front();
        }
        st.exchanges.push_back(ex);
    }
}

impl SimHandle {
    /// Sets (or clears, with `None`) the fault of the simulated raw device `name`.
    pub fn set_raw_fault(&self, name: &str, fault: Option<RawFault>) -> Result<(), SimError> {
        match &self.shared.raw {
            Some(raw) => raw.set_fault(name, fault),
            None => Err(SimError::Invalid {
                path: PathBuf::new(),
                problems: vec![format!("raw device {name:?} is not simulated")],
            }),
        }
    }

    /// The counters of the simulated raw device `name`.
    pub fn raw_stats(&self, name: &str) -> Option<RawSimStats> {
        self.shared.raw.as_ref()?.stats(name)
    }

    fn with_unit<T>(&self, unit: u8, f: impl FnOnce(&mut Unit, Duration) -> T) -> Result<T, SimError> {
        let t = self.shared.epoch.elapsed();
        let mut st = self.shared.lock();
        let u = st.units.get_mut(&unit).ok_or(SimError::UnknownUnit(unit))?;
        Ok(f(u, t))
    }

    fn check(unit: u8, table: Table, bits: bool) -> Result<(), SimError> {
        if matches!(table, Table::Coils | Table::Discrete) == bits {
            Ok(())
        } else {
            let wanted = if bits { "bits" } else { "registers" };
            Err(SimError::WrongTable { unit, table, wanted })
        }
    }

    /// Sets (and maps, if it was not) a holding or input register. A generator the
    /// register belonged to stops; the value stays until written again.
    pub fn set_register(&self, unit: u8, table: Table, address: u16, value: u16) -> Result<(), SimError> {
        Self::check(unit, table, false)?;
        self.with_unit(unit, |u, t| u.set(table, address, value, t))
    }

    /// Sets (and maps, if it was not) a coil or discrete input.
    pub fn set_bit(&self, unit: u8, table: Table, address: u16, value: bool) -> Result<(), SimError> {
        Self::check(unit, table, true)?;
        self.with_unit(unit, |u, t| u.set(table, address, u16::from(value), t))
    }

    /// The current value of a register (generators evaluated now); `None` when the unit,
    /// table or address is not mapped.
    pub fn register(&self, unit: u8, table: Table, address: u16) -> Option<u16> {
        Self::check(unit, table, false).ok()?;
        self.with_unit(unit, |u, t| u.read(table, address, 1, t).ok())
            .ok()
            .flatten()
            .and_then(|v| v.first().copied())
    }

    /// The current value of a coil or discrete input; `None` when not mapped.
    pub fn bit(&self, unit: u8, table: Table, address: u16) -> Option<bool> {
        Self::check(unit, table, true).ok()?;
        self.with_unit(unit, |u, t| u.read(table, address, 1, t).ok())
            .ok()
            .flatten()
            .and_then(|v| v.first().map(|b| *b != 0))
    }

    /// Makes a unit misbehave from its next request on (replaces any fault it had).
    pub fn set_fault(&self, unit: u8, fault: Fault) -> Result<(), SimError> {
        self.with_unit(unit, |u, _| u.fault = Some(fault))
    }

    /// Makes a unit behave again.
    pub fn clear_fault(&self, unit: u8) -> Result<(), SimError> {
        self.with_unit(unit, |u, _| u.fault = None)
    }

    /// Counters of one unit (all zero for a unit that is not simulated).
    pub fn stats(&self, unit: u8) -> UnitStats {
        self.with_unit(unit, |u, _| u.stats).unwrap_or_default()
    }

    /// Bus-wide counters.
    pub fn bus_stats(&self) -> BusStats {
        self.shared.lock().bus
    }

    /// Modbus-TCP connections (`Simulator::serve_tcp`) work on every request as it
    /// arrives, each answered after its own delay (the `late` fault), so replies can
    /// leave out of order, as a device that pipelines does; off (the default), each
    /// connection answers one request at a time, in order. Applies to requests read
    /// from now on.
    pub fn set_tcp_parallel(&self, parallel: bool) {
        self.shared.lock().tcp_parallel = parallel;
    }

    /// Resets every open Modbus-TCP connection (`Simulator::serve_tcp`), as a device
    /// that reboots or drops its connections does; new connections are accepted.
    pub fn reset_connections(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }

    /// The exchanges recorded since the last call (oldest first), emptying the record.
    /// Recorded only when the simulation has a `[line]`.
    pub fn take_exchanges(&self) -> Vec<Exchange> {
        self.shared.lock().exchanges.drain(..).collect()
    }

    /// The simulated unit ids, ascending.
    pub fn units(&self) -> Vec<u8> {
        self.shared.lock().units.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        rtu::frame(unit, pdu, &mut v);
        v
    }

    #[test]
    fn framer_resyncs_after_garbage() {
        let mut f = Framer::default();
        let good = req(1, &[3, 0, 0, 0, 2]);
        f.push(&[0xFF, 0x01, 0x03, 0x77]);
        f.push(&good);
        // 0x77 at offset 2 has no length rule: the framer waits for the silence, then
        // gives up on the junk a byte at a time and finds the request.
        let mut frames = Vec::new();
        for silent in [false, true] {
            while let Some(e) = f.next(silent) {
                if let Event::Frame(b) = e {
                    frames.push(b);
                }
            }
        }
        assert_eq!(frames, vec![good]);
        assert!(f.buf.is_empty());
        assert_eq!(f.garbage, 4);
    }

    #[test]
    fn framer_waits_then_gives_up_on_silence() {
        let mut f = Framer::default();
        f.push(&[1, 0x10, 0, 0, 0, 9, 200, 1, 2]); // claims 200 data bytes
        let good = req(1, &[6, 0, 1, 0, 7]);
        f.push(&good);
        assert_eq!(f.next(false), None);
        let mut got = None;
        while let Some(e) = f.next(true) {
            if let Event::Frame(b) = e {
                got = Some(b);
            }
        }
        assert_eq!(got, Some(good));
    }

    #[test]
    fn unknown_function_framed_by_silence() {
        let mut f = Framer::default();
        let odd = req(1, &[0x41, 1, 2, 3]);
        f.push(&odd);
        assert_eq!(f.next(false), None);
        assert_eq!(f.next(true), Some(Event::Frame(odd)));
    }

    #[test]
    fn diagnostics_of_any_length_framed_by_silence() {
        let mut f = Framer::default();
        let long = req(1, &[8, 0, 0, 1, 2, 3, 4, 5, 6]);
        f.push(&long);
        assert_eq!(f.next(false), None);
        assert_eq!(f.next(true), Some(Event::Frame(long)));
    }

    #[test]
    fn random_input_never_panics_and_stays_bounded() {
        let mut f = Framer::default();
        for round in 0..500u32 {
            let n = rand::random_range(0..300usize);
            let chunk: Vec<u8> = (0..n).map(|_| rand::random::<u8>() % 32).collect();
            f.push(&chunk);
            while f.next(round % 3 == 0).is_some() {}
            assert!(f.buf.len() <= INPUT_CAP);
        }
    }

    #[test]
    fn input_is_capped() {
        let mut f = Framer::default();
        f.push(&[0x10; 2000]);
        assert_eq!(f.buf.len(), INPUT_CAP);
    }

    #[test]
    fn fault_specs_round_trip() {
        for s in [
            "silent",
            "late 300ms",
            "queued 260ms",
            "corrupt-crc",
            "wrong-unit 9",
            "noise 5",
            "exception 4",
            "drop-every 3",
            "drop-byte 10",
        ] {
            let f: Fault = s.parse().expect("valid spec");
            assert_eq!(f.to_string(), s);
        }
        assert!("late".parse::<Fault>().is_err());
        assert!("wrong-unit 300".parse::<Fault>().is_err());
        assert!("sleepy".parse::<Fault>().is_err());
    }
}
