//! What comes back on the line: the reply to the transaction on it (taken off our own
//! echo first), and the bytes heard outside any transaction's window, sorted into late
//! replies and noise.
//!
//! Invariants: bytes reach a caller only as a reply the framing decoded for that caller's
//! request and the ledger accepted; a late reply answers its request in the ledger and
//! is counted, never passed on; a frame cut short by silence, or with a bad CRC, from the
//! unit being asked is its (unreadable) reply and ends the attempt at once.

use std::sync::atomic::Ordering::Relaxed;

use tokio::io::AsyncReadExt;
use tokio::time::{Instant, timeout_at};
use tokio_modbus::{ExceptionCode, Response};
use tracing::debug;

use super::Engine;
use crate::bus::schedule::Judged;
use crate::bus::trace::{TraceDir, Verdict, describe_reply};
use crate::bus::{Job, Port};
use crate::serial::framing::{Decoded, SkipReason};

/// What listening for a reply heard.
pub(super) enum Heard {
    Reply(Result<Response, ExceptionCode>),
    /// Nothing that answers, by the deadline.
    Nothing,
    /// A frame from the unit died short of its length or failed its CRC: it answered,
    /// unreadably.
    Garbled,
}

impl Engine {
    /// Sorts out bytes heard outside a transaction's window: a reply to a request still
    /// open (or just given up on) in the ledger is a late reply, counted and dropped;
    /// anything else is noise. With `silent` the line has gone quiet, so what cannot be
    /// completed is dropped too.
    pub(super) fn sort_stray(&mut self, silent: bool) {
        let now = Instant::now();
        while !self.stray.is_empty() {
            let (mut hit, mut waiting, mut skip, mut any) = (None, false, usize::MAX, false);
            let mut ours = None;
            for (key, e) in self.schedule.ledger.candidates(now) {
                any = true;
                match self.framing.decode(e.what.0, &e.what.1, &self.stray, silent) {
                    Decoded::Reply { len, .. } => {
                        hit = Some((key, len));
                        break;
                    }
                    Decoded::Incomplete => waiting = true,
                    Decoded::Skip { len, why: SkipReason::Late } => ours = Some(len),
                    Decoded::Skip { len, .. } => skip = skip.min(len.max(1)),
                }
            }
            if let (None, Some(len)) = (hit, ours) {
                // A reply the framing knows for ours by its transaction id, to a request
                // given up on: late, whichever unit's entry it answers.
                let len = len.min(self.stray.len());
                self.tap.emit(TraceDir::Rx, &self.stray[..len], None, Verdict::LateReplyDiscarded, || {
                    "late reply, discarded".into()
                });
                self.stats.late_replies.fetch_add(1, Relaxed);
                debug!("late reply discarded");
                self.stray.drain(..len);
                continue;
            }
            if let Some((key, len)) = hit {
                let len = len.min(self.stray.len());
                self.tap.emit(TraceDir::Rx, &self.stray[..len], key, Verdict::LateReplyDiscarded, || {
                    "late reply, discarded".into()
                });
                self.schedule.ledger.stray(key, now);
                self.stats.late_replies.fetch_add(1, Relaxed);
                debug!(unit = key.map(u32::from), "late reply discarded");
                self.stray.drain(..len.min(self.stray.len()));
                continue;
            }
            if any && waiting && !silent {
                return;
            }
            let n = if any && skip != usize::MAX { skip.min(self.stray.len()) } else { self.stray.len() };
            self.stats.noise_bytes.fetch_add(n as u64, Relaxed);
            self.tap.emit(TraceDir::Rx, &self.stray[..n], None, Verdict::Noise, || {
                format!("{n} stray bytes outside a reply window, discarded")
            });
            self.stray.drain(..n);
        }
    }

    /// True when `frame` (already cut out of the line) is the reply to the oldest open
    /// request of some unit other than the transaction's: a late reply, which answers that
    /// request in the ledger.
    fn attribute(&mut self, frame: &[u8]) -> bool {
        let now = Instant::now();
        let hit = self.schedule.ledger.candidates(now).find_map(|(key, e)| {
            matches!(self.framing.decode(e.what.0, &e.what.1, frame, true), Decoded::Reply { len, .. } if len == frame.len())
                .then_some(key)
        });
        match hit {
            Some(key) => {
                self.schedule.ledger.stray(key, now);
                self.stats.late_replies.fetch_add(1, Relaxed);
                debug!(unit = key.map(u32::from), "late reply discarded");
                true
            }
            None => false,
        }
    }

