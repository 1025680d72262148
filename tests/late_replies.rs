//! Issue 10, D1: a device that answers later than the timeout must never have its late
//! reply served as the answer to another request. The simulator's `queued` fault answers
//! every request late, in order, retries included (as a device with a receive queue does);
//! register n holds the value n, so a reply that answers the wrong request shows.

use crate::common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{Rig, wait_until, within};
use m2m_gateway::bus::{BusError, BusHandle, Priority};
use m2m_gateway::sim::{Simulator, VirtualPort};
use tokio_modbus::{Request, Response};
use tokio_util::sync::CancellationToken;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The response timeout the tests run with: short, so the delays stay short.
const TIMEOUT_MS: u64 = 60;

/// Unit 1: holding 0..16 and 100..116 hold their own addresses; 200 is written.
fn sim(fault: &str) -> String {
    let a: Vec<String> = (0..16).map(|i| i.to_string()).collect();
    let b: Vec<String> = (100..116).map(|i| i.to_string()).collect();
    format!(
        r#"
[line]
baud = 115200
[[unit]]
unit = 1
{fault}
[[unit.register]]
table = "holding"
address = 0
values = [{}]
[[unit.register]]
table = "holding"
address = 100
values = [{}]
[[unit.register]]
table = "holding"
address = 200
values = [0]
"#,
        a.join(", "),
        b.join(", ")
    )
}

fn bus_toml(retries: u8) -> String {
    format!(
        r#"
[gateway]
name = "t"
[[bus]]
name = "line"
port = "{{port}}"
baud = 115200
timeout = "{TIMEOUT_MS}ms"
retries = {retries}
"#
    )
}

/// What one operation asked for, and whether an answer fits it exactly.
#[derive(Debug, Clone)]
enum Op {
    Read(u16, u16),
    Write6(u16, u16),
    Write16(u16, Vec<u16>),
}

impl Op {
    fn request(&self) -> Request<'static> {
        match self {
            Op::Read(a, q) => Request::ReadHoldingRegisters(*a, *q),
            Op::Write6(a, v) => Request::WriteSingleRegister(*a, *v),
            Op::Write16(a, v) => Request::WriteMultipleRegisters(*a, v.clone().into()),
        }
    }

    /// The one correct answer: register n holds n; a write's echo is its own.
    fn right(&self, rsp: &Response) -> bool {
        match (self, rsp) {
            (Op::Read(a, q), Response::ReadHoldingRegisters(w)) => *w == (*a..*a + *q).collect::<Vec<_>>(),
            (Op::Write6(a, v), Response::WriteSingleRegister(b, w)) => (a, v) == (b, w),
            (Op::Write16(a, v), Response::WriteMultipleRegisters(b, n)) => {
                a == b && usize::from(*n) == v.len()
            }
            _ => false,
        }
    }
}

/// Reads of two blocks with the same quantity (indistinguishable but for their values),
/// and FC6 / FC16 writes to the same address with different values.
fn ops() -> Vec<Op> {
    vec![
        Op::Read(0, 8),
        Op::Read(100, 8),
        Op::Write6(200, 11),
        Op::Read(0, 8),
        Op::Write16(200, vec![12]),
        Op::Write16(200, vec![13]),
        Op::Read(100, 8),
        Op::Write6(200, 14),
        Op::Read(0, 8),
        Op::Read(100, 8),
    ]
}

#[derive(Debug, Default)]
struct Tally {
    right: usize,
    wrong: Vec<String>,
    timeouts: usize,
}

async fn run_ops(bus: &BusHandle, retries: u8) -> Tally {
    let mut tally = Tally::default();
    for op in ops() {
        let timeout = Duration::from_millis(TIMEOUT_MS);
        let got = bus.transact(1, op.request(), Priority::Write, timeout, retries).await;
        match got {
            Ok(rsp) if op.right(&rsp) => tally.right += 1,
            Ok(rsp) => tally.wrong.push(format!("asked {op:?}, got {rsp:?}")),
            Err(BusError::Timeout { .. }) => tally.timeouts += 1,
            Err(e) => tally.wrong.push(format!("asked {op:?}, failed: {e}")),
        }
    }
    tally
}

