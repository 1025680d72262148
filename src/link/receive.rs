//! What a peer's batch does here: each sample is named (`peer/point`, or `origin/point`
//! for a relayed one), dropped when it went round a relay loop or its origin is not one
//! the peer may relay (`accept_relayed`), stored into the image, taken for the local
//! sinks that map it, and offered to write-back.
//!
//! Invariants: a sample whose path names this gateway or the peer (or is too long) is
//! never stored or relayed, only counted and logged at most every [`LOG_EVERY`]; so is a
//! relayed sample (any quality, comm_fail too) whose origin the peer's `accept_relayed`
//! does not list: it never reaches the image, a sink or write-back, and the batch is
//! still acked (a refusal is a decision, not a failure); a relayed value never replaces
//! a point another route keeps good unless good and newer; a peer creates at most
//! [`MAX_PEER_POINTS`] names in the image.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::image::PointId;
use crate::link::MAX_PEER_POINTS;
use crate::link::session::Task;
use crate::model::PointGlobs;
use crate::point::value::{Quality, Sample, Via};
use crate::spool::block::MAX_HOPS;

/// Received points never go stale by age here: the sender re-sends at least every
/// `max_silence`, and the sender's own quality travels with each sample.
const REMOTE_STALE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Dropped received samples (relay loops, untrusted origins) are logged at most this
/// often per peer and reason (with the count since).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Received samples dropped for one reason, logged at most every [`LOG_EVERY`].
#[derive(Debug, Default)]
pub(super) struct DropLog {
    pub(super) logged: Option<Instant>,
    pub(super) unlogged: u64,
    /// What the next line names (the refused origins), at most [`NAMED`], distinct.
    pub(super) named: Vec<Arc<str>>,
}

/// Refused origins named in one log line, at most.
const NAMED: usize = 8;

/// What becomes of a relayed sample, by its path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relayed {
    /// Its path names this gateway or the peer, or is too long: dropped as a loop.
    Loop,
    /// Its origin is not one the peer may relay (`accept_relayed`): refused.
    Untrusted,
    /// Stored under its origin's name.
    Accepted,
}

/// Judges the path `via` of a sample relayed by `peer` to `local`, whose
/// `accept_relayed` is `accept`. A loop is a loop whatever the origin.
fn judge(via: &[Arc<str>], local: &str, peer: &str, accept: &PointGlobs) -> Relayed {
    if via.len() >= MAX_HOPS || via.iter().any(|hop| **hop == *local || **hop == *peer) {
        Relayed::Loop
    } else if via.first().is_some_and(|origin| accept.is_match(origin)) {
        Relayed::Accepted
    } else {
        Relayed::Untrusted
    }
}

/// The error line for values of `origins` that `peer` relayed but may not.
fn untrusted_line(peer: &str, origins: &[Arc<str>]) -> String {
    let names: Vec<&str> = origins.iter().map(|o| &**o).collect();
    let quoted: Vec<String> = names.iter().map(|o| format!("\"{o}\"")).collect();
    let (which, these) = match names.as_slice() {
        [one] => (one.to_string(), quoted.join("")),
        [rest @ .., last] => (format!("{} and {last}", rest.join(", ")), quoted.join(", ")),
        [] => ("an origin".to_string(), "its name".to_string()),
    };
    format!(
        "peer {peer} relayed values of {which}, which its accept_relayed does not list: refused \
         (add {these} to accept_relayed of [[peer]] {peer} to accept them)"
    )
}

impl DropLog {
    /// Records `n` dropped samples (the first one named); true when a line is due now,
    /// then `unlogged` holds how many to report.
    fn record(&mut self, n: u64, now: Instant) -> bool {
        self.unlogged += n;
        if self.logged.is_some_and(|at| now.duration_since(at) < LOG_EVERY) {
            return false;
        }
        self.logged = Some(now);
        true
    }
}

