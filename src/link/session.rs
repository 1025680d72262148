//! The link task: the loop that gets a connection to the peer (dialing it, or taking
//! what the listener hands over), runs one session over it from `Hello` to the end, and
//! reconnects with back-off.
//!
//! Invariants (see link.rs for the protocol's): applied batches are recorded durably
//! (sinks first, then `set_applied`) before they are acked, even when the session is
//! ending; only spooled batches are sent, in seq order, within the window; writes are
//! answered by the peer or refused as down, never carried into another session; the loop
//! beats the watchdog on every turn of every wait.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::BytesMut;
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncRead;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::{TlsConnector, TlsStream};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::Backoff;
use crate::image::PointId;
use crate::link::handle::{Counters, DOWN, WriteCmd};
use crate::link::outbox::{Out, write_loop};
use crate::link::proto::{self, Frame, FrameCodec, ProtoError};
use crate::link::receive::DropLog;
use crate::link::tunnel::TunnelHub;
use crate::link::window::{Liveness, SendWindow};
use crate::link::{
    CONNECT_TIMEOUT, Dialer, HELLO_TIMEOUT, Incoming, Link, MISMATCH_BACKOFF, OUT_LIMIT, ReceivedSink,
    STABLE, Stream, WINDOW,
};
use crate::point::value::{Sample, Value};

/// First reconnect delay; doubles up to the peer's `reconnect_max`.
const BACKOFF_MIN: Duration = crate::model::RECONNECT_MIN;
/// Peer writes carried out at the same time; more are refused as busy.
const WRITES_AT_ONCE: usize = 4;
/// Longest the session loop may spend on spool reads and writes in one turn before the
/// watchdog takes the link task for wedged.
const SESSION_STEP: Duration = Duration::from_secs(10);

/// A [`ReceivedSink`] inside a link task: the peer batch seq its spool holds up to,
/// and the samples taken for it but not yet stored.
pub(super) struct Sink {
    pub(super) config: ReceivedSink,
    /// `None` until read from the spool (at the first session).
    pub(super) mark: Option<u64>,
    pub(super) pending: Vec<(String, Sample)>,
}

/// One link task: its link, its counters, and what lives across sessions.
pub(super) struct Task {
    pub(super) link: Link,
    pub(super) counters: Arc<Counters>,
    pub(super) writes: mpsc::Receiver<WriteCmd>,
    pub(super) shutdown: CancellationToken,
    pub(super) tracker: TaskTracker,
    /// `peer/point` ids already registered in the image.
    pub(super) names: HashMap<String, PointId>,
    /// Serial tunnels riding this link.
    pub(super) tunnels: Arc<TunnelHub>,
    /// Local sinks fed with received samples (from `link.sinks`).
    pub(super) sinks: Vec<Sink>,
    /// Liveness for the watchdog: beaten on every turn of every wait (`health`).
    pub(super) beat: Arc<crate::health::Beat>,
    /// Relay loops dropped, for the rate-limited log.
    pub(super) loops: DropLog,
    /// Relayed samples refused for their origin (`accept_relayed`), for the
    /// rate-limited log.
    pub(super) untrusted: DropLog,
}

/// How a session ended.
enum End {
    /// Transport or protocol trouble: reconnect.
    Lost,
    /// Retrying soon cannot help (version or name mismatch): back off long.
    Mismatch,
    /// The listener handed us a newer connection of this peer.
    Replaced(Box<Incoming>),
    /// Shutdown.
    Shutdown,
}

