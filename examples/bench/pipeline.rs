//! Figure: a Modbus-TCP device bus (`modbus-tcp://`) with `max_in_flight` 1 and 4, eight
//! masters reading distinct registers through a pass-through unit. The device is the
//! crate's simulator in its Modbus-TCP mode working on requests in parallel (as a device
//! that pipelines does), answering at once or after a fixed think time.

use m2m_gateway::sim::Fault;

use super::passthrough::{Reads, drive};
use super::*;

/// 18 holding registers on unit 1 (enough for 8 masters' distinct 10-register reads).
const SIM: &str = r#"
[[unit]]
unit = 1
[[unit.register]]
table = "holding"
address = 0
values = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
"#;

/// The gateway: the device on a modbus-tcp bus, polled once an hour, served as `pass`
/// unit 1.
fn config(port: &str, max_in_flight: usize) -> String {
    format!(
        "[gateway]\nname = \"bench\"\nsummary_interval = \"1h\"\n\n\
         [[bus]]\nname = \"plc\"\nport = \"{port}\"\ntimeout = \"1s\"\nmax_in_flight = {max_in_flight}\n\n\
         [[device]]\nname = \"block\"\nbus = \"plc\"\nunit = 1\ninterval = \"1h\"\n\
         [[device.point]]\nname = \"r0\"\ntable = \"holding\"\naddress = 0\n\n\
         [server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 32\nmax_in_flight = 4\n\
         [[server.unit]]\nunit = 1\npass = \"block\"\n"
    )
}

pub(crate) async fn pipelining(s: &Settings) -> Result<Figure, BoxError> {
    let mut f = Figure::new(
        "Modbus-TCP device bus: max_in_flight",
        "Eight masters (tokio-modbus TCP clients in the benchmark process) each send FC3 reads \
         of 10 distinct holding registers back to back through a `pass` unit of the gateway \
         (in the same process), whose bus is a `modbus-tcp://` connection to the simulator's \
         Modbus-TCP mode, working on requests in parallel (`SimHandle::set_tcp_parallel`). \
         The device answers at once, or after 5 ms of think time per request (`late 5ms`).",
        vec![
            "device",
            "max_in_flight",
            "requests/s",
            "p50 latency",
            "p99 latency",
            "errors",
            "most at the device",
        ],
    );
    let mut gains = Vec::new();
    for (device, think) in [("instant", Duration::ZERO), ("5 ms per request", Duration::from_millis(5))] {
        let mut rps = Vec::new();
        for n in [1usize, 4] {
            let sim = Simulator::new(toml::from_str(SIM)?);
            let handle = sim.handle();
            handle.set_tcp_parallel(true);
            if !think.is_zero() {
                handle.set_fault(1, Fault::Late(think))?;
            }
            let shutdown = CancellationToken::new();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let port = format!("modbus-tcp://{}", listener.local_addr()?);
            tokio::spawn(sim.serve_tcp(listener, shutdown.clone()));
            let model = m2m_gateway::config::parse(&config(&port, n), "bench.toml")?;
            let gateway = Gateway::start(&model, shutdown.clone())?;
            let addr = gateway.server_addr.ok_or("gateway server did not start")?;
            let l = drive(addr, 1, 8, Reads::Distinct, s, None).await?;
            let most = handle.bus_stats().tcp_most_outstanding;
            shutdown.cancel();
            gateway.shutdown(Duration::from_secs(2)).await;
            let [a, b, c, d] = l.cells();
            eprintln!(
                "bench:     modbus-tcp bus, {device}, max_in_flight {n}: {a}/s p50 {b} p99 {c} errors {d}, {most} at once"
            );
            f.rows.push(vec![device.into(), n.to_string(), a, b, c, d, most.to_string()]);
            rps.push(l.rps);
        }
        gains.push((device, rps[1] / rps[0]));
    }
    for (device, gain) in gains {
        f.verdicts.push((
            format!("pipelining: modbus-tcp bus, {device} device, 8 masters, max_in_flight 4 vs 1"),
            format!("{gain:.2}x"),
            "reported".into(),
            true,
        ));
    }
    f.notes.push(
        "\"most at the device\" is the simulator's count of requests it had read and not yet \
         answered at one time: 1 with max_in_flight 1 (one transaction at a time), and with an \
         instant device (it answers each request before reading the next); up to 4 with 4."
            .into(),
    );
    Ok(f)
}