impl Task {
    /// Puts a received batch into the image (a local point of the peer under
    /// `peer/point`, a relayed one under `origin/point`) and offers it to write-back.
    /// Drops samples that went round a relay loop, and refuses relayed samples of an
    /// origin the peer's `accept_relayed` does not list. Logs it at debug level (seq,
    /// size, the first values).
    pub(super) fn apply(&mut self, seq: u64, samples: &[(String, Sample)]) {
        debug!(seq, samples = samples.len(), values = %BatchValues(samples), "batch applied");
        let peer: Arc<str> = Arc::from(self.link.peer.name.as_str());
        let local: Arc<str> = Arc::from(self.link.local_name.as_str());
        let mut refused = 0usize;
        let mut looped: Option<(&str, &Sample)> = None;
        let mut loops = 0u64;
        let (mut untrusted, mut untrusted_origins) = (0u64, Vec::<Arc<str>>::new());
        let mut superseded = 0u64;
        // The verdict on the last relayed path seen (one route, one path: see below).
        let mut judged: Option<(Via, Relayed)> = None;
        // The path of the peer's own points, and the last relayed path seen with its
        // extension: samples of one route share one path (one table entry on the wire),
        // so a batch allocates a path once, not once per sample.
        let direct: Via = Arc::from([peer.clone()]);
        let mut extended: Option<(Via, Via)> = None;
        // (full name, sample as stored) of every sample kept.
        let mut kept: Vec<(String, Sample)> = Vec::with_capacity(samples.len());
        for (point, sample) in samples {
            let (name, via) = match sample.via.as_ref().filter(|v| !v.is_empty()) {
                None => (format!("{peer}/{point}"), direct.clone()),
                Some(via) => {
                    let verdict = match &judged {
                        Some((v, verdict)) if Arc::ptr_eq(v, via) => *verdict,
                        _ => {
                            let verdict = judge(via, &local, &peer, &self.link.peer.accept_relayed);
                            judged = Some((via.clone(), verdict));
                            verdict
                        }
                    };
                    match verdict {
                        Relayed::Accepted => {}
                        Relayed::Loop => {
                            loops += 1;
                            looped = looped.or(Some((point, sample)));
                            continue;
                        }
                        Relayed::Untrusted => {
                            untrusted += 1;
                            if !untrusted_origins.contains(&via[0]) {
                                untrusted_origins.push(via[0].clone());
                            }
                            continue;
                        }
                    }
                    // A point that another route (the origin's own link, another hub)
                    // keeps good is that route's: a relayed value replaces it only when
                    // good and newer. So a hub's backlog, replayed after an outage, or its
                    // comm_fail when it loses the origin, never overwrites a live value.
                    let name = format!("{}/{point}", via[0]);
                    let elsewhere_good = |now: &Sample| {
                        now.quality == Quality::Good
                            && now.via.as_ref().and_then(|v| v.last()).is_some_and(|hop| *hop != peer)
                    };
                    if self.link.image.get(&name).is_some_and(|now| {
                        elsewhere_good(&now) && (sample.quality != Quality::Good || now.at >= sample.at)
                    }) {
                        superseded += 1;
                        continue;
                    }
                    let path = match &extended {
                        Some((from, to)) if Arc::ptr_eq(from, via) => to.clone(),
                        _ => {
                            let mut path = via.to_vec();
                            path.push(peer.clone());
                            let path: Via = path.into();
                            extended = Some((via.clone(), path.clone()));
                            path
                        }
                    };
                    (name, path)
                }
            };
            let (value, at, quality) = (sample.value.clone(), sample.at, sample.quality);
            kept.push((name, Sample { value, at, quality, via: Some(via) }));
        }
        if loops > 0 {
            self.counters_relay_loops(loops, looped);
        }
        if untrusted > 0 {
            self.count_untrusted(untrusted, untrusted_origins);
        }
        if superseded > 0 {
            debug!(superseded, "relayed values older than what another route delivered; dropped");
        }
        let image = &self.link.image;
        let updates: Vec<(PointId, Sample)> = kept
            .iter()
            .filter_map(|(name, sample)| {
                let id = match self.names.get(name) {
                    Some(id) => *id,
                    None if self.names.len() >= MAX_PEER_POINTS => {
                        refused += 1;
                        return None;
                    }
                    None => {
                        let id = image.register(name, REMOTE_STALE);
                        self.names.insert(name.clone(), id);
                        id
                    }
                };
                Some((id, sample.clone()))
            })
            .collect();
        if refused > 0 {
            // Values are lost and the peer's configuration needs a look: error level.
            error!(
                refused,
                limit = MAX_PEER_POINTS,
                "peer sends more distinct points than allowed; values dropped"
            );
        }
        image.update(updates);
        for sink in &mut self.sinks {
            if sink.mark.is_some_and(|m| seq > m) {
                sink.pending
                    .extend(kept.iter().filter(|(name, _)| sink.config.points.contains(name)).cloned());
            }
        }
        // Write-back follows the peer's own points; relayed ones are not the peer's.
        self.link
            .writeback
            .offer(samples.iter().filter(|(_, s)| s.via.is_none()).map(|(p, s)| (p.as_str(), s)));
        self.counters.applied.fetch_add(1, Relaxed);
        self.counters.samples_applied.fetch_add(kept.len() as u64, Relaxed);
    }