impl Task {
    /// Connects (or takes what the listener hands over), runs a session, and again,
    /// until shutdown.
    pub(super) async fn run(mut self, mut dialer: Dialer) {
        // Jitter spreads the reconnects of many gateways; a session that stayed up for
        // STABLE starts the delay again (a peer that accepts and drops does not).
        let mut backoff =
            Backoff::new(BACKOFF_MIN, self.link.peer.reconnect_max).with_jitter().with_stable(STABLE);
        let mut next: Option<Incoming> = None;
        // Values the peer delivered before this task started (a reload restarted the link)
        // are vouched for by no session yet. The peer re-sends them when it is back; if
        // it is not back within the time a silent peer is declared dead, they turn
        // comm_fail, as if the old link had been cut then. (`None`: a session vouched for
        // them and failed them when it ended, or the grace is over.)
        let dead_after = Liveness::new(self.link.peer.heartbeat, Instant::now()).dead_after();
        let mut unvouched = Some(Instant::now() + dead_after);
        loop {
            self.fail_unvouched(&mut unvouched);
            let incoming = match &mut dialer {
                Dialer::Connect { addr, tls } => {
                    let (addr, tls) = (addr.clone(), tls.clone());
                    self.beat.busy(std::time::Instant::now(), 2 * CONNECT_TIMEOUT);
                    tokio::select! {
                        // Not cancel-safe, and need not be: a half-made connection is
                        // simply dropped at shutdown.
                        r = connect(&addr, tls) => match r {
                            Ok(s) => Some(s),
                            Err(e) => {
                                warn!(%addr, error = %e, retry_in = ?backoff.delay(), "cannot connect to peer");
                                None
                            }
                        },
                        () = self.shutdown.cancelled() => return,
                    }
                }
                Dialer::Accept(rx) => match next.take() {
                    Some(s) => Some(s),
                    None => loop {
                        self.beat.idle(std::time::Instant::now());
                        tokio::select! {
                            // Cancel-safe: mpsc::recv (also the next arm).
                            s = rx.recv() => match s {
                                Some(s) => break Some(s),
                                // The listener is gone: only shutdown is left to wait for.
                                None => {
                                    self.shutdown.cancelled().await;
                                    return;
                                }
                            },
                            Some(cmd) = self.writes.recv() => refuse_down(cmd),
                            () = self.shutdown.cancelled() => return,
                            // Wake to beat even when no peer calls (the watchdog).
                            () = tokio::time::sleep(self.beat.tick()) => {}
                            () = until_opt(unvouched) => {}
                        }
                        self.fail_unvouched(&mut unvouched);
                    },
                },
            };
            let mut end = End::Lost;
            let sessions = self.counters.sessions.load(Relaxed);
            if let Some((stream, from)) = incoming {
                backoff.connected(Instant::now());
                // The handshake is bounded by its own timeouts; the session loop beats.
                self.beat.busy(std::time::Instant::now(), 2 * CONNECT_TIMEOUT);
                end = self.session(stream, from, &mut dialer).await;
                self.set_connected(false);
            }
            if self.counters.sessions.load(Relaxed) == sessions {
                // No session came up (a connection that failed before its hello vouches
                // for nothing): the grace, if one runs, runs on.
                self.counters.failed.fetch_add(1, Relaxed);
            } else {
                // A session vouched for the peer's values while it lasted.
                unvouched = None;
                match &end {
                    End::Lost | End::Mismatch => {
                        // Nothing vouches for them any more; they turn good again as the
                        // peer re-sends them (it re-sends everything on reconnect). Only
                        // the points whose value came last through this link: one that
                        // another route (the origin's own link, a hub) delivered since is
                        // not ours.
                        let n = super::fail_delivered_by(&self.link.image, &self.link.peer.name, |_| true);
                        if n > 0 {
                            warn!(points = n, "link down: the peer's points are marked comm_fail");
                        }
                    }
                    // The peer's new connection takes over; should it never come up as a
                    // session, the values fail once the grace is over.
                    End::Replaced(_) => unvouched = Some(Instant::now() + dead_after),
                    End::Shutdown => {}
                }
            }
            match end {
                End::Shutdown => return,
                End::Replaced(s) => {
                    next = Some(*s);
                    continue;
                }
                End::Mismatch => backoff.hold(MISMATCH_BACKOFF),
                End::Lost => {}
            }
            if matches!(dialer, Dialer::Accept(_)) {
                continue;
            }
            let until = backoff.failed(Instant::now());
            loop {
                self.beat.idle(std::time::Instant::now());
                tokio::select! {
                    // Cancel-safe: a timer, and mpsc::recv.
                    () = sleep_until(until) => break,
                    Some(cmd) = self.writes.recv() => refuse_down(cmd),
                    () = self.shutdown.cancelled() => return,
                    () = tokio::time::sleep(self.beat.tick()) => {}
                    () = until_opt(unvouched) => {}
                }
                self.fail_unvouched(&mut unvouched);
            }
        }
    }

    /// Once `unvouched` has passed with no session up: marks `comm_fail` what the peer
    /// delivered before (the link restarted, or its session was replaced by a connection
    /// that never came up), and says so.
    fn fail_unvouched(&self, unvouched: &mut Option<Instant>) {
        if unvouched.is_some_and(|at| Instant::now() >= at) {
            *unvouched = None;
            let n = super::fail_delivered_by(&self.link.image, &self.link.peer.name, |_| true);
            if n > 0 {
                warn!(
                    points = n,
                    "no session with the peer since its link restarted or reconnected: its points are marked comm_fail until it sends them again"
                );
            }
        }
    }

