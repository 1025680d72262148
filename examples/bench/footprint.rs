//! Figure 3, footprint: the release binary's `run` as a child process (memory, CPU,
//! start-up time), its size, and 2,000 devices on 64 buses.

use super::*;

/// The release binary next to this example (`target/release/m2m-gateway`), built first.
pub(crate) fn gateway_binary() -> Result<PathBuf, BoxError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    // `cargo run` gives this process the package's CARGO_* variables and a library path;
    // a nested build that sees them fingerprints differently and rebuilds half the tree.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&k.as_ref()) || k.starts_with("CARGO_BUILD_");
        if (k.starts_with("CARGO") && !keep) || k == "LD_LIBRARY_PATH" || k == "OUT_DIR" {
            build.env_remove(&key);
        }
    }
    let status = build
        .args(["build", "--release", "--quiet", "--bin", "m2m-gateway"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()?;
    if !status.success() {
        return Err("cargo build --release --bin m2m-gateway failed".into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or("cannot locate the target directory")?;
    let bin = dir.join("m2m-gateway");
    if !bin.exists() {
        return Err(format!("{} not found", bin.display()).into());
    }
    Ok(bin)
}

/// A running `m2m-gateway run`, its log lines forwarded with their arrival times.
pub(crate) struct RunChild {
    child: Child,
    lines: mpsc::Receiver<(StdInstant, String)>,
    started: StdInstant,
}

impl RunChild {
    pub(crate) fn spawn(bin: &Path, config: &Path) -> Result<Self, BoxError> {
        let started = StdInstant::now();
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send((StdInstant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(RunChild { child, lines, started })
    }

    /// Waits for a log line containing `what`; returns when it was logged.
    pub(crate) fn wait_for(&self, what: &str, limit: Duration) -> Result<StdInstant, BoxError> {
        let deadline = StdInstant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(StdInstant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.contains(what) => return Ok(at),
                Ok(_) => {}
                Err(_) => return Err(format!("no {what:?} log line within {limit:?}").into()),
            }
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then a kill if it does not stop within 3 s.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = StdInstant::now() + Duration::from_secs(3);
        while StdInstant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmHWM` and `VmRSS` of a process, in MiB.
pub(crate) fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0)
}

/// User + system CPU time of a process so far.
pub(crate) fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU share of one core a process used over `window`, in percent.
pub(crate) fn cpu_percent(pid: u32, window: Duration) -> f64 {
    let t0 = cpu_time(pid);
    let w0 = StdInstant::now();
    std::thread::sleep(window);
    let used = cpu_time(pid).saturating_sub(t0);
    used.as_secs_f64() / w0.elapsed().as_secs_f64() * 100.0
}

/// Serves every bus of `model` with a simulator on its own pty; returns the ports (keep
/// them alive) and the path of each bus.
pub(crate) fn simulate_plant(model: &Model) -> Result<(Vec<VirtualPort>, Vec<String>), BoxError> {
    let mut ports = Vec::new();
    let mut paths = Vec::new();
    for bus in &model.buses {
        let mut port = VirtualPort::new()?;
        port.run(Simulator::new(sim_for(bus)))?;
        paths.push(port.path().display().to_string());
        ports.push(port);
    }
    Ok((ports, paths))
}

/// Config text for `buses` buses of `per_bus` devices, each with four points read in one
/// request of 12 registers every second.
pub(crate) fn big_config(buses: usize, devices: usize, ports: &[String]) -> String {
    let mut out = String::from("[gateway]\nname = \"bench\"\nsummary_interval = \"10s\"\n\n");
    for (b, port) in ports.iter().enumerate().take(buses) {
        let _ = write!(
            out,
            "[[bus]]\nname = \"line{b}\"\nport = \"{port}\"\nbaud = 19200\nparity = \"even\"\n\n"
        );
    }
    for i in 0..devices {
        let (bus, unit) = (i % buses, 1 + i / buses);
        let _ = write!(
            out,
            "[[device]]\nname = \"d{i}\"\nbus = \"line{bus}\"\nunit = {unit}\ninterval = \"1s\"\n\
             [[device.point]]\nname = \"t1\"\ntable = \"holding\"\naddress = 0\ntype = \"f32\"\n\
             [[device.point]]\nname = \"t2\"\ntable = \"holding\"\naddress = 2\ntype = \"f32\"\n\
             [[device.point]]\nname = \"state\"\ntable = \"holding\"\naddress = 4\n\
             [[device.point]]\nname = \"count\"\ntable = \"holding\"\naddress = 10\ntype = \"u32\"\n\n"
        );
    }
    out
}

pub(crate) async fn footprint(s: &Settings) -> Result<Figure, BoxError> {
    let mut f = Figure::new(
        "Footprint",
        "The release binary's `run` as a separate process, polling simulated devices served \
         from the benchmark process over ptys. Peak RSS is `VmHWM` from `/proc/PID/status`; \
         CPU is `utime + stime` from `/proc/PID/stat` over the window, as a share of one core.",
        vec!["what", "measured", "target"],
    );
    let bin = gateway_binary()?;
    let tmp = tempfile::tempdir()?;

    // Binary size.
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as f64 / 1_048_576.0).unwrap_or(f64::NAN);
    let stripped = tmp.path().join("m2m-gateway.stripped");
    std::fs::copy(&bin, &stripped)?;
    let strip_ok = Command::new("strip").arg(&stripped).status().map(|s| s.success()).unwrap_or(false);
    let stripped_mib = if strip_ok { size(&stripped) } else { f64::NAN };
    f.rows.push(vec!["release binary size".into(), format!("{:.2} MiB", size(&bin)), "-".into()]);
    f.rows.push(vec!["stripped binary size".into(), format!("{stripped_mib:.2} MiB"), "reported".into()]);
    f.verdicts.push(("stripped binary".into(), format!("{stripped_mib:.2} MiB"), "reported".into(), true));

    // The shipped gateway.toml against simulated devices.
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let model = m2m_gateway::config::load(&shipped)?;
    let shipped_size = format!(
        "{} devices, {} points",
        model.buses.iter().map(|b| b.devices.len()).sum::<usize>(),
        model.buses.iter().flat_map(|b| &b.devices).map(|d| d.points.len()).sum::<usize>()
    );
    let (ports, paths) = simulate_plant(&model)?;
    let mut text = std::fs::read_to_string(&shipped)?;
    for (bus, path) in model.buses.iter().zip(&paths) {
        text = text.replace(&format!("port = \"{}\"", bus.port), &format!("port = \"{path}\""));
    }
    let config = tmp.path().join("gateway.toml");
    std::fs::write(&config, &text)?;
    let mut startups = Vec::new();
    for _ in 0..s.runs {
        let child = RunChild::spawn(&bin, &config)?;
        let at = block_in_place(|| child.wait_for("first poll completed", Duration::from_secs(10)))?;
        startups.push(at.duration_since(child.started).as_secs_f64());
        block_in_place(|| child.stop());
    }
    let startup = median(startups);
    let child = RunChild::spawn(&bin, &config)?;
    block_in_place(|| child.wait_for("first poll completed", Duration::from_secs(10)))?;
    let pid = child.pid();
    let settle = if s.quick { Duration::from_secs(1) } else { Duration::from_secs(5) };
    let cpu = cpu_percent_async(pid, settle, s.cpu_window).await;
    let (hwm, rss) = memory(pid);
    block_in_place(|| child.stop());
    drop(ports);
    f.rows.push(vec![
        "time from start to first completed poll (gateway.toml)".into(),
        format!("{:.1} ms", startup * 1e3),
        "reported".into(),
    ]);
    f.rows.push(vec![
        format!("peak RSS, `run` on gateway.toml ({shipped_size})"),
        format!("{hwm:.1} MiB (RSS now {rss:.1} MiB)"),
        format!("<= {RSS_TARGET_MIB} MiB"),
    ]);
    f.rows.push(vec![
        format!("CPU over {:?}, `run` on gateway.toml", s.cpu_window),
        format!("{cpu:.2}% of a core"),
        format!("< {IDLE_CPU_TARGET}%"),
    ]);
    f.verdicts.push((
        "start to first completed poll".into(),
        format!("{:.1} ms", startup * 1e3),
        "reported".into(),
        true,
    ));
    f.verdicts.push((
        "peak RSS, gateway.toml".into(),
        format!("{hwm:.1} MiB"),
        format!("<= {RSS_TARGET_MIB} MiB"),
        hwm <= RSS_TARGET_MIB,
    ));
    f.verdicts.push((
        "idle CPU, gateway.toml".into(),
        format!("{cpu:.2}%"),
        format!("< {IDLE_CPU_TARGET}% of a core"),
        cpu < IDLE_CPU_TARGET,
    ));

    // 2,000 devices on 64 buses.
    let (buses, devices) = (64, 2000);
    let placeholder: Vec<String> = (0..buses).map(|b| format!("/dev/null/{b}")).collect();
    let model = m2m_gateway::config::parse(&big_config(buses, devices, &placeholder), "big.toml")?;
    let (ports, paths) = simulate_plant(&model)?;
    let config = tmp.path().join("big.toml");
    std::fs::write(&config, big_config(buses, devices, &paths))?;
    let child = RunChild::spawn(&bin, &config)?;
    block_in_place(|| child.wait_for("first poll completed", Duration::from_secs(30)))?;
    let pid = child.pid();
    let settle = if s.quick { Duration::from_secs(2) } else { Duration::from_secs(12) };
    let cpu = cpu_percent_async(pid, settle, s.cpu_window).await;
    let (hwm, rss) = memory(pid);
    // The bus summaries (every 10 s) say how much is being polled.
    let rates: Vec<f64> = child
        .lines
        .try_iter()
        .filter_map(|(_, l)| {
            let i = l.find(" transactions (")?;
            let rest = &l[i + " transactions (".len()..];
            rest.split("/s)").next()?.parse::<f64>().ok()
        })
        .collect();
    block_in_place(|| child.stop());
    drop(ports);
    let polled = if rates.len() >= buses {
        format!(
            "; the bus summaries report {:.0} transactions/s in all",
            rates[rates.len() - buses..].iter().sum::<f64>()
        )
    } else {
        String::new()
    };
    f.rows.push(vec![
        format!("peak RSS, {devices} devices on {buses} buses (19200 8E1, 1 s interval)"),
        format!("{hwm:.1} MiB (RSS now {rss:.1} MiB)"),
        "reported".into(),
    ]);
    f.rows.push(vec![
        format!("CPU over {:?}, {devices} devices on {buses} buses", s.cpu_window),
        format!("{cpu:.1}% of a core"),
        "reported".into(),
    ]);
    f.notes.push(format!(
        "The {devices}-device run: {buses} ptys, each served by a simulator of ~{} units in the \
         benchmark process; every device has 4 points read in one 12-register request each \
         second{polled}.",
        devices.div_ceil(buses)
    ));
    f.verdicts.push((
        format!("{devices} devices / {buses} buses: peak RSS, CPU"),
        format!("{hwm:.1} MiB, {cpu:.1}%"),
        "reported".into(),
        true,
    ));
    Ok(f)
}

/// Waits `settle`, then measures `pid`'s CPU share over `window`, off the async threads.
pub(crate) async fn cpu_percent_async(pid: u32, settle: Duration, window: Duration) -> f64 {
    tokio::task::spawn_blocking(move || {
        std::thread::sleep(settle);
        cpu_percent(pid, window)
    })
    .await
    .unwrap_or(f64::NAN)
}
