//! Picks what goes to one peer and when: follows the image's change stream, applies the
//! peer's send rules (first matching rule wins), deadbands, integrity refresh and
//! periodic sends, batches what is ready and appends it to the peer's spool. The link
//! reads the spool; it never sees the image.
//!
//! Invariants: a sample reaches the link only through a committed spool append
//! ("append, then send"), so nothing the link sends can be lost by a crash of ours; a
//! quality change is always sent; a forwarder never blocks the poller or another peer
//! (it only reads the image, and a forwarder that falls behind the change stream
//! resynchronises from [`Image::snapshot`] with a warning instead of holding anything
//! up); memory is bounded by the points and one open batch — the spool is the buffer.
//!
//! On reconnect every current value of the change rules is re-sent (after the spooled
//! backlog), because the receiving side marks our points comm_fail while the link is
//! down; the fresh values make them good again without waiting for `max_silence`.
//!
//! Relaying (hubs): a peer's rules may name received points (`site-a/*`, any glob with a
//! `/`); those globs match only received points, and bare globs only local ones, so a
//! received value is relayed only when a rule names it. A relayed sample keeps its
//! origin name (it goes out as the origin's own point name, its path in
//! [`Sample::via`]), its sample time and quality. It is never sent to a gateway on its
//! path (that would send it back towards its origin): such a sample is counted as
//! loop-refused and warned about once per point.
//!
//! Deadbands: a number is sent when it moved by more than every configured band — the
//! absolute `deadband` and `deadband_percent` of the last sent value (0 disables a band;
//! both 0 means "any change"). Booleans and text are sent whenever they differ.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, instrument, warn};

use crate::image::{Changes, Image};
use crate::model::{PointGlobs, SendMode, SendRule};
use crate::point::registers::value_as_f64;
use crate::point::value::{Quality, Sample, Value};
use crate::spool::SpoolHandle;

/// How long the first sample of a batch may wait for more to join it.
pub const COALESCE: Duration = Duration::from_millis(5);
/// Most samples in one batch.
pub const MAX_SAMPLES: usize = 2000;
/// Most (estimated) bytes in one batch, well under the 1 MiB frame limit.
pub const MAX_BYTES: usize = 256 << 10;

/// A peer's compiled send rules.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Per rule: the globs of local points, the globs of received points (with a `/`),
    /// and the mode.
    rules: Vec<(PointGlobs, PointGlobs, SendMode)>,
    /// Received points may match (a peer's rules); off for sinks fed another way.
    relay: bool,
}

/// Counters of one peer's relaying, shared by its forwarder and its link.
#[derive(Debug, Default)]
pub struct RelayCounters {
    /// Received samples relayed to the peer.
    pub relayed: AtomicU64,
    /// Samples refused as a loop: not relayed to the peer because it is on their path,
    /// or received from it with this gateway on their path (dropped).
    pub loop_refused: AtomicU64,
}

impl Rules {
    /// The rules of a peer (their globs were compiled with the configuration), each
    /// split into its local-point globs and its received-point globs (with a `/`).
    pub fn new(rules: &[SendRule]) -> Self {
        let part = |r: &SendRule, received: bool| {
            let globs: Vec<String> =
                r.points.written().iter().filter(|g| g.contains('/') == received).cloned().collect();
            // Every glob compiled with the configuration, so any subset compiles too.
            PointGlobs::new(globs).unwrap_or_else(|_| PointGlobs::none())
        };
        Self { rules: rules.iter().map(|r| (part(r, false), part(r, true), r.mode)).collect(), relay: false }
    }

    /// Lets globs that name received points (`site-a/*`) relay them: a peer's rules.
    pub fn relaying(mut self) -> Self {
        self.relay = true;
        self
    }

    /// Index of the first rule matching `point`. A local point matches the globs
    /// without `/`; a point received from a peer (`peer/point`) only the globs with a
    /// `/`, and only when relaying: a bare `*` never relays, so two peers sending `*` to
    /// each other cannot loop.
    pub fn rule_for(&self, point: &str) -> Option<usize> {
        if point.contains('/') {
            if !self.relay {
                return None;
            }
            return self.rules.iter().position(|(_, received, _)| received.is_match(point));
        }
        self.rules.iter().position(|(local, _, _)| local.is_match(point))
    }

