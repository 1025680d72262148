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

use futures::future::BoxFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::bus::{self, BusHandle};
use crate::http::Observed;
use crate::image::Image;
use crate::link::listener::{Listener, Routes};
use crate::link::tls::{self, Fingerprint};
use crate::link::tunnel::{self, TunnelHandle};
use crate::link::writeback::WriteBacks;
use crate::link::{self, Dialer, Grants, Link, LinkHandle, PeerWriteError, ReceivedSink};
use crate::model::{Dial, Links, Model, Protocol};
use crate::plc::{self, PlcHandle};
use crate::point::value::Value;
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
    /// Writes into local points through their buses.
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
}

impl Gateway {
    /// Starts every task of `model`. Must be called inside a tokio runtime. Fails only
    /// on what it needs from the machine (the Modbus-TCP server socket; for peer links
    /// the identity, data directory, spool files and listening socket; the PLC spools);
    /// then nothing has been started.
    pub fn start(model: &Model, shutdown: CancellationToken) -> Result<Self, GatewayError> {
        let image = Arc::new(Image::new());
        let tracker = TaskTracker::new();
        // Everything fallible first, so an error leaves no task behind.
        let listener = model.server.as_ref().map(server::listen).transpose()?;
        let prepared = match &model.links {
            Some(links) => Some(prepare_links(links)?),
            None => None,
        };
        let plc_spools = open_plc_spools(model)?;
        let http = model.http.as_ref().map(crate::http::prepare).transpose()?.flatten();
        let mut buses = Vec::new();
        let mut devices = Vec::new();
        let mut serial = SerialDevices::new();
        for bus in &model.buses {
            let handle = if bus.protocol == Protocol::Raw {
                // A stream bus has a stream task and no bus task (nothing is ever sent).
                let Some(handle) = raw::start(bus, &image, &mut serial, &shutdown, &tracker) else {
                    continue;
                };
                handle
            } else {
                let handle = bus::spawn(bus, shutdown.clone(), &tracker);
                let poller = Poller::new(bus, handle.clone(), image.clone());
                devices.extend(poller.health());
                tracker.spawn(poller.run(shutdown.clone()));
                handle
            };
            let stats = handle.clone();
            tracker.spawn(
                summarise(
                    model.gateway.summary_interval,
                    shutdown.clone(),
                    move || stats.stats().snapshot(),
                    bus::summary,
                )
                .instrument(info_span!("bus", bus = %bus.name)),
            );
            buses.push(handle);
        }
        tracker.spawn(sweep(image.clone(), shutdown.clone()));
        let serial = Arc::new(serial);
        let writer = Writer::new(model, &buses).with_commands(serial.clone());
        let (links, listen_addr) = match (prepared, &model.links) {
            (Some(p), Some(l)) => start_links(model, l, p, &image, &writer, &plc_spools, &shutdown, &tracker),
            _ => (Vec::new(), None),
        };
        let every = model.gateway.summary_interval;
        let mut plcs = Vec::new();
        for (p, spool) in model.plcs.iter().zip(plc_spools) {
            match plc::start(p, image.clone(), spool, &shutdown, &tracker) {
                Ok(h) => {
                    let counts = h.clone();
                    tracker.spawn(
                        summarise(every, shutdown.clone(), move || counts.counts(), plc::summary)
                            .instrument(info_span!("plc", plc = %p.name)),
                    );
                    plcs.push(h);
                }
                Err(e) => error!(plc = %p.name, error = %e, "plc sink not started"),
            }
        }
        let mut tunnels = Vec::new();
        for t in model.links.iter().flat_map(|l| &l.tunnels) {
            match links.iter().find(|(peer, _)| *peer == t.peer) {
                Some((_, link)) => {
                    let handle = tunnel::spawn(t, link.tunnels().clone(), shutdown.clone(), &tracker);
                    let counts = handle.clone();
                    tracker.spawn(
                        summarise(every, shutdown.clone(), move || counts.stats(), tunnel::summary)
                            .instrument(info_span!("tunnel", tunnel = %t.name)),
                    );
                    tunnels.push(handle);
                }
                None => {
                    error!(tunnel = %t.name, peer = %t.peer, "the link to the peer did not start; tunnel not started")
                }
            }
        }
        let mut server_addr = None;
        let mut server_stats = None;
        if let (Some(config), Some(listener)) = (&model.server, listener) {
            let server = Server::new(
                listener,
                config,
                model,
                &buses,
                image.clone(),
                Arc::new(PointOwners { writer: writer.clone(), links: links.iter().cloned().collect() }),
            );
            server_addr = Some(server.local_addr());
            server_stats = Some(server.stats());
            tracker.spawn(server.run(shutdown.clone(), tracker.clone()));
        }
        let http_addr = http.and_then(|prepared| {
            let (points, ports) = Observed::describe(model);
            let seen = Observed {
                name: model.gateway.name.clone(),
                started: std::time::SystemTime::now(),
                image: image.clone(),
                buses: buses.clone(),
                devices: devices.clone(),
                links: links.clone(),
                plcs: plcs.clone(),
                tunnels: tunnels.clone(),
                server: server_addr.zip(server_stats.clone()),
                writer: writer.clone(),
                points,
                ports,
            };
            crate::http::spawn(prepared, seen, &shutdown, &tracker)
        });
        let shown = |a: Option<SocketAddr>| a.map_or_else(|| "none".to_string(), |a| a.to_string());
        info!(
            gateway = %model.gateway.name,
            buses = model.buses.len(),
            points = image.len(),
            peers = links.len(),
            plcs = plcs.len(),
            server = %shown(server_addr),
            http = %shown(http_addr),
            "gateway started"
        );
        Ok(Self {
            image,
            buses,
            serial,
            server_addr,
            writer,
            links,
            plcs,
            tunnels,
            devices,
            server_stats,
            http_addr,
            listen_addr,
            shutdown,
            tracker,
        })
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
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            warn!(?grace, "tasks still running after the grace period; leaving them");
        }
    }
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

