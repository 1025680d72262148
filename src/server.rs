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
//!
//! Files: server/route.rs routes each request by unit id (the checks, agent reads,
//! virtual units, relaying to a bus), server/slots.rs admits masters to the
//! `max_connections` slots, server/describe.rs says in words what `check` shows,
//! server/mbap.rs frames MBAP, server/vunit.rs serves virtual units.

mod describe;
pub mod mbap;
mod route;
mod slots;
mod vunit;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep_until};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, instrument, warn};

pub use describe::{describe, describe_server};
pub use route::Tables;
pub use slots::{Admission, Slots};
pub use vunit::{Owners, WriteFailure};

use crate::bus::BusHandle;
use crate::bus::pass::MasterId;
use crate::image::Image;
use crate::loglimit::SharedLimiter;
use crate::model::{self, Model};
use crate::server::mbap::{Frame, MbapCodec};
use crate::sockets::Sockets;
use route::{Answer, Shared};
use slots::{Masters, SharedMasters, lock};

/// The least pause a bus keeps after a broadcast before its next request: the serial
/// line spec's "turnaround delay" (typically 100 to 200 ms), which lets the slowest
/// device act on a broadcast it cannot confirm.
pub const BROADCAST_TURNAROUND: Duration = Duration::from_millis(100);

/// Requests of one connection being answered at once; more wait in the socket.
pub const MAX_PENDING: usize = 16;
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
/// A socket handed over already bound to that address is used instead.
pub fn listen(config: &model::Server, sockets: &Sockets) -> Result<TcpListener, ServerError> {
    sockets
        .listen(config.listen, "[server]")
        .map_err(|source| ServerError::Bind { addr: config.listen, source })
}

/// A master id never given before in this process: the buses' pass-through queues outlive
/// a server restarted by a reload, and a request taken for an old master may still be on
/// the line, so a new master must not inherit its in-flight slot.
fn new_master_id() -> MasterId {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
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
        let log = self.log.clone();
        let mut flush = log.ticker();
        // Watched by the systemd watchdog: an accept loop that stops turning (a deadlock)
        // stops the pings, and systemd restarts the gateway.
        let beat = crate::health::beat("modbus-tcp server".into());
        let hang_at = crate::health::hang_after(beat.name()).map(|d| tokio::time::Instant::now() + d);
        loop {
            crate::health::hang_if_due(hang_at).await;
            beat.idle(std::time::Instant::now());
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
                // Cancel-safe: a timer; wakes the loop to beat.
                () = tokio::time::sleep(beat.tick()) => continue,
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
            let master = new_master_id();
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
