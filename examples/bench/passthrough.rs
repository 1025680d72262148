//! Figure 4, Modbus-TCP pass-through: masters (tokio-modbus TCP clients in this process)
//! through the gateway's server to a device on a pty simulator that answers at once (no
//! line timing), compared in the same run with modbus-relay on a second pty with the same
//! simulator. Also the masters' driver the agent-mode figure uses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use m2m_gateway::model::{ServeMode, ServedUnit};
use m2m_gateway::sim::SimHandle;
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;

use super::*;

/// Registers each master reads per request (FC3).
pub(crate) const READ_REGS: u16 = 10;

/// What the masters saw: requests/s (median over windows) and latency percentiles.
pub(crate) struct Load {
    pub(crate) rps: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) errors: u64,
}

impl Load {
    pub(crate) fn cells(&self) -> [String; 4] {
        [format!("{:.0}", self.rps), ms(self.p50), ms(self.p99), self.errors.to_string()]
    }
}

async fn connect(addr: SocketAddr, unit: u8) -> Result<Context, BoxError> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio_modbus::client::tcp::connect_slave(addr, Slave(unit)).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= end => return Err(format!("cannot connect to {addr}: {e}").into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Which registers the masters read.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Reads {
    /// All the same `READ_REGS` from address 0 (HMIs showing the same screen).
    Same,
    /// Master k reads `READ_REGS` from address k: no two requests alike.
    Distinct,
}

/// Registers of the bench device (enough for 8 distinct reads).
const DEVICE_REGS: u16 = READ_REGS + 8;

/// `n` masters on `addr` each reading `READ_REGS` holding registers of `unit` back to back:
/// a warm-up, then `s.runs` windows of `s.window`.
pub(crate) async fn drive(
    addr: SocketAddr,
    unit: u8,
    n: usize,
    reads: Reads,
    s: &Settings,
) -> Result<Load, BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + s.warmup;
    let mut tasks = Vec::new();
    for k in 0..n {
        let start_at = if reads == Reads::Distinct { k as u16 } else { 0 };
        let mut ctx = connect(addr, unit).await?;
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            // (completed at, latency); errors counted.
            let mut done: Vec<(Instant, Duration)> = Vec::with_capacity(1 << 20);
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                match ctx.read_holding_registers(start_at, READ_REGS).await {
                    Ok(Ok(words)) if words.len() == usize::from(READ_REGS) => {
                        let t1 = Instant::now();
                        done.push((t1, t1 - t0));
                    }
                    // Errors in the warm-up (e.g. before the first poll) do not count.
                    Ok(_) => errors += u64::from(Instant::now() >= start),
                    Err(_) => {
                        errors += u64::from(Instant::now() >= start);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            let _ = ctx.disconnect().await;
            (done, errors)
        }));
    }
    let windows: Vec<Instant> = (0..=s.runs).map(|i| start + s.window * i as u32).collect();
    tokio::time::sleep_until(*windows.last().unwrap_or(&start)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (done, e) = t.await?;
        all.extend(done);
        errors += e;
    }
    let rps = median(
        windows
            .windows(2)
            .map(|w| {
                let c = all.iter().filter(|(t, _)| *t >= w[0] && *t < w[1]).count();
                c as f64 / (w[1] - w[0]).as_secs_f64()
            })
            .collect(),
    );
    let mut lat: Vec<Duration> = all.iter().filter(|(t, _)| *t >= start).map(|(_, l)| *l).collect();
    lat.sort();
    let pick = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    Ok(Load { rps, p50: pick(0.5), p99: pick(0.99), errors })
}

const LINE: Line = Line { baud: 115_200, data_bits: 8, parity: Parity::None, stop_bits: 1 };

/// The bench device (10 registers, polled every `every`) on a fresh pty simulator:
/// answering at once, or (`timed`) emulating the 115200 8N1 line and a 2 ms turnaround.
fn pty_device(every: Duration, timed: bool) -> Result<(Model, VirtualPort, SimHandle), BoxError> {
    let mut model = one_bus(LINE, vec![block_device(DEVICE_REGS, every)]);
    let mut sim = sim_for(&model.buses[0]);
    if !timed {
        sim.line = None;
    }
    let sim = Simulator::new(sim);
    let handle = sim.handle();
    let mut port = VirtualPort::new()?;
    port.run(sim)?;
    model.buses[0].port = port.path().display().to_string();
    Ok((model, port, handle))
}

/// How our gateway is set up for one row.
#[derive(Clone, Copy)]
struct Ours {
    /// A line-timed device (else instant).
    timed: bool,
    /// The bus's `frame_gap`.
    gap: Duration,
    /// `worker_threads` (`None`: one per core).
    threads: Option<usize>,
}

