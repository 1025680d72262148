//! Raw serial devices at run time: the per-device framing of a raw bus
//! (`crate::serial::raw::RawBusFraming`), the poller of its request/response devices ([`RawPoller`]), the
//! registry of every raw device with its counters and commands ([`SerialDevices`]), and
//! [`start`], which wires one raw bus (a bus task and a poller, or a stream task).
//!
//! Invariants:
//! - a raw device has at most one poll queued or in flight; a poll that falls behind is
//!   rescheduled from now rather than bursting;
//! - a value is only ever taken from a frame whose checksum verified and from which every
//!   point extracted (a frame that fails extraction marks the device's points
//!   `Exception(4)` and counts a parse error; a timeout marks them `CommFail`);
//! - each raw device has its own pseudo unit id on its bus (never 0, the broadcast id), so
//!   the engine's late-reply quarantine works per device and the bus framing can pick the
//!   device's frame rule by unit;
//! - commands go through the bus queue at write priority, never retried (a command is not
//!   assumed idempotent), and are refused unless the configuration names them.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};
use tokio_modbus::{Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, instrument, warn};

use crate::bus::{self, BusError, BusHandle, Job, Priority};
use crate::image::{Image, PointId};
use crate::model::{Bus, RawCommand, RawDevice, RawMode};
use crate::point::extract;
use crate::point::value::{Quality, Sample, Value};
use crate::serial::raw;

/// Quality given to the points of a frame that could not be parsed (Modbus' "server
/// device failure": the device answered, but not something we can use).
pub const PARSE_FAILURE: Quality = Quality::Exception(0x04);

/// Counters of one raw device, readable while it runs.
#[derive(Debug, Default)]
pub struct RawStats {
    /// Frames whose points were all extracted.
    pub frames: AtomicU64,
    /// Frames (with a good checksum) from which the points could not be extracted.
    pub parse_errors: AtomicU64,
    /// Polls that got no valid frame in time.
    pub timeouts: AtomicU64,
    /// Frames dropped for a bad checksum (stream devices; on polled devices the bus
    /// counts them in its `crc_errors`).
    pub checksum_errors: AtomicU64,
    /// Commands sent and accepted.
    pub commands: AtomicU64,
    /// Commands that failed (no reply, reply refused).
    pub command_errors: AtomicU64,
}

/// Why a command was not carried out.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CommandError {
    /// No raw device has a command of this name.
    #[error("{0:?} is not a command point of any raw device")]
    Unknown(String),
    /// The value cannot be written with the command's template.
    #[error("command {point:?}: {source}")]
    Format {
        /// The command point.
        point: String,
        /// Why.
        source: raw::RawError,
    },
    /// The device is on a stream bus, or its bus is not running.
    #[error("command {0:?}: its bus is not running")]
    NoBus(String),
    /// The bus refused or the device did not answer.
    #[error("command {point:?}: {source}")]
    Bus {
        /// The command point.
        point: String,
        /// Cause.
        source: BusError,
    },
    /// The reply did not match the command's `ok` regex.
    #[error("command {point:?}: reply {reply} does not match {pattern:?}")]
    Refused {
        /// The command point.
        point: String,
        /// The reply, escaped.
        reply: String,
        /// The `ok` pattern.
        pattern: String,
    },
}

/// What a command's write came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReply {
    /// The bytes sent.
    pub sent: Vec<u8>,
    /// The reply frame (empty when the command expects no reply).
    pub reply: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    id: u8,
    checksum: crate::serial::checksum::ChecksumRule,
    commands: Vec<RawCommand>,
    stats: Arc<RawStats>,
    bus: Option<BusHandle>,
}

/// Every raw device of a gateway: counters and commands. Built by [`start`] per bus,
/// then shared read-only (`Arc`).
#[derive(Debug, Default)]
pub struct SerialDevices {
    entries: Vec<Entry>,
}

