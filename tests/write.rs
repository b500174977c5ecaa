//! `reimage-agent write` end to end: the real binary, real files and loop
//! devices; after every run the saved partition's SHA-256 is checked.

use reimage_e2e::bin::{agent, run, stderr};
use reimage_e2e::images::{
    MIB, assert_saved_only, labels, os_image, partition_labels, partition_sha256, read_range,
    sha256, target_disk, zstd,
};
use reimage_e2e::loopdev::LoopDevice;
use reimage_e2e::skip;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

const DISK_MIB: u64 = 64;
const STORAGE_MIB: u64 = 16;

struct Lab {
    /// Detached before `dir` goes away (fields drop in order).
    _device: Option<LoopDevice>,
    dir: tempfile::TempDir,
    target: PathBuf,
    storage_sha: String,
}

/// What the target is: a regular file, or a loop device over one.
enum On {
    File,
    LoopDevice,
}

impl Lab {
    /// A 64 MiB target file of random bytes with local-storage in its last 16 MiB.
    fn new() -> Lab {
        Lab::on(On::File, "file target").expect("file targets always work")
    }

    /// A target file of `disk_mib` MiB, local-storage in its last 16 MiB.
    fn big(disk_mib: u64) -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("disk.img");
        let storage_sha = target_disk(&target, disk_mib, STORAGE_MIB, 11);
        Lab {
            _device: None,
            dir,
            target,
            storage_sha,
        }
    }

    /// The same target as a file or behind a loop device; `None` (after
    /// saying why) when loop devices cannot be used here.
    fn on(kind: On, test: &str) -> Option<Lab> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.img");
        let storage_sha = target_disk(&file, DISK_MIB, STORAGE_MIB, 11);
        let (device, target) = match kind {
            On::File => (None, file),
            On::LoopDevice => match LoopDevice::attach(&file, true) {
                Ok(device) => {
                    let path = device.path.clone();
                    (Some(device), path)
                }
                Err(why) => {
                    skip(&format!("{test} on a loop device"), &why);
                    return None;
                }
            },
        };
        Some(Lab {
            _device: device,
            dir,
            target,
            storage_sha,
        })
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, bytes).expect("write test file");
        path
    }

    fn write(&self, image: &Path, extra: &[&str]) -> Output {
        write(image, &self.target, "local-storage", extra)
    }

    /// The saved partition is byte-for-byte what it was, and in the table.
    fn assert_storage_intact(&self) {
        let (sha, entry) = partition_sha256(&self.target, "local-storage")
            .expect("local-storage is still in the partition table");
        assert_eq!(sha, self.storage_sha, "local-storage bytes changed");
        assert_eq!(entry.unique_partition_guid, [0xa2; 16], "GUID kept");
    }

    /// After a failure both table copies hold the saved partition and
    /// nothing else.
    fn assert_reset_to_saved_only(&self) {
        assert_saved_only(&self.target, &self.storage_sha);
        self.assert_storage_intact();
    }
}

/// `reimage-agent write --image IMAGE --target TARGET --save-partlabel SAVE EXTRA…`
fn write(image: &Path, target: &Path, save: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "write",
        "--image",
        image.to_str().expect("utf-8 path"),
        "--target",
        target.to_str().expect("utf-8 path"),
        "--save-partlabel",
        save,
    ];
    args.extend_from_slice(extra);
    run(&mut agent(&args))
}

/// The image's bytes past the partition table sectors are on the target.
fn assert_image_on_target(target: &Path, image: &[u8]) {
    let start = 34 * 512;
    let on_disk = read_range(target, start, image.len() as u64);
    assert!(
        on_disk == image[start as usize..],
        "image bytes differ on the target"
    );
}

fn writes_byte_exact_and_keeps_local_storage(lab: &Lab) {
    let raw = os_image(24, 2, 1);
    let image = lab.file("os.img.zst", &zstd(&raw));
    let output = lab.write(&image, &["--sha256", &sha256(&raw)]);
    assert!(output.status.success(), "write failed: {}", stderr(&output));

    assert_image_on_target(&lab.target, &raw);
    assert_eq!(
        &read_range(&lab.target, 0, 440)[..],
        &raw[..440],
        "boot code written"
    );
    let labels = partition_labels(&lab.target);
    assert_eq!(
        labels,
        vec![
            (1, "efi".into()),
            (2, "root".into()),
            (3, "local-storage".into())
        ]
    );
    lab.assert_storage_intact();
}

