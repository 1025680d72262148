//! The `[[plc]]` sections: Modbus-TCP devices (PLCs) that receive local points as
//! writes into their holding registers and coils.
//!
//! ```toml
//! [[plc]]
//! name = "line-plc"          # required, unique among [[plc]]; names the spool and logs
//! address = "10.0.0.50:502"  # required: host:port of the PLC's Modbus-TCP server
//! unit = 1                   # unit id in every request, 0..=255, default 1
//! timeout = "1s"             # connect and reply timeout, >= 10ms, default 1s; a timeout
//!                            #   drops the connection (a late reply is never misread)
//! reconnect_max = "5s"       # back-off between reconnects doubles from 100ms up to
//!                            #   this (with jitter), >= 100ms, default 5s
//! deliver = "latest"         # latest | all: after an outage, write only the latest value
//!                            #   of each target (default), or every value in order
//! spool = "plc-line.db"      # default "plc-<name>.db"; relative: under [link] data_dir,
//!                            #   or the configuration file's directory without [link]
//! spool_max = "64MiB"        # like [[peer]]: default 64MiB, at least 1MiB
//! spool_max_age = "7d"       # like [[peer]]: default 7d, at least 1s
//!
//! [plc.watchdog]             # optional heartbeat for the PLC logic
//! address = 900              # required: holding register (wire, zero-based), not a
//!                            #   [[plc.map]] target; while connected it counts 0, 1, ..
//!                            #   65535, 0, .. (FC6), live only: never spooled or replayed
//! interval = "1s"            # one write per interval, 100ms..=1h, default 1s
//!
//! [[plc.map]]                # one or more
//! points = "boiler.*"        # required: point globs (or one); matched points are written
//!                            #   at consecutive addresses in configuration order
//! table = "holding"          # required: holding | coils
//! address = 100              # required: first wire (zero-based) address, 0..=65535
//! type = "f32"               # holding: u16|i16|u32|i32|u64|i64|f32|f64|bool; default the
//!                            #   point's own type (f32 when the point is scaled, bool for
//!                            #   bit points); coils: bool only, and bool points only
//! order = "abcd"             # abcd|dcba|badc|cdab, default abcd
//! scale = 1.0                # written raw = (value - offset) / scale; default 1, not 0
//! offset = 0.0               # default 0
//! mode = "change"            # when, exactly as [[peer.send]]: change (deadband,
//!                            #   deadband_percent, max_silence) | periodic (interval)
//! ```
//!
//! Invariants of a validated PLC: every target lies inside 0..=65535, no two targets of
//! one PLC share a register or coil, no point is mapped twice (a point is written to one
//! place), string points are refused (a PLC register block has no text), and the
//! watchdog register is no map target's.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::globs::{self, Globs};
use super::peer::{self, host_port};
use super::regmap::{Entry, Kind, Layout, RawType};
use super::send::{ModeKeys, RawMode, resolve_mode};
use super::{Checker, item, path_key};
use crate::model::{Deliver, Plc, PlcMap, PlcWatchdog, Point};
use crate::point::value::{Table, WordOrder};

const TIMEOUT: Duration = Duration::from_secs(1);
const TIMEOUT_MIN: Duration = Duration::from_millis(10);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const WATCHDOG_INTERVAL: Duration = Duration::from_secs(1);
const WATCHDOG_MIN: Duration = Duration::from_millis(100);
const WATCHDOG_MAX: Duration = Duration::from_secs(3600);

/// One `[[plc]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlc {
    name: Spanned<String>,
    address: Spanned<String>,
    unit: Option<Spanned<i64>>,
    timeout: Option<Spanned<String>>,
    reconnect_max: Option<Spanned<String>>,
    deliver: Option<Spanned<RawDeliver>>,
    spool: Option<Spanned<String>>,
    spool_max: Option<Spanned<String>>,
    spool_max_age: Option<Spanned<String>>,
    watchdog: Option<RawWatchdog>,
    #[serde(default)]
    map: Vec<RawMap>,
}

impl RawPlc {
    /// The PLC's name as written.
    pub(super) fn name(&self) -> &str {
        self.name.get_ref()
    }

    /// Where a problem with the spool file points: `spool`, else the name.
    pub(super) fn spool_span(&self) -> std::ops::Range<usize> {
        self.spool.as_ref().map_or(self.name.span(), |s| s.span())
    }
}

/// `[plc.watchdog]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatchdog {
    address: Spanned<i64>,
    interval: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawDeliver {
    Latest,
    All,
}

/// One `[[plc.map]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    points: Spanned<Globs>,
    table: Spanned<Table>,
    address: Spanned<i64>,
    #[serde(rename = "type")]
    data_type: Option<Spanned<RawType>>,
    order: Option<WordOrder>,
    scale: Option<Spanned<f64>>,
    offset: Option<Spanned<f64>>,
    mode: Option<Spanned<RawMode>>,
    deadband: Option<Spanned<f64>>,
    deadband_percent: Option<Spanned<f64>>,
    max_silence: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
}

