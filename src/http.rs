//! The local HTTP endpoint (`[http]`): the status page at `/`, Prometheus metrics at
//! `/metrics`, and the JSON API under `/api/v1/` (status, buses, devices, peers, PLCs,
//! tunnels, points, operator writes, and server-sent event streams of point changes and of
//! one bus's traffic).
//!
//! It is an observer of the running gateway. Invariants:
//! - bus, poller and link tasks never wait on it: everything here reads atomics
//!   ([`crate::bus::BusStats`], link/PLC/tunnel/server counters, [`DeviceHealth`]), copies
//!   out of the image under its short lock, or holds a broadcast receiver, which a slow
//!   reader makes lag (it then gets a fresh snapshot) instead of slowing the sender;
//! - a slow or hostile client costs at most one of [`MAX_CONNECTIONS`] connection slots:
//!   request headers must arrive within [`HEADER_TIMEOUT`], a request is answered within
//!   [`REQUEST_TIMEOUT`] (event streams excepted), request bodies are capped at
//!   [`BODY_LIMIT`], and past the connection cap a new connection is closed at once;
//! - access: a request from another machine needs the token (`Authorization: Bearer`),
//!   and every write needs it, from anywhere; without a configured token nothing can be
//!   written and config refuses any listen address that is not loopback (auth.rs);
//! - every task here stops on the shutdown token (event streams end, connections close).
//!
//! Built on axum (routing, extraction, SSE) over hyper's HTTP/1 connection driver, on the
//! gateway's own tokio runtime; the accept loop is ours so the connection cap, header
//! timeout and shutdown are explicit.

mod api;
mod auth;
pub mod client;

mod metrics;
mod page;
mod sse;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tracing::{debug, info, warn};

use crate::bus::BusHandle;
use crate::image::Image;
use crate::link::tunnel::TunnelHandle;
use crate::link::{Grants, LinkHandle};
use crate::model::{self, Model};
use crate::plc::PlcHandle;
use crate::poll::modbus::DeviceHealth;
use crate::server::ServerStats;
use crate::sockets::Sockets;
use crate::writer::Writer;

pub use api::{
    BusView, DeviceView, GatewayView, Overview, PeerView, PlcView, PointView, ServerView, TunnelView,
};
pub use auth::Token;

/// Most HTTP connections open at once; one more is accepted and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time of connecting (or of its
/// previous request on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request (other than an event stream) is answered within this time, or gets 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request body accepted (a write is a few dozen bytes).
pub const BODY_LIMIT: usize = 16 * 1024;
/// How often the line load of each bus is sampled.
const LOAD_EVERY: Duration = Duration::from_secs(2);

/// Why the HTTP endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The listening socket cannot be bound.
    #[error(
        "http: cannot listen on {addr}: {source} (set [http] listen to another address, or enabled = false)"
    )]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The token file cannot be used.
    #[error("http: token_file {}: {reason}", path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The endpoint's socket and token, opened before any task starts.
pub struct Prepared {
    listener: TcpListener,
    token: Option<Token>,
    grants: Vec<model::Grant>,
}

/// Binds the socket (or takes the one handed over on that address) and reads the token of `config`. A bind failure of an endpoint that
/// was not configured (the defaults) is logged and gives `Ok(None)`: the gateway runs
/// without it.
pub fn prepare(config: &model::Http, sockets: &Sockets) -> Result<Option<Prepared>, HttpError> {
    let token = config.token_file.as_deref().map(Token::read).transpose()?;
    match sockets.listen(config.listen, "[http]") {
        Ok(listener) => Ok(Some(Prepared { listener, token, grants: config.grants.clone() })),
        Err(source) if !config.required => {
            warn!(
                addr = %config.listen,
                error = %source,
                "status page and metrics not started: cannot listen on {} (add an [http] section with another listen address)",
                config.listen
            );
            Ok(None)
        }
        Err(source) => Err(HttpError::Bind { addr: config.listen, source }),
    }
}

/// What the endpoint shows: handles to everything that runs.
pub struct Observed {
    /// This gateway's name.
    pub name: String,
    /// When the gateway started.
    pub started: SystemTime,
    /// The register image.
    pub image: Arc<Image>,
    /// The bus tasks, in model order.
    pub buses: Vec<BusHandle>,
    /// The polled devices, in model order.
    pub devices: Vec<Arc<DeviceHealth>>,
    /// The peer links.
    pub links: Vec<(String, LinkHandle)>,
    /// The PLC sinks.
    pub plcs: Vec<PlcHandle>,
    /// The serial tunnels.
    pub tunnels: Vec<TunnelHandle>,
    /// The Modbus-TCP server: where it listens and its counters.
    pub server: Option<(SocketAddr, Arc<ServerStats>)>,
    /// Writes local points.
    pub writer: Writer,
    /// Per local point: what the page shows beside its value.
    pub points: HashMap<String, PointInfo>,
    /// Per bus (model order): its port and protocol, for display.
    pub ports: Vec<(String, String)>,
}

