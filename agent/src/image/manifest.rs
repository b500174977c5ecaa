//! Loading and checking image manifests.

use crate::image::http::HttpOptions;
use crate::image::source::{self, Location};
use crate::{Error, Result};
use reimage_protocol::ImageManifest;

/// Manifests are small; anything larger is not one.
const MANIFEST_LIMIT: u64 = 64 * 1024;

/// Parses a SHA-256 given as 64 hex digits; returns it in lowercase.
pub fn parse_sha256(text: &str) -> Result<String> {
    let text = text.trim();
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(Error::InvalidArgument(format!(
            "'{text}' is not a SHA-256 (64 hex digits)"
        )))
    }
}

/// Reads the manifest at `location` and returns it with the image's own
/// location (its `url`, resolved next to the manifest).
pub fn load(location: &Location, options: &HttpOptions) -> Result<(ImageManifest, Location)> {
    let bytes = source::read_small(location, MANIFEST_LIMIT, options).map_err(|e| match e {
        Error::InvalidArgument(msg) => Error::ManifestInvalid(msg),
        other => other,
    })?;
    let manifest = parse(&bytes).map_err(|e| match e {
        Error::ManifestInvalid(msg) => Error::ManifestInvalid(format!("{location}: {msg}")),
        other => other,
    })?;
    let image = location.join(&manifest.url)?;
    Ok((manifest, image))
}

/// Parses and checks a manifest's text.
pub fn parse(bytes: &[u8]) -> Result<ImageManifest> {
    let mut manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| Error::ManifestInvalid(e.to_string()))?;
    manifest.sha256 = parse_sha256(&manifest.sha256).map_err(|_| {
        Error::ManifestInvalid(format!("sha256 '{}' is not 64 hex digits", manifest.sha256))
    })?;
    if manifest.url.trim().is_empty() {
        return Err(Error::ManifestInvalid("url is empty".into()));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn a_valid_manifest_parses_and_its_hash_is_normalised() {
        let text = format!(
            r#"{{"name":"os","url":"os.zst","format":"zstd","size":5,"sha256":"{}"}}"#,
            HASH.to_uppercase()
        );
        let manifest = parse(text.as_bytes()).expect("valid");
        assert_eq!(manifest.sha256, HASH);
    }

    #[test]
    fn bad_manifests_say_what_is_wrong() {
        let cases = [
            (
                r#"{"name":"os","url":"os.zst","format":"zstd","size":5,"sha256":"abc"}"#,
                "sha256",
            ),
            (
                r#"{"name":"os","url":"os.zst","format":"bzip2","size":5,"sha256":"abc"}"#,
                "bzip2",
            ),
            (
                r#"{"name":"os","url":"os.zst","format":"zstd","sha256":"abc"}"#,
                "size",
            ),
            ("not json", "expected"),
        ];
        for (text, needle) in cases {
            let err = parse(text.as_bytes()).expect_err(text);
            assert_eq!(err.code(), "ManifestInvalid");
            assert!(
                err.to_string().contains(needle),
                "{err} should mention {needle}"
            );
        }
    }

    #[test]
    fn sha256_arguments_are_checked() {
        assert_eq!(parse_sha256(HASH).expect("valid"), HASH);
        assert!(parse_sha256("xyz").is_err());
        assert!(parse_sha256(&HASH[1..]).is_err());
    }
}
