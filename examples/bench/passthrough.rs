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
    /// The relay process's CPU time (user + system) per answered request, over the whole
    /// load including its warm-up, when its pid was given.
    pub(crate) cpu_per_request: Option<Duration>,
    /// The relay's context switches (all threads, voluntary and not) per answered request.
    pub(crate) switches_per_request: Option<f64>,
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
/// a warm-up, then `s.runs` windows of `s.window`. With `relay` (the pid of the process
/// that serves `addr`), its CPU time per request is measured too.
pub(crate) async fn drive(
    addr: SocketAddr,
    unit: u8,
    n: usize,
    reads: Reads,
    s: &Settings,
    relay: Option<u32>,
) -> Result<Load, BoxError> {
    let cpu_at_start = relay.map(run_time);
    let switches_at_start = relay.map(context_switches);
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
    let cpu_per_request = relay
        .zip(cpu_at_start)
        .map(|(pid, t0)| (run_time(pid).saturating_sub(t0)).div_f64(all.len().max(1) as f64));
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
    let switches_per_request = relay
        .zip(switches_at_start)
        .map(|(pid, n0)| context_switches(pid).saturating_sub(n0) as f64 / all.len().max(1) as f64);
    Ok(Load { rps, p50: pick(0.5), p99: pick(0.99), errors, cpu_per_request, switches_per_request })
}

/// The sum over every thread of a process of what `count` reads from the thread's
/// `/proc/PID/task/TID/<file>` (0 for a process that is gone).
fn per_thread(pid: u32, file: &str, count: impl Fn(&str) -> u64) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join(file)).ok())
        .map(|text| count(&text))
        .sum()
}

/// Time every thread of a process has spent on a CPU so far, to the nanosecond (the
/// scheduler's own count, `/proc/PID/task/*/schedstat`; `/proc/PID/stat`'s user and
/// system times are samples at each 4 ms tick, which overcharge a process that wakes
/// and sleeps thousands of times a second).
fn run_time(pid: u32) -> Duration {
    Duration::from_nanos(per_thread(pid, "schedstat", |s| {
        s.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
    }))
}

/// Context switches (voluntary and not) of every thread of a process so far.
fn context_switches(pid: u32) -> u64 {
    per_thread(pid, "status", |status| {
        status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    })
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

/// The device behind the relay in a row.
#[derive(Clone, Copy, PartialEq)]
enum Slave {
    /// The crate's simulator answering at once.
    Instant,
    /// The crate's simulator emulating 115200 8N1 wire time and a 2 ms turnaround.
    Timed,
    /// A third-party slave: pymodbus's RTU server (`tests/interop/pymodbus_slave.py`) on a
    /// socat pty pair, as an outside test bench would set it up.
    Pymodbus,
}

impl Slave {
    fn name(self) -> &'static str {
        match self {
            Slave::Instant => "instant",
            Slave::Timed => "line-timed",
            Slave::Pymodbus => "pymodbus",
        }
    }
}

/// A running device for one relay; stopped when dropped.
enum SlaveRig {
    Sim { port: VirtualPort, handle: SimHandle },
    Pymodbus { gateway_side: PathBuf, _slave: Reaped, _socat: Reaped, _dir: tempfile::TempDir },
}

