//! End-to-end polling: the gateway's bus engine and poller against the project's
//! simulator on real pseudo-terminal pairs.

use crate::common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{Rig, wait_until};
use m2m_gateway::bus::Priority;
use m2m_gateway::point::value::{Quality, Table, Value};
use m2m_gateway::sim::{Fault, VirtualPort};
use tokio_modbus::{Request, Response};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Words of the same values in each order, worked out by hand from the spec of each
/// order (independent of the codec under test):
/// f32 123.456 = 0x42F6E979, i32 -2 = 0xFFFFFFFE, u64 0x0102030405060708, f64 1.5.
const TYPED_SIM: &str = r#"
[[unit]]
unit = 1
[[unit.register]]
table = "coils"
address = 0
values = [1, 0, 1]
[[unit.register]]
table = "discrete"
address = 0
values = [0, 1]
[[unit.register]]
table = "holding"
address = 0
values = [0x42F6, 0xE979,  0xE979, 0x42F6,  0xF642, 0x79E9,  0x79E9, 0xF642]
[[unit.register]]
table = "holding"
address = 10
values = [0xFFFF, 0xFFFE,  0xFFFE, 0xFFFF,  0xFFFF, 0xFEFF,  0xFEFF, 0xFFFF]
[[unit.register]]
table = "holding"
address = 20
values = [-5, 0x0008, 1234, 0x4142, 0x4300]
[[unit.register]]
table = "input"
address = 0
values = [0x0102, 0x0304, 0x0506, 0x0708,  0x0708, 0x0506, 0x0304, 0x0102,
          0x0201, 0x0403, 0x0605, 0x0807,  0x0807, 0x0605, 0x0403, 0x0201]
[[unit.register]]
table = "input"
address = 20
values = [0x3FF8, 0, 0, 0,  0, 0, 0, 0x3FF8,  0xF83F, 0, 0, 0,  0, 0, 0, 0xF83F]
"#;

const TYPED_GATEWAY: &str = r#"
[gateway]
name = "test"
[[bus]]
name = "line"
port = "{port}"
timeout = "300ms"
[[device]]
name = "d"
bus = "line"
unit = 1
interval = "50ms"
point = [
  { name = "c0", table = "coils", address = 0, type = "bool" },
  { name = "c1", table = "coils", address = 1, type = "bool" },
  { name = "c2", table = "coils", address = 2, type = "bool" },
  { name = "di1", table = "discrete", address = 1, type = "bool" },
  { name = "f_abcd", table = "holding", address = 0, type = "f32", order = "abcd" },
  { name = "f_cdab", table = "holding", address = 2, type = "f32", order = "cdab" },
  { name = "f_badc", table = "holding", address = 4, type = "f32", order = "badc" },
  { name = "f_dcba", table = "holding", address = 6, type = "f32", order = "dcba" },
  { name = "i_abcd", table = "holding", address = 10, type = "i32", order = "abcd" },
  { name = "i_cdab", table = "holding", address = 12, type = "i32", order = "cdab" },
  { name = "i_badc", table = "holding", address = 14, type = "i32", order = "badc" },
  { name = "i_dcba", table = "holding", address = 16, type = "i32", order = "dcba" },
  { name = "i16", table = "holding", address = 20, type = "i16" },
  { name = "bit3", table = "holding", address = 21, type = "bit", bit = 3 },
  { name = "bit2", table = "holding", address = 21, type = "bit", bit = 2 },
  { name = "scaled", table = "holding", address = 22, type = "u16", scale = 0.1 },
  { name = "text", table = "holding", address = 23, type = "string", length = 3 },
  { name = "u_abcd", table = "input", address = 0, type = "u64", order = "abcd" },
  { name = "u_cdab", table = "input", address = 4, type = "u64", order = "cdab" },
  { name = "u_badc", table = "input", address = 8, type = "u64", order = "badc" },
  { name = "u_dcba", table = "input", address = 12, type = "u64", order = "dcba" },
  { name = "d_abcd", table = "input", address = 20, type = "f64", order = "abcd" },
  { name = "d_cdab", table = "input", address = 24, type = "f64", order = "cdab" },
  { name = "d_badc", table = "input", address = 28, type = "f64", order = "badc" },
  { name = "d_dcba", table = "input", address = 32, type = "f64", order = "dcba" },
]
"#;

