//! Running the real `reimagectl` against test agents.

use crate::bin::binary;
use crate::http_server::{Fault, FaultServer};
use crate::images::{os_image, sha256, zstd};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

/// `reimagectl --token-file TOKEN_FILE ARGS...`, without `$REIMAGE_TOKEN`
/// from the test's environment, and with the default journals of rollouts
/// in the temporary directory rather than the user's state directory.
pub fn reimagectl(token_file: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(binary("reimagectl"));
    command
        .arg("--token-file")
        .arg(token_file)
        .args(args)
        .env_remove("REIMAGE_TOKEN")
        .env(
            "XDG_STATE_HOME",
            std::env::temp_dir().join("reimage-tests-state"),
        );
    command
}

/// Writes `token` to `dir/NAME.token` with the trailing newline an operator's
/// editor (or the sandbox) leaves, and returns the path.
pub fn token_file(dir: &Path, name: &str, token: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, format!("{token}\n")).expect("write token file");
    path
}

/// stdout as the one JSON document `--output json` prints.
pub fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// stdout as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An 8 MiB OS image served from 127.0.0.1 with `fault` (a slow server
/// keeps operations in flight long enough to be seen), and the SHA-256
/// that `reimagectl` is told it has.
pub struct ServedImage {
    pub server: FaultServer,
    pub sha256: String,
}

impl ServedImage {
    pub fn serve(fault: Fault) -> ServedImage {
        let raw = os_image(8, 1, 7);
        ServedImage {
            server: FaultServer::start(vec![("/os.img.zst".into(), Arc::new(zstd(&raw)))], fault),
            sha256: sha256(&raw),
        }
    }

    /// The same image, announced with a hash it does not have: every
    /// write of it fails its verification.
    pub fn with_wrong_hash() -> ServedImage {
        let mut image = ServedImage::serve(Fault::None);
        image.sha256 = sha256(b"not this image");
        image
    }

    /// `--image-url U --sha256 H`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--image-url".into(),
            self.server.url("/os.img.zst"),
            "--sha256".into(),
            self.sha256.clone(),
        ]
    }
}

/// An RFC 3339 timestamp of the agent's JSON.
pub fn time(value: &Value) -> jiff::Timestamp {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a timestamp: {value}"))
}
