//! The gateway as a service, with real processes: the systemd notify protocol (a Unix
//! datagram socket standing in for systemd) with the watchdog stopped by a wedged bus
//! engine, and SIGHUP reloads against `m2m-gateway simulate` children and two peer
//! gateways.
//!
//! Every wait has a deadline; every child is killed when the test ends.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::blocking::modbus_on;
use crate::common::procs::{DEADLINE, Proc, bound, keygen, path, write};

/// Datagrams received on `sock` until `until`.
fn receive(sock: &UnixDatagram, until: Instant) -> Vec<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        sock.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    }
    got
}

/// Waits for a datagram for which `cond` holds; returns every datagram seen up to it.
/// The gateway reports that `task` hangs, and from then on sends no watchdog ping for
/// `quiet`.
fn pings_stop_after_the_wedge(gw: &mut Proc, sock: &UnixDatagram, task: &str, quiet: Duration) {
    gw.wait_err("the wedge report", |l| {
        l.iter().find(|l| l.contains(task) && l.contains("watchdog pings stopped")).cloned()
    });
    // What was sent before the report is in the socket already: take it first.
    sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    while sock.recv(&mut buf).is_ok() {}
    sock.set_nonblocking(false).expect("blocking");
    let after = receive(sock, Instant::now() + quiet);
    assert!(
        !after.iter().any(|d| d.lines().any(|l| l == "WATCHDOG=1")),
        "watchdog pings went on while {task} hung: {after:?}"
    );
}

fn receive_until(sock: &UnixDatagram, what: &str, cond: impl Fn(&str) -> bool) -> Vec<String> {
    let end = Instant::now() + DEADLINE;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = cond(&text);
            got.push(text);
            if done {
                return got;
            }
        }
    }
    panic!("no {what} within {DEADLINE:?}; got {got:?}");
}

#[test]
fn notify_ready_status_and_a_watchdog_that_stops_when_a_bus_engine_hangs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let sock_path = root.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    // The bus port does not exist: the engine retries the open, idle in between, and
    // must keep beating; the fault hook hangs it 1.5 s after it starts.
    let cfg = write(
        &root.join("gw.toml"),
        r#"[gateway]
name = "svc"

[[bus]]
name = "line1"
port = "/nonexistent/ttyUSB9"

[[device]]
name = "meter"
bus = "line1"
unit = 1
interval = "1s"

[[device.point]]
name = "v"
table = "holding"
address = 0
"#,
    );
    let mut gw = Proc::spawn_env(
        "gateway",
        &["run", "-c", path(&cfg)],
        "info",
        &[
            ("NOTIFY_SOCKET", path(&sock_path)),
            ("WATCHDOG_USEC", "400000"),
            ("M2M_GATEWAY_TEST_HANG", "bus line1:1500ms"),
        ],
    );
    let first = receive_until(&sock, "READY=1", |d| d.lines().any(|l| l == "READY=1"));
    let ready = first.last().expect("the ready datagram");
    let status = ready.lines().find_map(|l| l.strip_prefix("STATUS=")).expect("STATUS= with READY=1");
    assert!(status.contains("1 buses, 0/1 devices answering, 0/0 links up"), "{status}");
    // Pings every 100 ms (a quarter of 400 ms) while the engine beats.
    let mut pings = 0;
    let mut seen = Vec::new();
    let end = Instant::now() + DEADLINE;
    while pings < 4 {
        assert!(Instant::now() < end, "fewer than 4 watchdog pings: {seen:?}");
        for d in receive(&sock, Instant::now() + Duration::from_millis(50)) {
            pings += d.lines().filter(|l| *l == "WATCHDOG=1").count();
            seen.push(d);
        }
    }
    // The engine hangs: the gateway says so and stops pinging (fifteen ping intervals).
    pings_stop_after_the_wedge(&mut gw, &sock, "bus line1", Duration::from_millis(1500));
    gw.terminate();
    let last = receive(&sock, Instant::now() + Duration::from_millis(100));
    assert!(last.iter().any(|d| d.contains("STOPPING=1")), "no STOPPING=1 at shutdown: {last:?}");
}

