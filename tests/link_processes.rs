//! Peer links between real processes: two `m2m-gateway run` children on 127.0.0.1,
//! configured from TOML files in a tempdir, keys made by `m2m-gateway keygen`, site-a
//! polling an `m2m-gateway simulate` child (a counter stepping every 20 ms) and sending
//! it on change to site-b. site-b logs each applied batch at debug level (seq, values)
//! and a link summary every second; the test reads those logs.
//!
//! Then the crash case: site-b is stopped so site-a spools a backlog, site-b comes
//! back, site-a is killed with SIGKILL as soon as the backlog starts draining, and
//! restarted. Every batch seq must be applied exactly once, in order, with no gap, and
//! the counter at site-b must never go backwards.
//!
//! Every wait has a deadline; every child is killed when the test ends, pass or fail.

use std::time::{Duration, Instant};

use crate::common;

use common::procs::{Proc, bound, field, keygen, path, write};

/// One applied batch as site-b logged it.
#[derive(Debug)]
struct Applied {
    seq: u64,
    counter: Option<u64>,
}

fn applied(lines: &[String]) -> Vec<Applied> {
    lines
        .iter()
        .filter(|l| l.contains("batch applied"))
        .map(|l| Applied {
            seq: field(l, "seq").and_then(|s| s.parse().ok()).expect("seq in a batch applied line"),
            counter: l
                .find("dev.counter=")
                .and_then(|i| l[i + "dev.counter=".len()..].split([' ', ';']).next())
                .and_then(|v| v.parse().ok()),
        })
        .collect()
}

fn count(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|l| l.contains(what)).count()
}

#[test]
fn two_processes_forward_values_and_survive_sigkill_mid_backlog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let fp_a = keygen(&root.join("a-id"));
    let fp_b = keygen(&root.join("b-id"));
    assert_ne!(fp_a, fp_b);

    // The field device: unit 1, holding 0 counting up every 20 ms.
    let sim_cfg = write(
        &root.join("sim.toml"),
        "[[unit]]\nunit = 1\n\n[[unit.register]]\ntable = \"holding\"\naddress = 0\nkind = \"counter\"\nperiod = \"20ms\"\n",
    );
    let mut sim = Proc::spawn("simulate", &["simulate", "-c", path(&sim_cfg)], "warn");
    let tty = sim.wait_out("the virtual port path", |l| l.first().cloned());

    let (peers, port) = bound();
    let b_cfg = write(
        &root.join("b.toml"),
        &format!(
            r#"[gateway]
name = "site-b"
summary_interval = "1s"

[link]
identity = "b-id"
data_dir = "b-data"
listen = "127.0.0.1:{port}"
allow = ["127.0.0.1"]

[[peer]]
name = "site-a"
fingerprint = "{fp_a}"
heartbeat = "500ms"
"#
        ),
    );
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
fingerprint = "{fp_b}"
dial = "127.0.0.1:{port}"
heartbeat = "500ms"

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
"#
        ),
    );
    let b_log = "info,m2m_gateway::link=debug";
    let run_b = || Proc::spawn_on("site-b", &["run", "-c", path(&b_cfg)], b_log, &[], &[&peers]);
    let run_a = || Proc::spawn("site-a", &["run", "-c", path(&a_cfg)], "info");

    // B first: it says where it listens.
    let mut b1 = run_b();
    let listening = b1.wait_err("the listening line", |l| {
        l.iter().find_map(|l| l.split("listening for peers on ").nth(1).map(str::to_string))
    });
    assert_eq!(listening, format!("127.0.0.1:{port}"));
    let mut a1 = run_a();

    // Values from A arrive at B, counting up.
    b1.wait_err("20 applied batches", |l| (applied(l).len() >= 20).then_some(()));
    let first = applied(&b1.stderr());
    assert!(first.iter().filter(|a| a.counter.is_some()).count() >= 10, "{first:?}");
    b1.wait_err("a link summary", |l| {
        l.iter()
            .any(|l| l.contains("connected, 1 sessions; batches sent") && l.contains("applied"))
            .then_some(())
    });

    // B goes away; A keeps polling and spools a backlog.
    b1.terminate();
    let backlog = a1.wait_err("a spool backlog of 60 batches", |l| {
        l.iter()
            .rev()
            .find_map(|l| field(l, "pending").or_else(|| l.split("spool pending ").nth(1)))
            .and_then(|s| s.split([' ', ',']).next()?.parse::<u64>().ok())
            .filter(|n| *n >= 60)
    });

    // B comes back; A is killed as soon as the backlog starts arriving.
    let mut b2 = run_b();
    b2.wait_err("the first batch of the backlog", |l| (!applied(l).is_empty()).then_some(()));
    a1.kill9();
    let at_kill = applied(&b2.stderr()).len();

    // A restarts from its spool and catches up; B sees the new session and fresh values.
    let mut a2 = run_a();
    let pending_at_restart = a2.wait_err("a2 link up", |l| {
        l.iter().find(|l| l.contains("link up")).and_then(|l| field(l, "pending")?.parse::<u64>().ok())
    });
    b2.wait_err("two sessions and 30 batches in the second", |l| {
        let second = l.iter().enumerate().filter(|(_, l)| l.contains("link up")).nth(1)?.0;
        (applied(&l[second..]).len() >= 30).then_some(())
    });
    b2.wait_err("a link summary with two sessions", |l| {
        l.iter().any(|l| l.contains("connected, 2 sessions")).then_some(())
    });
    a2.terminate();
    b2.terminate();

    let mut log = b1.stderr();
    log.extend(b2.stderr());
    let all = applied(&log);
    let seqs: Vec<u64> = all.iter().map(|a| a.seq).collect();
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "batches applied out of order, twice or with a gap: {seqs:?}");
    }
    assert!(seqs[0] <= 1, "the first batch applied is seq {}", seqs[0]);
    let counters: Vec<u64> = all.iter().filter_map(|a| a.counter).collect();
    for w in counters.windows(2) {
        assert!(w[1] >= w[0], "the counter went backwards at site-b: {counters:?}");
    }
    let dups = count(&log, "duplicate batch dropped");
    let summaries = count(&log, "duplicates dropped");
    assert!(summaries >= 2, "no link summaries:\n{}", log.join("\n"));
    eprintln!(
        "{} batches applied once each (seq {}..={}), counter {}..={}; backlog {backlog} batches, \
         A killed after {at_kill} of them reached B, {pending_at_restart} still pending at restart, \
         {dups} duplicates dropped",
        seqs.len(),
        seqs[0],
        seqs[seqs.len() - 1],
        counters.first().copied().unwrap_or_default(),
        counters.last().copied().unwrap_or_default(),
    );
    drop(sim);
}

