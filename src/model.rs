//! The validated, typed configuration the runtime works from. Nothing here is optional
//! "until runtime": every default is resolved and every reference checked by
//! [`crate::config`] before a model exists.

use std::time::Duration;

use crate::point::value::{DataType, Table, Value, WordOrder};
pub use crate::serial::framing::Protocol;
pub use crate::serial::line::{Line, Parity};

/// Shortest reconnect delay of a peer link: its first retry, and the least `reconnect_max`
/// the configuration accepts.
pub const RECONNECT_MIN: Duration = Duration::from_millis(200);

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Gateway-wide settings.
    pub gateway: Gateway,
    /// Every serial bus with its devices and points.
    pub buses: Vec<Bus>,
    /// Peer links (`None`: this gateway talks to no peer).
    pub links: Option<Links>,
    /// The local Modbus-TCP server (`None`: no `[server]` section, nothing listens).
    pub server: Option<Server>,
    /// Modbus-TCP PLCs that receive local values by register/coil writes (`[[plc]]`).
    pub plcs: Vec<Plc>,
    /// The local HTTP endpoint: status page, metrics, JSON API (`None`: disabled).
    pub http: Option<Http>,
}

/// The local HTTP endpoint (`[http]`): status page, Prometheus metrics, JSON API.
#[derive(Debug, Clone, PartialEq)]
pub struct Http {
    /// Address the listening socket binds (port 0: any free port, for tests).
    pub listen: std::net::SocketAddr,
    /// The file holding the access token (`None`: no token; then only loopback may
    /// connect and nothing can be written).
    pub token_file: Option<std::path::PathBuf>,
    /// The points operators may write through the API, with their limits.
    pub grants: Vec<Grant>,
    /// The section was written: a listener that cannot bind stops the start. Without
    /// it (the defaults), a taken port is only a warning.
    pub required: bool,
}

/// Gateway-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Gateway {
    /// This gateway's name; peers see its points as `name/point`.
    pub name: String,
    /// How often each bus logs its one-line summary at info level.
    pub summary_interval: Duration,
    /// Threads running the gateway's tasks (`None`: one per CPU core).
    pub worker_threads: Option<usize>,
    /// How log lines are written.
    pub log_format: LogFormat,
}

/// How log lines are written (`[gateway] log_format`, `--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event, for people (and journald).
    #[default]
    Text,
    /// One JSON object per event, for log collectors.
    Json,
}

/// One serial line, owned by one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    /// Unique bus name.
    pub name: String,
    /// Device path (`/dev/ttyUSB0`, `/dev/serial/by-id/...`), or `tcp://host:port` for
    /// RTU frames carried over TCP by a serial device server (Moxa NPort, ser2net).
    pub port: String,
    /// Character framing (behind a serial device server: its serial settings, which
    /// still give the RTU timing).
    pub line: Line,
    /// Field protocol.
    pub protocol: Protocol,
    /// Silence kept on the line before each request: t3.5 of `line` by default (the RTU
    /// spec's inter-frame gap); shorter (down to zero) for virtual links and device
    /// servers that time the line themselves.
    pub frame_gap: Duration,
    /// The adapter echoes what we send (2-wire RS-485 without echo suppression): the
    /// request's own bytes come back first and are taken off before the reply.
    pub local_echo: bool,
    /// Default response timeout for the devices on this bus.
    pub timeout: Duration,
    /// Retries after a timeout or a corrupt reply before a transaction fails.
    pub retries: u8,
    /// Most transactions waiting in the bus queue; more are refused, not queued.
    pub queue_depth: usize,
    /// Longest wait between attempts to reopen a port that failed.
    pub reopen_max: Duration,
    /// Requests kept outstanding at once on a Modbus-TCP device's connection (1: one
    /// transaction at a time, as on a line; only a modbus-tcp bus has more).
    pub max_in_flight: usize,
    /// Kernel RS-485 direction control (`rs485 = "kernel"`), applied at each open;
    /// `None`: the adapter switches direction itself.
    pub rs485: Option<crate::serial::rs485::Rs485>,
    /// Unit-0 writes may be sent on this line as broadcasts (every device on it accepts
    /// them); only a `[[server.route]]` with `broadcast = true` sends any.
    pub broadcast: bool,
    /// The devices on this bus.
    pub devices: Vec<Device>,
    /// The raw devices of a [`Protocol::Raw`] bus (empty on Modbus buses).
    pub raw_devices: Vec<RawDevice>,
}

