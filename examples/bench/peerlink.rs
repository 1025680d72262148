//! Figure 6, peer link: runs `examples/link_bench.rs` as a child process (its own
//! runtime, two gateways over TLS on 127.0.0.1 with the on-disk spool) and reports its
//! sustained throughput, its end-to-end latency at 10k values/s, the bytes on the wire
//! per value in both runs, and the catch-up after outages.

use super::*;
use m2m_gateway::model::RECONNECT_MIN as BACKOFF_MIN;

/// Peer-link targets.
const LINK_RATE_TARGET: f64 = 500_000.0;
/// The latency run updates its points every 10 ms (link_bench's TICK): its poll interval.
const LINK_INTERVAL: Duration = Duration::from_millis(10);

/// The number before `unit` in `line` (e.g. "... = 123456 values/s").
fn number_before(line: &str, unit: &str) -> Option<f64> {
    let head = &line[..line.find(unit)?];
    head.split_whitespace().last()?.parse().ok()
}

pub(crate) fn peer_link(s: &Settings) -> Result<Figure, BoxError> {
    let secs = if s.quick { 5 } else { 30 };
    // Each outage waits out the link's back-off (up to 30 s) after the network returns.
    let (outage, outages) = if s.quick { (5, 1) } else { (30, 3) };
    let mut f = Figure::new(
        "Peer link",
        &format!(
            "`examples/link_bench.rs`, run as a child process: two gateways in one process on \
             127.0.0.1 over the real link (TLS 1.3 with pinned keys, the on-disk spool with \
             SQLite WAL + synchronous=FULL on the sending side). *Throughput*: 1000 points \
             updated in rounds as fast as the link takes them, for {secs} s; values applied at \
             the peer per second. *Latency*: 100 points updated every 10 ms (10k values/s) for \
             10 s, from the image update on one side to the image update on the other. \
             *Bytes per value*: the link socket's TCP payload both ways (TLS records: \
             handshake, batches, acks, heartbeats; the kernel's counters, read with `ss`) over \
             the values delivered, in those two runs; a bare value is its name, an f64, a \
             timestamp and a quality byte. *Catch-up*: the link runs through a TCP forwarder \
             that is cut for {outage} s while 100 points are updated every 10 ms, then restored \
             ({outages} outage(s), medians); the backlog is what was fed and not yet delivered \
             when the new session came up, and every point's value counts its updates, so the \
             receiving side checks that each value arrived once and in order."
        ),
        vec!["what", "measured", "target"],
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "bench:   cargo run --release --example link_bench -- --secs {secs} --outage {outage} --outages {outages}"
    );
    let out = Command::new(cargo)
        .args(["run", "--quiet", "--release", "--example", "link_bench", "--"])
        .args([
            "--secs",
            &secs.to_string(),
            "--outage",
            &outage.to_string(),
            "--outages",
            &outages.to_string(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run link_bench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let through = text.lines().find(|l| l.starts_with("throughput:"));
    let latency = text.lines().find(|l| l.starts_with("latency at"));
    let rate = through.and_then(|l| number_before(l, "values/s sustained"));
    let p50 = latency.and_then(|l| number_before(l, "ms, p99"));
    let p99 = latency.and_then(|l| number_before(l, "ms, max"));
    let target_p99 = LINK_INTERVAL + Duration::from_millis(5);
    match rate {
        Some(r) => {
            f.rows.push(vec![
                format!("values/s sustained for {secs} s, spool on"),
                format!("{r:.0}"),
                format!(">= {LINK_RATE_TARGET:.0} (aim 1000000)"),
            ]);
            f.verdicts.push((
                format!("peer link: values/s sustained {secs} s, spool on"),
                format!("{r:.0}"),
                format!(">= {LINK_RATE_TARGET:.0}"),
                r >= LINK_RATE_TARGET,
            ));
        }
        None => f.rows.push(vec![
            "values/s sustained".into(),
            format!("TODO: not measured (link_bench: {})", out.status),
            format!(">= {LINK_RATE_TARGET:.0}"),
        ]),
    }
    match (p50, p99) {
        (Some(p50), Some(p99)) => {
            let t = format!("p99 <= {} (10 ms interval + 5 ms)", ms(target_p99));
            f.rows.push(vec![
                "latency at 10k values/s, p50 / p99".into(),
                format!("{p50:.2} ms / {p99:.2} ms"),
                t.clone(),
            ]);
            f.verdicts.push((
                "peer link: latency at 10k values/s, p50 / p99".into(),
                format!("{p50:.2} ms / {p99:.2} ms"),
                t,
                p99 <= target_p99.as_secs_f64() * 1e3,
            ));
        }
        _ => f.rows.push(vec![
            "latency at 10k values/s".into(),
            format!("TODO: not measured (link_bench: {})", out.status),
            format!("p99 <= {}", ms(target_p99)),
        ]),
    }
    let line = |start: &str| text.lines().find(|l| l.starts_with(start));
    // (bytes/value, bytes of a bare value) of a `wire ...` line.
    let per_value = |l: Option<&str>| {
        l.and_then(|l| Some((number_before(l, "bytes/value")?, number_before(l, "bytes (name")?)))
    };
    let wire = [("sustained run", line("wire at full rate")), ("at 10k values/s", line("wire at 10k"))];
    for (run, l) in wire {
        f.rows.push(match per_value(l) {
            Some((b, bare)) => vec![
                format!("bytes on the wire per value, {run}"),
                format!("{b:.1} (a bare value: {bare:.1})"),
                "reported".into(),
            ],
            None => vec![
                format!("bytes on the wire per value, {run}"),
                format!("TODO: not measured (link_bench: {}; needs `ss`)", out.status),
                "reported".into(),
            ],
        });
    }
    if let (Some((full, bare_full)), Some((live, bare_live))) = (per_value(wire[0].1), per_value(wire[1].1)) {
        f.verdicts.push((
            "peer link: bytes on the wire per value, sustained / 10k values/s".into(),
            format!("{full:.1} / {live:.1}"),
            "reported".into(),
            true,
        ));
        f.notes.push(format!(
            "Bytes per value: a sample on the wire is a bare value plus 3 bytes (the name's length \
             and the value's type tag, docs/PROTOCOL.md); frame headers, TLS records, acks and \
             heartbeats add {:.2} bytes/value in the sustained run (batches of up to 2000 values) \
             and {:.2} at 10k values/s (smaller batches, each acked).",
            full - bare_full - 3.0,
            live - bare_live - 3.0
        ));
    }
    let catch_up = line("catch-up");
    let at = |unit: &str| catch_up.and_then(|l| number_before(l, unit)).filter(|v| v.is_finite());
    let complete = at(&format!("of {outages} outages")).unwrap_or(0.0);
    let what = format!("catch-up after a {outage} s outage at 10k values/s");
    match (at("values, reconnected"), at("s after the network"), at("s ="), at("values/s; complete")) {
        (Some(backlog), Some(reconnect), Some(drain), Some(rate)) => {
            f.rows.push(vec![format!("{what}: backlog"), format!("{backlog:.0} values"), "reported".into()]);
            f.rows.push(vec![
                "reconnected after the network's return (the link's back-off)".into(),
                format!("{reconnect:.2} s"),
                "reported".into(),
            ]);
            f.rows.push(vec![
                "backlog delivered in (from the new session)".into(),
                format!("{drain:.3} s = {rate:.0} values/s"),
                "reported".into(),
            ]);
            f.notes.push(format!(
                "Catch-up: while the network is down the link's reconnect back-off doubles from \
                 {BACKOFF_MIN:?} up to the peer's `reconnect_max` (default 5s, with jitter), so the \
                 new session comes up to 5 s after the network returns; the backlog then goes at the link's full \
                 rate. Times are polled every millisecond; the forwarder adds one TCP hop to this \
                 run only."
            ));
            f.verdicts.push((
                format!("peer link: {what}"),
                format!("{backlog:.0} values delivered in {drain:.3} s ({rate:.0} values/s)"),
                "reported".into(),
                true,
            ));
        }
        _ => f.rows.push(vec![
            what.clone(),
            format!("**failed**: no outage completed (link_bench: {}; see the notes)", out.status),
            "reported".into(),
        ]),
    }
    let got = format!("{complete:.0} of {outages} outages");
    f.rows.push(vec![
        "every value once and in order after the outage".into(),
        got.clone(),
        "every outage".into(),
    ]);
    f.verdicts.push((
        "peer link: every value once and in order after an outage".into(),
        got,
        "every outage".into(),
        complete == outages as f64,
    ));
    let outage_runs = text.lines().filter(|l| l.starts_with("outage "));
    for l in [through, wire[0].1, latency, wire[1].1].into_iter().flatten().chain(outage_runs).chain(catch_up)
    {
        f.notes.push(format!("link_bench: `{}`", l.trim()));
    }
    Ok(f)
}
