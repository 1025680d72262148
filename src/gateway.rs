//! Wires a validated model into running tasks: one bus task and one poller per serial
//! line (a raw poller on raw buses, a stream task instead of both on a stream bus, see
//! `rawpoll`), the periodic summaries, the local Modbus-TCP server when `[server]` is
//! configured, for peer links the identity, the spools, the listener and per peer a
//! forwarder, a link and its write-backs, a task per serial tunnel on its peer's link, and
//! per `[[plc]]` a spool, a forwarder and a sender (`plc`) — all under one shutdown token
//! and one task tracker.
//!
//! Invariant: every task spawned here watches the shutdown token and is tracked, so
//! [`Gateway::shutdown`] returns once everything has stopped (or the grace period ran out).

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::bus::{self, BusHandle};
use crate::config;
use crate::http::Observed;
use crate::image::Image;
use crate::link::listener::{AcceptTables, Accepting, Listener, Routes};
use crate::link::tls::{self, Fingerprint, TlsError};
use crate::link::tunnel::{self, TunnelHandle};
use crate::link::writeback::WriteBacks;
use crate::link::{self, Dialer, Grants, Link, LinkHandle, PeerWriteError, ReceivedSink};
use crate::model::{self, Bus, Dial, Links, Model, Peer, Plc, Protocol, Tunnel};
use crate::plc::{self, PlcHandle};
use crate::point::value::{Quality, Value};
use crate::poll::modbus::{DeviceHealth, Poller};
use crate::poll::raw::{self, SerialDevices};
use crate::server::{self, Owners, Server, ServerError, ServerStats, WriteFailure};
use crate::spool::SpoolHandle;
use crate::spool::forward::{Forwarder, Rules};
use crate::spool::journal::SpoolLimits;
use crate::writer::{WriteError, Writer};

/// Why the gateway could not start; each names the file, address or peer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The identity (certificate and key) could not be loaded or used.
    #[error("peer links: identity in {dir}: {source}")]
    Identity {
        /// The identity directory.
        dir: String,
        /// Why.
        source: tls::TlsError,
    },
    /// The data directory could not be created.
    #[error("peer links: cannot create data directory {dir}: {source}")]
    DataDir {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// A peer's configuration cannot be used.
    #[error("peer {peer}: {reason}")]
    Peer {
        /// The peer.
        peer: String,
        /// What is wrong.
        reason: String,
    },
    /// The Modbus-TCP server socket could not be opened.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The HTTP endpoint cannot start (its socket or token file).
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// A PLC sink cannot start (its spool).
    #[error("plc {plc}: {reason}")]
    Plc {
        /// The PLC.
        plc: String,
        /// What is wrong.
        reason: String,
    },
    /// The listening socket could not be opened.
    #[error("peer links: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What `check` and `run` verify on this machine before `run` opens anything: the
/// identity is loaded by the function `run` loads it with, spool files are inspected by
/// the spool's own reader. Handed to [`config::load_for_run`].
pub struct Preflight;

impl config::Machine for Preflight {
    /// The identity `run` loads ([`tls::load_identity`]), or the one line saying what is
    /// wrong and what to do.
    fn identity(&self, dir: &Path) -> Result<(), String> {
        let keygen = format!("run m2m-gateway keygen --dir {}", dir.display());
        let key = dir.join(tls::KEY_FILE);
        let replace =
            format!("{keygen} --force (a new key: every peer must then pin the new fingerprint it prints)");
        match tls::load_identity(dir) {
            Ok(_) => Ok(()),
            Err(TlsError::Io { path, source }) if source.kind() == ErrorKind::NotFound => {
                if path == key {
                    Err(format!("identity key {} not found: {keygen}", path.display()))
                } else {
                    Err(format!("identity certificate {} not found: {replace}", path.display()))
                }
            }
            Err(TlsError::Io { path, source }) if source.kind() == ErrorKind::PermissionDenied => {
                Err(format!(
                    "identity file {} cannot be read by this user ({source}): run the gateway as the user owning it, or chown it",
                    path.display()
                ))
            }
            Err(TlsError::Io { path, source }) => {
                Err(format!("identity file {} cannot be read: {source}", path.display()))
            }
            Err(TlsError::Pem { path, reason }) => {
                Err(format!("identity file {}: {reason}: {replace}", path.display()))
            }
            Err(TlsError::KeyMismatch { key, cert }) => Err(format!(
                "identity key {} does not match certificate {} (one of them was replaced): {replace}",
                key.display(),
                cert.display()
            )),
            Err(e) => Err(format!("identity in {}: {e}", dir.display())),
        }
    }

    fn spool(&self, file: &Path) -> Result<(), String> {
        crate::spool::journal::inspect(file).map_err(|e| e.to_string())
    }
}

/// How long a reload waits for the tasks of a stopped component to end.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running gateway.
pub struct Gateway {
    /// The register image every task reads and writes.
    pub image: Arc<Image>,
    /// Handles to the bus tasks, by bus order in the model (stream buses, which have a
    /// stream task instead, are left out).
    pub buses: Vec<BusHandle>,
    /// The raw serial devices: counters and commands ([`SerialDevices::send_command`]).
    pub serial: Arc<SerialDevices>,
    /// Where the Modbus-TCP server listens (`None`: no `[server]`, or it failed to bind).
    pub server_addr: Option<SocketAddr>,
    /// Writes into local points through their buses (one table shared by every clone,
    /// replaced on a reload).
    pub writer: Writer,
    /// One handle per peer link, in model order: `(peer name, handle)`.
    pub links: Vec<(String, LinkHandle)>,
    /// One handle per `[[plc]]`, in model order.
    pub plcs: Vec<PlcHandle>,
    /// One handle per serial tunnel whose link started, in model order.
    pub tunnels: Vec<TunnelHandle>,
    /// The health of every polled Modbus device, in model order.
    pub devices: Vec<Arc<DeviceHealth>>,
    /// The Modbus-TCP server's counters (`None`: no server).
    pub server_stats: Option<Arc<ServerStats>>,
    /// Where the HTTP endpoint listens (`None`: disabled, or its default port was taken).
    pub http_addr: Option<SocketAddr>,
    listen_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The configuration running now.
    model: Model,
    parts: Parts,
    /// When the gateway started (reloads do not change it).
    started: std::time::SystemTime,
}

/// One independently restartable piece of the gateway: its tasks watch `token` (a
/// child of the gateway's shutdown token) and are tracked by `tracker`.
struct Part {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Part {
    fn new(parent: &CancellationToken) -> Self {
        Self { token: parent.child_token(), tracker: TaskTracker::new() }
    }

    /// Cancels the part's tasks and waits for them to end (at most [`STOP_GRACE`]).
    async fn stop(&self, what: &str) {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(STOP_GRACE, self.tracker.wait()).await.is_err() {
            warn!("{what}: tasks still running {STOP_GRACE:?} after being stopped; leaving them");
        }
    }
}

/// A bus: its engine and summary, and its poller (a part of its own, so that a change
/// of devices restarts the poller only and the line stays open).
struct BusPart {
    model: Bus,
    part: Part,
    handle: Option<BusHandle>,
    poller: Option<Part>,
    /// The raw devices of a raw bus.
    serial: SerialDevices,
    /// The health of the poller's devices (replaced when the poller restarts).
    devices: Vec<Arc<DeviceHealth>>,
}

/// A peer: its link, write-backs and summary; the forwarder is a part of its own (a
/// change of send rules restarts it alone and the link stays connected).
struct PeerPart {
    model: Peer,
    part: Part,
    forwarder: Part,
    handle: LinkHandle,
    spool: SpoolHandle,
    connected: watch::Receiver<bool>,
    /// Where the listener hands this peer's connections (peers that dial in).
    route: Option<(Fingerprint, mpsc::Sender<link::Incoming>)>,
}

struct PlcPart {
    model: Plc,
    part: Part,
    handle: PlcHandle,
}

struct TunnelPart {
    model: Tunnel,
    part: Part,
    handle: TunnelHandle,
}

struct ServerPart {
    config: model::Server,
    part: Part,
    tables: server::Tables,
    addr: SocketAddr,
    stats: Arc<ServerStats>,
}

struct ListenerPart {
    part: Part,
    addr: SocketAddr,
    tables: AcceptTables,
}

#[derive(Default)]
struct Parts {
    buses: Vec<BusPart>,
    peers: Vec<PeerPart>,
    plcs: Vec<PlcPart>,
    tunnels: Vec<TunnelPart>,
    server: Option<ServerPart>,
    listener: Option<ListenerPart>,
    /// The HTTP endpoint: restarted after every reload with a view of what now runs.
    http: Option<Part>,
    identity: Option<tls::Identity>,
}

impl Parts {
    fn all(&self) -> impl Iterator<Item = &Part> {
        let buses = self.buses.iter().flat_map(|b| b.poller.iter().chain([&b.part]));
        let peers = self.peers.iter().flat_map(|p| [&p.forwarder, &p.part]);
        buses
            .chain(peers)
            .chain(self.plcs.iter().map(|p| &p.part))
            .chain(self.tunnels.iter().map(|t| &t.part))
            .chain(self.server.iter().map(|s| &s.part))
            .chain(self.listener.iter().map(|l| &l.part))
            .chain(self.http.iter())
    }
}

/// What a reload changed, in operator words (`bus line1 restarted: its settings changed`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Components started that did not run before.
    pub added: Vec<String>,
    /// Components stopped for good.
    pub removed: Vec<String>,
    /// Components stopped and started again, with the reason.
    pub restarted: Vec<String>,
    /// Tables swapped in a running component (nothing stopped), and settings that wait
    /// for the next restart.
    pub updated: Vec<String>,
}

impl Changes {
    /// True when the new configuration changed nothing that runs.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.restarted.is_empty()
            && self.updated.is_empty()
    }
}

