//! Liveness of the core tasks, for the systemd watchdog: each bus engine, each link task
//! and the Modbus-TCP server's accept loop holds a [`Beat`] and, on every turn of its
//! loop, promises when it will beat again (soon when idle, after the longest possible
//! transaction when busy). The watchdog pinger ([`crate::service`]) pings systemd only
//! while no promise is broken, so a task that is wedged (a deadlock, an await that never
//! ends, a blocked thread) stops the pings and systemd restarts the service; a timer that
//! merely survives is not taken for progress.
//!
//! Invariants:
//! - a beat is registered when its task is built and leaves the registry when the task
//!   (and every clone of its `Arc`) is dropped, so stopped components are never waited on;
//! - the idle tick ([`Registry::tick`]) is a quarter of the watchdog interval when systemd
//!   asks for one, so an idle task beats several times per watchdog period;
//! - time is passed in (`now`), so the rules are unit-tested without waiting.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The idle tick when no watchdog interval is known.
const DEFAULT_TICK: Duration = Duration::from_secs(5);

/// One task's liveness promise.
#[derive(Debug)]
pub struct Beat {
    name: String,
    epoch: Instant,
    tick: Duration,
    /// Milliseconds after `epoch` by which the task promised to beat again.
    due_ms: AtomicU64,
}

impl Beat {
    /// What this beat is for, in operator words (`bus line1`, `link to site-b`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The idle tick: an idle task wakes at least this often to beat.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// The task is idle (waiting for work with a wake-up every [`Beat::tick`]): it
    /// promises to beat again within two ticks.
    pub fn idle(&self, now: Instant) {
        self.promise(now, self.tick * 2);
    }

    /// The task starts work that may take up to `longest` (a transaction with its
    /// retries, a connect): it promises to beat again within that plus one tick.
    pub fn busy(&self, now: Instant, longest: Duration) {
        self.promise(now, longest.saturating_add(self.tick));
    }

