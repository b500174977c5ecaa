//! Byte counts read from JSON as JSON Schema counts integers: `5` and `5.0`
//! are the same integer, so a client that writes every number as a float
//! (JavaScript, some generators) is not refused for it. Only values up to
//! [`MAX`] are taken, where a float still holds every integer exactly.

use serde::{Deserialize, Deserializer, de::Error};
use serde_json::Number;

/// 2^53 − 1, the largest integer a JSON number holds exactly everywhere
/// (I-JSON, RFC 7493): about 9 PB, far above any disk image.
pub const MAX: u64 = (1 << 53) - 1;

/// `deserialize_with` for a `u64` byte count.
pub fn u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    whole(&Number::deserialize(deserializer)?).map_err(D::Error::custom)
}

/// `deserialize_with` for an optional `u64` byte count (`null` or absent:
/// `None`; pair it with `#[serde(default)]`).
pub fn option_u64<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Option::<Number>::deserialize(deserializer)?
        .map(|number| whole(&number))
        .transpose()
        .map_err(D::Error::custom)
}

fn whole(number: &Number) -> Result<u64, String> {
    let value = match number.as_u64() {
        Some(value) => Some(value),
        None => number
            .as_f64()
            .filter(|float| float.fract() == 0.0 && (0.0..=MAX as f64).contains(float))
            .map(|float| float as u64),
    };
    value.filter(|value| *value <= MAX).ok_or_else(|| {
        format!("invalid value: {number}, expected a whole number of bytes from 0 to {MAX}")
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    struct Sizes {
        #[serde(deserialize_with = "super::u64")]
        size: u64,
        #[serde(default, deserialize_with = "super::option_u64")]
        optional: Option<u64>,
    }

    fn parse(text: &str) -> Result<Sizes, String> {
        serde_json::from_str(text).map_err(|error| error.to_string())
    }

    #[test]
    fn integers_and_integral_floats_are_the_same_count() {
        let sizes = parse(r#"{"size": 373553.0, "optional": 4096}"#).expect("whole numbers");
        assert_eq!((sizes.size, sizes.optional), (373553, Some(4096)));
        let sizes = parse(r#"{"size": 9007199254740991, "optional": null}"#).expect("the maximum");
        assert_eq!((sizes.size, sizes.optional), (super::MAX, None));
        assert_eq!(parse(r#"{"size": 0}"#).expect("absent").optional, None);
    }

    #[test]
    fn fractions_negatives_and_values_past_the_exact_range_are_refused() {
        for bad in ["0.5", "-1", "-1.0", "9007199254740992", "1e300", "\"5\""] {
            let error = parse(&format!(r#"{{"size": {bad}}}"#)).expect_err(bad);
            assert!(
                error.contains("size")
                    || error.contains("whole number")
                    || error.contains("invalid type"),
                "{bad}: {error}"
            );
        }
        let error = parse(r#"{"size": 1, "optional": 2.5}"#).expect_err("a fraction");
        assert!(
            error.contains("expected a whole number of bytes"),
            "{error}"
        );
    }
}
