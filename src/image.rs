//! The register image: the latest sample (value, time, quality) of every point, and a
//! stream of change events for the parts that forward values (peer links, PLC sinks, the
//! local server).
//!
//! Invariants: the lock is a plain `std::sync::RwLock` held only for map look-ups and
//! copies, never across an `.await`; publishing never blocks the poller — a subscriber
//! that falls behind sees `RecvError::Lagged` and must resynchronise from [`Image::snapshot`].
//! A point is registered once and keeps its [`PointId`] for the life of the process.
//!
//! Beside the typed points, the image keeps the raw words and bits of every polled read
//! block (per device and table: start, data, time, good or failed), so the local
//! Modbus-TCP server can answer register reads in agent mode ([`Image::read_raw`]). The
//! raw cache has its own lock, with the same rules.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast;

use crate::point::value::{Quality, Sample, Table, Value};

/// Index of a registered point: cheap to copy, stable for the life of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PointId(u32);

/// One batch of changed points, as published to subscribers.
#[derive(Debug, Clone)]
pub struct Changes {
    /// The points whose value or quality changed, with their new sample.
    pub samples: Vec<(Arc<str>, Sample)>,
}

#[derive(Debug)]
struct Entry {
    name: Arc<str>,
    sample: Option<Sample>,
    updated: Instant,
    stale_after: Duration,
}

impl Entry {
    /// The sample as a reader sees it: `Good` turns `Stale` once it is older than allowed.
    fn current(&self, now: Instant) -> Option<Sample> {
        let mut s = self.sample.clone()?;
        if s.quality == Quality::Good && now.duration_since(self.updated) > self.stale_after {
            s.quality = Quality::Stale;
        }
        Some(s)
    }
}

#[derive(Debug, Default)]
struct Inner {
    index: HashMap<Arc<str>, PointId>,
    entries: Vec<Entry>,
}

/// The shared register image. Cheap to share as `Arc<Image>`.
#[derive(Debug)]
pub struct Image {
    inner: RwLock<Inner>,
    changes: broadcast::Sender<Arc<Changes>>,
    raw: RwLock<HashMap<(Arc<str>, Table), RawBlocks>>,
}

/// How many change batches a subscriber may fall behind before it lags.
const CHANGE_BACKLOG: usize = 4096;

impl Default for Image {
    fn default() -> Self {
        Self::new()
    }
}