/// The spools of the `[[plc]]` sinks, opened before any task starts.
fn open_plc_spools(model: &Model) -> Result<Vec<SpoolHandle>, GatewayError> {
    model
        .plcs
        .iter()
        .map(|p| {
            let bad = |reason: String| GatewayError::Plc { plc: p.name.clone(), reason };
            if let Some(dir) = p.spool.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
            }
            let limits = SpoolLimits { max_bytes: p.spool_max_bytes, max_age: p.spool_max_age };
            SpoolHandle::open(&p.spool, limits).map_err(|e| bad(e.to_string()))
        })
        .collect()
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

/// What the links need, opened before any task starts.
struct Prepared {
    identity: tls::Identity,
    peers: Vec<PreparedPeer>,
    listener: Option<tokio::net::TcpListener>,
}

struct PreparedPeer {
    fingerprint: Fingerprint,
    spool: SpoolHandle,
    rules: Rules,
    grants: Grants,
}

fn prepare_links(links: &Links) -> Result<Prepared, GatewayError> {
    let identity = tls::load_identity(&links.identity_dir)
        .map_err(|source| GatewayError::Identity { dir: links.identity_dir.display().to_string(), source })?;
    std::fs::create_dir_all(&links.data_dir)
        .map_err(|source| GatewayError::DataDir { dir: links.data_dir.display().to_string(), source })?;
    let mut peers = Vec::new();
    for p in &links.peers {
        let bad = |reason: String| GatewayError::Peer { peer: p.name.clone(), reason };
        let fingerprint: Fingerprint = p.fingerprint.parse().map_err(|e| bad(format!("{e}")))?;
        let limits = SpoolLimits { max_bytes: p.spool_max_bytes, max_age: p.spool_max_age };
        // The config resolves the spool path (under data_dir unless absolute).
        let spool = SpoolHandle::open(&p.spool, limits).map_err(|e| bad(e.to_string()))?;
        let rules = Rules::new(&p.name, &p.send).map_err(|e| bad(e.to_string()))?;
        let grants = Grants::new(&p.grants).map_err(|e| bad(format!("grant: {e}")))?;
        peers.push(PreparedPeer { fingerprint, spool, rules, grants });
    }
    let listener = match links.listen {
        Some(addr) => {
            let listen = |source| GatewayError::Listen { addr, source };
            let std = std::net::TcpListener::bind(addr).map_err(listen)?;
            std.set_nonblocking(true).map_err(listen)?;
            Some(tokio::net::TcpListener::from_std(std).map_err(listen)?)
        }
        None => None,
    };
    Ok(Prepared { identity, peers, listener })
}

