//! The bus's memory of requests that were sent and not yet answered, per unit: what keeps a
//! late reply from being taken as the answer to a different request. Sans-I/O: every
//! method takes `now`, nothing here reads a clock or a port, so the timing rules are
//! unit-tested with made-up instants.
//!
//! A device that answers after the response timeout (a slow PLC, a radio modem, a device
//! working through a receive queue) still answers: its reply arrives later, in whatever
//! window the bus has open then. Retries of the same request are interchangeable (either
//! reply carries the right data); a reply crossing into a *different* request's window is
//! what serves wrong values. The rules, per key (the unit id, or the whole bus for framings
//! whose replies do not name the unit):
//!
//! - every request sent is an entry until a reply from its key is heard (which answers
//!   the oldest entry: devices answer in order) or it expires;
//! - an entry can be answered until `from + max(4 × timeout, learned + 2 × timeout)`, where
//!   `from` is the later of its send time and the key's last reply (a device with a
//!   receive queue starts on a request only once it has answered the one before) and
//!   `learned` is the longest send-to-reply time seen from the key, measured from the
//!   oldest entry (the conservative end), capped at [`LEARNED_CAP`]. Before anything is
//!   learned, a device may be up to about three timeouts late without its reply crossing
//!   into another request's window; the margin of a whole timeout beyond the learned
//!   delay absorbs jitter (a busy device, a loaded host). A device slower than that the
//!   first time can still cross once: nothing on the wire tells its late reply from the
//!   next request's prompt one;
//! - nothing new is sent to a key while any of its entries can still be answered
//!   ([`Ledger::blocked_until`]); the engine listens meanwhile, so a late reply frees the
//!   key as soon as it is heard;
//! - entries leave only by being answered or by expiring: a later success clears nothing.
//!   A transaction that sent three attempts and heard one reply leaves two entries;
//! - a reply heard during a transaction is accepted only when every entry still open for
//!   its key belongs to that transaction ([`Ledger::judge`]).
//!
//! Invariants: entries of a key are kept oldest first; the learned bound never shrinks
//! and never exceeds [`LEARNED_CAP`]; a key with no entries holds no state but its
//! learned bound and last reply time.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_modbus::Request;

use super::pass::{PassQueue, Taken};
use super::{Job, PASS_THROUGH_STREAK, Priority};

/// Who a reply can be attributed to: a unit id, or `None` for the whole bus when the
/// framing's replies do not name the unit (raw devices).
pub type Key = Option<u8>;

/// Longest late-reply time the ledger learns: a device slower than this is dead for the
/// bus's purposes, and a key is never held back longer because of one late reply.
pub const LEARNED_CAP: Duration = Duration::from_secs(30);

/// A request on the wire, waiting for its reply.
#[derive(Debug, Clone)]
pub struct Entry<T> {
    /// When the request had left the UART.
    pub sent: Instant,
    /// The transaction that sent it (attempts of one transaction share it).
    pub txn: u64,
    /// The response timeout it was sent with.
    pub timeout: Duration,
    /// What the engine needs to recognise its reply (the unit and request).
    pub what: T,
}

#[derive(Debug)]
struct KeyState<T> {
    pending: VecDeque<Entry<T>>,
    learned: Duration,
    last_reply: Option<Instant>,
    /// The newest entry that expired unanswered: a reply to it heard after the expiry,
    /// with nothing else open, is its late reply and teaches the bound.
    expired: Option<Entry<T>>,
}

impl<T> Default for KeyState<T> {
    fn default() -> Self {
        Self { pending: VecDeque::new(), learned: Duration::ZERO, last_reply: None, expired: None }
    }
}

impl<T> KeyState<T> {
    fn until(&self, e: &Entry<T>) -> Instant {
        let from = self.last_reply.map_or(e.sent, |r| r.max(e.sent));
        from + (e.timeout * 4).max(self.learned + e.timeout * 2)
    }

    fn expire(&mut self, now: Instant) -> usize {
        let before = self.pending.len();
        let mut keep = VecDeque::with_capacity(before);
        for e in std::mem::take(&mut self.pending) {
            if self.until(&e) > now {
                keep.push_back(e);
            } else if self.expired.as_ref().is_none_or(|x| x.sent <= e.sent) {
                self.expired = Some(e);
            }
        }
        self.pending = keep;
        before - self.pending.len()
    }

