//! The configuration file: raw serde types for the TOML a user writes, and the one
//! validation step that turns them into a [`Model`].
//!
//! Two layers. The raw types (one small file per top-level section, under `config/`)
//! mirror the TOML exactly, reject unknown keys (`deny_unknown_fields`, no `flatten`) and
//! keep the source span of every value validation may complain about (`toml::Spanned`).
//! Validation then resolves every default and checks every rule, collecting *all*
//! problems before it gives up, each with `file:line:col`, the item it concerns
//! (`device "boiler" point "temperature"`) and a lowercase message.
//!
//! Invariants: a [`Model`] is returned only when no problem was found; validation never
//! panics on any input; every problem carries a position inside the file.
//!
//! The shipped `gateway.toml` at the repository root is the commented reference of the
//! format; each file under `config/` opens with its section's keys and defaults.
//!
//! Relative paths in the file (`[link] identity`, `data_dir`) resolve against the
//! directory of the configuration file ([`load`]), or the directory given to
//! [`parse_in`]; [`parse`] leaves them relative to the working directory.
//!
//! The files: [`document`] reads the main file and the files its `include` names, and
//! deserializes each section and each `[[...]]` entry on its own, so that a shape error
//! (unknown key, wrong type) in one does not hide the problems of the others. With
//! [`load_for_run`], `host` then checks what `run` needs from the machine (identity,
//! data directory, spool files) while every value's position is still known.
//!
//! Adding a top-level section (`[server]`, ...) is a new file under `config/` with its
//! raw type and its `validate`, one field in `document::Raw` (and its name in
//! `document::SECTIONS` and `document::collect`) and one call in `build`.

mod bus;
mod device;
mod document;
pub mod duration;
mod gateway;
mod globs;
mod host;
pub mod http;
mod link;
mod peer;
mod plc;
mod point;
mod rawdevice;
mod regmap;
mod send;
mod server;
mod template;
mod tunnel;
mod write;

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

pub use host::Machine;

use crate::model::Model;
use duration::DurationError;

pub use duration::MAX_DURATION;

/// Everything that can go wrong loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The text is not valid TOML, or does not have the expected shape (unknown key,
    /// missing key, wrong type, unknown enum value). Parsing stops at the first one.
    #[error("{}: {message}", Location { origin, position: *position })]
    Syntax {
        /// Where the text came from (a file name), as given to [`parse`].
        origin: String,
        /// 1-based line and column, when the TOML parser knows them.
        position: Option<(usize, usize)>,
        /// What is wrong.
        message: String,
    },
    /// The file is well-formed but breaks rules; every problem found is listed.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The process exit code for a configuration error (2, like a usage error).
    pub fn exit_code(&self) -> i32 {
        2
    }
}

/// One rule a configuration breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the text came from (a file name), as given to [`parse`].
    pub origin: String,
    /// 1-based line of the offending value.
    pub line: usize,
    /// 1-based column (in characters) of the offending value.
    pub col: usize,
    /// The item concerned, e.g. `device "boiler" point "temperature"`.
    pub path: String,
    /// What is wrong, lowercase, naming the key.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}: {}", self.origin, self.line, self.col, self.path, self.message)
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n")
}

/// `file:line:col` or just `file` when the position is unknown.
struct Location<'a> {
    origin: &'a str,
    position: Option<(usize, usize)>,
}

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}", self.origin),
            None => write!(f, "{}", self.origin),
        }
    }
}

/// Reads and validates the configuration file at `path` (and the files it includes);
/// relative paths inside it resolve against the file's directory (made absolute, so they
/// survive a `chdir`). Checks the text only: see [`load_for_run`] for the machine.
pub fn load(path: &Path) -> Result<Model, ConfigError> {
    load_with(path, None)
}

