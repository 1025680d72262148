//! One peer link: the task that owns the connection to one peer gateway (dialing it, or
//! taking the connections the listener hands over), runs the protocol of
//! docs/PROTOCOL.md over it, and reconnects with back-off. [`LinkHandle`] is the cheap
//! handle the rest of the gateway uses (peer writes, statistics).
//!
//! Per session: `Hello` both ways (version, the configured peer name, resume points),
//! then one loop that sends spooled batches from the peer's resume point with a window
//! of unacked batches, applies the peer's batches into the image under `peer/point`,
//! answers its writes through the grants, and watches for a dead peer.
//!
//! A sample the peer relays (it carries a path, [`Sample::via`]) is stored under its
//! origin's name (`origin/point`, the path's first hop), with the peer appended to its
//! path. A sample whose path already names this gateway (or the peer) has gone round a
//! loop: it is dropped, never stored or relayed, counted, and logged at most once a
//! minute.
//!
//! Invariants:
//! - receive path: apply, then `set_applied` (durable), then `Ack`; a batch with
//!   `seq <= applied` is a duplicate: dropped, counted, and acked again;
//! - send path: only what the spool committed is sent, in seq order, at most
//!   [`WINDOW`] unacked; an `Ack` removes batches from the spool;
//! - the socket is written by a separate writer task fed by a queue that the loop never
//!   waits on, so two peers pushing backlogs at each other cannot deadlock; the queue
//!   is bounded by the window plus small control frames, and a peer that stops reading
//!   is disconnected once [`OUT_LIMIT`] frames pile up;
//! - any malformed frame closes this link only, with a log line naming the peer;
//! - when an established session is lost, the peer's points in the image keep their
//!   value but turn `comm_fail` (the peer re-sends everything when it reconnects);
//! - writes are never queued across sessions: a write asked while the link is down, or
//!   in flight when it drops, fails (at-most-once; replaying commands is dangerous).
//!
//! Serial tunnels (link/tunnel.rs) ride the same session through a [`TunnelHub`]: attached
//! while a session is up, it lets a tunnel task queue `Tunnel` frames on it, and the
//! loop hands received `Tunnel` frames to the hub without waiting.

pub mod listener;
pub mod proto;
pub mod tls;
pub mod tunnel;
mod window;
pub mod writeback;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_rustls::{TlsConnector, TlsStream};
use tokio_util::codec::{Encoder, FramedRead};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::Backoff;
use crate::image::{Image, PointId};
use crate::link::proto::{Frame, FrameCodec, ProtoError};
use crate::link::tunnel::TunnelHub;
use crate::link::window::{Liveness, SendWindow};
use crate::link::writeback::Offer;
use crate::model::{Grant, Peer};
use crate::point::registers::value_as_f64;
use crate::point::value::{Quality, Sample, Value, Via};
use crate::spool::SpoolHandle;
use crate::spool::block::MAX_HOPS;
use crate::spool::forward::RelayCounters;
use crate::writer::Writer;

/// Most unacked batches in flight.
pub const WINDOW: usize = 64;
/// Frames waiting for the socket before the peer is declared not reading.
pub const OUT_LIMIT: usize = 4 * WINDOW + 1024;
/// TCP connect and TLS handshake limit.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the peer's `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a [`LinkHandle::write`] waits for the peer's result.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay; doubles up to the peer's `reconnect_max`.
const BACKOFF_MIN: Duration = crate::model::RECONNECT_MIN;
/// Reconnect delay after a version or name mismatch (a configuration problem: it will not
/// go away in seconds, and each attempt logs it), unless `reconnect_max` is longer.
pub const MISMATCH_BACKOFF: Duration = Duration::from_secs(30);
/// A session up this long resets the back-off.
pub const STABLE: Duration = Duration::from_secs(30);
/// Peer writes carried out at the same time; more are refused as busy.
const WRITES_AT_ONCE: usize = 4;
/// Longest the session loop may spend on spool reads and writes in one turn before the
/// watchdog takes the link task for wedged.
const SESSION_STEP: Duration = Duration::from_secs(10);
/// Received points never go stale by age here: the sender re-sends at least every
/// `max_silence`, and the sender's own quality travels with each sample.
const REMOTE_STALE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Most distinct point names one peer may create in our image: a bound on the memory a
/// (buggy, but authenticated) peer can make us hold. Far above any real plant.
pub const MAX_PEER_POINTS: usize = 100_000;
/// Dropped relay loops are logged at most this often (with the count since).
const LOOP_LOG_EVERY: Duration = Duration::from_secs(60);

