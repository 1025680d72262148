//! Delivering what arrives, between real processes: site-a polls an `m2m-gateway
//! simulate` child and sends its points to site-b; site-b serves them on a virtual
//! Modbus-TCP unit (read by a hand-written Modbus-TCP client here) and writes them into
//! a PLC (a hand-written Modbus-TCP server here that records every write).
//!
//! Every wait has a deadline; every child is killed when the test ends, pass or fail.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::blocking::{modbus, read_words, wait_for};
use common::procs::{Proc, bound, field, keygen, path, write};

/// FC1: coils.
fn read_coils(addr: SocketAddr, unit: u8, start: u16, count: u16) -> Result<Vec<bool>, u8> {
    let mut pdu = vec![1];
    pdu.extend_from_slice(&start.to_be_bytes());
    pdu.extend_from_slice(&count.to_be_bytes());
    let body = modbus(addr, unit, &pdu)?;
    Ok((0..usize::from(count)).map(|i| body[2 + i / 8] & (1 << (i % 8)) != 0).collect())
}

/// FC6.
fn write_register(addr: SocketAddr, unit: u8, address: u16, value: u16) -> Result<Vec<u8>, u8> {
    let mut pdu = vec![6];
    pdu.extend_from_slice(&address.to_be_bytes());
    pdu.extend_from_slice(&value.to_be_bytes());
    modbus(addr, unit, &pdu)
}

const SIM: &str = r#"
[[unit]]
unit = 1

[[unit.register]]      # flow_temp 21.5 as f32, word order cdab
table = "holding"
address = 0
values = [0, 16812]

[[unit.register]]      # pressure -12.3 as i16 x 0.1; alarm word with bit 2 set
table = "holding"
address = 2
values = [-123, 4]

[[unit.register]]      # label
table = "holding"
address = 10
text = "PUMP-7"

[[unit.register]]      # setpoint (granted to site-b), limit (not granted)
table = "holding"
address = 20
values = [500, 7]

[[unit.register]]      # burner
table = "coils"
address = 0
values = [1]
"#;

fn site_a(fp_b: &str, port: u16, tty: &str) -> String {
    format!(
        r#"[gateway]
name = "site-a"

[link]
identity = "a-id"
data_dir = "a-data"

[[peer]]
name = "site-b"
fingerprint = "{fp_b}"
dial = "127.0.0.1:{port}"
heartbeat = "300ms"
reconnect_max = "500ms"

[[peer.send]]
points = ["boiler.*"]
mode = "change"

[[peer.grant]]
points = ["boiler.setpoint"]
min = 0
max = 1000

[[bus]]
name = "line"
port = "{tty}"
baud = 115200
parity = "none"
stop_bits = 2

[[device]]
name = "boiler"
bus = "line"
unit = 1
interval = "50ms"
timeout = "300ms"
point = [
  {{ name = "flow_temp", table = "holding", address = 0, type = "f32", order = "cdab", unit = "degC" }},
  {{ name = "pressure", table = "holding", address = 2, type = "i16", scale = 0.1, unit = "bar" }},
  {{ name = "alarm", table = "holding", address = 3, type = "bit", bit = 2 }},
  {{ name = "label", table = "holding", address = 10, type = "string", length = 6 }},
  {{ name = "setpoint", table = "holding", address = 20 }},
  {{ name = "limit", table = "holding", address = 21 }},
  {{ name = "burner", table = "coils", address = 0 }},
]
"#
    )
}

fn site_b(fp_a: &str, port: u16, server: u16) -> String {
    format!(
        r#"[gateway]
name = "site-b"

[link]
identity = "b-id"
data_dir = "b-data"
listen = "127.0.0.1:{port}"
allow = ["127.0.0.1"]

[[peer]]
name = "site-a"
fingerprint = "{fp_a}"
heartbeat = "300ms"

[server]
listen = "127.0.0.1:{server}"

[[server.unit]]
unit = 10
status = 1000

[[server.unit.map]]
points = "site-a/boiler.flow_temp"
table = "holding"
address = 0
type = "f32"
order = "cdab"

[[server.unit.map]]
points = "site-a/boiler.pressure"
table = "holding"
address = 2
type = "i16"
scale = 0.1

[[server.unit.map]]
points = ["site-a/boiler.setpoint", "site-a/boiler.limit"]
table = "holding"
address = 3
type = "u16"

[[server.unit.map]]
points = "site-a/boiler.label"
table = "holding"
address = 10
type = "string"
length = 6

[[server.unit.map]]
points = ["site-a/boiler.burner", "site-a/boiler.alarm"]
table = "coils"
address = 0
type = "bool"
"#
    )
}

