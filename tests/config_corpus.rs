//! Configuration corpus: every file in `tests/configs/bad/` must fail with the messages
//! its `# expect:` lines name; every file in `tests/configs/good/`, the shipped
//! `gateway.toml` and the two-site pair under `examples/` must load. The corpus sizes are asserted, so a moved directory cannot
//! make these tests pass by checking nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use m2m_gateway::config::{self, ConfigError};
use m2m_gateway::model::{Dial, Model, OnLoss, Parity, Protocol, SendMode, ServeMode, WriteGrant};
use m2m_gateway::point::value::{DataType, Table, Value, WordOrder};

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name().expect("file name").to_string_lossy().into_owned()
}

#[test]
fn bad_configs_fail_with_their_expected_messages() {
    let files = corpus("bad");
    assert!(files.len() >= 143, "only {} bad configs", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = file_name(path);
        let text = std::fs::read_to_string(path).expect("read corpus file");
        let expected: Vec<&str> = text.lines().filter_map(|line| line.strip_prefix("# expect: ")).collect();
        if expected.is_empty() {
            failures.push(format!("{name}: no `# expect:` line"));
            continue;
        }
        // Included files resolve against the corpus directory.
        match config::parse_in(&text, &name, path.parent().expect("corpus dir")) {
            Ok(_) => failures.push(format!("{name}: parsed, but should fail")),
            Err(err) => {
                let shown = err.to_string();
                for want in &expected {
                    if !shown.contains(want) {
                        failures.push(format!("{name}: missing {want:?} in:\n{shown}"));
                    }
                }
                assert_eq!(err.exit_code(), 2);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn validation_reports_every_problem_at_once() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/bad/many_problems.toml");
    match config::load(&path) {
        Err(ConfigError::Invalid(problems)) => {
            assert_eq!(problems.len(), 6, "{problems:#?}");
            assert!(problems.iter().all(|p| p.line > 0 && p.col > 0));
            // Problems come in file order, each naming its item.
            let lines: Vec<usize> = problems.iter().map(|p| p.line).collect();
            assert!(lines.is_sorted(), "{lines:?}");
        }
        other => panic!("expected validation problems, got {other:?}"),
    }
}

#[test]
fn good_configs_load() {
    let files = corpus("good");
    assert!(files.len() >= 6, "only {} good configs", files.len());
    for path in &files {
        if let Err(err) = config::load(path) {
            panic!("{} should load:\n{err}", path.display());
        }
    }
}

fn good(name: &str) -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/good").join(name);
    config::load(&path).unwrap_or_else(|e| panic!("{name}:\n{e}"))
}

#[test]
fn defaults_are_resolved() {
    let model = good("minimal.toml");
    assert_eq!(model.gateway.name, "plant-7");
    assert_eq!(model.gateway.summary_interval, Duration::from_secs(60));
    assert_eq!(model.gateway.worker_threads, None, "one per core");
    let bus = &model.buses[0];
    assert_eq!(bus.protocol, Protocol::ModbusRtu);
    assert_eq!(bus.line.baud, 19_200);
    assert_eq!(bus.line.parity, Parity::Even);
    assert_eq!((bus.line.data_bits, bus.line.stop_bits), (8, 1));
    assert_eq!(bus.timeout, Duration::from_millis(200));
    assert_eq!(bus.retries, 1);
    assert_eq!(bus.queue_depth, 64);
    assert_eq!(bus.reopen_max, Duration::from_secs(30));
    assert_eq!(bus.frame_gap, m2m_gateway::serial::rtu::t35(&bus.line), "t3.5 by default");
    let device = &bus.devices[0];
    assert_eq!(device.timeout, bus.timeout, "device timeout comes from its bus");
    assert_eq!(device.turnaround, Duration::ZERO);
    assert_eq!((device.max_registers, device.max_bits, device.max_gap), (125, 2000, 8));
    assert_eq!(device.backoff_max, Duration::from_secs(60));
    let [register, coil] = &device.points[..] else {
        panic!("two points expected");
    };
    assert_eq!(register.name, "dev.level");
    assert_eq!(register.data_type, DataType::U16);
    assert_eq!(register.order, WordOrder::Abcd);
    assert_eq!((register.scale, register.offset), (1.0, 0.0));
    assert_eq!(register.interval, Duration::from_secs(1));
    assert_eq!(register.stale_after, Duration::from_secs(3));
    assert_eq!(register.unit, None);
    assert_eq!(coil.table, Table::Coils);
    assert_eq!(coil.data_type, DataType::Bool);
}

#[test]
fn address_base_and_overrides_are_applied() {
    let model = good("overrides.toml");
    let bus = &model.buses[0];
    assert_eq!(bus.line.parity, Parity::None);
    assert_eq!(bus.line.stop_bits, 2);
    assert_eq!(bus.frame_gap, Duration::ZERO);
    assert_eq!(model.gateway.worker_threads, Some(1));
    let names: Vec<&str> = bus.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["first", "second"], "devices keep file order");
    let first = &bus.devices[0];
    assert_eq!(first.timeout, Duration::from_millis(750));
    // address_base = 1: address 1 is wire address 0.
    assert_eq!(first.points[0].address, 0);
    assert_eq!(first.points[0].name, "first.counter");
    assert_eq!(first.points[0].interval, Duration::from_millis(250));
    assert_eq!(first.points[0].stale_after, Duration::from_millis(750));
    assert_eq!(first.points[1].data_type, DataType::Bit(15));
    assert_eq!(first.points[2].data_type, DataType::Str(5));
    assert_eq!(first.points[2].address, 65_532, "5 bytes: 3 registers below the flag");
    assert_eq!(first.points[3].scale, 0.5);
    assert_eq!(first.points[3].unit.as_deref(), Some("m3/h"));
    let second = &bus.devices[1];
    assert_eq!(second.timeout, bus.timeout);
    assert_eq!(second.points[0].address, 65_535, "base 0: address is the wire address");
    assert_eq!(second.points[0].order, WordOrder::Dcba);
}

#[test]
fn shipped_gateway_toml_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let model = config::load(&path).unwrap_or_else(|e| panic!("gateway.toml:\n{e}"));
    assert_eq!(model.gateway.name, "site-a");
    let bus = &model.buses[0];
    assert_eq!(bus.name, "line1");
    assert_eq!(bus.line.baud, 19_200);
    assert_eq!(bus.line.parity, Parity::Even);
    let devices: Vec<&str> = bus.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(devices, ["boiler", "meter", "pump"]);
    let all = bus.devices.iter().flat_map(|d| &d.points);
    assert!(all.clone().any(|p| p.name == "boiler.flow_temp"));
    let meter = &bus.devices[1];
    assert_eq!(meter.points[0].address, 0, "the meter is configured 1-based");
    let pump = &bus.devices[2];
    let bits = pump.points.iter().filter(|p| matches!(p.data_type, DataType::Bit(_))).count();
    assert_eq!(bits, 3);
}

