//! The JSON API under `/api/v1/`: what runs and how it is doing, the points, and operator
//! writes. Every answer is built from atomics and an image snapshot at request time.
//!
//! - `GET /api/v1/status`: the whole overview (gateway health, buses with their devices,
//!   peers, PLCs, tunnels, server); the page and `m2m-gateway status` show it.
//! - `GET /api/v1/buses`, `/devices`, `/peers`, `/plcs`, `/tunnels`: one part of it.
//! - `GET /api/v1/points?glob=boiler.*`: current values (value, quality, age, unit, origin).
//! - `POST /api/v1/points/{name}` with `{"value": 55.5}`: writes a local point, only one an
//!   `[[http.grant]]` covers and within its limits (the token is checked before, auth.rs).
//!
//! Errors are `{"error": "..."}` with 400 (bad request), 403 (refused by the grants),
//! 404 (no such point or bus) or 502 (the device did not carry the write out).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::metrics::quality_name;
use super::{App, age};
use crate::point::value::{Quality, Sample, Value};
use crate::serial::pdu::exception_text;

/// The longest an operator write may take (the bus's own timeouts and retries end it
/// sooner).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/buses", get(|State(app): State<Arc<App>>| async move { Json(overview(&app).buses) }))
        .route(
            "/api/v1/devices",
            get(|State(app): State<Arc<App>>| async move {
                Json(overview(&app).buses.into_iter().flat_map(|b| b.devices).collect::<Vec<_>>())
            }),
        )
        .route("/api/v1/peers", get(|State(app): State<Arc<App>>| async move { Json(overview(&app).peers) }))
        .route("/api/v1/plcs", get(|State(app): State<Arc<App>>| async move { Json(overview(&app).plcs) }))
        .route(
            "/api/v1/tunnels",
            get(|State(app): State<Arc<App>>| async move { Json(overview(&app).tunnels) }),
        )
        .route("/api/v1/points", get(points))
        .route("/api/v1/points/{name}", get(point).post(write))
}

/// An error answer.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The whole overview.
#[derive(Debug, Serialize, Deserialize)]
pub struct Overview {
    /// The gateway itself.
    pub gateway: GatewayView,
    /// Every polled bus.
    pub buses: Vec<BusView>,
    /// Every peer link.
    pub peers: Vec<PeerView>,
    /// Every PLC sink.
    pub plcs: Vec<PlcView>,
    /// Every serial tunnel.
    pub tunnels: Vec<TunnelView>,
    /// The Modbus-TCP server, if one runs.
    pub server: Option<ServerView>,
}

/// The gateway at a glance.
#[derive(Debug, Serialize, Deserialize)]
pub struct GatewayView {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_seconds: f64,
    /// `ok` when everything answers and every link is up, else `degraded`.
    pub health: String,
    /// What is wrong, one line each.
    pub problems: Vec<String>,
    /// Points in the image.
    pub points: usize,
}

/// One bus.
#[derive(Debug, Serialize, Deserialize)]
pub struct BusView {
    /// Name.
    pub name: String,
    /// Port (device path or `tcp://`).
    pub port: String,
    /// Field protocol.
    pub protocol: String,
    /// Share of the last few seconds the line was busy (0..1).
    pub load_ratio: f64,
    /// Transactions completed.
    pub transactions: u64,
    /// Attempts without a valid reply in time.
    pub timeouts: u64,
    /// Frames with a bad checksum.
    pub crc_errors: u64,
    /// Frames that did not answer the request.
    pub framing_errors: u64,
    /// Replies that came after their request timed out (discarded).
    pub late_replies: u64,
    /// Exception replies.
    pub exceptions: u64,
    /// Bytes discarded as noise.
    pub noise_bytes: u64,
    /// Times the port was opened.
    pub port_opens: u64,
    /// Transactions waiting now.
    pub queued: usize,
    /// Masters' reads answered by a shared read.
    pub shared_reads: u64,
    /// The devices polled on it.
    pub devices: Vec<DeviceView>,
}