    fn learn(&mut self, took: Duration) {
        self.learned = self.learned.max(took).min(LEARNED_CAP);
    }

    /// A reply from this key at `now`: answers the oldest entry and learns from it.
    /// Returns the entry answered and whether the reply came after its timeout.
    fn answer(&mut self, now: Instant) -> Option<(Entry<T>, bool)> {
        let oldest = self.pending.pop_front()?;
        let took = now.saturating_duration_since(oldest.sent);
        let late = took > oldest.timeout;
        if late {
            self.learn(took);
        }
        self.last_reply = Some(now);
        Some((oldest, late))
    }
}

/// What a reply heard during a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judged {
    /// The answer to this transaction's request (`late`: after its attempt's timeout,
    /// while the retry was held back).
    Accept {
        /// Heard after the attempt's timeout.
        late: bool,
    },
    /// The late answer to an earlier transaction's request: discard it.
    Late,
    /// Nothing was waiting for a reply from this key: discard it.
    Unexpected,
}

/// Requests sent and not yet answered, per key (see the module doc for the rules).
#[derive(Debug)]
pub struct Ledger<T> {
    keys: HashMap<Key, KeyState<T>>,
    /// Entries that expired unanswered, since the ledger was made.
    expired: u64,
}

impl<T> Default for Ledger<T> {
    fn default() -> Self {
        Self { keys: HashMap::new(), expired: 0 }
    }
}

impl<T> Ledger<T> {
    /// Records a request for `key` that left the UART at `now`.
    pub fn sent(&mut self, key: Key, txn: u64, timeout: Duration, what: T, now: Instant) {
        self.keys.entry(key).or_default().pending.push_back(Entry { sent: now, txn, timeout, what });
    }

    /// Drops the entries that can no longer be answered at `now`.
    pub fn expire(&mut self, now: Instant) {
        let mut expired = 0;
        for state in self.keys.values_mut() {
            expired += state.expire(now) as u64;
        }
        self.expired += expired;
    }

    /// `Some(t)`: `key` has entries that can be answered until `t` (nothing new may be sent
    /// to it before); `None`: it is free.
    pub fn blocked_until(&mut self, key: Key, now: Instant) -> Option<Instant> {
        let state = self.keys.get_mut(&key)?;
        self.expired += state.expire(now) as u64;
        state.pending.iter().map(|e| state.until(e)).max()
    }

    /// True when nothing may be sent to `key` at `now`.
    pub fn blocked(&mut self, key: Key, now: Instant) -> bool {
        self.blocked_until(key, now).is_some()
    }

