//! PLC peers end to end: a simulated PLC (a tokio-modbus TCP server holding registers and
//! coils, and logging every request) on 127.0.0.1, fed by a PLC sink reading an image.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{Rig, wait_until};
use m2m_gateway::image::Image;
use m2m_gateway::model::Plc;
use m2m_gateway::plc;
use m2m_gateway::point::value::{Quality, Sample, Table, Value};
use m2m_gateway::spool::SpoolHandle;
use m2m_gateway::spool::journal::SpoolLimits;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// One write request as the PLC saw it: function code, address, values.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    fc: u8,
    address: u16,
    words: Vec<u16>,
    bits: Vec<bool>,
}

#[derive(Debug, Default)]
struct State {
    /// Answer every write with exception 0x02.
    refuse: bool,
    holding: HashMap<u16, u16>,
    coils: HashMap<u16, bool>,
    log: Vec<Seen>,
}

type Shared = Arc<Mutex<State>>;

struct PlcService(Shared);

impl tokio_modbus::server::Service for PlcService {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        let mut s = self.0.lock().expect("plc state");
        if s.refuse {
            return std::future::ready(Err(ExceptionCode::IllegalDataAddress));
        }
        let mut seen = |fc, address, words: Vec<u16>, bits: Vec<bool>| {
            s.log.push(Seen { fc, address, words, bits });
        };
        let rsp = match req {
            Request::WriteSingleRegister(a, w) => {
                seen(6, a, vec![w], vec![]);
                s.holding.insert(a, w);
                Ok(Response::WriteSingleRegister(a, w))
            }
            Request::WriteMultipleRegisters(a, words) => {
                seen(16, a, words.to_vec(), vec![]);
                for (i, w) in words.iter().enumerate() {
                    s.holding.insert(a + i as u16, *w);
                }
                Ok(Response::WriteMultipleRegisters(a, words.len() as u16))
            }
            Request::WriteSingleCoil(a, b) => {
                seen(5, a, vec![], vec![b]);
                s.coils.insert(a, b);
                Ok(Response::WriteSingleCoil(a, b))
            }
            Request::WriteMultipleCoils(a, bits) => {
                seen(15, a, vec![], bits.to_vec());
                for (i, b) in bits.iter().enumerate() {
                    s.coils.insert(a + i as u16, *b);
                }
                Ok(Response::WriteMultipleCoils(a, bits.len() as u16))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        std::future::ready(rsp)
    }
}

/// A simulated PLC serving `state` on `addr` (port 0: any); returns the bound address
/// and the server task (abort it to take the PLC away, connections included).
async fn serve_plc(addr: SocketAddr, state: Shared) -> (SocketAddr, JoinHandle<()>) {
    serve_plc_on(TcpListener::bind(addr).await.expect("bind plc"), state)
}

/// The same, on a socket the test already holds.
fn serve_plc_on(listener: TcpListener, state: Shared) -> (SocketAddr, JoinHandle<()>) {
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let server = Server::new(listener);
        let on_connected = |stream, peer| {
            let state = state.clone();
            async move { accept_tcp_connection(stream, peer, |_| Ok(Some(PlcService(state.clone())))) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    (addr, task)
}

fn holding(state: &Shared, a: u16) -> Option<u16> {
    state.lock().expect("plc state").holding.get(&a).copied()
}

fn coil(state: &Shared, a: u16) -> Option<bool> {
    state.lock().expect("plc state").coils.get(&a).copied()
}

fn log(state: &Shared) -> Vec<Seen> {
    state.lock().expect("plc state").log.clone()
}

/// A configuration whose devices define the points (the bus is never opened here) and
/// one `[[plc]]` at `addr` with `extra` keys.
fn plc_model(addr: SocketAddr, spool: &std::path::Path, extra: &str) -> Plc {
    let text = format!(
        r#"
[gateway]
name = "gw"
[[bus]]
name = "line"
port = "/dev/null"
[[device]]
name = "d"
bus = "line"
unit = 1
point = [
  {{ name = "a", table = "holding", address = 0 }},
  {{ name = "b", table = "holding", address = 1, type = "i16" }},
  {{ name = "c", table = "holding", address = 2, type = "f32" }},
  {{ name = "on", table = "coils", address = 0, type = "bool" }},
  {{ name = "off", table = "coils", address = 1, type = "bool" }},
]

[[plc]]
name = "line-plc"
address = "{addr}"
timeout = "300ms"
reconnect_max = "200ms"
spool = "{}"
{extra}

[[plc.map]]
points = ["d.a", "d.b", "d.c"]
table = "holding"
address = 100

[[plc.map]]
points = "d.o*"
table = "coils"
address = 10
"#,
        spool.display()
    );
    let mut model = m2m_gateway::config::parse(&text, "plc.toml").unwrap_or_else(|e| panic!("{e}"));
    model.plcs.remove(0)
}

fn good(v: Value) -> Sample {
    Sample { value: Some(v), at: SystemTime::now(), quality: Quality::Good, via: None }
}

/// An image with the test points, and a running sink of `plc` into it.
struct Sink {
    image: Arc<Image>,
    handle: plc::PlcHandle,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Sink {
    fn start(plc: &Plc, image: Arc<Image>) -> Self {
        let spool = SpoolHandle::open(&plc.spool, SpoolLimits::default()).expect("spool");
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = plc::start(plc, image.clone(), spool, &shutdown, &tracker);
        Sink { image, handle, shutdown, tracker }
    }

    fn set(&self, point: &str, v: Value) {
        let id = self.image.register(point, SECS(60));
        self.image.update([(id, good(v))]);
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(SECS(5), self.tracker.wait()).await.expect("sink stops");
    }
}

fn image_with_values() -> Arc<Image> {
    let image = Arc::new(Image::new());
    let ids: Vec<_> =
        ["d.a", "d.b", "d.c", "d.on", "d.off"].iter().map(|n| image.register(n, SECS(60))).collect();
    image.update([
        (ids[0], good(Value::UInt(1234))),
        (ids[1], good(Value::Int(-2))),
        (ids[2], good(Value::Float(1.5))),
        (ids[3], good(Value::Bool(true))),
        (ids[4], good(Value::Bool(false))),
    ]);
    image
}

#[tokio::test]
async fn values_arrive_encoded_in_one_request_per_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = Shared::default();
    let (addr, server) = serve_plc("127.0.0.1:0".parse().expect("addr"), state.clone()).await;
    let plc = plc_model(addr, &dir.path().join("plc.db"), "");
    let sink = Sink::start(&plc, image_with_values());
    wait_until("values at the plc", SECS(5), || {
        holding(&state, 103) == Some(0) && coil(&state, 11) == Some(false)
    })
    .await;
    assert_eq!(holding(&state, 100), Some(1234), "u16");
    assert_eq!(holding(&state, 101), Some(0xFFFE), "i16 -2");
    assert_eq!((holding(&state, 102), holding(&state, 103)), (Some(0x3FC0), Some(0)), "f32 1.5, abcd");
    assert_eq!(coil(&state, 10), Some(true));
    // Every write is a whole block: one FC16 of 4 registers, one FC15 of 2 coils.
    for s in log(&state) {
        match s.fc {
            16 => assert_eq!((s.address, s.words.len()), (100, 4), "{s:?}"),
            15 => assert_eq!((s.address, s.bits.len()), (10, 2), "{s:?}"),
            _ => panic!("unexpected request {s:?}"),
        }
    }
    // A change of one register alone goes as FC6.
    let before = log(&state).len();
    sink.set("d.b", Value::Int(7));
    wait_until("d.b written", SECS(5), || holding(&state, 101) == Some(7)).await;
    let after = log(&state);
    assert_eq!(after[before..], [Seen { fc: 6, address: 101, words: vec![7], bits: vec![] }]);
    wait_until("spool acked", SECS(5), || {
        sink.handle.spool.counters().pending_batches.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    sink.stop().await;
    server.abort();
}

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A value out of its target's range is lost (ERROR), but while the point stays out of
/// range it was one WARN per sample: now one ERROR, then quiet until a value fits again.
#[tokio::test(flavor = "current_thread")]
async fn a_point_out_of_range_logs_one_error_not_one_per_sample() {
    let buf = LogBuf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt().with_ansi(false).with_writer(move || w.clone()).finish();
    let _guard = tracing::subscriber::set_default(sub);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = Shared::default();
    let (addr, server) = serve_plc("127.0.0.1:0".parse().expect("addr"), state.clone()).await;
    let plc = plc_model(addr, &dir.path().join("plc.db"), "deliver = \"all\"");
    let sink = Sink::start(&plc, image_with_values());
    wait_until("values at the plc", SECS(5), || holding(&state, 100) == Some(1234)).await;
    // d.a is a u16 target: negative values do not fit.
    let dropped = || sink.handle.stats.dropped.load(std::sync::atomic::Ordering::Relaxed);
    for i in 1..=5 {
        sink.set("d.a", Value::Int(-i));
        wait_until("the value dropped", SECS(5), || dropped() == i as u64).await;
    }
    sink.set("d.a", Value::UInt(7));
    wait_until("d.a written again", SECS(5), || holding(&state, 100) == Some(7)).await;
    assert_eq!(dropped(), 5, "every value counted");
    sink.stop().await;
    server.abort();
    let log = String::from_utf8_lossy(&buf.0.lock().expect("log buffer")).into_owned();
    let lost: Vec<&str> = log.lines().filter(|l| l.contains("cannot be written to the plc")).collect();
    assert_eq!(lost.len(), 1, "{log}");
    assert!(lost[0].contains("ERROR"), "{log}");
}

/// Writes to register 100 (d.a) seen since `from`.
fn a_values(state: &Shared, from: usize) -> Vec<u16> {
    log(state)[from..]
        .iter()
        .filter(|s| s.address <= 100 && matches!(s.fc, 6 | 16) && s.address + s.words.len() as u16 > 100)
        .map(|s| s.words[usize::from(100 - s.address)])
        .collect()
}

/// Takes the PLC away, sets d.a to 1..=20 while it is down, brings it back on the same
/// port and returns the values written to register 100 after it came back.
async fn outage(deliver: &str) -> Vec<u16> {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = Shared::default();
    let (addr, server) = serve_plc("127.0.0.1:0".parse().expect("addr"), state.clone()).await;
    let plc = plc_model(addr, &dir.path().join("plc.db"), &format!("deliver = \"{deliver}\""));
    let sink = Sink::start(&plc, image_with_values());
    let pending = || sink.handle.spool.counters().pending_samples.load(std::sync::atomic::Ordering::Relaxed);
    wait_until("first values", SECS(5), || holding(&state, 100) == Some(1234)).await;
    // The first batch holds more targets than register 100: until all are written and the
    // batch acked, a PLC taken away now would have the whole batch again (at least once).
    wait_until("first values acked", SECS(5), || pending() == 0).await;
    server.abort();
    let _ = server.await;
    // Each value on disk before the next, and all 20 before the PLC returns: a value still
    // on its way to the spool would be delivered after the reconnect as a new change (not
    // an outage's backlog).
    for v in 1..=20u64 {
        sink.set("d.a", Value::UInt(v));
        wait_until("the value spooled", SECS(5), || pending() >= v).await;
    }
    let from = log(&state).len();
    let (_, server) = serve_plc(addr, state.clone()).await;
    wait_until("latest value after the outage", SECS(10), || holding(&state, 100) == Some(20)).await;
    wait_until("backlog acked", SECS(5), || pending() == 0).await;
    sink.stop().await;
    server.abort();
    a_values(&state, from)
}

#[tokio::test]
async fn after_an_outage_the_latest_values_arrive() {
    let written = outage("latest").await;
    assert!(written.iter().all(|v| *v == 20), "only the latest value is written: {written:?}");
}

#[tokio::test]
async fn deliver_all_writes_every_value_in_order() {
    let written = outage("all").await;
    let mut dedup = written.clone();
    dedup.dedup();
    // Values written before the PLC was noticed gone may come again; order never breaks.
    assert!(dedup.is_sorted(), "in order: {written:?}");
    for v in 1..=20 {
        assert!(written.contains(&v), "value {v} missing: {written:?}");
    }
}

#[tokio::test]
async fn the_spool_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on yet (bound, so nothing else can take it: connects are
    // refused until the PLC listens on it below).
    let held = tokio::net::TcpSocket::new_v4().expect("socket");
    held.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = held.local_addr().expect("addr");
    let spool = dir.path().join("plc.db");
    let plc = plc_model(addr, &spool, "");
    let sink = Sink::start(&plc, image_with_values());
    let pending =
        |s: &Sink| s.handle.spool.counters().pending_samples.load(std::sync::atomic::Ordering::Relaxed);
    wait_until("values spooled", SECS(5), || pending(&sink) >= 5).await;
    sink.stop().await;
    // A new process: an empty image, the same spool file.
    let sink = Sink::start(&plc, Arc::new(Image::new()));
    assert!(pending(&sink) >= 5, "the backlog is still on disk");
    let state = Shared::default();
    let (_, server) = serve_plc_on(held.listen(16).expect("listen"), state.clone());
    wait_until("spooled values at the plc", SECS(10), || {
        holding(&state, 100) == Some(1234) && coil(&state, 10) == Some(true)
    })
    .await;
    wait_until("backlog acked", SECS(5), || pending(&sink) == 0).await;
    sink.stop().await;
    server.abort();
}

#[tokio::test]
async fn the_gateway_writes_polled_values_to_the_plc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = Shared::default();
    let (addr, server) = serve_plc("127.0.0.1:0".parse().expect("addr"), state.clone()).await;
    let sim = r#"
[[unit]]
unit = 1
[[unit.register]]
table = "holding"
address = 0
values = [42, 7]
"#;
    let gw = format!(
        r#"
[gateway]
name = "gw"
[[bus]]
name = "line"
port = "{{port}}"
timeout = "100ms"
[[device]]
name = "boiler"
bus = "line"
unit = 1
interval = "50ms"
point = [
  {{ name = "t", table = "holding", address = 0, scale = 0.5 }},
  {{ name = "p", table = "holding", address = 1 }},
]
[[plc]]
name = "plc"
address = "{addr}"
spool = "{}"
[[plc.map]]
points = "boiler.*"
table = "holding"
address = 0
"#,
        dir.path().join("plc.db").display()
    );
    let rig = Rig::start(sim, &gw);
    assert_eq!(rig.gateway().plcs.len(), 1);
    // boiler.t is scaled, so it goes as f32 (registers 0-1); boiler.p as u16 at 2.
    wait_until("polled values at the plc", SECS(5), || {
        holding(&state, 0) == Some(0x41A8) && holding(&state, 2) == Some(7)
    })
    .await;
    rig.sim.set_register(1, Table::Holding, 1, 99).expect("sim");
    wait_until("the change at the plc", SECS(5), || holding(&state, 2) == Some(99)).await;
    rig.stop().await;
    server.abort();
}

#[tokio::test]
async fn a_plc_that_never_answers_slows_nobody() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A black hole: accepts connections, reads requests, never answers.
    let hole = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hole_addr = hole.local_addr().expect("addr");
    let swallow = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = hole.accept().await {
            held.push(tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while matches!(tokio::io::AsyncReadExt::read(&mut s, &mut buf).await, Ok(n) if n > 0) {}
            }));
        }
    });
    let state = Shared::default();
    let (addr, server) = serve_plc("127.0.0.1:0".parse().expect("addr"), state.clone()).await;
    let image = image_with_values();
    let slow = Sink::start(&plc_model(hole_addr, &dir.path().join("slow.db"), ""), image.clone());
    let fast = Sink::start(&plc_model(addr, &dir.path().join("fast.db"), ""), image.clone());
    for v in 1..=10u64 {
        fast.set("d.a", Value::UInt(v));
        wait_until("each value at the healthy plc", SECS(2), || holding(&state, 100) == Some(v as u16)).await;
    }
    use std::sync::atomic::Ordering::Relaxed;
    // The silent PLC timed out (300 ms) and was reconnected; its values wait on disk.
    wait_until("the silent plc reconnected", SECS(5), || slow.handle.stats.connects.load(Relaxed) >= 2).await;
    assert!(slow.handle.spool.counters().pending_samples.load(Relaxed) > 0);
    assert_eq!(slow.handle.stats.requests.load(Relaxed), 0);
    slow.stop().await;
    fast.stop().await;
    server.abort();
    swallow.abort();
}

