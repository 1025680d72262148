//! Reading the configuration's files into the raw sections: the main file, the files its
//! `include` names, and the shape (serde) checks of every section and entry.
//!
//! ```toml
//! include = ["conf.d/*.toml", "templates/sdm630.toml"]
//!                            # optional, main file only: more files holding [[bus]],
//!                            #   [[device]], [[raw_device]], [[template]], [[peer]],
//!                            #   [[plc]] and [[tunnel]] entries. Relative to this file's
//!                            #   directory; `*`, `?` and `[...]` only in the file name
//!                            #   part; matches are read in sorted order, after the main
//!                            #   file. A pattern matching no file is an error.
//! ```
//!
//! [gateway], [link] and [server] stay in the main file, and an included file cannot
//! include others: the configuration is the main file plus one flat list of includes,
//! so there is no include cycle to detect and every singleton has one home.
//!
//! Every problem is reported, not just the first: each section and each entry of an
//! array of tables (`[[device]]`, and inside it each `[[device.point]]`) is deserialized
//! on its own. When an entry has a shape error (an unknown key, a wrong type, an unknown
//! enum value), the error is reported, the offending key is left out and the entry is
//! tried again, so every other key of it is still checked; a nested entry (a point)
//! missing a required key is left out of its device; a top-level entry missing one is
//! left out. Validation problems inside a repaired table are follow-ons of the default
//! that stood in for the bad key and are suppressed ([`Checker::quiet`]).
//!
//! Invariant: every span in the returned sections is in the checker's shared offset
//! space (each included file's spans are shifted by the file's base).

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, de::Error as _};
use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue, ValueDeserializer};

use super::{Checker, ConfigError, plain_types};
use super::{bus, device, gateway, http, link, peer, plc, rawdevice, server, template, tunnel};

/// The top-level keys, as serde's "expected one of" lists them.
const SECTIONS: &[&str] = &[
    "gateway",
    "bus",
    "device",
    "raw_device",
    "link",
    "peer",
    "server",
    "plc",
    "tunnel",
    "template",
    "http",
    "include",
];

/// The item of problems that concern no section (`include`, unknown top-level keys).
const TOP: &str = "top level";

/// The whole configuration as written, across its files.
#[derive(Debug, Default)]
pub(super) struct Raw {
    pub gateway: Option<gateway::RawGateway>,
    pub bus: Vec<bus::RawBus>,
    pub device: Vec<device::RawDevice>,
    pub raw_device: Vec<rawdevice::RawSerialDevice>,
    pub link: Option<link::RawLink>,
    pub peer: Vec<peer::RawPeer>,
    pub server: Option<server::RawServer>,
    pub plc: Vec<plc::RawPlc>,
    pub tunnel: Vec<tunnel::RawTunnel>,
    pub template: Vec<template::RawTemplate>,
    pub http: Option<http::RawHttp>,
}

/// Reads the main file's `text` and every file it includes (relative to `dir`) into
/// [`Raw`]. Fails only when the main file is not TOML; every other problem is in `check`.
pub(super) fn read(text: &str, origin: &str, dir: &Path, check: &mut Checker) -> Result<Raw, ConfigError> {
    let base = check.add_source(text, origin);
    let table = DeTable::parse(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_owned(),
        position: e.span().map(|span| check.position(base + span.start)),
        message: plain_types(e.message().trim_end()),
    })?;
    let mut raw = Raw::default();
    let includes = collect(&mut raw, shift(table, base), true, check);
    if raw.gateway.is_none() {
        check.report_always(base..base, TOP, "missing field `gateway`");
    }

    let main = std::path::absolute(dir.join(Path::new(origin).file_name().unwrap_or_default())).ok();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let shown_dir = Path::new(origin).parent().unwrap_or(Path::new(""));
    for pattern in &includes {
        for file in expand(pattern, dir, check) {
            let key = std::path::absolute(dir.join(&file)).unwrap_or_else(|_| dir.join(&file));
            if main.as_ref() == Some(&key) {
                let message = format!("include {:?} names the main file itself", pattern.get_ref());
                check.report(pattern.span(), TOP, message);
                continue;
            }
            // Overlapping patterns name a file once.
            if !seen.insert(key) {
                continue;
            }
            let shown = shown_dir.join(&file).display().to_string();
            let text = match std::fs::read_to_string(dir.join(&file)) {
                Ok(text) => text,
                Err(e) => {
                    check.report(pattern.span(), TOP, format!("include: cannot read {shown}: {e}"));
                    continue;
                }
            };
            let base = check.add_source(&text, &shown);
            match DeTable::parse(&text) {
                Ok(table) => {
                    collect(&mut raw, shift(table, base), false, check);
                }
                Err(e) => {
                    let at = base + e.span().map_or(0, |s| s.start);
                    check.report_always(at..at, TOP, plain_types(e.message().trim_end()));
                }
            }
        }
    }
    Ok(raw)
}