#[tokio::test]
async fn every_read_function_and_every_word_order() {
    let rig = Rig::start(TYPED_SIM, TYPED_GATEWAY);
    let expected = [
        ("d.c0", Value::Bool(true)),
        ("d.c1", Value::Bool(false)),
        ("d.c2", Value::Bool(true)),
        ("d.di1", Value::Bool(true)),
        ("d.f_abcd", Value::Float(123.456)),
        ("d.f_cdab", Value::Float(123.456)),
        ("d.f_badc", Value::Float(123.456)),
        ("d.f_dcba", Value::Float(123.456)),
        ("d.i_abcd", Value::Int(-2)),
        ("d.i_cdab", Value::Int(-2)),
        ("d.i_badc", Value::Int(-2)),
        ("d.i_dcba", Value::Int(-2)),
        ("d.i16", Value::Int(-5)),
        ("d.bit3", Value::Bool(true)),
        ("d.bit2", Value::Bool(false)),
        ("d.scaled", Value::Float(123.4)),
        ("d.text", Value::Text("ABC".into())),
        ("d.u_abcd", Value::UInt(0x0102030405060708)),
        ("d.u_cdab", Value::UInt(0x0102030405060708)),
        ("d.u_badc", Value::UInt(0x0102030405060708)),
        ("d.u_dcba", Value::UInt(0x0102030405060708)),
        ("d.d_abcd", Value::Float(1.5)),
        ("d.d_cdab", Value::Float(1.5)),
        ("d.d_badc", Value::Float(1.5)),
        ("d.d_dcba", Value::Float(1.5)),
    ];
    let all_read = || expected.iter().all(|(p, _)| rig.value(p).is_some());
    if tokio::time::timeout(SECS(10), async {
        while !all_read() {
            tokio::time::sleep(Duration::from_millis(10)).await
        }
    })
    .await
    .is_err()
    {
        panic!("not every point was read: {:#?}", rig.gateway().image.snapshot());
    }
    for (point, value) in &expected {
        assert_eq!(rig.value(point).as_ref(), Some(value), "{point}");
    }
    // FC1, FC2, FC3 and FC4 all went over the line: one request per table at least.
    assert!(rig.sim.stats(1).answered >= 4);
    // A value that changes on the device changes in the image.
    rig.sim.set_register(1, Table::Holding, 20, 0xFFF0).expect("set");
    wait_until("new value", SECS(5), || rig.value("d.i16") == Some(Value::Int(-16))).await;
    rig.stop().await;
}

const TWO_UNITS_SIM: &str = r#"
[[unit]]
unit = 1
[[unit.register]]
table = "holding"
address = 0
values = [11, 12]
[[unit.register]]
table = "holding"
address = 50
values = [71, 72]
[[unit]]
unit = 2
[[unit.register]]
table = "holding"
address = 0
values = [21, 22]
"#;

const TWO_UNITS_GATEWAY: &str = r#"
[gateway]
name = "test"
[[bus]]
name = "line"
port = "{port}"
timeout = "100ms"
retries = 0
[[device]]
name = "a"
bus = "line"
unit = 1
interval = "50ms"
max_gap = 0
backoff_max = "1s"
point = [
  { name = "x", table = "holding", address = 0 },
  { name = "y", table = "holding", address = 1 },
  { name = "p", table = "holding", address = 50 },
  { name = "q", table = "holding", address = 51 },
]
[[device]]
name = "b"
bus = "line"
unit = 2
interval = "50ms"
point = [{ name = "x", table = "holding", address = 0 }]
"#;