fn checksum_mismatch_leaves_the_saved_only_table(lab: &Lab) {
    let raw = os_image(24, 2, 2);
    let image = lab.file("os.img.zst", &zstd(&raw));
    let output = lab.write(&image, &["--sha256", &"0".repeat(64)]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("error: "), "one error line");
    assert!(
        stderr(&output).contains("ImageChecksumMismatch"),
        "names the code"
    );
    lab.assert_reset_to_saved_only();
}

fn truncated_stream_leaves_the_saved_only_table(lab: &Lab) {
    let raw = os_image(24, 2, 3);
    let mut packed = zstd(&raw);
    packed.truncate(packed.len() / 2);
    let image = lab.file("os.img.zst", &packed);
    let output = lab.write(&image, &["--sha256", &sha256(&raw)]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("ImageTruncated"), "names the code");
    lab.assert_reset_to_saved_only();
}

#[test]
fn trailing_garbage_fails_and_keeps_local_storage() {
    let lab = Lab::new();
    let raw = os_image(24, 2, 4);
    let mut packed = zstd(&raw);
    packed.extend_from_slice(b"appended by an attacker");
    let image = lab.file("os.img.zst", &packed);
    let output = lab.write(&image, &["--sha256", &sha256(&raw)]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("ImageTrailingData"),
        "names the code"
    );
    lab.assert_reset_to_saved_only();
}

fn collision_is_refused_before_any_byte_is_written(lab: &Lab) {
    let before = sha256(&read_range(&lab.target, 0, DISK_MIB * MIB));
    // A 56 MiB image whose root partition runs over local-storage (47–63 MiB).
    let raw = os_image(56, 2, 5);
    let image = lab.file("big.img.zst", &zstd(&raw));
    let output = lab.write(&image, &["--sha256", &sha256(&raw)]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("SavedPartitionCollision"),
        "names the code"
    );
    assert!(
        stderr(&output).contains("local-storage"),
        "names the partition"
    );
    let after = sha256(&read_range(&lab.target, 0, DISK_MIB * MIB));
    assert_eq!(before, after, "not a single byte of the target changed");
    lab.assert_storage_intact();
}

/// Runs a scenario on a file target and on a loop device target.
macro_rules! on_file_and_loop_device {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[test]
            fn on_a_file() {
                if let Some(lab) = Lab::on(On::File, stringify!($scenario)) {
                    super::$scenario(&lab);
                }
            }

            #[test]
            fn on_a_loop_device() {
                if let Some(lab) = Lab::on(On::LoopDevice, stringify!($scenario)) {
                    super::$scenario(&lab);
                }
            }
        }
    )*};
}

on_file_and_loop_device!(
    writes_byte_exact_and_keeps_local_storage,
    checksum_mismatch_leaves_the_saved_only_table,
    truncated_stream_leaves_the_saved_only_table,
    collision_is_refused_before_any_byte_is_written,
    zero_regions_overwrite_stale_data_with_zeros,
);

#[test]
fn a_missing_saved_partition_is_refused_and_nothing_changes() {
    let lab = Lab::new();
    let before = sha256(&fs::read(&lab.target).expect("target"));
    let raw = os_image(8, 1, 6);
    let image = lab.file("os.img", &raw);
    let output = write(&image, &lab.target, "scratch", &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("SavedPartitionNotFound"),
        "names the code"
    );
    assert_eq!(before, sha256(&fs::read(&lab.target).expect("target")));
}

fn zero_regions_overwrite_stale_data_with_zeros(lab: &Lab) {
    // 6 MiB zero runs over a target full of random bytes.
    let raw = os_image(40, 6, 7);
    let image = lab.file("os.img", &raw);
    let output = lab.write(&image, &["--sha256", &sha256(&raw)]);
    assert!(output.status.success(), "write failed: {}", stderr(&output));
    assert_image_on_target(&lab.target, &raw);
    lab.assert_storage_intact();
}

