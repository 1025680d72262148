//! The bus task's I/O loop: opens the port, takes the next job from the schedule, runs
//! its attempts on the line (silence before each request, the request, the reply looked
//! for among what comes back) and answers it. The scheduling and late-reply rules live in
//! [`super::schedule`], sans-I/O; this file only does what needs the port and the clock.
//!
//! Invariants: exactly one transaction is on the line at a time and is never cancelled
//! half-way (shutdown is checked between transactions); the engine listens whenever a
//! late reply may still come (idle, before a request, during another unit's window) so
//! the ledger learns of it at once; bytes never reach a caller but as a reply the framing
//! decoded for that caller's request and the ledger accepted.
//!
//! Files: engine/transaction.rs runs one transaction's attempts (silence, request,
//! retries), engine/reply.rs recognises what comes back (the reply, our echo, late
//! replies, noise), engine/port.rs holds the port and its reopen back-off, and
//! engine/pipelined.rs is the loop for a Modbus-TCP device that pipelines.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument};

mod pipelined;
mod port;
mod reply;
#[cfg(test)]
mod tests;
mod transaction;

pub use self::port::Opened;
use self::port::PortSlot;
use super::pass::PassQueue;
use super::schedule::{Key, Schedule};
use super::trace::Tap;
use super::{BusError, BusStats, Job};
use crate::model::Line;
use crate::serial::framing::Framing;
use crate::serial::line::{PortKind, PreciseTimer};
use crate::serial::rs485::Rts;
use crate::serial::rtu;

/// The bus task's state: the line timing and counters; the port comes and goes.
pub struct Engine {
    name: String,
    line: Line,
    framing: Box<dyn Framing>,
    reopen_max: Duration,
    stats: Arc<BusStats>,
    /// Modbus-TCP masters' requests, taken when a pass-through transaction is due.
    pass: Arc<PassQueue>,
    /// The silence that ends a frame we cannot length (received frames).
    t35: Duration,
    /// The silence kept before each request we send.
    gap: Duration,
    /// The adapter echoes what we send.
    local_echo: bool,
    /// A Modbus-TCP device: no wire time, and a lost connection is retried once.
    tcp_device: bool,
    /// What the port is, in the log lines' words.
    port_kind: PortKind,
    /// Requests kept outstanding at once (a Modbus-TCP device that pipelines: more than
    /// one runs [`Engine::run_pipelined`] instead of the one-at-a-time loop).
    max_in_flight: usize,
    /// The silence after which a frame still short of its known length is dead.
    dead_after: Duration,
    /// When the line last carried a byte (ours or anyone's).
    last_activity: Instant,
    /// The queue, its priorities, and the requests a late reply may still answer.
    schedule: Schedule,
    /// The traffic tap (events are built only while someone subscribes).
    tap: Tap,
    /// Times the line's silences and RS-485 delays.
    timer: PreciseTimer,
    /// The number of the transaction on the line (attempts of one job share it).
    txn: u64,
    buf: Vec<u8>,
    /// Bytes heard outside a transaction's window (while idle, or before a request).
    stray: Vec<u8>,
    out: Vec<u8>,
    /// The open port's RTS line, when this bus switches the RS-485 direction itself.
    rts: Option<Rts>,
    /// Liveness for the watchdog: beaten on every turn of the loop (`health`).
    beat: Arc<crate::health::Beat>,
}

/// The longest pause a serial port leaves inside a frame: USB adapters deliver bytes in
/// bursts, up to their latency timer apart (16 ms on FTDI chips by default), so only a
/// silence longer than that says a frame lost a byte.
pub const BURST_GAP: Duration = Duration::from_millis(20);

/// The same for a serial device server reached over TCP (`tcp://`): network delivery
/// may pause longer inside a frame.
pub const TCP_BURST_GAP: Duration = Duration::from_millis(100);

