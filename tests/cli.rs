//! The command line as users run it: the built binary as child processes, talking to the
//! project's simulator (also a child process) over a virtual serial pair.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::procs::{BIN, Proc};

fn gateway() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("RUST_LOG", "info").env_remove("RUST_BACKTRACE");
    cmd
}

/// `m2m-gateway simulate` on a virtual pair; returns the process and the device path.
fn simulator(units: &str) -> (Proc, String) {
    let mut cmd = gateway();
    cmd.args(["simulate", "--units", units, "--registers", "20"]);
    let mut sim = Proc::command("m2m-gateway", cmd);
    let path = sim.next_out("with the device path", |l| l.starts_with('/'));
    (sim, path)
}

/// The shipped config's Modbus-TCP server address, and what tests use instead so that
/// they never fight over a fixed port.
const SHIPPED_LISTEN: &str = "listen = \"127.0.0.1:5020\"";
const ANY_PORT: &str = "listen = \"127.0.0.1:0\"";

/// The shipped gateway.toml with its server on a free port, written into `dir`.
fn shipped_config(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(manifest("gateway.toml")).expect("gateway.toml");
    assert!(text.contains(SHIPPED_LISTEN), "gateway.toml's server address changed");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text.replace(SHIPPED_LISTEN, ANY_PORT)).expect("write config");
    path
}

fn manifest(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_shows_the_plan_and_bus_load() {
    let out = gateway().args(["check", "--config", &manifest("gateway.toml")]).output().expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("bus line1 (/dev/ttyUSB0, 19200 baud 8E1"), "{text}");
    assert!(text.contains("boiler (unit 1)") && text.contains("ms on the wire"), "{text}");
    assert!(text.contains("bus load:") && text.contains("% of line capacity"), "{text}");
    assert!(!text.contains("warning:"), "{text}");
}

#[test]
fn check_warns_when_intervals_cannot_fit_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("busy.toml");
    let text = std::fs::read_to_string(manifest("gateway.toml"))
        .expect("gateway.toml")
        .replace("baud = 19200", "baud = 1200")
        .replace("interval = \"1s\"", "interval = \"20ms\"");
    std::fs::write(&path, text).expect("write");
    let out = gateway().args(["check", "--config"]).arg(&path).output().expect("run check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("warning: bus line1: configured intervals cannot fit on the line"), "{text}");
}

#[test]
fn check_writes_tag_lists_and_warns_about_received_points_no_peer_supplies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("site-b.toml");
    // site-b's example, plus a PLC map naming a point of a gateway site-b has no link to.
    let text = std::fs::read_to_string(manifest("examples/site-b.toml")).expect("site-b.toml")
        + "\n[[plc.map]]\npoints = \"line-3/press.force\"\ntable = \"holding\"\naddress = 10\ntype = \"u16\"\n";
    std::fs::write(&path, text).expect("write");
    // check verifies the identity `run` will need: site-b's, next to the copied file.
    let id = dir.path().join("site-b/identity");
    assert!(gateway().args(["keygen", "--dir"]).arg(&id).output().expect("keygen").status.success());
    let tags = dir.path().join("tags");
    let out =
        gateway().args(["check", "--config"]).arg(&path).arg("--map-csv").arg(&tags).output().expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("plc \"line-plc\" expects from site-a: boiler.flow_temp\n"), "{text}");
    assert!(text.contains("plc \"line-plc\" expects from line-3: press.force\n"), "{text}");
    assert!(
        text.contains(
            "virtual unit 10 expects from site-a: boiler.flow_temp, boiler.return_temp, boiler.setpoint,"
        ),
        "{text}"
    );
    let warnings: Vec<&str> = text.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0]
            .contains("plc \"line-plc\" expects points from \"line-3\", but no [[peer]] is named \"line-3\"")
    );
    let file = tags.join("unit-10.csv");
    assert!(text.contains(&format!("wrote {}", file.display())), "{text}");

    let raw = std::fs::read_to_string(&file).expect("unit-10.csv");
    assert!(raw.ends_with("\r\n"), "RFC 4180 line ends: {raw:?}");
    let mut reader = csv::Reader::from_path(&file).expect("open csv");
    let header: Vec<String> = reader.headers().expect("header").iter().map(str::to_owned).collect();
    assert_eq!(
        header,
        [
            "address",
            "registers",
            "table",
            "type",
            "order",
            "scale",
            "offset",
            "point",
            "eng_unit",
            "description"
        ]
    );
    let rows: Vec<Vec<String>> =
        reader.records().map(|r| r.expect("row").iter().map(str::to_owned).collect()).collect();
    let row =
        |point: &str| rows.iter().find(|r| r[7] == point).unwrap_or_else(|| panic!("no {point} in {rows:?}"));
    assert_eq!(
        row("site-a/boiler.flow_temp")[..9],
        ["0", "2", "holding", "f32", "cdab", "1", "0", "site-a/boiler.flow_temp", "degC"]
    );
    assert_eq!(row("site-a/boiler.setpoint")[..3], ["4", "2", "holding"]);
    assert_eq!(
        row("site-a/boiler.pressure")[..9],
        ["6", "1", "input", "i16", "abcd", "0.01", "0", "site-a/boiler.pressure", "bar"]
    );
    assert_eq!(row("site-a/boiler.alarm")[..4], ["2", "1", "discrete", "bool"]);
    assert_eq!(row("status.heartbeat")[..3], ["100", "1", "input"]);
    assert_eq!(row("status.links")[9], "link up bits; bit 0: site-a");
    assert_eq!(row("status.quality.0")[..3], ["102", "1", "input"]);
    assert_eq!(rows.len(), 7 + 3, "seven points and three status registers: {rows:?}");
}