    /// Counts relayed samples refused for their origin; logs at most every
    /// [`LOG_EVERY`], naming the refused origins since the last line and the key to
    /// change. An error: the values are acknowledged and gone, and only the operator
    /// can let them in.
    fn count_untrusted(&mut self, n: u64, origins: Vec<Arc<str>>) {
        self.counters.relayed_refused.fetch_add(n, Relaxed);
        let named = &mut self.untrusted.named;
        for origin in origins {
            if named.len() < NAMED && !named.contains(&origin) {
                named.push(origin);
            }
        }
        if !self.untrusted.record(n, Instant::now()) {
            return;
        }
        let refused = std::mem::take(&mut self.untrusted.unlogged);
        let origins = std::mem::take(&mut self.untrusted.named);
        error!(refused, "{}", untrusted_line(&self.link.peer.name, &origins));
    }

    /// Counts received samples dropped as relay loops; logs at most every
    /// [`LOG_EVERY`], naming the first one and its path.
    fn counters_relay_loops(&mut self, n: u64, first: Option<(&str, &Sample)>) {
        self.link.relay.loop_refused.fetch_add(n, Relaxed);
        if !self.loops.record(n, Instant::now()) {
            return;
        }
        let dropped = std::mem::take(&mut self.loops.unlogged);
        let (point, path) = first.map_or((String::new(), String::new()), |(p, s)| {
            let hops = s.via.iter().flat_map(|v| v.iter()).map(|h| &**h).collect::<Vec<_>>();
            (p.to_string(), hops.join(" -> "))
        });
        warn!(
            dropped,
            point,
            path,
            "peer relayed values that already passed through this gateway or the peer (a relay loop); \
             dropped, not stored or relayed again. Check the [[peer.send]] rules that name received points \
             on the gateways along the path (logged at most every {LOG_EVERY:?})"
        );
    }
}

/// The first values of a batch for the debug log: `point=value` joined by `;`
/// (`point=-` for no value), at most [`LOGGED_VALUES`] of them then `;+N more`.
struct BatchValues<'a>(&'a [(String, Sample)]);

/// Values of one batch written in its debug log line.
const LOGGED_VALUES: usize = 16;