#[tokio::test]
async fn refused_writes_are_dropped_not_retried_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = Shared::default();
    state.lock().expect("plc state").refuse = true;
    let (addr, server) = serve_plc("127.0.0.1:0".parse().expect("addr"), state.clone()).await;
    let sink = Sink::start(&plc_model(addr, &dir.path().join("plc.db"), ""), image_with_values());
    use std::sync::atomic::Ordering::Relaxed;
    wait_until("refusals counted", SECS(5), || sink.handle.stats.dropped.load(Relaxed) >= 5).await;
    wait_until("spool drained", SECS(5), || sink.handle.spool.counters().pending_batches.load(Relaxed) == 0)
        .await;
    assert_eq!(sink.handle.stats.connects.load(Relaxed), 1, "an exception is no reason to reconnect");
    sink.stop().await;
    server.abort();
}

/// The values written to watchdog register `a` (FC6), in order.
fn watchdog_values(state: &Shared, a: u16) -> Vec<u16> {
    log(state).iter().filter(|s| s.fc == 6 && s.address == a).map(|s| s.words[0]).collect()
}

fn assert_counts_by_one(values: &[u16]) {
    for pair in values.windows(2) {
        assert_eq!(pair[1], pair[0].wrapping_add(1), "each write one more: {values:?}");
    }
}

