//! The simulator on a serial line: the RTU (or ASCII) slave loop, [`Simulator::serve`],
//! and [`Simulator::serve_device`] for a real port. It owns framing the input (`Framer`,
//! no I/O), pacing replies to their wire time, dropping what the master sends over a
//! reply, and recording [`Exchange`]s. What a request does to the units, faults
//! included, is decided in `sim.rs` ([`Simulator::decide`], shared with `sim/tcp.rs`);
//! this file frames that decision for the line.
//!
//! Invariants (the line's part of those in `sim.rs`): bad input never ends the loop and
//! never panics; the input buffer is capped at [`INPUT_CAP`] bytes; with `[line]` a reply
//! leaves on an absolute schedule and no earlier than the request's emulated end plus
//! t3.5 and the turnaround; no lock is held across an `.await`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::serial::rtu;
use crate::sim::{Decision, EXCHANGE_CAP, Exchange, INPUT_CAP, LineConfig, SimError, Simulator};

/// Silence that ends an unframed input when the config has no `[line]`.
const IDLE_SILENCE: Duration = Duration::from_millis(2);

/// A reply decided under the lock, sent after it is released.
struct Outgoing {
    bytes: Vec<u8>,
    delay: Duration,
    /// Answered from the unit's receive queue ([`Fault::Queued`](super::Fault::Queued)):
    /// the serve loop keeps reading while it waits.
    queued: bool,
}

/// When the request being answered arrived, for pacing and the exchange record.
#[derive(Clone, Copy)]
struct Arrival {
    /// First byte read.
    at: Instant,
    /// Frame length.
    len: usize,
}

/// Input framing state: bytes not yet part of a frame (no I/O; see module invariants).
#[derive(Default)]
struct Framer {
    /// Modbus ASCII frames (`:` hex LRC CR LF) instead of RTU.
    ascii: bool,
    buf: Vec<u8>,
    /// Bytes dropped since the counters were last updated.
    garbage: u64,
}

#[derive(Debug, PartialEq)]
enum Event {
    Frame(Vec<u8>),
    CrcError(u8),
}

impl Framer {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > INPUT_CAP {
            self.drop_front(self.buf.len() - INPUT_CAP);
        }
    }

    fn drop_front(&mut self, n: usize) {
        let n = n.min(self.buf.len());
        self.buf.drain(..n);
        self.garbage += n as u64;
    }

    /// The next frame or CRC error in the buffer. `silent`: the line has been quiet for
    /// t3.5, so an incomplete frame will never complete and is given up a byte at a time.
    fn next(&mut self, silent: bool) -> Option<Event> {
        if self.ascii {
            return self.next_ascii();
        }
        loop {
            let len = self.buf.len();
            if len < 2 {
                if silent {
                    self.drop_front(len);
                }
                return None;
            }
            let unit = self.buf[0];
            if unit > 247 {
                self.drop_front(1);
                continue;
            }
            // FC8 requests carry any amount of data (sub-function 0 loops it back): like
            // functions with no length rule, the silence delimits them.
            let rule =
                if self.buf[1] == 8 { None } else { crate::serial::pdu::pdu_len(&self.buf[1..], true) };
            match rule {
                Some(n) => {
                    let total = n + 3;
                    if len < total {
                        if !silent {
                            return None;
                        }
                        self.drop_front(1);
                        continue;
                    }
                    if rtu::crc_ok(&self.buf[..total]) {
                        return Some(Event::Frame(self.buf.drain(..total).collect()));
                    }
                    self.drop_front(1);
                    return Some(Event::CrcError(unit));
                }
                None if !silent => return None,
                // A known function whose length byte has not arrived: incomplete.
                None if matches!(self.buf[1], 15 | 16 | 23) => self.drop_front(1),
                // No length rule: the silence delimits the frame.
                None => {
                    if rtu::crc_ok(&self.buf) {
                        return Some(Event::Frame(std::mem::take(&mut self.buf)));
                    }
                    self.drop_front(1);
                    return Some(Event::CrcError(unit));
                }
            }
        }
    }
}