    /// The mode of rule `i`.
    pub fn mode(&self, i: usize) -> Option<SendMode> {
        self.rules.get(i).map(|r| r.2)
    }
}

/// Whether `new` must be sent under a change rule, given what was last sent.
pub fn changed_enough(
    deadband: f64,
    deadband_percent: f64,
    last: Option<&(Option<Value>, Quality)>,
    new: &Sample,
) -> bool {
    let Some((old_value, old_quality)) = last else {
        return true;
    };
    if *old_quality != new.quality {
        return true;
    }
    match (old_value, &new.value) {
        (Some(old), Some(v)) => match (value_as_f64(old), value_as_f64(v)) {
            (Some(a), Some(b)) => {
                let delta = (b - a).abs();
                if delta.is_nan() {
                    // NaN never equals itself: send only a change into or out of NaN.
                    return a.is_nan() != b.is_nan();
                }
                if deadband <= 0.0 && deadband_percent <= 0.0 {
                    return delta > 0.0 || old != v;
                }
                (deadband <= 0.0 || delta > deadband)
                    && (deadband_percent <= 0.0 || delta > a.abs() * deadband_percent / 100.0)
            }
            _ => old != v,
        },
        (None, None) => false,
        _ => true,
    }
}

#[derive(Debug)]
struct PointState {
    rule: Option<usize>,
    /// Value and quality last sent, and when.
    last: Option<(Option<Value>, Quality)>,
    sent_at: Instant,
    /// The newest sample taken from the change stream (sent or not).
    seen: Option<Sample>,
}

/// The forwarder of one peer.
pub struct Forwarder {
    peer: String,
    rules: Rules,
    image: Arc<Image>,
    spool: SpoolHandle,
    changes: Option<broadcast::Receiver<Arc<Changes>>>,
    /// The image as it was when we subscribed: sent first.
    initial: Vec<(Arc<str>, Sample)>,
    /// The link state: every current value is re-sent when it comes up.
    link_up: Option<watch::Receiver<bool>>,
    points: HashMap<Arc<str>, PointState>,
    batch: Vec<(String, Sample)>,
    batch_bytes: usize,
    flush_at: Option<Instant>,
    /// Relaying counters (shared with the peer's link).
    relay: Arc<RelayCounters>,
    /// Received points already warned about as loops (once per point).
    loop_warned: HashSet<Arc<str>>,
}

impl Forwarder {
    /// A forwarder of `image` into `spool` following `rules`. It subscribes to the
    /// image's changes and takes the initial snapshot here, back to back, so every
    /// change published after `new` returns is seen, in order, after the snapshot.
    pub fn new(peer: &str, rules: Rules, image: Arc<Image>, spool: SpoolHandle) -> Self {
        let changes = Some(image.subscribe());
        let initial = image.snapshot();
        Self {
            peer: peer.to_string(),
            rules,
            changes,
            initial,
            link_up: None,
            image,
            spool,
            points: HashMap::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            flush_at: None,
            relay: Arc::default(),
            loop_warned: HashSet::new(),
        }
    }

    /// Counts relayed and loop-refused samples in `counters` (shared with the peer's
    /// link, which adds the loops it receives).
    pub fn relay_counters(mut self, counters: Arc<RelayCounters>) -> Self {
        self.relay = counters;
        self
    }

    /// Re-sends every current value of the change rules each time `link_up` turns
    /// true, so the peer (which marks our points comm_fail while the link is down) gets
    /// a full, fresh picture after the backlog.
    pub fn resend_on_connect(mut self, link_up: watch::Receiver<bool>) -> Self {
        self.link_up = Some(link_up);
        self
    }

