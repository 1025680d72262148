//! The HTTP endpoint end to end: a gateway polling the project's simulator on a real
//! pseudo-terminal pair, its Modbus-TCP server and a peer link that cannot connect, read
//! through real sockets with the gateway's own HTTP client: `/metrics` after a scripted
//! scenario (checked by `promtool`), the JSON API, the point stream, access control and
//! operator writes, and clients that never read or never send.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{Rig, wait_until, within};
use m2m_gateway::http::client::{Client, ClientError};
use m2m_gateway::http::{Overview, PointView};
use m2m_gateway::point::value::{Table, Value};
use m2m_gateway::sim::Fault;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const TOKEN: &str = "test-token-0123456789";

const SIM: &str = r#"
[[unit]]
unit = 1
[[unit.register]]
table = "holding"
address = 0
values = [215, 50]
[[unit]]
unit = 2
[[unit.register]]
table = "holding"
address = 0
values = [1400]
"#;

const GATEWAY: &str = r#"
[gateway]
name = "site-a"

[[bus]]
name = "line"
port = "{port}"
timeout = "100ms"
retries = 0

[[device]]
name = "boiler"
bus = "line"
unit = 1
interval = "100ms"
point = [
  { name = "temperature", table = "holding", address = 0, scale = 0.1, unit = "°C" },
  { name = "setpoint", table = "holding", address = 1, unit = "°C" },
]

[[device]]
name = "pump"
bus = "line"
unit = 2
interval = "100ms"
point = [ { name = "speed", table = "holding", address = 0, unit = "rpm" } ]

[server]
listen = "127.0.0.1:0"
[[server.unit]]
unit = 1
agent = "boiler"

[link]
identity = "{dir}/id"
data_dir = "{dir}/data"

[[peer]]
name = "far"
fingerprint = "{fp}"
dial = "{dead}"
reconnect_max = "200ms"
[[peer.send]]
points = "boiler.*"

[http]
listen = "{http}"
token_file = "{dir}/token"
[[http.grant]]
points = "boiler.setpoint"
min = 0
max = 90
"#;

/// A gateway (with the sim answering units 1 and 2) whose peer `far` dials a port
/// nobody listens on; the HTTP endpoint on `http` with [`TOKEN`].
async fn start(http: &str) -> (Rig, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    m2m_gateway::link::tls::keygen(&dir.path().join("id"), false).expect("keygen");
    let far = m2m_gateway::link::tls::keygen(&dir.path().join("far"), false).expect("keygen far");
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).expect("token");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let text = GATEWAY
        .replace("{dir}", &dir.path().display().to_string())
        .replace("{fp}", &far.fingerprint.to_string())
        .replace("{dead}", &dead.to_string())
        .replace("{http}", http);
    (Rig::start(SIM, &text), dir)
}

fn client(rig: &Rig, token: Option<&str>) -> Client {
    let addr = rig.gateway().http_addr.expect("http endpoint runs");
    Client::new(&format!("http://{addr}"), token.map(str::to_string)).expect("url")
}

/// True when `v` is a number within rounding of `want`.
fn near(v: Option<&Value>, want: f64) -> bool {
    let x = match v {
        Some(Value::Float(x)) => *x,
        Some(Value::Int(i)) => *i as f64,
        Some(Value::UInt(u)) => *u as f64,
        _ => return false,
    };
    (x - want).abs() < 1e-6
}

