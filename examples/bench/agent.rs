//! Figure 5, agent mode: masters reading an `agent` unit, answered from the image's raw
//! cache without touching the bus.

use m2m_gateway::model::ServeMode;

use super::passthrough::{READ_REGS, Reads, drive, serving_gateway};
use super::*;

/// Agent-mode target: requests/s with 8 masters.
const AGENT_TARGET: f64 = 100_000.0;

pub(crate) async fn agent_mode(s: &Settings) -> Result<Figure, BoxError> {
    let mut f = Figure::new(
        "Agent mode",
        "Masters (tokio-modbus TCP clients in the benchmark process, sharing its 2 cores with \
         the gateway) each send FC3 reads of 10 holding registers of an `agent` unit back to \
         back (one outstanding request per master). Every answer comes from the registers the \
         poller last read (`Image::read_raw`, max_age 10 s); the device is polled every 100 ms \
         on a pty simulator.",
        vec!["masters", "requests/s", "p50 latency", "p99 latency", "errors"],
    );
    let (gateway, port, _sim, shutdown) = serving_gateway(
        ServeMode::Agent { max_age: Duration::from_secs(10) },
        Duration::from_millis(100),
        false,
    )?;
    let addr = gateway.server_addr.ok_or("gateway server did not start")?;
    let mut eight = None;
    for n in [1, 8] {
        let l = drive(addr, 1, n, Reads::Same, s, None).await?;
        let [a, b, c, d] = l.cells();
        eprintln!("bench:     agent x{n}: {a}/s p50 {b} p99 {c} errors {d}");
        f.rows.push(vec![n.to_string(), a, b, c, d]);
        if n == 8 {
            eight = Some(l);
        }
    }
    shutdown.cancel();
    gateway.shutdown(Duration::from_secs(2)).await;
    drop(port);
    if let Some(l) = eight {
        f.verdicts.push((
            "agent mode, 8 masters: requests/s (p99)".into(),
            format!("{:.0}/s (p99 {})", l.rps, ms(l.p99)),
            format!(">= {AGENT_TARGET:.0}/s"),
            l.rps >= AGENT_TARGET,
        ));
    }
    f.notes.push(format!(
        "Each request is one {READ_REGS}-register read, i.e. a TCP round trip over loopback: \
         the client's write and read and the server's read and write are four system calls and \
         two task wake-ups per request, on the same two cores as the clients."
    ));
    Ok(f)
}