#[test]
fn check_reports_every_error_with_its_position_and_exit_code_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[gateway]
name = "x"
[[bus]]
name = "l"
port = "/dev/ttyS0"
[[device]]
name = "d"
bus = "nowhere"
unit = 300
[[device.point]]
name = "p"
table = "holding"
address = 0
"#,
    )
    .expect("write");
    let out = gateway().args(["check", "--config"]).arg(&path).output().expect("run check");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(err.contains(&format!("{file}:8:7: device \"d\"")) && err.contains("nowhere"), "{err}");
    assert!(err.contains(&format!("{file}:9:8: device \"d\"")) && err.contains("300"), "{err}");
    let missing = gateway().args(["check", "--config", "/nonexistent/gateway.toml"]).output().expect("run");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/gateway.toml"));
}

#[test]
fn poll_reads_a_simulated_device_like_mbpoll() {
    let (_sim, port) = simulator("1,2");
    let out = gateway()
        .args(["poll", "--port", &port, "--unit", "2", "--table", "holding", "--address", "0"])
        .args(["--count", "5", "--json", "--repeat", "2", "--interval", "50ms"])
        .output()
        .expect("run poll");
    assert!(out.status.success(), "poll failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let reads: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(reads.len(), 2, "{text}");
    for r in &reads {
        assert_eq!(r["unit"], 2);
        assert_eq!(r["table"], "holding");
        assert_eq!(r["values"].as_array().map(Vec::len), Some(5));
        assert_eq!(r["raw"].as_array().map(Vec::len), Some(5));
        assert!(r["millis"].as_f64().is_some_and(|m| m > 0.0), "{r}");
    }
    // The round-trip time is in whole microseconds, not 2.4565889999999997.
    for line in text.lines() {
        let millis = line.split("\"millis\":").nth(1).and_then(|m| m.split([',', '}']).next());
        let decimals = millis.and_then(|m| m.split_once('.')).map_or(0, |(_, d)| d.len());
        assert!(millis.is_some() && decimals <= 3, "{line}");
    }
    // Typed decoding: the quick simulation keeps f32 sines in input registers 0, 2, ...
    let out = gateway()
        .args(["poll", "--port", &port, "--unit", "1", "--table", "input", "--type", "f32", "--count", "3"])
        .output()
        .expect("run poll");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let values: Vec<f64> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).expect("value").parse().expect("a float"))
        .collect();
    assert_eq!(values.len(), 3, "{text}");
    assert!(values.iter().all(|v| (0.0..=100.0).contains(v)), "{text}");
    // A unit nobody answers for: a clear error and a failing exit code.
    let out = gateway()
        .args(["poll", "--port", &port, "--unit", "9", "--timeout", "100ms"])
        .output()
        .expect("run poll");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unit 9: no valid reply"));
}

#[test]
fn simulate_on_a_real_port_says_so() {
    // A port that does not exist: the error names it, and no "virtual port".
    let out = gateway().args(["simulate", "--device", "/dev/m2m-no-such-tty"]).output().expect("simulate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open serial port /dev/m2m-no-such-tty: "), "{err}");
    assert!(!err.contains("virtual"), "{err}");
    // A port that exists (the gateway side of another simulator's virtual pair, a tty
    // like any other): it says it serves there.
    let (_sim, port) = simulator("1");
    let mut cmd = gateway();
    cmd.args(["simulate", "--device", &port]);
    let mut device = Proc::command("m2m-gateway", cmd);
    let line = device.next_out("saying where it serves", |_| true);
    assert_eq!(line, format!("serving on {port}"));
    device.signal("TERM");
    assert!(device.wait_exit().success());
}

