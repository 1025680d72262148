//! The `[[template]]` sections: a device type's settings and points, written once and
//! instantiated by any number of `[[device]]`s (`template = "sdm630"`).
//!
//! ```toml
//! [[template]]
//! name = "sdm630"            # required, unique among templates; same rules as a device name
//! interval = "5s"            # any [[device]] key but name, bus, unit and template:
//! address_base = 1           #   timeout, turnaround, interval, address_base,
//!                            #   max_registers, max_bits, max_gap, backoff_max
//!
//! [[template.point]]         # written like [[device.point]] (config/point.rs)
//! name = "voltage_l1"
//! table = "input"
//! address = 1
//! type = "f32"
//!
//! [[device]]
//! name = "meter_3"
//! bus = "line1"
//! unit = 3
//! template = "sdm630"        # the template's settings and points ...
//! interval = "1s"            # ... with any device key overriding the template's
//!
//! [[device.point]]           # a point named like a template point overrides the keys
//! name = "voltage_l1"        #   it sets; a point with its own table and address is
//! scale = 0.1                #   added to the template's
//! ```
//!
//! Each template is also checked on its own (as a device would be), so a mistake in a
//! template is reported once, at its line, even when no device uses it yet; a problem
//! that only an instance's overrides cause is reported for that device, naming both.
//! Templates are for Modbus devices; `[[raw_device]]` has no templates (see the README).

use std::collections::HashMap;
use std::collections::HashSet;

use serde::Deserialize;
use toml::Spanned;

use super::device::{self, Settings};
use super::point::RawPoint;
use super::{Checker, item};

/// One `[[template]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTemplate {
    name: Spanned<String>,
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

/// Valid templates by name.
pub(super) type Templates = HashMap<String, Settings>;

/// Checks every template on its own and returns them by name (the first of a
/// duplicated name).
pub(super) fn validate(raw: &[RawTemplate], check: &mut Checker) -> Templates {
    let mut templates = Templates::new();
    let mut names: HashSet<&str> = HashSet::new();
    for r in raw {
        let path = item("template", &r.name);
        check.name(&r.name, &path);
        if !names.insert(r.name.get_ref()) {
            check.report(r.name.span(), &path, "name is already used by another template");
            continue;
        }
        let settings = Settings {
            timeout: r.timeout.clone(),
            turnaround: r.turnaround.clone(),
            interval: r.interval.clone(),
            address_base: r.address_base.clone(),
            max_registers: r.max_registers.clone(),
            max_bits: r.max_bits.clone(),
            max_gap: r.max_gap.clone(),
            backoff_max: r.backoff_max.clone(),
            point: r.point.clone(),
        };
        // A template may hold settings only, its devices giving the points: the device
        // check says so when a device ends up with none.
        let settings_only = settings.point.is_empty();
        if settings_only {
            check.quiet.push(r.name.span());
        }
        device::resolve(&r.name, &settings, &path, 1, None, check);
        if settings_only {
            check.quiet.pop();
        }
        templates.insert(r.name.get_ref().clone(), settings);
    }
    templates
}
