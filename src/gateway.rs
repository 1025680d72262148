//! Wires a validated model into running tasks: one bus task and one poller per serial
//! line (a raw poller on raw buses, a stream task instead of both on a stream bus, see
//! `rawpoll`), the periodic summaries, the local Modbus-TCP server when `[server]` is
//! configured, all under one shutdown token and one task tracker.
//!
//! Invariant: every task spawned here watches the shutdown token and is tracked, so
//! [`Gateway::shutdown`] returns once everything has stopped (or the grace period ran out).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::bus::{self, BusHandle};
use crate::image::Image;
use crate::model::{Model, Protocol};
use crate::poller::Poller;
use crate::rawpoll::{self, SerialDevices};
use crate::server::{self, Server, ServerError};

/// A running gateway.
pub struct Gateway {
    /// The register image every task reads and writes.
    pub image: Arc<Image>,
    /// Handles to the bus tasks, by bus order in the model (stream buses, which have a
    /// stream task instead, are left out).
    pub buses: Vec<BusHandle>,
    /// The raw serial devices: counters and commands ([`SerialDevices::send_command`]).
    pub serial: Arc<SerialDevices>,
    /// Where the Modbus-TCP server listens (`None`: no `[server]`, or it failed to bind).
    pub server_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Gateway {
    /// Starts every task of `model`. Must be called inside a tokio runtime. A server
    /// socket that cannot be bound is logged as an error and the gateway runs without
    /// it; use [`Gateway::try_start`] to fail instead.
    pub fn start(model: &Model, shutdown: CancellationToken) -> Self {
        let listener = model.server.as_ref().and_then(|config| {
            server::listen(config)
                .inspect_err(|e| error!(error = %e, "running without the modbus-tcp server"))
                .ok()
        });
        Self::launch(model, shutdown, listener)
    }

    /// Like [`Gateway::start`], but a server socket that cannot be bound fails the start,
    /// before anything else has started.
    pub fn try_start(model: &Model, shutdown: CancellationToken) -> Result<Self, ServerError> {
        let listener = model.server.as_ref().map(server::listen).transpose()?;
        Ok(Self::launch(model, shutdown, listener))
    }

    fn launch(model: &Model, shutdown: CancellationToken, listener: Option<TcpListener>) -> Self {
        let image = Arc::new(Image::new());
        let tracker = TaskTracker::new();
        let mut buses = Vec::new();
        let mut serial = SerialDevices::new();
        for bus in &model.buses {
            let handle = if bus.protocol == Protocol::Raw {
                // A stream bus has a stream task and no bus task (nothing is ever sent).
                let Some(handle) = rawpoll::start(bus, &image, &mut serial, &shutdown, &tracker) else {
                    continue;
                };
                handle
            } else {
                let handle = bus::spawn(bus, shutdown.clone(), &tracker);
                let poller = Poller::new(bus, handle.clone(), image.clone());
                tracker.spawn(poller.run(shutdown.clone()));
                handle
            };
            tracker.spawn(
                summarise(handle.clone(), model.gateway.summary_interval, shutdown.clone())
                    .instrument(info_span!("bus", bus = %bus.name)),
            );
            buses.push(handle);
        }
        tracker.spawn(sweep(image.clone(), shutdown.clone()));
        let mut server_addr = None;
        if let (Some(config), Some(listener)) = (&model.server, listener) {
            let server = Server::new(listener, config, model, &buses, image.clone());
            server_addr = Some(server.local_addr());
            tracker.spawn(server.run(shutdown.clone(), tracker.clone()));
        }
        info!(
            gateway = %model.gateway.name,
            buses = model.buses.len(),
            points = image.len(),
            server = ?server_addr,
            "gateway started"
        );
        Self { image, buses, serial: Arc::new(serial), server_addr, shutdown, tracker }
    }

    /// Waits for the shutdown token, then for every task to stop (at most `grace`).
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancelled().await;
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_err() {
            warn!(?grace, "tasks still running after the grace period; leaving them");
        }
    }
}

/// Logs a one-line summary of a bus every `every`.
async fn summarise(bus: BusHandle, every: Duration, shutdown: CancellationToken) {
    let mut last = bus.stats().snapshot();
    let mut last_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        info!("{}", bus::summary(bus.stats(), &last, now - last_at));
        last = bus.stats().snapshot();
        last_at = now;
    }
}

/// Publishes good-to-stale transitions once a second.
async fn sweep(image: Arc<Image>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => { image.sweep_stale(); }
            () = shutdown.cancelled() => return,
        }
    }
}
