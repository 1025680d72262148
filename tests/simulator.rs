//! The field-device simulator, driven over real pseudo-terminals by a tiny hand-written
//! RTU master: reads, writes, exceptions, bus silence rules, faults, resync after noise,
//! line timing, and a port that vanishes and comes back. Every read has a deadline.

use std::time::Duration;

use m2m_gateway::point::value::Table;
use m2m_gateway::serial::rtu;
use m2m_gateway::sim::{Fault, SimConfig, SimError, SimHandle, Simulator, VirtualPort};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout};
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tokio_util::sync::CancellationToken;

const MAP: &str = r#"
[[unit]]
unit = 1
[[unit.register]]
table = "holding"
address = 0
values = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
[[unit.register]]
table = "input"
address = 100
values = [7, -2]
[[unit.register]]
table = "coils"
address = 0
values = [1, 0, 1, 1, 0, 0, 1, 1, 1, 0]
[[unit.register]]
table = "discrete"
address = 0
values = [true, false, true]
[[unit.register]]
table = "holding"
address = 20
kind = "sine"
type = "f32"
min = 0
max = 100
period = "10s"

[[unit]]
unit = 2
[[unit.register]]
table = "holding"
address = 0
values = [5, 6]
"#;

struct Rig {
    port: VirtualPort,
    sim: SimHandle,
    master: SerialStream,
}

fn open(path: &std::path::Path) -> SerialStream {
    tokio_serial::new(path.to_string_lossy(), 9600)
        .open_native_async()
        .expect("second open of the pty by path")
}

fn rig(toml_text: &str) -> Rig {
    let config: SimConfig = toml::from_str(toml_text).expect("test config parses");
    config.validate().expect("test config is valid");
    let sim = Simulator::new(config);
    let handle = sim.handle();
    let mut port = VirtualPort::new().expect("pty pair");
    port.run(sim).expect("serve on master");
    let master = open(port.path());
    Rig { port, sim: handle, master }
}

fn frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    rtu::frame(unit, pdu, &mut v);
    v
}

/// Length of a reply frame judged from its first bytes.
fn reply_len(buf: &[u8]) -> Option<usize> {
    m2m_gateway::serial::pdu::pdu_len(buf.get(1..)?, false).map(|n| n + 3)
}

/// Sends `pdu` to `unit` and reads one reply by its length, within `wait`.
async fn transact(m: &mut SerialStream, unit: u8, pdu: &[u8], wait: Duration) -> Option<Vec<u8>> {
    m.write_all(&frame(unit, pdu)).await.expect("write request");
    read_reply(m, wait).await
}

async fn read_reply(m: &mut SerialStream, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 300];
    loop {
        if let Some(n) = reply_len(&buf)
            && buf.len() >= n
        {
            return Some(buf);
        }
        let n = timeout(deadline - Instant::now(), m.read(&mut chunk)).await.ok()?.ok()?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads whatever arrives until `quiet` passes with nothing new (or `wait` is over).
async fn read_until_quiet(m: &mut SerialStream, wait: Duration, quiet: Duration) -> Vec<u8> {
    let deadline = Instant::now() + wait;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 300];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let limit = if buf.is_empty() { left } else { quiet.min(left) };
        match timeout(limit, m.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return buf,
        }
    }
}

const WAIT: Duration = Duration::from_secs(2);
const SILENCE: Duration = Duration::from_millis(200);

fn words(reply: &[u8]) -> Vec<u16> {
    reply[3..reply.len() - 2].chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()
}

#[tokio::test]
async fn reads_all_four_tables() {
    let mut r = rig(MAP);
    let m = &mut r.master;
    let rsp = transact(m, 1, &[3, 0, 0, 0, 4], WAIT).await.expect("fc3 reply");
    assert!(rtu::crc_ok(&rsp));
    assert_eq!(&rsp[..3], &[1, 3, 8]);
    assert_eq!(words(&rsp), [10, 20, 30, 40]);
    let rsp = transact(m, 1, &[4, 0, 100, 0, 2], WAIT).await.expect("fc4 reply");
    assert_eq!(words(&rsp), [7, 0xFFFE]);
    let rsp = transact(m, 1, &[1, 0, 0, 0, 10], WAIT).await.expect("fc1 reply");
    assert_eq!(&rsp[..5], &[1, 1, 2, 0xCD, 0x01]);
    let rsp = transact(m, 1, &[2, 0, 0, 0, 3], WAIT).await.expect("fc2 reply");
    assert_eq!(&rsp[..4], &[1, 2, 1, 0x05]);
    // A generated f32 (ABCD) between min and max.
    let rsp = transact(m, 1, &[3, 0, 20, 0, 2], WAIT).await.expect("f32 reply");
    let w = words(&rsp);
    let v = f32::from_bits(u32::from(w[0]) << 16 | u32::from(w[1]));
    assert!((0.0..=100.0).contains(&v), "sine value {v}");
    let s = r.sim.stats(1);
    assert_eq!((s.requests, s.answered, s.writes), (5, 5, 0));
}