impl SerialDevices {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds every device of `other` (the same counters and buses: the registry of all
    /// buses is made from each bus's own).
    pub fn extend(&mut self, other: &SerialDevices) {
        self.entries.extend(other.entries.iter().cloned());
    }

    fn add(&mut self, device: &RawDevice, bus: Option<BusHandle>) -> Arc<RawStats> {
        let stats = Arc::new(RawStats::default());
        self.entries.push(Entry {
            name: device.name.clone(),
            id: device.id,
            checksum: device.send_checksum,
            commands: device.commands.clone(),
            stats: stats.clone(),
            bus,
        });
        stats
    }

    /// The counters of the raw device `device`.
    pub fn stats(&self, device: &str) -> Option<&RawStats> {
        self.entries.iter().find(|e| e.name == device).map(|e| &*e.stats)
    }

    /// The full names of every command point.
    pub fn commands(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().flat_map(|e| e.commands.iter().map(|c| c.name.as_str()))
    }

    /// Writes `value` to the command point `point` (`device.command`): formats the
    /// command, applies the device's checksum rule, sends it through the bus queue at
    /// write priority and checks the reply against the command's `ok` regex.
    pub async fn send_command(&self, point: &str, value: &Value) -> Result<CommandReply, CommandError> {
        let (entry, command) = self
            .entries
            .iter()
            .find_map(|e| e.commands.iter().find(|c| c.name == point).map(|c| (e, c)))
            .ok_or_else(|| CommandError::Unknown(point.to_string()))?;
        let result = send(entry, command, value).await;
        let counter = if result.is_ok() { &entry.stats.commands } else { &entry.stats.command_errors };
        counter.fetch_add(1, Relaxed);
        result
    }
}

async fn send(entry: &Entry, command: &RawCommand, value: &Value) -> Result<CommandReply, CommandError> {
    let point = || command.name.clone();
    let mut bytes = raw::format_command(&command.template, value)
        .map_err(|source| CommandError::Format { point: point(), source })?;
    entry.checksum.apply(&mut bytes);
    let bus = entry.bus.as_ref().ok_or_else(|| CommandError::NoBus(point()))?;
    // A command without a reply goes out like a broadcast: sent, never answered.
    let unit = if command.reply { entry.id } else { 0 };
    let request = Request::Custom(0, Cow::Owned(bytes.clone()));
    let rsp = bus
        .transact(unit, request, Priority::Write, command.timeout, 0)
        .await
        .map_err(|source| CommandError::Bus { point: point(), source })?;
    let reply = match rsp {
        Response::Custom(_, frame) if command.reply => frame.to_vec(),
        _ => Vec::new(),
    };
    if let Some(ok) = &command.ok
        && !ok.is_match(&reply)
    {
        return Err(CommandError::Refused {
            point: point(),
            reply: format!("\"{}\"", reply.escape_ascii()),
            pattern: ok.as_str().to_string(),
        });
    }
    debug!(command = %command.name, sent = %bytes.escape_ascii(), "command accepted");
    Ok(CommandReply { sent: bytes, reply })
}

/// Starts what a raw bus needs: a stream task for a `mode = "stream"` device (no bus
/// task, returns `None`), else a bus task with `RawBusFraming` and a [`RawPoller`]
/// (returns the bus handle). Registers the bus's devices in `registry`.
pub fn start(
    bus: &Bus,
    image: &Arc<Image>,
    registry: &mut SerialDevices,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<BusHandle> {
    if let Some(device) = bus.raw_devices.iter().find(|d| d.mode == RawMode::Stream) {
        let stats = registry.add(device, None);
        let task = crate::poll::stream::Stream::new(bus, device, image.clone(), stats);
        tracker.spawn(task.run(shutdown.clone()));
        return None;
    }
    let handle = bus::spawn(bus, shutdown.clone(), tracker);
    let stats: Vec<Arc<RawStats>> =
        bus.raw_devices.iter().map(|d| registry.add(d, Some(handle.clone()))).collect();
    let poller = RawPoller::new(bus, handle.clone(), image.clone(), stats);
    tracker.spawn(poller.run(shutdown.clone()));
    Some(handle)
}

/// Registers a raw device's points in the image.
pub fn register(device: &RawDevice, image: &Image) -> Vec<PointId> {
    device.points.iter().map(|p| image.register(&p.name, p.stale_after)).collect()
}

/// Extracts a frame's values into the image (all or nothing) and counts the outcome.
pub fn apply_frame(device: &RawDevice, ids: &[PointId], frame: &[u8], image: &Image, stats: &RawStats) {
    match extract::extract(&device.extract, frame) {
        Ok(values) => {
            stats.frames.fetch_add(1, Relaxed);
            let at = SystemTime::now();
            image.update(values.into_iter().filter_map(|(i, value)| {
                Some((*ids.get(i)?, Sample { value: Some(value), at, quality: Quality::Good, via: None }))
            }));
        }
        Err(e) => {
            stats.parse_errors.fetch_add(1, Relaxed);
            debug!(device = %device.name, error = %e, "frame not parsed");
            image.fail(ids.iter().copied(), PARSE_FAILURE);
        }
    }
}

struct PollState {
    device: RawDevice,
    ids: Vec<PointId>,
    stats: Arc<RawStats>,
    request: Request<'static>,
    interval: Duration,
    next_due: Instant,
    busy: bool,
    online: bool,
}

/// Polls the request/response devices of one raw bus on their intervals.
pub struct RawPoller {
    bus: BusHandle,
    image: Arc<Image>,
    retries: u8,
    devices: Vec<PollState>,
}

type Outcome = (usize, Result<Response, BusError>);

impl RawPoller {
    /// Registers the points of every polled device of `bus` in `image`; `stats` holds one
    /// counter set per device of `bus.raw_devices`, in order.
    pub fn new(bus: &Bus, handle: BusHandle, image: Arc<Image>, stats: Vec<Arc<RawStats>>) -> Self {
        let now = Instant::now();
        let devices = bus
            .raw_devices
            .iter()
            .zip(stats)
            .filter_map(|(d, stats)| {
                let RawMode::Poll { request, interval } = &d.mode else {
                    return None;
                };
                Some(PollState {
                    ids: register(d, &image),
                    request: Request::Custom(0, Cow::Owned(request.clone())),
                    interval: *interval,
                    device: d.clone(),
                    stats,
                    next_due: now,
                    busy: false,
                    online: true,
                })
            })
            .filter(|s| !s.device.points.is_empty())
            .collect();
        Self { bus: handle, image, retries: bus.retries, devices }
    }

    /// Polls until `shutdown` is cancelled.
    #[instrument(name = "rawpoll", skip_all, fields(bus = %self.bus.name()))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut in_flight: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
        loop {
            let next = self.submit_due(&mut in_flight);
            tokio::select! {
                // Cancel-safe: an outcome not yet taken stays in its oneshot.
                Some((d, outcome)) = in_flight.next(), if !in_flight.is_empty() => self.complete(d, outcome),
                () = sleep_until(next) => {}
                () = shutdown.cancelled() => break,
            }
        }
    }

    fn submit_due(&mut self, in_flight: &mut FuturesUnordered<BoxFuture<'static, Outcome>>) -> Instant {
        let now = Instant::now();
        let mut next = now + Duration::from_secs(3600);
        for (d, dev) in self.devices.iter_mut().enumerate() {
            if dev.busy {
                continue;
            }
            if dev.next_due > now {
                next = next.min(dev.next_due);
                continue;
            }
            let (reply, rx) = oneshot::channel();
            let job = Job {
                unit: dev.device.id,
                request: dev.request.clone(),
                priority: Priority::Poll { deadline: dev.next_due + dev.interval },
                timeout: dev.device.timeout,
                turnaround: Duration::ZERO,
                retries: if dev.online { self.retries } else { 0 },
                reply,
            };
            dev.next_due = (dev.next_due + dev.interval).max(now);
            next = next.min(dev.next_due);
            match self.bus.submit(job) {
                Ok(()) => {
                    dev.busy = true;
                    in_flight.push(Box::pin(async move { (d, rx.await.unwrap_or(Err(BusError::Closed))) }));
                }
                Err(e) => debug!(device = %dev.device.name, error = %e, "poll not queued"),
            }
        }
        next
    }

    fn complete(&mut self, d: usize, outcome: Result<Response, BusError>) {
        let Some(dev) = self.devices.get_mut(d) else { return };
        dev.busy = false;
        match outcome {
            Ok(Response::Custom(_, frame)) => {
                if !dev.online {
                    tracing::info!(device = %dev.device.name, "device answers again");
                    dev.online = true;
                }
                apply_frame(&dev.device, &dev.ids, &frame, &self.image, &dev.stats);
            }
            Ok(other) => warn!(device = %dev.device.name, reply = ?other, "unexpected reply on a raw bus"),
            Err(BusError::Timeout { .. }) => {
                dev.stats.timeouts.fetch_add(1, Relaxed);
                if dev.online {
                    warn!(device = %dev.device.name, "device stopped answering");
                    dev.online = false;
                }
                self.image.fail(dev.ids.iter().copied(), Quality::CommFail);
            }
            Err(BusError::PortDown(_)) => {
                self.image.fail(dev.ids.iter().copied(), Quality::CommFail);
            }
            Err(BusError::Exception(code)) => {
                self.image.fail(dev.ids.iter().copied(), Quality::Exception(u8::from(code)));
            }
            Err(BusError::QueueFull | BusError::Closed) => {}
            Err(e @ BusError::Invalid(_)) => warn!(device = %dev.device.name, error = %e, "request rejected"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::extract::Extract;
    use crate::serial::checksum::{Checksum, ChecksumRule};
    use crate::serial::framing::{Decoded, Framing, SkipReason};
    use crate::serial::raw::{FrameEnd, FrameRule};
    use crate::serial::raw::{RawBusFraming, RawFraming};

    fn device(id: u8, end: FrameEnd) -> RawDevice {
        RawDevice {
            name: format!("d{id}"),
            id,
            mode: RawMode::Poll { request: b"?".to_vec(), interval: Duration::from_secs(1) },
            framing: RawFraming {
                framing: FrameRule { start: None, end },
                checksum: ChecksumRule::new(Checksum::Sum8),
            },
            send_checksum: ChecksumRule::NONE,
            timeout: Duration::from_millis(100),
            silence: Duration::ZERO,
            extract: Extract::Binary { fields: Vec::new() },
            points: Vec::new(),
            commands: Vec::new(),
        }
    }

    #[test]
    fn bus_framing_picks_the_device_rule_by_unit() {
        let devices = [device(1, FrameEnd::Fixed(3)), device(2, FrameEnd::Terminator(b"\n".to_vec()))];
        let f = RawBusFraming::new(devices.iter().map(|d| (d.id, d.framing.clone())).collect());
        let req = Request::Custom(0, Cow::Borrowed(b"ab"));
        let mut out = Vec::new();
        f.encode(1, &req, &mut out).expect("encodes");
        f.encode(0, &req, &mut out).expect("unit 0 sends the bytes as they are");
        assert_eq!(out, b"abab");
        // 'a' + 'b' = 0xC3: a good 3-byte frame for unit 1 ...
        assert!(matches!(f.decode(1, &req, b"ab\xC3\n", false), Decoded::Reply { len: 3, .. }));
        // ... and for unit 2 the frame runs to the newline (and fails its sum).
        assert!(matches!(
            f.decode(2, &req, b"ab\xC3\n", false),
            Decoded::Skip { why: SkipReason::Crc, len: 4 }
        ));
        assert!(matches!(f.decode(2, &req, b"ab\xC3", false), Decoded::Incomplete));
        // Unknown units never take a reply.
        assert!(matches!(f.decode(9, &req, b"ab\xC3", false), Decoded::Skip { why: SkipReason::Noise, .. }));
        assert!(f.encode(1, &Request::ReadCoils(0, 1), &mut out).is_err(), "no Modbus on a raw bus");
    }

    #[test]
    fn frames_update_the_image_all_or_nothing() {
        let image = Image::new();
        let mut d = device(1, FrameEnd::Fixed(3));
        d.points = vec![crate::model::RawPoint {
            name: "d1.x".into(),
            stale_after: Duration::from_secs(3),
            unit: None,
        }];
        d.extract = Extract::Binary {
            fields: vec![crate::point::extract::BinField {
                at: 1,
                kind: crate::point::extract::BinKind::U8,
                order: crate::point::value::WordOrder::Abcd,
                scale: 1.0,
                offset: 0.0,
                point: 0,
            }],
        };
        let ids = register(&d, &image);
        let stats = RawStats::default();
        apply_frame(&d, &ids, b"\x01\x07\x08", &image, &stats);
        assert_eq!(image.good_value("d1.x"), Some(Value::UInt(7)));
        apply_frame(&d, &ids, b"\x01", &image, &stats);
        assert_eq!(image.get("d1.x").map(|s| s.quality), Some(PARSE_FAILURE));
        assert_eq!((stats.frames.load(Relaxed), stats.parse_errors.load(Relaxed)), (1, 1));
    }
}