#[test]
fn run_polls_and_stops_within_a_second_on_sigterm() {
    let (_sim, port) = simulator("1,2,3");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(manifest("gateway.toml"))
        .expect("gateway.toml")
        .replace("/dev/ttyUSB0", &port)
        .replace("summary_interval = \"60s\"", "summary_interval = \"1s\"\nworker_threads = 1")
        .replace(SHIPPED_LISTEN, ANY_PORT);
    std::fs::write(&config, text).expect("write");
    let mut cmd = gateway();
    // One worker thread runs everything (and still stops in time).
    cmd.args(["run", "--config"]).arg(&config);
    let mut run = Proc::command("m2m-gateway", cmd);
    run.next_err("saying the port is open", |l| l.contains("serial port open"));
    // The quick simulation has no boiler/meter/pump maps, so reads may be answered with
    // exceptions: what matters here is that transactions complete and are summarised.
    let summary = run
        .next_err("with a bus summary", |l| l.contains("transactions (") && !l.contains(" 0 transactions"));
    assert!(summary.contains("line busy"), "{summary}");
    let asked = Instant::now();
    run.signal("TERM");
    let status = run.wait_exit();
    assert!(status.success(), "exit status {status:?}");
    assert!(asked.elapsed() < Duration::from_secs(1), "took {:?} to stop", asked.elapsed());
}

#[test]
fn demo_prints_poll_lines_that_read_the_far_sites_values_on_a_virtual_unit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = gateway();
    cmd.args(["demo", "--config"]).arg(shipped_config(dir.path())).args(["--for", "0s", "--every", "1s"]);
    let mut demo = Proc::command("m2m-gateway", cmd);
    demo.next_out("announcing the virtual unit", |l| {
        l.starts_with("demo: site-b serves site-a's values as virtual unit 1 on 127.0.0.1:")
    });
    // The register map (as `check` prints it), up to the poll lines.
    let mut map = Vec::new();
    let holding = loop {
        let line = demo.next_out("with the holding poll line", |_| true);
        if line.starts_with("  m2m-gateway poll --tcp 127.0.0.1:") {
            break line;
        }
        map.push(line);
    };
    let mapped = |table: &str| map.iter().filter(|l| l.starts_with(&format!("  {table} "))).count();
    assert!(map.iter().any(|l| l.contains("site-a/boiler.flow_temp [degC]")), "{map:?}");
    let discrete = demo.next_out("with the discrete poll line", |l| l.starts_with("  "));
    assert!(holding.contains("--table holding") && holding.contains("--type f32"), "{holding}");
    assert!(discrete.contains("--table discrete") && discrete.contains("--type bool"), "{discrete}");
    // Every number and bool of gateway.toml the map lists (its string point is left out).
    let count = |line: &str| -> usize {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "--count").expect("--count");
        words[at + 1].parse().expect("a count")
    };
    assert_eq!((count(&holding), count(&discrete)), (mapped("holding"), mapped("discrete")), "{map:?}");
    assert!(count(&holding) >= 8 && count(&discrete) >= 3, "{map:?}");
    assert!(!map.iter().any(|l| l.contains("serial_number")), "{map:?}");

    // Run each printed line as printed (plus --json): once site-a's values have reached
    // site-b over the link, it answers with every value (before, 0x0B: not good yet).
    for line in [&holding, &discrete] {
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        let values = loop {
            let out = gateway().args(&args).arg("--json").output().expect("run poll");
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                let read: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object");
                break read["values"].as_array().cloned().expect("values");
            }
            assert!(Instant::now() < deadline, "{line}: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(values.len(), count(line), "{line}: {values:?}");
        if line.contains("f32") {
            assert!(values.iter().all(|v| v.as_f64().is_some_and(f64::is_finite)), "{values:?}");
        } else {
            assert!(values.iter().all(serde_json::Value::is_boolean), "{values:?}");
        }
    }
    demo.signal("TERM");
    assert!(demo.wait_exit().success());
}

