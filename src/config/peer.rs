//! The `[[peer]]` sections: the gateways this one exchanges values with.
//!
//! ```toml
//! [[peer]]
//! name = "site-b"            # required: the peer's gateway.name (lowercase), unique,
//!                            #   not this gateway's own name
//! fingerprint = "3F:A2:…:9C" # required: SHA-256 of the peer's certificate, as its
//!                            #   `m2m-gateway keygen` prints it: 64 hex digits, either
//!                            #   case, in colon-separated pairs or plain; unique
//! dial = "10.0.0.2:7700"     # host:port we connect to; absent: the peer dials us
//!                            #   (then [link] listen is required); unique
//! spool = "site-b.db"        # default "spool-<name>.db"; relative: under data_dir; unique
//! spool_max = "64MiB"        # spool size bound: B, KB/MB/GB (1000s), KiB/MiB/GiB (1024s);
//!                            #   default 64MiB, at least 1MiB
//! spool_max_age = "7d"       # oldest value kept in the spool; default 7d, at least 1s
//! heartbeat = "5s"           # default 5s, 100ms..=60s; 3 missed: the link is down
//! reconnect_max = "5s"       # the dialing side's back-off between attempts doubles from
//!                            #   200ms up to this (with jitter); default 5s, 200ms..=10m
//! accept_relayed = ["site-a", "line-*"]
//!                            # origins (gateway names, globs) whose values this peer may
//!                            #   relay to us (it is their hub); default none: relayed
//!                            #   values of any other origin are refused, counted and
//!                            #   logged. The peer's own points are always accepted.
//!                            #   Not empty strings, not a point ("site-a/*"), not this
//!                            #   gateway's name nor the peer's (never relayed to us)
//!
//! [[peer.send]]              # zero or more; see config/send.rs
//! [[peer.grant]]             # zero or more; see config/write.rs
//! [[peer.writeback]]         # zero or more; see config/write.rs
//! ```
//!
//! A `[[peer]]` needs the `[link]` section (config/link.rs).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::link::{self, RawLink};
use super::send::{self, RawSend};
use super::write::{self, RawGrant, RawWriteBack};
use super::{Checker, gateway, item, path_key};
use crate::model::{Bus, Dial, Links, Peer, Point, PointGlobs};
use crate::point::value::{DataType, Table, WordOrder};

const MIB: u64 = 1024 * 1024;
/// Spool bounds, shared by peer spools and PLC spools (`config/plc.rs`).
pub(super) const SPOOL_MAX: u64 = 64 * MIB;
pub(super) const SPOOL_MAX_MIN: u64 = MIB;
pub(super) const SPOOL_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub(super) const SPOOL_MAX_AGE_MIN: Duration = Duration::from_secs(1);
/// Longest wait between reconnect attempts: a closed link on a plant network can afford an
/// attempt every few seconds, and a link back in seconds delivers its backlog in seconds.
const RECONNECT_MAX: Duration = Duration::from_secs(5);
const RECONNECT_MAX_MAX: Duration = Duration::from_secs(600);
const HEARTBEAT: Duration = Duration::from_secs(5);
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
const HEARTBEAT_MAX: Duration = Duration::from_secs(60);

/// One `[[peer]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    name: Spanned<String>,
    fingerprint: Spanned<String>,
    dial: Option<Spanned<String>>,
    spool: Option<Spanned<String>>,
    spool_max: Option<Spanned<String>>,
    spool_max_age: Option<Spanned<String>>,
    heartbeat: Option<Spanned<String>>,
    reconnect_max: Option<Spanned<String>>,
    accept_relayed: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    send: Vec<RawSend>,
    #[serde(default)]
    grant: Vec<RawGrant>,
    #[serde(default)]
    writeback: Vec<RawWriteBack>,
}

impl RawPeer {
    /// The peer's name as written.
    pub(super) fn name(&self) -> &str {
        self.name.get_ref()
    }

    /// Where a problem with the spool file points: `spool`, else the name.
    pub(super) fn spool_span(&self) -> std::ops::Range<usize> {
        self.spool.as_ref().map_or(self.name.span(), |s| s.span())
    }
}