/// A field device speaking its own serial protocol (a scale, a reader, a GPS, a meter).
#[derive(Debug, Clone, PartialEq)]
pub struct RawDevice {
    /// Unique device name (shared namespace with Modbus devices); points are `device.point`.
    pub name: String,
    /// Pseudo unit id on its bus, 1..=247, unique per bus: the bus engine's per-unit
    /// bookkeeping (late-reply quarantine) and the per-device framing are keyed by it.
    pub id: u8,
    /// Polled with a request, or talking by itself.
    pub mode: RawMode,
    /// How replies (or streamed frames) are delimited and checked.
    pub framing: crate::serial::raw::RawFraming,
    /// The checksum rule applied to what is sent (requests, commands): the reply's rule,
    /// or none when the device takes its requests without a checksum.
    pub send_checksum: crate::serial::checksum::ChecksumRule,
    /// Response timeout.
    pub timeout: Duration,
    /// Line silence that ends a frame for `end = "silence"` (and is kept before requests).
    pub silence: Duration,
    /// How point values are taken from a frame; field `point` indices refer to `points`.
    pub extract: crate::point::extract::Extract,
    /// The points read from this device.
    pub points: Vec<RawPoint>,
    /// Points that can be written by sending a formatted command.
    pub commands: Vec<RawCommand>,
}

/// How a raw device is read.
#[derive(Debug, Clone, PartialEq)]
pub enum RawMode {
    /// Request/response: the complete request bytes (address and checksum in place).
    Poll {
        /// Bytes sent each time.
        request: Vec<u8>,
        /// Poll interval.
        interval: Duration,
    },
    /// The device talks by itself; the bus has no other device and no requests are sent.
    Stream,
}

/// One value taken from a raw device's frames.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPoint {
    /// Full name, `device.point`.
    pub name: String,
    /// After this long without a good frame the value is reported stale.
    pub stale_after: Duration,
    /// Engineering unit, for people only (`demo` shows it next to the value).
    pub unit: Option<String>,
}

/// A writable point of a raw device: writing it sends a formatted command.
#[derive(Debug, Clone, PartialEq)]
pub struct RawCommand {
    /// Full name, `device.command`.
    pub name: String,
    /// Template for `crate::serial::raw::format_command` (escapes, `{value:SPEC}`); the device's
    /// checksum rule is applied to the result.
    pub template: String,
    /// The reply must match this regex for the write to succeed.
    pub ok: Option<crate::point::extract::Pattern>,
    /// Wait for a reply frame (false: send and return; the device answers nothing).
    pub reply: bool,
    /// Response timeout.
    pub timeout: Duration,
}

/// One field device (a Modbus unit) on a bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Unique device name; point names are `device.point`.
    pub name: String,
    /// Modbus unit id, 1..=247.
    pub unit: u8,
    /// The `[[template]]` the device was made from, if any (shown by `check`).
    pub template: Option<String>,
    /// Response timeout (the bus default unless overridden).
    pub timeout: Duration,
    /// Extra pause before each request to this device, for slow turnaround.
    pub turnaround: Duration,
    /// Most registers in one read (1..=125).
    pub max_registers: u16,
    /// Most bits in one read (1..=2000).
    pub max_bits: u16,
    /// Largest run of unwanted registers/bits read to merge two requests into one.
    pub max_gap: u16,
    /// Longest pause between re-probes of a device that stopped answering.
    pub backoff_max: Duration,
    /// The points read from this device.
    pub points: Vec<Point>,
}

/// One typed value read from a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Full name, `device.point`.
    pub name: String,
    /// Table the point lives in.
    pub table: Table,
    /// Zero-based protocol address (the configured address base already applied).
    pub address: u16,
    /// Data type.
    pub data_type: DataType,
    /// Byte/word order for multi-register types.
    pub order: WordOrder,
    /// Multiplier applied to the raw number (1.0 = none).
    pub scale: f64,
    /// Added after scaling (0.0 = none).
    pub offset: f64,
    /// How often the point is read.
    pub interval: Duration,
    /// After this long without a good read the value is reported stale.
    pub stale_after: Duration,
    /// Engineering unit, for people only (`demo` shows it next to the value).
    pub unit: Option<String>,
}

