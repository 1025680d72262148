//! Point-name globs, as `[[peer.send]]` and `[[peer.grant]]` write them: one glob or a
//! list of globs (`points = "boiler.*"`, `points = ["boiler.*", "meter.energy"]`),
//! matched (`globset` syntax) against the full names of the configured local points.
//!
//! Invariant: a glob that does not parse, or matches no configured point, is a problem —
//! a typo must never silently send or grant nothing.

use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{Deserializer, SeqAccess, Visitor};
use toml::Spanned;

use super::Checker;
use crate::model::{Point, PointGlobs};

/// `points` as written: one glob or a list of them.
#[derive(Debug)]
pub(super) enum Globs {
    /// `points = "boiler.*"` (its span is the span of the whole key's value).
    One(String),
    /// `points = ["boiler.*", ...]`.
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for Globs {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct GlobsVisitor;

        impl<'de> Visitor<'de> for GlobsVisitor {
            type Value = Globs;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a point glob or a list of point globs")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Globs, E> {
                Ok(Globs::One(s.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Globs, A::Error> {
                let mut globs = Vec::new();
                while let Some(glob) = seq.next_element::<Spanned<String>>()? {
                    globs.push(glob);
                }
                Ok(Globs::Many(globs))
            }
        }

        deserializer.deserialize_any(GlobsVisitor)
    }
}

/// The globs as written, each with its span.
pub(super) fn written(globs: &Spanned<Globs>) -> Vec<(&str, Range<usize>)> {
    match globs.get_ref() {
        Globs::One(glob) => vec![(glob.as_str(), globs.span())],
        Globs::Many(list) => list.iter().map(|g| (g.get_ref().as_str(), g.span())).collect(),
    }
}

/// The globs of `points`, compiled into one set; a set that cannot be compiled (every
/// glob of it is also checked, and reported, by [`resolve`]) is reported and matches
/// nothing.
pub(super) fn compile(globs: &Spanned<Globs>, path: &str, check: &mut Checker) -> PointGlobs {
    let written: Vec<String> = written(globs).into_iter().map(|(g, _)| g.to_owned()).collect();
    match PointGlobs::new(written.clone()) {
        Ok(set) => set,
        Err(e) => {
            if written.iter().all(|g| globset::Glob::new(g).is_ok()) {
                check.report(globs.span(), path, format!("points globs cannot be compiled: {e}"));
            }
            PointGlobs::none()
        }
    }
}

/// One glob and the points it matched.
pub(super) struct Matched<'p> {
    /// The glob as written.
    pub glob: String,
    /// Where it was written.
    pub span: Range<usize>,
    /// The configured points it matches, in model order (empty when it is reported).
    pub points: Vec<&'p Point>,
}

/// Matches every glob of `globs` against `points`, reporting an empty list, a glob that
/// does not parse and a glob that matches nothing.
pub(super) fn resolve<'p>(
    globs: &Spanned<Globs>,
    points: &[&'p Point],
    path: &str,
    check: &mut Checker,
) -> Vec<Matched<'p>> {
    let written = written(globs);
    if written.is_empty() {
        check.report(
            globs.span(),
            path,
            "points is empty: name at least one point (or glob, like \"boiler.*\")",
        );
    }
    written
        .into_iter()
        .map(|(glob, span)| Matched {
            glob: glob.to_owned(),
            span: span.clone(),
            points: resolve_one(glob, span, points, path, check),
        })
        .collect()
}

/// The points one glob (written at `span`) matches, in model order; a glob that does
/// not parse or matches nothing is reported and matches nothing.
pub(super) fn resolve_one<'p>(
    glob: &str,
    span: Range<usize>,
    points: &[&'p Point],
    path: &str,
    check: &mut Checker,
) -> Vec<&'p Point> {
    match globset::Glob::new(glob) {
        Ok(g) => {
            let matcher = g.compile_matcher();
            let matched: Vec<&Point> = points.iter().copied().filter(|p| matcher.is_match(&p.name)).collect();
            if matched.is_empty() {
                check.report(
                    span,
                    path,
                    format!(
                        "points glob {glob:?} matches no configured point (full names are \"device.point\")"
                    ),
                );
            }
            matched
        }
        Err(e) => {
            check.report(span, path, format!("points glob {glob:?} is not valid: {}", e.kind()));
            Vec::new()
        }
    }
}