    /// The earliest instant some key's entries may expire (the engine wakes then).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.keys.values().flat_map(|s| s.pending.iter().map(|e| s.until(e))).min()
    }

    /// True when some request is still waiting for its reply.
    pub fn any_pending(&self) -> bool {
        self.keys.values().any(|s| !s.pending.is_empty())
    }

    /// Per key, the entry a reply heard now would answer: the oldest open one, else the
    /// newest one given up on (within [`LEARNED_CAP`] of its send). For recognising
    /// stray replies; never a reason to accept one.
    pub fn candidates(&self, now: Instant) -> impl Iterator<Item = (Key, &Entry<T>)> {
        self.keys.iter().filter_map(move |(k, s)| {
            let recent = |e: &&Entry<T>| now.saturating_duration_since(e.sent) <= LEARNED_CAP;
            s.pending.front().or(s.expired.as_ref().filter(recent)).map(|e| (*k, e))
        })
    }

    /// A reply from `key` heard at `now` while transaction `txn` is running for that key:
    /// accepted only if every open entry of the key is `txn`'s.
    pub fn judge(&mut self, key: Key, txn: u64, now: Instant) -> Judged {
        let state = self.keys.entry(key).or_default();
        self.expired += state.expire(now) as u64;
        let ours = state.pending.iter().all(|e| e.txn == txn);
        match state.answer(now) {
            None => Judged::Unexpected,
            Some((_, late)) if ours => Judged::Accept { late },
            Some(_) => Judged::Late,
        }
    }

    /// A reply from `key` heard at `now` outside any transaction of that key (while idle,
    /// or during another unit's transaction): it answers the key's oldest entry. Returns
    /// false when nothing was waiting for it.
    pub fn stray(&mut self, key: Key, now: Instant) -> bool {
        let state = self.keys.entry(key).or_default();
        // Answer before expiring: an entry whose horizon passed a moment ago may be the
        // one answered now.
        if state.answer(now).is_some() {
            self.expired += state.expire(now) as u64;
            return true;
        }
        // Nothing open: the late reply of a request given up on. It does not answer
        // anything, but the device has shown how late it can be.
        if let Some(e) = state.expired.take() {
            state.learn(now.saturating_duration_since(e.sent));
            state.last_reply = Some(now);
        }
        false
    }

    /// The connection the requests went out on is gone and a new one is open (a
    /// Modbus-TCP device): nothing sent on the old one can be answered on the new one, so
    /// every open entry is dropped, and so is every entry given up on. What was learned
    /// of each key's delays stays.
    pub fn connection_lost(&mut self) {
        for state in self.keys.values_mut() {
            state.pending.clear();
            state.expired = None;
        }
    }

    /// The longest send-to-reply time learned for `key` so far.
    pub fn learned(&self, key: Key) -> Duration {
        self.keys.get(&key).map_or(Duration::ZERO, |s| s.learned)
    }

    /// Open entries of `key`.
    pub fn pending(&self, key: Key) -> usize {
        self.keys.get(&key).map_or(0, |s| s.pending.len())
    }

    /// Entries that expired unanswered so far.
    pub fn expired(&self) -> u64 {
        self.expired
    }
}

/// Heap entry: priority, then submission order.
#[derive(Debug)]
struct Queued {
    priority: Priority,
    seq: u64,
    job: Job,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    // BinaryHeap pops the greatest: reverse so the lowest (priority, seq) comes first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.priority, other.seq).cmp(&(self.priority, self.seq))
    }
}

/// Takes the most urgent poll out of `heap` whose unit is not held back, if any.
fn take_poll(heap: &mut BinaryHeap<Queued>, held: &impl Fn(u8) -> bool) -> Option<Queued> {
    let mut items = std::mem::take(heap).into_vec();
    let best = items
        .iter()
        .enumerate()
        .filter(|(_, q)| matches!(q.priority, Priority::Poll { .. }) && !held(q.job.unit))
        .max_by(|a, b| a.1.cmp(b.1))
        .map(|(i, _)| i);
    let poll = best.map(|i| items.swap_remove(i));
    *heap = BinaryHeap::from(items);
    poll
}