    fn promise(&self, now: Instant, within: Duration) {
        let due = now.saturating_duration_since(self.epoch).saturating_add(within);
        self.due_ms.store(due.as_millis().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// How long past its promise the task is at `now` (`None`: not late).
    pub fn late(&self, now: Instant) -> Option<Duration> {
        let at = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let due = self.due_ms.load(Relaxed);
        (at > due).then(|| Duration::from_millis(at - due))
    }
}

/// Every live beat.
#[derive(Debug)]
pub struct Registry {
    tick: Duration,
    beats: Mutex<Vec<Weak<Beat>>>,
}

impl Registry {
    /// A registry whose tasks wake at least every `tick` when idle.
    pub fn new(tick: Duration) -> Self {
        Self { tick: tick.max(Duration::from_millis(10)), beats: Mutex::default() }
    }

    /// The idle tick.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// A new beat named `name`, due one tick after `now` (a task about to start).
    pub fn register(&self, name: String, now: Instant) -> Arc<Beat> {
        let beat = Arc::new(Beat { name, epoch: now, tick: self.tick, due_ms: AtomicU64::new(0) });
        beat.idle(now);
        let mut beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.retain(|b| b.strong_count() > 0);
        beats.push(Arc::downgrade(&beat));
        beat
    }

    /// The live tasks that broke their promise at `now`: name and how late.
    pub fn overdue(&self, now: Instant) -> Vec<(String, Duration)> {
        let mut beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.retain(|b| b.strong_count() > 0);
        beats.iter().filter_map(Weak::upgrade).filter_map(|b| Some((b.name.clone(), b.late(now)?))).collect()
    }

    /// How many tasks are watched.
    pub fn len(&self) -> usize {
        let beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.iter().filter(|b| b.strong_count() > 0).count()
    }

    /// True when no task is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// Sets the process-wide idle tick (a quarter of the watchdog interval); only the first
/// call before any task starts counts.
pub fn init(tick: Duration) {
    let _ = REGISTRY.set(Registry::new(tick));
}

/// The process-wide registry (every watched task registers here).
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(|| Registry::new(DEFAULT_TICK))
}

/// Registers a beat in the process-wide registry.
pub fn beat(name: String) -> Arc<Beat> {
    registry().register(name, Instant::now())
}

/// TESTING ONLY: the environment variable naming a watched task that is made to hang, by
/// its beat's name, as `TASK` or `TASK:DELAY` (`bus line1:2s`: two seconds after the
/// engine of bus line1 starts; `modbus-tcp server`). It exists so that the watchdog can be
/// tested end to end; never set it on a plant.
pub const HANG_ENV: &str = "M2M_GATEWAY_TEST_HANG";

/// The earlier name of [`HANG_ENV`], naming a bus only (`line1:2s`); still read, with a
/// deprecation warning.
pub const HANG_BUS_ENV: &str = "M2M_GATEWAY_TEST_HANG_BUS";

/// When the task whose beat is named `task` must hang (the test fault hook, [`HANG_ENV`],
/// read once): the delay after its start.
pub fn hang_after(task: &str) -> Option<Duration> {
    static HANG: OnceLock<Option<(String, Duration)>> = OnceLock::new();
    let hang = HANG.get_or_init(|| {
        let text = std::env::var(HANG_ENV).ok().or_else(|| {
            // The earlier name, for a bus only: `line1:2s`.
            let bus = std::env::var(HANG_BUS_ENV).ok()?;
            tracing::warn!("{HANG_BUS_ENV} is deprecated: set {HANG_ENV}=\"bus {bus}\" instead");
            Some(format!("bus {bus}"))
        })?;
        let (name, delay) = match text.rsplit_once(':') {
            Some((name, delay)) => (name, humantime::parse_duration(delay).ok()?),
            None => (text.as_str(), Duration::ZERO),
        };
        tracing::warn!("{HANG_ENV} is set: the task {name} will hang (a test fault hook)");
        Some((name.to_string(), delay))
    });
    hang.as_ref().filter(|(name, _)| name == task).map(|(_, d)| *d)
}

/// The test fault hook in a task's loop: at `at` (from [`hang_after`]), wedges the task
/// for ever, as a deadlock would.
pub async fn hang_if_due(at: Option<tokio::time::Instant>) {
    if at.is_some_and(|at| tokio::time::Instant::now() >= at) {
        tracing::warn!("test fault hook: this task hangs now");
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn an_idle_task_is_late_after_two_ticks() {
        let reg = Registry::new(S);
        let t0 = Instant::now();
        let beat = reg.register("bus a".into(), t0);
        assert!(reg.overdue(t0 + S).is_empty());
        assert!(reg.overdue(t0 + 2 * S).is_empty());
        let late = reg.overdue(t0 + 3 * S);
        assert_eq!(late, vec![("bus a".to_string(), S)]);
        // Beating again keeps it alive.
        beat.idle(t0 + 3 * S);
        assert!(reg.overdue(t0 + 4 * S).is_empty());
    }

    #[test]
    fn a_busy_task_has_its_longest_step_plus_a_tick() {
        let reg = Registry::new(S);
        let t0 = Instant::now();
        let beat = reg.register("bus a".into(), t0);
        beat.busy(t0, 10 * S);
        assert!(reg.overdue(t0 + 11 * S).is_empty());
        assert_eq!(reg.overdue(t0 + 12 * S).len(), 1);
    }

    #[test]
    fn a_dropped_task_is_no_longer_watched() {
        let reg = Registry::new(S);
        let t0 = Instant::now();
        let a = reg.register("bus a".into(), t0);
        let _b = reg.register("link to b".into(), t0);
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(reg.len(), 1);
        let late: Vec<String> = reg.overdue(t0 + 5 * S).into_iter().map(|(n, _)| n).collect();
        assert_eq!(late, vec!["link to b".to_string()]);
    }
}
