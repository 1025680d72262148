//! Register maps, as `[[plc.map]]` and `[[server.unit.map]]` write them: points placed at
//! consecutive addresses of one table with a type, word order, scale and offset. One
//! piece of code resolves both, so a PLC and a virtual unit encode a point the same way.
//!
//! Point names. A local point is named by globs (`boiler.*`), matched against the
//! configured points in configuration order. A *received* point (`site-a/boiler.temp`,
//! a value a peer sends) is named exactly, one by one, with its `type`: this gateway
//! does not know the far side's point list, and a register map whose addresses moved
//! whenever the peer added a point, or depended on what arrived first, would break the
//! SCADA's tag list. So a received name holds no glob character, and the entry that
//! names it must say `type` (and `length` for a string); addresses follow the order
//! written, as for local points. The peer part need not be a configured `[[peer]]`
//! (a hub relays points of gateways further away, under their origin's name); `check`
//! warns when it is not.
//!
//! Invariants of a placed map: every target lies inside 0..=65535; no two targets
//! overlap in one table (a multi-register value is never split); coils and discrete
//! inputs hold bools only; `Bit` never appears (a bit point is placed as `Bool`).

use std::collections::HashMap;
use std::ops::Range;

use toml::Spanned;

use super::globs::{self, Globs};
use super::{Checker, number};
use crate::model::{MapTarget, Point};
use crate::point::value::{DataType, Table, WordOrder};

crate::point::names::named_subset! {
    /// `type` of a map entry as written: any type but `bit` (a map entry places whole
    /// registers or single bits, never one bit of a register).
    pub(super) struct RawType(DataType) where |t| !matches!(t, DataType::Bit(_));
}

/// The placing keys of one map entry, borrowed from its raw struct.
pub(super) struct Entry<'a> {
    pub points: &'a Spanned<Globs>,
    pub table: &'a Spanned<Table>,
    pub address: &'a Spanned<i64>,
    pub data_type: Option<&'a Spanned<RawType>>,
    pub length: Option<&'a Spanned<i64>>,
    pub order: Option<WordOrder>,
    pub scale: Option<&'a Spanned<f64>>,
    pub offset: Option<&'a Spanned<f64>>,
    pub eng_unit: Option<&'a Spanned<String>>,
}

/// What the map feeds, which decides what it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A PLC is written: holding registers and coils, numbers and bools, each point once.
    Plc,
    /// A virtual unit is read (and written through to the owner): any table, strings
    /// too, a point may appear twice (say as f32 and as a scaled i16).
    Unit,
}

impl Kind {
    /// What happens to a placed point, as error messages say it.
    fn placed(self) -> &'static str {
        match self {
            Kind::Plc => "written",
            Kind::Unit => "placed",
        }
    }
}

/// The targets placed so far in one PLC or unit: overlaps and repeats are checked
/// across all of its entries.
pub(super) struct Layout {
    kind: Kind,
    /// (table, start, end exclusive, entry index, point)
    used: Vec<(Table, u32, u32, usize, String)>,
    mapped: HashMap<String, usize>,
}

/// Longest string a map entry may declare: 123 registers, one FC16.
const MAX_LENGTH: i64 = 246;

/// A point an entry names, local or received, with what placing it needs.
struct Named<'p> {
    name: String,
    /// The point's own type (`None`: received, the entry's `type` is required).
    own: Option<&'p Point>,
    span: Range<usize>,
}

impl Layout {
    pub(super) fn new(kind: Kind) -> Self {
        Self { kind, used: Vec::new(), mapped: HashMap::new() }
    }