/// What the bus runs next: its queue by priority, the masters' turn, and the ledger of
/// requests whose replies may still come. Sans-I/O: [`Schedule::next`] takes `now`.
///
/// Invariants: the queue never holds more than its depth; a job for a unit the ledger
/// holds is never picked (it waits, others go by); after [`PASS_THROUGH_STREAK`]
/// masters' transactions in a row, a waiting poll goes next.
#[derive(Debug)]
pub struct Schedule {
    heap: BinaryHeap<Queued>,
    seq: u64,
    depth: usize,
    streak: u32,
    /// Replies name their unit: a held unit holds only itself, not the whole bus.
    addressed: bool,
    /// Requests sent and not answered yet.
    pub ledger: Ledger<(u8, Request<'static>)>,
}

impl Schedule {
    /// An empty schedule holding at most `depth` jobs.
    pub fn new(depth: usize, addressed: bool) -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
            depth: depth.max(1),
            streak: 0,
            addressed,
            ledger: Ledger::default(),
        }
    }

    /// True when another job fits.
    pub fn has_room(&self) -> bool {
        self.heap.len() < self.depth
    }

    /// Jobs waiting (masters' requests not counted).
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when no job waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Queues a job (the caller checks [`Schedule::has_room`]).
    pub fn push(&mut self, job: Job) {
        self.seq += 1;
        self.heap.push(Queued { priority: job.priority, seq: self.seq, job });
    }

    /// Records that a job of `priority` went on the line (the masters' streak).
    pub fn ran(&mut self, priority: Priority) {
        self.streak = if priority == Priority::PassThrough { self.streak + 1 } else { 0 };
    }

    /// The transaction to run at `now` (a master's, or the gateway's own); `None` when
    /// nothing may run (nothing waits, or every waiting job's unit may still answer late).
    pub fn next(&mut self, now: Instant, pass: &Arc<PassQueue>) -> Option<Taken> {
        self.next_where(now, pass, |_| true)
    }

    /// [`Schedule::next`], with only units `ready` accepts eligible (a bus that pipelines:
    /// a unit with a write outstanding gets nothing more until it is answered).
    pub fn next_where(
        &mut self,
        now: Instant,
        pass: &Arc<PassQueue>,
        ready: impl Fn(u8) -> bool,
    ) -> Option<Taken> {
        self.ledger.expire(now);
        let (ledger, addressed) = (&self.ledger, self.addressed);
        let held = |unit: u8| ledger.pending(addressed.then_some(unit)) > 0 || !ready(unit);
        let mut kept = Vec::new();
        let mut picked = None;
        while let Some(q) = self.heap.pop() {
            if held(q.job.unit) {
                kept.push(q);
            } else {
                picked = Some(q);
                break;
            }
        }
        self.heap.extend(kept);
        if self.streak >= PASS_THROUGH_STREAK
            && picked.as_ref().is_some_and(|q| q.priority == Priority::PassThrough)
            && let Some(poll) = take_poll(&mut self.heap, &held)
        {
            self.heap.extend(picked.replace(poll));
        }
        // Masters' requests come after writes and before polls, except that a poll that
        // has waited behind a streak of pass-through transactions goes first.
        let masters_turn = match &picked {
            None => true,
            Some(q) => matches!(q.priority, Priority::Poll { .. }) && self.streak < PASS_THROUGH_STREAK,
        };
        let from_master = if masters_turn { pass.take(|unit| !held(unit)) } else { None };
        match (from_master, picked) {
            (Some(taken), picked) => {
                self.heap.extend(picked);
                Some(taken)
            }
            (None, Some(q)) => Some(Taken::own(q.job)),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(100);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_timed_out_request_holds_its_unit_for_three_more_timeouts() {
        let t0 = Instant::now();
        let mut l = Ledger::default();
        l.sent(Some(1), 1, T, (), t0);
        assert_eq!(l.blocked_until(Some(1), t0 + T), Some(t0 + T * 4));
        assert!(l.blocked(Some(1), t0 + ms(399)));
        assert!(!l.blocked(Some(1), t0 + ms(400)), "expired after three more timeouts of silence");
        assert_eq!(l.expired(), 1);
        // Other units were never held.
        l.sent(Some(1), 2, T, (), t0 + ms(400));
        assert!(!l.blocked(Some(2), t0 + ms(400)));
    }

    #[test]
    fn the_late_reply_frees_the_unit_and_teaches_the_bound() {
        let t0 = Instant::now();
        let mut l = Ledger::default();
        l.sent(Some(1), 1, T, (), t0);
        // Heard 250 ms after sending, while another unit was served.
        assert!(l.stray(Some(1), t0 + ms(250)));
        assert!(!l.blocked(Some(1), t0 + ms(250)));
        assert_eq!(l.learned(Some(1)), ms(250));
        // From now on a timed-out request to this unit is held for 250 ms + two timeouts
        // after the later of its send and the last reply.
        l.sent(Some(1), 2, T, (), t0 + ms(260));
        assert_eq!(l.blocked_until(Some(1), t0 + ms(300)), Some(t0 + ms(260 + 250 + 200)));
    }

    /// A device with a receive queue answers request k a delay after the later of its
    /// arrival and the reply to k-1: the horizon runs from the last reply, so the retry's
    /// reply, which comes a whole delay after the first attempt's, is still waited for.
    #[test]
    fn a_queued_device_is_waited_for_from_its_last_reply() {
        let t0 = Instant::now();
        let d = ms(250);
        let mut l = Ledger::default();
        // Attempt 1 at 0 is held (no retry) until 400; its reply at 250 arrives during
        // the hold and answers the transaction.
        l.sent(Some(1), 1, T, (), t0);
        assert_eq!(l.judge(Some(1), 1, t0 + d), Judged::Accept { late: true });
        assert!(!l.blocked(Some(1), t0 + d));
        // Two attempts of one transaction, both unanswered for a while.
        l.sent(Some(1), 2, T, (), t0 + ms(300));
        l.sent(Some(1), 2, T, (), t0 + ms(300) + ms(350));
        // The first one's reply at 300 + 250: accepted, the second still open.
        assert_eq!(l.judge(Some(1), 2, t0 + ms(550)), Judged::Accept { late: true });
        assert_eq!(l.pending(Some(1)), 1);
        // A later transaction's request must not go while the device may still answer:
        // its reply is due at 650 + 250 = 900 at the latest, the ledger holds until
        // 650 + 250 + 2 x 100 = 1100.
        let until = l.blocked_until(Some(1), t0 + ms(700)).expect("still held");
        assert!(until > t0 + ms(900), "{:?}", until - t0);
        // And when it comes during another transaction of this unit (the engine would
        // not send one, but if it did) it is not that transaction's answer.
        l.sent(Some(1), 3, T, (), t0 + ms(800));
        assert_eq!(l.judge(Some(1), 3, t0 + ms(900)), Judged::Late);
        assert_eq!(l.judge(Some(1), 3, t0 + ms(1000)), Judged::Accept { late: true });
    }

    #[test]
    fn a_later_success_clears_nothing() {
        let t0 = Instant::now();
        let mut l = Ledger::default();
        // Three copies on the wire, one reply heard.
        for k in 0..3 {
            l.sent(Some(4), 7, T, (), t0 + ms(10) * k);
        }
        assert_eq!(l.judge(Some(4), 7, t0 + ms(250)), Judged::Accept { late: true });
        assert_eq!(l.pending(Some(4)), 2);
        // The unit stays held for another transaction: two replies may still come.
        assert!(l.blocked(Some(4), t0 + ms(300)));
        assert_eq!(l.judge(Some(4), 8, t0 + ms(300)), Judged::Late);
    }

    /// A Modbus-TCP device's connection was replaced: the request sent on the old one can
    /// no longer be answered, so its unit is free at once, and its reply is nobody's.
    #[test]
    fn a_lost_connection_frees_every_unit_at_once() {
        let t0 = Instant::now();
        let mut l = Ledger::default();
        l.sent(Some(1), 1, T, (), t0);
        l.sent(Some(2), 2, T, (), t0);
        assert!(l.stray(Some(2), t0 + ms(250)), "unit 2 was late once");
        l.sent(Some(2), 3, T, (), t0 + ms(300));
        assert!(l.blocked(Some(1), t0 + T));
        l.connection_lost();
        assert!(!l.blocked(Some(1), t0 + T));
        assert!(!l.blocked(Some(2), t0 + ms(300)));
        assert!(!l.any_pending());
        assert_eq!(l.candidates(t0 + ms(300)).count(), 0, "no late reply is expected");
        assert_eq!(l.learned(Some(2)), ms(250), "what was learned stays");
    }

    #[test]
    fn nothing_pending_means_unexpected() {
        let t0 = Instant::now();
        let mut l: Ledger<()> = Ledger::default();
        assert_eq!(l.judge(None, 1, t0), Judged::Unexpected);
        assert!(!l.stray(Some(3), t0));
    }

    #[test]
    fn the_learned_bound_is_capped() {
        let t0 = Instant::now();
        let mut l = Ledger::default();
        l.sent(None, 1, T, (), t0);
        assert!(l.stray(None, t0 + Duration::from_secs(100)));
        assert_eq!(l.learned(None), LEARNED_CAP);
        l.sent(None, 2, T, (), t0 + Duration::from_secs(100));
        let until = l.blocked_until(None, t0 + Duration::from_secs(100)).expect("held");
        assert_eq!(until - t0, Duration::from_secs(100) + T * 2 + LEARNED_CAP);
    }

    #[test]
    fn a_reply_just_after_expiry_still_teaches() {
        let t0 = Instant::now();
        let mut l = Ledger::default();
        l.sent(Some(1), 1, T, (), t0);
        // Heard at 320, before its horizon (400).
        assert!(l.stray(Some(1), t0 + ms(320)));
        assert_eq!(l.learned(Some(1)), ms(320));
        // Expired and forgotten by the time the reply comes: still a lesson.
        l.sent(Some(2), 2, T, (), t0);
        assert!(!l.blocked(Some(2), t0 + ms(400)));
        assert!(!l.stray(Some(2), t0 + ms(450)), "nothing open any more");
        assert_eq!(l.learned(Some(2)), ms(450));
    }

    type Waiting = tokio::sync::oneshot::Receiver<Result<tokio_modbus::Response, crate::bus::BusError>>;

    /// A job reading register `at` (the receiver is pushed to `keep`: a job nobody
    /// waits for is dropped by the masters' queue).
    fn job_at(unit: u8, priority: Priority, at: u16, keep: &mut Vec<Waiting>) -> Job {
        let (reply, rx) = tokio::sync::oneshot::channel();
        keep.push(rx);
        Job {
            unit,
            request: Request::ReadHoldingRegisters(at, 1),
            priority,
            timeout: T,
            turnaround: Duration::ZERO,
            retries: 1,
            reply,
        }
    }

    /// A unit that may still answer late gets nothing new, writes included; the other
    /// units go by; once its horizon has passed it is served again, in priority order.
    #[test]
    fn a_held_unit_waits_and_the_others_go_by() {
        let t0 = Instant::now();
        let (pass, mut keep) = (Arc::new(PassQueue::default()), Vec::new());
        let mut s = Schedule::new(8, true);
        s.ledger.sent(Some(1), 1, T, (1, Request::ReadHoldingRegisters(0, 1)), t0);
        s.push(job_at(1, Priority::Write, 0, &mut keep));
        s.push(job_at(2, Priority::Poll { deadline: t0 }, 0, &mut keep));
        let first = s.next(t0 + T, &pass).expect("unit 2 runs");
        assert_eq!((first.job.unit, first.master()), (2, None));
        assert!(s.next(t0 + T, &pass).is_none(), "unit 1 is held");
        assert_eq!(s.len(), 1);
        let second = s.next(t0 + T * 4, &pass).expect("released after four timeouts");
        assert_eq!(second.job.unit, 1);
    }

    /// Replies that name no unit (raw devices): one late reply holds the whole bus.
    #[test]
    fn a_bus_without_addresses_is_held_whole() {
        let t0 = Instant::now();
        let (pass, mut keep) = (Arc::new(PassQueue::default()), Vec::new());
        let mut s = Schedule::new(8, false);
        s.ledger.sent(None, 1, T, (1, Request::Custom(0, vec![1].into())), t0);
        s.push(job_at(2, Priority::Write, 0, &mut keep));
        assert!(s.next(t0 + T, &pass).is_none());
        assert!(s.next(t0 + T * 4, &pass).is_some());
    }

    /// After PASS_THROUGH_STREAK masters' requests in a row, a waiting poll goes first.
    #[test]
    fn masters_cannot_starve_polls() {
        let t0 = Instant::now();
        let (pass, mut keep) = (Arc::new(PassQueue::default()), Vec::new());
        let mut s = Schedule::new(8, true);
        for m in 0..4u16 {
            pass.submit(u64::from(m), job_at(2, Priority::PassThrough, m, &mut keep), 4).expect("queued");
        }
        s.push(job_at(1, Priority::Poll { deadline: t0 }, 0, &mut keep));
        let mut order = Vec::new();
        while let Some(taken) = s.next(t0, &pass) {
            s.ran(taken.job.priority);
            order.push(if taken.master().is_some() { 'm' } else { 'p' });
        }
        let want: Vec<char> = std::iter::repeat_n('m', PASS_THROUGH_STREAK as usize)
            .chain(['p'])
            .chain(std::iter::repeat_n('m', 4 - PASS_THROUGH_STREAK as usize))
            .collect();
        assert_eq!(order, want);
    }
}