/// Issue 10 D4: a flood of connections that fail their TLS handshake (here 3,000, each
/// sending a few bytes of garbage and closing) must not flood the log: a few lines per
/// source, then one summary line counting the rest.
#[test]
fn a_flood_of_failed_handshakes_logs_a_few_lines_and_a_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    keygen(&root.join("b-id"));
    let fp_a = keygen(&root.join("a-id"));
    let (peers, port) = bound();
    let cfg = write(
        &root.join("b.toml"),
        &format!(
            "[gateway]\nname = \"site-b\"\n\n[link]\nidentity = \"b-id\"\ndata_dir = \"b-data\"\n\
             listen = \"127.0.0.1:{port}\"\n\n[[peer]]\nname = \"site-a\"\nfingerprint = \"{fp_a}\"\n"
        ),
    );
    let mut b = Proc::spawn_on("site-b", &["run", "-c", path(&cfg)], "info", &[], &[&peers]);
    b.wait_err("the listener up", |l| l.iter().find(|l| l.contains("listening")).cloned());
    let before = b.stderr().len();
    const FLOOD: usize = 3_000;
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                use std::io::Write;
                for _ in 0..FLOOD / 4 {
                    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
                    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("flood thread");
    }
    let flood_took = started.elapsed();
    // The summary comes when the 10 s window of the first failures ends.
    let end = Instant::now() + Duration::from_secs(25);
    let summary = loop {
        let lines = b.stderr();
        if let Some(l) =
            lines.iter().find(|l| l.contains("more failed tls handshakes from 127.0.0.1 in the last 10 s"))
        {
            break l.clone();
        }
        assert!(Instant::now() < end, "no summary line within 25 s:\n{}", lines[before..].join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines = b.stderr();
    let new = &lines[before..];
    let failed = count(new, "tls handshake failed");
    let bytes: usize = new.iter().map(|l| l.len() + 1).sum();
    eprintln!(
        "{FLOOD} garbage connections in {flood_took:?}: {} log lines ({bytes} bytes), {failed} handshake failures logged one by one; {summary}",
        new.len()
    );
    assert!(failed >= 1, "the first failures are logged:\n{}", new.join("\n"));
    // At most 5 lines per kind per 10 s window and one summary each: the bound grows with
    // the time the flood took on this machine, not with the number of connections.
    let windows = flood_took.as_secs() / 10 + 3;
    let bound = usize::try_from(windows * 6).expect("small") + 5;
    assert!(
        new.len() <= bound,
        "{} log lines for {FLOOD} connections (bound {bound}):\n{}",
        new.len(),
        new.join("\n")
    );
    // Every connection is accounted for: its handshake failed (logged or counted), or its
    // slot was reclaimed for a newer one before it was read (logged or counted). A
    // connection reclaimed in the instant after its handshake failed counts twice. Each
    // kind's summary comes when its own 10 s window ends: wait for them all.
    let tally = |new: &[String]| -> (u64, u64) {
        let counted: u64 = new
            .iter()
            .filter_map(|l| {
                let at = l.find("… and ")? + "… and ".len();
                l[at..].split(' ').next()?.replace(',', "").parse::<u64>().ok()
            })
            .sum();
        (counted, (count(new, "tls handshake failed") + count(new, "to make room")) as u64)
    };
    let (counted, logged, new) = loop {
        let lines = b.stderr();
        let new = lines[before..].to_vec();
        let (counted, logged) = tally(&new);
        if counted + logged >= FLOOD as u64 || Instant::now() >= end {
            break (counted, logged, new);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        (FLOOD as u64..=FLOOD as u64 + 16).contains(&(counted + logged)),
        "{counted} counted + {logged} logged for {FLOOD} connections:\n{}",
        new.join("\n")
    );
    b.terminate();
}
