//! Writes through a block index (`image pack --block-index`), end to end:
//! the real binary, a target that holds v1, v2 built from v1 by changing a
//! few files of its ext4 root (`mkfs.ext4 -d`), served by the test's HTTP
//! server, which counts what it sends. After every run the saved
//! partition's SHA-256 is checked.

use reimage_e2e::bin::{agent, run, stderr};
use reimage_e2e::daemon::{ADMIN, Daemon, stage_in_state_dir, write_config};
use reimage_e2e::http_server::{Fault, FaultServer};
use reimage_e2e::images::{
    MIB, assert_saved_only, labels, partition_sha256, read_range, target_disk, write_os_table,
};
use reimage_e2e::skip;
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IMAGE_MIB: u64 = 256;
const DISK_MIB: u64 = 320;
const STORAGE_MIB: u64 = 16;
const BLOCK: u64 = 4 * MIB;
/// The files of v1's root; v2 rewrites [`CHANGED`] of them.
const FILES: usize = 48;
const FILE_BYTES: usize = 3 << 20;
const CHANGED: [usize; 2] = [7, 30];

/// v1 and v2 packed with their indexes and served; a target holding v1.
struct Lab {
    dir: tempfile::TempDir,
    v1: Vec<u8>,
    v2: Vec<u8>,
    target: PathBuf,
    storage_sha: String,
    server: FaultServer,
}

impl Lab {
    /// `None` (after saying why) where `mkfs.ext4` is missing.
    fn new(test: &str) -> Option<Lab> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (v1, v2) = match v1_and_v2(dir.path()) {
            Ok(images) => images,
            Err(why) => {
                skip(test, &why);
                return None;
            }
        };
        let mut files = Vec::new();
        for (name, raw) in [("v1", &v1), ("v2", &v2)] {
            let raw_path = dir.path().join(format!("{name}.img"));
            fs::write(&raw_path, raw).expect("raw image");
            let packed = dir.path().join(format!("{name}.img.zst"));
            let output = run(agent(&["image", "pack", "--block-index", "-o"])
                .arg(&packed)
                .arg(&raw_path));
            assert!(output.status.success(), "pack: {}", stderr(&output));
            for suffix in ["", ".manifest.json", ".index.json"] {
                let file = format!("{name}.img.zst{suffix}");
                let bytes = fs::read(dir.path().join(&file)).expect("packed file");
                files.push((format!("/{file}"), Arc::new(bytes)));
            }
        }
        let target = dir.path().join("disk.img");
        let storage_sha = target_disk(&target, DISK_MIB, STORAGE_MIB, 11);
        let lab = Lab {
            server: FaultServer::start(files, Fault::None),
            dir,
            v1,
            v2,
            target,
            storage_sha,
        };
        let output = lab.write("v1");
        assert!(output.status.success(), "writing v1: {}", stderr(&output));
        lab.assert_holds(&lab.v1);
        Some(lab)
    }

    /// A daemon whose target is the lab's disk, staging under its state
    /// directory.
    fn daemon(&self) -> Daemon {
        let config = write_config(self.dir.path(), "");
        stage_in_state_dir(&config);
        Daemon::start(&config)
    }

    /// Reimages `daemon`'s node with v2 by its manifest; the operation,
    /// which must have succeeded.
    fn reimage_to_v2(&self, daemon: &Daemon) -> serde_json::Value {
        let (status, body) = daemon.post(
            "/v1/node/reimage",
            ADMIN,
            json!({"nodeReimageOption": "terminate", "manifestUrl": self.manifest("v2")}),
        );
        assert_eq!(status, 202, "{body}");
        let operation = daemon.wait_operation(body["id"].as_str().expect("operation id"));
        assert_eq!(operation["status"], "Succeeded", "{operation}");
        operation
    }

    fn manifest(&self, name: &str) -> String {
        self.server.url(&format!("/{name}.img.zst.manifest.json"))
    }

    /// `reimage-agent write --manifest …` of `name` (v1, v2).
    fn write(&self, name: &str) -> Output {
        run(&mut self.write_command(name))
    }

    fn write_command(&self, name: &str) -> Command {
        let mut command = agent(&["write", "--manifest", &self.manifest(name), "--target"]);
        command
            .arg(&self.target)
            .args(["--save-partlabel", "local-storage"]);
        command
    }

    /// Encoded bytes the server sent of `path` since the log was cleared:
    /// each range's length, or the whole file for a `200`.
    fn served(&self, path: &str, file_len: u64) -> u64 {
        self.server
            .requests()
            .iter()
            .filter(|r| r.path == path && r.method == "GET")
            .map(|r| match (r.status, r.range.as_deref()) {
                (206, Some(range)) => range_len(range, file_len),
                (200, _) => file_len,
                _ => 0,
            })
            .sum()
    }

    fn packed_len(&self, name: &str) -> u64 {
        fs::metadata(self.dir.path().join(format!("{name}.img.zst")))
            .expect("packed")
            .len()
    }

    /// The target holds `image` past its partition table sectors, the merged
    /// table, and local-storage intact.
    fn assert_holds(&self, image: &[u8]) {
        let start = 34 * 512;
        let on_disk = read_range(&self.target, start, image.len() as u64);
        assert!(
            on_disk == image[start as usize..],
            "image bytes differ on the target"
        );
        assert_eq!(labels(&self.target), ["efi", "root", "local-storage"]);
        self.assert_storage_intact();
    }

    fn assert_storage_intact(&self) {
        let (sha, _) = partition_sha256(&self.target, "local-storage").expect("local-storage kept");
        assert_eq!(sha, self.storage_sha, "local-storage bytes changed");
    }

    /// After a failure: the saved partition and nothing else in either
    /// table copy.
    fn assert_saved_only(&self) {
        assert_saved_only(&self.target, &self.storage_sha);
    }
}