/// This gateway's identity and listening socket for peer links. With no peers, nothing
/// listens and nothing dials (the section may exist before any peer is paired).
#[derive(Debug, Clone, PartialEq)]
pub struct Links {
    /// Directory holding `cert.pem` and `key.pem` (made by `m2m-gateway keygen`).
    pub identity_dir: std::path::PathBuf,
    /// Directory for the per-peer spools.
    pub data_dir: std::path::PathBuf,
    /// Where to listen for peers that dial us; `None`: no listening socket at all (then
    /// every peer has [`Dial::Connect`]).
    pub listen: Option<std::net::SocketAddr>,
    /// Source networks allowed to connect (empty: any, the certificate pin still applies).
    pub allow: Vec<IpNet>,
    /// The peers: unique names, fingerprints, dial addresses and spool files.
    pub peers: Vec<Peer>,
    /// Serial tunnels, each to one of `peers` (unique names and ports).
    pub tunnels: Vec<Tunnel>,
}

/// A local serial port bridged to the serial port of a tunnel of the same name on a
/// peer gateway (`[[tunnel]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tunnel {
    /// Tunnel name, the same on both gateways.
    pub name: String,
    /// The peer (one of [`Links::peers`]).
    pub peer: String,
    /// Serial device path, or `tcp://host:port` of a serial device server.
    pub port: String,
    /// Character framing of the local port.
    pub line: Line,
    /// A packet ends after this long without a byte.
    pub silence: Duration,
    /// A packet ends at this many bytes (1..=65536).
    pub max_packet: usize,
    /// What happens to bytes read while the link is down.
    pub on_link_down: OnLinkDown,
    /// Longest wait between attempts to reopen a port that failed.
    pub reopen_max: Duration,
}

/// What a tunnel does with bytes read while its link is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLinkDown {
    /// Drop them (counted).
    Drop,
    /// Keep them for the link, at most `max_bytes`; beyond that the oldest are dropped
    /// (counted).
    Buffer {
        /// Bound of the buffer.
        max_bytes: usize,
    },
}

/// An IPv4/IPv6 network in CIDR form (`links.allow`).
pub use ipnet::IpNet;

/// Which side opens the TCP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dial {
    /// We connect to this address (host:port).
    Connect(String),
    /// The peer connects to our listening socket.
    Accept,
}

/// A peer gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// The peer's gateway name (its points appear here as `name/point`).
    pub name: String,
    /// SHA-256 fingerprint of the peer's certificate: 32 uppercase hex pairs joined by
    /// `:` (`3F:A2:…`), as `tls::Fingerprint` displays and parses it.
    pub fingerprint: String,
    /// Who dials.
    pub dial: Dial,
    /// Spool file for values bound to this peer (under `data_dir` unless configured
    /// absolute).
    pub spool: std::path::PathBuf,
    /// Spool bound: bytes.
    pub spool_max_bytes: u64,
    /// Spool bound: age of the oldest batch.
    pub spool_max_age: Duration,
    /// Heartbeat interval; the link is declared dead after 3 missed heartbeats.
    pub heartbeat: Duration,
    /// Longest wait between reconnect attempts (the dialing side).
    pub reconnect_max: Duration,
    /// What is sent to this peer; a point matched by several rules is sent by the first.
    pub send: Vec<SendRule>,
    /// What this peer may write here (none: read-only); no point is in two grants.
    pub grants: Vec<Grant>,
    /// Received points that drive writes into local devices.
    pub writeback: Vec<WriteBack>,
    /// Origins (gateway names, as globs) whose values this peer may relay to us
    /// (`accept_relayed`); none by default: a relayed sample of any other origin is
    /// refused. The peer's own points are always accepted.
    pub accept_relayed: PointGlobs,
}

/// Point-name globs (`globset` syntax: `boiler.*`, `{pump,fan}.run`), compiled once when
/// the configuration is validated; the forwarders and grant checks match names against
/// the compiled set, never re-parsing a pattern. Also the origin globs of a peer's
/// `accept_relayed` (gateway names: `site-a`, `line-*`).
#[derive(Debug, Clone)]
pub struct PointGlobs {
    written: Vec<String>,
    set: globset::GlobSet,
}

