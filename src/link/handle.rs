//! The public side of a link: [`LinkHandle`], the cheap handle the rest of the gateway
//! holds (peer writes, statistics), the counters it shares with the link task, and the
//! one-line health summary built from them.
//!
//! Invariants: a write is handed to the link task only while a session is up and never
//! queued across sessions; the task answers every [`WriteCmd`] at most once, with the
//! owner's result, the owner's refusal, or [`DOWN`] (never sent to a peer); the counters
//! are only ever added to (and `connected` set) by the link task.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::link::WRITE_TIMEOUT;
use crate::link::tunnel::TunnelHub;
use crate::point::value::Value;
use crate::spool::SpoolHandle;
use crate::spool::forward::RelayCounters;

/// A snapshot of a link's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    /// A session is up (hello exchanged).
    pub connected: bool,
    /// Sessions established since start.
    pub sessions: u64,
    /// Attempts that never got to a session (connect, TLS or hello failed).
    pub failed_attempts: u64,
    /// Batches sent (resends count again).
    pub batches_sent: u64,
    /// Our batches the peer acknowledged.
    pub batches_acked: u64,
    /// Peer batches applied into the image.
    pub batches_applied: u64,
    /// Samples in them.
    pub samples_applied: u64,
    /// Peer batches dropped as duplicates (already applied).
    pub duplicates_dropped: u64,
    /// Received samples relayed to the peer.
    pub samples_relayed: u64,
    /// Samples refused as a relay loop: not relayed to the peer because it is on their
    /// path, or received from it with this gateway on their path (dropped).
    pub loop_refused: u64,
    /// Samples the peer relayed of an origin its `accept_relayed` does not list:
    /// refused (never stored, served, written or relayed on).
    pub relayed_refused: u64,
    /// Peer writes refused by the grants.
    pub writes_refused: u64,
    /// Our batches waiting in the spool for an ack.
    pub spool_pending: u64,
    /// Seq of the newest batch spooled for the peer (seqs persist across restarts).
    pub last_seq: u64,
    /// Batches the spool dropped to its limits (data lost).
    pub spool_dropped: u64,
    /// Samples in them.
    pub spool_dropped_samples: u64,
    /// Values in the batches waiting in the spool.
    pub spool_pending_values: u64,
    /// Bytes of the batches waiting in the spool.
    pub spool_pending_bytes: u64,
    /// When the oldest batch waiting in the spool was stored (`None`: none waits).
    pub spool_oldest: Option<std::time::SystemTime>,
    /// When the peer last acknowledged a batch (`None`: not since start).
    pub last_ack: Option<std::time::SystemTime>,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) connected: AtomicBool,
    pub(super) sessions: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) sent: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) applied: AtomicU64,
    pub(super) samples_applied: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) relayed_refused: AtomicU64,
    /// Unix milliseconds of the last ack (0: none yet).
    pub(super) last_ack_ms: AtomicU64,
}

pub(super) struct WriteCmd {
    pub(super) point: String,
    pub(super) value: Value,
    pub(super) deadline: Instant,
    pub(super) reply: oneshot::Sender<Result<(), String>>,
}

/// Why a peer write ([`LinkHandle::write`]) did not happen, or may not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerWriteError {
    /// No session: nothing was sent.
    #[error("link to {peer} is down")]
    Down {
        /// The peer.
        peer: String,
    },
    /// Too many writes waiting (here or at the owner): nothing was written.
    #[error("link to {peer}: too many writes waiting")]
    Busy {
        /// The peer.
        peer: String,
    },
    /// The owner's `[[peer.grant]]` refused it: `reason` is the owner's.
    #[error("{reason}")]
    Refused {
        /// The peer.
        peer: String,
        /// The owner's words (`not granted: ...`).
        reason: String,
    },
    /// The owner tried and its device write failed.
    #[error("peer {peer} could not write: {reason}")]
    Failed {
        /// The peer.
        peer: String,
        /// The owner's words.
        reason: String,
    },
    /// The session dropped with the write in flight: outcome unknown.
    #[error("link to {peer} went down before the write result arrived (outcome unknown)")]
    Lost {
        /// The peer.
        peer: String,
    },
    /// No result within [`WRITE_TIMEOUT`]: outcome unknown.
    #[error("link to {peer}: no write result within {WRITE_TIMEOUT:?} (outcome unknown)")]
    Timeout {
        /// The peer.
        peer: String,
    },
}

/// A cheap handle to a running link.
#[derive(Clone)]
pub struct LinkHandle {
    pub(super) peer: Arc<str>,
    pub(super) counters: Arc<Counters>,
    pub(super) spool: SpoolHandle,
    pub(super) writes: mpsc::Sender<WriteCmd>,
    pub(super) tunnels: Arc<TunnelHub>,
    pub(super) relay: Arc<RelayCounters>,
}