fn a_values(rig: &Rig) -> [Option<Value>; 4] {
    ["a.x", "a.y", "a.p", "a.q"].map(|p| rig.value(p))
}

fn a_is_right(rig: &Rig) -> bool {
    a_values(rig) == [11, 12, 71, 72].map(|v| Some(Value::UInt(v)))
}

/// Runs the rig for `period` with `fault` on unit 1 and asserts that unit 1 never has a
/// good value meanwhile, while unit 2 keeps being read; then clears the fault and checks
/// that unit 1 comes back with exactly its own values.
async fn fault_never_surfaces(fault: Fault, period: Duration) -> Rig {
    let rig = Rig::start(TWO_UNITS_SIM, TWO_UNITS_GATEWAY);
    wait_until("unit 1 read", SECS(5), || a_is_right(&rig)).await;
    rig.sim.set_fault(1, fault).expect("fault");
    wait_until("unit 1 comm-fail", SECS(5), || rig.quality("a.x") == Some(Quality::CommFail)).await;
    let before = rig.sim.stats(2).answered;
    let mut changes = rig.gateway().image.subscribe();
    // Watch for `period`, and until the window covered real traffic: unit 2 kept being
    // polled meanwhile.
    tokio::time::sleep(period).await;
    wait_until("unit 2 kept being polled", SECS(10), || rig.sim.stats(2).answered > before + 5).await;
    while let Ok(batch) = changes.try_recv() {
        for (name, sample) in &batch.samples {
            if name.starts_with("a.") {
                assert_ne!(sample.quality, Quality::Good, "{fault:?}: {name} surfaced as data: {sample:?}");
            }
        }
    }
    rig.sim.clear_fault(1).expect("clear");
    wait_until("unit 1 back", SECS(10), || a_is_right(&rig)).await;
    rig
}

#[tokio::test]
async fn late_replies_never_surface_as_data() {
    // Replies come 150 ms after the request: after the 100 ms timeout, while the next
    // request (same unit, same function, same length, other registers) could be waiting.
    let rig = fault_never_surfaces(Fault::Late(Duration::from_millis(150)), SECS(2)).await;
    let stats = rig.gateway().buses[0].stats();
    assert!(stats.timeouts.load(Relaxed) > 0);
    rig.stop().await;
}

#[tokio::test]
async fn corrupted_crc_is_counted_never_data() {
    let rig = fault_never_surfaces(Fault::CorruptCrc, SECS(1)).await;
    assert!(rig.gateway().buses[0].stats().crc_errors.load(Relaxed) > 0);
    rig.stop().await;
}

#[tokio::test]
async fn replies_from_the_wrong_unit_are_discarded() {
    let rig = fault_never_surfaces(Fault::WrongUnit(2), SECS(1)).await;
    assert!(rig.gateway().buses[0].stats().foreign_frames.load(Relaxed) > 0);
    rig.stop().await;
}

#[tokio::test]
async fn noise_before_replies_is_skipped() {
    let rig = Rig::start(TWO_UNITS_SIM, TWO_UNITS_GATEWAY);
    rig.sim.set_fault(1, Fault::NoiseBefore(24)).expect("fault");
    let answered = rig.sim.stats(1).answered;
    wait_until("noisy replies answered", SECS(5), || rig.sim.stats(1).answered > answered + 10).await;
    assert!(a_is_right(&rig), "values read through the noise: {:?}", a_values(&rig));
    assert_eq!(rig.quality("a.x"), Some(Quality::Good));
    assert!(rig.gateway().buses[0].stats().noise_bytes.load(Relaxed) >= 24);
    rig.stop().await;
}

