//! Enums that requests send as strings: one spelling in answers, any case
//! accepted (Batch's documentation writes `taskCompletion`, its REST
//! reference `taskcompletion`; both must work), and an API description that
//! states exactly that, so a schema-driven client and the agent agree.

/// A regular expression matching exactly `values`, in any letter case,
/// written with character classes (`[rR][eE]…`) because the API
/// description's pattern dialect has no case-insensitive flag.
#[cfg(feature = "utoipa")]
pub fn case_insensitive_pattern(values: &[&str]) -> String {
    let alternatives: Vec<String> = values
        .iter()
        .map(|value| {
            value
                .chars()
                .map(|c| {
                    let (lower, upper) = (c.to_ascii_lowercase(), c.to_ascii_uppercase());
                    if lower == upper {
                        regex_escape(c)
                    } else {
                        format!("[{lower}{upper}]")
                    }
                })
                .collect()
        })
        .collect();
    format!("^(?:{})$", alternatives.join("|"))
}

/// Escapes only the pattern's syntax characters: an escaped ordinary
/// character (`\\-`) is an error in the Unicode mode of ECMA-262 patterns.
#[cfg(feature = "utoipa")]
fn regex_escape(c: char) -> String {
    if "^$\\.*+?()[]{}|/".contains(c) {
        format!("\\{c}")
    } else {
        c.to_string()
    }
}

/// Declares a string enum with one canonical spelling per variant, parsed
/// case-insensitively, serialised canonically, and described (with the
/// `utoipa` feature) as a string matching [`case_insensitive_pattern`].
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )+ ];

            /// The canonical spelling, as answers show it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            /// Any letter case of a canonical spelling.
            fn from_str(text: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|value| value.as_str().eq_ignore_ascii_case(text))
                    .ok_or_else(|| {
                        let known: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                        format!("unknown value `{text}`, expected one of {} (any case)", known.join(", "))
                    })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        #[cfg(feature = "utoipa")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                let known: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .pattern(Some($crate::wire_enum::case_insensitive_pattern(&known)))
                    .description(Some(format!(
                        "one of {}; any letter case is accepted, answers use this spelling",
                        known.join(", ")
                    )))
                    .examples(known.iter().map(|v| serde_json::Value::from(*v)))
                    .into()
            }
        }

        #[cfg(feature = "utoipa")]
        impl utoipa::ToSchema for $name {}
    };
}

pub(crate) use wire_enum;

#[cfg(all(test, feature = "utoipa"))]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_matches_every_case_of_the_values_and_nothing_else() {
        let pattern = case_insensitive_pattern(&["taskcompletion", "a-b."]);
        assert_eq!(
            pattern,
            "^(?:[tT][aA][sS][kK][cC][oO][mM][pP][lL][eE][tT][iI][oO][nN]|[aA]-[bB]\\.)$"
        );
    }
}
