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
//! minute. A relayed sample whose origin the peer's `accept_relayed` does not list is
//! refused the same way (authentication pins who the peer is, not which sites it may
//! speak for); the batch is still acked.
//!
//! [`Sample::via`]: crate::point::value::Sample::via
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
//!
//! Files: link/session.rs is the link task (connect, hello, the session loop),
//! link/receive.rs what a received batch does here, link/outbox.rs the writer side of a
//! session, link/handle.rs the [`LinkHandle`] and its counters, link/grants.rs the
//! [`Grants`] check of peer writes.

mod grants;
mod handle;
pub mod listener;
mod outbox;
pub mod proto;
mod receive;
mod session;
pub mod tls;
pub mod tunnel;
mod window;
pub mod writeback;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info_span};

use crate::image::Image;
pub use crate::link::grants::Grants;
use crate::link::handle::Counters;
pub use crate::link::handle::{LinkHandle, LinkStats, PeerWriteError, summary};
use crate::link::receive::DropLog;
use crate::link::session::{Sink, Task};
use crate::link::tunnel::TunnelHub;
use crate::link::writeback::Offer;
use crate::model::Peer;
use crate::spool::SpoolHandle;
use crate::spool::forward::RelayCounters;
use crate::writer::Writer;

/// Marks `comm_fail` the received values whose last hop was `peer` (its own points, and
/// those it relayed) that `which` also picks, atomically in the image (a value another
/// route delivers meanwhile is not failed). Returns how many turned `comm_fail`.
pub(crate) fn fail_delivered_by(
    image: &Image,
    peer: &str,
    which: impl Fn(&crate::point::value::Sample) -> bool,
) -> usize {
    image.fail_where(crate::point::value::Quality::CommFail, |s| {
        s.via.as_ref().is_some_and(|v| v.last().is_some_and(|hop| **hop == *peer)) && which(s)
    })
}

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
/// Reconnect delay after a version or name mismatch (a configuration problem: it will not
/// go away in seconds, and each attempt logs it), unless `reconnect_max` is longer.
pub const MISMATCH_BACKOFF: Duration = Duration::from_secs(30);
/// A session up this long resets the back-off.
pub const STABLE: Duration = Duration::from_secs(30);
/// Most distinct point names one peer may create in our image: a bound on the memory a
/// (buggy, but authenticated) peer can make us hold. Far above any real plant.
pub const MAX_PEER_POINTS: usize = 100_000;

/// The TLS stream of a link (client side when we dial, server side when we accept).
pub type Stream = TlsStream<TcpStream>;

/// A connection the listener accepted and identified as this peer's.
pub type Incoming = (Stream, SocketAddr);

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
        loops: DropLog::default(),
        untrusted: DropLog::default(),
    };
    tracker.spawn(task.run(dialer).instrument(span));
    handle
}