/// Equality of model parts: the typed values (compiled patterns compare by their text).
fn same<T: PartialEq>(a: &T, b: &T) -> bool {
    a == b
}

/// A bus's own settings (everything but its devices).
fn bus_settings(bus: &Bus) -> Bus {
    Bus { devices: Vec::new(), ..bus.clone() }
}

/// What a peer's link depends on: everything but the send rules.
fn link_settings(peer: &Peer) -> Peer {
    Peer { send: Vec::new(), ..peer.clone() }
}

/// What every link depends on: our name, identity and data directory.
fn links_settings(model: &Model) -> Option<(String, std::path::PathBuf, std::path::PathBuf)> {
    let l = model.links.as_ref()?;
    Some((model.gateway.name.clone(), l.identity_dir.clone(), l.data_dir.clone()))
}

/// A peer's compiled settings, made before anything is stopped.
struct PreparedPeer {
    fingerprint: Fingerprint,
    spool: SpoolHandle,
    rules: Rules,
    grants: Grants,
}

/// How a reload treats one peer.
enum PeerPlan {
    Keep,
    /// Only the send rules changed: a new forwarder with these rules.
    Forwarder(Rules),
    /// New or changed: a new link.
    Start(PreparedPeer),
}

impl Gateway {
    /// Starts every task of `model`. Must be called inside a tokio runtime. Fails only
    /// on what it needs from the machine (the Modbus-TCP server socket; for peer links
    /// the identity, data directory, spool files and listening socket; the PLC spools);
    /// then nothing has been started.
    pub fn start(model: &Model, shutdown: CancellationToken) -> Result<Self, GatewayError> {
        let empty = Model {
            gateway: model.gateway.clone(),
            buses: Vec::new(),
            links: None,
            server: None,
            plcs: Vec::new(),
            http: None,
        };
        // Bound first: a taken port fails the start before anything runs.
        let http = model.http.as_ref().map(crate::http::prepare).transpose()?.flatten();
        let mut gateway = Self {
            image: Arc::new(Image::new()),
            buses: Vec::new(),
            serial: Arc::default(),
            server_addr: None,
            writer: Writer::default(),
            links: Vec::new(),
            plcs: Vec::new(),
            tunnels: Vec::new(),
            devices: Vec::new(),
            server_stats: None,
            http_addr: None,
            listen_addr: None,
            shutdown,
            tracker: TaskTracker::new(),
            model: empty,
            parts: Parts::default(),
            started: std::time::SystemTime::now(),
        };
        let prepared = gateway.prepare(model)?;
        gateway.apply(model, prepared, &mut Changes::default());
        gateway.model = model.clone();
        gateway.start_http(model, http);
        gateway.tracker.spawn(sweep(gateway.image.clone(), gateway.shutdown.clone()));
        info!(
            gateway = %model.gateway.name,
            buses = model.buses.len(),
            points = gateway.image.len(),
            peers = gateway.links.len(),
            plcs = gateway.plcs.len(),
            server = %gateway.server_addr.map_or("none".to_string(), |a| a.to_string()),
            http = %gateway.http_addr.map_or("none".to_string(), |a| a.to_string()),
            "gateway started"
        );
        Ok(gateway)
    }