#[test]
fn demo_takes_a_zero_interval_and_an_endless_duration() {
    // `--every 0s` panicked in tokio::time::interval; `--for 0` runs until SIGTERM.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = gateway();
    cmd.args(["demo", "--config"]).arg(shipped_config(dir.path())).args(["--for", "0s", "--every", "0s"]);
    let mut demo = Proc::command("m2m-gateway", cmd);
    demo.next_out("with a value table", |l| l.starts_with("== "));
    demo.signal("TERM");
    let status = demo.wait_exit();
    assert!(status.success(), "exit status {status:?}");
    // A duration past what deadlines can hold is refused up front, with the reason.
    let out = gateway().args(["demo", "--for", "300000000000y"]).output().expect("run demo");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("above the maximum"));
}

#[test]
fn demo_shows_live_values_with_no_hardware() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = gateway()
        .args(["demo", "--config"])
        .arg(shipped_config(dir.path()))
        .args(["--for", "3s", "--every", "1s"])
        .output()
        .expect("run demo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let good = text.lines().filter(|l| l.starts_with("boiler.flow_temp") && l.contains(" good ")).count();
    assert!(good >= 1, "no good boiler.flow_temp row in:\n{text}");
    // Each value with its engineering unit (`unit = "degC"` in gateway.toml), here and
    // at the peer; a point without one shows none.
    let row = |name: &str| text.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or("");
    assert_eq!(row("boiler.flow_temp").split_whitespace().nth(2), Some("degC"), "{text}");
    assert_eq!(row("meter.energy_import").split_whitespace().nth(2), Some("kWh"), "{text}");
    assert_eq!(row("site-a/boiler.pressure").split_whitespace().nth(2), Some("bar"), "{text}");
    let burner = row("boiler.burner_on");
    assert!(burner.split_whitespace().nth(2).is_some_and(|w| w != "degC"), "{text}");
    // The demo peer received it over the authenticated link.
    assert!(text.contains("TLS 1.3") && text.contains("fingerprint"), "no link header in:\n{text}");
    let received =
        text.lines().filter(|l| l.starts_with("site-a/boiler.flow_temp") && l.contains(" good ")).count();
    assert!(received >= 1, "no good site-a/boiler.flow_temp row at the peer in:\n{text}");
}

/// A gateway with a peer link: identity and data directory relative to the file in `dir`.
fn linked_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("linked.toml");
    let text = format!(
        "[gateway]\nname = \"a\"\n\n[link]\nidentity = \"id\"\ndata_dir = \"data\"\n\n[[peer]]\nname = \"b\"\nfingerprint = \"{}\"\ndial = \"127.0.0.1:7700\"\n",
        "AB".repeat(32)
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `m2m-gateway <args> --config <path>`; returns the exit code and stderr lines.
fn config_command(args: &[&str], path: &std::path::Path) -> (Option<i32>, Vec<String>) {
    let out = gateway().args(args).arg("--config").arg(path).output().expect("run m2m-gateway");
    let err = String::from_utf8_lossy(&out.stderr).lines().map(str::to_owned).collect();
    (out.status.code(), err)
}

#[test]
fn check_and_run_refuse_a_missing_or_mismatched_identity_in_one_line_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = linked_config(dir.path());
    let id = dir.path().join("id");
    let keygen = format!("run m2m-gateway keygen --dir {}", id.display());

    // No identity yet: check and run say the same one line, with the keygen command.
    for command in ["check", "run"] {
        let (code, err) = config_command(&[command], &config);
        assert_eq!(code, Some(2), "{command}: {err:?}");
        assert_eq!(err.len(), 1, "{command}: one line: {err:?}");
        let want = format!(
            "{}:5:12: link: identity key {}/key.pem not found: {keygen}",
            config.display(),
            id.display()
        );
        assert_eq!(err[0], want, "{command}");
    }

    // After keygen, check passes and creates nothing (data_dir is made by run).
    let out = gateway().args(["keygen", "--dir"]).arg(&id).output().expect("keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, err) = config_command(&["check"], &config);
    assert_eq!(code, Some(0), "{err:?}");
    assert!(!dir.path().join("data").exists(), "check changes nothing");

    // A certificate that is not the key's (copied from another identity).
    let other = dir.path().join("other");
    assert!(gateway().args(["keygen", "--dir"]).arg(&other).output().expect("keygen").status.success());
    std::fs::copy(other.join("cert.pem"), id.join("cert.pem")).expect("copy cert");
    for command in ["check", "run"] {
        let (code, err) = config_command(&[command], &config);
        assert_eq!(code, Some(2), "{command}: {err:?}");
        assert_eq!(err.len(), 1, "{command}: one line: {err:?}");
        assert!(err[0].contains("does not match certificate"), "{err:?}");
        assert!(err[0].contains(&format!("{keygen} --force")), "{err:?}");
    }

    // A file in the spool's place that is not a spool is found before run opens it.
    assert!(
        gateway().args(["keygen", "--force", "--dir"]).arg(&id).output().expect("keygen").status.success()
    );
    std::fs::create_dir(dir.path().join("data")).expect("data dir");
    std::fs::write(dir.path().join("data/spool-b.db"), "not a database, and not empty").expect("write");
    let (code, err) = config_command(&["check"], &config);
    assert_eq!(code, Some(2), "{err:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("peer \"b\": spool ") && err[0].contains("spool-b.db"), "{err:?}");
}

