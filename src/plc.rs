//! PLC peers (`[[plc]]`): local points written into a Modbus-TCP device's holding
//! registers and coils, with the same store-and-forward as peer gateways.
//!
//! One PLC is two tasks. A [`Forwarder`] (the peer links' own, unchanged) follows the
//! image with the map's send rules — deadbands, integrity refresh, periodic sends, a
//! full re-send each time the PLC comes back — and appends batches to the PLC's spool.
//! The sender here reads the spool, turns samples into register/coil values with
//! [`crate::point::registers::encode_registers`], merges them into as few requests as the protocol
//! allows ([`plan`]: contiguous registers into one FC16 of up to 123, coils into one
//! FC15 of up to 1968, a lone register or coil as FC6/FC5) and acknowledges the spool
//! only after the PLC confirmed every write.
//!
//! Delivery: `latest` coalesces everything pending into the newest value per target
//! before writing (a PLC back after an hour gets one write per block, not an hour of
//! history); `all` writes every value in spool order, splitting into a new round of
//! requests whenever a target would be written twice, so no value overtakes an older
//! one of the same target.
//!
//! Invariants: a batch leaves the spool only after the PLC answered every write made
//! from it (a crash re-sends, never loses; writes are idempotent); every request runs
//! under `tokio::time::timeout`, and a timeout or transport error drops the connection,
//! so a late reply is never taken for the next request's; a write the PLC refuses with
//! an exception is logged at ERROR and skipped (retrying cannot help), never retried
//! forever; a multi-register value is never split between two requests; the sender only
//! reads the spool, so a slow or absent PLC never slows polling or any other sink.
//! Values only reach the PLC: quality is not written (a bad-quality sample writes the
//! last value, the same number).
//!
//! Watchdog (`[plc.watchdog]`): while a session is up, the sender writes a u16 counter
//! (FC6) to one register every interval — at connect, then each time it falls due, even
//! between two requests of a long delivery, so it delays values by one request at most.
//! The counter steps by 1 (65535 wraps to 0) only once the PLC answered, so the PLC sees
//! every value in turn, and carries on across reconnects; it is live only, never
//! spooled or replayed. A transport failure drops the session like a value write's.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{Request, Slave};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::Backoff;
use crate::image::Image;
use crate::model::{Deliver, MapTarget, Plc, PlcWatchdog, SendRule};
use crate::point::value::{Sample, Table};
use crate::spool::forward::{Forwarder, Rules};
use crate::spool::{SpoolHandle, SpoolerError};

/// Most registers in one FC16 write.
pub const MAX_WRITE_REGISTERS: usize = 123;
/// Most coils in one FC15 write.
pub const MAX_WRITE_COILS: usize = 1968;
/// First pause before a reconnect.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A connection up this long has proven itself, even if it had nothing to write.
const STABLE: Duration = Duration::from_secs(30);
/// Spool batches read at a time.
const CHUNK: usize = 64;

/// Errors of a PLC sink.
#[derive(Debug, thiserror::Error)]
pub enum PlcError {
    /// `host:port` did not resolve, or resolved to nothing.
    #[error("plc {plc}: cannot resolve {address}: {reason}")]
    Resolve {
        /// The PLC.
        plc: String,
        /// The address as configured.
        address: String,
        /// Why.
        reason: String,
    },
    /// Connecting failed or took longer than the timeout.
    #[error("plc {plc}: cannot connect to {addr}: {reason}")]
    Connect {
        /// The PLC.
        plc: String,
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// A write got no answer in time, or the connection broke.
    #[error("plc {plc}: {what}: {reason}")]
    Transport {
        /// The PLC.
        plc: String,
        /// The request, e.g. `write 10 registers at 100`.
        what: String,
        /// Why.
        reason: String,
    },
    /// The spool failed.
    #[error("plc {plc}: spool: {source}")]
    Spool {
        /// The PLC.
        plc: String,
        /// Why.
        source: SpoolerError,
    },
}

/// One write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Holding registers from `address` (FC6 for one, FC16 for more).
    Registers {
        /// First address.
        address: u16,
        /// Values.
        words: Vec<u16>,
    },
    /// Coils from `address` (FC5 for one, FC15 for more).
    Coils {
        /// First address.
        address: u16,
        /// Values.
        bits: Vec<bool>,
    },
}