#[tokio::test]
async fn writes_change_the_map() {
    let mut r = rig(MAP);
    let m = &mut r.master;
    let rsp = transact(m, 1, &[6, 0, 1, 0, 99], WAIT).await.expect("fc6 reply");
    assert_eq!(rsp, frame(1, &[6, 0, 1, 0, 99]));
    let rsp = transact(m, 1, &[16, 0, 2, 0, 2, 4, 0x12, 0x34, 0xAB, 0xCD], WAIT).await.expect("fc16 reply");
    assert_eq!(rsp, frame(1, &[16, 0, 2, 0, 2]));
    let rsp = transact(m, 1, &[3, 0, 0, 0, 4], WAIT).await.expect("read back");
    assert_eq!(words(&rsp), [10, 99, 0x1234, 0xABCD]);

    let rsp = transact(m, 1, &[5, 0, 1, 0xFF, 0], WAIT).await.expect("fc5 reply");
    assert_eq!(rsp, frame(1, &[5, 0, 1, 0xFF, 0]));
    assert_eq!(r.sim.bit(1, Table::Coils, 1), Some(true));
    let rsp = transact(m, 1, &[15, 0, 2, 0, 3, 1, 0b010], WAIT).await.expect("fc15 reply");
    assert_eq!(rsp, frame(1, &[15, 0, 2, 0, 3]));
    let rsp = transact(m, 1, &[1, 0, 0, 0, 5], WAIT).await.expect("read coils");
    assert_eq!(rsp[3], 0b01011); // 1, 1, 0, 1, 0

    // FC22 mask write: (20 & 0x00F2) | (0x0025 & !0x00F2) = 0x15 | ... per spec formula.
    let rsp = transact(m, 1, &[22, 0, 0, 0, 0xF2, 0, 0x25], WAIT).await.expect("fc22 reply");
    assert_eq!(rsp, frame(1, &[22, 0, 0, 0, 0xF2, 0, 0x25]));
    assert_eq!(r.sim.register(1, Table::Holding, 0), Some((10 & 0xF2) | (0x25 & !0xF2)));
    // FC23 writes first, then reads.
    let rsp = transact(m, 1, &[23, 0, 4, 0, 2, 0, 5, 0, 1, 2, 0, 7], WAIT).await.expect("fc23 reply");
    assert_eq!(words(&rsp), [50, 7]);
    assert_eq!(r.sim.stats(1).writes, 6);
}

#[tokio::test]
async fn exceptions_like_a_real_device() {
    let mut r = rig(MAP);
    let m = &mut r.master;
    // Unmapped address, and a range running past the mapped block.
    let rsp = transact(m, 1, &[3, 0, 50, 0, 1], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0x83, 2]));
    let rsp = transact(m, 1, &[3, 0, 8, 0, 4], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0x83, 2]));
    // A write to an unmapped register changes nothing.
    let rsp = transact(m, 1, &[16, 0, 9, 0, 2, 4, 0, 1, 0, 2], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0x90, 2]));
    assert_eq!(r.sim.register(1, Table::Holding, 9), Some(100));
    // Bad quantities.
    let rsp = transact(m, 1, &[3, 0, 0, 0, 0], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0x83, 3]));
    let rsp = transact(m, 1, &[3, 0, 0, 0, 126], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0x83, 3]));
    let rsp = transact(m, 1, &[1, 0, 0, 0x07, 0xD1], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0x81, 3]));
    // Unknown function code (no length rule: framed by the silence).
    let rsp = transact(m, 1, &[0x41, 1, 2, 3], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0xC1, 1]));
    // Known length, unsupported: FC8 diagnostics other than sub-function 0 (return query
    // data, which loops the request back).
    let rsp = transact(m, 1, &[8, 0, 1, 0x12, 0x34], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0x88, 1]));
    let rsp = transact(m, 1, &[8, 0, 0, 0x12, 0x34], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[8, 0, 0, 0x12, 0x34]));
}

