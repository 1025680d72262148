//! The local Modbus-TCP server: SCADA/HMI masters and PLCs read the register image and
//! reach the devices on the serial buses through it, as they would through a commercial
//! gateway (Moxa MGate in agent mode, mbusd).
//!
//! Routing, by the unit id of each request (`[[server.unit]]`):
//! - **agent** units answer reads (FC1-4) at once from the raw registers the poller last
//!   read (`Image::read_raw`); nothing touches the bus. A register that is cached but
//!   older than the unit's `max_age`, or whose last poll failed, answers 0x0B (gateway
//!   target failed to respond: the gateway has no current answer from it), as does one
//!   not read yet since start; a register the poller never reads answers 0x02 (illegal
//!   data address: for this server it does not exist, and no retry will help). Other
//!   functions answer 0x01.
//! - **pass** units relay every request to the device on its bus (with the device's own
//!   unit id, timeout, turnaround and the bus retries): the device's answer, or its
//!   exception, goes back as is; no answer is 0x0B; a port that is down is 0x0A.
//! - **routed** units (`[[server.route]]`) are relayed like pass units, with no device
//!   declared: to the route's bus, unit id less the route's `unit_offset`, with the
//!   route's timeout and turnaround and the bus retries. Their writes need
//!   `writable = true` or grants.
//! - any other unit id answers 0x0A (gateway path unavailable).
//!
//! Unit ids 0 and 255. The TCP implementation guide has a master that addresses a TCP
//! server directly send 255 (libmodbus' and tokio-modbus' default) or 0 (pymodbus 2.x's
//! default); on a serial line 0 is a broadcast. Through this gateway 255 is an ordinary
//! unit id, served when a `[[server.unit]]` or route names it. Unit 0 is a broadcast
//! only where the configuration says so (opt-in: a route with `broadcast = true`, on a
//! bus with `broadcast = true`): then FC5/6/15/16 to unit 0 are sent on that bus as
//! broadcasts (the devices answer nothing, as the serial line spec says; the bus waits
//! the turnaround delay, at least [`BROADCAST_TURNAROUND`], before its next request) and
//! the master gets the normal answer of its write (the echo) once the broadcast is on
//! the line, as MGate-style gateways answer: a master that waits for an answer to every
//! request does not time out, and one that expects none ignores it. Any other function
//! to unit 0 there answers 0x01. Without that option unit 0 answers 0x0A like any id
//! nobody serves, at once, so a master that meant "the device itself" fails fast instead
//! of timing out.
//!
//! Checked by the gateway itself, before any bus is touched: the MBAP header (a length
//! no Modbus request can have, 0, 1 or past `mbap::MAX_LENGTH`, closes that connection
//! only: MBAP cannot resynchronise; a request one byte too long for a PDU, such as FC16
//! of 124 registers, is framed and answered 0x03; a frame of another protocol id is
//! discarded unanswered), then the request in the order of the spec's
//! state diagrams: the function (0x01: 0, 0x80.., a write on a unit without grants,
//! anything but FC1-4 on an agent unit, anything but FC5/6/15/16 to a broadcast unit 0),
//! the PDU (`mbap::decode_request`: 0x03 bad
//! quantity, byte count or length, e.g. a 126-register read; 0x02 range past 65535),
//! then the addresses written. Writes (FC5, 6, 15, 16, 22, 23) are refused unless a
//! `[[server.grant]]` covers every address written: a unit with no grant at all answers
//! 0x01 (illegal function: writing is not an allowed action on it), a unit with grants
//! answers 0x02 for addresses outside them (illegal data address), as the spec words
//! those two codes; a route with `writable = true` takes every write. Granted writes to
//! agent units go to the device too.
//!
//! Fairness. Each connection is one master. A master may pipeline: up to
//! [`MAX_PENDING`] requests per connection are being answered at once (agent reads are
//! answered on the spot and never wait behind relayed ones); past that the connection is
//! not read until an answer leaves (TCP back-pressure). Relayed requests wait in their
//! bus's pass-through queue (bus/pass.rs), which holds each master's requests apart
//! (`max_in_flight` each; more answer 0x06 server busy) and gives the bus one at a time,
//! taking masters in turn: with N masters busy, each gets 1/N of the pass-through share
//! of the line however hard it pushes. The bus in turn runs a waiting
//! poll after `bus::PASS_THROUGH_STREAK` pass-through transactions, so all masters
//! together cannot stop the polls that keep agent mode fresh.
//!
//! Limits: at most `max_connections` masters. When all slots are taken, a new master is
//! not kept out: the slot of the *longest-idle* connection is reclaimed (that connection
//! is closed) and given to the newcomer; idle means no request of it is being answered,
//! and the longest-idle is the one whose last request (or connect, if it never asked
//! anything) is oldest. Only when every connection has a request being answered is the
//! newcomer accepted and closed at once (it fails fast instead of hanging in the
//! backlog). So masters that poll slowly (one request every few seconds) cannot keep
//! every new master out for good, a master that is being answered is never cut, and a
//! master whose slot was taken gets it back by reconnecting ([`Slots`]). A connection
//! with no request for `idle_timeout` (and nothing pending) is closed. The socket binds
//! 127.0.0.1:5020 unless configured otherwise.
//!
//! Invariants: nothing a master sends can panic the server or touch a bus before it is
//! validated; every request on a live connection gets exactly one answer; every task
//! here stops at shutdown (a relayed transaction on the line finishes, its answer is
//! dropped).

