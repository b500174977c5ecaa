//! ISO 8601 durations (`PT30S`, `PT1H30M`, `P7D`), as the task API and the
//! config file take them: one parser, so a value one accepts the other
//! does not refuse.

use crate::pattern::Pattern;
use jiff::SpanRelativeTo;
use jiff::fmt::temporal::SpanParser;
use std::time::Duration;

/// Seconds: up to six digits, a fraction of up to nine.
macro_rules! seconds {
    () => {
        "[0-9]{1,6}(?:\\.[0-9]{1,9})?S"
    };
}
/// The time part: hours, minutes, seconds, at least one, in that order.
macro_rules! time_part {
    () => {
        concat!(
            "T(?:[0-9]{1,4}H(?:[0-9]{1,5}M)?(?:",
            seconds!(),
            ")?|[0-9]{1,5}M(?:",
            seconds!(),
            ")?|",
            seconds!(),
            ")"
        )
    };
}

/// The durations the agent takes, as the API description states them:
/// uppercase ISO 8601 with weeks (up to 99), days (999), hours (9999),
/// minutes (99999) and seconds (999999), at least one, in that order. So
/// every duration is under six years: longer is taken for a mistake.
pub static DURATION_PATTERN: Pattern = Pattern::new(concat!(
    "^P(?:(?:[0-9]{1,2}W(?:[0-9]{1,3}D)?|[0-9]{1,3}D)(?:",
    time_part!(),
    ")?|",
    time_part!(),
    ")$"
));

/// Why a text is not a duration the agent takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DurationError(pub String);

/// Exactly the durations of [`DURATION_PATTERN`] that are zero: only
/// zeros beside the designators. (Where zero is refused, the description
/// says so with `not` this pattern.)
pub static ZERO_DURATION_PATTERN: Pattern = Pattern::new("^P[0WDTHMS.]*$");

/// Parses the ISO 8601 duration `value`.
///
/// Days and weeks count as 24 hours and 7 days: a timer on a node has no
/// calendar to consult. Years and months have no fixed length and are
/// refused, as are negative ones and any outside [`DURATION_PATTERN`].
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let invalid = DurationError;
    // The temporal parser takes ISO 8601 only; `Span`'s `FromStr` would also
    // take jiff's "friendly" format, which is not part of the wire contract.
    let span = SpanParser::new().parse_span(value).map_err(|e| {
        invalid(format!(
            "not an ISO 8601 duration such as PT30S or P7D ({e})"
        ))
    })?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(invalid(
            "years and months have no fixed length; give days (P30D) instead".into(),
        ));
    }
    let signed = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|e| invalid(e.to_string()))?;
    if signed.is_negative() {
        return Err(invalid("a duration cannot be negative".into()));
    }
    if !DURATION_PATTERN.is_match(value) {
        return Err(invalid(
            "not in the agent's form: uppercase, at most 99W, 999D, 9999H, 99999M and \
             999999S, in that order"
                .into(),
        ));
    }
    Ok(signed.unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(value: &str) -> Duration {
        match parse_duration(value) {
            Ok(d) => d,
            Err(e) => panic!("{value} should parse: {e}"),
        }
    }

    #[test]
    fn time_days_and_weeks_parse() {
        assert_eq!(ok("PT30S"), Duration::from_secs(30));
        assert_eq!(ok("PT1H30M"), Duration::from_secs(5400));
        assert_eq!(ok("PT0.5S"), Duration::from_millis(500));
        assert_eq!(ok("P7D"), Duration::from_secs(7 * 86400));
        assert_eq!(ok("P1W"), Duration::from_secs(7 * 86400));
        assert_eq!(ok("P1DT2H"), Duration::from_secs(26 * 3600));
        assert_eq!(ok("PT0S"), Duration::ZERO);
        assert_eq!(ok("P1W2DT3H4M5.5S"), Duration::from_millis(788_645_500));
        assert_eq!(
            ok("P99W999DT9999H99999M999999.999999999S"),
            Duration::new(
                (99 * 7 + 999) * 86400 + 9999 * 3600 + 99999 * 60 + 999_999,
                999_999_999
            )
        );
    }

    #[test]
    fn the_zero_pattern_matches_exactly_the_zero_durations() {
        for value in ["P0D", "P0W0D", "PT0S", "PT0.000S", "P00DT0H0M0S", "PT0M"] {
            assert!(ok(value).is_zero(), "{value}");
            assert!(ZERO_DURATION_PATTERN.is_match(value), "{value}");
        }
        for value in ["P1D", "PT0.001S", "P0DT1M", "P10W", "PT20H"] {
            assert!(!ok(value).is_zero(), "{value}");
            assert!(!ZERO_DURATION_PATTERN.is_match(value), "{value}");
        }
    }

    #[test]
    fn calendar_negative_absurd_and_malformed_durations_are_refused() {
        for (value, why) in [
            ("P1Y", "years and months"),
            ("P2M", "years and months"),
            ("-PT1S", "negative"),
            ("P3651D", "at most"),
            ("pt30s", "uppercase"),
            ("PT1,5S", "agent's form"),
            ("30s", "ISO 8601"),
            ("PT", "ISO 8601"),
            ("", "ISO 8601"),
            ("P1H", "ISO 8601"),
        ] {
            let msg = parse_duration(value).expect_err(value).to_string();
            assert!(msg.contains(why), "{value}: {msg}");
        }
    }
}
