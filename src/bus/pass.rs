//! Requests from Modbus-TCP masters on their way to one bus: per-master queues served
//! round-robin, so no master can starve another.
//!
//! A [`PassQueue`] belongs to a bus; it is a data structure, not a task. Server
//! connections put their masters' requests in (`submit`); the bus engine takes the next
//! one when a pass-through transaction is due (`take`) and answers it
//! ([`Taken::answer`]). The request taken comes from the next master in turn that has one
//! waiting for a unit the bus can serve now. With no task in between, a request costs one
//! hand-off to the bus and one back.
//!
//! Reads are shared: when the bus takes a read (FC1-4), the identical reads (same unit,
//! function, address and quantity) waiting at the head of other masters' queues are
//! taken with it and get the same answer. Each of them arrived before that transaction
//! started, so its answer is as fresh as if it had its own; several HMIs polling the same
//! registers cost the line one transaction instead of one each. Writes and other
//! functions are never shared, and a master's own requests keep their order (only queue
//! heads are shared).
//!
//! A master may have at most `max_in_flight` requests waiting or running on a bus; one
//! more is refused at once with `BusError::QueueFull` (the server answers exception 0x06,
//! server busy), as is any request past [`CAPACITY`] waiting on the bus.
//!
//! With one pass-through transaction on the line at a time, a master that pipelines gets
//! no more of the line than one that does not; and since the bus runs a waiting poll after
//! a short streak of pass-through transactions (bus.rs), masters together cannot starve
//! the polls either. On a bus that pipelines (a Modbus-TCP device with `max_in_flight`),
//! several requests are running at once; a master's running requests all count against
//! its limit.
//!
//! Invariants: a request whose master has gone (connection closed, reply receiver
//! dropped) is skipped, never sent; every request taken in gets exactly one outcome on
//! its reply channel, or the channel is dropped when the bus stops (`close`), which the
//! server reads as "bus closed". A request taken holds its masters' in-flight slots until
//! it is answered or dropped ([`Taken`]), and [`Taken::answer`] frees them *before* it
//! sends: a master that sends its next request the instant it has an answer finds room
//! for it, never "busy".

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, oneshot};
use tokio_modbus::{Request, Response};

use crate::bus::{BusError, Job};

/// Identifies one master (one TCP connection) for fairness.
pub type MasterId = u64;

/// Most requests waiting on one bus, all masters together (each connection is bounded
/// too: this only guards the bus against many masters at once).
pub const CAPACITY: usize = 4096;

/// The masters' requests waiting for one bus.
#[derive(Debug, Default)]
pub struct PassQueue {
    state: Mutex<State>,
    /// Signalled when a request comes in (a permit is kept if the bus is not waiting).
    arrived: Notify,
}

#[derive(Debug, Default)]
struct State {
    queues: BTreeMap<MasterId, VecDeque<Job>>,
    /// The masters whose requests are on the line (several when a read is shared).
    running: Vec<MasterId>,
    /// The master served last (round-robin position).
    last: MasterId,
    /// Requests waiting, all masters.
    waiting: usize,
    /// The bus has stopped: nothing is taken in any more.
    closed: bool,
}