impl PointGlobs {
    /// Compiles `globs` into one set.
    pub fn new(globs: Vec<String>) -> Result<Self, globset::Error> {
        let mut builder = globset::GlobSetBuilder::new();
        for glob in &globs {
            builder.add(globset::Glob::new(glob)?);
        }
        Ok(Self { set: builder.build()?, written: globs })
    }

    /// No globs: matches nothing.
    pub fn none() -> Self {
        Self { written: Vec::new(), set: globset::GlobSet::empty() }
    }

    /// True when any of the globs matches the point name.
    pub fn is_match(&self, name: &str) -> bool {
        self.set.is_match(name)
    }

    /// The globs as written.
    pub fn written(&self) -> &[String] {
        &self.written
    }
}

/// Equal when they hold the same globs, in any order and however often each is written
/// (they match the same names), so a reload that only reorders a list restarts nothing.
impl PartialEq for PointGlobs {
    fn eq(&self, other: &Self) -> bool {
        use std::collections::BTreeSet;
        self.written.iter().collect::<BTreeSet<_>>() == other.written.iter().collect::<BTreeSet<_>>()
    }
}

/// Which local points go to a peer, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRule {
    /// Point name globs (`boiler.*`).
    pub points: PointGlobs,
    /// The local points this rule sends (full names, model order): what the globs
    /// matched, less the points an earlier rule of the same peer already sends.
    pub matched: Vec<String>,
    /// When a value is sent.
    pub mode: SendMode,
}

/// When a value is sent to a peer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SendMode {
    /// On change beyond a deadband, and at least every `max_silence`.
    Change {
        /// Absolute deadband (0 = any change).
        deadband: f64,
        /// Deadband in percent of the last sent value (0 = off).
        deadband_percent: f64,
        /// Integrity refresh: re-send an unchanged value after this long.
        max_silence: Duration,
    },
    /// Every `interval`, whether changed or not.
    Periodic {
        /// Period.
        interval: Duration,
    },
}

/// A write a peer may make into a local point.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Local point name globs.
    pub points: PointGlobs,
    /// The local points granted (full names, model order): all holding registers or
    /// coils, numeric whenever `min` or `max` is set.
    pub matched: Vec<String>,
    /// Smallest value allowed (numbers only).
    pub min: Option<f64>,
    /// Largest value allowed (numbers only).
    pub max: Option<f64>,
}

/// What a write-back output does when the link is lost.
#[derive(Debug, Clone, PartialEq)]
pub enum OnLoss {
    /// Keep the last value written.
    Keep,
    /// Write this value (checked to encode into the target point; a bool for
    /// bool and bit targets).
    Fallback(crate::point::value::Value),
}

/// A received point that drives a write into a local device point.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteBack {
    /// Point name at the peer (without the `peer/` prefix).
    pub from: String,
    /// Local point written: a holding register or coil point, not a string; no two
    /// write-backs (of any peers) drive the same point.
    pub to: String,
    /// What happens when the link is down longer than `loss_after`.
    pub on_loss: OnLoss,
    /// How long the link may be down before `on_loss` applies.
    pub loss_after: Duration,
}

/// The local Modbus-TCP server (`[server]`): which unit ids it answers and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Address the listening socket binds (port 0: any free port, for tests).
    pub listen: std::net::SocketAddr,
    /// Most masters connected at once; further connections are accepted and closed.
    pub max_connections: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Most pass-through requests one master may have waiting or running on one bus;
    /// more are answered exception 0x06 (server busy).
    pub max_in_flight: usize,
    /// The unit ids served (unique ids).
    pub units: Vec<ServedUnit>,
    /// Unit ids relayed to a bus without a declared device (`[[server.route]]`); no
    /// unit id is in two routes or in a route and `units`.
    pub routes: Vec<Route>,
    /// What masters may write (nothing else is writable).
    pub grants: Vec<WriteGrant>,
    /// Units answered from a register map over the image (`[[server.unit.map]]`).
    pub virtual_units: Vec<VirtualUnit>,
}

/// A unit id answered from a register map over the image: local and received points
/// encoded like `[[plc.map]]`, read at once; writes go to the owner of each point.
#[derive(Debug, Clone, PartialEq)]
pub struct VirtualUnit {
    /// The unit id masters use (1..=255).
    pub unit: u8,
    /// Every mapped point, in configuration order; no two overlap in one table.
    pub targets: Vec<MapTarget>,
    /// What a read of a point that is not good answers.
    pub on_bad: OnBad,
    /// First input register of the status block, if any (see [`VirtualUnit::status_len`]).
    pub status: Option<u16>,
}