/// One polled device.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceView {
    /// Name.
    pub name: String,
    /// Its bus.
    pub bus: String,
    /// Unit id.
    pub unit: u8,
    /// `up`, or `failed` while it does not answer (probed with back-off).
    pub state: String,
    /// Seconds since it last answered (`None`: never).
    pub last_answer_age_seconds: Option<f64>,
    /// Reads answered.
    pub reads_answered: u64,
    /// Reads failed.
    pub reads_failed: u64,
}

/// One peer link.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerView {
    /// The peer's name.
    pub name: String,
    /// A session is up.
    pub connected: bool,
    /// Sessions since start.
    pub sessions: u64,
    /// Batches sent.
    pub batches_sent: u64,
    /// Batches acknowledged.
    pub batches_acked: u64,
    /// The peer's batches applied.
    pub batches_applied: u64,
    /// The peer's batches dropped as duplicates.
    pub duplicates_dropped: u64,
    /// The peer's writes refused.
    pub writes_refused: u64,
    /// Received values relayed to the peer.
    pub values_relayed: u64,
    /// Values refused as a relay loop (not sent to the peer, or dropped from it).
    pub loop_refused: u64,
    /// Values the peer relayed of an origin its `accept_relayed` does not list (refused).
    pub relayed_refused: u64,
    /// Batches waiting in the spool.
    pub spool_pending_batches: u64,
    /// Values in them.
    pub spool_pending_values: u64,
    /// Bytes in them.
    pub spool_pending_bytes: u64,
    /// Age of the oldest, seconds.
    pub spool_oldest_age_seconds: Option<f64>,
    /// Seconds since the last ack.
    pub last_ack_age_seconds: Option<f64>,
    /// Values dropped to the spool limits (data lost).
    pub spool_dropped_values: u64,
}

/// One PLC sink.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlcView {
    /// Name.
    pub name: String,
    /// Connected now.
    pub connected: bool,
    /// Write requests confirmed.
    pub write_requests: u64,
    /// Values written.
    pub values_written: u64,
    /// Values dropped.
    pub values_dropped: u64,
    /// Batches waiting in the spool.
    pub spool_pending_batches: u64,
}

/// One serial tunnel.
#[derive(Debug, Serialize, Deserialize)]
pub struct TunnelView {
    /// Name.
    pub name: String,
    /// Port open.
    pub port_open: bool,
    /// Bytes sent to the peer.
    pub sent_bytes: u64,
    /// Bytes received from the peer.
    pub received_bytes: u64,
    /// Bytes dropped, both ways.
    pub dropped_bytes: u64,
}

/// The Modbus-TCP server.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerView {
    /// Where it listens.
    pub listen: String,
    /// Masters connected now.
    pub connections: u64,
    /// Requests answered since start.
    pub requests: u64,
    /// Exception answers since start.
    pub exceptions: u64,
}

