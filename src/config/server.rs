//! The `[server]` section: the local Modbus-TCP server masters (SCADA, HMI, PLCs) talk to.
//!
//! ```toml
//! [server]                   # optional; without it nothing listens for Modbus-TCP
//! listen = "127.0.0.1:5020"  # default 127.0.0.1:5020: loopback only, and a port above
//!                            #   1024 so no root is needed (502 is the registered port;
//!                            #   say "0.0.0.0:502" to serve the plant network); a
//!                            #   host:port (localhost:5020) takes the name's first IPv4
//!                            #   address
//! max_connections = 16       # masters connected at once, 1..=1024, default 16; when
//!                            #   full, the longest-idle master makes room for a new one
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
//! [[server.unit]]            # a virtual unit: answered from a register map over
//! unit = 10                  #   the image (local and received points), no device
//! on_bad = "exception"       # a read covering a point that is not good: "exception"
//!                            #   (default) answers 0x0B; "last" serves the last value
//!                            #   (a point never received still answers 0x0B)
//! status = 1000              # optional: first input register of the status block:
//!                            #   +0 heartbeat (counts seconds, wraps), +1 link bits
//!                            #   (bit i: the link to the i-th peer the map names is
//!                            #   up), +2.. one bit per mapped point (1 = good), 16 a
//!                            #   register, in map order
//! [[server.unit.map]]        # one or more; matched points take consecutive addresses
//! points = "boiler.*"        # required: local point globs, and/or received points
//!                            #   named one by one: ["site-a/boiler.flow_temp"]
//! table = "holding"          # required: holding | input | coils | discrete
//! address = 0                # required: first wire (zero-based) address
//! type = "f32"               # u16|i16|u32|i32|u64|i64|f32|f64|bool|string; default
//!                            #   the local point's own (f32 when scaled); required
//!                            #   when received points are named
//! length = 16                # bytes, with type = "string" only
//! order = "abcd"             # abcd|dcba|badc|cdab, default abcd
//! scale = 1.0                # raw = (value - offset) / scale; default 1
//! offset = 0.0               # default 0
//! eng_unit = "degC"          # engineering unit for `check`'s tag list; default the
//!                            #   local point's unit
//! [[server.route]]           # transparent routing, no device declared (mbusd, MGate)
//! units = "1-247"            # required: the unit ids masters use, 1..=255, as a list
//!                            #   of ids and ranges ("1,3,10-20"); no id in two routes
//!                            #   or in a route and a [[server.unit]]
//! bus = "line1"              # required: a modbus-rtu, modbus-ascii or modbus-tcp bus
//! unit_offset = 100          # default 0: bus unit = master's unit - unit_offset (so
//!                            #   units "101-110" reach bus units 1-10); every bus unit
//!                            #   must be 1..=247
//! writable = false           # default false: writes only where a [[server.grant]]
//!                            #   covers them (none: read-only); true: every write
//!                            #   goes through
//! broadcast = false          # true: a master's unit-0 write (FC5/6/15/16) goes on this
//!                            #   bus as a broadcast; needs writable = true and
//!                            #   broadcast = true on the [[bus]]; one route at most
//! timeout = "200ms"          # default the bus's timeout
//! turnaround = "0ms"         # default 0: extra silence before each request to these
//!                            #   units; after a broadcast the bus waits this long, at
//!                            #   least 100ms (the serial line spec's turnaround delay),
//!                            #   before the next request, so the devices can act on it
//!
//! [[server.grant]]           # what masters may write; nothing else is writable
//! unit = 1                   # required: a served unit id (a [[server.unit]] or in a
//!                            #   route)
//! table = "holding"          # required: coils | holding
//! address = 100              # required: first wire (zero-based) address, 0..=65535
//! count = 10                 # default 1; address + count <= 65536
//! ```
//!
//! Server addresses are always wire addresses: Modbus-TCP has no address base.
//!
//! A `[[server.grant]]` on a virtual unit makes the registers of *local* points
//! writable (the write goes to the device through the point). Registers of received
//! points need no local grant: a write goes over the link to the owning gateway, whose
//! `[[peer.grant]]` decides.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Checker;
use super::globs::Globs;
use super::regmap::{Entry, Kind, Layout, RawType};
use crate::model::{
    Bus, OnBad, Point, Protocol, Route, ServeMode, ServedUnit, Server, VirtualUnit, WriteGrant,
};
use crate::point::value::{Table, WordOrder};

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
    #[serde(default)]
    route: Vec<RawRoute>,
}

/// `[[server.route]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    units: Spanned<String>,
    bus: Spanned<String>,
    unit_offset: Option<Spanned<i64>>,
    #[serde(default)]
    writable: bool,
    broadcast: Option<Spanned<bool>>,
    timeout: Option<Spanned<String>>,
    turnaround: Option<Spanned<String>>,
}

