//! The `[[device.point]]` sections: typed values read from a device.
//!
//! ```toml
//! [[device.point]]
//! name = "temperature"       # required, unique in its device; full name boiler.temperature
//! table = "holding"          # required: coils|discrete|holding|input
//! address = 100              # required; counted from the device's address_base
//! type = "f32"               # bool|u16|i16|u32|i32|u64|i64|f32|f64|bit|string;
//!                            #   default u16 in register tables, bool (only) in bit tables
//! bit = 3                    # 0..=15, required with type = "bit", refused otherwise
//! length = 16                # bytes, required with type = "string", refused otherwise
//! order = "abcd"             # abcd|dcba|badc|cdab, default abcd
//! scale = 0.1                # default 1, finite and not 0 (numeric types only)
//! offset = 0                 # default 0, finite (numeric types only)
//! interval = "500ms"         # default: the device interval; >= 10ms
//! stale_after = "5s"         # default 3 x interval; not shorter than the interval
//! unit = "degC"              # engineering unit label, optional
//! ```
//!
//! `[[template.point]]` entries are written the same way. In a device made from a
//! template, a `[[device.point]]` with the name of a template point overrides only the
//! keys it sets (then `table` and `address` may be left out).
//!
//! Invariant of a validated device: no two points read a common register or bit of one
//! table, except `bit` points sharing one register, each with its own bit.

use std::collections::HashSet;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Checker;
use super::device::INTERVAL_MIN;
use crate::model::Point;
use crate::point::names::Named;
use crate::point::value::{DataType, Table, WordOrder};

/// One `[[device.point]]` (or `[[template.point]]`) as written. `table` and `address`
/// are required, except in a point that overrides a template's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPoint {
    name: Spanned<String>,
    table: Option<Spanned<Table>>,
    address: Option<Spanned<i64>>,
    #[serde(rename = "type")]
    data_type: Option<Spanned<DataType>>,
    bit: Option<Spanned<i64>>,
    length: Option<Spanned<i64>>,
    order: Option<WordOrder>,
    scale: Option<Spanned<f64>>,
    offset: Option<Spanned<f64>>,
    interval: Option<Spanned<String>>,
    stale_after: Option<Spanned<String>>,
    unit: Option<String>,
}

impl RawPoint {
    pub(super) fn name(&self) -> &Spanned<String> {
        &self.name
    }

    /// True when the point gives neither table nor address: it can only mean to
    /// override a template's point of its name.
    pub(super) fn is_override(&self) -> bool {
        self.table.is_none() && self.address.is_none()
    }

    /// This point with every key it leaves unset taken from `base`.
    pub(super) fn over(&self, base: &RawPoint) -> RawPoint {
        RawPoint {
            name: self.name.clone(),
            table: self.table.clone().or_else(|| base.table.clone()),
            address: self.address.clone().or_else(|| base.address.clone()),
            data_type: self.data_type.clone().or_else(|| base.data_type.clone()),
            bit: self.bit.clone().or_else(|| base.bit.clone()),
            length: self.length.clone().or_else(|| base.length.clone()),
            order: self.order.or(base.order),
            scale: self.scale.clone().or_else(|| base.scale.clone()),
            offset: self.offset.clone().or_else(|| base.offset.clone()),
            interval: self.interval.clone().or_else(|| base.interval.clone()),
            stale_after: self.stale_after.clone().or_else(|| base.stale_after.clone()),
            unit: self.unit.clone().or_else(|| base.unit.clone()),
        }
    }
}

/// What a point needs from its device.
pub(super) struct Context<'a> {
    /// Device name, the prefix of full point names.
    pub device: &'a str,
    /// Item path of the device, e.g. `device "boiler"`.
    pub path: &'a str,
    pub address_base: u16,
    pub max_registers: u16,
    /// Device default poll interval.
    pub interval: Duration,
}

/// Where a point lies in its table, for the overlap check.
struct Extent<'a> {
    table: Table,
    /// Wire addresses `start..end`.
    range: Range<u32>,
    /// The bit number of a `bit` point.
    bit: Option<u8>,
    name: &'a str,
    address: &'a Spanned<i64>,
    path: String,
}

