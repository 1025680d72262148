//! The bus's port: what an opener hands the engine ([`Opened`]), the slot that holds the
//! open port and its reopen back-off ([`PortSlot`]), and writing a frame within a limit.
//!
//! Invariants: a port that fails after carrying a transaction is reopened at once; one
//! that fails before (it accepts the open and fails the I/O) and a failed open wait a
//! back-off that doubles up to `reopen_max`, and each new reason is logged once; a write
//! never holds the bus longer than its limit.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::bus::Port;
use crate::serial::line::PortKind;
use crate::serial::rs485::Rts;

/// What a bus opener hands the engine: the port, and its RTS line when the bus switches
/// the RS-485 direction itself (`rs485 = "rts"`).
pub struct Opened {
    /// The port the traffic goes through.
    pub port: Box<dyn Port>,
    /// Userspace direction control, set around each request in `attempt`.
    pub rts: Option<Rts>,
}

impl From<Box<dyn Port>> for Opened {
    fn from(port: Box<dyn Port>) -> Self {
        Self { port, rts: None }
    }
}

/// Writes `frame` to the port, or fails when the port does not take it within `limit`
/// (a device server whose TCP window stays shut, a UART held by flow control): a write
/// never holds the bus longer than a request's timeout, and the port is reopened.
pub(super) async fn write_frame(port: &mut dyn Port, frame: &[u8], limit: Duration) -> std::io::Result<()> {
    match tokio::time::timeout(limit, port.write_all(frame)).await {
        Ok(wrote) => wrote,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the port did not take the request within {}", humantime::format_duration(limit)),
        )),
    }
}

/// The port and its reopen back-off.
pub(super) struct PortSlot {
    /// What the port is, in the log lines' words.
    pub(super) kind: PortKind,
    pub(super) port: Option<Box<dyn Port>>,
    pub(super) backoff: Duration,
    pub(super) next_open: Instant,
    pub(super) last_error: String,
    /// The open port has carried a transaction (whatever the device said): a port that
    /// fails before that is flapping (accepts the open, fails the I/O) and is reopened
    /// with back-off, not at the poll rate.
    pub(super) proven: bool,
}

impl PortSlot {
    /// A port not opened yet, to be opened at once.
    pub(super) fn new(kind: PortKind) -> Self {
        Self {
            kind,
            port: None,
            backoff: Duration::from_millis(100),
            next_open: Instant::now(),
            last_error: String::from("not opened yet"),
            proven: false,
        }
    }

    /// The port is open.
    pub(super) fn opened(&mut self, port: Box<dyn Port>) {
        info!("{} open", self.kind.noun());
        self.port = Some(port);
        self.proven = false;
    }

    /// Opening the port failed: said once per new reason, and tried again after the
    /// back-off, which doubles up to `reopen_max`.
    pub(super) fn open_failed(&mut self, e: String, reopen_max: Duration) {
        if e != self.last_error {
            warn!(
                error = %e,
                retry_in = %humantime::format_duration(self.backoff),
                "cannot open the bus's port; trying again after the back-off"
            );
        }
        self.last_error = e;
        self.next_open = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(reopen_max);
    }

    /// The port failed: drop it and schedule the reopen.
    pub(super) fn failed(&mut self, e: String, reopen_max: Duration) {
        if self.proven {
            warn!(error = %e, "{} failed; reopening", self.kind.noun());
            self.next_open = Instant::now();
        } else {
            if e != self.last_error {
                warn!(
                    error = %e,
                    retry_in = %humantime::format_duration(self.backoff),
                    "{} fails as soon as it is open; reopening with back-off",
                    self.kind.noun()
                );
            }
            self.next_open = Instant::now() + self.backoff;
            self.backoff = (self.backoff * 2).min(reopen_max);
        }
        self.last_error = e;
        self.port = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_port_that_takes_no_bytes_fails_the_write_after_the_limit() {
        // A pipe with room for 4 bytes whose far end never reads: a device server whose
        // TCP window stays shut.
        let (mut port, _device) = tokio::io::duplex(4);
        let err = write_frame(&mut port, &[0u8; 16], Duration::from_millis(50)).await.expect_err("stuck");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(err.to_string(), "the port did not take the request within 50ms");
    }
}
