//! The one listening socket for peers that dial us: source-address filtering, the TLS
//! handshake pinning every accepting peer, and handing each authenticated connection to
//! its peer's link task.
//!
//! Pre-authentication limits (nobody who merely reaches the port may keep a pinned peer
//! out):
//! - a connection must start its handshake (send its first bytes, the ClientHello)
//!   within [`FIRST_BYTES`], and finish it within [`HANDSHAKE_DEADLINE`] of its accept;
//! - at most [`PREAUTH_SLOTS`] connections are in handshake at once, and at most
//!   [`PREAUTH_PER_SOURCE`] of them from one source address;
//! - a new connection is never made to wait for a slot: when the pool (or its source's
//!   share) is full, the slot of the oldest connection that has sent nothing yet is
//!   reclaimed (it is closed), and only when every one has started its handshake, the
//!   oldest of those. A real peer sends its ClientHello at once and finishes in a few
//!   round trips, so silent sockets, however many and however often reopened, are always
//!   reclaimed before it ([`PreAuth`]).
//!
//! Invariants: the `allow` networks are checked on the source address before a single
//! byte of TLS is read; a client that fails the handshake (garbage, no certificate, an
//! unpinned certificate, too slow, reclaimed) is logged and dropped without touching any
//! link; handshakes run in their own tasks, so the accept loop never waits on a client.
//! Every log line a connection can cause before it is authenticated goes through one
//! [`SharedLimiter`]: a flood of connections logs a few lines and a summary per source.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::{TlsAcceptor, TlsStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, instrument, warn};

use crate::link::Incoming;
use crate::link::tls::{self, Fingerprint};
use crate::loglimit::SharedLimiter;
use crate::model::IpNet;

/// Connections in handshake at once (all sources).
pub const PREAUTH_SLOTS: usize = 64;
/// Connections in handshake at once from one source address.
pub const PREAUTH_PER_SOURCE: usize = 16;
/// A connection that has sent nothing this long after its accept is closed.
pub const FIRST_BYTES: Duration = Duration::from_secs(2);
/// A handshake not finished this long after its accept is abandoned.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Where an authenticated connection goes: the peer's name and its link's inbox.
pub type Routes = HashMap<Fingerprint, (String, mpsc::Sender<Incoming>)>;

/// Who may come in, and where each goes: replaced whole on a reload (the socket stays
/// bound; a handshake already running finishes with the tables it started with).
pub struct Accepting {
    /// Allowed source networks (empty: any).
    pub allow: Vec<IpNet>,
    /// TLS server config pinning every route's fingerprint (`None`: no peer is
    /// configured to dial in; every connection is refused).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Fingerprint to peer.
    pub routes: Routes,
}

/// The shared, replaceable [`Accepting`] tables of a running listener.
#[derive(Clone)]
pub struct AcceptTables(Arc<std::sync::RwLock<Arc<Accepting>>>);

impl AcceptTables {
    /// Tables holding `accepting`.
    pub fn new(accepting: Accepting) -> Self {
        Self(Arc::new(std::sync::RwLock::new(Arc::new(accepting))))
    }

    /// The tables now.
    pub fn current(&self) -> Arc<Accepting> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the tables for the connections accepted from now on.
    pub fn replace(&self, accepting: Accepting) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(accepting);
    }
}

/// The listener of one gateway.
pub struct Listener {
    /// The bound socket.
    pub socket: TcpListener,
    /// Who may come in and where each goes.
    pub tables: AcceptTables,
}

/// One connection in handshake.
#[derive(Debug, Clone, Copy)]
struct Slot {
    source: IpAddr,
    accepted: Instant,
    /// Has sent its first bytes.
    started: bool,
}

/// The table of connections in handshake, and which one gives way to a newcomer. Sans
/// I/O: the caller passes `now` and closes the connection it is told to.
#[derive(Debug)]
pub struct PreAuth {
    slots: HashMap<u64, Slot>,
    next: u64,
    capacity: usize,
    per_source: usize,
}

/// The verdict on a new connection: its id, and the connection whose slot it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The new connection's id.
    pub id: u64,
    /// The connection to close now (its slot was reclaimed).
    pub reclaimed: Option<Reclaimed>,
}

/// A connection whose slot went to a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimed {
    /// Its id.
    pub id: u64,
    /// Its source address.
    pub source: IpAddr,
    /// Had it started its handshake.
    pub started: bool,
    /// How long it had held the slot.
    pub held: Duration,
    /// Its source had used its whole share (else: the whole pool was taken).
    pub source_full: bool,
}

impl PreAuth {
    /// A table of `capacity` slots, `per_source` of them at most for one address.
    pub fn new(capacity: usize, per_source: usize) -> Self {
        Self { slots: HashMap::new(), next: 0, capacity: capacity.max(1), per_source: per_source.max(1) }
    }