/// `bytes=A-B` → B − A + 1 (`bytes=A-` → to the end of the file).
fn range_len(range: &str, file_len: u64) -> u64 {
    let spec = range.trim_start_matches("bytes=");
    let (start, end) = spec.split_once('-').expect("a byte range");
    let start: u64 = start.parse().expect("range start");
    let end = end
        .parse::<u64>()
        .map_or(file_len - 1, |end| end.min(file_len - 1));
    end + 1 - start
}

/// Text-like file contents (compressing as an OS's files do), from `seed`.
fn file_bytes(seed: u64) -> Vec<u8> {
    const WORDS: [&[u8]; 16] = [
        b"kernel ",
        b"module ",
        b"libc.so ",
        b"0x7f3a ",
        b"systemd ",
        b"unit\n",
        b"ELF ",
        b"\x00\x00\x00\x01",
        b"config ",
        b"= yes\n",
        b"/usr/lib ",
        b"reimage ",
        b"node ",
        b"fleet ",
        b"agent ",
        b"{}\n",
    ];
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = Vec::with_capacity(FILE_BYTES + 16);
    while bytes.len() < FILE_BYTES {
        bytes.extend_from_slice(WORDS[rng.usize(..WORDS.len())]);
        bytes.push(rng.u8(b'a'..=b'z'));
    }
    bytes.truncate(FILE_BYTES);
    bytes
}

/// v1: a GPT disk image with an `efi` partition and an ext4 `root` made by
/// `mkfs.ext4 -d` from [`FILES`] files; v2: the same after rewriting the
/// [`CHANGED`] files in place and making the file system again.
fn v1_and_v2(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let root = dir.join("root");
    fs::create_dir_all(root.join("usr/lib")).map_err(|e| e.to_string())?;
    for n in 0..FILES {
        fs::write(
            root.join(format!("usr/lib/file{n:02}")),
            file_bytes(n as u64),
        )
        .map_err(|e| e.to_string())?;
    }
    let v1 = disk_image(dir, &root)?;
    for n in CHANGED {
        fs::write(
            root.join(format!("usr/lib/file{n:02}")),
            file_bytes(1000 + n as u64),
        )
        .map_err(|e| e.to_string())?;
    }
    let v2 = disk_image(dir, &root)?;
    Ok((v1, v2))
}

