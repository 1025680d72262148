//! Reconnect back-off, sans-I/O: when to try a port, a peer or a PLC again after a
//! failure. One copy for every task that reconnects (bus ports, peer links, PLC sinks,
//! serial tunnels, streaming devices), so they all follow the same rules.
//!
//! Invariants:
//! - the delay starts at `min`, doubles per failure and never exceeds `max` (nor falls
//!   below `min`);
//! - the delay is reset only when the connection has **proven** itself: the caller says
//!   so with [`Backoff::proven`] (it carried real work: a transaction answered, a write
//!   confirmed), or the connection stayed up for the `stable` time given to
//!   [`Backoff::with_stable`]. A bare successful connect proves nothing: a device
//!   server or a PLC that accepts and then drops at once must not be retried at the
//!   first delay for ever (a flapping storm);
//! - with jitter, the wait is 50-100 % of the delay, so many gateways that lost the same
//!   peer do not reconnect in step;
//! - every method takes `now` instead of reading a clock, so the rules are unit-tested
//!   without waiting.

use std::time::Duration;

use tokio::time::Instant;

/// Back-off state of one reconnecting task.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    delay: Duration,
    jitter: bool,
    stable: Option<Duration>,
    /// When the current connection came up (for the `stable` rule).
    up_since: Option<Instant>,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max` (taken as at least `min`); no jitter, and only
    /// [`Backoff::proven`] resets it.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), delay: min, jitter: false, stable: None, up_since: None }
    }

    /// Waits a random 50-100 % of the delay.
    pub fn with_jitter(mut self) -> Self {
        self.jitter = true;
        self
    }

    /// Also resets when a connection stayed up at least `stable` before it failed.
    pub fn with_stable(mut self, stable: Duration) -> Self {
        self.stable = Some(stable);
        self
    }

    /// The delay the next failure will wait (before jitter), for log lines.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The connection is up at `now` (it has not proven anything yet).
    pub fn connected(&mut self, now: Instant) {
        self.up_since = Some(now);
    }

    /// The connection did real work: the next failure starts again at `min`.
    pub fn proven(&mut self) {
        self.delay = self.min;
    }

    /// A connect failed, or a connection was lost, at `now`: returns when to try again,
    /// and doubles the delay for the failure after.
    pub fn failed(&mut self, now: Instant) -> Instant {
        if let (Some(since), Some(stable)) = (self.up_since.take(), self.stable)
            && now.saturating_duration_since(since) >= stable
        {
            self.delay = self.min;
        }
        let wait = if self.jitter { self.delay.mul_f64(rand::random_range(0.5..=1.0)) } else { self.delay };
        self.delay = (self.delay * 2).clamp(self.min, self.max);
        now + wait
    }

    /// Waits at least `hold` before the next try (a configuration mismatch that retrying
    /// soon cannot fix): the current delay becomes `hold` (or `max`, if longer).
    pub fn hold(&mut self, hold: Duration) {
        self.up_since = None;
        self.delay = hold.max(self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn doubles_from_min_up_to_max() {
        let now = Instant::now();
        let mut b = Backoff::new(MS(100), MS(1000));
        let waits: Vec<_> = (0..6).map(|_| b.failed(now) - now).collect();
        assert_eq!(waits, [MS(100), MS(200), MS(400), MS(800), MS(1000), MS(1000)]);
    }

    #[test]
    fn a_max_below_min_is_taken_as_min() {
        let now = Instant::now();
        let mut b = Backoff::new(MS(200), MS(50));
        assert_eq!(b.failed(now) - now, MS(200));
        assert_eq!(b.failed(now) - now, MS(200));
    }

    #[test]
    fn a_connect_alone_does_not_reset_but_proven_work_does() {
        let now = Instant::now();
        let mut b = Backoff::new(MS(100), MS(10_000));
        for _ in 0..4 {
            b.connected(now);
            b.failed(now); // accepted, then dropped at once: a flapping peer
        }
        assert_eq!(b.delay(), MS(1600), "a bare connect kept the delay growing");
        b.proven();
        assert_eq!(b.failed(now) - now, MS(100));
    }

    #[test]
    fn a_connection_that_stayed_up_long_enough_resets() {
        let t0 = Instant::now();
        let mut b = Backoff::new(MS(100), MS(10_000)).with_stable(Duration::from_secs(30));
        b.failed(t0);
        b.failed(t0);
        b.connected(t0);
        assert_eq!(b.failed(t0 + Duration::from_secs(29)) - (t0 + Duration::from_secs(29)), MS(400));
        b.connected(t0);
        let later = t0 + Duration::from_secs(30);
        assert_eq!(b.failed(later) - later, MS(100), "30 s up is stable");
    }

    #[test]
    fn jitter_waits_half_to_all_of_the_delay() {
        let now = Instant::now();
        for _ in 0..200 {
            let mut b = Backoff::new(MS(1000), MS(1000)).with_jitter();
            let wait = b.failed(now) - now;
            assert!(wait >= MS(500) && wait <= MS(1000), "{wait:?}");
        }
    }

    #[test]
    fn hold_waits_at_least_the_hold() {
        let now = Instant::now();
        let mut b = Backoff::new(MS(100), MS(5000));
        b.hold(Duration::from_secs(30));
        assert_eq!(b.failed(now) - now, Duration::from_secs(30));
        assert_eq!(b.failed(now) - now, MS(5000), "then back under max");
    }
}
