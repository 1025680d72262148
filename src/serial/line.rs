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

use crate::point::names::Named;

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

impl Named for Parity {
    const NAMES: &'static [(Self, &'static str)] =
        &[(Parity::None, "none"), (Parity::Even, "even"), (Parity::Odd, "odd")];
}
crate::point::names::named_impls!(Parity);

impl From<Parity> for tokio_serial::Parity {
    fn from(parity: Parity) -> Self {
        match parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        }
    }
}

impl Parity {
    /// The letter of the parity in the usual `8E1` shorthand.
    pub fn letter(self) -> char {
        match self {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        }
    }
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

/// What a bus's `port` names, for the words its log lines use and its timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// A serial device path.
    Serial,
    /// `tcp://host:port`: a serial device server carrying the line's bytes.
    DeviceServer,
    /// `modbus-tcp://host:port`: a Modbus-TCP device.
    ModbusTcp,
}

impl PortKind {
    /// The kind of `port` (as [`open_port`] reads it).
    pub fn of(port: &str) -> Self {
        if port.starts_with("tcp://") {
            Self::DeviceServer
        } else if port.starts_with("modbus-tcp://") {
            Self::ModbusTcp
        } else {
            Self::Serial
        }
    }

    /// The port in an operator's words: `serial port open`, `connection open`.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Serial => "serial port",
            Self::DeviceServer => "device server connection",
            Self::ModbusTcp => "connection",
        }
    }

    /// A TCP connection (its bytes come in segments, not at the line's pace).
    pub fn is_tcp(self) -> bool {
        self != Self::Serial
    }
}

/// Longest wait for a serial device server to accept a TCP connection.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a bus port: `tcp://host:port` connects to a serial device server,
/// `modbus-tcp://host:port` to a Modbus-TCP device, anything else is a serial device
/// path ([`open_serial`]).
pub async fn open_port(port: &str, line: &Line) -> Result<Box<dyn Port>, String> {
    let Some(addr) = port.strip_prefix("tcp://").or_else(|| port.strip_prefix("modbus-tcp://")) else {
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
    open_tty(path, line).map_err(|e| format!("{path}: {e}"))
}

/// Opens the serial port at `path` with the line settings: the one opener of the gateway's
/// buses and of the simulator serving a real port.
pub fn open_tty(path: &str, line: &Line) -> std::io::Result<Box<dyn Port>> {
    let parity = line.parity.into();
    let data_bits =
        if line.data_bits == 7 { tokio_serial::DataBits::Seven } else { tokio_serial::DataBits::Eight };
    let stop_bits =
        if line.stop_bits == 2 { tokio_serial::StopBits::Two } else { tokio_serial::StopBits::One };
    let port = tokio_serial::new(path, line.baud)
        .parity(parity)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None);
    mio_serial::SerialStream::open(&port)
        .map_err(std::io::Error::from)
        .and_then(Tty::new)
        .map(|s| Box::new(s) as Box<dyn Port>)
}

/// A serial device as a bus port, registered with tokio's reactor for readability only.
///
/// tokio-serial registers a port for reading and writing: a tty then reports "writable"
/// again right after every request is written, and that edge woke the bus task once per
/// transaction for nothing (a third sleep and wake-up, on top of the request's and the
/// reply's). A bus writes one frame at a time into an idle line, far below the kernel's
/// transmit buffer (4 KiB), so a write that cannot go at once is retried after
/// [`WRITE_RETRY`] instead of waiting for a readiness event.
///
/// A read that returns fewer bytes than asked emptied the kernel's buffer: readiness is
/// cleared then (as tokio does for TCP), so the next read waits for the reactor instead
/// of first making a `read()` that fails with `EAGAIN`. Clearing is race-free: bytes that
/// arrived after that read raised a new readiness event, which a clear does not undo.
struct Tty {
    fd: tokio::io::unix::AsyncFd<mio_serial::SerialStream>,
    /// Set while a write waits for room in the transmit buffer.
    retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

/// How long a write that found the transmit buffer full waits before trying again.
const WRITE_RETRY: Duration = Duration::from_millis(1);

impl Tty {
    fn new(port: mio_serial::SerialStream) -> std::io::Result<Self> {
        #[expect(
            deprecated,
            reason = "the safe constructor is deprecated because an arbitrary AsRawFd may swap or \
                      close its fd; the SerialStream owns its fd for as long as this holds it"
        )]
        let fd = tokio::io::unix::AsyncFd::with_interest(port, tokio::io::Interest::READABLE)?;
        Ok(Tty { fd, retry: None })
    }
}

