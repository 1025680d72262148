//! The thread that owns one peer's [`Spool`] file, and the async handle the forwarder
//! and the link use to reach it.
//!
//! Why a thread: rusqlite is synchronous and every commit is an fsync
//! (`synchronous=FULL`), so the spool must never run on a runtime worker. One dedicated
//! OS thread per peer serialises every operation on that file in arrival order, which
//! is also what makes "append, then send" hold: the link reads only what an `append`
//! already committed.
//!
//! Invariants: the thread is the only owner of the connection; it exits when the last
//! handle is dropped (after finishing the operation in hand, so an append or an applied
//! mark is never cut in half); counters in [`SpoolCounters`] are updated after every
//! operation so `stats()` never needs a round trip; the `appended` watch carries the seq
//! of the newest committed batch and only moves forward.

pub mod block;
pub mod forward;
pub mod journal;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::sync::{mpsc, oneshot, watch};

use crate::point::value::Sample;
use crate::spool::journal::{Spool, SpoolError, SpoolLimits};

/// How many operations may wait for the spool thread.
const QUEUE: usize = 64;

/// Live counters of one spool, readable without asking its thread.
#[derive(Debug, Default)]
pub struct SpoolCounters {
    /// Batches waiting for the peer's ack.
    pub pending_batches: AtomicU64,
    /// Samples in them.
    pub pending_samples: AtomicU64,
    /// Bytes of their sample blocks.
    pub pending_bytes: AtomicU64,
    /// When the oldest of them was appended, Unix microseconds (0: none waits).
    pub oldest_pending_us: AtomicU64,
    /// Batches dropped to the limits since the file was created.
    pub dropped_batches: AtomicU64,
    /// Samples dropped to the limits since the file was created.
    pub dropped_samples: AtomicU64,
    /// Highest seq applied from the peer.
    pub applied: AtomicU64,
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Op {
    Append(Vec<(String, Sample)>, Reply<u64>),
    Ack(u64, Reply<usize>),
    ReadRaw(u64, usize, Reply<Vec<(u64, Vec<u8>)>>),
    SetApplied(u64, Reply<()>),
    AppendReceived(Vec<(String, Sample)>, String, u64, Reply<Option<u64>>),
    ReceivedMark(String, Reply<u64>),
}

/// Errors of the spool handle.
#[derive(Debug, thiserror::Error)]
pub enum SpoolerError {
    /// The spool itself failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The spool thread is gone (it panicked or could not be started).
    #[error("spool thread for {0} has stopped")]
    Stopped(String),
    /// The OS refused to start the thread.
    #[error("cannot start the spool thread for {path}: {source}")]
    Thread {
        /// The spool file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A cheap, cloneable handle to a spool thread.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    tx: mpsc::Sender<Op>,
    counters: Arc<SpoolCounters>,
    appended: watch::Receiver<u64>,
    name: Arc<str>,
}

impl SpoolHandle {
    /// Opens the spool file at `path` (on the calling thread, so a bad file is an error
    /// at start-up) and starts its thread.
    pub fn open(path: &Path, limits: SpoolLimits) -> Result<Self, SpoolerError> {
        let spool = Spool::open(path, limits)?;
        let name: Arc<str> = Arc::from(path.display().to_string());
        let counters = Arc::new(SpoolCounters::default());
        update(&counters, &spool);
        let (appended_tx, appended) = watch::channel(spool.next_seq().saturating_sub(1));
        let (tx, rx) = mpsc::channel(QUEUE);
        let c = counters.clone();
        std::thread::Builder::new()
            .name("spool".into())
            .spawn(move || run(spool, rx, c, appended_tx))
            .map_err(|source| SpoolerError::Thread { path: name.to_string(), source })?;
        Ok(Self { tx, counters, appended, name })
    }

    async fn call<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T, SpoolerError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || SpoolerError::Stopped(self.name.to_string());
        self.tx.send(op(reply)).await.map_err(|_| stopped())?;
        Ok(rx.await.map_err(|_| stopped())??)
    }

