//! Benchmarks that back the README's claims: how much of a serial line the gateway uses,
//! how much line time request planning saves, and how little of the machine it takes.
//!
//! ```text
//! cargo run --release --example bench            # full run (~9 min), writes docs/BENCHMARKS.md
//! cargo run --release --example bench -- --quick # smoke run (~2 min), prints only
//! cargo run --release --example bench -- --out FILE
//! cargo run --release --example bench -- --quick --only footprint   # bus | plan | footprint | pass | agent | link | pipeline
//! cargo run --release --example bench -- --only pass     # one figure, full windows: replaces its
//!                                                        # section and summary rows in the report
//! cargo run --release --example bench -- --quick --only pass-instant  # the like-for-like pass-through
//!                                                        # rows alone (prints; M2M_BENCH_PROFILE attaches
//!                                                        # perf or strace, see passthrough.rs)
//! cargo run --release --example bench -- --only soak [--duration 1h] [--cut-every 5m] [--cut-for 30s]
//! ```
//!
//! The soak run (`soak.rs`) is never part of the default run: it takes an hour, and it
//! writes only its own section of the report (between `<!-- soak -->` markers), which a
//! full run keeps as it is.
//!
//! Each figure is one function returning a [`Figure`] (a titled table, its notes and its
//! verdicts against the targets); `main` runs them in order and renders the report. To add
//! a figure, write the function (a new file beside these) and push its result in `main`.
//!
//! Files: `main.rs` (options, report), `plant.rs` (devices built in code and their
//! simulators), `line.rs` (figure 1, bus efficiency), `planning.rs` (figure 2, request
//! planning), `footprint.rs` (figure 3, memory, CPU, size, start-up, 2,000 devices),
//! `passthrough.rs` (figure 4, Modbus-TCP pass-through against modbus-relay, and the
//! masters' driver), `agent.rs` (figure 5, agent-mode reads from the image), `peerlink.rs`
//! (figure 6, runs `examples/link_bench.rs`).
//!
//! `RUST_LOG=m2m_gateway=debug` shows the gateway's and simulators' logs while it runs.
//!
//! Invariants: every figure is a median over several runs (consecutive measurement
//! windows after a warm-up), and every comparison is a ratio measured in the same run.
//! Nothing here asserts on timing: it measures and reports; `cargo test` only compiles it.

mod agent;
mod footprint;
mod line;
mod passthrough;
mod peerlink;
mod pipeline;
mod planning;
mod plant;
mod soak;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant as StdInstant};

