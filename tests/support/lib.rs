//! The workspace's one test-support crate: the agent's unit tests and
//! `agent/tests` use it as a dev-dependency, the end-to-end tests in
//! `tests/` as their library. It holds one way to say why a test skips,
//! one root check, commands that report why they failed, loop devices and
//! mounts, the real binaries, test disks and images, and a fault-injecting
//! HTTP server.

pub mod bin;
pub mod ctl;
pub mod daemon;
pub mod faulty_disk;
pub mod http_server;
pub mod images;
pub mod loopdev;
pub mod mount;
pub mod pki;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

/// What tests return, so they can use `?`.
pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Says why a test did not run; a test that skips must never look passed.
pub fn skip(test: &str, reason: &str) {
    eprintln!("skipping {test}: {reason}");
}

/// Whether the tests run as root (uid 0).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `Err(reason)` unless the tests run as root; `needs` says what for.
pub fn require_root(needs: &str) -> Result<(), String> {
    if is_root() {
        Ok(())
    } else {
        Err(format!("{needs} needs root"))
    }
}

/// Runs a command, returning its stdout or why it failed.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `len` random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    fastrand::fill(&mut bytes);
    bytes
}
