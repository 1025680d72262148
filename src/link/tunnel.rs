//! Serial tunnels: a local serial port bridged to a serial port on a peer gateway over
//! the peer link — a virtual cable for two machines that talk their own protocol. One
//! task per tunnel owns its port; [`TunnelHub`] is the small hook the link offers it.
//!
//! Data path, one way: bytes read from the port are cut into packets (a packet ends
//! after `silence` without a byte, or at `max_packet` bytes), each packet goes to the
//! peer as one `Tunnel` frame on the link's current session; the peer's tunnel of the
//! same name writes it to its port. The other way is symmetric.
//!
//! Invariants:
//! - bytes are never reordered: packets leave in the order they were read (the backlog,
//!   when there is one, is always sent before a newer packet), and received packets are
//!   written to the port in the order they arrived;
//! - tunnel bytes are live traffic: never spooled, acked or resent. While the link is
//!   down (or the peer is not reading) the configured policy decides: `drop` counts
//!   and discards, `buffer` keeps at most `buffer_max` bytes, dropping (and counting)
//!   the oldest bytes beyond that. Packets already handed to a session that then dies
//!   may be lost (the link does not know whether the peer got them);
//! - memory is bounded both ways: the backlog by `buffer_max`, the peer's packets by
//!   the inbox ([`INBOX`] packets; more are dropped and counted) and [`WRITE_QUEUE`]
//!   bytes waiting for the port;
//! - the port is opened by path and reopened with back-off (100 ms doubling up to
//!   `reopen_max`) when it fails; peer packets arriving while it is closed are dropped
//!   and counted.
//!
//! The timing rules are plain state that takes `now` (`Packetizer`: where a packet
//! ends; `PortState`: when the port is opened again and which failures are news), unit-
//! tested with injected time; the task's loop only does the I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::Backoff;
use crate::link::proto::Frame;
use crate::model::{OnLinkDown, Tunnel};
use crate::serial::line::Port;

/// Packets from the peer waiting for the tunnel task; more are dropped and counted.
pub const INBOX: usize = 256;
/// Bytes from the peer taken from the inbox but not yet written to the port.
pub const WRITE_QUEUE: usize = 64 << 10;
/// How often a non-empty backlog retries the link.
const RETRY: Duration = Duration::from_millis(20);
/// First reopen delay of a failed port.
const REOPEN_MIN: Duration = Duration::from_millis(100);

/// Queues one frame on the link's current session; false when the session is not
/// taking more (the peer is not reading fast enough).
pub type SessionSend = Box<dyn Fn(Frame) -> bool + Send + Sync>;

/// The link's side of the tunnels to one peer: who receives the peer's tunnel frames
/// (by tunnel name), and how to send on the current session. Locks are held only for
/// a map look-up or a non-blocking queue push, never across an `.await`.
#[derive(Default)]
pub struct TunnelHub {
    inboxes: Mutex<HashMap<String, Inbox>>,
    session: Mutex<Option<SessionSend>>,
    /// Frames for a tunnel not configured here.
    unknown: AtomicU64,
}

struct Inbox {
    tx: mpsc::Sender<Bytes>,
    counters: Arc<Counters>,
}

/// Why a packet could not be handed to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TunnelError {
    /// No session is up.
    #[error("link is down")]
    Down,
    /// The session's queue is full.
    #[error("peer is not reading fast enough")]
    Busy,
}