/// [`load`], then everything `run` needs from the machine short of opening devices and
/// sockets: the identity files exist, are readable and match, `data_dir` and the spool
/// directories are writable or can be created, existing spool files open. `check` and
/// `run` both use it (with `gateway::Preflight`), so `check` accepts exactly what `run`
/// will start with.
pub fn load_for_run(path: &Path, machine: &dyn Machine) -> Result<Model, ConfigError> {
    load_with(path, Some(machine))
}

fn load_with(path: &Path, machine: Option<&dyn Machine>) -> Result<Model, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let dir = absolute.parent().unwrap_or(Path::new(""));
    build(&text, &path.display().to_string(), dir, machine)
}

/// Parses and validates configuration `text`; `origin` (usually the file name) prefixes
/// every error position. Relative paths in the text stay relative (to the working
/// directory); use [`parse_in`] to anchor them.
pub fn parse(text: &str, origin: &str) -> Result<Model, ConfigError> {
    parse_in(text, origin, Path::new(""))
}

/// Like [`parse`], with relative paths in the text (`[link] identity`, `data_dir`,
/// `include`) resolved against `dir`, the directory the text was read from.
pub fn parse_in(text: &str, origin: &str, dir: &Path) -> Result<Model, ConfigError> {
    build(text, origin, dir, None)
}

fn build(text: &str, origin: &str, dir: &Path, machine: Option<&dyn Machine>) -> Result<Model, ConfigError> {
    let mut check = Checker::default();
    let raw = document::read(text, origin, dir, &mut check)?;

    let gateway = match &raw.gateway {
        Some(g) => gateway::validate(g, &mut check),
        // Reported by `document::read`; a stand-in lets every other section be checked.
        None => crate::model::Gateway {
            name: String::new(),
            summary_interval: Duration::from_secs(60),
            worker_threads: None,
            log_format: Default::default(),
        },
    };
    let mut buses = bus::validate(&raw.bus, &mut check);
    let templates = template::validate(&raw.template, &mut check);
    device::validate(&raw.device, &templates, &mut buses, &mut check);
    rawdevice::validate(&raw.raw_device, &mut buses, &mut check);
    let mut links = peer::validate(raw.link.as_ref(), &raw.peer, &gateway.name, &buses, dir, &mut check);
    tunnel::validate(&raw.tunnel, links.as_mut(), &buses, &mut check);
    let server = raw.server.as_ref().map(|s| server::validate(s, &buses, &mut check));
    let plcs = {
        let points: Vec<&crate::model::Point> =
            buses.iter().flat_map(|b| &b.devices).flat_map(|d| &d.points).collect();
        let data_dir = links.as_ref().map_or(dir, |l| l.data_dir.as_path());
        let taken: Vec<PathBuf> = links.iter().flat_map(|l| &l.peers).map(|p| p.spool.clone()).collect();
        plc::validate(&raw.plc, &points, data_dir, &taken, &mut check)
    };
    let http = {
        let points: Vec<&crate::model::Point> =
            buses.iter().flat_map(|b| &b.devices).flat_map(|d| &d.points).collect();
        http::validate(raw.http.as_ref(), &points, dir, &mut check)
    };
    if let Some(machine) = machine {
        host::check(&raw, links.as_ref(), &plcs, machine, &mut check);
    }

    // Sections are checked one after the other (overlaps after all points of a device);
    // list the problems as the reader meets them: by file, then line.
    check.problems.sort_by_key(|(offset, _)| *offset);
    if check.problems.is_empty() {
        Ok(Model { gateway, buses, links, server, plcs, http })
    } else {
        Err(ConfigError::Invalid(check.problems.into_iter().map(|(_, p)| p).collect()))
    }
}

/// Serde names the Rust type it wanted (`expected i64`); users wrote TOML, so say so in
/// TOML's words.
fn plain_types(message: &str) -> String {
    message.replace("expected i64", "expected an integer").replace("expected f64", "expected a number")
}