#[test]
fn packed_manifest_drives_the_write_and_progress_is_json_lines() {
    let lab = Lab::new();
    let raw = os_image(16, 1, 8);
    let raw_path = lab.file("os.img", &raw);
    let packed = lab.dir.path().join("os.img.zst");
    let output = run(&mut agent(&[
        "image",
        "pack",
        raw_path.to_str().expect("path"),
        "-o",
        packed.to_str().expect("path"),
    ]));
    assert!(output.status.success(), "pack failed");
    let manifest = lab.dir.path().join("os.img.zst.manifest.json");
    let progress = lab.dir.path().join("progress.jsonl");
    let progress_file = fs::File::create(&progress).expect("progress file");
    let command = agent(&[
        "write",
        "--manifest",
        manifest.to_str().expect("path"),
        "--target",
        lab.target.to_str().expect("path"),
        "--save-partlabel",
        "local-*",
        "--progress-fd",
        "3",
    ]);
    // Hand the file to the child as fd 3 through bash, as an operator would.
    let mut shell = std::process::Command::new("bash");
    shell
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 3>>\"$PROGRESS\"")
        .arg(command.get_program())
        .args(command.get_args())
        .env("PROGRESS", &progress);
    drop(progress_file);
    let output = run(&mut shell);
    assert!(output.status.success(), "write failed: {}", stderr(&output));
    assert_image_on_target(&lab.target, &raw);
    lab.assert_storage_intact();

    let lines = fs::read_to_string(&progress).expect("progress written");
    let phases: Vec<String> = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("each line is JSON");
            v["phase"].as_str().expect("phase").to_string()
        })
        .collect();
    let order = ["downloading", "verifying", "savingPartitions", "done"];
    let mut seen: Vec<&str> = Vec::new();
    for p in &phases {
        if seen.last() != Some(&p.as_str()) {
            seen.push(order.iter().find(|o| **o == p).expect("known phase"));
        }
    }
    assert_eq!(seen, order, "phases in order: {phases:?}");
    let last: serde_json::Value =
        serde_json::from_str(lines.lines().last().expect("a line")).expect("json");
    assert_eq!(last["totalBytes"], raw.len() as u64);
}

#[test]
fn a_manifest_with_the_wrong_size_fails() {
    let lab = Lab::new();
    let raw = os_image(16, 1, 9);
    let image = lab.file("os.img", &raw);
    let manifest = lab.file(
        "os.manifest.json",
        format!(
            r#"{{"name":"os","url":"os.img","format":"raw","size":{},"sha256":"{}"}}"#,
            raw.len() + 4096,
            sha256(&raw)
        )
        .as_bytes(),
    );
    let _ = image;
    let output = run(&mut agent(&[
        "write",
        "--manifest",
        manifest.to_str().expect("path"),
        "--target",
        lab.target.to_str().expect("path"),
        "--save-partlabel",
        "local-storage",
    ]));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("ImageTruncated"), "names the code");
    lab.assert_reset_to_saved_only();
}

#[test]
fn inspect_shows_format_hash_and_partitions() {
    let lab = Lab::new();
    let raw = os_image(8, 1, 10);
    let image = lab.file("os.img.zst", &zstd(&raw));
    let output = run(&mut agent(&[
        "image",
        "inspect",
        image.to_str().expect("path"),
    ]));
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("zstd"), "{text}");
    assert!(text.contains(&sha256(&raw)), "{text}");
    assert!(text.contains("efi") && text.contains("root"), "{text}");
    assert!(text.contains(&format!("{} bytes", 8 * MIB)), "{text}");
}

#[test]
fn on_a_loop_device_the_kernel_sees_the_new_partitions() {
    let lab = Lab::new();
    let device = match LoopDevice::attach(&lab.target, true) {
        Ok(device) => device,
        Err(why) => {
            return skip("on_a_loop_device_the_kernel_sees_the_new_partitions", &why);
        }
    };
    let raw = os_image(24, 2, 12);
    let image = lab.file("os.img.zst", &zstd(&raw));
    let output = write(
        &image,
        &device.path,
        "local-storage",
        &["--sha256", &sha256(&raw)],
    );
    assert!(output.status.success(), "write failed: {}", stderr(&output));
    assert_image_on_target(&device.path, &raw);
    let (sha, _) = partition_sha256(&device.path, "local-storage").expect("kept");
    assert_eq!(sha, lab.storage_sha);
    // The table on the device is what partition tools read: three partitions,
    // local-storage third, with its bytes unchanged.
    device
        .sync_partitions()
        .expect("partx reads the merged table");
    let p3 = device.partition(3);
    assert!(p3.exists(), "{} exists", p3.display());
    assert_eq!(sha256(&fs::read(&p3).expect("read p3")), lab.storage_sha);
}

