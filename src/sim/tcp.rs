//! The simulator as Modbus-TCP devices: the same units, register maps and faults as on
//! a serial line, served by a Modbus-TCP server (`m2m-gateway simulate --tcp ADDR`, and
//! tests of `modbus-tcp://` buses).
//!
//! Each connection is served in its own task, one request at a time in arrival order,
//! as a single-threaded device would: a `late` fault delays that answer and everything
//! behind it on the connection. With [`SimHandle::set_tcp_parallel`](crate::simulate::SimHandle::set_tcp_parallel)
//! a connection works on every request as it arrives and answers each after its own
//! delay, out of order when the delays differ, as a device that pipelines does (the
//! high-water mark of requests outstanding is counted). The MBAP unit id selects the unit; unit 0 is applied as
//! a broadcast (no answer), and a unit that is not simulated does not answer, as on a
//! line. `corrupt-crc` and `noise` faults do not apply (MBAP has no check to break and
//! cannot resynchronise); `wrong-unit` answers with the other unit id.
//!
//! Invariants: bad input closes that connection only (an MBAP length past a unit id and
//! a 253-byte PDU); a frame of another protocol id is not answered; [`SimHandle::reset_connections`](crate::simulate::SimHandle::reset_connections)
//! resets every open connection (RST, not FIN) and the listener keeps accepting; every
//! task ends at shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::sim::{Decision, SimError, Simulator};

/// MBAP frames as whole byte strings, header kept: the length field (offset 4, two
/// bytes) counts what follows it, the 6 header bytes before it are added; at most a unit
/// id and a 253-byte PDU.
fn mbap_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_offset(4)
        .length_field_length(2)
        .length_adjustment(6)
        .num_skip(0)
        .max_frame_length(254)
        .new_codec()
}

impl Simulator {
    /// Serves the units as Modbus-TCP servers on `listener` until `shutdown`.
    pub async fn serve_tcp(self, listener: TcpListener, shutdown: CancellationToken) -> Result<(), SimError> {
        let tracker = TaskTracker::new();
        loop {
            let (stream, peer) = tokio::select! {
                // Cancel-safe: accept loses no connection when dropped.
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "simulator cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let _ = stream.set_nodelay(true);
            let (sim, token) = (self.clone(), shutdown.clone());
            tracker.spawn(async move {
                tracing::debug!(%peer, "modbus-tcp master connected to the simulator");
                sim.tcp_connection(stream, token).await;
            });
        }
        tracker.close();
        tracker.wait().await;
        Ok(())
    }

    async fn tcp_connection(&self, stream: TcpStream, shutdown: CancellationToken) {
        let mut resets = self.tcp_connected();
        let (rd, mut wr) = stream.into_split();
        let mut input = FramedRead::new(rd, mbap_codec());
        // Parallel mode: replies decided, each sent once its own delay has passed.
        let mut later = futures::stream::FuturesUnordered::<
            std::pin::Pin<Box<dyn Future<Output = Vec<u8>> + Send>>,
        >::new();
        loop {
            let frame = tokio::select! {
                // Cancel-safe: a reply not yet due stays in the set.
                Some(out) = later.next(), if !later.is_empty() => {
                    let out: Vec<u8> = out;
                    self.tcp_outstanding(false);
                    if wr.write_all(&out).await.is_err() {
                        return;
                    }
                    continue;
                }
                // Cancel-safe: FramedRead keeps a partial frame buffered.
                f = input.next() => match f {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "simulator closes a connection that is not modbus-tcp");
                        return;
                    }
                    None => return,
                },
                _ = resets.changed() => return reset(input, wr),
                () = shutdown.cancelled() => return,
            };
            // Header: transaction, protocol (0: Modbus; others are not answered), length.
            if frame.len() < 8 || frame[2..4] != [0, 0] {
                continue;
            }
            // The map works on RTU-shaped frames: unit, PDU, two (unchecked) CRC bytes.
            let mut rtu = frame[6..].to_vec();
            rtu.extend_from_slice(&[0, 0]);
            let Some(Decision { unit, pdu, delay, .. }) = self.decide(&rtu) else { continue };
            if self.tcp_parallel() && !delay.is_zero() {
                self.tcp_outstanding(true);
                let out = reply(&frame, unit, &pdu);
                later.push(Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    out
                }));
                continue;
            }
            if self.tcp_parallel() {
                // Answered at once: outstanding only while it is worked on.
                self.tcp_outstanding(true);
                self.tcp_outstanding(false);
            }
            // A timer, even of zero, waits for the next 1 ms tick: an instant device
            // answers without one.
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = resets.changed() => return reset(input, wr),
                    () = shutdown.cancelled() => return,
                }
            }
            if wr.write_all(&reply(&frame, unit, &pdu)).await.is_err() {
                return;
            }
        }
    }
}

/// The MBAP reply to the request `frame`: its transaction and protocol ids, `unit`, `pdu`.
fn reply(frame: &[u8], unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 + pdu.len());
    out.extend_from_slice(&frame[..4]);
    out.extend_from_slice(&u16::try_from(pdu.len() + 1).unwrap_or(u16::MAX).to_be_bytes());
    out.push(unit);
    out.extend_from_slice(pdu);
    out
}

/// Closes a connection with a reset (RST), as a device that reboots does.
fn reset(input: FramedRead<OwnedReadHalf, LengthDelimitedCodec>, wr: OwnedWriteHalf) {
    if let Ok(stream) = input.into_inner().reunite(wr) {
        let _ = stream.set_zero_linger();
    }
}

/// Serves `sim` as Modbus-TCP devices on `addr` until `shutdown`; `ready` is called once
/// with the address bound (port 0 picks a free one). For `m2m-gateway simulate --tcp`.
pub async fn run_tcp(
    sim: Simulator,
    addr: SocketAddr,
    shutdown: CancellationToken,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), SimError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| SimError::Port { what: format!("listen on {addr}"), message: e.to_string() })?;
    let local = listener.local_addr().unwrap_or(addr);
    ready(local);
    sim.serve_tcp(listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::Decoder;

    #[test]
    fn frames_are_cut_by_their_length_field() {
        let mut buf = bytes::BytesMut::from(&[0, 1, 0, 0, 0, 6, 1, 3, 0, 0, 0, 4, 0, 2][..]);
        let frame = mbap_codec().decode(&mut buf).expect("decodes").expect("a frame");
        assert_eq!(&frame[..], [0, 1, 0, 0, 0, 6, 1, 3, 0, 0, 0, 4]);
        assert_eq!(&buf[..], [0, 2]);
        let mut long = bytes::BytesMut::from(&[0, 1, 0, 0, 1, 0x2C, 1][..]);
        assert!(mbap_codec().decode(&mut long).is_err(), "a length of 300 is not modbus-tcp");
    }
}
