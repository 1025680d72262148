//! The reference docs, checked against the parsers so they cannot drift.
//!
//! The keys are not listed by hand: the parsers say which they accept. Every raw config
//! struct denies unknown fields, and serde's error for an unknown key lists the keys the
//! struct expects (``unknown field `zzz`, expected one of `a`, `b` ``). So a probe puts a
//! bogus key into a table and reads the list out of the error. The sections themselves
//! are found the same way: a key of a section is a sub-section when a bogus key inside it
//! (`[[device.point]] zzz = 1`, `[plc.watchdog] zzz = 1`) is refused as an unknown field
//! of a table of its own. Starting from the file's top level this walks every section,
//! and a key or section added to the parser shows up here without touching this file.
//!
//! `docs/CONFIGURATION.md` must then have one `## ` heading per section (`` ## `[[bus]]` ``)
//! whose table rows name exactly that section's keys; `docs/SIMULATOR.md` must show every
//! key of the simulation file in its TOML examples.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The bogus key every probe adds.
const BOGUS: &str = "zzz";

/// One table of a TOML file: its dotted path and whether it is an array of tables.
#[derive(Clone, Debug)]
struct Segment {
    name: String,
    array: bool,
}

/// The TOML that puts `zzz = 1` into the table at `path` (each parent opened once).
fn probe_text(path: &[Segment]) -> String {
    let mut text = String::new();
    for (i, _) in path.iter().enumerate() {
        let dotted = path[..=i].iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(".");
        if path[i].array {
            text.push_str(&format!("[[{dotted}]]\n"));
        } else {
            text.push_str(&format!("[{dotted}]\n"));
        }
    }
    text.push_str(&format!("{BOGUS} = 1\n"));
    text
}

/// The keys serde says the table expects, when `message` is the unknown-field error for
/// the bogus key; `None` for any other error.
fn expected_keys(message: &str) -> Option<BTreeSet<String>> {
    let unknown = format!("unknown field `{BOGUS}`");
    let at = message.find(&unknown)?;
    let rest = &message[at + unknown.len()..];
    let line = rest.lines().next().unwrap_or("");
    if line.contains("there are no fields") {
        return Some(BTreeSet::new());
    }
    let list = line.split_once("expected")?.1;
    Some(list.split('`').skip(1).step_by(2).map(str::to_owned).collect())
}

/// Walks every table a parser accepts, from the top level down: the map from each
/// section's dotted name (`""` for the top level) to its keys, and whether it is an
/// array of tables. `refusal` parses a text and returns its error message.
fn walk(refusal: &dyn Fn(&str) -> Option<String>) -> BTreeMap<String, (bool, BTreeSet<String>)> {
    let mut found = BTreeMap::new();
    let mut queue: Vec<Vec<Segment>> = vec![Vec::new()];
    while let Some(path) = queue.pop() {
        let text = probe_text(&path);
        let message = refusal(&text).unwrap_or_else(|| panic!("the probe was accepted:\n{text}"));
        let keys = expected_keys(&message)
            .unwrap_or_else(|| panic!("no unknown-field error for the probe\n{text}\ngot: {message}"));
        let dotted = path.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(".");
        for key in &keys {
            for array in [true, false] {
                let mut child = path.clone();
                child.push(Segment { name: key.clone(), array });
                let child_text = probe_text(&child);
                if refusal(&child_text).as_deref().and_then(expected_keys).is_some() {
                    queue.push(child);
                    break;
                }
            }
        }
        let array = path.last().is_some_and(|s| s.array);
        found.insert(dotted, (array, keys));
    }
    found
}

