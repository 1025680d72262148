//! Peer-link measurements: two gateways in one process on 127.0.0.1 over the real
//! link (TCP, TLS 1.3 with pinned keys made by `tls::keygen`, the on-disk spool with
//! SQLite WAL + synchronous=FULL on the sending side, the applied marker on the
//! receiving side), values fed straight into the sending gateway's image.
//!
//! 1. Sustained throughput: 1000 points updated in rounds as fast as the link takes
//!    them (at most a bounded number of values in flight, so the change stream never
//!    laps the forwarder), for 30 s; values applied at the peer per second.
//! 2. End-to-end latency at 10 000 values/s (100 points every 10 ms, for 10 s): from
//!    the image update on A (the sample's time) to the image update on B (when B's
//!    change stream delivers it); p50, p99 and max.
//! 3. Bytes on the wire per value, in runs 1 and 2: the link socket's TCP payload both
//!    ways (TLS records: handshake, batches, acks, heartbeats), read from the kernel's
//!    counters with `ss` so nothing sits in the link's path, over the values delivered.
//! 4. Catch-up after an outage: A dials B through a forwarder that is cut for 30 s
//!    while A keeps feeding 10k values/s, then plugged in again; the backlog when the
//!    new session comes up, how long the link's back-off took to notice the network was
//!    back, how long until the backlog was delivered (values/s), and a check that B saw
//!    every value once and in order (each point's value counts its rounds).
//!
//! Run: `cargo run --release --example link_bench` (optionally
//! `-- --secs 30 --outage 30 --outages 1`).
//! Spools live in a temporary directory (fsync costs depend on its file system).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use m2m_gateway::gateway::Gateway;
use m2m_gateway::image::PointId;
use m2m_gateway::link::tls::{self, Identity};
use m2m_gateway::model::{self, Dial, Links, Model, Peer, SendMode, SendRule};
use m2m_gateway::point::value::{Quality, Sample, Value};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// The realistic load of the latency and outage runs: 100 points every 10 ms (10k values/s).
const POINTS: usize = 100;
const TICK: Duration = Duration::from_millis(10);

/// One gateway's identity and data directory.
struct Site {
    dir: TempDir,
    id: Identity,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = tls::keygen(&dir.path().join("id"), false).expect("keygen");
        Self { dir, id }
    }

    fn links(&self, listen: bool, mut peer: Peer) -> Links {
        let data_dir = self.dir.path().join("data");
        peer.spool = data_dir.join(&peer.spool);
        Links {
            identity_dir: self.dir.path().join("id"),
            data_dir,
            listen: listen.then(|| "127.0.0.1:0".parse().expect("addr")),
            allow: vec![],
            peers: vec![peer],
            tunnels: Vec::new(),
        }
    }
}

/// The sender's `reconnect_max` (the default of `[[peer]] reconnect_max`).
pub const RECONNECT_MAX: Duration = Duration::from_secs(5);

fn peer(name: &str, id: &Identity, dial: Dial, send: Vec<SendRule>) -> Peer {
    Peer {
        name: name.into(),
        fingerprint: id.fingerprint.to_string(),
        dial,
        spool: format!("{name}.spool").into(),
        spool_max_bytes: 1 << 30,
        spool_max_age: Duration::from_secs(3600),
        heartbeat: Duration::from_secs(1),
        reconnect_max: RECONNECT_MAX,
        send,
        grants: vec![],
        writeback: vec![],
        accept_relayed: m2m_gateway::model::PointGlobs::none(),
    }
}

fn model(name: &str, links: Links) -> Model {
    Model {
        gateway: model::Gateway {
            name: name.into(),
            summary_interval: Duration::from_secs(3600),
            worker_threads: None,
            log_format: Default::default(),
        },
        buses: vec![],
        links: Some(links),
        server: None,
        plcs: Vec::new(),
        http: None,
    }
}

/// B (site-b), listening for A.
fn start_b(a: &Site, b: &Site, shutdown: &CancellationToken) -> Gateway {
    Gateway::start(
        &model("site-b", b.links(true, peer("site-a", &a.id, Dial::Accept, vec![]))),
        shutdown.child_token(),
    )
    .expect("start b")
}