#[test]
fn peers_resolve_defaults_paths_and_rules() {
    let model = good("peers.toml");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/good");
    let links = model.links.expect("[link] gives links");
    assert!(links.identity_dir.is_absolute(), "load anchors relative paths");
    assert_eq!(links.identity_dir, dir.join("identity"));
    assert_eq!(links.data_dir, dir.join("var"));
    assert_eq!(links.listen, Some("0.0.0.0:7700".parse().expect("addr")));
    let prefixes: Vec<u8> = links.allow.iter().map(|n| n.prefix_len()).collect();
    assert_eq!(prefixes, [8, 32, 8]);
    assert!(links.allow[1].contains(&"192.168.1.20".parse::<std::net::IpAddr>().expect("ip")));

    let [b, c] = &links.peers[..] else {
        panic!("two peers expected");
    };
    assert_eq!(b.name, "site-b");
    assert_eq!(
        b.fingerprint,
        "3F:A2:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:9C",
        "fingerprints are normalised to uppercase pairs"
    );
    assert_eq!(b.dial, Dial::Connect("10.0.0.2:7700".into()));
    assert_eq!(b.spool, dir.join("var/spool-site-b.db"), "default spool");
    assert_eq!(b.spool_max_bytes, 64 * 1024 * 1024);
    assert_eq!(b.spool_max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(b.heartbeat, Duration::from_secs(5));
    assert_eq!(b.reconnect_max, Duration::from_secs(5), "default");

    // First rule wins: the alarm goes periodically, the rest of the boiler on change.
    let [periodic, change] = &b.send[..] else {
        panic!("two send rules expected");
    };
    assert_eq!(periodic.points.written(), ["boiler.alarm", "drive.*"]);
    assert_eq!(periodic.matched, ["boiler.alarm", "drive.speed_setpoint", "drive.enable"]);
    assert_eq!(periodic.mode, SendMode::Periodic { interval: Duration::from_secs(10) });
    assert_eq!(change.matched, ["boiler.temp", "boiler.setpoint"]);
    assert_eq!(
        change.mode,
        SendMode::Change { deadband: 0.0, deadband_percent: 0.0, max_silence: Duration::from_secs(60) }
    );

    let [speed, enable] = &b.grants[..] else {
        panic!("two grants expected");
    };
    assert_eq!(speed.matched, ["drive.speed_setpoint"]);
    assert_eq!((speed.min, speed.max), (Some(0.0), Some(150.5)));
    assert_eq!(enable.points.written(), ["drive.enable"]);
    assert_eq!((enable.min, enable.max), (None, None));
    assert_eq!(b.writeback[0].from, "pump.speed");
    assert_eq!(b.writeback[0].to, "boiler.setpoint");
    assert_eq!(b.writeback[0].on_loss, OnLoss::Keep);
    assert_eq!(b.writeback[0].loss_after, Duration::from_secs(30));

    assert_eq!(c.dial, Dial::Accept);
    assert_eq!(c.fingerprint.len(), 95);
    assert_eq!(c.spool, dir.join("var/c/spool.db"), "relative spool: in data_dir");
    assert_eq!(c.spool_max_bytes, 1_610_612_736);
    assert_eq!(c.spool_max_age, Duration::from_secs(24 * 3600));
    assert_eq!(c.heartbeat, Duration::from_millis(250));
    assert_eq!(c.reconnect_max, Duration::from_secs(60));
    assert!(c.grants.is_empty(), "no grant: read-only");
    assert_eq!(
        c.send[0].mode,
        SendMode::Change { deadband: 0.5, deadband_percent: 2.0, max_silence: Duration::from_secs(300) }
    );
    assert_eq!(c.writeback[0].on_loss, OnLoss::Fallback(Value::Bool(false)));
    assert_eq!(c.writeback[0].loss_after, Duration::from_secs(2));
}

#[test]
fn configs_without_link_have_no_links() {
    assert!(good("minimal.toml").links.is_none());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
    let model = config::load(&path).unwrap_or_else(|e| panic!("gateway.toml:\n{e}"));
    assert!(model.links.is_none(), "the demo runs gateway.toml alone");
}

#[test]
fn two_site_examples_load_and_pair() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let load = |name: &str| config::load(&dir.join(name)).unwrap_or_else(|e| panic!("examples/{name}:\n{e}"));
    let (a, b) = (load("site-a.toml"), load("site-b.toml"));
    let (la, lb) = (a.links.expect("site-a has links"), b.links.expect("site-b has links"));
    assert_eq!(a.gateway.name, "site-a");
    assert_eq!(b.gateway.name, "site-b");
    let (to_b, to_a) = (&la.peers[0], &lb.peers[0]);
    assert_eq!(to_b.name, "site-b");
    assert_eq!(to_a.name, "site-a");
    // site-a dials the address site-b listens on.
    assert_eq!(la.listen, None);
    assert_eq!(to_a.dial, Dial::Accept);
    let listen = lb.listen.expect("site-b listens");
    assert_eq!(to_b.dial, Dial::Connect(listen.to_string()));
    assert!(lb.allow.iter().any(|n| n.contains(&"127.0.0.1".parse::<std::net::IpAddr>().expect("ip"))));
    // site-b grants site-a one limited setpoint and mirrors site-a's boiler setpoint.
    assert_eq!(to_a.grants.len(), 1);
    assert!(to_a.grants[0].min.is_some() && to_a.grants[0].max.is_some());
    let wb = &to_a.writeback[0];
    assert!(matches!(wb.on_loss, OnLoss::Fallback(_)));
    let sent_by_a = to_b.send.iter().flat_map(|r| &r.matched);
    assert!(sent_by_a.clone().any(|p| *p == wb.from), "{} is sent by site-a", wb.from);
    assert!(to_a.send.iter().any(|r| !r.matched.is_empty()), "site-b sends back");
}