impl std::fmt::Debug for LinkHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkHandle").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl LinkHandle {
    /// The peer's name.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Asks the peer to write `value` into its point `point` and waits for the result
    /// (at most [`WRITE_TIMEOUT`]). Fails at once when the link is down. Never resent.
    pub async fn write(&self, point: &str, value: Value) -> Result<(), PeerWriteError> {
        let peer = self.peer.to_string();
        if !self.counters.connected.load(Relaxed) {
            return Err(PeerWriteError::Down { peer });
        }
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + WRITE_TIMEOUT;
        if self.writes.try_send(WriteCmd { point: point.to_string(), value, deadline, reply }).is_err() {
            return Err(PeerWriteError::Busy { peer });
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(reason))) if reason == DOWN => Err(PeerWriteError::Down { peer }),
            // The owner's grants refuse with "not granted: ..." (Grants::check), and a
            // busy owner with "busy: ..."; anything else is the owner's device write.
            Ok(Ok(Err(reason))) if reason.starts_with("not granted") => {
                Err(PeerWriteError::Refused { peer, reason })
            }
            Ok(Ok(Err(reason))) if reason.starts_with("busy") => Err(PeerWriteError::Busy { peer }),
            Ok(Ok(Err(reason))) => Err(PeerWriteError::Failed { peer, reason }),
            Ok(Err(_)) => Err(PeerWriteError::Lost { peer }),
            Err(_) => Err(PeerWriteError::Timeout { peer }),
        }
    }

    /// True while a session with the peer is up.
    pub fn is_connected(&self) -> bool {
        self.counters.connected.load(Relaxed)
    }

    /// The relaying counters the peer's forwarder shares with this link.
    pub fn relay_counters(&self) -> Arc<RelayCounters> {
        self.relay.clone()
    }

    /// The hook serial tunnels to this peer use (see link/tunnel.rs).
    pub fn tunnels(&self) -> &Arc<TunnelHub> {
        &self.tunnels
    }

    /// The link's counters.
    pub fn stats(&self) -> LinkStats {
        let c = &self.counters;
        let s = self.spool.counters();
        LinkStats {
            connected: c.connected.load(Relaxed),
            sessions: c.sessions.load(Relaxed),
            failed_attempts: c.failed.load(Relaxed),
            batches_sent: c.sent.load(Relaxed),
            batches_acked: c.acked.load(Relaxed),
            batches_applied: c.applied.load(Relaxed),
            samples_applied: c.samples_applied.load(Relaxed),
            duplicates_dropped: c.duplicates.load(Relaxed),
            samples_relayed: self.relay.relayed.load(Relaxed),
            loop_refused: self.relay.loop_refused.load(Relaxed),
            relayed_refused: c.relayed_refused.load(Relaxed),
            writes_refused: c.refused.load(Relaxed),
            spool_pending: s.pending_batches.load(Relaxed),
            last_seq: *self.spool.appended().borrow(),
            spool_dropped: s.dropped_batches.load(Relaxed),
            spool_dropped_samples: s.dropped_samples.load(Relaxed),
            spool_pending_values: s.pending_samples.load(Relaxed),
            spool_pending_bytes: s.pending_bytes.load(Relaxed),
            spool_oldest: match s.oldest_pending_us.load(Relaxed) {
                0 => None,
                us => Some(std::time::UNIX_EPOCH + Duration::from_micros(us)),
            },
            last_ack: match c.last_ack_ms.load(Relaxed) {
                0 => None,
                ms => Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)),
            },
        }
    }
}

/// The reply of a write asked while the link was down (never sent to a peer).
pub(super) const DOWN: &str = "\0link down";

/// One-line health summary of a link, for the periodic info log: state, then the
/// batch counters since `since` (`elapsed` ago), then the spool as it is now; a hub's
/// link adds what it relayed and refused as loops since `since`.
pub fn summary(now: &LinkStats, since: &LinkStats, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let applied = now.batches_applied.saturating_sub(since.batches_applied);
    let samples = now.samples_applied.saturating_sub(since.samples_applied);
    let relayed = now.samples_relayed.saturating_sub(since.samples_relayed);
    let loops = now.loop_refused.saturating_sub(since.loop_refused);
    let untrusted = now.relayed_refused.saturating_sub(since.relayed_refused);
    let mut relaying = if relayed > 0 || loops > 0 {
        format!("; relayed {relayed} values, {loops} refused as relay loops")
    } else {
        String::new()
    };
    if untrusted > 0 {
        relaying += &format!("; {untrusted} relayed values refused (origin not in accept_relayed)");
    }
    let line = format!(
        "{}, {} sessions; batches sent {}, acked {}, applied {} ({samples} values, {:.1} values/s), \
         duplicates dropped {}, writes refused {}; spool pending {} (last seq {}), dropped since start {} ({} values)",
        if now.connected { "connected" } else { "not connected" },
        now.sessions,
        now.batches_sent.saturating_sub(since.batches_sent),
        now.batches_acked.saturating_sub(since.batches_acked),
        applied,
        samples as f64 / secs,
        now.duplicates_dropped.saturating_sub(since.duplicates_dropped),
        now.writes_refused.saturating_sub(since.writes_refused),
        now.spool_pending,
        now.last_seq,
        now.spool_dropped,
        now.spool_dropped_samples,
    );
    line + &relaying
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_well() {
        let since =
            LinkStats { batches_sent: 10, batches_applied: 4, samples_applied: 40, ..Default::default() };
        let now = LinkStats {
            connected: true,
            sessions: 2,
            batches_sent: 15,
            batches_acked: 5,
            batches_applied: 6,
            samples_applied: 60,
            duplicates_dropped: 1,
            spool_pending: 3,
            last_seq: 99,
            ..Default::default()
        };
        let line = summary(&now, &since, Duration::from_secs(10));
        assert!(
            line.starts_with(
                "connected, 2 sessions; batches sent 5, acked 5, applied 2 (20 values, 2.0 values/s)"
            ),
            "{line}"
        );
        assert!(
            line.contains("duplicates dropped 1") && line.contains("spool pending 3 (last seq 99)"),
            "{line}"
        );
        assert!(!line.contains("relay"), "no relaying, no relay counters: {line}");
        let hub = LinkStats { samples_relayed: 12, loop_refused: 3, ..now };
        let line = summary(&hub, &since, Duration::from_secs(10));
        assert!(line.ends_with("; relayed 12 values, 3 refused as relay loops"), "{line}");
        let refusing = LinkStats { relayed_refused: 5, ..now };
        let line = summary(&refusing, &since, Duration::from_secs(10));
        assert!(line.ends_with("; 5 relayed values refused (origin not in accept_relayed)"), "{line}");
    }
}
