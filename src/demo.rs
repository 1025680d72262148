//! `m2m-gateway demo`: the main job with no hardware. Every bus of a configuration is
//! served by a simulator on its own virtual serial pair, the gateway polls them through
//! its real bus engine, and the live values are printed as a table.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::gateway::{Gateway, GatewayError};
use crate::image::Image;
use crate::model::Model;
use crate::simulate::{SimConfig, SimError, Simulator, VirtualPort};

/// Virtual serial pairs with a simulator behind each, one per bus of a model.
pub struct SimulatedPlant {
    ports: Vec<VirtualPort>,
}

impl SimulatedPlant {
    /// Starts a simulator for every bus of `model` and points the bus at its virtual port.
    pub fn start(model: &mut Model) -> Result<Self, SimError> {
        let mut ports = Vec::new();
        for bus in &mut model.buses {
            let mut port = VirtualPort::new()?;
            port.run(Simulator::new(SimConfig::from_bus(bus)))?;
            bus.port = port.path().display().to_string();
            ports.push(port);
        }
        Ok(Self { ports })
    }

    /// Number of simulated buses.
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// True when the model had no bus.
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A simulator could not start.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The gateway could not start (peer-link identity, spool or listening socket).
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

/// Runs the demo for `duration` (or until `shutdown`), printing the image every `every`.
pub async fn run(
    mut model: Model,
    duration: Duration,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), DemoError> {
    let plant = SimulatedPlant::start(&mut model)?;
    println!("demo: {} simulated bus(es) on virtual serial pairs:", plant.len());
    for bus in &model.buses {
        println!("  bus {} -> {} ({} device(s))", bus.name, bus.port, bus.devices.len());
    }
    let gateway = Gateway::start(&model, shutdown.clone())?;
    let end = tokio::time::Instant::now() + duration;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => print!("{}", table(&gateway.image)),
            () = tokio::time::sleep_until(end) => break,
            () = shutdown.cancelled() => break,
        }
    }
    shutdown.cancel();
    gateway.shutdown(Duration::from_secs(1)).await;
    drop(plant);
    Ok(())
}

/// The image as a table: point, value, quality, age.
pub fn table(image: &Image) -> String {
    let now = SystemTime::now();
    let rows = image.snapshot();
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(5).max(5);
    let mut out = format!("\n{:width$}  {:>14}  {:<12}  age\n", "point", "value", "quality");
    for (name, s) in rows {
        let value = s.value.map_or_else(|| "-".to_string(), |v| v.to_string());
        let age = now.duration_since(s.at).unwrap_or_default();
        let _ = writeln!(
            out,
            "{name:width$}  {value:>14}  {:<12}  {:.1}s",
            s.quality.to_string(),
            age.as_secs_f64()
        );
    }
    out
}
