//! The soak run (`--only soak`, one hour by default, `--duration 30m` to change; never part
//! of the default run, nor of CI): everything the gateway does, together, for a long time,
//! with its footprint recorded every minute.
//!
//! The gateway under test is the release binary's `run` as a child process (site-a). It
//! polls two devices on a simulator (`m2m-gateway simulate`, a child, on a pseudo-terminal;
//! counters change every 100 ms); serves Modbus-TCP masters (two reading an agent unit
//! every 100 ms, two relaying reads through a pass unit every 250 ms); forwards every point
//! on change to a peer gateway (site-b, in this process) over a link that runs through a
//! TCP forwarder cut for `--cut-for` every `--cut-every` (30 s every 5 min); and feeds a
//! PLC sink (a Modbus-TCP server in this process taking every write). Every minute it
//! records the child's RSS, open file descriptors, CPU share over the minute and the size
//! of its data directory (spools), and the work done in that minute.
//!
//! Invariants: nothing is asserted; the table is written into `docs/BENCHMARKS.md`
//! between `<!-- soak -->` markers (other figures are left as they are) with a verdict on
//! whether RSS, descriptors and spool size stayed flat.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::net::{TcpListener, TcpStream};
use tokio_modbus::prelude::*;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};

use super::footprint::{RunChild, cpu_time, gateway_binary, memory};
use super::*;

/// Options of the soak run.
pub(crate) struct SoakOptions {
    pub(crate) duration: Duration,
    pub(crate) sample: Duration,
    pub(crate) cut_every: Duration,
    pub(crate) cut_for: Duration,
}

/// Counters of the work done, for the per-minute rows.
#[derive(Default)]
struct Work {
    agent_ok: AtomicU64,
    pass_ok: AtomicU64,
    master_errors: AtomicU64,
    plc_writes: AtomicU64,
}

/// The PLC sink: answers every write as done.
struct Sink(Arc<Work>);

impl tokio_modbus::server::Service for Sink {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        self.0.plc_writes.fetch_add(1, Relaxed);
        std::future::ready(match req {
            Request::WriteSingleRegister(a, w) => Ok(Response::WriteSingleRegister(a, w)),
            Request::WriteMultipleRegisters(a, w) => Ok(Response::WriteMultipleRegisters(a, w.len() as u16)),
            Request::WriteSingleCoil(a, b) => Ok(Response::WriteSingleCoil(a, b)),
            Request::WriteMultipleCoils(a, b) => Ok(Response::WriteMultipleCoils(a, b.len() as u16)),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

/// A TCP forwarder that can be cut (every connection closed, nothing accepted) and restored.
struct Cutter {
    up: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

async fn forwarder(target: SocketAddr) -> Result<(SocketAddr, Cutter), BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (cut, cuts) = tokio::sync::watch::channel(0u64);
    let u = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut down, _)) = listener.accept().await else { continue };
            if !u.load(Relaxed) {
                continue; // dropped: the network is down
            }
            let mut cuts = cuts.clone();
            cuts.mark_unchanged();
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(target).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut down, &mut upstream) => {}
                    _ = cuts.changed() => {}
                }
            });
        }
    });
    Ok((addr, Cutter { up, cut }))
}

impl Cutter {
    fn set(&self, up: bool) {
        self.up.store(up, Relaxed);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One master: reads `unit` every `every` until `stop`, counting answers.
fn master(
    addr: SocketAddr,
    unit: u8,
    every: Duration,
    ok: &'static str,
    work: Arc<Work>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'connect: while !stop.is_cancelled() {
            let Ok(mut ctx) = tokio_modbus::client::tcp::connect_slave(addr, Slave(unit)).await else {
                work.master_errors.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                match ctx.read_holding_registers(0, 4).await {
                    Ok(Ok(_)) => {
                        let c = if ok == "agent" { &work.agent_ok } else { &work.pass_ok };
                        c.fetch_add(1, Relaxed);
                    }
                    Ok(Err(_)) => {
                        work.master_errors.fetch_add(1, Relaxed);
                    }
                    Err(_) => {
                        work.master_errors.fetch_add(1, Relaxed);
                        continue 'connect;
                    }
                }
            }
        }
    });
}