fn disk_image(dir: &Path, root: &Path) -> Result<Vec<u8>, String> {
    let fs_mib = IMAGE_MIB - 4;
    let fs_path = dir.join("root.ext4");
    let _ = fs::remove_file(&fs_path);
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-U",
            "2b4e5c9a-6f0d-4a55-9e3c-1f2a3b4c5d6e",
        ])
        .args([
            "-E",
            "hash_seed=7d1f0e2c-3b4a-4c5d-8e9f-0a1b2c3d4e5f,root_owner=0:0",
        ])
        .arg("-d")
        .arg(root)
        .arg(&fs_path)
        .arg(format!("{fs_mib}M"))
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .output()
        .map_err(|e| format!("mkfs.ext4 cannot run: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let fs_bytes = fs::read(&fs_path).map_err(|e| e.to_string())?;
    let mut image = vec![0u8; (IMAGE_MIB * MIB) as usize];
    let efi = file_bytes(99);
    image[MIB as usize..3 * MIB as usize].copy_from_slice(&efi[..2 * MIB as usize]);
    image[3 * MIB as usize..3 * MIB as usize + fs_bytes.len()].copy_from_slice(&fs_bytes);
    write_os_table(&mut image);
    Ok(image)
}

/// The last `bytesWritten` of the `downloading` phase in `--progress-fd` output.
fn written_in_progress(progress: &str) -> u64 {
    progress
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["phase"] == "downloading")
        .filter_map(|l| l["bytesWritten"].as_u64())
        .next_back()
        .expect("a downloading phase was reported")
}

/// Starts `command` with its progress on fd 3 into `progress`, and waits
/// until `when` holds for the lines so far (or the write ended).
fn start_watching(
    command: Command,
    progress: &Path,
    when: impl Fn(&[serde_json::Value]) -> bool,
) -> std::process::Child {
    fs::write(progress, b"").expect("progress file");
    let mut shell = Command::new("bash");
    shell
        .arg("-c")
        .arg("exec \"$0\" \"$@\" --progress-fd 3 3>>\"$PROGRESS\"")
        .arg(command.get_program())
        .args(command.get_args())
        .env("PROGRESS", progress)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in command.get_envs() {
        if let Some(value) = value {
            shell.env(name, value);
        }
    }
    let mut child = shell.spawn().expect("write starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = fs::read_to_string(progress).expect("progress");
        let lines: Vec<_> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect();
        if when(&lines) || child.try_wait().expect("child").is_some() {
            return child;
        }
        assert!(Instant::now() < deadline, "the awaited progress never came");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reports a `downloading` phase after a `comparing` one.
fn writing_blocks(lines: &[serde_json::Value]) -> bool {
    lines
        .iter()
        .skip_while(|l| l["phase"] != "comparing")
        .any(|l| l["phase"] == "downloading" && l["bytesWritten"].as_u64() > Some(0))
}

#[test]
fn a_node_holding_v1_fetches_and_writes_only_what_v2_changed() {
    let Some(lab) = Lab::new("the v1 → v2 block-index write") else {
        return;
    };
    let progress = lab.dir.path().join("progress.jsonl");
    lab.server.clear_requests();
    let child = start_watching(lab.write_command("v2"), &progress, |_| false);
    let output = child.wait_with_output().expect("write ends");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "v1 → v2: {log}");
    lab.assert_holds(&lab.v2);

    let image = IMAGE_MIB * MIB;
    let packed = lab.packed_len("v2");
    let downloaded = lab.served("/v2.img.zst", packed);
    let written = written_in_progress(&fs::read_to_string(&progress).expect("progress"));
    eprintln!(
        "v1 → v2: fetched {downloaded} of {packed} compressed bytes ({:.1} %), wrote {written} of {image} ({:.1} %)",
        downloaded as f64 * 100.0 / packed as f64,
        written as f64 * 100.0 / image as f64
    );
    assert!(downloaded > 0, "the changed blocks were fetched");
    assert!(
        downloaded * 10 <= packed,
        "fetched {downloaded} of {packed} bytes"
    );
    assert!(written * 10 <= image, "wrote {written} of {image} bytes");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("through the block index: fetched"),
        "{stdout}"
    );
    let requests = lab.server.requests();
    let ranges: Vec<_> = requests
        .iter()
        .filter(|r| r.path == "/v2.img.zst")
        .collect();
    assert!(
        ranges.iter().all(|r| r.status == 206),
        "only ranges: {ranges:?}"
    );
    assert!(
        ranges.iter().skip(1).all(|r| r.if_range.is_some()),
        "every range after the first names the file's version: {ranges:?}"
    );

    // Again: the disk holds v2, so nothing but block 0 is fetched.
    lab.server.clear_requests();
    let output = lab.write("v2");
    assert!(output.status.success(), "v2 again: {}", stderr(&output));
    let again = lab.served("/v2.img.zst", packed);
    assert!(
        again < downloaded,
        "a rewrite fetches less: {again} vs {downloaded}"
    );
    lab.assert_holds(&lab.v2);
}