/// The longest opening a port can take (a device server's TCP connect is bounded at 5 s),
/// for the watchdog's progress promise.
const OPEN_LIMIT: Duration = Duration::from_secs(6);

/// What ended an idle wait.
enum Woke {
    Job(Option<Job>),
    Other,
    Shutdown,
    Read(std::io::Result<usize>),
}

impl Engine {
    /// A new engine for a line; `depth` bounds the queue.
    pub fn new(
        name: String,
        line: Line,
        framing: Box<dyn Framing>,
        depth: usize,
        reopen_max: Duration,
        stats: Arc<BusStats>,
    ) -> Self {
        let addressed = framing.replies_name_unit();
        let beat = crate::health::beat(format!("bus {name}"));
        Self {
            name,
            line,
            framing,
            reopen_max,
            stats,
            pass: Arc::default(),
            t35: rtu::t35(&line),
            gap: rtu::t35(&line),
            local_echo: false,
            tcp_device: false,
            port_kind: PortKind::Serial,
            max_in_flight: 1,
            dead_after: rtu::t35(&line).max(BURST_GAP),
            last_activity: Instant::now(),
            schedule: Schedule::new(depth, addressed),
            tap: Tap::default(),
            timer: PreciseTimer::default(),
            txn: 0,
            buf: Vec::with_capacity(512),
            stray: Vec::with_capacity(512),
            out: Vec::with_capacity(260),
            rts: None,
            beat,
        }
    }

    /// The traffic tap, to subscribe to ([`super::BusHandle::trace`]).
    pub fn tap(&self) -> Tap {
        self.tap.clone()
    }

    /// The queue masters' requests for this bus go into ([`BusHandle::pass_through`]).
    pub fn pass_queue(&self) -> Arc<PassQueue> {
        self.pass.clone()
    }

    /// Keeps `gap` of line silence before each request instead of t3.5.
    pub fn with_frame_gap(mut self, gap: Duration) -> Self {
        self.gap = gap;
        self
    }

    /// Expects the request's own bytes back before the reply (an adapter that echoes).
    pub fn with_local_echo(mut self, echo: bool) -> Self {
        self.local_echo = echo;
        self
    }

    /// Talks to a Modbus-TCP device, not a line: a request has no wire time, and a
    /// request whose proven connection fails is sent once more on a new connection.
    pub fn with_tcp_device(mut self, tcp: bool) -> Self {
        self.tcp_device = tcp;
        self
    }

    /// Names the port in the log lines as what it is (`serial port open`, `connection open`).
    pub fn with_port_kind(mut self, kind: PortKind) -> Self {
        self.port_kind = kind;
        self
    }

    /// Keeps up to `n` requests outstanding on a Modbus-TCP device's connection (only
    /// with [`Engine::with_tcp_device`]; 1, the default, is one transaction at a time).
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Waits `gap` of silence (at least t3.5) before declaring a frame that is short of its
    /// length dead: the longest pause the port may leave inside a frame.
    pub fn with_burst_gap(mut self, gap: Duration) -> Self {
        self.dead_after = self.t35.max(gap);
        self
    }

    /// Keeps at least `silence` of line silence where the gaps are shorter: before each
    /// request, and as the end of a frame for framings that end frames with silence (raw
    /// devices with `end = "silence"` behind USB adapters that deliver bytes in bursts).
    pub fn with_silence(mut self, silence: Duration) -> Self {
        self.t35 = self.t35.max(silence);
        self.gap = self.gap.max(silence);
        self.dead_after = self.dead_after.max(silence);
        self
    }

    /// A new connection to a Modbus-TCP device is open: no reply to a request sent on the
    /// old one can arrive on it, so no unit is held for one, and what the old connection
    /// left behind is not this one's (a serial line, or a device server's, still carries
    /// the late reply: its ledger is kept).
    fn fresh_connection(&mut self) {
        if self.tcp_device {
            self.schedule.ledger.connection_lost();
            self.stray.clear();
        }
    }

