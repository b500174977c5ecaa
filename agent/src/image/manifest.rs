//! Loading and checking image manifests.

use crate::image::digest::parse_sha256_hex;
use crate::image::http::HttpOptions;
use crate::image::source::{self, Location};
use crate::{Error, Result};
use reimage_protocol::ImageManifest;

/// Manifests are small; anything larger is not one.
const MANIFEST_LIMIT: u64 = 64 * 1024;

/// Detached signatures are a few hundred bytes.
const SIGNATURE_LIMIT: u64 = 4096;

/// Reads the manifest at `location` and returns it with the image's own
/// location (its `url`, resolved next to the manifest). With `trusted_keys`,
/// its detached minisign signature `<manifest>.minisig` must verify with
/// one of them before the manifest is even parsed.
pub fn load(
    location: &Location,
    options: &HttpOptions,
    trusted_keys: &[String],
) -> Result<(ImageManifest, Location)> {
    let bytes = source::read_small(location, MANIFEST_LIMIT, options).map_err(|e| match e {
        Error::InvalidArgument(msg) => Error::ManifestInvalid(msg),
        other => other,
    })?;
    if !trusted_keys.is_empty() {
        let signature_at = location.with_suffix(".minisig");
        let signature =
            source::read_small(&signature_at, SIGNATURE_LIMIT, options).map_err(|e| {
                Error::ManifestUnsigned(format!("{location}: no signature at {signature_at} ({e})"))
            })?;
        verify_signature(&bytes, &signature, trusted_keys).map_err(|e| match e {
            Error::ManifestSignatureInvalid(msg) => {
                Error::ManifestSignatureInvalid(format!("{location}: {msg}"))
            }
            other => other,
        })?;
    }
    let manifest = parse(&bytes).map_err(|e| match e {
        Error::ManifestInvalid(msg) => Error::ManifestInvalid(format!("{location}: {msg}")),
        other => other,
    })?;
    let image = location.join(&manifest.url)?;
    Ok((manifest, image))
}

/// Checks a detached minisign `signature` of `manifest` against each of
/// `trusted_keys` (base64 public keys, or the two-line `.pub` file text).
pub fn verify_signature(manifest: &[u8], signature: &[u8], trusted_keys: &[String]) -> Result<()> {
    let text = std::str::from_utf8(signature)
        .map_err(|_| Error::ManifestSignatureInvalid("the signature is not text".into()))?;
    let signature = minisign_verify::Signature::decode(text).map_err(|e| {
        Error::ManifestSignatureInvalid(format!("the signature cannot be read: {e}"))
    })?;
    let mut reasons = Vec::new();
    for key in trusted_keys {
        let base64 = key
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("");
        match minisign_verify::PublicKey::from_base64(base64) {
            Ok(public) => match public.verify(manifest, &signature, false) {
                Ok(()) => return Ok(()),
                Err(e) => reasons.push(e.to_string()),
            },
            Err(e) => reasons.push(format!("trusted key '{base64}' cannot be read: {e}")),
        }
    }
    Err(Error::ManifestSignatureInvalid(format!(
        "no trusted key verifies it ({})",
        reasons.join("; ")
    )))
}

/// Parses and checks a manifest's text.
pub fn parse(bytes: &[u8]) -> Result<ImageManifest> {
    let mut manifest: ImageManifest =
        serde_json::from_slice(bytes).map_err(|e| Error::ManifestInvalid(e.to_string()))?;
    manifest.sha256 = parse_sha256_hex(&manifest.sha256)
        .map_err(|e| Error::ManifestInvalid(format!("sha256 '{}': {e}", manifest.sha256)))?;
    if manifest.url.trim().is_empty() {
        return Err(Error::ManifestInvalid("url is empty".into()));
    }
    if let Some(loader) = manifest.boot.as_ref().and_then(|b| b.loader.as_deref()) {
        check_loader(loader)?;
    }
    Ok(manifest)
}

/// A loader path as a boot entry's `File()` node holds it: absolute on the
/// ESP, backslashes, printable ASCII, at most 255 characters.
fn check_loader(loader: &str) -> Result<()> {
    let fine = loader.starts_with('\\')
        && loader.len() <= 255
        && !loader.contains('/')
        && loader.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if fine {
        Ok(())
    } else {
        Err(Error::ManifestInvalid(format!(
            "boot.loader {loader:?}: give an absolute path on the EFI system partition with backslashes, such as \\EFI\\BOOT\\BOOTX64.EFI"
        )))
    }
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
        let with_loader = text.replace('}', r#","boot":{"loader":"\\EFI\\debian\\grubx64.efi"}}"#);
        let manifest = parse(with_loader.as_bytes()).expect("valid");
        let loader = manifest.boot.and_then(|b| b.loader);
        assert_eq!(loader.as_deref(), Some("\\EFI\\debian\\grubx64.efi"));
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
            (
                r#"{"name":"os","url":"os.zst","format":"zstd","size":5,"sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","boot":{"loader":"/EFI/BOOT/BOOTX64.EFI"}}"#,
                "boot.loader",
            ),
            (
                r#"{"name":"os","url":"os.zst","format":"zstd","size":5,"sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","boot":{"kernel":"x"}}"#,
                "kernel",
            ),
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

    fn signed(data: &[u8]) -> (String, String) {
        let minisign::KeyPair { pk, sk } =
            minisign::KeyPair::generate_unencrypted_keypair().expect("keypair");
        let signature = minisign::sign(Some(&pk), &sk, data, Some("test"), None).expect("signs");
        (pk.to_base64(), signature.to_string())
    }

    #[test]
    fn a_signature_by_a_trusted_key_verifies() {
        let manifest = br#"{"name":"os"}"#;
        let (key, signature) = signed(manifest);
        let (other_key, _) = signed(b"x");
        verify_signature(manifest, signature.as_bytes(), &[other_key, key.clone()])
            .expect("one trusted key verifies");
        let pub_file = format!("untrusted comment: minisign public key\n{key}\n");
        verify_signature(manifest, signature.as_bytes(), &[pub_file])
            .expect("the .pub text works too");
    }

    #[test]
    fn tampered_manifests_foreign_keys_and_garbage_are_refused() {
        let manifest = br#"{"name":"os","size":1}"#;
        let (key, signature) = signed(manifest);
        let (other_key, _) = signed(b"x");
        let cases: [(&[u8], &[u8], &str); 4] = [
            (br#"{"name":"os","size":2}"#, signature.as_bytes(), &key),
            (manifest, signature.as_bytes(), &other_key),
            (manifest, b"not a signature", &key),
            (manifest, signature.as_bytes(), "RWQnot-a-key"),
        ];
        for (data, sig, trusted) in cases {
            let err = verify_signature(data, sig, &[trusted.to_string()]).expect_err("refused");
            assert_eq!(err.code(), "ManifestSignatureInvalid", "{err}");
        }
    }
}
