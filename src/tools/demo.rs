//! `m2m-gateway demo`: the main job with no hardware. Every bus of a configuration is
//! served by a simulator on its own virtual serial pair (a `modbus-tcp://` bus by the
//! simulator's Modbus-TCP mode on 127.0.0.1), the gateway polls them through
//! its real bus engine, and forwards every point on change to a second gateway started
//! in the same process: a peer with fresh identities (made in a temporary directory),
//! listening on 127.0.0.1, reached over the real link (TLS 1.3, mutual authentication
//! with pinned certificate fingerprints, on-disk spool). Both images are printed as
//! tables: the local points, and the same points as the peer received them.
//!
//! The peer also serves what it received as a virtual Modbus unit ([`DEMO_UNIT`] on
//! 127.0.0.1, any free port): every number as an f32 (abcd) in holding registers from
//! 0, every bool in discrete inputs from 0, in configuration order; strings are left
//! out. The demo prints its register map and the `m2m-gateway poll --tcp` lines that
//! read it, so a user sees a far site's values reach a local SCADA.
//!
//! Invariants: the configuration's own `[link]` is replaced by the demo pair (a demo
//! never dials real peers); the temporary directory is removed when the demo ends; a
//! `[server]` whose port is taken is moved to a free port instead of failing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::gateway::{Gateway, GatewayError};
use crate::image::Image;
use crate::link::tls::{self, Fingerprint, TlsError};
use crate::model::{
    self, Dial, Links, MapTarget, Model, OnBad, Peer, PointGlobs, SendMode, SendRule, VirtualUnit,
};
use crate::point::value::{DataType, Table, WordOrder};
use crate::server::ServerError;
use crate::sim::{SimConfig, SimError, Simulator, VirtualPort};

/// Virtual serial pairs with a simulator behind each, one per bus of a model (a
/// Modbus-TCP bus gets a simulator serving Modbus-TCP on 127.0.0.1 instead).
pub struct SimulatedPlant {
    ports: Vec<VirtualPort>,
    /// Stops the Modbus-TCP simulators when dropped.
    tcp: Vec<tokio_util::sync::DropGuard>,
}

impl SimulatedPlant {
    /// Starts a simulator for every bus of `model` and points the bus at it. Must be
    /// called inside a tokio runtime.
    pub fn start(model: &mut Model) -> Result<Self, SimError> {
        let mut ports = Vec::new();
        let mut tcp = Vec::new();
        for bus in &mut model.buses {
            let sim = Simulator::new(SimConfig::from_bus(bus));
            if bus.protocol == model::Protocol::ModbusTcp {
                let port_err = |e: std::io::Error| SimError::Port {
                    what: "listen on 127.0.0.1".into(),
                    message: e.to_string(),
                };
                let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(port_err)?;
                listener.set_nonblocking(true).map_err(port_err)?;
                let addr = listener.local_addr().map_err(port_err)?;
                let listener = tokio::net::TcpListener::from_std(listener).map_err(port_err)?;
                let stop = CancellationToken::new();
                tokio::spawn(sim.serve_tcp(listener, stop.clone()));
                tcp.push(stop.drop_guard());
                bus.port = format!("modbus-tcp://{addr}");
                continue;
            }
            let mut port = VirtualPort::new()?;
            port.run(sim)?;
            bus.port = port.path().display().to_string();
            ports.push(port);
        }
        Ok(Self { ports, tcp })
    }

    /// Number of simulated buses.
    pub fn len(&self) -> usize {
        self.ports.len() + self.tcp.len()
    }