impl Ours {
    fn name(&self) -> String {
        let gap = if self.gap.is_zero() { "0".into() } else { ms(self.gap) };
        let threads = self.threads.map_or("1 per core".into(), |n| n.to_string());
        format!("ours, frame_gap {gap}, worker_threads {threads}")
    }
}

/// The configuration our gateway runs with in this figure: the bench device on `device`
/// (115200 8N1, `frame_gap` before each request), polled once an hour, served as `pass`
/// unit 1 on `port`.
fn ours_config(device: &Path, port: u16, frame_gap: Duration, threads: Option<usize>) -> String {
    let threads = threads.map(|n| format!("worker_threads = {n}\n")).unwrap_or_default();
    format!(
        "[gateway]\nname = \"bench\"\nsummary_interval = \"1h\"\n{threads}\n\
         [[bus]]\nname = \"bench\"\nport = \"{}\"\nbaud = 115200\nparity = \"none\"\n\
         frame_gap = \"{}\"\ntimeout = \"1s\"\n\n\
         [[device]]\nname = \"block\"\nbus = \"bench\"\nunit = 1\ninterval = \"1h\"\n\
         [[device.point]]\nname = \"r0\"\ntable = \"holding\"\naddress = 0\n\n\
         [server]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = 32\nmax_in_flight = 4\n\
         [[server.unit]]\nunit = 1\npass = \"block\"\n",
        device.display(),
        humantime::format_duration(frame_gap),
    )
}

/// The three loads of this figure: 1 master, 8 reading the same registers, 8 reading
/// distinct ones.
async fn drive_all(addr: SocketAddr, s: &Settings) -> Result<[Load; 3], BoxError> {
    Ok([
        drive(addr, 1, 1, Reads::Same, s).await?,
        drive(addr, 1, 8, Reads::Same, s).await?,
        drive(addr, 1, 8, Reads::Distinct, s).await?,
    ])
}

/// The masters of each load, as the table names them.
const LOADS: [&str; 3] = ["1", "8, same registers", "8, distinct registers"];

/// Our gateway (`m2m-gateway run`, a separate process like modbus-relay) on its own pty
/// simulator: (1 master, 8 masters), collisions.
async fn measure_ours(s: &Settings, setup: Ours) -> Result<([Load; 3], u64), BoxError> {
    let bin = block_in_place(footprint::gateway_binary)?;
    let (_, pty, handle) = pty_device(Duration::from_secs(3600), setup.timed)?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, ours_config(pty.path(), port, setup.gap, setup.threads))?;
    let child = footprint::RunChild::spawn(&bin, &config)?;
    block_in_place(|| child.wait_for("modbus-tcp server listening", Duration::from_secs(10)))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let loads = drive_all(addr, s).await?;
    child.stop();
    drop(pty);
    Ok((loads, handle.bus_stats().garbage_bytes))
}

/// A gateway on a fresh pty simulator (see [`pty_device`]) serving the bench device as
/// unit 1 in `mode`; polls its registers every `every`.
pub(crate) fn serving_gateway(
    mode: ServeMode,
    every: Duration,
    timed: bool,
) -> Result<(Gateway, VirtualPort, SimHandle, CancellationToken), BoxError> {
    let (mut model, port, handle) = pty_device(every, timed)?;
    model.server = Some(model::Server {
        listen: "127.0.0.1:0".parse()?,
        max_connections: 32,
        idle_timeout: Duration::from_secs(60),
        max_in_flight: 4,
        units: vec![ServedUnit { unit: 1, device: "block".into(), bus: "bench".into(), mode }],
        grants: Vec::new(),
        virtual_units: Vec::new(),
    });
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(&model, shutdown.clone())?;
    crate::plant::watch(&gateway);
    Ok((gateway, port, handle, shutdown))
}