impl VirtualUnit {
    /// Registers of the status block: heartbeat, link bits, then one quality bit per
    /// target (16 a register).
    pub fn status_len(&self) -> u16 {
        2 + u16::try_from(self.targets.len().div_ceil(16)).unwrap_or(u16::MAX - 2)
    }

    /// The peers whose points the unit maps, in order of first appearance: bit `i` of
    /// the status block's link register is the link to peer `i`.
    pub fn peers(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for (peer, _) in self.targets.iter().filter_map(MapTarget::received) {
            if !out.contains(&peer) {
                out.push(peer);
            }
        }
        out
    }
}

/// What a virtual unit answers for a read covering a point whose quality is not good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBad {
    /// Exception 0x0B (gateway target device failed to respond): the default.
    Exception,
    /// The last value (a never-received point still answers 0x0B).
    Last,
}

/// One unit id a master can address, and where its answers come from.
#[derive(Debug, Clone, PartialEq)]
pub struct ServedUnit {
    /// The unit id masters use (1..=255); may differ from the device's own unit id.
    pub unit: u8,
    /// The configured device behind it.
    pub device: String,
    /// The bus that device hangs on.
    pub bus: String,
    /// How reads are answered.
    pub mode: ServeMode,
}

/// A transparent route (`[[server.route]]`): requests for `units` go to `bus`, to unit
/// `unit - unit_offset`, as they would through mbusd or an MGate in transparent mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The unit ids masters use (ascending, unique, 1..=255).
    pub units: Vec<u8>,
    /// The bus they are relayed to.
    pub bus: String,
    /// Subtracted from a master's unit id to give the unit id on the bus (each result is
    /// 1..=247).
    pub unit_offset: i16,
    /// Masters may write through the route without grants (false: only what
    /// `[[server.grant]]`s cover; with none, the route is read-only).
    pub writable: bool,
    /// A master's unit-0 write (FC5/6/15/16) is sent on the bus as a broadcast (the bus
    /// allows broadcasts; at most one route has this).
    pub broadcast: bool,
    /// Response timeout on the bus.
    pub timeout: Duration,
    /// Extra silence before each request to these units; after a broadcast, the pause
    /// before the next request (at least `server::BROADCAST_TURNAROUND`).
    pub turnaround: Duration,
}

impl Route {
    /// The unit id on the bus of a master's unit id `unit` (one of [`Route::units`]).
    pub fn bus_unit(&self, unit: u8) -> u8 {
        u8::try_from(i16::from(unit) - self.unit_offset).unwrap_or(0)
    }
}

/// How a served unit answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeMode {
    /// Reads are answered at once from the latest polled registers ("agent mode"); older
    /// than `max_age` or failed answers exception 0x0B. Granted writes go to the device.
    Agent {
        /// Oldest polled value served.
        max_age: Duration,
    },
    /// Every request is passed through to the device on its bus.
    Pass,
}

/// A range of coils or holding registers masters may write on one served unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteGrant {
    /// Served unit id.
    pub unit: u8,
    /// `Coils` or `Holding`.
    pub table: Table,
    /// First wire (zero-based) address.
    pub start: u16,
    /// Number of coils/registers (`start + count` <= 65536).
    pub count: u32,
}

impl WriteGrant {
    /// True if this grant covers `address` of `table` on `unit`.
    pub fn covers(&self, unit: u8, table: Table, address: u16) -> bool {
        self.unit == unit
            && self.table == table
            && u32::from(address) >= u32::from(self.start)
            && u32::from(address) < u32::from(self.start) + self.count
    }
}

/// A Modbus-TCP device (`[[plc]]`) that receives chosen local points as writes into its
/// holding registers and coils, through its own on-disk spool.
#[derive(Debug, Clone, PartialEq)]
pub struct Plc {
    /// Unique PLC name (logs, spool file).
    pub name: String,
    /// `host:port` to connect to.
    pub address: String,
    /// Unit id put in every request (0..=255).
    pub unit: u8,
    /// Longest wait for a connection or a reply; a timeout drops the connection.
    pub timeout: Duration,
    /// Longest pause between reconnect attempts (the back-off doubles up to this).
    pub reconnect_max: Duration,
    /// What a backlog becomes when the PLC comes back.
    pub deliver: Deliver,
    /// Spool file of values not yet confirmed by the PLC.
    pub spool: std::path::PathBuf,
    /// Spool bound: bytes.
    pub spool_max_bytes: u64,
    /// Spool bound: age of the oldest batch.
    pub spool_max_age: Duration,
    /// The heartbeat register, if any (never a map target).
    pub watchdog: Option<PlcWatchdog>,
    /// The mapping entries; no point is in two, no two targets overlap.
    pub map: Vec<PlcMap>,
}