impl PassQueue {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queues inconsistent (every
        // update is a single push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `job` for `master`; refuses at once (`QueueFull`) when the master already
    /// has `max_in_flight` requests here or the bus has [`CAPACITY`] waiting, and
    /// (`Closed`) when the bus has stopped. A refused job is dropped: its outcome is the
    /// error returned here.
    pub fn submit(&self, master: MasterId, job: Job, max_in_flight: usize) -> Result<(), BusError> {
        let mut s = self.state();
        if s.closed {
            return Err(BusError::Closed);
        }
        // Several of its requests may be running at once on a bus that pipelines.
        let running = s.running.iter().filter(|m| **m == master).count();
        let State { queues, waiting, .. } = &mut *s;
        let queue = queues.entry(master).or_default();
        let before = queue.len();
        queue.retain(|j| !j.reply.is_closed());
        *waiting -= before - queue.len();
        if queue.len() + running >= max_in_flight.max(1) || *waiting >= CAPACITY {
            if queue.is_empty() {
                queues.remove(&master);
            }
            return Err(BusError::QueueFull);
        }
        queue.push_back(job);
        *waiting += 1;
        drop(s);
        self.arrived.notify_one();
        Ok(())
    }

    /// Whether any request is waiting.
    pub fn is_empty(&self) -> bool {
        self.state().waiting == 0
    }

    /// Requests waiting, all masters.
    pub fn len(&self) -> usize {
        self.state().waiting
    }

    /// Takes the next live request whose unit `ready` accepts, from the first master
    /// after the last one served (in id order, wrapping) that has one at the head of its
    /// queue, with the identical reads at the head of other queues (whose masters get
    /// the same answer: [`Taken::answer`]); they are running until it is answered or
    /// dropped. Requests of masters that have gone are dropped on the way.
    pub fn take(self: &Arc<Self>, ready: impl Fn(u8) -> bool) -> Option<Taken> {
        let mut s = self.state();
        let State { queues, running, last, waiting, .. } = &mut *s;
        let mut cursor = *last;
        for _ in 0..queues.len() {
            let after = queues.range((Bound::Excluded(cursor), Bound::Unbounded)).next();
            let Some(master) = after.or_else(|| queues.iter().next()).map(|(m, _)| *m) else { break };
            cursor = master;
            let Some(queue) = queues.get_mut(&master) else { break };
            let before = queue.len();
            while queue.front().is_some_and(|j| j.reply.is_closed()) {
                queue.pop_front();
            }
            *waiting -= before - queue.len();
            if queue.front().is_some_and(|j| ready(j.unit))
                && let Some(job) = queue.pop_front()
            {
                *waiting -= 1;
                if queue.is_empty() {
                    queues.remove(&master);
                }
                // Running until answered; more than one taken at once only on a bus that
                // pipelines.
                *last = master;
                let mut masters = vec![master];
                let shared = if is_read(&job.request) {
                    share(queues, waiting, master, &mut masters, &job)
                } else {
                    Vec::new()
                };
                running.extend_from_slice(&masters);
                let slots = Some(Slots { queue: self.clone(), masters });
                return Some(Taken { job, shared, slots });
            }
            if queue.is_empty() {
                queues.remove(&master);
            }
        }
        None
    }

    /// A request of each of `masters` is over: they are running one request fewer.
    fn release(&self, masters: &[MasterId]) {
        let mut s = self.state();
        for m in masters {
            if let Some(i) = s.running.iter().position(|r| r == m) {
                s.running.swap_remove(i);
            }
        }
    }

    /// Waits until a request comes in (returns at once if one came in since the last
    /// wait). Cancel-safe.
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    /// The bus has stopped: every waiting request is dropped (its master learns the bus
    /// is closed) and nothing more is taken in.
    pub fn close(&self) {
        let mut s = self.state();
        s.closed = true;
        s.queues.clear();
        s.waiting = 0;
    }
}

/// A request taken for the line, and the masters sharing its answer. The masters it was
/// taken for are running it (it holds one of each one's in-flight slots) until it is
/// answered or dropped.
#[derive(Debug)]
pub struct Taken {
    /// The request to run.
    pub job: Job,
    /// Where the same answer goes too (identical reads of other masters).
    pub shared: Vec<oneshot::Sender<Result<Response, BusError>>>,
    /// The masters' slots it holds (none for a poll or a write from the gateway).
    slots: Option<Slots>,
}

/// The in-flight slots of the masters a request was taken for (the taker first, then
/// the sharers): freed when this is dropped.
#[derive(Debug)]
struct Slots {
    queue: Arc<PassQueue>,
    masters: Vec<MasterId>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.queue.release(&self.masters);
    }
}

impl Taken {
    /// A job of the gateway's own (a poll, a write): no master's slot.
    pub fn own(job: Job) -> Self {
        Self { job, shared: Vec::new(), slots: None }
    }

    /// The master it was taken for (none for the gateway's own jobs).
    pub fn master(&self) -> Option<MasterId> {
        self.slots.as_ref().and_then(|s| s.masters.first().copied())
    }

    /// Nobody waits for the answer any more.
    pub fn abandoned(&self) -> bool {
        self.job.reply.is_closed() && self.shared.iter().all(oneshot::Sender::is_closed)
    }

