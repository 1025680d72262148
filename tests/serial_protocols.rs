//! Serial protocols beyond Modbus-RTU, end to end on real pseudo-terminal pairs against
//! the project's simulator: raw request/response devices (text and binary, each with a
//! checksum), corrupted checksums, partial replies, a streaming NMEA receiver that goes
//! quiet, commands, and Modbus ASCII reads with an LRC error.

use crate::common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{Rig, wait_until};
use m2m_gateway::point::value::{Quality, Value};
use m2m_gateway::poll::raw::{CommandError, PARSE_FAILURE};
use m2m_gateway::sim::{Fault, RawFault};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A scale answering `W\r\n` (with its sum8 checksum in hex: `W57\r\n`) with `ST,GS,+0012.50kg` and a sum8 checksum in hex before
/// CR LF, and taking set-point commands `SP...` answered `OK`.
const SCALE_SIM: &str = r#"
[[raw]]
name = "scale"
request = "W57\r\n"
reply = "ST,GS,{value:+08.2}kg\r\n"
min = 12.5
max = 12.5
checksum = "sum8"
checksum_format = "hex"
checksum_trailer = 2

[[raw]]
name = "setpoint"
request_prefix = "SP"
reply = "OK\r\n"
min = 0
max = 0
checksum = "sum8"
checksum_format = "hex"
checksum_trailer = 2
"#;

const SCALE_GATEWAY: &str = r#"
[gateway]
name = "test"
[[bus]]
name = "scales"
port = "{port}"
protocol = "raw"
parity = "none"
timeout = "300ms"
retries = 0

[[raw_device]]
name = "scale"
bus = "scales"
request = "W\r\n"
interval = "50ms"
end = "terminator"
terminator = "\r\n"
checksum = "sum8"
checksum_format = "hex"
checksum_trailer = 2
regex = '^(?P<state>ST|US),GS,(?P<weight>[-+ 0-9.]+)kg'
[[raw_device.point]]
name = "weight"
unit = "kg"
[[raw_device.point]]
name = "state"
kind = "text"
[[raw_device.command]]
name = "setpoint"
template = "SP{value:.1}\r\n"
ok = "^OK"
"#;

#[tokio::test]
async fn text_request_response_with_checksum_and_faults() {
    let rig = Rig::start(SCALE_SIM, SCALE_GATEWAY);
    wait_until("weight read", SECS(5), || rig.value("scale.weight") == Some(Value::Float(12.5))).await;
    assert_eq!(rig.value("scale.state"), Some(Value::Text("ST".into())));
    let stats = rig.gateway().serial.stats("scale").expect("scale registered");
    assert!(stats.frames.load(Relaxed) >= 1);

    // A corrupted checksum: no value is taken, the bus counts a checksum error and the
    // poll times out (comm-fail, last value kept).
    rig.sim.set_raw_fault("scale", Some(RawFault::CorruptChecksum)).expect("fault set");
    let bus = &rig.gateway().buses[0];
    let crc_before = bus.stats().crc_errors.load(Relaxed);
    wait_until("checksum errors counted", SECS(5), || bus.stats().crc_errors.load(Relaxed) > crc_before)
        .await;
    wait_until("comm-fail", SECS(5), || rig.quality("scale.weight") == Some(Quality::CommFail)).await;
    assert_eq!(rig.sample("scale.weight").and_then(|s| s.value), Some(Value::Float(12.5)), "last value kept");

    // Back to good.
    rig.sim.set_raw_fault("scale", None).expect("fault cleared");
    wait_until("good again", SECS(5), || rig.quality("scale.weight") == Some(Quality::Good)).await;

    // A partial reply: a timeout, no value.
    rig.sim.set_raw_fault("scale", Some(RawFault::Partial)).expect("fault set");
    let timeouts = stats.timeouts.load(Relaxed);
    wait_until("timeouts counted", SECS(5), || stats.timeouts.load(Relaxed) > timeouts).await;
    wait_until("comm-fail", SECS(5), || rig.quality("scale.weight") == Some(Quality::CommFail)).await;
    rig.sim.set_raw_fault("scale", None).expect("fault cleared");
    wait_until("good again", SECS(5), || rig.quality("scale.weight") == Some(Quality::Good)).await;

    // A command: formatted, checksummed, answered OK.
    let serial = rig.gateway().serial.clone();
    let reply = serial.send_command("scale.setpoint", &Value::Float(42.3)).await.expect("command accepted");
    assert_eq!(&reply.sent[..6], b"SP42.3");
    assert!(reply.reply.starts_with(b"OK"), "{:?}", reply.reply);
    let seen = rig.sim.raw_stats("setpoint").expect("simulated");
    assert_eq!(seen.last_request, reply.sent);
    assert_eq!(serial.stats("scale").map(|s| s.commands.load(Relaxed)), Some(1));
    // The gateway's writer (what peer grants and write-backs use) reaches commands too.
    rig.gateway().writer.write("scale.setpoint", &Value::Float(7.5)).await.expect("written as a command");
    assert_eq!(&rig.sim.raw_stats("setpoint").expect("simulated").last_request[..5], b"SP7.5");
    assert!(rig.gateway().writer.knows("scale.setpoint"));
    let unknown = serial.send_command("scale.weight", &Value::Float(1.0)).await;
    assert!(matches!(unknown, Err(CommandError::Unknown(_))), "{unknown:?}");
    rig.stop().await;
}

