//! Rate limiting of log lines that a remote party can trigger (refused connections,
//! failed handshakes, broken requests), so that a flood of connections cannot fill the
//! disk with log: per kind of event and source address, the first [`LogLimiter`] `burst`
//! events of each window are logged as they come, the rest only counted, and one summary
//! line per kind and source tells how many were left out ("… and 9,981 more in the last
//! 10 s").
//!
//! Sans I/O: the caller passes `now`, logs what it is told to, and calls
//! [`LogLimiter::flush`] now and then (at least once per window) to get the summaries of
//! windows that have ended.
//!
//! Invariants: every event is either logged or counted in exactly one summary; the table
//! holds at most [`MAX_SOURCES`] sources per kind: events from further sources share one
//! entry with no source, so memory stays bounded whatever the number of addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Sources tracked apart per kind; more share one entry.
pub const MAX_SOURCES: usize = 256;
/// The default window: events of one kind and source logged per window are `burst`.
pub const WINDOW: Duration = Duration::from_secs(10);
/// The default burst.
pub const BURST: u32 = 5;

/// One window of one kind and source.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// What was left out of the log in one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The kind of event, as the caller named it.
    pub kind: &'static str,
    /// The source (`None`: many sources, past [`MAX_SOURCES`]).
    pub source: Option<IpAddr>,
    /// Events not logged.
    pub suppressed: u64,
    /// The window they fell in.
    pub window: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = match self.source {
            Some(ip) => format!("from {ip}"),
            None => "from further sources".to_string(),
        };
        write!(
            f,
            "… and {} more {} {from} in the last {} s (not logged one by one)",
            thousands(self.suppressed),
            self.kind,
            self.window.as_secs()
        )
    }
}

/// `9981` as `9,981`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Per kind and source, lets `burst` events per window through.
#[derive(Debug)]
pub struct LogLimiter {
    window: Duration,
    burst: u32,
    windows: HashMap<(&'static str, Option<IpAddr>), Window>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(WINDOW, BURST)
    }
}

impl LogLimiter {
    /// `burst` events per `window` of each kind and source are logged.
    pub fn new(window: Duration, burst: u32) -> Self {
        Self { window, burst, windows: HashMap::new() }
    }

    /// An event of `kind` from `source` at `now`: true when it is to be logged, false
    /// when it is only counted (it will be in a [`Summary`]).
    pub fn allow(&mut self, kind: &'static str, source: Option<IpAddr>, now: Instant) -> bool {
        let mut key = (kind, source);
        if !self.windows.contains_key(&key) {
            let sources = self.windows.keys().filter(|(k, s)| *k == kind && s.is_some()).count();
            if source.is_some() && sources >= MAX_SOURCES {
                key = (kind, None);
            }
        }
        let w = self.windows.entry(key).or_insert(Window { start: now, logged: 0, suppressed: 0 });
        if w.logged < self.burst {
            w.logged += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// The summaries of the windows that ended by `now` (those that left something out),
    /// and forgets those windows.
    pub fn flush(&mut self, now: Instant) -> Vec<Summary> {
        let mut out = Vec::new();
        let window = self.window;
        self.windows.retain(|&(kind, source), w| {
            if now.saturating_duration_since(w.start) < window {
                return true;
            }
            if w.suppressed > 0 {
                out.push(Summary { kind, source, suppressed: w.suppressed, window });
            }
            false
        });
        out.sort_by(|a, b| (a.kind, a.source).cmp(&(b.kind, b.source)));
        out
    }

    /// The window length (how often [`LogLimiter::flush`] should be called, at least).
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// A [`LogLimiter`] shared by an accept loop and its connection tasks, on the clock.
#[derive(Debug, Clone, Default)]
pub struct SharedLimiter(Arc<Mutex<LogLimiter>>);

impl SharedLimiter {
    /// [`LogLimiter::allow`] at the current time.
    pub fn allow(&self, kind: &'static str, source: Option<IpAddr>) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).allow(kind, source, Instant::now())
    }

    /// [`LogLimiter::flush`] at the current time.
    pub fn flush(&self) -> Vec<Summary> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).flush(Instant::now())
    }

    /// A timer for [`SharedLimiter::flush`]: a summary comes at most a second after its
    /// window ends.
    pub fn ticker(&self) -> tokio::time::Interval {
        let window = self.0.lock().unwrap_or_else(PoisonError::into_inner).window();
        let period = window.min(Duration::from_secs(1));
        let mut t = tokio::time::interval_at(Instant::now() + period, period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([192, 168, 0, last]))
    }

    #[test]
    fn a_burst_is_logged_the_rest_counted_and_summarised_once() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(Duration::from_secs(10), 3);
        let logged = (0..10_000u32)
            .filter(|i| l.allow("refused connections", ip(1), t0 + Duration::from_micros(u64::from(*i))))
            .count();
        assert_eq!(logged, 3);
        // Another source and another kind have their own budget.
        assert!(l.allow("refused connections", ip(2), t0));
        assert!(l.allow("failed handshakes", ip(1), t0));
        assert_eq!(l.flush(t0 + Duration::from_secs(9)), vec![], "the window is not over");
        let s = l.flush(t0 + Duration::from_secs(10));
        assert_eq!(
            s,
            vec![Summary {
                kind: "refused connections",
                source: ip(1),
                suppressed: 9_997,
                window: Duration::from_secs(10)
            }]
        );
        assert_eq!(
            s[0].to_string(),
            "… and 9,997 more refused connections from 192.168.0.1 in the last 10 s (not logged one by one)"
        );
        // A new window starts afresh, and nothing is summarised twice.
        assert!(l.allow("refused connections", ip(1), t0 + Duration::from_secs(11)));
        assert_eq!(l.flush(t0 + Duration::from_secs(30)), vec![]);
    }

    #[test]
    fn many_sources_share_one_entry_past_the_limit() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(Duration::from_secs(10), 1);
        let mut logged = 0;
        for i in 0..1000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            logged += usize::from(l.allow("k", Some(a), t0));
        }
        assert_eq!(logged, MAX_SOURCES + 1);
        assert!(l.windows.len() <= MAX_SOURCES + 1);
        let s = l.flush(t0 + Duration::from_secs(10));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].source, s[0].suppressed), (None, 1000 - MAX_SOURCES as u64 - 1));
        assert!(s[0].to_string().contains("from further sources"), "{}", s[0]);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