    /// Connections in handshake.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// No connection in handshake.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Admits a connection from `source`: always, reclaiming a slot when the source's
    /// share or the pool is full (from that source's connections in the first case).
    /// The slot given up is the oldest connection that has sent nothing, else the oldest.
    pub fn admit(&mut self, source: IpAddr, now: Instant) -> Admitted {
        let from_source = self.slots.values().filter(|s| s.source == source).count();
        let source_full = from_source >= self.per_source;
        let victim = if source_full {
            self.victim(|s| s.source == source)
        } else if self.slots.len() >= self.capacity {
            self.victim(|_| true)
        } else {
            None
        };
        let reclaimed = victim.and_then(|id| {
            let s = self.slots.remove(&id)?;
            Some(Reclaimed {
                id,
                source: s.source,
                started: s.started,
                held: now.saturating_duration_since(s.accepted),
                source_full,
            })
        });
        self.next += 1;
        let id = self.next;
        self.slots.insert(id, Slot { source, accepted: now, started: false });
        Admitted { id, reclaimed }
    }

    /// The connection has sent its first bytes.
    pub fn started(&mut self, id: u64) {
        if let Some(s) = self.slots.get_mut(&id) {
            s.started = true;
        }
    }

    /// The connection left the handshake (done, failed, or reclaimed).
    pub fn remove(&mut self, id: u64) {
        self.slots.remove(&id);
    }

    fn victim(&self, among: impl Fn(&Slot) -> bool) -> Option<u64> {
        self.slots
            .iter()
            .filter(|(_, s)| among(s))
            .min_by_key(|(id, s)| (s.started, s.accepted, **id))
            .map(|(id, _)| *id)
    }
}

/// The pre-auth table with each connection's cancel switch.
struct Pool {
    table: PreAuth,
    cancel: HashMap<u64, CancellationToken>,
}