impl SlaveRig {
    async fn start(slave: Slave) -> Result<Self, BoxError> {
        if slave != Slave::Pymodbus {
            let (_, port, handle) = pty_device(Duration::from_secs(3600), slave == Slave::Timed)?;
            return Ok(SlaveRig::Sim { port, handle });
        }
        let dir = tempfile::tempdir()?;
        let (dev, gw) = (dir.path().join("slave"), dir.path().join("gateway"));
        let socat = Command::new("socat")
            .arg(format!("pty,link={},raw,echo=0", dev.display()))
            .arg(format!("pty,link={},raw,echo=0", gw.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start socat ({e}); install it (Debian: apt-get install socat)"))?;
        let socat = Reaped(socat);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(dev.exists() && gw.exists()) {
            if Instant::now() >= deadline {
                return Err("socat made no pty pair within 5 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/pymodbus_slave.py");
        let slave = Command::new("python3")
            .arg(script)
            .arg(&dev)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start python3 ({e})"))?;
        let mut slave = Reaped(slave);
        // Ready when it answers a read (our own `poll`), within 20 s (imports are slow).
        let bin = block_in_place(footprint::gateway_binary)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = slave.0.try_wait() {
                return Err(format!(
                    "pymodbus slave exited ({status}); is pymodbus installed (pip install pymodbus pyserial)?"
                )
                .into());
            }
            let probe = Command::new(&bin)
                .args([
                    "poll",
                    "--baud",
                    "9600",
                    "--parity",
                    "none",
                    "--unit",
                    "1",
                    "--count",
                    "1",
                    "--timeout",
                    "300ms",
                    "--port",
                ])
                .arg(&gw)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if probe.success() {
                break;
            }
            if Instant::now() >= deadline {
                return Err("the pymodbus slave did not answer within 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(SlaveRig::Pymodbus { gateway_side: gw, _slave: slave, _socat: socat, _dir: dir })
    }

    /// The port a relay opens.
    fn path(&self) -> &Path {
        match self {
            SlaveRig::Sim { port, .. } => port.path(),
            SlaveRig::Pymodbus { gateway_side, .. } => gateway_side,
        }
    }

    /// Bytes the simulator dropped because they arrived while it was replying.
    fn collisions(&self) -> String {
        match self {
            SlaveRig::Sim { handle, .. } => handle.bus_stats().garbage_bytes.to_string(),
            SlaveRig::Pymodbus { .. } => "-".into(),
        }
    }
}

/// How our gateway is set up for one row.
#[derive(Clone, Copy)]
struct Ours {
    slave: Slave,
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

    /// The first like-for-like rows: instant device, no frame gap, one worker thread.
    fn first(&self) -> bool {
        self.slave == Slave::Instant && self.gap.is_zero() && self.threads == Some(1)
    }

    /// The rows the targets are for: the relays' own costs, no silence kept.
    fn like_for_like(&self) -> bool {
        self.slave != Slave::Timed && self.gap.is_zero()
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

/// A profiler attached to a relay while it serves the first like-for-like row (instant
/// device, no frame gap, one worker thread), when `M2M_BENCH_PROFILE` holds its command:
/// `-p PID` is appended and `{relay}` replaced by `ours` or `modbus-relay`, e.g.
/// `M2M_BENCH_PROFILE='perf record -g -o target/{relay}.perf'` (read with `perf report -i`)
/// or `M2M_BENCH_PROFILE='strace -c -f -o target/{relay}.strace'`. Stopped with SIGINT
/// (both write their output then) when dropped.
struct Profile(Child);

impl Profile {
    async fn start(
        pid: u32,
        relay: &str,
        slave: Slave,
        ours: Option<&Ours>,
    ) -> Result<Option<Self>, BoxError> {
        let Ok(command) = std::env::var("M2M_BENCH_PROFILE") else {
            return Ok(None);
        };
        if slave != Slave::Instant || !ours.is_none_or(Ours::first) {
            return Ok(None);
        }
        let command = command.replace("{relay}", relay);
        let mut words = command.split_whitespace();
        let program = words.next().ok_or("M2M_BENCH_PROFILE is empty")?;
        let child = Command::new(program)
            .args(words)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {program} ({e})"))?;
        // Let it attach before the load starts.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Some(Profile(child)))
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        // perf writes its file on SIGINT.
        let _ = Command::new("kill").arg("-INT").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// The three loads of this figure: 1 master, 8 reading the same registers, 8 reading
/// distinct ones; `pid` is the relay's process.
async fn drive_all(addr: SocketAddr, s: &Settings, pid: u32) -> Result<[Load; 3], BoxError> {
    Ok([
        drive(addr, 1, 1, Reads::Same, s, Some(pid)).await?,
        drive(addr, 1, 8, Reads::Same, s, Some(pid)).await?,
        drive(addr, 1, 8, Reads::Distinct, s, Some(pid)).await?,
    ])
}

/// The masters of each load, as the table names them.
const LOADS: [&str; 3] = ["1", "8, same registers", "8, distinct registers"];

/// Our gateway (`m2m-gateway run`, a separate process like modbus-relay) on its own
/// device: the loads, and the device's collisions.
async fn measure_ours(s: &Settings, setup: Ours) -> Result<([Load; 3], String), BoxError> {
    let bin = block_in_place(footprint::gateway_binary)?;
    let slave = SlaveRig::start(setup.slave).await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, ours_config(slave.path(), port, setup.gap, setup.threads))?;
    let child = footprint::RunChild::spawn(&bin, &config)?;
    block_in_place(|| child.wait_for("modbus-tcp server listening", Duration::from_secs(10)))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let perf = Profile::start(child.pid(), "ours", setup.slave, Some(&setup)).await?;
    let loads = drive_all(addr, s, child.pid()).await?;
    drop(perf);
    child.stop();
    Ok((loads, slave.collisions()))
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
        routes: Vec::new(),
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
        // Cargo's last lines only say where the artifacts are: show the first error, and
        // the system library a build script missed (Debian: libudev-dev and pkg-config).
        let first = err.lines().find(|l| l.starts_with("error")).unwrap_or("no error line");
        let hint = if err.contains("libudev") { " (install libudev-dev and pkg-config)" } else { "" };
        return Err(format!("cargo install failed: {first}{hint}"));
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

/// modbus-relay on its own device: the loads, and the device's collisions.
async fn measure_relay(s: &Settings, slave: Slave) -> Result<([Load; 3], String), BoxError> {
    let bin = block_in_place(relay_binary)?;
    let rig = SlaveRig::start(slave).await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, relay_config(rig.path(), port, &dir.path().join("logs")))?;
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
    let perf = Profile::start(child.0.id(), "modbus-relay", slave, None).await?;
    let loads = drive_all(addr, s, child.0.id()).await?;
    drop(perf);
    drop(child);
    Ok((loads, rig.collisions()))
}

pub(crate) async fn pass_through(s: &Settings, instant_only: bool) -> Result<Figure, BoxError> {
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
         TCP to RTU as a separate process, same line settings. Each relay gets a fresh device: \
         *instant* is the crate's simulator on a pty in the benchmark process answering at once \
         (no line timing: the figures are the relays' own per-request costs plus the silence \
         they keep); *line-timed* is the same simulator emulating 115200 8N1 wire time, the \
         t3.5 after each request and a 2 ms turnaround; *pymodbus* is a third-party slave, \
         pymodbus's RTU server (`tests/interop/pymodbus_slave.py`) on a socat pty pair. \
         *CPU per request* is the time the relay process's threads ran on a CPU (the \
         scheduler's count, `/proc/PID/task/*/schedstat`) over the whole load, warm-up included, divided by the requests it \
         answered. *Collisions*: bytes the simulator dropped because they arrived while it \
         was replying.",
        vec![
            "relay",
            "device",
            "masters",
            "requests/s",
            "p50 latency",
            "p99 latency",
            "CPU per request",
            "errors",
            "collisions",
        ],
    );
    let cpu = |l: &Load| {
        l.cpu_per_request.map_or("-".into(), |c| {
            format!(
                "{:.0} µs, {:.1} switches",
                c.as_secs_f64() * 1e6,
                l.switches_per_request.unwrap_or(f64::NAN)
            )
        })
    };
    let mut rows = |relay: &str, slave: Slave, loads: &[Load; 3], collisions: &str| {
        for (masters, l) in LOADS.iter().zip(loads) {
            let [a, b, c, d] = l.cells();
            eprintln!("bench:     {relay} {} x{masters}: {a}/s p50 {b} p99 {c} cpu {}", slave.name(), cpu(l));
            f.rows.push(vec![
                relay.into(),
                slave.name().into(),
                masters.to_string(),
                a,
                b,
                c,
                cpu(l),
                d,
                collisions.to_string(),
            ]);
        }
    };
    // The like-for-like rows are an instant device, and the third-party one, with no frame
    // gap; the others show what the spec's t3.5 costs and what a line-timed device allows.
    let setups = [
        Ours { slave: Slave::Instant, gap: Duration::ZERO, threads: Some(1) },
        Ours { slave: Slave::Instant, gap: Duration::ZERO, threads: None },
        Ours { slave: Slave::Pymodbus, gap: Duration::ZERO, threads: Some(1) },
        Ours { slave: Slave::Instant, gap: t35, threads: Some(1) },
        Ours { slave: Slave::Timed, gap: t35, threads: Some(1) },
    ];
    let mut ours = Vec::new();
    for o in setups.into_iter().filter(|o| !instant_only || o.first()) {
        eprintln!("bench:   {}, {} device", o.name(), o.slave.name());
        match measure_ours(s, o).await {
            Ok((loads, collisions)) => {
                rows(&o.name(), o.slave, &loads, &collisions);
                ours.push((o, loads));
            }
            Err(e) if o.slave == Slave::Pymodbus => {
                eprintln!("bench:   pymodbus device: not measured ({e})");
                f.notes.push(format!("The pymodbus rows were not measured: {e}."));
            }
            Err(e) => return Err(e),
        }
    }
    for slave in [Slave::Instant, Slave::Pymodbus, Slave::Timed] {
        if !ours.iter().any(|(o, _)| o.slave == slave) {
            continue;
        }
        eprintln!("bench:   modbus-relay, {} device", slave.name());
        let (theirs, collisions) = match measure_relay(s, slave).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("modbus-relay: not measured ({e})");
                f.notes.push(format!("modbus-relay on the {} device: not measured ({e}).", slave.name()));
                f.verdicts.push((
                    format!("pass-through vs modbus-relay, {} device", slave.name()),
                    "modbus-relay not measured".into(),
                    ">= 1.2x requests/s".into(),
                    false,
                ));
                continue;
            }
        };
        rows("modbus-relay", slave, &theirs, &collisions);
        for (o, loads) in ours.iter().filter(|(o, _)| o.slave == slave) {
            for ((masters, mine), r) in LOADS.iter().zip(loads).zip(&theirs) {
                let ratio = mine.rps / r.rps.max(1e-9);
                let cpu_ratio = match (mine.cpu_per_request, r.cpu_per_request) {
                    (Some(a), Some(b)) => a.as_secs_f64() / b.as_secs_f64().max(1e-12),
                    _ => f64::NAN,
                };
                let name = format!(
                    "pass-through, {} device, {}, masters {masters}: vs modbus-relay",
                    slave.name(),
                    o.name()
                );
                let figures = format!(
                    "{ratio:.2}x requests/s; CPU per request {} vs {} ({cpu_ratio:.2}x); p99 {} vs {}",
                    cpu(mine),
                    cpu(r),
                    ms(mine.p99),
                    ms(r.p99)
                );
                // The targets are for the relays' own costs (no silence kept, a device that
                // does not time the line); the other rows are reported.
                let (target, met) = match (o.like_for_like(), *masters) {
                    (false, _) => ("reported".to_string(), true),
                    (true, "1") => (
                        ">= 1.2x requests/s, <= 0.5x CPU per request, p99 no higher".into(),
                        ratio >= 1.2 && cpu_ratio <= 0.5 && mine.p99 <= r.p99,
                    ),
                    (true, _) => (">= 1.2x requests/s".into(), ratio >= 1.2),
                };
                f.verdicts.push((name, figures, target, met));
            }
        }
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
    f.notes.push(
        "modbus-relay is configured with `flush_after_write: false` (its `TCIOFLUSH` after \
         each write would discard a reply that a pty delivers at once), `rts_type: none`, \
         `serial_timeout: 100ms`, `transaction_timeout: 1s`, HTTP API off, log level error."
            .into(),
    );
    Ok(f)
}
