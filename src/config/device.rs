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
//! template = "sdm630"        # optional: a [[template]] giving settings and points; every
//!                            #   key above set here overrides the template's
//!
//! [[device.point]]           # at least one (with the template's); see config/point.rs.
//!                            #   With a template, a point named like one of the
//!                            #   template's overrides the keys it sets (`scale = 0.01`);
//!                            #   other points (with table and address) are added.
//! ```
//!
//! Devices are attached to their bus in file order. A device made from a template is
//! validated as if it were written out in full; its problems name the device and the
//! template (`device "m3" (template "sdm630") point "energy"`) and point at the key that
//! holds the offending value, in the template or in the device.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::point::{self, RawPoint};
use super::template::Templates;
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
    template: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    turnaround: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    address_base: Option<Spanned<i64>>,
    max_registers: Option<Spanned<i64>>,
    max_bits: Option<Spanned<i64>>,
    max_gap: Option<Spanned<i64>>,
    backoff_max: Option<Spanned<String>>,
    #[serde(default)]
    point: Vec<Spanned<RawPoint>>,
}

impl RawDevice {
    fn settings(&self) -> Settings {
        Settings {
            timeout: self.timeout.clone(),
            turnaround: self.turnaround.clone(),
            interval: self.interval.clone(),
            address_base: self.address_base.clone(),
            max_registers: self.max_registers.clone(),
            max_bits: self.max_bits.clone(),
            max_gap: self.max_gap.clone(),
            backoff_max: self.backoff_max.clone(),
            point: self.point.clone(),
        }
    }
}

/// The keys a `[[device]]` and a `[[template]]` share: everything but the device's
/// name, bus, unit and template. (Written out in both raw types: serde's `flatten`
/// would lose the spans and `deny_unknown_fields`.)
#[derive(Debug, Clone, Default)]
pub(super) struct Settings {
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) turnaround: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) address_base: Option<Spanned<i64>>,
    pub(super) max_registers: Option<Spanned<i64>>,
    pub(super) max_bits: Option<Spanned<i64>>,
    pub(super) max_gap: Option<Spanned<i64>>,
    pub(super) backoff_max: Option<Spanned<String>>,
    pub(super) point: Vec<Spanned<RawPoint>>,
}

impl Settings {
    /// These settings with every key they leave unset taken from `base`, and the
    /// points of `base` first, overridden by same-named points of ours; our other
    /// points follow. A point of ours that names no point of `base` and has no table
    /// (so it can only be meant as an override) is reported.
    fn over(&self, base: &Settings, template: &str, path: &str, check: &mut Checker) -> Settings {
        let mut points: Vec<Spanned<RawPoint>> = base.point.clone();
        let mut overridden: HashSet<&str> = HashSet::new();
        let mut extra = Vec::new();
        for p in &self.point {
            let name = p.get_ref().name();
            match points.iter_mut().find(|t| t.get_ref().name().get_ref() == name.get_ref()) {
                Some(_) if !overridden.insert(name.get_ref()) => check.report(
                    name.span(),
                    &format!("{path} point {:?}", name.get_ref()),
                    "name is already used by another point of this device",
                ),
                Some(t) => *t = Spanned::new(t.span(), p.get_ref().over(t.get_ref())),
                None if p.get_ref().is_override() => check.report(
                    name.span(),
                    &format!("{path} point {:?}", name.get_ref()),
                    format!(
                        "template {template:?} has no point {:?} to override; to add a point, give its table and address",
                        name.get_ref()
                    ),
                ),
                None => extra.push(p.clone()),
            }
        }
        points.extend(extra);
        Settings {
            timeout: self.timeout.clone().or_else(|| base.timeout.clone()),
            turnaround: self.turnaround.clone().or_else(|| base.turnaround.clone()),
            interval: self.interval.clone().or_else(|| base.interval.clone()),
            address_base: self.address_base.clone().or_else(|| base.address_base.clone()),
            max_registers: self.max_registers.clone().or_else(|| base.max_registers.clone()),
            max_bits: self.max_bits.clone().or_else(|| base.max_bits.clone()),
            max_gap: self.max_gap.clone().or_else(|| base.max_gap.clone()),
            backoff_max: self.backoff_max.clone().or_else(|| base.backoff_max.clone()),
            point: points,
        }
    }
}

/// Resolves every `[[device]]` and appends it to its bus's `devices`.
pub(super) fn validate(raw: &[RawDevice], templates: &Templates, buses: &mut [Bus], check: &mut Checker) {
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

        if let Some(b) = bus.and_then(|b| buses.get(b)).filter(|b| b.protocol == crate::model::Protocol::Raw)
        {
            check.report(
                r.bus.span(),
                &path,
                format!("bus {:?} has protocol = \"raw\": its devices are [[raw_device]] sections", b.name),
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
        let settings = r.settings();
        let device = match &r.template {
            None => resolve(&r.name, &settings, &path, unit, bus_timeout, check),
            Some(name) => match templates.get(name.get_ref()) {
                Some(template) => {
                    let path = format!("{path} (template {:?})", name.get_ref());
                    let settings = settings.over(template, name.get_ref(), &path, check);
                    let mut device = resolve(&r.name, &settings, &path, unit, bus_timeout, check);
                    device.template = Some(name.get_ref().clone());
                    device
                }
                None => {
                    check.report(
                        name.span(),
                        &path,
                        format!("template {:?} is not defined by any [[template]]", name.get_ref()),
                    );
                    // Its points are the template's: without it, do not also say it has none.
                    let mut settings = settings;
                    settings.point.retain(|p| !p.get_ref().is_override());
                    check.quiet.push(r.name.span());
                    let device = resolve(&r.name, &settings, &path, unit, bus_timeout, check);
                    check.quiet.pop();
                    device
                }
            },
        };

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

/// Resolves one device (or, with unit 1 and no bus, a template on its own).
pub(super) fn resolve(
    name: &Spanned<String>,
    r: &Settings,
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
        check.report(name.span(), path, "has no points: add at least one [[device.point]]");
    }
    let context = point::Context { device: name.get_ref(), path, address_base, max_registers, interval };
    Device {
        name: name.get_ref().clone(),
        template: None,
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