pub mod mbap;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, instrument, warn};

mod vunit;

pub use vunit::{Owners, WriteFailure};

use crate::bus::pass::MasterId;
use crate::bus::{BusError, BusHandle, Job, Priority};
use crate::image::{Image, Raw, RawMiss};
use crate::loglimit::SharedLimiter;
use crate::model::{self, Model, ServeMode, WriteGrant};
use crate::point::value::Table;
use crate::serial::pdu;
use crate::server::mbap::{Frame, MbapCodec};
use vunit::{SharedVUnit, VUnit};

/// What `check` shows for a virtual unit: its register map, one line per point
/// (address, table, type, order, scale, point, engineering unit), then the status block.
pub fn describe(v: &model::VirtualUnit) -> String {
    let mut out = format!(
        "virtual unit {} ({} point(s), on_bad {}):\n",
        v.unit,
        v.targets.len(),
        if v.on_bad == model::OnBad::Last { "last" } else { "exception" }
    );
    for t in &v.targets {
        let end = u32::from(t.address) + u32::from(t.width()) - 1;
        out.push_str(&format!(
            "  {:<8} {:>5}..={:<5} {:<10} {} scale {} offset {}  {}{}\n",
            format!("{:?}", t.table).to_lowercase(),
            t.address,
            end,
            t.data_type.to_string(),
            format!("{:?}", t.order).to_lowercase(),
            t.scale,
            t.offset,
            t.point,
            t.eng_unit.as_deref().map(|u| format!(" [{u}]")).unwrap_or_default()
        ));
    }
    if let Some(s) = v.status {
        out.push_str(&format!(
            "  input    {s:>5}..={:<5} status: heartbeat, link bits ({}), point quality bits\n",
            u32::from(s) + u32::from(v.status_len()) - 1,
            v.peers().join(", ")
        ));
    }
    out
}

/// The least pause a bus keeps after a broadcast before its next request: the serial
/// line spec's "turnaround delay" (typically 100 to 200 ms), which lets the slowest
/// device act on a broadcast it cannot confirm.
pub const BROADCAST_TURNAROUND: Duration = Duration::from_millis(100);

/// Requests of one connection being answered at once; more wait in the socket.
pub const MAX_PENDING: usize = 16;

/// The connected masters, and which one gives way when a new one arrives and all slots
/// are taken. Sans I/O: the caller passes `now` and closes the connection it is told to.
#[derive(Debug)]
pub struct Slots {
    capacity: usize,
    masters: HashMap<MasterId, Activity>,
}

#[derive(Debug, Clone, Copy)]
struct Activity {
    /// The last request (or the connect).
    last: Instant,
    /// A request of it is being answered.
    busy: bool,
}

/// What becomes of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A free slot.
    Free,
    /// The slot of this master, idle this long: close it.
    Reclaimed(MasterId, Duration),
    /// Every master is being answered: refuse the newcomer.
    Full,
}