/// A PLC's watchdog (`[plc.watchdog]`): a holding register the gateway counts up while
/// it is connected, so the PLC logic can tell a live link from frozen values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlcWatchdog {
    /// Wire (zero-based) holding register address.
    pub address: u16,
    /// Time between two writes.
    pub interval: Duration,
}

/// How a PLC's backlog is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deliver {
    /// Only the latest value of each target (the backlog is coalesced).
    Latest,
    /// Every value, in the order it was spooled.
    All,
}

/// One `[[plc.map]]`: local points written into a PLC, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct PlcMap {
    /// Point globs.
    pub points: PointGlobs,
    /// Each matched point with where and how it is written (model order, consecutive
    /// addresses from the entry's `address`).
    pub targets: Vec<MapTarget>,
    /// When a value is sent.
    pub mode: SendMode,
}

/// Where one point lands in a register map (a PLC's `[[plc.map]]`, a virtual unit's
/// `[[server.unit.map]]`) and how it is encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct MapTarget {
    /// Full point name: local `device.point`, or received `peer/device.point`.
    pub point: String,
    /// The table: `Holding` or `Coils` in a PLC; any of the four in a virtual unit.
    pub table: Table,
    /// First wire (zero-based) address.
    pub address: u16,
    /// Register encoding (`Bool` for coils and discrete inputs); never `Bit`; `Str`
    /// only in a virtual unit.
    pub data_type: DataType,
    /// Word order.
    pub order: WordOrder,
    /// Raw = (value - offset) / scale.
    pub scale: f64,
    /// See `scale`.
    pub offset: f64,
    /// Engineering unit (the local point's `unit`, or the map entry's `eng_unit`), for
    /// `check` and tag lists only.
    pub eng_unit: Option<String>,
}

impl MapTarget {
    /// Registers (or bits, in a bit table) the target takes.
    pub fn width(&self) -> u16 {
        if matches!(self.table, Table::Coils | Table::Discrete) { 1 } else { self.data_type.width() }
    }

    /// The peer a received point comes from (`site-a` of `site-a/boiler.temp`), and
    /// its name there; `None` for a local point.
    pub fn received(&self) -> Option<(&str, &str)> {
        self.point.split_once('/')
    }
}

/// A value encoded for its target.
#[derive(Debug, Clone, PartialEq)]
pub enum Encoded {
    /// A coil.
    Bit(bool),
    /// Registers.
    Words(Vec<u16>),
}

/// Encodes `value` for `target`.
/// (Also how a virtual unit of the Modbus-TCP server encodes what it serves.)
pub fn encode(target: &MapTarget, value: &Value) -> Result<Encoded, String> {
    if matches!(target.table, Table::Coils | Table::Discrete) {
        return match value {
            Value::Bool(b) => Ok(Encoded::Bit(*b)),
            Value::Int(0) | Value::UInt(0) => Ok(Encoded::Bit(false)),
            Value::Int(1) | Value::UInt(1) => Ok(Encoded::Bit(true)),
            other => Err(format!("{other} is not a bool")),
        };
    }
    crate::point::registers::encode_registers(
        target.data_type,
        target.order,
        target.scale,
        target.offset,
        value,
    )
    .map(Encoded::Words)
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_are_equal_as_sets_so_reordering_a_list_changes_nothing() {
        let globs = |g: &[&str]| PointGlobs::new(g.iter().map(|s| s.to_string()).collect()).expect("globs");
        assert_eq!(globs(&["site-a", "line-*"]), globs(&["line-*", "site-a", "site-a"]));
        assert_ne!(globs(&["site-a"]), globs(&["site-a", "line-*"]));
        assert_ne!(globs(&["site-a"]), PointGlobs::none());
        assert_eq!(globs(&[]), PointGlobs::none());
    }
}
