//! A reload's first two steps: compare the running model with the new one part by
//! part (typed values: [`same`]), open and compile what the new one needs before anything
//! stops ([`Gateway::prepare`]), then stop what it removes or changes, consumers first
//! ([`Gateway::stop_changed`]). `wiring` starts what is not running.
//!
//! Invariant: everything that can fail is opened in `prepare`, so a refused reload leaves
//! the old configuration running untouched.

use crate::image::Image;
use crate::link::tls::{self, Fingerprint};
use crate::link::{self, Grants};
use crate::model::{Bus, Model, Peer, Plc, Tunnel};
use crate::point::value::{Quality, Sample};
use crate::server::{self};
use crate::spool::SpoolHandle;
use crate::spool::forward::Rules;
use crate::spool::journal::SpoolLimits;

use super::{Changes, Gateway, GatewayError};

/// Equality of model parts: the typed values (compiled patterns compare by their text).
pub(super) fn same<T: PartialEq>(a: &T, b: &T) -> bool {
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
pub(super) struct PreparedPeer {
    pub(super) fingerprint: Fingerprint,
    pub(super) spool: SpoolHandle,
    pub(super) rules: Rules,
    pub(super) grants: Grants,
}

/// How a reload treats one peer.
pub(super) enum PeerPlan {
    Keep,
    /// Only the send rules changed: a new forwarder with these rules.
    Forwarder(Rules),
    /// New or changed: a new link.
    Start(PreparedPeer),
}

impl Gateway {
    /// Opens what the new configuration needs from the machine and compiles what can
    /// fail, without touching anything that runs.
    pub(super) fn prepare(&self, new: &Model) -> Result<Prepared, GatewayError> {
        let old = &self.model;
        // The Modbus-TCP server: a new socket only when the address or the limit changed.
        let server_socket = match (&new.server, &self.parts.server) {
            (Some(cfg), Some(running)) if cfg.listen == running.config.listen => None,
            (Some(cfg), _) => Some(server::listen(cfg, &self.sockets)?),
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
            (Some(addr), _) => Some(
                self.sockets
                    .listen(addr, "[link]")
                    .map_err(|source| GatewayError::Listen { addr, source })?,
            ),
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
    pub(super) async fn stop_changed(&mut self, new: &Model, prepared: &Prepared, changes: &mut Changes) {
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
        let new_peer = |name: &str| new.links.as_ref().and_then(|l| l.peers.iter().find(|p| p.name == name));
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
                    // What it delivered stays as it is while the new link comes up (the
                    // peer re-sends everything then; the link fails it if the peer is not
                    // back in time), but values it relayed of origins its accept_relayed
                    // no longer lists will never come again.
                    let accepted = |s: &Sample| {
                        let origin = s.via.as_ref().filter(|v| v.len() > 1).map(|v| &*v[0]);
                        origin.is_none_or(|o| new_peer(&name).is_some_and(|p| p.accept_relayed.is_match(o)))
                    };
                    let n = link::fail_delivered_by(&self.image, &name, |s| !accepted(s));
                    if n > 0 {
                        changes.updated.push(format!(
                            "peer {name}: {} it relayed of origins its accept_relayed no longer lists marked comm_fail",
                            values(n)
                        ));
                    }
                    // Kept in the list until `apply` takes its spool.
                    kept.push(p);
                }
                None => {
                    p.forwarder.stop(&format!("forwarder to {name}")).await;
                    p.part.stop(&format!("link to {name}")).await;
                    changes.removed.push(format!("link to peer {name}"));
                    // Nothing will update what it delivered: masters and PLCs must not be
                    // served those values as good (as a removed device's points).
                    let n = link::fail_delivered_by(&self.image, &name, |_| true);
                    if n > 0 {
                        changes
                            .updated
                            .push(format!("peer {name}: {} it delivered marked comm_fail", values(n)));
                    }
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
}

/// What [`Gateway::prepare`] opened and compiled.
pub(super) struct Prepared {
    pub(super) server_socket: Option<tokio::net::TcpListener>,
    /// Per `[[plc]]` in model order: the spool of a sink that (re)starts, `None` for one
    /// kept as it runs.
    pub(super) plc_spools: Vec<Option<SpoolHandle>>,
    pub(super) links: Option<PreparedLinks>,
}

pub(super) struct PreparedLinks {
    pub(super) identity: tls::Identity,
    /// Our name, identity and data directory are unchanged.
    pub(super) links_same: bool,
    /// Per peer in model order.
    pub(super) peers: Vec<PeerPlan>,
    /// A new listening socket (`None`: none configured, or the running one is kept).
    pub(super) listen_socket: Option<tokio::net::TcpListener>,
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

/// `1 value`, `2 values`.
fn values(n: usize) -> String {
    if n == 1 { "1 value".into() } else { format!("{n} values") }
}

/// Whether the link to `peer` may carry points of origin `from`: its own, and those of an
/// origin no `[[peer]]` is named after (they can only arrive relayed, through a hub)
/// that its `accept_relayed` lists.
pub(super) fn carries(model: &Model, peer: &str, from: &str) -> bool {
    let peers = || model.links.iter().flat_map(|l| &l.peers);
    from == peer
        || (!peers().any(|p| p.name == from)
            && peers().any(|p| p.name == peer && p.accept_relayed.is_match(from)))
}

/// The points of `plc`'s map the link to `peer` brings: received from it, or relayed
/// through it (see [`carries`]).
pub(super) fn received_from<'a>(
    model: &'a Model,
    plc: &'a Plc,
    peer: &'a str,
) -> impl Iterator<Item = String> + 'a {
    plc.map
        .iter()
        .flat_map(|m| &m.targets)
        .filter(move |t| t.received().is_some_and(|(from, _)| carries(model, peer, from)))
        .map(|t| t.point.clone())
}

/// What a peer's link feeds to PLC sinks (the PLCs that map points received from it),
/// as a comparable key: a change restarts the link.
fn sinks_key(model: &Model, peer: &str) -> Vec<(String, std::path::PathBuf, Vec<String>)> {
    let mut sinks: Vec<(String, std::path::PathBuf, Vec<String>)> = model
        .plcs
        .iter()
        .filter_map(|p| {
            let mut points: Vec<String> = received_from(model, p, peer).collect();
            points.sort();
            (!points.is_empty()).then(|| (p.name.clone(), p.spool.clone(), points))
        })
        .collect();
    sinks.sort();
    sinks
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP1: &str =
        "3F:A2:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:9C";
    const FP2: &str =
        "4F:A2:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:9C";

    #[test]
    fn a_link_feeds_sinks_its_own_points_and_those_only_a_hub_can_bring() {
        let text = format!(
            r#"[gateway]
name = "site-c"

[link]
identity = "id"
data_dir = "data"
listen = "127.0.0.1:7700"

[[peer]]
name = "hub-b"
fingerprint = "{FP1}"
accept_relayed = ["line-*", "site-a"]

[[peer]]
name = "site-a"
fingerprint = "{FP2}"

[[plc]]
name = "line-plc"
address = "127.0.0.1:502"
spool = "plc.db"

[[plc.map]]
points = ["hub-b/y", "line-3/x", "site-a/z", "site-x/w"]
table = "holding"
address = 0
type = "u16"
"#
        );
        let model = crate::config::parse(&text, "c.toml").expect("config");
        assert!(carries(&model, "hub-b", "hub-b"));
        assert!(carries(&model, "hub-b", "line-3"), "no [[peer]] line-3: only a hub brings its points");
        assert!(!carries(&model, "hub-b", "site-a"), "site-a's points come over site-a's own link");
        assert!(!carries(&model, "hub-b", "site-x"), "hub-b may not relay site-x's points");
        assert!(carries(&model, "site-a", "site-a"));
        let key = format!("{:?}", sinks_key(&model, "hub-b"));
        assert!(key.contains("hub-b/y") && key.contains("line-3/x") && !key.contains("site-a/z"), "{key}");
        assert!(!key.contains("site-x/w"), "{key}");
    }
}
