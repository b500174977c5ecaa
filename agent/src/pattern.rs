//! Patterns that the API description states and the agent enforces, from
//! one string each, so that a schema-driven client and the agent agree on
//! what is well formed. They are written in the subset that ECMA-262 (the
//! description's dialect) and the `regex` crate read alike: explicit
//! `[0-9]` classes (`\d` is Unicode in `regex`), `\uXXXX` escapes, no
//! look-around.

use regex::Regex;
use std::sync::OnceLock;

/// A pattern and, once first used, its compiled form.
pub struct Pattern {
    source: &'static str,
    compiled: OnceLock<Regex>,
}

impl Pattern {
    pub const fn new(source: &'static str) -> Pattern {
        Pattern {
            source,
            compiled: OnceLock::new(),
        }
    }

    /// The pattern as the API description writes it.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Whether all of `text` matches (the patterns are anchored).
    pub fn is_match(&self, text: &str) -> bool {
        self.compiled
            .get_or_init(|| Regex::new(self.source).expect("the agent's patterns compile"))
            .is_match(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_matches_what_it_says() {
        let digits = Pattern::new("^[0-9]{2}$");
        assert!(digits.is_match("42"));
        assert!(!digits.is_match("4"));
        assert!(!digits.is_match("٤٢"), "Arabic-Indic digits are not [0-9]");
        assert_eq!(digits.source(), "^[0-9]{2}$");
    }
}