    /// Runs until `shutdown`; the open batch is appended before returning.
    #[instrument(name = "forward", skip_all, fields(peer = %self.peer))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Subscribed (in `new`) just before the initial snapshot: a change in between
        // is seen twice (the second time it is no change and not sent), never lost.
        let mut rx = match self.changes.take() {
            Some(rx) => rx,
            None => self.image.subscribe(),
        };
        for (name, sample) in std::mem::take(&mut self.initial) {
            self.consider(&name, &sample);
            if self.batch.len() >= MAX_SAMPLES || self.batch_bytes >= MAX_BYTES {
                self.flush().await;
            }
        }
        let now = Instant::now();
        let mut periodic: Vec<(usize, Duration, Instant)> = Vec::new();
        let mut min_silence: Option<Duration> = None;
        for i in 0..self.rules.rules.len() {
            match self.rules.mode(i) {
                Some(SendMode::Periodic { interval }) => {
                    let interval = interval.max(Duration::from_millis(1));
                    periodic.push((i, interval, now + interval));
                }
                Some(SendMode::Change { max_silence, .. }) if !max_silence.is_zero() => {
                    min_silence = Some(min_silence.map_or(max_silence, |m| m.min(max_silence)));
                }
                _ => {}
            }
        }
        // Integrity refresh is checked at a tenth of the shortest max_silence.
        let refresh_every =
            min_silence.map(|s| (s / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)));
        let mut next_refresh = refresh_every.map(|d| now + d);
        let far = || Instant::now() + Duration::from_secs(3600);
        loop {
            let next_periodic = periodic.iter().map(|p| p.2).min();
            tokio::select! {
                // Cancel-safe: a broadcast message not yet taken stays in the channel.
                r = rx.recv() => match r {
                    Ok(changes) => {
                        for (name, sample) in &changes.samples {
                            self.consider(name, sample);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        warn!(missed_batches = n, "fell behind the image's change stream; resynchronising from a snapshot");
                        // Take what is still queued first, so the snapshot is newer than
                        // anything the stream delivers afterwards.
                        while let Ok(changes) = rx.try_recv() {
                            for (name, sample) in &changes.samples {
                                self.consider(name, sample);
                            }
                        }
                        self.resync().await;
                    }
                    Err(RecvError::Closed) => break,
                },
                // Cancel-safe: timers only.
                () = sleep_until(self.flush_at.unwrap_or_else(far)), if self.flush_at.is_some() => {
                    self.flush().await;
                }
                () = sleep_until(next_refresh.unwrap_or_else(far)), if next_refresh.is_some() => {
                    self.refresh();
                    next_refresh = refresh_every.map(|d| Instant::now() + d);
                }
                () = sleep_until(next_periodic.unwrap_or_else(far)), if next_periodic.is_some() => {
                    let now = Instant::now();
                    for p in periodic.iter_mut().filter(|p| p.2 <= now) {
                        self.send_rule(p.0);
                        p.2 = (p.2 + p.1).max(now);
                    }
                }
                // Cancel-safe: watch::changed.
                up = rising(&mut self.link_up) => {
                    if up {
                        self.resend_all().await;
                    }
                }
                () = shutdown.cancelled() => break,
            }
            if self.batch.len() >= MAX_SAMPLES || self.batch_bytes >= MAX_BYTES {
                self.flush().await;
            }
        }
        self.flush().await;
    }

    fn state(&mut self, name: &Arc<str>) -> &mut PointState {
        let rules = &self.rules;
        self.points.entry(name.clone()).or_insert_with(|| PointState {
            rule: rules.rule_for(name),
            last: None,
            sent_at: Instant::now(),
            seen: None,
        })
    }

    /// A change event (or a snapshot entry) for one point.
    fn consider(&mut self, name: &Arc<str>, sample: &Sample) {
        let Some(rule) = self.state(name).rule else {
            return;
        };
        let Some(SendMode::Change { deadband, deadband_percent, .. }) = self.rules.mode(rule) else {
            return;
        };
        let st = self.state(name);
        st.seen = Some(sample.clone());
        if changed_enough(deadband, deadband_percent, st.last.as_ref(), sample) {
            st.last = Some((sample.value.clone(), sample.quality));
            st.sent_at = Instant::now();
            self.push(name, sample.clone());
        }
    }

    /// Re-reads every point from the image, as if each had changed.
    async fn resync(&mut self) {
        for (name, sample) in self.image.snapshot() {
            self.consider(&name, &sample);
            if self.batch.len() >= MAX_SAMPLES || self.batch_bytes >= MAX_BYTES {
                self.flush().await;
            }
        }
    }

    /// The sample to re-send for `name`: the image's (its time is the latest read) when
    /// it still matches what the change stream last delivered; otherwise a change is
    /// still queued in the stream, and sending the image's newer value now would put it
    /// before older ones — then `None`.
    fn fresh(&self, name: &str, seen: &Sample) -> Option<Sample> {
        self.image.get(name).filter(|s| s.value == seen.value && s.quality == seen.quality)
    }

    /// Sends the latest value of every change-rule point, deadband or not.
    async fn resend_all(&mut self) {
        let now = Instant::now();
        let names: Vec<(Arc<str>, Sample)> =
            self.points.iter().filter_map(|(name, st)| Some((name.clone(), st.seen.clone()?))).collect();
        for (name, seen) in names {
            // What the stream delivered last keeps the order; a fresher time is a bonus.
            let sample = self.fresh(&name, &seen).unwrap_or(seen);
            if let Some(st) = self.points.get_mut(&name) {
                st.last = Some((sample.value.clone(), sample.quality));
                st.sent_at = now;
            }
            self.push(&name, sample);
            if self.batch.len() >= MAX_SAMPLES || self.batch_bytes >= MAX_BYTES {
                self.flush().await;
            }
        }
    }

    /// Re-sends change-rule points silent for longer than their `max_silence`.
    fn refresh(&mut self) {
        let now = Instant::now();
        let due: Vec<(Arc<str>, Sample)> = self
            .points
            .iter()
            .filter(|(_, st)| {
                let Some(SendMode::Change { max_silence, .. }) = st.rule.and_then(|r| self.rules.mode(r))
                else {
                    return false;
                };
                !max_silence.is_zero() && st.last.is_some() && now.duration_since(st.sent_at) >= max_silence
            })
            .filter_map(|(name, st)| Some((name.clone(), st.seen.clone()?)))
            .collect();
        for (name, seen) in due {
            // A change still queued will be sent (and restart the silence) anyway.
            let Some(sample) = self.fresh(&name, &seen) else {
                continue;
            };
            if let Some(st) = self.points.get_mut(&name) {
                st.last = Some((sample.value.clone(), sample.quality));
                st.sent_at = now;
            }
            self.push(&name, sample);
        }
    }

    /// Sends every point of periodic rule `rule` from a snapshot.
    fn send_rule(&mut self, rule: usize) {
        for (name, sample) in self.image.snapshot() {
            if self.state(&name).rule == Some(rule) {
                self.push(&name, sample);
            }
        }
    }

    /// A received point on its way onward: the origin's own point name with the path
    /// kept, or `None` when the peer is on the path (a loop: counted, warned once).
    fn relayed(&mut self, name: &str, sample: Sample) -> Option<(String, Sample)> {
        let via = sample.via.clone().filter(|v| !v.is_empty())?;
        if via.iter().any(|hop| **hop == *self.peer) {
            self.relay.loop_refused.fetch_add(1, Relaxed);
            if self.loop_warned.insert(Arc::from(name)) {
                let path = via.iter().map(|h| &**h).collect::<Vec<_>>().join(" -> ");
                info!(
                    point = name,
                    path,
                    "not relaying {name} to {peer}: {peer} is on its path ({path}); a relay never sends a value back along its path",
                    peer = self.peer,
                );
            }
            return None;
        }
        // Received points are stored as origin/point: the origin is the path's first hop.
        let point = name.strip_prefix(&*via[0]).and_then(|p| p.strip_prefix('/'))?;
        self.relay.relayed.fetch_add(1, Relaxed);
        Some((point.to_string(), sample))
    }

    fn push(&mut self, name: &str, sample: Sample) {
        let (name, sample) = if name.contains('/') {
            match self.relayed(name, sample) {
                Some(relayed) => relayed,
                None => return,
            }
        } else {
            (name.to_string(), sample)
        };
        let name = name.as_str();
        // Point name, time, quality, value tag and a number: a close upper estimate.
        self.batch_bytes += name.len()
            + 24
            + match &sample.value {
                Some(Value::Text(t)) => t.len(),
                _ => 0,
            };
        self.batch.push((name.to_string(), sample));
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + COALESCE);
        }
    }

    /// Appends the open batch to the spool (durably; the link is told by the spool).
    async fn flush(&mut self) {
        self.flush_at = None;
        self.batch_bytes = 0;
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let n = batch.len();
        match self.spool.append(batch).await {
            Ok(seq) => debug!(seq, samples = n, "batch spooled"),
            Err(e) => {
                error!(error = %e, samples = n, "cannot spool a batch for the peer: values lost")
            }
        }
    }
}

