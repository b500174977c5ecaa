//! The `reimage-agent` command line: bad input gets one clear error line,
//! a non-zero exit, and leaves the target as it was.

use std::fs;
use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reimage-agent"))
        .args(args)
        .output()
        .expect("reimage-agent runs")
}

fn error_line(output: &Output) -> String {
    assert!(!output.status.success(), "must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line in: {stderr}");
    errors[0].to_string()
}

#[test]
fn a_malformed_sha256_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("disk.img");
    fs::write(&target, b"keep me").expect("target");
    let line = error_line(&agent(&[
        "write",
        "--image",
        "os.img",
        "--sha256",
        "abc",
        "--target",
        target.to_str().expect("path"),
    ]));
    assert!(
        line.contains("InvalidArgument") && line.contains("'abc'"),
        "{line}"
    );
    assert_eq!(fs::read(&target).expect("target"), b"keep me");
}

#[test]
fn a_missing_image_file_is_named_and_the_target_is_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("disk.img");
    fs::write(&target, vec![7u8; 1 << 20]).expect("target");
    let line = error_line(&agent(&[
        "write",
        "--image",
        "/nonexistent/os.img",
        "--target",
        target.to_str().expect("path"),
    ]));
    assert!(line.contains("/nonexistent/os.img"), "{line}");
    assert_eq!(fs::read(&target).expect("target"), vec![7u8; 1 << 20]);
}

#[test]
fn an_image_or_a_manifest_is_required() {
    let line = error_line(&agent(&["write", "--target", "/tmp/x.img"]));
    assert!(
        line.contains("--image") && line.contains("--manifest"),
        "{line}"
    );
}

#[test]
fn a_directory_is_not_a_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("os.img");
    fs::write(&image, vec![0u8; 4096]).expect("image");
    let line = error_line(&agent(&[
        "write",
        "--image",
        image.to_str().expect("path"),
        "--target",
        dir.path().to_str().expect("path"),
    ]));
    assert!(line.contains("InvalidArgument"), "{line}");
}

#[test]
fn a_progress_fd_that_is_not_open_is_refused_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("os.img");
    fs::write(&image, vec![1u8; 4096]).expect("image");
    let target = dir.path().join("disk.img");
    fs::write(&target, b"keep me").expect("target");
    let line = error_line(&agent(&[
        "write",
        "--image",
        image.to_str().expect("path"),
        "--target",
        target.to_str().expect("path"),
        "--progress-fd",
        "97",
    ]));
    assert!(line.contains("--progress-fd 97"), "{line}");
    assert_eq!(fs::read(&target).expect("target"), b"keep me");
}

#[test]
fn a_raw_image_without_a_table_writes_to_a_new_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("fs.img");
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
    fs::write(&image, &data).expect("image");
    let target = dir.path().join("copy.img");
    fs::write(&target, b"").expect("empty target");
    let output = agent(&[
        "write",
        "--image",
        image.to_str().expect("path"),
        "--target",
        target.to_str().expect("path"),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(fs::read(&target).expect("target") == data, "an exact copy");
}

#[test]
fn a_raw_image_larger_than_the_target_is_refused_before_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("os.img");
    fs::write(&image, vec![5u8; 3 << 20]).expect("image");
    let target = dir.path().join("disk.img");
    fs::write(&target, vec![9u8; 1 << 20]).expect("target");
    let line = error_line(&agent(&[
        "write",
        "--image",
        image.to_str().expect("path"),
        "--target",
        target.to_str().expect("path"),
    ]));
    assert!(line.contains("TargetTooSmall"), "{line}");
    assert_eq!(
        fs::read(&target).expect("target"),
        vec![9u8; 1 << 20],
        "untouched"
    );
}

#[test]
fn the_demo_runs_a_whole_cycle_and_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_reimage-agent"))
        .arg("demo")
        .env("TMPDIR", dir.path())
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for option in ["requeue", "terminate", "taskcompletion", "retaineddata"] {
        assert!(
            stdout.contains(&format!("nodeReimageOption \"{option}\"")),
            "{stdout}"
        );
    }
    assert_eq!(stdout.matches("(unchanged)").count(), 4, "{stdout}");
    assert!(stdout.contains("done: four reimages"), "{stdout}");
    let left: Vec<_> = fs::read_dir(dir.path()).expect("tempdir").collect();
    assert!(left.is_empty(), "the sandbox is removed");
}

#[test]
fn keygen_sign_and_verify_round_trip_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = dir.path().join("release");
    let keygen = agent(&["image", "keygen", "-o", name.to_str().expect("path")]);
    assert!(
        keygen.status.success(),
        "{}",
        String::from_utf8_lossy(&keygen.stderr)
    );
    let manifest = dir.path().join("os.manifest.json");
    fs::write(
        &manifest,
        format!(
            r#"{{"name":"os","url":"os.img","format":"raw","size":1,"sha256":"{}"}}"#,
            "a".repeat(64)
        ),
    )
    .expect("manifest");
    let sign = agent(&[
        "image",
        "sign",
        manifest.to_str().expect("path"),
        "--secret-key",
        dir.path().join("release.key").to_str().expect("path"),
    ]);
    assert!(
        sign.status.success(),
        "{}",
        String::from_utf8_lossy(&sign.stderr)
    );
    let public = dir.path().join("release.pub");
    let verify = |key: &str| {
        agent(&[
            "image",
            "verify",
            manifest.to_str().expect("path"),
            "--trusted-key",
            key,
        ])
    };
    let ok = verify(public.to_str().expect("path"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("signature ok"));
    fs::write(&manifest, b"{\"name\":\"changed\"}").expect("tamper");
    let line = error_line(&verify(public.to_str().expect("path")));
    assert!(line.contains("ManifestSignatureInvalid"), "{line}");
}
