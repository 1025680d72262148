//! The `[[peer.send]]` rules: which local points go to a peer, and when.
//!
//! ```toml
//! [[peer.send]]              # zero or more; a point in several rules: the first wins
//! points = ["boiler.*", "meter.energy_import"]  # required: point globs (or one glob);
//!                            #   each must match a configured point. A glob with a
//!                            #   `/` names received points ("line-3/*"): they are
//!                            #   relayed onward (a hub); bare globs never match them
//! mode = "change"            # change | periodic, default change
//! deadband = 0.5             # change: absolute, >= 0, default 0 (any change)
//! deadband_percent = 1.0     # change: percent of the last sent value, 0..=100, default 0
//! max_silence = "60s"        # change: re-send an unchanged value after this long,
//!                            #   default 60s, at least 100ms
//! interval = "10s"           # periodic: required, at least 100ms
//! ```
//!
//! Keys of the other mode are errors, not ignored. A glob whose every point is already
//! sent by an earlier rule is an error too: first-wins would make it dead.
//!
//! A received-point glob (`origin/point`) cannot be checked against configured points
//! (they arrive at run time), so it must parse, have both halves, and not name points
//! received from the peer it is sent to, or from this gateway itself: either would send
//! values back towards their origin, a loop the run-time path check would refuse anyway.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::globs::{self, Globs};
use super::{Checker, number};
use crate::model::{Point, SendMode, SendRule};

const MAX_SILENCE: Duration = Duration::from_secs(60);
const PERIOD_MIN: Duration = Duration::from_millis(100);

/// One `[[peer.send]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSend {
    points: Spanned<Globs>,
    mode: Option<Spanned<RawMode>>,
    deadband: Option<Spanned<f64>>,
    deadband_percent: Option<Spanned<f64>>,
    max_silence: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawMode {
    Change,
    Periodic,
}

/// Who the rules are for: the peer's name and item path, and this gateway's name.
pub(super) struct SendTo<'a> {
    /// The peer's name.
    pub name: &'a str,
    /// Its item path (`peer "site-b"`).
    pub path: &'a str,
    /// This gateway's name (`gateway.name`).
    pub own_name: &'a str,
}

/// Resolves the send rules of one peer.
pub(super) fn validate(
    raw: &[RawSend],
    points: &[&Point],
    to: &SendTo,
    check: &mut Checker,
) -> Vec<SendRule> {
    // Point name -> index of the rule that sends it.
    let mut claimed: HashMap<&str, usize> = HashMap::new();
    let mut rules = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let path = format!("{} send[{i}]", to.path);
        let mut matched = Vec::new();
        let written = globs::written(&r.points);
        if written.is_empty() {
            check.report(
                r.points.span(),
                &path,
                "points is empty: name at least one point (or glob, like \"boiler.*\")",
            );
        }
        for (glob, span) in written.iter().filter(|(g, _)| g.contains('/')) {
            received_glob(glob, span.clone(), to, &path, check);
        }
        let local = written.into_iter().filter(|(g, _)| !g.contains('/'));
        let resolved = local.map(|(glob, span)| globs::Matched {
            glob: glob.to_owned(),
            span: span.clone(),
            points: globs::resolve_one(glob, span, points, &path, check),
        });
        for m in resolved.collect::<Vec<_>>() {
            let mut fresh = 0;
            let mut earlier = None;
            for p in &m.points {
                match claimed.get(p.name.as_str()) {
                    Some(&rule) if rule != i => earlier = earlier.or(Some(rule)),
                    Some(_) => {}
                    None => {
                        claimed.insert(&p.name, i);
                        matched.push(p.name.clone());
                        fresh += 1;
                    }
                }
            }
            if let (0, Some(rule)) = (fresh, earlier) {
                check.report(
                    m.span,
                    &path,
                    format!(
                        "points glob {:?} only matches points that send[{rule}] already sends (the first matching rule wins): move this rule above it",
                        m.glob
                    ),
                );
            }
        }
        rules.push(SendRule {
            points: globs::compile(&r.points, &path, check),
            matched,
            mode: mode(r, &path, check),
        });
    }
    rules
}