impl std::fmt::Debug for TunnelHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelHub").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TunnelHub {
    /// A session is up: tunnel frames go out through `send` until [`Self::detach`].
    pub fn attach(&self, send: SessionSend) {
        *lock(&self.session) = Some(send);
    }

    /// The session ended: tunnel packets now meet the link-down policy.
    pub fn detach(&self) {
        *lock(&self.session) = None;
    }

    /// A tunnel frame from the peer: handed to the tunnel of that name without
    /// waiting; dropped and counted when there is none or it is not keeping up.
    pub fn deliver(&self, name: &str, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let inboxes = lock(&self.inboxes);
        let Some(inbox) = inboxes.get(name) else {
            if self.unknown.fetch_add(1, Relaxed) == 0 {
                warn!(tunnel = name, "the peer sends tunnel data for a tunnel not configured here; dropped");
            }
            return;
        };
        let len = data.len() as u64;
        if inbox.tx.try_send(data).is_err() {
            inbox.counters.dropped_in.fetch_add(len, Relaxed);
            debug!(tunnel = name, bytes = len, "tunnel not keeping up with the peer; packet dropped");
        }
    }

    /// Frames received for tunnels not configured here.
    pub fn unknown_frames(&self) -> u64 {
        self.unknown.load(Relaxed)
    }

    fn send(&self, name: &str, data: Bytes) -> Result<(), TunnelError> {
        match &*lock(&self.session) {
            None => Err(TunnelError::Down),
            Some(send) => {
                if send(Frame::Tunnel { name: name.to_string(), data }) {
                    Ok(())
                } else {
                    Err(TunnelError::Busy)
                }
            }
        }
    }

    fn register(&self, name: &str, counters: Arc<Counters>) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(INBOX);
        lock(&self.inboxes).insert(name.to_string(), Inbox { tx, counters });
        rx
    }
}

/// A snapshot of a tunnel's counters. "Out" is serial port to peer, "in" is peer to
/// serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TunnelStats {
    /// The serial port is open.
    pub port_open: bool,
    /// Times the port was opened.
    pub opens: u64,
    /// Bytes read from the port and handed to the link.
    pub bytes_out: u64,
    /// Packets handed to the link.
    pub packets_out: u64,
    /// Bytes from the peer written to the port.
    pub bytes_in: u64,
    /// Packets from the peer written to the port.
    pub packets_in: u64,
    /// Bytes read from the port that never went to the peer (policy `drop` while the
    /// link was down, or the oldest bytes of a full buffer).
    pub dropped_out: u64,
    /// Bytes from the peer that were not written (port closed, or not keeping up).
    pub dropped_in: u64,
    /// Bytes waiting in the buffer for the link (policy `buffer`).
    pub buffered: u64,
}

/// One-line health summary of a tunnel, for the periodic info log.
pub fn summary(now: &TunnelStats, since: &TunnelStats, _elapsed: std::time::Duration) -> String {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    format!(
        "port {}; to peer {} bytes in {} packets, from peer {} bytes in {} packets; dropped {} bytes \
         to peer, {} from peer; buffered {} bytes",
        if now.port_open { "open" } else { "closed" },
        d(now.bytes_out, since.bytes_out),
        d(now.packets_out, since.packets_out),
        d(now.bytes_in, since.bytes_in),
        d(now.packets_in, since.packets_in),
        d(now.dropped_out, since.dropped_out),
        d(now.dropped_in, since.dropped_in),
        now.buffered,
    )
}

#[derive(Debug, Default)]
struct Counters {
    port_open: AtomicBool,
    opens: AtomicU64,
    bytes_out: AtomicU64,
    packets_out: AtomicU64,
    bytes_in: AtomicU64,
    packets_in: AtomicU64,
    dropped_out: AtomicU64,
    dropped_in: AtomicU64,
    buffered: AtomicU64,
}

/// A cheap handle to a running tunnel.
#[derive(Debug, Clone)]
pub struct TunnelHandle {
    name: Arc<str>,
    counters: Arc<Counters>,
}

impl TunnelHandle {
    /// The tunnel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tunnel's counters.
    pub fn stats(&self) -> TunnelStats {
        let c = &self.counters;
        TunnelStats {
            port_open: c.port_open.load(Relaxed),
            opens: c.opens.load(Relaxed),
            bytes_out: c.bytes_out.load(Relaxed),
            packets_out: c.packets_out.load(Relaxed),
            bytes_in: c.bytes_in.load(Relaxed),
            packets_in: c.packets_in.load(Relaxed),
            dropped_out: c.dropped_out.load(Relaxed),
            dropped_in: c.dropped_in.load(Relaxed),
            buffered: c.buffered.load(Relaxed),
        }
    }
}

