//! Transparent routes (`[[server.route]]`) and broadcast, end to end: a Modbus-TCP master
//! reaches ten simulated units on a pseudo-terminal through the gateway with no device
//! declared for them, with every function code relayed byte for byte, writes refused on a
//! read-only route, and unit-0 writes broadcast only where the configuration opts in.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Rig, wait_until, within};
use m2m_gateway::point::value::Table;
use m2m_gateway::sim::Fault;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Units 1..=10, each with holding 0..=3 = unit*100 + i, input 0..=1, coils 0..=7 and
/// discrete inputs 0..=2.
fn sim() -> String {
    let mut s = String::new();
    for u in 1..=10u16 {
        s += &format!(
            r#"
[[unit]]
unit = {u}
[[unit.register]]
table = "holding"
address = 0
values = [{}, {}, {}, {}]
[[unit.register]]
table = "input"
address = 0
values = [{}, 7]
[[unit.register]]
table = "coils"
address = 0
values = [1, 0, 1, 0, 0, 0, 0, 0]
[[unit.register]]
table = "discrete"
address = 0
values = [0, 1, 1]
"#,
            u * 100,
            u * 100 + 1,
            u * 100 + 2,
            u * 100 + 3,
            u
        );
    }
    s
}

/// Units 101..=110 reach bus units 1..=10 (writable, taking broadcasts when
/// `broadcast` is true); units 1..=10 reach the same units read-only, but for a grant on
/// unit 2. A declared device (unit 1) is polled on the same bus.
fn gateway(broadcast: bool) -> String {
    format!(
        r#"
[gateway]
name = "routes"
[[bus]]
name = "line"
port = "{{port}}"
timeout = "100ms"
retries = 0
broadcast = {broadcast}

[[device]]
name = "first"
bus = "line"
unit = 1
interval = "100ms"
point = [{{ name = "t", table = "holding", address = 0 }}]

[server]
listen = "127.0.0.1:0"

[[server.route]]
units = "101-110"
bus = "line"
unit_offset = 100
writable = true
broadcast = {broadcast}

[[server.route]]
units = "1-10"
bus = "line"

[[server.grant]]
unit = 2
table = "holding"
address = 0
"#
    )
}

fn start(broadcast: bool) -> (Rig, SocketAddr) {
    let rig = Rig::start(&sim(), &gateway(broadcast));
    let addr = rig.gateway().server_addr.expect("server listening");
    (rig, addr)
}

fn mbap(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut f = tid.to_be_bytes().to_vec();
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&u16::try_from(pdu.len() + 1).expect("short").to_be_bytes());
    f.push(unit);
    f.extend_from_slice(pdu);
    f
}

/// Sends one raw MBAP request and returns the answer PDU (function code first).
async fn raw(stream: &mut TcpStream, tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    stream.write_all(&mbap(tid, unit, pdu)).await.expect("send");
    let mut head = [0u8; 7];
    within(SECS(3), "answer header", stream.read_exact(&mut head)).await.expect("header");
    assert_eq!(u16::from_be_bytes([head[0], head[1]]), tid, "transaction id echoed");
    assert_eq!(head[6], unit, "unit echoed");
    let len = usize::from(u16::from_be_bytes([head[4], head[5]])) - 1;
    let mut pdu = vec![0u8; len];
    within(SECS(3), "answer pdu", stream.read_exact(&mut pdu)).await.expect("pdu");
    pdu
}

/// The device identification the simulator answers (FC43/14, basic objects).
fn device_id() -> Vec<u8> {
    let mut want = vec![0x2B, 0x0E, 1, 1, 0, 0, 3];
    for (id, v) in [(0u8, &b"m2m-gateway"[..]), (1, b"SIM-RTU"), (2, b"1.0")] {
        want.push(id);
        want.push(v.len() as u8);
        want.extend_from_slice(v);
    }
    want
}

