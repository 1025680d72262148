//! The m2m-gateway command line: argument parsing, logging, signals and exit codes.
//! Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use m2m_gateway::model::{Line, LogFormat, Parity, Protocol};
use m2m_gateway::point::names::{self, Named};
use m2m_gateway::point::value::{DataType, Table, WordOrder};
use m2m_gateway::poll::plan;
use m2m_gateway::serial::framing::ModbusSerial;
use m2m_gateway::tools::commission::{self, Poll, PollSpec};
use m2m_gateway::tools::remote;
use m2m_gateway::{config, gateway::Gateway, service, sim};

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(name = "m2m-gateway", version, about = "Point-to-point machine-to-machine gateway")]
struct Cli {
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log lines as text or as one JSON object each (default: [gateway] log_format, else
    /// text). Under systemd (JOURNAL_STREAM set) text lines carry no timestamp: journald
    /// adds its own. NO_COLOR, or output that is not a terminal, turns colours off.
    #[arg(long, global = true, value_enum)]
    log_format: Option<CliLogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. SIGHUP reloads the configuration file; SIGTERM or SIGINT stop.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Write the process id to this file (removed at exit), for `reload --pid-file`.
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    #[command(flatten)]
    Tool(Tool),
}

/// Every command but `run`: they need no configured runtime (see `main`).
#[derive(Subcommand)]
enum Tool {
    /// Tell a running gateway to reload its configuration (sends it SIGHUP). Under
    /// systemd, `systemctl reload m2m-gateway` does the same.
    Reload {
        /// The gateway's process id.
        #[arg(long, conflicts_with = "pid_file", required_unless_present = "pid_file")]
        pid: Option<i32>,
        /// A file holding the gateway's process id (`run --pid-file`).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Validate a configuration (and the files it includes) and what `run` needs from this
    /// machine (identity, data directory, spools); show the polling plan and bus load.
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Also write each virtual unit's register map as `DIR/unit-<id>.csv`, a tag list
        /// to import into the SCADA (the directory is created if missing).
        #[arg(long, value_name = "DIR")]
        map_csv: Option<PathBuf>,
    },
    /// Read registers or bits from one device, for commissioning (like mbpoll).
    Poll(PollArgs),
    /// Create this gateway's identity (cert.pem, key.pem) and print its fingerprint.
    Keygen {
        /// Directory for cert.pem and key.pem (created with mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// Replace an existing key (peers pinning the old fingerprint must be updated).
        #[arg(long)]
        force: bool,
    },
    /// Serve simulated field devices on a virtual serial pair (or a real port).
    Simulate {
        /// Simulation file (see docs/SIMULATOR.md); without it, --units makes a quick one.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Unit ids for the quick simulation.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        units: Vec<u8>,
        /// Registers per table per unit in the quick simulation.
        #[arg(long, default_value_t = 100)]
        registers: u16,
        /// Also make this symlink to the virtual port (like /dev/serial/by-id/...).
        #[arg(long)]
        link: Option<PathBuf>,
        /// Serve a real serial port instead of a virtual pair.
        #[arg(long, conflicts_with = "link")]
        device: Option<PathBuf>,
        /// Serve the units as Modbus-TCP devices on this address instead (port 0: any
        /// free port; the address bound is printed), for `modbus-tcp://` buses.
        #[arg(long, conflicts_with_all = ["link", "device"])]
        tcp: Option<std::net::SocketAddr>,
    },
    /// Show a running gateway's health: buses, devices, peers, PLCs, tunnels, server.
    Status {
        #[command(flatten)]
        target: TargetArgs,
        /// Print the JSON of /api/v1/status.
        #[arg(long)]
        json: bool,
    },
    /// Show the values of a running gateway's points (value, unit, quality, age).
    Read {
        /// Point glob, like 'boiler.*' (default: every point).
        #[arg(default_value = "*")]
        glob: String,
        /// Keep printing every change until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Print JSON lines, one per point.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Write a value into a point of a running gateway: only points an [[http.grant]]
    /// covers, within its limits, with the access token.
    Write {
        /// The point, like boiler.setpoint.
        point: String,
        /// The value: a number, or true/false.
        #[arg(allow_hyphen_values = true)]
        value: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Watch a running gateway's traffic on one bus, like a Modbus sniffer: one line per
    /// frame (time, direction, hex bytes, summary, verdict) until Ctrl-C.
    Trace {
        /// The bus, as named in the gateway's configuration.
        #[arg(long)]
        bus: String,
        /// Print each frame as a JSON line.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Run a configuration against simulated devices on virtual serial pairs and show
    /// the live values. No hardware needed.
    Demo {
        /// Configuration file.
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// How long to run (0 = until Ctrl-C).
        #[arg(long = "for", default_value = "15s", value_parser = duration)]
        duration: Duration,
        /// How often to print the values.
        #[arg(long, default_value = "2s", value_parser = duration)]
        every: Duration,
    },
}

/// Where a running gateway's HTTP endpoint is.
#[derive(Args)]
struct TargetArgs {
    /// The gateway's HTTP endpoint, like http://127.0.0.1:8502 (default: from --config,
    /// else http://127.0.0.1:8502).
    #[arg(long)]
    url: Option<String>,
    /// The gateway's configuration: its [http] listen address and token_file.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// A file holding the access token (default: the config's [http] token_file).
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl TargetArgs {
    fn client(self) -> anyhow::Result<m2m_gateway::http::client::Client> {
        let target = remote::Target { url: self.url, config: self.config, token_file: self.token_file };
        Ok(target.client()?)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum CliLogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum CliEnd {
    Terminator,
    Fixed,
    Silence,
}

/// A value parser for one of `allowed`, by the names of its type's one table; clap lists
/// them as possible values, as it did for a `ValueEnum`.
fn named<T: Named + Send + Sync>(allowed: Vec<T>) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::{PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(allowed.iter().map(|v| v.name()).collect::<Vec<_>>())
        .try_map(move |name| names::parse_among(&name, &allowed))
}

#[derive(Args)]
struct PollArgs {
    /// Serial device path, `tcp://host:port` of a serial device server, or
    /// `modbus-tcp://host:port` of a Modbus-TCP device (read by the gateway's own bus
    /// engine, as a `[[bus]]` with that port would).
    #[arg(long, required_unless_present = "tcp")]
    port: Option<String>,
    /// Field protocol on a serial port (or behind a `tcp://` device server); a
    /// `modbus-tcp://` port speaks Modbus-TCP. Raw devices: see --raw.
    #[arg(long, value_parser = named(names::all::<ModbusSerial>()), default_value = "rtu")]
    protocol: ModbusSerial,
    /// Read over Modbus-TCP from this host:port instead of a serial port (e.g. the
    /// gateway's own server: --tcp 127.0.0.1:5020).
    #[arg(long, conflicts_with_all = ["port", "raw", "raw_hex"])]
    tcp: Option<String>,
    /// Baud rate.
    #[arg(long, default_value_t = 19200)]
    baud: u32,
    /// Parity.
    #[arg(long, value_parser = named(names::all::<Parity>()), default_value = "even")]
    parity: Parity,
    /// Stop bits.
    #[arg(long, default_value_t = 1)]
    stop_bits: u8,
    /// Unit id (1..=247 on a serial line; 0..=255 with --tcp).
    #[arg(long, value_parser = clap::value_parser!(u8), required_unless_present_any = ["raw", "raw_hex"])]
    unit: Option<u8>,
    /// Send this raw request instead of a Modbus read (escapes \r \n \t \0 \\ \xHH) and
    /// print the reply in hex and text.
    #[arg(long, conflicts_with_all = ["raw_hex", "unit"])]
    raw: Option<String>,
    /// Send these raw bytes (hex, e.g. "01 52 81 DD") instead of a Modbus read.
    #[arg(long, conflicts_with = "unit")]
    raw_hex: Option<String>,
    /// How a raw reply ends.
    #[arg(long, value_enum, default_value = "terminator")]
    end: CliEnd,
    /// The end marker of a raw reply, with escapes (--end terminator).
    #[arg(long, default_value = "\\r\\n")]
    terminator: String,
    /// Total raw reply length in bytes (--end fixed).
    #[arg(long)]
    length: Option<usize>,
    /// Line silence that ends a raw reply (--end silence).
    #[arg(long, default_value = "20ms", value_parser = duration)]
    silence: Duration,
    /// Data bits (7 for some ASCII devices).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(7..=8))]
    data_bits: u8,
    /// Table to read.
    #[arg(long, value_parser = named(names::all::<Table>()), default_value = "holding")]
    table: Table,
    /// First address (zero-based, as on the wire).
    #[arg(long, default_value_t = 0)]
    address: u16,
    /// Number of values.
    #[arg(long, default_value_t = 1)]
    count: u16,
    /// Decode registers as this type.
    #[arg(long = "type", value_parser = named(names::all_where(|t| !matches!(t, DataType::Bit(_) | DataType::Str(_)))), default_value = "u16")]
    data_type: DataType,
    /// Word/byte order of multi-register types.
    #[arg(long, value_parser = named(names::all::<WordOrder>()), default_value = "abcd")]
    order: WordOrder,
    /// Multiply numbers by this.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Response timeout.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    timeout: Duration,
    /// Retries after a timeout.
    #[arg(long, default_value_t = 0)]
    retries: u8,
    /// The adapter echoes what is sent (2-wire RS-485 without echo suppression).
    #[arg(long)]
    local_echo: bool,
    /// Read this many times (0 = until Ctrl-C).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Pause between repeated reads.
    #[arg(long, default_value = "1s", value_parser = duration)]
    interval: Duration,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

/// A duration argument ("500ms", "2s"), at most the longest duration a config may hold,
/// so that deadlines computed from it cannot overflow.
fn duration(text: &str) -> Result<Duration, String> {
    use config::duration::{self, DurationError};
    duration::parse(text, Duration::ZERO..=config::MAX_DURATION).map_err(|e| match e {
        DurationError::Above { max, .. } => {
            format!("{text} is above the maximum of {}", humantime::format_duration(max))
        }
        other => other.to_string(),
    })
}

/// What `main` runs: the gateway with its configuration loaded (before the runtime, whose
/// threads and logging it sets), or another command.
enum Job {
    Run { config: PathBuf, pid_file: Option<PathBuf>, model: Box<m2m_gateway::model::Model> },
    Tool(Tool),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One-shot commands print their result; their info logs would only be noise.
    let quiet = matches!(
        cli.command,
        Command::Tool(
            Tool::Poll(_)
                | Tool::Check { .. }
                | Tool::Status { .. }
                | Tool::Read { .. }
                | Tool::Write { .. }
                | Tool::Trace { .. }
        )
    );
    // `run` reads its configuration first: it says how many threads the runtime has,
    // and how to log.
    let job = match cli.command {
        Command::Run { config, pid_file } => match load_for_run(&config) {
            Ok(model) => Job::Run { config, pid_file, model: Box::new(model) },
            Err(code) => return code,
        },
        Command::Tool(tool) => Job::Tool(tool),
    };
    let model = match &job {
        Job::Run { model, .. } => Some(model),
        Job::Tool(_) => None,
    };
    let format = match cli.log_format {
        Some(CliLogFormat::Text) => LogFormat::Text,
        Some(CliLogFormat::Json) => LogFormat::Json,
        None => model.as_ref().map_or(LogFormat::Text, |m| m.gateway.log_format),
    };
    init_logging(cli.verbose, quiet, format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = model.as_ref().and_then(|m| m.gateway.worker_threads) {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match job {
        Job::Run { config, pid_file, model } => runtime.block_on(run(&config, *model, pid_file.as_deref())),
        Job::Tool(tool) => runtime.block_on(dispatch(tool)),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: most error messages here already
/// include their cause's text (`identity in …: key.pem: No such file …`), and `{:#}` would
/// repeat it after each.
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// How log lines look: with timestamps (not under journald, which adds its own) and with
/// colours (only on a terminal, and not when NO_COLOR is set to anything but "").
fn log_style(journal: bool, tty: bool, no_color: Option<&std::ffi::OsStr>) -> (bool, bool) {
    let timestamps = !journal;
    let ansi = tty && no_color.is_none_or(|v| v.is_empty());
    (timestamps, ansi)
}

fn init_logging(verbose: u8, quiet: bool, format: LogFormat) {
    let default = match verbose {
        0 if quiet => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let (timestamps, ansi) = log_style(
        std::env::var_os("JOURNAL_STREAM").is_some(),
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match (format, timestamps) {
        // JSON keeps its timestamp under journald too: collectors read it from the object.
        (LogFormat::Json, _) => builder.json().with_ansi(false).flatten_event(true).init(),
        (LogFormat::Text, true) => builder.with_ansi(ansi).init(),
        (LogFormat::Text, false) => builder.with_ansi(ansi).without_time().init(),
    }
}

/// A token cancelled by the first SIGINT or SIGTERM.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        t.cancel();
    });
    Ok(token)
}

fn load(path: &std::path::Path) -> Result<m2m_gateway::model::Model, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The configuration as `run` takes it: valid, and its identity, data directory and
/// spool files usable on this machine. `check` uses the same, so it accepts exactly
/// what `run` will start with (short of opening devices and sockets).
fn load_for_run(path: &std::path::Path) -> Result<m2m_gateway::model::Model, ExitCode> {
    config::load_for_run(path, &m2m_gateway::gateway::Preflight).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// How often the status line for the service manager is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Longest wait for every bus to try its port before telling systemd we are ready.
const READY_WAIT: Duration = Duration::from_secs(5);

/// `run`: the gateway, until Ctrl-C or SIGTERM; SIGHUP reloads `path`.
async fn run(
    path: &std::path::Path,
    model: m2m_gateway::model::Model,
    pid_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let watchdog = service::init();
    let shutdown = shutdown_on_signals()?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut gateway = Gateway::start(&model, shutdown.clone())?;
    let _pid = match pid_file {
        Some(p) => Some(PidFile::write(p)?),
        None => None,
    };
    let until = tokio::time::Instant::now() + READY_WAIT;
    while !gateway.buses_tried() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    service::ready(&gateway.status());
    let pinger = watchdog.map(|every| tokio::spawn(service::watchdog(every, shutdown.clone())));
    let mut status = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                service::reloading();
                reload(&mut gateway, path).await;
                service::ready(&gateway.status());
            }
            _ = status.tick() => service::status(&gateway.status()),
            () = shutdown.cancelled() => break,
        }
    }
    service::stopping();
    gateway.shutdown(Duration::from_secs(1)).await;
    if let Some(p) = pinger {
        let _ = p.await;
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: reads and validates `path`; applies it when valid, else logs every error
/// and keeps the running configuration.
async fn reload(gateway: &mut Gateway, path: &std::path::Path) {
    info!("SIGHUP: reloading the configuration from {}", path.display());
    let model = match config::load_for_run(path, &m2m_gateway::gateway::Preflight) {
        Ok(model) => model,
        Err(e) => {
            for line in e.to_string().lines() {
                error!("{line}");
            }
            error!("reload refused: the configuration has errors (above); the running configuration is kept");
            return;
        }
    };
    match gateway.reload(&model).await {
        Ok(changes) if changes.is_empty() => info!("reload: nothing changed"),
        Ok(changes) => {
            for what in &changes.added {
                info!("reload: added {what}");
            }
            for what in &changes.removed {
                info!("reload: removed {what}");
            }
            for what in &changes.restarted {
                info!("reload: restarted {what}");
            }
            for what in &changes.updated {
                info!("reload: updated {what}");
            }
            info!(
                added = changes.added.len(),
                removed = changes.removed.len(),
                restarted = changes.restarted.len(),
                "reload done; everything else kept running"
            );
        }
        Err(e) => error!("reload refused: {e}; the running configuration is kept"),
    }
}

/// The pid file of `run --pid-file`, removed when dropped.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &std::path::Path) -> anyhow::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing the pid file {}", path.display()))?;
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `reload`: SIGHUP to the gateway's process.
fn send_reload(pid: Option<i32>, pid_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let pid = match (pid, pid_file) {
        (Some(pid), _) => pid,
        (None, Some(file)) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading the pid file {}", file.display()))?;
            text.trim()
                .parse()
                .with_context(|| format!("{}: not a process id: {:?}", file.display(), text.trim()))?
        }
        (None, None) => anyhow::bail!("--pid or --pid-file is required"),
    };
    let target = rustix::process::Pid::from_raw(pid).with_context(|| format!("{pid} is not a process id"))?;
    rustix::process::kill_process(target, rustix::process::Signal::HUP)
        .with_context(|| format!("sending SIGHUP to process {pid}"))?;
    println!("asked process {pid} to reload its configuration (its log says what changed)");
    Ok(ExitCode::SUCCESS)
}

async fn dispatch(tool: Tool) -> anyhow::Result<ExitCode> {
    match tool {
        Tool::Reload { pid, pid_file } => send_reload(pid, pid_file),
        Tool::Check { config, map_csv } => {
            let model = match load_for_run(&config) {
                Ok(m) => m,
                Err(code) => return Ok(code),
            };
            print!("{}", plan::render(&model, &plan::plan_model(&model)));
            print!("{}", plan::render_templated(&model));
            if let Some(server) = &model.server {
                print!("{}", m2m_gateway::server::describe_server(server));
            }
            for p in &model.plcs {
                print!("{}", m2m_gateway::plc::describe(p));
            }
            for v in model.server.iter().flat_map(|s| &s.virtual_units) {
                print!("{}", m2m_gateway::server::describe(v));
            }
            print!("{}", m2m_gateway::tools::maps::describe_received(&model));
            if let Some(links) = &model.links {
                print!("{}", m2m_gateway::link::tunnel::describe(&links.tunnels));
            }
            if let Some(dir) = map_csv {
                let written = m2m_gateway::tools::maps::write_tag_lists(&model, &dir)?;
                if written.is_empty() {
                    println!(
                        "no virtual unit ([[server.unit.map]]): no tag list written to {}",
                        dir.display()
                    );
                }
                for path in written {
                    println!("wrote {}", path.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Tool::Poll(args) => poll(args).await,
        Tool::Keygen { dir, force } => {
            let id = m2m_gateway::link::tls::keygen(&dir, force)?;
            println!("{}", id.fingerprint);
            Ok(ExitCode::SUCCESS)
        }
        Tool::Simulate { config, units, registers, link, device, tcp } => {
            let cfg = match config {
                Some(path) => sim::load(&path)?,
                None => sim::quick(&units, registers),
            };
            let shutdown = shutdown_on_signals()?;
            let sim = sim::Simulator::new(cfg);
            match (device, tcp) {
                (Some(dev), _) => {
                    sim.serve_device(&dev, shutdown, |p| {
                        println!("serving on {}", p.display());
                    })
                    .await?
                }
                (None, Some(addr)) => {
                    sim::run_tcp(sim, addr, shutdown, |a| {
                        use std::io::Write;
                        println!("modbus-tcp://{a}");
                        let _ = std::io::stdout().flush();
                    })
                    .await?
                }
                (None, None) => {
                    sim::run_virtual(sim, link.as_deref(), shutdown, |p| {
                        println!("{}", p.display());
                    })
                    .await?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Tool::Status { target, json } => {
            print!("{}", remote::status(&target.client()?, json).await?);
            Ok(ExitCode::SUCCESS)
        }
        Tool::Read { glob, watch, json, target } => {
            let client = target.client()?;
            if watch {
                let shutdown = shutdown_on_signals()?;
                let print = |text: &str| {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
                };
                remote::watch(&client, &glob, json, print, shutdown.cancelled_owned()).await?;
            } else {
                print!("{}", remote::read(&client, &glob, json).await?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Tool::Trace { bus, json, target } => {
            let client = target.client()?;
            let shutdown = shutdown_on_signals()?;
            let print = |text: &str| {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            };
            remote::trace(&client, &bus, json, print, shutdown.cancelled_owned()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Tool::Write { point, value, target } => {
            print!("{}", remote::write(&target.client()?, &point, &value).await?);
            Ok(ExitCode::SUCCESS)
        }
        Tool::Demo { config, duration, every } => {
            let model = match load(&config) {
                Ok(m) => m,
                Err(code) => return Ok(code),
            };
            let shutdown = shutdown_on_signals()?;
            let duration = if duration.is_zero() { Duration::MAX / 4 } else { duration };
            m2m_gateway::tools::demo::run(model, duration, every, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn poll(a: PollArgs) -> anyhow::Result<ExitCode> {
    let line = Line { baud: a.baud, data_bits: a.data_bits, parity: a.parity, stop_bits: a.stop_bits };
    if a.raw.is_some() || a.raw_hex.is_some() {
        return poll_raw(&a, line).await;
    }
    let unit = a.unit.context("--unit is required")?;
    let tcp_device = a.port.as_deref().is_some_and(|p| p.starts_with("modbus-tcp://"));
    let protocol = match a.protocol {
        _ if tcp_device => Protocol::ModbusTcp,
        framing => framing.protocol(),
    };
    if tcp_device && a.protocol == ModbusSerial::Ascii {
        anyhow::bail!("--protocol ascii: a modbus-tcp:// port speaks modbus-tcp");
    }
    if tcp_device && unit == 0 {
        anyhow::bail!("--unit 0: a modbus-tcp device is addressed as 1..=255 (0 would be a broadcast)");
    }
    if a.tcp.is_none() && !tcp_device && !(1..=247).contains(&unit) {
        anyhow::bail!("--unit {unit}: a serial unit id is 1..=247");
    }
    let spec = PollSpec {
        port: a.port.clone().or_else(|| a.tcp.clone()).unwrap_or_default(),
        line,
        protocol,
        unit,
        table: a.table,
        address: a.address,
        count: a.count,
        data_type: a.data_type,
        order: a.order,
        scale: a.scale,
        timeout: a.timeout,
        retries: a.retries,
        local_echo: a.local_echo,
    };
    spec.request()?;
    let shutdown = shutdown_on_signals()?;
    let poll = match &a.tcp {
        Some(addr) => Poll::connect_tcp(addr),
        None => Poll::open(&spec),
    };
    let outcome =
        repeat(&a, &shutdown, async || poll.read(&spec).await, |r| commission::render(&spec, r)).await;
    poll.close().await;
    outcome
}

/// Runs `read` `--repeat` times (0: until Ctrl-C), `--interval` apart, printing each
/// result (a JSON line with `--json`, else `render`'s text) and each error; fails when
/// any read did.
async fn repeat<R: serde::Serialize, E: std::fmt::Display>(
    a: &PollArgs,
    shutdown: &CancellationToken,
    mut read: impl AsyncFnMut() -> Result<R, E>,
    render: impl Fn(&R) -> String,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let mut n = 0u32;
    while a.repeat == 0 || n < a.repeat {
        if n > 0 {
            tokio::select! {
                () = tokio::time::sleep(a.interval) => {}
                () = shutdown.cancelled() => break,
            }
        }
        n += 1;
        match read().await {
            Ok(r) if a.json => println!("{}", serde_json::to_string(&r)?),
            Ok(r) => print!("{}", render(&r)),
            Err(e) => {
                failed = true;
                eprintln!("error: {e}");
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// `poll --raw`: one raw request, its reply in hex and text.
async fn poll_raw(a: &PollArgs, line: Line) -> anyhow::Result<ExitCode> {
    use m2m_gateway::serial::raw::{self, FrameEnd, FrameRule};
    let request = match (&a.raw, &a.raw_hex) {
        (Some(text), _) => raw::unescape(text).context("--raw")?,
        (None, Some(hex)) => raw::parse_hex(hex).context("--raw-hex")?,
        (None, None) => anyhow::bail!("--raw or --raw-hex is required"),
    };
    let end = match a.end {
        CliEnd::Terminator => FrameEnd::Terminator(raw::unescape(&a.terminator).context("--terminator")?),
        CliEnd::Fixed => FrameEnd::Fixed(a.length.context("--end fixed needs --length")?),
        CliEnd::Silence => FrameEnd::Silence,
    };
    let framing = FrameRule { start: None, end };
    framing.validate().context("reply framing")?;
    let spec = commission::RawSpec {
        port: a.port.clone().context("--port is required")?,
        line,
        request,
        framing,
        silence: a.silence,
        timeout: a.timeout,
    };
    let shutdown = shutdown_on_signals()?;
    repeat(a, &shutdown, async || commission::raw_once(&spec).await, commission::render_raw).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_chain_says_each_cause_once() {
        // What `run` printed for a missing key before: the OS error three times.
        let path = std::path::PathBuf::from("/x/key.pem");
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let tls = m2m_gateway::link::tls::TlsError::Io { path, source: io };
        let e = anyhow::Error::from(m2m_gateway::gateway::GatewayError::Identity {
            dir: "/x".into(),
            source: tls,
        });
        let shown = causes(&e);
        assert_eq!(shown.matches("entity not found").count(), 1, "{shown}");
        assert!(shown.starts_with("peer links: identity in /x: /x/key.pem: "), "{shown}");
        // A cause not already in the message is still shown.
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(causes(&e), "outer: inner");
    }

    #[test]
    fn log_style_follows_journald_no_color_and_the_terminal() {
        use std::ffi::OsStr;
        assert_eq!(log_style(false, true, None), (true, true));
        assert_eq!(log_style(true, true, None), (false, true), "journald: no timestamps");
        assert_eq!(log_style(false, false, None), (true, false), "not a terminal: no colours");
        assert_eq!(log_style(false, true, Some(OsStr::new("1"))), (true, false), "NO_COLOR");
        assert_eq!(log_style(false, true, Some(OsStr::new(""))), (true, true), "NO_COLOR empty: ignored");
    }
}
