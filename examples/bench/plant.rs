//! The devices the figures poll: models built in code (no config file), and the
//! simulators that answer for them.

use super::*;

pub(crate) fn point(
    name: &str,
    table: Table,
    address: u16,
    data_type: DataType,
    interval: Duration,
) -> Point {
    Point {
        name: name.into(),
        table,
        address,
        data_type,
        order: WordOrder::Abcd,
        scale: 1.0,
        offset: 0.0,
        interval,
        stale_after: Duration::from_secs(3600),
        unit: None,
    }
}

pub(crate) fn device(name: &str, unit: u8, points: Vec<Point>) -> Device {
    let points = points
        .into_iter()
        .map(|mut p| {
            p.name = format!("{name}.{}", p.name);
            p
        })
        .collect();
    Device {
        name: name.into(),
        unit,
        template: None,
        timeout: Duration::from_secs(1),
        turnaround: Duration::ZERO,
        max_registers: 125,
        max_bits: 2000,
        max_gap: 8,
        backoff_max: Duration::from_secs(10),
        points,
    }
}

pub(crate) fn one_bus(line: Line, devices: Vec<Device>) -> Model {
    Model {
        gateway: model::Gateway {
            name: "bench".into(),
            summary_interval: Duration::from_secs(3600),
            worker_threads: None,
            log_format: Default::default(),
        },
        buses: vec![Bus {
            name: "bench".into(),
            port: String::new(),
            line,
            protocol: Protocol::ModbusRtu,
            frame_gap: rtu::t35(&line),
            local_echo: false,
            timeout: Duration::from_secs(1),
            retries: 1,
            queue_depth: 64,
            reopen_max: Duration::from_secs(1),
            max_in_flight: 1,
            broadcast: false,
            rs485: None,
            devices,
            raw_devices: Vec::new(),
        }],
        links: None,
        server: None,
        plcs: Vec::new(),
        http: observed(),
    }
}

/// `n` contiguous u16 holding registers: one read of `n` registers.
pub(crate) fn block_device(n: u16, interval: Duration) -> Device {
    let points =
        (0..n).map(|a| point(&format!("r{a}"), Table::Holding, a, DataType::U16, interval)).collect();
    device("block", 1, points)
}

/// Eight devices of a small plant: meters, drives, a PLC, I/O, controllers. Mixed
/// tables, types and read sizes (1 to ~60 registers, bit reads).
pub(crate) fn mixed_plant(interval: Duration) -> Vec<Device> {
    let p = |n: &str, t, a, d| point(n, t, a, d, interval);
    let meter = |name: &str, unit| {
        let mut pts: Vec<Point> =
            (0..12).map(|i| p(&format!("e{i}"), Table::Input, i * 2, DataType::F32)).collect();
        pts.push(p("energy", Table::Input, 100, DataType::U64));
        device(name, unit, pts)
    };
    let drive = |name: &str, unit| {
        device(
            name,
            unit,
            vec![
                p("ready", Table::Holding, 2000, DataType::Bit(0)),
                p("running", Table::Holding, 2000, DataType::Bit(1)),
                p("speed", Table::Holding, 2001, DataType::I16),
                p("current", Table::Holding, 2002, DataType::U16),
                p("hours", Table::Holding, 2010, DataType::U32),
            ],
        )
    };
    let mut plc: Vec<Point> =
        (0..40).map(|i| p(&format!("w{i}"), Table::Holding, i + (i / 10) * 4, DataType::U16)).collect();
    plc.extend((0..32).map(|i| p(&format!("c{i}"), Table::Coils, i, DataType::Bool)));
    let io: Vec<Point> = (0..16)
        .map(|i| p(&format!("di{i}"), Table::Discrete, i, DataType::Bool))
        .chain((0..8).map(|i| p(&format!("ai{i}"), Table::Input, i, DataType::I16)))
        .collect();
    let controller = |name: &str, unit| {
        device(
            name,
            unit,
            (0..8).map(|i| p(&format!("t{i}"), Table::Holding, i * 2, DataType::F32)).collect(),
        )
    };
    vec![
        meter("meter1", 1),
        meter("meter2", 2),
        drive("drive1", 3),
        drive("drive2", 4),
        device("plc", 5, plc),
        device("io", 6, io),
        controller("tc1", 7),
        controller("boiler", 8),
    ]
}

pub(crate) fn sim_for(bus: &Bus) -> SimConfig {
    let mut sim = SimConfig::from_bus(bus);
    if let Some(l) = sim.line.as_mut() {
        l.turnaround = TURNAROUND;
    }
    sim
}

/// With `M2M_BENCH_HTTP=1`, the gateway's HTTP endpoint runs (on a free port) and
/// [`watch`] follows its point stream and scrapes `/metrics` every second: the rows then
/// measure the gateway with somebody watching. Without it, no endpoint at all.
pub(crate) fn observed() -> Option<m2m_gateway::model::Http> {
    std::env::var_os("M2M_BENCH_HTTP").map(|_| m2m_gateway::model::Http {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        token_file: None,
        grants: Vec::new(),
        required: true,
    })
}

/// Follows the point stream and scrapes `/metrics` of `gateway` until the process ends,
/// when its HTTP endpoint runs ([`observed`]).
pub(crate) fn watch(gateway: &m2m_gateway::gateway::Gateway) {
    let Some(addr) = gateway.http_addr else {
        return;
    };
    let client = m2m_gateway::http::client::Client::new(&format!("http://{addr}"), None).expect("url");
    let c = client.clone();
    tokio::spawn(async move {
        let Ok(mut events) = c.events("/api/v1/points/stream").await else {
            return;
        };
        while let Ok(Some(_)) = events.next().await {}
    });
    tokio::spawn(async move {
        loop {
            let _ = client.text("/metrics").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