/// Checks one received-point glob (`origin/point`) of a rule sent to `to`.
fn received_glob(glob: &str, span: std::ops::Range<usize>, to: &SendTo, path: &str, check: &mut Checker) {
    let Some((origin, _)) = glob.split_once('/').filter(|(o, p)| !o.is_empty() && !p.is_empty()) else {
        check.report(
            span,
            path,
            format!("points glob {glob:?} is not \"peer/point\": a received-point glob names the gateway the values come from, then the point (\"line-3/*\")"),
        );
        return;
    };
    if let Err(e) = globset::Glob::new(glob) {
        check.report(span, path, format!("points glob {glob:?} is not valid: {}", e.kind()));
        return;
    }
    let literal = !origin.contains(['*', '?', '[', '{']);
    if literal && origin == to.name {
        check.report(
            span,
            path,
            format!(
                "points glob {glob:?} sends points received from {origin} back to {origin}: a relay loop (a value is never sent back towards its origin); remove the glob, or send it to another peer"
            ),
        );
    } else if literal && origin == to.own_name {
        check.report(
            span,
            path,
            format!(
                "points glob {glob:?} names points received from this gateway itself ({origin}): there are none (a value that comes back here is dropped as a loop); name this gateway's own points without a prefix"
            ),
        );
    }
}

fn mode(r: &RawSend, path: &str, check: &mut Checker) -> SendMode {
    let keys = ModeKeys {
        mode: r.mode.as_ref(),
        deadband: r.deadband.as_ref(),
        deadband_percent: r.deadband_percent.as_ref(),
        max_silence: r.max_silence.as_ref(),
        interval: r.interval.as_ref(),
        anchor: r.points.span(),
    };
    resolve_mode(&keys, path, check)
}

/// The keys that say when a value is sent, shared by `[[peer.send]]` and `[[plc.map]]`.
pub(super) struct ModeKeys<'a> {
    pub mode: Option<&'a Spanned<RawMode>>,
    pub deadband: Option<&'a Spanned<f64>>,
    pub deadband_percent: Option<&'a Spanned<f64>>,
    pub max_silence: Option<&'a Spanned<String>>,
    pub interval: Option<&'a Spanned<String>>,
    /// Where a missing `interval` is reported when `mode` is absent too.
    pub anchor: std::ops::Range<usize>,
}

/// Resolves the send mode keys; keys of the other mode are problems.
pub(super) fn resolve_mode(r: &ModeKeys, path: &str, check: &mut Checker) -> SendMode {
    let mode = r.mode.map_or(RawMode::Change, |m| *m.get_ref());
    match mode {
        RawMode::Change => {
            if let Some(interval) = r.interval {
                check.report(
                    interval.span(),
                    path,
                    "interval applies only to mode = \"periodic\" (the default mode is \"change\"): use max_silence for the refresh of a change rule",
                );
            }
            SendMode::Change {
                deadband: number(check, r.deadband, 0.0, 0.0..=f64::MAX, "at least 0", path, "deadband"),
                deadband_percent: number(
                    check,
                    r.deadband_percent,
                    0.0,
                    0.0..=100.0,
                    "within 0..=100",
                    path,
                    "deadband_percent",
                ),
                max_silence: check.duration(r.max_silence, MAX_SILENCE, PERIOD_MIN, path, "max_silence"),
            }
        }
        RawMode::Periodic => {
            let spans = [
                ("deadband", r.deadband.map(|v| v.span())),
                ("deadband_percent", r.deadband_percent.map(|v| v.span())),
                ("max_silence", r.max_silence.map(|v| v.span())),
            ];
            for (key, span) in spans {
                if let Some(span) = span {
                    check.report(
                        span,
                        path,
                        format!("{key} applies only to mode = \"change\"; a periodic rule sends every value"),
                    );
                }
            }
            if r.interval.is_none() {
                let span = r.mode.map_or(r.anchor.clone(), |m| m.span());
                check.report(span, path, "mode = \"periodic\" needs `interval`");
            }
            SendMode::Periodic {
                interval: check.duration(r.interval, PERIOD_MIN, PERIOD_MIN, path, "interval"),
            }
        }
    }
}
