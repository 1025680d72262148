//! The m2m-gateway command line: argument parsing, logging, signals and exit codes.
//! Everything else lives in the library.
//!
//! This file is the entry: `main` (logging, the runtime, exit codes) and `run` (the
//! gateway until a signal, SIGHUP reloads). Its binary-only modules, under `src/main/`:
//! [`cli`], what the command line accepts (clap definitions and value parsers), and
//! [`tools`], every other command (`check`, `poll`, `simulate`, ...) run to its exit code.
#![forbid(unsafe_code)]

#[path = "main/cli.rs"]
mod cli;
#[path = "main/tools.rs"]
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use m2m_gateway::model::LogFormat;
use m2m_gateway::{config, gateway::Gateway, service, sockets::Sockets};

use cli::{Cli, CliLogFormat, Command, Tool};

/// Exit code for a configuration that does not validate.
const EXIT_CONFIG: u8 = 2;

/// What `main` runs: the gateway with its configuration loaded (before the runtime, whose
/// threads and logging it sets), or another command.
enum Job {
    Run {
        config: PathBuf,
        pid_file: Option<PathBuf>,
        model: Box<m2m_gateway::model::Model>,
        sockets: Sockets,
        /// Why descriptors named by `LISTEN_FDS` were not taken (logged once logging is up).
        ignored: Option<String>,
    },
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
        Command::Run { config, pid_file } => {
            // Sockets systemd holds for us (socket activation): read before any thread
            // starts, since reading unsets LISTEN_FDS and LISTEN_PID.
            let (sockets, ignored) = match Sockets::from_env() {
                Ok(handed) => handed,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match load_for_run(&config) {
                Ok(model) => Job::Run { config, pid_file, model: Box::new(model), sockets, ignored },
                Err(code) => return code,
            }
        }
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
        Job::Run { config, pid_file, model, sockets, ignored } => {
            if let Some(why) = ignored {
                tracing::warn!("{why}");
            }
            runtime.block_on(run(&config, *model, sockets, pid_file.as_deref()))
        }
        Job::Tool(tool) => runtime.block_on(tools::dispatch(tool)),
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
    sockets: Sockets,
    pid_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let watchdog = service::init();
    let shutdown = shutdown_on_signals()?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut gateway = Gateway::start_on(&model, sockets, shutdown.clone())?;
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
