//! `/metrics`: every counter of the running gateway in the Prometheus text format
//! (version 0.0.4), read at scrape time from the same atomics the periodic summaries read.
//!
//! Naming follows Prometheus' rules: everything starts `m2m_gateway_`, counters end in
//! `_total`, units are in the name and are base units (`_seconds`, `_bytes`, `_ratio`),
//! each family has one `# HELP` and one `# TYPE` line before its samples, and label
//! values are escaped (`\\`, `\"`, `\n`). Families with nothing to report (no peers, no
//! PLC) are left out whole; a value that does not exist yet (a device that never
//! answered has no "last answer age") is left out rather than faked.
//!
//! Why no client registry crate: the values already live in the gateway's own atomics;
//! a registry would hold a second copy of every counter to be kept in step. The text is
//! written here by one small writer and checked by `promtool check metrics` in the tests.
//! The per-bus, per-peer, per-PLC and per-tunnel families are tables of rows ([`Row`]:
//! name, type, help, getter), one sample per object.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::{App, age};
use crate::point::value::Quality;

/// The content type of the Prometheus text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`.
pub(super) async fn handler(State(app): State<Arc<App>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&app))
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

/// The text being written.
struct Out(String);

impl Out {
    /// One family: its header, then a sample per item that `sample` gives a value for.
    fn family<T>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        items: impl IntoIterator<Item = T>,
        sample: impl Fn(&T) -> Option<(Vec<(&'static str, String)>, f64)>,
    ) {
        let samples: Vec<_> = items.into_iter().filter_map(|t| sample(&t)).collect();
        if samples.is_empty() {
            return;
        }
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            self.0.push_str(name);
            if !labels.is_empty() {
                self.0.push('{');
                for (i, (k, v)) in labels.iter().enumerate() {
                    if i > 0 {
                        self.0.push(',');
                    }
                    let _ = write!(self.0, "{k}=\"{}\"", escape(v));
                }
                self.0.push('}');
            }
            let _ = writeln!(self.0, " {}", number(value));
        }
    }
}

