//! Polls the devices of one bus on their schedules: submits each planned read to the bus
//! queue when it is due, decodes the reply into typed samples for the image, and backs
//! off devices that stop answering so they cost the line almost nothing.
//!
//! Invariants: a planned read has at most one transaction queued or in flight, so a slow
//! line never piles up requests; a read that falls behind is rescheduled from now rather
//! than bursting to catch up; an offline device is probed with one read, without retries,
//! at exponentially growing intervals (up to its `backoff_max`), and resumes its full
//! schedule on the first answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::backoff::Backoff;
use crate::bus::{BusError, BusHandle, Job, Priority};
use crate::image::{Image, PointId, Raw};
use crate::model::{Bus, Device};
use crate::point::registers;
use crate::point::value::{Quality, Sample, Table, Value};
use crate::poll::plan::{self, Read};

/// First pause before re-probing a device that stopped answering.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// When a device that stopped answering is probed next: the shared [`Backoff`], from
/// [`FIRST_BACKOFF`] doubling up to the device's `backoff_max`, reset only by an answer.
/// Sans-I/O: every method takes `now`.
#[derive(Debug, Clone)]
struct Probe {
    backoff: Backoff,
    /// When the next probe is due.
    at: Instant,
    /// The pause that led to `at`: a probe that gets no verdict (port down, queue full)
    /// is tried again after the same pause.
    wait: Duration,
}

impl Probe {
    fn new(backoff_max: Duration, now: Instant) -> Self {
        Self { backoff: Backoff::new(FIRST_BACKOFF, backoff_max), at: now, wait: FIRST_BACKOFF }
    }

    /// A read went unanswered at `now` (the device just stopped answering, or a probe
    /// did): the next probe waits the back-off's delay, and the one after twice that.
    fn unanswered(&mut self, now: Instant) {
        self.at = self.backoff.failed(now);
        self.wait = self.at - now;
    }

    /// A probe was sent at `now`: if it gets no verdict, the next is due after the same
    /// pause.
    fn sent(&mut self, now: Instant) {
        self.at = now + self.wait;
    }

    /// The device answered: the next time it stops, probing starts again at the first
    /// pause.
    fn answered(&mut self) {
        self.backoff.proven();
    }
}

struct ReadState {
    read: Read,
    request: Request<'static>,
    next_due: Instant,
    busy: bool,
}

/// What observers (the status page, `/metrics`) see of one polled device; the poller
/// writes it, nothing waits on it.
#[derive(Debug)]
pub struct DeviceHealth {
    /// The device name.
    pub name: String,
    /// Its bus.
    pub bus: String,
    /// Its unit id.
    pub unit: u8,
    /// False while the device does not answer and is only probed, with back-off.
    pub online: AtomicBool,
    /// When a read last got an answer (Unix milliseconds; 0: never).
    pub last_answer_ms: AtomicU64,
    /// Reads answered (with data or an exception).
    pub answered: AtomicU64,
    /// Reads that failed: no answer in time, or the port was down.
    pub failed: AtomicU64,
}

impl DeviceHealth {
    /// When the device last answered (`None`: never since start).
    pub fn last_answer(&self) -> Option<SystemTime> {
        match self.last_answer_ms.load(Relaxed) {
            0 => None,
            ms => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    fn answered_now(&self) {
        let ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_millis() as u64);
        self.last_answer_ms.store(ms.max(1), Relaxed);
        self.answered.fetch_add(1, Relaxed);
        self.online.store(true, Relaxed);
    }
}

struct DeviceState {
    device: Device,
    health: Arc<DeviceHealth>,
    retries: u8,
    ids: Vec<PointId>,
    reads: Vec<ReadState>,
    online: bool,
    probe: Probe,
}

/// The poller of one bus.
pub struct Poller {
    bus: BusHandle,
    image: Arc<Image>,
    devices: Vec<DeviceState>,
    /// A read has been answered (logged once: the start-up time benchmarks watch for).
    answered: bool,
}

type Outcome = (usize, usize, Result<Response, BusError>);

impl Poller {
    /// Plans the reads of every device on `bus` and registers their points in `image`.
    pub fn new(bus: &Bus, handle: BusHandle, image: Arc<Image>) -> Self {
        let now = Instant::now();
        let devices = bus
            .devices
            .iter()
            .map(|d| DeviceState {
                ids: d.points.iter().map(|p| image.register(&p.name, p.stale_after)).collect(),
                reads: plan::plan_device(d)
                    .into_iter()
                    .map(|read| ReadState {
                        request: plan::read_request(&read),
                        read,
                        next_due: now,
                        busy: false,
                    })
                    .collect(),
                health: Arc::new(DeviceHealth {
                    name: d.name.clone(),
                    bus: bus.name.clone(),
                    unit: d.unit,
                    online: AtomicBool::new(true),
                    last_answer_ms: AtomicU64::new(0),
                    answered: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                }),
                device: d.clone(),
                retries: bus.retries,
                online: true,
                probe: Probe::new(d.backoff_max, now),
            })
            .collect::<Vec<DeviceState>>();
        for d in &devices {
            for rs in &d.reads {
                image.expect_raw(&d.device.name, rs.read.table, rs.read.start, rs.read.count);
            }
        }
        Self { bus: handle, image, devices, answered: false }
    }