#[test]
fn the_watchdog_also_stops_when_the_modbus_tcp_servers_accept_loop_hangs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let sock_path = root.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind the notify socket");
    let (masters, port) = bound();
    let cfg = write(
        &root.join("gw.toml"),
        &format!(
            "[gateway]\nname = \"svc\"\n\n[[bus]]\nname = \"line1\"\nport = \"/nonexistent/ttyUSB9\"\n\n\
             [[device]]\nname = \"meter\"\nbus = \"line1\"\nunit = 1\n\n[[device.point]]\nname = \"v\"\ntable = \"holding\"\naddress = 0\n\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\n\n[[server.unit]]\nunit = 1\npass = \"meter\"\n"
        ),
    );
    let env = [
        ("NOTIFY_SOCKET", path(&sock_path)),
        ("WATCHDOG_USEC", "400000"),
        ("M2M_GATEWAY_TEST_HANG", "modbus-tcp server:1s"),
    ];
    let mut gw = Proc::spawn_on("gateway", &["run", "-c", path(&cfg)], "info", &env, &[&masters]);
    receive_until(&sock, "a watchdog ping", |d| d.lines().any(|l| l == "WATCHDOG=1"));
    pings_stop_after_the_wedge(&mut gw, &sock, "modbus-tcp server", Duration::from_millis(1000));
}

