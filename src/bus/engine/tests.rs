//! The bus engine's loop end to end over fake ports: reopen back-off for a port that
//! fails at once, userspace RS-485 direction control around each request, and a master's
//! slot freed before its answer when the port is down.

use super::*;
use crate::bus::pass::MasterId;
use crate::bus::{Port, Priority};
use crate::model::Parity;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Wake, Waker};
use tokio::sync::oneshot;
use tokio_modbus::{Request, Response};

fn line() -> Line {
    Line { baud: 115_200, data_bits: 8, parity: Parity::None, stop_bits: 1 }
}

fn job() -> (Job, oneshot::Receiver<Result<Response, BusError>>) {
    let (reply, rx) = oneshot::channel();
    let job = Job {
        unit: 1,
        request: Request::ReadHoldingRegisters(0, 1),
        priority: Priority::PassThrough,
        timeout: Duration::from_millis(50),
        turnaround: Duration::ZERO,
        retries: 0,
        reply,
    };
    (job, rx)
}

/// A port that opens fine and fails its first I/O (a device server that accepts the
/// connection and closes it) was reopened at once for every queued job: one open and
/// one WARN per poll, for ever.
#[tokio::test]
async fn a_port_that_fails_right_after_opening_is_reopened_with_back_off() {
    let opens = Arc::new(AtomicUsize::new(0));
    let counted = opens.clone();
    let open = move || {
        counted.fetch_add(1, Relaxed);
        async {
            // The far end is gone: reads see EOF, writes fail.
            let (near, far) = tokio::io::duplex(64);
            drop(far);
            Ok(Opened::from(Box::new(near) as Box<dyn Port>))
        }
    };
    let engine = Engine::new(
        "b".into(),
        line(),
        Box::new(rtu::Rtu),
        8,
        Duration::from_secs(30),
        Arc::new(BusStats::default()),
    );
    let (tx, rx) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(engine.run(rx, open, shutdown.clone()));
    for _ in 0..20 {
        let (job, reply) = job();
        tx.send(job).await.expect("bus runs");
        let got = reply.await.expect("answered");
        assert!(matches!(got, Err(BusError::PortDown(_))), "{got:?}");
    }
    assert!(opens.load(Relaxed) <= 2, "{} opens for 20 jobs", opens.load(Relaxed));
    shutdown.cancel();
    task.await.expect("bus stops");
}

/// One thing the userspace RS-485 fakes saw, and when.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    Rts(bool),
    Bytes,
}

type Log = Arc<std::sync::Mutex<Vec<(Seen, Instant)>>>;

/// An RTS line that records each level it is set to.
struct FakeRts(Log);

impl crate::serial::rs485::RtsLine for FakeRts {
    fn set_rts(&mut self, asserted: bool) -> std::io::Result<()> {
        self.0.lock().expect("log").push((Seen::Rts(asserted), Instant::now()));
        Ok(())
    }
}

/// A port that records when bytes are written to it (or refuses them, when `.2`).
struct FakePort(tokio::io::DuplexStream, Log, bool);