/// Waits for the next change of `rx` and returns the new state; never returns when
/// there is no watch (or its sender is gone).
async fn rising(rx: &mut Option<watch::Receiver<bool>>) -> bool {
    match rx {
        Some(r) => match r.changed().await {
            Ok(()) => *r.borrow_and_update(),
            Err(_) => {
                *rx = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn s(v: Value, q: Quality) -> Sample {
        Sample { value: Some(v), at: SystemTime::now(), quality: q, via: None }
    }

    #[test]
    fn deadbands() {
        let last = (Some(Value::Float(100.0)), Quality::Good);
        let good = |x| s(Value::Float(x), Quality::Good);
        assert!(changed_enough(0.0, 0.0, None, &good(1.0)));
        assert!(!changed_enough(0.0, 0.0, Some(&last), &good(100.0)));
        assert!(changed_enough(0.0, 0.0, Some(&last), &good(100.001)));
        assert!(!changed_enough(0.5, 0.0, Some(&last), &good(100.4)));
        assert!(changed_enough(0.5, 0.0, Some(&last), &good(100.6)));
        assert!(!changed_enough(0.0, 1.0, Some(&last), &good(100.9)));
        assert!(changed_enough(0.0, 1.0, Some(&last), &good(98.9)));
        // Both bands: must beat both.
        assert!(!changed_enough(2.0, 1.0, Some(&last), &good(101.5)));
        assert!(changed_enough(2.0, 1.0, Some(&last), &good(102.5)));
        // Quality change always goes.
        assert!(changed_enough(10.0, 0.0, Some(&last), &s(Value::Float(100.0), Quality::Stale)));
        // Bools and text by equality.
        let b = (Some(Value::Bool(true)), Quality::Good);
        assert!(!changed_enough(5.0, 0.0, Some(&b), &s(Value::Bool(true), Quality::Good)));
        assert!(changed_enough(5.0, 0.0, Some(&b), &s(Value::Bool(false), Quality::Good)));
    }

    #[test]
    fn first_matching_rule_wins() {
        let globs = |g: &[&str]| PointGlobs::new(g.iter().map(|g| g.to_string()).collect()).expect("globs");
        let rules = Rules::new(&[
            SendRule {
                points: globs(&["boiler.temp*"]),
                matched: vec![],
                mode: SendMode::Periodic { interval: Duration::from_secs(1) },
            },
            SendRule {
                points: globs(&["boiler.*", "pump.*"]),
                matched: vec![],
                mode: SendMode::Change {
                    deadband: 0.0,
                    deadband_percent: 0.0,
                    max_silence: Duration::from_secs(60),
                },
            },
        ]);
        assert_eq!(rules.rule_for("boiler.temp1"), Some(0));
        assert_eq!(rules.rule_for("boiler.pressure"), Some(1));
        assert_eq!(rules.rule_for("pump.on"), Some(1));
        assert_eq!(rules.rule_for("fan.on"), None);
        assert_eq!(rules.rule_for("site-a/boiler.temp1"), None, "never relayed");
        assert_eq!(rules.clone().relaying().rule_for("site-a/boiler.temp1"), None, "bare globs never relay");
        assert!(PointGlobs::new(vec!["a[".into()]).is_err());
    }

    fn change_rule(points: &[&str]) -> SendRule {
        SendRule {
            points: PointGlobs::new(points.iter().map(|p| p.to_string()).collect()).expect("globs"),
            matched: vec![],
            mode: SendMode::Change { deadband: 0.0, deadband_percent: 0.0, max_silence: Duration::ZERO },
        }
    }

    #[test]
    fn only_globs_with_a_slash_relay_and_only_when_relaying() {
        let rules = Rules::new(&[change_rule(&["*"]), change_rule(&["line-3/*", "*/pump.*"])]);
        assert_eq!(rules.rule_for("line-3/temp"), None, "sinks fed another way never relay");
        let rules = rules.relaying();
        assert_eq!(rules.rule_for("boiler.t"), Some(0));
        assert_eq!(rules.rule_for("line-3/temp"), Some(1));
        assert_eq!(rules.rule_for("site-x/pump.on"), Some(1));
        assert_eq!(rules.rule_for("site-x/valve"), None);
    }

    /// Waits until `spool` holds `n` samples and returns them.
    async fn spooled(spool: &SpoolHandle, n: usize) -> Vec<(String, Sample)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let batches = spool.read_raw_from(0, 1000).await.expect("read");
            let got: Vec<_> = batches
                .iter()
                .flat_map(|(_, b)| crate::spool::block::decode_samples(b).expect("decode"))
                .collect();
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "only {} of {n} samples spooled", got.len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn relays_keep_origin_time_and_path_and_never_go_back_along_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = |name: &str| {
            SpoolHandle::open(&dir.path().join(name), crate::spool::journal::SpoolLimits::default())
                .expect("spool")
        };
        let (to_c, to_a) = (open("c.spool"), open("a.spool"));
        let image = Arc::new(Image::new());
        let local = image.register("boiler.t", Duration::from_secs(60));
        let received = image.register("site-a/x", Duration::from_secs(60));
        let via: crate::point::value::Via = vec![Arc::<str>::from("site-a")].into();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let relayed = Sample { via: Some(via.clone()), at, ..s(Value::Float(2.5), Quality::Good) };
        image.update([(local, s(Value::Int(1), Quality::Good)), (received, relayed.clone())]);
        let rules = |g: &[&str]| Rules::new(&[change_rule(g)]).relaying();
        let (count_c, count_a) = (Arc::new(RelayCounters::default()), Arc::new(RelayCounters::default()));
        let shutdown = CancellationToken::new();
        let c = Forwarder::new("site-c", rules(&["*", "site-a/*"]), image.clone(), to_c.clone())
            .relay_counters(count_c.clone());
        let a = Forwarder::new("site-a", rules(&["*", "*/*"]), image.clone(), to_a.clone())
            .relay_counters(count_a.clone());
        let tasks = [tokio::spawn(c.run(shutdown.clone())), tokio::spawn(a.run(shutdown.clone()))];
        let mut got = spooled(&to_c, 2).await;
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(got[0].0, "boiler.t");
        assert_eq!(got[1], ("x".to_string(), relayed), "the origin's own name, time, quality and path");
        assert_eq!(count_c.relayed.load(Relaxed), 1);
        let got = spooled(&to_a, 1).await;
        assert_eq!(
            got.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["boiler.t"],
            "never back to site-a"
        );
        // A new value of the received point is refused again, counted each time.
        image.update([(
            received,
            Sample { value: Some(Value::Float(3.0)), ..image.get("site-a/x").expect("x") },
        )]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while count_a.loop_refused.load(Relaxed) < 2 {
            assert!(Instant::now() < deadline, "second loop refusal never counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(count_a.relayed.load(Relaxed), 0);
        shutdown.cancel();
        for t in tasks {
            t.await.expect("forwarder");
        }
        assert_eq!(spooled(&to_a, 1).await.len(), 1);
    }

    #[tokio::test]
    async fn a_lagging_forwarder_resyncs_from_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool =
            SpoolHandle::open(&dir.path().join("p.spool"), crate::spool::journal::SpoolLimits::default())
                .expect("spool");
        let image = Arc::new(Image::new());
        let id = image.register("d.n", Duration::from_secs(60));
        let rules = Rules::new(&[SendRule {
            points: PointGlobs::new(vec!["*".into()]).expect("globs"),
            matched: vec![],
            mode: SendMode::Change { deadband: 0.0, deadband_percent: 0.0, max_silence: Duration::ZERO },
        }]);
        let fwd = Forwarder::new("p", rules, image.clone(), spool.clone());
        // More change batches than the broadcast keeps, before the forwarder runs.
        const N: i64 = 5000;
        for i in 1..=N {
            image.update([(id, s(Value::Int(i), Quality::Good))]);
        }
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(fwd.run(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(5);
        let last = loop {
            let batches = spool.read_raw_from(0, 10_000).await.expect("read");
            let values: Vec<Value> = batches
                .iter()
                .flat_map(|(_, b)| crate::spool::block::decode_samples(b).expect("decode"))
                .filter_map(|(_, s)| s.value)
                .collect();
            if values.last() == Some(&Value::Int(N)) {
                break values;
            }
            assert!(Instant::now() < deadline, "latest value never spooled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!((last.len() as i64) < N, "lagged: older values skipped, the latest sent");
        shutdown.cancel();
        task.await.expect("forwarder");
    }
}