    /// The configuration running now.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Applies a new, validated configuration: only what changed is stopped and started
    /// again. The rules:
    /// - a bus whose settings changed restarts (its line is closed and reopened); a bus
    ///   whose devices alone changed keeps its line and engine, and only its poller
    ///   restarts; an unchanged bus is not touched (no gap in its polls);
    /// - the points of a removed device (or bus) stay known and are marked `comm_fail`,
    ///   so masters and peers see they are no longer read;
    /// - the writer and the Modbus-TCP server's unit table are swapped in place; the
    ///   server's socket and its masters' connections stay (a changed `listen` or
    ///   `max_connections` rebinds it);
    /// - a peer whose settings (or our name, identity or data directory) changed
    ///   reconnects; a peer whose send rules alone changed keeps its link and gets a new
    ///   forwarder; an unchanged peer stays connected; spools stay open and keep their
    ///   backlog (a spool's limits change at the next restart);
    /// - the peer listener keeps its socket and swaps who may dial in (a changed
    ///   `listen` rebinds it);
    /// - a tunnel restarts when it or its peer's link changed; a PLC sink when it changed;
    /// - `worker_threads` takes effect at the next restart.
    ///
    /// Everything that can fail (identity, spools, sockets) is opened before anything
    /// is stopped: on an error the old configuration keeps running untouched.
    pub async fn reload(&mut self, model: &Model) -> Result<Changes, GatewayError> {
        let prepared = self.prepare(model)?;
        let mut changes = Changes::default();
        self.stop_changed(model, &prepared, &mut changes).await;
        self.apply(model, prepared, &mut changes);
        if self.model.gateway.worker_threads != model.gateway.worker_threads {
            changes.updated.push("worker_threads: takes effect at the next restart".into());
        }
        self.model = model.clone();
        // The HTTP endpoint shows what runs now: it restarts on its port (a moment without
        // it; its socket cannot be bound twice). Failing to bind keeps everything else.
        if let Some(http) = self.parts.http.take() {
            http.stop("http endpoint").await;
        }
        self.http_addr = None;
        match model.http.as_ref().map(crate::http::prepare).transpose() {
            Ok(http) => self.start_http(model, http.flatten()),
            Err(e) => error!(error = %e, "http endpoint not restarted after the reload"),
        }
        Ok(changes)
    }

    /// Starts the HTTP endpoint on `prepared`'s socket, observing what runs now.
    fn start_http(&mut self, model: &Model, prepared: Option<crate::http::Prepared>) {
        let Some(prepared) = prepared else {
            return;
        };
        let part = Part::new(&self.shutdown);
        let (points, ports) = Observed::describe(model);
        let seen = Observed {
            name: model.gateway.name.clone(),
            started: self.started,
            image: self.image.clone(),
            buses: self.buses.clone(),
            devices: self.devices.clone(),
            links: self.links.clone(),
            plcs: self.plcs.clone(),
            tunnels: self.tunnels.clone(),
            server: self.server_addr.zip(self.server_stats.clone()),
            writer: self.writer.clone(),
            points,
            ports,
        };
        self.http_addr = crate::http::spawn(prepared, seen, &part.token, &part.tracker);
        self.parts.http = Some(part);
    }

    /// Opens what the new configuration needs from the machine and compiles what can
    /// fail, without touching anything that runs.
    fn prepare(&self, new: &Model) -> Result<Prepared, GatewayError> {
        let old = &self.model;
        // The Modbus-TCP server: a new socket only when the address or the limit changed.
        let server_socket = match (&new.server, &self.parts.server) {
            (Some(cfg), Some(running)) if cfg.listen == running.config.listen => None,
            (Some(cfg), _) => Some(server::listen(cfg)?),
            (None, _) => None,
        };
        let plc_spools = self.open_plc_spools(new)?;
        let Some(links) = &new.links else {
            return Ok(Prepared { server_socket, plc_spools, links: None });
        };
        let links_same = links_settings(old) == links_settings(new);
        let identity = match (&self.parts.identity, links_same) {
            (Some(id), true) => id.clone(),
            _ => tls::load_identity(&links.identity_dir).map_err(|source| GatewayError::Identity {
                dir: links.identity_dir.display().to_string(),
                source,
            })?,
        };
        std::fs::create_dir_all(&links.data_dir)
            .map_err(|source| GatewayError::DataDir { dir: links.data_dir.display().to_string(), source })?;
        let mut peers = Vec::new();
        for p in &links.peers {
            let bad = |reason: String| GatewayError::Peer { peer: p.name.clone(), reason };
            let running = self.parts.peers.iter().find(|r| r.model.name == p.name);
            let rules = || Rules::new(&p.send);
            let plan = match running {
                Some(r)
                    if links_same
                        && same(&link_settings(&r.model), &link_settings(p))
                        && sinks_key(old, &p.name) == sinks_key(new, &p.name) =>
                {
                    if same(&r.model.send, &p.send) { PeerPlan::Keep } else { PeerPlan::Forwarder(rules()) }
                }
                _ => {
                    let fingerprint: Fingerprint = p.fingerprint.parse().map_err(|e| bad(format!("{e}")))?;
                    // A spool already open stays open (its backlog is kept).
                    let spool = match running.filter(|r| r.model.spool == p.spool) {
                        Some(r) => r.spool.clone(),
                        None => {
                            let limits =
                                SpoolLimits { max_bytes: p.spool_max_bytes, max_age: p.spool_max_age };
                            SpoolHandle::open(&p.spool, limits).map_err(|e| bad(e.to_string()))?
                        }
                    };
                    let grants = Grants::new(&p.grants);
                    PeerPlan::Start(PreparedPeer { fingerprint, spool, rules: rules(), grants })
                }
            };
            peers.push(plan);
        }
        let listen_socket = match (links.listen, &self.parts.listener) {
            (Some(addr), Some(_)) if old.links.as_ref().and_then(|o| o.listen) == Some(addr) => None,
            (Some(addr), _) => {
                let listen = |source| GatewayError::Listen { addr, source };
                let std = std::net::TcpListener::bind(addr).map_err(listen)?;
                std.set_nonblocking(true).map_err(listen)?;
                Some(tokio::net::TcpListener::from_std(std).map_err(listen)?)
            }
            (None, _) => None,
        };
        Ok(Prepared {
            server_socket,
            plc_spools,
            links: Some(PreparedLinks { identity, links_same, peers, listen_socket }),
        })
    }

