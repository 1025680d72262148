//! One transaction on the line: the request encoded once, then each attempt (the silence
//! before it, the request with its RS-485 direction and wire time, the reply listened for)
//! until one is answered or the retries run out.
//!
//! Invariants: a retry waits until the attempt before can no longer be answered (or takes
//! that answer), so one request never leaves two replies on the line; a broadcast is
//! never listened for and "returns" the echo a unit would have sent; a failed write
//! never leaves our transmitter on; `Err` means only that the port failed.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, sleep_until};
use tokio_modbus::{ExceptionCode, Request, Response};
use tracing::debug;

use super::Engine;
use super::port::write_frame;
use super::reply::Heard;
use crate::bus::trace::{TraceDir, Verdict, describe_request};
use crate::bus::{BusError, Job, Port};
use crate::serial::rtu;

/// What one attempt of a transaction came to.
enum Attempt {
    Done(Result<Response, ExceptionCode>),
    NoReply,
    /// The reply came cut short or corrupt: the attempt is over at once.
    Garbled,
}

impl Engine {
    /// One transaction with its retries. `Err` only for an I/O failure of the port.
    pub(super) async fn transaction(
        &mut self,
        port: &mut dyn Port,
        job: &Job,
    ) -> std::io::Result<Result<Response, BusError>> {
        self.out.clear();
        if let Err(e) = self.framing.encode(job.unit, &job.request, &mut self.out) {
            return Ok(Err(BusError::Invalid(e)));
        }
        self.txn += 1;
        let key = self.key(job.unit);
        let attempts = job.retries.saturating_add(1);
        for attempt in 1..=attempts {
            // The attempt before may still be answered: the retry waits for that reply
            // (the same request's answer, so it is taken) or until it can no longer come.
            // Sending it earlier would leave two replies for one request, the second of
            // which would land in the next transaction's window.
            while let Some(until) = self.schedule.ledger.blocked_until(key, Instant::now()) {
                if let Heard::Reply(reply) = self.listen(port, job, until, 0).await? {
                    return Ok(self.done(job, reply));
                }
            }
            match self.attempt(port, job).await? {
                Attempt::Done(reply) => return Ok(self.done(job, reply)),
                Attempt::NoReply if job.unit == 0 => return Ok(Ok(broadcast_echo(&job.request))),
                Attempt::NoReply => {
                    self.stats.timeouts.fetch_add(1, Relaxed);
                    self.tap.emit(TraceDir::Rx, &[], Some(job.unit), Verdict::Timeout, || {
                        format!(
                            "unit {} no reply within {}",
                            job.unit,
                            humantime::format_duration(job.timeout)
                        )
                    });
                    debug!(unit = job.unit, attempt, "no valid reply");
                }
                Attempt::Garbled => debug!(unit = job.unit, attempt, "reply unreadable"),
            }
        }
        Ok(Err(BusError::Timeout { attempts }))
    }

    /// Counts a transaction's answer and turns it into its outcome.
    fn done(&self, job: &Job, reply: Result<Response, ExceptionCode>) -> Result<Response, BusError> {
        self.stats.transactions.fetch_add(1, Relaxed);
        reply.map_err(|code| {
            self.stats.exceptions.fetch_add(1, Relaxed);
            debug!(unit = job.unit, ?code, "exception reply");
            BusError::Exception(code)
        })
    }

