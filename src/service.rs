//! The gateway as a systemd service (`Type=notify`): readiness, the status line, reload
//! notifications, and watchdog pings that are sent only while the core tasks make
//! progress (`health`). Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.
//!
//! Invariants:
//! - `READY=1` is sent once the gateway started: its listeners are bound and every bus
//!   has tried to open its port (it is open, or retrying);
//! - `WATCHDOG=1` is sent only when no bus engine or link task has broken its liveness
//!   promise: a wedged task stops the pings and systemd restarts the service after
//!   `WatchdogSec`; the pinger itself does no work that could hide a wedge;
//! - a reload is announced (`RELOADING=1` with `MONOTONIC_USEC`) and ends with
//!   `READY=1`, as `systemd.service(5)` describes for `Type=notify-reload`.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::health;

/// Sends `states` to the service manager, if there is one; a failure is logged once
/// at debug level (the gateway runs the same without a manager).
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "cannot notify the service manager");
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC` for this process), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Sets the liveness tick from the watchdog interval (a quarter of it), before any
/// task starts.
pub fn init() -> Option<Duration> {
    let interval = watchdog_interval();
    if let Some(every) = interval {
        health::init(every / 4);
    }
    interval
}

/// The gateway is up: `READY=1` with its status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The status line shown by `systemctl status`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// A reload starts.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading the configuration")]),
        Err(_) => notify(&[NotifyState::Reloading, NotifyState::Status("reloading the configuration")]),
    }
}

/// Shutdown starts.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// What the pinger decides at one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every watched task keeps its promise: ping.
    Alive,
    /// These tasks are late (name, how late): no ping.
    Wedged(Vec<(String, Duration)>),
}

/// Checks the registry at `now`.
pub fn check(registry: &health::Registry, now: Instant) -> Verdict {
    let late = registry.overdue(now);
    if late.is_empty() { Verdict::Alive } else { Verdict::Wedged(late) }
}

/// Pings the watchdog every `interval / 4` while every bus engine and link task makes
/// progress; stops pinging (and says why, once per episode) while one does not. Runs
/// until `shutdown`.
pub async fn watchdog(interval: Duration, shutdown: CancellationToken) {
    let every = (interval / 4).max(Duration::from_millis(10));
    info!(watchdog = %humantime::format_duration(interval), "systemd watchdog enabled");
    let mut wedged = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        match check(health::registry(), Instant::now()) {
            Verdict::Alive => {
                if wedged {
                    warn!("every bus and link task makes progress again; watchdog pings resume");
                    wedged = false;
                }
                notify(&[NotifyState::Watchdog]);
            }
            Verdict::Wedged(late) => {
                if !wedged {
                    let list: Vec<String> = late
                        .iter()
                        .map(|(name, by)| {
                            format!("{name} (late by {})", humantime::format_duration(round(*by)))
                        })
                        .collect();
                    error!(
                        "{} made no progress: watchdog pings stopped, systemd will restart the gateway",
                        list.join(", ")
                    );
                    wedged = true;
                }
            }
        }
    }
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_task_stops_the_pings_until_it_beats_again() {
        let s = Duration::from_secs(1);
        let reg = health::Registry::new(s);
        let t0 = Instant::now();
        let bus = reg.register("bus line1".into(), t0);
        let _link = reg.register("link to b".into(), t0);
        assert_eq!(check(&reg, t0 + s), Verdict::Alive);
        // The link keeps beating, the bus does not.
        _link.idle(t0 + 3 * s);
        assert_eq!(check(&reg, t0 + 3 * s), Verdict::Wedged(vec![("bus line1".into(), s)]));
        bus.idle(t0 + 3 * s);
        assert_eq!(check(&reg, t0 + 4 * s), Verdict::Alive);
    }
}