/// One device, `delay` late in queued mode, talked to by the bus engine with `retries`.
async fn engine_case(delay_ms: u64, retries: u8) -> (Tally, u64) {
    let mut port = VirtualPort::new().expect("pty pair");
    let sim = Simulator::new(common::sim_config(&sim(&format!("fault = \"queued {delay_ms}ms\""))));
    port.run(sim).expect("simulator runs");
    let model = common::model(&bus_toml(retries), &port.path().display().to_string());
    let shutdown = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let bus = m2m_gateway::bus::spawn(&model.buses[0], shutdown.clone(), &tracker);
    let tally = run_ops(&bus, retries).await;
    // The last request's reply is late too: it is heard (and counted) once it comes.
    let stats = bus.stats();
    wait_until("a late reply counted", SECS(5), || stats.late_replies.load(Relaxed) > 0).await;
    let late = stats.late_replies.load(Relaxed);
    shutdown.cancel();
    tracker.close();
    within(SECS(2), "bus stops", tracker.wait()).await;
    (tally, late)
}

/// Every delay (1.1x, 1.5x, 2.5x the timeout) with every retry count 0..=3, reads and
/// writes through the bus engine: never a wrong answer; late replies counted; with a
/// retry, a device late by less than the hold still gets its answers through.
#[tokio::test]
async fn late_replies_never_answer_another_request() {
    let cases: Vec<(u64, u8)> =
        [11, 15, 25].iter().flat_map(|f| (0..=3).map(move |r| (TIMEOUT_MS * f / 10, r))).collect();
    let runs = futures::future::join_all(cases.iter().map(|&(delay, retries)| async move {
        let (tally, late) = engine_case(delay, retries).await;
        (delay, retries, tally, late)
    }));
    let results = within(SECS(60), "every case", runs).await;
    let mut wrong = Vec::new();
    for (delay, retries, tally, late) in &results {
        println!("delay {delay} ms, retries {retries}: {tally:?}, {late} late replies");
        wrong.extend(tally.wrong.iter().map(|w| format!("delay {delay} ms, retries {retries}: {w}")));
        if *retries > 0 {
            assert!(tally.right > 0, "delay {delay} ms, retries {retries}: nothing got through: {tally:?}");
        }
    }
    assert!(wrong.is_empty(), "{} wrong answers:\n{}", wrong.len(), wrong.join("\n"));
}