#[tokio::test]
async fn a_reply_that_does_not_parse_is_bad_quality_and_counted() {
    // The device answers, with a valid checksum, something the regex does not match.
    let sim = SCALE_SIM.replace("ST,GS,{value:+08.2}kg", "ERR 7");
    let rig = Rig::start(&sim, SCALE_GATEWAY);
    wait_until("parse failure", SECS(5), || rig.quality("scale.weight") == Some(PARSE_FAILURE)).await;
    let stats = rig.gateway().serial.stats("scale").expect("registered");
    assert!(stats.parse_errors.load(Relaxed) >= 1);
    assert_eq!(stats.frames.load(Relaxed), 0);
    assert_eq!(rig.value("scale.weight"), None);
    // A refused command: the reply does not match `ok`.
    let rig2_sim = SCALE_SIM.replace("reply = \"OK\\r\\n\"", "reply = \"NAK\\r\\n\"");
    rig.stop().await;
    let rig = Rig::start(&rig2_sim, SCALE_GATEWAY);
    let refused = rig.gateway().serial.send_command("scale.setpoint", &Value::Int(5)).await;
    assert!(matches!(refused, Err(CommandError::Refused { .. })), "{refused:?}");
    rig.stop().await;
}

/// A binary meter: request `01 52` + CRC-16/MODBUS, reply of fixed length 9:
/// `01 52 | u16 flow 0x04D2 (1234) | i16 temp 0xFF38 (-200) | status 0x05 | CRC`.
const METER_SIM: &str = r#"
[[raw]]
name = "meter"
request = '\x01\x52\x81\xDD'
reply_hex = "01 52 04 D2 FF 38 05"
checksum = "crc16-modbus"
"#;

const METER_GATEWAY: &str = r#"
[gateway]
name = "test"
[[bus]]
name = "meters"
port = "{port}"
protocol = "raw"
timeout = "300ms"

[[raw_device]]
name = "meter"
bus = "meters"
request_hex = "01 52"
interval = "50ms"
end = "fixed"
length = 9
checksum = "crc16-modbus"
[[raw_device.point]]
name = "flow"
byte = 2
type = "u16"
scale = 0.1
[[raw_device.point]]
name = "temp"
byte = 4
type = "i16"
[[raw_device.point]]
name = "running"
byte = 6
type = "bit"
bit = 0
[[raw_device.point]]
name = "alarm"
byte = 6
type = "bit"
bit = 1
"#;

#[tokio::test]
async fn binary_request_response_with_crc() {
    // The request the gateway builds carries the CRC the simulator expects.
    let mut request = vec![0x01, 0x52];
    m2m_gateway::serial::checksum::ChecksumRule::new(m2m_gateway::serial::checksum::Checksum::Crc16Modbus)
        .apply(&mut request);
    assert_eq!(request, [0x01, 0x52, 0x81, 0xDD]);
    let rig = Rig::start(METER_SIM, METER_GATEWAY);
    wait_until("flow read", SECS(5), || rig.value("meter.flow").is_some()).await;
    match rig.value("meter.flow") {
        Some(Value::Float(f)) => assert!((f - 123.4).abs() < 1e-9, "{f}"),
        other => panic!("flow {other:?}"),
    }
    assert_eq!(rig.value("meter.temp"), Some(Value::Int(-200)));
    assert_eq!(rig.value("meter.running"), Some(Value::Bool(true)));
    assert_eq!(rig.value("meter.alarm"), Some(Value::Bool(false)));
    // A corrupted CRC: counted, never taken.
    rig.sim.set_raw_fault("meter", Some(RawFault::CorruptChecksum)).expect("fault set");
    let bus = &rig.gateway().buses[0];
    let before = bus.stats().crc_errors.load(Relaxed);
    wait_until("crc errors", SECS(5), || bus.stats().crc_errors.load(Relaxed) > before).await;
    wait_until("comm-fail", SECS(5), || rig.quality("meter.flow") == Some(Quality::CommFail)).await;
    rig.stop().await;
}