#[test]
fn listen_accepts_localhost_in_check_and_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = std::fs::read_to_string(manifest("gateway.toml")).expect("gateway.toml");
    let config = dir.path().join("gateway.toml");
    // check takes the address users write; run binds localhost on a free port.
    std::fs::write(&config, text.replace(SHIPPED_LISTEN, "listen = \"localhost:5020\"")).expect("write");
    let (code, err) = config_command(&["check"], &config);
    assert_eq!(code, Some(0), "{err:?}");
    std::fs::write(&config, text.replace(SHIPPED_LISTEN, "listen = \"localhost:0\"")).expect("write");
    let mut cmd = gateway();
    cmd.args(["run", "--config"]).arg(&config);
    let mut run = Proc::command("m2m-gateway", cmd);
    let line = run.next_err("saying the server listens", |l| l.contains("modbus-tcp server listening on"));
    let addr: std::net::SocketAddr = line
        .rsplit("addr=")
        .next()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"));
    assert!(addr.ip().is_loopback() && addr.is_ipv4(), "{addr}");
    std::net::TcpStream::connect(addr).expect("the server accepts on localhost");
    run.signal("TERM");
    assert!(run.wait_exit().success());
}

#[test]
fn check_shows_devices_made_from_templates_expanded() {
    let out = gateway()
        .args(["check", "--config", &manifest("tests/configs/good/templates.toml")])
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The plan names the template; the expansion shows each point as it resolved,
    // with meter_2's overrides (scale, unit, interval) and its added point.
    assert!(text.contains("meter_2 (unit 2, template meter)  input 0..=1"), "{text}");
    let expanded =
        text.split("devices made from templates, expanded").nth(1).unwrap_or_else(|| panic!("{text}"));
    let lines: Vec<String> =
        expanded.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    for want in [
        "meter_1 (unit 1, template meter)",
        "energy input 342 f32 kWh every 5s",
        "meter_2 (unit 2, template meter)",
        "energy input 342 f32 x1000 Wh every 1s",
        "frequency input 70 f32 every 1s",
    ] {
        assert!(lines.iter().any(|l| l == want), "no line {want:?} in:\n{expanded}");
    }
}

#[test]
fn run_polls_devices_made_from_an_included_template() {
    let (_sim, port) = simulator("1,2");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("templates")).expect("mkdir");
    std::fs::write(
        dir.path().join("templates/probe.toml"),
        "[[template]]\nname = \"probe\"\ninterval = \"100ms\"\n\n[[template.point]]\nname = \"level\"\ntable = \"holding\"\naddress = 3\n",
    )
    .expect("write template");
    let config = dir.path().join("plant.toml");
    let devices: String = (1..=2)
        .map(|unit| {
            format!(
                "[[device]]\nname = \"probe_{unit}\"\nbus = \"l\"\nunit = {unit}\ntemplate = \"probe\"\n\n"
            )
        })
        .collect();
    std::fs::write(
        &config,
        format!(
            "include = [\"templates/*.toml\"]\n\n[gateway]\nname = \"p\"\nsummary_interval = \"1s\"\n\n[[bus]]\nname = \"l\"\nport = \"{port}\"\n\n{devices}"
        ),
    )
    .expect("write config");
    let mut cmd = gateway();
    cmd.args(["run", "--config"]).arg(&config);
    let mut run = Proc::command("m2m-gateway", cmd);
    // Both devices answer (the quick simulation serves units 1 and 2): transactions, no
    // timeouts and no exceptions.
    let summary = run
        .next_err("with a bus summary", |l| l.contains("transactions (") && !l.contains(" 0 transactions"));
    assert!(summary.contains(" 0 timeouts") && summary.contains(" 0 exceptions"), "{summary}");
    run.signal("TERM");
    assert!(run.wait_exit().success());
}