#[tokio::test]
async fn other_units_and_broadcasts_are_not_answered() {
    let mut r = rig(MAP);
    let m = &mut r.master;
    assert_eq!(transact(m, 9, &[3, 0, 0, 0, 1], SILENCE).await, None);
    assert_eq!(transact(m, 0, &[6, 0, 0, 0x04, 0xD2], SILENCE).await, None);
    assert_eq!(r.sim.register(1, Table::Holding, 0), Some(1234));
    assert_eq!(r.sim.register(2, Table::Holding, 0), Some(1234));
    // Still answering afterwards.
    let rsp = transact(m, 2, &[3, 0, 0, 0, 2], WAIT).await.expect("reply");
    assert_eq!(words(&rsp), [1234, 6]);
    assert_eq!(r.sim.bus_stats().frames_received, 3);
}

#[tokio::test]
async fn faults() {
    let mut r = rig(MAP);
    let read = [3, 0, 0, 0, 2];
    let normal = transact(&mut r.master, 1, &read, WAIT).await.expect("reply");

    r.sim.set_fault(1, Fault::Silent).expect("unit 1");
    assert_eq!(transact(&mut r.master, 1, &read, SILENCE).await, None);

    r.sim.set_fault(1, Fault::Late(Duration::from_millis(300))).expect("unit 1");
    let t0 = Instant::now();
    r.master.write_all(&frame(1, &read)).await.expect("write");
    assert_eq!(read_reply(&mut r.master, Duration::from_millis(150)).await, None);
    let rsp = read_reply(&mut r.master, WAIT).await.expect("late reply");
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(rsp, normal);

    r.sim.set_fault(1, Fault::CorruptCrc).expect("unit 1");
    let rsp = transact(&mut r.master, 1, &read, WAIT).await.expect("reply");
    assert_eq!(rsp.len(), normal.len());
    assert!(!rtu::crc_ok(&rsp));

    r.sim.set_fault(1, Fault::WrongUnit(9)).expect("unit 1");
    let rsp = transact(&mut r.master, 1, &read, WAIT).await.expect("reply");
    assert_eq!(rsp[0], 9);
    assert!(rtu::crc_ok(&rsp));
    assert_eq!(rsp[1..rsp.len() - 2], normal[1..normal.len() - 2]);

    r.sim.set_fault(1, Fault::NoiseBefore(5)).expect("unit 1");
    r.master.write_all(&frame(1, &read)).await.expect("write");
    let got = read_until_quiet(&mut r.master, WAIT, Duration::from_millis(50)).await;
    assert_eq!(got.len(), 5 + normal.len());
    assert_eq!(got[5..], normal[..]);

    r.sim.set_fault(1, Fault::Exception(4)).expect("unit 1");
    let rsp = transact(&mut r.master, 1, &read, WAIT).await.expect("reply");
    assert_eq!(rsp, frame(1, &[0x83, 4]));

    r.sim.clear_fault(1).expect("unit 1");
    let before = r.sim.stats(1).requests;
    r.sim.set_fault(1, Fault::DropEvery(2)).expect("unit 1");
    let mut answered = 0;
    for _ in 0..4 {
        answered += usize::from(transact(&mut r.master, 1, &read, SILENCE).await.is_some());
    }
    assert_eq!(answered, 2);
    assert_eq!(r.sim.stats(1).requests, before + 4);

    r.sim.clear_fault(1).expect("unit 1");
    assert_eq!(transact(&mut r.master, 1, &read, WAIT).await, Some(normal));
    assert!(matches!(r.sim.set_fault(7, Fault::Silent), Err(SimError::UnknownUnit(7))));
}

#[tokio::test]
async fn fault_from_toml() {
    let text = format!("{MAP}\n[[unit]]\nunit = 3\nfault = \"exception 6\"\n");
    let mut r = rig(&text);
    let rsp = transact(&mut r.master, 3, &[3, 0, 0, 0, 1], WAIT).await.expect("reply");
    assert_eq!(rsp, frame(3, &[0x83, 6]));
}

#[tokio::test]
async fn garbage_then_request_is_answered() {
    let mut r = rig(MAP);
    let mut bytes = vec![0xFF, 0x00, 0x12, 0x01, 0x03, 0x77];
    bytes.extend(frame(1, &[3, 0, 0, 0, 1]));
    r.master.write_all(&bytes).await.expect("write");
    let rsp = read_reply(&mut r.master, WAIT).await.expect("reply after resync");
    assert_eq!(words(&rsp), [10]);
    // A request with a bad CRC is dropped and counted.
    let mut bad = frame(1, &[3, 0, 0, 0, 1]);
    bad[6] ^= 1;
    r.master.write_all(&bad).await.expect("write");
    assert_eq!(read_reply(&mut r.master, SILENCE).await, None);
    assert!(r.sim.stats(1).crc_errors_seen >= 1);
    assert!(r.sim.bus_stats().garbage_bytes >= 6);
}