/// Resolves `[link]` and every `[[peer]]`; `None` without a `[link]` section.
pub(super) fn validate(
    raw_link: Option<&RawLink>,
    raw: &[RawPeer],
    own_name: &str,
    buses: &[Bus],
    dir: &Path,
    check: &mut Checker,
) -> Option<Links> {
    let mut links = raw_link.map(|l| link::validate(l, dir, check));
    if let (None, Some(first)) = (&links, raw.first()) {
        check.report(
            first.name.span(),
            &item("peer", &first.name),
            "[[peer]] needs a [link] section (identity, data_dir)",
        );
    }
    // Raw devices' command points can be granted and written back to like a holding
    // register holding a number: the writer turns the write into the configured command.
    let commands: Vec<Point> = buses
        .iter()
        .flat_map(|b| &b.raw_devices)
        .flat_map(|d| &d.commands)
        .map(|c| Point {
            name: c.name.clone(),
            table: Table::Holding,
            address: 0,
            data_type: DataType::F64,
            order: WordOrder::Abcd,
            scale: 1.0,
            offset: 0.0,
            interval: c.timeout,
            stale_after: c.timeout,
            unit: None,
        })
        .collect();
    let points: Vec<&Point> =
        buses.iter().flat_map(|b| &b.devices).flat_map(|d| &d.points).chain(&commands).collect();
    let data_dir = links.as_ref().map_or_else(PathBuf::new, |l| l.data_dir.clone());
    // Without [link] the missing section is the one problem to report, not `listen`.
    let listens = links.as_ref().is_none_or(|l| l.listen.is_some());

    let mut names: HashSet<&str> = HashSet::new();
    let mut fingerprints: HashMap<String, &str> = HashMap::new();
    let mut dials: HashMap<&str, &str> = HashMap::new();
    let mut spools: HashMap<PathBuf, &str> = HashMap::new();
    let mut targets = write::Targets::default();
    let mut peers = Vec::with_capacity(raw.len());
    for r in raw {
        let name = r.name.get_ref().as_str();
        let path = item("peer", &r.name);
        let mut unique = true;
        gateway::name(&r.name, &path, check);
        if name == own_name {
            check.report(
                r.name.span(),
                &path,
                "name is this gateway's own name (gateway.name): a peer is another gateway",
            );
        } else if !names.insert(name) {
            check.report(r.name.span(), &path, "name is already used by another peer");
            unique = false;
        }

        let fingerprint = match fingerprint(r.fingerprint.get_ref()) {
            Ok(fp) => {
                if let Some(other) = fingerprints.insert(fp.clone(), name) {
                    check.report(
                        r.fingerprint.span(),
                        &path,
                        format!(
                            "fingerprint is already pinned for peer {other:?}: a certificate identifies one peer"
                        ),
                    );
                }
                fp
            }
            Err(e) => {
                check.report(r.fingerprint.span(), &path, e);
                String::new()
            }
        };

        let dial = match &r.dial {
            Some(d) => {
                if let Err(e) = host_port(d.get_ref()) {
                    check.report(d.span(), &path, e);
                } else if let Some(other) = dials.insert(d.get_ref(), name) {
                    check.report(
                        d.span(),
                        &path,
                        format!("dial {:?} is already dialled for peer {other:?}", d.get_ref()),
                    );
                }
                Dial::Connect(d.get_ref().clone())
            }
            None => {
                if !listens {
                    check.report(
                        r.name.span(),
                        &path,
                        "has no `dial`, so it must dial us, but [link] has no `listen` address: set one of the two",
                    );
                }
                Dial::Accept
            }
        };

        let spool = match &r.spool {
            Some(s) => path_key(check, s, &data_dir, &path, "spool"),
            None => data_dir.join(format!("spool-{name}.db")),
        };
        // A repeated name is reported above; its default spool would only repeat that.
        let clash = if unique || r.spool.is_some() { spools.insert(spool.clone(), name) } else { None };
        if let Some(other) = clash {
            let span = r.spool.as_ref().map_or(r.name.span(), |s| s.span());
            let shown = spool.strip_prefix(&data_dir).unwrap_or(&spool);
            check.report(
                span,
                &path,
                format!(
                    "spool {:?} (in data_dir) is already the spool of peer {other:?}",
                    shown.display().to_string()
                ),
            );
        }

        let (spool_max_bytes, spool_max_age) =
            spool_limits(r.spool_max.as_ref(), r.spool_max_age.as_ref(), &path, check);

        peers.push(Peer {
            name: name.to_owned(),
            fingerprint,
            dial,
            spool,
            spool_max_bytes,
            spool_max_age,
            heartbeat: check.duration_within(
                r.heartbeat.as_ref(),
                HEARTBEAT,
                HEARTBEAT_MIN..=HEARTBEAT_MAX,
                &path,
                "heartbeat",
            ),
            reconnect_max: check.duration_within(
                r.reconnect_max.as_ref(),
                RECONNECT_MAX,
                crate::model::RECONNECT_MIN..=RECONNECT_MAX_MAX,
                &path,
                "reconnect_max",
            ),
            send: send::validate(&r.send, &points, &send::SendTo { name, path: &path, own_name }, check),
            grants: write::grants(&r.grant, &points, &path, check),
            writeback: write::writebacks(&r.writeback, &points, &path, &mut targets, check),
            accept_relayed: accept_relayed(
                r.accept_relayed.as_deref().unwrap_or_default(),
                name,
                own_name,
                &path,
                check,
            ),
        });
    }
    if let Some(links) = links.as_mut() {
        links.peers = peers;
    }
    links
}