    /// The spools of the `[[plc]]` sinks that (re)start: a spool already open is kept.
    fn open_plc_spools(&self, model: &Model) -> Result<Vec<Option<SpoolHandle>>, GatewayError> {
        model
            .plcs
            .iter()
            .map(|p| {
                let running = self.parts.plcs.iter().find(|r| r.model.name == p.name);
                if running.is_some_and(|r| same(&r.model, p)) {
                    return Ok(None); // kept as it runs
                }
                if let Some(r) = running.filter(|r| r.model.spool == p.spool) {
                    return Ok(Some(r.handle.spool.clone()));
                }
                let bad = |reason: String| GatewayError::Plc { plc: p.name.clone(), reason };
                if let Some(dir) = p.spool.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
                }
                let limits = SpoolLimits { max_bytes: p.spool_max_bytes, max_age: p.spool_max_age };
                SpoolHandle::open(&p.spool, limits).map(Some).map_err(|e| bad(e.to_string()))
            })
            .collect()
    }

    /// Stops what the new configuration removes or changes, consumers first.
    async fn stop_changed(&mut self, new: &Model, prepared: &Prepared, changes: &mut Changes) {
        let parts = &mut self.parts;
        // Peers that reconnect or go.
        let restarting_peer = |name: &str| match &prepared.links {
            None => true,
            Some(l) => match new.links.as_ref().and_then(|n| n.peers.iter().position(|p| p.name == name)) {
                Some(i) => matches!(l.peers[i], PeerPlan::Start(_)),
                None => true,
            },
        };
        let new_tunnels: &[Tunnel] = new.links.as_ref().map_or(&[], |l| &l.tunnels);
        let mut kept = Vec::new();
        for t in std::mem::take(&mut parts.tunnels) {
            let next = new_tunnels.iter().find(|n| n.name == t.model.name);
            match next {
                Some(n) if same(n, &t.model) && !restarting_peer(&t.model.peer) => kept.push(t),
                Some(n) => {
                    t.part.stop(&format!("tunnel {}", t.model.name)).await;
                    let why =
                        if same(n, &t.model) { "its peer's link restarts" } else { "its settings changed" };
                    changes.restarted.push(format!("tunnel {}: {why}", t.model.name));
                }
                None => {
                    t.part.stop(&format!("tunnel {}", t.model.name)).await;
                    changes.removed.push(format!("tunnel {}", t.model.name));
                }
            }
        }
        parts.tunnels = kept;
        let mut kept = Vec::new();
        for p in std::mem::take(&mut parts.peers) {
            let name = p.model.name.clone();
            let index = new.links.as_ref().and_then(|n| n.peers.iter().position(|x| x.name == name));
            let plan = prepared.links.as_ref().zip(index).map(|(l, i)| &l.peers[i]);
            match plan {
                Some(PeerPlan::Keep) => kept.push(p),
                Some(PeerPlan::Forwarder(_)) => {
                    p.forwarder.stop(&format!("forwarder to {name}")).await;
                    changes.restarted.push(format!("forwarder to peer {name}: its send rules changed"));
                    kept.push(p);
                }
                Some(PeerPlan::Start(_)) => {
                    p.forwarder.stop(&format!("forwarder to {name}")).await;
                    p.part.stop(&format!("link to {name}")).await;
                    let why = if prepared.links.as_ref().is_some_and(|l| l.links_same) {
                        "its settings changed"
                    } else {
                        "the gateway name, identity or data directory changed"
                    };
                    changes.restarted.push(format!("link to peer {name}: {why}"));
                    // Kept in the list until `apply` takes its spool.
                    kept.push(p);
                }
                None => {
                    p.forwarder.stop(&format!("forwarder to {name}")).await;
                    p.part.stop(&format!("link to {name}")).await;
                    changes.removed.push(format!("link to peer {name}"));
                }
            }
        }
        parts.peers = kept;
        let mut kept = Vec::new();
        for p in std::mem::take(&mut parts.plcs) {
            match new.plcs.iter().find(|n| n.name == p.model.name) {
                Some(n) if same(n, &p.model) => kept.push(p),
                Some(_) => {
                    p.part.stop(&format!("plc {}", p.model.name)).await;
                    changes.restarted.push(format!("plc {}: its settings changed", p.model.name));
                }
                None => {
                    p.part.stop(&format!("plc {}", p.model.name)).await;
                    changes.removed.push(format!("plc {}", p.model.name));
                }
            }
        }
        parts.plcs = kept;
        let server_changes = prepared.server_socket.is_some() || new.server.is_none();
        if server_changes && let Some(s) = parts.server.take() {
            s.part.stop("modbus-tcp server").await;
            match &new.server {
                Some(_) => changes
                    .restarted
                    .push(format!("modbus-tcp server: its listen address changed (was {})", s.addr)),
                None => changes.removed.push(format!("modbus-tcp server on {}", s.addr)),
            }
        }
        let listen_changes = prepared.links.as_ref().is_none_or(|l| l.listen_socket.is_some())
            || new.links.as_ref().and_then(|l| l.listen).is_none();
        if listen_changes && let Some(l) = parts.listener.take() {
            l.part.stop("peer listener").await;
            changes.removed.push(format!("peer listener on {}", l.addr));
        }
        let mut kept = Vec::new();
        for mut b in std::mem::take(&mut parts.buses) {
            let name = b.model.name.clone();
            match new.buses.iter().find(|n| n.name == name) {
                Some(n) if same(n, &b.model) => kept.push(b),
                Some(n) if same(&bus_settings(n), &bus_settings(&b.model)) && b.poller.is_some() => {
                    if let Some(poller) = b.poller.take() {
                        poller.stop(&format!("poller of bus {name}")).await;
                    }
                    fail_removed_points(&self.image, &b.model, Some(n));
                    changes
                        .restarted
                        .push(format!("poller of bus {name}: its devices changed (the line stays open)"));
                    kept.push(b);
                }
                next => {
                    if let Some(poller) = &b.poller {
                        poller.stop(&format!("poller of bus {name}")).await;
                    }
                    b.part.stop(&format!("bus {name}")).await;
                    fail_removed_points(&self.image, &b.model, next);
                    match next {
                        Some(_) => changes.restarted.push(format!("bus {name}: its settings changed")),
                        None => changes.removed.push(format!("bus {name}")),
                    }
                }
            }
        }
        parts.buses = kept;
    }

    /// Starts what is not running, swaps the tables of what is, and lists the result in
    /// model order. `changes` gains the components added.
    fn apply(&mut self, new: &Model, prepared: Prepared, changes: &mut Changes) {
        let every = new.gateway.summary_interval;
        let shutdown = self.shutdown.clone();
        let image = self.image.clone();
        // Buses, in model order: kept ones as they run, the others started.
        let mut old = std::mem::take(&mut self.parts.buses);
        for bus in &new.buses {
            match old.iter().position(|b| b.model.name == bus.name) {
                Some(i) => {
                    let mut b = old.remove(i);
                    if b.poller.is_none()
                        && let Some(handle) = &b.handle
                        && bus.protocol != Protocol::Raw
                    {
                        let (part, health) = start_poller(bus, handle, &image, &b.part.token);
                        b.poller = Some(part);
                        b.devices = health;
                    }
                    b.model = bus.clone();
                    self.parts.buses.push(b);
                }
                None => {
                    if self.model.buses.iter().any(|b| b.name == bus.name) {
                        // Stopped because it changed: already listed as restarted.
                    } else {
                        changes.added.push(format!("bus {}", bus.name));
                    }
                    self.parts.buses.push(start_bus(bus, &image, every, &shutdown));
                }
            }
        }
        self.buses = self.parts.buses.iter().filter_map(|b| b.handle.clone()).collect();
        self.devices = self.parts.buses.iter().flat_map(|b| b.devices.iter().cloned()).collect();
        let mut serial = SerialDevices::new();
        for b in &self.parts.buses {
            serial.extend(&b.serial);
        }
        self.serial = Arc::new(serial);
        self.writer.replace(&Writer::new(new, &self.buses).with_commands(self.serial.clone()));

        // The spool of every PLC sink of the new configuration (the links feed received
        // points to them): a kept sink's, or the one opened for a sink that (re)starts.
        let plc_spools: Vec<SpoolHandle> = new
            .plcs
            .iter()
            .zip(&prepared.plc_spools)
            .filter_map(|(p, spool)| match spool {
                Some(s) => Some(s.clone()),
                None => {
                    self.parts.plcs.iter().find(|r| r.model.name == p.name).map(|r| r.handle.spool.clone())
                }
            })
            .collect();
        // Peers.
        let mut old = std::mem::take(&mut self.parts.peers);
        if let (Some(links), Some(prep)) = (&new.links, prepared.links) {
            for (peer, plan) in links.peers.iter().zip(prep.peers) {
                let running = old.iter().position(|p| p.model.name == peer.name).map(|i| old.remove(i));
                let ctx = LinkCtx {
                    model: new,
                    plc_spools: &plc_spools,
                    local_name: &new.gateway.name,
                    identity: &prep.identity,
                    image: &image,
                    writer: &self.writer,
                    every,
                    shutdown: &shutdown,
                };
                match (plan, running) {
                    (PeerPlan::Keep, Some(mut p)) => {
                        p.model = peer.clone();
                        self.parts.peers.push(p);
                    }
                    (PeerPlan::Forwarder(rules), Some(mut p)) => {
                        p.forwarder = start_forwarder(
                            peer,
                            rules,
                            &image,
                            p.spool.clone(),
                            p.connected.clone(),
                            &shutdown,
                        );
                        p.model = peer.clone();
                        self.parts.peers.push(p);
                    }
                    (PeerPlan::Start(prepared), running) => {
                        if running.is_none() {
                            changes.added.push(format!("link to peer {}", peer.name));
                        }
                        drop(running);
                        if let Some(p) = start_peer(&ctx, peer, prepared) {
                            self.parts.peers.push(p);
                        }
                    }
                    (_, None) => {
                        error!(peer = %peer.name, "internal: a kept link is not running; link not started");
                    }
                }
            }
            // The listener: a new socket, or the running one with new tables.
            let accepting = accepting(links, &prep.identity, &self.parts.peers);
            match (prep.listen_socket, &self.parts.listener) {
                (Some(socket), _) => {
                    let part = Part::new(&shutdown);
                    let addr = socket
                        .local_addr()
                        .unwrap_or_else(|_| links.listen.unwrap_or(([0, 0, 0, 0], 0).into()));
                    if accepting.tls.is_none() {
                        warn!(
                            "no peer is configured to dial in: connections to {addr} are refused until one is"
                        );
                    }
                    info!("listening for peers on {addr}");
                    let tables = AcceptTables::new(accepting);
                    let l = Listener { socket, tables: tables.clone() };
                    part.tracker.spawn(l.run(part.token.clone(), part.tracker.clone()));
                    changes.added.push(format!("peer listener on {addr}"));
                    self.parts.listener = Some(ListenerPart { part, addr, tables });
                }
                (None, Some(l)) => l.tables.replace(accepting),
                (None, None) => {}
            }
            self.parts.identity = Some(prep.identity);
        } else {
            self.parts.identity = None;
        }
        drop(old);
        self.links = self.parts.peers.iter().map(|p| (p.model.name.clone(), p.handle.clone())).collect();
        self.listen_addr = self.parts.listener.as_ref().map(|l| l.addr);

        // Tunnels, on their peers' links.
        let mut old = std::mem::take(&mut self.parts.tunnels);
        for t in new.links.iter().flat_map(|l| &l.tunnels) {
            if let Some(i) = old.iter().position(|r| r.model.name == t.name) {
                self.parts.tunnels.push(old.remove(i));
                continue;
            }
            if !self.model.links.iter().flat_map(|l| &l.tunnels).any(|o| o.name == t.name) {
                changes.added.push(format!("tunnel {}", t.name));
            }
            match self.parts.peers.iter().find(|p| p.model.name == t.peer) {
                Some(p) => {
                    let part = Part::new(&shutdown);
                    let handle =
                        tunnel::spawn(t, p.handle.tunnels().clone(), part.token.clone(), &part.tracker);
                    let counts = handle.clone();
                    part.tracker.spawn(
                        summarise(every, part.token.clone(), move || counts.stats(), tunnel::summary)
                            .instrument(info_span!("tunnel", tunnel = %t.name)),
                    );
                    self.parts.tunnels.push(TunnelPart { model: t.clone(), part, handle });
                }
                None => {
                    error!(tunnel = %t.name, peer = %t.peer, "the link to the peer did not start; tunnel not started")
                }
            }
        }
        self.tunnels = self.parts.tunnels.iter().map(|t| t.handle.clone()).collect();

        // PLC sinks.
        let mut old = std::mem::take(&mut self.parts.plcs);
        for (p, spool) in new.plcs.iter().zip(prepared.plc_spools) {
            let Some(spool) = spool else {
                if let Some(i) = old.iter().position(|r| r.model.name == p.name) {
                    self.parts.plcs.push(old.remove(i));
                }
                continue;
            };
            if !self.model.plcs.iter().any(|o| o.name == p.name) {
                changes.added.push(format!("plc {}", p.name));
            }
            let part = Part::new(&shutdown);
            let h = plc::start(p, image.clone(), spool, &part.token, &part.tracker);
            let counts = h.clone();
            part.tracker.spawn(
                summarise(every, part.token.clone(), move || counts.counts(), plc::summary)
                    .instrument(info_span!("plc", plc = %p.name)),
            );
            self.parts.plcs.push(PlcPart { model: p.clone(), part, handle: h });
        }
        self.plcs = self.parts.plcs.iter().map(|p| p.handle.clone()).collect();

        // The Modbus-TCP server: a new socket, or the running one with new tables.
        let owners = self.owners();
        match (&new.server, prepared.server_socket, &mut self.parts.server) {
            (Some(config), Some(socket), _) => {
                let part = Part::new(&shutdown);
                let server = Server::new(socket, config, new, &self.buses, image.clone(), owners);
                let addr = server.local_addr();
                let tables = server.tables();
                let stats = server.stats();
                part.tracker.spawn(server.run(part.token.clone(), part.tracker.clone()));
                if self.model.server.is_none() {
                    changes.added.push(format!("modbus-tcp server on {addr}"));
                }
                self.parts.server = Some(ServerPart { config: config.clone(), part, tables, addr, stats });
            }
            (Some(config), None, Some(running)) => {
                running.tables.replace(config, new, &self.buses, owners);
                if !same(config, &running.config) || !same(&new.buses, &self.model.buses) {
                    changes.updated.push("modbus-tcp server: unit table swapped (connections kept)".into());
                }
                if config.max_connections != running.config.max_connections {
                    changes
                        .updated
                        .push("modbus-tcp server: max_connections takes effect at the next restart".into());
                }
                running.config = config.clone();
            }
            _ => {}
        }
        self.server_addr = self.parts.server.as_ref().map(|s| s.addr);
        self.server_stats = self.parts.server.as_ref().map(|s| s.stats.clone());
        if !same(&new.buses, &self.model.buses) && !self.model.buses.is_empty() {
            changes.updated.push("writer: point table swapped".into());
        }
    }

    /// A one-line summary for the service manager (`systemctl status`): buses, devices
    /// answering (a device answers when one of its points is good now), links up.
    pub fn status(&self) -> String {
        let names = |b: &Bus| -> Vec<Vec<String>> {
            let modbus = b.devices.iter().map(|d| d.points.iter().map(|p| p.name.clone()).collect());
            let raw = b.raw_devices.iter().map(|d| d.points.iter().map(|p| p.name.clone()).collect());
            modbus.chain(raw).collect()
        };
        let devices: Vec<Vec<String>> = self.model.buses.iter().flat_map(names).collect();
        let up = devices
            .iter()
            .filter(|points| {
                points.iter().any(|p| self.image.get(p).is_some_and(|s| s.quality == Quality::Good))
            })
            .count();
        let links_up = self.links.iter().filter(|(_, l)| l.stats().connected).count();
        let mut line = format!(
            "{} buses, {up}/{} devices answering, {links_up}/{} links up",
            self.model.buses.len(),
            devices.len(),
            self.links.len()
        );
        if !self.plcs.is_empty() {
            line += &format!(", {} plc sinks", self.plcs.len());
        }
        line
    }

    /// True once every bus has tried to open its port at least once (open, or retrying).
    pub fn buses_tried(&self) -> bool {
        self.buses.iter().all(|b| b.stats().open_attempts.load(std::sync::atomic::Ordering::Relaxed) > 0)
    }

    /// What the server's virtual units write through: the writer, and the links now.
    fn owners(&self) -> Arc<dyn Owners> {
        let links = self.parts.peers.iter().map(|p| (p.model.name.clone(), p.handle.clone())).collect();
        Arc::new(PointOwners { writer: self.writer.clone(), links })
    }

    /// The bound address of the peer listener (`None`: no listener configured).
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen_addr
    }

    /// The link to `peer`.
    pub fn link(&self, peer: &str) -> Option<&LinkHandle> {
        self.links.iter().find(|(n, _)| n == peer).map(|(_, h)| h)
    }

    /// The serial tunnel named `name`.
    pub fn tunnel(&self, name: &str) -> Option<&TunnelHandle> {
        self.tunnels.iter().find(|t| t.name() == name)
    }

    /// Waits for the shutdown token, then for every task to stop (at most `grace`).
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        let trackers: Vec<TaskTracker> =
            self.parts.all().map(|p| p.tracker.clone()).chain([self.tracker.clone()]).collect();
        let all = futures::future::join_all(trackers.iter().map(|t| {
            t.close();
            t.wait()
        }));
        if tokio::time::timeout(grace, all).await.is_err() {
            warn!(grace = %humantime::format_duration(grace), "tasks still running after the grace period; leaving them");
        }
    }
}