impl Framer {
    /// The next ASCII frame, handed on as RTU-shaped bytes (unit, PDU, two placeholder
    /// CRC bytes) so one frame handler serves both; a bad LRC or bad hex is a CRC error.
    fn next_ascii(&mut self) -> Option<Event> {
        let start = self.buf.iter().position(|&b| b == b':');
        self.drop_front(start.unwrap_or(self.buf.len()));
        let lf = self.buf.iter().position(|&b| b == b'\n')?;
        // A ':' inside restarts the frame (the spec's rule); the broken start is garbage.
        if let Some(p) = self.buf[1..lf].iter().rposition(|&b| b == b':') {
            self.drop_front(p + 1);
            return self.next_ascii();
        }
        let frame: Vec<u8> = self.buf.drain(..=lf).collect();
        let bin = frame[1..].strip_suffix(b"\r\n").and_then(|digits| hex::decode(digits).ok());
        let unit = bin.as_ref().and_then(|b| b.first().copied()).unwrap_or(0);
        match bin {
            Some(mut bin) if bin.len() >= 3 && bin.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0 => {
                // LRC out, two placeholder bytes in where the RTU CRC would be.
                bin.pop();
                bin.extend_from_slice(&[0, 0]);
                Some(Event::Frame(bin))
            }
            _ => Some(Event::CrcError(unit)),
        }
    }
}