impl std::fmt::Display for BatchValues<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (point, s)) in self.0.iter().take(LOGGED_VALUES).enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            match &s.value {
                Some(v) => write!(f, "{point}={v}")?,
                None => write!(f, "{point}=-")?,
            }
        }
        if self.0.len() > LOGGED_VALUES {
            write!(f, ";+{} more", self.0.len() - LOGGED_VALUES)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::value::Value;

    #[test]
    fn relay_loops_are_logged_at_most_once_a_minute_with_the_count_since() {
        let t0 = Instant::now();
        let mut log = DropLog::default();
        assert!(log.record(3, t0), "the first loop is logged at once");
        assert_eq!(std::mem::take(&mut log.unlogged), 3);
        assert!(!log.record(1, t0 + Duration::from_secs(1)));
        assert!(!log.record(2, t0 + Duration::from_secs(59)));
        assert!(log.record(1, t0 + LOG_EVERY));
        assert_eq!(log.unlogged, 4, "the line reports every drop since the last one");
    }

    #[test]
    fn relayed_samples_are_judged_by_loop_first_then_by_their_origin() {
        let accept = PointGlobs::new(vec!["site-a".into(), "line-*".into()]).expect("globs");
        let judge = |hops: &[&str]| {
            let via: Vec<Arc<str>> = hops.iter().map(|h| Arc::from(*h)).collect();
            judge(&via, "site-c", "hub-b", &accept)
        };
        assert_eq!(judge(&["site-a"]), Relayed::Accepted);
        assert_eq!(judge(&["line-3", "hub-x"]), Relayed::Accepted, "the origin decides, not the hops");
        assert_eq!(judge(&["site-x"]), Relayed::Untrusted);
        assert_eq!(judge(&["site-x", "site-a"]), Relayed::Untrusted, "an accepted hop is not the origin");
        assert_eq!(judge(&["site-ab"]), Relayed::Untrusted, "a glob matches whole names");
        assert_eq!(judge(&["site-a", "site-c"]), Relayed::Loop, "a loop is a loop whatever the origin");
        assert_eq!(judge(&["site-x", "hub-b"]), Relayed::Loop);
        let none = PointGlobs::none();
        let via: Vec<Arc<str>> = vec![Arc::from("site-a")];
        assert_eq!(super::judge(&via, "site-c", "hub-b", &none), Relayed::Untrusted, "default: none");
        let long: Vec<Arc<str>> = (0..MAX_HOPS).map(|i| Arc::from(format!("g{i}"))).collect();
        assert_eq!(super::judge(&long, "site-c", "hub-b", &accept), Relayed::Loop);
    }

    #[test]
    fn the_untrusted_origin_line_names_the_key_to_change() {
        let names = |n: &[&str]| n.iter().map(|o| Arc::from(*o)).collect::<Vec<Arc<str>>>();
        assert_eq!(
            untrusted_line("hub-b", &names(&["site-x"])),
            "peer hub-b relayed values of site-x, which its accept_relayed does not list: refused \
             (add \"site-x\" to accept_relayed of [[peer]] hub-b to accept them)"
        );
        assert_eq!(
            untrusted_line("hub-b", &names(&["site-x", "site-y", "line-4"])),
            "peer hub-b relayed values of site-x, site-y and line-4, which its accept_relayed does not list: \
             refused (add \"site-x\", \"site-y\", \"line-4\" to accept_relayed of [[peer]] hub-b to accept them)"
        );
    }

    #[test]
    fn batch_values_read_well() {
        let t = std::time::UNIX_EPOCH;
        let mk = |i: usize| {
            (
                format!("p{i}"),
                Sample { value: Some(Value::Int(i as i64)), at: t, quality: Quality::Good, via: None },
            )
        };
        let batch: Vec<_> = (0..18).map(mk).collect();
        let text = BatchValues(&batch).to_string();
        assert!(text.starts_with("p0=0;p1=1;") && text.ends_with("p15=15;+2 more"), "{text}");
        let none = [("x".to_string(), Sample { value: None, at: t, quality: Quality::CommFail, via: None })];
        assert_eq!(BatchValues(&none).to_string(), "x=-");
    }
}
