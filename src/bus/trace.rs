//! The bus traffic tap: every frame the engine sends or hears, with a decoded one-line
//! summary and the engine's verdict on it, for a traffic monitor (a Modbus sniffer view).
//!
//! Invariants: events are built only while someone subscribes ([`Tap::on`] checks the
//! receiver count first), so the tap costs one atomic load per frame when nobody watches;
//! the engine never waits on a subscriber: the channel is a bounded broadcast, and a
//! subscriber that falls behind loses the oldest events (it sees `Lagged`), never the bus.

use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_modbus::{ExceptionCode, Request, Response};

/// Events a slow subscriber may fall behind by before it loses the oldest.
pub const TRACE_CAPACITY: usize = 1024;

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceDir {
    /// Sent by the gateway (a request).
    Tx,
    /// Heard on the line (a reply, someone else's frame, noise), or a timeout.
    Rx,
}

/// What the engine made of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A request put on the line.
    Sent,
    /// The reply to the request, taken as its answer.
    Ok,
    /// The reply to the request: a Modbus exception.
    Exception,
    /// A frame with a bad CRC (or LRC / checksum): never data.
    CrcError,
    /// A frame cut short: still short of its length at a long silence (a lost byte).
    FramingError,
    /// No reply by the response timeout (no bytes).
    Timeout,
    /// A reply to an earlier request that came after its timeout: discarded.
    LateReplyDiscarded,
    /// A valid frame from another unit or for another function.
    WrongUnit,
    /// A valid frame from the unit whose length or echo does not fit the request.
    Mismatch,
    /// Our own request echoed by the adapter (`local_echo`), taken off.
    EchoRemoved,
    /// Bytes that start no frame.
    Noise,
    /// A broadcast request (unit 0): sent, never answered.
    Broadcast,
}

/// One frame on the line, as the engine saw it.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEvent {
    /// When it was sent or heard (RFC 3339 with microseconds in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    /// Sent or heard.
    pub dir: TraceDir,
    /// The bytes as on the wire (lowercase hex in JSON; empty for a timeout).
    #[serde(serialize_with = "hex_bytes")]
    pub bytes: Bytes,
    /// The unit the frame is for or from, when known.
    pub unit: Option<u8>,
    /// A decoded one-liner, e.g. "unit 1 read holding 0+10".
    pub summary: String,
    /// What the engine made of it.
    pub verdict: Verdict,
}

fn rfc3339<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_micros(*at))
}

fn hex_bytes<S: serde::Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(b))
}

/// The sending side, owned by the engine (and cloned into the bus handle to subscribe).
#[derive(Debug, Clone)]
pub struct Tap(broadcast::Sender<TraceEvent>);

impl Default for Tap {
    fn default() -> Self {
        Self(broadcast::channel(TRACE_CAPACITY).0)
    }
}

impl Tap {
    /// A new subscription: events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TraceEvent> {
        self.0.subscribe()
    }

    /// True while someone subscribes: only then are events worth building.
    pub fn on(&self) -> bool {
        self.0.receiver_count() > 0
    }

    /// Publishes an event if anyone listens; `summary` is only called then.
    pub fn emit(
        &self,
        dir: TraceDir,
        bytes: &[u8],
        unit: Option<u8>,
        verdict: Verdict,
        summary: impl FnOnce() -> String,
    ) {
        if !self.on() {
            return;
        }
        let event = TraceEvent {
            at: SystemTime::now(),
            dir,
            bytes: Bytes::copy_from_slice(bytes),
            unit,
            summary: summary(),
            verdict,
        };
        // An error only means the last subscriber left meanwhile.
        let _ = self.0.send(event);
    }
}