/// What [`Gateway::prepare`] opened and compiled.
struct Prepared {
    server_socket: Option<tokio::net::TcpListener>,
    /// Per `[[plc]]` in model order: the spool of a sink that (re)starts, `None` for one
    /// kept as it runs.
    plc_spools: Vec<Option<SpoolHandle>>,
    links: Option<PreparedLinks>,
}

struct PreparedLinks {
    identity: tls::Identity,
    /// Our name, identity and data directory are unchanged.
    links_same: bool,
    /// Per peer in model order.
    peers: Vec<PeerPlan>,
    /// A new listening socket (`None`: none configured, or the running one is kept).
    listen_socket: Option<tokio::net::TcpListener>,
}

/// Marks `comm_fail` the points of `old`'s devices that `new` no longer has.
fn fail_removed_points(image: &Image, old: &Bus, new: Option<&Bus>) {
    let kept = |name: &str| {
        new.is_some_and(|n| {
            n.devices.iter().flat_map(|d| &d.points).any(|p| p.name == name)
                || n.raw_devices.iter().flat_map(|d| &d.points).any(|p| p.name == name)
        })
    };
    let names = old
        .devices
        .iter()
        .flat_map(|d| d.points.iter().map(|p| p.name.as_str()))
        .chain(old.raw_devices.iter().flat_map(|d| d.points.iter().map(|p| p.name.as_str())));
    let ids: Vec<_> = names.filter(|n| !kept(n)).filter_map(|n| image.id(n)).collect();
    image.fail(ids, Quality::CommFail);
}