#[test]
fn a_loop_device_with_a_mounted_partition_is_busy_and_untouched() {
    let lab = Lab::new();
    // A real filesystem in local-storage so it can be mounted.
    let device = match LoopDevice::attach(&lab.target, true) {
        Ok(device) => device,
        Err(why) => {
            return skip(
                "a_loop_device_with_a_mounted_partition_is_busy_and_untouched",
                &why,
            );
        }
    };
    device.sync_partitions().expect("partx reads the table");
    let part = device.partition(2);
    let mkfs = run(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&part));
    assert!(mkfs.status.success(), "mkfs.ext4");
    let mountpoint = lab.dir.path().join("mnt");
    fs::create_dir(&mountpoint).expect("mountpoint");
    let mount = run(std::process::Command::new("mount")
        .arg(&part)
        .arg(&mountpoint));
    if !mount.status.success() {
        return skip(
            "a_loop_device_with_a_mounted_partition_is_busy_and_untouched",
            "mount failed",
        );
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let unmount = Unmount(mountpoint.clone());
    // The mounted filesystem writes its own journal: compare everything else.
    let (_, storage) = partition_sha256(&device.path, "local-storage").expect("local-storage");
    let outside_storage = |path: &Path| {
        let mut bytes = fs::read(path).expect("read device");
        bytes.drain(storage.starting_lba as usize * 512..(storage.ending_lba as usize + 1) * 512);
        sha256(&bytes)
    };
    let before = outside_storage(&device.path);
    let raw = os_image(8, 1, 13);
    let image = lab.file("os.img", &raw);
    let output = write(&image, &device.path, "local-storage", &[]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("DiskBusy"), "names the code: {err}");
    assert!(
        err.contains(mountpoint.to_str().expect("path")),
        "names the mount: {err}"
    );
    drop(unmount);
    assert_eq!(
        before,
        outside_storage(&device.path),
        "nothing outside the filesystem changed"
    );
}

/// A key pair; returns the public key (base64) and a signer.
fn keypair() -> (String, impl Fn(&[u8]) -> String) {
    let minisign::KeyPair { pk, sk } =
        minisign::KeyPair::generate_unencrypted_keypair().expect("keys");
    let public = pk.to_base64();
    (public, move |data: &[u8]| {
        minisign::sign(Some(&pk), &sk, data, Some("reimage test"), None)
            .expect("signs")
            .to_string()
    })
}

#[test]
fn with_a_trusted_key_only_a_manifest_it_signed_is_written() {
    let lab = Lab::new();
    let raw = os_image(16, 1, 14);
    lab.file("os.img.zst", &zstd(&raw));
    let manifest_text = format!(
        r#"{{"name":"os","url":"os.img.zst","format":"zstd","size":{},"sha256":"{}"}}"#,
        raw.len(),
        sha256(&raw)
    );
    let manifest = lab.file("os.manifest.json", manifest_text.as_bytes());
    let (key, sign) = keypair();
    let (foreign_key, _) = keypair();
    let untouched = sha256(&fs::read(&lab.target).expect("target"));
    let write_with = |key: &str| {
        run(&mut agent(&[
            "write",
            "--manifest",
            manifest.to_str().expect("path"),
            "--trusted-key",
            key,
            "--target",
            lab.target.to_str().expect("path"),
            "--save-partlabel",
            "local-storage",
        ]))
    };

    let output = write_with(&key);
    assert!(
        stderr(&output).contains("ManifestUnsigned"),
        "no .minisig yet"
    );
    lab.file(
        "os.manifest.json.minisig",
        sign(b"{\"name\":\"other\"}").as_bytes(),
    );
    let output = write_with(&key);
    assert!(
        stderr(&output).contains("ManifestSignatureInvalid"),
        "a signature of other bytes"
    );
    lab.file(
        "os.manifest.json.minisig",
        sign(manifest_text.as_bytes()).as_bytes(),
    );
    let output = write_with(&foreign_key);
    assert!(
        stderr(&output).contains("ManifestSignatureInvalid"),
        "signed by another key"
    );
    let image = lab.dir.path().join("os.img.zst");
    let output = run(&mut agent(&[
        "write",
        "--image",
        image.to_str().expect("path"),
        "--sha256",
        &sha256(&raw),
        "--trusted-key",
        &key,
        "--target",
        lab.target.to_str().expect("path"),
    ]));
    assert!(
        stderr(&output).contains("ManifestUnsigned"),
        "an image without a manifest"
    );
    assert_eq!(
        untouched,
        sha256(&fs::read(&lab.target).expect("target")),
        "nothing written"
    );

    let output = write_with(&key);
    assert!(
        output.status.success(),
        "signed and trusted: {}",
        stderr(&output)
    );
    assert_image_on_target(&lab.target, &raw);
    lab.assert_storage_intact();
}