#[tokio::test]
async fn a_route_serves_ten_undeclared_units_with_every_function_byte_for_byte() {
    let (rig, addr) = start(false);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut tid = 0u16;
    let mut ask = async |s: &mut TcpStream, unit: u8, pdu: &[u8]| {
        tid += 1;
        raw(s, tid, unit, pdu).await
    };
    for u in 1..=10u8 {
        let unit = 100 + u;
        let base = 100 * u16::from(u);
        let w = |i: u16| (base + i).to_be_bytes();
        let (a, b, c, d) = (w(0), w(1), w(2), w(3));
        // Reads of every table.
        assert_eq!(
            ask(&mut s, unit, &[3, 0, 0, 0, 4]).await,
            [3, 8, a[0], a[1], b[0], b[1], c[0], c[1], d[0], d[1]],
            "FC3 unit {unit}"
        );
        assert_eq!(ask(&mut s, unit, &[4, 0, 0, 0, 2]).await, [4, 4, 0, u, 0, 7], "FC4 unit {unit}");
        assert_eq!(ask(&mut s, unit, &[1, 0, 0, 0, 3]).await, [1, 1, 0b101], "FC1 unit {unit}");
        assert_eq!(ask(&mut s, unit, &[2, 0, 0, 0, 3]).await, [2, 1, 0b110], "FC2 unit {unit}");
        // Writes of every kind, checked on the device.
        assert_eq!(ask(&mut s, unit, &[6, 0, 1, 0x12, 0x34]).await, [6, 0, 1, 0x12, 0x34]);
        assert_eq!(rig.sim.register(u, Table::Holding, 1), Some(0x1234));
        assert_eq!(ask(&mut s, unit, &[16, 0, 2, 0, 2, 4, 0, 0x19, 0, 8]).await, [16, 0, 2, 0, 2]);
        assert_eq!(rig.sim.register(u, Table::Holding, 3), Some(8));
        assert_eq!(ask(&mut s, unit, &[5, 0, 1, 0xFF, 0]).await, [5, 0, 1, 0xFF, 0]);
        assert_eq!(rig.sim.bit(u, Table::Coils, 1), Some(true));
        assert_eq!(ask(&mut s, unit, &[15, 0, 4, 0, 3, 1, 0b101]).await, [15, 0, 4, 0, 3]);
        assert_eq!(rig.sim.bit(u, Table::Coils, 6), Some(true));
        assert_eq!(ask(&mut s, unit, &[22, 0, 2, 0, 0xF2, 0, 0x25]).await, [22, 0, 2, 0, 0xF2, 0, 0x25]);
        assert_eq!(
            rig.sim.register(u, Table::Holding, 2),
            Some(0x15),
            "(0x19 AND 0xF2) OR (0x25 AND NOT 0xF2)"
        );
        // FC23: writes holding 0, then reads 0..=1.
        assert_eq!(
            ask(&mut s, unit, &[23, 0, 0, 0, 2, 0, 0, 0, 1, 2, 0xAB, 0xCD]).await,
            [23, 4, 0xAB, 0xCD, 0x12, 0x34]
        );
        // Functions the gateway does not interpret are relayed as they are, both ways.
        assert_eq!(ask(&mut s, unit, &[8, 0, 0, 0xA5, 0x37, 1, 2, 3]).await, [8, 0, 0, 0xA5, 0x37, 1, 2, 3]);
        assert_eq!(ask(&mut s, unit, &[0x2B, 0x0E, 1, 0]).await, device_id(), "FC43 unit {unit}");
        // The device's own exceptions come back as it sent them.
        assert_eq!(ask(&mut s, unit, &[3, 0, 50, 0, 1]).await, [0x83, 0x02]);
        assert_eq!(ask(&mut s, unit, &[0x41, 0]).await, [0xC1, 0x01]);
    }
    // A silent unit is 0x0B; a unit no route covers is 0x0A.
    rig.sim.set_fault(5, Fault::Silent).expect("fault");
    assert_eq!(ask(&mut s, 105, &[3, 0, 0, 0, 1]).await, [0x83, 0x0B]);
    assert_eq!(ask(&mut s, 111, &[3, 0, 0, 0, 1]).await, [0x83, 0x0A]);
    // The declared device on the same bus is polled all along.
    wait_until("the declared device polled", SECS(3), || rig.value("first.t").is_some()).await;
    rig.stop().await;
}