/// Starts a bus: its engine (or a raw bus's tasks) and summary under a new part.
fn start_bus(bus: &Bus, image: &Arc<Image>, every: Duration, parent: &CancellationToken) -> BusPart {
    let part = Part::new(parent);
    let mut serial = SerialDevices::new();
    let mut poller = None;
    let mut devices = Vec::new();
    let handle = if bus.protocol == Protocol::Raw {
        // A stream bus has a stream task and no bus task (nothing is ever sent).
        raw::start(bus, image, &mut serial, &part.token, &part.tracker)
    } else {
        let handle = bus::spawn(bus, part.token.clone(), &part.tracker);
        let (part, health) = start_poller(bus, &handle, image, &part.token);
        poller = Some(part);
        devices = health;
        Some(handle)
    };
    if let Some(handle) = &handle {
        let stats = handle.clone();
        part.tracker.spawn(
            summarise(every, part.token.clone(), move || stats.stats().snapshot(), bus::summary)
                .instrument(info_span!("bus", bus = %bus.name)),
        );
    }
    BusPart { model: bus.clone(), part, handle, poller, serial, devices }
}

/// Starts the poller of a Modbus bus under a part of its own (a child of the bus's).
fn start_poller(
    bus: &Bus,
    handle: &BusHandle,
    image: &Arc<Image>,
    parent: &CancellationToken,
) -> (Part, Vec<Arc<DeviceHealth>>) {
    let part = Part::new(parent);
    let poller = Poller::new(bus, handle.clone(), image.clone());
    let health = poller.health();
    part.tracker.spawn(poller.run(part.token.clone()));
    (part, health)
}