fn read_doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The sections of docs/CONFIGURATION.md: each `` ## `[name]` `` or `` ## `[[name]]` ``
/// heading, with the keys its table rows name in their first column.
fn documented_sections(doc: &str) -> BTreeMap<String, (bool, BTreeSet<String>)> {
    let mut sections = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            current = None;
            let heading = heading.trim().trim_matches('`');
            if let Some(name) = heading.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
                current = Some(name.to_owned());
                sections.insert(name.to_owned(), (true, BTreeSet::new()));
            } else if let Some(name) = heading.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                current = Some(name.to_owned());
                sections.insert(name.to_owned(), (false, BTreeSet::new()));
            }
            continue;
        }
        let (Some(section), Some(row)) = (&current, line.strip_prefix("| `")) else {
            continue;
        };
        let key = row.split('`').next().unwrap_or("").to_owned();
        if let Some((_, keys)) = sections.get_mut(section) {
            keys.insert(key);
        }
    }
    sections
}

/// The keys the rows under the `## Top level` heading name: top-level keys that are not
/// sections (`include`).
fn documented_top_level_keys(doc: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut inside = false;
    for line in doc.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            inside = heading.starts_with("Top level");
        } else if let Some(row) = line.strip_prefix("| `").filter(|_| inside) {
            keys.insert(row.split('`').next().unwrap_or("").to_owned());
        }
    }
    keys
}

fn gateway_config_refusal(text: &str) -> Option<String> {
    m2m_gateway::config::parse(text, "probe.toml").err().map(|e| e.to_string())
}

#[test]
fn every_config_key_the_parser_accepts_is_documented_and_no_other() {
    let parsed = walk(&gateway_config_refusal);
    let documented = documented_sections(&read_doc("CONFIGURATION.md"));

    // The top level's keys are the sections, each with its heading, and plain keys
    // (`include`), each a row under the "## Top level" heading.
    let (_, top) = parsed.get("").expect("the top level was probed");
    let (top_sections, top_plain): (BTreeSet<String>, BTreeSet<String>) =
        top.iter().cloned().partition(|key| parsed.contains_key(key));
    let documented_top: BTreeSet<String> = documented.keys().filter(|k| !k.contains('.')).cloned().collect();
    assert_eq!(
        top_sections, documented_top,
        "top-level sections: parser (left) vs docs/CONFIGURATION.md headings (right)"
    );
    assert_eq!(
        top_plain,
        documented_top_level_keys(&read_doc("CONFIGURATION.md")),
        "top-level keys: parser (left) vs rows under docs/CONFIGURATION.md's \"## Top level\" heading (right)"
    );

    let sections: BTreeMap<_, _> = parsed.into_iter().filter(|(name, _)| !name.is_empty()).collect();
    // 21 today: gateway, bus, device(.point), template(.point), raw_device(.point,
    // .command), link, peer(.send, .grant, .writeback), server(.unit, .grant),
    // plc(.watchdog, .map), tunnel.
    assert!(sections.len() >= 21, "only {} sections found: {:?}", sections.len(), sections.keys());
    assert!(sections.contains_key("plc.watchdog") && sections.contains_key("raw_device.command"));

    let mut problems = Vec::new();
    for (name, (array, keys)) in &sections {
        let shown = if *array { format!("[[{name}]]") } else { format!("[{name}]") };
        let Some((doc_array, doc_keys)) = documented.get(name) else {
            problems.push(format!("{shown}: no `## `{shown}`` heading in docs/CONFIGURATION.md"));
            continue;
        };
        if doc_array != array {
            problems.push(format!("{name}: the heading's brackets are wrong, the parser takes {shown}"));
        }
        for key in keys.difference(doc_keys) {
            problems.push(format!("{shown}: key `{key}` is accepted but not documented"));
        }
        for key in doc_keys.difference(keys) {
            problems.push(format!("{shown}: key `{key}` is documented but not accepted"));
        }
    }
    for name in documented.keys().filter(|n| !sections.contains_key(*n)) {
        problems.push(format!("docs/CONFIGURATION.md documents `{name}`, which the parser does not accept"));
    }
    assert!(
        problems.is_empty(),
        "docs/CONFIGURATION.md is out of step with src/config:\n{}",
        problems.join("\n")
    );
    assert_eq!(sections.len(), documented.len(), "sections checked");
}