struct Sites {
    _dir: tempfile::TempDir,
    fp_a: String,
    fp_b: String,
    root: std::path::PathBuf,
}

fn sites() -> Sites {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let fp_a = keygen(&root.join("a-id"));
    let fp_b = keygen(&root.join("b-id"));
    Sites { _dir: dir, fp_a, fp_b, root }
}

fn listening(b: &mut Proc, port: u16) {
    let at = b.wait_err("the peer listening line", |l| {
        l.iter().find_map(|l| l.split("listening for peers on ").nth(1).map(str::to_string))
    });
    assert_eq!(at, format!("127.0.0.1:{port}"));
}

#[test]
fn site_b_serves_site_a_values_on_a_virtual_unit_and_writes_back_through_the_grants() {
    let s = sites();
    let root = &s.root;
    let sim_cfg = write(&root.join("sim.toml"), SIM);
    let mut sim = Proc::spawn("simulate", &["simulate", "-c", path(&sim_cfg)], "warn");
    let tty = sim.wait_out("the virtual port path", |l| l.first().cloned());
    let ((peers, port), (masters, server_port)) = (bound(), bound());
    let server: SocketAddr = format!("127.0.0.1:{server_port}").parse().expect("addr");
    let a_cfg = write(&root.join("a.toml"), &site_a(&s.fp_b, port, &tty));
    let b_cfg = write(&root.join("b.toml"), &site_b(&s.fp_a, port, server_port));

    let mut b = Proc::spawn_on("site-b", &["run", "-c", path(&b_cfg)], "info", &[], &[&peers, &masters]);
    listening(&mut b, port);
    // Nothing received yet: the values are not known, which is not zero.
    assert_eq!(read_words(server, 10, 3, 0, 2), Err(0x0B), "never received answers 0x0B");
    assert_eq!(read_words(server, 10, 3, 20, 1), Err(0x02), "an unmapped address answers 0x02");
    let status = read_words(server, 10, 4, 1000, 3).expect("the status block is always readable");
    assert_eq!(status[1..], [0, 0], "link down, no point good: {status:?}");

    let mut a = Proc::spawn("site-a", &["run", "-c", path(&a_cfg)], "info");
    let words = wait_for("site-a's values at site-b", || read_words(server, 10, 3, 0, 5).ok());
    assert_eq!(read_words(server, 10, 3, 0, 11), Err(0x02), "5..=9 are not mapped");
    // What site-a polled, register for register: f32 cdab, scaled i16, u16s, a string.
    let label: Vec<u16> =
        vec![u16::from_be_bytes(*b"PU"), u16::from_be_bytes(*b"MP"), u16::from_be_bytes(*b"-7")];
    assert_eq!(words[..5], [0, 16812, (-123i16) as u16, 500, 7], "{words:?}");
    assert_eq!(wait_for("the label", || read_words(server, 10, 3, 10, 3).ok()), label);
    assert_eq!(read_coils(server, 10, 0, 2), Ok(vec![true, true]), "burner coil, alarm bit");
    let status = read_words(server, 10, 4, 1000, 3).expect("status");
    assert_eq!(status[1..], [0b1, 0b111_1111], "link up, all seven points good: {status:?}");
    let beat = status[0];
    wait_for("the heartbeat to count", || {
        (read_words(server, 10, 4, 1000, 1).ok()?[0] != beat).then_some(())
    });

    // A master write at site-b to a granted point changes the device at site-a.
    assert_eq!(write_register(server, 10, 3, 750), Ok(vec![6, 0, 3, 2, 238]), "normal echo once confirmed");
    wait_for("the new setpoint polled back from the device", || {
        (read_words(server, 10, 3, 3, 1).ok()? == [750]).then_some(())
    });
    // Refused by site-a's grants, with the reason logged at site-b.
    assert_eq!(write_register(server, 10, 4, 1), Err(0x02), "limit is not granted");
    assert_eq!(write_register(server, 10, 3, 1500), Err(0x03), "outside the granted range");
    b.wait_err("the refusal's reason", |l| {
        l.iter()
            .any(|l| l.contains("not granted: point boiler.limit is not writable by this peer"))
            .then_some(())
    });
    assert_eq!(read_words(server, 10, 3, 3, 2), Ok(vec![750, 7]), "nothing else changed");
    // Half a value is not written.
    assert_eq!(write_register(server, 10, 1, 1), Err(0x02));

    // The link is cut: the same read answers 0x0B, writes are refused at once.
    a.kill9();
    wait_for("0x0B while the link is down", || (read_words(server, 10, 3, 0, 5) == Err(0x0B)).then_some(()));
    assert_eq!(read_words(server, 10, 3, 10, 3), Err(0x0B));
    assert_eq!(read_coils(server, 10, 0, 2), Err(0x0B));
    let started = Instant::now();
    assert_eq!(write_register(server, 10, 3, 600), Err(0x0B), "no link, no write");
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once, not queued");
    let status = read_words(server, 10, 4, 1000, 3).expect("status");
    assert_eq!(status[1..], [0, 0], "link down, points comm_fail: {status:?}");

    // Back: good values again (the setpoint kept the written value; 600 was never sent).
    let mut a = Proc::spawn("site-a", &["run", "-c", path(&a_cfg)], "info");
    let words = wait_for("good values after the link is back", || read_words(server, 10, 3, 0, 5).ok());
    assert_eq!(words, [0, 16812, (-123i16) as u16, 750, 7]);
    a.terminate();
    b.terminate();
    drop(sim);
}

