//! The source tree's layering, kept true: every top-level module of `src/` sits in a layer
//! (the table in `src/lib.rs`) and may name only modules of lower layers, or itself. A
//! module that reaches up (or sideways, to a module of its own layer) is an import cycle
//! waiting to happen; this test names the file and line that does it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Bottom up, as in `src/lib.rs`.
const LAYERS: &[&[&str]] = &[
    &["point", "backoff", "health", "loglimit", "sockets"],
    &["serial", "image"],
    &["model"],
    &["config", "bus", "spool"],
    &["poll", "server", "plc", "sim"],
    &["writer"],
    &["link"],
    &["http"],
    &["gateway", "service"],
    &["tools", "fuzz_entry"],
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/bus.rs` and `src/bus/pass.rs` are `bus`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component").as_os_str().to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Every `crate::name` named in code (comments skipped), with its line number.
fn named_modules(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.push((n + 1, name));
            }
            rest = after;
        }
    }
    out
}

#[test]
fn every_module_names_only_modules_below_it() {
    let layer: HashMap<&str, usize> =
        LAYERS.iter().enumerate().flat_map(|(i, mods)| mods.iter().map(move |m| (*m, i))).collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut checked = 0;
    let mut problems = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" || module == "main" {
            continue; // the crate root declares everything; main is the top
        }
        let Some(&own) = layer.get(module.as_str()) else {
            problems.push(format!("{}: module `{module}` is in no layer of tests/layers.rs", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("source is readable");
        for (line, named) in named_modules(&text) {
            checked += 1;
            if named == module {
                continue;
            }
            match layer.get(named.as_str()) {
                Some(&theirs) if theirs < own => {}
                Some(&theirs) => problems.push(format!(
                    "{}:{line}: `{module}` (layer {}) names `{named}` (layer {})",
                    file.display(),
                    own + 1,
                    theirs + 1
                )),
                None => {
                    problems.push(format!("{}:{line}: names `crate::{named}`, in no layer", file.display()))
                }
            }
        }
    }
    assert!(files.len() > 40 && checked > 100, "checked {checked} names in {} files", files.len());
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}