    /// True when the model had no bus.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A simulator could not start.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The gateway could not start (peer-link identity, spool or listening socket).
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The demo's temporary directory could not be created.
    #[error("demo: cannot create the temporary directory {dir}: {source}")]
    TempDir {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// A demo identity could not be made.
    #[error("demo: cannot make an identity: {0}")]
    Identity(#[from] TlsError),
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, DemoError> {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let dir = std::env::temp_dir().join(format!("m2m-gateway-demo-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|source| DemoError::TempDir { dir: dir.display().to_string(), source })?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The demo peer's gateway name: `site-b`, unless the configuration already uses it.
fn peer_name(local: &str) -> &'static str {
    if local == "site-b" { "demo-peer" } else { "site-b" }
}

/// A peer entry with the demo's defaults (heartbeat 1 s, 64 MiB spool for a day).
fn demo_peer(name: &str, fingerprint: Fingerprint, dial: Dial, send: Vec<SendRule>, spool: PathBuf) -> Peer {
    Peer {
        name: name.to_string(),
        fingerprint: fingerprint.to_string(),
        dial,
        spool,
        spool_max_bytes: 64 << 20,
        spool_max_age: Duration::from_secs(24 * 3600),
        heartbeat: Duration::from_secs(1),
        reconnect_max: Duration::from_secs(5),
        send,
        grants: vec![],
        writeback: vec![],
        accept_relayed: PointGlobs::none(),
    }
}

/// The links section of one side of the demo pair, keeping its files under `dir`.
fn demo_links(dir: &Path, listen: bool, peer: Peer) -> Links {
    Links {
        identity_dir: dir.join("identity"),
        data_dir: dir.join("data"),
        listen: listen.then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        allow: vec![model::IpNet::from(std::net::IpAddr::from([127, 0, 0, 1]))],
        peers: vec![peer],
        tunnels: Vec::new(),
    }
}

/// The unit id of the peer's virtual unit.
pub const DEMO_UNIT: u8 = 1;

/// The peer's virtual unit over the points `local` sends: numbers as f32 in holding
/// registers, bools as discrete inputs, both from address 0 (strings left out).
fn demo_unit(model: &Model, local: &str) -> VirtualUnit {
    let (mut register, mut bit) = (0u32, 0u32);
    let mut targets = Vec::new();
    for p in model.buses.iter().flat_map(|b| &b.devices).flat_map(|d| &d.points) {
        let (table, data_type, at) = match p.data_type {
            DataType::Str(_) => continue,
            DataType::Bool | DataType::Bit(_) => (Table::Discrete, DataType::Bool, &mut bit),
            _ => (Table::Holding, DataType::F32, &mut register),
        };
        let width = if table == Table::Discrete { 1 } else { u32::from(data_type.width()) };
        let Ok(address) = u16::try_from(*at) else { continue };
        if *at + width > 65_536 {
            continue;
        }
        *at += width;
        targets.push(MapTarget {
            point: format!("{local}/{}", p.name),
            table,
            address,
            data_type,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            eng_unit: p.unit.clone(),
        });
    }
    VirtualUnit { unit: DEMO_UNIT, targets, on_bad: OnBad::Exception, status: None }
}

/// The `poll --tcp` command lines that read every point of `unit` served at `addr`.
pub fn poll_lines(unit: &VirtualUnit, addr: std::net::SocketAddr) -> Vec<String> {
    let count = |t: Table| unit.targets.iter().filter(|x| x.table == t).count();
    let mut out = Vec::new();
    for (table, kind, n) in [
        (Table::Holding, DataType::F32, count(Table::Holding)),
        (Table::Discrete, DataType::Bool, count(Table::Discrete)),
    ] {
        if n > 0 {
            out.push(format!(
                "m2m-gateway poll --tcp {addr} --unit {} --table {table} --address 0 --count {n} --type {kind}",
                unit.unit
            ));
        }
    }
    out
}

/// Starts the peer gateway (listening on 127.0.0.1, any port; serving what it receives
/// as virtual unit [`DEMO_UNIT`]) and points `model`'s links at it: every local point on
/// change. Returns the peer and both fingerprints.
fn start_peer(
    model: &mut Model,
    dir: &Path,
    shutdown: &CancellationToken,
) -> Result<(Gateway, String, Fingerprint, Fingerprint), DemoError> {
    let (a_dir, b_dir) = (dir.join(&model.gateway.name), dir.join("peer"));
    let a_fp = tls::keygen(&a_dir.join("identity"), false)?.fingerprint;
    let b_fp = tls::keygen(&b_dir.join("identity"), false)?.fingerprint;
    let b_name = peer_name(&model.gateway.name);
    let b_model = Model {
        gateway: model::Gateway {
            name: b_name.to_string(),
            summary_interval: model.gateway.summary_interval,
            worker_threads: None,
            log_format: Default::default(),
        },
        buses: vec![],
        http: None,
        links: Some(demo_links(
            &b_dir,
            true,
            demo_peer(&model.gateway.name, a_fp, Dial::Accept, vec![], b_dir.join("data/spool.db")),
        )),
        server: Some(model::Server {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            max_connections: 16,
            idle_timeout: Duration::from_secs(60),
            max_in_flight: 2,
            units: Vec::new(),
            grants: Vec::new(),
            routes: Vec::new(),
            virtual_units: vec![demo_unit(model, &model.gateway.name)],
        }),
        plcs: Vec::new(),
    };
    let peer = Gateway::start(&b_model, shutdown.child_token())?;
    let addr = peer.listen_addr().map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string());
    let matched = model.buses.iter().flat_map(|b| &b.devices).flat_map(|d| &d.points).map(|p| p.name.clone());
    let all = PointGlobs::new(vec!["*".to_string()])
        .map_err(|e| GatewayError::Peer { peer: b_name.to_string(), reason: e.to_string() })?;
    let everything = SendRule {
        points: all,
        matched: matched.collect(),
        mode: SendMode::Change { deadband: 0.0, deadband_percent: 0.0, max_silence: Duration::from_secs(60) },
    };
    let spool = a_dir.join("data/spool.db");
    model.links = Some(demo_links(
        &a_dir,
        false,
        demo_peer(b_name, b_fp, Dial::Connect(addr), vec![everything], spool),
    ));
    Ok((peer, b_name.to_string(), a_fp, b_fp))
}

/// Starts the local gateway; a `[server]` whose port is taken moves to a free port.
fn start_local(model: &mut Model, shutdown: &CancellationToken) -> Result<Gateway, DemoError> {
    match Gateway::start(model, shutdown.child_token()) {
        Err(GatewayError::Server(ServerError::Bind { addr, source })) if addr.port() != 0 => {
            println!("demo: modbus-tcp server cannot listen on {addr} ({source}); using a free port instead");
            if let Some(server) = &mut model.server {
                server.listen.set_port(0);
            }
            Ok(Gateway::start(model, shutdown.child_token())?)
        }
        r => Ok(r?),
    }
}

/// Runs the demo for `duration` (or until `shutdown`), printing the image every `every`.
pub async fn run(
    mut model: Model,
    duration: Duration,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    let plant = SimulatedPlant::start(&mut model)?;
    println!("demo: {} simulated bus(es) on virtual serial pairs:", plant.len());
    for bus in &model.buses {
        println!("  bus {} -> {} ({} device(s))", bus.name, bus.port, bus.devices.len());
    }
    let dir = TempDir::new()?;
    if model.links.is_some() {
        println!("demo: the configuration's [link] and [[peer]] are replaced by the demo peer");
    }
    let (peer, peer_name, a_fp, b_fp) = start_peer(&mut model, &dir.0, &shutdown)?;
    let gateway = match start_local(&mut model, &shutdown) {
        Ok(g) => g,
        Err(e) => {
            shutdown.cancel();
            peer.shutdown(Duration::from_secs(1)).await;
            return Err(e);
        }
    };
    let local = model.gateway.name.clone();
    let local_units = units(&model, "");
    let peer_units = units(&model, &format!("{local}/"));
    println!(
        "demo: {local} forwards every point on change to {peer_name} (127.0.0.1:{}) over a peer link:",
        peer.listen_addr().map_or(0, |a| a.port())
    );
    println!(
        "  TLS 1.3, mutual authentication, each side pins the other's certificate fingerprint (SHA-256):"
    );
    println!("  {local:<10} {a_fp}");
    println!("  {peer_name:<10} {b_fp}");
    if let Some(addr) = gateway.server_addr {
        println!("demo: modbus-tcp server on {addr} (point a Modbus-TCP master at it)");
    }
    if let Some(addr) = peer.server_addr {
        let unit = demo_unit(&model, &local);
        println!(
            "demo: {peer_name} serves {local}'s values as virtual unit {DEMO_UNIT} on {addr}, as a SCADA at {peer_name} would read them:"
        );
        print!("{}", crate::server::describe(&unit));
        println!("demo: read them with:");
        for line in poll_lines(&unit, addr) {
            println!("  {line}");
        }
    }
    // `--for` of centuries means "until Ctrl-C"; `--every 0s` means "as often as useful"
    // (an overflowing deadline and a zero interval would panic).
    let end = tokio::time::Instant::now().checked_add(duration);
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    let until_end = async move {
        match end {
            Some(end) => tokio::time::sleep_until(end).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_end);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                print!("\n== {local}: polled from the simulated plant =={}", table(&gateway.image, &local_units));
                print!(
                    "\n== {peer_name}: received from {local} over the link =={}",
                    table(&peer.image, &peer_units)
                );
            }
            () = &mut until_end => break,
            () = shutdown.cancelled() => break,
        }
    }
    shutdown.cancel();
    gateway.shutdown(Duration::from_secs(1)).await;
    peer.shutdown(Duration::from_secs(1)).await;
    drop(plant);
    drop(dir);
    Ok(())
}

/// The engineering unit of every point of `model` that has one (`unit = "degC"`), by
/// full name as an image holds it: `boiler.flow_temp`, or with `prefix` (`site-a/`) as a
/// peer names it.
pub fn units(model: &Model, prefix: &str) -> HashMap<String, String> {
    let mut units = HashMap::new();
    for bus in &model.buses {
        let points = bus.devices.iter().flat_map(|d| d.points.iter().map(|p| (&p.name, &p.unit)));
        let raw = bus.raw_devices.iter().flat_map(|d| d.points.iter().map(|p| (&p.name, &p.unit)));
        for (name, unit) in points.chain(raw) {
            if let Some(unit) = unit {
                units.insert(format!("{prefix}{name}"), unit.clone());
            }
        }
    }
    units
}

/// The image as a table: point, value and its engineering unit (from `units`), quality,
/// age.
pub fn table(image: &Image, units: &HashMap<String, String>) -> String {
    let now = SystemTime::now();
    let rows = image.snapshot();
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(5).max(5);
    let unit_width = units.values().map(String::len).max().unwrap_or(0).max(4);
    let mut out =
        format!("\n{:width$}  {:>14} {:unit_width$}  {:<12}  age\n", "point", "value", "unit", "quality");
    for (name, s) in rows {
        let value = s.value.map_or_else(|| "-".to_string(), |v| v.to_string());
        let unit = units.get(&*name).map_or("", String::as_str);
        let age = now.duration_since(s.at).unwrap_or_default();
        let _ = writeln!(
            out,
            "{name:width$}  {value:>14} {unit:unit_width$}  {:<12}  {:.1}s",
            s.quality.to_string(),
            age.as_secs_f64()
        );
    }
    out
}
