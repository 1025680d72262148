//! The `[[tunnel]]` sections: serial tunnels, a local serial port bridged to a serial
//! port on a peer gateway through the link (runtime: link/tunnel.rs).
//!
//! ```toml
//! [[tunnel]]
//! name = "press-1"           # required, unique; the peer configures a tunnel of the
//!                            #   same name toward us
//! peer = "site-b"            # required: a configured [[peer]]
//! port = "/dev/ttyUSB1"      # required: serial device path or "tcp://host:port"; unique,
//!                            #   not the port of a [[bus]] (nor the host:port of a
//!                            #   modbus-tcp:// bus); never "modbus-tcp://" (a tunnel
//!                            #   carries raw serial bytes, not Modbus-TCP)
//! baud = 9600                # default 9600, 300..=4000000
//! parity = "none"            # none|even|odd, default none (8N1)
//! data_bits = 8              # 7|8, default 8
//! stop_bits = 1              # 1|2, default 1
//! silence = "5ms"            # a packet ends after this gap between bytes; default 3.5
//!                            #   character times (1.75ms above 19200 baud), 1ms..=10s
//! max_packet = 256           # a packet ends at this many bytes; default 256, 1..=65536
//! on_link_down = "drop"      # drop|buffer, default drop: what happens to bytes read
//!                            #   while the link is down
//! buffer_max = "64KiB"       # buffer bound (on_link_down = "buffer" only): B, KB, KiB, ...;
//!                            #   default 64KiB, 1KiB..=64MiB; beyond it the oldest bytes
//!                            #   are dropped (counted)
//! reopen_max = "30s"         # default 30s, at least 100ms
//! ```
//!
//! A `[[tunnel]]` needs `[link]` and its `[[peer]]`; the serial settings are this side's
//! (the two ends may differ, e.g. 9600 here and 19200 at the peer).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::bus;
use super::peer::size;
use super::{Checker, item};
use crate::model::{Bus, Line, Links, OnLinkDown, Parity, Tunnel};

const LINE: Line = Line { baud: 9600, data_bits: 8, parity: Parity::None, stop_bits: 1 };
const SILENCE_MIN: Duration = Duration::from_millis(1);
const SILENCE_MAX: Duration = Duration::from_secs(10);
const MAX_PACKET: usize = 256;
const BUFFER_MAX: u64 = 64 * 1024;
const BUFFER_MIN: u64 = 1024;
const BUFFER_LIMIT: u64 = 64 * 1024 * 1024;
const REOPEN_MAX: Duration = Duration::from_secs(30);
const REOPEN_MAX_MIN: Duration = Duration::from_millis(100);

/// One `[[tunnel]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTunnel {
    name: Spanned<String>,
    peer: Spanned<String>,
    port: Spanned<String>,
    baud: Option<Spanned<i64>>,
    parity: Option<crate::model::Parity>,
    data_bits: Option<Spanned<i64>>,
    stop_bits: Option<Spanned<i64>>,
    silence: Option<Spanned<String>>,
    max_packet: Option<Spanned<i64>>,
    on_link_down: Option<RawOnLinkDown>,
    buffer_max: Option<Spanned<String>>,
    reopen_max: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnLinkDown {
    Drop,
    Buffer,
}