impl Simulator {
    /// Answers requests arriving on `io` until `shutdown` or end of input. Never returns
    /// on bad input; returns `Err` only when the stream itself fails (a pty whose other
    /// side is closed is waited out, not an error).
    pub async fn serve<S>(self, mut io: S, shutdown: CancellationToken) -> Result<(), SimError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let silence = self.timing.map_or(IDLE_SILENCE, |l| rtu::t35(&l.line()));
        if let Some(raw) = &self.shared.raw {
            let turnaround = self.timing.map_or(Duration::ZERO, |l| l.turnaround);
            return raw.serve(io, silence, turnaround, shutdown).await;
        }
        let mut framer = Framer { ascii: self.ascii, ..Framer::default() };
        let mut chunk = [0u8; 256];
        let mut silent = false;
        // Replies of units with a receive queue ([`Fault::Queued`]), due in order.
        let mut queue: std::collections::VecDeque<(Instant, Outgoing, Arrival)> = Default::default();
        // When the first byte still in the framer arrived.
        let mut first_at = Instant::now();
        loop {
            while let Some(event) = framer.next(silent) {
                let out = match event {
                    Event::CrcError(unit) => {
                        self.count_crc_error(unit);
                        None
                    }
                    Event::Frame(f) => {
                        let arrival = Arrival { at: first_at, len: f.len() };
                        // What is left behind the frame arrived after it.
                        first_at =
                            self.timing.map_or(first_at, |l| first_at + rtu::wire_time(&l.line(), f.len()));
                        self.on_frame(&f).map(|out| (out, arrival))
                    }
                };
                match out {
                    None => {}
                    Some((out, arrival)) if out.queued => {
                        let heard = match self.timing.filter(|_| self.pace) {
                            Some(l) => {
                                arrival.at + rtu::wire_time(&l.line(), arrival.len) + rtu::t35(&l.line())
                            }
                            None => Instant::now(),
                        };
                        let turnaround = self.timing.map_or(Duration::ZERO, |l| l.turnaround);
                        let busy = queue.back().map_or(heard, |(due, _, _)| (*due).max(heard));
                        queue.push_back((busy + turnaround + out.delay, out, arrival));
                    }
                    Some((out, arrival)) => {
                        tokio::select! {
                            // Cancel-safety: a reply cut short by shutdown is what a device
                            // losing power mid-frame sends; nothing else is lost.
                            _ = shutdown.cancelled() => return Ok(()),
                            r = self.send(&mut io, out, arrival, &mut framer) => r?,
                        }
                    }
                }
            }
            silent = false;
            self.count_garbage(&mut framer);
            let pending = !framer.buf.is_empty();
            let read = async {
                if pending {
                    tokio::time::timeout(silence, io.read(&mut chunk)).await
                } else {
                    Ok(io.read(&mut chunk).await)
                }
            };
            let due = queue.front().map(|(due, _, _)| *due);
            let read = tokio::select! {
                // Cancel-safety: `read` is cancel-safe, no accepted byte is lost.
                _ = shutdown.cancelled() => return Ok(()),
                r = read => r,
                // Cancel-safety: a dropped sleep only ends early; the reply stays queued.
                () = crate::serial::line::sleep_until_precise(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    if let Some((_, out, arrival)) = queue.pop_front() {
                        let at = Instant::now();
                        io.write_all(&out.bytes).await?;
                        io.flush().await?;
                        self.record(arrival, out.bytes.len(), at);
                    }
                    continue;
                }
            };
            match read {
                Err(_elapsed) => silent = true,
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => {
                    if framer.buf.is_empty() {
                        first_at = Instant::now();
                    }
                    if self.echo {
                        io.write_all(&chunk[..n]).await?;
                    }
                    framer.push(&chunk[..n]);
                }
                Ok(Err(e)) => {
                    if super::read_failed(e, &shutdown).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Serves a real serial device (e.g. a USB adapter cabled to a gateway) with the
    /// `[line]` settings (9600 8E1 without `[line]`) until `shutdown`; `ready` is called
    /// once the port is open. The UART paces the bytes, so only the turnaround and fault
    /// delays are applied here.
    pub async fn serve_device(
        mut self,
        path: &Path,
        shutdown: CancellationToken,
        ready: impl FnOnce(&Path),
    ) -> Result<(), SimError> {
        let line = self.timing.unwrap_or(LineConfig {
            baud: 9600,
            parity: crate::model::Parity::Even,
            data_bits: 8,
            stop_bits: 1,
            turnaround: Duration::ZERO,
        });
        // Opened as the gateway's buses open theirs (one opener for both ends of a cable).
        let port = crate::serial::line::open_tty(&path.to_string_lossy(), &line.line())
            .map_err(|e| SimError::Device { path: path.to_path_buf(), message: e.to_string() })?;
        ready(path);
        self.timing = Some(line);
        self.pace = false;
        self.serve(port, shutdown).await
    }

    fn count_garbage(&self, framer: &mut Framer) {
        if framer.garbage > 0 {
            self.shared.lock().bus.garbage_bytes += std::mem::take(&mut framer.garbage);
        }
    }

    fn count_crc_error(&self, unit: u8) {
        let mut st = self.shared.lock();
        st.bus.crc_errors += 1;
        if let Some(u) = st.units.get_mut(&unit) {
            u.stats.crc_errors_seen += 1;
        }
    }

    /// Applies a good frame to the map and frames the reply for the line (faults
    /// included).
    fn on_frame(&self, frame: &[u8]) -> Option<Outgoing> {
        let Decision { unit: reply_id, pdu, delay, corrupt, noise, queued, drop_byte } =
            self.decide(frame)?;
        let mut bytes: Vec<u8> = (0..noise).map(|_| rand::random::<u8>()).collect();
        if self.ascii {
            crate::serial::ascii::frame(reply_id, &pdu, &mut bytes);
            // The LRC's low digit, changed to another hex digit: a clean LRC error.
            let at = bytes.len().saturating_sub(3);
            if let Some(digit) = bytes.get_mut(at).filter(|_| corrupt) {
                *digit = if *digit == b'0' { b'1' } else { b'0' };
            }
        } else {
            rtu::frame(reply_id, &pdu, &mut bytes);
            if corrupt && let Some(last) = bytes.last_mut() {
                *last ^= 0xA5;
            }
        }
        if drop_byte {
            bytes.remove(bytes.len() / 2);
        }
        Some(Outgoing { bytes, delay, queued })
    }

    /// Sends a reply: after the request's emulated wire time, t3.5 and the turnaround
    /// (and a fault's delay), then, with `[line]`, paced to its wire time on an absolute
    /// schedule. Bytes arriving while the reply is on the wire are dropped (a collision
    /// on a half-duplex line).
    async fn send<S>(
        &self,
        io: &mut S,
        out: Outgoing,
        arrival: Arrival,
        framer: &mut Framer,
    ) -> Result<(), SimError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let turnaround = self.timing.map_or(Duration::ZERO, |l| l.turnaround);
        // On a pty the request arrived at once; on a real UART its wire time has passed.
        let heard = match self.timing.filter(|_| self.pace) {
            Some(l) => arrival.at + rtu::wire_time(&l.line(), arrival.len) + rtu::t35(&l.line()),
            None => Instant::now(),
        };
        let start = heard.max(Instant::now()) + turnaround + out.delay;
        crate::serial::line::sleep_until_precise(start).await;
        let Some(line) = self.timing.filter(|_| self.pace) else {
            let at = Instant::now();
            io.write_all(&out.bytes).await?;
            io.flush().await?;
            self.record(arrival, out.bytes.len(), at);
            return Ok(());
        };
        let ct = rtu::char_time(&line.line()).max(Duration::from_nanos(1));
        let n = out.bytes.len();
        let end = start + ct * u32::try_from(n).unwrap_or(u32::MAX);
        let (mut sent, mut listening, mut scratch) = (0, true, [0u8; 64]);
        // When the last write began: from then on the master may see the reply's end.
        let mut last_write = start;
        while sent < n {
            // Byte k has left the wire at start + (k + 1) * ct.
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(start);
            let due = usize::try_from(elapsed.as_nanos() / ct.as_nanos()).unwrap_or(n).min(n);
            if due > sent {
                last_write = now;
                io.write_all(&out.bytes[sent..due]).await?;
                io.flush().await?;
                sent = due;
                continue;
            }
            // The last byte is timed precisely (it is what the master waits for). The
            // ones before only need to flow: the 1 ms timer is good enough for them, and
            // near the end the precise sleeps go at most 1 ms at a time, so the reply
            // never pauses longer than a chunk of a real UART would (a pause of t3.5
            // would end the frame for the master).
            let next = start + ct * u32::try_from(sent + 1).unwrap_or(u32::MAX);
            let now = Instant::now();
            let precise = end.saturating_duration_since(now) < Duration::from_millis(3);
            let wake = async {
                if precise {
                    crate::serial::line::sleep_until_precise(
                        end.min(next.max(now + Duration::from_millis(1))),
                    )
                    .await;
                } else {
                    tokio::time::sleep_until(next).await;
                }
            };
            tokio::select! {
                () = wake => {}
                // Cancel-safety: `read` is cancel-safe; what it got is dropped anyway.
                r = io.read(&mut scratch), if listening => match r {
                    Ok(k) if k > 0 => framer.garbage += k as u64,
                    _ => listening = false,
                },
            }
        }
        self.record(arrival, n, last_write);
        self.count_garbage(framer);
        Ok(())
    }

    /// Records an answered exchange (with `[line]` only: without it there is no timing
    /// worth recording).
    fn record(&self, arrival: Arrival, reply_len: usize, reply_end: Instant) {
        if self.timing.is_none() {
            return;
        }
        let ex = Exchange { request_at: arrival.at, request_len: arrival.len, reply_len, reply_end };
        let mut st = self.shared.lock();
        if st.exchanges.len() >= EXCHANGE_CAP {
            st.exchanges.pop_front();
        }
        st.exchanges.push_back(ex);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        rtu::frame(unit, pdu, &mut v);
        v
    }

    #[test]
    fn framer_resyncs_after_garbage() {
        let mut f = Framer::default();
        let good = req(1, &[3, 0, 0, 0, 2]);
        f.push(&[0xFF, 0x01, 0x03, 0x77]);
        f.push(&good);
        // 0x77 at offset 2 has no length rule: the framer waits for the silence, then
        // gives up on the junk a byte at a time and finds the request.
        let mut frames = Vec::new();
        for silent in [false, true] {
            while let Some(e) = f.next(silent) {
                if let Event::Frame(b) = e {
                    frames.push(b);
                }
            }
        }
        assert_eq!(frames, vec![good]);
        assert!(f.buf.is_empty());
        assert_eq!(f.garbage, 4);
    }

    #[test]
    fn framer_waits_then_gives_up_on_silence() {
        let mut f = Framer::default();
        f.push(&[1, 0x10, 0, 0, 0, 9, 200, 1, 2]); // claims 200 data bytes
        let good = req(1, &[6, 0, 1, 0, 7]);
        f.push(&good);
        assert_eq!(f.next(false), None);
        let mut got = None;
        while let Some(e) = f.next(true) {
            if let Event::Frame(b) = e {
                got = Some(b);
            }
        }
        assert_eq!(got, Some(good));
    }

    #[test]
    fn unknown_function_framed_by_silence() {
        let mut f = Framer::default();
        let odd = req(1, &[0x41, 1, 2, 3]);
        f.push(&odd);
        assert_eq!(f.next(false), None);
        assert_eq!(f.next(true), Some(Event::Frame(odd)));
    }

    #[test]
    fn diagnostics_of_any_length_framed_by_silence() {
        let mut f = Framer::default();
        let long = req(1, &[8, 0, 0, 1, 2, 3, 4, 5, 6]);
        f.push(&long);
        assert_eq!(f.next(false), None);
        assert_eq!(f.next(true), Some(Event::Frame(long)));
    }

    #[test]
    fn random_input_never_panics_and_stays_bounded() {
        let mut f = Framer::default();
        for round in 0..500u32 {
            let n = rand::random_range(0..300usize);
            let chunk: Vec<u8> = (0..n).map(|_| rand::random::<u8>() % 32).collect();
            f.push(&chunk);
            while f.next(round % 3 == 0).is_some() {}
            assert!(f.buf.len() <= INPUT_CAP);
        }
    }

    #[test]
    fn input_is_capped() {
        let mut f = Framer::default();
        f.push(&[0x10; 2000]);
        assert_eq!(f.buf.len(), INPUT_CAP);
    }
}