/// Starts the task of `tunnel` on the link whose hub is `hub`; it stops on `shutdown`.
pub fn spawn(
    tunnel: &Tunnel,
    hub: Arc<TunnelHub>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> TunnelHandle {
    let counters = Arc::new(Counters::default());
    let inbox = hub.register(&tunnel.name, counters.clone());
    let handle = TunnelHandle { name: Arc::from(tunnel.name.as_str()), counters: counters.clone() };
    let span = info_span!("tunnel", tunnel = %tunnel.name, peer = %tunnel.peer);
    let task = Task {
        t: tunnel.clone(),
        hub,
        counters,
        inbox,
        backlog: VecDeque::new(),
        backlog_bytes: 0,
        down_logged: false,
        full_logged: false,
    };
    tracker.spawn(task.run(shutdown).instrument(span));
    handle
}

struct Task {
    t: Tunnel,
    hub: Arc<TunnelHub>,
    counters: Arc<Counters>,
    inbox: mpsc::Receiver<Bytes>,
    /// Packets waiting for the link (policy `buffer` only), oldest first.
    backlog: VecDeque<Bytes>,
    backlog_bytes: usize,
    /// The link-down state was logged (reset once a packet goes through again).
    down_logged: bool,
    /// Buffer overflow was logged during this outage.
    full_logged: bool,
}

/// Reads the open port (split so reading and writing proceed independently); pending
/// while it is closed.
async fn read_port(rd: &mut Option<ReadHalf<Box<dyn Port>>>, buf: &mut [u8]) -> std::io::Result<usize> {
    match rd {
        Some(rd) => rd.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Writes some of `data` to the open port; pending while it is closed.
async fn write_port(wr: &mut Option<WriteHalf<Box<dyn Port>>>, data: &[u8]) -> std::io::Result<usize> {
    match wr {
        Some(wr) => wr.write(data).await,
        None => std::future::pending().await,
    }
}

/// Cuts the bytes read from the port into packets: a packet ends `silence` after its
/// last byte, or at `max_packet` bytes. Sans-I/O: every method that depends on time takes
/// `now`.
#[derive(Debug)]
struct Packetizer {
    max_packet: usize,
    silence: Duration,
    packet: BytesMut,
    last_byte: Instant,
}

impl Packetizer {
    fn new(max_packet: usize, silence: Duration, now: Instant) -> Self {
        Self { max_packet: max_packet.max(1), silence, packet: BytesMut::new(), last_byte: now }
    }

    /// Bytes read at `now`: the packets they fill to `max_packet`, in order (the rest
    /// stays open).
    fn read(&mut self, mut data: &[u8], now: Instant) -> Vec<Bytes> {
        self.last_byte = now;
        let mut full = Vec::new();
        while !data.is_empty() {
            let take = (self.max_packet - self.packet.len()).min(data.len());
            self.packet.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.packet.len() >= self.max_packet {
                full.push(self.packet.split().freeze());
            }
        }
        full
    }

    /// When the open packet ends by silence (`None`: no packet is open).
    fn silence_end(&self) -> Option<Instant> {
        (!self.packet.is_empty()).then(|| self.last_byte + self.silence)
    }

    /// The open packet, if its silence has passed at `now`.
    fn timed_out(&mut self, now: Instant) -> Option<Bytes> {
        self.silence_end().filter(|end| now >= *end).map(|_| self.packet.split().freeze())
    }

    /// The open packet, cut short (the port failed).
    fn flush(&mut self) -> Option<Bytes> {
        (!self.packet.is_empty()).then(|| self.packet.split().freeze())
    }
}

/// When the tunnel's port is opened again, and which failures are news. Sans-I/O.
///
/// The back-off (100 ms doubling up to `reopen_max`) is reset only by a port that carried
/// a byte: a device server that accepts and closes at once is not retried every 100 ms
/// for ever, and its repeated failure is logged once.
#[derive(Debug)]
struct PortState {
    backoff: Backoff,
    next_open: Instant,
    /// The open port has carried a byte.
    proven: bool,
    /// The last open error (a repeat is not logged again).
    last_error: String,
    /// The last failure of a port that carried nothing (empty after a port that worked).
    last_failure: String,
}

impl PortState {
    fn new(reopen_max: Duration, now: Instant) -> Self {
        Self {
            backoff: Backoff::new(REOPEN_MIN, reopen_max),
            next_open: now,
            proven: false,
            last_error: String::new(),
            last_failure: String::new(),
        }
    }

    /// True when a closed port may be opened at `now`.
    fn open_due(&self, now: Instant) -> bool {
        now >= self.next_open
    }

    /// The port opened; true when that is news (the first open, or after a port that
    /// worked), false after a port that failed without carrying anything.
    fn opened(&mut self) -> bool {
        let news = self.proven || self.last_failure.is_empty();
        self.proven = false;
        self.last_error.clear();
        news
    }

    /// Opening failed at `now` with `error`: the delay to log when the error is new
    /// (`None`: a repeat).
    fn open_failed(&mut self, error: String, now: Instant) -> Option<Duration> {
        let delay = self.backoff.delay();
        let news = error != self.last_error;
        self.last_error = error;
        self.next_open = self.backoff.failed(now);
        news.then_some(delay)
    }

    /// The open port carried a byte (either way).
    fn carried(&mut self) {
        self.proven = true;
    }

    /// The open port failed at `now` with `error`: whether that is news (the port had
    /// worked, or the error is new) and the delay before the next open.
    fn failed(&mut self, error: String, now: Instant) -> (bool, Duration) {
        if self.proven {
            self.backoff.proven();
        }
        let news = self.proven || error != self.last_failure;
        let delay = self.backoff.delay();
        // After a port that worked, the next open is news again.
        self.last_failure = if self.proven { String::new() } else { error };
        self.next_open = self.backoff.failed(now);
        (news, delay)
    }
}

impl Task {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut port_rd: Option<ReadHalf<Box<dyn Port>>> = None;
        let mut port_wr: Option<WriteHalf<Box<dyn Port>>> = None;
        let mut state = PortState::new(self.t.reopen_max, Instant::now());
        let mut packets = Packetizer::new(self.t.max_packet, self.t.silence, Instant::now());
        let mut rbuf = vec![0u8; self.t.max_packet.clamp(64, 4096)];
        // Peer packets waiting for the port, with the offset written of the first.
        let mut wq: VecDeque<Bytes> = VecDeque::new();
        let mut wq_bytes = 0usize;
        let mut failed: Option<String> = None;
        info!(port = %self.t.port, max_packet = self.t.max_packet, silence = ?self.t.silence, "tunnel started");
        loop {
            if port_rd.is_none() && state.open_due(Instant::now()) {
                let opened = tokio::select! {
                    // Cancel-safe: an open abandoned half-way (a TCP connect) is dropped.
                    r = crate::serial::line::open_port(&self.t.port, &self.t.line) => r,
                    () = shutdown.cancelled() => break,
                };
                match opened {
                    Ok(p) => {
                        let (rd, wr) = tokio::io::split(p);
                        (port_rd, port_wr) = (Some(rd), Some(wr));
                        self.counters.port_open.store(true, Relaxed);
                        self.counters.opens.fetch_add(1, Relaxed);
                        if state.opened() {
                            info!("tunnel port open");
                        } else {
                            debug!("tunnel port open");
                        }
                    }
                    Err(e) => {
                        if let Some(retry_in) = state.open_failed(e.clone(), Instant::now()) {
                            warn!(error = %e, retry_in = ?retry_in, "cannot open tunnel port");
                        }
                    }
                }
            }
            let silence_end = packets.silence_end();
            tokio::select! {
                // Cancel-safe: read either completes with bytes or reads nothing.
                r = read_port(&mut port_rd, &mut rbuf) => match r {
                    Ok(0) => failed = Some("end of file".into()),
                    Ok(n) => {
                        state.carried();
                        for packet in packets.read(&rbuf[..n], Instant::now()) {
                            self.emit(packet);
                        }
                    }
                    Err(e) => failed = Some(e.to_string()),
                },
                // Cancel-safe: a timer.
                () = sleep_until(silence_end.unwrap_or_else(Instant::now)), if silence_end.is_some() => {
                    if let Some(packet) = packets.timed_out(Instant::now()) {
                        self.emit(packet);
                    }
                }
                // Cancel-safe: `write` either writes some bytes or none.
                r = write_port(&mut port_wr, wq.front().map_or(&[][..], |b| &b[..])), if !wq.is_empty() => match r {
                    Ok(0) => failed = Some("port takes no more bytes".into()),
                    Ok(n) => {
                        state.carried();
                        wq_bytes -= n;
                        self.counters.bytes_in.fetch_add(n as u64, Relaxed);
                        if let Some(front) = wq.front_mut() {
                            front.advance(n);
                            if front.is_empty() {
                                wq.pop_front();
                                self.counters.packets_in.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Err(e) => failed = Some(e.to_string()),
                },
                // Cancel-safe: mpsc::recv. Not armed while the port is behind, so the
                // inbox fills and the link drops (and counts) instead of this growing.
                Some(data) = self.inbox.recv(), if wq_bytes < WRITE_QUEUE => {
                    if port_wr.is_some() {
                        wq_bytes += data.len();
                        wq.push_back(data);
                    } else {
                        self.counters.dropped_in.fetch_add(data.len() as u64, Relaxed);
                    }
                }
                // Cancel-safe: a timer.
                () = sleep(RETRY), if !self.backlog.is_empty() => self.drain(),
                // Cancel-safe: a timer.
                () = sleep_until(state.next_open), if port_rd.is_none() => {}
                () = shutdown.cancelled() => break,
            }
            if let Some(e) = failed.take() {
                let (news, retry_in) = state.failed(e.clone(), Instant::now());
                if news {
                    warn!(error = %e, retry_in = ?retry_in, "tunnel port failed; reopening");
                } else {
                    debug!(error = %e, retry_in = ?retry_in, "tunnel port failed again right after opening");
                }
                (port_rd, port_wr) = (None, None);
                self.counters.port_open.store(false, Relaxed);
                if let Some(packet) = packets.flush() {
                    self.emit(packet);
                }
                let lost: usize = wq.drain(..).map(|b| b.len()).sum();
                self.counters.dropped_in.fetch_add(lost as u64, Relaxed);
                wq_bytes = 0;
            }
        }
        self.counters.port_open.store(false, Relaxed);
        info!("tunnel stopped");
    }

    /// One packet read from the port: to the peer now, or the link-down policy.
    fn emit(&mut self, data: Bytes) {
        match self.t.on_link_down {
            OnLinkDown::Drop => match self.hub.send(&self.t.name, data.clone()) {
                Ok(()) => self.sent(data.len()),
                Err(why) => {
                    self.counters.dropped_out.fetch_add(data.len() as u64, Relaxed);
                    if !self.down_logged {
                        self.down_logged = true;
                        error!(reason = %why, "tunnel bytes are dropped until the link is back (on_link_down = drop)");
                    }
                }
            },
            OnLinkDown::Buffer { max_bytes } => {
                self.backlog_bytes += data.len();
                self.backlog.push_back(data);
                self.drain();
                // Over the bound: the oldest bytes go first.
                let mut excess = self.backlog_bytes.saturating_sub(max_bytes);
                if excess > 0 {
                    self.counters.dropped_out.fetch_add(excess as u64, Relaxed);
                    if !self.full_logged {
                        self.full_logged = true;
                        error!(buffer_max = max_bytes, "tunnel buffer full; dropping its oldest bytes");
                    }
                }
                while excess > 0 {
                    let Some(front) = self.backlog.front_mut() else { break };
                    let cut = excess.min(front.len());
                    front.advance(cut);
                    excess -= cut;
                    self.backlog_bytes -= cut;
                    if front.is_empty() {
                        self.backlog.pop_front();
                    }
                }
                self.counters.buffered.store(self.backlog_bytes as u64, Relaxed);
            }
        }
    }

    /// Sends the backlog, oldest first, until the link refuses.
    fn drain(&mut self) {
        while let Some(front) = self.backlog.front() {
            match self.hub.send(&self.t.name, front.clone()) {
                Ok(()) => {
                    let n = front.len();
                    self.backlog.pop_front();
                    self.backlog_bytes -= n;
                    self.sent(n);
                }
                Err(why) => {
                    if !self.down_logged {
                        self.down_logged = true;
                        warn!(reason = %why, "tunnel bytes are buffered until the link is back (on_link_down = buffer)");
                    }
                    break;
                }
            }
        }
        self.counters.buffered.store(self.backlog_bytes as u64, Relaxed);
    }

    fn sent(&mut self, n: usize) {
        self.counters.bytes_out.fetch_add(n as u64, Relaxed);
        self.counters.packets_out.fetch_add(1, Relaxed);
        if self.down_logged && self.backlog.is_empty() {
            info!("tunnel bytes flow to the peer again");
            self.down_logged = false;
            self.full_logged = false;
        }
    }
}

/// What `check` prints about the tunnels: one line each, with the wire time of a full
/// packet and how long a full buffer covers at the line's full rate.
pub fn describe(tunnels: &[Tunnel]) -> String {
    let mut out = String::new();
    for t in tunnels {
        let l = &t.line;
        let parity = l.parity.letter();
        let full = crate::serial::rtu::wire_time(l, t.max_packet);
        let down = match t.on_link_down {
            OnLinkDown::Drop => "dropped".to_string(),
            OnLinkDown::Buffer { max_bytes } => format!(
                "buffered up to {max_bytes} bytes ({:.1} s of a busy line)",
                crate::serial::rtu::wire_time(l, max_bytes).as_secs_f64()
            ),
        };
        out.push_str(&format!(
            "tunnel {} -> peer {}: {} {} {}{}{}; a packet ends after {:.2} ms of silence or at {} bytes ({:.1} ms on the wire); while the link is down bytes are {down}\n",
            t.name,
            t.peer,
            t.port,
            l.baud,
            l.data_bits,
            parity,
            l.stop_bits,
            t.silence.as_secs_f64() * 1000.0,
            t.max_packet,
            full.as_secs_f64() * 1000.0,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_since_the_last_one() {
        let since = TunnelStats { bytes_out: 100, packets_out: 2, ..TunnelStats::default() };
        let now = TunnelStats {
            port_open: true,
            opens: 1,
            bytes_out: 350,
            packets_out: 5,
            bytes_in: 40,
            packets_in: 1,
            dropped_out: 0,
            dropped_in: 7,
            buffered: 12,
        };
        assert_eq!(
            summary(&now, &since, std::time::Duration::from_secs(60)),
            "port open; to peer 250 bytes in 3 packets, from peer 40 bytes in 1 packets; dropped 0 bytes \
             to peer, 7 from peer; buffered 12 bytes"
        );
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_packet_ends_at_max_packet_or_after_its_silence() {
        let t0 = Instant::now();
        let mut p = Packetizer::new(4, MS(5), t0);
        assert_eq!(p.silence_end(), None, "no packet open");
        let full = p.read(b"abcdefghij", t0);
        assert_eq!(full, [Bytes::from_static(b"abcd"), Bytes::from_static(b"efgh")]);
        assert_eq!(p.silence_end(), Some(t0 + MS(5)), "\"ij\" waits for its silence");
        assert_eq!(p.timed_out(t0 + MS(4)), None, "not yet");
        let later = t0 + MS(3);
        assert!(p.read(b"k", later).is_empty());
        assert_eq!(p.silence_end(), Some(later + MS(5)), "a new byte restarts the silence");
        assert_eq!(p.timed_out(later + MS(5)), Some(Bytes::from_static(b"ijk")));
        assert_eq!((p.silence_end(), p.flush()), (None, None));
        assert!(p.read(b"x", later).is_empty());
        assert_eq!(p.flush(), Some(Bytes::from_static(b"x")), "a failing port cuts the packet short");
    }

    /// A device server that accepts every connection and closes it at once: the port
    /// opens fine and fails at the first read. It was reopened every 100 ms for ever
    /// (the back-off restarted at each open), with a WARN and an INFO each time.
    #[test]
    fn a_port_that_fails_right_after_opening_backs_off_and_is_logged_once() {
        let t0 = Instant::now();
        let mut s = PortState::new(Duration::from_secs(30), t0);
        assert!(s.open_due(t0));
        let mut now = t0;
        let mut delays = Vec::new();
        let mut news = Vec::new();
        for _ in 0..5 {
            news.push(s.opened());
            let (warn, _) = s.failed("end of file".into(), now);
            news.push(warn);
            delays.push(s.next_open - now);
            assert!(!s.open_due(now));
            now = s.next_open;
        }
        assert_eq!(delays, [MS(100), MS(200), MS(400), MS(800), MS(1600)]);
        assert_eq!(
            news[..4],
            [true, true, false, false],
            "the first open and failure are news; repeats are not"
        );
        // A port that carries a byte has proven itself: back to the first delay, and news.
        assert!(!s.opened());
        s.carried();
        let (warn, retry_in) = s.failed("end of file".into(), now);
        assert!(warn);
        assert_eq!((retry_in, s.next_open - now), (MS(100), MS(100)));
        assert!(s.opened(), "the open after a port that worked is news");
    }

    #[test]
    fn a_port_that_will_not_open_warns_once_per_error_with_growing_delays() {
        let t0 = Instant::now();
        let mut s = PortState::new(MS(300), t0);
        assert_eq!(s.open_failed("no such file".into(), t0), Some(MS(100)));
        assert_eq!(s.open_failed("no such file".into(), t0), None, "a repeat is not logged");
        assert_eq!(s.next_open - t0, MS(200));
        assert_eq!(s.open_failed("permission denied".into(), t0), Some(MS(300)), "a new error is");
        assert_eq!(s.next_open - t0, MS(300), "capped at reopen_max");
    }

    /// The task is wired to the state: a port that accepts and drops is opened again.
    #[tokio::test]
    async fn a_failing_port_is_reopened() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let accepts = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = server.accept().await else { return };
                drop(conn);
            }
        });
        let tunnel = Tunnel {
            name: "t".into(),
            peer: "p".into(),
            port: format!("tcp://{addr}"),
            line: crate::model::Line {
                baud: 9600,
                data_bits: 8,
                parity: crate::model::Parity::None,
                stop_bits: 1,
            },
            silence: Duration::from_millis(5),
            max_packet: 256,
            on_link_down: OnLinkDown::Drop,
            reopen_max: Duration::from_secs(30),
        };
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = spawn(&tunnel, Arc::new(TunnelHub::default()), shutdown.clone(), &tracker);
        let deadline = Instant::now() + Duration::from_secs(10);
        while handle.stats().opens < 2 {
            assert!(Instant::now() < deadline, "the port was not reopened");
            tokio::time::sleep(MS(10)).await;
        }
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        accepts.abort();
    }

    fn hub_with_session(cap: usize) -> (Arc<TunnelHub>, Arc<Mutex<Vec<Frame>>>) {
        let hub = Arc::new(TunnelHub::default());
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        hub.attach(Box::new(move |f| {
            let mut g = lock(&g);
            if g.len() >= cap {
                return false;
            }
            g.push(f);
            true
        }));
        (hub, got)
    }

    #[test]
    fn deliver_routes_by_name_and_counts_overflow() {
        let hub = TunnelHub::default();
        let counters = Arc::new(Counters::default());
        let mut rx = hub.register("a", counters.clone());
        hub.deliver("a", Bytes::from_static(b"xy"));
        hub.deliver("b", Bytes::from_static(b"zz"));
        hub.deliver("a", Bytes::new());
        assert_eq!(rx.try_recv().ok(), Some(Bytes::from_static(b"xy")));
        assert!(rx.try_recv().is_err(), "empty packets are ignored");
        assert_eq!(hub.unknown_frames(), 1);
        for _ in 0..INBOX + 3 {
            hub.deliver("a", Bytes::from_static(b"1234"));
        }
        assert_eq!(counters.dropped_in.load(Relaxed), 12);
    }

    #[test]
    fn send_needs_a_session() {
        let (hub, got) = hub_with_session(1);
        assert_eq!(hub.send("t", Bytes::from_static(b"a")), Ok(()));
        assert_eq!(hub.send("t", Bytes::from_static(b"b")), Err(TunnelError::Busy));
        hub.detach();
        assert_eq!(hub.send("t", Bytes::from_static(b"c")), Err(TunnelError::Down));
        assert_eq!(
            lock(&got).as_slice(),
            &[Frame::Tunnel { name: "t".into(), data: Bytes::from_static(b"a") }]
        );
    }

    fn task(hub: Arc<TunnelHub>, on_link_down: OnLinkDown) -> Task {
        let t = Tunnel {
            name: "t".into(),
            peer: "p".into(),
            port: "/dev/null".into(),
            line: crate::model::Line {
                baud: 9600,
                data_bits: 8,
                parity: crate::model::Parity::None,
                stop_bits: 1,
            },
            silence: Duration::from_millis(5),
            max_packet: 4,
            on_link_down,
            reopen_max: Duration::from_secs(1),
        };
        let counters = Arc::new(Counters::default());
        let inbox = hub.register("t", counters.clone());
        Task {
            t,
            hub,
            counters,
            inbox,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            down_logged: false,
            full_logged: false,
        }
    }

    fn sent_bytes(got: &Mutex<Vec<Frame>>) -> Vec<u8> {
        lock(got)
            .iter()
            .flat_map(|f| match f {
                Frame::Tunnel { data, .. } => data.to_vec(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn buffer_policy_keeps_order_and_drops_oldest_beyond_the_bound() {
        let (hub, got) = hub_with_session(usize::MAX);
        hub.detach();
        let mut t = task(hub.clone(), OnLinkDown::Buffer { max_bytes: 6 });
        t.emit(Bytes::from_static(b"abcd"));
        t.emit(Bytes::from_static(b"efgh"));
        assert_eq!(t.counters.dropped_out.load(Relaxed), 2, "oldest two bytes dropped");
        assert_eq!(t.counters.buffered.load(Relaxed), 6);
        let (_, got2) = {
            let g = got.clone();
            hub.attach(Box::new(move |f| {
                lock(&g).push(f);
                true
            }));
            ((), got.clone())
        };
        t.emit(Bytes::from_static(b"ij"));
        assert_eq!(sent_bytes(&got2), b"cdefghij");
        assert_eq!(t.counters.buffered.load(Relaxed), 0);
        assert_eq!(t.counters.bytes_out.load(Relaxed), 8);
    }

    #[test]
    fn describe_names_the_line_and_the_policy() {
        let (hub, _) = hub_with_session(0);
        let t = task(hub, OnLinkDown::Buffer { max_bytes: 960 }).t;
        assert_eq!(
            describe(&[t]),
            "tunnel t -> peer p: /dev/null 9600 8N1; a packet ends after 5.00 ms of silence or at 4 bytes \
             (4.2 ms on the wire); while the link is down bytes are buffered up to 960 bytes (1.0 s of a busy line)\n"
        );
    }

    #[test]
    fn drop_policy_counts_what_the_link_could_not_take() {
        let (hub, got) = hub_with_session(1);
        let mut t = task(hub, OnLinkDown::Drop);
        t.emit(Bytes::from_static(b"ab"));
        t.emit(Bytes::from_static(b"cde"));
        assert_eq!(sent_bytes(&got), b"ab");
        assert_eq!(t.counters.dropped_out.load(Relaxed), 3);
        assert_eq!((t.counters.bytes_out.load(Relaxed), t.counters.packets_out.load(Relaxed)), (2, 1));
    }
}