/// The URL the gateway's log gives for its HTTP endpoint.
fn http_url(run: &mut Proc) -> String {
    let line =
        run.next_err("with the http address", |l| l.contains("status page, metrics and API on http://"));
    let at = line.find("http://").expect("url in the line");
    line[at..].trim_end_matches('/').to_string()
}

#[test]
fn status_read_and_write_ask_a_running_gateway() {
    let (_sim, port) = simulator("1");
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "cli-test-token-0123456789\n").expect("token");
    let config = dir.path().join("gateway.toml");
    let text = format!(
        r#"
[gateway]
name = "cli-test"
[[bus]]
name = "line1"
port = "{port}"
[[device]]
name = "boiler"
bus = "line1"
unit = 1
interval = "100ms"
point = [
  {{ name = "level", table = "holding", address = 0, unit = "%" }},
  {{ name = "setpoint", table = "holding", address = 1 }},
]
[http]
listen = "127.0.0.1:0"
token_file = "{}"
[[http.grant]]
points = "boiler.setpoint"
max = 100
"#,
        token.display()
    );
    std::fs::write(&config, text).expect("config");
    let mut cmd = gateway();
    cmd.args(["run", "--config"]).arg(&config);
    let mut run = Proc::command("m2m-gateway", cmd);
    let url = http_url(&mut run);
    let cli = |args: &[&str]| gateway().args(args).args(["--url", &url]).output().expect("run the command");
    let out_of = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    let err_of = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Wait for the first poll, through the API itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    let read = loop {
        let o = cli(&["read", "boiler.*", "--json"]);
        assert!(o.status.success(), "{}", err_of(&o));
        let lines: Vec<serde_json::Value> =
            out_of(&o).lines().map(|l| serde_json::from_str(l).expect("a JSON line per point")).collect();
        if lines.len() == 2 {
            break lines;
        }
        assert!(Instant::now() < deadline, "no values: {}", out_of(&o));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(read[0]["name"], "boiler.level");
    assert_eq!(read[0]["unit"], "%");
    assert_eq!(read[0]["quality"], "good");

    let status = cli(&["status"]);
    assert!(status.status.success(), "{}", err_of(&status));
    let s = out_of(&status);
    assert!(s.starts_with("cli-test  OK"), "{s}");
    assert!(s.contains("bus line1") && s.contains("boiler") && s.contains("unit 1"), "{s}");

    let table = out_of(&cli(&["read"]));
    assert!(table.starts_with("POINT") && table.contains("boiler.setpoint"), "{table}");

    // Writes: refused without the token, refused past the grant's max, done with both.
    let refused = cli(&["write", "boiler.setpoint", "42"]);
    assert!(!refused.status.success());
    assert!(err_of(&refused).contains("writes need the access token"), "{}", err_of(&refused));
    let token = token.display().to_string();
    let over = cli(&["write", "boiler.setpoint", "500", "--token-file", &token]);
    assert!(!over.status.success());
    assert!(err_of(&over).contains("outside the granted range"), "{}", err_of(&over));
    let level = cli(&["write", "boiler.level", "1", "--token-file", &token]);
    assert!(err_of(&level).contains("no [[http.grant]] covers point boiler.level"), "{}", err_of(&level));
    let done = cli(&["write", "boiler.setpoint", "42", "--token-file", &token]);
    assert!(done.status.success(), "{}", err_of(&done));
    assert_eq!(out_of(&done), "boiler.setpoint = 42 written\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = out_of(&cli(&["read", "boiler.setpoint", "--json"]));
        let v: serde_json::Value = serde_json::from_str(o.trim()).expect("json");
        if v["value"] == 42 {
            break;
        }
        assert!(Instant::now() < deadline, "the written value never came back from the device: {o}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // --watch prints the values, then follows.
    let mut cmd = gateway();
    cmd.args(["read", "boiler.level", "--watch", "--url", &url]);
    let mut watch = Proc::command("m2m-gateway", cmd);
    watch.next_out("with the table header", |l| l.starts_with("POINT"));
    watch.next_out("with the level", |l| l.starts_with("boiler.level"));

    // trace: the bus's frames like a sniffer, one line each, until Ctrl-C.
    let mut cmd = gateway();
    cmd.args(["trace", "--bus", "line1", "--url", &url]);
    let mut trace = Proc::command("m2m-gateway", cmd);
    let sent = trace
        .next_out("with a request sent", |l| l.contains(" tx 01 03 00 00 00 02 ") && l.ends_with("  sent"));
    assert!(sent.contains("  unit 1 read holding 0+2  "), "{sent}");
    assert!(sent.as_bytes()[2] == b':' && sent.as_bytes()[8] == b'.', "the time of day first: {sent}");
    let ok = trace.next_out("with its reply taken", |l| l.contains(" rx 01 03 04 ") && l.ends_with("  ok"));
    assert!(ok.contains("  unit 1 reply ["), "{ok}");
    trace.signal("INT");
    assert!(trace.wait_exit().success(), "trace ends cleanly on Ctrl-C");
    let mut cmd = gateway();
    cmd.args(["trace", "--bus", "line1", "--json", "--url", &url]);
    let mut json = Proc::command("m2m-gateway", cmd);
    let line = json.next_out("with a JSON frame", |l| l.starts_with('{') && l.contains(r#""verdict":"ok""#));
    let frame: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!((frame["dir"].as_str(), frame["unit"].as_u64()), (Some("rx"), Some(1)), "{frame}");
    assert!(frame["bytes"].as_str().is_some_and(|b| b.starts_with("010304")), "{frame}");
    let nope = gateway().args(["trace", "--bus", "nope", "--url", &url]).output().expect("run");
    assert!(!nope.status.success());
    assert!(err_of(&nope).contains(r#"no bus "nope" (buses: line1)"#), "{}", err_of(&nope));

    // Nothing listening: a clear error.
    let nobody = gateway().args(["status", "--url", "http://127.0.0.1:1"]).output().expect("run");
    assert!(!nobody.status.success());
    assert!(err_of(&nobody).contains("cannot reach the gateway at 127.0.0.1:1"), "{}", err_of(&nobody));
}

#[test]
fn logs_as_json_lines_and_without_timestamps_under_journald() {
    let (_sim, port) = simulator("1");
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, format: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "[gateway]\nname = \"logs\"\n{format}\n[[bus]]\nname = \"line1\"\nport = \"{port}\"\n\
             [[device]]\nname = \"d\"\nbus = \"line1\"\nunit = 1\n\
             point = [ {{ name = \"p\", table = \"holding\", address = 0 }} ]\n[http]\nenabled = false\n"
        );
        std::fs::write(&path, text).expect("config");
        path
    };
    // [gateway] log_format = "json": one JSON object per line, fields at the top level.
    let mut cmd = gateway();
    cmd.args(["run", "--config"]).arg(write("json.toml", "log_format = \"json\""));
    let mut run = Proc::command("m2m-gateway", cmd);
    let line = run.next_err("saying it started", |l| l.contains("gateway started"));
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["message"], "gateway started", "{line}");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["gateway"], "logs");
    assert!(v["timestamp"].is_string(), "{line}");
    drop(run);

    // --log-format text overrides the key; under systemd no timestamp (journald adds one).
    let mut cmd = gateway();
    cmd.env("JOURNAL_STREAM", "8:12345").args(["--log-format", "text", "run", "--config"]);
    cmd.arg(write("text.toml", "log_format = \"json\""));
    let mut run = Proc::command("m2m-gateway", cmd);
    let line = run.next_err("saying it started", |l| l.contains("gateway started"));
    assert!(line.trim_start().starts_with("INFO "), "no timestamp under journald: {line:?}");
    assert!(!line.contains('\u{1b}'), "no colours when stderr is not a terminal: {line:?}");
    assert!(line.contains("http=none"), "{line}");
}

/// `m2m-gateway simulate --config FILE EXTRA..`; returns the process and the first line
/// it prints (the device path, or the `modbus-tcp://` address with --tcp).
fn simulator_from(dir: &std::path::Path, sim_toml: &str, extra: &[&str]) -> (Proc, String) {
    let path = dir.join("sim.toml");
    std::fs::write(&path, sim_toml).expect("write simulation");
    let mut cmd = gateway();
    cmd.args(["simulate", "--config"]).arg(&path).args(extra);
    let mut sim = Proc::command("m2m-gateway", cmd);
    let first = sim.next_out("with the address", |l| l.starts_with('/') || l.starts_with("modbus-tcp://"));
    (sim, first)
}

const THREE_REGISTERS: &str = r#"
[[unit]]
unit = 3
[[unit.register]]
table = "holding"
address = 0
values = [11, 12, 13]
"#;

/// The raw registers `poll --json` printed (one read).
fn polled(args: &[&str]) -> Result<Vec<u64>, String> {
    let out =
        gateway().arg("poll").args(args).args(["--json", "--timeout", "300ms"]).output().expect("run poll");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let r: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object");
    Ok(r["raw"].as_array().expect("raw registers").iter().map(|v| v.as_u64().expect("a number")).collect())
}

#[test]
fn poll_commissions_modbus_ascii_devices_with_protocol_ascii() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_sim, port) = simulator_from(dir.path(), &format!("protocol = \"ascii\"\n{THREE_REGISTERS}"), &[]);
    let args = ["--port", &port, "--unit", "3", "--count", "3"];
    assert_eq!(polled(&[&args[..], &["--protocol", "ascii"]].concat()), Ok(vec![11, 12, 13]));
    // The same device read as RTU hears nothing it understands.
    let err = polled(&args).expect_err("an ascii device does not answer rtu");
    assert!(err.contains("unit 3: no valid reply"), "{err}");
}