/// The files an `include` pattern names, relative to `dir`, sorted. Wildcards are
/// allowed in the file name only (`conf.d/*.toml`), which keeps the expansion one
/// directory listing, with no surprise from a recursive walk.
fn expand(pattern: &Spanned<String>, dir: &Path, check: &mut Checker) -> Vec<PathBuf> {
    let written = pattern.get_ref();
    let span = pattern.span();
    let wild = |s: &str| s.contains(['*', '?', '[', '{']);
    let path = Path::new(written);
    if written.trim().is_empty() || written.starts_with('~') {
        check.report(
            span,
            TOP,
            format!("include {written:?} is not a file name or pattern (\"conf.d/*.toml\")"),
        );
        return Vec::new();
    }
    let (parent, name) = (path.parent().unwrap_or(Path::new("")), path.file_name().unwrap_or_default());
    if wild(&parent.to_string_lossy()) {
        check.report(
            span,
            TOP,
            format!("include {written:?}: wildcards are allowed in the file name only, not in directories"),
        );
        return Vec::new();
    }
    let name = name.to_string_lossy();
    if !wild(&name) {
        if !dir.join(path).is_file() {
            check.report(
                span,
                TOP,
                format!("include {written:?}: no such file {}", dir.join(path).display()),
            );
            return Vec::new();
        }
        return vec![path.to_owned()];
    }
    let matcher = match globset::GlobBuilder::new(&name).literal_separator(true).build() {
        Ok(glob) => glob.compile_matcher(),
        Err(e) => {
            check.report(span, TOP, format!("include {written:?} is not a valid pattern: {}", e.kind()));
            return Vec::new();
        }
    };
    let listing = match std::fs::read_dir(dir.join(parent)) {
        Ok(listing) => listing,
        Err(e) => {
            check.report(
                span,
                TOP,
                format!("include {written:?}: cannot list {}: {e}", dir.join(parent).display()),
            );
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = listing
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .map(|entry| entry.file_name())
        .filter(|file| matcher.is_match(file))
        .map(|file| parent.join(file))
        .collect();
    files.sort();
    if files.is_empty() {
        check.report(
            span,
            TOP,
            format!("include {written:?} matches no file in {}", dir.join(parent).display()),
        );
    }
    files
}

/// Deserializes every section of one file's top-level `table` into `raw`; returns the
/// `include` patterns (main file only).
fn collect(
    raw: &mut Raw,
    table: Spanned<DeValue<'_>>,
    main: bool,
    check: &mut Checker,
) -> Vec<Spanned<String>> {
    let mut includes = Vec::new();
    let DeValue::Table(table) = table.into_inner() else {
        return includes;
    };
    for (key, value) in table {
        let name = key.get_ref().as_ref();
        let only_main = matches!(name, "gateway" | "link" | "server" | "http" | "include");
        if only_main && !main {
            let message = if name == "include" {
                "include is only read in the main configuration file: an included file cannot include others"
                    .to_owned()
            } else {
                format!("[{name}] belongs in the main configuration file, not in an included one")
            };
            check.report_always(key.span(), TOP, message);
            continue;
        }
        match name {
            "gateway" => raw.gateway = single(value, "gateway", check),
            "link" => raw.link = single(value, "link", check),
            "server" => raw.server = single(value, "server", check),
            "http" => raw.http = single(value, "http", check),
            "include" => includes = single(value, TOP, check).unwrap_or_default(),
            "bus" => raw.bus.extend(entries(value, name, check)),
            "device" => raw.device.extend(entries(value, name, check)),
            "raw_device" => raw.raw_device.extend(entries(value, name, check)),
            "peer" => raw.peer.extend(entries(value, name, check)),
            "plc" => raw.plc.extend(entries(value, name, check)),
            "tunnel" => raw.tunnel.extend(entries(value, name, check)),
            "template" => raw.template.extend(entries(value, name, check)),
            _ => {
                let e = toml::de::Error::unknown_field(name, SECTIONS);
                check.report_always(key.span(), TOP, plain_types(e.message()));
            }
        }
    }
    includes
}

/// A section that is one table (`[gateway]`).
fn single<T: DeserializeOwned>(value: Spanned<DeValue<'_>>, item: &str, check: &mut Checker) -> Option<T> {
    lenient(value, item, check)
}

/// An array of tables (`[[device]]`): each entry on its own, so one bad entry does not
/// hide the others.
fn entries<T: DeserializeOwned>(value: Spanned<DeValue<'_>>, key: &str, check: &mut Checker) -> Vec<T> {
    if !matches!(value.get_ref(), DeValue::Array(_)) {
        // Not an array (`[device]` for `[[device]]`): serde says so in its words.
        let span = value.span();
        if let Err(e) = Vec::<T>::deserialize(ValueDeserializer::from(value)) {
            check.report_always(span, key, plain_types(e.message().trim_end()));
        }
        return Vec::new();
    }
    let DeValue::Array(array) = value.into_inner() else { return Vec::new() };
    array
        .into_iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            let item = entry_item(key, &entry, i);
            lenient(entry, &item, check)
        })
        .collect()
}