impl tokio::io::AsyncRead for FakePort {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for FakePort {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.1.lock().expect("log").push((Seen::Bytes, Instant::now()));
        if self.2 {
            return std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A write that fails (the adapter is gone) still sets RTS back to idle: the
/// transmitter does not stay on, jamming a line other masters may share.
#[tokio::test]
async fn userspace_rts_is_released_when_the_write_fails() {
    let log: Log = Arc::default();
    let mode = crate::serial::rs485::Rs485 { mode: crate::serial::rs485::Mode::Rts, ..Default::default() };
    let (near, far) = tokio::io::duplex(512);
    let opened = std::sync::Mutex::new(Some(Opened {
        port: Box::new(FakePort(near, log.clone(), true)),
        rts: Some(Rts {
            line: Box::new(FakeRts(log.clone())),
            levels: mode.rts_levels(),
            delay_before: Duration::ZERO,
            delay_after: Duration::ZERO,
        }),
    }));
    let open = move || {
        let next = opened.lock().expect("once").take();
        async move { next.ok_or_else(|| "opened once".to_string()) }
    };
    let engine =
        Engine::new("b".into(), line(), Box::new(rtu::Rtu), 8, Duration::from_secs(30), Arc::default());
    let (tx, rx) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(engine.run(rx, open, shutdown.clone()));
    let (job, reply) = job();
    tx.send(job).await.expect("bus runs");
    let got = reply.await.expect("answered");
    assert!(got.is_err(), "the port is gone: {got:?}");
    shutdown.cancel();
    task.await.expect("bus stops");
    drop(far);
    let seen: Vec<Seen> = log.lock().expect("log").iter().map(|(s, _)| *s).collect();
    assert_eq!(seen.first(), Some(&Seen::Rts(true)), "{seen:?}");
    assert_eq!(seen.last(), Some(&Seen::Rts(false)), "released after the failed write: {seen:?}");
}

/// Userspace RS-485 (`rs485 = "rts"`, inverted here): RTS goes to its transmit level
/// `delay_before` ahead of the first byte, and back to idle no earlier than the
/// request's last bit on the wire plus `delay_after`, before the reply is listened for.
#[tokio::test]
async fn userspace_rts_brackets_each_request_with_its_delays() {
    let log: Log = Arc::default();
    let mode = crate::serial::rs485::Rs485 {
        mode: crate::serial::rs485::Mode::Rts,
        invert_rts: true,
        delay_before: Duration::from_micros(1500),
        delay_after: Duration::from_millis(3),
        rx_during_tx: false,
    };
    let (near, far) = tokio::io::duplex(512);
    let opened = std::sync::Mutex::new(Some(Opened {
        port: Box::new(FakePort(near, log.clone(), false)),
        rts: Some(Rts {
            line: Box::new(FakeRts(log.clone())),
            levels: mode.rts_levels(),
            delay_before: mode.delay_before,
            delay_after: mode.delay_after,
        }),
    }));
    let open = move || {
        let next = opened.lock().expect("once").take();
        async move { next.ok_or_else(|| "opened once".to_string()) }
    };
    // 1200 baud: the 8-byte request is 73 ms on the wire, far longer than the write.
    let slow = Line { baud: 1200, ..line() };
    let engine =
        Engine::new("b".into(), slow, Box::new(rtu::Rtu), 8, Duration::from_secs(30), Arc::default());
    let (tx, rx) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(engine.run(rx, open, shutdown.clone()));
    for _ in 0..2 {
        let (job, reply) = job();
        tx.send(job).await.expect("bus runs");
        let got = reply.await.expect("answered");
        assert!(matches!(got, Err(BusError::Timeout { .. })), "nobody answers: {got:?}");
    }
    shutdown.cancel();
    task.await.expect("bus stops");
    drop(far);
    let log = log.lock().expect("log").clone();
    // Per request: transmit level (low, inverted), the bytes, idle (high).
    let wire = rtu::wire_time(&slow, 8);
    let mut rest = &log[..];
    for _ in 0..2 {
        assert_eq!(rest[0].0, Seen::Rts(false), "transmit level first: {log:?}");
        let on = rest[0].1;
        let bytes: Vec<_> = rest[1..].iter().take_while(|(s, _)| *s == Seen::Bytes).collect();
        assert!(!bytes.is_empty(), "the request follows: {log:?}");
        let (off, off_at) = rest[1 + bytes.len()];
        assert_eq!(off, Seen::Rts(true), "back to idle after the request: {log:?}");
        assert!(bytes[0].1 >= on + mode.delay_before, "first byte {:?} after RTS", bytes[0].1 - on);
        assert!(
            off_at >= on + mode.delay_before + wire + mode.delay_after,
            "RTS released {:?} after it was raised; the request needs {:?} on the wire",
            off_at - on,
            wire
        );
        assert!(off_at >= bytes[bytes.len() - 1].1 + mode.delay_after);
        rest = &rest[2 + bytes.len()..];
    }
    assert!(rest.is_empty(), "nothing else: {log:?}");
}

const MASTER: MasterId = 7;

/// A master that sends its next request the instant it has an answer: woken by the
/// answer (inside the bus task's send, before the bus task does anything else), it
/// queues `next` and keeps what the queue said.
struct EagerMaster {
    pass: Arc<PassQueue>,
    next: Mutex<Option<Job>>,
    resent: Mutex<Option<Result<(), BusError>>>,
}

impl Wake for EagerMaster {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let next = self.next.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(job) = next {
            let got = self.pass.submit(MASTER, job, 1);
            *self.resent.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
        }
    }
}

/// A port that is gone answers a master's request with "port down" (0x0B at the
/// server); the master's one in-flight slot is free by the time that answer reaches
/// it, so a request it sends again at once is queued (and answered), never refused
/// as "server busy" (0x06). Both engines: one transaction at a time (serial,
/// `tcp://`, `modbus-tcp://` by default) and pipelined (`max_in_flight` > 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_resending_at_once_after_port_down_is_queued_not_refused_busy() {
    for pipelined in [false, true] {
        let framing: Box<dyn Framing> =
            if pipelined { Box::new(crate::serial::mbap::Mbap::default()) } else { Box::new(rtu::Rtu) };
        let engine = Engine::new(
            "b".into(),
            line(),
            framing,
            8,
            Duration::from_secs(30),
            Arc::new(BusStats::default()),
        )
        .with_tcp_device(pipelined)
        .with_max_in_flight(if pipelined { 4 } else { 1 });
        let pass = engine.pass_queue();
        let (_tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        // The port cannot be opened (the adapter was unplugged).
        let open = || std::future::ready(Err(String::from("no such device")));
        let task = tokio::spawn(engine.run(rx, open, shutdown.clone()));

        let (first, mut first_rx) = job();
        let (second, second_rx) = job();
        let master = Arc::new(EagerMaster {
            pass: pass.clone(),
            next: Mutex::new(Some(second)),
            resent: Mutex::new(None),
        });
        let waker = Waker::from(master.clone());
        assert!(std::pin::Pin::new(&mut first_rx).poll(&mut Context::from_waker(&waker)).is_pending());
        pass.submit(MASTER, first, 1).expect("queued");
        // (Not awaiting `first_rx`: that would put this task's waker in the master's place.)
        let resent = || master.resent.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while resent().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "pipelined {pipelined}: never answered");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let got = first_rx.try_recv();
        assert!(matches!(got, Ok(Err(BusError::PortDown(_)))), "pipelined {pipelined}: {got:?}");
        assert_eq!(resent(), Some(Ok(())), "pipelined {pipelined}: the request sent again at once");
        let got = tokio::time::timeout(Duration::from_secs(5), second_rx).await.expect("answered in time");
        assert!(matches!(got, Ok(Err(BusError::PortDown(_)))), "pipelined {pipelined}: {got:?}");
        shutdown.cancel();
        task.await.expect("bus stops");
    }
}