#[test]
fn poll_reads_a_modbus_tcp_device_through_the_bus_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_sim, addr) = simulator_from(dir.path(), THREE_REGISTERS, &["--tcp", "127.0.0.1:0"]);
    assert!(addr.starts_with("modbus-tcp://127.0.0.1:"), "{addr}");
    assert_eq!(polled(&["--port", &addr, "--unit", "3", "--count", "3"]), Ok(vec![11, 12, 13]));
    let err = polled(&["--port", &addr, "--unit", "3", "--protocol", "ascii"]).expect_err("refused");
    assert!(err.contains("speaks modbus-tcp"), "{err}");
}

#[test]
fn kernel_rs485_on_a_port_that_refuses_it_is_one_clear_error() {
    rs485_refused_once(
        "rs485 = \"kernel\"\nrs485_delay_after = \"1ms\"",
        "kernel RS-485 direction control",
        "kernel",
    );
}

/// A pty has no RTS line (TIOCMSET is refused): userspace direction control is one clear
/// error naming the port and the option, and the port is not driven.
#[test]
fn userspace_rts_on_a_port_that_refuses_it_is_one_clear_error() {
    rs485_refused_once(
        "rs485 = \"rts\"\nrs485_delay_before = \"500us\"\nrs485_delay_after = \"1ms\"",
        "userspace RS-485 direction control: the gateway sets RTS high 500µs before each request and low 1ms after",
        "direction with RTS",
    );
}