#[tokio::test]
async fn exception_marks_only_that_read() {
    let gateway = TWO_UNITS_GATEWAY.replace(
        r#"{ name = "q", table = "holding", address = 51 },"#,
        r#"{ name = "q", table = "holding", address = 51 },
  { name = "missing", table = "holding", address = 900 },"#,
    );
    let rig = Rig::start(TWO_UNITS_SIM, &gateway);
    wait_until("exception recorded", SECS(5), || rig.quality("a.missing") == Some(Quality::Exception(2)))
        .await;
    wait_until("others good", SECS(5), || a_is_right(&rig)).await;
    assert_eq!(rig.gateway().image.get("a.missing").and_then(|s| s.value), None);
    rig.stop().await;
}

#[tokio::test]
async fn a_silent_device_does_not_slow_the_others() {
    let rig = Rig::start(TWO_UNITS_SIM, TWO_UNITS_GATEWAY);
    wait_until("both read", SECS(5), || rig.value("b.x").is_some() && a_is_right(&rig)).await;
    rig.sim.set_fault(1, Fault::Silent).expect("fault");
    wait_until("unit 1 comm-fail", SECS(5), || rig.quality("a.x") == Some(Quality::CommFail)).await;
    let (b0, a0) = (rig.sim.stats(2).requests, rig.sim.stats(1).requests);
    let started = std::time::Instant::now();
    // Unit 2 is polled every 50 ms: 40 reads take about 2 s. Were silent unit 1 still asked
    // at every turn, each of its 100 ms timeouts would come between two of them.
    wait_until("unit 2 read 40 times", SECS(20), || rig.sim.stats(2).requests >= b0 + 40).await;
    let a = rig.sim.stats(1).requests - a0;
    // Unit 1 costs only its back-off probes: a few on the way up, then at most one per
    // second (backoff_max), however long a loaded machine took.
    let probes = 4 + started.elapsed().as_secs();
    assert!(
        a <= probes,
        "silent unit 1 was asked {a} times while unit 2 was read 40 times (at most {probes})"
    );
    rig.stop().await;
}

#[tokio::test]
async fn port_vanishes_and_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("usb-FTDI_FT232R_USB_UART_A10K1ABC-if00-port0");
    let port = VirtualPort::with_link(&link).expect("pty");
    let mut rig = Rig::start_on(port, TWO_UNITS_SIM, TWO_UNITS_GATEWAY);
    wait_until("first read", SECS(5), || a_is_right(&rig)).await;
    rig.port.vanish().await;
    wait_until("comm-fail while unplugged", SECS(5), || rig.quality("b.x") == Some(Quality::CommFail)).await;
    // Plugged back in: a new pty (another /dev/pts/N) behind the same by-id link.
    rig.port.come_back().expect("replug");
    wait_until("polling resumed", SECS(10), || rig.quality("b.x") == Some(Quality::Good) && a_is_right(&rig))
        .await;
    assert!(rig.gateway().buses[0].stats().opens.load(Relaxed) >= 2);
    rig.stop().await;
}

#[tokio::test]
async fn broadcast_reaches_every_unit_without_a_reply() {
    let rig = Rig::start(TWO_UNITS_SIM, TWO_UNITS_GATEWAY);
    wait_until("polling", SECS(5), || a_is_right(&rig)).await;
    let bus = &rig.gateway().buses[0];
    let started = std::time::Instant::now();
    let rsp = bus
        .transact(0, Request::WriteSingleRegister(1, 4242), Priority::Write, Duration::from_millis(500), 0)
        .await
        .expect("broadcast sent");
    assert_eq!(rsp, Response::WriteSingleRegister(1, 4242));
    // Not answered, so not waited for: well under the 500 ms timeout.
    assert!(started.elapsed() < Duration::from_millis(400), "broadcast waited {:?}", started.elapsed());
    wait_until("both units written", SECS(2), || {
        rig.sim.register(1, Table::Holding, 1) == Some(4242)
            && rig.sim.register(2, Table::Holding, 1) == Some(4242)
    })
    .await;
    assert_eq!(bus.stats().timeouts.load(Relaxed), 0);
    rig.stop().await;
}