#[test]
fn serial_protocols_resolve() {
    use m2m_gateway::model::RawMode;
    use m2m_gateway::serial::checksum::Checksum;
    use m2m_gateway::serial::raw::FrameEnd;

    let model = good("serial.toml");
    let ascii = &model.buses[0];
    assert_eq!(ascii.protocol, Protocol::ModbusAscii);
    assert_eq!(ascii.line.data_bits, 7);
    let weighing = &model.buses[1];
    assert_eq!(weighing.protocol, Protocol::Raw);
    assert!(weighing.devices.is_empty());
    let [scale, meter] = &weighing.raw_devices[..] else { panic!("two raw devices") };
    assert_eq!((scale.id, meter.id), (1, 2), "pseudo units in file order, never 0");
    assert_eq!(
        scale.mode,
        RawMode::Poll { request: b"W\r\n".to_vec(), interval: Duration::from_millis(500) }
    );
    assert_eq!(scale.timeout, Duration::from_millis(500), "the bus timeout");
    assert_eq!(scale.points[0].name, "scale.weight");
    assert_eq!(scale.points[0].stale_after, Duration::from_millis(1500));
    assert_eq!(scale.commands.len(), 2);
    assert!(scale.commands[0].ok.is_some() && scale.commands[0].reply);
    assert!(!scale.commands[1].reply);
    // The request carries its CRC-16/MODBUS, low byte first.
    assert_eq!(
        meter.mode,
        RawMode::Poll { request: vec![0x01, 0x52, 0x81, 0xDD], interval: Duration::from_secs(2) }
    );
    assert_eq!(meter.framing.framing.end, FrameEnd::Fixed(9));
    assert_eq!(meter.framing.checksum.kind, Checksum::Crc16Modbus);
    let gps = &model.buses[2].raw_devices[0];
    assert_eq!(gps.mode, RawMode::Stream);
    assert_eq!(gps.points.len(), 3);
    assert_eq!(gps.points[0].stale_after, Duration::from_secs(5));
    let analyser = &model.buses[3].raw_devices[0];
    // {address} put in, sum8 over the whole request appended.
    let RawMode::Poll { request, .. } = &analyser.mode else { panic!("polled") };
    assert_eq!(&request[..5], b"\x02R07\x03");
    assert_eq!(request.len(), 6);
    assert_eq!(
        analyser.framing.framing.end,
        FrameEnd::LengthField { offset: 1, width: 1, big_endian: true, adjust: 3 }
    );
}