#[test]
fn kill_9_in_the_middle_of_a_write_leaves_only_the_saved_partitions() {
    use reimage_e2e::http_server::{Fault, FaultServer};
    let lab = Lab::new();
    let raw = os_image(24, 0, 15);
    let server = FaultServer::start(
        vec![("/os.img.zst".into(), std::sync::Arc::new(zstd(&raw)))],
        Fault::SlowBytesPerSec(512 * 1024),
    );
    let progress = lab.dir.path().join("progress.jsonl");
    fs::write(&progress, b"").expect("progress file");
    let mut command = std::process::Command::new("bash");
    command
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 3>>\"$PROGRESS\"")
        .arg(reimage_e2e::bin::binary("reimage-agent"))
        .args([
            "write",
            "--image",
            &server.url("/os.img.zst"),
            "--sha256",
            &sha256(&raw),
            "--target",
            lab.target.to_str().expect("path"),
            "--save-partlabel",
            "local-storage",
            "--progress-fd",
            "3",
        ])
        .env("PROGRESS", &progress)
        .stderr(std::process::Stdio::null());
    let mut child = command.spawn().expect("write starts");
    // Past the held first MiB: image bytes are on the disk, no table points at them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = fs::read_to_string(&progress).expect("progress");
        let written = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["phase"] == "downloading")
            .filter_map(|v| v["bytesWritten"].as_u64())
            .max()
            .unwrap_or(0);
        if written > 3 * MIB {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the write never got going"
        );
        assert!(
            child.try_wait().expect("child").is_none(),
            "the write ended early"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    let labels = labels(&lab.target);
    assert_eq!(
        labels,
        vec!["local-storage".to_string()],
        "no table points at a half image"
    );
    lab.assert_storage_intact();
}

/// What a target holds after a write was killed: it must be one of these,
/// never a table pointing at a half-written or unverified image.
#[derive(Debug, PartialEq, Eq)]
enum AfterKill {
    /// Nothing was written yet.
    Untouched,
    /// The table holds only the saved partition.
    SavedOnly,
    /// The write finished: the whole image and the merged table.
    NewImage,
}

fn state_after_kill(target: &Path, before_sha: &str, image: &[u8]) -> AfterKill {
    let labels = labels(target);
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    match labels.as_slice() {
        ["old-root", "local-storage"] => {
            assert_eq!(
                sha256(&fs::read(target).expect("target")),
                before_sha,
                "the old table is there, so nothing may have changed"
            );
            AfterKill::Untouched
        }
        ["local-storage"] => AfterKill::SavedOnly,
        ["efi", "root", "local-storage"] => {
            assert_image_on_target(target, image);
            AfterKill::NewImage
        }
        other => panic!("after kill -9 the table holds {other:?}"),
    }
}

/// Starts `write` with its progress on fd 3 into `progress`, and kills it
/// with SIGKILL as soon as `when` holds for a progress line.
fn kill_write_when(lab: &Lab, image: &Path, sha: &str, when: impl Fn(&serde_json::Value) -> bool) {
    let progress = lab.dir.path().join("progress.jsonl");
    fs::write(&progress, b"").expect("progress file");
    let mut child = std::process::Command::new("bash")
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 3>>\"$PROGRESS\"")
        .arg(reimage_e2e::bin::binary("reimage-agent"))
        .args(["write", "--image"])
        .arg(image)
        .args(["--sha256", sha, "--target"])
        .arg(&lab.target)
        .args(["--save-partlabel", "local-storage", "--progress-fd", "3"])
        .env("PROGRESS", &progress)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("write starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let text = fs::read_to_string(&progress).expect("progress");
        let hit = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|line| when(&line));
        if hit || child.try_wait().expect("child").is_some() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the phase never came");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let _ = child.kill();
    child.wait().expect("reaped");
}