    /// The health of every device of this bus, in model order, for observers.
    pub fn health(&self) -> Vec<Arc<DeviceHealth>> {
        self.devices.iter().map(|d| d.health.clone()).collect()
    }

    /// Polls until `shutdown` is cancelled.
    #[instrument(name = "poller", skip_all, fields(bus = %self.bus.name()))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut in_flight = FuturesUnordered::new();
        loop {
            let next = self.submit_due(&mut in_flight);
            tokio::select! {
                // Cancel-safe: an outcome not yet taken stays in its oneshot.
                Some((d, r, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.complete(d, r, outcome);
                }
                () = sleep_until(next) => {}
                () = shutdown.cancelled() => break,
            }
        }
    }

    /// Submits every read that is due; returns when the next one falls due.
    fn submit_due(&mut self, in_flight: &mut FuturesUnordered<BoxFuture<'static, Outcome>>) -> Instant {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(3600);
        for (d, dev) in self.devices.iter_mut().enumerate() {
            for (r, rs) in dev.reads.iter_mut().enumerate() {
                // Offline devices are only probed, with their first read.
                let due_at = if dev.online {
                    rs.next_due
                } else if r == 0 {
                    dev.probe.at
                } else {
                    continue;
                };
                if rs.busy {
                    continue;
                }
                if due_at > now {
                    next = next.min(due_at);
                    continue;
                }
                let (reply, rx) = oneshot::channel();
                let job = Job {
                    unit: dev.device.unit,
                    request: rs.request.clone(),
                    priority: Priority::Poll { deadline: due_at + rs.read.interval },
                    timeout: dev.device.timeout,
                    turnaround: dev.device.turnaround,
                    retries: if dev.online { dev.retries } else { 0 },
                    reply,
                };
                // Fixed rate; a read that fell behind restarts from now instead of bursting.
                rs.next_due = (rs.next_due + rs.read.interval).max(now);
                if !dev.online {
                    dev.probe.sent(now);
                    next = next.min(dev.probe.at);
                } else {
                    next = next.min(rs.next_due);
                }
                match self.bus.submit(job) {
                    Ok(()) => {
                        rs.busy = true;
                        in_flight
                            .push(Box::pin(async move { (d, r, rx.await.unwrap_or(Err(BusError::Closed))) }));
                    }
                    Err(e) => debug!(device = %dev.device.name, error = %e, "poll not queued"),
                }
            }
        }
        next
    }