/// The time of day, in seconds, of a log line (`2026-01-01T10:11:12.123456Z ...`).
fn seconds(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut it = t.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The times of the requests a simulator logged for `unit`.
fn requests(lines: &[String], unit: u8) -> Vec<f64> {
    lines
        .iter()
        .filter(|l| l.contains(" request") && l.contains(&format!("unit={unit} ")))
        .filter_map(|l| seconds(l))
        .collect()
}

fn sim(name: &'static str, units: &str) -> (Proc, String) {
    let mut p = Proc::spawn("simulate", &["-v", "simulate", "--units", units], "debug");
    p.name = name;
    let tty = p.wait_out("the virtual port path", |l| l.first().cloned());
    (p, tty)
}

fn peer(root: &Path, name: &str, port: u16, fp_a: &str) -> std::path::PathBuf {
    write(
        &root.join(format!("{name}.toml")),
        &format!(
            r#"[gateway]
name = "{name}"

[link]
identity = "{name}-id"
data_dir = "{name}-data"
listen = "127.0.0.1:{port}"

[[peer]]
name = "site-a"
fingerprint = "{fp_a}"
heartbeat = "500ms"
"#
        ),
    )
}

/// site-a's configuration: three buses, links to site-b and site-c.
fn site_a(
    ttys: &[String; 3],
    peers: &[(&str, &str, u16)],
    interval_two: &str,
    second_on_three: bool,
) -> String {
    let mut text = String::from(
        "[gateway]\nname = \"site-a\"\nsummary_interval = \"1s\"\n\n[link]\nidentity = \"a-id\"\ndata_dir = \"a-data\"\n\n",
    );
    for (name, fp, port) in peers {
        text += &format!(
            "[[peer]]\nname = \"{name}\"\nfingerprint = \"{fp}\"\ndial = \"127.0.0.1:{port}\"\nheartbeat = \"500ms\"\n\n[[peer.send]]\npoints = [\"keep.*\"]\nmode = \"change\"\n\n"
        );
    }
    for (bus, tty) in ["one", "two", "three"].iter().zip(ttys) {
        text += &format!(
            "[[bus]]\nname = \"{bus}\"\nport = \"{tty}\"\nbaud = 115200\nparity = \"none\"\nstop_bits = 2\n\n"
        );
    }
    let mut devices =
        vec![("keep", "one", 1, "50ms"), ("slow", "two", 1, interval_two), ("three_a", "three", 1, "100ms")];
    if second_on_three {
        devices.push(("three_b", "three", 2, "100ms"));
    }
    for (name, bus, unit, interval) in devices {
        text += &format!(
            "[[device]]\nname = \"{name}\"\nbus = \"{bus}\"\nunit = {unit}\ninterval = \"{interval}\"\ntimeout = \"200ms\"\n\n[[device.point]]\nname = \"r0\"\ntable = \"holding\"\naddress = 0\n\n"
        );
    }
    text
}

#[test]
fn sighup_reload_restarts_only_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let fp_a = keygen(&root.join("a-id"));
    let fp_b = keygen(&root.join("site-b-id"));
    let fp_c = keygen(&root.join("site-c-id"));
    let (mut sim1, tty1) = sim("sim-one", "1");
    let (_sim2, tty2) = sim("sim-two", "1");
    let (mut sim3, tty3) = sim("sim-three", "1,2");
    let ttys = [tty1, tty2, tty3];
    let ((lb, pb), (lc, pc)) = (bound(), bound());
    let b_cfg = peer(root, "site-b", pb, &fp_a);
    let c_cfg = peer(root, "site-c", pc, &fp_a);
    let mut b = Proc::spawn_on("site-b", &["run", "-c", path(&b_cfg)], "info", &[], &[&lb]);
    let mut c = Proc::spawn_on("site-c", &["run", "-c", path(&c_cfg)], "info", &[], &[&lc]);
    for p in [&mut b, &mut c] {
        p.wait_err("the listening line", |l| {
            l.iter().any(|l| l.contains("listening for peers")).then_some(())
        });
    }
    let both = [("site-b", fp_b.as_str(), pb), ("site-c", fp_c.as_str(), pc)];
    let a_cfg = write(&root.join("a.toml"), &site_a(&ttys, &both, "100ms", false));
    let mut a = Proc::spawn("site-a", &["run", "-c", path(&a_cfg)], "info");
    b.wait_err("site-a's link up", |l| l.iter().any(|l| l.contains("link up")).then_some(()));
    c.wait_err("site-a's link up", |l| l.iter().any(|l| l.contains("link up")).then_some(()));
    sim1.wait_err("20 polls of bus one", |l| (requests(l, 1).len() >= 20).then_some(()));

    // An invalid file: every error logged, everything keeps running.
    std::fs::write(
        &a_cfg,
        site_a(&ttys, &both, "100ms", false).replace("interval = \"50ms\"", "interval = \"fast\"").replace(
            "table = \"holding\"\naddress = 0\n\n[[device]]\nname = \"slow\"",
            "table = \"hodling\"\naddress = 0\n\n[[device]]\nname = \"slow\"",
        ),
    )
    .expect("write");
    a.signal("HUP");
    let refused = a.wait_err("the refused reload", |l| {
        let at = l.iter().position(|l| l.contains("reload refused"))?;
        Some(l[..at].to_vec())
    });
    assert!(
        refused.iter().any(|l| l.contains("a.toml:") && l.contains("ERROR")),
        "the file's errors (file:line:col) are logged:\n{}",
        refused.join("\n")
    );
    let polls = requests(&sim1.stderr(), 1).len();
    sim1.wait_err("bus one still polled", |l| (requests(l, 1).len() >= polls + 10).then_some(()));

    // A valid change: bus two's interval, a second device on bus three, site-c removed.
    std::fs::write(&a_cfg, site_a(&ttys, &both[..1], "200ms", true)).expect("write");
    let signalled = sim1.stderr().len();
    a.signal("HUP");
    let report = a.wait_err("the reload report", |l| {
        let at = l.iter().position(|l| l.contains("reload done"))?;
        Some(
            l[..=at]
                .iter()
                .filter(|l| l.contains("reload:") || l.contains("reload done"))
                .cloned()
                .collect::<Vec<_>>(),
        )
    });
    let report = report.join("\n");
    for expected in [
        "restarted poller of bus two: its devices changed",
        "restarted poller of bus three: its devices changed",
        "removed link to peer site-c",
    ] {
        assert!(report.contains(expected), "the reload report says {expected:?}:\n{report}");
    }
    assert!(
        !report.contains("bus one") && !report.contains("site-b"),
        "bus one and site-b untouched:\n{report}"
    );
    // The new device is polled; site-c's link closes.
    sim3.wait_err("polls of the new unit 2 on bus three", |l| (!requests(l, 2).is_empty()).then_some(()));
    c.wait_err("site-a's link closed", |l| {
        l.iter()
            .any(|l| l.contains("peer closed the link") || l.contains("peer closed the connection"))
            .then_some(())
    });
    // Bus one: polled on through the reload, with no gap longer than a few intervals.
    sim1.wait_err("1 s of polls after the reload", |l| {
        let times = requests(&l[signalled..], 1);
        (times.last()? - times.first()? >= 1.0).then_some(())
    });
    let lines = sim1.stderr();
    let from = signalled.saturating_sub(40);
    let times = requests(&lines[from..], 1);
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(gap < 0.25, "bus one (50 ms interval) had a {gap:.3} s gap in its polls around the reload");
    // Its port was opened once; site-b saw one session only.
    let a_log = a.stderr();
    let opens = a_log.iter().filter(|l| l.contains("bus{bus=one}") && l.contains("serial port open")).count();
    assert_eq!(opens, 1, "bus one's port was reopened:\n{}", a_log.join("\n"));
    let ups = b.stderr().iter().filter(|l| l.contains("link up")).count();
    assert_eq!(ups, 1, "site-b's link reconnected:\n{}", b.stderr().join("\n"));
    eprintln!("bus one: {} polls in the reload window, longest gap {:.1} ms", times.len(), gap * 1000.0);
    a.terminate();
    b.terminate();
    c.terminate();
}

