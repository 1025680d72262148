//! One serial line, owned by one task: the queue of transactions (polls, writes,
//! pass-through), their priorities, the line timing, retries, and reopening a port that
//! went away.
//!
//! Invariants:
//! - exactly one transaction is on the line at a time, and a transaction is never
//!   cancelled half-way (shutdown is checked between transactions);
//! - before each request the line has been silent for the bus's frame gap (t3.5 unless
//!   configured) since the last byte seen; anything heard by then is stale and discarded;
//! - bytes that arrive before our request has been written cannot be its reply and are
//!   discarded; the response timeout runs from the moment the request has left the UART;
//! - on a bus with `local_echo`, the request's own bytes are taken off the front of what
//!   comes back before the reply is looked for: our FC5/6 request is byte for byte a
//!   valid reply, and must never be taken for the device's confirmation;
//! - a reply from another unit or for another function, or with a bad CRC, is discarded
//!   while the timeout keeps running — it is never returned as data;
//! - nothing is sent to a unit while a request sent to it earlier can still be answered
//!   (the late-reply ledger, [`schedule::Ledger`]): not the retry, not the next job; a
//!   reply is taken only when every request still open for its unit is the running
//!   transaction's. Late replies are counted (`late_replies`);
//! - the queue is bounded: a full queue refuses new work (`BusError::QueueFull`) instead
//!   of growing;
//! - masters cannot starve the polls: after [`PASS_THROUGH_STREAK`] pass-through
//!   transactions in a row, a waiting poll (polls are queued only once due) runs next.
//!
//! A port `tcp://host:port` is a serial device server (Moxa NPort, ser2net) carrying the
//! same RTU frames over TCP: the same engine, timing and reopen back-off apply. A port
//! `modbus-tcp://host:port` is a Modbus-TCP device (`serial::mbap` frames it): the same
//! engine, with no line timing (no wire time, frame gap 0 by default), and a request
//! whose connection turns out to be lost (a device that closed an idle connection, a
//! reset) is sent once more on a fresh connection before it fails. A modbus-tcp bus with
//! `max_in_flight` > 1 is the one exception to "one transaction at a time": its task
//! keeps up to that many requests outstanding on the connection, matched by transaction
//! id (`engine/pipelined.rs`, `inflight.rs`).

pub mod pass;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

use crate::bus::pass::{MasterId, PassQueue};
use crate::model::{Bus, Protocol};
use crate::serial::framing::Framing;
use crate::serial::pdu::PduError;
use crate::serial::rtu;

pub use crate::serial::line::Port;
use crate::serial::line::{PortKind, open_port};
use crate::serial::rs485::Mode;

pub mod engine;
pub mod inflight;
pub mod schedule;
pub mod trace;

pub use engine::{Engine, Opened};
pub use trace::{TraceDir, TraceEvent, Verdict};

/// Why a transaction did not produce a response.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The device answered with a Modbus exception (the request was bad, not the line).
    #[error("device answered exception {}", crate::serial::pdu::exception_text(u8::from(*.0)))]
    Exception(ExceptionCode),
    /// No valid reply within the timeout, after every retry.
    #[error("no valid reply after {attempts} attempt(s)")]
    Timeout {
        /// Attempts made.
        attempts: u8,
    },
    /// The bus queue is full; the transaction was not queued.
    #[error("bus queue full")]
    QueueFull,
    /// The bus's port is not open (a serial port unplugged or failing to open, a
    /// connection refused or lost).
    #[error("bus port is down: {0}")]
    PortDown(String),
    /// The request cannot be encoded.
    #[error("invalid request: {0}")]
    Invalid(#[from] PduError),
    /// The bus task has stopped.
    #[error("bus is shut down")]
    Closed,
}

/// Scheduling class of a transaction; lower runs first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Writes (operator or peer commands) before anything else.
    Write,
    /// Requests passed through from a master, answered while it waits.
    PassThrough,
    /// Polls, earliest deadline first: a fast poll's deadline comes sooner, and a slow
    /// poll's deadline still arrives, so neither starves.
    Poll {
        /// When this poll should have completed.
        deadline: Instant,
    },
}

/// One request for a unit on this bus, with how to run it.
#[derive(Debug)]
pub struct Job {
    /// Unit id (0 = broadcast: sent, never answered).
    pub unit: u8,
    /// The request PDU.
    pub request: Request<'static>,
    /// Scheduling class.
    pub priority: Priority,
    /// Response timeout.
    pub timeout: Duration,
    /// Extra pause before sending, for devices that need a longer turnaround.
    pub turnaround: Duration,
    /// Retries after a timeout or corrupt reply.
    pub retries: u8,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<Response, BusError>>,
}