#[tokio::test]
async fn keeps_serving_after_a_kilobyte_of_noise() {
    let mut r = rig(MAP);
    // Deterministic noise without unit 1 or 2 in it, so no accidental valid request.
    let mut x: u32 = 0x1234_5678;
    let noise: Vec<u8> = (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let b = (x >> 24) as u8;
            if b == 1 || b == 2 { 0x55 } else { b }
        })
        .collect();
    r.master.write_all(&noise).await.expect("write noise");
    r.master.write_all(&frame(2, &[3, 0, 0, 0, 2])).await.expect("write");
    let got = read_until_quiet(&mut r.master, WAIT, Duration::from_millis(100)).await;
    assert_eq!(got, frame(2, &[3, 4, 0, 5, 0, 6]));
    let rsp = transact(&mut r.master, 1, &[3, 0, 1, 0, 1], WAIT).await.expect("reply");
    assert_eq!(words(&rsp), [20]);
}

fn timed_map(turnaround: &str) -> String {
    format!(
        "[line]\nbaud = 9600\nparity = \"even\"\nturnaround = \"{turnaround}\"\n\
         [[unit]]\nunit = 1\n[[unit.register]]\ntable = \"holding\"\naddress = 0\n\
         kind = \"counter\"\ncount = 125\n"
    )
}

/// Time from the request write (which a pty delivers at once) to the last reply byte.
async fn timed_read(m: &mut SerialStream, qty: u8) -> (Duration, usize) {
    let t0 = Instant::now();
    let rsp = transact(m, 1, &[3, 0, 0, 0, qty], WAIT).await.expect("reply");
    assert!(rtu::crc_ok(&rsp));
    (t0.elapsed(), rsp.len())
}

#[tokio::test]
async fn replies_take_their_wire_time() {
    let char_time = 11.0 / 9600.0;
    // The simulator also emulates the 8-byte request's wire time and the t3.5 silence
    // that ends it before the reply starts.
    let request = 8.0 * char_time + 3.5 * char_time;
    let mut r = rig(&timed_map("0ms"));
    let (took, len) = timed_read(&mut r.master, 10).await;
    assert_eq!(len, 25);
    let expect = request + 25.0 * char_time;
    let took = took.as_secs_f64();
    assert!(took >= expect * 0.9 && took <= expect * 1.5, "10 registers took {took}s, wire time {expect}s");
    // A 255-byte frame: the absolute schedule keeps the total within a few percent.
    let (took, len) = timed_read(&mut r.master, 125).await;
    assert_eq!(len, 255);
    let expect = request + 255.0 * char_time;
    let took = took.as_secs_f64();
    assert!(
        took >= expect * 0.97 && took <= expect * 1.15,
        "125 registers took {took}s, wire time {expect}s"
    );

    let mut r = rig(&timed_map("50ms"));
    let (took, _) = timed_read(&mut r.master, 10).await;
    let expect = request + 0.05 + 25.0 * char_time;
    let took = took.as_secs_f64();
    assert!(
        took >= expect * 0.95 && took <= expect * 1.5,
        "with turnaround took {took}s, expected {expect}s"
    );
}

#[tokio::test]
async fn serves_any_duplex_stream_and_stops_on_shutdown() {
    let config: SimConfig = toml::from_str(MAP).expect("parses");
    let sim = Simulator::new(config);
    let (mut near, far) = tokio::io::duplex(8);
    let stop = CancellationToken::new();
    let task = tokio::spawn(sim.serve(far, stop.clone()));
    near.write_all(&frame(2, &[3, 0, 1, 0, 1])).await.expect("write");
    let mut buf = [0u8; 7];
    timeout(WAIT, near.read_exact(&mut buf)).await.expect("in time").expect("read");
    assert_eq!(buf.to_vec(), frame(2, &[3, 2, 0, 6]));
    stop.cancel();
    let result = timeout(WAIT, task).await.expect("stops").expect("no panic");
    assert!(result.is_ok());
}

