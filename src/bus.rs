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
//! reset) is sent once more on a fresh connection before it fails.

pub mod pass;

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::bus::pass::{MasterId, PassQueue, Taken};
use crate::model::{Bus, Line, Parity, Protocol};
use crate::serial::framing::{Decoded, Framing, SkipReason};
use crate::serial::pdu::PduError;
use crate::serial::rtu;

pub mod schedule;

use schedule::{Judged, Key, Ledger};

/// Why a transaction did not produce a response.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The device answered with a Modbus exception (the request was bad, not the line).
    #[error("device answered exception {0:?}")]
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
    /// The serial port is not open (unplugged, or failing to open).
    #[error("serial port is down: {0}")]
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

/// Counters of one bus, readable while it runs.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Transactions completed with a response or exception.
    pub transactions: AtomicU64,
    /// Attempts that got no valid reply in time.
    pub timeouts: AtomicU64,
    /// Frames dropped for a bad CRC.
    pub crc_errors: AtomicU64,
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
    /// Jobs refused because the queue was full.
    pub queue_full: AtomicU64,
    /// Nanoseconds the line was busy with transactions.
    pub busy_ns: AtomicU64,
    /// Masters' reads answered by another master's identical read (bus/pass.rs).
    pub shared_answers: AtomicU64,
}

/// A cheap handle to a running bus task.
#[derive(Debug, Clone)]
pub struct BusHandle {
    name: Arc<str>,
    tx: mpsc::Sender<Job>,
    pass: Arc<PassQueue>,
    stats: Arc<BusStats>,
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

/// Something a bus can talk through: a serial port, or a TCP connection to a serial
/// device server.
pub trait Port: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Port for T {}

/// Pass-through transactions that may run in a row while a poll waits.
pub const PASS_THROUGH_STREAK: u32 = 2;

/// Longest wait for a serial device server to accept a TCP connection.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a bus port: `tcp://host:port` connects to a serial device server,
/// `modbus-tcp://host:port` to a Modbus-TCP device, anything else is a serial device
/// path ([`open_serial`]).
pub async fn open_port(port: &str, line: &Line) -> Result<Box<dyn Port>, String> {
    let Some(addr) = port.strip_prefix("tcp://").or_else(|| port.strip_prefix("modbus-tcp://")) else {
        return open_serial(port, line);
    };
    match tokio::time::timeout(TCP_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Requests are small and latency is the line's budget: no Nagle delay.
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as Box<dyn Port>)
        }
        Ok(Err(e)) => Err(format!("{port}: {e}")),
        Err(_) => Err(format!("{port}: no connection within {TCP_CONNECT_TIMEOUT:?}")),
    }
}

/// Opens the serial port at `path` with the line settings, by path every time, so a
/// re-plugged adapter (or a re-pointed `/dev/serial/by-id` link) is found again.
pub fn open_serial(path: &str, line: &Line) -> Result<Box<dyn Port>, String> {
    let parity = match line.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let data_bits =
        if line.data_bits == 7 { tokio_serial::DataBits::Seven } else { tokio_serial::DataBits::Eight };
    let stop_bits =
        if line.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One };
    let port = tokio_serial::new(path, line.baud)
        .parity(parity)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None);
    tokio_serial::SerialStream::open(&port)
        .map(|s| Box::new(s) as Box<dyn Port>)
        .map_err(|e| format!("{path}: {e}"))
}

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
            // Kernel RS-485 mode first: a port that refuses it is not driven at all.
            if let Some(mode) = rs485 {
                mode.apply(&port)?;
            }
            open_port(&port, &line).await
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
    let engine =
        Engine::new(bus.name.clone(), bus.line, framing, bus.queue_depth, bus.reopen_max, stats.clone())
            .with_frame_gap(bus.frame_gap)
            .with_local_echo(bus.local_echo)
            .with_silence(silence)
            .with_tcp_device(bus.protocol == Protocol::ModbusTcp);
    let handle = BusHandle { name: Arc::from(bus.name.as_str()), tx, pass: engine.pass_queue(), stats };
    tracker.spawn(engine.run(rx, opener, shutdown));
    handle
}

/// Heap entry: priority, then submission order.
struct Queued {
    priority: Priority,
    seq: u64,
    job: Job,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    // BinaryHeap pops the greatest: reverse so the lowest (priority, seq) comes first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.priority, other.seq).cmp(&(self.priority, self.seq))
    }
}