/// `[[server.unit]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnit {
    unit: Spanned<i64>,
    agent: Option<Spanned<String>>,
    pass: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
    on_bad: Option<Spanned<RawOnBad>>,
    status: Option<Spanned<i64>>,
    #[serde(default)]
    map: Vec<RawUnitMap>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnBad {
    Exception,
    Last,
}

/// `[[server.unit.map]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnitMap {
    points: Spanned<Globs>,
    table: Spanned<Table>,
    address: Spanned<i64>,
    #[serde(rename = "type")]
    data_type: Option<Spanned<RawType>>,
    length: Option<Spanned<i64>>,
    order: Option<WordOrder>,
    scale: Option<Spanned<f64>>,
    offset: Option<Spanned<f64>>,
    eng_unit: Option<Spanned<String>>,
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

    let points: Vec<&Point> = buses.iter().flat_map(|b| &b.devices).flat_map(|d| &d.points).collect();
    let mut units = Vec::with_capacity(raw.unit.len());
    let mut virtual_units = Vec::new();
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
        if !r.map.is_empty() || r.on_bad.is_some() || r.status.is_some() {
            if let Some(v) = virtual_unit(r, unit, &points, &path, check) {
                virtual_units.push(v);
            }
            continue;
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
                check.report(
                    r.unit.span(),
                    &path,
                    "give agent = \"<device>\", pass = \"<device>\" or a register map ([[server.unit.map]])",
                );
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

    let routes = routes(&raw.route, &seen, buses, check);

    let mut grants = Vec::with_capacity(raw.grant.len());
    for (i, r) in raw.grant.iter().enumerate() {
        let path = format!("server grant[{i}]");
        let unit = check.int(Some(&r.unit), 1, 1..=255, &path, "unit");
        if (1..=255).contains(r.unit.get_ref())
            && !raw.unit.iter().any(|u| u.unit.get_ref() == r.unit.get_ref())
            && !routes.iter().any(|route| route.units.contains(&unit))
        {
            check.report(
                r.unit.span(),
                &path,
                format!("unit {unit} is not served by any [[server.unit]] or [[server.route]]"),
            );
        }
        let table = *r.table.get_ref();
        if !matches!(table, Table::Coils | Table::Holding) {
            check.report(
                r.table.span(),
                &path,
                format!("table {table} is read-only: grant coils or holding"),
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

    Server { listen, max_connections, idle_timeout, max_in_flight, units, routes, grants, virtual_units }
}

/// Resolves a virtual unit (one with `[[server.unit.map]]`): `None` when reported.
fn virtual_unit(
    r: &RawUnit,
    unit: u8,
    points: &[&Point],
    path: &str,
    check: &mut Checker,
) -> Option<VirtualUnit> {
    for (key, v) in [("agent", &r.agent), ("pass", &r.pass), ("max_age", &r.max_age)] {
        if let Some(v) = v {
            check.report(
                v.span(),
                path,
                format!("{key} does not go with a register map ([[server.unit.map]]): a unit serves a device or a map"),
            );
        }
    }
    if r.map.is_empty() {
        let span = r.on_bad.as_ref().map(|o| o.span()).or(r.status.as_ref().map(|s| s.span()));
        check.report(
            span.unwrap_or(r.unit.span()),
            path,
            "on_bad and status are for virtual units: add at least one [[server.unit.map]]",
        );
        return None;
    }
    let mut layout = Layout::new(Kind::Unit);
    let mut targets = Vec::new();
    for (i, m) in r.map.iter().enumerate() {
        let entry = Entry {
            points: &m.points,
            table: &m.table,
            address: &m.address,
            data_type: m.data_type.as_ref(),
            length: m.length.as_ref(),
            order: m.order,
            scale: m.scale.as_ref(),
            offset: m.offset.as_ref(),
            eng_unit: m.eng_unit.as_ref(),
        };
        targets.extend(layout.place(i, &entry, points, &format!("{path} map[{i}]"), check));
    }
    let mut v = VirtualUnit {
        unit,
        targets,
        on_bad: match r.on_bad.as_ref().map(|o| *o.get_ref()) {
            None | Some(RawOnBad::Exception) => OnBad::Exception,
            Some(RawOnBad::Last) => OnBad::Last,
        },
        status: None,
    };
    if let Some(s) = &r.status {
        let start: u16 = check.int(Some(s), 0, 0..=65_535, path, "status");
        let len = v.status_len();
        if u32::from(start) + u32::from(len) > 65_536 {
            check.report(
                s.span(),
                path,
                format!("status block of {len} registers from {start} passes the last address 65535"),
            );
        } else if let Some((i, p)) = layout.covering(Table::Input, start, len) {
            check.report(
                s.span(),
                path,
                format!(
                    "status block of {len} input registers from {start} overlaps point {p:?} of map[{i}]"
                ),
            );
        }
        v.status = Some(start);
    }
    Some(v)
}

/// Parses a unit list: ids and ranges separated by commas (`"1,3,10-20"`), each id in
/// `1..=255`. Returns the ids ascending; an id given twice is an error.
pub(super) fn unit_list(text: &str) -> Result<Vec<u8>, String> {
    let bad =
        |part: &str| format!("units {text:?}: {part:?} is not a unit id 1..=255 or a range like \"10-20\"");
    let id = |s: &str| s.trim().parse::<u8>().ok().filter(|u| *u >= 1);
    let mut units = Vec::new();
    for part in text.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (id(a).ok_or_else(|| bad(part))?, id(b).ok_or_else(|| bad(part))?),
            None => {
                let u = id(part).ok_or_else(|| bad(part))?;
                (u, u)
            }
        };
        if first > last {
            return Err(format!("units {text:?}: range {:?} runs backwards", part.trim()));
        }
        units.extend(first..=last);
    }
    units.sort_unstable();
    if let Some(w) = units.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("units {text:?}: unit {} is listed twice", w[0]));
    }
    Ok(units)
}