impl Write {
    /// The Modbus request.
    pub fn request(&self) -> Request<'_> {
        use std::borrow::Cow;
        match self {
            Write::Registers { address, words } if words.len() == 1 => {
                Request::WriteSingleRegister(*address, words[0])
            }
            Write::Registers { address, words } => {
                Request::WriteMultipleRegisters(*address, Cow::Borrowed(words))
            }
            Write::Coils { address, bits } if bits.len() == 1 => Request::WriteSingleCoil(*address, bits[0]),
            Write::Coils { address, bits } => Request::WriteMultipleCoils(*address, Cow::Borrowed(bits)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Write::Registers { address, words } => format!("write {} register(s) at {address}", words.len()),
            Write::Coils { address, bits } => format!("write {} coil(s) at {address}", bits.len()),
        }
    }
}

/// Values ready to write, keyed by each target's first address (targets never overlap).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pending {
    /// Holding register targets: first address -> the value's registers.
    pub registers: BTreeMap<u16, Vec<u16>>,
    /// Coil targets.
    pub coils: BTreeMap<u16, bool>,
}

impl Pending {
    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.registers.is_empty() && self.coils.is_empty()
    }

    /// True when `target` already has a value waiting.
    fn holds(&self, target: &MapTarget) -> bool {
        match target.table {
            Table::Coils => self.coils.contains_key(&target.address),
            _ => self.registers.contains_key(&target.address),
        }
    }

    /// Sets `target` to `value` (a newer value replaces an older one).
    fn put(&mut self, target: &MapTarget, value: Encoded) {
        match value {
            Encoded::Bit(b) => {
                self.coils.insert(target.address, b);
            }
            Encoded::Words(w) => {
                self.registers.insert(target.address, w);
            }
        }
    }
}

pub use crate::model::{Encoded, encode};

/// Merges `pending` into the fewest requests: adjacent register targets into one FC16
/// of at most [`MAX_WRITE_REGISTERS`] (a value is never split), adjacent coils into one
/// FC15 of at most [`MAX_WRITE_COILS`]. Registers first, then coils, each by address.
pub fn plan(pending: &Pending) -> Vec<Write> {
    let mut out = Vec::new();
    let mut run: Option<(u16, Vec<u16>)> = None;
    for (&address, words) in &pending.registers {
        match run.as_mut() {
            Some((start, acc))
                if u32::from(*start) + acc.len() as u32 == u32::from(address)
                    && acc.len() + words.len() <= MAX_WRITE_REGISTERS =>
            {
                acc.extend_from_slice(words)
            }
            _ => {
                if let Some((address, words)) = run.take() {
                    out.push(Write::Registers { address, words });
                }
                run = Some((address, words.clone()));
            }
        }
    }
    if let Some((address, words)) = run {
        out.push(Write::Registers { address, words });
    }
    let mut run: Option<(u16, Vec<bool>)> = None;
    for (&address, &bit) in &pending.coils {
        match run.as_mut() {
            Some((start, acc))
                if u32::from(*start) + acc.len() as u32 == u32::from(address)
                    && acc.len() < MAX_WRITE_COILS =>
            {
                acc.push(bit)
            }
            _ => {
                if let Some((address, bits)) = run.take() {
                    out.push(Write::Coils { address, bits });
                }
                run = Some((address, vec![bit]));
            }
        }
    }
    if let Some((address, bits)) = run {
        out.push(Write::Coils { address, bits });
    }
    out
}