/// A PLC: a Modbus-TCP server that accepts FC6/FC16 and records every value written to
/// holding register 0, in order.
fn plc_server() -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind plc");
    let addr = listener.local_addr().expect("addr");
    let values = Arc::new(Mutex::new(Vec::new()));
    let v = values.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let v = v.clone();
            std::thread::spawn(move || {
                loop {
                    let mut head = [0u8; 7];
                    if s.read_exact(&mut head).is_err() {
                        return;
                    }
                    let len = usize::from(u16::from_be_bytes([head[4], head[5]])).saturating_sub(1);
                    let mut pdu = vec![0u8; len];
                    if s.read_exact(&mut pdu).is_err() {
                        return;
                    }
                    let at = u16::from_be_bytes([pdu[1], pdu[2]]);
                    let answer: Vec<u8> = match pdu[0] {
                        6 => {
                            if at == 0 {
                                v.lock().expect("lock").push(u16::from_be_bytes([pdu[3], pdu[4]]));
                            }
                            pdu.clone()
                        }
                        16 => {
                            if at == 0 {
                                v.lock().expect("lock").push(u16::from_be_bytes([pdu[6], pdu[7]]));
                            }
                            pdu[..5].to_vec()
                        }
                        f => vec![f | 0x80, 1],
                    };
                    let mut out = head[..4].to_vec();
                    out.extend_from_slice(&(answer.len() as u16 + 1).to_be_bytes());
                    out.push(head[6]);
                    out.extend_from_slice(&answer);
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, values)
}

/// `seq -> counter values` of every batch site-b logged as applied (a batch applied
/// again after a crash logs the same seq again).
fn applied(lines: &[String], into: &mut std::collections::BTreeMap<u64, Vec<u16>>) {
    for l in lines.iter().filter(|l| l.contains("batch applied")) {
        let seq: u64 = field(l, "seq").and_then(|s| s.parse().ok()).expect("seq");
        let values: Vec<u16> = l
            .split("dev.counter=")
            .skip(1)
            .filter_map(|v| v.split([' ', ';']).next()?.parse().ok())
            .collect();
        if !values.is_empty() {
            into.insert(seq, values);
        }
    }
}

/// The values of `seq` in order, a repeat of an older value left out (site-a re-sends
/// its current values when the link comes back; a PLC may be written a value again).
fn increasing(values: impl IntoIterator<Item = u16>) -> (Vec<u16>, usize) {
    let mut out: Vec<u16> = Vec::new();
    let mut repeats = 0;
    for v in values {
        if out.last().is_some_and(|l| v <= *l) {
            repeats += 1;
        } else {
            out.push(v);
        }
    }
    (out, repeats)
}

#[test]
fn a_plc_at_site_b_receives_every_value_of_site_a_in_order_across_kills() {
    let s = sites();
    let root = &s.root;
    let sim_cfg = write(
        &root.join("sim.toml"),
        "[[unit]]\nunit = 1\n\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nkind = \"counter\"\nperiod = \"20ms\"\n",
    );
    let mut sim = Proc::spawn("simulate", &["simulate", "-c", path(&sim_cfg)], "warn");
    let tty = sim.wait_out("the virtual port path", |l| l.first().cloned());
    let (peers, port) = bound();
    let (plc, written) = plc_server();
    let a_cfg = write(
        &root.join("a.toml"),
        &format!(
            r#"[gateway]
name = "site-a"
summary_interval = "1s"

[link]
identity = "a-id"
data_dir = "a-data"

[[peer]]
name = "site-b"
fingerprint = "{}"
dial = "127.0.0.1:{port}"
heartbeat = "300ms"
reconnect_max = "500ms"

[[peer.send]]
points = ["dev.*"]
mode = "change"

[[bus]]
name = "line"
port = "{tty}"
baud = 115200
parity = "none"
stop_bits = 2

[[device]]
name = "dev"
bus = "line"
unit = 1
interval = "20ms"
timeout = "200ms"

[[device.point]]
name = "counter"
table = "holding"
address = 0
"#,
            s.fp_b
        ),
    );
    let b_cfg = write(
        &root.join("b.toml"),
        &format!(
            r#"[gateway]
name = "site-b"

[link]
identity = "b-id"
data_dir = "b-data"
listen = "127.0.0.1:{port}"
allow = ["127.0.0.1"]

[[peer]]
name = "site-a"
fingerprint = "{}"
heartbeat = "300ms"

[[plc]]
name = "line-plc"
address = "{plc}"
deliver = "all"
reconnect_max = "200ms"

[[plc.map]]
points = "site-a/dev.counter"
table = "holding"
address = 0
type = "u16"
"#,
            s.fp_a
        ),
    );
    let b_log = "info,m2m_gateway::link=debug";
    let run_b = || Proc::spawn_on("site-b", &["run", "-c", path(&b_cfg)], b_log, &[], &[&peers]);
    let run_a = || Proc::spawn("site-a", &["run", "-c", path(&a_cfg)], "info");
    let count = || written.lock().expect("lock").len();
    let grows = |what: &str, by: usize| {
        let from = count();
        wait_for(what, || (count() >= from + by).then_some(()));
    };

    let mut b = run_b();
    listening(&mut b, port);
    let mut a = run_a();
    grows("20 values at the plc", 20);

    // kill -9 of site-a: its spool keeps what site-b has not acked.
    a.kill9();
    let mut a = run_a();
    grows("20 more values after site-a's restart", 20);

    // kill -9 of site-b: the link is cut while site-a spools a backlog.
    let mut log = b.stderr();
    b.kill9();
    a.wait_err("a spool backlog of 30 batches", |l| {
        l.iter()
            .rev()
            .find_map(|l| l.split("spool pending ").nth(1))
            .and_then(|s| s.split([' ', ',']).next()?.parse::<u64>().ok())
            .filter(|n| *n >= 30)
    });
    let mut b = run_b();
    listening(&mut b, port);
    grows("the backlog at the plc", 40);

    // Stop the source, then let site-b drain into the plc.
    a.terminate();
    let mut expected = std::collections::BTreeMap::new();
    applied(&log, &mut expected);
    let last = wait_for("site-b to apply the last batch", || {
        let mut m = expected.clone();
        applied(&b.stderr(), &mut m);
        let last = *m.values().next_back()?.last()?;
        (written.lock().expect("lock").last() == Some(&last)).then_some(last)
    });
    b.terminate();
    log.extend(b.stderr());
    applied(&log, &mut expected);
    let (expected, resent) = increasing(expected.into_values().flatten());
    // The steps above waited for 20 + 20 + 40 writes at the plc; a write may carry one
    // value again after a restart, so at least 60 distinct values went through.
    assert!(expected.len() >= 60, "only {} values", expected.len());
    assert!(expected.contains(&last), "the last value is {last}");

    // Every value site-b took from site-a, in order. A write the PLC confirmed just
    // before site-b was killed may be written again after its restart (at least once;
    // writes are idempotent): a repeat of an older value, set apart and checked.
    let got = written.lock().expect("lock").clone();
    for v in &got {
        assert!(expected.binary_search(v).is_ok(), "{v} reached the plc but was never sent by site-a");
    }
    let (in_order, rewritten) = increasing(got);
    assert_eq!(in_order, expected, "the plc's values differ from what site-a sent");
    eprintln!(
        "{} values at the plc in order ({}..={}), {rewritten} written again, {resent} re-sent by site-a",
        in_order.len(),
        in_order[0],
        last
    );
    drop(sim);
}