/// Collects problems while a configuration is validated, and turns byte offsets into
/// file, line and column. The field helpers report a problem and return a fallback value,
/// so validation goes on and finds every other problem too; the fallback never reaches a
/// model because any problem fails the whole load.
///
/// Every file of a configuration (the main one and its includes) has its own range of
/// offsets: file `n` starts where file `n - 1` ends, plus one. Spans in the raw sections
/// are in that shared space ([`document`] shifts them), so one offset names one place.
#[derive(Default)]
struct Checker {
    sources: Vec<Source>,
    /// Problems with the offset they were found at, for sorting.
    problems: Vec<(usize, Problem)>,
    /// Spans of tables a shape error was repaired in (a key left out): problems found
    /// there are follow-ons of the reported one (a default stood in), not the user's.
    quiet: Vec<Range<usize>>,
}

/// One file of the configuration.
struct Source {
    origin: String,
    /// Offset of the file's first byte in the shared space.
    base: usize,
    text: String,
    /// Byte offset (within the file) at which each line starts.
    line_starts: Vec<usize>,
}

impl Checker {
    #[cfg(test)]
    fn new(text: &str, origin: &str) -> Self {
        let mut check = Checker::default();
        check.add_source(text, origin);
        check
    }

    /// Registers a file; returns the offset its spans must be shifted by.
    fn add_source(&mut self, text: &str, origin: &str) -> usize {
        let base = self.sources.last().map_or(0, |s| s.base + s.text.len() + 1);
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        self.sources.push(Source { origin: origin.to_owned(), base, text: text.to_owned(), line_starts });
        base
    }

    /// The file holding `offset`, and the offset within it.
    fn source(&self, offset: usize) -> Option<(&Source, usize)> {
        let i = self.sources.partition_point(|s| s.base <= offset).checked_sub(1)?;
        self.sources.get(i).map(|s| (s, offset - s.base))
    }

    /// 1-based line and column (in characters) of `offset`, in its file.
    fn position(&self, offset: usize) -> (usize, usize) {
        let Some((source, offset)) = self.source(offset) else {
            return (1, 1);
        };
        let offset = offset.min(source.text.len());
        let line = source.line_starts.partition_point(|&start| start <= offset);
        let start = source.line_starts.get(line.wrapping_sub(1)).copied().unwrap_or(0);
        let col = source.text.get(start..offset).map_or(offset - start, |s| s.chars().count());
        (line.max(1), col + 1)
    }

    /// The file name of `offset`.
    fn origin(&self, offset: usize) -> &str {
        self.source(offset).map_or("", |(s, _)| s.origin.as_str())
    }

    /// Records a problem with the value at `span`.
    fn report(&mut self, span: Range<usize>, path: &str, message: impl Into<String>) {
        if self.is_quiet(span.start) {
            return;
        }
        self.report_always(span, path, message);
    }

    /// Records a problem even inside a repaired table (shape errors themselves). The
    /// same message at the same place is said once (a template's problem, met again in
    /// each device made from it).
    fn report_always(&mut self, span: Range<usize>, path: &str, message: impl Into<String>) {
        let message = message.into();
        if self.problems.iter().any(|(at, p)| *at == span.start && p.message == message) {
            return;
        }
        let (line, col) = self.position(span.start);
        let problem =
            Problem { origin: self.origin(span.start).to_owned(), line, col, path: path.to_owned(), message };
        self.problems.push((span.start, problem));
    }

    fn is_quiet(&self, offset: usize) -> bool {
        self.quiet.iter().any(|q| q.contains(&offset))
    }

    /// Checks a bus/device/point name: a letter or digit, then letters, digits, `_`,
    /// `-`; at most 64 characters. Dots and slashes are kept out because they separate
    /// the parts of a full point name (`site-a/boiler.temperature`).
    fn name(&mut self, name: &Spanned<String>, path: &str) {
        let ok = is_name(name.get_ref(), |c| c.is_ascii_alphanumeric());
        if !ok {
            self.report(
                name.span(),
                path,
                format!(
                    "name {:?} is not valid: use 1 to 64 letters, digits, '_' and '-', starting with a letter or digit",
                    name.get_ref()
                ),
            );
        }
    }

