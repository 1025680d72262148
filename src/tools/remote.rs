//! The command line against a running gateway, through its HTTP API: `status` (the
//! status page in the terminal), `read` (values with quality, age and unit; `--watch`
//! follows the change stream), `write` (an operator write, token required), `trace` (a
//! bus's traffic monitor, one line per frame, like a Modbus sniffer).
//!
//! Where the gateway is: `--url`, else the `[http]` section of `--config` (an unspecified
//! listen address such as 0.0.0.0 means this machine), else `http://127.0.0.1:8502`, the
//! default. The token comes from `--token-file`, else the config's `token_file`.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::config;
use crate::http::client::{Client, ClientError, Event};
use crate::http::{Overview, PointView};
use crate::point::value::Value;

/// Why a remote command could not run.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The configuration named could not be loaded.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// `[http] enabled = false` in the configuration.
    #[error("{0}: [http] is disabled (enabled = false): this gateway has no HTTP endpoint to ask")]
    Disabled(String),
    /// The token file cannot be read.
    #[error("token file {}: {source}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The request failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The value given to `write` is neither a number nor true/false.
    #[error("value {0:?}: give a number (55.5, -3) or true/false")]
    Value(String),
    /// The stream ended (the gateway stopped).
    #[error("the gateway closed the stream (stopped?)")]
    Ended,
}

/// Where to find the gateway, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `--url`.
    pub url: Option<String>,
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
}

impl Target {
    /// The client for this target.
    pub fn client(&self) -> Result<Client, RemoteError> {
        let mut token_file = self.token_file.clone();
        let url = match (&self.url, &self.config) {
            (Some(url), _) => url.clone(),
            (None, Some(path)) => {
                let model = config::load(path)?;
                let http = model.http.ok_or_else(|| RemoteError::Disabled(path.display().to_string()))?;
                if token_file.is_none() {
                    token_file = http.token_file.clone();
                }
                let mut addr = http.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                format!("http://{addr}")
            }
            (None, None) => format!("http://{}", config::http::LISTEN),
        };
        let token = token_file.as_deref().map(read_token).transpose()?;
        Ok(Client::new(&url, token)?)
    }
}

fn read_token(path: &Path) -> Result<String, RemoteError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| RemoteError::Token { path: path.to_owned(), source })?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// An age as an operator reads it: `now`, `12 s`, `5 min`, `3 h`, `2 d`.
pub fn age(seconds: Option<f64>) -> String {
    let Some(s) = seconds else {
        return "never".into();
    };
    match s {
        s if s < 1.0 => "now".into(),
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.0} h", s / 3600.0),
        s => format!("{:.0} d", s / 86_400.0),
    }
}

/// How long ago: `never`, `just now`, `12 s ago`.
fn ago(seconds: Option<f64>) -> String {
    match seconds {
        None => "never".into(),
        Some(s) if s < 1.0 => "just now".into(),
        s => format!("{} ago", age(s)),
    }
}

/// A byte count: `512 B`, `1.5 KiB`, `3.2 MiB`.
fn bytes(n: u64) -> String {
    match n {
        n if n < 1024 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
    }
}

/// The overview as text, one line per bus, device, peer, PLC, tunnel and the server.
pub fn render_status(s: &Overview) -> String {
    let mut out = String::new();
    let g = &s.gateway;
    let _ = writeln!(
        out,
        "{}  {}  up {}, version {}, {} points",
        g.name,
        g.health.to_uppercase(),
        age(Some(g.uptime_seconds)),
        g.version,
        g.points
    );
    for p in &g.problems {
        let _ = writeln!(out, "  ! {p}");
    }
    for b in &s.buses {
        let _ = writeln!(
            out,
            "bus {}  {} {}  load {:.1}%  {} transactions, {} timeouts, {} crc errors, {} framing errors, {} late replies, {} exceptions, {} queued",
            b.name,
            b.port,
            b.protocol,
            b.load_ratio * 100.0,
            b.transactions,
            b.timeouts,
            b.crc_errors,
            b.framing_errors,
            b.late_replies,
            b.exceptions,
            b.queued
        );
        for d in &b.devices {
            let state = if d.state == "up" { "up".to_string() } else { d.state.to_uppercase() };
            let _ = writeln!(
                out,
                "  {:<16} unit {:<3}  {:<6}  last answer {}",
                d.name,
                d.unit,
                state,
                ago(d.last_answer_age_seconds)
            );
        }
    }
    for p in &s.peers {
        let _ = writeln!(
            out,
            "peer {}  {}  spool {} batches ({} values, {}){}, last ack {}",
            p.name,
            if p.connected { "up" } else { "DOWN" },
            p.spool_pending_batches,
            p.spool_pending_values,
            bytes(p.spool_pending_bytes),
            p.spool_oldest_age_seconds.map_or(String::new(), |a| format!(", oldest {}", age(Some(a)))),
            ago(p.last_ack_age_seconds)
        );
    }
    for p in &s.plcs {
        let _ = writeln!(
            out,
            "plc {}  {}  {} values written, {} dropped, {} batches waiting",
            p.name,
            if p.connected { "up" } else { "DOWN" },
            p.values_written,
            p.values_dropped,
            p.spool_pending_batches
        );
    }
    for t in &s.tunnels {
        let _ = writeln!(
            out,
            "tunnel {}  port {}  sent {}, received {}, dropped {}",
            t.name,
            if t.port_open { "open" } else { "CLOSED" },
            bytes(t.sent_bytes),
            bytes(t.received_bytes),
            bytes(t.dropped_bytes)
        );
    }
    if let Some(v) = &s.server {
        let _ = writeln!(
            out,
            "server {}  {} masters connected, {} requests, {} exceptions",
            v.listen, v.connections, v.requests, v.exceptions
        );
    }
    out
}

