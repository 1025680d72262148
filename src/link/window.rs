//! A link session's timing and flow rules as plain state: the window of batches sent and
//! not yet acknowledged, and whether the peer is still alive. The session loop (link/session.rs)
//! does the I/O and asks these what to do; they take `now` and never sleep, so their rules
//! are unit-tested without a clock or a socket.
//!
//! Invariants: at most `size` batches are unacknowledged; batches go out in spool order,
//! each once per session; an ack frees every batch up to its sequence number; the spool is
//! read again only when it may hold more (the last read filled the room, an ack made room,
//! or the spool grew). A peer is dead after three heartbeats without a frame.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The batches sent to the peer and not yet acknowledged, and where the next spool read
/// starts.
#[derive(Debug)]
pub(crate) struct SendWindow {
    size: usize,
    /// The last batch read from the spool (sent, or skipped as unsendable).
    read_upto: u64,
    /// Sequence numbers sent and not yet acknowledged, oldest first.
    unacked: VecDeque<u64>,
    /// The spool may hold batches after `read_upto`.
    more: bool,
}

impl SendWindow {
    /// A window of `size` batches for a session that resumes after batch `resume` (the
    /// last one the peer has).
    pub(crate) fn new(size: usize, resume: u64) -> Self {
        SendWindow { size, read_upto: resume, unacked: VecDeque::new(), more: true }
    }

    /// What to read from the spool now: the batches after this sequence number, at most
    /// this many; `None` when the window is full or the spool has nothing more.
    pub(crate) fn wanted(&self) -> Option<(u64, usize)> {
        (self.more && self.unacked.len() < self.size)
            .then(|| (self.read_upto, self.size - self.unacked.len()))
    }

    /// A read for `asked` batches returned `got`: fewer means the spool has no more.
    pub(crate) fn read(&mut self, asked: usize, got: usize) {
        self.more = got == asked;
    }

    /// Batch `seq` was read from the spool; `sent` says it went out (an unsendable batch
    /// is skipped, and the next read starts after it all the same).
    pub(crate) fn passed(&mut self, seq: u64, sent: bool) {
        self.read_upto = seq;
        if sent {
            self.unacked.push_back(seq);
        }
    }

    /// The peer acknowledged every batch up to `seq`: how many that freed.
    pub(crate) fn acked(&mut self, seq: u64) -> usize {
        let before = self.unacked.len();
        while self.unacked.front().is_some_and(|s| *s <= seq) {
            self.unacked.pop_front();
        }
        self.more = true;
        before - self.unacked.len()
    }

    /// The spool has grown.
    pub(crate) fn spool_grew(&mut self) {
        self.more = true;
    }

    /// Nothing more to read until the spool grows: the loop waits for it.
    pub(crate) fn waits_for_spool(&self) -> bool {
        !self.more
    }
}

/// Whether the peer is alive: it sends a frame (a heartbeat at least) every heartbeat
/// interval, and is dead after three intervals without one.
#[derive(Debug)]
pub(crate) struct Liveness {
    last_heard: Instant,
    dead_after: Duration,
}

impl Liveness {
    /// Shortest heartbeat the rule works with.
    const MIN_HEARTBEAT: Duration = Duration::from_millis(10);

    /// A peer heard from at `now` (its hello), which sends every `heartbeat`.
    pub(crate) fn new(heartbeat: Duration, now: Instant) -> Self {
        Liveness { last_heard: now, dead_after: heartbeat.max(Self::MIN_HEARTBEAT) * 3 }
    }

    /// A frame arrived at `now`.
    pub(crate) fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// When the peer is dead if nothing arrives before.
    pub(crate) fn dead_at(&self) -> Instant {
        self.last_heard + self.dead_after
    }

    /// The silence that makes a peer dead.
    pub(crate) fn dead_after(&self) -> Duration {
        self.dead_after
    }

    /// Whether the peer is dead at `now`.
    #[cfg(test)]
    fn is_dead(&self, now: Instant) -> bool {
        now >= self.dead_at()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_reads_only_what_fits_and_an_ack_makes_room() {
        let mut w = SendWindow::new(4, 10);
        assert_eq!(w.wanted(), Some((10, 4)));
        // Four batches read and sent: the window is full.
        w.read(4, 4);
        for seq in 11..=14 {
            w.passed(seq, true);
        }
        assert_eq!(w.wanted(), None);
        // An ack of 12 frees two; the next read starts after 14.
        assert_eq!(w.acked(12), 2);
        assert_eq!(w.wanted(), Some((14, 2)));
        // An old ack frees nothing more.
        assert_eq!(w.acked(11), 0);
    }

    #[test]
    fn a_short_read_waits_for_the_spool_to_grow() {
        let mut w = SendWindow::new(4, 0);
        w.read(4, 1);
        w.passed(1, true);
        assert!(w.waits_for_spool());
        assert_eq!(w.wanted(), None);
        w.spool_grew();
        assert_eq!(w.wanted(), Some((1, 3)));
    }

    #[test]
    fn a_skipped_batch_is_read_past_but_never_waits_for_an_ack() {
        let mut w = SendWindow::new(2, 0);
        w.read(2, 2);
        w.passed(1, false);
        w.passed(2, true);
        assert_eq!(w.wanted(), Some((2, 1)));
        assert_eq!(w.acked(2), 1);
        assert_eq!(w.wanted(), Some((2, 2)));
    }

    #[test]
    fn a_peer_is_dead_after_three_heartbeats_of_silence() {
        let t0 = Instant::now();
        let mut l = Liveness::new(Duration::from_secs(1), t0);
        assert!(!l.is_dead(t0 + Duration::from_millis(2999)));
        assert!(l.is_dead(t0 + Duration::from_secs(3)));
        l.heard(t0 + Duration::from_secs(2));
        assert!(!l.is_dead(t0 + Duration::from_secs(4)));
        assert_eq!(l.dead_at(), t0 + Duration::from_secs(5));
        // A heartbeat too short to be real is taken as 10 ms.
        let fast = Liveness::new(Duration::ZERO, t0);
        assert_eq!(fast.dead_after(), Duration::from_millis(30));
    }
}
