//! The one duration parser: human strings (`"500ms"`, `"2s"`, `"1m 30s"`, humantime's
//! forms) to a [`Duration`] within a range. The gateway's config keys, the command line's
//! duration arguments and the simulator's config all read durations through [`parse`];
//! each caller words the error for its own place (a config key, an argument).
//!
//! Invariant: nothing above [`MAX_DURATION`] comes out of a range-checked parse, so a
//! deadline computed from it (`Instant::now() + d`) or a back-off doubling cannot
//! overflow.

use std::ops::RangeInclusive;
use std::time::Duration;

/// The longest duration any key accepts: ten years. Beyond it a deadline
/// (`Instant::now() + d`) or a back-off doubling could overflow and panic at run time.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// Why a text is not a duration of the range asked for.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DurationError {
    /// Not a duration at all (humantime's reason).
    #[error("{0}")]
    Syntax(#[from] humantime::DurationError),
    /// A duration above the range.
    #[error("{} is above the maximum of {}", humantime::format_duration(*.value), humantime::format_duration(*.max))]
    Above {
        /// The duration given.
        value: Duration,
        /// The largest allowed.
        max: Duration,
    },
    /// A duration below the range.
    #[error("{} is below the minimum of {}", humantime::format_duration(*.value), humantime::format_duration(*.min))]
    Below {
        /// The duration given.
        value: Duration,
        /// The smallest allowed.
        min: Duration,
    },
}

/// The duration `text` names, if it lies in `range`.
pub fn parse(text: &str, range: RangeInclusive<Duration>) -> Result<Duration, DurationError> {
    let value = humantime::parse_duration(text)?;
    if value > *range.end() {
        Err(DurationError::Above { value, max: *range.end() })
    } else if value < *range.start() {
        Err(DurationError::Below { value, min: *range.start() })
    } else {
        Ok(value)
    }
}

/// serde `with` adapter for a `Duration` field written as a human string (any length:
/// the simulator's keys have no range).
pub mod serde_any {
    use std::time::Duration;

    use serde::de::{Deserializer, Error, Unexpected, Visitor};

    struct Human;

    impl Visitor<'_> for Human {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration")
        }
        fn visit_str<E: Error>(self, text: &str) -> Result<Duration, E> {
            super::parse(text, Duration::ZERO..=Duration::MAX)
                .map_err(|_| E::invalid_value(Unexpected::Str(text), &self))
        }
    }

    /// A `Duration` from its human string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(Human)
    }

    /// The same for an `Option<Duration>` field (`#[serde(default, with = "serde_any::option")]`).
    pub mod option {
        use std::time::Duration;

        use serde::Deserializer;

        /// `Some` `Duration` from its human string.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humantime_forms_within_the_range() {
        let all = Duration::ZERO..=MAX_DURATION;
        assert_eq!(parse("500ms", all.clone()), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1m 30s", all.clone()), Ok(Duration::from_secs(90)));
        assert_eq!(parse("2 hours", all.clone()), Ok(Duration::from_secs(7200)));
        let err = parse("11years", all.clone()).expect_err("above ten years");
        assert_eq!(err.to_string(), "11years is above the maximum of 10years");
        let err = parse("1ms", Duration::from_millis(10)..=MAX_DURATION).expect_err("below");
        assert_eq!(err.to_string(), "1ms is below the minimum of 10ms");
        assert!(matches!(parse("soon", all), Err(DurationError::Syntax(_))));
    }

    #[test]
    fn serde_adapter_reads_what_humantime_serde_read() {
        #[derive(serde::Deserialize)]
        struct K {
            #[serde(with = "serde_any")]
            a: Duration,
            #[serde(default, with = "serde_any::option")]
            b: Option<Duration>,
        }
        let k: K = toml::from_str("a = '1s 500ms'").expect("a duration");
        assert_eq!((k.a, k.b), (Duration::from_millis(1500), None));
        let err = toml::from_str::<K>("a = 'x'").map(|k| k.a).expect_err("not a duration");
        assert_eq!(err.message(), "invalid value: string \"x\", expected a duration");
    }
}