/// Resolves the points of one device, in file order, and checks they do not overlap.
pub(super) fn validate(raw: &[Spanned<RawPoint>], ctx: &Context, check: &mut Checker) -> Vec<Point> {
    let mut names: HashSet<&str> = HashSet::new();
    let mut extents = Vec::with_capacity(raw.len());
    let mut points = Vec::with_capacity(raw.len());
    for spanned in raw {
        let r = spanned.get_ref();
        let path = format!("{} point {:?}", ctx.path, r.name.get_ref());
        check.name(&r.name, &path);
        if !names.insert(r.name.get_ref()) {
            check.report(r.name.span(), &path, "name is already used by another point of this device");
        }
        // Missing keys are found here, not by serde: a template point's override may
        // leave them out.
        let (Some(table), Some(address)) = (&r.table, &r.address) else {
            for (missing, key) in [(r.table.is_none(), "table"), (r.address.is_none(), "address")] {
                if missing {
                    check.report(spanned.span(), &path, format!("missing field `{key}`"));
                }
            }
            continue;
        };
        let (point, extent) = resolve(r, table, address, &path, ctx, check);
        points.push(point);
        if let Some(range) = extent {
            extents.push(Extent {
                table: *table.get_ref(),
                range,
                bit: match points.last().map(|p| p.data_type) {
                    Some(DataType::Bit(b)) => Some(b),
                    _ => None,
                },
                name: r.name.get_ref(),
                address,
                path,
            });
        }
    }
    overlaps(extents, ctx.address_base, check);
    points
}

/// Resolves one point; also returns its wire address range when the address is valid.
fn resolve(
    r: &RawPoint,
    table_key: &Spanned<Table>,
    address_key: &Spanned<i64>,
    path: &str,
    ctx: &Context,
    check: &mut Checker,
) -> (Point, Option<Range<u32>>) {
    let table = *table_key.get_ref();
    let bits_table = matches!(table, Table::Coils | Table::Discrete);
    let raw_type = r.data_type.as_ref().map(|t| *t.get_ref());
    let ty = raw_type.unwrap_or(if bits_table { DataType::Bool } else { DataType::U16 });
    // Where problems about the type as a whole point at: the type, else the table.
    let type_span = r.data_type.as_ref().map_or(table_key.span(), |t| t.span());

    if bits_table && ty != DataType::Bool {
        check.report(
            type_span.clone(),
            path,
            format!(
                "type {} needs registers, but table {} holds single bits: use type \"bool\" or a holding/input table",
                ty.name(),
                table
            ),
        );
    }

    // The bit number and string length only the types that take them need.
    let bit = if matches!(ty, DataType::Bit(_)) {
        match &r.bit {
            Some(bit) => check.int(Some(bit), 0, 0..=15, path, "bit"),
            None => {
                check.report(
                    type_span.clone(),
                    path,
                    "type \"bit\" needs `bit`, the bit number 0..=15 (0 = least significant)",
                );
                0
            }
        }
    } else {
        0
    };
    let length = if matches!(ty, DataType::Str(_)) {
        match &r.length {
            Some(length) => {
                let max = 2 * i64::from(ctx.max_registers);
                let len = *length.get_ref();
                if (1..=max).contains(&len) {
                    u16::try_from(len).unwrap_or(0)
                } else {
                    check.report(
                        length.span(),
                        path,
                        format!(
                            "length {len} is out of range 1..={max}: a string takes two bytes per register, and the device reads at most {} registers (max_registers)",
                            ctx.max_registers
                        ),
                    );
                    0
                }
            }
            None => {
                check.report(type_span.clone(), path, "type \"string\" needs `length`, its size in bytes");
                0
            }
        }
    } else {
        0
    };
    let data_type = match ty {
        DataType::Bit(_) => DataType::Bit(bit),
        DataType::Str(_) => DataType::Str(length),
        t => t,
    };
    if let Some(bit) = r.bit.as_ref().filter(|_| !matches!(ty, DataType::Bit(_))) {
        check.report(bit.span(), path, "bit is only for type = \"bit\"");
    }
    if let Some(length) = r.length.as_ref().filter(|_| !matches!(ty, DataType::Str(_))) {
        check.report(length.span(), path, "length is only for type = \"string\"");
    }

    // Width in bits for bit tables, in registers otherwise.
    let width: u32 = match data_type {
        _ if bits_table => 1,
        DataType::Bool | DataType::U16 | DataType::I16 | DataType::Bit(_) => 1,
        DataType::U32 | DataType::I32 | DataType::F32 => 2,
        DataType::U64 | DataType::I64 | DataType::F64 => 4,
        DataType::Str(len) => u32::from(len.div_ceil(2)).max(1),
    };
    if !bits_table && !matches!(ty, DataType::Str(_)) && width > u32::from(ctx.max_registers) {
        check.report(
            type_span.clone(),
            path,
            format!(
                "type {} needs {width} registers, more than the device's max_registers ({})",
                ty.name(),
                ctx.max_registers
            ),
        );
    }

    let (address, extent) = address(address_key, width, bits_table, ctx.address_base, path, check);

    let scale = finite(r.scale.as_ref(), 1.0, ty, path, "scale", check);
    if let Some(s) = r.scale.as_ref().filter(|s| *s.get_ref() == 0.0) {
        check.report(s.span(), path, "scale 0 would turn every value into 0");
    }
    let offset = finite(r.offset.as_ref(), 0.0, ty, path, "offset", check);

    let interval = check.duration(r.interval.as_ref(), ctx.interval, INTERVAL_MIN, path, "interval");
    let stale_after = match &r.stale_after {
        None => interval.saturating_mul(3),
        Some(s) => {
            let d = check.duration(Some(s), interval, Duration::ZERO, path, "stale_after");
            if d < interval {
                check.report(
                    s.span(),
                    path,
                    format!(
                        "stale_after {} is shorter than the poll interval {}",
                        humantime::format_duration(d),
                        humantime::format_duration(interval)
                    ),
                );
            }
            d
        }
    };

    let point = Point {
        name: format!("{}.{}", ctx.device, r.name.get_ref()),
        table,
        address,
        data_type,
        order: r.order.unwrap_or_default(),
        scale,
        offset,
        interval,
        stale_after,
        unit: r.unit.clone().filter(|u| !u.is_empty()),
    };
    (point, extent)
}