/// What `check` shows for a PLC: where it is, and the requests that write every mapped
/// point at once (what a reconnect with `deliver = "latest"` sends).
pub fn describe(plc: &Plc) -> String {
    let mut all = Pending::default();
    let mut n = 0;
    for t in plc.map.iter().flat_map(|m| &m.targets) {
        n += 1;
        let value = match t.table {
            Table::Coils => Encoded::Bit(false),
            _ => Encoded::Words(vec![0; usize::from(t.data_type.width())]),
        };
        all.put(t, value);
    }
    let writes = plan(&all);
    let mut out = format!(
        "plc {} ({} unit {}, deliver {}): {n} point(s) in {} write(s)\n",
        plc.name,
        plc.address,
        plc.unit,
        if plc.deliver == Deliver::All { "all" } else { "latest" },
        writes.len()
    );
    for w in &writes {
        let line = match w {
            Write::Registers { address, words } if words.len() == 1 => format!("FC6  holding {address}"),
            Write::Registers { address, words } => {
                format!(
                    "FC16 holding {address}..={} ({} registers)",
                    u32::from(*address) + words.len() as u32 - 1,
                    words.len()
                )
            }
            Write::Coils { address, bits } if bits.len() == 1 => format!("FC5  coil {address}"),
            Write::Coils { address, bits } => {
                format!(
                    "FC15 coils {address}..={} ({} coils)",
                    u32::from(*address) + bits.len() as u32 - 1,
                    bits.len()
                )
            }
        };
        out.push_str(&format!("  {line}\n"));
    }
    if let Some(w) = &plc.watchdog {
        out.push_str(&format!(
            "  FC6  holding {} watchdog counter, every {}\n",
            w.address,
            humantime::format_duration(w.interval)
        ));
    }
    out
}

/// The send rules of a PLC's map, for its [`Forwarder`] (one rule per map entry).
pub fn rules(plc: &Plc) -> Rules {
    let rules: Vec<SendRule> = plc
        .map
        .iter()
        .map(|m| SendRule {
            points: m.points.clone(),
            matched: m.targets.iter().map(|t| t.point.clone()).collect(),
            mode: m.mode,
        })
        .collect();
    Rules::new(&rules)
}

/// Live counters of one PLC sink.
#[derive(Debug, Default)]
pub struct PlcStats {
    /// Connected now.
    pub connected: AtomicBool,
    /// Connections made.
    pub connects: AtomicU64,
    /// Write requests the PLC confirmed.
    pub requests: AtomicU64,
    /// Values written (targets, after coalescing).
    pub values: AtomicU64,
    /// Values dropped: refused by the PLC (exception) or not encodable.
    pub dropped: AtomicU64,
    /// Watchdog writes the PLC confirmed.
    pub watchdog: AtomicU64,
}

/// Counters of a PLC sink at one moment, for its periodic summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlcCounts {
    /// Connected then.
    pub connected: bool,
    /// Connections made.
    pub connects: u64,
    /// Write requests the PLC confirmed.
    pub requests: u64,
    /// Values written.
    pub values: u64,
    /// Values dropped.
    pub dropped: u64,
    /// Watchdog writes confirmed.
    pub watchdog: u64,
    /// Batches waiting in the spool.
    pub spool_pending: u64,
    /// Values dropped from the spool to its limits since it was created.
    pub spool_dropped: u64,
}

impl PlcHandle {
    /// The counters as they are now.
    pub fn counts(&self) -> PlcCounts {
        let s = &self.stats;
        let spool = self.spool.counters();
        PlcCounts {
            connected: s.connected.load(Relaxed),
            connects: s.connects.load(Relaxed),
            requests: s.requests.load(Relaxed),
            values: s.values.load(Relaxed),
            dropped: s.dropped.load(Relaxed),
            watchdog: s.watchdog.load(Relaxed),
            spool_pending: spool.pending_batches.load(Relaxed),
            spool_dropped: spool.dropped_samples.load(Relaxed),
        }
    }
}

/// One-line health summary of a PLC sink, for the periodic info log (watchdog writes
/// only when there were some: most PLCs have no watchdog).
pub fn summary(now: &PlcCounts, since: &PlcCounts, elapsed: Duration) -> String {
    let values = now.values.saturating_sub(since.values);
    let watchdog = match now.watchdog.saturating_sub(since.watchdog) {
        0 => String::new(),
        n => format!(", {n} watchdog writes"),
    };
    format!(
        "{}, {} connections; {} writes confirmed, {values} values written ({:.1}/s), {} refused{watchdog}; \
         spool pending {}, dropped since start {} values",
        if now.connected { "connected" } else { "not connected" },
        now.connects.saturating_sub(since.connects),
        now.requests.saturating_sub(since.requests),
        values as f64 / elapsed.as_secs_f64().max(1e-9),
        now.dropped.saturating_sub(since.dropped),
        now.spool_pending,
        now.spool_dropped,
    )
}

/// A running PLC sink.
#[derive(Debug, Clone)]
pub struct PlcHandle {
    /// The PLC's name.
    pub name: String,
    /// Counters.
    pub stats: Arc<PlcStats>,
    /// The PLC's spool.
    pub spool: SpoolHandle,
}

