//! The `[gateway]` section: this gateway's identity and gateway-wide settings.
//!
//! ```toml
//! [gateway]
//! name = "site-a"            # required: [a-z0-9][a-z0-9_-]*, at most 64 characters
//! summary_interval = "60s"   # default 60s, at least 1s
//! worker_threads = 1         # threads running the gateway's tasks, 1..=64; default one
//!                            #   per CPU core. 1 gives the lowest pass-through latency and
//!                            #   CPU use on small machines (no hand-offs between threads)
//! log_format = "text"        # text | json (one JSON object per line), default text;
//!                            #   `run --log-format` overrides it
//! ```

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Checker;
use crate::model::{Gateway, LogFormat};

const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
const SUMMARY_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// `[gateway]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    name: Spanned<String>,
    summary_interval: Option<Spanned<String>>,
    worker_threads: Option<Spanned<i64>>,
    log_format: Option<Spanned<LogFormat>>,
}

/// Resolves `[gateway]`. The name is stricter than other names (lowercase only): it is
/// this gateway's identity towards its peers, so `Site-A` and `site-a` must not differ.
pub(super) fn validate(raw: &RawGateway, check: &mut Checker) -> Gateway {
    const PATH: &str = "gateway";
    name(&raw.name, PATH, check);
    Gateway {
        name: raw.name.get_ref().clone(),
        summary_interval: check.duration(
            raw.summary_interval.as_ref(),
            SUMMARY_INTERVAL,
            SUMMARY_INTERVAL_MIN,
            PATH,
            "summary_interval",
        ),
        worker_threads: raw
            .worker_threads
            .as_ref()
            .map(|t| check.int(Some(t), 1, 1..=64, PATH, "worker_threads")),
        log_format: raw.log_format.as_ref().map_or_else(LogFormat::default, |f| *f.get_ref()),
    }
}

/// Checks a gateway name: ours, or a peer's (`[[peer]] name`).
pub(super) fn name(name: &Spanned<String>, path: &str, check: &mut Checker) {
    let text = name.get_ref();
    if !super::is_name(text, |c| c.is_ascii_lowercase() || c.is_ascii_digit())
        || text.chars().any(|c| c.is_ascii_uppercase())
    {
        check.report(
            name.span(),
            path,
            format!(
                "name {text:?} is not valid: use 1 to 64 lowercase letters, digits, '_' and '-', starting with a letter or digit"
            ),
        );
    }
}
