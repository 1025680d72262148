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

use crate::common;

use common::procs::{Proc, field, free_port, keygen, path, write};

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

    let port = free_port();
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
    let run_b = || Proc::spawn("site-b", &["run", "-c", path(&b_cfg)], b_log);
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