#[tokio::test]
async fn port_vanishes_and_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("usb-FTDI_sim-if00-port0");
    let config: SimConfig = toml::from_str(MAP).expect("parses");
    let mut port = VirtualPort::with_link(&link).expect("pty with link");
    port.run(Simulator::new(config)).expect("serve");
    assert_eq!(port.path(), link);
    let first = port.device_path().to_owned();
    assert_eq!(std::fs::read_link(&link).expect("link"), first);

    let mut m = open(&link);
    assert!(transact(&mut m, 1, &[3, 0, 0, 0, 1], WAIT).await.is_some());

    port.vanish().await;
    assert!(!port.is_present());
    assert!(!link.exists());
    // The open side sees the hang-up: an error or end of file, never a hang.
    let mut chunk = [0u8; 8];
    let r = timeout(WAIT, m.read(&mut chunk)).await.expect("hang-up is noticed");
    assert!(matches!(r, Ok(0) | Err(_)), "read after vanish: {r:?}");
    drop(m);

    port.come_back().expect("new pty");
    assert!(port.is_present());
    let mut m = open(&link);
    let rsp = transact(&mut m, 1, &[3, 0, 0, 0, 1], WAIT).await.expect("reply after reopen");
    assert_eq!(words(&rsp), [10]);
    drop(port);
    assert!(!link.exists());
}

#[test]
fn load_reports_problems_with_the_file_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sim.toml");
    std::fs::write(&path, "[[unit]]\nunit = 1\ncolour = \"red\"\n").expect("write");
    let e = m2m_gateway::sim::load(&path).expect_err("unknown field");
    let msg = e.to_string();
    assert!(msg.contains("sim.toml") && msg.contains("colour"), "{msg}");

    std::fs::write(
        &path,
        "[[unit]]\nunit = 0\n[[unit]]\nunit = 4\n[[unit.register]]\ntable = \"coils\"\n\
         address = 0\nvalues = [2]\n[[unit.register]]\ntable = \"holding\"\naddress = 65535\n\
         values = [1, 2]\n",
    )
    .expect("write");
    match m2m_gateway::sim::load(&path) {
        Err(SimError::Invalid { path: p, problems }) => {
            assert_eq!(p, path);
            assert_eq!(problems.len(), 3, "{problems:?}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    let missing = m2m_gateway::sim::load(&dir.path().join("nope.toml")).expect_err("missing");
    assert!(missing.to_string().contains("nope.toml"));
}

#[tokio::test]
async fn quick_simulation_answers_every_unit() {
    let config = m2m_gateway::sim::quick(&[1, 2, 3], 10);
    config.validate().expect("quick config is valid");
    let mut r = rig_from(config);
    for unit in [1, 2, 3] {
        let rsp = transact(&mut r.master, unit, &[3, 0, 0, 0, 10], WAIT).await.expect("holding");
        assert_eq!(rsp.len(), 25);
        let rsp = transact(&mut r.master, unit, &[4, 0, 0, 0, 10], WAIT).await.expect("input");
        assert_eq!(rsp.len(), 25);
        let rsp = transact(&mut r.master, unit, &[1, 0, 0, 0, 64], WAIT).await.expect("coils");
        assert_eq!(rsp.len(), 13);
        let rsp = transact(&mut r.master, unit, &[2, 0, 0, 0, 64], WAIT).await.expect("discrete");
        assert_eq!(rsp.len(), 13);
    }
    drop(r.port);
}

fn rig_from(config: SimConfig) -> Rig {
    let sim = Simulator::new(config);
    let handle = sim.handle();
    let mut port = VirtualPort::new().expect("pty pair");
    port.run(sim).expect("serve");
    let master = open(port.path());
    Rig { port, sim: handle, master }
}

#[tokio::test]
async fn a_tokio_modbus_master_is_answered() {
    use tokio_modbus::prelude::*;
    let r = rig(MAP);
    let mut ctx = rtu::attach_slave(r.master, Slave(1));
    let words = timeout(WAIT, ctx.read_holding_registers(0, 3))
        .await
        .expect("in time")
        .expect("transport")
        .expect("no exception");
    assert_eq!(words, [10, 20, 30]);
    timeout(WAIT, ctx.write_single_register(2, 333))
        .await
        .expect("in time")
        .expect("transport")
        .expect("no exception");
    assert_eq!(r.sim.register(1, Table::Holding, 2), Some(333));
    let e = timeout(WAIT, ctx.read_input_registers(500, 1)).await.expect("in time").expect("transport");
    assert_eq!(e, Err(ExceptionCode::IllegalDataAddress));
    drop(r.port);
}