    /// An integer key that must lie in `range`; `default` when absent or wrong.
    fn int<T>(
        &mut self,
        value: Option<&Spanned<i64>>,
        default: T,
        range: RangeInclusive<i64>,
        path: &str,
        key: &str,
    ) -> T
    where
        T: TryFrom<i64> + Copy,
    {
        let Some(value) = value else {
            return default;
        };
        let v = *value.get_ref();
        match T::try_from(v) {
            Ok(t) if range.contains(&v) => t,
            _ => {
                self.report(
                    value.span(),
                    path,
                    format!("{key} {v} is out of range {}..={}", range.start(), range.end()),
                );
                default
            }
        }
    }

    /// A duration key (`"200ms"`, `"1s"`, `"1m 30s"`) of at least `min` and at most
    /// [`MAX_DURATION`]; `default` when absent or wrong.
    fn duration(
        &mut self,
        value: Option<&Spanned<String>>,
        default: Duration,
        min: Duration,
        path: &str,
        key: &str,
    ) -> Duration {
        self.duration_within(value, default, min..=MAX_DURATION, path, key)
    }

    /// A duration key that must lie in `range`; `default` when absent or wrong.
    fn duration_within(
        &mut self,
        value: Option<&Spanned<String>>,
        default: Duration,
        range: RangeInclusive<Duration>,
        path: &str,
        key: &str,
    ) -> Duration {
        let Some(value) = value else {
            return default;
        };
        match duration::parse(value.get_ref(), range) {
            Ok(d) => d,
            Err(e @ (DurationError::Above { .. } | DurationError::Below { .. })) => {
                self.report(value.span(), path, format!("{key} {e}"));
                default
            }
            Err(e) => {
                self.report(
                    value.span(),
                    path,
                    format!("{key} {:?} is not a duration (like \"500ms\" or \"2s\"): {e}", value.get_ref()),
                );
                default
            }
        }
    }
}

/// True if `s` is 1..=64 characters: `first(c)` for the first, then letters, digits,
/// `_` or `-`.
fn is_name(s: &str, first: impl Fn(char) -> bool) -> bool {
    let mut chars = s.chars();
    let Some(c) = chars.next() else {
        return false;
    };
    s.len() <= 64 && first(c) && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A finite number key; `default` when absent or wrong. `range` bounds it, and `what`
/// describes the range in the message (`"at least 0"`).
fn number(
    check: &mut Checker,
    value: Option<&Spanned<f64>>,
    default: f64,
    range: RangeInclusive<f64>,
    what: &str,
    path: &str,
    key: &str,
) -> f64 {
    let Some(value) = value else {
        return default;
    };
    let v = *value.get_ref();
    if !v.is_finite() {
        check.report(value.span(), path, format!("{key} {v} is not a finite number"));
        default
    } else if !range.contains(&v) {
        check.report(value.span(), path, format!("{key} {v} must be {what}"));
        default
    } else {
        v
    }
}

/// A path key: `~` is refused (nothing expands it), relative paths are joined to `base`.
fn path_key(check: &mut Checker, value: &Spanned<String>, base: &Path, path: &str, key: &str) -> PathBuf {
    let written = value.get_ref();
    if written.trim().is_empty() {
        check.report(value.span(), path, format!("{key} is empty"));
    } else if written.starts_with('~') {
        check.report(
            value.span(),
            path,
            format!("{key} {written:?} starts with '~', which is not expanded: write the full path"),
        );
    }
    base.join(written)
}

/// A listen address: `ip:port`, or `host:port` with a name the machine resolves
/// (`localhost:5020`), as `std::net::ToSocketAddrs` does; of a name's addresses the
/// first IPv4 one is taken (else the first), so `localhost` is 127.0.0.1 even where
/// `::1` comes first. `Err(None)`: not of the form `host:port` at all; `Err(Some(m))`:
/// a name that does not resolve, `m` says why.
fn socket_addr(text: &str) -> Result<std::net::SocketAddr, Option<String>> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else { return Err(None) };
    if host.is_empty() || host.contains([':', '[', ']', '/']) || port.parse::<u16>().is_err() {
        return Err(None);
    }
    let addrs: Vec<std::net::SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| {
            Some(format!("listen {text:?}: host {host:?} does not resolve ({e}): write an ip:port"))
        })?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| Some(format!("listen {text:?}: host {host:?} has no address: write an ip:port")))
}

