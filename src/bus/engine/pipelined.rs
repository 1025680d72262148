//! The bus task's loop for a Modbus-TCP device that pipelines (`max_in_flight` > 1): one
//! task still owns the connection, and keeps up to `max_in_flight` requests outstanding
//! on it, matched to their replies by MBAP transaction id ([`InFlight`], sans-I/O).
//!
//! Invariants:
//! - what runs next is chosen by the same [`Schedule`](super::Schedule) as on a line
//!   (writes first, masters in turn, a waiting poll after a streak of masters), whenever a
//!   slot is free; a unit with a write outstanding gets nothing more until it is answered;
//! - a reply is taken only for the open request whose id and unit it carries, and only if
//!   it fits that request's function; anything else is counted (late, foreign, noise) and
//!   discarded, never data;
//! - each request times out on its own and is resent under its id while retries last;
//! - a lost connection fails every open request (`BusError::Timeout`: the master gets
//!   0x0B, a poll marks its points failed) and the bus reconnects with back-off;
//! - at shutdown, open requests get `BusError::Closed`; every job taken gets exactly one
//!   outcome.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_modbus::{ExceptionCode, Response};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use super::Engine;
use super::port::{Opened, PortSlot, write_frame};
use crate::bus::inflight::{Expired, InFlight, Lookup, Open};
use crate::bus::pass::Taken;
use crate::bus::trace::{TraceDir, Verdict, describe_reply, describe_request};
use crate::bus::{BusError, Job};
use crate::serial::framing::Decoded;
use crate::serial::mbap;

/// A request on the connection: who waits for it (holding its masters' in-flight slots
/// until answered: [`Taken::answer`]), and its frame (for a resend).
struct Flight {
    taken: Taken,
    frame: Vec<u8>,
}

impl Flight {
    /// Sends `outcome` to everyone waiting, the masters' slots freed first.
    fn answer(self, outcome: Result<Response, BusError>) {
        self.taken.answer(outcome);
    }
}

/// What woke the loop.
enum Woke {
    Job(Option<Job>),
    Other,
    Shutdown,
    Read(std::io::Result<usize>),
}