/// Builds the overview from the counters as they are now.
pub(super) fn overview(app: &App) -> Overview {
    let seen = &app.seen;
    let mut problems = Vec::new();
    let buses: Vec<BusView> = seen
        .buses
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let s = b.stats();
            let (port, protocol) = seen.ports.get(i).cloned().unwrap_or_default();
            let devices = seen
                .devices
                .iter()
                .filter(|d| d.bus == b.name())
                .map(|d| {
                    let up = d.online.load(Relaxed);
                    if !up {
                        problems.push(format!(
                            "device {} (unit {} on bus {}) does not answer",
                            d.name, d.unit, d.bus
                        ));
                    }
                    DeviceView {
                        name: d.name.clone(),
                        bus: d.bus.clone(),
                        unit: d.unit,
                        state: if up { "up" } else { "failed" }.into(),
                        last_answer_age_seconds: d.last_answer().map(age),
                        reads_answered: d.answered.load(Relaxed),
                        reads_failed: d.failed.load(Relaxed),
                    }
                })
                .collect();
            BusView {
                name: b.name().to_string(),
                port,
                protocol,
                load_ratio: app.load.get(i),
                transactions: s.transactions.load(Relaxed),
                timeouts: s.timeouts.load(Relaxed),
                crc_errors: s.crc_errors.load(Relaxed),
                framing_errors: s.foreign_frames.load(Relaxed),
                late_replies: s.late_replies.load(Relaxed),
                exceptions: s.exceptions.load(Relaxed),
                noise_bytes: s.noise_bytes.load(Relaxed),
                port_opens: s.opens.load(Relaxed),
                queued: b.queued(),
                shared_reads: s.shared_answers.load(Relaxed),
                devices,
            }
        })
        .collect();
    let peers: Vec<PeerView> = seen
        .links
        .iter()
        .map(|(name, h)| {
            let s = h.stats();
            if !s.connected {
                problems.push(format!("peer {name} is not connected ({} batches waiting)", s.spool_pending));
            }
            PeerView {
                name: name.clone(),
                connected: s.connected,
                sessions: s.sessions,
                batches_sent: s.batches_sent,
                batches_acked: s.batches_acked,
                batches_applied: s.batches_applied,
                duplicates_dropped: s.duplicates_dropped,
                writes_refused: s.writes_refused,
                values_relayed: s.samples_relayed,
                loop_refused: s.loop_refused,
                relayed_refused: s.relayed_refused,
                spool_pending_batches: s.spool_pending,
                spool_pending_values: s.spool_pending_values,
                spool_pending_bytes: s.spool_pending_bytes,
                spool_oldest_age_seconds: s.spool_oldest.map(age),
                last_ack_age_seconds: s.last_ack.map(age),
                spool_dropped_values: s.spool_dropped_samples,
            }
        })
        .collect();
    let plcs: Vec<PlcView> = seen
        .plcs
        .iter()
        .map(|p| {
            let c = p.counts();
            if !c.connected {
                problems.push(format!("plc {} is not connected", p.name));
            }
            PlcView {
                name: p.name.clone(),
                connected: c.connected,
                write_requests: c.requests,
                values_written: c.values,
                values_dropped: c.dropped,
                spool_pending_batches: c.spool_pending,
            }
        })
        .collect();
    let tunnels = seen
        .tunnels
        .iter()
        .map(|t| {
            let s = t.stats();
            if !s.port_open {
                problems.push(format!("tunnel {}: serial port is closed", t.name()));
            }
            TunnelView {
                name: t.name().to_string(),
                port_open: s.port_open,
                sent_bytes: s.bytes_out,
                received_bytes: s.bytes_in,
                dropped_bytes: s.dropped_in + s.dropped_out,
            }
        })
        .collect();
    let server = seen.server.as_ref().map(|(addr, s)| ServerView {
        listen: addr.to_string(),
        connections: s.connected.load(Relaxed),
        requests: s.requests.iter().map(|n| n.load(Relaxed)).sum(),
        exceptions: s.exceptions.iter().map(|n| n.load(Relaxed)).sum(),
    });
    Overview {
        gateway: GatewayView {
            name: seen.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: age(seen.started),
            health: if problems.is_empty() { "ok" } else { "degraded" }.into(),
            problems,
            points: seen.image.len(),
        },
        buses,
        peers,
        plcs,
        tunnels,
        server,
    }
}

async fn status(State(app): State<Arc<App>>) -> Json<Overview> {
    Json(overview(&app))
}

/// One point as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointView {
    /// Full name (`device.point`, or `peer/device.point`).
    pub name: String,
    /// The value (for a bad quality: the last good one, if any).
    pub value: Option<Value>,
    /// `good`, `stale`, `comm_fail` or `exception`.
    pub quality: String,
    /// The exception code and its meaning, for quality `exception`.
    pub exception: Option<String>,
    /// Seconds since the value was read.
    pub age_seconds: f64,
    /// When it was read, RFC 3339.
    pub at: String,
    /// Engineering unit.
    pub unit: Option<String>,
    /// Where it comes from: `device boiler on bus line1`, `peer site-b`, or for a
    /// relayed value `peer site-a via site-b` (the gateways it passed through).
    pub origin: String,
    /// An `[[http.grant]]` covers it: operators may write it.
    pub writable: bool,
}