    fn set_connected(&self, up: bool) {
        self.counters.connected.store(up, Relaxed);
        self.link.connected.send_replace(up);
    }

    /// One session over `stream`, from hello to the end.
    async fn session(&mut self, stream: Stream, from: SocketAddr, dialer: &mut Dialer) -> End {
        let (rd, wr) = tokio::io::split(stream);
        let codec = FrameCodec::new(self.link.max_frame);
        let mut reader = FramedRead::new(rd, codec);
        let queued = Arc::new(AtomicUsize::new(0));
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let out = Out { tx: out_tx, queued: queued.clone() };
        let writer = self.tracker.spawn(
            write_loop(wr, out_rx, queued, codec, self.link.peer.heartbeat)
                .instrument(info_span!("send", %from)),
        );
        let end = self.run_session(&mut reader, &out, from, dialer).await;
        // The hub holds a clone of `out`: drop it too, or the writer never ends.
        self.tunnels.detach();
        // Close is queued by run_session where due; dropping the queue ends the writer
        // after it has written everything queued.
        drop(out);
        let abort = writer.abort_handle();
        if timeout(Duration::from_secs(2), writer).await.is_err() {
            abort.abort();
        }
        end
    }

    async fn run_session<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut FramedRead<R, FrameCodec>,
        out: &Out,
        from: SocketAddr,
        dialer: &mut Dialer,
    ) -> End {
        let peer = self.link.peer.name.clone();
        let spool = self.link.spool.clone();
        let mut applied = spool.applied();
        out.send(Frame::Hello {
            version: proto::VERSION,
            name: self.link.local_name.clone(),
            resume: applied,
        });
        // Hello from the peer.
        let resume = match timeout(HELLO_TIMEOUT, reader.next()).await {
            Err(_) => {
                warn!(%from, "no hello from peer within {HELLO_TIMEOUT:?}; closing");
                return End::Lost;
            }
            Ok(None) => {
                warn!(%from, "peer closed the connection before its hello");
                return End::Lost;
            }
            Ok(Some(Err(e))) => {
                warn!(%from, error = %e, "malformed hello from peer; closing the link");
                out.close(&e.to_string());
                return End::Lost;
            }
            Ok(Some(Ok(Frame::Hello { version, name, resume }))) => {
                if let Err(e) = proto::check_version(version) {
                    error!(%from, "{e}; closing the link");
                    out.close(&e.to_string());
                    return End::Mismatch;
                }
                if name != peer {
                    let why = format!(
                        "peer introduced itself as {name:?} but its certificate is pinned for peer {peer:?}"
                    );
                    error!(%from, "{why}; closing the link (check the peer names in both configs)");
                    out.close(&why);
                    return End::Mismatch;
                }
                resume
            }
            Ok(Some(Ok(f))) => {
                warn!(%from, frame = f.name(), "first frame from peer is not a hello; closing");
                out.close("expected hello");
                return End::Lost;
            }
        };
        if let Err(e) = spool.ack(resume).await {
            error!(error = %e, "cannot apply the peer's resume point; closing the link");
            return End::Lost;
        }
        for sink in self.sinks.iter_mut().filter(|s| s.mark.is_none()) {
            match sink.config.spool.received_mark(&peer).await {
                Ok(m) => sink.mark = Some(m),
                Err(e) => {
                    error!(sink = %sink.config.name, error = %e, "cannot read the sink's spool; closing the link");
                    return End::Lost;
                }
            }
            sink.pending.clear();
        }
        // Tunnels may queue frames on this session now, up to half of OUT_LIMIT, so
        // they alone never make the peer look like it stopped reading.
        let tunnel_out = out.clone();
        self.tunnels.attach(Box::new(move |f| {
            let room = tunnel_out.queued.load(Relaxed) < OUT_LIMIT / 2;
            if room {
                tunnel_out.send(f);
            }
            room
        }));
        self.counters.sessions.fetch_add(1, Relaxed);
        self.set_connected(true);
        info!(%from, resume, applied, pending = spool.counters().pending_batches.load(Relaxed), "link up");

        let mut alive = Liveness::new(self.link.peer.heartbeat, Instant::now());
        let mut appended = spool.appended();
        let mut window = SendWindow::new(WINDOW, resume);
        let mut next_id = 1u64;
        let mut pending: HashMap<u64, oneshot::Sender<Result<(), String>>> = HashMap::new();
        let permits = Arc::new(Semaphore::new(WRITES_AT_ONCE));
        let mut buf = BytesMut::new();
        loop {
            // One turn: spool reads and writes (bounded by the disk), then one wait that
            // wakes at least every tick.
            self.beat.busy(std::time::Instant::now(), SESSION_STEP);
            // Fill the window from the spool.
            if let Some((after, room)) = window.wanted() {
                appended.borrow_and_update();
                match spool.read_raw_from(after, room).await {
                    Ok(batches) => {
                        window.read(room, batches.len());
                        for (seq, block) in batches {
                            if let Err(e) =
                                proto::encode_batch_raw(seq, &block, self.link.max_frame, &mut buf)
                            {
                                error!(seq, error = %e, "spooled batch cannot be sent; skipping it (data lost)");
                                window.passed(seq, false);
                                continue;
                            }
                            out.raw(buf.split().freeze());
                            window.passed(seq, true);
                            self.counters.sent.fetch_add(1, Relaxed);
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "cannot read the spool; closing the link");
                        return End::Lost;
                    }
                }
            }
            if out.queued.load(Relaxed) > OUT_LIMIT {
                warn!(queued = OUT_LIMIT, "peer is not reading; closing the link");
                return End::Lost;
            }
            let mut ack_due = false;
            let mut applied_upto = applied;
            // Set when the frames end the session: what was applied is still recorded.
            let mut ending: Option<End> = None;
            tokio::select! {
                // Cancel-safe: FramedRead keeps a partial frame in its buffer.
                frame = reader.next() => {
                    let mut frame = frame;
                    // Take every frame already buffered before acking (ack coalescing).
                    for taken in 1..=WINDOW {
                        match frame {
                            None => {
                                info!("peer closed the connection");
                                ending = Some(End::Lost);
                                break;
                            }
                            Some(Err(ProtoError::Io(e))) => {
                                warn!(%from, error = %e, "connection to peer lost");
                                ending = Some(End::Lost);
                                break;
                            }
                            Some(Err(e)) => {
                                error!(%from, error = %e, "protocol error from peer; closing the link");
                                out.close(&e.to_string());
                                ending = Some(End::Lost);
                                break;
                            }
                            Some(Ok(f)) => {
                                alive.heard(Instant::now());
                                match f {
                                    Frame::Batch { seq, samples } => {
                                        ack_due = true;
                                        if seq <= applied_upto {
                                            self.counters.duplicates.fetch_add(1, Relaxed);
                                            debug!(seq, applied = applied_upto, "duplicate batch dropped");
                                        } else {
                                            self.apply(seq, &samples);
                                            applied_upto = seq;
                                        }
                                    }
                                    Frame::Ack { seq } => {
                                        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                                        self.counters.last_ack_ms.store(now.map_or(1, |d| d.as_millis() as u64).max(1), Relaxed);
                                        let freed = window.acked(seq);
                                        self.counters.acked.fetch_add(freed as u64, Relaxed);
                                        if let Err(e) = spool.ack(seq).await {
                                            error!(error = %e, "cannot drop acknowledged batches; closing the link");
                                            ending = Some(End::Lost);
                                            break;
                                        }
                                    }
                                    Frame::Write { id, point, value } => {
                                        self.peer_write(id, point, value, out, &permits);
                                    }
                                    Frame::WriteResult { id, result } => {
                                        if let Some(reply) = pending.remove(&id) {
                                            let _ = reply.send(result);
                                        }
                                    }
                                    Frame::Heartbeat => {}
                                    Frame::Tunnel { name, data } => self.tunnels.deliver(&name, data),
                                    Frame::Close { reason } => {
                                        info!(reason, "peer closed the link");
                                        ending = Some(End::Lost);
                                break;
                                    }
                                    Frame::Hello { .. } => {
                                        error!(%from, "second hello from peer; closing the link");
                                        out.close("unexpected hello");
                                        ending = Some(End::Lost);
                                break;
                                    }
                                }
                            }
                        }
                        // Fetch the next frame only if this pass will handle it: a
                        // frame fetched after the last pass would be silently lost.
                        if taken == WINDOW {
                            break;
                        }
                        match reader.next().now_or_never() {
                            Some(f) => frame = f,
                            None => break,
                        }
                    }
                }
                // Cancel-safe: watch::changed only marks the version seen.
                r = appended.changed(), if window.waits_for_spool() => {
                    if r.is_ok() {
                        window.spool_grew();
                    }
                }
                // Cancel-safe: mpsc::recv.
                Some(cmd) = self.writes.recv() => {
                    if cmd.deadline > Instant::now() {
                        let id = next_id;
                        next_id += 1;
                        out.send(Frame::Write { id, point: cmd.point, value: cmd.value });
                        pending.retain(|_, r| !r.is_closed());
                        pending.insert(id, cmd.reply);
                    }
                }
                // Cancel-safe: only waits for the writer task to drop its queue.
                () = out.tx.closed() => {
                    warn!(%from, "cannot write to peer; reconnecting");
                    return End::Lost;
                }
                // Cancel-safe: a timer.
                () = sleep_until(alive.dead_at()) => {
                    warn!(
                        silent_for = %humantime::format_duration(alive.dead_after()),
                        "no frame from peer for 3 heartbeats; peer is dead, reconnecting"
                    );
                    return End::Lost;
                }
                // Cancel-safe: mpsc::recv; only armed when the listener feeds us.
                Some(s) = recv_incoming(dialer) => {
                    info!(from = %s.1, "a new connection from the peer replaces the current session");
                    out.close("replaced by a new connection");
                    return End::Replaced(Box::new(s));
                }
                () = self.shutdown.cancelled() => {
                    out.close("shutting down");
                    return End::Shutdown;
                }
                // Cancel-safe: a timer; wakes the loop to beat (the watchdog).
                () = tokio::time::sleep(self.beat.tick()) => {}
            }
            // Everything applied is recorded, even when the session is ending: else the
            // peer would resend it and it would be applied twice. Sinks store their
            // samples first: a crash in between re-sends the batches, and the sinks'
            // marks keep them from being stored twice.
            if applied_upto > applied {
                for sink in &mut self.sinks {
                    if sink.pending.is_empty() {
                        continue;
                    }
                    let samples = std::mem::take(&mut sink.pending);
                    if let Err(e) = sink.config.spool.append_received(samples, &peer, applied_upto).await {
                        error!(sink = %sink.config.name, error = %e, "cannot store received values for the sink; closing the link without acking (the peer re-sends them)");
                        // Read the mark again at the next session.
                        sink.mark = None;
                        return End::Lost;
                    }
                    sink.mark = Some(applied_upto);
                }
                if let Err(e) = spool.set_applied(applied_upto).await {
                    error!(error = %e, "cannot record applied batches; closing the link without acking");
                    return End::Lost;
                }
                debug!(applied = applied_upto, "applied");
                applied = applied_upto;
            }
            if let Some(end) = ending {
                return end;
            }
            if ack_due {
                out.send(Frame::Ack { seq: applied });
            }
        }
    }

    /// A write asked by the peer: grants, then the writer, answered by `WriteResult`.
    fn peer_write(&self, id: u64, point: String, value: Value, out: &Out, permits: &Arc<Semaphore>) {
        if let Err(reason) = self.link.grants.check(&point, &value) {
            self.counters.refused.fetch_add(1, Relaxed);
            warn!(%point, %value, "refused a write from the peer: {reason}");
            out.send(Frame::WriteResult { id, result: Err(reason) });
            return;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            out.send(Frame::WriteResult {
                id,
                result: Err(format!("busy: {WRITES_AT_ONCE} writes already in progress")),
            });
            return;
        };
        let writer = self.link.writer.clone();
        let out = out.clone();
        self.tracker.spawn(
            async move {
                let result = writer.write(&point, &value).await.map_err(|e| e.to_string());
                match &result {
                    Ok(()) => info!(%point, %value, "peer write done"),
                    Err(e) => warn!(%point, %value, error = %e, "peer write failed"),
                }
                out.send(Frame::WriteResult { id, result });
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

async fn recv_incoming(dialer: &mut Dialer) -> Option<Incoming> {
    match dialer {
        Dialer::Accept(rx) => rx.recv().await,
        Dialer::Connect { .. } => std::future::pending().await,
    }
}

fn refuse_down(cmd: WriteCmd) {
    let _ = cmd.reply.send(Err(DOWN.to_string()));
}

/// Dials `addr` and runs the TLS handshake pinning the peer.
async fn connect(addr: &str, tls: Arc<rustls::ClientConfig>) -> Result<Incoming, String> {
    let tcp = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("tcp connect timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("tcp connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let from = tcp.peer_addr().map_err(|e| format!("tcp: {e}"))?;
    let tls = timeout(CONNECT_TIMEOUT, TlsConnector::from(tls).connect(crate::link::tls::server_name(), tcp))
        .await
        .map_err(|_| format!("tls handshake timed out after {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("tls handshake: {e}"))?;
    Ok((TlsStream::Client(tls), from))
}

/// Sleeps until `at`; never wakes when `None`.
async fn until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
