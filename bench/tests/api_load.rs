//! `api-load` checks its arguments. (Being an integration test of this
//! package also makes `cargo test --workspace` build the binary, which
//! `tests/load.rs` drives.)

use std::process::Command;

#[test]
fn api_load_without_its_arguments_prints_its_usage_and_fails() {
    let output = Command::new(env!("CARGO_BIN_EXE_api-load"))
        .arg("http://127.0.0.1:1/")
        .output()
        .expect("api-load runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("usage: api-load URL TOKEN RATE SECONDS"),
        "{stderr}"
    );
}
