//! Requests from Modbus-TCP masters on their way to one bus: per-master queues served
//! round-robin, so no master can starve another.
//!
//! One relay task per bus that serves any unit. It keeps exactly one master request in
//! the bus queue at a time (Priority::PassThrough); when it completes, the next request
//! comes from the next master in turn that has one waiting. A master may have at most
//! `max_in_flight` requests waiting or running here; one more is refused at once with
//! `BusError::QueueFull` (the server answers exception 0x06, server busy), as is any
//! request when the relay's own inbox is full.
//!
//! With one request in the bus queue, a master that pipelines gets no more of the line
//! than one that does not; and since the bus runs a waiting poll after a short streak of
//! pass-through transactions (bus.rs), masters together cannot starve the polls either.
//!
//! Invariants: a request whose master has gone (connection closed, reply receiver
//! dropped) is skipped, never sent; every request taken in gets exactly one outcome on
//! its reply channel (or the channel is dropped at shutdown, which the server reads as
//! "bus closed").

use std::collections::{BTreeMap, VecDeque};

use tokio::sync::{mpsc, oneshot};
use tokio_modbus::Response;
use tokio_util::sync::CancellationToken;
use tracing::{debug, instrument};

use crate::bus::{BusError, BusHandle, Job};

/// Identifies one master (one TCP connection) for fairness.
pub type MasterId = u64;

struct Relayed {
    master: MasterId,
    job: Job,
}

/// A cheap handle to a bus's relay.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    tx: mpsc::Sender<Relayed>,
}

impl std::fmt::Debug for Relayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relayed").field("master", &self.master).field("unit", &self.job.unit).finish()
    }
}

impl RelayHandle {
    /// Queues `job` for `master`; refuses at once (`QueueFull`) when the relay is full
    /// (the job is then dropped: its outcome is the error returned here).
    pub fn submit(&self, master: MasterId, job: Job) -> Result<(), BusError> {
        self.tx.try_send(Relayed { master, job }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BusError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => BusError::Closed,
        })
    }
}

/// A bus's relay, before it runs.
pub struct Relay {
    bus: BusHandle,
    rx: mpsc::Receiver<Relayed>,
    max_in_flight: usize,
}

impl Relay {
    /// A relay for `bus`: each master may have `max_in_flight` requests here; the inbox
    /// holds `inbox` requests not yet sorted into queues.
    pub fn new(bus: BusHandle, max_in_flight: usize, inbox: usize) -> (Self, RelayHandle) {
        let (tx, rx) = mpsc::channel(inbox.max(1));
        (Self { bus, rx, max_in_flight: max_in_flight.max(1) }, RelayHandle { tx })
    }

    /// Runs until `shutdown` or until every handle is gone.
    #[instrument(name = "relay", skip_all, fields(bus = %self.bus.name()))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut queues: BTreeMap<MasterId, VecDeque<Job>> = BTreeMap::new();
        // The request on the bus: whose it is, the master's reply, the bus's answer.
        let mut current: Option<(MasterId, oneshot::Sender<Result<Response, BusError>>)> = None;
        let mut outcome: Option<oneshot::Receiver<Result<Response, BusError>>> = None;
        let mut last: MasterId = 0;
        loop {
            if current.is_none()
                && let Some((master, job)) = next(&mut queues, last)
            {
                last = master;
                let (reply, rx) = oneshot::channel();
                let Job { unit, request, priority, timeout, turnaround, retries, reply: to_master } = job;
                match self.bus.submit(Job { unit, request, priority, timeout, turnaround, retries, reply }) {
                    Ok(()) => {
                        current = Some((master, to_master));
                        outcome = Some(rx);
                    }
                    Err(e) => {
                        let _ = to_master.send(Err(e));
                    }
                }
                continue;
            }
            let event = tokio::select! {
                // Cancel-safe: a request not yet received stays in the channel.
                msg = self.rx.recv() => match msg {
                    Some(r) => Event::Request(r),
                    None => break,
                },
                // Cancel-safe: an unfinished oneshot receive keeps its value for the
                // next poll.
                result = async {
                    match outcome.as_mut() {
                        Some(rx) => rx.await.unwrap_or(Err(BusError::Closed)),
                        None => std::future::pending().await,
                    }
                } => Event::Done(result),
                () = shutdown.cancelled() => break,
            };
            match event {
                Event::Request(Relayed { master, job }) => {
                    let queue = queues.entry(master).or_default();
                    queue.retain(|j| !j.reply.is_closed());
                    let running = usize::from(current.as_ref().is_some_and(|(m, _)| *m == master));
                    if queue.len() + running >= self.max_in_flight {
                        debug!(master, "master has too many requests on this bus");
                        let _ = job.reply.send(Err(BusError::QueueFull));
                    } else {
                        queue.push_back(job);
                    }
                }
                Event::Done(result) => {
                    outcome = None;
                    if let Some((_, to_master)) = current.take() {
                        let _ = to_master.send(result);
                    }
                }
            }
        }
    }
}

enum Event {
    Request(Relayed),
    Done(Result<Response, BusError>),
}

/// The next live request, from the first master after `last` (in id order, wrapping)
/// that has one; drops requests whose master has gone and queues left empty.
fn next(queues: &mut BTreeMap<MasterId, VecDeque<Job>>, last: MasterId) -> Option<(MasterId, Job)> {
    loop {
        let master = queues
            .range(last.saturating_add(1)..)
            .chain(queues.range(..=last))
            .find(|(_, q)| !q.is_empty())
            .map(|(m, _)| *m);
        let Some(master) = master else {
            queues.clear();
            return None;
        };
        let queue = queues.get_mut(&master)?;
        let job = queue.pop_front()?;
        if queue.is_empty() {
            queues.remove(&master);
        }
        if !job.reply.is_closed() {
            return Some((master, job));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Priority;
    use std::time::Duration;
    use tokio_modbus::Request;

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
    fn masters_take_turns() {
        let mut queues: BTreeMap<MasterId, VecDeque<Job>> = BTreeMap::new();
        let mut keep = Vec::new();
        for (master, unit) in [(1, 10), (1, 11), (1, 12), (2, 20), (3, 30), (3, 31)] {
            let (j, rx) = job(unit);
            keep.push(rx);
            queues.entry(master).or_default().push_back(j);
        }
        let mut last = 0;
        let mut order = Vec::new();
        while let Some((m, j)) = next(&mut queues, last) {
            last = m;
            order.push(j.unit);
        }
        assert_eq!(order, [10, 20, 30, 11, 31, 12]);
        assert!(queues.is_empty());
    }

    #[test]
    fn requests_of_gone_masters_are_skipped() {
        let mut queues: BTreeMap<MasterId, VecDeque<Job>> = BTreeMap::new();
        let (gone, rx) = job(1);
        drop(rx);
        let (live, _rx) = job(2);
        queues.entry(5).or_default().extend([gone, live]);
        assert_eq!(next(&mut queues, 0).map(|(m, j)| (m, j.unit)), Some((5, 2)));
        assert_eq!(next(&mut queues, 5).map(|(m, _)| m), None);
    }
}