/// The phases after streaming (a kill while streaming is the test above,
/// with a slow server to make it land there).
#[test]
fn kill_9_at_each_phase_leaves_the_old_disk_the_saved_only_table_or_the_verified_image() {
    // Large enough (384 MiB, mostly zeros) that streaming and read-back
    // each last well beyond the kill's reaction time.
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = os_image(384, 15, 21);
    let image = dir.path().join("os.img.zst");
    fs::write(&image, zstd(&raw)).expect("image");
    let sha = sha256(&raw);
    let phase = |name: &'static str| move |line: &serde_json::Value| line["phase"] == name;
    type KillWhen = Box<dyn Fn(&serde_json::Value) -> bool>;
    let cases: Vec<(&str, KillWhen, &[AfterKill])> = vec![
        (
            "reading back",
            Box::new(phase("verifying")),
            &[AfterKill::SavedOnly],
        ),
        (
            "writing the merged table",
            Box::new(phase("savingPartitions")),
            &[AfterKill::SavedOnly, AfterKill::NewImage],
        ),
        ("done", Box::new(phase("done")), &[AfterKill::NewImage]),
    ];
    for (what, when, allowed) in cases {
        let lab = Lab::big(512);
        let before = sha256(&fs::read(&lab.target).expect("target"));
        kill_write_when(&lab, &image, &sha, when);
        let state = state_after_kill(&lab.target, &before, &raw);
        eprintln!("kill -9 while {what}: {state:?}");
        assert!(allowed.contains(&state), "kill -9 while {what}: {state:?}");
        lab.assert_storage_intact();
        // Whatever the kill left, writing again recovers the node.
        let output = lab.write(&image, &["--sha256", &sha]);
        assert!(output.status.success(), "{what}: {}", stderr(&output));
        assert_image_on_target(&lab.target, &raw);
        lab.assert_storage_intact();
    }
}

/// A tmpfs of `size_mib` MiB mounted on a temporary directory, unmounted on
/// drop; `None` (after saying why) where mounting is not possible.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_mib: u64, test: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            skip(test, "cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(SmallFs { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_filesystem_under_a_file_target_fails_the_write_and_keeps_local_storage() {
    use std::io::{Seek, SeekFrom, Write};
    let test = "a_full_filesystem_under_a_file_target_fails_the_write_and_keeps_local_storage";
    let Some(fs_) = SmallFs::mount(40, test) else {
        return;
    };
    // A sparse 64 MiB target: only its tables and the 16 MiB of
    // local-storage take room, so the tmpfs fills up when the image does.
    let mut disk = vec![0u8; (DISK_MIB * MIB) as usize];
    let storage = (47 * MIB) as usize..(63 * MIB) as usize;
    fastrand::Rng::with_seed(31).fill(&mut disk[storage.clone()]);
    reimage_e2e::images::write_table(
        &mut disk,
        &[
            reimage_e2e::images::Part {
                index: 1,
                label: "old-root",
                first_mib: 1,
                last_mib_excl: 47,
                guid: 0xa1,
            },
            reimage_e2e::images::Part {
                index: 2,
                label: "local-storage",
                first_mib: 47,
                last_mib_excl: 63,
                guid: 0xa2,
            },
        ],
    );
    let target = fs_.dir.path().join("disk.img");
    let mut file = fs::File::create(&target).expect("target");
    file.set_len(disk.len() as u64).expect("size");
    let tail = disk.len() - 34 * 512;
    for range in [0..34 * 512, storage.clone(), tail..disk.len()] {
        file.seek(SeekFrom::Start(range.start as u64))
            .expect("seek");
        file.write_all(&disk[range]).expect("write");
    }
    drop(file);
    let storage_sha = sha256(&disk[storage]);
    // Leave about 6 MiB free.
    let filler = fs_.dir.path().join("filler");
    fs::write(&filler, vec![1u8; 18 * MIB as usize]).expect("filler");

    let scratch = tempfile::tempdir().expect("tempdir");
    let raw = os_image(24, 0, 32);
    let image = scratch.path().join("os.img.zst");
    fs::write(&image, zstd(&raw)).expect("image");
    let output = write(
        &image,
        &target,
        "local-storage",
        &["--sha256", &sha256(&raw)],
    );
    let text = stderr(&output);
    assert!(
        !output.status.success(),
        "a full filesystem cannot hold the image"
    );
    assert!(text.contains("DiskWriteFailed"), "{text}");
    assert!(text.contains("No space left"), "{text}");
    let labels = labels(&target);
    assert_eq!(
        labels,
        vec!["local-storage"],
        "the saved-only table is left"
    );
    assert_eq!(
        partition_sha256(&target, "local-storage").map(|(s, _)| s),
        Some(storage_sha),
        "local-storage bytes unchanged"
    );
}
