//! `reimage-agent check-config`, run as the real binary on real files.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn check_config(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reimage-agent"))
        .arg("check-config")
        .arg(path)
        .output()
        .expect("reimage-agent runs")
}

fn shipped_example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/agent.toml")
}

/// The single `error:` line of a failed run.
fn error_line(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "exit 1");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line in: {stderr}");
    errors[0].to_string()
}

#[test]
fn the_shipped_example_is_ok_and_summarised() {
    let path = shipped_example();
    let output = check_config(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with(&format!("{}: ok\n", path.display())),
        "{stdout}"
    );
    for expected in [
        "node id:   node-0017",
        "listen:    0.0.0.0:7480",
        "tokens:    1 admin, 0 operator, 1 reader",
        "target:    /dev/disk/by-id/",
        "saved:     label local-storage",
        "reboot:    systemd",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in:\n{stdout}");
    }
}

#[test]
fn a_misspelt_key_names_the_file_the_key_and_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let example = fs::read_to_string(shipped_example()).expect("example");
    // A typo that, were it ignored, would leave the local storage unsaved.
    let typo = example.replace("save_partlabel = ", "save_partlable = ");
    let line = typo
        .lines()
        .position(|l| l.starts_with("save_partlable"))
        .expect("typo line")
        + 1;
    fs::write(&path, typo).expect("write");

    let error = error_line(&check_config(&path));
    assert!(
        error.starts_with(&format!(
            "error: {}: ConfigInvalid: line {line}, ",
            path.display()
        )),
        "{error}"
    );
    assert!(
        error.contains("unknown key `disk.save_partlable`"),
        "{error}"
    );
}

#[test]
fn a_bad_value_names_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let example = fs::read_to_string(shipped_example()).expect("example");
    fs::write(
        &path,
        example.replace("role = \"reader\"", "role = \"root\""),
    )
    .expect("write");
    let error = error_line(&check_config(&path));
    assert!(
        error.contains("ConfigInvalid") && error.contains("api.tokens[1].role"),
        "{error}"
    );
    assert!(error.contains("`root`"), "{error}");
}

#[test]
fn a_missing_file_is_an_invalid_config() {
    let error = error_line(&check_config(Path::new("/nonexistent/agent.toml")));
    assert!(
        error.starts_with("error: /nonexistent/agent.toml: ConfigInvalid: cannot read"),
        "{error}"
    );
}

#[test]
fn a_tls_file_that_cannot_be_read_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let example = fs::read_to_string(shipped_example()).expect("example");
    let cert = dir.path().join("cert.pem");
    fs::write(&cert, "not really a certificate").expect("cert");
    let text = example.replace(
        "[api]\n",
        &format!(
            "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            dir.path().join("missing-key.pem").display()
        ),
    );
    fs::write(&path, text).expect("write");
    let error = error_line(&check_config(&path));
    assert!(
        error.contains("tls_key") && error.contains("missing-key.pem"),
        "{error}"
    );
}

#[test]
fn a_tls_file_that_is_not_pem_fails_the_check_as_it_would_fail_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    let example = fs::read_to_string(shipped_example()).expect("example");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    fs::write(&cert, "not really a certificate").expect("cert");
    fs::write(&key, "not really a key").expect("key");
    let text = example.replace(
        "[api]\n",
        &format!(
            "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    fs::write(&path, text).expect("write");
    let error = error_line(&check_config(&path));
    assert!(
        error.contains("ConfigInvalid") && error.contains("cert.pem"),
        "{error}"
    );
}