    /// Opens the port when it is closed and its back-off is over, counting the attempt
    /// (a failure is said and backed off by the slot). `None`: shutdown came first;
    /// `Some(true)`: the port opened now.
    async fn open_when_due<F, O>(
        &mut self,
        line: &mut PortSlot,
        open: &F,
        shutdown: &CancellationToken,
    ) -> Option<bool>
    where
        F: Fn() -> O,
        O: std::future::Future<Output = Result<Opened, String>>,
    {
        if line.port.is_some() || Instant::now() < line.next_open {
            return Some(false);
        }
        self.beat.busy(Instant::now().into_std(), OPEN_LIMIT);
        let opened = tokio::select! {
            // Cancel-safe: an open abandoned half-way (a TCP connect) is dropped.
            r = open() => r,
            () = shutdown.cancelled() => return None,
        };
        self.stats.open_attempts.fetch_add(1, Relaxed);
        match opened {
            Ok(opened) => {
                self.stats.opens.fetch_add(1, Relaxed);
                line.opened(opened.port);
                self.rts = opened.rts;
                Some(true)
            }
            Err(e) => {
                line.open_failed(e, self.reopen_max);
                Some(false)
            }
        }
    }

    /// Who a reply from `unit` can be told apart as (see [`schedule`]).
    fn key(&self, unit: u8) -> Key {
        self.framing.replies_name_unit().then_some(unit)
    }