/// Starts the forwarder and the sender of `plc` (its spool already open) on `tracker`.
pub fn start(
    plc: &Plc,
    image: Arc<Image>,
    spool: SpoolHandle,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> PlcHandle {
    let rules = rules(plc);
    let (connected, connected_rx) = watch::channel(false);
    let fwd = Forwarder::new(&plc.name, rules, image, spool.clone()).resend_on_connect(connected_rx);
    tracker.spawn(fwd.run(shutdown.clone()));
    let stats = Arc::new(PlcStats::default());
    let targets = plc.map.iter().flat_map(|m| &m.targets).map(|t| (t.point.clone(), t.clone())).collect();
    let sender = Sender {
        plc: plc.clone(),
        targets,
        spool: spool.clone(),
        stats: stats.clone(),
        connected,
        unencodable: Mutex::default(),
        watchdog: plc.watchdog.map(|config| Watchdog {
            config,
            state: Mutex::new(Beat { next: 0, due: Instant::now(), refused: false }),
        }),
    };
    tracker.spawn(sender.run(shutdown.clone()).instrument(info_span!("plc", plc = %plc.name)));
    PlcHandle { name: plc.name.clone(), stats, spool }
}

/// How a session ended.
enum End {
    Lost(PlcError),
    Shutdown,
}

struct Sender {
    plc: Plc,
    targets: HashMap<String, MapTarget>,
    spool: SpoolHandle,
    stats: Arc<PlcStats>,
    connected: watch::Sender<bool>,
    /// Points whose last value could not be encoded (logged once, until one encodes):
    /// a value out of the target's range usually stays out for many samples.
    unencodable: Mutex<HashSet<String>>,
    watchdog: Option<Watchdog>,
}

/// The watchdog register of a PLC and where its counter stands.
struct Watchdog {
    config: PlcWatchdog,
    /// Never held across an `.await`.
    state: Mutex<Beat>,
}

/// The watchdog counter (kept across sessions) and its schedule (reset at connect).
#[derive(Debug, Clone, Copy)]
struct Beat {
    /// The value of the next write.
    next: u16,
    /// When the next write is due.
    due: Instant,
    /// The last write was refused (logged once until one is accepted).
    refused: bool,
}

impl Watchdog {
    fn beat(&self) -> std::sync::MutexGuard<'_, Beat> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Sender {
    async fn run(self, shutdown: CancellationToken) {
        // Jitter spreads the reconnects of many sinks. A connect alone proves nothing (a
        // PLC that accepts and drops at once must not be retried every 100 ms for ever):
        // the delay starts again only once the PLC confirmed a write, or the connection
        // stayed up for STABLE.
        let mut backoff = Backoff::new(BACKOFF_MIN, self.plc.reconnect_max).with_jitter().with_stable(STABLE);
        loop {
            let outcome = tokio::select! {
                // Not cancel-safe, and need not be: a half-made connection is dropped.
                r = self.connect() => r,
                () = shutdown.cancelled() => return,
            };
            match outcome {
                Ok(ctx) => {
                    backoff.connected(Instant::now());
                    let confirmed = self.confirmed();
                    self.stats.connects.fetch_add(1, Relaxed);
                    self.set_connected(true);
                    info!(address = %self.plc.address, "connected to the plc");
                    let end = self.session(ctx, &shutdown).await;
                    self.set_connected(false);
                    if self.confirmed() > confirmed {
                        backoff.proven();
                    }
                    match end {
                        End::Shutdown => return,
                        End::Lost(e) => warn!(error = %e, "plc connection lost; values stay spooled"),
                    }
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff.delay(), "cannot reach the plc; values stay spooled")
                }
            }
            let until = backoff.failed(Instant::now());
            tokio::select! {
                // Cancel-safe: a timer.
                () = sleep_until(until) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Requests the PLC has confirmed so far (writes and watchdog beats).
    fn confirmed(&self) -> u64 {
        self.stats.requests.load(Relaxed) + self.stats.watchdog.load(Relaxed)
    }

    fn set_connected(&self, up: bool) {
        self.stats.connected.store(up, Relaxed);
        self.connected.send_replace(up);
    }

    async fn connect(&self) -> Result<Context, PlcError> {
        let resolve = |reason: String| PlcError::Resolve {
            plc: self.plc.name.clone(),
            address: self.plc.address.clone(),
            reason,
        };
        let addr = timeout(self.plc.timeout, tokio::net::lookup_host(self.plc.address.as_str()))
            .await
            .map_err(|_| resolve("timed out".into()))?
            .map_err(|e| resolve(e.to_string()))?
            .next()
            .ok_or_else(|| resolve("no address".into()))?;
        let connect = |reason: String| PlcError::Connect { plc: self.plc.name.clone(), addr, reason };
        timeout(self.plc.timeout, tokio_modbus::client::tcp::connect_slave(addr, Slave(self.plc.unit)))
            .await
            .map_err(|_| connect(format!("no connection within {:?}", self.plc.timeout)))?
            .map_err(|e| connect(e.to_string()))
    }

    /// Writes what the spool holds until the connection fails or shutdown.
    async fn session(&self, mut ctx: Context, shutdown: &CancellationToken) -> End {
        let mut appended = self.spool.appended();
        if let Some(w) = &self.watchdog {
            // The PLC hears from us at once: its own watchdog timer may be running out.
            w.beat().due = Instant::now();
        }
        loop {
            // A PLC that keeps us busy still lets shutdown in between rounds.
            if shutdown.is_cancelled() {
                return End::Shutdown;
            }
            appended.borrow_and_update();
            let drained = match self.plc.deliver {
                Deliver::Latest => self.deliver_latest(&mut ctx).await,
                Deliver::All => self.deliver_all(&mut ctx).await,
            };
            match drained {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => return End::Lost(e),
            }
            loop {
                let due = self.watchdog.as_ref().map(|w| w.beat().due);
                let beat = async move {
                    match due {
                        Some(due) => sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    // Cancel-safe: watch::changed.
                    r = appended.changed() => if r.is_err() { return End::Shutdown } else { break },
                    // Cancel-safe: a timer; the write runs in the arm's body, never cancelled.
                    () = beat => if let Err(e) = self.heartbeat(&mut ctx).await { return End::Lost(e) },
                    () = shutdown.cancelled() => return End::Shutdown,
                }
            }
        }
    }

    /// Writes the watchdog counter if it is due (else does nothing). An exception is
    /// logged (once until a write is accepted) and the counter moves on; a transport
    /// failure ends the session and the same value is written after the reconnect.
    async fn heartbeat(&self, ctx: &mut Context) -> Result<(), PlcError> {
        let Some(w) = &self.watchdog else {
            return Ok(());
        };
        let Beat { next, due, .. } = *w.beat();
        if due > Instant::now() {
            return Ok(());
        }
        let address = w.config.address;
        let transport = |reason: String| PlcError::Transport {
            plc: self.plc.name.clone(),
            what: format!("write watchdog register {address}"),
            reason,
        };
        let answer =
            match timeout(self.plc.timeout, ctx.call(Request::WriteSingleRegister(address, next))).await {
                Err(_) => return Err(transport(format!("no reply within {:?}", self.plc.timeout))),
                Ok(Err(e)) => return Err(transport(e.to_string())),
                Ok(Ok(answer)) => answer,
            };
        let mut beat = w.beat();
        beat.next = next.wrapping_add(1);
        // Never a burst after a slow write: the next one a whole interval from now.
        beat.due = Instant::now() + w.config.interval;
        match answer {
            Ok(_) => {
                self.stats.watchdog.fetch_add(1, Relaxed);
                if std::mem::take(&mut beat.refused) {
                    info!(address, "the plc accepts watchdog writes again");
                }
                debug!(address, value = next, "watchdog written");
            }
            Err(code) => {
                if !std::mem::replace(&mut beat.refused, true) {
                    error!(address, exception = %crate::serial::pdu::exception_text(u8::from(code)), "the plc refused the watchdog write (logged once until one is accepted)");
                }
            }
        }
        Ok(())
    }

    /// Coalesces everything pending into one value per target, writes it and acks.
    /// `Ok(false)` when the spool was empty.
    async fn deliver_latest(&self, ctx: &mut Context) -> Result<bool, PlcError> {
        let mut pending = Pending::default();
        let mut last = 0;
        loop {
            let batches = self.read(last).await?;
            let n = batches.len();
            for (seq, samples) in batches {
                last = seq;
                for (name, sample) in samples {
                    if let Some((target, value)) = self.encoded(&name, &sample) {
                        pending.put(target, value);
                    }
                }
            }
            if n < CHUNK {
                break;
            }
        }
        if last == 0 {
            return Ok(false);
        }
        self.write(ctx, &pending).await?;
        self.ack(last).await?;
        Ok(true)
    }

    /// Writes every pending value in spool order, a chunk of batches at a time.
    async fn deliver_all(&self, ctx: &mut Context) -> Result<bool, PlcError> {
        let batches = self.read(0).await?;
        let Some(last) = batches.last().map(|b| b.0) else {
            return Ok(false);
        };
        let mut round = Pending::default();
        for (_, samples) in batches {
            for (name, sample) in samples {
                if let Some((target, value)) = self.encoded(&name, &sample) {
                    if round.holds(target) {
                        // The older value goes first.
                        self.write(ctx, &round).await?;
                        round = Pending::default();
                    }
                    round.put(target, value);
                }
            }
        }
        self.write(ctx, &round).await?;
        self.ack(last).await?;
        Ok(true)
    }

    async fn read(&self, after: u64) -> Result<Vec<(u64, Vec<(String, Sample)>)>, PlcError> {
        let raw = self
            .spool
            .read_raw_from(after, CHUNK)
            .await
            .map_err(|source| PlcError::Spool { plc: self.plc.name.clone(), source })?;
        let mut out = Vec::with_capacity(raw.len());
        for (seq, block) in raw {
            match crate::spool::block::decode_samples(&block) {
                Ok(samples) => out.push((seq, samples)),
                // Cannot be written in any form: skipped, and acked with the rest.
                Err(e) => {
                    error!(seq, error = %e, "corrupt spooled batch skipped: values lost");
                    out.push((seq, Vec::new()));
                }
            }
        }
        Ok(out)
    }

    async fn ack(&self, upto: u64) -> Result<(), PlcError> {
        self.spool
            .ack(upto)
            .await
            .map(|_| ())
            .map_err(|source| PlcError::Spool { plc: self.plc.name.clone(), source })
    }

    /// The target of `name` and the encoded value of `sample`, if it is mapped, has a
    /// value and encodes.
    fn encoded(&self, name: &str, sample: &Sample) -> Option<(&MapTarget, Encoded)> {
        let Some(target) = self.targets.get(name) else {
            // Spooled under an older configuration.
            debug!(point = %name, "spooled point is no longer mapped; skipped");
            return None;
        };
        let value = sample.value.as_ref()?;
        let unencodable = || self.unencodable.lock().unwrap_or_else(|e| e.into_inner());
        match encode(target, value) {
            Ok(e) => {
                if unencodable().remove(name) {
                    info!(point = %name, "values of the point can be written to the plc again");
                }
                Some((target, e))
            }
            Err(e) => {
                self.stats.dropped.fetch_add(1, Relaxed);
                if unencodable().insert(name.to_string()) {
                    error!(point = %name, address = target.address, error = %e, "value cannot be written to the plc; skipped, value lost (logged once until a value of the point fits again)");
                } else {
                    debug!(point = %name, error = %e, "value cannot be written to the plc; skipped");
                }
                None
            }
        }
    }

    /// Writes `pending` in as few requests as possible.
    async fn write(&self, ctx: &mut Context, pending: &Pending) -> Result<(), PlcError> {
        for w in plan(pending) {
            // A long delivery does not starve the watchdog: it goes between requests.
            self.heartbeat(ctx).await?;
            let what = w.describe();
            let transport = |reason: String| PlcError::Transport {
                plc: self.plc.name.clone(),
                what: what.clone(),
                reason,
            };
            let values = match &w {
                Write::Registers { address, words } => pending
                    .registers
                    .range(*address..)
                    .take_while(|(a, _)| u32::from(**a) < u32::from(*address) + words.len() as u32)
                    .count(),
                Write::Coils { bits, .. } => bits.len(),
            } as u64;
            match timeout(self.plc.timeout, ctx.call(w.request())).await {
                Err(_) => return Err(transport(format!("no reply within {:?}", self.plc.timeout))),
                Ok(Err(e)) => return Err(transport(e.to_string())),
                Ok(Ok(Err(code))) => {
                    self.stats.dropped.fetch_add(values, Relaxed);
                    error!(request = %what, exception = %crate::serial::pdu::exception_text(u8::from(code)), "the plc refused a write: values lost");
                }
                Ok(Ok(Ok(_))) => {
                    self.stats.requests.fetch_add(1, Relaxed);
                    self.stats.values.fetch_add(values, Relaxed);
                    debug!(request = %what, "written");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::value::{DataType, Value, WordOrder};

    #[test]
    fn summary_counts_since_the_last_one() {
        let since = PlcCounts { connects: 1, requests: 10, values: 100, ..PlcCounts::default() };
        let now = PlcCounts {
            connected: true,
            connects: 2,
            requests: 15,
            values: 150,
            dropped: 3,
            watchdog: 0,
            spool_pending: 4,
            spool_dropped: 0,
        };
        assert_eq!(
            summary(&now, &since, Duration::from_secs(10)),
            "connected, 1 connections; 5 writes confirmed, 50 values written (5.0/s), 3 refused; \
             spool pending 4, dropped since start 0 values"
        );
        let now = PlcCounts { watchdog: 12, ..now };
        let since = PlcCounts { watchdog: 2, ..since };
        assert_eq!(
            summary(&now, &since, Duration::from_secs(10)),
            "connected, 1 connections; 5 writes confirmed, 50 values written (5.0/s), 3 refused, \
             10 watchdog writes; spool pending 4, dropped since start 0 values"
        );
    }

    fn target(table: Table, address: u16, data_type: DataType) -> MapTarget {
        MapTarget {
            point: "d.p".into(),
            table,
            address,
            data_type,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            eng_unit: None,
        }
    }

    #[test]
    fn contiguous_targets_make_one_request() {
        let mut p = Pending::default();
        p.put(&target(Table::Holding, 100, DataType::F32), Encoded::Words(vec![1, 2]));
        p.put(&target(Table::Holding, 102, DataType::U16), Encoded::Words(vec![3]));
        p.put(&target(Table::Holding, 200, DataType::U16), Encoded::Words(vec![4]));
        p.put(&target(Table::Coils, 0, DataType::Bool), Encoded::Bit(true));
        p.put(&target(Table::Coils, 1, DataType::Bool), Encoded::Bit(false));
        assert_eq!(
            plan(&p),
            vec![
                Write::Registers { address: 100, words: vec![1, 2, 3] },
                Write::Registers { address: 200, words: vec![4] },
                Write::Coils { address: 0, bits: vec![true, false] },
            ]
        );
        assert!(matches!(plan(&p)[1].request(), Request::WriteSingleRegister(200, 4)));
        assert!(matches!(plan(&p)[0].request(), Request::WriteMultipleRegisters(100, _)));
    }

    #[test]
    fn limits_split_runs_but_never_a_value() {
        let mut p = Pending::default();
        // 62 two-register values from 0: 124 registers, one past the FC16 limit.
        for i in 0..62u16 {
            p.put(&target(Table::Holding, i * 2, DataType::U32), Encoded::Words(vec![i, i]));
        }
        let w = plan(&p);
        assert_eq!(w.len(), 2);
        let Write::Registers { address, words } = &w[1] else { panic!("registers") };
        assert_eq!((*address, words.len()), (122, 2), "the split falls between values");
        let mut p = Pending::default();
        for a in 0..2000u16 {
            p.put(&target(Table::Coils, a, DataType::Bool), Encoded::Bit(a % 2 == 0));
        }
        let w = plan(&p);
        assert_eq!(w.len(), 2);
        assert!(matches!(&w[0], Write::Coils { bits, .. } if bits.len() == MAX_WRITE_COILS));
    }

    #[test]
    fn encoding() {
        let t = target(Table::Holding, 0, DataType::F32);
        assert_eq!(encode(&t, &Value::Float(1.5)), Ok(Encoded::Words(vec![0x3FC0, 0])));
        let t = target(Table::Holding, 0, DataType::U16);
        assert!(encode(&t, &Value::Int(70_000)).is_err(), "out of range");
        let c = target(Table::Coils, 0, DataType::Bool);
        assert_eq!(encode(&c, &Value::Bool(true)), Ok(Encoded::Bit(true)));
        assert!(encode(&c, &Value::Float(2.0)).is_err());
    }
}