#[test]
fn a_socket_held_by_the_service_manager_takes_a_masters_connect_while_the_gateway_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_sim, tty) = sim("device", "1");
    // The test plays systemd: it binds the sockets and keeps them across the restart.
    let ((masters, port), (spare, spare_port)) = (bound(), bound());
    let cfg = write(
        &dir.path().join("gw.toml"),
        &format!(
            "[gateway]\nname = \"gw\"\n\n[[bus]]\nname = \"line\"\nport = \"{tty}\"\nbaud = 115200\nparity = \"none\"\nstop_bits = 2\n\n\
             [[device]]\nname = \"dev\"\nbus = \"line\"\nunit = 1\ninterval = \"1s\"\n\n[[device.point]]\nname = \"r0\"\ntable = \"holding\"\naddress = 0\n\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\n\n[[server.unit]]\nunit = 1\npass = \"dev\"\n"
        ),
    );
    let run = || Proc::spawn_on("gateway", &["run", "-c", path(&cfg)], "info", &[], &[&masters, &spare]);
    let mut gw = run();
    gw.wait_err("the unused socket named", |l| {
        l.iter().find(|l| l.contains(&format!("127.0.0.1:{spare_port} was handed over"))).cloned()
    });
    let answered = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let end = Instant::now() + DEADLINE;
        loop {
            // 0x0B until the bus has opened its port; never a refused or dropped connection.
            match modbus_on(s, 1, &[3, 0, 0, 0, 1]).expect("an answer on the connection") {
                Ok(pdu) if pdu[..2] == [3, 2] => return,
                other => assert!(Instant::now() < end, "no normal answer, last {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    answered(&mut std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"));

    // The gateway dies; a master connects while it is down: the held socket queues it,
    // and the restarted gateway answers on that very connection.
    gw.kill9();
    let mut waiting = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect while it is down");
    let mut gw = run();
    answered(&mut waiting);

    // A reload that takes the server away: the held socket is named as unanswered.
    let text = std::fs::read_to_string(&cfg).expect("config");
    write(&cfg, &text[..text.find("[server]").expect("a [server] section")]);
    gw.signal("HUP");
    gw.wait_err("the socket named after the reload", |l| {
        l.iter()
            .find(|l| {
                l.contains(&format!("socket on 127.0.0.1:{port} was handed over"))
                    && l.contains("connections to it are not answered")
            })
            .cloned()
    });
}