/// The TLS stream of a link (client side when we dial, server side when we accept).
pub type Stream = TlsStream<TcpStream>;

/// A connection the listener accepted and identified as this peer's.
pub type Incoming = (Stream, SocketAddr);

/// A snapshot of a link's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// A session is up (hello exchanged).
    pub connected: bool,
    /// Sessions established since start.
    pub sessions: u64,
    /// Attempts that never got to a session (connect, TLS or hello failed).
    pub failed_attempts: u64,
    /// Batches sent (resends count again).
    pub batches_sent: u64,
    /// Our batches the peer acknowledged.
    pub batches_acked: u64,
    /// Peer batches applied into the image.
    pub batches_applied: u64,
    /// Samples in them.
    pub samples_applied: u64,
    /// Peer batches dropped as duplicates (already applied).
    pub duplicates_dropped: u64,
    /// Received samples relayed to the peer.
    pub samples_relayed: u64,
    /// Samples refused as a relay loop: not relayed to the peer because it is on their
    /// path, or received from it with this gateway on their path (dropped).
    pub loop_refused: u64,
    /// Peer writes refused by the grants.
    pub writes_refused: u64,
    /// Our batches waiting in the spool for an ack.
    pub spool_pending: u64,
    /// Seq of the newest batch spooled for the peer (seqs persist across restarts).
    pub last_seq: u64,
    /// Batches the spool dropped to its limits (data lost).
    pub spool_dropped: u64,
    /// Samples in them.
    pub spool_dropped_samples: u64,
    /// Values in the batches waiting in the spool.
    pub spool_pending_values: u64,
    /// Bytes of the batches waiting in the spool.
    pub spool_pending_bytes: u64,
    /// When the oldest batch waiting in the spool was stored (`None`: none waits).
    pub spool_oldest: Option<std::time::SystemTime>,
    /// When the peer last acknowledged a batch (`None`: not since start).
    pub last_ack: Option<std::time::SystemTime>,
}

#[derive(Debug, Default)]
struct Counters {
    connected: AtomicBool,
    sessions: AtomicU64,
    failed: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    applied: AtomicU64,
    samples_applied: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
    /// Unix milliseconds of the last ack (0: none yet).
    last_ack_ms: AtomicU64,
}

struct WriteCmd {
    point: String,
    value: Value,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), String>>,
}

/// Why a peer write ([`LinkHandle::write`]) did not happen, or may not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerWriteError {
    /// No session: nothing was sent.
    #[error("link to {peer} is down")]
    Down {
        /// The peer.
        peer: String,
    },
    /// Too many writes waiting (here or at the owner): nothing was written.
    #[error("link to {peer}: too many writes waiting")]
    Busy {
        /// The peer.
        peer: String,
    },
    /// The owner's `[[peer.grant]]` refused it: `reason` is the owner's.
    #[error("{reason}")]
    Refused {
        /// The peer.
        peer: String,
        /// The owner's words (`not granted: ...`).
        reason: String,
    },
    /// The owner tried and its device write failed.
    #[error("peer {peer} could not write: {reason}")]
    Failed {
        /// The peer.
        peer: String,
        /// The owner's words.
        reason: String,
    },
    /// The session dropped with the write in flight: outcome unknown.
    #[error("link to {peer} went down before the write result arrived (outcome unknown)")]
    Lost {
        /// The peer.
        peer: String,
    },
    /// No result within [`WRITE_TIMEOUT`]: outcome unknown.
    #[error("link to {peer}: no write result within {WRITE_TIMEOUT:?} (outcome unknown)")]
    Timeout {
        /// The peer.
        peer: String,
    },
}