/// `device "boiler"`, or `send[0]` for entries without a name.
fn entry_item(key: &str, entry: &Spanned<DeValue<'_>>, index: usize) -> String {
    match entry.get_ref().get("name").and_then(|n| n.get_ref().as_str()) {
        Some(name) => format!("{key} {name:?}"),
        None => format!("{key}[{index}]"),
    }
}

/// Deserializes `value`, reporting each shape error and leaving out what it concerns
/// until the rest deserializes (see the module header). `None`: the value as a whole
/// is unusable (a required key is missing or bad).
fn lenient<T: DeserializeOwned>(
    mut value: Spanned<DeValue<'_>>,
    item: &str,
    check: &mut Checker,
) -> Option<T> {
    // Each round removes a key or an entry, so this ends; the bound is a safety net.
    for _ in 0..256 {
        let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(t) => return Some(t),
            Err(e) => e,
        };
        let at = e.span().unwrap_or_else(|| value.span());
        let mut path = item.to_owned();
        let outcome = prune(&mut value, at.start, &mut path);
        // A key we left out, missed in its table: not the user's problem.
        let follow_on = e.message().starts_with("missing field") && check.is_quiet(at.start);
        if !follow_on {
            let mut message = plain_types(e.message().trim_end());
            if message.starts_with("unknown field `include`") {
                // TOML puts a key below a [header] into that table.
                message.push_str(": `include` goes at the top of the main file, before the first [section]");
            }
            check.report_always(at, &path, message);
        }
        match outcome {
            Pruned::Key(extent) => check.quiet.push(extent),
            Pruned::Entry => {}
            Pruned::Whole | Pruned::Nothing => return None,
        }
    }
    None
}

/// What [`prune`] left out.
enum Pruned {
    /// A key of a table, whose extent is given.
    Key(Range<usize>),
    /// A nested entry of an array of tables.
    Entry,
    /// The value itself is what is wrong: the caller must drop it.
    Whole,
    /// The offset is not inside the value.
    Nothing,
}

