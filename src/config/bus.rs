//! The `[[bus]]` sections: serial lines, their framing and transaction settings.
//!
//! ```toml
//! [[bus]]
//! name = "line1"             # required, unique
//! port = "/dev/ttyUSB0"      # required, unique; or "tcp://host:port": RTU frames over
//!                            #   TCP to a serial device server (NPort, ser2net); or
//!                            #   "modbus-tcp://host:port" (port usually 502): Modbus-TCP
//!                            #   devices (meters, drives, PLCs), MBAP frames, one
//!                            #   transaction at a time (see max_in_flight), reconnect
//!                            #   with back-off
//! protocol = "modbus-rtu"    # modbus-rtu|modbus-ascii|raw|modbus-tcp, default modbus-rtu
//!                            #   (modbus-tcp for a modbus-tcp:// port, the only protocol
//!                            #   it speaks); a raw bus carries [[raw_device]]s only (see
//!                            #   config/rawdevice.rs)
//! baud = 19200               # default 19200, 300..=4000000
//! parity = "even"            # none|even|odd, default even (Modbus' 8E1)
//! data_bits = 8              # 7|8, default 8 (modbus-rtu needs 8; ascii and raw may use 7)
//! stop_bits = 1              # 1|2, default 1
//!                            # (baud, parity, data_bits, stop_bits, local_echo and
//!                            #   broadcast have no meaning on a modbus-tcp bus)
//! frame_gap = "1.75ms"       # silence before each request; default t3.5 of the line
//!                            #   (0 on a modbus-tcp bus)
//!                            #   (3.5 characters, 1.75ms above 19200 baud), at most 1s;
//!                            #   "0s" for a virtual link or a device server that times
//!                            #   the line itself
//! local_echo = false         # true: the adapter echoes what we send (2-wire RS-485
//!                            #   without echo suppression); the echo is taken off
//! broadcast = false          # true: this line may carry unit-0 broadcast writes
//!                            #   (FC5/6/15/16, no reply) from masters, through a
//!                            #   [[server.route]] with broadcast = true; every device
//!                            #   on the line then acts on them. Default false
//! rs485 = "off"              # off (default): the adapter switches the RS-485
//!                            #   direction itself; "kernel": the UART driver drives RTS
//!                            #   around each transmission (TIOCSRS485), as mbusd -t
//!                            #   does; "rts": the gateway sets RTS itself around each
//!                            #   request (drivers without RS-485 mode); a port that
//!                            #   refuses it (a pty, most USB adapters) is not opened:
//!                            #   the error names the port
//! rs485_invert_rts = false   # kernel/rts: true = RTS low while sending, high after
//! rs485_delay_before = "0ms" # kernel/rts: RTS this long before the first bit (at most
//!                            #   1s; kernel: whole ms)
//! rs485_delay_after = "0ms"  # kernel/rts: RTS kept this long after the last bit
//! rs485_rx_during_tx = false # kernel mode: receiver on while sending (4-wire); on a
//!                            #   2-wire line set local_echo too
//! timeout = "200ms"          # default response timeout of its devices, at least 1ms
//! retries = 1                # default 1, 0..=10
//! queue_depth = 64           # default 64, 1..=65536
//! reopen_max = "30s"         # default 30s, at least 100ms
//! max_in_flight = 1          # modbus-tcp:// buses only: requests outstanding at once on
//!                            #   the connection, default 1 (one transaction at a time),
//!                            #   1..=16; more only for devices that pipeline
//! ```
//!
//! A bus without devices is allowed (it is opened and idles); devices are attached to
//! their bus by [`super::device::validate`], in file order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Checker, item};
use crate::model::{Bus, Line, Parity, Protocol};
use crate::serial::rs485::{Mode, Rs485};

const BAUD: u32 = 19_200;
const TIMEOUT: Duration = Duration::from_millis(200);
const TIMEOUT_MIN: Duration = Duration::from_millis(1);
const RETRIES: u8 = 1;
const QUEUE_DEPTH: usize = 64;
const REOPEN_MAX: Duration = Duration::from_secs(30);
const REOPEN_MAX_MIN: Duration = Duration::from_millis(100);
const FRAME_GAP_MAX: Duration = Duration::from_secs(1);
/// Most requests a modbus-tcp bus keeps outstanding on its connection (`max_in_flight`).
/// Modbus-TCP devices that pipeline at all queue a handful of requests per connection
/// (gateways and PLCs commonly 4 to 16; many meters 1); beyond 16, a device that falls
/// behind only makes every outstanding request time out together.
pub(crate) const MAX_IN_FLIGHT: i64 = 16;