/// A cheap handle to a running link.
#[derive(Clone)]
pub struct LinkHandle {
    peer: Arc<str>,
    counters: Arc<Counters>,
    spool: SpoolHandle,
    writes: mpsc::Sender<WriteCmd>,
    tunnels: Arc<TunnelHub>,
    relay: Arc<RelayCounters>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl LinkHandle {
    /// The peer's name.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Asks the peer to write `value` into its point `point` and waits for the result
    /// (at most [`WRITE_TIMEOUT`]). Fails at once when the link is down. Never resent.
    pub async fn write(&self, point: &str, value: Value) -> Result<(), PeerWriteError> {
        let peer = self.peer.to_string();
        if !self.counters.connected.load(Relaxed) {
            return Err(PeerWriteError::Down { peer });
        }
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + WRITE_TIMEOUT;
        if self.writes.try_send(WriteCmd { point: point.to_string(), value, deadline, reply }).is_err() {
            return Err(PeerWriteError::Busy { peer });
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) if reason == DOWN => Err(PeerWriteError::Down { peer }),
            // The owner's grants refuse with "not granted: ..." (Grants::check), and a
            // busy owner with "busy: ..."; anything else is the owner's device write.
            Ok(Ok(Err(reason))) if reason.starts_with("not granted") => {
                Err(PeerWriteError::Refused { peer, reason })
            }
            Ok(Ok(Err(reason))) if reason.starts_with("busy") => Err(PeerWriteError::Busy { peer }),
            Ok(Ok(Err(reason))) => Err(PeerWriteError::Failed { peer, reason }),
            Ok(Err(_)) => Err(PeerWriteError::Lost { peer }),
            Err(_) => Err(PeerWriteError::Timeout { peer }),
        }
    }

    /// True while a session with the peer is up.
    pub fn is_connected(&self) -> bool {
        self.counters.connected.load(Relaxed)
    }

    /// The relaying counters the peer's forwarder shares with this link.
    pub fn relay_counters(&self) -> Arc<RelayCounters> {
        self.relay.clone()
    }

    /// The hook serial tunnels to this peer use (see link/tunnel.rs).
    pub fn tunnels(&self) -> &Arc<TunnelHub> {
        &self.tunnels
    }

    /// The link's counters.
    pub fn stats(&self) -> LinkStats {
        let c = &self.counters;
        let s = self.spool.counters();
        LinkStats {
            connected: c.connected.load(Relaxed),
            sessions: c.sessions.load(Relaxed),
            failed_attempts: c.failed.load(Relaxed),
            batches_sent: c.sent.load(Relaxed),
            batches_acked: c.acked.load(Relaxed),
            batches_applied: c.applied.load(Relaxed),
            samples_applied: c.samples_applied.load(Relaxed),
            duplicates_dropped: c.duplicates.load(Relaxed),
            samples_relayed: self.relay.relayed.load(Relaxed),
            loop_refused: self.relay.loop_refused.load(Relaxed),
            writes_refused: c.refused.load(Relaxed),
            spool_pending: s.pending_batches.load(Relaxed),
            last_seq: *self.spool.appended().borrow(),
            spool_dropped: s.dropped_batches.load(Relaxed),
            spool_dropped_samples: s.dropped_samples.load(Relaxed),
            spool_pending_values: s.pending_samples.load(Relaxed),
            spool_pending_bytes: s.pending_bytes.load(Relaxed),
            spool_oldest: match s.oldest_pending_us.load(Relaxed) {
                0 => None,
                us => Some(std::time::UNIX_EPOCH + Duration::from_micros(us)),
            },
            last_ack: match c.last_ack_ms.load(Relaxed) {
                0 => None,
                ms => Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)),
            },
        }
    }
}

/// What a peer may write here, compiled.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    grants: Vec<Grant>,
}

impl Grants {
    /// The grants of a peer (their globs were compiled with the configuration).
    pub fn new(grants: &[Grant]) -> Self {
        Self { grants: grants.to_vec() }
    }

    /// True when some grant covers `point` (whatever the value).
    pub fn covers(&self, point: &str) -> bool {
        self.grants.iter().any(|g| g.points.is_match(point))
    }