/// Resolves the `[[server.route]]`s; `declared` maps the ids of `[[server.unit]]`s to
/// their index.
fn routes(
    raw: &[RawRoute],
    declared: &HashMap<i64, usize>,
    buses: &[Bus],
    check: &mut Checker,
) -> Vec<Route> {
    let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
    let mut broadcaster: Option<usize> = None;
    for (i, r) in raw.iter().enumerate() {
        let path = format!("server route[{i}]");
        let units = unit_list(r.units.get_ref()).unwrap_or_else(|e| {
            check.report(r.units.span(), &path, e);
            Vec::new()
        });
        let unit_offset: i16 = check.int(r.unit_offset.as_ref(), 0, -246..=254, &path, "unit_offset");
        for &u in &units {
            if let Some(first) = declared.get(&i64::from(u)) {
                check.report(
                    r.units.span(),
                    &path,
                    format!("unit {u} is already served by server unit[{first}]"),
                );
                break;
            }
            if let Some(other) = routes.iter().position(|o| o.units.contains(&u)) {
                check.report(
                    r.units.span(),
                    &path,
                    format!("unit {u} is already routed by server route[{other}]"),
                );
                break;
            }
            let on_bus = i16::from(u) - unit_offset;
            if !(1..=247).contains(&on_bus) {
                let span = r.unit_offset.as_ref().map_or(r.units.span(), |o| o.span());
                check.report(
                    span,
                    &path,
                    if unit_offset == 0 {
                        format!("unit {u} cannot be on a bus: bus unit ids are 1..=247 (see unit_offset)")
                    } else {
                        format!(
                            "unit {u} - unit_offset {unit_offset} = {on_bus} is not a bus unit id 1..=247"
                        )
                    },
                );
                break;
            }
        }
        let bus = buses.iter().find(|b| b.name == *r.bus.get_ref());
        match bus {
            None => check.report(
                r.bus.span(),
                &path,
                format!("bus {:?} is not defined by any [[bus]]", r.bus.get_ref()),
            ),
            Some(b) if b.protocol == Protocol::Raw => check.report(
                r.bus.span(),
                &path,
                format!("bus {:?} is a raw bus: only modbus buses can be routed to", b.name),
            ),
            Some(_) => {}
        }
        let broadcast = r.broadcast.as_ref().is_some_and(|b| *b.get_ref());
        if let (Some(b), true) = (&r.broadcast, broadcast) {
            if let Some(first) = broadcaster {
                check.report(b.span(), &path, format!("server route[{first}] already takes the broadcasts"));
            }
            if !r.writable {
                check.report(
                    b.span(),
                    &path,
                    "broadcast = true needs writable = true (a broadcast is a write)",
                );
            }
            if bus.is_some_and(|b| !b.broadcast) {
                check.report(
                    b.span(),
                    &path,
                    format!(
                        "bus {:?} does not allow broadcasts: set broadcast = true on its [[bus]] too",
                        r.bus.get_ref()
                    ),
                );
            }
            broadcaster.get_or_insert(i);
        }
        let default = bus.map_or(Duration::from_millis(200), |b| b.timeout);
        let timeout = check.duration(r.timeout.as_ref(), default, Duration::from_millis(1), &path, "timeout");
        let turnaround = check.duration_within(
            r.turnaround.as_ref(),
            Duration::ZERO,
            Duration::ZERO..=Duration::from_secs(10),
            &path,
            "turnaround",
        );
        routes.push(Route {
            units,
            bus: r.bus.get_ref().clone(),
            unit_offset,
            writable: r.writable,
            broadcast,
            timeout,
            turnaround,
        });
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::unit_list;

    #[test]
    fn unit_lists() {
        assert_eq!(unit_list("1,3,10-12").expect("valid"), [1, 3, 10, 11, 12]);
        assert_eq!(unit_list(" 7 ").expect("valid"), [7]);
        assert_eq!(unit_list("1-255").expect("valid").len(), 255);
        for bad in ["", "0", "256", "1-", "5-3", "a", "1,,2", "1-3,2"] {
            assert!(unit_list(bad).is_err(), "{bad:?} accepted");
        }
    }
}