#[test]
fn server_units_and_grants_are_resolved() {
    assert!(good("minimal.toml").server.is_none(), "no [server]: nothing listens");
    let model = good("server.toml");
    assert_eq!(model.buses[0].port, "tcp://192.168.127.254:4001");
    let server = model.server.expect("[server] present");
    assert_eq!(server.listen, "0.0.0.0:502".parse().expect("addr"));
    assert_eq!((server.max_connections, server.max_in_flight), (16, 2));
    assert_eq!(server.idle_timeout, Duration::from_secs(300));
    let units: Vec<(u8, &str, &str, ServeMode)> =
        server.units.iter().map(|u| (u.unit, u.device.as_str(), u.bus.as_str(), u.mode)).collect();
    assert_eq!(
        units,
        [
            // Default max_age: the device's longest stale_after (20s beats 3 x 2s).
            (10, "boiler", "nport", ServeMode::Agent { max_age: Duration::from_secs(20) }),
            (2, "meter", "nport", ServeMode::Pass),
            (11, "boiler", "nport", ServeMode::Agent { max_age: Duration::from_secs(3) }),
        ]
    );
    assert_eq!(
        server.grants,
        [
            WriteGrant { unit: 10, table: Table::Holding, start: 100, count: 10 },
            WriteGrant { unit: 2, table: Table::Coils, start: 0, count: 1 },
        ]
    );
    assert!(server.grants[0].covers(10, Table::Holding, 109));
    assert!(!server.grants[0].covers(10, Table::Holding, 110));
    assert!(!server.grants[0].covers(11, Table::Holding, 100));
    let defaults =
        config::parse("[gateway]\nname = \"a\"\n[server]\n", "t.toml").expect("an empty [server] is valid");
    let server = defaults.server.expect("[server] present");
    assert_eq!(server.listen, "127.0.0.1:5020".parse().expect("addr"), "loopback, no root needed");
    assert_eq!(server.idle_timeout, Duration::from_secs(60));
    assert!(server.units.is_empty() && server.grants.is_empty());
}