fn table(req: &Request<'_>) -> &'static str {
    use crate::point::names::Named;
    use crate::point::value::Table;
    match req {
        Request::ReadCoils(..) => Table::Coils,
        Request::ReadDiscreteInputs(..) => Table::Discrete,
        Request::ReadInputRegisters(..) => Table::Input,
        _ => Table::Holding,
    }
    .name()
}

/// "unit 1 read holding 0+10", "unit 3 write register 7 = 55", ...
pub fn describe_request(unit: u8, req: &Request<'_>) -> String {
    let what = match req {
        Request::ReadCoils(a, q)
        | Request::ReadDiscreteInputs(a, q)
        | Request::ReadHoldingRegisters(a, q)
        | Request::ReadInputRegisters(a, q) => format!("read {} {a}+{q}", table(req)),
        Request::WriteSingleCoil(a, on) => format!("write coil {a} = {}", if *on { "on" } else { "off" }),
        Request::WriteSingleRegister(a, v) => format!("write register {a} = {v}"),
        Request::WriteMultipleCoils(a, bits) => format!("write coils {a}+{}", bits.len()),
        Request::WriteMultipleRegisters(a, words) => format!("write registers {a}+{}", words.len()),
        Request::MaskWriteRegister(a, and, or) => {
            format!("mask write register {a} and 0x{and:04X} or 0x{or:04X}")
        }
        Request::ReadWriteMultipleRegisters(ra, rq, wa, words) => {
            format!("read holding {ra}+{rq}, write registers {wa}+{}", words.len())
        }
        Request::ReportServerId => "report server id".to_string(),
        Request::ReadDeviceIdentification(..) => "read device identification".to_string(),
        Request::Custom(f, data) => format!("function 0x{f:02X}, {} data bytes", data.len()),
    };
    if unit == 0 { format!("broadcast {what}") } else { format!("unit {unit} {what}") }
}

/// The operator's name of an exception code.
pub fn exception_name(code: ExceptionCode) -> &'static str {
    match u8::from(code) {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown exception",
    }
}

/// "unit 1 exception 0x02 illegal data address", "unit 1 reply 10 registers", ...
pub fn describe_reply(unit: u8, reply: &Result<Response, ExceptionCode>) -> String {
    let what = match reply {
        Err(code) => format!("exception 0x{:02X} {}", u8::from(*code), exception_name(*code)),
        Ok(Response::ReadCoils(b) | Response::ReadDiscreteInputs(b)) => format!("reply {} bits", b.len()),
        Ok(
            Response::ReadHoldingRegisters(w)
            | Response::ReadInputRegisters(w)
            | Response::ReadWriteMultipleRegisters(w),
        ) => match w.len() {
            0..=8 => format!("reply {w:?}"),
            n => format!("reply {n} registers"),
        },
        Ok(Response::WriteSingleCoil(a, on)) => {
            format!("wrote coil {a} = {}", if *on { "on" } else { "off" })
        }
        Ok(Response::WriteSingleRegister(a, v)) => format!("wrote register {a} = {v}"),
        Ok(Response::WriteMultipleCoils(a, n)) => format!("wrote coils {a}+{n}"),
        Ok(Response::WriteMultipleRegisters(a, n)) => format!("wrote registers {a}+{n}"),
        Ok(Response::MaskWriteRegister(a, ..)) => format!("mask wrote register {a}"),
        Ok(Response::Custom(f, data)) => format!("function 0x{f:02X}, {} data bytes", data.len()),
        Ok(other) => format!("function 0x{:02X}", other.function_code().value()),
    };
    format!("unit {unit} {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_read_like_a_sniffer() {
        assert_eq!(describe_request(1, &Request::ReadHoldingRegisters(0, 10)), "unit 1 read holding 0+10");
        assert_eq!(describe_request(3, &Request::WriteSingleRegister(7, 55)), "unit 3 write register 7 = 55");
        assert_eq!(
            describe_reply(1, &Err(ExceptionCode::IllegalDataAddress)),
            "unit 1 exception 0x02 illegal data address"
        );
        assert_eq!(describe_reply(1, &Ok(Response::ReadHoldingRegisters(vec![1, 2]))), "unit 1 reply [1, 2]");
    }

    #[test]
    fn nothing_is_built_while_nobody_listens_and_json_is_plain() {
        let tap = Tap::default();
        let mut built = false;
        tap.emit(TraceDir::Tx, &[1], Some(1), Verdict::Sent, || {
            built = true;
            String::new()
        });
        assert!(!built);
        let mut rx = tap.subscribe();
        tap.emit(TraceDir::Rx, &[1, 0x83, 2], Some(1), Verdict::CrcError, || "x".into());
        let ev = rx.try_recv().expect("event");
        let json = serde_json::to_value(&ev).expect("serialises");
        assert_eq!(json["dir"], "rx");
        assert_eq!(json["verdict"], "crc_error");
        assert_eq!(json["bytes"], "018302");
        assert!(json["at"].as_str().is_some_and(|s| s.ends_with('Z')), "{json}");
    }
}