/// A label value with `\`, `"` and line feeds escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A sample value: integers without a fraction, never NaN or infinite.
fn number(v: f64) -> String {
    if !v.is_finite() {
        "0".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn l(k: &'static str, v: &str) -> (&'static str, String) {
    (k, v.to_string())
}

/// A counter or gauge read from an integer.
fn n(v: u64) -> Option<f64> {
    Some(v as f64)
}

/// A sample's labels.
type Labels = Vec<(&'static str, String)>;

/// One family of a per-object table: name, type, help, and the value it reads from one
/// object's stats (`None`: no sample for that object).
type Row<S> = (&'static str, Kind, &'static str, fn(&S) -> Option<f64>);

/// One family per row, each with a sample per object, labelled with the object's labels.
fn per<S>(out: &mut Out, objects: &[(Labels, S)], rows: &[Row<S>]) {
    for (name, kind, help, get) in rows {
        out.family(name, *kind, help, objects, |(labels, s)| Some((labels.clone(), get(s)?)));
    }
}

/// The whole exposition.
pub(super) fn render(app: &App) -> String {
    let mut out = Out(String::with_capacity(16 * 1024));
    let seen = &app.seen;
    use Kind::{Counter, Gauge};

    out.family("m2m_gateway_info", Gauge, "This gateway: its name and version (always 1).", [()], |_| {
        Some((vec![l("gateway", &seen.name), l("version", env!("CARGO_PKG_VERSION"))], 1.0))
    });
    out.family(
        "m2m_gateway_start_time_seconds",
        Gauge,
        "When the gateway started, in seconds since the Unix epoch.",
        [()],
        |_| {
            Some((
                vec![],
                seen.started.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
            ))
        },
    );

    // Buses.
    let buses: Vec<_> = seen.buses.iter().map(|b| (vec![l("bus", b.name())], b.stats())).collect();
    #[rustfmt::skip]
    per(&mut out, &buses, &[
        ("m2m_gateway_bus_transactions_total", Counter,
            "Transactions completed with a reply (data or exception).", |s| n(s.transactions.load(Relaxed))),
        ("m2m_gateway_bus_timeouts_total", Counter,
            "Attempts that got no valid reply in time.", |s| n(s.timeouts.load(Relaxed))),
        ("m2m_gateway_bus_crc_errors_total", Counter,
            "Frames dropped for a bad CRC or LRC.", |s| n(s.crc_errors.load(Relaxed))),
        ("m2m_gateway_bus_late_replies_total", Counter,
            "Replies that came after their request's timeout; never taken as another request's answer.",
            |s| n(s.late_replies.load(Relaxed))),
        ("m2m_gateway_bus_framing_errors_total", Counter,
            "Valid frames that did not answer the request (another unit or function, wrong length); dropped.",
            |s| n(s.foreign_frames.load(Relaxed))),
        ("m2m_gateway_bus_exceptions_total", Counter,
            "Exception replies from devices on the bus.", |s| n(s.exceptions.load(Relaxed))),
        ("m2m_gateway_bus_noise_bytes_total", Counter,
            "Bytes discarded as noise or stale input.", |s| n(s.noise_bytes.load(Relaxed))),
        ("m2m_gateway_bus_port_opens_total", Counter,
            "Times the port was opened; more than one means it was reopened.", |s| n(s.opens.load(Relaxed))),
        ("m2m_gateway_bus_queue_full_total", Counter,
            "Transactions refused because the bus queue was full.", |s| n(s.queue_full.load(Relaxed))),
        ("m2m_gateway_bus_shared_reads_total", Counter,
            "Masters' pass-through reads answered by another master's identical read.",
            |s| n(s.shared_answers.load(Relaxed))),
        ("m2m_gateway_bus_busy_seconds_total", Counter,
            "Time the line was busy with transactions.", |s| Some(s.busy_ns.load(Relaxed) as f64 / 1e9)),
    ]);
    let bus_handles: Vec<_> = seen.buses.iter().enumerate().collect();
    out.family(
        "m2m_gateway_bus_line_busy_ratio",
        Gauge,
        "Share of the last few seconds the line was busy (0..1).",
        bus_handles.iter(),
        |(i, b)| Some((vec![l("bus", b.name())], app.load.get(*i))),
    );
    out.family(
        "m2m_gateway_bus_queue_depth",
        Gauge,
        "Transactions waiting for the bus task.",
        bus_handles.iter(),
        |(_, b)| Some((vec![l("bus", b.name())], b.queued() as f64)),
    );

    // Devices.
    let devs: Vec<_> =
        seen.devices.iter().map(|d| (vec![l("bus", &d.bus), l("device", &d.name)], d)).collect();
    #[rustfmt::skip]
    per(&mut out, &devs, &[
        ("m2m_gateway_device_up", Gauge,
            "1 while the device answers; 0 while it does not and is only probed, with back-off.",
            |d| n(u64::from(d.online.load(Relaxed)))),
        ("m2m_gateway_device_last_answer_age_seconds", Gauge,
            "Time since the device last answered a read (absent until it first does).",
            |d| Some(age(d.last_answer()?))),
        ("m2m_gateway_device_reads_answered_total", Counter,
            "Reads the device answered (data or exception).", |d| n(d.answered.load(Relaxed))),
        ("m2m_gateway_device_reads_failed_total", Counter,
            "Reads that got no answer in time, or found the port down.", |d| n(d.failed.load(Relaxed))),
    ]);
    let counts = quality_counts(app);
    out.family(
        "m2m_gateway_device_points",
        Gauge,
        "Points of the device by the quality of their current value.",
        counts.iter(),
        |((bus, device, quality), n)| {
            Some((vec![l("bus", bus), l("device", device), l("quality", quality)], *n as f64))
        },
    );

    // Peers.
    let peers: Vec<_> = seen.links.iter().map(|(name, h)| (vec![l("peer", name)], h.stats())).collect();
    #[rustfmt::skip]
    per(&mut out, &peers, &[
        ("m2m_gateway_peer_connected", Gauge,
            "1 while a session with the peer is up.", |s| n(u64::from(s.connected))),
        ("m2m_gateway_peer_sessions_total", Counter,
            "Sessions established with the peer.", |s| n(s.sessions)),
        ("m2m_gateway_peer_connect_failures_total", Counter,
            "Attempts that never got to a session (connect, TLS or hello failed).", |s| n(s.failed_attempts)),
        ("m2m_gateway_peer_batches_sent_total", Counter,
            "Batches sent (resends count again).", |s| n(s.batches_sent)),
        ("m2m_gateway_peer_batches_acked_total", Counter,
            "Our batches the peer acknowledged.", |s| n(s.batches_acked)),
        ("m2m_gateway_peer_batches_applied_total", Counter,
            "The peer's batches applied into the image.", |s| n(s.batches_applied)),
        ("m2m_gateway_peer_values_applied_total", Counter,
            "Values in the peer's applied batches.", |s| n(s.samples_applied)),
        ("m2m_gateway_peer_duplicates_dropped_total", Counter,
            "The peer's batches dropped as already applied.", |s| n(s.duplicates_dropped)),
        ("m2m_gateway_peer_relayed_values_total", Counter,
            "Values received from other peers and relayed to this peer (hub).", |s| n(s.samples_relayed)),
        ("m2m_gateway_peer_loop_refused_values_total", Counter,
            "Values refused as a relay loop: not relayed to this peer because it is on their path, or received from it with this gateway on their path (dropped).",
            |s| n(s.loop_refused)),
        ("m2m_gateway_peer_relayed_refused_values_total", Counter,
            "Values this peer relayed of an origin its accept_relayed does not list: refused, never stored, served or relayed on.",
            |s| n(s.relayed_refused)),
        ("m2m_gateway_peer_writes_refused_total", Counter,
            "The peer's writes refused by the grants.", |s| n(s.writes_refused)),
        ("m2m_gateway_peer_spool_pending_batches", Gauge,
            "Batches waiting in the spool for the peer's ack.", |s| n(s.spool_pending)),
        ("m2m_gateway_peer_spool_pending_values", Gauge,
            "Values in the batches waiting in the spool.", |s| n(s.spool_pending_values)),
        ("m2m_gateway_peer_spool_pending_bytes", Gauge,
            "Bytes of the batches waiting in the spool.", |s| n(s.spool_pending_bytes)),
        ("m2m_gateway_peer_spool_oldest_pending_age_seconds", Gauge,
            "Age of the oldest batch waiting in the spool (absent when none waits).", |s| Some(age(s.spool_oldest?))),
        ("m2m_gateway_peer_last_ack_age_seconds", Gauge,
            "Time since the peer last acknowledged a batch (absent until it first does).", |s| Some(age(s.last_ack?))),
        ("m2m_gateway_peer_spool_dropped_values_total", Counter,
            "Values the spool dropped to its limits since the spool file was created (data lost).",
            |s| n(s.spool_dropped_samples)),
    ]);

    // PLC sinks.
    let plcs: Vec<_> = seen.plcs.iter().map(|p| (vec![l("plc", &p.name)], p.counts())).collect();
    #[rustfmt::skip]
    per(&mut out, &plcs, &[
        ("m2m_gateway_plc_connected", Gauge, "1 while connected to the PLC.", |c| n(u64::from(c.connected))),
        ("m2m_gateway_plc_connects_total", Counter, "Connections made to the PLC.", |c| n(c.connects)),
        ("m2m_gateway_plc_write_requests_total", Counter, "Write requests the PLC confirmed.", |c| n(c.requests)),
        ("m2m_gateway_plc_values_written_total", Counter, "Values written to the PLC.", |c| n(c.values)),
        ("m2m_gateway_plc_values_dropped_total", Counter,
            "Values dropped: refused by the PLC or not encodable.", |c| n(c.dropped)),
        ("m2m_gateway_plc_watchdog_writes_total", Counter,
            "Watchdog writes the PLC confirmed.", |c| n(c.watchdog)),
        ("m2m_gateway_plc_spool_pending_batches", Gauge,
            "Batches waiting in the PLC's spool.", |c| n(c.spool_pending)),
        ("m2m_gateway_plc_spool_dropped_values_total", Counter,
            "Values the PLC's spool dropped to its limits since it was created (data lost).",
            |c| n(c.spool_dropped)),
    ]);

    // Tunnels.
    let tunnels: Vec<_> = seen.tunnels.iter().map(|t| (vec![l("tunnel", t.name())], t.stats())).collect();
    #[rustfmt::skip]
    per(&mut out, &tunnels, &[
        ("m2m_gateway_tunnel_port_open", Gauge,
            "1 while the tunnel's serial port is open.", |s| n(u64::from(s.port_open))),
        ("m2m_gateway_tunnel_port_opens_total", Counter, "Times the serial port was opened.", |s| n(s.opens)),
        ("m2m_gateway_tunnel_sent_bytes_total", Counter,
            "Bytes read from the port and sent to the peer.", |s| n(s.bytes_out)),
        ("m2m_gateway_tunnel_sent_packets_total", Counter, "Packets sent to the peer.", |s| n(s.packets_out)),
        ("m2m_gateway_tunnel_received_bytes_total", Counter,
            "Bytes from the peer written to the port.", |s| n(s.bytes_in)),
        ("m2m_gateway_tunnel_received_packets_total", Counter,
            "Packets from the peer written to the port.", |s| n(s.packets_in)),
    ]);
    out.family(
        "m2m_gateway_tunnel_dropped_bytes_total",
        Counter,
        "Bytes that never reached the other side, by direction.",
        tunnels.iter().flat_map(|(t, s)| [(t, "to_peer", s.dropped_out), (t, "from_peer", s.dropped_in)]),
        |(t, dir, v)| Some(([t.as_slice(), &[l("direction", dir)]].concat(), *v as f64)),
    );
    #[rustfmt::skip]
    per(&mut out, &tunnels, &[
        ("m2m_gateway_tunnel_buffered_bytes", Gauge,
            "Bytes waiting in the buffer for the link.", |s| n(s.buffered)),
    ]);

    // The Modbus-TCP server.
    if let Some((_, s)) = &seen.server {
        out.family("m2m_gateway_server_connections", Gauge, "Masters connected now.", [()], |_| {
            Some((vec![], s.connected.load(Relaxed) as f64))
        });
        out.family(
            "m2m_gateway_server_connections_accepted_total",
            Counter,
            "Master connections accepted.",
            [()],
            |_| Some((vec![], s.accepted.load(Relaxed) as f64)),
        );
        out.family(
            "m2m_gateway_server_connections_refused_total",
            Counter,
            "Master connections refused: max_connections were connected.",
            [()],
            |_| Some((vec![], s.refused.load(Relaxed) as f64)),
        );
        out.family(
            "m2m_gateway_server_requests_total",
            Counter,
            "Requests from masters by function code.",
            s.requests.iter().enumerate(),
            |(f, n)| {
                let n = n.load(Relaxed);
                (n > 0).then(|| (vec![l("function", &f.to_string())], n as f64))
            },
        );
        out.family(
            "m2m_gateway_server_exceptions_total",
            Counter,
            "Exception answers sent to masters by exception code.",
            s.exceptions.iter().enumerate(),
            |(c, n)| {
                let n = n.load(Relaxed);
                (n > 0).then(|| (vec![l("code", &c.to_string())], n as f64))
            },
        );
    }
    out.0
}

/// Points per (bus, device, quality), from the image. Peer points (`site/...`) are left
/// out: their devices are the peer's.
fn quality_counts(app: &App) -> Vec<((String, String, &'static str), u64)> {
    let mut counts: std::collections::BTreeMap<(String, String, &'static str), u64> = Default::default();
    for d in &app.seen.devices {
        for q in ["good", "stale", "comm_fail", "exception", "none"] {
            counts.insert((d.bus.clone(), d.name.clone(), q), 0);
        }
    }
    let snapshot = app.seen.image.snapshot();
    let with_sample: std::collections::HashSet<&str> = snapshot.iter().map(|(n, _)| &**n).collect();
    for (name, sample) in &snapshot {
        let Some(info) = app.seen.points.get(&**name) else {
            continue;
        };
        *counts.entry((info.bus.clone(), info.device.clone(), quality_name(sample.quality))).or_default() +=
            1;
    }
    for (name, info) in &app.seen.points {
        if !with_sample.contains(name.as_str()) {
            *counts.entry((info.bus.clone(), info.device.clone(), "none")).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}

/// A quality's name in metrics and the API.
pub(super) fn quality_name(q: Quality) -> &'static str {
    match q {
        Quality::Good => "good",
        Quality::Stale => "stale",
        Quality::CommFail => "comm_fail",
        Quality::Exception(_) => "exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_in_the_text_format() {
        let mut out = Out(String::new());
        out.family("m_x_total", Kind::Counter, "Help.", [("a\"b\\c\nd", 3.0), ("e", 0.25)], |(v, n)| {
            Some((vec![l("bus", v)], *n))
        });
        out.family("m_empty", Kind::Gauge, "Nothing.", Vec::<u8>::new(), |_| None);
        assert_eq!(
            out.0,
            "# HELP m_x_total Help.\n# TYPE m_x_total counter\nm_x_total{bus=\"a\\\"b\\\\c\\nd\"} 3\nm_x_total{bus=\"e\"} 0.25\n"
        );
        let mut out = Out(String::new());
        let rows: &[Row<Option<u64>>] =
            &[("m_a", Kind::Gauge, "A.", |v| n((*v)?)), ("m_none", Kind::Gauge, "Never.", |_| None)];
        per(&mut out, &[(vec![l("peer", "x")], Some(2)), (vec![l("peer", "y")], None)], rows);
        assert_eq!(
            out.0, "# HELP m_a A.\n# TYPE m_a gauge\nm_a{peer=\"x\"} 2\n",
            "absent values, absent families"
        );
        assert_eq!(number(f64::NAN), "0");
        assert_eq!(number(1e20), "100000000000000000000");
    }
}