/// A (site-a), dialing B at `addr` and sending it every point on any change.
fn start_a(a: &Site, b: &Site, addr: SocketAddr, shutdown: &CancellationToken) -> Gateway {
    let every = SendRule {
        points: m2m_gateway::model::PointGlobs::new(vec!["*".into()]).expect("a glob"),
        matched: vec![],
        mode: SendMode::Change {
            deadband: 0.0,
            deadband_percent: 0.0,
            max_silence: Duration::from_secs(3600),
        },
    };
    let dial = Dial::Connect(addr.to_string());
    Gateway::start(
        &model("site-a", a.links(false, peer("site-b", &b.id, dial, vec![every]))),
        shutdown.child_token(),
    )
    .expect("start a")
}

/// A dialing B directly.
fn pair(a: &Site, b: &Site, shutdown: &CancellationToken) -> (Gateway, Gateway) {
    let gb = start_b(a, b, shutdown);
    let ga = start_a(a, b, gb.listen_addr().expect("b listens"), shutdown);
    (ga, gb)
}

async fn wait_connected(gb: &Gateway) {
    let link = gb.link("site-a").expect("link");
    let end = Instant::now() + Duration::from_secs(10);
    while !link.stats().connected {
        assert!(Instant::now() < end, "link not up within 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn good(v: f64, at: SystemTime) -> Sample {
    Sample { value: Some(Value::Float(v)), at, quality: Quality::Good, via: None }
}

/// TCP payload bytes both ways of the established connections to `port` (TLS records:
/// the handshake, batches, acks, heartbeats), from the kernel's socket counters
/// (`ss -ti`), so nothing sits in the link's path. `None` when `ss` is missing.
fn wire_bytes(port: u16) -> Option<u64> {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established", "dport", "=", &format!(":{port}")])
        .output();
    let text = String::from_utf8(out.ok()?.stdout).ok()?;
    let field = |key: &str| -> u64 {
        text.split_whitespace().filter_map(|w| w.strip_prefix(key)?.parse::<u64>().ok()).sum()
    };
    let sent = field("bytes_sent:");
    (sent > 0).then(|| sent + field("bytes_received:"))
}

/// The wire line of a run, once A's spool is empty (all acked): the link's bytes per
/// value B applied, against a bare value.
async fn print_wire(what: &str, ga: &Gateway, gb: &Gateway, names: &[String]) {
    let la = ga.link("site-b").expect("link");
    until(Duration::from_secs(10), || la.stats().spool_pending == 0).await;
    let s = gb.link("site-a").expect("link").stats();
    // A bare value: its name, an f64, a 64-bit timestamp and a quality byte.
    let bare = names.iter().map(String::len).sum::<usize>() as f64 / names.len() as f64 + 8.0 + 8.0 + 1.0;
    match wire_bytes(gb.listen_addr().expect("b listens").port()) {
        Some(bytes) => println!(
            "wire {what} (sessions: {}): {bytes} bytes both ways (TLS, kernel socket counters) for {} \
             values = {:.2} bytes/value; a bare value is {bare:.2} bytes (name + f64 + timestamp + quality)",
            s.sessions,
            s.samples_applied,
            bytes as f64 / s.samples_applied.max(1) as f64
        ),
        None => println!("wire {what}: not measured (no `ss` to read the socket counters)"),
    }
}

/// Values applied at B per second over `secs`, with A fed as fast as B keeps up.
async fn throughput(secs: u64) {
    const POINTS: usize = 1000;
    /// Values A may be ahead of B; well under the image's change backlog (in rounds).
    const AHEAD: u64 = 20 * POINTS as u64;
    let (a, b) = (Site::new(), Site::new());
    let shutdown = CancellationToken::new();
    let (ga, gb) = pair(&a, &b, &shutdown);
    wait_connected(&gb).await;
    let names: Vec<_> = (0..POINTS).map(|i| format!("dev{}.p{i}", i % 10)).collect();
    let ids: Vec<_> = names.iter().map(|n| ga.image.register(n, Duration::from_secs(3600))).collect();
    let lb = gb.link("site-a").expect("link").clone();
    let la = ga.link("site-b").expect("link").clone();
    let base = lb.stats().samples_applied;
    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let mut fed = 0u64;
    let mut round = 0u64;
    let mut next_report = started + Duration::from_secs(5);
    while Instant::now() < end {
        let applied = lb.stats().samples_applied - base;
        if fed - applied.min(fed) < AHEAD {
            round += 1;
            let now = SystemTime::now();
            ga.image.update(ids.iter().map(|id| (*id, good(round as f64, now))));
            fed += POINTS as u64;
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if Instant::now() >= next_report {
            let s = started.elapsed().as_secs_f64();
            let st = la.stats();
            println!(
                "  {s:4.0} s: {:.0} values/s applied so far, spool pending {} batches",
                (lb.stats().samples_applied - base) as f64 / s,
                st.spool_pending
            );
            next_report += Duration::from_secs(5);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let s = lb.stats();
    let applied = s.samples_applied - base;
    println!(
        "throughput: {applied} values in {secs:.1} s = {:.0} values/s sustained over one link \
         ({} batches, {:.0} batches/s, {:.0} values/batch; {fed} fed)",
        applied as f64 / secs,
        s.batches_applied,
        s.batches_applied as f64 / secs,
        applied as f64 / s.batches_applied.max(1) as f64,
    );
    print_wire("at full rate", &ga, &gb, &names).await;
    shutdown.cancel();
    ga.shutdown(Duration::from_secs(3)).await;
    gb.shutdown(Duration::from_secs(3)).await;
}

/// Latency from A's image update to B's at `rate` values/s (`points` per tick).
async fn latency(secs: u64) {
    let (a, b) = (Site::new(), Site::new());
    let shutdown = CancellationToken::new();
    let (ga, gb) = pair(&a, &b, &shutdown);
    wait_connected(&gb).await;
    let names: Vec<_> = (0..POINTS).map(|i| format!("dev.p{i}")).collect();
    let ids: Vec<_> = names.iter().map(|n| ga.image.register(n, Duration::from_secs(3600))).collect();
    let lat = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let recording = CancellationToken::new();
    let mut rx = gb.image.subscribe();
    let (l, stop) = (lat.clone(), recording.clone());
    let recorder = tokio::spawn(async move {
        let mut lagged = 0u64;
        loop {
            let changes = tokio::select! {
                r = rx.recv() => r,
                () = stop.cancelled() => return lagged,
            };
            match changes {
                Ok(c) => {
                    let now = SystemTime::now();
                    let mut l = l.lock().expect("lock");
                    for (_, s) in &c.samples {
                        if s.quality == Quality::Good {
                            l.push(now.duration_since(s.at).unwrap_or_default());
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => lagged += n,
                Err(_) => return lagged,
            }
        }
    });
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let rounds = secs * 1000 / TICK.as_millis() as u64;
    let started = Instant::now();
    for r in 1..=rounds {
        tick.tick().await;
        let now = SystemTime::now();
        ga.image.update(ids.iter().map(|id| (*id, good(r as f64, now))));
    }
    let fed = rounds * POINTS as u64;
    let fed_secs = started.elapsed().as_secs_f64();
    let end = Instant::now() + Duration::from_secs(30);
    while (lat.lock().expect("lock").len() as u64) < fed && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    recording.cancel();
    let lagged = recorder.await.unwrap_or_default();
    let mut l = lat.lock().expect("lock").clone();
    l.sort();
    let pct = |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied();
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    println!(
        "latency at {:.0} values/s ({POINTS} points every {TICK:?}, {fed} values in {fed_secs:.1} s): \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} received, {lagged} lost to a lagging recorder)",
        fed as f64 / fed_secs,
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(l.last().copied()),
        l.len(),
    );
    print_wire("at 10k values/s", &ga, &gb, &names).await;
    shutdown.cancel();
    ga.shutdown(Duration::from_secs(3)).await;
    gb.shutdown(Duration::from_secs(3)).await;
}

/// A TCP forwarder to `target` that can be cut (its port closed, every connection
/// dropped) and plugged in again: the network outage of the catch-up run.
struct Cable {
    addr: SocketAddr,
    target: SocketAddr,
    on: Option<CancellationToken>,
}

impl Cable {
    fn new(target: SocketAddr) -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        Self { addr: l.local_addr().expect("addr"), target, on: None }
    }

    /// Listens on `addr` and forwards (again, after a cut).
    async fn plug(&mut self) -> Result<(), String> {
        // The cut accept loop drops its listener when it next runs: retry briefly.
        let end = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() >= end => {
                    return Err(format!("cannot listen on {} again: {e}", self.addr));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let on = CancellationToken::new();
        let (cut, target) = (on.clone(), self.target);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = listener.accept() => r,
                    () = cut.cancelled() => return,
                };
                let (Ok((mut down, _)), cut) = (accepted, cut.clone()) else { continue };
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        self.on = Some(on);
        Ok(())
    }

    /// Drops every connection and stops listening.
    fn cut(&mut self) {
        if let Some(on) = self.on.take() {
            on.cancel();
        }
    }
}

/// What B's change stream showed of the rounds A fed: a point's value is its round
/// number, so a lost value shows as a jump and a replayed one as going backwards.
#[derive(Debug, Default, Clone, Copy)]
struct Order {
    /// Values seen for the first time, in order.
    fresh: u64,
    /// Rounds jumped over (values never seen).
    missing: u64,
    /// Values older than one already seen.
    backwards: u64,
}

/// Follows B's change stream into `order` until `stop`; returns how many change
/// batches it missed by lagging (then the check is incomplete).
fn watch_order(gb: &Gateway, order: Arc<Mutex<Order>>, stop: CancellationToken) -> JoinHandle<u64> {
    let mut rx = gb.image.subscribe();
    tokio::spawn(async move {
        let mut last: HashMap<Arc<str>, f64> = HashMap::new();
        let mut lagged = 0;
        loop {
            let changes = tokio::select! {
                r = rx.recv() => r,
                () = stop.cancelled() => return lagged,
            };
            let changes = match changes {
                Ok(c) => c,
                Err(RecvError::Lagged(n)) => {
                    lagged += n;
                    continue;
                }
                Err(RecvError::Closed) => return lagged,
            };
            let mut o = order.lock().expect("lock");
            for (name, s) in &changes.samples {
                // Comm-fail marks (link down) carry the old value: not a delivery.
                let (Quality::Good, Some(Value::Float(v))) = (s.quality, &s.value) else { continue };
                let last = last.entry(name.clone()).or_insert(0.0);
                if *v > *last {
                    o.fresh += 1;
                    o.missing += (*v - *last - 1.0) as u64;
                    *last = *v;
                } else if *v < *last {
                    o.backwards += 1;
                }
            }
        }
    })
}

/// Updates `ids` on A to round 1, 2, ... every [`TICK`] until `stop`; `fed` counts values.
fn feed(ga: &Gateway, ids: Vec<PointId>, fed: Arc<AtomicU64>, stop: CancellationToken) -> JoinHandle<()> {
    let image = ga.image.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        for r in 1u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            image.update(ids.iter().map(|id| (*id, good(r as f64, SystemTime::now()))));
            fed.fetch_add(ids.len() as u64, Relaxed);
        }
    })
}

/// Polls `done` every millisecond until it holds (true) or `limit` passes (false).
async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while !done() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// One outage: the backlog when the link came back and how it was delivered.
struct CatchUp {
    /// Values fed but not yet delivered when the new session came up.
    backlog: u64,
    /// From plugging the network in again to the new session (the link's back-off).
    reconnect: Duration,
    /// From the new session to the last backlog value delivered.
    drain: Duration,
    /// Every value delivered once and in order.
    ok: bool,
    /// The counts behind `ok`.
    check: String,
}

/// A dials B through a [`Cable`] that is cut for `cut` while A keeps feeding
/// [`POINTS`] points every [`TICK`], then plugged in again.
async fn outage(cut: Duration) -> Result<CatchUp, String> {
    let (a, b) = (Site::new(), Site::new());
    let shutdown = CancellationToken::new();
    let gb = start_b(&a, &b, &shutdown);
    let mut cable = Cable::new(gb.listen_addr().expect("b listens"));
    let ga = start_a(&a, &b, cable.addr, &shutdown);
    let result = catch_up(&ga, &gb, &mut cable, cut).await;
    cable.cut();
    shutdown.cancel();
    ga.shutdown(Duration::from_secs(3)).await;
    gb.shutdown(Duration::from_secs(3)).await;
    result
}

async fn catch_up(ga: &Gateway, gb: &Gateway, cable: &mut Cable, cut: Duration) -> Result<CatchUp, String> {
    let (la, lb) = (ga.link("site-b").expect("link"), gb.link("site-a").expect("link"));
    let ids =
        (0..POINTS).map(|i| ga.image.register(&format!("dev.p{i}"), Duration::from_secs(3600))).collect();
    let order = Arc::new(Mutex::new(Order::default()));
    let progress = || {
        let o = *order.lock().expect("lock");
        o.fresh + o.missing
    };
    let fed = Arc::new(AtomicU64::new(0));
    let (stop_feed, stop_watch) = (CancellationToken::new(), CancellationToken::new());
    let watcher = watch_order(gb, order.clone(), stop_watch.clone());
    let feeder = feed(ga, ids, fed.clone(), stop_feed.clone());
    // The network comes up once A has spooled its first round: its forwarder then knows
    // every point, so it re-sends each point's latest value on every connect, the first
    // one included (a fixed count the check below expects).
    if !until(Duration::from_secs(10), || la.stats().spool_pending > 0).await {
        return Err("nothing spooled within 10 s".into());
    }
    cable.plug().await?;
    if !until(Duration::from_secs(10), || lb.stats().connected).await {
        return Err("link not up within 10 s".into());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sessions = lb.stats().sessions;
    cable.cut();
    tokio::time::sleep(cut).await;
    cable.plug().await?;
    let plugged = Instant::now();
    let wait = RECONNECT_MAX + Duration::from_secs(10);
    if !until(wait, || lb.stats().sessions > sessions).await {
        return Err(format!("no new session within {wait:?} of the network's return"));
    }
    let reconnect = plugged.elapsed();
    let due = fed.load(Relaxed);
    let backlog = due - progress().min(due);
    if !until(Duration::from_secs(120), || progress() >= due).await {
        return Err(format!("backlog not delivered within 120 s ({} of {due} values)", progress()));
    }
    let drain = plugged.elapsed() - reconnect;
    // Live again for a second; then everything must arrive and be acked.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_feed.cancel();
    let _ = feeder.await;
    let all = fed.load(Relaxed);
    let settled = until(Duration::from_secs(30), || progress() >= all && la.stats().spool_pending == 0).await;
    stop_watch.cancel();
    let lagged = watcher.await.unwrap_or(u64::MAX);
    let o = *order.lock().expect("lock");
    let s = lb.stats();
    // On every connect A re-sends every point's latest value once, after the backlog.
    let resent = POINTS as u64 * s.sessions;
    let ok = settled
        && lagged == 0
        && o.fresh == all
        && o.missing == 0
        && o.backwards == 0
        && s.samples_applied == all + resent;
    let check = format!(
        "{all} fed, {} new in order at B, {} missing, {} backwards, {} applied = fed + {} re-sent \
         on connects (expected {resent}), {} re-sent batches dropped as duplicates, {lagged} \
         change batches missed by the checker",
        o.fresh,
        o.missing,
        o.backwards,
        s.samples_applied,
        s.samples_applied as i64 - all as i64,
        s.duplicates_dropped,
    );
    Ok(CatchUp { backlog, reconnect, drain, ok, check })
}

/// Runs `runs` outages of `cut` each and prints each and their medians.
async fn outages(cut: Duration, runs: usize) {
    let mut done = Vec::new();
    for i in 1..=runs {
        match outage(cut).await {
            Ok(c) => {
                println!(
                    "outage {i} of {runs}: backlog {} values; reconnected {:.2} s after the network's \
                     return; backlog delivered in {:.3} s = {:.0} values/s; once and in order: {} ({})",
                    c.backlog,
                    c.reconnect.as_secs_f64(),
                    c.drain.as_secs_f64(),
                    c.backlog as f64 / c.drain.as_secs_f64(),
                    if c.ok { "yes" } else { "NO" },
                    c.check
                );
                done.push(c);
            }
            Err(e) => println!("outage {i} of {runs}: failed: {e}"),
        }
    }
    let med = |f: &dyn Fn(&CatchUp) -> f64| median(done.iter().map(f).collect());
    let drain = med(&|c| c.drain.as_secs_f64());
    let backlog = med(&|c| c.backlog as f64);
    println!(
        "catch-up after {cut:?} outages at {} values/s, median of {}: backlog {backlog:.0} values, \
         reconnected {:.2} s after the network's return, delivered in {drain:.3} s = {:.0} values/s; \
         complete and in order: {} of {runs} outages",
        POINTS as u64 * 1000 / TICK.as_millis() as u64,
        done.len(),
        med(&|c| c.reconnect.as_secs_f64()),
        med(&|c| c.backlog as f64 / c.drain.as_secs_f64()),
        done.iter().filter(|c| c.ok).count(),
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut secs, mut cut, mut runs) = (30, 30, 1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|s| s.parse().ok())) {
            ("--secs", Some(s)) => secs = s,
            ("--outage", Some(s)) => cut = s,
            ("--outages", Some(n)) => runs = n as usize,
            _ => {
                eprintln!(
                    "usage: link_bench [--secs N] [--outage SECS] [--outages N]   (sustained throughput \
                     duration, default 30; length of each outage, default 30; outages, default 1)"
                );
                std::process::exit(2);
            }
        }
    }
    println!(
        "peer link bench: sustained throughput for {secs} s, then latency at 10k values/s for 10 s, \
         then {runs} outage(s) of {cut} s at 10k values/s"
    );
    throughput(secs).await;
    latency(10).await;
    outages(Duration::from_secs(cut), runs).await;
}
