//! `Gateway::reload` in one process, against the simulator on a virtual serial pair and a
//! Modbus-TCP master on 127.0.0.1: the server keeps its socket and its masters'
//! connections while its unit table changes, a change of devices keeps the line open,
//! a change of bus settings reopens it, removed devices' points turn `comm_fail`, and a
//! configuration the machine cannot honour is refused with nothing stopped.

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