/// One `[[bus]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBus {
    name: Spanned<String>,
    port: Spanned<String>,
    protocol: Option<Spanned<Protocol>>,
    baud: Option<Spanned<i64>>,
    parity: Option<Parity>,
    data_bits: Option<Spanned<i64>>,
    stop_bits: Option<Spanned<i64>>,
    frame_gap: Option<Spanned<String>>,
    #[serde(default)]
    local_echo: bool,
    #[serde(default)]
    broadcast: bool,
    rs485: Option<Spanned<RawRs485>>,
    rs485_invert_rts: Option<Spanned<bool>>,
    rs485_delay_before: Option<Spanned<String>>,
    rs485_delay_after: Option<Spanned<String>>,
    rs485_rx_during_tx: Option<Spanned<bool>>,
    timeout: Option<Spanned<String>>,
    retries: Option<Spanned<i64>>,
    queue_depth: Option<Spanned<i64>>,
    reopen_max: Option<Spanned<String>>,
    max_in_flight: Option<Spanned<i64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawRs485 {
    Off,
    Kernel,
    Rts,
}

/// Resolves every `[[bus]]`, in file order, with no devices yet.
pub(super) fn validate(raw: &[RawBus], check: &mut Checker) -> Vec<Bus> {
    let mut names: HashSet<&str> = HashSet::new();
    let mut ports: HashMap<&str, &str> = HashMap::new();
    let mut buses = Vec::with_capacity(raw.len());
    for r in raw {
        let path = item("bus", &r.name);
        check.name(&r.name, &path);
        if !names.insert(r.name.get_ref()) {
            check.report(r.name.span(), &path, "name is already used by another bus");
        }
        let port = r.port.get_ref();
        if port.trim().is_empty() {
            check.report(r.port.span(), &path, "port is empty");
        } else if let Some(Err(e)) = port.strip_prefix("tcp://").map(tcp_port) {
            check.report(r.port.span(), &path, e);
        } else if let Some(Err(e)) = port.strip_prefix("modbus-tcp://").map(modbus_tcp_port) {
            check.report(r.port.span(), &path, e);
        } else if let Some(other) = ports.insert(port, r.name.get_ref()) {
            check.report(r.port.span(), &path, format!("port {port:?} is already used by bus {other:?}"));
        }
        buses.push(one(r, &path, check));
    }
    buses
}

/// Checks the `host:port` of a `tcp://` port: a host, and a port 1..=65535.
pub(super) fn tcp_port(addr: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "port \"tcp://{addr}\" is not tcp://host:port (like \"tcp://10.0.0.5:4001\" or \"tcp://nport-1:950\")"
        )
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !host.trim().is_empty() && !host.contains('/') => Ok(()),
        _ => Err(bad()),
    }
}

/// Checks the `host:port` of a `modbus-tcp://` port, as [`tcp_port`].
fn modbus_tcp_port(addr: &str) -> Result<(), String> {
    tcp_port(addr).map_err(|_| {
        format!(
            "port \"modbus-tcp://{addr}\" is not modbus-tcp://host:port (like \"modbus-tcp://10.0.0.9:502\" or \"modbus-tcp://meter-3:502\")"
        )
    })
}

fn one(r: &RawBus, path: &str, check: &mut Checker) -> Bus {
    let tcp_device = r.port.get_ref().starts_with("modbus-tcp://");
    let protocol = match r.protocol.as_ref().map(|p| *p.get_ref()) {
        None if tcp_device => Protocol::ModbusTcp,
        None => Protocol::ModbusRtu,
        Some(p) => p,
    };
    if let Some(p) = &r.protocol {
        if tcp_device && protocol != Protocol::ModbusTcp {
            check.report(
                p.span(),
                path,
                "a modbus-tcp:// port speaks modbus-tcp only (for RTU frames over TCP use tcp://)",
            );
        } else if !tcp_device && protocol == Protocol::ModbusTcp {
            check.report(p.span(), path, "protocol modbus-tcp needs a port \"modbus-tcp://host:port\"");
        }
    }
    if tcp_device {
        let serial_only = [
            ("baud", r.baud.as_ref().map(Spanned::span)),
            ("parity", r.parity.map(|_| r.port.span())),
            ("data_bits", r.data_bits.as_ref().map(Spanned::span)),
            ("stop_bits", r.stop_bits.as_ref().map(Spanned::span)),
            ("local_echo", r.local_echo.then(|| r.port.span())),
            ("broadcast", r.broadcast.then(|| r.port.span())),
        ];
        for (key, span) in serial_only {
            if let Some(span) = span {
                check.report(
                    span,
                    path,
                    format!("{key} has no meaning on a modbus-tcp bus (no serial line)"),
                );
            }
        }
    }
    let default = Line { baud: BAUD, data_bits: 8, parity: Parity::Even, stop_bits: 1 };
    let line =
        line(r.baud.as_ref(), r.parity, r.data_bits.as_ref(), r.stop_bits.as_ref(), default, path, check);
    let max_in_flight = match &r.max_in_flight {
        Some(n) if !tcp_device => {
            check.report(
                n.span(),
                path,
                "max_in_flight applies only to a modbus-tcp:// bus (a serial line, or RTU frames over tcp://, carries one request at a time)",
            );
            1
        }
        n => check.int(n.as_ref(), 1, 1..=MAX_IN_FLIGHT, path, "max_in_flight"),
    };
    if let (Some(bits), 7, Protocol::ModbusRtu) = (&r.data_bits, line.data_bits, protocol) {
        check.report(bits.span(), path, "data_bits 7 cannot carry modbus-rtu frames, which need 8 data bits");
    }
    Bus {
        name: r.name.get_ref().clone(),
        port: r.port.get_ref().clone(),
        line,
        protocol,
        frame_gap: check.duration_within(
            r.frame_gap.as_ref(),
            if protocol == Protocol::ModbusTcp { Duration::ZERO } else { crate::serial::rtu::t35(&line) },
            Duration::ZERO..=FRAME_GAP_MAX,
            path,
            "frame_gap",
        ),
        local_echo: r.local_echo,
        timeout: check.duration(r.timeout.as_ref(), TIMEOUT, TIMEOUT_MIN, path, "timeout"),
        retries: check.int(r.retries.as_ref(), RETRIES, 0..=10, path, "retries"),
        queue_depth: check.int(r.queue_depth.as_ref(), QUEUE_DEPTH, 1..=65_536, path, "queue_depth"),
        reopen_max: check.duration(r.reopen_max.as_ref(), REOPEN_MAX, REOPEN_MAX_MIN, path, "reopen_max"),
        max_in_flight,
        broadcast: r.broadcast,
        rs485: rs485(r, path, check),
        devices: Vec::new(),
        raw_devices: Vec::new(),
    }
}