#[test]
fn plc_targets_are_resolved() {
    use m2m_gateway::model::{Deliver, MapTarget, PlcWatchdog};
    let model = good("plc.toml");
    let plc = &model.plcs[0];
    assert_eq!((plc.name.as_str(), plc.address.as_str(), plc.unit), ("line-plc", "10.0.0.50:502", 3));
    assert_eq!(plc.deliver, Deliver::All);
    assert_eq!(plc.timeout, Duration::from_secs(1));
    assert_eq!(plc.spool, Path::new("/var/lib/m2m-gateway/plc-line.db"));
    assert_eq!(plc.watchdog, Some(PlcWatchdog { address: 900, interval: Duration::from_millis(500) }));
    let t = &plc.map[0].targets;
    assert_eq!(
        t[0],
        MapTarget {
            point: "boiler.temp".into(),
            table: Table::Holding,
            address: 100,
            data_type: DataType::F32,
            order: WordOrder::Cdab,
            scale: 1.0,
            offset: 0.0,
            eng_unit: None,
        },
        "a scaled point goes as f32"
    );
    assert_eq!((t[1].address, t[1].data_type), (102, DataType::U32), "next address, own type");
    assert!(matches!(plc.map[0].mode, SendMode::Change { deadband, .. } if deadband == 0.5));
    let c = &plc.map[1].targets[0];
    assert_eq!((c.table, c.address, c.data_type), (Table::Coils, 7, DataType::Bool));
    assert_eq!(plc.map[1].mode, SendMode::Periodic { interval: Duration::from_secs(5) });
    // `check` shows the requests a full write takes: one FC16 for the block, FC5 for the coil.
    let shown = m2m_gateway::plc::describe(plc);
    assert!(shown.contains("3 point(s) in 2 write(s)"), "{shown}");
    assert!(
        shown.contains("FC16 holding 100..=103 (4 registers)") && shown.contains("FC5  coil 7"),
        "{shown}"
    );
    assert!(shown.contains("FC6  holding 900 watchdog counter, every 500ms"), "{shown}");
}

