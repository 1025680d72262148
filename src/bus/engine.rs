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

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

mod pipelined;

use super::pass::PassQueue;
use super::schedule::{Judged, Key, Schedule};
use super::trace::{Tap, TraceDir, Verdict, describe_reply, describe_request};
use super::{BusError, BusStats, Job, Port};
use crate::model::Line;
use crate::serial::framing::{Decoded, Framing, SkipReason};
use crate::serial::line::PreciseTimer;
use crate::serial::rs485::Rts;
use crate::serial::rtu;

/// What a bus opener hands the engine: the port, and its RTS line when the bus switches
/// the RS-485 direction itself (`rs485 = "rts"`).
pub struct Opened {
    /// The port the traffic goes through.
    pub port: Box<dyn Port>,
    /// Userspace direction control, set around each request in `attempt`.
    pub rts: Option<Rts>,
}

impl From<Box<dyn Port>> for Opened {
    fn from(port: Box<dyn Port>) -> Self {
        Self { port, rts: None }
    }
}

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

enum Attempt {
    Done(Result<Response, ExceptionCode>),
    NoReply,
    /// The reply came cut short or corrupt: the attempt is over at once.
    Garbled,
}

/// What listening for a reply heard.
enum Heard {
    Reply(Result<Response, ExceptionCode>),
    /// Nothing that answers, by the deadline.
    Nothing,
    /// A frame from the unit died short of its length or failed its CRC: it answered,
    /// unreadably.
    Garbled,
}

/// Writes `frame` to the port, or fails when the port does not take it within `limit`
/// (a device server whose TCP window stays shut, a UART held by flow control): a write
/// never holds the bus longer than a request's timeout, and the port is reopened.
pub(super) async fn write_frame(port: &mut dyn Port, frame: &[u8], limit: Duration) -> std::io::Result<()> {
    match tokio::time::timeout(limit, port.write_all(frame)).await {
        Ok(wrote) => wrote,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the port did not take the request within {}", humantime::format_duration(limit)),
        )),
    }
}

/// What ended an idle wait.
enum Woke {
    Job(Option<Job>),
    Other,
    Shutdown,
    Read(std::io::Result<usize>),
}

/// The port and its reopen back-off.
struct PortSlot {
    port: Option<Box<dyn Port>>,
    backoff: Duration,
    next_open: Instant,
    last_error: String,
    /// The open port has carried a transaction (whatever the device said): a port that
    /// fails before that is flapping (accepts the open, fails the I/O) and is reopened
    /// with back-off, not at the poll rate.
    proven: bool,
}

impl PortSlot {
    /// Opening the port failed: said once per new reason, and tried again after the
    /// back-off, which doubles up to `reopen_max`.
    fn open_failed(&mut self, e: String, reopen_max: Duration) {
        if e != self.last_error {
            warn!(
                error = %e,
                retry_in = %humantime::format_duration(self.backoff),
                "cannot open the bus's port; trying again after the back-off"
            );
        }
        self.last_error = e;
        self.next_open = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(reopen_max);
    }

