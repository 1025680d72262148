//! Blocking clients for tests that drive child processes from a plain thread: a wait with
//! a deadline, one Modbus-TCP exchange (a hand-written MBAP client, so nothing of the
//! gateway's own code is on the master's side), and an HTTP/1.0 GET.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::procs::DEADLINE;

/// Polls `f` until it returns `Some`, at most [`DEADLINE`] x 2.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE * 2;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < end, "no {what} within {:?}", DEADLINE * 2);
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One Modbus-TCP request on an open connection: the answer's PDU (`Err(code)` for an
/// exception), or the connection's error.
pub fn modbus_on(s: &mut TcpStream, unit: u8, pdu: &[u8]) -> std::io::Result<Result<Vec<u8>, u8>> {
    let mut frame = vec![0x12, 0x34, 0, 0];
    frame.extend_from_slice(&(pdu.len() as u16 + 1).to_be_bytes());
    frame.push(unit);
    frame.extend_from_slice(pdu);
    s.write_all(&frame)?;
    let mut head = [0u8; 7];
    s.read_exact(&mut head)?;
    assert_eq!(&head[..2], &[0x12, 0x34], "transaction id echoed");
    let len = usize::from(u16::from_be_bytes([head[4], head[5]])).saturating_sub(1);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(match body.first() {
        Some(f) if f & 0x80 != 0 => Err(body.get(1).copied().unwrap_or(0)),
        _ => Ok(body),
    })
}

/// One Modbus-TCP request on a new connection to `addr`.
pub fn modbus(addr: SocketAddr, unit: u8, pdu: &[u8]) -> Result<Vec<u8>, u8> {
    let mut s =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to the modbus-tcp server {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    modbus_on(&mut s, unit, pdu).unwrap_or_else(|e| panic!("modbus-tcp exchange with {addr}: {e}"))
}

/// FC3/FC4: `count` registers from `start`.
pub fn read_words(addr: SocketAddr, unit: u8, fc: u8, start: u16, count: u16) -> Result<Vec<u16>, u8> {
    let mut pdu = vec![fc];
    pdu.extend_from_slice(&start.to_be_bytes());
    pdu.extend_from_slice(&count.to_be_bytes());
    let body = modbus(addr, unit, &pdu)?;
    assert_eq!(usize::from(body[1]), usize::from(count) * 2, "byte count");
    Ok(body[2..].chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect())
}

/// `GET path` on `addr`; the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}