/// A GPS talking GGA sentences with their XOR checksum every 50 ms.
const GPS_SIM: &str = r#"
[[raw]]
name = "gps"
period = "50ms"
reply = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,{value:.1},M,46.9,M,,*\r\n"
min = 545.4
max = 545.4
checksum = "xor"
checksum_format = "hex"
checksum_skip = 1
checksum_gap = 1
checksum_trailer = 2
"#;

const GPS_GATEWAY: &str = r#"
[gateway]
name = "test"
[[bus]]
name = "gps"
port = "{port}"
protocol = "raw"
baud = 4800
parity = "none"

[[raw_device]]
name = "gps"
bus = "gps"
mode = "stream"
stale_after = "1s"
start = "$"
end = "terminator"
terminator = "\r\n"
checksum = "xor"
checksum_format = "hex"
checksum_skip = 1
checksum_gap = 1
checksum_trailer = 2
regex = '^\$GPGGA,(?P<time>[0-9.]+),[^,]*,[NS],[^,]*,[EW],(?P<fix>\d),(?P<sats>\d+),[^,]*,(?P<altitude>[-0-9.]+),M'
[[raw_device.point]]
name = "altitude"
unit = "m"
[[raw_device.point]]
name = "sats"
kind = "int"
[[raw_device.point]]
name = "fix"
kind = "bool"
[[raw_device.point]]
name = "time"
kind = "text"
"#;

#[tokio::test]
async fn streaming_device_goes_stale_when_quiet() {
    let rig = Rig::start(GPS_SIM, GPS_GATEWAY);
    assert!(rig.gateway().buses.is_empty(), "a stream bus has no bus task");
    wait_until("altitude", SECS(5), || rig.value("gps.altitude") == Some(Value::Float(545.4))).await;
    assert_eq!(rig.value("gps.sats"), Some(Value::Int(8)));
    assert_eq!(rig.value("gps.fix"), Some(Value::Bool(true)));
    assert_eq!(rig.value("gps.time"), Some(Value::Text("123519".into())));

    // Corrupted checksums are counted and give no value (the value stays the old one).
    rig.sim.set_raw_fault("gps", Some(RawFault::CorruptChecksum)).expect("fault set");
    let stats = rig.gateway().serial.stats("gps").expect("registered");
    wait_until("checksum errors", SECS(5), || stats.checksum_errors.load(Relaxed) >= 2).await;

    // Quiet: the points go stale (the gateway sweeps once a second).
    rig.sim.set_raw_fault("gps", Some(RawFault::Silent)).expect("fault set");
    wait_until("stale", SECS(5), || rig.quality("gps.altitude") == Some(Quality::Stale)).await;
    assert_eq!(rig.sample("gps.altitude").and_then(|s| s.value), Some(Value::Float(545.4)));

    // Talking again: good again.
    rig.sim.set_raw_fault("gps", None).expect("fault cleared");
    wait_until("good", SECS(5), || rig.quality("gps.altitude") == Some(Quality::Good)).await;
    rig.stop().await;
}

const ASCII_SIM: &str = r#"
protocol = "ascii"
[[unit]]
unit = 3
[[unit.register]]
table = "holding"
address = 0
values = [1234, 0x42F6, 0xE979]
[[unit.register]]
table = "coils"
address = 0
values = [1, 0, 1]
"#;

const ASCII_GATEWAY: &str = r#"
[gateway]
name = "test"
[[bus]]
name = "ascii"
port = "{port}"
protocol = "modbus-ascii"
data_bits = 7
timeout = "300ms"
retries = 0
[[device]]
name = "pump"
bus = "ascii"
unit = 3
interval = "50ms"
[[device.point]]
name = "speed"
table = "holding"
address = 0
[[device.point]]
name = "flow"
table = "holding"
address = 1
type = "f32"
[[device.point]]
name = "run"
table = "coils"
address = 2
"#;