impl Slots {
    /// Room for `capacity` masters.
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), masters: HashMap::new() }
    }

    /// Admits `master`, reclaiming the longest-idle slot when full.
    pub fn admit(&mut self, master: MasterId, now: Instant) -> Admission {
        let verdict = if self.masters.len() < self.capacity {
            Admission::Free
        } else {
            match self.masters.iter().filter(|(_, a)| !a.busy).min_by_key(|(id, a)| (a.last, **id)) {
                Some((&id, a)) => Admission::Reclaimed(id, now.saturating_duration_since(a.last)),
                None => return Admission::Full,
            }
        };
        if let Admission::Reclaimed(id, _) = verdict {
            self.masters.remove(&id);
        }
        self.masters.insert(master, Activity { last: now, busy: false });
        verdict
    }

    /// `master` sent a request at `now`; it is busy until [`Slots::answered`].
    pub fn request(&mut self, master: MasterId, now: Instant) {
        if let Some(a) = self.masters.get_mut(&master) {
            a.last = now;
            a.busy = true;
        }
    }

    /// Every request of `master` so far is answered.
    pub fn answered(&mut self, master: MasterId) {
        if let Some(a) = self.masters.get_mut(&master) {
            a.busy = false;
        }
    }

    /// `master` disconnected.
    pub fn remove(&mut self, master: MasterId) {
        self.masters.remove(&master);
    }

    /// Masters connected.
    pub fn len(&self) -> usize {
        self.masters.len()
    }

    /// No master connected.
    pub fn is_empty(&self) -> bool {
        self.masters.is_empty()
    }
}

/// The slot table with each connection's close switch, shared by the accept loop and
/// the connections.
struct Masters {
    slots: Slots,
    close: HashMap<MasterId, (CancellationToken, SocketAddr)>,
}

type SharedMasters = Arc<Mutex<Masters>>;

fn lock(m: &SharedMasters) -> std::sync::MutexGuard<'_, Masters> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why the server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket cannot be bound.
    #[error("modbus-tcp server cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Binds the configured listening socket (first, so that a port already taken fails
/// before anything else starts). Must be called inside a tokio runtime.
pub fn listen(config: &model::Server) -> Result<TcpListener, ServerError> {
    let bind_err = |source| ServerError::Bind { addr: config.listen, source };
    let std_listener = std::net::TcpListener::bind(config.listen).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    TcpListener::from_std(std_listener).map_err(bind_err)
}

/// Counters of the server, readable while it runs (the status page and `/metrics`).
#[derive(Debug)]
pub struct ServerStats {
    /// Masters connected now.
    pub connected: AtomicU64,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections refused because `max_connections` masters were connected.
    pub refused: AtomicU64,
    /// Requests received, by function code (index 0..=127; a code above 127 counts at 0).
    pub requests: [AtomicU64; 128],
    /// Exception answers sent, by exception code (index 0..=15; others count at 0).
    pub exceptions: [AtomicU64; 16],
}

