//! The requests a pipelining Modbus-TCP bus (`max_in_flight` > 1) has outstanding on its
//! connection: their transaction ids, timeouts and retries, and which replies are whose.
//! Sans-I/O: every method that needs the time takes `now`; the engine
//! (`engine/pipelined.rs`) does the sending and reading.
//!
//! Invariants:
//! - at most `max` requests are open, and no two open requests share a transaction id;
//! - while a non-read (a write, or any function but FC1–4) to a unit is open, nothing
//!   else is sent to that unit ([`InFlight::ready`]), so writes to one unit never cross;
//! - a reply is taken only for an open request whose id *and* unit match
//!   ([`InFlight::lookup`]); an id that was open and was given up on (or answered after a
//!   resend, which may bring a second reply) is a late reply, any other a foreign frame;
//! - a timed-out request with retries left is resent under the same id (the same
//!   transaction: either reply is right); without, it leaves and its id becomes late;
//! - [`InFlight::reset`] (the connection is gone) empties everything: nothing sent on the
//!   old connection can be answered on the next one.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How many ids of requests given up on are remembered, to count their late replies.
const REMEMBERED: usize = 64;

/// One request on the connection.
#[derive(Debug)]
pub struct Open<T> {
    /// Its MBAP transaction id.
    pub tid: u16,
    /// The unit it is for.
    pub unit: u8,
    /// A write (or other non-read): its unit gets nothing else meanwhile.
    pub exclusive: bool,
    /// When the current attempt times out.
    pub deadline: Instant,
    /// Attempts sent so far.
    pub attempts: u8,
    timeout: Duration,
    retries_left: u8,
    /// What the engine keeps with it (the job, the frame to resend).
    pub item: T,
}

/// Who a reply with some transaction id and unit is.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The reply to an open request (still to be checked against its function).
    Open,
    /// A reply to a request given up on, or a second reply to a resent one.
    Late,
    /// Not ours: an id never issued, or an open id with the wrong unit.
    Foreign,
}

/// What a deadline did.
#[derive(Debug)]
pub enum Expired<T> {
    /// Resend the request with this id (its deadline was moved on).
    Resend(u16),
    /// The request is given up on, after this many attempts.
    Failed(Open<T>),
}

/// The open requests of one connection (see the module doc).
#[derive(Debug)]
pub struct InFlight<T> {
    max: usize,
    next_tid: u16,
    open: Vec<Open<T>>,
    late: VecDeque<u16>,
}

impl<T> InFlight<T> {
    /// Room for `max` (at least 1) open requests.
    pub fn new(max: usize) -> Self {
        Self { max: max.max(1), next_tid: 0, open: Vec::new(), late: VecDeque::new() }
    }

    /// True when another request may be sent.
    pub fn has_room(&self) -> bool {
        self.open.len() < self.max
    }

    /// Open requests.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// True when nothing is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// True when a request to `unit` may be sent now: no write to it is open.
    pub fn ready(&self, unit: u8) -> bool {
        !self.open.iter().any(|o| o.unit == unit && o.exclusive)
    }

    /// Records a request sent at `now` and returns the transaction id it must carry
    /// (the caller encodes it with that id; ids skip any still open).
    pub fn start(
        &mut self,
        unit: u8,
        exclusive: bool,
        timeout: Duration,
        retries: u8,
        item: T,
        now: Instant,
    ) -> u16 {
        let mut tid = self.next_tid.wrapping_add(1);
        while self.open.iter().any(|o| o.tid == tid) {
            tid = tid.wrapping_add(1);
        }
        self.next_tid = tid;
        self.late.retain(|t| *t != tid);
        self.open.push(Open {
            tid,
            unit,
            exclusive,
            deadline: now + timeout,
            attempts: 1,
            timeout,
            retries_left: retries,
            item,
        });
        tid
    }

    /// The open request with id `tid`.
    pub fn get(&self, tid: u16) -> Option<&Open<T>> {
        self.open.iter().find(|o| o.tid == tid)
    }

    /// The open request with id `tid`, to change what the engine keeps with it.
    pub fn get_mut(&mut self, tid: u16) -> Option<&mut Open<T>> {
        self.open.iter_mut().find(|o| o.tid == tid)
    }

    /// Who a reply carrying `tid` from `unit` is.
    pub fn lookup(&self, tid: u16, unit: u8) -> Lookup {
        match self.get(tid) {
            Some(o) if o.unit == unit => Lookup::Open,
            Some(_) => Lookup::Foreign,
            None if self.late.contains(&tid) => Lookup::Late,
            None => Lookup::Foreign,
        }
    }

    /// The request `tid` is answered: it leaves. A resent one may still bring the other
    /// attempt's reply, so its id is remembered as late.
    pub fn finish(&mut self, tid: u16) -> Option<Open<T>> {
        let i = self.open.iter().position(|o| o.tid == tid)?;
        let done = self.open.swap_remove(i);
        if done.attempts > 1 {
            self.remember(tid);
        }
        Some(done)
    }

