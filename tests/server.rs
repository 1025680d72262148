//! The local Modbus-TCP server end to end: real masters (tokio-modbus TCP clients, and raw
//! sockets where a client library would refuse to send what we test) against the gateway
//! polling the project's simulator on a pseudo-terminal, or over TCP like a serial device
//! server.

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Rig, wait_until, within};
use m2m_gateway::bus::{Job, PASS_THROUGH_STREAK, Priority};
use m2m_gateway::gateway::Gateway;
use m2m_gateway::point::value::{Table, Value};
use m2m_gateway::sim::{Fault, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::{ExceptionCode, Request, Slave};
use tokio_util::sync::CancellationToken;

const SECS: fn(u64) -> Duration = Duration::from_secs;

const GATEWAY: &str = r#"
[gateway]
name = "test"
[[bus]]
name = "line"
port = "{port}"
timeout = "100ms"
retries = 0

[[device]]
name = "boiler"
bus = "line"
unit = 1
interval = "50ms"
point = [
  { name = "t", table = "holding", address = 0 },
  { name = "t3", table = "holding", address = 3 },
  { name = "burner", table = "coils", address = 0, type = "bool" },
  { name = "pump", table = "coils", address = 2, type = "bool" },
]

[[device]]
name = "meter"
bus = "line"
unit = 2
interval = "1h"
point = [{ name = "e", table = "holding", address = 0 }]

[[device]]
name = "dead"
bus = "line"
unit = 3
interval = "1h"
backoff_max = "1h"
point = [{ name = "x", table = "holding", address = 0 }]

[server]
listen = "127.0.0.1:0"
{server_extra}

[[server.unit]]
unit = 10
agent = "boiler"
max_age = "400ms"

[[server.unit]]
unit = 11
agent = "meter"
max_age = "1s"

[[server.unit]]
unit = 20
pass = "meter"

[[server.unit]]
unit = 30
pass = "dead"

[[server.unit]]
unit = 255
pass = "meter"

[[server.grant]]
unit = 10
table = "holding"
address = 3

[[server.grant]]
unit = 20
table = "holding"
address = 0
count = 130

[[server.grant]]
unit = 20
table = "coils"
address = 0
count = 2000
"#;

fn gateway_toml(extra: &str) -> String {
    GATEWAY.replace("{server_extra}", extra)
}

fn start(extra: &str) -> (Rig, SocketAddr) {
    let rig = Rig::start(&common::sim::boiler_meter_dead(), &gateway_toml(extra));
    let addr = rig.gateway().server_addr.expect("server listening");
    (rig, addr)
}

async fn master(addr: SocketAddr, unit: u8) -> Context {
    within(SECS(2), "connect", tokio_modbus::client::tcp::connect_slave(addr, Slave(unit)))
        .await
        .expect("connects")
}

/// Sends one raw MBAP request and returns the answer PDU (function code first).
async fn raw(stream: &mut TcpStream, tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    stream.write_all(&mbap(tid, unit, pdu)).await.expect("send");
    let mut head = [0u8; 7];
    within(SECS(3), "answer header", stream.read_exact(&mut head)).await.expect("header");
    assert_eq!(u16::from_be_bytes([head[0], head[1]]), tid, "transaction id echoed");
    assert_eq!([head[2], head[3]], [0, 0], "protocol id 0");
    assert_eq!(head[6], unit, "unit echoed");
    let len = usize::from(u16::from_be_bytes([head[4], head[5]])) - 1;
    let mut pdu = vec![0u8; len];
    within(SECS(3), "answer pdu", stream.read_exact(&mut pdu)).await.expect("pdu");
    pdu
}

/// True once the peer has closed `stream` (EOF or reset).
async fn closed(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(limit, stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn agent_mode_answers_from_the_image_and_refuses_stale_values() {
    let (rig, addr) = start("");
    let mut m = master(addr, 10).await;
    let mut ok = None;
    for _ in 0..100 {
        match m.read_holding_registers(0, 4).await.expect("transport") {
            Ok(w) => {
                ok = Some(w);
                break;
            }
            Err(ExceptionCode::GatewayTargetDevice) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("unexpected exception {e:?}"),
        }
    }
    assert_eq!(ok, Some(vec![100, 101, 102, 103]), "holding 0..=3 polled as one block");
    assert_eq!(m.read_coils(0, 3).await.expect("transport"), Ok(vec![true, false, true]));
    assert_eq!(m.read_holding_registers(1, 2).await.expect("transport"), Ok(vec![101, 102]));
    // Never polled: no such register for this server.
    assert_eq!(
        m.read_holding_registers(3, 2).await.expect("transport"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        m.read_input_registers(0, 1).await.expect("transport"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    // A new value shows after the next poll, without any request reaching the device.
    rig.sim.set_register(1, Table::Holding, 1, 555).expect("set");
    wait_until("new value polled", SECS(2), || rig.value("boiler.t").is_some()).await;
    let mut seen = false;
    for _ in 0..100 {
        if m.read_holding_registers(1, 1).await.expect("transport") == Ok(vec![555]) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "agent read follows the polls");
    // Unit 10 may write holding 3 only; the write goes to the device.
    assert_eq!(
        m.write_single_register(0, 1).await.expect("transport"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        m.write_single_coil(0, true).await.expect("transport"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(m.write_single_register(3, 9).await.expect("transport"), Ok(()));
    assert_eq!(rig.sim.register(1, Table::Holding, 3), Some(9));
    // No grant at all on unit 11: writing is not an allowed function there.
    let mut meter = master(addr, 11).await;
    assert_eq!(
        meter.write_single_register(0, 1).await.expect("transport"),
        Err(ExceptionCode::IllegalFunction)
    );
    // The meter is polled once an hour: its value is served while younger than max_age
    // (1 s), then refused although the device is fine.
    wait_until("meter polled", SECS(3), || rig.value("meter.e").is_some()).await;
    assert_eq!(meter.read_holding_registers(0, 1).await.expect("transport"), Ok(vec![1000]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        meter.read_holding_registers(0, 1).await.expect("transport"),
        Err(ExceptionCode::GatewayTargetDevice),
        "older than max_age"
    );
    // The device goes quiet: its values turn stale and are refused, not served old.
    rig.sim.set_fault(1, Fault::Silent).expect("fault");
    let mut refused = false;
    for _ in 0..100 {
        if m.read_holding_registers(0, 4).await.expect("transport") == Err(ExceptionCode::GatewayTargetDevice)
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "stale / comm-fail values answer 0x0B");
    rig.stop().await;
}

#[tokio::test]
async fn pass_through_every_function() {
    let (rig, addr) = start("");
    let mut m = master(addr, 20).await;
    let words: Vec<u16> = (1000..1125).collect();
    assert_eq!(m.read_holding_registers(0, 125).await.expect("transport"), Ok(words), "125 registers");
    let coils: Vec<bool> = (0..2000).map(|i| i % 3 == 0).collect();
    assert_eq!(m.read_coils(0, 2000).await.expect("transport"), Ok(coils), "2000 coils");
    assert_eq!(m.read_discrete_inputs(0, 3).await.expect("transport"), Ok(vec![true, true, false]));
    assert_eq!(m.read_input_registers(0, 2).await.expect("transport"), Ok(vec![7, 8]));
    assert_eq!(m.write_single_register(5, 0xBEEF).await.expect("transport"), Ok(()));
    assert_eq!(rig.sim.register(2, Table::Holding, 5), Some(0xBEEF));
    assert_eq!(m.write_single_coil(1, true).await.expect("transport"), Ok(()));
    assert_eq!(rig.sim.bit(2, Table::Coils, 1), Some(true));
    assert_eq!(m.write_multiple_registers(10, &[1, 2, 3]).await.expect("transport"), Ok(()));
    assert_eq!(rig.sim.register(2, Table::Holding, 12), Some(3));
    assert_eq!(m.write_multiple_coils(100, &[true, true, false, true]).await.expect("transport"), Ok(()));
    assert_eq!(rig.sim.bit(2, Table::Coils, 103), Some(true));
    assert_eq!(
        m.read_write_multiple_registers(20, 2, 21, &[77]).await.expect("transport"),
        Ok(vec![1020, 77]),
        "FC23 writes, then reads"
    );
    assert_eq!(m.masked_write_register(30, 0x00F2, 0x0025).await.expect("transport"), Ok(()));
    // The device's own exceptions pass through: an address it does not have ...
    assert_eq!(
        m.read_holding_registers(500, 1).await.expect("transport"),
        Err(ExceptionCode::IllegalDataAddress)
    );
    // ... and a function it does not support (0x41, user defined).
    let mut s = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(raw(&mut s, 7, 20, &[0x41, 0x01]).await, [0xC1, 0x01]);
    rig.stop().await;
}

#[tokio::test]
async fn gateway_exceptions() {
    let (rig, addr) = start("");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // Wait for the first poll of the meter, so later counts are only ours.
    wait_until("meter polled", SECS(3), || rig.value("meter.e").is_some()).await;
    let before = rig.sim.stats(2).requests;
    // Oversize and zero-quantity reads are answered by the gateway alone.
    assert_eq!(raw(&mut s, 1, 20, &[0x03, 0, 0, 0, 126]).await, [0x83, 0x03]);
    assert_eq!(raw(&mut s, 2, 20, &[0x01, 0, 0, 0x07, 0xD1]).await, [0x81, 0x03]);
    assert_eq!(raw(&mut s, 3, 20, &[0x04, 0, 0, 0, 0]).await, [0x84, 0x03]);
    assert_eq!(raw(&mut s, 4, 20, &[0x03, 0xFF, 0xFF, 0, 2]).await, [0x83, 0x02]);
    // Writes outside the grants of a unit that has grants: illegal address.
    assert_eq!(raw(&mut s, 5, 20, &[0x06, 0, 200, 0, 1]).await, [0x86, 0x02]);
    assert_eq!(
        raw(&mut s, 6, 20, &[0x10, 0, 129, 0, 2, 4, 0, 1, 0, 2]).await,
        [0x90, 0x02],
        "straddles the end"
    );
    // Writes to a pass unit without grants: illegal function.
    assert_eq!(raw(&mut s, 7, 30, &[0x05, 0, 0, 0xFF, 0]).await, [0x85, 0x01]);
    assert_eq!(rig.sim.stats(2).requests, before, "none of these reached the bus");
    // No path for an unmapped unit id.
    assert_eq!(raw(&mut s, 8, 99, &[0x03, 0, 0, 0, 1]).await, [0x83, 0x0A]);
    // A device that does not answer: gateway target failed to respond.
    assert_eq!(raw(&mut s, 9, 30, &[0x03, 0, 0, 0, 1]).await, [0x83, 0x0B]);
    // The connection is still good.
    assert_eq!(raw(&mut s, 10, 20, &[0x03, 0, 0, 0, 1]).await, [0x03, 0x02, 0x03, 0xE8]);
    rig.stop().await;
}

#[tokio::test]
async fn malformed_header_closes_only_that_connection() {
    let (rig, addr) = start("");
    let mut good = master(addr, 20).await;
    assert_eq!(good.read_holding_registers(0, 1).await.expect("transport"), Ok(vec![1000]));
    let mut other = TcpStream::connect(addr).await.expect("connect");
    // Protocol id 1 is not Modbus: that frame is discarded unanswered (TCP implementation
    // guide), and the connection, still in step, answers the next request.
    other.write_all(&[0, 1, 0, 1, 0, 6, 20, 3, 0, 0, 0, 1]).await.expect("send");
    assert_eq!(raw(&mut other, 2, 20, &[0x03, 0, 0, 0, 1]).await, [0x03, 0x02, 0x03, 0xE8]);
    let mut bad = TcpStream::connect(addr).await.expect("connect");
    // A length of 300 cannot be a Modbus frame.
    bad.write_all(&[0, 1, 0, 0, 0x01, 0x2C, 20, 3]).await.expect("send");
    assert!(closed(&mut bad, SECS(2)).await, "bad length closes the connection");
    // Nor can a length of 0, and it is judged without waiting for a unit id that, by
    // that length, is not coming (the idle timeout is a minute).
    let mut bad = TcpStream::connect(addr).await.expect("connect");
    bad.write_all(&[0, 1, 0, 0, 0, 0]).await.expect("send");
    assert!(closed(&mut bad, SECS(2)).await, "length 0 closes the connection at once");
    // What was asked before a bad frame is still answered, then the connection closes.
    let mut late = TcpStream::connect(addr).await.expect("connect");
    let mut both = mbap(7, 20, &[0x03, 0, 4, 0, 1]);
    both.extend_from_slice(&[0, 8, 0, 0, 0, 0]);
    late.write_all(&both).await.expect("send");
    let mut answer = [0u8; 11];
    within(SECS(3), "answer", late.read_exact(&mut answer)).await.expect("answered");
    assert_eq!(answer, [0, 7, 0, 0, 0, 5, 20, 0x03, 0x02, 0x03, 0xEC]);
    assert!(closed(&mut late, SECS(2)).await, "then closed");
    assert_eq!(good.read_holding_registers(1, 1).await.expect("transport"), Ok(vec![1001]));
    let mut again = master(addr, 20).await;
    assert_eq!(again.read_holding_registers(2, 1).await.expect("transport"), Ok(vec![1002]));
    rig.stop().await;
}

/// A relayed request that takes longer than the idle timeout keeps its connection: the
/// idle time counts from the answer, not from the request.
#[tokio::test]
async fn a_slow_answer_does_not_idle_out_its_connection() {
    let sim = "[[unit]]\nunit = 4\nfault = \"late 1300ms\"\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nvalues = [42]\n";
    let gateway = "[gateway]\nname = \"test\"\n[[bus]]\nname = \"line\"\nport = \"{port}\"\nretries = 0\n\
        [[device]]\nname = \"slow\"\nbus = \"line\"\nunit = 4\ninterval = \"1h\"\ntimeout = \"2s\"\n\
        point = [{ name = \"x\", table = \"holding\", address = 0 }]\n\
        [server]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"1s\"\n[[server.unit]]\nunit = 4\npass = \"slow\"\n";
    let rig = Rig::start(sim, gateway);
    let addr = rig.gateway().server_addr.expect("server listening");
    let mut m = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(raw(&mut m, 1, 4, &[0x03, 0, 0, 0, 1]).await, [0x03, 0x02, 0, 42]);
    // Right after a 1.3 s answer the connection is still there for the next request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(raw(&mut m, 2, 4, &[0x03, 0, 0, 0, 1]).await, [0x03, 0x02, 0, 42]);
    rig.stop().await;
}

/// Issue 10: masters that each ask something every few seconds must not keep a new master
/// out for good. When all `max_connections` are taken, the longest-idle connection (the
/// one whose last request is oldest, with nothing being answered) is closed to make room.
#[tokio::test]
async fn when_full_the_longest_idle_master_makes_room_and_idle_ones_time_out() {
    let (rig, addr) = start("max_connections = 2\nidle_timeout = \"2s\"");
    let mut a = TcpStream::connect(addr).await.expect("connect");
    let mut b = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(raw(&mut a, 1, 20, &[0x03, 0, 0, 0, 1]).await, [0x03, 0x02, 0x03, 0xE8]);
    assert_eq!(raw(&mut b, 1, 20, &[0x03, 0, 0, 0, 1]).await, [0x03, 0x02, 0x03, 0xE8]);
    // `a` asks again: now `b` is the one that has been quiet longest.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(raw(&mut a, 2, 20, &[0x03, 0, 1, 0, 1]).await, [0x03, 0x02, 0x03, 0xE9]);
    let mut c = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(
        raw(&mut c, 1, 20, &[0x03, 0, 0, 0, 1]).await,
        [0x03, 0x02, 0x03, 0xE8],
        "the new master is served"
    );
    assert!(closed(&mut b, SECS(2)).await, "the longest-idle master gave way");
    assert_eq!(
        raw(&mut a, 3, 20, &[0x03, 0, 1, 0, 1]).await,
        [0x03, 0x02, 0x03, 0xE9],
        "the other kept its slot"
    );
    // The issue's pattern, shrunk: the masters keep asking every 300 ms, and yet every new
    // master gets in (each time the longest-idle one makes room and reconnects).
    for round in 0..4u16 {
        let mut newcomer = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(
            raw(&mut newcomer, 1, 20, &[0x03, 0, 0, 0, 1]).await,
            [0x03, 0x02, 0x03, 0xE8],
            "newcomer {round} served"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A master that says nothing for more than the idle timeout is closed.
    let mut d = TcpStream::connect(addr).await.expect("connect");
    assert!(closed(&mut d, SECS(4)).await, "an idle master is closed");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_masters_are_served_fairly_and_polls_keep_their_rate() {
    let (rig, addr) = start("");
    wait_until("boiler polled", SECS(3), || rig.value("boiler.t").is_some()).await;
    let window = SECS(2);
    let polls_before = rig.sim.stats(1).requests;
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8u16 {
        tasks.push(tokio::spawn(async move {
            let mut m = master(addr, 20).await;
            let (mut ok, mut other) = (0u32, 0u32);
            while started.elapsed() < window {
                match m.read_holding_registers(i, 10).await.expect("transport") {
                    Ok(w) if w[0] == 1000 + i => ok += 1,
                    _ => other += 1,
                }
            }
            (ok, other)
        }));
    }
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.expect("master task"));
    }
    let polls = rig.sim.stats(1).requests - polls_before;
    let elapsed = started.elapsed();
    let served: Vec<u32> = counts.iter().map(|c| c.0).collect();
    assert!(counts.iter().all(|c| c.1 == 0), "every request answered with data: {counts:?}");
    let (min, max) = (*served.iter().min().expect("8"), *served.iter().max().expect("8"));
    assert!(min >= 10, "every master is served: {served:?}");
    assert!(max <= min * 2 + 5, "masters share the line fairly: {served:?}");
    // The boiler has two reads (holding, coils) every 50 ms: 40/s.
    let expected = 40.0 * elapsed.as_secs_f64();
    eprintln!("served per master {served:?}, boiler polls {polls} in {elapsed:?}");
    assert!(polls as f64 >= expected * 0.7, "polls kept their rate: {polls} of {expected:.0} ({served:?})");
    rig.stop().await;
}

/// Masters reading the same registers at the same time share bus transactions: each gets
/// the right answer, and the device sees one request per shared read.
#[tokio::test]
async fn identical_reads_of_several_masters_share_a_transaction() {
    let (rig, addr) = start("");
    wait_until("meter polled", SECS(3), || rig.value("meter.e").is_some()).await;
    let before = rig.sim.stats(2).requests;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut m = master(addr, 20).await;
            let mut ok = 0u32;
            for _ in 0..30 {
                let words = m.read_holding_registers(0, 10).await.expect("transport").expect("data");
                assert_eq!(words, (1000..1010).collect::<Vec<u16>>());
                ok += 1;
            }
            ok
        }));
    }
    let mut answered = 0u32;
    for t in tasks {
        answered += t.await.expect("master task");
    }
    let sent = rig.sim.stats(2).requests - before;
    let shared = rig.gateway().buses[0].stats().shared_answers.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{answered} answers, {sent} requests on the line, {shared} shared");
    assert_eq!(answered, 240);
    assert_eq!(sent + shared, 240, "every answer came from one transaction on the line");
    assert!(shared > 0, "concurrent identical reads were shared");
    rig.stop().await;
}

/// A "serial device server": accepts TCP connections one after another and serves each
/// with the simulator, as an NPort in TCP-server mode passes bytes to its RS-485 port.
/// Returns its port, a receiver of each connection's stop token, and a token ending it.
async fn device_server(
    simulator: Simulator,
) -> (u16, tokio::sync::mpsc::UnboundedReceiver<CancellationToken>, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = CancellationToken::new();
    let (conn_tx, conn_rx) = tokio::sync::mpsc::unbounded_channel::<CancellationToken>();
    let server_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                a = listener.accept() => a.expect("accept"),
                () = server_stop.cancelled() => return,
            };
            let token = server_stop.child_token();
            let _ = conn_tx.send(token.clone());
            let _ = simulator.clone().serve(stream, token).await;
        }
    });
    (port, conn_rx, stop)
}

#[tokio::test]
async fn bus_behind_a_serial_device_server() {
    let simulator = Simulator::new(common::sim_config(&common::sim::boiler_meter_dead()));
    let sim = simulator.handle();
    let (port, mut conn_rx, stop) = device_server(simulator).await;
    let text = gateway_toml("");
    let model = common::model(&text, &format!("tcp://127.0.0.1:{port}"));
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(&model, shutdown.clone()).expect("gateway starts");
    let addr = gateway.server_addr.expect("server listening");
    let first = within(SECS(3), "gateway connects", conn_rx.recv()).await.expect("a connection");
    wait_until("boiler polled over tcp", SECS(3), || gateway.image.good_value("boiler.t").is_some()).await;
    let mut m = master(addr, 20).await;
    assert_eq!(m.read_holding_registers(0, 2).await.expect("transport"), Ok(vec![1000, 1001]));
    let mut agent = master(addr, 10).await;
    assert_eq!(agent.read_coils(0, 3).await.expect("transport"), Ok(vec![true, false, true]));
    // The device server drops the connection: the bus reconnects by itself.
    first.cancel();
    let _second = within(SECS(5), "gateway reconnects", conn_rx.recv()).await.expect("a second connection");
    sim.set_register(2, Table::Holding, 0, 4242).expect("set");
    let mut answer = None;
    for _ in 0..50 {
        if let Ok(Ok(w)) = m.read_holding_registers(0, 1).await {
            answer = Some(w);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answer, Some(vec![4242]), "pass-through works after the reconnect");
    shutdown.cancel();
    gateway.shutdown(SECS(2)).await;
    stop.cancel();
}

/// The bus's own guarantee, without the relay's help: with many pass-through requests
/// queued, a waiting poll still runs after every `PASS_THROUGH_STREAK` of them.
#[tokio::test]
async fn queued_polls_interleave_with_a_flood_of_pass_through() {
    let (port, _conns, stop) =
        device_server(Simulator::new(common::sim_config(&common::sim::boiler_meter_dead()))).await;
    let model = common::model(&gateway_toml(""), &format!("tcp://127.0.0.1:{port}"));
    let shutdown = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let bus = m2m_gateway::bus::spawn(&model.buses[0], shutdown.clone(), &tracker);
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waits = Vec::new();
    let now = tokio::time::Instant::now();
    let jobs = (0..10).map(|_| (2u8, Priority::PassThrough)).chain((0..3).map(|i| {
        // Polls due long ago (most urgent first), queued after the flood.
        (1u8, Priority::Poll { deadline: now + Duration::from_millis(i) })
    }));
    for (unit, priority) in jobs {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            unit,
            request: Request::ReadHoldingRegisters(0, 1),
            priority,
            timeout: Duration::from_millis(500),
            turnaround: Duration::ZERO,
            retries: 0,
            reply,
        };
        bus.submit(job).expect("queued");
        let order = order.clone();
        waits.push(tokio::spawn(async move {
            rx.await.expect("outcome").expect("answer");
            order.lock().expect("lock").push(unit);
        }));
    }
    for w in waits {
        within(SECS(5), "jobs", w).await.expect("task");
    }
    let order = order.lock().expect("lock").clone();
    let streak = PASS_THROUGH_STREAK as usize;
    let mut want = Vec::new();
    for _ in 0..3 {
        want.extend(std::iter::repeat_n(2, streak));
        want.push(1);
    }
    want.extend(std::iter::repeat_n(2, 10 - 3 * streak));
    assert_eq!(order, want);
    shutdown.cancel();
    stop.cancel();
}

/// Reads `n` answers (any order) and returns them by transaction id.
async fn answers(stream: &mut TcpStream, n: usize) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut head = [0u8; 7];
        within(SECS(3), "answer header", stream.read_exact(&mut head)).await.expect("header");
        let len = usize::from(u16::from_be_bytes([head[4], head[5]])) - 1;
        let mut pdu = vec![0u8; len];
        within(SECS(3), "answer pdu", stream.read_exact(&mut pdu)).await.expect("pdu");
        out.push((u16::from_be_bytes([head[0], head[1]]), pdu));
    }
    out
}

fn mbap(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut frame = tid.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
    frame.push(unit);
    frame.extend_from_slice(pdu);
    frame
}

#[tokio::test]
async fn a_pipelining_master_is_limited_and_agent_reads_do_not_wait() {
    let (rig, addr) = start("max_in_flight = 2");
    wait_until("boiler polled", SECS(3), || rig.value("boiler.t").is_some()).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // Four reads of the silent unit at once (each waits out its 100 ms timeout), then an
    // agent read: two are taken, two more are refused busy, and the agent read is
    // answered before the slow ones.
    let mut burst = Vec::new();
    for tid in 1..=4 {
        burst.extend(mbap(tid, 30, &[0x03, 0, 0, 0, 1]));
    }
    burst.extend(mbap(5, 10, &[0x03, 0, 0, 0, 1]));
    s.write_all(&burst).await.expect("send");
    let got = answers(&mut s, 5).await;
    let by_tid = |t: u16| got.iter().find(|(tid, _)| *tid == t).map(|(_, p)| p.clone()).expect("answered");
    assert_eq!(by_tid(1), [0x83, 0x0B]);
    assert_eq!(by_tid(2), [0x83, 0x0B]);
    assert_eq!(by_tid(3), [0x83, 0x06], "third request of one master on one bus: busy");
    assert_eq!(by_tid(4), [0x83, 0x06]);
    assert_eq!(by_tid(5), [0x03, 0x02, 0x00, 100]);
    let slow = got.iter().position(|(t, _)| *t == 1).expect("tid 1");
    let agent = got.iter().position(|(t, _)| *t == 5).expect("tid 5");
    assert!(agent < slow, "the agent read did not wait behind pass-through: {got:?}");
    rig.stop().await;
}

#[tokio::test]
async fn a_taken_port_fails_the_start_and_starts_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let text =
        gateway_toml("").replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""));
    let model = common::model(&text, "/dev/null-no-such-port");
    let shutdown = CancellationToken::new();
    let err = Gateway::start(&model, shutdown.clone()).err().expect("port taken");
    assert!(
        err.to_string().starts_with(&format!("modbus-tcp server cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!shutdown.is_cancelled(), "the caller's token is left alone");
}

/// Runs the built binary's `poll --tcp` with `args`; returns (success, stdout, stderr).
async fn poll_tcp(addr: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_m2m-gateway"));
    cmd.args(["poll", "--tcp", &addr.to_string(), "--timeout", "1s"]).args(args);
    let out = within(SECS(20), "poll --tcp", tokio::task::spawn_blocking(move || cmd.output()))
        .await
        .expect("join")
        .expect("run m2m-gateway poll");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_projects_own_poll_command_reads_the_server() {
    let (rig, addr) = start("");
    // Agent unit 10: wait until the boiler was polled, then read it with our own CLI.
    wait_until("boiler polled", SECS(5), || rig.value("boiler.t3").is_some()).await;
    let (ok, out, err) = poll_tcp(addr, &["--unit", "10", "--address", "0", "--count", "4"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("[0]: 100") && out.contains("[3]: 103  (0x0067)"), "{out}");
    // Pass-through unit 20, as JSON: the meter's registers straight from the device.
    let (ok, out, err) = poll_tcp(addr, &["--unit", "20", "--address", "5", "--count", "2", "--json"]).await;
    assert!(ok, "{out}{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).expect("json line");
    assert_eq!(r["unit"], 20);
    assert_eq!(r["raw"], serde_json::json!([1005, 1006]));
    // Coils through the agent, decoded as bools.
    let (ok, out, _) = poll_tcp(addr, &["--unit", "10", "--table", "coils", "--count", "3"]).await;
    assert!(ok && out.contains("[0]: true") && out.contains("[1]: false"), "{out}");
    // A unit the server does not serve: the gateway's exception, and a failing exit code.
    let (ok, _, err) = poll_tcp(addr, &["--unit", "99"]).await;
    assert!(!ok);
    assert!(err.contains("unit 99: exception"), "{err}");
    rig.stop().await;
}

/// A master that sends its requests and then half-closes (FIN) still gets every answer,
/// relayed ones included, before the gateway closes its side.
#[tokio::test]
async fn half_closed_master_gets_its_pending_answers() {
    let (_rig, addr) = start("");
    let mut s = within(SECS(2), "connect", TcpStream::connect(addr)).await.expect("connects");
    let mut req = mbap(7, 20, &[3, 0, 0, 0, 2]);
    req.extend(mbap(8, 20, &[3, 0, 2, 0, 1]));
    s.write_all(&req).await.expect("send");
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    within(SECS(3), "answers then close", s.read_to_end(&mut got)).await.expect("read");
    let mut want = mbap(7, 20, &[3, 4, 0x03, 0xE8, 0x03, 0xE9]);
    want.extend(mbap(8, 20, &[3, 2, 0x03, 0xEA]));
    assert_eq!(got, want, "both relayed answers, in order, then EOF");
}

/// The spec's state diagrams judge a request in a fixed order: function code (0x01), then
/// quantity, byte count and length (0x03), then address range (0x02). A function a unit
/// does not offer (writing without a grant, anything but FC1-4 on an agent unit) is 0x01
/// whatever its PDU says; a third-party master must not see 0x03 for it.
#[tokio::test]
async fn exceptions_come_in_the_specs_order() {
    let (rig, addr) = start("");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // Units without grants: writing is not a function they offer.
    assert_eq!(raw(&mut s, 1, 30, &[0x10, 0, 0, 0, 0, 0]).await, [0x90, 0x01], "FC16 of 0 registers");
    assert_eq!(raw(&mut s, 2, 30, &[0x05, 0, 0, 0x12, 0x34]).await, [0x85, 0x01], "FC5 bad value");
    assert_eq!(raw(&mut s, 3, 11, &[0x06, 0, 0]).await, [0x86, 0x01], "FC6 short");
    assert_eq!(raw(&mut s, 4, 11, &[0x16, 0, 0]).await, [0x96, 0x01], "FC22 short");
    assert_eq!(
        raw(&mut s, 5, 11, &[0x17, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 7]).await,
        [0x97, 0x01],
        "FC23 reading 0"
    );
    // Agent units serve FC1-4 only, whatever the data of another function.
    assert_eq!(raw(&mut s, 6, 10, &[0x08, 0]).await, [0x88, 0x01]);
    assert_eq!(raw(&mut s, 7, 10, &[0x2B, 0x0E]).await, [0xAB, 0x01]);
    // Units with grants: quantity and byte count before the address.
    assert_eq!(raw(&mut s, 8, 10, &[0x10, 0xFF, 0xFF, 0, 0, 0]).await, [0x90, 0x03]);
    assert_eq!(raw(&mut s, 9, 10, &[0x10, 0xFF, 0xFF, 0, 2, 4, 0, 1, 0, 2]).await, [0x90, 0x02]);
    assert_eq!(raw(&mut s, 10, 20, &[0x0F, 0xFF, 0xFF, 0, 10, 1, 0xFF]).await, [0x8F, 0x03]);
    assert_eq!(raw(&mut s, 11, 20, &[0x05, 0xFF, 0xFF, 0x12, 0x34]).await, [0x85, 0x03]);
    assert_eq!(
        raw(&mut s, 12, 20, &[0x17, 0xFF, 0xFF, 0, 126, 0, 0, 0, 1, 2, 0, 7]).await,
        [0x97, 0x03],
        "FC23 reading 126, past 65535"
    );
    assert_eq!(
        raw(&mut s, 13, 20, &[0x17, 0, 0, 0, 1, 0xFF, 0xFF, 0, 2, 4, 0, 7, 0, 8]).await,
        [0x97, 0x02],
        "FC23 writing past 65535"
    );
    assert_eq!(raw(&mut s, 14, 10, &[0x03, 0xFF, 0xFF, 0, 126]).await, [0x83, 0x03]);
    assert_eq!(raw(&mut s, 15, 10, &[0x01, 0xFF, 0xFF, 0, 2]).await, [0x81, 0x02]);
    rig.stop().await;
}

/// Unit 0 is a broadcast on a serial line and, by the TCP implementation guide, "the
/// device itself" on TCP; through a gateway neither applies, so it is answered like any
/// unit id nobody serves (0x0A) and nothing reaches a bus. Unit 255, the guide's
/// recommended id for a directly addressed server (libmodbus' and tokio-modbus' default),
/// is served when configured, like any other.
#[tokio::test]
async fn unit_0_is_no_broadcast_and_unit_255_is_an_ordinary_unit() {
    let (rig, addr) = start("");
    wait_until("meter polled", SECS(3), || rig.value("meter.e").is_some()).await;
    let before = (rig.sim.stats(1).writes, rig.sim.stats(2).writes);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(raw(&mut s, 1, 0, &[0x06, 0, 3, 0, 9]).await, [0x86, 0x0A]);
    assert_eq!(raw(&mut s, 2, 0, &[0x03, 0, 0, 0, 1]).await, [0x83, 0x0A]);
    assert_eq!((rig.sim.stats(1).writes, rig.sim.stats(2).writes), before, "nothing broadcast");
    let mut m = master(addr, 255).await;
    assert_eq!(m.read_holding_registers(0, 2).await.expect("transport"), Ok(vec![1000, 1001]));
    rig.stop().await;
}

/// A master that half-closes in the middle of a frame (the rest will never come) still
/// gets the answers to the whole requests it sent before.
#[tokio::test]
async fn a_frame_cut_by_the_masters_fin_costs_no_earlier_answer() {
    let (_rig, addr) = start("");
    let mut s = within(SECS(2), "connect", TcpStream::connect(addr)).await.expect("connects");
    let mut req = mbap(7, 20, &[3, 0, 0, 0, 1]);
    req.extend_from_slice(&mbap(8, 20, &[3, 0, 0, 0, 1])[..5]);
    s.write_all(&req).await.expect("send");
    s.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    within(SECS(3), "answer then close", s.read_to_end(&mut got)).await.expect("read");
    assert_eq!(got, mbap(7, 20, &[3, 2, 0x03, 0xE8]), "the whole request answered, then EOF");
}

/// The conformance probes "FC16 of 124 registers" and "FC23 writing 122 registers" are
/// well-formed requests one byte too long for a PDU (MBAP length 255). They are answered
/// 0x03 like any bad quantity (0x01 first where the unit does not write at all), and the
/// connection stays in step: it used to be closed as "not Modbus-TCP".
#[tokio::test]
async fn oversized_requests_are_answered_not_dropped() {
    let (rig, addr) = start("");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let fc16 = [&[0x10, 0, 0, 0, 124, 248][..], &[0; 248]].concat();
    let fc23 = [&[0x17, 0, 0, 0, 1, 0, 0, 0, 122, 244][..], &[0; 244]].concat();
    let fc15 = [&[0x0F, 0, 0, 0x07, 0xB1, 247][..], &[0; 247]].concat();
    assert_eq!(raw(&mut s, 1, 20, &fc16).await, [0x90, 0x03]);
    assert_eq!(raw(&mut s, 2, 20, &fc23).await, [0x97, 0x03]);
    assert_eq!(raw(&mut s, 3, 20, &fc15).await, [0x8F, 0x03]);
    assert_eq!(raw(&mut s, 4, 30, &fc16).await, [0x90, 0x01]);
    assert_eq!(raw(&mut s, 5, 20, &[0x03, 0, 0, 0, 1]).await, [0x03, 0x02, 0x03, 0xE8]);
    rig.stop().await;
}

/// A 2-wire RS-485 adapter without echo suppression hands every request back before the
/// reply. Our FC6 request is, byte for byte, the device's confirmation: with
/// `local_echo` the echo is taken off, so a refused write is reported as refused.
#[tokio::test]
async fn local_echo_is_taken_off_and_never_taken_for_the_reply() {
    let sim = "echo = true\n[[unit]]\nunit = 5\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nvalues = [1, 2]\n";
    let gateway = "[gateway]\nname = \"test\"\n[[bus]]\nname = \"line\"\nport = \"{port}\"\nlocal_echo = true\nretries = 0\n\
        [[device]]\nname = \"drive\"\nbus = \"line\"\nunit = 5\ninterval = \"50ms\"\n\
        point = [{ name = \"a\", table = \"holding\", address = 0 }, { name = \"b\", table = \"holding\", address = 1 }]\n\
        [server]\nlisten = \"127.0.0.1:0\"\n[[server.unit]]\nunit = 5\npass = \"drive\"\n\
        [[server.grant]]\nunit = 5\ntable = \"holding\"\naddress = 0\ncount = 10\n";
    let rig = Rig::start(sim, gateway);
    wait_until("polls through the echo", SECS(3), || rig.value("drive.b") == Some(Value::UInt(2))).await;
    let addr = rig.gateway().server_addr.expect("server listening");
    let mut m = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(raw(&mut m, 1, 5, &[0x03, 0, 0, 0, 2]).await, [0x03, 0x04, 0, 1, 0, 2]);
    // A write the device takes: its confirmation, and the register changed.
    assert_eq!(raw(&mut m, 2, 5, &[0x06, 0, 1, 0, 9]).await, [0x06, 0, 1, 0, 9]);
    assert_eq!(rig.sim.register(5, Table::Holding, 1), Some(9));
    // A write the device refuses (no register 7): its exception, not our own echo.
    assert_eq!(raw(&mut m, 3, 5, &[0x06, 0, 7, 0, 9]).await, [0x86, 0x02]);
    let stats = rig.gateway().buses[0].stats();
    assert_eq!(stats.crc_errors.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(stats.foreign_frames.load(std::sync::atomic::Ordering::Relaxed), 0);
    rig.stop().await;
}

#[tokio::test]
async fn poll_at_a_port_that_is_not_modbus_tcp_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An HTTP server (the status page's port, say): it answers 400 to the request and closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
    });
    let (ok, out, err) = poll_tcp(addr, &["--unit", "1", "--address", "0"]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains(&format!("{addr}: unit 1: the answer is not Modbus-TCP: is this a Modbus-TCP server?")),
        "{err}"
    );
    server.await.expect("server");
}