#[tokio::test]
async fn the_watchdog_counts_while_connected_and_resumes_after_an_outage() {
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = Shared::default();
    let (addr, server) = serve_plc("127.0.0.1:0".parse().expect("addr"), state.clone()).await;
    let watchdog = "[plc.watchdog]\naddress = 200\ninterval = \"100ms\"";
    let plc = plc_model(addr, &dir.path().join("plc.db"), watchdog);
    let sink = Sink::start(&plc, image_with_values());
    wait_until("watchdog writes", SECS(5), || watchdog_values(&state, 200).len() >= 5).await;
    let before = watchdog_values(&state, 200);
    assert_eq!(before[0], 0, "the counter starts at 0");
    assert_counts_by_one(&before);
    // Values still arrive beside it, and the watchdog is no value: never spooled.
    wait_until("values at the plc", SECS(5), || holding(&state, 100) == Some(1234)).await;
    // Counted once the PLC's answer is in (the server logs the write before it answers).
    wait_until("watchdog writes counted", SECS(5), || sink.handle.stats.watchdog.load(Relaxed) >= 5).await;

    // The PLC goes away (connections cut) and comes back on the same port.
    server.abort();
    let _ = server.await;
    let last = *watchdog_values(&state, 200).last().expect("writes");
    let from = log(&state).len();
    wait_until("the sink notices", SECS(5), || !sink.handle.stats.connected.load(Relaxed)).await;
    let (_, server) = serve_plc(addr, state.clone()).await;
    let after = || -> Vec<u16> {
        log(&state)[from..].iter().filter(|s| s.fc == 6 && s.address == 200).map(|s| s.words[0]).collect()
    };
    wait_until("watchdog writes after the outage", SECS(10), || after().len() >= 5).await;
    let after = after();
    assert_counts_by_one(&after);
    // It carries on, not from 0: the write cut by the outage may come again, once.
    assert!(after[0] == last.wrapping_add(1) || after[0] == last, "{last} then {after:?}");
    assert!(sink.handle.stats.connects.load(Relaxed) >= 2);
    sink.stop().await;
    server.abort();
}

