//! A streaming raw device (`mode = "stream"`: a GPS talking NMEA, a scale printing its
//! weight continuously): one task owns the bus's port, frames what arrives with
//! `raw::find_frame`, extracts the points and updates the image. Nothing is ever sent.
//!
//! Invariants: the input buffer never holds more than one frame's worth plus a read
//! (`find_frame` turns anything longer into noise); a frame with a bad checksum or that
//! does not parse gives no value (counted in [`RawStats`]); when the device goes quiet
//! its points turn stale through the image's staleness limit (`stale_after`), and when
//! the port is lost they turn comm-fail at once; the port is reopened by path with
//! exponential back-off up to the bus's `reopen_max`, like a bus task.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_modbus::Response;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::backoff::Backoff;
use crate::image::{Image, PointId};
use crate::model::{Bus, Line, RawDevice};
use crate::point::value::Quality;
use crate::poll::raw::{RawStats, apply_frame, register};
use crate::serial::framing::{Decoded, SkipReason};
use crate::serial::line::{Port, open_serial};

/// How long a port must have worked before a failure reopens it without back-off.
const STABLE: Duration = Duration::from_secs(10);

/// The task of one stream bus.
pub struct Stream {
    port: String,
    line: Line,
    reopen_max: Duration,
    device: RawDevice,
    ids: Vec<PointId>,
    image: Arc<Image>,
    stats: Arc<RawStats>,
    silence: Duration,
}

impl Stream {
    /// The task for `device`, the stream device of `bus`; registers its points.
    pub fn new(bus: &Bus, device: &RawDevice, image: Arc<Image>, stats: Arc<RawStats>) -> Self {
        Self {
            port: bus.port.clone(),
            line: bus.line,
            reopen_max: bus.reopen_max,
            ids: register(device, &image),
            device: device.clone(),
            image,
            stats,
            silence: device.silence.max(crate::serial::rtu::t35(&bus.line)),
        }
    }

    /// Reads and parses until `shutdown` is cancelled, reopening the port when it fails.
    #[instrument(name = "stream", skip_all, fields(device = %self.device.name))]
    pub async fn run(self, shutdown: CancellationToken) {
        // Only a port that worked for a while earns a quick reopen; one that fails right
        // after opening keeps backing off (no reopen storm).
        let mut backoff = Backoff::new(Duration::from_millis(100), self.reopen_max).with_stable(STABLE);
        let mut last_error = String::new();
        loop {
            match open_serial(&self.port, &self.line) {
                Ok(port) => {
                    info!("serial port open");
                    last_error.clear();
                    backoff.connected(tokio::time::Instant::now());
                    match self.read(port, &shutdown).await {
                        Ok(()) => break,
                        Err(e) => {
                            warn!(error = %e, "serial port failed; reopening");
                            self.image.fail(self.ids.iter().copied(), Quality::CommFail);
                        }
                    }
                }
                Err(e) => {
                    if e != last_error {
                        warn!(error = %e, retry_in = ?backoff.delay(), "cannot open serial port");
                        self.image.fail(self.ids.iter().copied(), Quality::CommFail);
                    }
                    last_error = e;
                }
            }
            let until = backoff.failed(tokio::time::Instant::now());
            tokio::select! {
                // Cancel-safe: a timer.
                () = tokio::time::sleep_until(until) => {}
                () = shutdown.cancelled() => break,
            }
        }
        info!("stream stopped");
    }

    /// Frames the input of an open port; `Ok` on shutdown, `Err` when the port fails.
    async fn read(&self, mut port: Box<dyn Port>, shutdown: &CancellationToken) -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(crate::serial::raw::MAX_FRAME + 512);
        let mut scratch = [0u8; 512];
        let mut silent = false;
        loop {
            while !buf.is_empty() {
                let rule = &self.device.framing;
                match crate::serial::raw::find_frame(&rule.framing, &rule.checksum, &buf, silent) {
                    Decoded::Incomplete => break,
                    Decoded::Reply { len, reply } => {
                        if let Ok(Response::Custom(_, frame)) = reply {
                            apply_frame(&self.device, &self.ids, &frame, &self.image, &self.stats);
                        }
                        buf.drain(..len.clamp(1, buf.len()));
                    }
                    Decoded::Skip { len, why } => {
                        if why == SkipReason::Crc {
                            self.stats.checksum_errors.fetch_add(1, Relaxed);
                            debug!("frame with a bad checksum dropped");
                        }
                        buf.drain(..len.clamp(1, buf.len()));
                    }
                }
            }
            silent = false;
            let pending = !buf.is_empty();
            let read = async {
                if pending {
                    tokio::time::timeout(self.silence, port.read(&mut scratch)).await
                } else {
                    Ok(port.read(&mut scratch).await)
                }
            };
            tokio::select! {
                // Cancel-safe: `read` loses no byte it has not returned.
                () = shutdown.cancelled() => return Ok(()),
                r = read => match r {
                    Err(_elapsed) => silent = true,
                    Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(Ok(n)) => buf.extend_from_slice(&scratch[..n]),
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Ok(Err(e)) => return Err(e),
                },
            }
        }
    }
}