/// Resolves every `[[tunnel]]` into `links` (reporting tunnels without a `[link]`).
pub(super) fn validate(raw: &[RawTunnel], links: Option<&mut Links>, buses: &[Bus], check: &mut Checker) {
    let peers: HashSet<String> = links
        .as_ref()
        .map_or_else(HashSet::new, |l| l.peers.iter().map(|p| p.name.clone()).collect::<HashSet<_>>());
    let has_link = links.is_some();
    // A bus reaches its port as a serial path or a TCP endpoint: a modbus-tcp:// bus holds
    // the same host:port a tcp:// tunnel would connect to.
    let bus_ports: HashMap<String, &str> =
        buses.iter().map(|b| (endpoint(&b.port), b.name.as_str())).collect();
    let mut names: HashSet<&str> = HashSet::new();
    let mut ports: HashMap<&str, &str> = HashMap::new();
    let mut tunnels = Vec::with_capacity(raw.len());
    for r in raw {
        let path = item("tunnel", &r.name);
        check.name(&r.name, &path);
        if !names.insert(r.name.get_ref()) {
            check.report(r.name.span(), &path, "name is already used by another tunnel");
        }
        let peer = r.peer.get_ref();
        if !has_link {
            check.report(
                r.peer.span(),
                &path,
                "[[tunnel]] needs a [link] section and a [[peer]] to run over",
            );
        } else if !peers.contains(peer) {
            check.report(r.peer.span(), &path, format!("peer {peer:?} is not a configured [[peer]]"));
        }
        let port = r.port.get_ref();
        if port.trim().is_empty() {
            check.report(r.port.span(), &path, "port is empty");
        } else if let Some(Err(e)) = port.strip_prefix("tcp://").map(bus::tcp_port) {
            check.report(r.port.span(), &path, e);
        } else if port.starts_with("modbus-tcp://") {
            check.report(
                r.port.span(),
                &path,
                format!(
                    "port {port:?} is a Modbus-TCP device: a tunnel carries raw serial bytes, so its port is a serial device path or \"tcp://host:port\" (a serial device server)"
                ),
            );
        } else if let Some(bus) = bus_ports.get(&endpoint(port)) {
            check.report(r.port.span(), &path, format!("port {port:?} is already used by bus {bus:?}"));
        } else if let Some(other) = ports.insert(port, r.name.get_ref()) {
            check.report(r.port.span(), &path, format!("port {port:?} is already used by tunnel {other:?}"));
        }
        tunnels.push(one(r, &path, check));
    }
    if let Some(links) = links {
        links.tunnels = tunnels;
    }
}

/// Where a port leads: its path, or `tcp://host:port` for either TCP scheme.
fn endpoint(port: &str) -> String {
    port.strip_prefix("modbus-tcp://").map_or_else(|| port.to_owned(), |addr| format!("tcp://{addr}"))
}

fn one(r: &RawTunnel, path: &str, check: &mut Checker) -> Tunnel {
    let line =
        bus::line(r.baud.as_ref(), r.parity, r.data_bits.as_ref(), r.stop_bits.as_ref(), LINE, path, check);
    let silence_default = crate::serial::rtu::t35(&line).max(SILENCE_MIN);
    let silence = check.duration_within(
        r.silence.as_ref(),
        silence_default,
        SILENCE_MIN..=SILENCE_MAX,
        path,
        "silence",
    );
    let on_link_down = match r.on_link_down.unwrap_or(RawOnLinkDown::Drop) {
        RawOnLinkDown::Drop => {
            if let Some(b) = &r.buffer_max {
                check.report(
                    b.span(),
                    path,
                    "buffer_max applies only with on_link_down = \"buffer\" (bytes are dropped while the link is down)",
                );
            }
            OnLinkDown::Drop
        }
        RawOnLinkDown::Buffer => OnLinkDown::Buffer { max_bytes: buffer_max(r, path, check) },
    };
    Tunnel {
        name: r.name.get_ref().clone(),
        peer: r.peer.get_ref().clone(),
        port: r.port.get_ref().clone(),
        line,
        silence,
        max_packet: check.int(r.max_packet.as_ref(), MAX_PACKET, 1..=65_536, path, "max_packet"),
        on_link_down,
        reopen_max: check.duration(r.reopen_max.as_ref(), REOPEN_MAX, REOPEN_MAX_MIN, path, "reopen_max"),
    }
}

fn buffer_max(r: &RawTunnel, path: &str, check: &mut Checker) -> usize {
    let Some(b) = &r.buffer_max else {
        return BUFFER_MAX as usize;
    };
    match size(b.get_ref()) {
        Ok(n) if (BUFFER_MIN..=BUFFER_LIMIT).contains(&n) => n as usize,
        Ok(n) => {
            check.report(
                b.span(),
                path,
                format!("buffer_max {:?} ({n} bytes) is outside 1KiB..=64MiB", b.get_ref()),
            );
            BUFFER_MAX as usize
        }
        Err(e) => {
            check.report(b.span(), path, format!("buffer_max {e}"));
            BUFFER_MAX as usize
        }
    }
}