#[tokio::test]
async fn modbus_ascii_reads_and_lrc_error() {
    let rig = Rig::start(ASCII_SIM, ASCII_GATEWAY);
    wait_until("speed", SECS(5), || rig.value("pump.speed") == Some(Value::UInt(1234))).await;
    match rig.value("pump.flow") {
        Some(Value::Float(f)) => assert!((f - 123.456).abs() < 1e-3, "{f}"),
        other => panic!("flow {other:?}"),
    }
    assert_eq!(rig.value("pump.run"), Some(Value::Bool(true)));
    assert!(rig.sim.stats(3).requests >= 2);

    rig.sim.set_fault(3, Fault::CorruptCrc).expect("fault set");
    let bus = &rig.gateway().buses[0];
    let before = bus.stats().crc_errors.load(Relaxed);
    wait_until("lrc errors", SECS(5), || bus.stats().crc_errors.load(Relaxed) > before).await;
    wait_until("comm-fail", SECS(5), || rig.quality("pump.speed") == Some(Quality::CommFail)).await;
    rig.sim.clear_fault(3).expect("fault cleared");
    wait_until("good again", SECS(10), || rig.quality("pump.speed") == Some(Quality::Good)).await;
    rig.stop().await;
}

#[tokio::test]
async fn commissioning_raw_request_shows_the_reply() {
    use m2m_gateway::model::{Line, Parity};
    use m2m_gateway::serial::raw::{FrameEnd, FrameRule};
    use m2m_gateway::sim::{Simulator, VirtualPort};
    use m2m_gateway::tools::commission::{RawSpec, raw_once, render_raw};

    let mut port = VirtualPort::new().expect("pty pair");
    port.run(Simulator::new(common::sim_config(METER_SIM))).expect("simulator runs");
    let spec = RawSpec {
        port: port.path().display().to_string(),
        line: Line { baud: 9600, data_bits: 8, parity: Parity::None, stop_bits: 1 },
        request: vec![0x01, 0x52, 0x81, 0xDD],
        framing: FrameRule { start: None, end: FrameEnd::Fixed(9) },
        silence: Duration::from_millis(20),
        timeout: Duration::from_millis(500),
    };
    let r = common::within(SECS(5), "raw request", raw_once(&spec)).await.expect("reply");
    assert_eq!(&r.reply[..7], [0x01, 0x52, 0x04, 0xD2, 0xFF, 0x38, 0x05]);
    let shown = render_raw(&r);
    assert!(shown.contains("reply 9 bytes") && shown.contains("01 52 04 D2 FF 38 05"), "{shown}");
    // By silence: the same frame, ended by the quiet line.
    let spec = RawSpec { framing: FrameRule { start: None, end: FrameEnd::Silence }, ..spec };
    let r = common::within(SECS(5), "raw request", raw_once(&spec)).await.expect("reply");
    assert_eq!(r.reply.len(), 9);
    // A request nobody answers: an error, not a hang.
    let spec = RawSpec { request: b"?".to_vec(), timeout: Duration::from_millis(100), ..spec };
    assert!(common::within(SECS(5), "raw request", raw_once(&spec)).await.is_err());
}

#[tokio::test]
async fn stream_port_vanishes_and_comes_back() {
    use m2m_gateway::sim::VirtualPort;

    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("usb-gps-if00-port0");
    let port = VirtualPort::with_link(&link).expect("pty");
    let mut rig = Rig::start_on(port, GPS_SIM, GPS_GATEWAY);
    wait_until("altitude", SECS(5), || rig.quality("gps.altitude") == Some(Quality::Good)).await;
    rig.port.vanish().await;
    wait_until("comm-fail while unplugged", SECS(5), || {
        rig.quality("gps.altitude") == Some(Quality::CommFail)
    })
    .await;
    rig.port.come_back().expect("replug");
    wait_until("streaming again", SECS(10), || rig.quality("gps.altitude") == Some(Quality::Good)).await;
    let stats = rig.gateway().serial.stats("gps").expect("registered");
    assert!(stats.frames.load(Relaxed) >= 2);
    rig.stop().await;
}