/// Checks the address against the base and the end of the table; returns the wire
/// address and range.
fn address(
    key: &Spanned<i64>,
    width: u32,
    bits_table: bool,
    base: u16,
    path: &str,
    check: &mut Checker,
) -> (u16, Option<Range<u32>>) {
    let written = *key.get_ref();
    let base = i64::from(base);
    let last = 65_535 + base;
    let span = key.span();
    let units = if bits_table { "bits" } else { "registers" };
    if written < base {
        check.report(span, path, format!("address {written} is below the device's address_base ({base})"));
        return (0, None);
    }
    if written > last {
        check.report(span, path, format!("address {written} is past the end of the table ({last})"));
        return (0, None);
    }
    if written + i64::from(width) - 1 > last {
        check.report(
            span,
            path,
            format!("address {written} + {width} {units} passes the end of the table ({last})"),
        );
        return (0, None);
    }
    let wire = u16::try_from(written - base).unwrap_or(0);
    let start = u32::from(wire);
    (wire, Some(start..start + width))
}

/// A finite `scale`/`offset`, only for numeric types.
fn finite(
    value: Option<&Spanned<f64>>,
    default: f64,
    ty: DataType,
    path: &str,
    key: &str,
    check: &mut Checker,
) -> f64 {
    let Some(value) = value else {
        return default;
    };
    let v = *value.get_ref();
    if !ty.is_numeric() {
        check.report(value.span(), path, format!("{key} applies only to numeric types, not {}", ty.name()));
        default
    } else if !v.is_finite() {
        check.report(value.span(), path, format!("{key} {v} is not a finite number"));
        default
    } else {
        v
    }
}

/// Reports every pair of points of one device that read a common register or bit of
/// one table. `bit` points may share a register, each with its own bit.
fn overlaps(mut extents: Vec<Extent>, base: u16, check: &mut Checker) {
    // Stable sort: among equal starts, file order is kept, so `b` below is the later
    // point in the file and the problem points at it.
    extents.sort_by_key(|e| (e.table, e.range.start));
    for (i, a) in extents.iter().enumerate() {
        for b in extents[i + 1..].iter().take_while(|b| b.table == a.table && b.range.start < a.range.end) {
            let (a, b) = if a.address.span().start < b.address.span().start { (a, b) } else { (b, a) };
            match (a.bit, b.bit) {
                (Some(x), Some(y)) if x != y => {}
                (Some(x), Some(_)) => check.report(
                    b.address.span(),
                    &b.path,
                    format!("bit {x} of {} is also read by point {:?}", extent_label(b, base), a.name),
                ),
                _ => check.report(
                    b.address.span(),
                    &b.path,
                    format!(
                        "reads {}, overlapping point {:?} ({})",
                        extent_label(b, base),
                        a.name,
                        extent_label(a, base)
                    ),
                ),
            }
        }
    }
}

/// `holding register 101`, `input registers 10..=11`, `coil 5`, counted from `base`.
fn extent_label(e: &Extent, base: u16) -> String {
    let first = e.range.start + u32::from(base);
    let last = e.range.end - 1 + u32::from(base);
    let (one, many) = match e.table {
        Table::Coils => ("coil", "coils"),
        Table::Discrete => ("discrete input", "discrete inputs"),
        Table::Holding => ("holding register", "holding registers"),
        Table::Input => ("input register", "input registers"),
    };
    if first == last { format!("{one} {first}") } else { format!("{many} {first}..={last}") }
}