impl Image {
    /// An empty image.
    pub fn new() -> Self {
        Self {
            inner: RwLock::default(),
            changes: broadcast::channel(CHANGE_BACKLOG).0,
            raw: RwLock::default(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A poisoned lock means a panic while holding it; the data is plain values that
        // are always left consistent, so keep serving them.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a point (idempotent: the same name gets the same id) with the age after
    /// which a good value reads as stale.
    pub fn register(&self, name: &str, stale_after: Duration) -> PointId {
        let mut inner = self.write();
        if let Some(id) = inner.index.get(name) {
            let id = *id;
            inner.entries[id.0 as usize].stale_after = stale_after;
            return id;
        }
        let id = PointId(inner.entries.len() as u32);
        let name: Arc<str> = Arc::from(name);
        inner.entries.push(Entry { name: name.clone(), sample: None, updated: Instant::now(), stale_after });
        inner.index.insert(name, id);
        id
    }

    /// The id of a registered point.
    pub fn id(&self, name: &str) -> Option<PointId> {
        self.read().index.get(name).copied()
    }

    /// Stores new samples and publishes the ones whose value or quality changed.
    /// Returns how many changed.
    pub fn update(&self, samples: impl IntoIterator<Item = (PointId, Sample)>) -> usize {
        let now = Instant::now();
        let mut changed = Vec::new();
        let mut inner = self.write();
        for (id, sample) in samples {
            let Some(entry) = inner.entries.get_mut(id.0 as usize) else {
                continue;
            };
            let differs = entry
                .sample
                .as_ref()
                .is_none_or(|old| old.value != sample.value || old.quality != sample.quality);
            entry.updated = now;
            if differs {
                changed.push((entry.name.clone(), sample.clone()));
            }
            entry.sample = Some(sample);
        }
        self.publish(changed)
    }

    /// Sends `changed` to the subscribers; called with the write lock still held, so they
    /// see changes in the order the image took them (a `comm_fail` published after the
    /// good value that replaced it would leave forwarders with the wrong last word).
    /// Returns how many there were.
    fn publish(&self, changed: Vec<(Arc<str>, Sample)>) -> usize {
        let n = changed.len();
        if n > 0 {
            // No receiver is not an error: nobody forwards values yet. Never blocks.
            let _ = self.changes.send(Arc::new(Changes { samples: changed }));
        }
        n
    }

    /// Marks points as failed (comm-fail or exception), keeping their last value.
    pub fn fail(&self, ids: impl IntoIterator<Item = PointId>, quality: Quality) -> usize {
        let at = SystemTime::now();
        let failed: Vec<(PointId, Sample)> = {
            let inner = self.read();
            ids.into_iter()
                .filter_map(|id| {
                    let entry = inner.entries.get(id.0 as usize)?;
                    let value = entry.sample.as_ref().and_then(|s| s.value.clone());
                    // A received point keeps its relay path: the failure is news from
                    // the same route.
                    let via = entry.sample.as_ref().and_then(|s| s.via.clone());
                    Some((id, Sample { value, at, quality, via }))
                })
                .collect()
        };
        self.update(failed)
    }

    /// Marks `quality` every point whose sample `which` picks, keeping its last value and
    /// relay path, in one step under the lock: a sample another writer stores meanwhile
    /// is judged as it is then, never failed for what it was a moment before. Returns how
    /// many changed.
    pub fn fail_where(&self, quality: Quality, which: impl Fn(&Sample) -> bool) -> usize {
        let (now, at) = (Instant::now(), SystemTime::now());
        let mut changed = Vec::new();
        let mut inner = self.write();
        for entry in &mut inner.entries {
            let Some(sample) = entry.sample.as_mut().filter(|s| s.quality != quality && which(s)) else {
                continue;
            };
            sample.quality = quality;
            sample.at = at;
            entry.updated = now;
            changed.push((entry.name.clone(), sample.clone()));
        }
        self.publish(changed)
    }

    /// Marks every good sample older than its staleness limit as stale, and publishes
    /// those transitions so forwarders learn of them. Returns how many went stale.
    pub fn sweep_stale(&self) -> usize {
        let now = Instant::now();
        let mut inner = self.write();
        let stale: Vec<(Arc<str>, Sample)> = inner
            .entries
            .iter_mut()
            .filter_map(|e| {
                let current = e.current(now)?;
                let sample = e.sample.as_mut()?;
                (current.quality == Quality::Stale && sample.quality == Quality::Good).then(|| {
                    sample.quality = Quality::Stale;
                    (e.name.clone(), sample.clone())
                })
            })
            .collect();
        self.publish(stale)
    }

    /// The current sample of a point by name.
    pub fn get(&self, name: &str) -> Option<Sample> {
        let inner = self.read();
        let id = inner.index.get(name)?;
        inner.entries[id.0 as usize].current(Instant::now())
    }

    /// The current value of a point, only if its quality is good.
    pub fn good_value(&self, name: &str) -> Option<Value> {
        self.get(name).filter(|s| s.quality == Quality::Good).and_then(|s| s.value)
    }

    /// Every point that has a sample, in registration order.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Sample)> {
        let now = Instant::now();
        let inner = self.read();
        inner.entries.iter().filter_map(|e| Some((e.name.clone(), e.current(now)?))).collect()
    }

    /// Number of registered points.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// True when no point is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A stream of change batches from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Changes>> {
        self.changes.subscribe()
    }
}

/// The raw content of one polled block: registers or bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raw {
    /// Holding or input registers.
    Words(Vec<u16>),
    /// Coils or discrete inputs.
    Bits(Vec<bool>),
}

impl Raw {
    fn len(&self) -> usize {
        match self {
            Raw::Words(w) => w.len(),
            Raw::Bits(b) => b.len(),
        }
    }
}

/// Why a raw read cannot be answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMiss {
    /// Some address asked for lies in no polled block (never read by the poller).
    NotPolled,
    /// Every address is cached, but some of it is older than allowed or its last poll
    /// failed (timeout, exception, port down).
    NotFresh,
}

#[derive(Debug)]
struct RawBlock {
    data: Raw,
    at: Instant,
    good: bool,
}

/// One device table's blocks by start address.
type RawBlocks = std::collections::BTreeMap<u16, RawBlock>;