impl Engine {
    /// Runs until shutdown, pipelining up to `max_in_flight` requests on the connection.
    #[instrument(name = "bus", skip_all, fields(bus = %self.name))]
    pub(super) async fn run_pipelined<F, O>(
        mut self,
        mut rx: mpsc::Receiver<Job>,
        open: F,
        shutdown: CancellationToken,
    ) where
        F: Fn() -> O + Send,
        O: std::future::Future<Output = Result<Opened, String>> + Send,
    {
        let mut line = PortSlot::new(self.port_kind);
        let mut flights: InFlight<Flight> = InFlight::new(self.max_in_flight);
        let mut scratch = [0u8; 1024];
        let mut busy_since: Option<Instant> = None;
        info!(max_in_flight = self.max_in_flight, "pipelining requests on the connection");
        loop {
            match self.open_when_due(&mut line, &open, &shutdown).await {
                None => break,
                Some(true) => self.buf.clear(),
                Some(false) => {}
            }
            self.take_waiting(&mut rx);
            // Fill the free slots.
            while flights.has_room() {
                let now = Instant::now();
                let Some(taken) = self.schedule.next_where(now, &self.pass, |u| flights.ready(u)) else {
                    break;
                };
                if taken.abandoned() {
                    continue;
                }
                self.schedule.ran(taken.job.priority);
                let Some(port) = line.port.as_mut() else {
                    taken.answer(Err(BusError::PortDown(line.last_error.clone())));
                    continue;
                };
                let job = &taken.job;
                let exclusive = !crate::bus::pass::is_read(&job.request);
                let mut frame = Vec::with_capacity(260);
                // The id is only known once the slot is taken: encode with a placeholder
                // id, then write the real one in.
                if let Err(e) = mbap::encode_with_id(0, job.unit, &job.request, &mut frame) {
                    taken.answer(Err(BusError::Invalid(e)));
                    continue;
                }
                let (unit, timeout, retries) = (job.unit, job.timeout, job.retries);
                let flight = Flight { taken, frame };
                let tid = flights.start(unit, exclusive, timeout, retries, flight, now);
                let Some(o) = flights.get_mut(tid) else { continue };
                o.item.frame[..2].copy_from_slice(&tid.to_be_bytes());
                let (frame, request) = (o.item.frame.clone(), o.item.taken.job.request.clone());
                busy_since.get_or_insert(now);
                if let Err(e) = write_frame(port.as_mut(), &frame, timeout).await {
                    self.connection_lost(&mut line, &mut flights, &mut busy_since, e.to_string());
                    break;
                }
                debug!(unit, tid, request = ?request, "sent");
                self.tap.emit(TraceDir::Tx, &frame, Some(unit), Verdict::Sent, || {
                    describe_request(unit, &request)
                });
            }
            self.stats.queue_depth.store(self.schedule.len() + self.pass.len(), Relaxed);
            // Wait for a reply, a deadline, work, or the next connection attempt.
            let deadline = flights.next_deadline();
            let next_open = line.port.is_none().then_some(line.next_open);
            let wake_at = match (deadline, next_open) {
                (Some(d), Some(o)) => Some(d.min(o)),
                (d, o) => d.or(o),
            };
            let timer = async move {
                match wake_at {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let room = self.schedule.has_room();
            let read = async {
                match line.port.as_mut() {
                    Some(p) => p.read(&mut scratch).await,
                    None => std::future::pending().await,
                }
            };
            self.beat.idle(Instant::now().into_std());
            let woke = tokio::select! {
                // Cancel-safe: a job not yet received stays in the channel.
                job = rx.recv(), if room => Woke::Job(job),
                // Cancel-safe: a notification not taken is kept for the next wait.
                () = self.pass.arrived() => Woke::Other,
                () = shutdown.cancelled() => Woke::Shutdown,
                // Cancel-safe: `read` is; bytes read are handled below.
                r = read => Woke::Read(r),
                () = timer => Woke::Other,
                // Cancel-safe: a timer. Wake to beat even when nothing happens (the watchdog).
                () = tokio::time::sleep(self.beat.tick()) => Woke::Other,
            };
            match woke {
                Woke::Job(Some(job)) => self.schedule.push(job),
                Woke::Job(None) | Woke::Shutdown => break,
                Woke::Other => {}
                Woke::Read(Ok(n)) if n > 0 => {
                    self.buf.extend_from_slice(&scratch[..n]);
                    self.sort_replies(&mut flights, &mut line);
                }
                Woke::Read(Ok(_)) => {
                    let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof).to_string();
                    self.connection_lost(&mut line, &mut flights, &mut busy_since, e);
                }
                Woke::Read(Err(e)) => {
                    self.connection_lost(&mut line, &mut flights, &mut busy_since, e.to_string());
                }
            }
            let now = Instant::now();
            for expired in flights.expire(now) {
                match expired {
                    Expired::Resend(tid) => {
                        self.stats.timeouts.fetch_add(1, Relaxed);
                        let Some(o) = flights.get(tid) else { continue };
                        let (unit, frame) = (o.unit, o.item.frame.clone());
                        debug!(unit, tid, "no reply in time; sending again");
                        self.tap.emit(TraceDir::Rx, &[], Some(unit), Verdict::Timeout, || {
                            format!("unit {unit} no reply in time, sending again")
                        });
                        // After a lost connection the rest are failed already (Resend
                        // finds nothing) or fail below (Failed): each still gets its outcome.
                        let limit = o.item.taken.job.timeout;
                        if let Some(p) = line.port.as_mut()
                            && let Err(e) = write_frame(p.as_mut(), &frame, limit).await
                        {
                            self.connection_lost(&mut line, &mut flights, &mut busy_since, e.to_string());
                        }
                    }
                    Expired::Failed(o) => {
                        self.stats.timeouts.fetch_add(1, Relaxed);
                        let unit = o.unit;
                        debug!(unit, tid = o.tid, "no valid reply");
                        self.tap.emit(TraceDir::Rx, &[], Some(unit), Verdict::Timeout, || {
                            format!("unit {unit} no reply in time")
                        });
                        o.item.answer(Err(BusError::Timeout { attempts: o.attempts }));
                    }
                }
            }
            if flights.is_empty()
                && let Some(since) = busy_since.take()
            {
                self.stats.busy_ns.fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
            }
        }
        for o in flights.reset() {
            o.item.answer(Err(BusError::Closed));
        }
        self.pass.close();
        info!("bus stopped");
    }

    /// Takes every whole frame out of the receive buffer and gives each to its request,
    /// or counts it as discarded.
    fn sort_replies(&mut self, flights: &mut InFlight<Flight>, line: &mut PortSlot) {
        loop {
            let (tid, protocol, unit, len) = match mbap::header(&self.buf) {
                mbap::Header::Incomplete => return,
                mbap::Header::Noise => {
                    self.stats.noise_bytes.fetch_add(self.buf.len() as u64, Relaxed);
                    let n = self.buf.len();
                    self.tap.emit(TraceDir::Rx, &self.buf, None, Verdict::Noise, || {
                        format!("{n} bytes that are not Modbus-TCP, discarded")
                    });
                    self.buf.clear();
                    return;
                }
                mbap::Header::Frame { tid, protocol, unit, len } => (tid, protocol, unit, len),
            };
            let who = if protocol == 0 { flights.lookup(tid, unit) } else { Lookup::Foreign };
            let fits = match who {
                Lookup::Open => flights.get(tid).map(|o| {
                    let req = &o.item.taken.job.request;
                    crate::serial::rtu::check_reply(unit, req, unit, &self.buf[7..len], len)
                }),
                _ => None,
            };
            match (who, fits) {
                (Lookup::Open, Some(Decoded::Reply { reply, .. })) => {
                    if let Some(done) = flights.finish(tid) {
                        self.answered(done, reply, line, len);
                    }
                }
                (Lookup::Late, _) => {
                    self.stats.late_replies.fetch_add(1, Relaxed);
                    debug!(unit, tid, "late reply to a request given up on, discarded");
                    self.tap.emit(
                        TraceDir::Rx,
                        &self.buf[..len],
                        Some(unit),
                        Verdict::LateReplyDiscarded,
                        || "late reply to an earlier request, discarded".into(),
                    );
                }
                _ => {
                    self.stats.foreign_frames.fetch_add(1, Relaxed);
                    debug!(unit, tid, "frame matching no outstanding request, discarded");
                    self.tap.emit(TraceDir::Rx, &self.buf[..len], Some(unit), Verdict::Mismatch, || {
                        "frame matching no outstanding request, discarded".into()
                    });
                }
            }
            self.buf.drain(..len);
        }
    }

    /// The reply to `done` (the first `len` bytes of the buffer) is in: counted, shown,
    /// and sent to everyone waiting for it.
    fn answered(
        &mut self,
        done: Open<Flight>,
        reply: Result<Response, ExceptionCode>,
        line: &mut PortSlot,
        len: usize,
    ) {
        if !line.proven {
            line.proven = true;
            line.backoff = Duration::from_millis(100);
        }
        let unit = done.unit;
        let tv = if reply.is_ok() { Verdict::Ok } else { Verdict::Exception };
        self.tap.emit(TraceDir::Rx, &self.buf[..len], Some(unit), tv, || describe_reply(unit, &reply));
        self.stats.transactions.fetch_add(1, Relaxed);
        let outcome = reply.map_err(|code| {
            self.stats.exceptions.fetch_add(1, Relaxed);
            debug!(unit, ?code, "exception reply");
            BusError::Exception(code)
        });
        self.stats.shared_answers.fetch_add(done.item.taken.shared.len() as u64, Relaxed);
        done.item.answer(outcome);
    }

    /// The connection failed: every open request fails (the device did not answer it),
    /// and the bus reconnects with back-off.
    fn connection_lost(
        &mut self,
        line: &mut PortSlot,
        flights: &mut InFlight<Flight>,
        busy_since: &mut Option<Instant>,
        error: String,
    ) {
        let open = flights.reset();
        if !open.is_empty() {
            warn!(error = %error, failed = open.len(), "connection lost with requests outstanding; they fail, reconnecting");
        }
        for o in open {
            o.item.answer(Err(BusError::Timeout { attempts: o.attempts }));
        }
        if let Some(since) = busy_since.take() {
            self.stats.busy_ns.fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
        }
        self.buf.clear();
        line.failed(error, self.reopen_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{BusStats, Priority};
    use crate::model::{Line, Parity};
    use std::sync::Arc;
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio::sync::oneshot;

    type Outcome = oneshot::Receiver<Result<Response, BusError>>;

    fn read(unit: u8, at: u16) -> (Job, Outcome) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            unit,
            request: tokio_modbus::Request::ReadHoldingRegisters(at, 1),
            priority: Priority::Write,
            timeout: Duration::from_secs(5),
            turnaround: Duration::ZERO,
            retries: 0,
            reply,
        };
        (job, rx)
    }

    /// Reads one MBAP request off the device's end: (tid, unit, address).
    async fn request(dev: &mut DuplexStream) -> (u16, u8, u16) {
        let mut f = [0u8; 12];
        dev.read_exact(&mut f).await.expect("a request");
        (u16::from_be_bytes([f[0], f[1]]), f[6], u16::from_be_bytes([f[8], f[9]]))
    }

    async fn answer(dev: &mut DuplexStream, tid: u16, unit: u8, value: u16) {
        let mut f = tid.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0, 0, 5, unit, 3, 2]);
        f.extend_from_slice(&value.to_be_bytes());
        dev.write_all(&f).await.expect("answer");
    }

    /// Three requests are written before any is answered; answered last-first, each gets
    /// its own value; a frame with an id nobody sent is counted and never taken.
    #[tokio::test]
    async fn requests_go_out_together_and_replies_find_their_own_request() {
        let (near, mut dev) = tokio::io::duplex(4096);
        let port = std::sync::Mutex::new(Some(near));
        let open = move || {
            let next = port.lock().expect("once").take();
            async move {
                next.map(|p| Opened::from(Box::new(p) as Box<dyn crate::bus::Port>))
                    .ok_or_else(|| "opened once".to_string())
            }
        };
        let stats = Arc::new(BusStats::default());
        let line = Line { baud: 115_200, data_bits: 8, parity: Parity::None, stop_bits: 1 };
        let engine = Engine::new(
            "b".into(),
            line,
            Box::new(crate::serial::mbap::Mbap::default()),
            8,
            Duration::from_secs(30),
            stats.clone(),
        )
        .with_tcp_device(true)
        .with_max_in_flight(3);
        let (tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(engine.run(rx, open, shutdown.clone()));
        let mut outcomes = Vec::new();
        for (unit, at) in [(1, 10), (2, 20), (1, 30), (3, 40)] {
            let (job, rx) = read(unit, at);
            tx.send(job).await.expect("bus runs");
            outcomes.push(rx);
        }
        let mut sent = Vec::new();
        for _ in 0..3 {
            sent.push(request(&mut dev).await);
        }
        let ids: Vec<u16> = sent.iter().map(|s| s.0).collect();
        assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 3, "distinct ids: {ids:?}");
        // Nobody sent id 999: discarded.
        answer(&mut dev, 999, 1, 7).await;
        for &(tid, unit, at) in sent.iter().rev() {
            answer(&mut dev, tid, unit, at + 1000).await;
        }
        // The fourth goes out once a slot is free.
        let (tid, unit, at) = request(&mut dev).await;
        assert_eq!((unit, at), (3, 40));
        answer(&mut dev, tid, unit, at + 1000).await;
        for (rx, want) in outcomes.into_iter().zip([1010, 1020, 1030, 1040]) {
            let got = rx.await.expect("answered");
            assert_eq!(got, Ok(Response::ReadHoldingRegisters(vec![want])));
        }
        assert_eq!(stats.foreign_frames.load(Relaxed), 1);
        assert_eq!(stats.transactions.load(Relaxed), 4);
        shutdown.cancel();
        task.await.expect("bus stops");
    }
}