#[tokio::test]
async fn writes_go_before_queued_polls() {
    let rig = Rig::start(TWO_UNITS_SIM, TWO_UNITS_GATEWAY);
    wait_until("polling", SECS(5), || a_is_right(&rig)).await;
    let bus = &rig.gateway().buses[0];
    let rsp = bus
        .transact(2, Request::WriteMultipleRegisters(0, vec![5, 6].into()), Priority::Write, SECS(1), 1)
        .await
        .expect("write");
    assert_eq!(rsp, Response::WriteMultipleRegisters(0, 2));
    wait_until("write read back", SECS(2), || rig.value("b.x") == Some(Value::UInt(5))).await;
    // A request for a unit that does not exist times out, with the retries given.
    let err = bus
        .transact(
            99,
            Request::ReadHoldingRegisters(0, 1),
            Priority::PassThrough,
            Duration::from_millis(50),
            1,
        )
        .await
        .expect_err("nobody answers unit 99");
    assert_eq!(err, m2m_gateway::bus::BusError::Timeout { attempts: 2 });
    rig.stop().await;
}

#[tokio::test]
async fn a_merged_read_refused_for_its_gaps_is_split() {
    // The typed map has holes (registers 8, 9, 18, 19 are not mapped): with the default
    // max_gap the plan bridges them, the simulated device refuses with exception 0x02
    // like real ones do, and the poller splits the read, so every point still reads.
    let rig = Rig::start(TYPED_SIM, TYPED_GATEWAY);
    wait_until("split reads answered", SECS(10), || {
        ["d.f_abcd", "d.i_abcd", "d.i16", "d.text", "d.d_dcba"].iter().all(|p| rig.value(p).is_some())
    })
    .await;
    assert_eq!(rig.value("d.i_dcba"), Some(Value::Int(-2)));
    assert_eq!(rig.value("d.text"), Some(Value::Text("ABC".into())));
    rig.stop().await;
}

/// The silence kept before each request is the bus's `frame_gap` when one is set, t3.5
/// otherwise: measured by the simulated device, from the moment its reply went out to the
/// first byte of the next request (a lower bound: delays only lengthen it).
#[tokio::test]
async fn the_silence_before_each_request_is_the_frame_gap() {
    // The device emulates the line's timing (and records each exchange).
    let sim = "[line]\nbaud = 115200\nparity = \"none\"\nturnaround = \"1ms\"\n\
               [[unit]]\nunit = 1\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nvalues = [1, 2]\n";
    for (gap, expected) in
        [("", Duration::from_micros(1750)), ("frame_gap = \"6ms\"\n", Duration::from_millis(6))]
    {
        let gateway = format!(
            "[gateway]\nname = \"test\"\n[[bus]]\nname = \"line\"\nport = \"{{port}}\"\nbaud = 115200\nparity = \"none\"\n{gap}\
             [[device]]\nname = \"d\"\nbus = \"line\"\nunit = 1\ninterval = \"10ms\"\n\
             point = [{{ name = \"a\", table = \"holding\", address = 0 }}, {{ name = \"b\", table = \"coils\", address = 0 }}]\n"
        );
        let sim = format!("{sim}[[unit.register]]\ntable = \"coils\"\naddress = 0\nvalues = [1]\n");
        let rig = Rig::start(&sim, &gateway);
        wait_until("polled", SECS(3), || rig.value("d.a").is_some()).await;
        rig.sim.take_exchanges();
        // Collect 20 back-to-back exchanges (however long a loaded machine takes).
        let mut ex = Vec::new();
        let deadline = std::time::Instant::now() + SECS(10);
        while ex.len() < 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            ex.extend(rig.sim.take_exchanges());
        }
        assert!(ex.len() >= 20, "back-to-back polls within 10 s: {}", ex.len());
        let min = ex.windows(2).map(|w| w[1].request_at - w[0].reply_end).min().expect("pairs");
        assert!(min >= expected, "silence {min:?} before a request, frame gap {expected:?}");
        rig.stop().await;
    }
}
