//! Write-back of one peer: received points that drive writes into local device points,
//! and what those outputs do when the link is lost.
//!
//! Invariants: only the latest good value of each source point is written (values that
//! arrive while a write is on the bus are coalesced to the newest), and only when it
//! differs from the last value written successfully; the link's receive path never
//! waits for a write (it drops the value in a slot and moves on); `OnLoss::Fallback`
//! writes its value once per outage, after the link has been down for `loss_after`
//! (the process start counts as the start of an outage); `OnLoss::Keep` writes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, instrument, warn};

use crate::model::{OnLoss, WriteBack};
use crate::point::value::{Quality, Sample, Value};
use crate::writer::Writer;

/// The link's side of write-back: where received samples are offered.
#[derive(Debug, Clone)]
pub struct Offer {
    from: Arc<HashMap<String, usize>>,
    latest: Arc<Mutex<HashMap<usize, Value>>>,
    notify: Arc<Notify>,
}

impl Offer {
    /// True when no received point drives a write.
    pub fn is_empty(&self) -> bool {
        self.from.is_empty()
    }

    /// Offers the samples of one received batch (point names without the peer prefix).
    /// Only good samples of write-back sources are kept, the newest per source.
    pub fn offer<'a>(&self, samples: impl IntoIterator<Item = (&'a str, &'a Sample)>) {
        if self.from.is_empty() {
            return;
        }
        let mut any = false;
        {
            let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            for (point, sample) in samples {
                let Some(i) = self.from.get(point) else {
                    continue;
                };
                if let (Quality::Good, Some(v)) = (sample.quality, &sample.value) {
                    latest.insert(*i, v.clone());
                    any = true;
                }
            }
        }
        if any {
            self.notify.notify_one();
        }
    }
}

/// The task that carries out one peer's write-backs.
pub struct WriteBacks {
    peer: String,
    rules: Vec<WriteBack>,
    writer: Writer,
    offer: Offer,
    connected: watch::Receiver<bool>,
    /// Per rule: its last write failed (and was logged); the next failures are debug
    /// lines until one succeeds, so a dead target does not log a WARN per batch.
    failing: Vec<AtomicBool>,
}

impl WriteBacks {
    /// Write-backs of `peer`; `connected` follows the link state.
    pub fn new(peer: &str, rules: &[WriteBack], writer: Writer, connected: watch::Receiver<bool>) -> Self {
        let from = rules.iter().enumerate().map(|(i, w)| (w.from.clone(), i)).collect();
        Self {
            peer: peer.to_string(),
            rules: rules.to_vec(),
            writer,
            offer: Offer { from: Arc::new(from), latest: Arc::default(), notify: Arc::default() },
            connected,
            failing: rules.iter().map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Where the link offers received samples.
    pub fn offer(&self) -> Offer {
        self.offer.clone()
    }

    /// Runs until `shutdown`.
    #[instrument(name = "writeback", skip_all, fields(peer = %self.peer))]
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut last: Vec<Option<Value>> = vec![None; self.rules.len()];
        let mut down_since = (!*self.connected.borrow_and_update()).then(Instant::now);
        let mut fell_back = vec![false; self.rules.len()];
        loop {
            let next_loss = down_since.and_then(|since| {
                self.rules
                    .iter()
                    .zip(&fell_back)
                    .filter(|(w, done)| !**done && w.on_loss != OnLoss::Keep)
                    .map(|(w, _)| since + w.loss_after)
                    .min()
            });
            tokio::select! {
                // Cancel-safe: a missed notification is stored as a permit.
                () = self.offer.notify.notified() => {
                    let latest = std::mem::take(
                        &mut *self.offer.latest.lock().unwrap_or_else(|e| e.into_inner()),
                    );
                    for (i, value) in latest {
                        if last[i].as_ref() != Some(&value) && self.write(i, &value, "received").await {
                            last[i] = Some(value);
                        }
                    }
                }
                // Cancel-safe: watch state is re-read.
                r = self.connected.changed() => {
                    if r.is_err() {
                        return;
                    }
                    if *self.connected.borrow_and_update() {
                        down_since = None;
                        fell_back.iter_mut().for_each(|f| *f = false);
                    } else if down_since.is_none() {
                        down_since = Some(Instant::now());
                    }
                }
                // Cancel-safe: a timer.
                () = sleep_until(next_loss.unwrap_or_else(Instant::now)), if next_loss.is_some() => {
                    let Some(since) = down_since else { continue };
                    let now = Instant::now();
                    for i in 0..self.rules.len() {
                        let w = &self.rules[i];
                        if fell_back[i] || now < since + w.loss_after {
                            continue;
                        }
                        fell_back[i] = true;
                        if let OnLoss::Fallback(v) = w.on_loss.clone()
                            && self.write(i, &v, "link lost: fallback").await {
                                last[i] = Some(v);
                            }
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn write(&self, i: usize, value: &Value, why: &str) -> bool {
        let w = &self.rules[i];
        match self.writer.write(&w.to, value).await {
            Ok(()) => {
                info!(from = %w.from, to = %w.to, %value, why, "write-back");
                if self.failing.get(i).is_some_and(|f| f.swap(false, Relaxed)) {
                    info!(from = %w.from, to = %w.to, "write-back works again");
                }
                true
            }
            Err(e) => {
                if self.failing.get(i).is_some_and(|f| f.swap(true, Relaxed)) {
                    debug!(from = %w.from, to = %w.to, %value, why, error = %e, "write-back failed again");
                } else {
                    warn!(from = %w.from, to = %w.to, %value, why, error = %e, "write-back failed; retried with the next value received");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A target that cannot be written (here: not a known point; in the field, a device
    /// that stopped answering) logged a WARN for every batch the peer sent.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failing_target_warns_once_not_per_batch() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || w.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(sub);
        let log = || String::from_utf8_lossy(&buf.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
        let rule = WriteBack {
            from: "pump.speed".into(),
            to: "nowhere.setpoint".into(),
            on_loss: OnLoss::Keep,
            loss_after: Duration::from_secs(30),
        };
        let (_connected_tx, connected) = watch::channel(true);
        let wb = WriteBacks::new("b", &[rule], Writer::default(), connected);
        let offer = wb.offer();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(wb.run(shutdown.clone()));
        for i in 0..5 {
            let sample = Sample {
                value: Some(Value::Int(i)),
                at: SystemTime::now(),
                quality: Quality::Good,
                via: None,
            };
            offer.offer([("pump.speed", &sample)]);
            // Each value tried (and failed) before the next is offered.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while log().matches("write-back failed").count() <= i as usize {
                assert!(tokio::time::Instant::now() < deadline, "value {i} never tried:\n{}", log());
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        shutdown.cancel();
        task.await.expect("write-back task stops");
        let log = log();
        assert_eq!(log.matches("write-back failed again").count(), 4, "{log}");
        assert_eq!(log.lines().filter(|l| l.contains("WARN")).count(), 1, "{log}");
    }
}
