//! Benchmarks that back the README's claims: how much of a serial line the gateway uses,
//! how much line time request planning saves, and how little of the machine it takes.
//!
//! ```text
//! cargo run --release --example bench            # full run (~10 min), writes docs/BENCHMARKS.md
//! cargo run --release --example bench -- --quick # smoke run (~1 min), prints only
//! cargo run --release --example bench -- --out FILE
//! cargo run --release --example bench -- --quick --only footprint   # bus | plan | footprint
//! ```
//!
//! Each figure is one function returning a [`Figure`] (a titled table, its notes and its
//! verdicts against the targets); `main` runs them in order and renders the report. To add
//! a figure, write the function and push its result in `main`.
//!
//! Invariants: every figure is a median over several runs (consecutive measurement
//! windows after a warm-up), and every comparison is a ratio measured in the same run.
//! Nothing here asserts on timing: it measures and reports; `cargo test` only compiles it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant as StdInstant};

use m2m_gateway::gateway::Gateway;
use m2m_gateway::model::{self, Bus, Device, Line, Model, Parity, Point, Protocol};
use m2m_gateway::plan::{self, Strategy};
use m2m_gateway::rtu;
use m2m_gateway::simulate::{Exchange, SimConfig, Simulator, VirtualPort};
use m2m_gateway::value::{DataType, Table, WordOrder};
use tokio::task::block_in_place;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Device think time the simulators emulate (between the end of a request and the reply).
const TURNAROUND: Duration = Duration::from_millis(2);
/// Bus efficiency target: share of the theoretical maximum.
const EFFICIENCY_TARGET: f64 = 0.97;
/// Footprint targets.
const RSS_TARGET_MIB: f64 = 20.0;
const IDLE_CPU_TARGET: f64 = 0.5;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long and how often to measure.
struct Settings {
    quick: bool,
    /// Measurement windows per figure (the median is reported).
    runs: usize,
    /// Length of one window.
    window: Duration,
    /// Time to settle before the first window.
    warmup: Duration,
    /// CPU measurement window of the footprint figure.
    cpu_window: Duration,
}

/// One table of the report.
struct Figure {
    title: String,
    intro: String,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
    notes: Vec<String>,
    /// (what, measured, target, met) for the summary table.
    verdicts: Vec<(String, String, String, bool)>,
}

impl Figure {
    fn new(title: &str, intro: &str, header: Vec<&'static str>) -> Self {
        Figure {
            title: title.into(),
            intro: intro.into(),
            header,
            rows: Vec::new(),
            notes: Vec::new(),
            verdicts: Vec::new(),
        }
    }