/// The RS-485 keys: `rs485 = "kernel"` or `"rts"` and its `rs485_*` options (which need
/// one of them; `rs485_rx_during_tx` needs the kernel); only on a serial port.
fn rs485(r: &RawBus, path: &str, check: &mut Checker) -> Option<Rs485> {
    let mode = match r.rs485.as_ref().map(Spanned::get_ref) {
        Some(RawRs485::Kernel) => Some(Mode::Kernel),
        Some(RawRs485::Rts) => Some(Mode::Rts),
        Some(RawRs485::Off) | None => None,
    };
    let options = [
        ("rs485_invert_rts", r.rs485_invert_rts.as_ref().map(Spanned::span)),
        ("rs485_delay_before", r.rs485_delay_before.as_ref().map(Spanned::span)),
        ("rs485_delay_after", r.rs485_delay_after.as_ref().map(Spanned::span)),
        ("rs485_rx_during_tx", r.rs485_rx_during_tx.as_ref().map(Spanned::span)),
    ];
    let Some(mode) = mode else {
        for (key, span) in options {
            if let Some(span) = span {
                check.report(span, path, format!("{key} needs rs485 = \"kernel\" or \"rts\""));
            }
        }
        return None;
    };
    if let (Mode::Rts, Some(rx)) = (mode, r.rs485_rx_during_tx.as_ref()) {
        check.report(
            rx.span(),
            path,
            "rs485_rx_during_tx needs rs485 = \"kernel\" (with \"rts\" the receiver is wired, not switched)"
                .to_string(),
        );
    }
    let port = r.port.get_ref();
    if port.contains("://") {
        let span = r.rs485.as_ref().map_or(r.port.span(), Spanned::span);
        check.report(span, path, format!("rs485 applies to a local serial port, not {port:?}"));
    }
    let mut delay = |value: Option<&Spanned<String>>, key: &str| {
        let d =
            check.duration_within(value, Duration::ZERO, Duration::ZERO..=Duration::from_secs(1), path, key);
        if let Some(v) = value.filter(|_| mode == Mode::Kernel && !d.subsec_nanos().is_multiple_of(1_000_000))
        {
            check.report(v.span(), path, format!("{key} is set in whole milliseconds (the kernel's unit)"));
        }
        d
    };
    Some(Rs485 {
        mode,
        invert_rts: r.rs485_invert_rts.as_ref().is_some_and(|b| *b.get_ref()),
        delay_before: delay(r.rs485_delay_before.as_ref(), "rs485_delay_before"),
        delay_after: delay(r.rs485_delay_after.as_ref(), "rs485_delay_after"),
        rx_during_tx: r.rs485_rx_during_tx.as_ref().is_some_and(|b| *b.get_ref()),
    })
}

/// The serial settings keys (`baud` 300..=4000000, `parity`, `data_bits` 7|8,
/// `stop_bits` 1|2), shared with `[[tunnel]]`; an absent key takes `default`'s value.
pub(super) fn line(
    baud: Option<&Spanned<i64>>,
    parity: Option<Parity>,
    data_bits: Option<&Spanned<i64>>,
    stop_bits: Option<&Spanned<i64>>,
    default: Line,
    path: &str,
    check: &mut Checker,
) -> Line {
    Line {
        baud: check.int(baud, default.baud, 300..=4_000_000, path, "baud"),
        data_bits: check.int(data_bits, default.data_bits, 7..=8, path, "data_bits"),
        parity: parity.unwrap_or(default.parity),
        stop_bits: check.int(stop_bits, default.stop_bits, 1..=2, path, "stop_bits"),
    }
}