    /// The earliest deadline of an open request.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.iter().map(|o| o.deadline).min()
    }

    /// The requests whose attempt timed out by `now`: resent (deadline moved on) or
    /// given up on (removed, their ids remembered as late).
    pub fn expire(&mut self, now: Instant) -> Vec<Expired<T>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.open.len() {
            let o = &mut self.open[i];
            if o.deadline > now {
                i += 1;
            } else if o.retries_left > 0 {
                o.retries_left -= 1;
                o.attempts += 1;
                o.deadline = now + o.timeout;
                out.push(Expired::Resend(o.tid));
                i += 1;
            } else {
                let gone = self.open.swap_remove(i);
                self.remember(gone.tid);
                out.push(Expired::Failed(gone));
            }
        }
        out
    }

    /// The connection is gone: every open request leaves (the caller fails them), and no
    /// reply is expected any more.
    pub fn reset(&mut self) -> Vec<Open<T>> {
        self.late.clear();
        std::mem::take(&mut self.open)
    }

    fn remember(&mut self, tid: u16) {
        if self.late.len() == REMEMBERED {
            self.late.pop_front();
        }
        self.late.push_back(tid);
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
    fn up_to_max_requests_are_open_each_with_its_own_id() {
        let t0 = Instant::now();
        let mut f = InFlight::new(3);
        let ids: Vec<u16> = (0..3).map(|k| f.start(1, false, T, 0, k, t0)).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(!f.has_room());
        // Answered out of order: each reply finds its own request.
        assert_eq!(f.lookup(3, 1), Lookup::Open);
        assert_eq!(f.finish(3).map(|o| o.item), Some(2));
        assert_eq!(f.finish(1).map(|o| o.item), Some(0));
        assert!(f.has_room());
        assert_eq!(f.len(), 1);
        // A reply to an id nobody sent, or an open id from another unit: foreign.
        assert_eq!(f.lookup(9, 1), Lookup::Foreign);
        assert_eq!(f.lookup(2, 7), Lookup::Foreign);
        // A reply to an id answered once (sent once): foreign too, never data.
        assert_eq!(f.lookup(3, 1), Lookup::Foreign);
    }

    #[test]
    fn ids_skip_those_still_open_and_wrap() {
        let t0 = Instant::now();
        let mut f = InFlight::new(4);
        f.next_tid = u16::MAX - 1;
        assert_eq!(f.start(1, false, T, 0, (), t0), u16::MAX);
        assert_eq!(f.start(1, false, T, 0, (), t0), 0);
        f.next_tid = u16::MAX - 1;
        assert_eq!(f.start(1, false, T, 0, (), t0), 1, "65535 and 0 are still open");
    }

    #[test]
    fn each_request_times_out_on_its_own_and_is_resent_under_its_id() {
        let t0 = Instant::now();
        let mut f = InFlight::new(4);
        let a = f.start(1, false, T, 1, 'a', t0);
        let b = f.start(2, false, T, 0, 'b', t0 + ms(50));
        assert_eq!(f.next_deadline(), Some(t0 + T));
        assert!(f.expire(t0 + ms(99)).is_empty());
        let first = f.expire(t0 + T);
        assert!(matches!(first[..], [Expired::Resend(id)] if id == a), "{first:?}");
        assert_eq!(f.get(a).map(|o| (o.attempts, o.deadline)), Some((2, t0 + ms(200))));
        let second = f.expire(t0 + ms(150));
        assert!(matches!(&second[..], [Expired::Failed(o)] if o.tid == b && o.attempts == 1), "{second:?}");
        // b's reply, now: late, not data.
        assert_eq!(f.lookup(b, 2), Lookup::Late);
        // a's first attempt answers; the resend's reply may follow: late as well.
        assert_eq!(f.finish(a).map(|o| o.attempts), Some(2));
        assert_eq!(f.lookup(a, 1), Lookup::Late);
        assert!(f.is_empty());
        assert_eq!(f.next_deadline(), None);
    }

    #[test]
    fn a_write_holds_its_unit_and_only_its_unit() {
        let t0 = Instant::now();
        let mut f = InFlight::new(8);
        f.start(1, false, T, 0, (), t0);
        assert!(f.ready(1), "reads to one unit go together");
        let w = f.start(1, true, T, 0, (), t0);
        assert!(!f.ready(1), "nothing more to unit 1 while its write is open");
        assert!(f.ready(2));
        f.finish(w);
        assert!(f.ready(1));
    }

    #[test]
    fn a_reset_empties_everything_and_expects_nothing() {
        let t0 = Instant::now();
        let mut f = InFlight::new(4);
        let a = f.start(1, false, T, 0, 'a', t0);
        let b = f.start(1, true, T, 0, 'b', t0);
        f.expire(t0 + T);
        assert_eq!(f.lookup(a, 1), Lookup::Late);
        let c = f.start(2, false, T, 0, 'c', t0 + T);
        let gone: Vec<char> = f.reset().into_iter().map(|o| o.item).collect();
        assert_eq!(gone, ['c']);
        assert!(f.is_empty() && f.ready(1));
        for id in [a, b, c] {
            assert_eq!(f.lookup(id, 1), Lookup::Foreign, "nothing of the old connection is expected");
        }
    }
}