#[test]
fn inspect_checks_every_block_of_the_index_against_the_image() {
    let Some(lab) = Lab::new("inspect with a block index") else {
        return;
    };
    let output = run(&mut agent(&[
        "image",
        "inspect",
        "--json",
        &lab.manifest("v2"),
    ]));
    assert!(output.status.success(), "inspect: {}", stderr(&output));
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(info["manifestMatches"], true, "{info}");
    let index = &info["blockIndex"];
    assert_eq!(index["blocks"], IMAGE_MIB * MIB / BLOCK, "{info}");
    assert_eq!(index["blockSize"], BLOCK, "{info}");
    assert!(
        index["zeroBlocks"].as_u64() > Some(0),
        "the free space is zero blocks: {info}"
    );
    assert_eq!(index["mismatchedBlocks"], serde_json::json!([]), "{info}");
    assert_eq!(index["encodedSize"], lab.packed_len("v2"), "{info}");
    // Any zstd decoder reads the framed image as one stream.
    let decoded = Command::new("zstd")
        .args(["-dc"])
        .arg(lab.dir.path().join("v2.img.zst"))
        .output();
    match decoded {
        Ok(decoded) if decoded.status.success() => assert!(decoded.stdout == lab.v2),
        _ => eprintln!(
            "the zstd CLI is not here: the one-stream check is left to the agent's decoder"
        ),
    }
}

#[test]
fn a_server_that_ignores_range_gets_the_whole_image_streamed() {
    let Some(lab) = Lab::new("the fallback without Range") else {
        return;
    };
    lab.server.set_fault(Fault::IgnoreRange);
    lab.server.clear_requests();
    let output = lab.write("v2");
    let log = stderr(&output);
    assert!(output.status.success(), "v2 without Range: {log}");
    assert!(
        log.contains("does not honour Range"),
        "the log says why: {log}"
    );
    lab.assert_holds(&lab.v2);
}