    /// Ok when some grant covers `point` and admits `value`; else the refusal reason.
    pub fn check(&self, point: &str, value: &Value) -> Result<(), String> {
        let mut matched = None;
        for g in &self.grants {
            if !g.points.is_match(point) {
                continue;
            }
            let Some(x) = value_as_f64(value) else {
                return Ok(());
            };
            if g.min.is_none_or(|min| x >= min) && g.max.is_none_or(|max| x <= max) {
                return Ok(());
            }
            matched = Some(g);
        }
        Err(match matched {
            Some(g) => format!(
                "not granted: {value} is outside the granted range [{}, {}] of {point}",
                g.min.map_or("-inf".into(), |m| m.to_string()),
                g.max.map_or("inf".into(), |m| m.to_string()),
            ),
            None => format!("not granted: point {point} is not writable by this peer"),
        })
    }
}

/// How a link gets its connections.
pub enum Dialer {
    /// We dial `addr` and pin the peer with this client config.
    Connect {
        /// host:port.
        addr: String,
        /// TLS client config pinning the peer.
        tls: Arc<rustls::ClientConfig>,
    },
    /// The listener hands over connections identified as this peer.
    Accept(mpsc::Receiver<Incoming>),
}

/// Everything one link task needs.
pub struct Link {
    /// Our gateway name (sent in `Hello`).
    pub local_name: String,
    /// The peer.
    pub peer: Peer,
    /// The register image.
    pub image: Arc<Image>,
    /// Writes into local points (peer writes).
    pub writer: Writer,
    /// The peer's spool.
    pub spool: SpoolHandle,
    /// Compiled grants of the peer.
    pub grants: Grants,
    /// Where received samples go for write-back.
    pub writeback: Offer,
    /// Set while a session is up (drives write-back loss handling).
    pub connected: watch::Sender<bool>,
    /// Frame size limit.
    pub max_frame: usize,
    /// Local sinks (PLCs) fed with the peer's points: each gets every received sample
    /// of the points it maps, in its spool, before the batch is acked.
    pub sinks: Vec<ReceivedSink>,
    /// Relaying counters, shared with the peer's forwarder.
    pub relay: Arc<RelayCounters>,
}

/// A local sink fed from the peer: the received points it maps (full `peer/point`
/// names) and its spool.
#[derive(Debug, Clone)]
pub struct ReceivedSink {
    /// The sink, for logs (`plc line-plc`).
    pub name: String,
    /// Full names of the points it takes.
    pub points: std::collections::HashSet<String>,
    /// Its spool.
    pub spool: SpoolHandle,
}

/// A [`ReceivedSink`] inside a link task: the peer batch seq its spool holds up to,
/// and the samples taken for it but not yet stored.
struct Sink {
    config: ReceivedSink,
    /// `None` until read from the spool (at the first session).
    mark: Option<u64>,
    pending: Vec<(String, Sample)>,
}

/// Starts the task of one link under `tracker`; returns its handle.
pub fn spawn(link: Link, dialer: Dialer, shutdown: CancellationToken, tracker: &TaskTracker) -> LinkHandle {
    let (writes_tx, writes_rx) = mpsc::channel(64);
    let counters = Arc::new(Counters::default());
    let tunnels = Arc::new(TunnelHub::default());
    let handle = LinkHandle {
        peer: Arc::from(link.peer.name.as_str()),
        counters: counters.clone(),
        spool: link.spool.clone(),
        writes: writes_tx,
        tunnels: tunnels.clone(),
        relay: link.relay.clone(),
    };
    let span = info_span!("link", peer = %link.peer.name);
    let sinks =
        link.sinks.iter().map(|c| Sink { config: c.clone(), mark: None, pending: Vec::new() }).collect();
    let link_name = link.peer.name.clone();
    let task = Task {
        link,
        counters,
        writes: writes_rx,
        shutdown,
        tracker: tracker.clone(),
        names: HashMap::new(),
        tunnels,
        sinks,
        beat: crate::health::beat(format!("link to {}", link_name)),
        loops: LoopLog::default(),
    };
    tracker.spawn(task.run(dialer).instrument(span));
    handle
}

