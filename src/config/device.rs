//! The `[[device]]` sections: Modbus units on a bus, and how to read them.
//!
//! ```toml
//! [[device]]
//! name = "boiler"            # required, unique; its points are named boiler.<point>
//! bus = "line1"              # required, the name of a [[bus]]
//! unit = 1                   # required, 1..=247, unique on its bus
//! timeout = "300ms"          # default: the bus timeout
//! turnaround = "0ms"         # extra pause before each request, default 0
//! interval = "1s"            # default poll interval of its points, default 1s, >= 10ms
//! address_base = 0           # 0 (wire addresses) or 1 (address 1 = wire 0), default 0
//! max_registers = 125        # most registers per read, 1..=125, default 125
//! max_bits = 2000            # most bits per read, 1..=2000, default 2000
//! max_gap = 8                # unwanted registers/bits read to merge reads, default 8
//! backoff_max = "60s"        # longest pause between re-probes, default 60s, >= 100ms
//!
//! [[device.point]]           # at least one; see config/point.rs
//! ```
//!
//! Devices are attached to their bus in file order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::point::{self, RawPoint};
use super::{Checker, item};
use crate::model::{Bus, Device};

const INTERVAL: Duration = Duration::from_secs(1);
/// Shortest poll interval, for devices and points alike.
pub(super) const INTERVAL_MIN: Duration = Duration::from_millis(10);
const TIMEOUT_MIN: Duration = Duration::from_millis(1);
const MAX_REGISTERS: u16 = 125;
const MAX_BITS: u16 = 2000;
const MAX_GAP: u16 = 8;
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const BACKOFF_MAX_MIN: Duration = Duration::from_millis(100);

/// One `[[device]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDevice {
    name: Spanned<String>,
    bus: Spanned<String>,
    unit: Spanned<i64>,
    timeout: Option<Spanned<String>>,
    turnaround: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    address_base: Option<Spanned<i64>>,
    max_registers: Option<Spanned<i64>>,
    max_bits: Option<Spanned<i64>>,
    max_gap: Option<Spanned<i64>>,
    backoff_max: Option<Spanned<String>>,
    #[serde(default)]
    point: Vec<RawPoint>,
}

/// Resolves every `[[device]]` and appends it to its bus's `devices`.
pub(super) fn validate(raw: &[RawDevice], buses: &mut [Bus], check: &mut Checker) {
    let mut names: HashSet<&str> = HashSet::new();
    // (bus index, unit) -> device name.
    let mut units: HashMap<(usize, i64), &str> = HashMap::new();
    // Full point names across all devices. Unique device names without dots already
    // make them unique; this guards that property should the name rules ever change.
    let mut full_names: HashSet<String> = HashSet::new();

    for r in raw {
        let path = item("device", &r.name);
        check.name(&r.name, &path);
        let unique = names.insert(r.name.get_ref());
        if !unique {
            check.report(r.name.span(), &path, "name is already used by another device");
        }

        let bus = buses.iter().position(|b| b.name == *r.bus.get_ref());
        if bus.is_none() {
            check.report(
                r.bus.span(),
                &path,
                format!("bus {:?} is not defined by any [[bus]]", r.bus.get_ref()),
            );
        }

        let unit = check.int(Some(&r.unit), 1, 1..=247, &path, "unit");
        // Only a valid unit can clash; an invalid one is reported above.
        let clash = bus
            .filter(|_| (1..=247).contains(r.unit.get_ref()))
            .and_then(|b| units.insert((b, *r.unit.get_ref()), r.name.get_ref()));
        if let Some(other) = clash {
            check.report(
                r.unit.span(),
                &path,
                format!("unit {unit} is already used by device {other:?} on bus {:?}", r.bus.get_ref()),
            );
        }

        let bus_timeout = bus.and_then(|b| buses.get(b)).map(|b| b.timeout);
        let device = resolve(r, &path, unit, bus_timeout, check);

        if unique {
            // Within the device, a repeated point name is reported by point::validate.
            let own: HashSet<&str> = device.points.iter().map(|p| p.name.as_str()).collect();
            for name in own {
                if !full_names.insert(name.to_owned()) {
                    check.report(r.name.span(), &path, format!("full point name {name:?} is used twice"));
                }
            }
        }
        if let Some(bus) = bus.and_then(|b| buses.get_mut(b)) {
            bus.devices.push(device);
        }
    }
}

fn resolve(
    r: &RawDevice,
    path: &str,
    unit: u8,
    bus_timeout: Option<Duration>,
    check: &mut Checker,
) -> Device {
    let timeout =
        check.duration(r.timeout.as_ref(), bus_timeout.unwrap_or(TIMEOUT_MIN), TIMEOUT_MIN, path, "timeout");
    let turnaround =
        check.duration(r.turnaround.as_ref(), Duration::ZERO, Duration::ZERO, path, "turnaround");
    let interval = check.duration(r.interval.as_ref(), INTERVAL, INTERVAL_MIN, path, "interval");
    let address_base = check.int(r.address_base.as_ref(), 0, 0..=1, path, "address_base");
    let max_registers = check.int(
        r.max_registers.as_ref(),
        MAX_REGISTERS,
        1..=i64::from(MAX_REGISTERS),
        path,
        "max_registers",
    );
    let max_bits = check.int(r.max_bits.as_ref(), MAX_BITS, 1..=i64::from(MAX_BITS), path, "max_bits");
    let max_gap = check.int(r.max_gap.as_ref(), MAX_GAP, 0..=i64::from(MAX_BITS), path, "max_gap");
    let backoff_max =
        check.duration(r.backoff_max.as_ref(), BACKOFF_MAX, BACKOFF_MAX_MIN, path, "backoff_max");

    if r.point.is_empty() {
        check.report(r.name.span(), path, "has no points: add at least one [[device.point]]");
    }
    let context = point::Context { device: r.name.get_ref(), path, address_base, max_registers, interval };
    Device {
        name: r.name.get_ref().clone(),
        unit,
        timeout,
        turnaround,
        max_registers,
        max_bits,
        max_gap,
        backoff_max,
        points: point::validate(&r.point, &context, check),
    }
}
