//! A serial line: its character framing (speed, data bits, parity, stop bits), opening
//! its port (a serial device by path, or a serial device server over TCP), and sleeping
//! precisely enough to time its silences.
//!
//! Invariants: a port is opened by path every time (a re-plugged adapter is found again);
//! [`sleep_until_precise`] never wakes early and is cancel-safe.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until};
use tracing::debug;

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Character framing of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// Bits per second.
    pub baud: u32,
    /// Data bits per character (7 or 8).
    pub data_bits: u8,
    /// Parity.
    pub parity: Parity,
    /// Stop bits (1 or 2).
    pub stop_bits: u8,
}

/// Something a bus can talk through: a serial port, or a TCP connection to a serial
/// device server.
pub trait Port: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Port for T {}

/// Longest wait for a serial device server to accept a TCP connection.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a bus port: `tcp://host:port` connects to a serial device server, anything
/// else is a serial device path ([`open_serial`]).
pub async fn open_port(port: &str, line: &Line) -> Result<Box<dyn Port>, String> {
    let Some(addr) = port.strip_prefix("tcp://") else {
        return open_serial(port, line);
    };
    match tokio::time::timeout(TCP_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Requests are small and latency is the line's budget: no Nagle delay.
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as Box<dyn Port>)
        }
        Ok(Err(e)) => Err(format!("{port}: {e}")),
        Err(_) => Err(format!("{port}: no connection within {TCP_CONNECT_TIMEOUT:?}")),
    }
}

/// Opens the serial port at `path` with the line settings, by path every time, so a
/// re-plugged adapter (or a re-pointed `/dev/serial/by-id` link) is found again.
pub fn open_serial(path: &str, line: &Line) -> Result<Box<dyn Port>, String> {
    let parity = match line.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let data_bits =
        if line.data_bits == 7 { tokio_serial::DataBits::Seven } else { tokio_serial::DataBits::Eight };
    let stop_bits =
        if line.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One };
    let port = tokio_serial::new(path, line.baud)
        .parity(parity)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None);
    tokio_serial::SerialStream::open(&port)
        .map(|s| Box::new(s) as Box<dyn Port>)
        .map_err(|e| format!("{path}: {e}"))
}

/// Sleeps until `deadline`, accurate to tens of microseconds. tokio's timer wakes on 1 ms
/// ticks, rounded up, which on a fast line is as long as the silences being timed (t3.5 is
/// 1.75 ms above 19200 baud). A one-shot Linux timerfd, registered with tokio's reactor,
/// fires on the kernel's high-resolution clock instead: no thread and no spinning, so 64
/// busy buses cost no more CPU than one. Never wakes early; cancel-safe (dropping it
/// closes the timer). Falls back to the tokio timer if a timerfd cannot be made.
pub async fn sleep_until_precise(deadline: Instant) {
    if deadline <= Instant::now() {
        return;
    }
    if let Err(e) = timerfd_sleep(deadline).await {
        debug!(error = %e, "no timerfd; using the 1 ms timer");
        sleep_until(deadline).await;
    }
}

async fn timerfd_sleep(deadline: Instant) -> std::io::Result<()> {
    use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(());
    }
    let flags = TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC;
    let fd = rustix::time::timerfd_create(TimerfdClockId::Monotonic, flags)?;
    let it_value = Timespec::try_from(left).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value };
    rustix::time::timerfd_settime(&fd, TimerfdTimerFlags::empty(), &spec)?;
    #[expect(
        deprecated,
        reason = "the safe constructor is deprecated because an arbitrary AsRawFd may swap or close \
                  its fd; an OwnedFd cannot, which is the I/O-safety the unsafe replacement asks for"
    )]
    let fd = tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
    // Readable means expired: the expiry count itself is not needed.
    let _expired = fd.readable().await?;
    Ok(())
}