/// Counters of one bus, readable while it runs (Relaxed atomics: each is exact on its
/// own; a set read together is a near-instant snapshot, good for rates and logs).
#[derive(Debug, Default)]
pub struct BusStats {
    /// Transactions completed with a response or exception.
    pub transactions: AtomicU64,
    /// Attempts that got no valid reply in time.
    pub timeouts: AtomicU64,
    /// Frames dropped for a bad CRC (or LRC / checksum).
    pub crc_errors: AtomicU64,
    /// Replies cut short: a frame of known length followed by a t3.5 silence before it
    /// was complete (a byte lost on the line). The attempt fails at once.
    pub framing_errors: AtomicU64,
    /// Replies that came after their request's timeout. They are discarded, except one
    /// that answers the very request being retried (nothing else was sent to its unit
    /// meanwhile); a late reply is never taken as the answer to another request.
    pub late_replies: AtomicU64,
    /// Valid frames from other units / functions, or not matching the request.
    pub foreign_frames: AtomicU64,
    /// Bytes discarded as noise or stale input.
    pub noise_bytes: AtomicU64,
    /// Exception replies.
    pub exceptions: AtomicU64,
    /// Times the port was (re)opened.
    pub opens: AtomicU64,
    /// Times opening the port was tried (successes and failures).
    pub open_attempts: AtomicU64,
    /// Jobs refused because the queue was full.
    pub queue_full: AtomicU64,
    /// Nanoseconds the line was busy with transactions.
    pub busy_ns: AtomicU64,
    /// Masters' reads answered by another master's identical read (pass.rs).
    pub shared_answers: AtomicU64,
    /// Jobs waiting for the line now (polls, writes and masters' requests; a gauge the
    /// engine updates each time it picks the next transaction).
    pub queue_depth: AtomicUsize,
}

/// A cheap handle to a running bus task.
#[derive(Debug, Clone)]
pub struct BusHandle {
    name: Arc<str>,
    tx: mpsc::Sender<Job>,
    pass: Arc<PassQueue>,
    stats: Arc<BusStats>,
    tap: trace::Tap,
}

impl BusHandle {
    /// The bus name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bus counters.
    pub fn stats(&self) -> &BusStats {
        &self.stats
    }

    /// Subscribes to the bus traffic: every frame sent or heard from now on, with its
    /// verdict ([`TraceEvent`]). Costs the bus nothing while nobody subscribes; a
    /// subscriber that falls more than [`trace::TRACE_CAPACITY`] events behind loses the
    /// oldest (`RecvError::Lagged`), the bus never waits for it.
    pub fn trace(&self) -> tokio::sync::broadcast::Receiver<TraceEvent> {
        self.tap.subscribe()
    }

    /// Transactions queued for the bus task and not yet taken (polls and writes; a
    /// master's pass-through requests wait in their own queue).
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues a job; refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), BusError> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.stats.queue_full.fetch_add(1, Relaxed);
                BusError::QueueFull
            }
            mpsc::error::TrySendError::Closed(_) => BusError::Closed,
        })
    }

    /// Queues a Modbus-TCP master's request (`job.priority` is taken as pass-through):
    /// masters are served in turn, each with at most `max_in_flight` requests waiting or
    /// running on this bus (bus/pass.rs); refuses at once when that is exceeded.
    pub fn pass_through(&self, master: MasterId, job: Job, max_in_flight: usize) -> Result<(), BusError> {
        self.pass.submit(master, job, max_in_flight)
    }

    /// Runs one request and waits for its outcome.
    pub async fn transact(
        &self,
        unit: u8,
        request: Request<'static>,
        priority: Priority,
        timeout: Duration,
        retries: u8,
    ) -> Result<Response, BusError> {
        let (reply, rx) = oneshot::channel();
        let turnaround = Duration::ZERO;
        self.submit(Job { unit, request, priority, timeout, turnaround, retries, reply })?;
        rx.await.unwrap_or(Err(BusError::Closed))
    }
}

/// Pass-through transactions that may run in a row while a poll waits.
pub const PASS_THROUGH_STREAK: u32 = 2;