#[test]
fn templates_and_includes_expand() {
    let model = good("templates.toml");
    let bus = &model.buses[0];
    let names: Vec<&str> = bus.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["meter_1", "meter_2"], "devices from the included file");
    let [one, two] = &bus.devices[..] else { panic!("two meters") };
    assert_eq!(one.template.as_deref(), Some("meter"));
    let points = |d: &m2m_gateway::model::Device| d.points.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(points(one), ["meter_1.voltage", "meter_1.energy"]);
    assert_eq!(
        points(two),
        ["meter_2.voltage", "meter_2.energy", "meter_2.frequency"],
        "template points first"
    );
    // The template's settings, 1-based addresses and the per-device overrides.
    assert_eq!(one.points[0].address, 0);
    assert_eq!(one.points[1].address, 342);
    assert_eq!(one.points[1].interval, Duration::from_secs(5));
    assert_eq!((one.points[1].scale, one.points[1].unit.as_deref()), (1.0, Some("kWh")));
    assert_eq!(two.points[1].interval, Duration::from_secs(1), "device interval overrides the template's");
    assert_eq!((two.points[1].scale, two.points[1].unit.as_deref()), (1000.0, Some("Wh")));
    assert_eq!(
        (two.points[1].table, two.points[1].address),
        (Table::Input, 342),
        "the rest from the template"
    );
    assert_eq!(two.points[2].address, 70);
}

#[test]
fn site_a_includes_the_boiler_house_of_gateway_toml() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let load = |path: &str| config::load(&root.join(path)).unwrap_or_else(|e| panic!("{path}:\n{e}"));
    let (site_a, shipped) = (load("examples/site-a.toml"), load("gateway.toml"));
    // The included file and gateway.toml describe one plant: same buses, devices, points.
    assert_eq!(format!("{:?}", site_a.buses), format!("{:?}", shipped.buses));
    assert_eq!(site_a.buses[0].devices.iter().map(|d| d.points.len()).sum::<usize>(), 17);
}

#[test]
fn example_templates_expand_in_the_metering_example() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/metering.toml");
    let model = config::load(&path).unwrap_or_else(|e| panic!("examples/metering.toml:\n{e}"));
    let devices = &model.buses[0].devices;
    let made_from: Vec<(&str, Option<&str>)> =
        devices.iter().map(|d| (d.name.as_str(), d.template.as_deref())).collect();
    assert_eq!(
        made_from,
        [
            ("incomer", Some("schneider-pm5xxx")),
            ("feeder_1", Some("eastron-sdm630")),
            ("feeder_2", Some("eastron-sdm630")),
            ("lighting", Some("eastron-sdm120")),
            ("fan_1", Some("altivar-atv320")),
        ]
    );
    let point = |device: usize, name: &str| {
        devices[device]
            .points
            .iter()
            .find(|p| p.name.ends_with(&format!(".{name}")))
            .unwrap_or_else(|| panic!("{} has no point {name}", devices[device].name))
    };
    // Register numbers as the manuals print them, 1-based: 30001 is wire address 0.
    assert_eq!((point(1, "voltage_l1").table, point(1, "voltage_l1").address), (Table::Input, 0));
    assert_eq!(point(1, "voltage_l1").data_type, DataType::F32);
    assert_eq!((point(0, "current_a").table, point(0, "current_a").address), (Table::Holding, 2999));
    assert_eq!(point(4, "output_frequency").address, 3202, "the drive's logical addresses");
    assert_eq!(point(4, "fault").data_type, DataType::Bit(3));
    // feeder_2: its interval, one overridden point, one added; the rest as feeder_1's.
    assert_eq!(point(2, "voltage_l1").interval, Duration::from_secs(2));
    assert_eq!(point(1, "voltage_l1").interval, Duration::from_secs(5));
    assert_eq!(point(2, "energy_import").interval, Duration::from_secs(10));
    assert_eq!(point(2, "energy_import").address, point(1, "energy_import").address);
    assert_eq!(point(2, "total_energy").address, 342);
    assert_eq!(devices[2].points.len(), devices[1].points.len() + 1);
}