    /// Places the points of entry `i` from its `address` on; reports every problem.
    pub(super) fn place(
        &mut self,
        i: usize,
        e: &Entry<'_>,
        points: &[&Point],
        path: &str,
        check: &mut Checker,
    ) -> Vec<MapTarget> {
        let table = *e.table.get_ref();
        if self.kind == Kind::Plc && !matches!(table, Table::Holding | Table::Coils) {
            check.report(e.table.span(), path, "table must be holding or coils: a PLC is written, not read");
        }
        let bits = matches!(table, Table::Coils | Table::Discrete);
        let start: u16 = check.int(Some(e.address), 0, 0..=65_535, path, "address");
        let scale = number(check, e.scale, 1.0, f64::MIN..=f64::MAX, "finite", path, "scale");
        if scale == 0.0
            && let Some(s) = e.scale
        {
            check.report(s.span(), path, "scale 0 would divide by zero");
        }
        let offset = number(check, e.offset, 0.0, f64::MIN..=f64::MAX, "finite", path, "offset");
        let length: Option<u16> = e.length.map(|l| check.int(Some(l), 2, 1..=MAX_LENGTH, path, "length"));
        match (e.data_type.map(|t| *t.get_ref()), e.length) {
            (Some(RawType(DataType::Str(_))), None) => {
                if let Some(t) = e.data_type {
                    check.report(t.span(), path, "type \"string\" needs `length`, its size in bytes");
                }
            }
            (Some(RawType(DataType::Str(_))), Some(_)) => {}
            (_, Some(l)) => check.report(l.span(), path, "length is only for type = \"string\""),
            _ => {}
        }
        let type_span = e.data_type.map_or(e.table.span(), |t| t.span());
        let mut next = u32::from(start);
        let mut targets = Vec::new();
        for named in self.names(e, points, path, check) {
            if self.kind == Kind::Plc
                && let Some(first) = self.mapped.insert(named.name.clone(), i)
            {
                check.report(
                    named.span.clone(),
                    path,
                    format!(
                        "point {:?} is already mapped by map[{first}]: a point is written to one place",
                        named.name
                    ),
                );
                continue;
            }
            let Some(data_type) = self.target_type(table, e, length, &named, &type_span, path, check) else {
                continue;
            };
            let width = if bits { 1 } else { u32::from(data_type.width()) };
            let end = next + width;
            if end > 65_536 {
                check.report(
                    e.address.span(),
                    path,
                    format!(
                        "point {:?} would be {} past the last address 65535",
                        named.name,
                        self.kind.placed()
                    ),
                );
                break;
            }
            if let Some((_, s, _, j, other)) =
                self.used.iter().find(|(t, s, en, _, _)| *t == table && *s < end && next < *en)
            {
                check.report(
                    e.address.span(),
                    path,
                    match self.kind {
                        // The wording `[[plc.map]]` always had (issue 11: messages unchanged).
                        Kind::Plc => format!(
                            "point {:?} at {next} overlaps point {other:?} of map[{j}] in the same {} table",
                            named.name,
                            table
                        ),
                        Kind::Unit => format!(
                            "point {:?} at {next} overlaps point {other:?} at {s} of map[{j}] in the same {} table",
                            named.name,
                            table
                        ),
                    },
                );
            }
            self.used.push((table, next, end, i, named.name.clone()));
            targets.push(MapTarget {
                point: named.name,
                table,
                // `end` <= 65536, so `next` fits.
                address: u16::try_from(next).unwrap_or(u16::MAX),
                data_type,
                order: e.order.unwrap_or_default(),
                scale,
                offset,
                eng_unit: e
                    .eng_unit
                    .map(|u| u.get_ref().clone())
                    .or_else(|| named.own.and_then(|p| p.unit.clone())),
            });
            next = end;
        }
        targets
    }

