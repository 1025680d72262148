//! Writes into local points on behalf of a peer: `[[peer.grant]]` (what the peer may
//! write) and `[[peer.writeback]]` (a value received from the peer that drives a write).
//!
//! ```toml
//! [[peer.grant]]             # zero or more; none: the peer may write nothing
//! points = "drive.speed_setpoint"  # required: point glob(s), each matching a configured
//!                            #   point; every match a holding register or coil point,
//!                            #   and in no other grant of this peer
//! min = 0.0                  # optional limits (numeric points only), min <= max
//! max = 1500.0
//!
//! [[peer.writeback]]         # zero or more
//! from = "boiler.setpoint"   # required: the point as the peer names it ("device.point",
//!                            #   without the "site-b/" prefix)
//! to = "pump.speed_setpoint" # required: a local holding register or coil point, not a
//!                            #   string; driven by one write-back only (of any peer)
//! on_loss = "keep"           # keep | fallback, default keep
//! fallback = 0.0             # required iff on_loss = "fallback": a number or true/false
//!                            #   that encodes into the `to` point
//! loss_after = "30s"         # fallback only: link down this long, write `fallback`;
//!                            #   default 30s
//! ```

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::globs::{self, Globs};
use super::{Checker, is_name, number};
use crate::model::{Grant, OnLoss, Point, WriteBack};
use crate::point::registers;
use crate::point::value::{DataType, Table, Value};

const LOSS_AFTER: Duration = Duration::from_secs(30);

/// One `[[peer.grant]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrant {
    points: Spanned<Globs>,
    min: Option<Spanned<f64>>,
    max: Option<Spanned<f64>>,
}

/// One `[[peer.writeback]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWriteBack {
    from: Spanned<String>,
    to: Spanned<String>,
    on_loss: Option<Spanned<RawOnLoss>>,
    fallback: Option<Spanned<toml::Value>>,
    loss_after: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawOnLoss {
    Keep,
    Fallback,
}

/// Local points already driven by a write-back, across all peers: point -> item path.
#[derive(Default)]
pub(super) struct Targets(HashMap<String, String>);

/// Resolves the grants of one peer (`peer` is its item path).
pub(super) fn grants(raw: &[RawGrant], points: &[&Point], peer: &str, check: &mut Checker) -> Vec<Grant> {
    // Point name -> index of the grant that covers it.
    let mut granted: HashMap<&str, usize> = HashMap::new();
    let mut grants = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let path = format!("{peer} grant[{i}]");
        let inf = f64::NEG_INFINITY..=f64::INFINITY;
        let min = r.min.as_ref().map(|v| number(check, Some(v), 0.0, inf.clone(), "", &path, "min"));
        let max = r.max.as_ref().map(|v| number(check, Some(v), 0.0, inf.clone(), "", &path, "max"));
        if let (Some(lo), Some(hi), Some(span)) = (min, max, r.max.as_ref().map(|m| m.span()))
            && lo > hi
        {
            check.report(span, &path, format!("max {hi} is below min {lo}"));
        }
        // Where a limit on a non-numeric point is reported: the first limit written.
        let limit = r
            .min
            .as_ref()
            .or(r.max.as_ref())
            .map(|v| (v.span(), if r.min.is_some() { "min" } else { "max" }));

        let mut matched = Vec::new();
        let mut limit_reported = false;
        for m in globs::resolve(&r.points, points, &path, check) {
            for p in m.points {
                if let Err(e) = writable(p) {
                    check.report(
                        m.span.clone(),
                        &path,
                        format!("point {:?} is {e}: grants need holding registers or coils", p.name),
                    );
                    continue;
                }
                if let Some((span, key)) = limit.clone()
                    && !p.data_type.is_numeric()
                    && !limit_reported
                {
                    limit_reported = true;
                    check.report(
                        span,
                        &path,
                        format!(
                            "{key} applies to numeric points only, and point {:?} is not a number",
                            p.name
                        ),
                    );
                }
                match granted.get(p.name.as_str()) {
                    Some(&other) if other != i => check.report(
                        m.span.clone(),
                        &path,
                        format!("point {:?} is already granted by grant[{other}]", p.name),
                    ),
                    Some(_) => {}
                    None => {
                        granted.insert(&p.name, i);
                        matched.push(p.name.clone());
                    }
                }
            }
        }
        grants.push(Grant { points: globs::compile(&r.points, &path, check), matched, min, max });
    }
    grants
}