/// modbus-relay's binary: installed into `target/tools` by `cargo install` when missing.
fn relay_binary() -> Result<PathBuf, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let root = target.join("tools");
    let bin = root.join("bin/modbus-relay");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("bench:   installing modbus-relay into {} ...", root.display());
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "--locked", "modbus-relay", "--root"])
        .arg(&root)
        .env("CARGO_TARGET_DIR", target.join("tools-build"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run cargo install: {e}"))?;
    if !out.status.success() || !bin.exists() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        return Err(format!("cargo install failed: {last}"));
    }
    Ok(bin)
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// modbus-relay's configuration: its example config with our pty, 115200 8N1, no RTS,
/// no flush after write, no HTTP API, errors-only logging.
fn relay_config(device: &Path, port: u16, log_dir: &Path) -> String {
    format!(
        "tcp:\n  bind_addr: \"127.0.0.1\"\n  bind_port: {port}\n  keep_alive: \"60s\"\n\
         rtu:\n  device: \"{}\"\n  baud_rate: 115200\n  data_bits: 8\n  parity: \"none\"\n  \
         stop_bits: \"one\"\n  flush_after_write: false\n  rts_type: \"none\"\n  rts_delay_us: 0\n  \
         transaction_timeout: \"1s\"\n  serial_timeout: \"100ms\"\n  max_frame_size: 256\n\
         http:\n  enabled: false\n  bind_addr: \"127.0.0.1\"\n  bind_port: {}\n  metrics_enabled: false\n\
         logging:\n  log_dir: \"{}\"\n  trace_frames: false\n  level: \"error\"\n  format: \"pretty\"\n  \
         include_location: false\n  thread_ids: false\n  thread_names: false\n\
         connection:\n  max_connections: 100\n  idle_timeout: \"60s\"\n  error_timeout: \"300s\"\n  \
         connect_timeout: \"5s\"\n  per_ip_limits: 64\n  backoff:\n    initial_interval: \"100ms\"\n    \
         max_interval: \"30s\"\n    multiplier: 2.0\n    max_retries: 5\n",
        device.display(),
        port.wrapping_add(1),
        log_dir.display(),
    )
}

/// Kills the child (ours, by its handle) when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// modbus-relay on its own pty simulator: (1 master, 8 masters), collisions.
async fn measure_relay(s: &Settings, timed: bool) -> Result<([Load; 3], u64), BoxError> {
    let bin = block_in_place(relay_binary)?;
    let (_, pty, handle) = pty_device(Duration::from_secs(3600), timed)?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, relay_config(pty.path(), port, &dir.path().join("logs")))?;
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&config)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut child = Reaped(child);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Ok(Some(status)) = child.0.try_wait() {
        let mut err = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(format!("modbus-relay exited ({status}): {}", err.trim()).into());
    }
    let loads = drive_all(addr, s).await?;
    drop(child);
    drop(pty);
    Ok((loads, handle.bus_stats().garbage_bytes))
}

/// Why the relays are close with one master or distinct reads (measured, see the rows).
const NOTE_LIMIT: &str = "Where the 1.5x target is missed: with one master, each request is one round trip through the master's TCP stack, the relay, the pty and the simulator in turn, and both relays make the same system calls (read the TCP request, write the pty, wait for the reply, read it, write the TCP answer) and sleep twice per request; what differs is each relay's own share, small next to what they share (masters and simulator in the benchmark process, the kernel's pty and loopback TCP paths). modbus-relay does the serial I/O inside the connection task with a blocking read() (which stalls a runtime thread for up to its serial timeout when a device is slow); ours hands the request to the bus task and back, one wake-up each way. With 8 masters on distinct registers the line is the limit for both: one transaction at a time, at the pty's round-trip time. Only sharing identical reads lifts the line's limit, and only where masters ask for the same registers.";