/// Every key of the simulation file (`m2m-gateway simulate --config`) appears as
/// `key = ...` in a TOML block of docs/SIMULATOR.md, and each section's header too.
#[test]
fn every_simulator_key_is_in_the_simulator_doc() {
    let refusal =
        |text: &str| toml::from_str::<m2m_gateway::sim::SimConfig>(text).err().map(|e| e.to_string());
    let parsed = walk(&refusal);
    // The top level, [line], [[unit]], [[unit.register]], [[raw]].
    assert!(parsed.len() >= 5, "only {} simulator tables found: {:?}", parsed.len(), parsed.keys());

    let doc = read_doc("SIMULATOR.md");
    let mut in_toml = false;
    let mut headers = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for line in doc.lines() {
        if line.starts_with("```") {
            in_toml = line == "```toml";
            continue;
        }
        if !in_toml {
            continue;
        }
        let line = line.trim();
        if line.starts_with('[') {
            headers.insert(line.split('#').next().unwrap_or("").trim().to_owned());
        } else if let Some((key, _)) = line.split_once('=') {
            keys.insert(key.trim().to_owned());
        }
    }
    let mut problems = Vec::new();
    for (name, (array, section_keys)) in &parsed {
        if !name.is_empty() {
            let header = if *array { format!("[[{name}]]") } else { format!("[{name}]") };
            if !headers.contains(&header) {
                problems.push(format!("section {header} is not shown"));
            }
        }
        for key in section_keys {
            // Sub-tables are shown by their headers.
            let sub = if name.is_empty() { key.clone() } else { format!("{name}.{key}") };
            if !parsed.contains_key(&sub) && !keys.contains(key) {
                problems.push(format!("key `{key}` of [{name}] is not shown"));
            }
        }
    }
    assert!(problems.is_empty(), "docs/SIMULATOR.md is out of step with src/sim:\n{}", problems.join("\n"));
}

#[test]
fn the_probe_reads_both_shapes_of_serde_error() {
    let many = "unknown field `zzz`, expected one of `name`, `bus`, `unit`";
    assert_eq!(expected_keys(many), Some(["bus", "name", "unit"].map(String::from).into()));
    let one = "probe.toml:2:1: unknown field `zzz`, expected `points`";
    assert_eq!(expected_keys(one), Some(["points"].map(String::from).into()));
    assert_eq!(expected_keys("invalid type: map, expected a string"), None);
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as dashes.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every relative link of README.md and docs/*.md names a file that exists, and an
/// `#anchor` names a heading of that file, so moving or renaming a section breaks a test
/// instead of a reader's click.
#[test]
fn links_between_the_docs_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    assert!(pages.len() >= 8, "README and the docs: {pages:?}");
    let mut problems = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("read page");
        for (_, rest) in text.match_indices("](").map(|(i, _)| text.split_at(i + 2)) {
            let target = rest.split(')').next().unwrap_or("");
            if target.contains("://") || target.contains(' ') {
                continue;
            }
            checked += 1;
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() { page.clone() } else { page.parent().expect("dir").join(file) };
            if !path.exists() {
                problems.push(format!("{}: link to {target}: no such file", page.display()));
                continue;
            }
            if !fragment.is_empty() {
                let linked = std::fs::read_to_string(&path).unwrap_or_default();
                let found = linked
                    .lines()
                    .filter_map(|l| l.strip_prefix('#').map(|h| h.trim_start_matches('#')))
                    .any(|h| anchor(h) == fragment);
                if !found {
                    problems.push(format!("{}: link to {target}: no such heading", page.display()));
                }
            }
        }
    }
    assert!(checked >= 50, "only {checked} links checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The test command README.md gives is the one CI runs (`.ci/run`).
#[test]
fn the_readme_test_command_is_what_ci_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let ci_test =
        ci.lines().rev().find(|l| l.trim_start().starts_with("cargo test")).expect("a cargo test line");
    let readme_test = readme
        .lines()
        .find(|l| l.starts_with("cargo test"))
        .and_then(|l| l.split('#').next())
        .expect("README gives a test command");
    assert_eq!(readme_test.trim(), ci_test.trim());
    assert!(readme.contains("cargo run --release -- demo"), "README gives the demo command");
}
