//! `reimage-agent write` from a real HTTP server on 127.0.0.1 with injected
//! faults: each ends in a byte-exact disk or a clean failure that leaves the
//! saved partition intact and only it in the partition table.

use reimage_e2e::bin::{agent, run, stderr};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{
    MIB, labels, os_image, partition_sha256, read_range, sha256, target_disk, zstd,
};
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

struct Case {
    _dir: tempfile::TempDir,
    target: PathBuf,
    storage_sha: String,
    raw: Vec<u8>,
    server: FaultServer,
}

/// A 24 MiB image (zstd) served with `fault`, and a 64 MiB target.
fn case(fault: Fault) -> Case {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("disk.img");
    let storage_sha = target_disk(&target, 64, 16, 21);
    // No zero runs: the compressed stream stays large enough to cut often.
    let raw = os_image(24, 0, 22);
    let server = FaultServer::start(vec![("/os.img.zst".into(), Arc::new(zstd(&raw)))], fault);
    Case {
        _dir: dir,
        target,
        storage_sha,
        raw,
        server,
    }
}

impl Case {
    fn write(&self, extra: &[&str]) -> Output {
        let url = self.server.url("/os.img.zst");
        let sha = sha256(&self.raw);
        let mut args = vec![
            "write",
            "--image",
            &url,
            "--sha256",
            &sha,
            "--target",
            self.target.to_str().expect("utf-8 path"),
            "--save-partlabel",
            "local-storage",
        ];
        args.extend_from_slice(extra);
        run(&mut agent(&args))
    }

    fn assert_written(&self, output: &Output) {
        assert!(output.status.success(), "write failed: {}", stderr(output));
        let start = 34 * 512;
        let on_disk = read_range(&self.target, start, self.raw.len() as u64);
        assert!(on_disk == self.raw[start as usize..], "byte-exact image");
        self.assert_storage_intact();
    }

    fn assert_failed_cleanly(&self, output: &Output, code: &str) {
        assert!(!output.status.success(), "must fail");
        let err = stderr(output);
        assert!(err.contains(code), "names {code}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error: ")).count(),
            1,
            "one error line"
        );
        self.assert_storage_intact();
        let labels = labels(&self.target);
        assert!(
            !labels.contains(&"root".to_string()),
            "no table points at the image: {labels:?}"
        );
    }

    fn assert_storage_intact(&self) {
        let (sha, entry) = partition_sha256(&self.target, "local-storage").expect("in the table");
        assert_eq!(sha, self.storage_sha, "local-storage bytes unchanged");
        assert_eq!(entry.unique_partition_guid, [0xa2; 16]);
    }

    fn ranged_requests(&self) -> usize {
        self.server
            .requests()
            .iter()
            .filter(|r| r.range.is_some())
            .count()
    }
}

#[test]
fn a_plain_download_is_written_byte_exact() {
    let case = case(Fault::None);
    case.assert_written(&case.write(&[]));
}

#[test]
fn dropped_connections_resume_with_range() {
    let case = case(Fault::DropEvery(MIB));
    case.assert_written(&case.write(&[]));
    assert!(
        case.ranged_requests() >= 2,
        "resumed: {:?}",
        case.server.requests()
    );
}

#[test]
fn a_stall_reconnects_and_resumes() {
    let case = case(Fault::StallOnce {
        after: 2 * MIB,
        for_: Duration::from_secs(30),
    });
    case.assert_written(&case.write(&["--stall-timeout", "1"]));
    assert!(case.ranged_requests() >= 1, "resumed after the stall");
}

#[test]
fn a_server_without_range_support_is_restarted_cleanly() {
    let case = case(Fault::All(vec![
        Fault::IgnoreRange,
        Fault::DropOnceAt(3 * MIB),
    ]));
    case.assert_written(&case.write(&[]));
}

#[test]
fn a_file_changed_mid_download_is_never_spliced() {
    let other = Arc::new(zstd(&os_image(24, 0, 23)));
    let case = case(Fault::ChangeAfter {
        after: 2 * MIB,
        replacement: other,
    });
    let output = case.write(&["--retries", "2"]);
    case.assert_failed_cleanly(&output, "DownloadFailed");
    assert!(stderr(&output).contains("changed"), "says the file changed");
}

#[test]
fn a_body_that_always_ends_early_is_truncated() {
    let case = case(Fault::TruncateAt(3 * MIB));
    let output = case.write(&["--retries", "2"]);
    case.assert_failed_cleanly(&output, "ImageTruncated");
}

#[test]
fn a_content_length_beyond_the_file_fails() {
    let case = case(Fault::ContentLengthExtra(4096));
    let output = case.write(&["--retries", "2"]);
    case.assert_failed_cleanly(&output, "ImageTruncated");
}

#[test]
fn a_content_length_short_of_the_file_fails() {
    let case = case(Fault::ContentLengthShort(4096));
    let output = case.write(&["--retries", "2"]);
    case.assert_failed_cleanly(&output, "ImageTruncated");
}

#[test]
fn a_missing_image_fails_before_the_disk_is_touched() {
    let case = case(Fault::Status(404));
    let before = sha256(&std::fs::read(&case.target).expect("target"));
    let output = case.write(&[]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("DownloadFailed") && stderr(&output).contains("404"));
    assert_eq!(
        before,
        sha256(&std::fs::read(&case.target).expect("target")),
        "untouched"
    );
}

#[test]
fn a_manifest_served_over_http_points_at_its_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("disk.img");
    let storage_sha = target_disk(&target, 64, 16, 31);
    let raw = os_image(16, 1, 32);
    let manifest = format!(
        r#"{{"name":"os","url":"os.img.zst","format":"zstd","size":{},"sha256":"{}"}}"#,
        raw.len(),
        sha256(&raw)
    );
    let server = FaultServer::start(
        vec![
            ("/images/os.img.zst".into(), Arc::new(zstd(&raw))),
            (
                "/images/os.manifest.json".into(),
                Arc::new(manifest.into_bytes()),
            ),
        ],
        Fault::None,
    );
    let output = run(&mut agent(&[
        "write",
        "--manifest",
        &server.url("/images/os.manifest.json"),
        "--target",
        target.to_str().expect("path"),
        "--save-partlabel",
        "local-storage",
    ]));
    assert!(output.status.success(), "write failed: {}", stderr(&output));
    assert_eq!(
        partition_sha256(&target, "local-storage").expect("kept").0,
        storage_sha
    );
    let paths: Vec<String> = server.requests().iter().map(|r| r.path.clone()).collect();
    assert!(
        paths.contains(&"/images/os.img.zst".to_string()),
        "{paths:?}"
    );
}

#[test]
fn a_one_byte_per_second_server_ends_in_a_clean_failure_within_the_window() {
    let case = case(Fault::SlowBytesPerSec(1));
    let before = sha256(&std::fs::read(&case.target).expect("target"));
    let started = std::time::Instant::now();
    let output = case.write(&[
        "--min-rate",
        "100",
        "--min-rate-window",
        "2",
        "--retries",
        "1",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "ended within the deadlines"
    );
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("DownloadFailed") && err.contains("below the minimum"),
        "{err}"
    );
    // Not even the held first MiB arrived: the disk was never touched.
    let after = sha256(&std::fs::read(&case.target).expect("target"));
    assert_eq!(before, after);
    case.assert_storage_intact();
}
