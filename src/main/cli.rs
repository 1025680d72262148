//! What the command line accepts: the clap definitions of every command, its flags and
//! their help text, and the value parsers they use (durations, names from the one table
//! of each type). Parsing only: `main` runs `run`, and `tools` runs the other commands.
//!
//! The help text is these items' doc comments: changing one changes `--help`. `Cli` has
//! none on purpose: its `about` is explicit, and a doc comment would change `--help` too.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use m2m_gateway::config;
use m2m_gateway::model::Parity;
use m2m_gateway::point::names::{self, Named};
use m2m_gateway::point::value::{DataType, Table, WordOrder};
use m2m_gateway::serial::framing::ModbusSerial;

#[derive(Parser)]
#[command(name = "m2m-gateway", version, about = "Point-to-point machine-to-machine gateway")]
pub(super) struct Cli {
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(super) verbose: u8,
    /// Log lines as text or as one JSON object each (default: [gateway] log_format, else
    /// text). Under systemd (JOURNAL_STREAM set) text lines carry no timestamp: journald
    /// adds its own. NO_COLOR, or output that is not a terminal, turns colours off.
    #[arg(long, global = true, value_enum)]
    pub(super) log_format: Option<CliLogFormat>,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Subcommand)]
pub(super) enum Command {
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
pub(super) enum Tool {
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
pub(super) struct TargetArgs {
    /// The gateway's HTTP endpoint, like http://127.0.0.1:8502 (default: from --config,
    /// else http://127.0.0.1:8502).
    #[arg(long)]
    pub(super) url: Option<String>,
    /// The gateway's configuration: its [http] listen address and token_file.
    #[arg(short, long)]
    pub(super) config: Option<PathBuf>,
    /// A file holding the access token (default: the config's [http] token_file).
    #[arg(long)]
    pub(super) token_file: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum CliLogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum CliEnd {
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
pub(super) struct PollArgs {
    /// Serial device path, `tcp://host:port` of a serial device server, or
    /// `modbus-tcp://host:port` of a Modbus-TCP device (read by the gateway's own bus
    /// engine, as a `[[bus]]` with that port would).
    #[arg(long, required_unless_present = "tcp")]
    pub(super) port: Option<String>,
    /// Field protocol on a serial port (or behind a `tcp://` device server); a
    /// `modbus-tcp://` port speaks Modbus-TCP. Raw devices: see --raw.
    #[arg(long, value_parser = named(names::all::<ModbusSerial>()), default_value = "rtu")]
    pub(super) protocol: ModbusSerial,
    /// Read over Modbus-TCP from this host:port instead of a serial port (e.g. the
    /// gateway's own server: --tcp 127.0.0.1:5020).
    #[arg(long, conflicts_with_all = ["port", "raw", "raw_hex"])]
    pub(super) tcp: Option<String>,
    /// Baud rate.
    #[arg(long, default_value_t = 19200)]
    pub(super) baud: u32,
    /// Parity.
    #[arg(long, value_parser = named(names::all::<Parity>()), default_value = "even")]
    pub(super) parity: Parity,
    /// Stop bits.
    #[arg(long, default_value_t = 1)]
    pub(super) stop_bits: u8,
    /// Unit id (1..=247 on a serial line; 0..=255 with --tcp).
    #[arg(long, value_parser = clap::value_parser!(u8), required_unless_present_any = ["raw", "raw_hex"])]
    pub(super) unit: Option<u8>,
    /// Send this raw request instead of a Modbus read (escapes \r \n \t \0 \\ \xHH) and
    /// print the reply in hex and text.
    #[arg(long, conflicts_with_all = ["raw_hex", "unit"])]
    pub(super) raw: Option<String>,
    /// Send these raw bytes (hex, e.g. "01 52 81 DD") instead of a Modbus read.
    #[arg(long, conflicts_with = "unit")]
    pub(super) raw_hex: Option<String>,
    /// How a raw reply ends.
    #[arg(long, value_enum, default_value = "terminator")]
    pub(super) end: CliEnd,
    /// The end marker of a raw reply, with escapes (--end terminator).
    #[arg(long, default_value = "\\r\\n")]
    pub(super) terminator: String,
    /// Total raw reply length in bytes (--end fixed).
    #[arg(long)]
    pub(super) length: Option<usize>,
    /// Line silence that ends a raw reply (--end silence).
    #[arg(long, default_value = "20ms", value_parser = duration)]
    pub(super) silence: Duration,
    /// Data bits (7 for some ASCII devices).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(7..=8))]
    pub(super) data_bits: u8,
    /// Table to read.
    #[arg(long, value_parser = named(names::all::<Table>()), default_value = "holding")]
    pub(super) table: Table,
    /// First address (zero-based, as on the wire).
    #[arg(long, default_value_t = 0)]
    pub(super) address: u16,
    /// Number of values.
    #[arg(long, default_value_t = 1)]
    pub(super) count: u16,
    /// Decode registers as this type.
    #[arg(long = "type", value_parser = named(names::all_where(|t| !matches!(t, DataType::Bit(_) | DataType::Str(_)))), default_value = "u16")]
    pub(super) data_type: DataType,
    /// Word/byte order of multi-register types.
    #[arg(long, value_parser = named(names::all::<WordOrder>()), default_value = "abcd")]
    pub(super) order: WordOrder,
    /// Multiply numbers by this.
    #[arg(long, default_value_t = 1.0)]
    pub(super) scale: f64,
    /// Response timeout.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub(super) timeout: Duration,
    /// Retries after a timeout.
    #[arg(long, default_value_t = 0)]
    pub(super) retries: u8,
    /// The adapter echoes what is sent (2-wire RS-485 without echo suppression).
    #[arg(long)]
    pub(super) local_echo: bool,
    /// Read this many times (0 = until Ctrl-C).
    #[arg(long, default_value_t = 1)]
    pub(super) repeat: u32,
    /// Pause between repeated reads.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub(super) interval: Duration,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub(super) json: bool,
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