/// What is known of a local point besides its value.
#[derive(Debug, Clone)]
pub struct PointInfo {
    /// Engineering unit.
    pub unit: Option<String>,
    /// The device it is read from.
    pub device: String,
    /// The bus of that device.
    pub bus: String,
}

impl Observed {
    /// The static part of what the endpoint shows, from the model.
    pub fn describe(model: &Model) -> (HashMap<String, PointInfo>, Vec<(String, String)>) {
        let mut points = HashMap::new();
        for bus in &model.buses {
            for d in &bus.devices {
                for p in &d.points {
                    let info =
                        PointInfo { unit: p.unit.clone(), device: d.name.clone(), bus: bus.name.clone() };
                    points.insert(p.name.clone(), info);
                }
            }
            for d in &bus.raw_devices {
                for p in &d.points {
                    let info =
                        PointInfo { unit: p.unit.clone(), device: d.name.clone(), bus: bus.name.clone() };
                    points.insert(p.name.clone(), info);
                }
            }
        }
        let ports = model.buses.iter().map(|b| (b.port.clone(), b.protocol.to_string())).collect();
        (points, ports)
    }
}

/// Shared by every request.
struct App {
    seen: Observed,
    token: Option<Token>,
    grants: Grants,
    load: Load,
    shutdown: CancellationToken,
}

/// The line busy ratio of each bus over the last sampling period, in millionths.
struct Load {
    ratio: Vec<AtomicU64>,
}

impl Load {
    fn get(&self, bus: usize) -> f64 {
        self.ratio.get(bus).map_or(0.0, |r| r.load(Relaxed) as f64 / 1e6)
    }
}

/// The busy share of a line: `busy_ns` of line time in `elapsed`, clamped to 0..=1.
fn busy_ratio(busy_ns: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return 0.0;
    }
    (busy_ns as f64 / elapsed.as_nanos() as f64).clamp(0.0, 1.0)
}

/// Samples each bus's busy time every [`LOAD_EVERY`] into `app.load`.
async fn sample_load(app: Arc<App>) {
    let busy =
        |app: &App| -> Vec<u64> { app.seen.buses.iter().map(|b| b.stats().busy_ns.load(Relaxed)).collect() };
    let mut last = busy(&app);
    let mut last_at = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(LOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = app.shutdown.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        let counts = busy(&app);
        for (i, (n, l)) in counts.iter().zip(&last).enumerate() {
            let ratio = busy_ratio(n.saturating_sub(*l), now - last_at);
            app.load.ratio[i].store((ratio * 1e6) as u64, Relaxed);
        }
        last = counts;
        last_at = now;
    }
}

/// Starts the endpoint on `prepared` showing `seen`; returns the bound address.
pub fn spawn(
    prepared: Prepared,
    seen: Observed,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<SocketAddr> {
    let grants = Grants::new(&prepared.grants);
    let load = Load { ratio: seen.buses.iter().map(|_| AtomicU64::new(0)).collect() };
    let app = Arc::new(App { seen, token: prepared.token, grants, load, shutdown: shutdown.clone() });
    let addr = prepared.listener.local_addr().ok();
    tracker.spawn(sample_load(app.clone()));
    tracker.spawn(serve(prepared.listener, router(app), shutdown.clone(), tracker.clone()));
    addr
}

/// Every route, with the limits and the access check.
fn router(app: Arc<App>) -> Router {
    let timed = Router::new()
        .merge(page::routes())
        .merge(api::routes())
        .route("/metrics", axum::routing::get(metrics::handler))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ));
    Router::new()
        .merge(timed)
        .merge(sse::routes())
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth::guard))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// Accepts connections until `shutdown`, each served on its own tracked task.
async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken, tracker: TaskTracker) {
    if let Ok(addr) = listener.local_addr() {
        info!("status page, metrics and API on http://{addr}/");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            // Cancel-safe: accept loses no connection when dropped.
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                warn!(error = %e, "http: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "http connection refused: {MAX_CONNECTIONS} connections open");
            continue;
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service =
                hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                    let mut app = app.clone();
                    async move { app.call(req).await }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                // Cancel-safe enough: at shutdown the connection is dropped whole.
                r = conn => if let Err(e) = r {
                    debug!(%peer, error = %e, "http connection ended");
                },
                () = shutdown.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// Seconds from `at` to now (0 for a time in the future: clocks differ).
fn age(at: SystemTime) -> f64 {
    SystemTime::now().duration_since(at).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ratio_is_a_share_of_the_elapsed_time() {
        assert_eq!(busy_ratio(500_000_000, Duration::from_secs(1)), 0.5);
        assert_eq!(busy_ratio(3_000_000_000, Duration::from_secs(2)), 1.0, "clamped");
        assert_eq!(busy_ratio(1, Duration::ZERO), 0.0);
    }
}