impl Image {
    /// Declares a block the poller will read, so that until its first good read it
    /// answers [`RawMiss::NotFresh`] rather than [`RawMiss::NotPolled`]. A block already
    /// stored is left alone.
    pub fn expect_raw(&self, device: &str, table: Table, start: u16, count: u16) {
        let n = usize::from(count);
        let data = match table {
            Table::Coils | Table::Discrete => Raw::Bits(vec![false; n]),
            Table::Holding | Table::Input => Raw::Words(vec![0; n]),
        };
        let block = RawBlock { data, at: Instant::now(), good: false };
        let mut raw = self.raw.write().unwrap_or_else(|e| e.into_inner());
        raw.entry((Arc::from(device), table)).or_default().entry(start).or_insert(block);
    }

    /// Stores the raw result of a good poll of `device`'s `table` from `start`.
    pub fn store_raw(&self, device: &str, table: Table, start: u16, data: Raw) {
        let block = RawBlock { data, at: Instant::now(), good: true };
        let mut raw = self.raw.write().unwrap_or_else(|e| e.into_inner());
        raw.entry((Arc::from(device), table)).or_default().insert(start, block);
    }

    /// Marks the block of `device` starting at `start` in `table` failed (`Some`), or
    /// every block of `device` (`None`, comm-fail); the data is kept but not served.
    pub fn fail_raw(&self, device: &str, block: Option<(Table, u16)>) {
        let mut raw = self.raw.write().unwrap_or_else(|e| e.into_inner());
        for ((name, table), blocks) in raw.iter_mut() {
            if &**name != device {
                continue;
            }
            for (start, b) in blocks.iter_mut() {
                if block.is_none_or(|(t, s)| t == *table && s == *start) {
                    b.good = false;
                }
            }
        }
    }