/// What every link shares.
struct LinkCtx<'a> {
    model: &'a Model,
    /// The spool of every `[[plc]]` of `model`, in model order.
    plc_spools: &'a [SpoolHandle],
    local_name: &'a str,
    identity: &'a tls::Identity,
    image: &'a Arc<Image>,
    writer: &'a Writer,
    every: Duration,
    shutdown: &'a CancellationToken,
}

/// Starts a peer's link, write-backs, forwarder and summary (`None`: the TLS client
/// could not be built; logged).
fn start_peer(ctx: &LinkCtx<'_>, peer: &Peer, p: PreparedPeer) -> Option<PeerPart> {
    let mut route = None;
    let dialer = match &peer.dial {
        Dial::Connect(addr) => match tls::client_config(ctx.identity, p.fingerprint) {
            Ok(tls) => Dialer::Connect { addr: addr.clone(), tls },
            Err(e) => {
                error!(peer = %peer.name, error = %e, "cannot build the tls client; link not started");
                return None;
            }
        },
        Dial::Accept => {
            let (tx, rx) = mpsc::channel(2);
            route = Some((p.fingerprint, tx));
            Dialer::Accept(rx)
        }
    };
    let part = Part::new(ctx.shutdown);
    let (connected, connected_rx) = watch::channel(false);
    let wb = WriteBacks::new(&peer.name, &peer.writeback, ctx.writer.clone(), connected_rx.clone());
    let offer = wb.offer();
    if !offer.is_empty() {
        part.tracker.spawn(wb.run(part.token.clone()));
    }
    let forwarder =
        start_forwarder(peer, p.rules, ctx.image, p.spool.clone(), connected_rx.clone(), ctx.shutdown);
    let handle = link::spawn(
        Link {
            local_name: ctx.local_name.to_string(),
            peer: peer.clone(),
            image: ctx.image.clone(),
            writer: ctx.writer.clone(),
            spool: p.spool.clone(),
            grants: p.grants,
            writeback: offer,
            connected,
            max_frame: crate::link::proto::DEFAULT_MAX_FRAME,
            sinks: received_sinks(ctx.model, &peer.name, ctx.plc_spools),
        },
        dialer,
        part.token.clone(),
        &part.tracker,
    );
    let stats = handle.clone();
    part.tracker.spawn(
        summarise(ctx.every, part.token.clone(), move || stats.stats(), link::summary)
            .instrument(info_span!("link", peer = %peer.name)),
    );
    Some(PeerPart {
        model: peer.clone(),
        part,
        forwarder,
        handle,
        spool: p.spool,
        connected: connected_rx,
        route,
    })
}

