//! Running the real `reimagectl` against test agents.

use crate::bin::binary;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

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