pub(crate) async fn soak(opts: &SoakOptions) -> Result<Figure, BoxError> {
    let bin = gateway_binary()?;
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let id_a = m2m_gateway::link::tls::keygen(&root.join("a-id"), false)?;
    let id_b = m2m_gateway::link::tls::keygen(&root.join("b-id"), false)?;
    let work = Arc::new(Work::default());
    let stop = CancellationToken::new();

    // The field devices.
    let sim_cfg = root.join("sim.toml");
    let mut sim_text = String::new();
    for unit in [1, 2] {
        let _ = write!(
            sim_text,
            "[[unit]]\nunit = {unit}\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nkind = \"counter\"\nperiod = \"100ms\"\n\
             [[unit.register]]\ntable = \"holding\"\naddress = 1\nvalues = [11, 12, 13, 14, 15, 16, 17, 18, 19]\n"
        );
    }
    std::fs::write(&sim_cfg, sim_text)?;
    let mut sim = Command::new(&bin)
        .args(["simulate", "-c"])
        .arg(&sim_cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let tty = {
        let out = sim.stdout.take().ok_or("no simulator stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        line.trim().to_string()
    };

    // The PLC sink.
    let plc = TcpListener::bind("127.0.0.1:0").await?;
    let plc_addr = plc.local_addr()?;
    let w = work.clone();
    tokio::spawn(async move {
        let on_connected = move |stream, peer| {
            let w = w.clone();
            async move { accept_tcp_connection(stream, peer, |_| Ok(Some(Sink(w.clone())))) }
        };
        let _ = Server::new(plc).serve(&on_connected, |_| {}).await;
    });

    // The peer, site-b, in this process; site-a dials it through the forwarder.
    let b_port = free_port()?;
    let b_text = format!(
        "[gateway]\nname = \"site-b\"\nsummary_interval = \"1h\"\n[link]\nidentity = \"{}\"\ndata_dir = \"{}\"\n\
         listen = \"127.0.0.1:{b_port}\"\n[[peer]]\nname = \"site-a\"\nfingerprint = \"{}\"\nheartbeat = \"1s\"\n",
        root.join("b-id").display(),
        root.join("b-data").display(),
        id_a.fingerprint
    );
    let b_model = m2m_gateway::config::parse(&b_text, "site-b.toml")?;
    let gb = Gateway::start(&b_model, stop.child_token())?;
    let (via, cutter) = forwarder(SocketAddr::from(([127, 0, 0, 1], b_port))).await?;

    // The gateway under test.
    let srv_port = free_port()?;
    let a_cfg = root.join("site-a.toml");
    let points = (0..10)
        .map(|a| format!("{{ name = \"r{a}\", table = \"holding\", address = {a} }}"))
        .collect::<Vec<_>>()
        .join(", ");
    let a_text = format!(
        r#"[gateway]
name = "site-a"
summary_interval = "1h"

[link]
identity = "a-id"
data_dir = "a-data"

[[peer]]
name = "site-b"
fingerprint = "{fp_b}"
dial = "{via}"
heartbeat = "1s"
reconnect_max = "2s"

[[peer.send]]
points = ["*"]
mode = "change"

[[bus]]
name = "line"
port = "{tty}"
baud = 115200
parity = "none"
stop_bits = 2

[[device]]
name = "dev1"
bus = "line"
unit = 1
interval = "100ms"
timeout = "200ms"
point = [{p1}]

[[device]]
name = "dev2"
bus = "line"
unit = 2
interval = "200ms"
timeout = "200ms"
point = [{p2}]

[server]
listen = "127.0.0.1:{srv_port}"

[[server.unit]]
unit = 10
agent = "dev1"
max_age = "2s"

[[server.unit]]
unit = 20
pass = "dev2"

[[plc]]
name = "sink"
address = "{plc_addr}"

[[plc.map]]
points = ["dev1.*"]
table = "holding"
address = 0
"#,
        fp_b = id_b.fingerprint,
        p1 = points,
        p2 = points,
    );
    std::fs::write(&a_cfg, a_text)?;
    let child = RunChild::spawn(&bin, &a_cfg)?;
    child.wait_for("modbus-tcp server listening", Duration::from_secs(10))?;
    let pid = child.pid();
    let srv = SocketAddr::from(([127, 0, 0, 1], srv_port));
    for _ in 0..2 {
        master(srv, 10, Duration::from_millis(100), "agent", work.clone(), stop.clone());
        master(srv, 20, Duration::from_millis(250), "pass", work.clone(), stop.clone());
    }
    let link_b = gb.link("site-a").ok_or("site-b has no link to site-a")?.clone();

    let mut fig = Figure::new(
        "Soak",
        &format!(
            "`cargo run --release --example bench -- --only soak --duration {}`: the release \
             binary's `run` (site-a) for {} with everything at once: 2 devices polled every 100 \
             and 200 ms on a simulator pty (20 points), 2 masters reading an agent unit every \
             100 ms and 2 relaying reads through a pass unit every 250 ms, every point sent on \
             change to a peer over a link cut for {} every {} (a TCP forwarder closing every \
             connection), and `dev1.*` written to a PLC sink. One row per {}: the child's \
             resident memory, open descriptors, CPU share of one core over the interval, the \
             size of its data directory (peer and PLC spools, SQLite with WAL), and the work \
             done in the interval.",
            humantime::format_duration(opts.duration),
            humantime::format_duration(opts.duration),
            humantime::format_duration(opts.cut_for),
            humantime::format_duration(opts.cut_every),
            humantime::format_duration(opts.sample),
        ),
        vec![
            "minute",
            "RSS MiB",
            "fds",
            "CPU %",
            "spool KiB",
            "link",
            "agent reads",
            "pass reads",
            "master errors",
            "PLC writes",
            "peer sessions",
        ],
    );
    let started = StdInstant::now();
    let clk = started;
    let mut last_cpu = cpu_time(pid);
    let mut last_at = StdInstant::now();
    let mut last = [0u64; 4];
    let mut next_cut = clk + opts.cut_every;
    let mut restore_at: Option<StdInstant> = None;
    let mut next_sample = clk + opts.sample;
    let (mut rss_v, mut fd_v, mut spool_v) = (Vec::new(), Vec::new(), Vec::new());
    let mut minute = 0;
    while started.elapsed() < opts.duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = StdInstant::now();
        if now >= next_cut && restore_at.is_none() {
            cutter.set(false);
            restore_at = Some(now + opts.cut_for);
            next_cut += opts.cut_every;
        }
        if restore_at.is_some_and(|r| now >= r) {
            cutter.set(true);
            restore_at = None;
        }
        if now < next_sample {
            continue;
        }
        next_sample += opts.sample;
        minute += 1;
        let (_, rss) = memory(pid);
        let fds = open_fds(pid);
        let cpu = cpu_time(pid);
        let share = (cpu - last_cpu).as_secs_f64() / now.duration_since(last_at).as_secs_f64() * 100.0;
        last_cpu = cpu;
        last_at = now;
        let spool = dir_size(&root.join("a-data")) as f64 / 1024.0;
        let counts = [
            work.agent_ok.load(Relaxed),
            work.pass_ok.load(Relaxed),
            work.master_errors.load(Relaxed),
            work.plc_writes.load(Relaxed),
        ];
        let delta: Vec<u64> = counts.iter().zip(last).map(|(c, l)| c - l).collect();
        last = counts;
        let stats = link_b.stats();
        let row = vec![
            minute.to_string(),
            format!("{rss:.1}"),
            fds.to_string(),
            format!("{share:.1}"),
            format!("{spool:.0}"),
            if restore_at.is_some() {
                "cut".into()
            } else if stats.connected {
                "up".into()
            } else {
                "down".into()
            },
            delta[0].to_string(),
            delta[1].to_string(),
            delta[2].to_string(),
            delta[3].to_string(),
            stats.sessions.to_string(),
        ];
        eprintln!("soak: {}", row.join("  "));
        fig.rows.push(row);
        rss_v.push(rss);
        fd_v.push(fds as f64);
        spool_v.push(spool);
    }
    stop.cancel();
    cutter.set(true);
    child.stop();
    let _ = sim.kill();
    let _ = sim.wait();
    gb.shutdown(Duration::from_secs(3)).await;

    // Flat: the last quarter's median within 10% (RSS, spool) or 2 descriptors of the
    // second quarter's (the first quarter is the warm-up: caches and spools filling).
    let quarter = |v: &[f64], q: usize| {
        let n = v.len();
        median(v[(n * q / 4).min(n.saturating_sub(1))..(n * (q + 1) / 4).max(n * q / 4 + 1).min(n)].to_vec())
    };
    let mut verdict = |what: &str, v: &[f64], unit: &str, ok: &dyn Fn(f64, f64) -> bool| {
        if v.len() < 4 {
            return;
        }
        let (early, late) = (quarter(v, 1), quarter(v, 3));
        let max = v.iter().copied().fold(f64::MIN, f64::max);
        fig.verdicts.push((
            format!("soak: {what} (median, 2nd quarter → last quarter; max)"),
            format!("{early:.1} → {late:.1} {unit}; max {max:.1}"),
            "flat".into(),
            ok(early, late),
        ));
    };
    verdict("RSS", &rss_v, "MiB", &|a, b| b <= a * 1.10);
    verdict("open descriptors", &fd_v, "", &|a, b| b <= a + 2.0);
    verdict("data directory", &spool_v, "KiB", &|a, b| b <= a * 1.10 + 64.0);
    fig.notes.push(format!(
        "Cuts: the forwarder closes every link connection and refuses new ones for {} every {}; \
         `link` is the state at the sample time. `peer sessions` is cumulative (one per cut \
         plus the first). Machine load average at the end: {}.",
        humantime::format_duration(opts.cut_for),
        humantime::format_duration(opts.cut_every),
        loadavg()
    ));
    Ok(fig)
}
