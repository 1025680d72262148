//! Figure 6, peer link: runs `examples/link_bench.rs` as a child process (its own
//! runtime, two gateways over TLS on 127.0.0.1 with the on-disk spool) and reports its
//! sustained throughput and its end-to-end latency at 10k values/s.

use super::*;

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
    let mut f = Figure::new(
        "Peer link",
        &format!(
            "`examples/link_bench.rs`, run as a child process: two gateways in one process on \
             127.0.0.1 over the real link (TLS 1.3 with pinned keys, the on-disk spool with \
             SQLite WAL + synchronous=FULL on the sending side). *Throughput*: 1000 points \
             updated in rounds as fast as the link takes them, for {secs} s; values applied at \
             the peer per second. *Latency*: 100 points updated every 10 ms (10k values/s) for \
             10 s, from the image update on one side to the image update on the other."
        ),
        vec!["what", "measured", "target"],
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("bench:   cargo run --release --example link_bench -- --secs {secs}");
    let out = Command::new(cargo)
        .args(["run", "--quiet", "--release", "--example", "link_bench", "--", "--secs"])
        .arg(secs.to_string())
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
    for l in [through, latency].into_iter().flatten() {
        f.notes.push(format!("link_bench: `{}`", l.trim()));
    }
    Ok(f)
}