/// `name "x"`-style quoting used in every item path.
fn item(kind: &str, name: &Spanned<String>) -> String {
    format!("{kind} {:?}", name.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let text = "ab\nçd = 1\n\nx";
        let check = Checker::new(text, "t");
        assert_eq!(check.position(0), (1, 1));
        assert_eq!(check.position(1), (1, 2));
        assert_eq!(check.position(3), (2, 1));
        // 'ç' is two bytes: byte 5 is the second character of line 2.
        assert_eq!(check.position(5), (2, 2));
        assert_eq!(check.position(11), (3, 1));
        assert_eq!(check.position(12), (4, 1));
        assert_eq!(check.position(999), (4, 2));
    }

    #[test]
    fn names() {
        let alnum = |c: char| c.is_ascii_alphanumeric();
        assert!(is_name("boiler_1", alnum));
        assert!(is_name("A-2", alnum));
        assert!(!is_name("", alnum));
        assert!(!is_name("_x", alnum));
        assert!(!is_name("a.b", alnum));
        assert!(!is_name("a/b", alnum));
        assert!(!is_name(&"a".repeat(65), alnum));
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("[gateway]\nname = \"a\"\nbogus = 1\n", "g.toml").expect_err("unknown key must fail");
        let text = err.to_string();
        assert!(text.starts_with("g.toml:3:1: gateway: unknown field `bogus`"), "{text}");
        assert_eq!(err.exit_code(), 2);
        let err = parse("[gateway]\nname = \"a\"\nbogus =\n", "g.toml").expect_err("not toml");
        assert!(matches!(err, ConfigError::Syntax { position: Some((3, 8)), .. }), "{err}");
    }

    #[test]
    fn shape_errors_do_not_hide_each_other() {
        // A typo'd enum value, an unknown key and a wrong type, in three entries, and a
        // validation problem in a fourth: all four are reported.
        let text = r#"[gateway]
name = "a"

[[bus]]
name = "l"
port = "/dev/null"
parity = "evn"

[[device]]
name = "d"
bus = "l"
unit = 1

[[device.point]]
name = "p"
table = "hodling"
address = 0

[[device.point]]
name = "q"
table = "input"
address = 0
scael = 2

[[device]]
name = "e"
bus = "l"
unit = "two"

[[device.point]]
name = "r"
table = "input"
address = 0

[[device]]
name = "f"
bus = "l"
unit = 300

[[device.point]]
name = "s"
table = "input"
address = 0
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, "g.toml") else {
            panic!("expected problems");
        };
        let shown: Vec<String> = problems.iter().map(Problem::to_string).collect();
        assert_eq!(shown.len(), 5, "{shown:#?}");
        assert!(shown[0].starts_with("g.toml:7:10: bus \"l\": unknown variant `evn`"), "{shown:#?}");
        assert!(
            shown[1].starts_with("g.toml:16:9: device \"d\" point \"p\": unknown variant `hodling`"),
            "{shown:#?}"
        );
        assert!(
            shown[2].starts_with("g.toml:23:1: device \"d\" point \"q\": unknown field `scael`"),
            "{shown:#?}"
        );
        assert_eq!(shown[3], "g.toml:28:8: device \"e\": invalid type: string \"two\", expected an integer");
        assert_eq!(shown[4], "g.toml:38:8: device \"f\": unit 300 is out of range 1..=247");
    }

    #[test]
    fn every_problem_is_reported() {
        let text = r#"
[gateway]
name = "Bad Name"
summary_interval = "0s"

[[bus]]
name = "l"
port = "/dev/null"
baud = 0
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, "g.toml") else {
            panic!("expected validation problems");
        };
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert_eq!((problems[0].line, problems[0].col), (3, 8));
        assert_eq!(problems[0].path, "gateway");
    }

    #[test]
    fn a_repaired_device_still_checks_its_points() {
        // The device's own table had a wrong type (left out, reported); its points are
        // tables of their own and are still checked; a missing key in a point drops the
        // point only.
        let text = r#"[gateway]
name = "a"

[[bus]]
name = "l"
port = "/dev/null"

[[device]]
name = "d"
bus = "l"
unit = 1
timeout = 5

[[device.point]]
name = "p"
table = "holding"
address = 0
scale = 0

[[device.point]]
table = "holding"
address = 1
"#;
        let Err(ConfigError::Invalid(problems)) = parse(text, "g.toml") else {
            panic!("expected problems");
        };
        let shown: Vec<String> = problems.iter().map(Problem::to_string).collect();
        assert_eq!(
            shown,
            [
                "g.toml:12:11: device \"d\": invalid type: integer `5`, expected a string",
                "g.toml:18:9: device \"d\" point \"p\": scale 0 would turn every value into 0",
                "g.toml:20:1: device \"d\" point[1]: missing field `name`",
            ]
        );
    }

    const LINK: &str = r#"