/// `sample` of `name` as the API shows it.
pub(super) fn view(app: &App, name: &str, sample: &Sample) -> PointView {
    let info = app.seen.points.get(name);
    let origin = match (info, name.split_once('/')) {
        (Some(i), _) => format!("device {} on bus {}", i.device, i.bus),
        (None, Some((peer, _))) => match sample.via.as_deref() {
            Some([_, hops @ ..]) if !hops.is_empty() => {
                let hops: Vec<&str> = hops.iter().map(|h| &**h).collect();
                format!("peer {peer} via {}", hops.join(" -> "))
            }
            _ => format!("peer {peer}"),
        },
        (None, None) => "unknown".into(),
    };
    PointView {
        name: name.to_string(),
        value: sample.value.clone(),
        quality: quality_name(sample.quality).into(),
        exception: match sample.quality {
            Quality::Exception(c) => Some(exception_text(c)),
            _ => None,
        },
        age_seconds: age(sample.at),
        at: humantime::format_rfc3339_millis(sample.at).to_string(),
        unit: info.and_then(|i| i.unit.clone()),
        origin,
        writable: info.is_some() && app.grants.covers(name),
    }
}

/// A `?glob=` filter; no glob: everything.
#[derive(Debug, Deserialize)]
pub(super) struct Filter {
    glob: Option<String>,
}

impl Filter {
    /// The compiled glob, or the 400 answer for a bad one.
    pub(super) fn matcher(&self) -> Result<Option<globset::GlobMatcher>, Response> {
        match self.glob.as_deref().filter(|g| !g.is_empty()) {
            None => Ok(None),
            Some(g) => globset::Glob::new(g)
                .map(|g| Some(g.compile_matcher()))
                .map_err(|e| error(StatusCode::BAD_REQUEST, format!("glob {g:?}: {e}"))),
        }
    }
}

/// Every point that has a value and matches `m`.
pub(super) fn matching(app: &App, m: Option<&globset::GlobMatcher>) -> Vec<PointView> {
    app.seen
        .image
        .snapshot()
        .iter()
        .filter(|(n, _)| m.is_none_or(|m| m.is_match(&**n)))
        .map(|(n, s)| view(app, n, s))
        .collect()
}

async fn points(State(app): State<Arc<App>>, Query(filter): Query<Filter>) -> Response {
    match filter.matcher() {
        Ok(m) => Json(matching(&app, m.as_ref())).into_response(),
        Err(rsp) => rsp,
    }
}

async fn point(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.seen.image.get(&name) {
        Some(s) => Json(view(&app, &name, &s)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no point {name:?} has a value")),
    }
}

/// The body of a write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBody {
    value: serde_json::Value,
}

async fn write(State(app): State<Arc<App>>, Path(name): Path<String>, body: axum::body::Bytes) -> Response {
    let body: WriteBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body must be {{\"value\": <number or true/false>}}: {e}"),
            );
        }
    };
    let value = match body.value {
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(f)) => Value::Float(f),
            _ => return error(StatusCode::BAD_REQUEST, format!("value {n} is out of range")),
        },
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("value must be a number or true/false, not {other}"),
            );
        }
    };
    if !app.seen.writer.knows(&name) {
        return error(StatusCode::NOT_FOUND, format!("{name:?} is not a local point"));
    }
    if !app.grants.covers(&name) {
        tracing::warn!(point = %name, %value, "operator write refused: no [[http.grant]] covers the point");
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "write refused: no [[http.grant]] covers point {name}; operators may write only granted points"
            ),
        );
    }
    if let Err(why) = app.grants.check(&name, &value) {
        tracing::warn!(point = %name, %value, reason = %why, "operator write refused");
        return error(StatusCode::FORBIDDEN, format!("write refused: {why} (see [[http.grant]])"));
    }
    match tokio::time::timeout(WRITE_TIMEOUT, app.seen.writer.write(&name, &value)).await {
        Ok(Ok(())) => {
            tracing::info!(point = %name, %value, "operator write done");
            Json(json!({ "written": name, "value": value })).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(point = %name, %value, error = %e, "operator write failed");
            error(StatusCode::BAD_GATEWAY, e.to_string())
        }
        Err(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no outcome within {}s (outcome unknown)", WRITE_TIMEOUT.as_secs()),
        ),
    }
}
