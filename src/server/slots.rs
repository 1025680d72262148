//! Master admission: the `max_connections` slots, and which connected master gives way
//! when a new one arrives and all are taken ([`Slots`], sans I/O), with each
//! connection's close switch ([`Masters`]).
//!
//! Invariants: at most `capacity` masters hold a slot; a full table reclaims the slot of
//! the longest-idle master (the oldest last request, or connect), never one that has a
//! request being answered; when every master is being answered the newcomer is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::pass::MasterId;

/// The connected masters, and which one gives way when a new one arrives and all slots
/// are taken. Sans I/O: the caller passes `now` and closes the connection it is told to.
#[derive(Debug)]
pub struct Slots {
    capacity: usize,
    masters: HashMap<MasterId, Activity>,
}

#[derive(Debug, Clone, Copy)]
struct Activity {
    /// The last request (or the connect).
    last: Instant,
    /// A request of it is being answered.
    busy: bool,
}

/// What becomes of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A free slot.
    Free,
    /// The slot of this master, idle this long: close it.
    Reclaimed(MasterId, Duration),
    /// Every master is being answered: refuse the newcomer.
    Full,
}

impl Slots {
    /// Room for `capacity` masters.
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), masters: HashMap::new() }
    }

    /// Admits `master`, reclaiming the longest-idle slot when full.
    pub fn admit(&mut self, master: MasterId, now: Instant) -> Admission {
        let verdict = if self.masters.len() < self.capacity {
            Admission::Free
        } else {
            match self.masters.iter().filter(|(_, a)| !a.busy).min_by_key(|(id, a)| (a.last, **id)) {
                Some((&id, a)) => Admission::Reclaimed(id, now.saturating_duration_since(a.last)),
                None => return Admission::Full,
            }
        };
        if let Admission::Reclaimed(id, _) = verdict {
            self.masters.remove(&id);
        }
        self.masters.insert(master, Activity { last: now, busy: false });
        verdict
    }

    /// `master` sent a request at `now`; it is busy until [`Slots::answered`].
    pub fn request(&mut self, master: MasterId, now: Instant) {
        if let Some(a) = self.masters.get_mut(&master) {
            a.last = now;
            a.busy = true;
        }
    }

    /// Every request of `master` so far is answered.
    pub fn answered(&mut self, master: MasterId) {
        if let Some(a) = self.masters.get_mut(&master) {
            a.busy = false;
        }
    }

    /// `master` disconnected.
    pub fn remove(&mut self, master: MasterId) {
        self.masters.remove(&master);
    }

    /// Masters connected.
    pub fn len(&self) -> usize {
        self.masters.len()
    }

    /// No master connected.
    pub fn is_empty(&self) -> bool {
        self.masters.is_empty()
    }
}

/// The slot table with each connection's close switch, shared by the accept loop and
/// the connections.
pub(super) struct Masters {
    pub(super) slots: Slots,
    pub(super) close: HashMap<MasterId, (CancellationToken, SocketAddr)>,
}

pub(super) type SharedMasters = Arc<Mutex<Masters>>;

pub(super) fn lock(m: &SharedMasters) -> std::sync::MutexGuard<'_, Masters> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn when_full_the_longest_idle_master_gives_way() {
        let t0 = Instant::now();
        let mut s = Slots::new(3);
        assert_eq!(s.admit(1, t0), Admission::Free);
        assert_eq!(s.admit(2, t0 + MS(1)), Admission::Free);
        assert_eq!(s.admit(3, t0 + MS(2)), Admission::Free);
        // 1 asked something recently and was answered; 2 has been quiet since connecting.
        s.request(1, t0 + MS(5000));
        s.answered(1);
        s.request(3, t0 + MS(6000));
        s.answered(3);
        assert_eq!(s.admit(4, t0 + MS(8400)), Admission::Reclaimed(2, MS(8399)));
        assert_eq!(s.len(), 3);
        // Next the least recent requester, 1.
        assert_eq!(s.admit(5, t0 + MS(8500)), Admission::Reclaimed(1, MS(3500)));
    }

    #[test]
    fn a_master_being_answered_is_never_reclaimed() {
        let t0 = Instant::now();
        let mut s = Slots::new(2);
        s.admit(1, t0);
        s.admit(2, t0);
        s.request(1, t0 + MS(1));
        // 1 is older-idle by its request time than nothing: only 2 is idle.
        assert_eq!(s.admit(3, t0 + MS(10)), Admission::Reclaimed(2, MS(10)));
        s.request(3, t0 + MS(11));
        // Both busy: the newcomer is refused and nothing changes.
        assert_eq!(s.admit(4, t0 + MS(20)), Admission::Full);
        assert_eq!(s.len(), 2);
        s.answered(1);
        assert_eq!(s.admit(5, t0 + MS(30)), Admission::Reclaimed(1, MS(29)));
        s.remove(3);
        s.remove(5);
        assert!(s.is_empty());
    }
}
