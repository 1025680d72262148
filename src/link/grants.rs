//! What a peer may write here: its `[[peer.grant]]` rules, compiled, and the check every
//! write from the peer passes before it reaches a device.
//!
//! Invariants: a write is admitted only when some grant's globs cover the point and, for a
//! numeric value, the value lies in that grant's range; a refusal always starts with
//! `not granted` (the asking side tells refusals from device failures by it).

use crate::model::Grant;
use crate::point::registers::value_as_f64;
use crate::point::value::Value;

/// What a peer may write here, compiled.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    grants: Vec<Grant>,
}

impl Grants {
    /// The grants of a peer (their globs were compiled with the configuration).
    pub fn new(grants: &[Grant]) -> Self {
        Self { grants: grants.to_vec() }
    }

    /// True when some grant covers `point` (whatever the value).
    pub fn covers(&self, point: &str) -> bool {
        self.grants.iter().any(|g| g.points.is_match(point))
    }

    /// Ok when some grant covers `point` and admits `value`; else the refusal reason.
    pub fn check(&self, point: &str, value: &Value) -> Result<(), String> {
        let mut matched = None;
        for g in &self.grants {
            if !g.points.is_match(point) {
                continue;
            }
            let Some(x) = value_as_f64(value) else {
                return Ok(());
            };
            if g.min.is_none_or(|min| x >= min) && g.max.is_none_or(|max| x <= max) {
                return Ok(());
            }
            matched = Some(g);
        }
        Err(match matched {
            Some(g) => format!(
                "not granted: {value} is outside the granted range [{}, {}] of {point}",
                g.min.map_or("-inf".into(), |m| m.to_string()),
                g.max.map_or("inf".into(), |m| m.to_string()),
            ),
            None => format!("not granted: point {point} is not writable by this peer"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_match_globs_and_ranges() {
        let globs = |g: &str| crate::model::PointGlobs::new(vec![g.into()]).expect("globs");
        let g = Grants::new(&[
            Grant { points: globs("boiler.sp*"), matched: vec![], min: Some(0.0), max: Some(90.0) },
            Grant { points: globs("pump.run"), matched: vec![], min: None, max: None },
        ]);
        assert_eq!(g.check("boiler.sp1", &Value::Float(45.0)), Ok(()));
        assert_eq!(g.check("boiler.sp1", &Value::Int(90)), Ok(()));
        let e = g.check("boiler.sp1", &Value::Float(90.5)).expect_err("range");
        assert!(e.starts_with("not granted") && e.contains("[0, 90]"), "{e}");
        assert_eq!(g.check("pump.run", &Value::Bool(true)), Ok(()));
        let e = g.check("pump.stop", &Value::Bool(true)).expect_err("no grant");
        assert!(e.contains("pump.stop"), "{e}");
        assert!(Grants::default().check("x", &Value::Int(1)).is_err());
    }
}