    /// Applies the outcome of one read to the device state and the image.
    fn complete(&mut self, d: usize, r: usize, outcome: Result<Response, BusError>) {
        let dev = &mut self.devices[d];
        dev.reads[r].busy = false;
        match &outcome {
            Ok(_) | Err(BusError::Exception(_)) => dev.health.answered_now(),
            Err(BusError::Timeout { .. } | BusError::PortDown(_)) => {
                dev.health.failed.fetch_add(1, Relaxed);
            }
            Err(_) => {}
        }
        match outcome {
            Ok(rsp) => {
                if !dev.online {
                    info!(device = %dev.device.name, unit = dev.device.unit, "device answers again");
                    dev.online = true;
                    dev.probe.answered();
                    let now = Instant::now();
                    dev.reads.iter_mut().for_each(|rs| rs.next_due = now);
                }
                if !self.answered {
                    self.answered = true;
                    info!(device = %dev.device.name, "first poll completed");
                }
                let samples = decode(dev, r, &rsp);
                self.image.update(samples);
                let read = &dev.reads[r].read;
                if let Some(raw) = raw_block(&rsp, read.count) {
                    self.image.store_raw(&dev.device.name, read.table, read.start, raw);
                }
            }
            Err(BusError::Exception(code)) => {
                // Many devices refuse to read registers that are not mapped, and a merged
                // read bridges gaps: read the parts separately from now on.
                let parts = if code == ExceptionCode::IllegalDataAddress {
                    plan::split_read(&dev.device, &dev.reads[r].read)
                } else {
                    Vec::new()
                };
                if parts.is_empty() {
                    let read = &dev.reads[r].read;
                    self.image.fail_raw(&dev.device.name, Some((read.table, read.start)));
                    let ids = read.slots.iter().map(|s| dev.ids[s.point]);
                    self.image.fail(ids, Quality::Exception(u8::from(code)));
                } else {
                    warn!(device = %dev.device.name, parts = parts.len(), "device refused a read bridging unused registers; splitting it");
                    let due = Instant::now();
                    let mut states = parts.into_iter().map(|read| ReadState {
                        request: plan::read_request(&read),
                        read,
                        next_due: due,
                        busy: false,
                    });
                    if let Some(first) = states.next() {
                        dev.reads[r] = first;
                    }
                    dev.reads.extend(states);
                }
            }
            Err(BusError::Timeout { .. }) => {
                if dev.online {
                    warn!(device = %dev.device.name, unit = dev.device.unit, "device stopped answering; backing off");
                    dev.online = false;
                    dev.health.online.store(false, Relaxed);
                    self.image.fail(dev.ids.iter().copied(), Quality::CommFail);
                    self.image.fail_raw(&dev.device.name, None);
                }
                dev.probe.unanswered(Instant::now());
            }
            Err(BusError::PortDown(_)) => {
                self.image.fail(dev.ids.iter().copied(), Quality::CommFail);
                self.image.fail_raw(&dev.device.name, None);
            }
            Err(BusError::QueueFull | BusError::Closed) => {}
            Err(e @ BusError::Invalid(_)) => {
                // Validation makes this impossible; say so loudly if it ever happens.
                warn!(device = %dev.device.name, error = %e, "planned read rejected");
            }
        }
    }
}

/// The raw words or bits of a read's response, `count` of them (coil replies come
/// padded to whole bytes), for the image's raw cache.
fn raw_block(rsp: &Response, count: u16) -> Option<Raw> {
    let n = usize::from(count);
    match rsp {
        Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => {
            Some(Raw::Bits(b.iter().take(n).copied().collect()))
        }
        Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => {
            Some(Raw::Words(w.iter().take(n).copied().collect()))
        }
        _ => None,
    }
}

/// Turns a read's response into one sample per point of the read.
fn decode(dev: &DeviceState, r: usize, rsp: &Response) -> Vec<(PointId, Sample)> {
    let read = &dev.reads[r].read;
    let at = SystemTime::now();
    let (bits, words): (&[bool], &[u16]) = match rsp {
        Response::ReadCoils(b) | Response::ReadDiscreteInputs(b) => (b, &[]),
        Response::ReadHoldingRegisters(w) | Response::ReadInputRegisters(w) => (&[], w),
        _ => (&[], &[]),
    };
    read.slots
        .iter()
        .map(|slot| {
            let point = &dev.device.points[slot.point];
            let at_off = usize::from(slot.offset);
            let value = match read.table {
                Table::Coils | Table::Discrete => bits.get(at_off).map(|b| Value::Bool(*b)),
                Table::Holding | Table::Input => {
                    let width = usize::from(point.data_type.width());
                    words.get(at_off..at_off + width).and_then(|w| {
                        registers::decode_registers(
                            point.data_type,
                            point.order,
                            point.scale,
                            point.offset,
                            w,
                        )
                        .inspect_err(|e| warn!(point = %point.name, error = %e, "cannot decode"))
                        .ok()
                    })
                }
            };
            let quality = if value.is_some() { Quality::Good } else { Quality::Exception(0x04) };
            (dev.ids[slot.point], Sample { value, at, quality, via: None })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn an_offline_device_is_probed_at_doubling_pauses_up_to_its_max() {
        let t0 = Instant::now();
        let mut p = Probe::new(S(10), t0);
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..6 {
            p.unanswered(now); // stopped answering, then each probe times out
            pauses.push(p.at - now);
            now = p.at;
        }
        assert_eq!(pauses, [S(1), S(2), S(4), S(8), S(10), S(10)]);
    }

    #[test]
    fn a_probe_without_verdict_is_retried_after_the_same_pause() {
        let t0 = Instant::now();
        let mut p = Probe::new(S(60), t0);
        p.unanswered(t0);
        p.unanswered(t0 + S(1)); // pause now 2s
        let sent = t0 + S(3);
        p.sent(sent); // port down: no timeout, so no doubling
        assert_eq!(p.at - sent, S(2));
        p.sent(sent + S(2));
        assert_eq!(p.at - (sent + S(2)), S(2));
    }

    #[test]
    fn an_answer_resets_the_pauses_for_the_next_outage() {
        let t0 = Instant::now();
        let mut p = Probe::new(S(60), t0);
        for i in 0..5 {
            p.unanswered(t0 + S(i));
        }
        p.answered();
        let later = t0 + S(100);
        p.unanswered(later);
        assert_eq!(p.at - later, S(1), "a new outage starts at the first pause");
    }

    #[test]
    fn a_max_below_the_first_pause_is_the_first_pause() {
        let t0 = Instant::now();
        let mut p = Probe::new(Duration::from_millis(200), t0);
        p.unanswered(t0);
        p.unanswered(t0);
        assert_eq!(p.at - t0, S(1));
    }
}