    /// Frees the masters' slots, then sends `outcome` to every master waiting for it (in
    /// that order: a master that sends its next request as soon as it has this answer
    /// must find room for it, not be refused as busy).
    pub fn answer(mut self, outcome: Result<Response, BusError>) {
        drop(self.slots.take());
        for other in self.shared {
            let _ = other.send(outcome.clone());
        }
        let _ = self.job.reply.send(outcome);
    }
}

/// FC1–4: plain reads (shared between masters; pipelined together to one unit).
pub(crate) fn is_read(request: &Request<'_>) -> bool {
    matches!(
        request,
        Request::ReadCoils(..)
            | Request::ReadDiscreteInputs(..)
            | Request::ReadHoldingRegisters(..)
            | Request::ReadInputRegisters(..)
    )
}

/// Takes the reads identical to `job` (taken for `taker`) off the heads of the other
/// masters' queues; their masters are added to `sharers`.
fn share(
    queues: &mut BTreeMap<MasterId, VecDeque<Job>>,
    waiting: &mut usize,
    taker: MasterId,
    sharers: &mut Vec<MasterId>,
    job: &Job,
) -> Vec<oneshot::Sender<Result<Response, BusError>>> {
    let mut shared = Vec::new();
    queues.retain(|master, queue| {
        if *master != taker
            && queue
                .front()
                .is_some_and(|j| j.unit == job.unit && j.request == job.request && !j.reply.is_closed())
            && let Some(twin) = queue.pop_front()
        {
            *waiting -= 1;
            sharers.push(*master);
            shared.push(twin.reply);
        }
        !queue.is_empty()
    });
    shared
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Priority;
    use std::time::Duration;
    use tokio::sync::oneshot;
    use tokio_modbus::{Request, Response};

    fn job(unit: u8) -> (Job, oneshot::Receiver<Result<Response, BusError>>) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            unit,
            request: Request::ReadHoldingRegisters(0, 1),
            priority: Priority::PassThrough,
            timeout: Duration::from_millis(10),
            turnaround: Duration::ZERO,
            retries: 0,
            reply,
        };
        (job, rx)
    }

    #[test]
    fn identical_reads_at_the_heads_of_queues_share_one_transaction() {
        let q = Arc::new(PassQueue::default());
        let mut keep = Vec::new();
        let mut put = |master, unit, request| {
            let (mut j, rx) = job(unit);
            j.request = request;
            keep.push(rx);
            q.submit(master, j, 8).expect("room");
        };
        let read = Request::ReadHoldingRegisters(0, 10);
        put(1, 5, read.clone());
        put(2, 5, read.clone());
        put(3, 5, Request::ReadHoldingRegisters(0, 11)); // another quantity
        put(4, 6, read.clone()); // another unit
        put(5, 5, Request::WriteSingleRegister(0, 1));
        put(5, 5, read.clone()); // behind master 5's write: keeps its order
        put(1, 5, read.clone()); // master 1's second: after its first is answered
        let first = q.take(|_| true).expect("waiting");
        assert_eq!(first.shared.len(), 1, "master 2's twin only");
        // Masters 1 and 2 are both running: each has used one of its in-flight slots.
        let (extra, _rx) = job(7);
        assert_eq!(q.submit(2, extra, 1), Err(BusError::QueueFull));
        let (mut a, mut b) = (keep.remove(0), keep.remove(0));
        first.answer(Ok(Response::ReadHoldingRegisters(vec![7; 10])));
        assert_eq!(a.try_recv().expect("answered"), Ok(Response::ReadHoldingRegisters(vec![7; 10])));
        assert_eq!(b.try_recv().expect("answered"), Ok(Response::ReadHoldingRegisters(vec![7; 10])));
        // Writes are never shared.
        let units: Vec<(u8, usize)> = std::iter::from_fn(|| {
            let t = q.take(|_| true)?;
            Some((t.job.unit, t.shared.len()))
        })
        .collect();
        assert_eq!(units, [(5, 0), (6, 0), (5, 0), (5, 1)], "{units:?}");
    }

    fn drain(q: &Arc<PassQueue>) -> Vec<u8> {
        let mut order = Vec::new();
        while let Some(t) = q.take(|_| true) {
            order.push(t.job.unit);
            order.extend(t.shared.iter().map(|_| 0));
        }
        order
    }

    #[test]
    fn masters_take_turns() {
        let q = Arc::new(PassQueue::default());
        let mut keep = Vec::new();
        for (master, unit) in [(1, 10), (1, 11), (1, 12), (2, 20), (3, 30), (3, 31)] {
            let (j, rx) = job(unit);
            keep.push(rx);
            q.submit(master, j, 8).expect("room");
        }
        assert_eq!(drain(&q), [10, 20, 30, 11, 31, 12]);
        assert!(q.is_empty());
    }

    #[test]
    fn requests_of_gone_masters_are_skipped() {
        let q = Arc::new(PassQueue::default());
        let (gone, rx) = job(1);
        let (live, _rx) = job(2);
        q.submit(5, gone, 8).expect("room");
        q.submit(5, live, 8).expect("room");
        drop(rx);
        assert_eq!(drain(&q), [2]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_master_is_held_to_its_in_flight_limit_counting_the_running_request() {
        let q = Arc::new(PassQueue::default());
        let mut keep = Vec::new();
        for unit in [1, 2] {
            let (j, rx) = job(unit);
            keep.push(rx);
            q.submit(7, j, 2).expect("room");
        }
        let (third, _rx) = job(3);
        assert_eq!(q.submit(7, third, 2), Err(BusError::QueueFull));
        let running = q.take(|_| true).expect("waiting");
        let (third, _rx3) = job(3);
        assert_eq!(q.submit(7, third, 2), Err(BusError::QueueFull), "one running + one waiting");
        drop(running);
        let (third, _rx3) = job(3);
        q.submit(7, third, 2).expect("room once the running one is over");
        // Another master is not affected by master 7's limit.
        let (other, _rx4) = job(4);
        q.submit(8, other, 2).expect("own limit");
    }

    /// A bus that pipelines runs several of one master's requests at once: each counts
    /// against the master's limit until it is finished, whichever finishes first.
    #[test]
    fn several_running_requests_of_one_master_each_count_until_finished() {
        let q = Arc::new(PassQueue::default());
        let mut keep = Vec::new();
        for unit in [1, 2, 3] {
            let (j, rx) = job(unit);
            keep.push(rx);
            q.submit(7, j, 3).expect("room");
        }
        let first = q.take(|_| true).expect("waiting");
        let second = q.take(|_| true).expect("waiting");
        assert_eq!((first.master(), second.master()), (Some(7), Some(7)));
        let (more, _rx) = job(4);
        assert_eq!(q.submit(7, more, 3), Err(BusError::QueueFull), "two running + one waiting");
        drop(second);
        let (more, _rx) = job(4);
        q.submit(7, more, 3).expect("one running + one waiting + this one");
        let (more, _rx) = job(5);
        assert_eq!(q.submit(7, more, 3), Err(BusError::QueueFull));
        drop(first);
        let (more, _rx) = job(5);
        q.submit(7, more, 3).expect("room once the first is over too");
    }

    #[test]
    fn a_unit_that_is_not_ready_is_passed_over_without_losing_its_turn_order() {
        let q = Arc::new(PassQueue::default());
        let mut keep = Vec::new();
        for (master, unit) in [(1, 9), (2, 20), (3, 8), (3, 31)] {
            let (j, rx) = job(unit);
            keep.push(rx);
            q.submit(master, j, 8).expect("room");
        }
        let got = q.take(|u| u != 9 && u != 8).map(|t| t.job.unit);
        assert_eq!(got, Some(20));
        assert_eq!(drain(&q), [8, 9, 31]);
    }

    #[test]
    fn a_closed_queue_refuses_and_drops_what_waits() {
        let q = Arc::new(PassQueue::default());
        let (j, mut rx) = job(1);
        q.submit(1, j, 8).expect("room");
        q.close();
        assert!(rx.try_recv().is_err(), "the waiting request's channel is dropped");
        let (j, _rx) = job(2);
        assert_eq!(q.submit(1, j, 8), Err(BusError::Closed));
        assert!(q.take(|_| true).is_none());
    }
}