struct Task {
    link: Link,
    counters: Arc<Counters>,
    writes: mpsc::Receiver<WriteCmd>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// `peer/point` ids already registered in the image.
    names: HashMap<String, PointId>,
    /// Serial tunnels riding this link.
    tunnels: Arc<TunnelHub>,
    /// Local sinks fed with received samples (from `link.sinks`).
    sinks: Vec<Sink>,
    /// Liveness for the watchdog: beaten on every turn of every wait (`health`).
    beat: Arc<crate::health::Beat>,
    /// Relay loops dropped, for the rate-limited log.
    loops: LoopLog,
}

/// Received samples dropped as relay loops, logged at most every [`LOOP_LOG_EVERY`].
#[derive(Debug, Default)]
struct LoopLog {
    logged: Option<Instant>,
    unlogged: u64,
}

impl LoopLog {
    /// Records `n` dropped samples (the first one named); true when a line is due now,
    /// then `unlogged` holds how many to report.
    fn record(&mut self, n: u64, now: Instant) -> bool {
        self.unlogged += n;
        if self.logged.is_some_and(|at| now.duration_since(at) < LOOP_LOG_EVERY) {
            return false;
        }
        self.logged = Some(now);
        true
    }
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
    async fn run(mut self, mut dialer: Dialer) {
        // Jitter spreads the reconnects of many gateways; a session that stayed up for
        // STABLE starts the delay again (a peer that accepts and drops does not).
        let mut backoff =
            Backoff::new(BACKOFF_MIN, self.link.peer.reconnect_max).with_jitter().with_stable(STABLE);
        let mut next: Option<Incoming> = None;
        loop {
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
                        }
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
                self.counters.failed.fetch_add(1, Relaxed);
            } else if matches!(end, End::Lost | End::Mismatch) {
                // Nothing vouches for the peer's values any more; they turn good again
                // as the peer re-sends them (it re-sends everything on reconnect).
                // Only the points whose value came last through this link: one that another
                // route (the origin's own link, another hub) delivered since is not ours.
                let image = &self.link.image;
                let peer = self.link.peer.name.as_str();
                let ours = self.names.iter().filter(|(name, _)| {
                    image
                        .get(name)
                        .is_none_or(|s| s.via.as_ref().is_none_or(|v| v.last().is_some_and(|h| &**h == peer)))
                });
                let n = image.fail(ours.map(|(_, id)| *id), Quality::CommFail);
                if n > 0 {
                    warn!(points = n, "link down: the peer's points are marked comm_fail");
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
                }
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

    /// Puts a received batch into the image (a local point of the peer under
    /// `peer/point`, a relayed one under `origin/point`) and offers it to write-back.
    /// Drops samples that went round a relay loop. Logs it at debug level (seq, size,
    /// the first values).
    fn apply(&mut self, seq: u64, samples: &[(String, Sample)]) {
        debug!(seq, samples = samples.len(), values = %BatchValues(samples), "batch applied");
        let peer: Arc<str> = Arc::from(self.link.peer.name.as_str());
        let local: Arc<str> = Arc::from(self.link.local_name.as_str());
        let mut refused = 0usize;
        let mut looped: Option<(&str, &Sample)> = None;
        let mut loops = 0u64;
        let mut superseded = 0u64;
        // The path of the peer's own points, and the last relayed path seen with its
        // extension: samples of one route share one path (one table entry on the wire),
        // so a batch allocates a path once, not once per sample.
        let direct: Via = Arc::from([peer.clone()]);
        let mut extended: Option<(Via, Via)> = None;
        // (full name, sample as stored) of every sample kept.
        let mut kept: Vec<(String, Sample)> = Vec::with_capacity(samples.len());
        for (point, sample) in samples {
            let (name, via) = match sample.via.as_ref().filter(|v| !v.is_empty()) {
                None => (format!("{peer}/{point}"), direct.clone()),
                Some(via) => {
                    let on_path = via.iter().any(|hop| **hop == *local || *hop == peer);
                    if on_path || via.len() >= MAX_HOPS {
                        loops += 1;
                        looped = looped.or(Some((point, sample)));
                        continue;
                    }
                    // A point that another route (the origin's own link, another hub)
                    // keeps good is that route's: a relayed value replaces it only when
                    // good and newer. So a hub's backlog, replayed after an outage, or its
                    // comm_fail when it loses the origin, never overwrites a live value.
                    let name = format!("{}/{point}", via[0]);
                    let elsewhere_good = |now: &Sample| {
                        now.quality == Quality::Good
                            && now.via.as_ref().and_then(|v| v.last()).is_some_and(|hop| *hop != peer)
                    };
                    if self.link.image.get(&name).is_some_and(|now| {
                        elsewhere_good(&now) && (sample.quality != Quality::Good || now.at >= sample.at)
                    }) {
                        superseded += 1;
                        continue;
                    }
                    let path = match &extended {
                        Some((from, to)) if Arc::ptr_eq(from, via) => to.clone(),
                        _ => {
                            let mut path = via.to_vec();
                            path.push(peer.clone());
                            let path: Via = path.into();
                            extended = Some((via.clone(), path.clone()));
                            path
                        }
                    };
                    (name, path)
                }
            };
            let (value, at, quality) = (sample.value.clone(), sample.at, sample.quality);
            kept.push((name, Sample { value, at, quality, via: Some(via) }));
        }
        if loops > 0 {
            self.counters_relay_loops(loops, looped);
        }
        if superseded > 0 {
            debug!(superseded, "relayed values older than what another route delivered; dropped");
        }
        let image = &self.link.image;
        let updates: Vec<(PointId, Sample)> = kept
            .iter()
            .filter_map(|(name, sample)| {
                let id = match self.names.get(name) {
                    Some(id) => *id,
                    None if self.names.len() >= MAX_PEER_POINTS => {
                        refused += 1;
                        return None;
                    }
                    None => {
                        let id = image.register(name, REMOTE_STALE);
                        self.names.insert(name.clone(), id);
                        id
                    }
                };
                Some((id, sample.clone()))
            })
            .collect();
        if refused > 0 {
            // Values are lost and the peer's configuration needs a look: error level.
            error!(
                refused,
                limit = MAX_PEER_POINTS,
                "peer sends more distinct points than allowed; values dropped"
            );
        }
        image.update(updates);
        for sink in &mut self.sinks {
            if sink.mark.is_some_and(|m| seq > m) {
                sink.pending
                    .extend(kept.iter().filter(|(name, _)| sink.config.points.contains(name)).cloned());
            }
        }
        // Write-back follows the peer's own points; relayed ones are not the peer's.
        self.link
            .writeback
            .offer(samples.iter().filter(|(_, s)| s.via.is_none()).map(|(p, s)| (p.as_str(), s)));
        self.counters.applied.fetch_add(1, Relaxed);
        self.counters.samples_applied.fetch_add(kept.len() as u64, Relaxed);
    }

    /// Counts received samples dropped as relay loops; logs at most every
    /// [`LOOP_LOG_EVERY`], naming the first one and its path.
    fn counters_relay_loops(&mut self, n: u64, first: Option<(&str, &Sample)>) {
        self.link.relay.loop_refused.fetch_add(n, Relaxed);
        if !self.loops.record(n, Instant::now()) {
            return;
        }
        let dropped = std::mem::take(&mut self.loops.unlogged);
        let (point, path) = first.map_or((String::new(), String::new()), |(p, s)| {
            let hops = s.via.iter().flat_map(|v| v.iter()).map(|h| &**h).collect::<Vec<_>>();
            (p.to_string(), hops.join(" -> "))
        });
        warn!(
            dropped,
            point,
            path,
            "peer relayed values that already passed through this gateway or the peer (a relay loop); \
             dropped, not stored or relayed again. Check the [[peer.send]] rules that name received points \
             on the gateways along the path (logged at most every {LOOP_LOG_EVERY:?})"
        );
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

/// The first values of a batch for the debug log: `point=value` joined by `;`
/// (`point=-` for no value), at most [`LOGGED_VALUES`] of them then `;+N more`.
struct BatchValues<'a>(&'a [(String, Sample)]);

/// Values of one batch written in its debug log line.
const LOGGED_VALUES: usize = 16;

impl std::fmt::Display for BatchValues<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (point, s)) in self.0.iter().take(LOGGED_VALUES).enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            match &s.value {
                Some(v) => write!(f, "{point}={v}")?,
                None => write!(f, "{point}=-")?,
            }
        }
        if self.0.len() > LOGGED_VALUES {
            write!(f, ";+{} more", self.0.len() - LOGGED_VALUES)?;
        }
        Ok(())
    }
}