/// Starts the forwarder of a peer (image changes into its spool) under a part of its own.
fn start_forwarder(
    peer: &Peer,
    rules: Rules,
    image: &Arc<Image>,
    spool: SpoolHandle,
    connected: watch::Receiver<bool>,
    parent: &CancellationToken,
) -> Part {
    let part = Part::new(parent);
    let fwd = Forwarder::new(&peer.name, rules, image.clone(), spool).resend_on_connect(connected);
    part.tracker.spawn(fwd.run(part.token.clone()));
    part
}

/// What virtual units write through: the writer for local points, the peer links for
/// received points (`peer/point`).
struct PointOwners {
    writer: Writer,
    links: HashMap<String, LinkHandle>,
}

impl Owners for PointOwners {
    fn write(&self, point: &str, value: Value) -> BoxFuture<'static, Result<(), WriteFailure>> {
        let Some((peer, remote)) = point.split_once('/') else {
            let (writer, point) = (self.writer.clone(), point.to_string());
            return Box::pin(async move {
                writer.write(&point, &value).await.map_err(|e| match e {
                    WriteError::UnknownPoint(_) | WriteError::ReadOnly { .. } => {
                        WriteFailure::NotWritable(e.to_string())
                    }
                    WriteError::Encode { .. } => WriteFailure::BadValue(e.to_string()),
                    _ => WriteFailure::Unavailable(e.to_string()),
                })
            });
        };
        let Some(link) = self.links.get(peer).cloned() else {
            let why = format!("no [[peer]] {peer:?} to carry the write to the point's owner");
            return Box::pin(async move { Err(WriteFailure::NoPath(why)) });
        };
        let remote = remote.to_string();
        Box::pin(async move {
            link.write(&remote, value).await.map_err(|e| {
                let text = e.to_string();
                match e {
                    PeerWriteError::Refused { reason, .. }
                        if reason.contains("outside the granted range") =>
                    {
                        WriteFailure::BadValue(text)
                    }
                    PeerWriteError::Refused { .. } => WriteFailure::NotWritable(text),
                    PeerWriteError::Busy { .. } => WriteFailure::Busy(text),
                    PeerWriteError::Failed { .. } => WriteFailure::Failed(text),
                    PeerWriteError::Down { .. }
                    | PeerWriteError::Lost { .. }
                    | PeerWriteError::Timeout { .. } => WriteFailure::Unavailable(text),
                }
            })
        })
    }

    fn link_up(&self, peer: &str) -> bool {
        self.links.get(peer).is_some_and(LinkHandle::is_connected)
    }
}

/// The PLCs that map points received from `peer`, as sinks of its link.
fn received_sinks(model: &Model, peer: &str, plc_spools: &[SpoolHandle]) -> Vec<ReceivedSink> {
    model
        .plcs
        .iter()
        .zip(plc_spools)
        .filter_map(|(p, spool)| {
            let points: HashSet<String> = p
                .map
                .iter()
                .flat_map(|m| &m.targets)
                .filter(|t| t.received().is_some_and(|(from, _)| from == peer))
                .map(|t| t.point.clone())
                .collect();
            (!points.is_empty()).then(|| ReceivedSink {
                name: format!("plc {}", p.name),
                points,
                spool: spool.clone(),
            })
        })
        .collect()
}

/// What a peer's link feeds to PLC sinks (the PLCs that map points received from it),
/// as a comparable key: a change restarts the link.
fn sinks_key(model: &Model, peer: &str) -> Vec<(String, std::path::PathBuf, Vec<String>)> {
    let mut sinks: Vec<(String, std::path::PathBuf, Vec<String>)> = model
        .plcs
        .iter()
        .filter_map(|p| {
            let mut points: Vec<String> = p
                .map
                .iter()
                .flat_map(|m| &m.targets)
                .filter(|t| t.received().is_some_and(|(from, _)| from == peer))
                .map(|t| t.point.clone())
                .collect();
            points.sort();
            (!points.is_empty()).then(|| (p.name.clone(), p.spool.clone(), points))
        })
        .collect();
    sinks.sort();
    sinks
}

/// The listener's tables for `peers`: each dialing-in peer's route, pinned by TLS.
fn accepting(links: &Links, identity: &tls::Identity, peers: &[PeerPart]) -> Accepting {
    let routes: Routes = peers
        .iter()
        .filter_map(|p| p.route.as_ref().map(|(fp, tx)| (*fp, (p.model.name.clone(), tx.clone()))))
        .collect();
    let pins: Vec<Fingerprint> = routes.keys().copied().collect();
    let tls = if pins.is_empty() {
        None
    } else {
        match tls::server_config(identity, pins) {
            Ok(tls) => Some(tls),
            Err(e) => {
                error!(error = %e, "cannot build the tls server; peers cannot dial in");
                None
            }
        }
    };
    Accepting { allow: links.allow.clone(), tls, routes }
}

/// Logs a one-line summary every `every` (a bus, a link, a PLC, a tunnel): `line` of the
/// counters now, the counters at the last summary, and the time between.
async fn summarise<S>(
    every: Duration,
    shutdown: CancellationToken,
    snapshot: impl Fn() -> S,
    line: impl Fn(&S, &S, Duration) -> String,
) {
    let mut last = snapshot();
    let mut last_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        let counts = snapshot();
        info!("{}", line(&counts, &last, now - last_at));
        last = counts;
        last_at = now;
    }
}

/// Publishes good-to-stale transitions once a second.
async fn sweep(image: Arc<Image>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => { image.sweep_stale(); }
            () = shutdown.cancelled() => return,
        }
    }
}
