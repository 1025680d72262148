//! `Gateway::reload` in one process, against the simulator on a virtual serial pair and a
//! Modbus-TCP master on 127.0.0.1: the server keeps its socket and its masters'
//! connections while its unit table (units and routes) changes, a change of devices
//! keeps the line open, a change of bus settings reopens it, removed devices' points turn
//! `comm_fail`, and a configuration the machine cannot honour is refused with nothing
//! stopped.

use crate::common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{Rig, model, wait_until, within};
use m2m_gateway::point::value::Quality;
use tokio_modbus::client::{Reader, tcp::connect_slave};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

const SIM: &str = r#"
[[unit]]
unit = 1
[[unit.register]]
table = "holding"
address = 0
values = [100]

[[unit]]
unit = 2
[[unit.register]]
table = "holding"
address = 0
values = [7]
"#;

const V1: &str = r#"
[gateway]
name = "test"

[[bus]]
name = "line"
port = "{port}"
timeout = "100ms"

[[device]]
name = "boiler"
bus = "line"
unit = 1
interval = "50ms"
point = [{ name = "t", table = "holding", address = 0 }]

[server]
listen = "127.0.0.1:0"

[[server.unit]]
unit = 10
agent = "boiler"
"#;

const METER: &str = r#"
[[device]]
name = "meter"
bus = "line"
unit = 2
interval = "50ms"
point = [{ name = "e", table = "holding", address = 0 }]
"#;

const METER_UNIT: &str = r#"
[[server.unit]]
unit = 11
agent = "meter"
"#;