/// `run -c CFG` with `LISTEN_FDS=1` and descriptor 3 closed; `LISTEN_PID` the gateway's own
/// pid when `own_pid` (as systemd sets it), else not set at all.
fn run_with_listen_fds(cfg: &Path, own_pid: bool) -> Proc {
    let mut sh = std::process::Command::new("/bin/sh");
    let pid = if own_pid { "LISTEN_PID=$$ " } else { "" };
    sh.args(["-c", &format!("{pid}LISTEN_FDS=1 exec \"$0\" \"$@\""), crate::common::procs::BIN, "run", "-c"])
        .arg(cfg)
        .env_remove("LISTEN_PID")
        .env("RUST_LOG", "info");
    Proc::command("gateway", sh)
}

#[test]
fn a_descriptor_handed_over_that_is_not_a_socket_stops_the_start_and_says_which() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = write(&dir.path().join("gw.toml"), "[gateway]\nname = \"gw\"\n");
    let mut gw = run_with_listen_fds(&cfg, true);
    let line = gw.wait_err("the error", |l| l.iter().find(|l| l.contains("socket activation")).cloned());
    assert!(line.contains("descriptor 3 (of LISTEN_FDS=1) is not a listening TCP socket"), "{line}");
    let status = gw.wait_exit();
    assert!(!status.success(), "a start with a bad handed-over socket fails: {status}");
}

/// `LISTEN_FDS` without `LISTEN_PID` (inherited, not handed over by a service manager) is
/// no hand-over, as for systemd's own `sd_listen_fds`: the gateway says so, touches no
/// descriptor and binds its addresses itself.
#[test]
fn listen_fds_without_listen_pid_hands_nothing_over_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg =
        write(&dir.path().join("gw.toml"), "[gateway]\nname = \"gw\"\n[http]\nlisten = \"127.0.0.1:0\"\n");
    let mut gw = run_with_listen_fds(&cfg, false);
    let said = gw.next_err("the notice", |l| l.contains("LISTEN_FDS"));
    assert!(said.contains("LISTEN_FDS=1 is set without LISTEN_PID") && said.contains("left alone"), "{said}");
    gw.next_err("the endpoint listening on a port it bound", |l| l.contains("on http://127.0.0.1:"));
    gw.signal("TERM");
    assert!(gw.wait_exit().success(), "{:?}", gw.stderr());
}

/// One handed-over socket serves one section: `[server]` and `[http]` naming the same
/// address stop the start (as a second bind would), rather than sharing the socket and
/// splitting its connections between a Modbus server and a web server.
#[test]
fn two_sections_on_one_handed_socket_stop_the_start_and_say_which() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, port) = bound();
    let cfg = write(
        &dir.path().join("gw.toml"),
        &format!(
            "[gateway]\nname = \"gw\"\n\n[server]\nlisten = \"127.0.0.1:{port}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n"
        ),
    );
    let mut gw = Proc::spawn_on("gateway", &["run", "-c", path(&cfg)], "info", &[], &[&socket]);
    let status = gw.wait_exit();
    assert!(!status.success(), "two sections on one socket must not start: {status}");
    let said = gw.stderr().join("\n");
    let why = format!(
        "socket activation: [server] (listen 127.0.0.1:{port}) and [http] (listen 127.0.0.1:{port}) would both take the socket handed over on 127.0.0.1:{port}"
    );
    assert!(said.contains(&why), "{said}");
}