/// Resolves every `[[plc]]`. Relative spool paths go under `data_dir`; `taken` holds
/// spool files already in use (the peers'), which a PLC spool must not share.
pub(super) fn validate(
    raw: &[RawPlc],
    points: &[&Point],
    data_dir: &Path,
    taken: &[PathBuf],
    check: &mut Checker,
) -> Vec<Plc> {
    let mut names: HashSet<&str> = HashSet::new();
    let mut spools: HashMap<PathBuf, String> =
        taken.iter().map(|p| (p.clone(), "a [[peer]]".to_owned())).collect();
    let mut plcs = Vec::with_capacity(raw.len());
    for r in raw {
        let name = r.name.get_ref().as_str();
        let path = item("plc", &r.name);
        check.name(&r.name, &path);
        let unique = names.insert(name);
        if !unique {
            check.report(r.name.span(), &path, "name is already used by another [[plc]]");
        }
        if let Err(e) = host_port(r.address.get_ref()) {
            // host_port speaks of `dial`, the peer key; here the key is `address`.
            check.report(r.address.span(), &path, e.replacen("dial", "address", 1));
        }
        let spool = match &r.spool {
            Some(s) => path_key(check, s, data_dir, &path, "spool"),
            None => data_dir.join(format!("plc-{name}.db")),
        };
        // A repeated name is reported above; its default spool would only repeat that.
        let clash = if unique || r.spool.is_some() {
            spools.insert(spool.clone(), format!("plc {name:?}"))
        } else {
            None
        };
        if let Some(other) = clash {
            let span = r.spool.as_ref().map_or(r.name.span(), |s| s.span());
            check.report(span, &path, format!("spool {} is already the spool of {other}", spool.display()));
        }
        let (spool_max_bytes, spool_max_age) =
            peer::spool_limits(r.spool_max.as_ref(), r.spool_max_age.as_ref(), &path, check);
        if r.map.is_empty() {
            check.report(r.name.span(), &path, "has no [[plc.map]]: map at least one point");
        }
        let map = maps(&r.map, points, &path, check);
        let watchdog = r.watchdog.as_ref().map(|w| watchdog(w, &map, &path, check));
        plcs.push(Plc {
            name: name.to_owned(),
            address: r.address.get_ref().clone(),
            unit: check.int(r.unit.as_ref(), 1, 0..=255, &path, "unit"),
            timeout: check.duration(r.timeout.as_ref(), TIMEOUT, TIMEOUT_MIN, &path, "timeout"),
            reconnect_max: check.duration(
                r.reconnect_max.as_ref(),
                RECONNECT_MAX,
                RECONNECT_MIN,
                &path,
                "reconnect_max",
            ),
            deliver: match r.deliver.as_ref().map(|d| *d.get_ref()) {
                None | Some(RawDeliver::Latest) => Deliver::Latest,
                Some(RawDeliver::All) => Deliver::All,
            },
            spool,
            spool_max_bytes,
            spool_max_age,
            watchdog,
            map,
        });
    }
    plcs
}

/// Resolves the map entries of one PLC (regmap.rs places the points).
fn maps(raw: &[RawMap], points: &[&Point], plc: &str, check: &mut Checker) -> Vec<PlcMap> {
    let mut layout = Layout::new(Kind::Plc);
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let path = format!("{plc} map[{i}]");
        let entry = Entry {
            points: &r.points,
            table: &r.table,
            address: &r.address,
            data_type: r.data_type.as_ref(),
            length: None,
            order: r.order,
            scale: r.scale.as_ref(),
            offset: r.offset.as_ref(),
            eng_unit: None,
        };
        let targets = layout.place(i, &entry, points, &path, check);
        let keys = ModeKeys {
            mode: r.mode.as_ref(),
            deadband: r.deadband.as_ref(),
            deadband_percent: r.deadband_percent.as_ref(),
            max_silence: r.max_silence.as_ref(),
            interval: r.interval.as_ref(),
            anchor: r.points.span(),
        };
        out.push(PlcMap {
            points: globs::compile(&r.points, &path, check),
            targets,
            mode: resolve_mode(&keys, &path, check),
        });
    }
    out
}

/// Resolves `[plc.watchdog]`: its register must be no holding target of `map`.
fn watchdog(raw: &RawWatchdog, map: &[PlcMap], plc: &str, check: &mut Checker) -> PlcWatchdog {
    let path = format!("{plc} watchdog");
    let address: u16 = check.int(Some(&raw.address), 0, 0..=65_535, &path, "address");
    let interval = check.duration_within(
        raw.interval.as_ref(),
        WATCHDOG_INTERVAL,
        WATCHDOG_MIN..=WATCHDOG_MAX,
        &path,
        "interval",
    );
    let hit = map.iter().enumerate().find_map(|(i, m)| {
        m.targets
            .iter()
            .find(|t| {
                t.table == Table::Holding
                    && t.address <= address
                    && u32::from(address) < u32::from(t.address) + u32::from(t.data_type.width())
            })
            .map(|t| (i, t))
    });
    if let Some((i, t)) = hit {
        check.report(
            raw.address.span(),
            &path,
            format!(
                "address {address} overlaps point {:?} at {} of map[{i}]: the watchdog needs a register of its own",
                t.point, t.address
            ),
        );
    }
    PlcWatchdog { address, interval }
}