/// A gateway polling blocks 0..8 and 100..108 of the late device, serving them as an
/// agent unit (from the image) and passing a master's reads through to it.
fn gateway_toml(retries: u8) -> String {
    let points: Vec<String> = (0..8)
        .flat_map(|i| {
            [
                format!(r#"{{ name = "a{i}", table = "holding", address = {i} }}"#),
                format!(r#"{{ name = "b{i}", table = "holding", address = {} }}"#, 100 + i),
            ]
        })
        .collect();
    format!(
        r#"{}
[[device]]
name = "d"
bus = "line"
unit = 1
interval = "100ms"
point = [{}]

[server]
listen = "127.0.0.1:0"

[[server.unit]]
unit = 10
agent = "d"
max_age = "1h"

[[server.unit]]
unit = 20
pass = "d"
"#,
        bus_toml(retries),
        points.join(", ")
    )
}

/// Polls, agent reads and pass-through reads through the Modbus-TCP server, against a
/// device late by 1.1x, 1.5x and 2.5x the timeout, with 0..=3 retries: what reaches the
/// image as good, and every answer a master gets, is the registers it asked for.
#[tokio::test]
async fn polls_agent_reads_and_pass_through_serve_no_wrong_value() {
    let cases: Vec<(u64, u8)> =
        [11, 15, 25].iter().flat_map(|f| (0..=3).map(move |r| (TIMEOUT_MS * f / 10, r))).collect();
    let runs = futures::future::join_all(cases.iter().map(|&(delay, retries)| async move {
        let rig = Rig::start(&sim(&format!("fault = \"queued {delay}ms\"")), &gateway_toml(retries));
        let addr = rig.gateway().server_addr.expect("server listening");
        let mut wrong = Vec::new();
        let mut right = 0;
        // Everything in the image marked good is the register's own address.
        let mut seen = 0;
        let mut check_image = |wrong: &mut Vec<String>| {
            for i in 0..8u16 {
                for (name, at) in [(format!("d.a{i}"), i), (format!("d.b{i}"), 100 + i)] {
                    if let Some(v) = rig.value(&name) {
                        seen += 1;
                        if v != m2m_gateway::point::value::Value::UInt(u64::from(at))
                            && v != m2m_gateway::point::value::Value::Int(i64::from(at))
                        {
                            wrong.push(format!("image {name} = {v:?}"));
                        }
                    }
                }
            }
        };
        let agent = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(10)).await;
        let pass = tokio_modbus::client::tcp::connect_slave(addr, tokio_modbus::Slave(20)).await;
        let (mut agent, mut pass) = (agent.expect("agent master"), pass.expect("pass master"));
        use tokio_modbus::client::Reader;
        for k in 0..6u16 {
            let start = if k % 2 == 0 { 0 } else { 100 };
            let want: Vec<u16> = (start..start + 8).collect();
            for (who, ctx) in [("agent", &mut agent), ("pass-through", &mut pass)] {
                match within(SECS(10), "a master's read", ctx.read_holding_registers(start, 8)).await {
                    Ok(Ok(words)) if words == want => right += 1,
                    Ok(Ok(words)) => wrong.push(format!("{who} asked {start}.., got {words:?}")),
                    // Exceptions (0x0B while the device is not answering in time) are honest.
                    Ok(Err(_)) => {}
                    Err(e) => wrong.push(format!("{who}: {e}")),
                }
            }
            check_image(&mut wrong);
        }
        let late = rig.gateway().buses[0].stats().late_replies.load(Relaxed);
        rig.stop().await;
        if retries > 0 {
            assert!(seen > 0 && right > 0, "delay {delay} ms, retries {retries}: nothing got through");
        }
        (delay, retries, right, wrong, late)
    }));
    let results = within(SECS(120), "every case", runs).await;
    let mut wrong = Vec::new();
    for (delay, retries, right, w, late) in results {
        println!(
            "delay {delay} ms, retries {retries}: {right} right answers, {} wrong, {late} late replies",
            w.len()
        );
        assert!(late > 0, "delay {delay} ms, retries {retries}: no late reply counted");
        wrong.extend(w.into_iter().map(|w| format!("delay {delay} ms, retries {retries}: {w}")));
    }
    assert!(wrong.is_empty(), "{} wrong values:\n{}", wrong.len(), wrong.join("\n"));
}

/// Issue 10, "slow recovery from a dropped byte": a reply that lost a byte is dead at the
/// first long silence, counted as a framing error, and retried at once — not after the
/// whole timeout — and never taken as a value.
#[tokio::test]
async fn a_reply_short_of_a_byte_is_retried_at_once() {
    const TIMEOUT: Duration = Duration::from_millis(400);
    let mut port = VirtualPort::new().expect("pty pair");
    let sim = Simulator::new(common::sim_config(&sim("fault = \"drop-byte 3\"")));
    port.run(sim).expect("simulator runs");
    let model = common::model(&bus_toml(1), &port.path().display().to_string());
    let shutdown = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let bus = m2m_gateway::bus::spawn(&model.buses[0], shutdown.clone(), &tracker);
    let started = tokio::time::Instant::now();
    let mut wrong = Vec::new();
    for k in 0..12u16 {
        let op = Op::Read(if k % 2 == 0 { 0 } else { 100 }, 8);
        match bus.transact(1, op.request(), Priority::Write, TIMEOUT, 1).await {
            Ok(rsp) if op.right(&rsp) => {}
            other => wrong.push(format!("asked {op:?}, got {other:?}")),
        }
    }
    let took = started.elapsed();
    let stats = bus.stats();
    let framing = stats.framing_errors.load(Relaxed);
    assert!(wrong.is_empty(), "{wrong:?}");
    assert!(framing >= 4, "every third reply is cut short: {framing} framing errors");
    assert_eq!(stats.timeouts.load(Relaxed), 0, "no attempt waited for its timeout");
    // Waiting out the timeout for each would have taken framing x 400 ms.
    assert!(took < TIMEOUT * 2, "12 reads with {framing} cut replies took {took:?}");
    shutdown.cancel();
    tracker.close();
    within(SECS(2), "bus stops", tracker.wait()).await;
}

/// The traffic tap: a subscriber sees the request and its reply, and a reply with a bad
/// CRC as a CRC error, never as a value; a late reply shows as discarded.
#[tokio::test]
async fn the_traffic_tap_shows_frames_with_their_verdicts() {
    use m2m_gateway::bus::{TraceDir, Verdict};
    let mut port = VirtualPort::new().expect("pty pair");
    let sim = Simulator::new(common::sim_config(&sim("")));
    let handle = sim.handle();
    port.run(sim).expect("simulator runs");
    let model = common::model(&bus_toml(0), &port.path().display().to_string());
    let shutdown = CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let bus = m2m_gateway::bus::spawn(&model.buses[0], shutdown.clone(), &tracker);
    let mut trace = bus.trace();
    let timeout = Duration::from_millis(TIMEOUT_MS);
    let read = Request::ReadHoldingRegisters(0, 8);
    bus.transact(1, read.clone(), Priority::Write, timeout, 0).await.expect("answer");
    let sent = trace.recv().await.expect("tx event");
    assert_eq!((sent.dir, sent.verdict, sent.unit), (TraceDir::Tx, Verdict::Sent, Some(1)));
    assert_eq!(sent.summary, "unit 1 read holding 0+8");
    assert_eq!(&sent.bytes[..], &[1, 3, 0, 0, 0, 8, 0x44, 0x0C]);
    let ok = trace.recv().await.expect("rx event");
    assert_eq!((ok.dir, ok.verdict), (TraceDir::Rx, Verdict::Ok));
    assert_eq!(ok.bytes.len(), 3 + 16 + 2);
    assert_eq!(ok.summary, "unit 1 reply [0, 1, 2, 3, 4, 5, 6, 7]");

    handle.set_fault(1, m2m_gateway::sim::Fault::CorruptCrc).expect("fault set");
    let got = bus.transact(1, read.clone(), Priority::Write, timeout, 0).await;
    assert!(matches!(got, Err(BusError::Timeout { .. })), "{got:?}");
    let mut verdicts = Vec::new();
    while let Ok(ev) = trace.try_recv() {
        verdicts.push(ev.verdict);
    }
    assert_eq!(verdicts.first(), Some(&Verdict::Sent));
    assert!(verdicts.contains(&Verdict::CrcError), "{verdicts:?}");
    assert!(!verdicts.contains(&Verdict::Ok), "a corrupt reply is never a value: {verdicts:?}");
    let json = serde_json::to_string(&sent).expect("serialises");
    assert!(json.contains(r#""verdict":"sent""#) && json.contains(r#""bytes":"010300000008"#), "{json}");

    // A late reply (queued 1.5x the timeout, no retry) is shown as discarded.
    handle.set_fault(1, m2m_gateway::sim::Fault::Queued(timeout * 3 / 2)).expect("fault set");
    let got = bus.transact(1, read, Priority::Write, timeout, 0).await;
    assert!(matches!(got, Err(BusError::Timeout { .. })), "{got:?}");
    let discarded = within(SECS(5), "the late reply", async {
        loop {
            let ev = trace.recv().await.expect("event");
            if ev.verdict == Verdict::LateReplyDiscarded {
                return ev;
            }
            assert_ne!(ev.verdict, Verdict::Ok, "{ev:?}");
        }
    })
    .await;
    assert_eq!(discarded.unit, Some(1));
    shutdown.cancel();
    tracker.close();
    within(SECS(2), "bus stops", tracker.wait()).await;
}