#[test]
fn a_block_whose_index_digest_is_wrong_fails_as_image_corrupt_with_the_saved_only_table() {
    let Some(lab) = Lab::new("a wrong block digest") else {
        return;
    };
    // A block v2 changed, so the write fetches it and checks it.
    let changed = (1..IMAGE_MIB * MIB / BLOCK)
        .find(|&n| {
            let range = (n * BLOCK) as usize..((n + 1) * BLOCK) as usize;
            lab.v1[range.clone()] != lab.v2[range]
        })
        .expect("v2 changed a block past the first");
    let dir = lab.dir.path();
    let index_path = dir.join("v2.img.zst.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).expect("index")).expect("json");
    index["blocks"][changed as usize]["blake3"] = serde_json::json!("ab".repeat(32));
    let index_bytes = serde_json::to_vec(&index).expect("json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("v2.img.zst.manifest.json")).expect("manifest"))
            .expect("json");
    manifest["blockIndex"]["sha256"] = serde_json::json!(reimage_e2e::images::sha256(&index_bytes));
    lab.server
        .replace_file("/v2.img.zst.index.json", Arc::new(index_bytes));
    lab.server.replace_file(
        "/v2.img.zst.manifest.json",
        Arc::new(serde_json::to_vec(&manifest).expect("json")),
    );
    let output = lab.write("v2");
    let log = stderr(&output);
    assert!(
        !output.status.success(),
        "a wrong digest must fail the write"
    );
    assert!(
        log.contains("ImageCorrupt") && log.contains(&format!("block {changed}")),
        "{log}"
    );
    lab.assert_saved_only();
}

#[test]
fn a_block_changed_on_the_disk_after_the_comparison_is_fetched_again() {
    let Some(lab) = Lab::new("a block changed after the comparison") else {
        return;
    };
    // Slow enough that the write is still fetching when the block changes.
    lab.server.set_fault(Fault::SlowBytesPerSec(4 << 20));
    let unchanged = (1..IMAGE_MIB * MIB / BLOCK)
        .rev()
        .find(|&n| {
            let range = (n * BLOCK) as usize..((n + 1) * BLOCK) as usize;
            lab.v1[range.clone()] == lab.v2[range.clone()] && lab.v1[range].iter().any(|&b| b != 0)
        })
        .expect("a block v2 kept");
    let progress = lab.dir.path().join("progress.jsonl");
    let child = start_watching(lab.write_command("v2"), &progress, writing_blocks);
    let disk = fs::OpenOptions::new()
        .write(true)
        .open(&lab.target)
        .expect("target");
    std::os::unix::fs::FileExt::write_all_at(&disk, &[0x5a; 4096], unchanged * BLOCK + 8192)
        .expect("corrupting a compared block");
    disk.sync_all().expect("sync");
    let output = child.wait_with_output().expect("write ends");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the write repairs the block: {log}"
    );
    assert!(
        log.contains("changed on the disk after they were compared"),
        "{log}"
    );
    lab.assert_holds(&lab.v2);
}

#[test]
fn kill_9_during_the_block_writes_leaves_the_saved_only_table_and_a_rerun_succeeds() {
    let Some(lab) = Lab::new("kill -9 during the block writes") else {
        return;
    };
    lab.server.set_fault(Fault::SlowBytesPerSec(2 << 20));
    let progress = lab.dir.path().join("progress.jsonl");
    let mut child = start_watching(lab.write_command("v2"), &progress, writing_blocks);
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    lab.assert_saved_only();
    lab.server.set_fault(Fault::None);
    let output = lab.write("v2");
    assert!(output.status.success(), "the rerun: {}", stderr(&output));
    lab.assert_holds(&lab.v2);
}

#[test]
fn the_daemon_reimages_through_the_index_and_its_record_counts_what_moved() {
    let Some(lab) = Lab::new("a daemon reimage through the block index") else {
        return;
    };
    let daemon = lab.daemon();
    lab.server.clear_requests();
    let operation = lab.reimage_to_v2(&daemon);
    lab.assert_holds(&lab.v2);
    let progress = &operation["progress"];
    let image = IMAGE_MIB * MIB;
    let packed = lab.packed_len("v2");
    let downloaded = progress["bytesDownloaded"]
        .as_u64()
        .expect("bytesDownloaded");
    let unchanged = progress["bytesUnchanged"].as_u64().expect("bytesUnchanged");
    let written = progress["bytesWritten"].as_u64().expect("bytesWritten");
    assert_eq!(progress["totalBytes"], image, "{operation}");
    assert_eq!(
        downloaded,
        lab.served("/v2.img.zst", packed),
        "the record counts what the server sent"
    );
    assert!(written * 10 <= image, "{operation}");
    assert!(unchanged * 10 >= image * 8, "{operation}");
    let metrics = daemon.get("/metrics");
    let metrics = metrics.as_str().expect("metrics text");
    assert!(
        metrics.contains(&format!("reimage_bytes_unchanged_total {unchanged}")),
        "{metrics}"
    );
}

#[test]
fn a_prefetch_on_a_node_holding_v1_fetches_only_what_v2_changed_and_the_reimage_nothing() {
    let Some(lab) = Lab::new("a prefetch through the block index") else {
        return;
    };
    let daemon = lab.daemon();
    lab.server.clear_requests();
    let (status, body) = daemon.post(
        "/v1/images/prefetch",
        ADMIN,
        json!({"manifestUrl": lab.manifest("v2")}),
    );
    assert_eq!(status, 202, "{body}");
    let prefetch = daemon.wait_operation(body["id"].as_str().expect("operation id"));
    assert_eq!(prefetch["status"], "Succeeded", "{prefetch}");
    let packed = lab.packed_len("v2");
    let fetched = lab.served("/v2.img.zst", packed);
    assert!(
        fetched > 0 && fetched * 10 <= packed,
        "the prefetch fetched {fetched} of {packed} bytes: only the blocks v1 lacks"
    );
    lab.assert_holds(&lab.v1);
    let images_dir = lab.dir.path().join("state/images");
    let staged_files = || {
        let mut names: Vec<String> = fs::read_dir(&images_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let staged = daemon.get("/v1/images");
    let sha = staged["value"][0]["sha256"]
        .as_str()
        .expect("the staged image");
    assert_eq!(
        staged_files(),
        [format!("{sha}.staged"), format!("{sha}.staged.index.json")],
        "the copy and its own index"
    );

    lab.server.clear_requests();
    let operation = lab.reimage_to_v2(&daemon);
    assert_eq!(
        lab.server.requests().len(),
        0,
        "the reimage after the prefetch asks the server for nothing"
    );
    lab.assert_holds(&lab.v2);
    lab.assert_storage_intact();
    let written = operation["progress"]["bytesWritten"]
        .as_u64()
        .expect("bytesWritten");
    assert!(
        written * 10 <= IMAGE_MIB * MIB,
        "the write from the staged copy wrote only what differs: {operation}"
    );
    assert!(
        staged_files().is_empty(),
        "the used copy and its index are gone"
    );
}