    /// Stores a batch durably; returns its seq.
    pub async fn append(&self, samples: Vec<(String, Sample)>) -> Result<u64, SpoolerError> {
        self.call(|r| Op::Append(samples, r)).await
    }

    /// The peer applied everything up to `upto` (see [`Spool::ack`]).
    pub async fn ack(&self, upto: u64) -> Result<usize, SpoolerError> {
        self.call(|r| Op::Ack(upto, r)).await
    }

    /// Up to `max` stored sample blocks with seq > `after`, oldest first.
    pub async fn read_raw_from(&self, after: u64, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolerError> {
        self.call(|r| Op::ReadRaw(after, max, r)).await
    }

    /// Durably records that the peer's batches up to `seq` were applied.
    pub async fn set_applied(&self, seq: u64) -> Result<(), SpoolerError> {
        self.call(|r| Op::SetApplied(seq, r)).await
    }

    /// Stores samples received from peer `from` in its batches up to `seq`, unless a
    /// batch that far was already stored (see [`Spool::append_received`]).
    pub async fn append_received(
        &self,
        samples: Vec<(String, Sample)>,
        from: &str,
        seq: u64,
    ) -> Result<Option<u64>, SpoolerError> {
        let from = from.to_string();
        self.call(|r| Op::AppendReceived(samples, from, seq, r)).await
    }

    /// The peer batch seq [`SpoolHandle::append_received`] last stored for `from`.
    pub async fn received_mark(&self, from: &str) -> Result<u64, SpoolerError> {
        let from = from.to_string();
        self.call(|r| Op::ReceivedMark(from, r)).await
    }

    /// Highest seq applied from the peer (as of the last operation).
    pub fn applied(&self) -> u64 {
        self.counters.applied.load(Relaxed)
    }

    /// Live counters.
    pub fn counters(&self) -> &SpoolCounters {
        &self.counters
    }

    /// A watch of the newest committed seq: changes after every append.
    pub fn appended(&self) -> watch::Receiver<u64> {
        self.appended.clone()
    }

    /// The spool file, for logs.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn update(c: &SpoolCounters, s: &Spool) {
    let p = s.pending();
    let d = s.dropped();
    c.pending_batches.store(p.batches, Relaxed);
    c.pending_samples.store(p.samples, Relaxed);
    c.pending_bytes.store(p.bytes, Relaxed);
    // Nothing to report on a read error: the next operation tries again.
    let oldest = s.oldest_pending().ok().flatten();
    let us =
        oldest.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_micros() as u64);
    c.oldest_pending_us.store(us, Relaxed);
    c.dropped_batches.store(d.batches, Relaxed);
    c.dropped_samples.store(d.samples, Relaxed);
    c.applied.store(s.applied(), Relaxed);
}

fn run(
    mut spool: Spool,
    mut rx: mpsc::Receiver<Op>,
    counters: Arc<SpoolCounters>,
    appended: watch::Sender<u64>,
) {
    while let Some(op) = rx.blocking_recv() {
        // A caller that went away does not care about its reply.
        match op {
            Op::Append(samples, r) => {
                let out = spool.append(&samples);
                update(&counters, &spool);
                if let Ok(seq) = out {
                    appended.send_replace(seq);
                }
                let _ = r.send(out);
            }
            Op::Ack(upto, r) => {
                let out = spool.ack(upto);
                update(&counters, &spool);
                // A rebase renumbers pending batches: tell the link there is data.
                appended.send_replace(spool.next_seq().saturating_sub(1));
                let _ = r.send(out);
            }
            Op::ReadRaw(after, max, r) => {
                let _ = r.send(spool.read_raw_from(after, max));
            }
            Op::AppendReceived(samples, from, seq, r) => {
                let out = spool.append_received(&samples, &from, seq);
                update(&counters, &spool);
                if let Ok(Some(seq)) = out {
                    appended.send_replace(seq);
                }
                let _ = r.send(out);
            }
            Op::ReceivedMark(from, r) => {
                let _ = r.send(spool.received_mark(&from));
            }
            Op::SetApplied(seq, r) => {
                let out = spool.set_applied(seq);
                update(&counters, &spool);
                let _ = r.send(out);
            }
        }
    }
}