impl Default for ServerStats {
    fn default() -> Self {
        Self {
            connected: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            exceptions: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl ServerStats {
    fn request(&self, pdu: &[u8]) {
        let f = pdu.first().map_or(0, |f| usize::from(*f));
        self.requests.get(f).unwrap_or(&self.requests[0]).fetch_add(1, Relaxed);
    }

    fn answer(&self, pdu: &[u8]) {
        if let [f, code, ..] = pdu
            && *f >= 0x80
        {
            let c = usize::from(*code);
            self.exceptions.get(c).unwrap_or(&self.exceptions[0]).fetch_add(1, Relaxed);
        }
    }
}

/// Where one served unit's requests go.
struct Route {
    /// The served unit id.
    unit: u8,
    /// The declared device (agent units read its part of the image), or for a
    /// `[[server.route]]` what logs call it.
    device: Arc<str>,
    mode: ServeMode,
    /// Writes need no grant (a `[[server.route]]` with `writable = true`).
    writable: bool,
    /// Unit 0 of a `[[server.route]]` with `broadcast = true`: writes go out as a
    /// broadcast, nothing else is served.
    broadcast: bool,
    /// The device's own unit id on its bus.
    device_unit: u8,
    timeout: Duration,
    turnaround: Duration,
    retries: u8,
    bus: BusHandle,
    grants: Vec<WriteGrant>,
}

/// What the connections share.
struct Shared {
    routes: HashMap<u8, Route>,
    /// Units answered from a register map (`[[server.unit.map]]`).
    virtuals: HashMap<u8, SharedVUnit>,
    image: Arc<Image>,
    idle_timeout: Duration,
    /// Requests a master may have waiting or running on one bus.
    max_in_flight: usize,
}

/// The routing and unit tables every connection reads, swapped whole on a reload
/// ([`Server::tables`]): each request is served with the tables current when it arrives.
#[derive(Clone)]
pub struct Tables(Arc<std::sync::RwLock<Arc<Shared>>>);

impl Tables {
    fn current(&self) -> Arc<Shared> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the tables with those of `config` over `buses` (as [`Server::new`]
    /// builds them); the listening socket and the connections stay as they are.
    pub fn replace(
        &self,
        config: &model::Server,
        model: &Model,
        buses: &[BusHandle],
        owners: Arc<dyn Owners>,
    ) {
        let image = self.current().image.clone();
        let shared = Arc::new(Shared::new(config, model, buses, image, owners));
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = shared;
    }
}

/// A bound, not yet running, Modbus-TCP server.
pub struct Server {
    listener: TcpListener,
    local: SocketAddr,
    max_connections: usize,
    tables: Tables,
    /// Kept here, not in the tables: a reload swaps those, the counters go on.
    stats: Arc<ServerStats>,
    /// Every log line a master's connection can cause goes through it (kept across
    /// reloads, which swap the tables).
    log: SharedLimiter,
}

impl Server {
    /// A server on `listener` (from [`listen`]) with the routes of `config` to `buses`
    /// (the running bus tasks, any order) and `image`; virtual units write through
    /// `owners` (local points to their devices, received points over the links). A unit whose bus is not among
    /// `buses` (a model and handles that do not match) is logged and left unserved.
    pub fn new(
        listener: TcpListener,
        config: &model::Server,
        model: &Model,
        buses: &[BusHandle],
        image: Arc<Image>,
        owners: Arc<dyn Owners>,
    ) -> Self {
        let local = listener.local_addr().unwrap_or(config.listen);
        let shared = Arc::new(Shared::new(config, model, buses, image, owners));
        let tables = Tables(Arc::new(std::sync::RwLock::new(shared)));
        let stats = Arc::new(ServerStats::default());
        Self {
            listener,
            local,
            max_connections: config.max_connections,
            tables,
            stats,
            log: SharedLimiter::default(),
        }
    }

    /// The tables the connections read; replace them to apply a reloaded configuration.
    pub fn tables(&self) -> Tables {
        self.tables.clone()
    }
}

impl Shared {
    /// The routes of `config` to `buses` and its virtual units writing through `owners`;
    /// a unit whose bus or device is missing is logged and left unserved.
    fn new(
        config: &model::Server,
        model: &Model,
        buses: &[BusHandle],
        image: Arc<Image>,
        owners: Arc<dyn Owners>,
    ) -> Self {
        let mut routes = HashMap::new();
        for served in &config.units {
            let found = model.buses.iter().find(|b| b.name == served.bus).and_then(|bus| {
                let device = bus.devices.iter().find(|d| d.name == served.device)?;
                let handle = buses.iter().find(|h| h.name() == bus.name)?;
                Some((bus, device, handle))
            });
            let Some((bus, device, handle)) = found else {
                error!(
                    unit = served.unit,
                    bus = %served.bus,
                    device = %served.device,
                    "no such running bus or device; unit not served"
                );
                continue;
            };
            routes.insert(
                served.unit,
                Route {
                    unit: served.unit,
                    device: Arc::from(device.name.as_str()),
                    mode: served.mode,
                    writable: false,
                    broadcast: false,
                    device_unit: device.unit,
                    timeout: device.timeout,
                    turnaround: device.turnaround,
                    retries: bus.retries,
                    bus: handle.clone(),
                    grants: config.grants.iter().filter(|g| g.unit == served.unit).copied().collect(),
                },
            );
        }
        for route in &config.routes {
            let Some(handle) = buses.iter().find(|h| h.name() == route.bus) else {
                error!(bus = %route.bus, "no such running bus; route not served");
                continue;
            };
            let retries = model.buses.iter().find(|b| b.name == route.bus).map_or(0, |b| b.retries);
            let broadcast = route.broadcast.then_some(0);
            for unit in route.units.iter().copied().chain(broadcast) {
                let device_unit = if unit == 0 { 0 } else { route.bus_unit(unit) };
                routes.insert(
                    unit,
                    Route {
                        unit,
                        device: Arc::from(format!("{} unit {device_unit}", route.bus)),
                        mode: ServeMode::Pass,
                        writable: route.writable,
                        broadcast: unit == 0,
                        device_unit,
                        timeout: route.timeout,
                        turnaround: if unit == 0 {
                            route.turnaround.max(BROADCAST_TURNAROUND)
                        } else {
                            route.turnaround
                        },
                        retries,
                        bus: handle.clone(),
                        grants: config.grants.iter().filter(|g| g.unit == unit).copied().collect(),
                    },
                );
            }
        }
        let virtuals = config
            .virtual_units
            .iter()
            .map(|v| {
                let grants = config.grants.iter().filter(|g| g.unit == v.unit).copied().collect();
                (v.unit, Arc::new(VUnit::new(v.clone(), owners.clone(), grants)))
            })
            .collect();
        Shared {
            routes,
            virtuals,
            image,
            idle_timeout: config.idle_timeout,
            max_in_flight: config.max_in_flight,
        }
    }
}

impl Server {
    /// The address actually bound (the port chosen when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Accepts masters until `shutdown`; every task it starts is tracked by `tracker`.
    #[instrument(name = "server", skip_all, fields(listen = %self.local))]
    pub async fn run(self, shutdown: CancellationToken, tracker: TaskTracker) {
        info!(addr = %self.local, "modbus-tcp server listening on {}", self.local);
        let masters: SharedMasters =
            Arc::new(Mutex::new(Masters { slots: Slots::new(self.max_connections), close: HashMap::new() }));
        let mut next_master: MasterId = 0;
        let log = self.log.clone();
        let mut flush = log.ticker();
        loop {
            let accepted = tokio::select! {
                // Cancel-safe: accept loses no connection when dropped.
                a = self.listener.accept() => a,
                _ = flush.tick() => {
                    for s in log.flush() {
                        warn!("{s}");
                    }
                    continue;
                }
                () = shutdown.cancelled() => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    if log.allow("failed accepts of master connections", None) {
                        warn!(error = %e, "cannot accept a connection");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            next_master += 1;
            let master = next_master;
            let close = shutdown.child_token();
            {
                let mut m = lock(&masters);
                match m.slots.admit(master, Instant::now()) {
                    Admission::Free => {}
                    Admission::Reclaimed(old, idle) => {
                        let old_peer = m.close.remove(&old).map(|(c, addr)| {
                            c.cancel();
                            addr
                        });
                        let old_peer = old_peer.map_or_else(|| format!("master {old}"), |a| a.to_string());
                        if log.allow("master connections closed to make room", Some(peer.ip().to_canonical()))
                        {
                            info!(
                                %peer,
                                "all {} master connections taken: closed the one from {old_peer}, idle for {:.1} s, \
                                 to make room for a new master",
                                self.max_connections,
                                idle.as_secs_f64()
                            );
                        }
                    }
                    Admission::Full => {
                        if log.allow("master connections refused (all busy)", Some(peer.ip().to_canonical()))
                        {
                            warn!(
                                %peer,
                                "connection refused: all {} master connections are busy with requests",
                                self.max_connections
                            );
                        }
                        continue;
                    }
                }
                m.close.insert(master, (close.clone(), peer));
            }
            let _ = stream.set_nodelay(true);
            let tables = self.tables.clone();
            let stats = self.stats.clone();
            let masters = masters.clone();
            let log = log.clone();
            tracker.spawn(
                async move {
                    debug!("master connected");
                    stats.accepted.fetch_add(1, Relaxed);
                    stats.connected.fetch_add(1, Relaxed);
                    connection(stream, peer, master, tables, &stats, &masters, &log, close).await;
                    stats.connected.fetch_sub(1, Relaxed);
                    debug!("master disconnected");
                    let mut m = lock(&masters);
                    m.slots.remove(master);
                    m.close.remove(&master);
                }
                .instrument(info_span!("master", %peer, id = master)),
            );
        }
    }
}

/// What to send for one request.
enum Answer {
    Now(Frame),
    Later(BoxFuture<'static, Frame>),
}

/// Serves one master until it leaves (a master that half-closes still gets the answers
/// to what it asked before), idles out, breaks framing, or shutdown.
/// `close` ends it (shutdown, or its slot was reclaimed for a new master).
#[expect(clippy::too_many_arguments, reason = "one connection's context, passed once from the accept loop")]
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    master: MasterId,
    tables: Tables,
    stats: &ServerStats,
    masters: &SharedMasters,
    log: &SharedLimiter,
    close: CancellationToken,
) {
    let (rd, wr) = stream.into_split();
    let mut input = FramedRead::new(rd, MbapCodec);
    let mut output = FramedWrite::new(wr, MbapCodec);
    let mut pending: FuturesUnordered<BoxFuture<'static, Frame>> = FuturesUnordered::new();
    let mut last_heard = Instant::now();
    // False once the master has half-closed (sent FIN): what it asked before is still
    // answered, then the connection closes.
    let mut reading = true;
    loop {
        if !reading && pending.is_empty() {
            return;
        }
        // The timing of this wait comes from the tables now; each request is routed by
        // the tables current when it is read (a reload may come between), and one already
        // on a bus finishes where it was sent.
        let shared = tables.current();
        let idle_at = last_heard + shared.idle_timeout;
        let idle = pending.is_empty();
        let out = tokio::select! {
            // Cancel-safe: FramedRead keeps partial frames in its buffer.
            frame = input.next(), if reading && pending.len() < MAX_PENDING => match frame {
                Some(Ok(frame)) => {
                    last_heard = Instant::now();
                    lock(masters).slots.request(master, last_heard);
                    stats.request(&frame.pdu);
                    match tables.current().handle(master, frame) {
                        Answer::Now(f) => f,
                        Answer::Later(fut) => {
                            pending.push(fut);
                            continue;
                        }
                    }
                }
                Some(Err(e)) => {
                    // MBAP cannot resynchronise: read no more, but answer what was
                    // asked before the bad frame, then close.
                    if log.allow("connections closed for not speaking modbus-tcp", Some(peer.ip().to_canonical())) {
                        warn!(error = %e, "closing connection: not modbus-tcp");
                    }
                    reading = false;
                    continue;
                }
                None => {
                    reading = false;
                    continue;
                }
            },
            // Cancel-safe: an unfinished answer stays in `pending`.
            Some(f) = pending.next(), if !pending.is_empty() => f,
            () = sleep_until(idle_at), if idle => {
                debug!(idle = ?shared.idle_timeout, "closing idle connection");
                return;
            }
            () = close.cancelled() => return,
        };
        stats.answer(&out.pdu);
        let sent = tokio::select! {
            // Not cancel-safe (a frame may be cut), which is why both other arms close
            // the connection.
            r = output.send(out) => r,
            () = tokio::time::sleep(shared.idle_timeout) => {
                debug!("master does not take its answers; closing connection");
                return;
            }
            () = close.cancelled() => return,
        };
        if let Err(e) = sent {
            debug!(error = %e, "cannot answer; closing connection");
            return;
        }
        if pending.is_empty() {
            lock(masters).slots.answered(master);
        }
        // The master has been busy until now: a relayed request that took longer than
        // the idle timeout must not close the connection under its answer.
        last_heard = Instant::now();
    }
}

/// The coils/registers a write request changes: table, first address, count.
fn write_span(req: &Request<'_>) -> Option<(Table, u16, usize)> {
    Some(match req {
        Request::WriteSingleCoil(a, _) => (Table::Coils, *a, 1),
        Request::WriteMultipleCoils(a, bits) => (Table::Coils, *a, bits.len()),
        Request::WriteSingleRegister(a, _) | Request::MaskWriteRegister(a, _, _) => (Table::Holding, *a, 1),
        Request::WriteMultipleRegisters(a, words) | Request::ReadWriteMultipleRegisters(_, _, a, words) => {
            (Table::Holding, *a, words.len())
        }
        _ => return None,
    })
}

/// The exception a master gets for a bus outcome that is not a response.
fn exception_for(e: &BusError) -> ExceptionCode {
    match e {
        BusError::Exception(code) => *code,
        BusError::Timeout { .. } => ExceptionCode::GatewayTargetDevice,
        BusError::QueueFull => ExceptionCode::ServerDeviceBusy,
        BusError::PortDown(_) | BusError::Closed => ExceptionCode::GatewayPathUnavailable,
        BusError::Invalid(_) => ExceptionCode::IllegalDataValue,
    }
}

/// Function codes that write (FC23 included: it writes before it reads).
fn is_write(function: u8) -> bool {
    matches!(function, 5 | 6 | 15 | 16 | 22 | 23)
}

impl Route {
    /// Whether the unit offers `function` at all: the spec's first check (0x01), made
    /// before the PDU is judged (0x03, then 0x02). Writing is a function only a unit with
    /// grants offers; an agent unit reads FC1-4 and nothing else; a pass unit offers what
    /// its device offers (the device judges).
    fn serves(&self, function: u8) -> bool {
        if self.broadcast {
            return matches!(function, 5 | 6 | 15 | 16);
        }
        if is_write(function) {
            return self.writable || !self.grants.is_empty();
        }
        match self.mode {
            ServeMode::Pass => true,
            ServeMode::Agent { .. } => matches!(function, 1..=4),
        }
    }

    /// `Ok` when grants cover every address of the write.
    fn may_write(&self, table: Table, start: u16, count: usize) -> Result<(), ExceptionCode> {
        if self.writable {
            return Ok(());
        }
        let covered = (usize::from(start)..usize::from(start) + count).all(|a| {
            u16::try_from(a).is_ok_and(|a| self.grants.iter().any(|g| g.covers(self.unit, table, a)))
        });
        if covered { Ok(()) } else { Err(ExceptionCode::IllegalDataAddress) }
    }
}

impl Shared {
    fn handle(&self, master: MasterId, frame: Frame) -> Answer {
        if let Some(v) = self.virtuals.get(&frame.unit) {
            return self.virtual_unit(v, frame);
        }
        let Some(route) = self.routes.get(&frame.unit) else {
            return Answer::Now(frame.exception(ExceptionCode::GatewayPathUnavailable));
        };
        // The spec's order: function (0x01), then quantity and length (0x03), then
        // address (0x02), then execution.
        if !frame.pdu.first().is_some_and(|f| route.serves(*f)) {
            return Answer::Now(frame.exception(ExceptionCode::IllegalFunction));
        }
        let request = match mbap::decode_request(&frame.pdu) {
            Ok(r) => r,
            Err(code) => return Answer::Now(frame.exception(code)),
        };
        if let Some((table, start, count)) = write_span(&request) {
            if let Err(code) = route.may_write(table, start, count) {
                debug!(unit = frame.unit, ?table, start, count, "write refused");
                return Answer::Now(frame.exception(code));
            }
            return relay(route, master, frame, request, self.max_in_flight);
        }
        match route.mode {
            ServeMode::Pass => relay(route, master, frame, request, self.max_in_flight),
            ServeMode::Agent { max_age } => Answer::Now(self.agent_read(route, &frame, &request, max_age)),
        }
    }

    /// Answers a request to a virtual unit: reads now, writes once carried out.
    fn virtual_unit(&self, v: &SharedVUnit, frame: Frame) -> Answer {
        if !frame.pdu.first().is_some_and(|f| v.serves(*f)) {
            return Answer::Now(frame.exception(ExceptionCode::IllegalFunction));
        }
        let request = match mbap::decode_request(&frame.pdu) {
            Ok(r) => r,
            Err(code) => return Answer::Now(frame.exception(code)),
        };
        let encode = |frame: &Frame, rsp: &Response| {
            let mut pdu = Vec::with_capacity(pdu::MAX_PDU);
            pdu::encode_response(rsp, &mut pdu);
            frame.answer(pdu)
        };
        let Some(response) = vunit::write_response(&request) else {
            return Answer::Now(match v.read(&self.image, &request) {
                Ok(rsp) => encode(&frame, &rsp),
                Err(code) => frame.exception(code),
            });
        };
        let planned = match v.plan_write(&request) {
            Ok(p) => p,
            Err(code) => return Answer::Now(frame.exception(code)),
        };
        let v = v.clone();
        Answer::Later(Box::pin(async move {
            match v.write(planned).await {
                Ok(()) => encode(&frame, &response),
                Err(code) => frame.exception(code),
            }
        }))
    }

    /// Answers a read from the raw cache of the image.
    fn agent_read(&self, route: &Route, frame: &Frame, req: &Request<'_>, max_age: Duration) -> Frame {
        let (table, start, count) = match req {
            Request::ReadCoils(a, q) => (Table::Coils, *a, *q),
            Request::ReadDiscreteInputs(a, q) => (Table::Discrete, *a, *q),
            Request::ReadHoldingRegisters(a, q) => (Table::Holding, *a, *q),
            Request::ReadInputRegisters(a, q) => (Table::Input, *a, *q),
            _ => return frame.exception(ExceptionCode::IllegalFunction),
        };
        let rsp = match self.image.read_raw(&route.device, table, start, count, max_age) {
            Ok(Raw::Bits(b)) if table == Table::Coils => Response::ReadCoils(b),
            Ok(Raw::Bits(b)) => Response::ReadDiscreteInputs(b),
            Ok(Raw::Words(w)) if table == Table::Holding => Response::ReadHoldingRegisters(w),
            Ok(Raw::Words(w)) => Response::ReadInputRegisters(w),
            Err(RawMiss::NotPolled) => return frame.exception(ExceptionCode::IllegalDataAddress),
            Err(RawMiss::NotFresh) => return frame.exception(ExceptionCode::GatewayTargetDevice),
        };
        let mut pdu = Vec::with_capacity(pdu::MAX_PDU);
        pdu::encode_response(&rsp, &mut pdu);
        frame.answer(pdu)
    }
}

/// Queues a request for the route's device on its bus; the answer comes later.
fn relay(
    route: &Route,
    master: MasterId,
    frame: Frame,
    request: Request<'static>,
    max_in_flight: usize,
) -> Answer {
    // Bit replies are padded to whole bytes; answer exactly the bits asked for.
    let bits = match request {
        Request::ReadCoils(_, q) | Request::ReadDiscreteInputs(_, q) => usize::from(q),
        _ => usize::MAX,
    };
    let (reply, rx) = oneshot::channel();
    let job = Job {
        unit: route.device_unit,
        request,
        priority: Priority::PassThrough,
        timeout: route.timeout,
        turnaround: route.turnaround,
        retries: route.retries,
        reply,
    };
    if let Err(e) = route.bus.pass_through(master, job, max_in_flight) {
        return Answer::Now(frame.exception(exception_for(&e)));
    }
    Answer::Later(Box::pin(async move {
        match rx.await.unwrap_or(Err(BusError::Closed)) {
            Ok(mut rsp) => {
                if let Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) = &mut rsp {
                    b.truncate(bits);
                }
                let mut pdu = Vec::with_capacity(pdu::MAX_PDU);
                pdu::encode_response(&rsp, &mut pdu);
                frame.answer(pdu)
            }
            Err(e) => frame.exception(exception_for(&e)),
        }
    }))
}

/// What `check` shows of the server: where it listens, the units it serves and the
/// routes, in words.
pub fn describe_server(config: &model::Server) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "server on {} (at most {} masters, {} pass-through request(s) each per bus)\n",
        config.listen, config.max_connections, config.max_in_flight
    );
    let grants = |unit: u8| config.grants.iter().filter(|g| g.unit == unit).count();
    for u in &config.units {
        let how = match u.mode {
            ServeMode::Agent { max_age } => format!("agent for {} (values up to {max_age:?} old)", u.device),
            ServeMode::Pass => format!("passed through to {} on bus {}", u.device, u.bus),
        };
        let _ = writeln!(out, "  unit {}: {how}, {} write grant(s)", u.unit, grants(u.unit));
    }
    for r in &config.routes {
        let to = match r.unit_offset {
            0 => "the same unit ids".to_owned(),
            o if o > 0 => format!("unit id - {o}"),
            o => format!("unit id + {}", -o),
        };
        let writes = if r.writable {
            "writable".to_owned()
        } else {
            let n: usize = r.units.iter().map(|u| grants(*u)).sum();
            if n == 0 { "read-only".to_owned() } else { format!("{n} write grant(s)") }
        };
        let _ = writeln!(
            out,
            "  units {} ({} ids) routed to bus {} as {to}, {writes}, timeout {:?}",
            ranges(&r.units),
            r.units.len(),
            r.bus,
            r.timeout
        );
        if r.broadcast {
            let _ = writeln!(
                out,
                "  unit 0: writes (FC5/6/15/16) broadcast on bus {}, answered with their echo",
                r.bus
            );
        }
    }
    out
}

/// `[1, 2, 3, 7]` as `"1-3,7"`.
fn ranges(units: &[u8]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < units.len() {
        let mut j = i;
        while j + 1 < units.len() && units[j + 1] == units[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { units[i].to_string() } else { format!("{}-{}", units[i], units[j]) });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn when_full_the_longest_idle_master_gives_way() {
        let t0 = Instant::now();
        let mut s = Slots::new(3);
        assert_eq!(s.admit(1, t0), Admission::Free);
        assert_eq!(s.admit(2, t0 + MS(1)), Admission::Free);
        assert_eq!(s.admit(3, t0 + MS(2)), Admission::Free);
        // 1 asked something recently and was answered; 2 has been quiet since connecting.
        s.request(1, t0 + MS(5000));
        s.answered(1);
        s.request(3, t0 + MS(6000));
        s.answered(3);
        assert_eq!(s.admit(4, t0 + MS(8400)), Admission::Reclaimed(2, MS(8399)));
        assert_eq!(s.len(), 3);
        // Next the least recent requester, 1.
        assert_eq!(s.admit(5, t0 + MS(8500)), Admission::Reclaimed(1, MS(3500)));
    }

    #[test]
    fn a_master_being_answered_is_never_reclaimed() {
        let t0 = Instant::now();
        let mut s = Slots::new(2);
        s.admit(1, t0);
        s.admit(2, t0);
        s.request(1, t0 + MS(1));
        // 1 is older-idle by its request time than nothing: only 2 is idle.
        assert_eq!(s.admit(3, t0 + MS(10)), Admission::Reclaimed(2, MS(10)));
        s.request(3, t0 + MS(11));
        // Both busy: the newcomer is refused and nothing changes.
        assert_eq!(s.admit(4, t0 + MS(20)), Admission::Full);
        assert_eq!(s.len(), 2);
        s.answered(1);
        assert_eq!(s.admit(5, t0 + MS(30)), Admission::Reclaimed(1, MS(29)));
        s.remove(3);
        s.remove(5);
        assert!(s.is_empty());
    }

    #[test]
    fn unit_ranges_read_as_written() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1-3,7,9-10");
        assert_eq!(ranges(&[5]), "5");
        assert_eq!(ranges(&[]), "");
    }
}