#[tokio::test]
async fn a_read_only_route_refuses_writes_before_the_bus() {
    let (rig, addr) = start(false);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(raw(&mut s, 1, 3, &[3, 0, 0, 0, 1]).await, [3, 2, 1, 44], "reads go through");
    let before = rig.sim.stats(3).requests;
    // No grant on unit 3: writing is not a function it offers.
    assert_eq!(raw(&mut s, 2, 3, &[6, 0, 0, 0, 1]).await, [0x86, 0x01]);
    assert_eq!(raw(&mut s, 3, 3, &[5, 0, 0, 0xFF, 0]).await, [0x85, 0x01]);
    assert_eq!(raw(&mut s, 4, 3, &[16, 0, 0, 0, 1, 2, 0, 1]).await, [0x90, 0x01]);
    assert_eq!(raw(&mut s, 5, 3, &[23, 0, 0, 0, 1, 0, 0, 0, 1, 2, 0, 1]).await, [0x97, 0x01]);
    assert_eq!(rig.sim.stats(3).requests, before, "no write reached the bus");
    assert_eq!(rig.sim.register(3, Table::Holding, 0), Some(300));
    // Unit 2 has a grant for holding 0 only.
    assert_eq!(raw(&mut s, 6, 2, &[6, 0, 0, 0, 5]).await, [6, 0, 0, 0, 5]);
    assert_eq!(rig.sim.register(2, Table::Holding, 0), Some(5));
    assert_eq!(raw(&mut s, 7, 2, &[6, 0, 1, 0, 5]).await, [0x86, 0x02]);
    assert_eq!(rig.sim.register(2, Table::Holding, 1), Some(201));
    rig.stop().await;
}

#[tokio::test]
async fn a_broadcast_write_reaches_every_unit_and_nobody_answers_on_the_line() {
    let (rig, addr) = start(true);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let answered: Vec<u64> = (1..=10).map(|u| rig.sim.stats(u).answered).collect();
    let requests: Vec<u64> = (1..=10).map(|u| rig.sim.stats(u).requests).collect();
    // FC6 to unit 0: the master gets the echo; every unit executed it.
    assert_eq!(raw(&mut s, 1, 0, &[6, 0, 3, 0x03, 0x09]).await, [6, 0, 3, 0x03, 0x09]);
    for u in 1..=10 {
        assert_eq!(rig.sim.register(u, Table::Holding, 3), Some(777), "unit {u}");
    }
    // FC15 and FC16 too.
    assert_eq!(raw(&mut s, 2, 0, &[15, 0, 5, 0, 2, 1, 0b11]).await, [15, 0, 5, 0, 2]);
    assert_eq!(raw(&mut s, 3, 0, &[16, 0, 1, 0, 2, 4, 0, 1, 0, 2]).await, [16, 0, 1, 0, 2]);
    for u in 1..=10 {
        assert_eq!(rig.sim.bit(u, Table::Coils, 6), Some(true), "unit {u}");
        assert_eq!(rig.sim.register(u, Table::Holding, 2), Some(2), "unit {u}");
    }
    // Each unit heard three frames (besides the polls of unit 1) and answered none.
    for u in 2..=10u8 {
        let i = usize::from(u - 1);
        assert_eq!(rig.sim.stats(u).requests, requests[i] + 3, "unit {u} heard the broadcasts");
        assert_eq!(rig.sim.stats(u).answered, answered[i], "unit {u} answered nothing");
    }
    // Reads and other functions are never broadcast.
    assert_eq!(raw(&mut s, 4, 0, &[3, 0, 0, 0, 1]).await, [0x83, 0x01]);
    assert_eq!(raw(&mut s, 5, 0, &[22, 0, 0, 0, 0, 0, 0]).await, [0x96, 0x01]);
    // Normal traffic goes on after them.
    assert_eq!(raw(&mut s, 6, 104, &[3, 0, 3, 0, 1]).await, [3, 2, 0x03, 0x09]);
    rig.stop().await;
}

#[tokio::test]
async fn without_the_option_a_broadcast_is_refused_and_never_sent() {
    let (rig, addr) = start(false);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let heard: Vec<u64> = (2..=10).map(|u| rig.sim.stats(u).requests).collect();
    assert_eq!(raw(&mut s, 1, 0, &[6, 0, 3, 0x03, 0x09]).await, [0x86, 0x0A]);
    assert_eq!(raw(&mut s, 2, 0, &[3, 0, 0, 0, 1]).await, [0x83, 0x0A]);
    for u in 1..=10 {
        assert_eq!(rig.sim.register(u, Table::Holding, 3), Some(100 * u16::from(u) + 3), "unit {u}");
    }
    // A broadcast would count as a request at every unit.
    let now: Vec<u64> = (2..=10).map(|u| rig.sim.stats(u).requests).collect();
    assert_eq!(now, heard, "no broadcast frame on the line");
    rig.stop().await;
}