/// Resolves the write-backs of one peer (`peer` is its item path); `targets` carries the
/// points driven by the write-backs of earlier peers.
pub(super) fn writebacks(
    raw: &[RawWriteBack],
    points: &[&Point],
    peer: &str,
    targets: &mut Targets,
    check: &mut Checker,
) -> Vec<WriteBack> {
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let path = format!("{peer} writeback[{i}]");
        let from = r.from.get_ref();
        if let Err(e) = peer_point(from) {
            check.report(r.from.span(), &path, e);
        }

        let to = r.to.get_ref();
        let target = points.iter().copied().find(|p| p.name == *to);
        match target {
            None => check.report(
                r.to.span(),
                &path,
                format!("to {to:?} is not a configured point (full names are \"device.point\")"),
            ),
            Some(p) => {
                let usable = match p.data_type {
                    DataType::Str(_) => Err("a string point"),
                    _ => writable(p),
                };
                if let Err(e) = usable {
                    check.report(r.to.span(), &path, format!("to {to:?} is {e}: a write-back drives a number or bool into a holding register or coil"));
                } else if let Some(other) = targets.0.insert(to.clone(), path.clone()) {
                    check.report(r.to.span(), &path, format!("to {to:?} is already driven by {other}"));
                }
            }
        }

        let on_loss = r.on_loss.as_ref().map_or(RawOnLoss::Keep, |o| *o.get_ref());
        let on_loss = match (on_loss, &r.fallback) {
            (RawOnLoss::Keep, None) => OnLoss::Keep,
            (RawOnLoss::Keep, Some(f)) => {
                check.report(f.span(), &path, "fallback applies only with on_loss = \"fallback\"");
                OnLoss::Keep
            }
            (RawOnLoss::Fallback, None) => {
                let span = r.on_loss.as_ref().map_or(r.to.span(), |o| o.span());
                check.report(span, &path, "on_loss = \"fallback\" needs `fallback`, the value to write");
                OnLoss::Keep
            }
            (RawOnLoss::Fallback, Some(f)) => match fallback(f.get_ref(), target) {
                Ok(v) => OnLoss::Fallback(v),
                Err(e) => {
                    check.report(f.span(), &path, e);
                    OnLoss::Keep
                }
            },
        };
        if let (OnLoss::Keep, Some(l)) = (&on_loss, &r.loss_after)
            && r.on_loss.as_ref().is_none_or(|o| *o.get_ref() == RawOnLoss::Keep)
        {
            check.report(l.span(), &path, "loss_after applies only with on_loss = \"fallback\"");
        }
        out.push(WriteBack {
            from: from.clone(),
            to: to.clone(),
            on_loss,
            loss_after: check.duration(
                r.loss_after.as_ref(),
                LOSS_AFTER,
                Duration::ZERO,
                &path,
                "loss_after",
            ),
        });
    }
    out
}

/// Ok if `p` can be written at all: it must sit in a read/write table. The error
/// completes "point x is ...".
fn writable(p: &Point) -> Result<(), &'static str> {
    match p.table {
        Table::Holding | Table::Coils => Ok(()),
        Table::Input => Err("an input register, which is read-only"),
        Table::Discrete => Err("a discrete input, which is read-only"),
    }
}

/// A point name as the peer names it: `device.point`.
fn peer_point(from: &str) -> Result<(), String> {
    if let Some((peer, _)) = from.split_once('/') {
        return Err(format!(
            "from {from:?}: name the point as the peer does, without the {:?} prefix",
            format!("{peer}/")
        ));
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    match from.split_once('.') {
        Some((device, point)) if is_name(device, alnum) && is_name(point, alnum) => Ok(()),
        _ => Err(format!("from {from:?} is not a point name of the form \"device.point\"")),
    }
}

/// The fallback `value` as it will be written into `target`: a number or bool that
/// encodes into the point (bool and bit points take true/false, or 0/1).
fn fallback(value: &toml::Value, target: Option<&Point>) -> Result<Value, String> {
    let v = match value {
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Integer(i) => Value::Int(*i),
        toml::Value::Float(x) if x.is_finite() => Value::Float(*x),
        toml::Value::Float(x) => return Err(format!("fallback {x} is not a finite number")),
        other => {
            return Err(format!("fallback must be a number or true/false, not {}", other.type_str()));
        }
    };
    // Without a valid target, the target is what is reported.
    let Some(p) = target else {
        return Ok(v);
    };
    let boolean = match &v {
        Value::Bool(b) => Some(*b),
        Value::Int(0) => Some(false),
        Value::Int(1) => Some(true),
        _ => None,
    };
    match (p.data_type, boolean) {
        (DataType::Bool | DataType::Bit(_), Some(b)) => Ok(Value::Bool(b)),
        (DataType::Bool | DataType::Bit(_), None) => {
            Err(format!("fallback {v} does not fit point {:?}, a bool: use true or false", p.name))
        }
        _ => registers::encode_registers(p.data_type, p.order, p.scale, p.offset, &v)
            .map(|_| v.clone())
            .map_err(|e| format!("fallback {v} does not fit point {:?}: {e}", p.name)),
    }
}
