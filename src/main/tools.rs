//! Every command but `run`, from its parsed arguments to its exit code: `reload` (a
//! SIGHUP), `check`, `poll` (Modbus or raw, repeated), `keygen`, `simulate`, the clients
//! of a running gateway (`status`, `read`, `write`, `trace`) and `demo`. The work itself
//! is the library's (`m2m_gateway::tools` and the modules it names); this file only
//! turns flags into its calls and prints what they return.
//!
//! A result goes to stdout, an error (returned to `main`) to stderr as `error: ...`; a
//! configuration that does not validate exits with `EXIT_CONFIG` (2), any other failure
//! with 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use m2m_gateway::model::{Line, Protocol};
use m2m_gateway::poll::plan;
use m2m_gateway::serial::framing::ModbusSerial;
use m2m_gateway::sim;
use m2m_gateway::tools::commission::{self, Poll, PollSpec};
use m2m_gateway::tools::remote;

use super::cli::{CliEnd, PollArgs, TargetArgs, Tool};
use super::{load, load_for_run, shutdown_on_signals};

impl TargetArgs {
    fn client(self) -> anyhow::Result<m2m_gateway::http::client::Client> {
        let target = remote::Target { url: self.url, config: self.config, token_file: self.token_file };
        Ok(target.client()?)
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

pub(super) async fn dispatch(tool: Tool) -> anyhow::Result<ExitCode> {
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