/// Starts the task that owns `bus`'s line and returns its handle. The task stops when
/// `shutdown` is cancelled (after the transaction in flight) or every handle is dropped.
pub fn spawn(bus: &Bus, shutdown: CancellationToken, tracker: &tokio_util::task::TaskTracker) -> BusHandle {
    let (tx, rx) = mpsc::channel(bus.queue_depth.max(1));
    let stats = Arc::new(BusStats::default());
    let port = bus.port.clone();
    let line = bus.line;
    let rs485 = bus.rs485;
    let opener = move || {
        let port = port.clone();
        async move {
            // RS-485 direction control first: a port that refuses it is not driven at all
            // (and RTS is taken before the traffic handle locks the port).
            let rts = match rs485 {
                Some(mode) if mode.mode == Mode::Rts => Some(mode.open_rts(&port)?),
                Some(mode) => {
                    mode.apply(&port)?;
                    None
                }
                None => None,
            };
            Ok(Opened { port: open_port(&port, &line).await?, rts })
        }
    };
    let framing: Box<dyn Framing> = match bus.protocol {
        Protocol::ModbusRtu => Box::new(rtu::Rtu),
        Protocol::ModbusAscii => Box::new(crate::serial::ascii::Ascii),
        Protocol::ModbusTcp => Box::new(crate::serial::mbap::Mbap::default()),
        Protocol::Raw => Box::new(crate::serial::raw::RawBusFraming::new(
            bus.raw_devices.iter().map(|d| (d.id, d.framing.clone())).collect(),
        )),
    };
    let silence = bus.raw_devices.iter().map(|d| d.silence).max().unwrap_or_default();
    let port_kind = PortKind::of(&bus.port);
    let engine =
        Engine::new(bus.name.clone(), bus.line, framing, bus.queue_depth, bus.reopen_max, stats.clone())
            .with_frame_gap(bus.frame_gap)
            .with_local_echo(bus.local_echo)
            .with_silence(silence)
            .with_burst_gap(if port_kind.is_tcp() { engine::TCP_BURST_GAP } else { engine::BURST_GAP })
            .with_tcp_device(bus.protocol == Protocol::ModbusTcp)
            .with_port_kind(port_kind)
            .with_max_in_flight(bus.max_in_flight);
    let handle = BusHandle {
        name: Arc::from(bus.name.as_str()),
        tx,
        pass: engine.pass_queue(),
        stats,
        tap: engine.tap(),
    };
    tracker.spawn(engine.run(rx, opener, shutdown));
    handle
}

/// One-line health summary of a bus, for the periodic info log.
pub fn summary(stats: &BusStats, since: &BusStats, elapsed: Duration) -> String {
    let d = |a: &AtomicU64, b: &AtomicU64| a.load(Relaxed).saturating_sub(b.load(Relaxed));
    let tx = d(&stats.transactions, &since.transactions);
    let secs = elapsed.as_secs_f64().max(1e-9);
    let shared = d(&stats.shared_answers, &since.shared_answers);
    format!(
        "{tx} transactions ({:.1}/s), {} timeouts, {} late replies, {} crc errors, {} framing errors, {} foreign frames, {} exceptions, line busy {:.1}%{}",
        tx as f64 / secs,
        d(&stats.timeouts, &since.timeouts),
        d(&stats.late_replies, &since.late_replies),
        d(&stats.crc_errors, &since.crc_errors),
        d(&stats.framing_errors, &since.framing_errors),
        d(&stats.foreign_frames, &since.foreign_frames),
        d(&stats.exceptions, &since.exceptions),
        d(&stats.busy_ns, &since.busy_ns) as f64 / 1e9 / secs * 100.0,
        if shared > 0 {
            format!(", {shared} masters' reads answered by a shared read")
        } else {
            String::new()
        },
    )
}

impl BusStats {
    /// A copy of the counters as they are now.
    pub fn snapshot(&self) -> BusStats {
        let c = |a: &AtomicU64| AtomicU64::new(a.load(Relaxed));
        BusStats {
            transactions: c(&self.transactions),
            timeouts: c(&self.timeouts),
            crc_errors: c(&self.crc_errors),
            late_replies: c(&self.late_replies),
            framing_errors: c(&self.framing_errors),
            queue_depth: AtomicUsize::new(self.queue_depth.load(Relaxed)),
            foreign_frames: c(&self.foreign_frames),
            noise_bytes: c(&self.noise_bytes),
            exceptions: c(&self.exceptions),
            opens: c(&self.opens),
            open_attempts: c(&self.open_attempts),
            queue_full: c(&self.queue_full),
            busy_ns: c(&self.busy_ns),
            shared_answers: c(&self.shared_answers),
        }
    }
}