/// The bus task's state: the line timing and counters; the port comes and goes.
pub struct Engine {
    name: String,
    line: Line,
    framing: Box<dyn Framing>,
    depth: usize,
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
    /// When the line last carried a byte (ours or anyone's).
    last_activity: Instant,
    /// Requests sent and not answered yet, per unit: what a late reply may still answer.
    ledger: Ledger<(u8, Request<'static>)>,
    /// The number of the transaction on the line (attempts of one job share it).
    txn: u64,
    buf: Vec<u8>,
    /// Bytes heard outside a transaction's window (while idle, or before a request).
    stray: Vec<u8>,
    out: Vec<u8>,
}

enum Attempt {
    Done(Result<Response, ExceptionCode>),
    NoReply,
}

/// What ended an idle wait.
enum Woke {
    Job(Option<Job>),
    Other,
    Shutdown,
    Read(std::io::Result<usize>),
}

/// The port and its reopen back-off.
struct Line0 {
    port: Option<Box<dyn Port>>,
    backoff: Duration,
    next_open: Instant,
    last_error: String,
    /// The open port has carried a transaction (whatever the device said): a port that
    /// fails before that is flapping (accepts the open, fails the I/O) and is reopened
    /// with back-off, not at the poll rate.
    proven: bool,
}

impl Line0 {
    /// The port failed: drop it and schedule the reopen.
    fn failed(&mut self, e: String, reopen_max: Duration) {
        if self.proven {
            warn!(error = %e, "serial port failed; reopening");
            self.next_open = Instant::now();
        } else {
            if e != self.last_error {
                warn!(error = %e, retry_in = ?self.backoff, "serial port fails as soon as it is open; reopening with back-off");
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
        Self {
            name,
            line,
            framing,
            depth: depth.max(1),
            reopen_max,
            stats,
            pass: Arc::default(),
            t35: rtu::t35(&line),
            gap: rtu::t35(&line),
            local_echo: false,
            tcp_device: false,
            last_activity: Instant::now(),
            ledger: Ledger::default(),
            txn: 0,
            buf: Vec::with_capacity(512),
            stray: Vec::with_capacity(512),
            out: Vec::with_capacity(260),
        }
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

    /// Keeps at least `silence` of line silence where the gaps are shorter: before each
    /// request, and as the end of a frame for framings that end frames with silence (raw
    /// devices with `end = "silence"` behind USB adapters that deliver bytes in bursts).
    pub fn with_silence(mut self, silence: Duration) -> Self {
        self.t35 = self.t35.max(silence);
        self.gap = self.gap.max(silence);
        self
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
        O: std::future::Future<Output = Result<Box<dyn Port>, String>> + Send,
    {
        let mut heap = BinaryHeap::new();
        let mut seq = 0u64;
        let mut line = Line0 {
            port: None,
            backoff: Duration::from_millis(100),
            next_open: Instant::now(),
            last_error: String::from("not opened yet"),
            proven: false,
        };
        let mut pass_streak = 0u32;
        let mut scratch = [0u8; 256];
        loop {
            if line.port.is_none() && Instant::now() >= line.next_open {
                let opened = tokio::select! {
                    // Cancel-safe: an open abandoned half-way (a TCP connect) is dropped.
                    r = open() => r,
                    () = shutdown.cancelled() => break,
                };
                match opened {
                    Ok(p) => {
                        self.stats.opens.fetch_add(1, Relaxed);
                        info!("serial port open");
                        line.port = Some(p);
                        line.proven = false;
                        self.last_activity = Instant::now();
                    }
                    Err(e) => {
                        if e != line.last_error {
                            warn!(error = %e, retry_in = ?line.backoff, "cannot open serial port");
                        }
                        line.last_error = e;
                        line.next_open = Instant::now() + line.backoff;
                        line.backoff = (line.backoff * 2).min(self.reopen_max);
                    }
                }
            }
            // Take what is waiting, up to the bound, so priorities can act on it.
            while heap.len() < self.depth {
                match rx.try_recv() {
                    Ok(job) => {
                        seq += 1;
                        heap.push(Queued { priority: job.priority, seq, job });
                    }
                    Err(_) => break,
                }
            }
            // A unit whose earlier request may still be answered (late) gets nothing new
            // until that reply is heard or can no longer come; the other units are served
            // meanwhile (all of them are held on a bus whose replies name no unit).
            let now = Instant::now();
            self.ledger.expire(now);
            let addressed = self.framing.replies_name_unit();
            let ledger = &self.ledger;
            let held = |unit: u8| ledger.pending(addressed.then_some(unit)) > 0;
            let mut kept = Vec::new();
            let mut picked = None;
            while let Some(q) = heap.pop() {
                if held(q.job.unit) {
                    kept.push(q);
                } else {
                    picked = Some(q);
                    break;
                }
            }
            heap.extend(kept);
            if pass_streak >= PASS_THROUGH_STREAK
                && picked.as_ref().is_some_and(|q| q.priority == Priority::PassThrough)
                && let Some(poll) = take_poll(&mut heap, &held)
            {
                heap.extend(picked.replace(poll));
            }
            // Masters' requests come after writes and before polls, except that a poll
            // that has waited behind a streak of pass-through transactions goes first.
            let masters_turn = match &picked {
                None => true,
                Some(q) => matches!(q.priority, Priority::Poll { .. }) && pass_streak < PASS_THROUGH_STREAK,
            };
            let from_master = if masters_turn { self.pass.take(|unit| !held(unit)) } else { None };
            let (taken, master) = match (from_master, picked) {
                (Some(taken), picked) => {
                    heap.extend(picked);
                    (taken, true)
                }
                (None, Some(q)) => (Taken { job: q.job, shared: Vec::new() }, false),
                (None, None) => {
                    // Idle: wait for work, shutdown, the next reopen attempt or a unit's
                    // release; listen while a late reply may still come, so it frees its
                    // unit as soon as it is heard.
                    let down = line.port.is_none();
                    let release = self.ledger.next_expiry();
                    let next_open = line.next_open;
                    let reopen = async move {
                        match (down, release) {
                            (true, Some(r)) => sleep_until(next_open.min(r)).await,
                            (true, None) => sleep_until(next_open).await,
                            (false, Some(r)) => sleep_until(r).await,
                            (false, None) => std::future::pending().await,
                        }
                    };
                    let listening = self.ledger.any_pending();
                    let read = async {
                        match line.port.as_mut() {
                            Some(p) if listening => p.read(&mut scratch).await,
                            _ => std::future::pending().await,
                        }
                    };
                    let woke = tokio::select! {
                        // Cancel-safe: a job not yet received stays in the channel.
                        job = rx.recv() => Woke::Job(job),
                        // Cancel-safe: a notification not taken is kept for the next wait.
                        () = self.pass.arrived() => Woke::Other,
                        () = shutdown.cancelled() => Woke::Shutdown,
                        () = reopen => Woke::Other,
                        // Cancel-safe: `read` is; bytes read are handled below.
                        r = read => Woke::Read(r),
                    };
                    match woke {
                        Woke::Job(Some(job)) => {
                            seq += 1;
                            heap.push(Queued { priority: job.priority, seq, job });
                        }
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
            pass_streak = if job.priority == Priority::PassThrough { pass_streak + 1 } else { 0 };
            let Some(p) = line.port.as_mut() else {
                taken.answer(Err(BusError::PortDown(line.last_error.clone())));
                continue;
            };
            let started = Instant::now();
            let mut outcome = self.transaction(p.as_mut(), job).await;
            // A reply cut off by the deadline may be finished by the idle listening.
            self.stray.append(&mut self.buf);
            if let (Err(e), true, true) = (&outcome, line.proven, self.tcp_device) {
                // Devices close idle connections; that is not the request's fault.
                debug!(error = %e, "connection lost; reconnecting to send the request again");
                if let Ok(fresh) = open().await {
                    self.stats.opens.fetch_add(1, Relaxed);
                    *p = fresh;
                    self.last_activity = Instant::now();
                    // What the old connection left behind is not this connection's.
                    self.stray.clear();
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
            while let Some(until) = self.ledger.blocked_until(key, Instant::now()) {
                if let Some(reply) = self.listen(port, job, until, 0).await? {
                    return Ok(self.done(job, reply));
                }
            }
            match self.attempt(port, job).await? {
                Attempt::Done(reply) => return Ok(self.done(job, reply)),
                Attempt::NoReply if job.unit == 0 => return Ok(Ok(broadcast_echo(&job.request))),
                Attempt::NoReply => {
                    self.stats.timeouts.fetch_add(1, Relaxed);
                    debug!(unit = job.unit, attempt, "no valid reply");
                }
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
                () = sleep_until_precise(quiet_at) => continue,
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
            for (key, e) in self.ledger.candidates(now) {
                any = true;
                match self.framing.decode(e.what.0, &e.what.1, &self.stray, silent) {
                    Decoded::Reply { len, .. } => {
                        hit = Some((key, len));
                        break;
                    }
                    Decoded::Incomplete => waiting = true,
                    Decoded::Skip { len, .. } => skip = skip.min(len.max(1)),
                }
            }
            if let Some((key, len)) = hit {
                self.ledger.stray(key, now);
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
            self.stray.drain(..n);
        }
    }

    /// True when `frame` (already cut out of the line) is the reply to the oldest open
    /// request of some unit other than the transaction's: a late reply, which answers that
    /// request in the ledger.
    fn attribute(&mut self, frame: &[u8]) -> bool {
        let now = Instant::now();
        let hit = self.ledger.candidates(now).find_map(|(key, e)| {
            matches!(self.framing.decode(e.what.0, &e.what.1, frame, true), Decoded::Reply { len, .. } if len == frame.len())
                .then_some(key)
        });
        match hit {
            Some(key) => {
                self.ledger.stray(key, now);
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
        let write_start = Instant::now();
        port.write_all(&self.out).await?;
        let written = Instant::now();
        // The request has left the UART when its last character is on the wire.
        let wire = if self.tcp_device { Duration::ZERO } else { rtu::wire_time(&self.line, self.out.len()) };
        let drained = written.max(write_start + wire);
        self.last_activity = drained;
        debug!(unit = job.unit, request = ?job.request, "sent");
        if job.unit == 0 {
            // Broadcast: nobody answers; give the devices their turnaround to act.
            sleep_until(drained + self.gap + job.turnaround).await;
            return Ok(Attempt::NoReply);
        }
        self.ledger.sent(self.key(job.unit), self.txn, job.timeout, (job.unit, job.request.clone()), drained);
        // Bytes of our own echo still to come (and to take off).
        let echo = if self.local_echo { self.out.len() } else { 0 };
        Ok(match self.listen(port, job, drained + job.timeout, echo).await? {
            Some(reply) => Attempt::Done(reply),
            None => Attempt::NoReply,
        })
    }

    /// Listens for the reply to `job` until `deadline`, with `echo` bytes of our own
    /// request to take off first; what is in the buffer already (the part of a reply the
    /// attempt before heard) counts. `Some` is the answer (accepted by the ledger: nothing
    /// sent earlier to the unit can still be answered); `None`, no answer in time.
    async fn listen(
        &mut self,
        port: &mut dyn Port,
        job: &Job,
        deadline: Instant,
        mut echo: usize,
    ) -> std::io::Result<Option<Result<Response, ExceptionCode>>> {
        let key = self.key(job.unit);
        let mut scratch = [0u8; 256];
        // The buffer as it stands has been judged at a silence already: judging it again
        // before new bytes arrive cannot change the verdict (and, with the silence in the
        // past, would spin on the CPU while a slow adapter delivers the rest of a frame).
        let mut judged_silent = false;
        loop {
            // Frames we cannot length end at a t3.5 silence.
            let silence_at = (!self.buf.is_empty() && !judged_silent).then(|| self.last_activity + self.t35);
            let wake = silence_at.map_or(deadline, |s| s.min(deadline));
            let silent = match timeout_at(wake, port.read(&mut scratch)).await {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(n)) => {
                    self.last_activity = Instant::now();
                    self.buf.extend_from_slice(&scratch[..n]);
                    judged_silent = false;
                    if echo > 0 {
                        echo = self.take_echo(echo);
                        if echo > 0 || self.buf.is_empty() {
                            continue;
                        }
                    }
                    false
                }
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => return Ok(None),
                Err(_) => {
                    judged_silent = true;
                    true
                }
            };
            loop {
                match self.framing.decode(job.unit, &job.request, &self.buf, silent) {
                    Decoded::Incomplete => break,
                    Decoded::Reply { reply, len } => {
                        match self.ledger.judge(key, self.txn, Instant::now()) {
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
                                return Ok(Some(reply));
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
                        let late = matches!(why, SkipReason::Foreign | SkipReason::Mismatch) && {
                            let frame = self.buf[..len].to_vec();
                            self.attribute(&frame)
                        };
                        if !late {
                            let counter = match why {
                                SkipReason::Crc => &self.stats.crc_errors,
                                SkipReason::Foreign | SkipReason::Mismatch => &self.stats.foreign_frames,
                                SkipReason::Noise => &self.stats.noise_bytes,
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
    /// Takes the echo of our request off the front of the buffer, with `left` of its
    /// bytes still expected; returns how many are still expected. Bytes that are not the
    /// echo end the search for it (the adapter dropped it, or it was garbled): they are
    /// judged as the reply, which rejects them if they are not.
    fn take_echo(&mut self, left: usize) -> usize {
        let from = self.out.len() - left;
        let n = left.min(self.buf.len());
        if self.buf[..n] == self.out[from..from + n] {
            self.buf.drain(..n);
            left - n
        } else {
            debug!("expected the local echo of the request, got other bytes");
            0
        }
    }
}

/// A master's request on the line: its master's in-flight count drops when this does.
struct Running(Arc<PassQueue>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Takes the most urgent poll out of `heap` whose unit is not held back, if any.
fn take_poll(heap: &mut BinaryHeap<Queued>, held: &impl Fn(u8) -> bool) -> Option<Queued> {
    let mut items = std::mem::take(heap).into_vec();
    let best = items
        .iter()
        .enumerate()
        .filter(|(_, q)| matches!(q.priority, Priority::Poll { .. }) && !held(q.job.unit))
        .max_by(|a, b| a.1.cmp(b.1))
        .map(|(i, _)| i);
    let poll = best.map(|i| items.swap_remove(i));
    *heap = BinaryHeap::from(items);
    poll
}

/// Sleeps until `deadline`, accurate to tens of microseconds. tokio's timer wakes on 1 ms
/// ticks, rounded up, which on a fast line is as long as the silences being timed (t3.5 is
/// 1.75 ms above 19200 baud). A one-shot Linux timerfd, registered with tokio's reactor,
/// fires on the kernel's high-resolution clock instead: no thread and no spinning, so 64
/// busy buses cost no more CPU than one. Never wakes early; cancel-safe (dropping it
/// closes the timer). Falls back to the tokio timer if a timerfd cannot be made.
pub async fn sleep_until_precise(deadline: Instant) {
    if deadline <= Instant::now() {
        return;
    }
    if let Err(e) = timerfd_sleep(deadline).await {
        debug!(error = %e, "no timerfd; using the 1 ms timer");
        sleep_until(deadline).await;
    }
}

async fn timerfd_sleep(deadline: Instant) -> std::io::Result<()> {
    use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(());
    }
    let flags = TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC;
    let fd = rustix::time::timerfd_create(TimerfdClockId::Monotonic, flags)?;
    let it_value = Timespec::try_from(left).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value };
    rustix::time::timerfd_settime(&fd, TimerfdTimerFlags::empty(), &spec)?;
    #[expect(
        deprecated,
        reason = "the safe constructor is deprecated because an arbitrary AsRawFd may swap or close \
                  its fd; an OwnedFd cannot, which is the I/O-safety the unsafe replacement asks for"
    )]
    let fd = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
    // Readable means expired: the expiry count itself is not needed.
    let _expired = fd.readable().await?;
    Ok(())
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

/// One-line health summary of a bus, for the periodic info log.
pub fn summary(stats: &BusStats, since: &BusStats, elapsed: Duration) -> String {
    let d = |a: &AtomicU64, b: &AtomicU64| a.load(Relaxed).saturating_sub(b.load(Relaxed));
    let tx = d(&stats.transactions, &since.transactions);
    let secs = elapsed.as_secs_f64().max(1e-9);
    let shared = d(&stats.shared_answers, &since.shared_answers);
    format!(
        "{tx} transactions ({:.1}/s), {} timeouts, {} late replies, {} crc errors, {} foreign frames, {} exceptions, line busy {:.1}%{}",
        tx as f64 / secs,
        d(&stats.timeouts, &since.timeouts),
        d(&stats.late_replies, &since.late_replies),
        d(&stats.crc_errors, &since.crc_errors),
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
            foreign_frames: c(&self.foreign_frames),
            noise_bytes: c(&self.noise_bytes),
            exceptions: c(&self.exceptions),
            opens: c(&self.opens),
            queue_full: c(&self.queue_full),
            busy_ns: c(&self.busy_ns),
            shared_answers: c(&self.shared_answers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

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
                Ok(Box::new(near) as Box<dyn Port>)
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
}