#[allow(clippy::too_many_arguments)]
fn start_links(
    model: &Model,
    links: &Links,
    prepared: Prepared,
    image: &Arc<Image>,
    writer: &Writer,
    plc_spools: &[SpoolHandle],
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> (Vec<(String, LinkHandle)>, Option<SocketAddr>) {
    let mut routes = Routes::new();
    let mut handles = Vec::new();
    for (peer, p) in links.peers.iter().zip(prepared.peers) {
        let dialer = match &peer.dial {
            Dial::Connect(addr) => match tls::client_config(&prepared.identity, p.fingerprint) {
                Ok(tls) => Dialer::Connect { addr: addr.clone(), tls },
                Err(e) => {
                    error!(peer = %peer.name, error = %e, "cannot build the tls client; link not started");
                    continue;
                }
            },
            Dial::Accept => {
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                routes.insert(p.fingerprint, (peer.name.clone(), tx));
                Dialer::Accept(rx)
            }
        };
        let (connected, connected_rx) = tokio::sync::watch::channel(false);
        let wb = WriteBacks::new(&peer.name, &peer.writeback, writer.clone(), connected_rx.clone());
        let offer = wb.offer();
        if !offer.is_empty() {
            tracker.spawn(wb.run(shutdown.clone()));
        }
        let fwd = Forwarder::new(&peer.name, p.rules, image.clone(), p.spool.clone())
            .resend_on_connect(connected_rx);
        tracker.spawn(fwd.run(shutdown.clone()));
        let handle = link::spawn(
            Link {
                local_name: model.gateway.name.clone(),
                peer: peer.clone(),
                image: image.clone(),
                writer: writer.clone(),
                spool: p.spool,
                grants: p.grants,
                writeback: offer,
                connected,
                max_frame: crate::link::proto::DEFAULT_MAX_FRAME,
                sinks: received_sinks(model, &peer.name, plc_spools),
            },
            dialer,
            shutdown.clone(),
            tracker,
        );
        let stats = handle.clone();
        tracker.spawn(
            summarise(model.gateway.summary_interval, shutdown.clone(), move || stats.stats(), link::summary)
                .instrument(info_span!("link", peer = %peer.name)),
        );
        handles.push((peer.name.clone(), handle));
    }
    let mut listen_addr = None;
    if let Some(socket) = prepared.listener {
        listen_addr = socket.local_addr().ok();
        let pins: Vec<Fingerprint> = routes.keys().copied().collect();
        match tls::server_config(&prepared.identity, pins) {
            Ok(tls) => {
                if let Some(addr) = listen_addr {
                    info!("listening for peers on {addr}");
                }
                let l = Listener { socket, allow: links.allow.clone(), tls, routes };
                tracker.spawn(l.run(shutdown.clone(), tracker.clone()));
            }
            Err(e) => {
                warn!(error = %e, "peer listener not started: no peer is configured to dial in");
                listen_addr = None;
            }
        }
    }
    (handles, listen_addr)
}
