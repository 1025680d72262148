//! Field-device simulator: Modbus-RTU (or Modbus-ASCII) slaves on a half-duplex line, or
//! raw serial devices (`sim/raw.rs`), for tests, benchmarks and `m2m-gateway demo`/`simulate`.
//!
//! Units can also be served as Modbus-TCP servers (`sim/tcp.rs`, [`Simulator::serve_tcp`]).
//!
//! This file owns the simulator's shared state ([`Simulator`]), what a request does to it
//! with the unit's fault applied (`Simulator::decide`, for the line and for TCP alike),
//! and the handle tests use ([`SimHandle`]). Its siblings own the RTU slave loop on a
//! serial line (`sim/line.rs`, [`Simulator::serve`]: framing the input, pacing replies),
//! the TOML format (`sim/config.rs`, [`SimConfig`]), the register maps and what a request
//! does to them (`sim/map.rs`), and the pty it usually runs on (`sim/port.rs`,
//! [`VirtualPort`]); their public items are re-exported here, so users only ever name
//! `sim::`.
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
mod line;
mod map;
mod port;
mod raw;
mod tcp;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::point::value::Table;

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

/// Functions a broadcast may carry (writes only, as the spec says).
/// A read of a serving loop failed with `e`: an EIO (a pty master whose slave side nobody
/// holds) waits a moment for a reopen, an interrupted read is retried, anything else
/// ends the loop. `Ok(true)`: shutdown came while waiting.
async fn read_failed(
    e: std::io::Error,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<bool, SimError> {
    if e.raw_os_error() == Some(5) {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(true),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        return Ok(false);
    }
    if e.kind() == std::io::ErrorKind::Interrupted {
        return Ok(false);
    }
    Err(e.into())
}

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

    /// Watches [`SimHandle::reset_connections`], and counts the connection (sim/tcp.rs).
    pub(crate) fn tcp_connected(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.lock().bus.tcp_connections += 1;
        self.shared.resets.subscribe()
    }

    /// The emulated line, if any.
    pub fn line(&self) -> Option<LineConfig> {
        self.timing
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