impl AsyncRead for Tty {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::io::Read;
        loop {
            let mut guard = std::task::ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match guard.try_io(|fd| fd.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return std::task::Poll::Ready(Err(e)),
                // EAGAIN: readiness is cleared; wait for the reactor.
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Tty {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        loop {
            if let Some(retry) = self.retry.as_mut() {
                std::task::ready!(retry.as_mut().poll(cx));
                self.retry = None;
            }
            match self.fd.get_ref().write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.retry = Some(Box::pin(tokio::time::sleep(WRITE_RETRY)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                done => return std::task::Poll::Ready(done),
            }
        }
    }

    /// Written bytes are the kernel's to send; the bus times their wire time itself
    /// (a `tcdrain` here would block the runtime's thread).
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Sleeps until `deadline`, accurate to tens of microseconds. tokio's timer wakes on 1 ms
/// ticks, rounded up, which on a fast line is as long as the silences being timed (t3.5 is
/// 1.75 ms above 19200 baud). A one-shot Linux timerfd, registered with tokio's reactor,
/// fires on the kernel's high-resolution clock instead: no thread and no spinning, so 64
/// busy buses cost no more CPU than one. Never wakes early; cancel-safe (dropping it
/// closes the timer). Falls back to the tokio timer if a timerfd cannot be made.
pub async fn sleep_until_precise(deadline: Instant) {
    PreciseTimer::default().sleep_until(deadline).await;
}

/// A precise timer to sleep on again and again (a bus has one): one Linux timerfd,
/// registered with tokio's reactor once and re-armed for each wait, so a wait costs one
/// `timerfd_settime` where [`sleep_until_precise`] creates, registers and closes a timer
/// (five system calls). Same guarantees: never wakes early; cancel-safe (a wait dropped
/// leaves the timer armed, and the next arming replaces it and resets its count). Falls
/// back to the tokio timer if a timerfd cannot be made.
#[derive(Debug, Default)]
pub struct PreciseTimer {
    fd: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    /// The timerfd has been made (or could not be): made on the first wait, inside the
    /// runtime whose reactor it registers with.
    made: bool,
}

impl PreciseTimer {
    fn make() -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
        use rustix::time::{TimerfdClockId, TimerfdFlags};
        let flags = TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC;
        let fd = rustix::time::timerfd_create(TimerfdClockId::Monotonic, flags)?;
        #[expect(
            deprecated,
            reason = "the safe constructor is deprecated because an arbitrary AsRawFd may swap or \
                      close its fd; an OwnedFd cannot, which is the I/O-safety the unsafe \
                      replacement asks for"
        )]
        tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)
    }

    /// Sleeps until `deadline` (returns at once if it has passed).
    pub async fn sleep_until(&mut self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if !self.made {
            self.made = true;
            self.fd =
                Self::make().inspect_err(|e| debug!(error = %e, "no timerfd; using the 1 ms timer")).ok();
        }
        let Some(fd) = self.fd.as_ref() else {
            return sleep_until(deadline).await;
        };
        if let Err(e) = Self::wait(fd, left).await {
            debug!(error = %e, "timerfd failed; using the 1 ms timer");
            sleep_until(deadline).await;
        }
    }

    async fn wait(
        fd: &tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
        left: Duration,
    ) -> std::io::Result<()> {
        use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec};
        let it_value = Timespec::try_from(left).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let spec = Itimerspec { it_interval: Timespec { tv_sec: 0, tv_nsec: 0 }, it_value };
        // Arming resets the expiry count: an expiry of an earlier arming reads as EAGAIN.
        rustix::time::timerfd_settime(fd.get_ref(), TimerfdTimerFlags::empty(), &spec)?;
        loop {
            let mut guard = fd.readable().await?;
            let mut count = [0u8; 8];
            match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut count).map_err(std::io::Error::from))
            {
                Ok(Ok(_)) => {
                    // The count is read: the timer is not readable until armed again.
                    guard.clear_ready();
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod parity_tests {
    use super::*;
    use crate::point::names;

    #[test]
    fn a_port_is_named_as_what_it_is() {
        let kinds = ["/dev/ttyUSB0", "tcp://10.0.0.9:4001", "modbus-tcp://10.0.0.9:502"].map(PortKind::of);
        assert_eq!(kinds.map(PortKind::noun), ["serial port", "device server connection", "connection"]);
        assert_eq!(kinds.map(PortKind::is_tcp), [false, true, true]);
    }

    #[test]
    fn parity_names_and_letters() {
        let all: Vec<(String, char)> =
            names::all::<Parity>().into_iter().map(|p| (p.to_string(), p.letter())).collect();
        assert_eq!(all, [("none".into(), 'N'), ("even".into(), 'E'), ("odd".into(), 'O')]);
        assert_eq!(names::parse::<Parity>("odd"), Some(Parity::Odd));
    }
}