/// Compiles `accept_relayed` of peer `peer`: origin globs over gateway names. Reports an
/// entry that can never match a relayed origin (empty, a point name, uppercase, this
/// gateway or the peer itself: their values are never relayed to us) or does not parse;
/// a reported entry matches nothing.
fn accept_relayed(
    raw: &[Spanned<String>],
    peer: &str,
    own_name: &str,
    path: &str,
    check: &mut Checker,
) -> PointGlobs {
    let mut globs = Vec::with_capacity(raw.len());
    for entry in raw {
        let text = entry.get_ref().as_str();
        let literal = !text.contains(['*', '?', '[', '{']);
        let problem = if text.is_empty() {
            Some("accept_relayed: an entry is empty: name an origin gateway (\"site-a\") or a glob of them (\"line-*\")".to_string())
        } else if let Some((origin, _)) = text.split_once('/') {
            Some(format!(
                "accept_relayed: {text:?} names points: entries are origin gateway names (write {origin:?})"
            ))
        } else if text.chars().any(|c| c.is_ascii_uppercase()) {
            Some(format!(
                "accept_relayed: {text:?} has uppercase letters: gateway names are lowercase, so it would never match"
            ))
        } else if literal && text == own_name {
            Some(format!(
                "accept_relayed: {text:?} is this gateway's own name: its values are never relayed back to it (they are dropped as a relay loop)"
            ))
        } else if literal && text == peer {
            Some(format!(
                "accept_relayed: {text:?} is the peer itself: its own points are always accepted, only other origins are relayed"
            ))
        } else if let Err(e) = globset::Glob::new(text) {
            Some(format!("accept_relayed: {text:?} is not a valid glob: {}", e.kind()))
        } else {
            None
        };
        match problem {
            Some(message) => check.report(entry.span(), path, message),
            None => globs.push(text.to_owned()),
        }
    }
    // Every glob kept parsed on its own; a set of them builds.
    PointGlobs::new(globs).unwrap_or_else(|_| PointGlobs::none())
}

/// Normalises a certificate fingerprint to 32 uppercase hex pairs joined by `:`.
/// Accepts the pairs in either case or 64 plain hex digits, and ignores openssl's
/// `SHA256 Fingerprint=` prefix — the same forms `tls::Fingerprint` parses.
fn fingerprint(text: &str) -> Result<String, String> {
    const HINT: &str = "a SHA-256 fingerprint is 64 hex digits, plain or in colon-separated pairs, as `m2m-gateway keygen` prints it";
    let trimmed = text.trim();
    let body = trimmed
        .split_once('=')
        .filter(|(k, _)| k.to_ascii_lowercase().contains("fingerprint"))
        .map_or(trimmed, |(_, v)| v.trim());
    let digits: String = if body.contains(':') {
        let pairs: Vec<&str> = body.split(':').collect();
        if pairs.len() != 32 || pairs.iter().any(|p| p.len() != 2) {
            return Err(format!("fingerprint {text:?} is not 32 colon-separated hex pairs: {HINT}"));
        }
        pairs.concat()
    } else {
        body.to_owned()
    };
    if let Some(c) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("fingerprint {text:?} has {c:?}, not a hex digit: {HINT}"));
    }
    if digits.len() != 64 {
        return Err(format!("fingerprint {text:?} has {} hex digits, not 64: {HINT}", digits.len()));
    }
    let upper = digits.to_ascii_uppercase();
    let pairs: Vec<&str> = (0..32).filter_map(|i| upper.get(2 * i..2 * i + 2)).collect();
    Ok(pairs.join(":"))
}

