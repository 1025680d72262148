//! Starting tasks: each bus (engine, poller or raw tasks, summary), each peer (link,
//! forwarder, write-backs), tunnels, PLC sinks, the Modbus-TCP server and the HTTP
//! endpoint, each under its own part of the shutdown tree ([`Gateway::apply`]), plus the
//! sweep that marks values stale.
//!
//! Invariant: every task spawned here watches its part's token and is on its part's
//! tracker, so stopping a part (a reload) or the gateway waits for exactly its tasks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::bus::{self, BusHandle};
use crate::http::Observed;
use crate::image::Image;
use crate::link::listener::{AcceptTables, Accepting, Listener, Routes};
use crate::link::tls::{self, Fingerprint};
use crate::link::tunnel::{self};
use crate::link::writeback::WriteBacks;
use crate::link::{self, Dialer, Link, LinkHandle, PeerWriteError, ReceivedSink};
use crate::model::{Bus, Dial, Links, Model, Peer, Protocol};
use crate::plc::{self};
use crate::point::value::Value;
use crate::poll::modbus::{DeviceHealth, Poller};
use crate::poll::raw::{self, SerialDevices};
use crate::server::{Owners, Server, WriteFailure};
use crate::spool::SpoolHandle;
use crate::spool::forward::{Forwarder, RelayCounters, Rules};
use crate::writer::{WriteError, Writer};

use super::reload::{PeerPlan, Prepared, PreparedPeer, received_from, same};
use super::{BusPart, Changes, Gateway, ListenerPart, Part, PeerPart, PlcPart, ServerPart, TunnelPart};

impl Gateway {
    /// Starts the HTTP endpoint on `prepared`'s socket, observing what runs now.
    pub(super) fn start_http(&mut self, model: &Model, prepared: Option<crate::http::Prepared>) {
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

    /// Starts what is not running, swaps the tables of what is, and lists the result in
    /// model order. `changes` gains the components added.
    pub(super) fn apply(&mut self, new: &Model, prepared: Prepared, changes: &mut Changes) {
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
                            p.handle.relay_counters(),
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
                        match start_peer(&ctx, peer, prepared) {
                            Some(p) => self.parts.peers.push(p),
                            // No link task will vouch for (or fail) what it delivered.
                            None => {
                                crate::link::fail_delivered_by(&self.image, &peer.name, |_| true);
                            }
                        }
                    }
                    (_, None) => {
                        error!(peer = %peer.name, "internal: a kept link is not running; link not started");
                        crate::link::fail_delivered_by(&self.image, &peer.name, |_| true);
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
    let relay = Arc::new(RelayCounters::default());
    let forwarder = start_forwarder(
        peer,
        p.rules,
        ctx.image,
        p.spool.clone(),
        connected_rx.clone(),
        relay.clone(),
        ctx.shutdown,
    );
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
            relay,
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
    relay: Arc<RelayCounters>,
    parent: &CancellationToken,
) -> Part {
    let part = Part::new(parent);
    // A peer's rules relay the received points they name (a hub), counted in `relay`.
    let fwd = Forwarder::new(&peer.name, rules.relaying(), image.clone(), spool)
        .resend_on_connect(connected)
        .relay_counters(relay);
    part.tracker.spawn(fwd.run(part.token.clone()));
    part
}

/// What virtual units write through: the writer for local points, the peer links for
/// received points (`peer/point`).
pub(super) struct PointOwners {
    pub(super) writer: Writer,
    pub(super) links: HashMap<String, LinkHandle>,
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

/// The PLCs that map points received from `peer` (or relayed through it), as sinks of
/// its link.
fn received_sinks(model: &Model, peer: &str, plc_spools: &[SpoolHandle]) -> Vec<ReceivedSink> {
    model
        .plcs
        .iter()
        .zip(plc_spools)
        .filter_map(|(p, spool)| {
            let points: HashSet<String> = received_from(model, p, peer).collect();
            (!points.is_empty()).then(|| ReceivedSink {
                name: format!("plc {}", p.name),
                points,
                spool: spool.clone(),
            })
        })
        .collect()
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
pub(super) async fn sweep(image: Arc<Image>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => { image.sweep_stale(); }
            () = shutdown.cancelled() => return,
        }
    }
}