    /// The port failed: drop it and schedule the reopen.
    fn failed(&mut self, e: String, reopen_max: Duration) {
        if self.proven {
            warn!(error = %e, "serial port failed; reopening");
            self.next_open = Instant::now();
        } else {
            if e != self.last_error {
                warn!(error = %e, retry_in = %humantime::format_duration(self.backoff), "serial port fails as soon as it is open; reopening with back-off");
            }
            self.next_open = Instant::now() + self.backoff;
            self.backoff = (self.backoff * 2).min(reopen_max);
        }
        self.last_error = e;
        self.port = None;
    }
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
        let mut line = PortSlot {
            port: None,
            backoff: Duration::from_millis(100),
            next_open: Instant::now(),
            last_error: String::from("not opened yet"),
            proven: false,
        };
        let mut scratch = [0u8; 256];
        let hang_at = crate::health::hang_after(&self.name).map(|d| Instant::now() + d);
        loop {
            if hang_at.is_some_and(|at| Instant::now() >= at) {
                // The test fault hook (health::HANG_BUS_ENV): wedge like a deadlock would.
                warn!("test fault hook: this bus engine hangs now");
                std::future::pending::<()>().await;
            }
            if line.port.is_none() && Instant::now() >= line.next_open {
                self.beat.busy(Instant::now().into_std(), OPEN_LIMIT);
                let opened = tokio::select! {
                    // Cancel-safe: an open abandoned half-way (a TCP connect) is dropped.
                    r = open() => r,
                    () = shutdown.cancelled() => break,
                };
                self.stats.open_attempts.fetch_add(1, Relaxed);
                match opened {
                    Ok(opened) => {
                        self.stats.opens.fetch_add(1, Relaxed);
                        info!("serial port open");
                        self.fresh_connection();
                        line.port = Some(opened.port);
                        self.rts = opened.rts;
                        line.proven = false;
                        self.last_activity = Instant::now();
                    }
                    Err(e) => line.open_failed(e, self.reopen_max),
                }
            }
            self.take_waiting(&mut rx);
            self.stats.queue_depth.store(self.schedule.len() + self.pass.len(), Relaxed);
            let next = self.schedule.next(Instant::now(), &self.pass);
            let (taken, master) = match next {
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
            // A master's request is running until its outcome is sent (or it is dropped):
            // it counts against the master's in-flight limit until then.
            let running = master.then(|| Running(self.pass.clone()));
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
            drop(running);
            self.stats.shared_answers.fetch_add(taken.shared.len() as u64, Relaxed);
            taken.answer(outcome);
        }
        // Whatever is still queued learns that the bus is gone (dropping the sender).
        self.pass.close();
        info!("bus stopped");
    }

    /// One transaction with its retries. `Err` only for an I/O failure of the port.
    async fn transaction(
        &mut self,
        port: &mut dyn Port,
        job: &Job,
    ) -> std::io::Result<Result<Response, BusError>> {
        self.out.clear();
        if let Err(e) = self.framing.encode(job.unit, &job.request, &mut self.out) {
            return Ok(Err(BusError::Invalid(e)));
        }
        self.txn += 1;
        let key = self.key(job.unit);
        let attempts = job.retries.saturating_add(1);
        for attempt in 1..=attempts {
            // The attempt before may still be answered: the retry waits for that reply
            // (the same request's answer, so it is taken) or until it can no longer come.
            // Sending it earlier would leave two replies for one request, the second of
            // which would land in the next transaction's window.
            while let Some(until) = self.schedule.ledger.blocked_until(key, Instant::now()) {
                if let Heard::Reply(reply) = self.listen(port, job, until, 0).await? {
                    return Ok(self.done(job, reply));
                }
            }
            match self.attempt(port, job).await? {
                Attempt::Done(reply) => return Ok(self.done(job, reply)),
                Attempt::NoReply if job.unit == 0 => return Ok(Ok(broadcast_echo(&job.request))),
                Attempt::NoReply => {
                    self.stats.timeouts.fetch_add(1, Relaxed);
                    self.tap.emit(TraceDir::Rx, &[], Some(job.unit), Verdict::Timeout, || {
                        format!(
                            "unit {} no reply within {}",
                            job.unit,
                            humantime::format_duration(job.timeout)
                        )
                    });
                    debug!(unit = job.unit, attempt, "no valid reply");
                }
                Attempt::Garbled => debug!(unit = job.unit, attempt, "reply unreadable"),
            }
        }
        Ok(Err(BusError::Timeout { attempts }))
    }

    /// Counts a transaction's answer and turns it into its outcome.
    fn done(&self, job: &Job, reply: Result<Response, ExceptionCode>) -> Result<Response, BusError> {
        self.stats.transactions.fetch_add(1, Relaxed);
        reply.map_err(|code| {
            self.stats.exceptions.fetch_add(1, Relaxed);
            debug!(unit = job.unit, ?code, "exception reply");
            BusError::Exception(code)
        })
    }