/// One-line health summary of a link, for the periodic info log: state, then the
/// batch counters since `since` (`elapsed` ago), then the spool as it is now; a hub's
/// link adds what it relayed and refused as loops since `since`.
pub fn summary(now: &LinkStats, since: &LinkStats, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let applied = now.batches_applied.saturating_sub(since.batches_applied);
    let samples = now.samples_applied.saturating_sub(since.samples_applied);
    let relayed = now.samples_relayed.saturating_sub(since.samples_relayed);
    let loops = now.loop_refused.saturating_sub(since.loop_refused);
    let relaying = if relayed > 0 || loops > 0 {
        format!("; relayed {relayed} values, {loops} refused as relay loops")
    } else {
        String::new()
    };
    let line = format!(
        "{}, {} sessions; batches sent {}, acked {}, applied {} ({samples} values, {:.1} values/s), \
         duplicates dropped {}, writes refused {}; spool pending {} (last seq {}), dropped since start {} ({} values)",
        if now.connected { "connected" } else { "not connected" },
        now.sessions,
        now.batches_sent.saturating_sub(since.batches_sent),
        now.batches_acked.saturating_sub(since.batches_acked),
        applied,
        samples as f64 / secs,
        now.duplicates_dropped.saturating_sub(since.duplicates_dropped),
        now.writes_refused.saturating_sub(since.writes_refused),
        now.spool_pending,
        now.last_seq,
        now.spool_dropped,
        now.spool_dropped_samples,
    );
    line + &relaying
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

/// The reply of a write asked while the link was down (never sent to a peer).
const DOWN: &str = "\0link down";

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

enum OutMsg {
    Frame(Frame),
    Raw(Bytes),
}

/// The session's queue to its writer task.
#[derive(Clone)]
struct Out {
    tx: mpsc::UnboundedSender<OutMsg>,
    queued: Arc<AtomicUsize>,
}

impl Out {
    fn send(&self, f: Frame) {
        self.queued.fetch_add(1, Relaxed);
        // The writer is gone only when the session is ending anyway.
        let _ = self.tx.send(OutMsg::Frame(f));
    }

    fn raw(&self, b: Bytes) {
        self.queued.fetch_add(1, Relaxed);
        let _ = self.tx.send(OutMsg::Raw(b));
    }

    fn close(&self, reason: &str) {
        self.send(Frame::Close { reason: reason.to_string() });
    }
}

/// Writes queued frames to the socket; sends a heartbeat after `heartbeat` of silence;
/// stops after a `Close` or when the queue is dropped, then closes the stream (TLS
/// close_notify).
async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<OutMsg>,
    queued: Arc<AtomicUsize>,
    mut codec: FrameCodec,
    heartbeat: Duration,
) {
    let heartbeat = heartbeat.max(Duration::from_millis(10));
    let mut buf = BytesMut::new();
    let mut closing = false;
    loop {
        // Cancel-safe: recv keeps the message queued; the sleep is a timer.
        let first = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    queued.fetch_sub(1, Relaxed);
                    m
                }
                None => break,
            },
            () = sleep(heartbeat) => OutMsg::Frame(Frame::Heartbeat),
        };
        let mut msg = first;
        loop {
            match msg {
                OutMsg::Raw(b) => buf.extend_from_slice(&b),
                OutMsg::Frame(f) => {
                    closing = matches!(f, Frame::Close { .. });
                    if let Err(e) = codec.encode(&f, &mut buf) {
                        warn!(frame = f.name(), error = %e, "cannot encode frame; not sent");
                    }
                }
            }
            if closing || buf.len() >= 64 << 10 {
                break;
            }
            match rx.try_recv() {
                Ok(m) => {
                    queued.fetch_sub(1, Relaxed);
                    msg = m;
                }
                Err(_) => break,
            }
        }
        if let Err(e) = wr.write_all(&buf).await {
            debug!(error = %e, "write to peer failed");
            return;
        }
        buf.clear();
        if closing {
            break;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_match_globs_and_ranges() {
        let globs = |g: &str| crate::model::PointGlobs::new(vec![g.into()]).expect("globs");
        let g = Grants::new(&[
            Grant { points: globs("boiler.sp*"), matched: vec![], min: Some(0.0), max: Some(90.0) },
            Grant { points: globs("pump.run"), matched: vec![], min: None, max: None },
        ]);
        assert_eq!(g.check("boiler.sp1", &Value::Float(45.0)), Ok(()));
        assert_eq!(g.check("boiler.sp1", &Value::Int(90)), Ok(()));
        let e = g.check("boiler.sp1", &Value::Float(90.5)).expect_err("range");
        assert!(e.starts_with("not granted") && e.contains("[0, 90]"), "{e}");
        assert_eq!(g.check("pump.run", &Value::Bool(true)), Ok(()));
        let e = g.check("pump.stop", &Value::Bool(true)).expect_err("no grant");
        assert!(e.contains("pump.stop"), "{e}");
        assert!(Grants::default().check("x", &Value::Int(1)).is_err());
    }

    #[test]
    fn relay_loops_are_logged_at_most_once_a_minute_with_the_count_since() {
        let t0 = Instant::now();
        let mut log = LoopLog::default();
        assert!(log.record(3, t0), "the first loop is logged at once");
        assert_eq!(std::mem::take(&mut log.unlogged), 3);
        assert!(!log.record(1, t0 + Duration::from_secs(1)));
        assert!(!log.record(2, t0 + Duration::from_secs(59)));
        assert!(log.record(1, t0 + LOOP_LOG_EVERY));
        assert_eq!(log.unlogged, 4, "the line reports every drop since the last one");
    }

    #[test]
    fn summary_and_batch_values_read_well() {
        let since =
            LinkStats { batches_sent: 10, batches_applied: 4, samples_applied: 40, ..Default::default() };
        let now = LinkStats {
            connected: true,
            sessions: 2,
            batches_sent: 15,
            batches_acked: 5,
            batches_applied: 6,
            samples_applied: 60,
            duplicates_dropped: 1,
            spool_pending: 3,
            last_seq: 99,
            ..Default::default()
        };
        let line = summary(&now, &since, Duration::from_secs(10));
        assert!(
            line.starts_with(
                "connected, 2 sessions; batches sent 5, acked 5, applied 2 (20 values, 2.0 values/s)"
            ),
            "{line}"
        );
        assert!(
            line.contains("duplicates dropped 1") && line.contains("spool pending 3 (last seq 99)"),
            "{line}"
        );
        assert!(!line.contains("relay"), "no relaying, no relay counters: {line}");
        let hub = LinkStats { samples_relayed: 12, loop_refused: 3, ..now };
        let line = summary(&hub, &since, Duration::from_secs(10));
        assert!(line.ends_with("; relayed 12 values, 3 refused as relay loops"), "{line}");
        let t = std::time::UNIX_EPOCH;
        let mk = |i: usize| {
            (
                format!("p{i}"),
                Sample { value: Some(Value::Int(i as i64)), at: t, quality: Quality::Good, via: None },
            )
        };
        let batch: Vec<_> = (0..18).map(mk).collect();
        let text = BatchValues(&batch).to_string();
        assert!(text.starts_with("p0=0;p1=1;") && text.ends_with("p15=15;+2 more"), "{text}");
        let none = [("x".to_string(), Sample { value: None, at: t, quality: Quality::CommFail, via: None })];
        assert_eq!(BatchValues(&none).to_string(), "x=-");
    }
}
