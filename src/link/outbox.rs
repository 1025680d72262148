//! A session's outbound side: the queue the session loop puts frames on without ever
//! waiting, and the writer task that drains it to the socket.
//!
//! Invariants: the loop never waits on the socket (so two peers pushing backlogs at each
//! other cannot deadlock); `queued` counts the frames not yet taken by the writer, so the
//! session can tell a peer that stopped reading; the writer sends a heartbeat after a
//! heartbeat of silence, stops after a `Close` or when the queue is dropped, and then
//! closes the stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::sleep;
use tokio_util::codec::Encoder;
use tracing::{debug, warn};

use crate::link::proto::{Frame, FrameCodec};

pub(super) enum OutMsg {
    Frame(Frame),
    Raw(Bytes),
}

/// The session's queue to its writer task.
#[derive(Clone)]
pub(super) struct Out {
    pub(super) tx: mpsc::UnboundedSender<OutMsg>,
    pub(super) queued: Arc<AtomicUsize>,
}

impl Out {
    pub(super) fn send(&self, f: Frame) {
        self.queued.fetch_add(1, Relaxed);
        // The writer is gone only when the session is ending anyway.
        let _ = self.tx.send(OutMsg::Frame(f));
    }

    pub(super) fn raw(&self, b: Bytes) {
        self.queued.fetch_add(1, Relaxed);
        let _ = self.tx.send(OutMsg::Raw(b));
    }

    pub(super) fn close(&self, reason: &str) {
        self.send(Frame::Close { reason: reason.to_string() });
    }
}

/// Writes queued frames to the socket; sends a heartbeat after `heartbeat` of silence;
/// stops after a `Close` or when the queue is dropped, then closes the stream (TLS
/// close_notify).
pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<OutMsg>,
    queued: Arc<AtomicUsize>,
    mut codec: FrameCodec,
    heartbeat: Duration,
) {
    let heartbeat = heartbeat.max(Duration::from_millis(10));
    let mut buf = BytesMut::new();
    let mut closing = false;
    loop {
        // Cancel-safe: recv keeps the message queued; the sleep is a timer.
        let first = tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    queued.fetch_sub(1, Relaxed);
                    m
                }
                None => break,
            },
            () = sleep(heartbeat) => OutMsg::Frame(Frame::Heartbeat),
        };
        let mut msg = first;
        loop {
            match msg {
                OutMsg::Raw(b) => buf.extend_from_slice(&b),
                OutMsg::Frame(f) => {
                    closing = matches!(f, Frame::Close { .. });
                    if let Err(e) = codec.encode(&f, &mut buf) {
                        warn!(frame = f.name(), error = %e, "cannot encode frame; not sent");
                    }
                }
            }
            if closing || buf.len() >= 64 << 10 {
                break;
            }
            match rx.try_recv() {
                Ok(m) => {
                    queued.fetch_sub(1, Relaxed);
                    msg = m;
                }
                Err(_) => break,
            }
        }
        if let Err(e) = wr.write_all(&buf).await {
            debug!(error = %e, "write to peer failed");
            return;
        }
        buf.clear();
        if closing {
            break;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}
