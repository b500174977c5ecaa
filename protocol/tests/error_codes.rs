//! The README's list of error codes is the registry's: every code the
//! agent can show is documented, and nothing documented is made up.

use reimage_protocol::ErrorCode;
use std::collections::BTreeSet;

fn readme() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The backticked words of `text` that could be codes: a capital, then
/// letters and digits (`DiskBusy`, `Timeout`).
fn codes_in(text: &str) -> BTreeSet<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|word| {
            word.len() > 2
                && word.starts_with(|c: char| c.is_ascii_uppercase())
                && word.chars().all(|c| c.is_ascii_alphanumeric())
        })
        .map(str::to_string)
        .collect()
}

/// The text from the heading `heading` to the next `## ` heading.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &text[start + heading.len()..];
    rest.find("\n## ").map_or(rest, |end| &rest[..end])
}

#[test]
fn the_readme_lists_exactly_the_registered_codes() {
    let text = readme();
    let listed = codes_in(section(&text, "## Error codes"));
    let known: BTreeSet<String> = ErrorCode::KNOWN.iter().map(|c| c.to_string()).collect();
    let undocumented: Vec<&String> = known.difference(&listed).collect();
    assert!(
        undocumented.is_empty(),
        "codes missing from the README: {undocumented:?}"
    );
    let made_up: Vec<&String> = listed.difference(&known).collect();
    assert!(
        made_up.is_empty(),
        "README codes not in the registry: {made_up:?}"
    );
}

#[test]
fn every_code_the_write_section_names_is_registered() {
    let text = readme();
    let write = section(&text, "## `reimage-agent write`");
    let start = write
        .find("Codes:")
        .expect("the write section lists its codes");
    for code in codes_in(&write[start..]) {
        assert!(
            !matches!(ErrorCode::parse(&code), ErrorCode::Other(_)),
            "{code} is not a registered code"
        );
    }
}
