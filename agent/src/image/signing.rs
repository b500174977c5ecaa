//! Signing manifests with minisign (ed25519): key pairs and detached
//! `<file>.minisig` signatures that `[image] trusted_keys` and
//! `write --trusted-key` verify. Keys are those of the `minisign` tool.

use crate::{Error, Result};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{what}: {e}"))
}

/// Writes `NAME.pub` and `NAME.key` (mode 0600, created with it). With a
/// password the secret key is encrypted, as the minisign tool does.
/// Returns the public key's base64 line, for `trusted_keys`.
pub fn keygen(name: &Path, password: Option<String>) -> Result<String> {
    let pair = match password {
        Some(password) => minisign::KeyPair::generate_encrypted_keypair(Some(password)),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|e| failed("generating a key pair", e))?;
    let public = with_suffix(name, ".pub");
    let secret = with_suffix(name, ".key");
    let secret_box = pair
        .sk
        .to_box(Some("reimage-agent image signing key"))
        .map_err(|e| failed("encoding the secret key", e))?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret)
        .and_then(|mut f| f.write_all(secret_box.to_string().as_bytes()))
        .map_err(|e| Error::io(format!("creating {}", secret.display()), e))?;
    let public_box = pair
        .pk
        .to_box()
        .map_err(|e| failed("encoding the public key", e))?;
    fs::write(&public, public_box.to_string())
        .map_err(|e| Error::io(format!("writing {}", public.display()), e))?;
    Ok(pair.pk.to_base64())
}

/// Signs `file` with the secret key at `secret_key`, writing
/// `<file>.minisig`. An encrypted key needs `password` (or is asked for
/// on the terminal by minisign).
pub fn sign(file: &Path, secret_key: &Path, password: Option<String>) -> Result<PathBuf> {
    let text = fs::read_to_string(secret_key)
        .map_err(|e| Error::io(format!("reading {}", secret_key.display()), e))?;
    let key_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| {
        failed(
            &format!("{} is not a minisign secret key", secret_key.display()),
            e,
        )
    })?;
    let unencrypted = minisign::SecretKey::from_unencrypted_box(key_box.clone());
    let key = match (unencrypted, password) {
        (Ok(key), _) => key,
        (Err(_), password) => minisign::SecretKey::from_box(key_box, password)
            .map_err(|e| failed(&format!("opening {}", secret_key.display()), e))?,
    };
    let data = fs::read(file).map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let signature = minisign::sign(None, &key, &data[..], Some(&format!("file:{name}")), None)
        .map_err(|e| failed(&format!("signing {}", file.display()), e))?;
    let out = with_suffix(file, ".minisig");
    fs::write(&out, signature.to_string())
        .map_err(|e| Error::io(format!("writing {}", out.display()), e))?;
    Ok(out)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::verify_signature;

    #[test]
    fn a_generated_key_signs_what_its_public_key_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let public = keygen(&dir.path().join("release"), None).expect("keygen");
        let secret = dir.path().join("release.key");
        let mode = fs::metadata(&secret).expect("key").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let manifest = dir.path().join("os.manifest.json");
        fs::write(&manifest, b"{\"name\":\"os\"}").expect("manifest");
        let signature = sign(&manifest, &secret, None).expect("signs");
        let bytes = fs::read(&manifest).expect("manifest");
        verify_signature(
            &bytes,
            &fs::read(&signature).expect("sig"),
            std::slice::from_ref(&public),
        )
        .expect("verifies");
        let pub_file = fs::read_to_string(dir.path().join("release.pub")).expect("pub");
        verify_signature(&bytes, &fs::read(&signature).expect("sig"), &[pub_file])
            .expect("the .pub file works as a trusted key");
        let err = verify_signature(
            b"{\"name\":\"evil\"}",
            &fs::read(&signature).expect("sig"),
            &[public],
        )
        .expect_err("tampered");
        assert_eq!(err.code(), "ManifestSignatureInvalid");
    }

    #[test]
    fn an_encrypted_key_needs_its_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        keygen(&dir.path().join("k"), Some("correct horse".into())).expect("keygen");
        let file = dir.path().join("m.json");
        fs::write(&file, b"{}").expect("file");
        let secret = dir.path().join("k.key");
        assert!(sign(&file, &secret, Some("wrong".into())).is_err());
        sign(&file, &secret, Some("correct horse".into())).expect("signs with the password");
    }

    #[test]
    fn keygen_never_overwrites_a_secret_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        keygen(&dir.path().join("k"), None).expect("first");
        assert!(keygen(&dir.path().join("k"), None).is_err());
    }
}
