//! ISO 8601 durations (`PT30S`, `PT1H30M`, `P7D`), as the task API and the
//! config file take them: one parser, so a value one accepts the other
//! does not refuse.

use jiff::SpanRelativeTo;
use jiff::fmt::temporal::SpanParser;
use std::time::Duration;

/// Longer than this is taken for a mistake (about ten years).
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Why a text is not a duration the agent takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DurationError(pub String);

/// Parses the ISO 8601 duration `value`.
///
/// Days and weeks count as 24 hours and 7 days: a timer on a node has no
/// calendar to consult. Years and months have no fixed length and are
/// refused, as are negative and absurdly long (> [`MAX_DURATION`]) durations.
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
    let duration = signed.unsigned_abs();
    if duration > MAX_DURATION {
        return Err(invalid("longer than 10 years (P3650D)".into()));
    }
    Ok(duration)
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
        assert_eq!(ok("P3650D"), MAX_DURATION);
    }

    #[test]
    fn calendar_negative_absurd_and_malformed_durations_are_refused() {
        for (value, why) in [
            ("P1Y", "years and months"),
            ("P2M", "years and months"),
            ("-PT1S", "negative"),
            ("P3651D", "10 years"),
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
