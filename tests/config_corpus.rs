//! Configuration corpus: every file in `tests/configs/bad/` must fail with the messages
//! its `# expect:` lines name; every file in `tests/configs/good/` and the shipped
//! `gateway.toml` must load. The corpus sizes are asserted, so a moved directory cannot
//! make these tests pass by checking nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use m2m_gateway::config::{self, ConfigError};
use m2m_gateway::model::{Model, Parity, Protocol};
use m2m_gateway::value::{DataType, Table, WordOrder};

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn bad_configs_fail_with_their_expected_messages() {
    let files = corpus("bad");
    assert!(files.len() >= 15, "only {} bad configs", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = file_name(path);
        let text = std::fs::read_to_string(path).expect("read corpus file");
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# expect: "))
            .collect();
        if expected.is_empty() {
            failures.push(format!("{name}: no `# expect:` line"));
            continue;
        }
        match config::parse(&text, &name) {
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
    assert!(files.len() >= 3, "only {} good configs", files.len());
    for path in &files {
        if let Err(err) = config::load(path) {
            panic!("{} should load:\n{err}", path.display());
        }
    }
}

fn good(name: &str) -> Model {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/configs/good")
        .join(name);
    config::load(&path).unwrap_or_else(|e| panic!("{name}:\n{e}"))
}

#[test]
fn defaults_are_resolved() {
    let model = good("minimal.toml");
    assert_eq!(model.gateway.name, "plant-7");
    assert_eq!(model.gateway.summary_interval, Duration::from_secs(60));
    let bus = &model.buses[0];
    assert_eq!(bus.protocol, Protocol::ModbusRtu);
    assert_eq!(bus.line.baud, 19_200);
    assert_eq!(bus.line.parity, Parity::Even);
    assert_eq!((bus.line.data_bits, bus.line.stop_bits), (8, 1));
    assert_eq!(bus.timeout, Duration::from_millis(200));
    assert_eq!(bus.retries, 1);
    assert_eq!(bus.queue_depth, 64);
    assert_eq!(bus.reopen_max, Duration::from_secs(30));
    let device = &bus.devices[0];
    assert_eq!(
        device.timeout, bus.timeout,
        "device timeout comes from its bus"
    );
    assert_eq!(device.turnaround, Duration::ZERO);
    assert_eq!(
        (device.max_registers, device.max_bits, device.max_gap),
        (125, 2000, 8)
    );
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
    assert_eq!(
        first.points[2].address, 65_532,
        "5 bytes: 3 registers below the flag"
    );
    assert_eq!(first.points[3].scale, 0.5);
    assert_eq!(first.points[3].unit.as_deref(), Some("m3/h"));
    let second = &bus.devices[1];
    assert_eq!(second.timeout, bus.timeout);
    assert_eq!(
        second.points[0].address, 65_535,
        "base 0: address is the wire address"
    );
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
    assert_eq!(
        meter.points[0].address, 0,
        "the meter is configured 1-based"
    );
    let pump = &bus.devices[2];
    let bits = pump
        .points
        .iter()
        .filter(|p| matches!(p.data_type, DataType::Bit(_)))
        .count();
    assert_eq!(bits, 3);
}
