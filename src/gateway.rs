//! Wires a validated model into running tasks: one bus task and one poller per serial
//! line (a raw poller on raw buses, a stream task instead of both on a stream bus, see
//! `rawpoll`), the periodic summaries, the local Modbus-TCP server when `[server]` is
//! configured, for peer links the identity, the spools, the listener and per peer a
//! forwarder, a link and its write-backs, a task per serial tunnel on its peer's link, and
//! per `[[plc]]` a spool, a forwarder and a sender (`plc`) — all under one shutdown token
//! and one task tracker.
//!
//! This file holds the gateway, its parts and its life cycle (start, reload's outline,
//! status, shutdown); `reload` compares models and stops what changed; `wiring`
//! starts the tasks.
//!
//! Invariant: every task spawned here watches the shutdown token and is tracked, so
//! [`Gateway::shutdown`] returns once everything has stopped (or the grace period ran out).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::bus::BusHandle;
use crate::config;
use crate::image::Image;
use crate::link::listener::AcceptTables;
use crate::link::tls::{self, Fingerprint, TlsError};
use crate::link::tunnel::TunnelHandle;
use crate::link::{self, LinkHandle};
use crate::model::{self, Bus, Model, Peer, Plc, Tunnel};
use crate::plc::PlcHandle;
use crate::point::value::Quality;
use crate::poll::modbus::DeviceHealth;
use crate::poll::raw::SerialDevices;
use crate::server::{self, Owners, ServerError, ServerStats};
use crate::sockets::Sockets;
use crate::spool::SpoolHandle;
use crate::writer::Writer;

mod reload;
mod wiring;

use wiring::{PointOwners, sweep};

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
    /// Two sections would listen on one socket the service manager handed over.
    #[error("socket activation: {0}")]
    SharedSocket(String),
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
    /// Listening sockets handed over already bound, taken by address.
    sockets: Sockets,
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

impl Gateway {
    /// Starts every task of `model`, binding every listening socket itself. Must be called
    /// inside a tokio runtime. Fails only on what it needs from the machine (the Modbus-TCP
    /// server socket; for peer links the identity, data directory, spool files and
    /// listening socket; the PLC spools); then nothing has been started.
    pub fn start(model: &Model, shutdown: CancellationToken) -> Result<Self, GatewayError> {
        Self::start_on(model, Sockets::default(), shutdown)
    }

    /// As [`Gateway::start`], with listening sockets already bound (by the service manager,
    /// or by the caller): a `listen` address that one of `sockets` is bound to uses it,
    /// now and after every reload, and is never bound a second time.
    pub fn start_on(
        model: &Model,
        sockets: Sockets,
        shutdown: CancellationToken,
    ) -> Result<Self, GatewayError> {
        let empty = Model {
            gateway: model.gateway.clone(),
            buses: Vec::new(),
            links: None,
            server: None,
            plcs: Vec::new(),
            http: None,
        };
        sockets.check_shared(&listen_addrs(model)).map_err(GatewayError::SharedSocket)?;
        // Bound first: a taken port fails the start before anything runs.
        let http = model.http.as_ref().map(|h| crate::http::prepare(h, &sockets)).transpose()?.flatten();
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
            sockets,
        };
        let prepared = gateway.prepare(model)?;
        gateway.apply(model, prepared, &mut Changes::default());
        gateway.model = model.clone();
        gateway.start_http(model, http);
        gateway.tracker.spawn(sweep(gateway.image.clone(), gateway.shutdown.clone()));
        gateway.warn_unnamed_sockets();
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

    /// Says which handed-over sockets the running configuration does not listen on:
    /// connections to them wait unanswered (the service manager keeps them open).
    fn warn_unnamed_sockets(&self) {
        let listen: Vec<SocketAddr> = listen_addrs(&self.model).into_iter().map(|(_, a)| a).collect();
        for addr in self.sockets.unnamed(&listen) {
            warn!(
                "the socket on {addr} was handed over (socket activation) but no listen address of the configuration names it: \
                 connections to it are not answered (name it in a listen address, or remove it from the socket unit)"
            );
        }
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
    ///   so masters and peers see they are no longer read; so are the values a removed
    ///   peer delivered last;
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
        self.sockets.check_shared(&listen_addrs(model)).map_err(GatewayError::SharedSocket)?;
        let prepared = self.prepare(model)?;
        let mut changes = Changes::default();
        self.stop_changed(model, &prepared, &mut changes).await;
        self.apply(model, prepared, &mut changes);
        if self.model.gateway.worker_threads != model.gateway.worker_threads {
            changes.updated.push("worker_threads: takes effect at the next restart".into());
        }
        self.model = model.clone();
        self.warn_unnamed_sockets();
        // The HTTP endpoint shows what runs now: it restarts on its port (a moment without
        // it; its socket cannot be bound twice). Failing to bind keeps everything else.
        if let Some(http) = self.parts.http.take() {
            http.stop("http endpoint").await;
        }
        self.http_addr = None;
        match model.http.as_ref().map(|h| crate::http::prepare(h, &self.sockets)).transpose() {
            Ok(http) => self.start_http(model, http.flatten()),
            Err(e) => error!(error = %e, "http endpoint not restarted after the reload"),
        }
        Ok(changes)
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

/// The address each listening section of `model` names: `[server]`, `[link]`, `[http]`.
fn listen_addrs(model: &Model) -> Vec<(&'static str, SocketAddr)> {
    (model.server.iter().map(|s| ("[server]", s.listen)))
        .chain(model.links.iter().filter_map(|l| Some(("[link]", l.listen?))))
        .chain(model.http.iter().map(|h| ("[http]", h.listen)))
        .collect()
}