/// Checks `host:port` for dialling: a port 1..=65535, a host name or IPv4 address, or an
/// IPv6 address in brackets (`[fd00::2]:7700`).
pub(super) fn host_port(text: &str) -> Result<(), String> {
    let shape = || {
        format!(
            "dial {text:?} is not host:port (like \"10.0.0.2:7700\", \"site-b.example:7700\" or \"[fd00::2]:7700\")"
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(shape)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(shape()),
    }
    if let Some(inner) = host.strip_prefix('[') {
        let v6 = inner.strip_suffix(']').and_then(|a| a.parse::<std::net::Ipv6Addr>().ok());
        return v6.map(|_| ()).ok_or_else(shape);
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if host.len() > 253 || !host.split('.').all(label_ok) {
        if host.contains(':') {
            return Err(format!("dial {text:?}: an IPv6 address needs brackets, like \"[fd00::2]:7700\""));
        }
        return Err(shape());
    }
    Ok(())
}

/// A size with a unit: `"64MiB"`, `"1.5 GB"`, `"4096B"`. `KB`/`MB`/`GB` count in 1000s,
/// `KiB`/`MiB`/`GiB` in 1024s; units are case-insensitive. The error starts with the
/// value, for a message `<key> <error>`.
pub(super) fn size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "{text:?} is not a size: write a number and a unit (B, KB, MB, GB, KiB, MiB, GiB), like \"64MiB\""
        )
    };
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let unit: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = (number * unit).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    // Finite, non-negative and below u64::MAX: the cast is exact up to f64's precision.
    Ok(bytes as u64)
}

/// The spool limits of a `[[peer]]` or `[[plc]]`: `spool_max` (a size, at least 1MiB;
/// default 64MiB) and `spool_max_age` (at least 1s; default 7d), as bytes and age.
pub(super) fn spool_limits(
    max: Option<&Spanned<String>>,
    max_age: Option<&Spanned<String>>,
    path: &str,
    check: &mut Checker,
) -> (u64, Duration) {
    let max_bytes = match max {
        None => SPOOL_MAX,
        Some(s) => match size(s.get_ref()) {
            Ok(n) if n >= SPOOL_MAX_MIN => n,
            Ok(n) => {
                check.report(
                    s.span(),
                    path,
                    format!("spool_max {:?} ({n} bytes) is below the minimum of 1MiB", s.get_ref()),
                );
                SPOOL_MAX
            }
            Err(e) => {
                check.report(s.span(), path, format!("spool_max {e}"));
                SPOOL_MAX
            }
        },
    };
    (max_bytes, check.duration(max_age, SPOOL_MAX_AGE, SPOOL_MAX_AGE_MIN, path, "spool_max_age"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAIRS: &str =
        "3F:A2:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:01:23:45:67:89:AB:CD:EF:10:32:54:76:98:9C";

    #[test]
    fn fingerprints_are_normalised() {
        assert_eq!(fingerprint(PAIRS).as_deref(), Ok(PAIRS));
        let plain = PAIRS.replace(':', "").to_ascii_lowercase();
        assert_eq!(fingerprint(&plain).as_deref(), Ok(PAIRS));
        let openssl = format!("sha256 Fingerprint={}", PAIRS.to_ascii_lowercase());
        assert_eq!(fingerprint(&openssl).as_deref(), Ok(PAIRS));
        assert!(fingerprint(&PAIRS[3..]).is_err(), "31 pairs");
        assert!(fingerprint(&plain[1..]).is_err(), "63 digits");
        assert!(fingerprint(&PAIRS.replace("3F", "3G")).is_err());
        assert!(fingerprint(&PAIRS.replacen(':', "", 1)).is_err(), "odd pairs");
        assert!(fingerprint("").is_err());
    }

    #[test]
    fn dial_addresses() {
        assert!(host_port("10.0.0.2:7700").is_ok());
        assert!(host_port("site-b.example.net:7700").is_ok());
        assert!(host_port("[fd00::2]:7700").is_ok());
        assert!(host_port("10.0.0.2").is_err(), "port required");
        assert!(host_port("10.0.0.2:0").is_err());
        assert!(host_port("10.0.0.2:70000").is_err());
        assert!(host_port(":7700").is_err());
        assert!(host_port("bad host:7700").is_err());
        let v6 = host_port("fd00::2:7700").expect_err("brackets");
        assert!(v6.contains("brackets"), "{v6}");
    }

    #[test]
    fn sizes() {
        assert_eq!(size("64MiB"), Ok(64 * MIB));
        assert_eq!(size("1 GB"), Ok(1_000_000_000));
        assert_eq!(size("1.5KiB"), Ok(1536));
        assert_eq!(size("10kb"), Ok(10_000));
        assert_eq!(size("4096B"), Ok(4096));
        assert!(size("64").is_err(), "unit required");
        assert!(size("MiB").is_err());
        assert!(size("-1MiB").is_err());
        assert!(size("64 TB").is_err());
        assert!(size("1.2.3MB").is_err());
        assert!(size("99999999999999999999GiB").is_err());
    }
}