    /// The points entry `e` names, in order: local globs matched against `points`,
    /// received names taken as written.
    fn names<'p>(
        &self,
        e: &Entry<'_>,
        points: &[&'p Point],
        path: &str,
        check: &mut Checker,
    ) -> Vec<Named<'p>> {
        let written = globs::written(e.points);
        if written.is_empty() {
            check.report(
                e.points.span(),
                path,
                "points is empty: name at least one point (or glob, like \"boiler.*\")",
            );
        }
        let mut out = Vec::new();
        for (glob, span) in written {
            if let Some((peer, point)) = glob.split_once('/') {
                if glob.contains(['*', '?', '[', ']', '{', '}', '!', '\\']) {
                    check.report(
                        span,
                        path,
                        format!(
                            "received point {glob:?} is a glob: name received points one by one, with their type \
                             (this gateway does not know the peer's points, and addresses must not depend on what arrives)"
                        ),
                    );
                    continue;
                }
                let ok = |s: &str| !s.is_empty() && !s.contains('/') && !s.contains(char::is_whitespace);
                if !ok(peer) || !ok(point) {
                    check.report(span, path, format!("received point {glob:?} is not \"peer/device.point\""));
                    continue;
                }
                if e.data_type.is_none() {
                    check.report(
                        span,
                        path,
                        format!(
                            "received point {glob:?} needs `type` in its entry: this gateway does not know the peer's point types"
                        ),
                    );
                    continue;
                }
                out.push(Named { name: glob.to_owned(), own: None, span });
            } else {
                for p in globs::resolve_one(glob, span.clone(), points, path, check) {
                    out.push(Named { name: p.name.clone(), own: Some(p), span: span.clone() });
                }
            }
        }
        out
    }

    /// The register encoding of `named` placed into `table`, or `None` (reported).
    #[allow(clippy::too_many_arguments)]
    fn target_type(
        &self,
        table: Table,
        e: &Entry<'_>,
        length: Option<u16>,
        named: &Named<'_>,
        type_span: &Range<usize>,
        path: &str,
        check: &mut Checker,
    ) -> Option<DataType> {
        let written = e.data_type.map(|t| match t.get_ref().0 {
            DataType::Str(_) => DataType::Str(length.unwrap_or(2)),
            t => t,
        });
        // The type the point's values have: its own, or (received) the entry's.
        let own = named.own.map_or(written, |p| Some(p.data_type))?;
        let is_bool = matches!(own, DataType::Bool | DataType::Bit(_));
        let is_text = matches!(own, DataType::Str(_)) || matches!(written, Some(DataType::Str(_)));
        let name = &named.name;
        if is_text && self.kind == Kind::Plc {
            check.report(
                type_span.clone(),
                path,
                format!("point {name:?} is a string: only numbers and bools can be written to a PLC"),
            );
            return None;
        }
        if matches!(table, Table::Coils | Table::Discrete) {
            if let Some(t) = e.data_type.filter(|t| !matches!(t.get_ref(), RawType(DataType::Bool))) {
                let msg = match self.kind {
                    Kind::Plc => "coils hold single bits: type must be bool (or left out)",
                    Kind::Unit => {
                        "coils and discrete inputs hold single bits: type must be bool (or left out)"
                    }
                };
                check.report(t.span(), path, msg);
                return None;
            }
            if !is_bool {
                check.report(
                    type_span.clone(),
                    path,
                    match self.kind {
                        Kind::Plc => {
                            format!("point {name:?} is not a bool: only bool and bit points can be written to coils")
                        }
                        Kind::Unit => format!("point {name:?} is not a bool: only bool and bit points fit a bit table"),
                    },
                );
                return None;
            }
            return Some(DataType::Bool);
        }
        if is_text && !matches!(written.unwrap_or(own), DataType::Str(_)) {
            check.report(
                type_span.clone(),
                path,
                format!("point {name:?} is a string: its type must be string"),
            );
            return None;
        }
        if matches!(written, Some(DataType::Str(_))) && !is_text {
            check.report(type_span.clone(), path, format!("point {name:?} is not a string"));
            return None;
        }
        Some(match (written, named.own) {
            (Some(t), _) => t,
            (None, _) if is_bool => DataType::Bool,
            (None, Some(p)) if p.scale != 1.0 || p.offset != 0.0 => DataType::F32,
            (None, _) => own,
        })
    }

    /// True when a target of `table` covers `address`: the entry index and point.
    pub(super) fn covering(&self, table: Table, address: u16, len: u16) -> Option<(usize, &str)> {
        let (a, b) = (u32::from(address), u32::from(address) + u32::from(len));
        self.used
            .iter()
            .find(|(t, s, e, _, _)| *t == table && *s < b && a < *e)
            .map(|(_, _, _, i, p)| (*i, p.as_str()))
    }
}