    /// Waits until the line has been silent for the frame gap since the last byte and
    /// `not_before` has passed, sorting out anything heard meanwhile (a late reply, noise)
    /// and anything already waiting in the port. Gives up waiting — and sends anyway —
    /// after `limit`, so a jabbering line cannot stall the bus for ever.
    async fn wait_silence(
        &mut self,
        port: &mut dyn Port,
        not_before: Instant,
        limit: Duration,
    ) -> std::io::Result<()> {
        let give_up = Instant::now() + limit;
        let mut scratch = [0u8; 256];
        loop {
            let quiet_at = (self.last_activity + self.gap).max(not_before).min(give_up);
            if Instant::now() >= quiet_at {
                // Bytes already received but not read yet are stale too (with no gap to
                // wait out, nothing else would have read them). Readiness is checked
                // without a system call when nothing has arrived.
                match port.read(&mut scratch).now_or_never() {
                    Some(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Some(Ok(n)) => {
                        self.last_activity = Instant::now();
                        self.stray.extend_from_slice(&scratch[..n]);
                        self.sort_stray(false);
                        continue;
                    }
                    Some(Err(e)) => return Err(e),
                    None => {
                        self.sort_stray(true);
                        return Ok(());
                    }
                }
            }
            // The silence is timed precisely: the 1 ms timer would add up to a whole
            // t3.5 at 115200 baud (1.75 ms) to every transaction.
            let read = tokio::select! {
                // Cancel-safety: `read` is cancel-safe; a dropped sleep only ends early.
                () = self.timer.sleep_until(quiet_at) => continue,
                r = port.read(&mut scratch) => r,
            };
            match read {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.last_activity = Instant::now();
                    self.stray.extend_from_slice(&scratch[..n]);
                    self.sort_stray(false);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sorts out bytes heard outside a transaction's window: a reply to a request still
    /// open (or just given up on) in the ledger is a late reply, counted and dropped;
    /// anything else is noise. With `silent` the line has gone quiet, so what cannot be
    /// completed is dropped too.
    fn sort_stray(&mut self, silent: bool) {
        let now = Instant::now();
        while !self.stray.is_empty() {
            let (mut hit, mut waiting, mut skip, mut any) = (None, false, usize::MAX, false);
            let mut ours = None;
            for (key, e) in self.schedule.ledger.candidates(now) {
                any = true;
                match self.framing.decode(e.what.0, &e.what.1, &self.stray, silent) {
                    Decoded::Reply { len, .. } => {
                        hit = Some((key, len));
                        break;
                    }
                    Decoded::Incomplete => waiting = true,
                    Decoded::Skip { len, why: SkipReason::Late } => ours = Some(len),
                    Decoded::Skip { len, .. } => skip = skip.min(len.max(1)),
                }
            }
            if let (None, Some(len)) = (hit, ours) {
                // A reply the framing knows for ours by its transaction id, to a request
                // given up on: late, whichever unit's entry it answers.
                let len = len.min(self.stray.len());
                self.tap.emit(TraceDir::Rx, &self.stray[..len], None, Verdict::LateReplyDiscarded, || {
                    "late reply, discarded".into()
                });
                self.stats.late_replies.fetch_add(1, Relaxed);
                debug!("late reply discarded");
                self.stray.drain(..len);
                continue;
            }
            if let Some((key, len)) = hit {
                let len = len.min(self.stray.len());
                self.tap.emit(TraceDir::Rx, &self.stray[..len], key, Verdict::LateReplyDiscarded, || {
                    "late reply, discarded".into()
                });
                self.schedule.ledger.stray(key, now);
                self.stats.late_replies.fetch_add(1, Relaxed);
                debug!(unit = key.map(u32::from), "late reply discarded");
                self.stray.drain(..len.min(self.stray.len()));
                continue;
            }
            if any && waiting && !silent {
                return;
            }
            let n = if any && skip != usize::MAX { skip.min(self.stray.len()) } else { self.stray.len() };
            self.stats.noise_bytes.fetch_add(n as u64, Relaxed);
            self.tap.emit(TraceDir::Rx, &self.stray[..n], None, Verdict::Noise, || {
                format!("{n} stray bytes outside a reply window, discarded")
            });
            self.stray.drain(..n);
        }
    }

    /// True when `frame` (already cut out of the line) is the reply to the oldest open
    /// request of some unit other than the transaction's: a late reply, which answers that
    /// request in the ledger.
    fn attribute(&mut self, frame: &[u8]) -> bool {
        let now = Instant::now();
        let hit = self.schedule.ledger.candidates(now).find_map(|(key, e)| {
            matches!(self.framing.decode(e.what.0, &e.what.1, frame, true), Decoded::Reply { len, .. } if len == frame.len())
                .then_some(key)
        });
        match hit {
            Some(key) => {
                self.schedule.ledger.stray(key, now);
                self.stats.late_replies.fetch_add(1, Relaxed);
                debug!(unit = key.map(u32::from), "late reply discarded");
                true
            }
            None => false,
        }
    }

    async fn attempt(&mut self, port: &mut dyn Port, job: &Job) -> std::io::Result<Attempt> {
        // A device that needs a longer turnaround gets it on top of the t3.5 silence.
        // What the last window left unfinished is judged with what comes before the send.
        self.stray.append(&mut self.buf);
        let not_before = Instant::now() + job.turnaround;
        self.wait_silence(port, not_before, job.timeout.max(self.gap * 4) + job.turnaround).await?;
        self.buf.clear();
        if let Some(rts) = self.rts.as_mut() {
            // Userspace RS-485: transmitter on, and the settle time before the first bit.
            rts.line.set_rts(rts.levels.transmit)?;
            self.timer.sleep_until(Instant::now() + rts.delay_before).await;
        }
        let write_start = Instant::now();
        let wrote = write_frame(port, &self.out, job.timeout).await;
        if let (Err(_), Some(rts)) = (&wrote, self.rts.as_mut()) {
            // A failed port must not leave our transmitter jamming the line.
            let _ = rts.line.set_rts(rts.levels.idle);
        }
        wrote?;
        let written = Instant::now();
        // The request has left the UART when its last character is on the wire.
        let wire = if self.tcp_device { Duration::ZERO } else { rtu::wire_time(&self.line, self.out.len()) };
        let drained = written.max(write_start + wire);
        if let Some(rts) = self.rts.as_mut() {
            // The last stop bit is out (by the line's wire time, not a blocking tcdrain):
            // hold the line for the delay after, then let go so the device can answer.
            self.timer.sleep_until(drained + rts.delay_after).await;
            rts.line.set_rts(rts.levels.idle)?;
        }
        self.last_activity = drained;
        debug!(unit = job.unit, request = ?job.request, "sent");
        let verdict = if job.unit == 0 { Verdict::Broadcast } else { Verdict::Sent };
        self.tap.emit(TraceDir::Tx, &self.out, Some(job.unit), verdict, || {
            describe_request(job.unit, &job.request)
        });
        if job.unit == 0 {
            // Broadcast: nobody answers; give the devices their turnaround to act.
            sleep_until(drained + self.gap + job.turnaround).await;
            return Ok(Attempt::NoReply);
        }
        self.schedule.ledger.sent(
            self.key(job.unit),
            self.txn,
            job.timeout,
            (job.unit, job.request.clone()),
            drained,
        );
        // Bytes of our own echo still to come (and to take off).
        let echo = if self.local_echo { self.out.len() } else { 0 };
        Ok(match self.listen(port, job, drained + job.timeout, echo).await? {
            Heard::Reply(reply) => Attempt::Done(reply),
            Heard::Nothing => Attempt::NoReply,
            Heard::Garbled => Attempt::Garbled,
        })
    }

    /// Listens for the reply to `job` until `deadline`, with `echo` bytes of our own
    /// request to take off first; what is in the buffer already (the part of a reply the
    /// attempt before heard) counts. [`Heard::Reply`] is the answer (accepted by the ledger:
    /// nothing sent earlier to the unit can still be answered).
    ///
    /// A frame from the unit that stops short of its length, followed by a silence of
    /// [`Engine::dead_after`], is dead: a byte was lost. It is counted as a framing error
    /// and answers the unit's oldest request in the ledger (it was the unit's reply, if
    /// unreadable), so the retry goes out at once instead of after the timeout.
    async fn listen(
        &mut self,
        port: &mut dyn Port,
        job: &Job,
        deadline: Instant,
        mut echo: usize,
    ) -> std::io::Result<Heard> {
        let key = self.key(job.unit);
        let mut scratch = [0u8; 256];
        // The buffer as it stands has been judged at a silence already: judging it again
        // before new bytes arrive cannot change the verdict (and, with the silence in the
        // past, would spin on the CPU while a slow adapter delivers the rest of a frame).
        let mut judged_silent = false;
        // An unreadable frame from the unit may end the attempt early (it was the reply).
        let mut trust_garbled = true;
        loop {
            // Frames we cannot length end at a t3.5 silence.
            // A frame still short of its length after a longer silence is dead.
            let silence_at = match (self.buf.is_empty(), judged_silent) {
                (true, _) => None,
                (false, false) => Some(self.last_activity + self.t35),
                (false, true) => Some(self.last_activity + self.dead_after),
            };
            let wake = silence_at.map_or(deadline, |s| s.min(deadline));
            let silent = match timeout_at(wake, port.read(&mut scratch)).await {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(n)) => {
                    self.last_activity = Instant::now();
                    self.buf.extend_from_slice(&scratch[..n]);
                    judged_silent = false;
                    if echo > 0 {
                        echo = match self.take_echo(echo) {
                            Some(left) => left,
                            None => {
                                // A garbled echo may look like a garbled reply: only a
                                // readable reply ends this attempt now.
                                trust_garbled = false;
                                0
                            }
                        };
                        if echo > 0 || self.buf.is_empty() {
                            continue;
                        }
                    }
                    false
                }
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => return Ok(Heard::Nothing),
                Err(_) if judged_silent => {
                    self.stats.framing_errors.fetch_add(1, Relaxed);
                    debug!(
                        unit = job.unit,
                        bytes = self.buf.len(),
                        "frame cut short by silence: framing error"
                    );
                    self.tap.emit(
                        TraceDir::Rx,
                        &self.buf,
                        self.framing.frame_unit(&self.buf),
                        Verdict::FramingError,
                        || format!("frame cut short after {} bytes, discarded", self.buf.len()),
                    );
                    let from_unit = !self.framing.replies_name_unit()
                        || self.framing.frame_unit(&self.buf) == Some(job.unit);
                    self.buf.clear();
                    match (from_unit && trust_garbled).then(|| self.garbled(job)).flatten() {
                        Some(heard) => return Ok(heard),
                        None => continue,
                    }
                }
                Err(_) => {
                    judged_silent = true;
                    true
                }
            };
            loop {
                match self.framing.decode(job.unit, &job.request, &self.buf, silent) {
                    Decoded::Incomplete => break,
                    Decoded::Reply { reply, len } => {
                        let verdict = self.schedule.ledger.judge(key, self.txn, Instant::now());
                        let (tv, tag) = match (&verdict, &reply) {
                            (Judged::Accept { .. }, Ok(_)) => (Verdict::Ok, ""),
                            (Judged::Accept { .. }, Err(_)) => (Verdict::Exception, ""),
                            _ => (Verdict::LateReplyDiscarded, "late, discarded: "),
                        };
                        let frame = &self.buf[..len.min(self.buf.len())];
                        self.tap.emit(TraceDir::Rx, frame, Some(job.unit), tv, || {
                            format!("{tag}{}", describe_reply(job.unit, &reply))
                        });
                        match verdict {
                            Judged::Accept { late } => {
                                if late {
                                    // The retry was held back for it: the same request's answer.
                                    self.stats.late_replies.fetch_add(1, Relaxed);
                                    debug!(
                                        unit = job.unit,
                                        "late reply taken: it answers the request being retried"
                                    );
                                }
                                if len < self.buf.len() {
                                    self.stats.noise_bytes.fetch_add((self.buf.len() - len) as u64, Relaxed);
                                }
                                // The transaction is over: nothing of this window is
                                // left for the next one to judge.
                                self.buf.clear();
                                return Ok(Heard::Reply(reply));
                            }
                            Judged::Late | Judged::Unexpected => {
                                self.stats.late_replies.fetch_add(1, Relaxed);
                                debug!(unit = job.unit, "late reply to an earlier request discarded");
                                self.buf.drain(..len.min(self.buf.len()));
                            }
                        }
                    }
                    Decoded::Skip { len, why } => {
                        let len = len.min(self.buf.len());
                        let late = match why {
                            // The framing knows it for ours (a Modbus-TCP transaction id):
                            // counted, and the ledger left as it is (the id says which
                            // request it answers; its unit's oldest entry may be this one).
                            SkipReason::Late => {
                                self.stats.late_replies.fetch_add(1, Relaxed);
                                debug!(unit = job.unit, "late reply to an earlier request discarded");
                                true
                            }
                            SkipReason::Foreign | SkipReason::Mismatch => {
                                let frame = self.buf[..len].to_vec();
                                self.attribute(&frame)
                            }
                            SkipReason::Crc | SkipReason::Noise => false,
                        };
                        let tv = match why {
                            _ if late => Verdict::LateReplyDiscarded,
                            SkipReason::Crc => Verdict::CrcError,
                            SkipReason::Foreign => Verdict::WrongUnit,
                            SkipReason::Mismatch => Verdict::Mismatch,
                            SkipReason::Noise | SkipReason::Late => Verdict::Noise,
                        };
                        let shown = if why == SkipReason::Crc { self.buf.len() } else { len };
                        self.tap.emit(
                            TraceDir::Rx,
                            &self.buf[..shown],
                            self.framing.frame_unit(&self.buf),
                            tv,
                            || match tv {
                                Verdict::LateReplyDiscarded => {
                                    "late reply to an earlier request, discarded".into()
                                }
                                Verdict::CrcError => "frame with a bad checksum, discarded".into(),
                                Verdict::WrongUnit => {
                                    "frame from another unit or for another function".into()
                                }
                                Verdict::Mismatch => "frame that does not fit the request, discarded".into(),
                                _ => format!("{len} bytes of noise"),
                            },
                        );
                        if why == SkipReason::Crc
                            && trust_garbled
                            && self.framing.frame_unit(&self.buf) == Some(job.unit)
                            && let Some(heard) = self.garbled(job)
                        {
                            self.stats.crc_errors.fetch_add(1, Relaxed);
                            self.stats
                                .noise_bytes
                                .fetch_add(self.buf.len().saturating_sub(1) as u64, Relaxed);
                            self.buf.clear();
                            return Ok(heard);
                        }
                        if !late {
                            let counter = match why {
                                SkipReason::Crc => &self.stats.crc_errors,
                                SkipReason::Foreign | SkipReason::Mismatch => &self.stats.foreign_frames,
                                SkipReason::Noise | SkipReason::Late => &self.stats.noise_bytes,
                            };
                            if why != SkipReason::Noise {
                                debug!(unit = job.unit, ?why, "frame discarded");
                            }
                            counter.fetch_add(if why == SkipReason::Noise { len as u64 } else { 1 }, Relaxed);
                        }
                        self.buf.drain(..len);
                    }
                }
                if self.buf.is_empty() {
                    break;
                }
            }
        }
    }
}

impl Engine {
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

    /// A frame from `job`'s unit arrived unreadable (cut short, or a bad CRC): it is the
    /// unit's reply to its oldest open request. If that is this transaction's, the attempt
    /// is over and the retry may go at once ([`Heard::Garbled`]); if it was an earlier
    /// request's, it was a late reply, counted, and listening goes on (`None`).
    fn garbled(&mut self, job: &Job) -> Option<Heard> {
        match self.schedule.ledger.judge(self.key(job.unit), self.txn, Instant::now()) {
            Judged::Accept { .. } => Some(Heard::Garbled),
            Judged::Late | Judged::Unexpected => {
                self.stats.late_replies.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Takes the echo of our request off the front of the buffer, with `left` of its
    /// bytes still expected; returns how many are still expected. Bytes that are not the
    /// echo end the search for it (the adapter dropped it, or it was garbled): they are
    /// judged as the reply, which rejects them if they are not (`None`).
    fn take_echo(&mut self, left: usize) -> Option<usize> {
        let from = self.out.len() - left;
        let n = left.min(self.buf.len());
        if self.buf[..n] == self.out[from..from + n] {
            self.tap.emit(TraceDir::Rx, &self.buf[..n], None, Verdict::EchoRemoved, || {
                format!("{n} bytes of our own request echoed, taken off")
            });
            self.buf.drain(..n);
            Some(left - n)
        } else {
            debug!("expected the local echo of the request, got other bytes");
            None
        }
    }
}

/// A master's request on the line: its master's in-flight count drops when this does.
struct Running(Arc<PassQueue>);

/// One of several masters' requests on a pipelining bus: its masters' in-flight counts
/// drop when this does.
struct RunningOne(Arc<PassQueue>, crate::bus::pass::MasterId, Vec<crate::bus::pass::MasterId>);

impl Drop for RunningOne {
    fn drop(&mut self) {
        self.0.finish_for(self.1, &self.2);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// What a broadcast "returns": the echo a unit would have sent, so callers see success.
fn broadcast_echo(req: &Request<'_>) -> Response {
    match req {
        Request::WriteSingleCoil(a, v) => Response::WriteSingleCoil(*a, *v),
        Request::WriteSingleRegister(a, v) => Response::WriteSingleRegister(*a, *v),
        Request::WriteMultipleCoils(a, v) => Response::WriteMultipleCoils(*a, v.len() as u16),
        Request::WriteMultipleRegisters(a, v) => Response::WriteMultipleRegisters(*a, v.len() as u16),
        Request::MaskWriteRegister(a, x, y) => Response::MaskWriteRegister(*a, *x, *y),
        _ => Response::Custom(req.function_code().value(), bytes::Bytes::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_that_takes_no_bytes_fails_the_write_after_the_limit() {
        // A pipe with room for 4 bytes whose far end never reads: a device server whose
        // TCP window stays shut.
        let (mut port, _device) = tokio::io::duplex(4);
        let err = write_frame(&mut port, &[0u8; 16], Duration::from_millis(50)).await.expect_err("stuck");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "the port did not take the request within 50ms");
    }
    use crate::bus::Priority;
    use crate::model::Parity;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::oneshot;

    fn line() -> Line {
        Line { baud: 115_200, data_bits: 8, parity: Parity::None, stop_bits: 1 }
    }

    fn job() -> (Job, oneshot::Receiver<Result<Response, BusError>>) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            unit: 1,
            request: Request::ReadHoldingRegisters(0, 1),
            priority: Priority::PassThrough,
            timeout: Duration::from_millis(50),
            turnaround: Duration::ZERO,
            retries: 0,
            reply,
        };
        (job, rx)
    }

    /// A port that opens fine and fails its first I/O (a device server that accepts the
    /// connection and closes it) was reopened at once for every queued job: one open and
    /// one WARN per poll, for ever.
    #[tokio::test]
    async fn a_port_that_fails_right_after_opening_is_reopened_with_back_off() {
        let opens = Arc::new(AtomicUsize::new(0));
        let counted = opens.clone();
        let open = move || {
            counted.fetch_add(1, Relaxed);
            async {
                // The far end is gone: reads see EOF, writes fail.
                let (near, far) = tokio::io::duplex(64);
                drop(far);
                Ok(Opened::from(Box::new(near) as Box<dyn Port>))
            }
        };
        let engine = Engine::new(
            "b".into(),
            line(),
            Box::new(rtu::Rtu),
            8,
            Duration::from_secs(30),
            Arc::new(BusStats::default()),
        );
        let (tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(engine.run(rx, open, shutdown.clone()));
        for _ in 0..20 {
            let (job, reply) = job();
            tx.send(job).await.expect("bus runs");
            let got = reply.await.expect("answered");
            assert!(matches!(got, Err(BusError::PortDown(_))), "{got:?}");
        }
        assert!(opens.load(Relaxed) <= 2, "{} opens for 20 jobs", opens.load(Relaxed));
        shutdown.cancel();
        task.await.expect("bus stops");
    }

    /// One thing the userspace RS-485 fakes saw, and when.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Seen {
        Rts(bool),
        Bytes,
    }

    type Log = Arc<std::sync::Mutex<Vec<(Seen, Instant)>>>;

    /// An RTS line that records each level it is set to.
    struct FakeRts(Log);

    impl crate::serial::rs485::RtsLine for FakeRts {
        fn set_rts(&mut self, asserted: bool) -> std::io::Result<()> {
            self.0.lock().expect("log").push((Seen::Rts(asserted), Instant::now()));
            Ok(())
        }
    }

    /// A port that records when bytes are written to it (or refuses them, when `.2`).
    struct FakePort(tokio::io::DuplexStream, Log, bool);

    impl tokio::io::AsyncRead for FakePort {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for FakePort {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.1.lock().expect("log").push((Seen::Bytes, Instant::now()));
            if self.2 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
            }
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    /// A write that fails (the adapter is gone) still sets RTS back to idle: the
    /// transmitter does not stay on, jamming a line other masters may share.
    #[tokio::test]
    async fn userspace_rts_is_released_when_the_write_fails() {
        let log: Log = Arc::default();
        let mode =
            crate::serial::rs485::Rs485 { mode: crate::serial::rs485::Mode::Rts, ..Default::default() };
        let (near, far) = tokio::io::duplex(512);
        let opened = std::sync::Mutex::new(Some(Opened {
            port: Box::new(FakePort(near, log.clone(), true)),
            rts: Some(Rts {
                line: Box::new(FakeRts(log.clone())),
                levels: mode.rts_levels(),
                delay_before: Duration::ZERO,
                delay_after: Duration::ZERO,
            }),
        }));
        let open = move || {
            let next = opened.lock().expect("once").take();
            async move { next.ok_or_else(|| "opened once".to_string()) }
        };
        let engine =
            Engine::new("b".into(), line(), Box::new(rtu::Rtu), 8, Duration::from_secs(30), Arc::default());
        let (tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(engine.run(rx, open, shutdown.clone()));
        let (job, reply) = job();
        tx.send(job).await.expect("bus runs");
        let got = reply.await.expect("answered");
        assert!(got.is_err(), "the port is gone: {got:?}");
        shutdown.cancel();
        task.await.expect("bus stops");
        drop(far);
        let seen: Vec<Seen> = log.lock().expect("log").iter().map(|(s, _)| *s).collect();
        assert_eq!(seen.first(), Some(&Seen::Rts(true)), "{seen:?}");
        assert_eq!(seen.last(), Some(&Seen::Rts(false)), "released after the failed write: {seen:?}");
    }

    /// Userspace RS-485 (`rs485 = "rts"`, inverted here): RTS goes to its transmit level
    /// `delay_before` ahead of the first byte, and back to idle no earlier than the
    /// request's last bit on the wire plus `delay_after`, before the reply is listened for.
    #[tokio::test]
    async fn userspace_rts_brackets_each_request_with_its_delays() {
        let log: Log = Arc::default();
        let mode = crate::serial::rs485::Rs485 {
            mode: crate::serial::rs485::Mode::Rts,
            invert_rts: true,
            delay_before: Duration::from_micros(1500),
            delay_after: Duration::from_millis(3),
            rx_during_tx: false,
        };
        let (near, far) = tokio::io::duplex(512);
        let opened = std::sync::Mutex::new(Some(Opened {
            port: Box::new(FakePort(near, log.clone(), false)),
            rts: Some(Rts {
                line: Box::new(FakeRts(log.clone())),
                levels: mode.rts_levels(),
                delay_before: mode.delay_before,
                delay_after: mode.delay_after,
            }),
        }));
        let open = move || {
            let next = opened.lock().expect("once").take();
            async move { next.ok_or_else(|| "opened once".to_string()) }
        };
        // 1200 baud: the 8-byte request is 73 ms on the wire, far longer than the write.
        let slow = Line { baud: 1200, ..line() };
        let engine =
            Engine::new("b".into(), slow, Box::new(rtu::Rtu), 8, Duration::from_secs(30), Arc::default());
        let (tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(engine.run(rx, open, shutdown.clone()));
        for _ in 0..2 {
            let (job, reply) = job();
            tx.send(job).await.expect("bus runs");
            let got = reply.await.expect("answered");
            assert!(matches!(got, Err(BusError::Timeout { .. })), "nobody answers: {got:?}");
        }
        shutdown.cancel();
        task.await.expect("bus stops");
        drop(far);
        let log = log.lock().expect("log").clone();
        // Per request: transmit level (low, inverted), the bytes, idle (high).
        let wire = rtu::wire_time(&slow, 8);
        let mut rest = &log[..];
        for _ in 0..2 {
            assert_eq!(rest[0].0, Seen::Rts(false), "transmit level first: {log:?}");
            let on = rest[0].1;
            let bytes: Vec<_> = rest[1..].iter().take_while(|(s, _)| *s == Seen::Bytes).collect();
            assert!(!bytes.is_empty(), "the request follows: {log:?}");
            let (off, off_at) = rest[1 + bytes.len()];
            assert_eq!(off, Seen::Rts(true), "back to idle after the request: {log:?}");
            assert!(bytes[0].1 >= on + mode.delay_before, "first byte {:?} after RTS", bytes[0].1 - on);
            assert!(
                off_at >= on + mode.delay_before + wire + mode.delay_after,
                "RTS released {:?} after it was raised; the request needs {:?} on the wire",
                off_at - on,
                wire
            );
            assert!(off_at >= bytes[bytes.len() - 1].1 + mode.delay_after);
            rest = &rest[2 + bytes.len()..];
        }
        assert!(rest.is_empty(), "nothing else: {log:?}");
    }
}
