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
//! Adding a top-level section (`[server]`, ...) is a new file under `config/` with its
//! raw type and its `validate`, one field in [`Raw`] and one call in [`parse_in`].

mod bus;
mod device;
mod gateway;
mod globs;
pub mod http;
mod link;
mod peer;
mod plc;
mod point;
mod rawdevice;
mod regmap;
mod send;
mod server;
mod tunnel;
mod write;

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::model::Model;

/// The longest duration any key accepts: ten years. Beyond it a deadline
/// (`Instant::now() + d`) or a back-off doubling could overflow and panic at run time.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

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

/// Reads and validates the configuration file at `path`; relative paths inside it
/// resolve against the file's directory (made absolute, so they survive a `chdir`).
pub fn load(path: &Path) -> Result<Model, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let dir = absolute.parent().unwrap_or(Path::new(""));
    parse_in(&text, &path.display().to_string(), dir)
}

/// Parses and validates configuration `text`; `origin` (usually the file name) prefixes
/// every error position. Relative paths in the text stay relative (to the working
/// directory); use [`parse_in`] to anchor them.
pub fn parse(text: &str, origin: &str) -> Result<Model, ConfigError> {
    parse_in(text, origin, Path::new(""))
}

/// Like [`parse`], with relative paths in the text (`[link] identity`, `data_dir`)
/// resolved against `dir`, the directory the text was read from.
pub fn parse_in(text: &str, origin: &str, dir: &Path) -> Result<Model, ConfigError> {
    let mut check = Checker::new(text, origin);
    let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_owned(),
        position: e.span().map(|span| check.position(span.start)),
        message: plain_types(e.message().trim_end()),
    })?;

    let gateway = gateway::validate(&raw.gateway, &mut check);
    let mut buses = bus::validate(&raw.bus, &mut check);
    device::validate(&raw.device, &mut buses, &mut check);
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

    // Sections are checked one after the other (overlaps after all points of a device);
    // list the problems as the reader meets them in the file.
    check.problems.sort_by_key(|p| (p.line, p.col));
    if check.problems.is_empty() {
        Ok(Model { gateway, buses, links, server, plcs, http })
    } else {
        Err(ConfigError::Invalid(check.problems))
    }
}

/// Serde names the Rust type it wanted (`expected i64`); users wrote TOML, so say so in
/// TOML's words.
fn plain_types(message: &str) -> String {
    message.replace("expected i64", "expected an integer").replace("expected f64", "expected a number")
}

/// The whole file, one field per top-level section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    gateway: gateway::RawGateway,
    #[serde(default)]
    bus: Vec<bus::RawBus>,
    #[serde(default)]
    device: Vec<device::RawDevice>,
    #[serde(default)]
    raw_device: Vec<rawdevice::RawSerialDevice>,
    link: Option<link::RawLink>,
    #[serde(default)]
    peer: Vec<peer::RawPeer>,
    server: Option<server::RawServer>,
    #[serde(default)]
    plc: Vec<plc::RawPlc>,
    #[serde(default)]
    tunnel: Vec<tunnel::RawTunnel>,
    http: Option<http::RawHttp>,
}

/// Collects problems while a configuration is validated, and turns byte offsets into
/// line and column. The field helpers report a problem and return a fallback value, so
/// validation goes on and finds every other problem too; the fallback never reaches a
/// model because any problem fails the whole load.
struct Checker<'a> {
    origin: &'a str,
    text: &'a str,
    /// Byte offset at which each line starts.
    line_starts: Vec<usize>,
    problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn new(text: &'a str, origin: &'a str) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Checker { origin, text, line_starts, problems: Vec::new() }
    }

    /// 1-based line and column (in characters) of byte `offset`.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts.get(line.wrapping_sub(1)).copied().unwrap_or(0);
        let col = self.text.get(start..offset).map_or(offset - start, |s| s.chars().count());
        (line.max(1), col + 1)
    }

    /// Records a problem with the value at `span`.
    fn report(&mut self, span: Range<usize>, path: &str, message: impl Into<String>) {
        let (line, col) = self.position(span.start);
        self.problems.push(Problem {
            origin: self.origin.to_owned(),
            line,
            col,
            path: path.to_owned(),
            message: message.into(),
        });
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
        let (min, max) = (*range.start(), *range.end());
        match humantime::parse_duration(value.get_ref()) {
            Ok(d) if range.contains(&d) => d,
            Ok(d) if d > max => {
                self.report(
                    value.span(),
                    path,
                    format!(
                        "{key} {} is above the maximum of {}",
                        humantime::format_duration(d),
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Ok(d) => {
                self.report(
                    value.span(),
                    path,
                    format!(
                        "{key} {} is below the minimum of {}",
                        humantime::format_duration(d),
                        humantime::format_duration(min)
                    ),
                );
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
        assert!(text.starts_with("g.toml:3:1: unknown field `bogus`"), "{text}");
        assert_eq!(err.exit_code(), 2);
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