/// A value as shown: numbers trimmed to 6 significant decimals, `-` for none.
fn value(v: Option<&Value>) -> String {
    match v {
        None => "-".into(),
        Some(Value::Float(x)) => {
            let s = format!("{x:.6}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        }
        Some(v) => v.to_string(),
    }
}

fn quality(p: &PointView) -> String {
    p.exception.as_ref().map_or_else(|| p.quality.replace('_', " "), |e| format!("exception {e}"))
}

/// Points as a table: name, value, unit, quality, age.
pub fn render_points(points: &[PointView]) -> String {
    let w = points.iter().map(|p| p.name.len()).max().unwrap_or(5).max(5);
    let mut out = format!("{:<w$}  {:>14}  {:<6}  {:<10}  {}\n", "POINT", "VALUE", "UNIT", "QUALITY", "AGE");
    for p in points {
        let _ = writeln!(
            out,
            "{:<w$}  {:>14}  {:<6}  {:<10}  {}",
            p.name,
            value(p.value.as_ref()),
            p.unit.as_deref().unwrap_or(""),
            quality(p),
            age(Some(p.age_seconds))
        );
    }
    out
}

/// One changed point as a line of `read --watch`.
pub fn render_change(p: &PointView) -> String {
    let unit = p.unit.as_deref().map_or(String::new(), |u| format!(" {u}"));
    format!("{}  {}  {}{unit}  {}", p.at, p.name, value(p.value.as_ref()), quality(p))
}

/// `m2m-gateway status`.
pub async fn status(client: &Client, json: bool) -> Result<String, RemoteError> {
    if json {
        return Ok(client.text("/api/v1/status").await? + "\n");
    }
    let s: Overview = client.get("/api/v1/status").await?;
    Ok(render_status(&s))
}

/// `text` percent-encoded for a URL path segment or query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

fn points_path(glob: &str) -> String {
    format!("?glob={}", encode(glob))
}

/// `m2m-gateway read GLOB`: the current values.
pub async fn read(client: &Client, glob: &str, json: bool) -> Result<String, RemoteError> {
    let points: Vec<PointView> = client.get(&format!("/api/v1/points{}", points_path(glob))).await?;
    if json {
        let mut out = String::new();
        for p in &points {
            out += &serde_json::to_string(p).map_err(|e| ClientError::Body(e.to_string()))?;
            out.push('\n');
        }
        return Ok(out);
    }
    Ok(render_points(&points))
}

/// `m2m-gateway read GLOB --watch`: the values, then every change, through `print`,
/// until the stream ends or `stop` resolves.
pub async fn watch(
    client: &Client,
    glob: &str,
    json: bool,
    mut print: impl FnMut(&str),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RemoteError> {
    let path = format!("/api/v1/points/stream{}", points_path(glob));
    follow(client, &path, stop, |Event { kind, data }| {
        let points: Vec<PointView> =
            serde_json::from_str(&data).map_err(|e| ClientError::Body(e.to_string()))?;
        if json {
            for p in &points {
                print(&(serde_json::to_string(p).map_err(|e| ClientError::Body(e.to_string()))? + "\n"));
            }
        } else if kind == "snapshot" {
            print(&render_points(&points));
        } else {
            for p in &points {
                print(&(render_change(p) + "\n"));
            }
        }
        Ok(())
    })
    .await
}

/// Follows the event stream at `path`, handing each event to `on_event`, until `stop`
/// resolves (`Ok`), the gateway ends the stream, or `on_event` fails.
async fn follow(
    client: &Client,
    path: &str,
    stop: impl std::future::Future<Output = ()>,
    mut on_event: impl FnMut(Event) -> Result<(), RemoteError>,
) -> Result<(), RemoteError> {
    let mut events = client.events(path).await?;
    tokio::pin!(stop);
    loop {
        let next = tokio::select! {
            // Cancel-safe: an event read half-way stays in the stream's buffer.
            e = events.next() => e?,
            () = &mut stop => return Ok(()),
        };
        let Some(Event { kind, data }) = next else {
            return Err(RemoteError::Ended);
        };
        on_event(Event { kind, data })?;
    }
}

/// One traffic frame as a sniffer line: time (UTC, microseconds), direction, hex bytes,
/// summary, verdict in words: `03:12:00.123456 tx 01 03 00 00 00 02 c4 0b  unit 1 read
/// holding 0+2  sent`.
pub fn render_frame(frame: &serde_json::Value) -> String {
    let text = |k: &str| frame.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let at = text("at");
    // RFC 3339: keep the time of day; the date only matters across midnight.
    let time = at.split_once('T').map_or(at, |(_, t)| t.trim_end_matches('Z'));
    let hex = text("bytes");
    let spaced: Vec<&str> = (0..hex.len()).step_by(2).filter_map(|i| hex.get(i..i + 2)).collect();
    let bytes = if spaced.is_empty() { "(no bytes)".to_string() } else { spaced.join(" ") };
    format!("{time} {} {bytes}  {}  {}", text("dir"), text("summary"), text("verdict").replace('_', " "))
}

/// `m2m-gateway trace --bus NAME`: the bus's traffic, one line (or, with `json`, one JSON
/// object) per frame, until `stop` or the gateway ends the stream.
pub async fn trace(
    client: &Client,
    bus: &str,
    json: bool,
    mut print: impl FnMut(&str),
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), RemoteError> {
    let path = format!("/api/v1/buses/{}/traffic", encode(bus));
    follow(client, &path, stop, |Event { kind, data }| {
        let value: serde_json::Value =
            serde_json::from_str(&data).map_err(|e| ClientError::Body(e.to_string()))?;
        match (kind.as_str(), json) {
            ("frame", true) => print(&format!("{value}\n")),
            ("frame", false) => print(&(render_frame(&value) + "\n")),
            ("lagged", true) => print(&format!("{}\n", serde_json::json!({ "lagged": value }))),
            ("lagged", false) => print(&format!(
                "-- {} frames missed: this terminal read too slowly --\n",
                value.get("missed").and_then(|m| m.as_u64()).unwrap_or(0)
            )),
            _ => {}
        }
        Ok(())
    })
    .await
}

/// The value of `write` as typed: a number or true/false (on/off).
pub fn parse_value(text: &str) -> Result<serde_json::Value, RemoteError> {
    let t = text.trim();
    match t.to_ascii_lowercase().as_str() {
        "true" | "on" => return Ok(serde_json::Value::Bool(true)),
        "false" | "off" => return Ok(serde_json::Value::Bool(false)),
        _ => {}
    }
    if let Ok(i) = t.parse::<i64>() {
        return Ok(i.into());
    }
    match t.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x.into()),
        _ => Err(RemoteError::Value(text.to_string())),
    }
}

/// `m2m-gateway write POINT VALUE`.
pub async fn write(client: &Client, point: &str, text: &str) -> Result<String, RemoteError> {
    let value = parse_value(text)?;
    let path = format!("/api/v1/points/{}", points_path(point).trim_start_matches("?glob="));
    let _: serde_json::Value = client.post(&path, &serde_json::json!({ "value": value })).await?;
    Ok(format!("{point} = {value} written\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_print_like_a_sniffer() {
        let frame = serde_json::json!({
            "at": "2026-12-07T03:12:00.123456Z", "dir": "rx", "bytes": "0183029a2b",
            "unit": 1, "summary": "unit 1 exception 0x02 illegal data address", "verdict": "crc_error"
        });
        assert_eq!(
            render_frame(&frame),
            "03:12:00.123456 rx 01 83 02 9a 2b  unit 1 exception 0x02 illegal data address  crc error"
        );
        let timeout = serde_json::json!({ "at": "2026-12-07T03:12:00Z", "dir": "rx", "bytes": "",
            "unit": 2, "summary": "unit 2 no reply", "verdict": "timeout" });
        assert_eq!(render_frame(&timeout), "03:12:00 rx (no bytes)  unit 2 no reply  timeout");
    }

    #[test]
    fn values_and_ages() {
        assert_eq!(parse_value("55.5").expect("number"), serde_json::json!(55.5));
        assert_eq!(parse_value("-3").expect("int"), serde_json::json!(-3));
        assert_eq!(parse_value("ON").expect("bool"), serde_json::json!(true));
        assert!(parse_value("hot").is_err());
        assert!(parse_value("NaN").is_err());
        assert_eq!(age(None), "never");
        assert_eq!(age(Some(0.2)), "now");
        assert_eq!(age(Some(42.0)), "42 s");
        assert_eq!(age(Some(600.0)), "10 min");
        assert_eq!(value(Some(&Value::Float(21.500000001))), "21.5");
        assert_eq!(value(Some(&Value::Float(20.0))), "20");
        assert_eq!(points_path("boiler.*"), "?glob=boiler.%2A");
    }
}