    /// Runs until shutdown: opens the port (by calling `open` again after a failure, with
    /// back-off), and runs queued jobs one at a time, highest priority first.
    #[instrument(name = "bus", skip_all, fields(bus = %self.name))]
    pub async fn run<F, O>(mut self, mut rx: mpsc::Receiver<Job>, open: F, shutdown: CancellationToken)
    where
        F: Fn() -> O + Send,
        O: std::future::Future<Output = Result<Opened, String>> + Send,
    {
        if self.tcp_device && self.max_in_flight > 1 {
            return self.run_pipelined(rx, open, shutdown).await;
        }
        let mut line = PortSlot::new(self.port_kind);
        let mut scratch = [0u8; 256];
        let hang_at = crate::health::hang_after(self.beat.name()).map(|d| Instant::now() + d);
        loop {
            crate::health::hang_if_due(hang_at).await;
            match self.open_when_due(&mut line, &open, &shutdown).await {
                None => break,
                Some(true) => {
                    self.fresh_connection();
                    self.last_activity = Instant::now();
                }
                Some(false) => {}
            }
            self.take_waiting(&mut rx);
            self.stats.queue_depth.store(self.schedule.len() + self.pass.len(), Relaxed);
            let next = self.schedule.next(Instant::now(), &self.pass);
            let taken = match next {
                Some(next) => next,
                None => {
                    // Idle: wait for work, shutdown, the next reopen attempt or a unit's
                    // release; listen while a late reply may still come, so it frees its
                    // unit as soon as it is heard.
                    let down = line.port.is_none();
                    let release = self.schedule.ledger.next_expiry();
                    let next_open = line.next_open;
                    let reopen = async move {
                        match (down, release) {
                            (true, Some(r)) => sleep_until(next_open.min(r)).await,
                            (true, None) => sleep_until(next_open).await,
                            (false, Some(r)) => sleep_until(r).await,
                            (false, None) => std::future::pending().await,
                        }
                    };
                    let listening = self.schedule.ledger.any_pending();
                    let read = async {
                        match line.port.as_mut() {
                            Some(p) if listening => p.read(&mut scratch).await,
                            _ => std::future::pending().await,
                        }
                    };
                    self.beat.idle(Instant::now().into_std());
                    let woke = tokio::select! {
                        // Cancel-safe: a job not yet received stays in the channel.
                        job = rx.recv() => Woke::Job(job),
                        // Cancel-safe: a notification not taken is kept for the next wait.
                        () = self.pass.arrived() => Woke::Other,
                        () = shutdown.cancelled() => Woke::Shutdown,
                        () = reopen => Woke::Other,
                        // Cancel-safe: `read` is; bytes read are handled below.
                        r = read => Woke::Read(r),
                        // Cancel-safe: a timer. Wake to beat even when nothing happens (the watchdog).
                        () = tokio::time::sleep(self.beat.tick()) => Woke::Other,
                    };
                    match woke {
                        Woke::Job(Some(job)) => self.schedule.push(job),
                        Woke::Job(None) | Woke::Shutdown => break,
                        Woke::Other => {}
                        Woke::Read(Ok(n)) if n > 0 => {
                            self.last_activity = Instant::now();
                            self.stray.extend_from_slice(&scratch[..n]);
                            self.sort_stray(false);
                        }
                        Woke::Read(Ok(_)) => line.failed(
                            std::io::Error::from(std::io::ErrorKind::UnexpectedEof).to_string(),
                            self.reopen_max,
                        ),
                        Woke::Read(Err(e)) => line.failed(e.to_string(), self.reopen_max),
                    }
                    continue;
                }
            };
            // A master's request counts against its in-flight limit until it is answered
            // (the slot freed before the answer is sent: `Taken::answer`) or dropped.
            if shutdown.is_cancelled() {
                taken.answer(Err(BusError::Closed));
                break;
            }
            if taken.abandoned() {
                continue; // nobody waits for it any more
            }
            let job = &taken.job;
            self.schedule.ran(job.priority);
            let Some(p) = line.port.as_mut() else {
                taken.answer(Err(BusError::PortDown(line.last_error.clone())));
                continue;
            };
            let started = Instant::now();
            // The longest a transaction can take: every attempt's timeout and the late-reply
            // hold before its retry (up to 4 timeouts, or the learned delay of up to 30 s),
            // with margin for the line time and the gaps.
            let attempts = u32::from(job.retries) + 1;
            let longest =
                (job.timeout + job.turnaround).saturating_mul(5 * attempts) + Duration::from_secs(31);
            self.beat.busy(started.into_std(), longest);
            let mut outcome = self.transaction(p.as_mut(), job).await;
            // A reply cut off by the deadline may be finished by the idle listening.
            self.stray.append(&mut self.buf);
            if let (Err(e), true, true) = (&outcome, line.proven, self.tcp_device) {
                // Devices close idle connections; that is not the request's fault.
                debug!(error = %e, "connection lost; reconnecting to send the request again");
                self.stats.open_attempts.fetch_add(1, Relaxed);
                if let Ok(fresh) = open().await {
                    self.stats.opens.fetch_add(1, Relaxed);
                    *p = fresh.port;
                    self.rts = fresh.rts;
                    self.last_activity = Instant::now();
                    self.fresh_connection();
                    outcome = self.transaction(p.as_mut(), job).await;
                    self.stray.append(&mut self.buf);
                }
            }
            self.stats.busy_ns.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
            let outcome = match outcome {
                Ok(r) => {
                    if !line.proven {
                        line.proven = true;
                        line.backoff = Duration::from_millis(100);
                    }
                    r
                }
                Err(e) => {
                    line.failed(e.to_string(), self.reopen_max);
                    Err(BusError::PortDown(line.last_error.clone()))
                }
            };
            self.stats.shared_answers.fetch_add(taken.shared.len() as u64, Relaxed);
            taken.answer(outcome);
        }
        // Whatever is still queued learns that the bus is gone (dropping the sender).
        self.pass.close();
        info!("bus stopped");
    }

    /// Takes the requests waiting on the channel into the schedule, up to its bound, so
    /// priorities can act on them.
    fn take_waiting(&mut self, rx: &mut mpsc::Receiver<Job>) {
        while self.schedule.has_room() {
            match rx.try_recv() {
                Ok(job) => self.schedule.push(job),
                Err(_) => break,
            }
        }
    }
}