impl Listener {
    /// Accepts until `shutdown`.
    #[instrument(name = "listener", skip_all)]
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let pool = Arc::new(Mutex::new(Pool {
            table: PreAuth::new(PREAUTH_SLOTS, PREAUTH_PER_SOURCE),
            cancel: HashMap::new(),
        }));
        let log = SharedLimiter::default();
        let mut flush = log.ticker();
        loop {
            let (tcp, from) = tokio::select! {
                // Cancel-safe: TcpListener::accept.
                r = self.socket.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        if log.allow("failed accepts of peer connections", None) {
                            warn!(error = %e, "cannot accept a peer connection");
                        }
                        // EMFILE and friends: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = flush.tick() => {
                    for s in log.flush() {
                        warn!("{s}");
                    }
                    continue;
                }
                () = shutdown.cancelled() => return,
            };
            let ip = from.ip().to_canonical();
            let tables = self.tables.current();
            if !tables.allow.is_empty() && !tables.allow.iter().any(|n| n.contains(&ip)) {
                if log.allow("peer connections refused by links.allow", Some(ip)) {
                    warn!(%from, "refused a connection: source address not in links.allow");
                }
                continue;
            }
            let Some(tls) = tables.tls.clone() else {
                if log.allow("peer connections refused (no peer dials in)", Some(ip)) {
                    warn!(%from, "refused a connection: no peer is configured to dial in");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let now = Instant::now();
            let cancel = shutdown.child_token();
            let id = {
                let mut p = pool.lock().unwrap_or_else(PoisonError::into_inner);
                let admitted = p.table.admit(ip, now);
                if let Some(r) = admitted.reclaimed {
                    if let Some(c) = p.cancel.remove(&r.id) {
                        c.cancel();
                    }
                    let state =
                        if r.started { "an unfinished handshake" } else { "a connection that sent nothing" };
                    let full = if r.source_full {
                        format!("{PREAUTH_PER_SOURCE} connections from {ip} already in handshake")
                    } else {
                        format!("all {PREAUTH_SLOTS} handshake slots taken")
                    };
                    if log.allow("handshake slots reclaimed", Some(r.source)) {
                        warn!(
                            %from,
                            "{full}: closed {state} from {} after {:.1} s to make room",
                            r.source,
                            r.held.as_secs_f64()
                        );
                    }
                }
                p.cancel.insert(admitted.id, cancel.clone());
                admitted.id
            };
            let acceptor = TlsAcceptor::from(tls);
            let pool = pool.clone();
            let log = log.clone();
            tracker.spawn(async move {
                tokio::select! {
                    // A reclaimed connection may not have been polled yet: it must close
                    // without reading, even if its handshake could finish in this poll.
                    biased;
                    () = cancel.cancelled() => {}
                    () = handshake(acceptor, tcp, from, now, &tables.routes, &log, || {
                        pool.lock().unwrap_or_else(PoisonError::into_inner).table.started(id);
                    }) => {}
                }
                let mut p = pool.lock().unwrap_or_else(PoisonError::into_inner);
                p.table.remove(id);
                p.cancel.remove(&id);
            });
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    from: SocketAddr,
    accepted: Instant,
    routes: &Routes,
    log: &SharedLimiter,
    started: impl FnOnce(),
) {
    let ip = Some(from.ip().to_canonical());
    let mut first = [0u8; 1];
    match timeout(FIRST_BYTES, tcp.peek(&mut first)).await {
        Err(_) => {
            if log.allow("peer connections that sent nothing", ip) {
                warn!(%from, "peer connection sent nothing within {} s; closed", FIRST_BYTES.as_secs());
            }
            return;
        }
        Ok(Ok(0)) => {
            debug!(%from, "peer connection closed before its handshake");
            return;
        }
        Ok(Err(e)) => {
            debug!(%from, error = %e, "peer connection failed before its handshake");
            return;
        }
        Ok(Ok(_)) => started(),
    }
    let stream = match timeout_at(accepted + HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
        Err(_) => {
            if log.allow("unfinished tls handshakes", ip) {
                warn!(%from, "tls handshake not finished within {} s; connection closed", HANDSHAKE_DEADLINE.as_secs());
            }
            return;
        }
        Ok(Err(e)) => {
            if log.allow("failed tls handshakes", ip) {
                warn!(%from, error = %e, "tls handshake failed; connection dropped");
            }
            return;
        }
        Ok(Ok(s)) => s,
    };
    let Some(fp) = tls::peer_fingerprint(stream.get_ref().1) else {
        if log.allow("connections without a certificate", ip) {
            warn!(%from, "peer presented no certificate; connection dropped");
        }
        return;
    };
    let Some((peer, inbox)) = routes.get(&fp) else {
        // The verifier only admits pinned fingerprints, so this means a route is missing.
        warn!(%from, fingerprint = %fp, "no peer for this fingerprint; connection dropped");
        return;
    };
    debug!(%from, %peer, "authenticated");
    if inbox.try_send((TlsStream::Server(stream), from)).is_err() {
        warn!(%from, %peer, "peer's link is busy with other new connections; dropped");
    } else {
        info!(%from, %peer, "peer connected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn silent_connections_give_way_before_started_ones() {
        let t0 = Instant::now();
        let mut p = PreAuth::new(3, 3);
        let a = p.admit(ip(1), t0).id;
        let b = p.admit(ip(2), t0 + Duration::from_millis(10)).id;
        let c = p.admit(ip(3), t0 + Duration::from_millis(20)).id;
        p.started(a);
        // Full: the oldest silent one (b) goes, not the older but started a.
        let d = p.admit(ip(4), t0 + Duration::from_millis(30));
        let r = d.reclaimed.expect("a slot reclaimed");
        assert_eq!((r.id, r.source, r.started), (b, ip(2), false));
        assert_eq!(r.held, Duration::from_millis(20));
        assert_eq!(p.len(), 3);
        // All started: the oldest goes.
        p.started(c);
        p.started(d.id);
        let e = p.admit(ip(5), t0 + Duration::from_millis(40));
        assert_eq!(e.reclaimed.map(|r| (r.id, r.started)), Some((a, true)));
    }

    #[test]
    fn one_source_takes_its_own_slots_not_others() {
        let t0 = Instant::now();
        let mut p = PreAuth::new(10, 2);
        let other = p.admit(ip(9), t0).id;
        let x1 = p.admit(ip(1), t0 + Duration::from_millis(1)).id;
        let _x2 = p.admit(ip(1), t0 + Duration::from_millis(2)).id;
        // The source is at its share: its own oldest silent slot goes, though `other` is older.
        let x3 = p.admit(ip(1), t0 + Duration::from_millis(3));
        assert_eq!(x3.reclaimed.map(|r| r.id), Some(x1));
        assert_eq!(p.len(), 3);
        assert!(p.slots.contains_key(&other));
    }

    #[test]
    fn below_the_limits_nothing_is_reclaimed_and_removal_frees() {
        let t0 = Instant::now();
        let mut p = PreAuth::new(2, 2);
        let a = p.admit(ip(1), t0);
        assert_eq!(a.reclaimed, None);
        assert_eq!(p.admit(ip(2), t0).reclaimed, None);
        p.remove(a.id);
        assert_eq!(p.admit(ip(3), t0).reclaimed, None);
        assert_eq!(p.len(), 2);
        p.remove(999);
        assert!(!p.is_empty());
    }
}