    /// `count` registers or bits of `device`'s `table` from `start`, if every one lies in
    /// a good block polled at most `max_age` ago (where blocks overlap, the newest wins).
    pub fn read_raw(
        &self,
        device: &str,
        table: Table,
        start: u16,
        count: u16,
        max_age: Duration,
    ) -> Result<Raw, RawMiss> {
        let raw = self.raw.read().unwrap_or_else(|e| e.into_inner());
        let blocks = raw.get(&(Arc::from(device), table)).ok_or(RawMiss::NotPolled)?;
        let now = Instant::now();
        let end = u32::from(start) + u32::from(count);
        let bits = matches!(table, Table::Coils | Table::Discrete);
        let (mut words, mut flags) = (Vec::new(), Vec::new());
        let mut fresh = true;
        let mut at = u32::from(start);
        while at < end {
            // The newest block holding address `at`.
            let found = blocks
                .range(..=(at as u16))
                .filter(|(s, b)| u32::from(**s) + b.data.len() as u32 > at)
                .max_by_key(|(_, b)| b.at);
            let Some((s, b)) = found else {
                return Err(RawMiss::NotPolled);
            };
            fresh &= b.good && now.duration_since(b.at) <= max_age;
            let from = (at - u32::from(*s)) as usize;
            let to = ((end - u32::from(*s)) as usize).min(b.data.len());
            match &b.data {
                Raw::Words(w) => words.extend_from_slice(&w[from..to]),
                Raw::Bits(f) => flags.extend_from_slice(&f[from..to]),
            }
            at += (to - from) as u32;
        }
        if !fresh {
            return Err(RawMiss::NotFresh);
        }
        if bits { Ok(Raw::Bits(flags)) } else { Ok(Raw::Words(words)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good(v: i64) -> Sample {
        Sample { value: Some(Value::Int(v)), at: SystemTime::now(), quality: Quality::Good, via: None }
    }

    #[test]
    fn fail_where_fails_the_picked_samples_keeping_value_and_path_and_publishes_them() {
        let image = Image::new();
        let via: crate::point::value::Via = vec![Arc::from("site-c")].into();
        let ids = ["p/a", "p/b", "q/c"].map(|n| image.register(n, Duration::from_secs(5)));
        let from_c = Sample { via: Some(via.clone()), ..good(1) };
        image.update([(ids[0], from_c.clone()), (ids[1], from_c), (ids[2], good(3))]);
        let mut changes = image.subscribe();
        let picked = |s: &Sample| s.via.is_some();
        assert_eq!(image.fail_where(Quality::CommFail, picked), 2);
        let a = image.get("p/a").expect("a");
        assert_eq!((a.value, a.quality, a.via), (Some(Value::Int(1)), Quality::CommFail, Some(via)));
        assert_eq!(image.get("q/c").map(|s| s.quality), Some(Quality::Good));
        assert_eq!(changes.try_recv().expect("published").samples.len(), 2);
        assert_eq!(image.fail_where(Quality::CommFail, picked), 0, "already failed: no change");
    }

    #[test]
    fn publishes_only_changes() {
        let image = Image::new();
        let a = image.register("d.a", Duration::from_secs(5));
        let b = image.register("d.b", Duration::from_secs(5));
        assert_eq!(image.register("d.a", Duration::from_secs(5)), a);
        let mut rx = image.subscribe();
        assert_eq!(image.update([(a, good(1)), (b, good(2))]), 2);
        assert_eq!(image.update([(a, good(1)), (b, good(3))]), 1);
        assert_eq!(rx.try_recv().expect("first batch").samples.len(), 2);
        let second = rx.try_recv().expect("second batch");
        assert_eq!(&*second.samples[0].0, "d.b");
        assert_eq!(image.fail([a], Quality::CommFail), 1);
        let s = image.get("d.a").expect("sample");
        assert_eq!((s.value, s.quality), (Some(Value::Int(1)), Quality::CommFail));
        assert_eq!(image.good_value("d.b"), Some(Value::Int(3)));
    }

    #[test]
    fn good_turns_stale_when_old() {
        let image = Image::new();
        let a = image.register("d.a", Duration::ZERO);
        image.update([(a, good(1))]);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(image.get("d.a").map(|s| s.quality), Some(Quality::Stale));
        assert_eq!(image.snapshot().len(), 1);
        let mut rx = image.subscribe();
        assert_eq!(image.sweep_stale(), 1);
        assert_eq!(image.sweep_stale(), 0, "a stale point is reported once");
        assert_eq!(rx.try_recv().expect("stale event").samples[0].1.quality, Quality::Stale);
    }

    #[test]
    fn raw_blocks_answer_reads() {
        let image = Image::new();
        let age = Duration::from_secs(5);
        assert_eq!(image.read_raw("d", Table::Holding, 0, 1, age), Err(RawMiss::NotPolled));
        image.expect_raw("d", Table::Holding, 10, 3);
        assert_eq!(image.read_raw("d", Table::Holding, 10, 3, age), Err(RawMiss::NotFresh));
        image.store_raw("d", Table::Holding, 10, Raw::Words(vec![1, 2, 3]));
        image.store_raw("d", Table::Holding, 13, Raw::Words(vec![4, 5]));
        image.store_raw("d", Table::Coils, 0, Raw::Bits(vec![true, false]));
        assert_eq!(image.read_raw("d", Table::Holding, 11, 4, age), Ok(Raw::Words(vec![2, 3, 4, 5])));
        assert_eq!(image.read_raw("d", Table::Holding, 10, 1, age), Ok(Raw::Words(vec![1])));
        assert_eq!(image.read_raw("d", Table::Holding, 9, 2, age), Err(RawMiss::NotPolled));
        assert_eq!(image.read_raw("d", Table::Holding, 14, 2, age), Err(RawMiss::NotPolled));
        assert_eq!(image.read_raw("d", Table::Input, 10, 1, age), Err(RawMiss::NotPolled));
        assert_eq!(image.read_raw("d", Table::Coils, 1, 1, age), Ok(Raw::Bits(vec![false])));
        image.fail_raw("d", Some((Table::Holding, 13)));
        assert_eq!(image.read_raw("d", Table::Holding, 10, 3, age), Ok(Raw::Words(vec![1, 2, 3])));
        assert_eq!(image.read_raw("d", Table::Holding, 12, 2, age), Err(RawMiss::NotFresh));
        image.fail_raw("d", None);
        assert_eq!(image.read_raw("d", Table::Coils, 0, 1, age), Err(RawMiss::NotFresh));
        image.store_raw("d", Table::Coils, 0, Raw::Bits(vec![true, true]));
        assert_eq!(image.read_raw("d", Table::Coils, 0, 2, age), Ok(Raw::Bits(vec![true, true])));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(image.read_raw("d", Table::Coils, 0, 2, Duration::from_millis(1)), Err(RawMiss::NotFresh));
    }
}