/// Runs a gateway with `rs485` keys on a simulator's pty: `check` shows `explained`, and
/// `run` says once that the port refuses (the line naming the port and `option`).
fn rs485_refused_once(rs485: &str, explained: &str, option: &str) {
    let (_sim, port) = simulator("1");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("gateway.toml");
    let text = format!(
        r#"
[gateway]
name = "rs485"
[[bus]]
name = "line1"
port = "{port}"
{rs485}
reopen_max = "100ms"
[[device]]
name = "d"
bus = "line1"
unit = 1
interval = "50ms"
point = [{{ name = "x", table = "holding", address = 0 }}]
"#
    );
    std::fs::write(&config, text).expect("write");
    // check explains the option and accepts it.
    let out = gateway().args(["check", "--config"]).arg(&config).output().expect("run check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(explained), "{shown}");
    let mut cmd = gateway();
    cmd.args(["run", "--config"]).arg(&config);
    let mut run = Proc::command("m2m-gateway", cmd);
    let line = run.next_err("refusing rs-485", |l| l.contains("RS-485"));
    // The log line names the port, the option and the way out.
    assert!(line.contains(&port) && line.contains(option) && line.contains("remove rs485"), "{line}");
    // Said once, not at every reopen attempt (every 100 ms here).
    std::thread::sleep(Duration::from_millis(500));
    let said: Vec<String> = run.stderr().into_iter().filter(|l| l.contains("RS-485")).collect();
    assert_eq!(said.len(), 1, "repeated: {said:?}");
    run.signal("TERM");
    assert!(run.wait_exit().success());
}

#[test]
fn demo_serves_a_modbus_tcp_bus_from_the_simulator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tcp.toml");
    std::fs::write(
        &config,
        r#"
[gateway]
name = "site-t"
[[bus]]
name = "plc"
port = "modbus-tcp://10.0.0.9:502"
[[device]]
name = "meter"
bus = "plc"
unit = 1
interval = "200ms"
point = [{ name = "energy", table = "holding", address = 0, type = "u32" }]
"#,
    )
    .expect("write");
    let out = gateway()
        .args(["demo", "--config"])
        .arg(&config)
        .args(["--for", "2s", "--every", "1s"])
        .output()
        .expect("run demo");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bus plc -> modbus-tcp://127.0.0.1:"), "{text}");
    let good = text.lines().filter(|l| l.starts_with("meter.energy") && l.contains(" good ")).count();
    assert!(good >= 1, "no good meter.energy row in:\n{text}");
}
