//! The one listening socket for peers that dial us: source-address filtering, the TLS
//! handshake pinning every accepting peer, and handing each authenticated connection to
//! its peer's link task.
//!
//! Invariants: the `allow` networks are checked on the source address before a single
//! byte of TLS is read; a client that fails the handshake (garbage, no certificate, an
//! unpinned certificate, too slow) is logged and dropped without touching any link;
//! handshakes run in their own tasks, at most [`HANDSHAKES`] at once and each under
//! [`CONNECT_TIMEOUT`], so a slow or hostile client cannot stall the accept loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, instrument, warn};

use crate::link::tls::{self, Fingerprint};
use crate::link::{CONNECT_TIMEOUT, Incoming};
use crate::model::IpNet;

/// Handshakes in progress at once; more connections wait in the kernel backlog.
pub const HANDSHAKES: usize = 16;

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

impl Listener {
    /// Accepts until `shutdown`.
    #[instrument(name = "listener", skip_all)]
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        let permits = Arc::new(Semaphore::new(HANDSHAKES));
        loop {
            let permit = tokio::select! {
                // Cancel-safe: nothing is taken until a permit is granted.
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                () = shutdown.cancelled() => return,
            };
            let (tcp, from) = tokio::select! {
                // Cancel-safe: TcpListener::accept.
                r = self.socket.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        // EMFILE and friends: do not spin.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let ip = from.ip().to_canonical();
            let tables = self.tables.current();
            if !tables.allow.is_empty() && !tables.allow.iter().any(|n| n.contains(&ip)) {
                warn!(%from, "refused a connection: source address not in links.allow");
                continue;
            }
            let Some(tls) = tables.tls.clone() else {
                warn!(%from, "refused a connection: no peer is configured to dial in");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls);
            tracker.spawn(async move {
                handshake(acceptor, tcp, from, &tables.routes).await;
                drop(permit);
            });
        }
    }
}

async fn handshake(acceptor: TlsAcceptor, tcp: tokio::net::TcpStream, from: SocketAddr, routes: &Routes) {
    let stream = match timeout(CONNECT_TIMEOUT, acceptor.accept(tcp)).await {
        Err(_) => {
            warn!(%from, "tls handshake timed out; connection dropped");
            return;
        }
        Ok(Err(e)) => {
            warn!(%from, error = %e, "tls handshake failed; connection dropped");
            return;
        }
        Ok(Ok(s)) => s,
    };
    let Some(fp) = tls::peer_fingerprint(stream.get_ref().1) else {
        warn!(%from, "peer presented no certificate; connection dropped");
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
