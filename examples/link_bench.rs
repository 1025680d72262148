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
//!
//! Run: `cargo run --release --example link_bench` (optionally `-- --secs 30`).
//! Spools live in a temporary directory (fsync costs depend on its file system).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use m2m_gateway::gateway::Gateway;
use m2m_gateway::model::{self, Dial, Links, Model, Peer, SendMode, SendRule};
use m2m_gateway::tls::{self, Identity};
use m2m_gateway::value::{Quality, Sample, Value};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

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

fn peer(name: &str, id: &Identity, dial: Dial, send: Vec<SendRule>) -> Peer {
    Peer {
        name: name.into(),
        fingerprint: id.fingerprint.to_string(),
        dial,
        spool: format!("{name}.spool").into(),
        spool_max_bytes: 1 << 30,
        spool_max_age: Duration::from_secs(3600),
        heartbeat: Duration::from_secs(1),
        send,
        grants: vec![],
        writeback: vec![],
    }
}

fn model(name: &str, links: Links) -> Model {
    Model {
        gateway: model::Gateway {
            name: name.into(),
            summary_interval: Duration::from_secs(3600),
            worker_threads: None,
        },
        buses: vec![],
        links: Some(links),
        server: None,
        plcs: Vec::new(),
    }
}

/// A (site-a) dials B (site-b) and sends it every point on any change.
fn pair(a: &Site, b: &Site, shutdown: &CancellationToken) -> (Gateway, Gateway) {
    let gb = Gateway::start(
        &model("site-b", b.links(true, peer("site-a", &a.id, Dial::Accept, vec![]))),
        shutdown.child_token(),
    )
    .expect("start b");
    let addr = gb.listen_addr().expect("b listens").to_string();
    let every = SendRule {
        points: vec!["*".into()],
        matched: vec![],
        mode: SendMode::Change {
            deadband: 0.0,
            deadband_percent: 0.0,
            max_silence: Duration::from_secs(3600),
        },
    };
    let ga = Gateway::start(
        &model("site-a", a.links(false, peer("site-b", &b.id, Dial::Connect(addr), vec![every]))),
        shutdown.child_token(),
    )
    .expect("start a");
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
    Sample { value: Some(Value::Float(v)), at, quality: Quality::Good }
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
    let ids: Vec<_> = (0..POINTS)
        .map(|i| ga.image.register(&format!("dev{}.p{i}", i % 10), Duration::from_secs(3600)))
        .collect();
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
    shutdown.cancel();
    ga.shutdown(Duration::from_secs(3)).await;
    gb.shutdown(Duration::from_secs(3)).await;
}

/// Latency from A's image update to B's at `rate` values/s (`points` per tick).
async fn latency(secs: u64) {
    const POINTS: usize = 100;
    const TICK: Duration = Duration::from_millis(10);
    let (a, b) = (Site::new(), Site::new());
    let shutdown = CancellationToken::new();
    let (ga, gb) = pair(&a, &b, &shutdown);
    wait_connected(&gb).await;
    let ids: Vec<_> =
        (0..POINTS).map(|i| ga.image.register(&format!("dev.p{i}"), Duration::from_secs(3600))).collect();
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
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
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
    shutdown.cancel();
    ga.shutdown(Duration::from_secs(3)).await;
    gb.shutdown(Duration::from_secs(3)).await;
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut secs = 30;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|s| s.parse().ok())) {
            ("--secs", Some(s)) => secs = s,
            _ => {
                eprintln!("usage: link_bench [--secs N]   (sustained throughput duration, default 30)");
                std::process::exit(2);
            }
        }
    }
    println!("peer link bench: sustained throughput for {secs} s, then latency at 10k values/s for 10 s");
    throughput(secs).await;
    latency(10).await;
}