/// `name{labels}` -> value of every sample of an exposition.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Runs `promtool check metrics` on `text`, if promtool is installed (in CI it must be).
fn promtool(text: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            println!("SKIPPED promtool check: promtool not runnable ({e}); apt-get install prometheus");
            return;
        }
        Err(e) => panic!("promtool is required in CI (apt-get install prometheus): {e}"),
    };
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics refused the exposition:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Modbus-TCP FC6 write of `value` to register `address` of `unit`; the answer's PDU.
async fn modbus_write(addr: std::net::SocketAddr, unit: u8, address: u16, value: u16) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the modbus server");
    let [ah, al] = address.to_be_bytes();
    let [vh, vl] = value.to_be_bytes();
    s.write_all(&[0, 7, 0, 0, 0, 6, unit, 6, ah, al, vh, vl]).await.expect("send");
    let mut head = [0u8; 7];
    s.read_exact(&mut head).await.expect("mbap header");
    let len = usize::from(u16::from_be_bytes([head[4], head[5]])) - 1;
    let mut pdu = vec![0u8; len];
    s.read_exact(&mut pdu).await.expect("pdu");
    pdu
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_dead_device_a_cut_link_and_refused_writes() {
    let (rig, _dir) = start("127.0.0.1:0").await;
    let http = client(&rig, None);
    wait_until("both devices polled", SECS(10), || {
        rig.value("pump.speed").is_some() && rig.value("boiler.setpoint").is_some()
    })
    .await;

    // The scenario: the pump stops answering, the link never comes up (so the boiler's
    // values wait in the spool), a master's write is refused (no server grant), and an
    // operator's write outside the http grants is refused.
    rig.sim.set_fault(2, Fault::Silent).expect("fault");
    let server = rig.gateway().server_addr.expect("modbus server");
    assert_eq!(modbus_write(server, 1, 1, 60).await, [0x86, 0x01], "a write without grants is 0x01");
    let operator = client(&rig, Some(TOKEN));
    let refused = operator
        .post::<serde_json::Value>("/api/v1/points/boiler.temperature", &serde_json::json!({"value": 1}))
        .await;
    assert!(matches!(refused, Err(ClientError::Refused { status: 403, .. })), "{refused:?}");

    let pump_down = || rig.gateway().devices.iter().any(|d| d.name == "pump" && !d.online.load(Relaxed));
    wait_until("the pump marked down", SECS(10), pump_down).await;
    let link = rig.gateway().link("far").expect("link").clone();
    wait_until("values spooled for the peer", SECS(10), || {
        let s = link.stats();
        s.spool_pending_values > 0 && s.failed_attempts > 0
    })
    .await;

    let text = http.text("/metrics").await.expect("metrics");
    let m = samples(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k} in:\n{text}"));

    // Every family, with the values the scenario makes.
    assert_eq!(get(r#"m2m_gateway_info{gateway="site-a",version="0.1.0"}"#), 1.0);
    assert!(get(r#"m2m_gateway_bus_transactions_total{bus="line"}"#) >= 2.0);
    assert!(get(r#"m2m_gateway_bus_timeouts_total{bus="line"}"#) >= 1.0, "the pump's silence times out");
    assert_eq!(get(r#"m2m_gateway_bus_crc_errors_total{bus="line"}"#), 0.0);
    assert_eq!(get(r#"m2m_gateway_bus_framing_errors_total{bus="line"}"#), 0.0);
    assert_eq!(get(r#"m2m_gateway_bus_late_replies_total{bus="line"}"#), 0.0);
    assert_eq!(get(r#"m2m_gateway_bus_port_opens_total{bus="line"}"#), 1.0);
    for family in [
        "m2m_gateway_bus_noise_bytes_total",
        "m2m_gateway_bus_exceptions_total",
        "m2m_gateway_bus_queue_full_total",
        "m2m_gateway_bus_shared_reads_total",
        "m2m_gateway_bus_busy_seconds_total",
        "m2m_gateway_bus_line_busy_ratio",
        "m2m_gateway_bus_queue_depth",
    ] {
        let v = get(&format!("{family}{{bus=\"line\"}}"));
        assert!(v >= 0.0, "{family} {v}");
    }
    assert!(get(r#"m2m_gateway_bus_busy_seconds_total{bus="line"}"#) > 0.0);
    assert_eq!(get(r#"m2m_gateway_device_up{bus="line",device="boiler"}"#), 1.0);
    assert_eq!(get(r#"m2m_gateway_device_up{bus="line",device="pump"}"#), 0.0);
    assert!(get(r#"m2m_gateway_device_reads_failed_total{bus="line",device="pump"}"#) >= 1.0);
    assert!(get(r#"m2m_gateway_device_reads_answered_total{bus="line",device="boiler"}"#) >= 1.0);
    assert!(get(r#"m2m_gateway_device_last_answer_age_seconds{bus="line",device="boiler"}"#) < 5.0);
    assert_eq!(get(r#"m2m_gateway_device_points{bus="line",device="boiler",quality="good"}"#), 2.0);
    assert_eq!(get(r#"m2m_gateway_device_points{bus="line",device="pump",quality="comm_fail"}"#), 1.0);
    assert_eq!(get(r#"m2m_gateway_device_points{bus="line",device="pump",quality="good"}"#), 0.0);
    assert_eq!(get(r#"m2m_gateway_peer_connected{peer="far"}"#), 0.0);
    assert_eq!(get(r#"m2m_gateway_peer_sessions_total{peer="far"}"#), 0.0);
    assert!(get(r#"m2m_gateway_peer_connect_failures_total{peer="far"}"#) >= 1.0);
    assert!(get(r#"m2m_gateway_peer_spool_pending_batches{peer="far"}"#) >= 1.0);
    assert!(get(r#"m2m_gateway_peer_spool_pending_values{peer="far"}"#) >= 2.0);
    assert!(get(r#"m2m_gateway_peer_spool_pending_bytes{peer="far"}"#) > 0.0);
    let oldest = get(r#"m2m_gateway_peer_spool_oldest_pending_age_seconds{peer="far"}"#);
    assert!((0.0..60.0).contains(&oldest), "oldest pending {oldest}");
    for family in [
        "batches_sent_total",
        "batches_acked_total",
        "batches_applied_total",
        "values_applied_total",
        "duplicates_dropped_total",
        "relayed_values_total",
        "loop_refused_values_total",
        "relayed_refused_values_total",
        "writes_refused_total",
        "spool_dropped_values_total",
    ] {
        assert_eq!(get(&format!("m2m_gateway_peer_{family}{{peer=\"far\"}}")), 0.0, "{family}");
    }
    assert!(!m.contains_key(r#"m2m_gateway_peer_last_ack_age_seconds{peer="far"}"#), "never acked: no age");
    assert_eq!(get("m2m_gateway_server_connections_accepted_total"), 1.0);
    assert_eq!(get(r#"m2m_gateway_server_requests_total{function="6"}"#), 1.0);
    assert_eq!(get(r#"m2m_gateway_server_exceptions_total{code="1"}"#), 1.0);
    assert!(m.contains_key("m2m_gateway_server_connections"));
    assert!(m.contains_key("m2m_gateway_start_time_seconds"));
    promtool(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_points_and_the_change_stream() {
    let (rig, _dir) = start("127.0.0.1:0").await;
    let http = client(&rig, None);
    wait_until("the boiler polled", SECS(10), || rig.value("boiler.temperature").is_some()).await;

    let status: Overview = http.get("/api/v1/status").await.expect("status");
    assert_eq!(status.gateway.name, "site-a");
    assert_eq!(status.buses.len(), 1);
    assert_eq!(status.buses[0].devices.len(), 2);
    assert_eq!(status.peers[0].name, "far");
    assert!(!status.peers[0].connected);
    assert!(status.server.is_some());
    assert_eq!(status.gateway.health, "degraded", "the peer is down: {:?}", status.gateway.problems);
    assert!(
        status.gateway.problems.iter().any(|p| p.contains("peer far is not connected")),
        "{:?}",
        status.gateway.problems
    );

    let points: Vec<PointView> = http.get("/api/v1/points?glob=boiler.*").await.expect("points");
    let names: Vec<&str> = points.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["boiler.temperature", "boiler.setpoint"]);
    let t = &points[0];
    assert_eq!((t.quality.as_str(), t.unit.as_deref()), ("good", Some("°C")));
    assert!(near(t.value.as_ref(), 21.5), "{t:?}");
    assert_eq!(t.origin, "device boiler on bus line");
    assert!(!t.writable && points[1].writable, "only the granted setpoint is writable");
    assert!(t.age_seconds < 5.0);
    let bad = http.get::<serde_json::Value>("/api/v1/points?glob=%5B").await;
    assert!(matches!(bad, Err(ClientError::Refused { status: 400, .. })), "{bad:?}");

    // The stream: a snapshot, then the change the simulator makes, as a change.
    let mut events = http.events("/api/v1/points/stream?glob=boiler.temperature").await.expect("stream");
    let first = within(SECS(5), "snapshot", events.next()).await.expect("read").expect("event");
    assert_eq!(first.kind, "snapshot");
    let snap: Vec<PointView> = serde_json::from_str(&first.data).expect("json");
    assert_eq!(snap.len(), 1);
    rig.sim.set_register(1, Table::Holding, 0, 987).expect("set");
    let changed = within(SECS(5), "the change event", async {
        loop {
            let e = events.next().await.expect("read").expect("stream open");
            let views: Vec<PointView> = serde_json::from_str(&e.data).expect("json");
            assert!(views.iter().all(|v| v.name == "boiler.temperature"), "filtered: {views:?}");
            if e.kind == "change" && views.iter().any(|v| near(v.value.as_ref(), 98.7)) {
                return e;
            }
        }
    })
    .await;
    assert_eq!(changed.kind, "change");

    // The pump going silent shows in the stream as comm_fail.
    let mut all = http.events("/api/v1/points/stream").await.expect("stream");
    rig.sim.set_fault(2, Fault::Silent).expect("fault");
    within(SECS(10), "the pump's comm_fail", async {
        loop {
            let e = all.next().await.expect("read").expect("stream open");
            let views: Vec<PointView> = serde_json::from_str(&e.data).expect("json");
            if e.kind == "change" && views.iter().any(|v| v.name == "pump.speed" && v.quality == "comm_fail")
            {
                return;
            }
        }
    })
    .await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_and_a_grant() {
    let (rig, _dir) = start("127.0.0.1:0").await;
    wait_until("the boiler polled", SECS(10), || rig.value("boiler.setpoint").is_some()).await;
    let path = "/api/v1/points/boiler.setpoint";
    let body = serde_json::json!({"value": 55});
    let status = |r: Result<serde_json::Value, ClientError>| match r {
        Ok(_) => 200,
        Err(ClientError::Refused { status, message }) => {
            assert!(!message.is_empty(), "a refusal says why");
            status
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(status(client(&rig, None).post(path, &body).await), 401, "no token");
    assert_eq!(
        status(client(&rig, Some("wrong-token-0123456789")).post(path, &body).await),
        401,
        "wrong token"
    );
    let op = client(&rig, Some(TOKEN));
    match op.post::<serde_json::Value>("/api/v1/points/boiler.temperature", &body).await {
        Err(ClientError::Refused { status: 403, message }) => {
            assert!(message.contains("no [[http.grant]] covers point boiler.temperature"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    match op.post::<serde_json::Value>(path, &serde_json::json!({"value": 95})).await {
        Err(ClientError::Refused { status: 403, message }) => {
            assert!(message.contains("outside"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rig.sim.register(1, Table::Holding, 1), Some(50), "nothing refused was written");
    assert_eq!(status(op.post(path, &body).await), 200);
    assert_eq!(rig.sim.register(1, Table::Holding, 1), Some(55), "the granted write reached the device");
    assert_eq!(status(op.post("/api/v1/points/nothing.here", &body).await), 404);
    assert_eq!(status(op.post(path, &serde_json::json!({"value": "hot"})).await), 400);
    // Reads from loopback need no token; a wrong one is still refused.
    assert!(client(&rig, None).get::<Overview>("/api/v1/status").await.is_ok());
    let wrong = client(&rig, Some("wrong-token-0123456789")).get::<Overview>("/api/v1/status").await;
    assert!(matches!(wrong, Err(ClientError::Refused { status: 401, .. })), "{wrong:?}");
    rig.stop().await;
}

/// This machine's address on a non-loopback interface, if it has one.
fn outside_address() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_machines_need_the_token_even_to_read() {
    let Some(ip) = outside_address() else {
        println!("SKIPPED: this machine has no non-loopback address to connect from");
        return;
    };
    let (rig, _dir) = start("0.0.0.0:0").await;
    let port = rig.gateway().http_addr.expect("http").port();
    let url = format!("http://{ip}:{port}");
    let anonymous = Client::new(&url, None).expect("url").get::<Overview>("/api/v1/status").await;
    match anonymous {
        Err(ClientError::Refused { status: 401, message }) => {
            assert!(message.contains("other machines"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let metrics = Client::new(&url, None).expect("url").text("/metrics").await;
    assert!(matches!(metrics, Err(ClientError::Refused { status: 401, .. })), "{metrics:?}");
    let with_token =
        Client::new(&url, Some(TOKEN.into())).expect("url").get::<Overview>("/api/v1/status").await;
    assert_eq!(with_token.expect("with the token").gateway.name, "site-a");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_send_or_never_read_do_not_stall_polling() {
    let (rig, _dir) = start("127.0.0.1:0").await;
    let addr = rig.gateway().http_addr.expect("http");
    wait_until("the boiler polled", SECS(10), || rig.value("boiler.temperature").is_some()).await;

    // A socket that sends nothing, and event streams that are never read.
    let _silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut unread = Vec::new();
    for path in ["/api/v1/points/stream", "/api/v1/buses/line/traffic"].repeat(2) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("send");
        unread.push(s);
    }
    // Many changes while nobody reads: each set is a change the streams would carry.
    let tx = rig.gateway().buses[0].stats().transactions.load(Relaxed);
    for v in 0..300u16 {
        rig.sim.set_register(1, Table::Holding, 0, v).expect("set");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Polling goes on (a stalled bus task would never get here).
    wait_until("polling goes on", SECS(10), || {
        rig.gateway().buses[0].stats().transactions.load(Relaxed) >= tx + 10
    })
    .await;
    rig.sim.set_register(1, Table::Holding, 0, 4321).expect("set");
    wait_until("the latest value polled", SECS(5), || near(rig.value("boiler.temperature").as_ref(), 432.1))
        .await;
    // The endpoint still answers others.
    let status: Overview = client(&rig, None).get("/api/v1/status").await.expect("status while others stall");
    assert_eq!(status.buses[0].devices[0].state, "up");
    rig.stop().await;
}

/// The next `frame` event of a traffic stream, as JSON.
async fn frame(events: &mut m2m_gateway::http::client::Events) -> serde_json::Value {
    loop {
        let e = events.next().await.expect("read").expect("stream open");
        if e.kind == "frame" {
            return serde_json::from_str(&e.data).expect("frame json");
        }
    }
}

/// True when the last two bytes of the hex frame `hex` are its CRC-16/MODBUS.
fn crc_holds(hex: &str) -> bool {
    let b = (0..hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect::<Vec<_>>();
    if b.len() < 4 {
        return false;
    }
    let (body, crc) = b.split_at(b.len() - 2);
    crc::Crc::<u16>::new(&crc::CRC_16_MODBUS).checksum(body).to_le_bytes() == crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traffic_stream_shows_each_frame_with_its_verdict() {
    let (rig, _dir) = start("127.0.0.1:0").await;
    let http = client(&rig, None);
    wait_until("the boiler polled", SECS(10), || rig.value("boiler.temperature").is_some()).await;

    let unknown = http.events("/api/v1/buses/nope/traffic").await.err();
    match unknown {
        Some(ClientError::Refused { status: 404, message }) => {
            assert!(message.contains("no bus \"nope\"") && message.contains("line"), "{message}")
        }
        other => panic!("an unknown bus is a 404 that names the buses: {other:?}"),
    }

    // A healthy device: the request as sent, then its reply taken as ok, with summaries.
    let mut events = http.events("/api/v1/buses/line/traffic").await.expect("traffic stream");
    within(SECS(5), "a sent request and its ok reply from the boiler", async {
        let mut last_sent: Option<serde_json::Value> = None;
        loop {
            let f = frame(&mut events).await;
            if f["dir"] == "tx" && f["verdict"] == "sent" && f["unit"] == 1 {
                assert_eq!(f["summary"], "unit 1 read holding 0+2", "{f}");
                assert!(crc_holds(f["bytes"].as_str().expect("hex")), "{f}");
                assert!(f["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{f}");
                last_sent = Some(f);
            } else if f["dir"] == "rx" && f["verdict"] == "ok" && f["unit"] == 1 && last_sent.is_some() {
                let summary = f["summary"].as_str().expect("summary");
                assert!(summary.starts_with("unit 1 reply ["), "{f}");
                assert!(f["bytes"].as_str().expect("hex").starts_with("010304"), "{f}");
                assert!(crc_holds(f["bytes"].as_str().expect("hex")), "{f}");
                return;
            }
        }
    })
    .await;

    // The pump answers with a bad CRC: its replies show as crc_error, never as ok.
    rig.sim.set_fault(2, Fault::CorruptCrc).expect("fault");
    let mut corrupt = Vec::new();
    within(SECS(10), "three crc_error replies from the pump", async {
        while corrupt.len() < 3 {
            let f = frame(&mut events).await;
            let hex = f["bytes"].as_str().expect("hex").to_string();
            if f["verdict"] == "crc_error" {
                assert_eq!(f["dir"], "rx", "{f}");
                assert!(!crc_holds(&hex), "a crc_error frame really fails its CRC: {f}");
                corrupt.push(hex);
            } else if f["verdict"] == "ok" && f["unit"] == 2 && !corrupt.is_empty() {
                panic!("once the pump's replies are corrupt none is taken: {f}");
            } else {
                assert!(
                    !(f["verdict"] == "ok" && corrupt.contains(&hex)),
                    "a corrupt frame taken as ok: {f}"
                );
            }
        }
    })
    .await;
    wait_until("the bus counts the CRC errors", SECS(5), || {
        rig.gateway().buses[0].stats().crc_errors.load(Relaxed) >= 3
    })
    .await;
    rig.stop().await;
}
