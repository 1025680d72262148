//! The `[server]` section: the local Modbus-TCP server masters (SCADA, HMI, PLCs) talk to.
//!
//! ```toml
//! [server]                   # optional; without it nothing listens for Modbus-TCP
//! listen = "127.0.0.1:5020"  # default 127.0.0.1:5020: loopback only, and a port above
//!                            #   1024 so no root is needed (502 is the registered port;
//!                            #   say "0.0.0.0:502" to serve the plant network); a
//!                            #   host:port (localhost:5020) takes the name's first IPv4
//!                            #   address
//! max_connections = 16       # masters connected at once, 1..=1024, default 16
//! idle_timeout = "60s"       # close a connection silent this long, default 60s, >= 1s
//! max_in_flight = 2          # pass-through requests one master may have queued per
//!                            #   bus, 1..=16, default 2; more answer exception 0x06
//!
//! [[server.unit]]            # one per unit id served
//! unit = 1                   # required: the unit id masters use, 1..=255, unique
//! agent = "boiler"           # either: answer reads from the polled registers of this
//!                            #   device (its own unit id may differ)
//! max_age = "5s"             #   agent only: oldest value served, >= 1ms; default the
//!                            #   device's longest point stale_after
//! # pass = "meter"           # or: pass every request through to this device
//!
//! [[server.grant]]           # what masters may write; nothing else is writable
//! unit = 1                   # required: a served unit id
//! table = "holding"          # required: coils | holding
//! address = 100              # required: first wire (zero-based) address, 0..=65535
//! count = 10                 # default 1; address + count <= 65536
//! ```
//!
//! Server addresses are always wire addresses: Modbus-TCP has no address base.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Checker;
use crate::model::{Bus, ServeMode, ServedUnit, Server, WriteGrant};
use crate::point::value::Table;

const LISTEN: &str = "127.0.0.1:5020";
const MAX_CONNECTIONS: usize = 16;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const IDLE_TIMEOUT_MIN: Duration = Duration::from_secs(1);
const MAX_IN_FLIGHT: usize = 2;
const MAX_AGE_MIN: Duration = Duration::from_millis(1);

/// `[server]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    idle_timeout: Option<Spanned<String>>,
    max_in_flight: Option<Spanned<i64>>,
    #[serde(default)]
    unit: Vec<RawUnit>,
    #[serde(default)]
    grant: Vec<RawGrant>,
}

/// `[[server.unit]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnit {
    unit: Spanned<i64>,
    agent: Option<Spanned<String>>,
    pass: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
}

/// `[[server.grant]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    unit: Spanned<i64>,
    table: Spanned<Table>,
    address: Spanned<i64>,
    count: Option<Spanned<i64>>,
}

/// Resolves `[server]` against the buses and their devices.
pub(super) fn validate(raw: &RawServer, buses: &[Bus], check: &mut Checker) -> Server {
    const PATH: &str = "server";
    let listen = match &raw.listen {
        None => LISTEN.parse().ok(),
        Some(l) => super::socket_addr(l.get_ref())
            .map_err(|e| {
                let message = e.unwrap_or_else(|| {
                    format!(
                        "listen {:?} is not an ip:port address (like \"127.0.0.1:5020\" or \"0.0.0.0:502\")",
                        l.get_ref()
                    )
                });
                check.report(l.span(), PATH, message)
            })
            .ok(),
    };
    let listen = listen.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 5020)));
    let max_connections =
        check.int(raw.max_connections.as_ref(), MAX_CONNECTIONS, 1..=1024, PATH, "max_connections");
    let idle_timeout =
        check.duration(raw.idle_timeout.as_ref(), IDLE_TIMEOUT, IDLE_TIMEOUT_MIN, PATH, "idle_timeout");
    let max_in_flight = check.int(raw.max_in_flight.as_ref(), MAX_IN_FLIGHT, 1..=16, PATH, "max_in_flight");

    let mut units = Vec::with_capacity(raw.unit.len());
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for (i, r) in raw.unit.iter().enumerate() {
        let path = format!("server unit[{i}]");
        let unit = check.int(Some(&r.unit), 1, 1..=255, &path, "unit");
        if let Some(first) = seen.insert(*r.unit.get_ref(), i) {
            check.report(
                r.unit.span(),
                &path,
                format!("unit {unit} is already served by server unit[{first}]"),
            );
        }
        let (name, mode) = match (&r.agent, &r.pass) {
            (Some(a), None) => (a, Some(r.max_age.as_ref())),
            (None, Some(p)) => {
                if let Some(age) = &r.max_age {
                    check.report(age.span(), &path, "max_age applies to agent units only, not to pass");
                }
                (p, None)
            }
            (Some(_), Some(p)) => {
                check.report(p.span(), &path, "give either agent or pass, not both");
                continue;
            }
            (None, None) => {
                check.report(r.unit.span(), &path, "give agent = \"<device>\" or pass = \"<device>\"");
                continue;
            }
        };
        let found =
            buses.iter().find_map(|b| b.devices.iter().find(|d| d.name == *name.get_ref()).map(|d| (b, d)));
        let Some((bus, device)) = found else {
            check.report(
                name.span(),
                &path,
                format!("device {:?} is not defined by any [[device]]", name.get_ref()),
            );
            continue;
        };
        let mode = match mode {
            None => ServeMode::Pass,
            Some(age) => {
                let default = device
                    .points
                    .iter()
                    .map(|p| p.stale_after)
                    .max()
                    .unwrap_or(IDLE_TIMEOUT)
                    .max(MAX_AGE_MIN);
                ServeMode::Agent { max_age: check.duration(age, default, MAX_AGE_MIN, &path, "max_age") }
            }
        };
        units.push(ServedUnit { unit, device: device.name.clone(), bus: bus.name.clone(), mode });
    }

    let mut grants = Vec::with_capacity(raw.grant.len());
    for (i, r) in raw.grant.iter().enumerate() {
        let path = format!("server grant[{i}]");
        let unit = check.int(Some(&r.unit), 1, 1..=255, &path, "unit");
        if (1..=255).contains(r.unit.get_ref())
            && !raw.unit.iter().any(|u| u.unit.get_ref() == r.unit.get_ref())
        {
            check.report(r.unit.span(), &path, format!("unit {unit} is not served by any [[server.unit]]"));
        }
        let table = *r.table.get_ref();
        if !matches!(table, Table::Coils | Table::Holding) {
            check.report(
                r.table.span(),
                &path,
                format!(
                    "table {} is read-only: grant coils or holding",
                    if table == Table::Input { "input" } else { "discrete" }
                ),
            );
        }
        let start: u16 = check.int(Some(&r.address), 0, 0..=65_535, &path, "address");
        let count: u32 = check.int(r.count.as_ref(), 1, 1..=65_536, &path, "count");
        if u32::from(start) + count > 65_536 {
            let span = r.count.as_ref().map_or(r.address.span(), |c| c.span());
            check.report(
                span,
                &path,
                format!("address {start} + count {count} passes the last address 65535"),
            );
        }
        grants.push(WriteGrant { unit, table, start, count });
    }

    Server { listen, max_connections, idle_timeout, max_in_flight, units, grants }
}