    /// Listens for the reply to `job` until `deadline`, with `echo` bytes of our own
    /// request to take off first; what is in the buffer already (the part of a reply the
    /// attempt before heard) counts. [`Heard::Reply`] is the answer (accepted by the ledger:
    /// nothing sent earlier to the unit can still be answered).
    ///
    /// A frame from the unit that stops short of its length, followed by a silence of
    /// [`Engine::dead_after`], is dead: a byte was lost. It is counted as a framing error
    /// and answers the unit's oldest request in the ledger (it was the unit's reply, if
    /// unreadable), so the retry goes out at once instead of after the timeout.
    pub(super) async fn listen(
        &mut self,
        port: &mut dyn Port,
        job: &Job,
        deadline: Instant,
        mut echo: usize,
    ) -> std::io::Result<Heard> {
        let key = self.key(job.unit);
        let mut scratch = [0u8; 256];
        // The buffer as it stands has been judged at a silence already: judging it again
        // before new bytes arrive cannot change the verdict (and, with the silence in the
        // past, would spin on the CPU while a slow adapter delivers the rest of a frame).
        let mut judged_silent = false;
        // An unreadable frame from the unit may end the attempt early (it was the reply).
        let mut trust_garbled = true;
        loop {
            // Frames we cannot length end at a t3.5 silence.
            // A frame still short of its length after a longer silence is dead.
            let silence_at = match (self.buf.is_empty(), judged_silent) {
                (true, _) => None,
                (false, false) => Some(self.last_activity + self.t35),
                (false, true) => Some(self.last_activity + self.dead_after),
            };
            let wake = silence_at.map_or(deadline, |s| s.min(deadline));
            let silent = match timeout_at(wake, port.read(&mut scratch)).await {
                Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(Ok(n)) => {
                    self.last_activity = Instant::now();
                    self.buf.extend_from_slice(&scratch[..n]);
                    judged_silent = false;
                    if echo > 0 {
                        echo = match self.take_echo(echo) {
                            Some(left) => left,
                            None => {
                                // A garbled echo may look like a garbled reply: only a
                                // readable reply ends this attempt now.
                                trust_garbled = false;
                                0
                            }
                        };
                        if echo > 0 || self.buf.is_empty() {
                            continue;
                        }
                    }
                    false
                }
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => return Ok(Heard::Nothing),
                Err(_) if judged_silent => {
                    self.stats.framing_errors.fetch_add(1, Relaxed);
                    debug!(
                        unit = job.unit,
                        bytes = self.buf.len(),
                        "frame cut short by silence: framing error"
                    );
                    self.tap.emit(
                        TraceDir::Rx,
                        &self.buf,
                        self.framing.frame_unit(&self.buf),
                        Verdict::FramingError,
                        || format!("frame cut short after {} bytes, discarded", self.buf.len()),
                    );
                    let from_unit = !self.framing.replies_name_unit()
                        || self.framing.frame_unit(&self.buf) == Some(job.unit);
                    self.buf.clear();
                    match (from_unit && trust_garbled).then(|| self.garbled(job)).flatten() {
                        Some(heard) => return Ok(heard),
                        None => continue,
                    }
                }
                Err(_) => {
                    judged_silent = true;
                    true
                }
            };
            loop {
                match self.framing.decode(job.unit, &job.request, &self.buf, silent) {
                    Decoded::Incomplete => break,
                    Decoded::Reply { reply, len } => {
                        let verdict = self.schedule.ledger.judge(key, self.txn, Instant::now());
                        let (tv, tag) = match (&verdict, &reply) {
                            (Judged::Accept { .. }, Ok(_)) => (Verdict::Ok, ""),
                            (Judged::Accept { .. }, Err(_)) => (Verdict::Exception, ""),
                            _ => (Verdict::LateReplyDiscarded, "late, discarded: "),
                        };
                        let frame = &self.buf[..len.min(self.buf.len())];
                        self.tap.emit(TraceDir::Rx, frame, Some(job.unit), tv, || {
                            format!("{tag}{}", describe_reply(job.unit, &reply))
                        });
                        match verdict {
                            Judged::Accept { late } => {
                                if late {
                                    // The retry was held back for it: the same request's answer.
                                    self.stats.late_replies.fetch_add(1, Relaxed);
                                    debug!(
                                        unit = job.unit,
                                        "late reply taken: it answers the request being retried"
                                    );
                                }
                                if len < self.buf.len() {
                                    self.stats.noise_bytes.fetch_add((self.buf.len() - len) as u64, Relaxed);
                                }
                                // The transaction is over: nothing of this window is
                                // left for the next one to judge.
                                self.buf.clear();
                                return Ok(Heard::Reply(reply));
                            }
                            Judged::Late | Judged::Unexpected => {
                                self.stats.late_replies.fetch_add(1, Relaxed);
                                debug!(unit = job.unit, "late reply to an earlier request discarded");
                                self.buf.drain(..len.min(self.buf.len()));
                            }
                        }
                    }
                    Decoded::Skip { len, why } => {
                        let len = len.min(self.buf.len());
                        let late = match why {
                            // The framing knows it for ours (a Modbus-TCP transaction id):
                            // counted, and the ledger left as it is (the id says which
                            // request it answers; its unit's oldest entry may be this one).
                            SkipReason::Late => {
                                self.stats.late_replies.fetch_add(1, Relaxed);
                                debug!(unit = job.unit, "late reply to an earlier request discarded");
                                true
                            }
                            SkipReason::Foreign | SkipReason::Mismatch => {
                                let frame = self.buf[..len].to_vec();
                                self.attribute(&frame)
                            }
                            SkipReason::Crc | SkipReason::Noise => false,
                        };
                        let tv = match why {
                            _ if late => Verdict::LateReplyDiscarded,
                            SkipReason::Crc => Verdict::CrcError,
                            SkipReason::Foreign => Verdict::WrongUnit,
                            SkipReason::Mismatch => Verdict::Mismatch,
                            SkipReason::Noise | SkipReason::Late => Verdict::Noise,
                        };
                        let shown = if why == SkipReason::Crc { self.buf.len() } else { len };
                        self.tap.emit(
                            TraceDir::Rx,
                            &self.buf[..shown],
                            self.framing.frame_unit(&self.buf),
                            tv,
                            || match tv {
                                Verdict::LateReplyDiscarded => {
                                    "late reply to an earlier request, discarded".into()
                                }
                                Verdict::CrcError => "frame with a bad checksum, discarded".into(),
                                Verdict::WrongUnit => {
                                    "frame from another unit or for another function".into()
                                }
                                Verdict::Mismatch => "frame that does not fit the request, discarded".into(),
                                _ => format!("{len} bytes of noise"),
                            },
                        );
                        if why == SkipReason::Crc
                            && trust_garbled
                            && self.framing.frame_unit(&self.buf) == Some(job.unit)
                            && let Some(heard) = self.garbled(job)
                        {
                            self.stats.crc_errors.fetch_add(1, Relaxed);
                            self.stats
                                .noise_bytes
                                .fetch_add(self.buf.len().saturating_sub(1) as u64, Relaxed);
                            self.buf.clear();
                            return Ok(heard);
                        }
                        if !late {
                            let counter = match why {
                                SkipReason::Crc => &self.stats.crc_errors,
                                SkipReason::Foreign | SkipReason::Mismatch => &self.stats.foreign_frames,
                                SkipReason::Noise | SkipReason::Late => &self.stats.noise_bytes,
                            };
                            if why != SkipReason::Noise {
                                debug!(unit = job.unit, ?why, "frame discarded");
                            }
                            counter.fetch_add(if why == SkipReason::Noise { len as u64 } else { 1 }, Relaxed);
                        }
                        self.buf.drain(..len);
                    }
                }
                if self.buf.is_empty() {
                    break;
                }
            }
        }
    }