pub(crate) async fn pass_through(s: &Settings) -> Result<Figure, BoxError> {
    let t35 = m2m_gateway::serial::rtu::t35(&LINE);
    let mut f = Figure::new(
        "Modbus-TCP pass-through",
        "Masters are tokio-modbus TCP clients in the benchmark process, each sending FC3 reads \
         of 10 holding registers of unit 1 back to back (one outstanding request per master): \
         1 master; 8 masters reading the same registers (HMIs showing the same screen; our \
         bus answers identical reads waiting at the same time with one transaction, \
         bus/pass.rs); 8 masters each reading different registers (nothing to share). \
         *Ours*: `m2m-gateway run` as a separate process, its server with a `pass` unit relayed \
         to the device on its bus (115200 8N1, device polled once an hour, so the line is the \
         masters'), with the bus's `frame_gap` (the silence kept before each request) at the \
         spec's t3.5 = 1.75 ms or at 0, and `worker_threads` 1 or one per core (2 here). \
         *modbus-relay*: the `modbus-relay` crate (2025.11.0), \
         TCP to RTU as a separate process, same line settings. Both relays get a fresh device: \
         the crate's simulator on a pty in the benchmark process. *Instant* devices answer at \
         once (no line timing: the figures are the relays' own per-request costs plus the \
         silence they keep); *line-timed* devices emulate 115200 8N1 wire time, the t3.5 after \
         each request and a 2 ms turnaround. *Collisions*: bytes the simulator dropped because \
         they arrived while it was replying.",
        vec![
            "relay",
            "device",
            "masters",
            "requests/s",
            "p50 latency",
            "p99 latency",
            "errors",
            "collisions",
        ],
    );
    let mut rows = |relay: &str, setup: &str, loads: &[Load; 3], collisions: u64| {
        for (masters, l) in LOADS.iter().zip(loads) {
            let [a, b, c, d] = l.cells();
            eprintln!("bench:     {relay} {setup} x{masters}: {a}/s p50 {b} p99 {c}");
            f.rows.push(vec![
                relay.into(),
                setup.into(),
                masters.to_string(),
                a,
                b,
                c,
                d,
                collisions.to_string(),
            ]);
        }
    };
    // The like-for-like rows are an instant device with no frame gap; the others show
    // what the spec's t3.5 costs and what a line-timed device allows.
    let setups = [
        Ours { timed: false, gap: Duration::ZERO, threads: Some(1) },
        Ours { timed: false, gap: Duration::ZERO, threads: None },
        Ours { timed: false, gap: t35, threads: Some(1) },
        Ours { timed: true, gap: t35, threads: Some(1) },
    ];
    let mut ours = Vec::new();
    for o in setups {
        let setup = if o.timed { "line-timed" } else { "instant" };
        eprintln!("bench:   {}, {setup} device", o.name());
        let (loads, collisions) = measure_ours(s, o).await?;
        rows(&o.name(), setup, &loads, collisions);
        ours.push((o, loads));
    }
    let mut relay_err = None;
    for timed in [false, true] {
        let setup = if timed { "line-timed" } else { "instant" };
        eprintln!("bench:   modbus-relay, {setup} device");
        let (theirs, collisions) = match measure_relay(s, timed).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("modbus-relay: not measured ({e})");
                relay_err = Some(e.to_string());
                break;
            }
        };
        rows("modbus-relay", setup, &theirs, collisions);
        for (setup_ours, loads) in ours.iter().filter(|o| o.0.timed == timed) {
            for ((masters, o), r) in LOADS.iter().zip(loads).zip(&theirs) {
                let ratio = o.rps / r.rps.max(1e-9);
                // The target is for the instant device (the relays' own costs); with t3.5
                // kept, or on a timed line, the line bounds both and the row is reported.
                let target = !timed && setup_ours.gap.is_zero();
                f.verdicts.push((
                    format!(
                        "pass-through, {setup} device, {}, masters {masters}: vs modbus-relay",
                        setup_ours.name()
                    ),
                    format!("{ratio:.2}x requests/s; p99 {} vs {}", ms(o.p99), ms(r.p99)),
                    if target { ">= 1.5x and a lower p99".into() } else { "reported".into() },
                    !target || (ratio >= 1.5 && o.p99 < r.p99),
                ));
            }
        }
        if !timed && let Some((_, [o1, ..])) = ours.first() {
            f.notes.push(format!(
                "Per request, instant device, 1 master (1 / requests/s): ours {:.0} µs with no frame \
                 gap, modbus-relay {:.0} µs. Both include the masters' and the simulator's share.",
                1e6 / o1.rps.max(1e-9),
                1e6 / theirs[0].rps.max(1e-9)
            ));
        }
    }
    if let Some(e) = relay_err {
        f.notes.push(format!("modbus-relay: not measured ({e})."));
        f.verdicts.push((
            "pass-through vs modbus-relay".into(),
            "TODO: modbus-relay not measured".into(),
            ">= 1.5x requests/s and a lower p99".into(),
            false,
        ));
    }
    let theory = plan::transaction_time(&LINE, t35, TURNAROUND, 8, 5 + 2 * usize::from(READ_REGS));
    f.notes.push(format!(
        "Line-timed: one FC3 transaction of 10 registers takes {} by `plan::transaction_time` \
         (request wire time + t3.5 + 2 ms turnaround + reply wire time + t3.5), i.e. at most \
         {:.1}/s on one line that keeps the spec's silences. modbus-relay goes faster than that \
         because it sends the next request as soon as the previous reply is in, without the \
         t3.5 silence the RTU spec requires between frames (the simulator does not police that \
         silence, so it does not show as collisions); on a real RS-485 line that risks devices \
         merging the reply and the next request into one frame. Our default keeps the silence; \
         `frame_gap` lowers it where the line allows (a virtual link, a device server that \
         times the line itself, devices known to need less).",
        ms(theory),
        1.0 / theory.as_secs_f64()
    ));
    f.notes.push(NOTE_LIMIT.into());
    f.notes.push(
        "modbus-relay is configured with `flush_after_write: false` (its `TCIOFLUSH` after \
         each write would discard a reply that a pty delivers at once), `rts_type: none`, \
         `serial_timeout: 100ms`, `transaction_timeout: 1s`, HTTP API off, log level error."
            .into(),
    );
    Ok(f)
}
