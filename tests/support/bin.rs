//! Running the project's real binaries.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of a binary of this workspace, built next to the test executable
/// (`cargo test --workspace` builds them before running any test).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` (cargo test --workspace does)",
        path.display()
    );
    path
}

/// `reimage-agent` with `args`.
pub fn agent(args: &[&str]) -> Command {
    let mut command = Command::new(binary("reimage-agent"));
    command.args(args).env("RUST_LOG", "info");
    command
}

/// Runs `command` and returns its output, printing stderr for the test log.
pub fn run(command: &mut Command) -> Output {
    let output = command.output().expect("binary runs");
    eprintln!(
        "--- stderr of {command:?}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The binary's stderr as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