const S: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_keeps_its_socket_and_connections_and_the_line_stays_open() {
    common::logs();
    let mut rig = Rig::start(SIM, V1);
    let port = rig.port.path().display().to_string();
    let addr = rig.gateway().server_addr.expect("server listening");
    let mut master = within(S, "connect", connect_slave(addr, Slave(10))).await.expect("connect");
    for _ in 0..300 {
        if master.read_holding_registers(0, 1).await.expect("transport") == Ok(vec![100]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(master.read_holding_registers(0, 1).await.expect("transport"), Ok(vec![100]));
    master.set_slave(Slave(11));
    assert_eq!(
        master.read_holding_registers(0, 1).await.expect("transport"),
        Err(ExceptionCode::GatewayPathUnavailable),
        "unit 11 is not served yet"
    );

    // A device and a served unit are added: the poller restarts, the line stays open.
    let v2 = model(&format!("{V1}{METER_UNIT}{METER}"), &port);
    let gateway = rig.gateway.as_mut().expect("running");
    let changes = gateway.reload(&v2).await.expect("reload");
    assert_eq!(
        changes.restarted,
        vec!["poller of bus line: its devices changed (the line stays open)".to_string()],
        "{changes:?}"
    );
    assert!(changes.added.is_empty() && changes.removed.is_empty(), "{changes:?}");
    assert_eq!(gateway.server_addr, Some(addr), "the server keeps its socket");
    let mut answered = None;
    for _ in 0..300 {
        answered = Some(master.read_holding_registers(0, 1).await.expect("the same connection"));
        if answered == Some(Ok(vec![7])) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        answered,
        Some(Ok(vec![7])),
        "the new unit answers on the connection opened before the reload"
    );
    let bus = rig.gateway().buses[0].clone();
    assert_eq!(bus.stats().opens.load(Relaxed), 1, "the line was not reopened");

    // The device goes again: its point turns comm_fail and unit 11 is no longer served.
    let gateway = rig.gateway.as_mut().expect("running");
    gateway.reload(&model(V1, &port)).await.expect("reload");
    assert_eq!(rig.quality("meter.e"), Some(Quality::CommFail));
    assert_eq!(
        master.read_holding_registers(0, 1).await.expect("transport"),
        Err(ExceptionCode::GatewayPathUnavailable)
    );

    // A bus setting changes: the bus restarts (its port reopens) and polls again.
    let gateway = rig.gateway.as_mut().expect("running");
    let changes = gateway.reload(&model(&V1.replace("\"100ms\"", "\"150ms\""), &port)).await.expect("reload");
    assert_eq!(changes.restarted, vec!["bus line: its settings changed".to_string()], "{changes:?}");
    let bus = rig.gateway().buses[0].clone();
    wait_until("the restarted bus polls", S, || bus.stats().transactions.load(Relaxed) > 3).await;
    master.set_slave(Slave(10));
    assert_eq!(master.read_holding_registers(0, 1).await.expect("the same connection"), Ok(vec![100]));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_the_machine_cannot_honour_is_refused_and_nothing_stops() {
    common::logs();
    let mut rig = Rig::start(SIM, V1);
    let port = rig.port.path().display().to_string();
    let bus = rig.gateway().buses[0].clone();
    wait_until("polls", S, || bus.stats().transactions.load(Relaxed) > 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let links = format!(
        "\n[link]\nidentity = \"{}/missing\"\ndata_dir = \"{}/data\"\n\n[[peer]]\nname = \"b\"\nfingerprint = \"{}\"\ndial = \"127.0.0.1:1\"\n",
        dir.path().display(),
        dir.path().display(),
        ["AB"; 32].join(":")
    );
    let bad = model(&format!("{V1}{METER}{links}"), &port);
    let gateway = rig.gateway.as_mut().expect("running");
    let err = gateway.reload(&bad).await.expect_err("no identity: refused");
    assert!(err.to_string().contains("identity in"), "{err}");
    assert_eq!(gateway.model().buses[0].devices.len(), 1, "the running configuration is kept");
    assert!(gateway.links.is_empty());
    // The same bus task goes on polling.
    let before = bus.stats().transactions.load(Relaxed);
    wait_until("polls go on", S, || bus.stats().transactions.load(Relaxed) > before + 5).await;
    assert!(rig.gateway().image.get("meter.e").is_none(), "nothing of the refused file runs");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rebuilds_the_routes_with_the_unit_table() {
    let mut rig = Rig::start(SIM, V1);
    let port = rig.port.path().display().to_string();
    let addr = rig.gateway().server_addr.expect("server listening");
    let mut master = within(S, "connect", connect_slave(addr, Slave(102))).await.expect("connect");
    assert_eq!(
        master.read_holding_registers(0, 1).await.expect("transport"),
        Err(ExceptionCode::GatewayPathUnavailable),
        "unit 102 is not routed yet"
    );

    // A route is added: masters' units 102-103 reach bus units 2-3, on the open connection.
    let route = "\n[[server.route]]\nunits = \"102-103\"\nbus = \"line\"\nunit_offset = 100\n";
    let gateway = rig.gateway.as_mut().expect("running");
    let changes = gateway.reload(&model(&format!("{V1}{route}"), &port)).await.expect("reload");
    assert_eq!(
        changes.updated,
        vec!["modbus-tcp server: unit table swapped (connections kept)".to_string()],
        "{changes:?}"
    );
    assert_eq!(master.read_holding_registers(0, 1).await.expect("the same connection"), Ok(vec![7]));

    // The offset changes: the same master unit now reaches bus unit 1.
    let gateway = rig.gateway.as_mut().expect("running");
    let moved = route.replace("unit_offset = 100", "unit_offset = 101");
    gateway.reload(&model(&format!("{V1}{moved}"), &port)).await.expect("reload");
    assert_eq!(master.read_holding_registers(0, 1).await.expect("the same connection"), Ok(vec![100]));

    // The route goes: the unit is no longer served.
    let gateway = rig.gateway.as_mut().expect("running");
    gateway.reload(&model(V1, &port)).await.expect("reload");
    assert_eq!(
        master.read_holding_registers(0, 1).await.expect("transport"),
        Err(ExceptionCode::GatewayPathUnavailable)
    );
    rig.stop().await;
}

/// A PLC sink (at a listener the test holds, so nothing else can take its port) beside
/// the bus, the device and the server of `V1`.
fn with_plc(listener: &std::net::TcpListener, spool: &std::path::Path, timeout: &str) -> String {
    format!(
        r#"{V1}
[[plc]]
name = "p"
address = "{}"
timeout = "{timeout}"
spool = "{}"
[[plc.map]]
points = ["boiler.*"]
table = "holding"
address = 0
"#,
        listener.local_addr().expect("bound"),
        spool.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_configuration_restarts_nothing_and_a_changed_section_only_itself() {
    common::logs();
    let plc = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the plc's port");
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("plc-p.db");
    let v1 = with_plc(&plc, &spool, "1s");
    let mut rig = Rig::start(SIM, &v1);
    let port = rig.port.path().display().to_string();
    let bus = rig.gateway().buses[0].clone();
    wait_until("the bus polls", S, || bus.stats().transactions.load(Relaxed) > 0).await;

    // The same text parsed again: new values (compiled globs, new strings), equal ones.
    let gateway = rig.gateway.as_mut().expect("running");
    let changes = gateway.reload(&model(&v1, &port)).await.expect("reload");
    assert!(changes.is_empty(), "an unchanged configuration changed {changes:?}");

    // Only the PLC's timeout changes: only the PLC sink restarts.
    let changes = gateway.reload(&model(&with_plc(&plc, &spool, "2s"), &port)).await.expect("reload");
    assert_eq!(changes.restarted, vec!["plc p: its settings changed".to_string()], "{changes:?}");
    assert!(
        changes.added.is_empty() && changes.removed.is_empty() && changes.updated.is_empty(),
        "{changes:?}"
    );
    assert_eq!(bus.stats().opens.load(Relaxed), 1, "the line was not reopened");
    rig.stop().await;
}