    /// Waits until the line has been silent for the frame gap since the last byte and
    /// `not_before` has passed, sorting out anything heard meanwhile (a late reply, noise)
    /// and anything already waiting in the port. Gives up waiting — and sends anyway —
    /// after `limit`, so a jabbering line cannot stall the bus for ever.
    async fn wait_silence(
        &mut self,
        port: &mut dyn Port,
        not_before: Instant,
        limit: Duration,
    ) -> std::io::Result<()> {
        let give_up = Instant::now() + limit;
        let mut scratch = [0u8; 256];
        loop {
            let quiet_at = (self.last_activity + self.gap).max(not_before).min(give_up);
            if Instant::now() >= quiet_at {
                // Bytes already received but not read yet are stale too (with no gap to
                // wait out, nothing else would have read them). Readiness is checked
                // without a system call when nothing has arrived.
                match port.read(&mut scratch).now_or_never() {
                    Some(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Some(Ok(n)) => {
                        self.last_activity = Instant::now();
                        self.stray.extend_from_slice(&scratch[..n]);
                        self.sort_stray(false);
                        continue;
                    }
                    Some(Err(e)) => return Err(e),
                    None => {
                        self.sort_stray(true);
                        return Ok(());
                    }
                }
            }
            // The silence is timed precisely: the 1 ms timer would add up to a whole
            // t3.5 at 115200 baud (1.75 ms) to every transaction.
            let read = tokio::select! {
                // Cancel-safety: `read` is cancel-safe; a dropped sleep only ends early.
                () = self.timer.sleep_until(quiet_at) => continue,
                r = port.read(&mut scratch) => r,
            };
            match read {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.last_activity = Instant::now();
                    self.stray.extend_from_slice(&scratch[..n]);
                    self.sort_stray(false);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn attempt(&mut self, port: &mut dyn Port, job: &Job) -> std::io::Result<Attempt> {
        // A device that needs a longer turnaround gets it on top of the t3.5 silence.
        // What the last window left unfinished is judged with what comes before the send.
        self.stray.append(&mut self.buf);
        let not_before = Instant::now() + job.turnaround;
        self.wait_silence(port, not_before, job.timeout.max(self.gap * 4) + job.turnaround).await?;
        self.buf.clear();
        if let Some(rts) = self.rts.as_mut() {
            // Userspace RS-485: transmitter on, and the settle time before the first bit.
            rts.line.set_rts(rts.levels.transmit)?;
            self.timer.sleep_until(Instant::now() + rts.delay_before).await;
        }
        let write_start = Instant::now();
        let wrote = write_frame(port, &self.out, job.timeout).await;
        if let (Err(_), Some(rts)) = (&wrote, self.rts.as_mut()) {
            // A failed port must not leave our transmitter jamming the line.
            let _ = rts.line.set_rts(rts.levels.idle);
        }
        wrote?;
        let written = Instant::now();
        // The request has left the UART when its last character is on the wire.
        let wire = if self.tcp_device { Duration::ZERO } else { rtu::wire_time(&self.line, self.out.len()) };
        let drained = written.max(write_start + wire);
        if let Some(rts) = self.rts.as_mut() {
            // The last stop bit is out (by the line's wire time, not a blocking tcdrain):
            // hold the line for the delay after, then let go so the device can answer.
            self.timer.sleep_until(drained + rts.delay_after).await;
            rts.line.set_rts(rts.levels.idle)?;
        }
        self.last_activity = drained;
        debug!(unit = job.unit, request = ?job.request, "sent");
        let verdict = if job.unit == 0 { Verdict::Broadcast } else { Verdict::Sent };
        self.tap.emit(TraceDir::Tx, &self.out, Some(job.unit), verdict, || {
            describe_request(job.unit, &job.request)
        });
        if job.unit == 0 {
            // Broadcast: nobody answers; give the devices their turnaround to act.
            sleep_until(drained + self.gap + job.turnaround).await;
            return Ok(Attempt::NoReply);
        }
        self.schedule.ledger.sent(
            self.key(job.unit),
            self.txn,
            job.timeout,
            (job.unit, job.request.clone()),
            drained,
        );
        // Bytes of our own echo still to come (and to take off).
        let echo = if self.local_echo { self.out.len() } else { 0 };
        Ok(match self.listen(port, job, drained + job.timeout, echo).await? {
            Heard::Reply(reply) => Attempt::Done(reply),
            Heard::Nothing => Attempt::NoReply,
            Heard::Garbled => Attempt::Garbled,
        })
    }
}

/// What a broadcast "returns": the echo a unit would have sent, so callers see success.
fn broadcast_echo(req: &Request<'_>) -> Response {
    match req {
        Request::WriteSingleCoil(a, v) => Response::WriteSingleCoil(*a, *v),
        Request::WriteSingleRegister(a, v) => Response::WriteSingleRegister(*a, *v),
        Request::WriteMultipleCoils(a, v) => Response::WriteMultipleCoils(*a, v.len() as u16),
        Request::WriteMultipleRegisters(a, v) => Response::WriteMultipleRegisters(*a, v.len() as u16),
        Request::MaskWriteRegister(a, x, y) => Response::MaskWriteRegister(*a, *x, *y),
        _ => Response::Custom(req.function_code().value(), bytes::Bytes::new()),
    }
}