    /// A frame from `job`'s unit arrived unreadable (cut short, or a bad CRC): it is the
    /// unit's reply to its oldest open request. If that is this transaction's, the attempt
    /// is over and the retry may go at once ([`Heard::Garbled`]); if it was an earlier
    /// request's, it was a late reply, counted, and listening goes on (`None`).
    fn garbled(&mut self, job: &Job) -> Option<Heard> {
        match self.schedule.ledger.judge(self.key(job.unit), self.txn, Instant::now()) {
            Judged::Accept { .. } => Some(Heard::Garbled),
            Judged::Late | Judged::Unexpected => {
                self.stats.late_replies.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Takes the echo of our request off the front of the buffer, with `left` of its
    /// bytes still expected; returns how many are still expected. Bytes that are not the
    /// echo end the search for it (the adapter dropped it, or it was garbled): they are
    /// judged as the reply, which rejects them if they are not (`None`).
    fn take_echo(&mut self, left: usize) -> Option<usize> {
        let from = self.out.len() - left;
        let n = left.min(self.buf.len());
        if self.buf[..n] == self.out[from..from + n] {
            self.tap.emit(TraceDir::Rx, &self.buf[..n], None, Verdict::EchoRemoved, || {
                format!("{n} bytes of our own request echoed, taken off")
            });
            self.buf.drain(..n);
            Some(left - n)
        } else {
            debug!("expected the local echo of the request, got other bytes");
            None
        }
    }
}