    fn markdown(&self) -> String {
        let mut out = format!("## {}\n\n{}\n\n", self.title, self.intro);
        out += &table(&self.header, &self.rows);
        for n in &self.notes {
            let _ = write!(out, "\n{n}\n");
        }
        out
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n|{}\n", header.join(" | "), "---|".repeat(header.len()));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = match args.iter().position(|a| a == "--out") {
        Some(i) => Some(PathBuf::from(args.get(i + 1).ok_or("--out needs a file name")?)),
        None if quick => None,
        None => Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md")),
    };
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => Some(args.get(i + 1).ok_or("--only needs bus, plan or footprint")?.clone()),
        None => None,
    };
    if let Some(bad) =
        args.iter().find(|a| a.starts_with("--") && !["--quick", "--out", "--only"].contains(&a.as_str()))
    {
        return Err(
            format!("unknown option {bad}; use --quick, --only bus|plan|footprint, --out FILE").into()
        );
    }
    let settings = if quick {
        Settings {
            quick,
            runs: 1,
            window: Duration::from_secs(1),
            warmup: Duration::from_millis(300),
            cpu_window: Duration::from_secs(2),
        }
    } else {
        Settings {
            quick,
            runs: 5,
            window: Duration::from_secs(3),
            warmup: Duration::from_secs(1),
            cpu_window: Duration::from_secs(10),
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        // The gateway's and simulators' logs, for looking into a surprising figure.
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = StdInstant::now();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut figures = Vec::new();
    if wanted("bus") {
        eprintln!("bench: bus efficiency ...");
        figures.push(runtime.block_on(bus_efficiency(&settings))?);
    }
    if wanted("plan") {
        eprintln!("bench: request planning ...");
        figures.push(request_planning());
    }
    if wanted("footprint") {
        eprintln!("bench: footprint ...");
        figures.push(runtime.block_on(footprint(&settings))?);
    }
    figures.push(not_measured_yet());
    let report = render(&settings, &figures, started.elapsed());
    print!("{report}");
    if let Some(path) = out {
        std::fs::write(&path, &report).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn machine() -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(str::trim)
                .map(String::from)
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    vec![
        ("load average (1, 5, 15 min) when the report was written".into(), load),
        ("CPU".into(), cpu),
        ("cores (nproc)".into(), cores.to_string()),
        ("kernel".into(), format!("Linux {kernel}")),
        ("compiler".into(), rustc),
    ]
}

fn render(settings: &Settings, figures: &[Figure], took: Duration) -> String {
    let mut out = String::from(
        "# Benchmarks\n\n\
         Generated by `cargo run --release --example bench` (do not edit by hand; re-run it).\n\
         The field devices are the crate's own simulator on pseudo-terminal pairs, emulating\n\
         the wire time of every byte at the line's baud rate and framing, the t3.5 silence\n\
         after each request and a fixed 2 ms device turnaround.\n\n",
    );
    out += "## Machine\n\n";
    let rows: Vec<Vec<String>> = machine().into_iter().map(|(k, v)| vec![k, v]).collect();
    out += &table(&["", ""], &rows);
    let _ = write!(
        out,
        "\nMode: {}; {} measurement window(s) of {:?} per figure after a {:?} warm-up; medians \
         reported. Whole run took {:.0} s.\n\n",
        if settings.quick { "`--quick` smoke run" } else { "full run" },
        settings.runs,
        settings.window,
        settings.warmup,
        took.as_secs_f64()
    );
    out += "## Summary\n\n";
    let rows: Vec<Vec<String>> = figures
        .iter()
        .flat_map(|f| &f.verdicts)
        .map(|(what, got, target, met)| {
            vec![what.clone(), got.clone(), target.clone(), if *met { "met" } else { "**missed**" }.into()]
        })
        .collect();
    out += &table(&["figure", "measured", "target", ""], &rows);
    out += "\n";
    for f in figures {
        out += &f.markdown();
        out += "\n";
    }
    out
}

fn not_measured_yet() -> Figure {
    let mut f = Figure::new(
        "Not measured yet",
        "These figures need parts of the gateway that have not landed yet; each will be one \
         more function in `examples/bench.rs`.",
        vec!["figure", "status"],
    );
    for (what, needs) in [
        ("Modbus-TCP pass-through: added latency per request", "needs the Modbus-TCP server"),
        ("Modbus-TCP image reads: requests/s served from the image", "needs the Modbus-TCP server"),
        ("Agent mode: values/s from bus to image to spool", "needs the spool wired to the poller"),
        ("Peer link: values/s and bytes/value over TLS, catch-up after an outage", "needs the peer link"),
    ] {
        f.rows.push(vec![what.into(), format!("TODO: not measured yet: {needs}")]);
    }
    f
}

// ---------------------------------------------------------------------------------------
// Model building
// ---------------------------------------------------------------------------------------

fn point(name: &str, table: Table, address: u16, data_type: DataType, interval: Duration) -> Point {
    Point {
        name: name.into(),
        table,
        address,
        data_type,
        order: WordOrder::Abcd,
        scale: 1.0,
        offset: 0.0,
        interval,
        stale_after: Duration::from_secs(3600),
        unit: None,
    }
}

fn device(name: &str, unit: u8, points: Vec<Point>) -> Device {
    let points = points
        .into_iter()
        .map(|mut p| {
            p.name = format!("{name}.{}", p.name);
            p
        })
        .collect();
    Device {
        name: name.into(),
        unit,
        timeout: Duration::from_secs(1),
        turnaround: Duration::ZERO,
        max_registers: 125,
        max_bits: 2000,
        max_gap: 8,
        backoff_max: Duration::from_secs(10),
        points,
    }
}

fn one_bus(line: Line, devices: Vec<Device>) -> Model {
    Model {
        gateway: model::Gateway { name: "bench".into(), summary_interval: Duration::from_secs(3600) },
        buses: vec![Bus {
            name: "bench".into(),
            port: String::new(),
            line,
            protocol: Protocol::ModbusRtu,
            timeout: Duration::from_secs(1),
            retries: 1,
            queue_depth: 64,
            reopen_max: Duration::from_secs(1),
            devices,
        }],
        links: None,
    }
}

/// `n` contiguous u16 holding registers: one read of `n` registers.
fn block_device(n: u16, interval: Duration) -> Device {
    let points =
        (0..n).map(|a| point(&format!("r{a}"), Table::Holding, a, DataType::U16, interval)).collect();
    device("block", 1, points)
}

/// Eight devices of a small plant: meters, drives, a PLC, I/O, controllers. Mixed
/// tables, types and read sizes (1 to ~60 registers, bit reads).
fn mixed_plant(interval: Duration) -> Vec<Device> {
    let p = |n: &str, t, a, d| point(n, t, a, d, interval);
    let meter = |name: &str, unit| {
        let mut pts: Vec<Point> =
            (0..12).map(|i| p(&format!("e{i}"), Table::Input, i * 2, DataType::F32)).collect();
        pts.push(p("energy", Table::Input, 100, DataType::U64));
        device(name, unit, pts)
    };
    let drive = |name: &str, unit| {
        device(
            name,
            unit,
            vec![
                p("ready", Table::Holding, 2000, DataType::Bit(0)),
                p("running", Table::Holding, 2000, DataType::Bit(1)),
                p("speed", Table::Holding, 2001, DataType::I16),
                p("current", Table::Holding, 2002, DataType::U16),
                p("hours", Table::Holding, 2010, DataType::U32),
            ],
        )
    };
    let mut plc: Vec<Point> =
        (0..40).map(|i| p(&format!("w{i}"), Table::Holding, i + (i / 10) * 4, DataType::U16)).collect();
    plc.extend((0..32).map(|i| p(&format!("c{i}"), Table::Coils, i, DataType::Bool)));
    let io: Vec<Point> = (0..16)
        .map(|i| p(&format!("di{i}"), Table::Discrete, i, DataType::Bool))
        .chain((0..8).map(|i| p(&format!("ai{i}"), Table::Input, i, DataType::I16)))
        .collect();
    let controller = |name: &str, unit| {
        device(
            name,
            unit,
            (0..8).map(|i| p(&format!("t{i}"), Table::Holding, i * 2, DataType::F32)).collect(),
        )
    };
    vec![
        meter("meter1", 1),
        meter("meter2", 2),
        drive("drive1", 3),
        drive("drive2", 4),
        device("plc", 5, plc),
        device("io", 6, io),
        controller("tc1", 7),
        controller("boiler", 8),
    ]
}

fn sim_for(bus: &Bus) -> SimConfig {
    let mut sim = SimConfig::from_bus(bus);
    if let Some(l) = sim.line.as_mut() {
        l.turnaround = TURNAROUND;
    }
    sim
}

// ---------------------------------------------------------------------------------------
// Figure 1: bus efficiency
// ---------------------------------------------------------------------------------------

/// What one measurement window saw on the simulated line.
struct Window {
    transactions: usize,
    elapsed: Duration,
    theory: Duration,
    gaps: Vec<Duration>,
    /// How much longer than its emulated line time the simulator took, summed.
    sim_over: Duration,
}

/// Cuts the exchanges since `prev_end` into a window: from the end of the reply before it
/// to the end of its last reply, so it covers whole transactions only.
fn window(line: &Line, prev_end: Instant, ex: &[Exchange]) -> Option<Window> {
    let last = ex.last()?;
    let mut end = prev_end;
    let mut gaps = Vec::with_capacity(ex.len());
    let mut theory = Duration::ZERO;
    let mut sim_over = Duration::ZERO;
    for e in ex {
        gaps.push(e.request_at.saturating_duration_since(end));
        theory += plan::transaction_time(line, TURNAROUND, e.request_len, e.reply_len);
        let device = rtu::wire_time(line, e.request_len)
            + rtu::t35(line)
            + TURNAROUND
            + rtu::wire_time(line, e.reply_len);
        sim_over += (e.reply_end - e.request_at).saturating_sub(device);
        end = e.reply_end;
    }
    Some(Window { transactions: ex.len(), elapsed: last.reply_end - prev_end, theory, gaps, sim_over })
}

/// Runs a gateway polling `model`'s one bus flat out against a simulator; one
/// [`Window`] per run.
async fn measure_line(model: &mut Model, s: &Settings) -> Result<(Vec<Window>, u64, u64), BoxError> {
    let bus = &model.buses[0];
    let line = bus.line;
    let sim = Simulator::new(sim_for(bus));
    let handle = sim.handle();
    let mut port = VirtualPort::new()?;
    port.run(sim)?;
    model.buses[0].port = port.path().display().to_string();
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(model, shutdown.clone());
    tokio::time::sleep(s.warmup).await;
    let mut prev_end = handle.take_exchanges().last().map(|e| e.reply_end);
    let stats0 = gateway.buses[0].stats().snapshot();
    let mut windows = Vec::new();
    for _ in 0..s.runs {
        tokio::time::sleep(s.window).await;
        let mut ex = handle.take_exchanges();
        // Without an exchange before the window, the first one only marks its start.
        let start = match prev_end {
            Some(t) => t,
            None if ex.len() >= 2 => ex.remove(0).reply_end,
            None => continue,
        };
        if let Some(w) = window(&line, start, &ex) {
            prev_end = ex.last().map(|e| e.reply_end);
            windows.push(w);
        }
    }
    let stats = gateway.buses[0].stats();
    use std::sync::atomic::Ordering::Relaxed;
    let errors = stats.timeouts.load(Relaxed) - stats0.timeouts.load(Relaxed)
        + stats.crc_errors.load(Relaxed)
        - stats0.crc_errors.load(Relaxed)
        + stats.foreign_frames.load(Relaxed)
        - stats0.foreign_frames.load(Relaxed);
    let collisions = handle.bus_stats().garbage_bytes;
    shutdown.cancel();
    gateway.shutdown(Duration::from_secs(2)).await;
    drop(port);
    Ok((windows, errors, collisions))
}

async fn bus_efficiency(s: &Settings) -> Result<Figure, BoxError> {
    let mut f = Figure::new(
        "Bus efficiency",
        "The gateway polls continuously (every read due every 1 ms, one outstanding job per \
         planned read) against simulated devices. *Theory* per transaction is \
         `wire(request) + t3.5 + turnaround + wire(reply) + t3.5` (`plan::transaction_time`); \
         *efficiency* is the theoretical line time of the transactions completed divided by \
         the time they took (windows cut at reply ends, so only whole transactions count). \
         *Gap* is the silence the device saw between the end of its reply and the first byte \
         of the next request (it includes the pty's latency both ways); the Modbus spec \
         requires at least t3.5.",
        vec![
            "line",
            "plan",
            "transactions/s",
            "theoretical max/s",
            "efficiency",
            "t3.5",
            "min gap",
            "p1 gap",
            "median gap",
            "simulator lateness/tx",
            "errors",
        ],
    );
    let lines = [
        ("9600 8E1", Line { baud: 9600, data_bits: 8, parity: Parity::Even, stop_bits: 1 }),
        ("19200 8E1", Line { baud: 19_200, data_bits: 8, parity: Parity::Even, stop_bits: 1 }),
        ("115200 8N1", Line { baud: 115_200, data_bits: 8, parity: Parity::None, stop_bits: 1 }),
    ];
    let every = Duration::from_millis(1);
    let mut worst: Option<(f64, String)> = None;
    let mut gap_ok = true;
    let mut worst_gap_margin: Option<(Duration, Duration, String)> = None;
    for (lname, line) in lines {
        let plans: Vec<(String, Vec<Device>)> = vec![
            ("1 register".into(), vec![block_device(1, every)]),
            ("10 registers".into(), vec![block_device(10, every)]),
            ("125 registers".into(), vec![block_device(125, every)]),
            ("mixed, 8 devices".into(), mixed_plant(every)),
        ];
        for (pname, devices) in plans {
            eprintln!("bench:   {lname}, {pname}");
            let mut model = one_bus(line, devices);
            let (windows, errors, collisions) = measure_line(&mut model, s).await?;
            let tps = median(
                windows.iter().map(|w| w.transactions as f64 / w.elapsed.as_secs_f64().max(1e-9)).collect(),
            );
            let max = median(
                windows.iter().map(|w| w.transactions as f64 / w.theory.as_secs_f64().max(1e-9)).collect(),
            );
            let eff = median(
                windows.iter().map(|w| w.theory.as_secs_f64() / w.elapsed.as_secs_f64().max(1e-9)).collect(),
            );
            let sim_late = median(
                windows.iter().map(|w| w.sim_over.as_secs_f64() / (w.transactions.max(1) as f64)).collect(),
            );
            let mut gaps: Vec<Duration> = windows.iter().flat_map(|w| w.gaps.iter().copied()).collect();
            gaps.sort();
            let pick = |q: f64| {
                gaps.get(((gaps.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default()
            };
            let t35 = rtu::t35(&line);
            let min_gap = gaps.first().copied().unwrap_or_default();
            let row = format!("{lname}, {pname}");
            if !gaps.is_empty() {
                gap_ok &= min_gap >= t35;
                let margin = min_gap.saturating_sub(t35);
                if worst_gap_margin.as_ref().is_none_or(|(m, _, _)| margin < *m) {
                    worst_gap_margin = Some((margin, min_gap, row.clone()));
                }
            }
            if worst.as_ref().is_none_or(|(w, _)| eff < *w) {
                worst = Some((eff, row));
            }
            eprintln!("bench:     {tps:.1}/s of {max:.1}/s = {:.1}%, min gap {}", eff * 100.0, ms(min_gap));
            f.rows.push(vec![
                lname.into(),
                pname,
                format!("{tps:.1}"),
                format!("{max:.1}"),
                format!("{:.1}%", eff * 100.0),
                ms(t35),
                ms(min_gap),
                ms(pick(0.01)),
                ms(pick(0.5)),
                format!("{:.0} µs", sim_late * 1e6),
                format!("{errors} / {collisions}"),
            ]);
        }
    }
    f.notes.push(
        "Where the line time goes beyond theory: the gateway's share is *gap* - t3.5 (its \
         silence before each request is timed with `bus::sleep_until_precise`); the \
         simulator's share is *simulator lateness*, how much later than its emulated line \
         time each reply ended (scheduling on a shared machine). Both are included in \
         *efficiency*: nothing is subtracted."
            .into(),
    );
    f.notes.push(
        "*errors*: gateway timeouts + CRC errors + foreign frames / bytes the simulator dropped \
         because they arrived while it was replying (a collision); both should be 0."
            .into(),
    );
    if let Some((eff, row)) = worst {
        f.verdicts.push((
            format!("bus efficiency, worst row ({row})"),
            format!("{:.1}%", eff * 100.0),
            format!(">= {:.0}% of theory", EFFICIENCY_TARGET * 100.0),
            eff >= EFFICIENCY_TARGET,
        ));
    }
    if let Some((_, min_gap, row)) = worst_gap_margin {
        f.verdicts.push((
            format!("t3.5 respected, closest row ({row})"),
            format!("min gap {}", ms(min_gap)),
            "min gap >= t3.5 on every row".into(),
            gap_ok,
        ));
    }
    Ok(f)
}

// ---------------------------------------------------------------------------------------
// Figure 2: request planning
// ---------------------------------------------------------------------------------------

/// A small deterministic generator, so the point list is the same on every run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// 200 points over 4 devices: registers of mixed types and bits, in clusters with holes of
/// 0 to ~30 addresses between them, as real register maps have.
fn sparse_plant() -> Vec<Device> {
    let mut rng = Lcg(0x5eed);
    let interval = Duration::from_secs(1);
    let types = [DataType::U16, DataType::I16, DataType::U32, DataType::F32, DataType::F32, DataType::U16];
    let holes = [0u16, 0, 0, 0, 1, 2, 3, 6, 10, 14, 25, 40];
    let mut regs = |prefix: &str, table: Table, n: usize, start: u16| {
        let mut a = start;
        (0..n)
            .map(|i| {
                let t = types[rng.next(types.len() as u64) as usize];
                let p = point(&format!("{prefix}{i}"), table, a, t, interval);
                a += t.width() + holes[rng.next(holes.len() as u64) as usize];
                p
            })
            .collect::<Vec<_>>()
    };
    let meter = regs("m", Table::Input, 50, 0);
    let drive = [regs("s", Table::Holding, 15, 2000), regs("p", Table::Holding, 25, 3000)].concat();
    let plc_w = regs("w", Table::Holding, 30, 100);
    let io_a = regs("a", Table::Input, 18, 0);
    let mut bits = |prefix: &str, table: Table, n: usize| {
        let mut a = 0u16;
        (0..n)
            .map(|i| {
                let p = point(&format!("{prefix}{i}"), table, a, DataType::Bool, interval);
                a += 1 + holes[rng.next(holes.len() as u64) as usize];
                p
            })
            .collect::<Vec<_>>()
    };
    let plc = [plc_w, bits("c", Table::Coils, 30)].concat();
    let io = [bits("d", Table::Discrete, 32), io_a].concat();
    vec![device("meter", 1, meter), device("drive", 2, drive), device("plc", 3, plc), device("io", 4, io)]
}

fn request_planning() -> Figure {
    let line = Line { baud: 19_200, data_bits: 8, parity: Parity::Even, stop_bits: 1 };
    let devices = sparse_plant();
    let points: usize = devices.iter().map(|d| d.points.len()).sum();
    let mut f = Figure::new(
        "Request planning",
        &format!(
            "{points} points over {} devices (holding/input registers of mixed types, coils and \
             discrete inputs, in clusters with holes of 0 to 40 addresses), read once each at \
             19200 8E1 with a 2 ms device turnaround. Bus time per cycle is the sum of \
             `plan::transaction_time` over the planned reads. The gateway runs `Merged` \
             (holes up to `max_gap` = 8 are read through, reads up to 125 registers / 2000 bits).",
            devices.len()
        ),
        vec!["strategy", "requests/cycle", "registers+bits read", "bus time/cycle", "vs merged"],
    );
    let cost = |strategy| {
        let mut reads = 0usize;
        let mut words = 0usize;
        let mut time = Duration::ZERO;
        for d in &devices {
            for r in plan::plan_device_with(d, strategy) {
                reads += 1;
                words += usize::from(r.count);
                time += plan::transaction_time(
                    &line,
                    TURNAROUND,
                    plan::request_bytes(&r),
                    plan::response_bytes(&r),
                );
            }
        }
        (reads, words, time)
    };
    let merged = cost(Strategy::Merged);
    let mut ratios = BTreeMap::new();
    for (name, strategy) in [
        ("one request per point (PerPoint)", Strategy::PerPoint),
        ("contiguous only (Contiguous)", Strategy::Contiguous),
        ("merged across holes (Merged)", Strategy::Merged),
    ] {
        let (reads, words, time) = cost(strategy);
        let ratio = time.as_secs_f64() / merged.2.as_secs_f64().max(1e-9);
        ratios.insert(name, ratio);
        f.rows.push(vec![
            name.into(),
            reads.to_string(),
            words.to_string(),
            ms(time),
            format!("{ratio:.2}x"),
        ]);
    }
    let per_point = ratios.get("one request per point (PerPoint)").copied().unwrap_or(f64::NAN);
    let contiguous = ratios.get("contiguous only (Contiguous)").copied().unwrap_or(f64::NAN);
    f.notes.push(format!(
        "Merging cuts the bus time per cycle by {:.0}% against one request per point and by \
         {:.0}% against contiguous-only merging; the price is {} extra registers/bits read \
         through holes.",
        (1.0 - 1.0 / per_point) * 100.0,
        (1.0 - 1.0 / contiguous) * 100.0,
        merged.1.saturating_sub(cost(Strategy::Contiguous).1),
    ));
    f.verdicts.push((
        "request planning: bus time, per-point / merged".into(),
        format!("{per_point:.2}x"),
        "reported".into(),
        true,
    ));
    f.verdicts.push((
        "request planning: bus time, contiguous / merged".into(),
        format!("{contiguous:.2}x"),
        "reported".into(),
        true,
    ));
    f
}

// ---------------------------------------------------------------------------------------
// Figure 3: footprint
// ---------------------------------------------------------------------------------------

/// The release binary next to this example (`target/release/m2m-gateway`), built first.
fn gateway_binary() -> Result<PathBuf, BoxError> {
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
struct RunChild {
    child: Child,
    lines: mpsc::Receiver<(StdInstant, String)>,
    started: StdInstant,
}

impl RunChild {
    fn spawn(bin: &Path, config: &Path) -> Result<Self, BoxError> {
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
    fn wait_for(&self, what: &str, limit: Duration) -> Result<StdInstant, BoxError> {
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then a kill if it does not stop within 3 s.
    fn stop(mut self) {
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
fn memory(pid: u32) -> (f64, f64) {
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
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU share of one core a process used over `window`, in percent.
fn cpu_percent(pid: u32, window: Duration) -> f64 {
    let t0 = cpu_time(pid);
    let w0 = StdInstant::now();
    std::thread::sleep(window);
    let used = cpu_time(pid).saturating_sub(t0);
    used.as_secs_f64() / w0.elapsed().as_secs_f64() * 100.0
}

/// Serves every bus of `model` with a simulator on its own pty; returns the ports (keep
/// them alive) and the path of each bus.
fn simulate_plant(model: &Model) -> Result<(Vec<VirtualPort>, Vec<String>), BoxError> {
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
fn big_config(buses: usize, devices: usize, ports: &[String]) -> String {
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

async fn footprint(s: &Settings) -> Result<Figure, BoxError> {
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
        "peak RSS, `run` on gateway.toml (3 devices, 16 points)".into(),
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
async fn cpu_percent_async(pid: u32, settle: Duration, window: Duration) -> f64 {
    tokio::task::spawn_blocking(move || {
        std::thread::sleep(settle);
        cpu_percent(pid, window)
    })
    .await
    .unwrap_or(f64::NAN)
}