/// Leaves out the key or nested entry of `value` that the shape error at offset `at`
/// concerns, extending `path` with the nested entries it passes (`point "p"`).
fn prune(value: &mut Spanned<DeValue<'_>>, at: usize, path: &mut String) -> Pruned {
    let table_extent = extent(value);
    let own = own_extent(value);
    let DeValue::Table(table) = value.get_mut() else {
        return if table_extent.contains(&at) || value.span().start == at {
            Pruned::Whole
        } else {
            Pruned::Nothing
        };
    };
    let mut found: Option<(String, Option<usize>)> = None;
    for (key, v) in table.iter() {
        if key.span().contains(&at) {
            found = Some((key.get_ref().to_string(), None));
            break;
        }
        if !extent(v).contains(&at) {
            continue;
        }
        let element = match v.get_ref() {
            DeValue::Array(a) => a.iter().position(|e| e.get_ref().is_table() && extent(e).contains(&at)),
            _ => None,
        };
        found = Some((key.get_ref().to_string(), element));
        break;
    }
    let Some((key, element)) = found else {
        return if table_extent.contains(&at) { Pruned::Whole } else { Pruned::Nothing };
    };
    let nested = match (element, table.get_mut(key.as_str())) {
        (Some(i), Some(v)) => match v.get_mut() {
            DeValue::Array(array) => Some((i, array)),
            _ => None,
        },
        (None, Some(v)) if v.get_ref().is_table() => {
            path.push_str(&format!(" {key}"));
            return match prune(v, at, path) {
                Pruned::Whole => {
                    table.remove(key.as_str());
                    Pruned::Key(own)
                }
                other => other,
            };
        }
        _ => None,
    };
    if let Some((i, array)) = nested {
        let Some(entry) = array.get_mut(i) else { return Pruned::Nothing };
        path.push_str(&format!(" {}", entry_item(&key, entry, i)));
        return match prune(entry, at, path) {
            Pruned::Whole => {
                let kept: DeArray<'_> = std::mem::replace(array, std::iter::empty().collect())
                    .into_iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, e)| e)
                    .collect();
                *array = kept;
                Pruned::Entry
            }
            other => other,
        };
    }
    table.remove(key.as_str());
    Pruned::Key(own)
}

/// The bytes a value covers: its own span and those of everything inside it (a table's
/// span is only its `[header]`; its keys follow it).
fn extent(value: &Spanned<DeValue<'_>>) -> Range<usize> {
    let mut range = value.span();
    let mut widen = |r: Range<usize>| {
        range.start = range.start.min(r.start);
        range.end = range.end.max(r.end);
    };
    match value.get_ref() {
        DeValue::Table(table) => {
            for (key, v) in table.iter() {
                widen(key.span());
                widen(extent(v));
            }
        }
        DeValue::Array(array) => array.iter().for_each(|v| widen(extent(v))),
        _ => {}
    }
    range
}

/// The bytes of a table's own keys: its extent without the tables nested in it
/// (`[[device.point]]` entries are tables of their own, whose problems are not
/// follow-ons of a repair in the device).
fn own_extent(value: &Spanned<DeValue<'_>>) -> Range<usize> {
    let mut range = value.span();
    if let DeValue::Table(table) = value.get_ref() {
        for (key, v) in table.iter() {
            let nested = match v.get_ref() {
                DeValue::Table(_) => true,
                DeValue::Array(a) => a.iter().any(|e| e.get_ref().is_table()),
                _ => false,
            };
            if !nested {
                let r = extent(v);
                range.start = range.start.min(key.span().start).min(r.start);
                range.end = range.end.max(key.span().end).max(r.end);
            }
        }
    }
    range
}

/// Moves every span of a parsed file by `base`, into the checker's shared offset space.
fn shift(value: Spanned<DeTable<'_>>, base: usize) -> Spanned<DeValue<'_>> {
    let span = value.span();
    shift_value(Spanned::new(span, DeValue::Table(value.into_inner())), base)
}

fn shift_value(value: Spanned<DeValue<'_>>, base: usize) -> Spanned<DeValue<'_>> {
    let span = value.span();
    let moved = span.start + base..span.end + base;
    let inner = match value.into_inner() {
        DeValue::Table(table) => DeValue::Table(
            table
                .into_iter()
                .map(|(k, v)| {
                    let s = k.span();
                    (Spanned::new(s.start + base..s.end + base, k.into_inner()), shift_value(v, base))
                })
                .collect(),
        ),
        DeValue::Array(array) => DeValue::Array(array.into_iter().map(|v| shift_value(v, base)).collect()),
        other => other,
    };
    Spanned::new(moved, inner)
}