[gateway]
name = "a"

[link]
identity = "id"
data_dir = "/var/lib/gw"
"#;

    #[test]
    fn link_paths_resolve_against_the_given_directory() {
        let model = parse_in(LINK, "g.toml", Path::new("/etc/gw")).expect("valid");
        let links = model.links.expect("[link] present");
        assert_eq!(links.identity_dir, Path::new("/etc/gw/id"));
        assert_eq!(links.data_dir, Path::new("/var/lib/gw"), "absolute stays");
        assert!(links.peers.is_empty(), "a [link] may come before any peer");
        assert_eq!(links.listen, None);
        let model = parse(LINK, "g.toml").expect("valid");
        let links = model.links.expect("[link] present");
        assert_eq!(links.identity_dir, Path::new("id"), "parse leaves it relative");
    }

    #[test]
    fn peer_problems_are_all_reported() {
        let text = format!(
            "{LINK}listen = \"0.0.0.0:7700\"\n\n[[peer]]\nname = \"a\"\nfingerprint = \"x\"\nheartbeat = \"1h\"\n\n[[peer.send]]\npoints = \"nothing.*\"\n"
        );
        let Err(ConfigError::Invalid(problems)) = parse(&text, "g.toml") else {
            panic!("expected validation problems");
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["peer \"a\"", "peer \"a\"", "peer \"a\"", "peer \"a\" send[0]"], "{problems:#?}");
        assert!(problems[0].message.contains("own name"), "{problems:#?}");
    }

    #[test]
    fn absurd_durations_are_refused_not_a_run_time_panic() {
        // Accepted before, then `Instant::now() + d` overflowed when the task started.
        let text = "[gateway]\nname = \"a\"\nsummary_interval = \"300000000000y\"\n";
        let Err(ConfigError::Invalid(problems)) = parse(text, "g.toml") else {
            panic!("expected validation problems");
        };
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].message.contains("above the maximum of 10years"), "{problems:#?}");
        assert!(parse("[gateway]\nname = \"a\"\nsummary_interval = \"10y\"\n", "g.toml").is_ok());
    }

    #[test]
    fn io_error_names_the_file() {
        let err = load(Path::new("/nonexistent/gw.toml")).expect_err("missing file");
        assert!(err.to_string().starts_with("cannot read /nonexistent/gw.toml: "));
    }
}