/// A PLC (or a firewall in front of it) that accepts the connection and drops it at once
/// was retried every 50-100 ms for ever: the back-off was reset by every TCP connect. A
/// connect proves nothing; the waits between accepts must keep growing.
#[tokio::test]
async fn a_plc_that_accepts_and_drops_is_retried_with_growing_waits() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    // reconnect_max 2 s: the waits go 100, 200, 400, 800 ms (jitter takes up to half off).
    let mut plc = plc_model(addr, &dir.path().join("plc.db"), "");
    plc.reconnect_max = SECS(2);
    let sink = Sink::start(&plc, Arc::new(Image::new()));
    // A value waits to be written, so every session tries, and finds the socket closed.
    sink.set("d.a", Value::UInt(1));
    let mut accepted = Vec::new();
    let deadline = tokio::time::Instant::now() + SECS(10);
    while accepted.len() < 6 {
        let (stream, _) = tokio::time::timeout_at(deadline, listener.accept())
            .await
            .expect("six connects within 10 s")
            .expect("accept");
        accepted.push(tokio::time::Instant::now());
        drop(stream);
    }
    let gaps: Vec<Duration> = accepted.windows(2).map(|w| w[1] - w[0]).collect();
    // The fifth wait is at least half of 100 ms x 2^4; a reset on connect kept it under 100 ms.
    assert!(gaps[4] >= Duration::from_millis(700), "waits between connects did not grow: {gaps:?}");
    sink.stop().await;
}