use m2m_gateway::gateway::Gateway;
use m2m_gateway::model::{self, Bus, Device, Line, Model, Parity, Point, Protocol};
use m2m_gateway::point::value::{DataType, Table, WordOrder};
use m2m_gateway::poll::plan::{self, Strategy};
use m2m_gateway::serial::rtu;
use m2m_gateway::sim::{Exchange, SimConfig, Simulator, VirtualPort};
use tokio::task::block_in_place;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use plant::*;

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
    /// The load average when the run began.
    load_at_start: String,
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
        // `pass-instant` is for iterating and profiling: it writes no report unless asked.
        None if quick || args.iter().any(|a| a == "pass-instant") => None,
        None => Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md")),
    };
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => Some(
            args.get(i + 1)
                .ok_or("--only needs bus, plan, footprint, pass, agent, link or pipeline")?
                .clone(),
        ),
        None => None,
    };
    const OPTIONS: [&str; 6] = ["--quick", "--out", "--only", "--duration", "--cut-every", "--cut-for"];
    if let Some(bad) = args.iter().find(|a| a.starts_with("--") && !OPTIONS.contains(&a.as_str())) {
        return Err(format!(
            "unknown option {bad}; use --quick, --only bus|plan|footprint|pass|pass-instant|agent|link|pipeline|soak, --out FILE, \
             --duration D, --cut-every D, --cut-for D"
        )
        .into());
    }
    let duration_arg = |name: &str, default: Duration| -> Result<Duration, BoxError> {
        match args.iter().position(|a| a == name) {
            Some(i) => {
                let v = args.get(i + 1).ok_or_else(|| format!("{name} needs a duration such as 30m"))?;
                Ok(humantime::parse_duration(v).map_err(|e| format!("{name} {v}: {e}"))?)
            }
            None => Ok(default),
        }
    };
    if only.as_deref() == Some("soak") {
        let opts = soak::SoakOptions {
            duration: duration_arg("--duration", Duration::from_secs(3600))?,
            sample: Duration::from_secs(60),
            cut_every: duration_arg("--cut-every", Duration::from_secs(300))?,
            cut_for: duration_arg("--cut-for", Duration::from_secs(30))?,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let load_at_start = loadavg();
        let fig = runtime.block_on(soak::soak(&opts))?;
        let section = soak_section(&fig, &load_at_start);
        print!("{section}");
        if let Some(path) = out {
            let old = std::fs::read_to_string(&path).unwrap_or_default();
            let kept = old.split(SOAK_BEGIN).next().unwrap_or_default().trim_end().to_string();
            // What follows the soak section (hand-written analyses) stays.
            let tail = old.find(SOAK_END).map_or("", |at| &old[at + SOAK_END.len()..]);
            std::fs::write(&path, format!("{kept}\n\n{section}{tail}"))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            eprintln!("bench: wrote the soak section of {}", path.display());
        }
        return Ok(());
    }
    let settings = if quick {
        Settings {
            quick,
            runs: 1,
            window: Duration::from_secs(1),
            warmup: Duration::from_millis(300),
            cpu_window: Duration::from_secs(2),
            load_at_start: loadavg(),
        }
    } else {
        Settings {
            quick,
            runs: 7,
            window: Duration::from_secs(2),
            warmup: Duration::from_secs(1),
            cpu_window: Duration::from_secs(10),
            load_at_start: loadavg(),
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        // The gateway's and simulators' logs, for looking into a surprising figure.
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = StdInstant::now();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    // Each figure starts on a settled machine: the processes and sockets of the one
    // before are gone (an agent-mode run right after pass-through came out 30% low).
    let settle = || {
        if !quick {
            std::thread::sleep(Duration::from_secs(5));
        }
    };
    let mut figures = Vec::new();
    if wanted("bus") {
        eprintln!("bench: bus efficiency ...");
        figures.push(runtime.block_on(line::bus_efficiency(&settings))?);
    }
    if wanted("plan") {
        eprintln!("bench: request planning ...");
        figures.push(planning::request_planning());
    }
    if wanted("footprint") {
        settle();
        eprintln!("bench: footprint ...");
        figures.push(runtime.block_on(footprint::footprint(&settings))?);
    }
    // `--only pass-instant`: the first like-for-like rows only, to iterate on (and profile)
    // the relay's own cost.
    let instant_only = only.as_deref() == Some("pass-instant");
    if wanted("pass") || instant_only {
        settle();
        eprintln!("bench: modbus-tcp pass-through ...");
        figures.push(runtime.block_on(passthrough::pass_through(&settings, instant_only))?);
    }
    if wanted("agent") {
        settle();
        eprintln!("bench: agent mode ...");
        figures.push(runtime.block_on(agent::agent_mode(&settings))?);
    }
    if wanted("pipeline") {
        settle();
        eprintln!("bench: modbus-tcp device bus, max_in_flight ...");
        figures.push(runtime.block_on(pipeline::pipelining(&settings))?);
    }
    if wanted("link") {
        settle();
        eprintln!("bench: peer link ...");
        figures.push(peerlink::peer_link(&settings)?);
    }
    let mut report = render(&settings, &figures, started.elapsed());
    print!("{report}");
    if let Some(path) = out {
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        if only.is_some() && !quick && old.contains("## Summary") {
            // A figure measured alone replaces its own section and summary rows only.
            report = update(&old, &figures, &settings.load_at_start);
        } else if let Some(at) = old.find(SOAK_BEGIN) {
            // The soak section is written only by a soak run: keep it.
            report = format!("{}\n\n{}", report.trim_end(), &old[at..]);
        }
        std::fs::write(&path, &report).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

/// The report `old` with each of `figures` measured again: its `## title` section
/// replaced (or added before the soak section), and in the summary the rows whose first
/// word is that of one of its verdicts replaced by its verdicts. The section says it was
/// measured alone, and how busy the machine was then.
fn update(old: &str, figures: &[Figure], load_at_start: &str) -> String {
    let mut doc = old.to_string();
    for f in figures {
        let mut section = f.markdown();
        let _ = write!(
            section,
            "\nThis figure was measured alone (`--only`, full windows); load average (1, 5, 15 min) \
             at its start: {load_at_start}. The machine section above is from the last full run.\n\n"
        );
        let head = format!("## {}\n", f.title);
        match doc.find(&head) {
            Some(start) => {
                let rest = &doc[start + head.len()..];
                let end = [rest.find("\n## "), rest.find(SOAK_BEGIN)]
                    .into_iter()
                    .flatten()
                    .min()
                    .map_or(doc.len(), |e| start + head.len() + e + 1);
                doc.replace_range(start..end, &section);
            }
            None => {
                let at = doc.find(SOAK_BEGIN).unwrap_or(doc.len());
                doc.insert_str(at, &section);
            }
        }
        let first_word = |s: &str| s.split([' ', ',']).next().unwrap_or_default().to_string();
        let keys: Vec<String> = f.verdicts.iter().map(|v| first_word(&v.0)).collect();
        let rows: Vec<String> = f
            .verdicts
            .iter()
            .map(|(what, got, target, met)| {
                let verdict = match (target.as_str(), met) {
                    ("reported", _) => "-",
                    (_, true) => "met",
                    (_, false) => "**missed**",
                };
                format!("| {what} | {got} | {target} | {verdict} |")
            })
            .collect();
        let Some(summary) = doc.find("## Summary\n") else { continue };
        let mut lines: Vec<String> = doc[summary..].lines().map(String::from).collect();
        // The table: from its header to the first line that is not a row.
        let Some(top) = lines.iter().position(|l| l.starts_with("| figure")) else { continue };
        let bottom = lines[top..].iter().position(|l| !l.starts_with('|')).map_or(lines.len(), |n| top + n);
        let ours = |l: &String| keys.contains(&first_word(l.trim_start_matches("| ")));
        let at = lines[top + 2..bottom].iter().position(ours).map_or(bottom, |n| top + 2 + n);
        let kept: Vec<String> = lines[top + 2..bottom].iter().filter(|l| !ours(l)).cloned().collect();
        let before = kept.iter().take_while(|l| lines[top + 2..at].contains(l)).count();
        let mut table = kept[..before].to_vec();
        table.extend(rows);
        table.extend_from_slice(&kept[before..]);
        lines.splice(top + 2..bottom, table);
        doc = format!("{}{}\n", &doc[..summary], lines.join("\n"));
    }
    doc
}

/// Where the soak run's section of the report begins; a full run keeps everything from
/// here to the end of the file.
const SOAK_BEGIN: &str = "<!-- soak -->";
/// Where the soak run's section ends: hand-written sections after it are kept by both.
const SOAK_END: &str = "<!-- /soak -->";

/// The soak run's section: its own verdicts, then its table.
fn soak_section(fig: &Figure, load_at_start: &str) -> String {
    let mut out = format!("{SOAK_BEGIN}\n");
    out += &fig.markdown();
    let _ = write!(out, "\nLoad average (1, 5, 15 min) at the start: {load_at_start}.\n\n");
    let rows: Vec<Vec<String>> = fig
        .verdicts
        .iter()
        .map(|(what, got, target, met)| {
            vec![what.clone(), got.clone(), target.clone(), if *met { "met" } else { "**missed**" }.into()]
        })
        .collect();
    out += &table(&["soak", "measured", "target", ""], &rows);
    out += "\n";
    out += SOAK_END;
    out
}

/// The 1, 5 and 15 minute load averages: how busy the machine was with other work.
fn loadavg() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn machine(load_at_start: &str) -> Vec<(String, String)> {
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
    vec![
        ("load average (1, 5, 15 min) at the start".into(), load_at_start.into()),
        ("load average (1, 5, 15 min) at the end".into(), loadavg()),
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
         after each request and a fixed 2 ms device turnaround, except where a figure says\n\
         its device answers at once (the Modbus-TCP figures). The anchor, modbus-relay, is\n\
         installed into `target/tools` by `cargo install` on the first run (on Debian it needs\n\
         `apt-get install libudev-dev pkg-config`).\n\n",
    );
    out += "## Machine\n\n";
    let rows: Vec<Vec<String>> =
        machine(&settings.load_at_start).into_iter().map(|(k, v)| vec![k, v]).collect();
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
            let verdict = match (target.as_str(), met) {
                ("reported", _) => "-",
                (_, true) => "met",
                (_, false) => "**missed**",
            };
            vec![what.clone(), got.clone(), target.clone(), verdict.into()]
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
