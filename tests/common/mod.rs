//! Shared test rig: a simulator on a real pseudo-terminal pair and a gateway polling it.
#![allow(dead_code)]

pub mod blocking;
pub mod procs;
pub mod proxy;
pub mod sim;

use std::future::Future;
use std::time::Duration;

use m2m_gateway::gateway::Gateway;
use m2m_gateway::model::Model;
use m2m_gateway::point::value::{Quality, Sample, Value};
use m2m_gateway::sim::{SimConfig, SimHandle, Simulator, VirtualPort};
use tokio_util::sync::CancellationToken;

/// A simulator on a virtual serial pair and a gateway polling it.
pub struct Rig {
    pub port: VirtualPort,
    pub sim: SimHandle,
    pub gateway: Option<Gateway>,
    pub shutdown: CancellationToken,
}

/// Parses a simulation written in TOML.
pub fn sim_config(text: &str) -> SimConfig {
    toml::from_str(text).expect("simulation config parses")
}

/// Parses a gateway config, with `{port}` replaced by `port`.
pub fn model(text: &str, port: &str) -> Model {
    m2m_gateway::config::parse(&text.replace("{port}", port), "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

impl Rig {
    /// Starts the simulator, then a gateway with `gateway_toml` pointed at its port.
    pub fn start(sim_toml: &str, gateway_toml: &str) -> Self {
        Self::start_on(VirtualPort::new().expect("pty pair"), sim_toml, gateway_toml)
    }

    /// Same, on a given virtual port (e.g. one with a by-id style link).
    pub fn start_on(mut port: VirtualPort, sim_toml: &str, gateway_toml: &str) -> Self {
        let sim = Simulator::new(sim_config(sim_toml));
        let handle = sim.handle();
        port.run(sim).expect("simulator runs");
        let model = model(gateway_toml, &port.path().display().to_string());
        let shutdown = CancellationToken::new();
        let gateway = Gateway::start(&model, shutdown.clone()).expect("gateway starts");
        Rig { port, sim: handle, gateway: Some(gateway), shutdown }
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("gateway running")
    }

    pub fn sample(&self, point: &str) -> Option<Sample> {
        self.gateway().image.get(point)
    }

    pub fn value(&self, point: &str) -> Option<Value> {
        self.gateway().image.good_value(point)
    }

    pub fn quality(&self, point: &str) -> Option<Quality> {
        self.sample(point).map(|s| s.quality)
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(g) = self.gateway.take() {
            g.shutdown(Duration::from_secs(2)).await;
        }
    }
}

/// Gateway logs on the test's output (`RUST_LOG` filters; info by default).
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 10 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `fut` with a deadline.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}
