//! The shutdown handoff as installed: `reimage-agent handoff install` puts
//! the binary, its libraries and the plan into an empty root, and that root
//! runs `/shutdown rehearse` in a chroot — the same plan, staged-image check
//! and pipeline that PID 1 runs at shutdown, without the mounts and the
//! reboot. That proves the root is complete (a missing library would fail
//! here, not on a fleet node at shutdown) and checks the outcome the next
//! boot's agent reads.

use reimage_e2e::bin::{agent, run, stderr};
use reimage_e2e::images::{MIB, labels, os_image, partition_sha256, sha256, target_disk, zstd};
use reimage_e2e::skip;
use serde_json::{Value, json};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const OPERATION: &str = "op-handoff";

/// Why this machine cannot chroot and mount, or `None`.
fn cannot_chroot() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("chroot and mounting /proc need root".into());
    }
    None
}

/// `/proc` and `/sys` mounted inside the root for the chroot, unmounted on drop.
struct ApiMounts(Vec<PathBuf>);

impl ApiMounts {
    fn mount(root: &Path) -> ApiMounts {
        let mut mounted = Vec::new();
        for (fstype, dir) in [("proc", "proc"), ("sysfs", "sys")] {
            let at = root.join(dir);
            let status = Command::new("mount")
                .args(["-t", fstype, fstype])
                .arg(&at)
                .status()
                .expect("mount runs");
            assert!(status.success(), "mounting {fstype} on {}", at.display());
            mounted.push(at);
        }
        ApiMounts(mounted)
    }
}

impl Drop for ApiMounts {
    fn drop(&mut self) {
        for at in self.0.iter().rev() {
            let _ = Command::new("umount").arg(at).status();
        }
    }
}

struct Rehearsal {
    dir: tempfile::TempDir,
    image: Vec<u8>,
    storage_sha: String,
}

impl Rehearsal {
    /// The handoff root (the chroot), the disk and state_dir inside it.
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn disk(&self) -> PathBuf {
        self.root().join("disk.img")
    }
    fn state_dir(&self) -> PathBuf {
        self.root().join("state-dir")
    }

    /// A 64 MiB target with 16 MiB of local-storage, a 16 MiB image staged
    /// at `staged` (a host path; under state_dir for `StateDir`), and its
    /// plan in state_dir.
    fn new(memory: bool) -> Rehearsal {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = os_image(16, 2, 11);
        let this = Rehearsal {
            storage_sha: String::new(),
            image,
            dir,
        };
        fs::create_dir_all(this.state_dir().join("staging")).expect("state dir");
        let storage_sha = target_disk(&this.disk(), 64, 16, 12);
        let packed = zstd(&this.image);
        let staged_host = if memory {
            this.dir.path().join("run-staging.img")
        } else {
            this.state_dir().join("staging/op.img")
        };
        fs::write(&staged_host, &packed).expect("staged image");
        let staged = if memory {
            json!({"area": "memory", "path": staged_host})
        } else {
            json!({"area": "stateDir", "path": "staging/op.img"})
        };
        let plan = json!({
            "version": 2,
            "operationId": OPERATION,
            "staged": staged,
            "stagedSha256": sha256(&packed),
            "format": "zstd",
            "imageSize": this.image.len(),
            "imageSha256": sha256(&this.image),
            "target": "/disk.img",
            "savePartlabel": ["local-storage"],
            "savePartindex": [],
            "state": {
                "device": "/dev/vda2",
                "dev": "254:2",
                "fstype": "ext4",
                "stateDirInFs": "/",
                "onTarget": true
            }
        });
        fs::create_dir_all(this.state_dir().join("handoff")).expect("handoff dir");
        fs::write(this.plan_path(), plan.to_string()).expect("plan");
        Rehearsal {
            storage_sha,
            ..this
        }
    }

    fn plan_path(&self) -> PathBuf {
        self.state_dir()
            .join(format!("handoff/{OPERATION}.plan.json"))
    }

    fn install(&self) {
        let output = run(agent(&["handoff", "install", "--plan"])
            .arg(self.plan_path())
            .arg("--root")
            .arg(self.root()));
        assert!(output.status.success(), "install: {}", stderr(&output));
    }

    /// `chroot ROOT /shutdown rehearse /state-dir`: its exit status and
    /// the outcome it left.
    fn rehearse(&self) -> (bool, Value) {
        let _mounts = ApiMounts::mount(&self.root());
        let output = run(Command::new("chroot").arg(self.root()).args([
            "/shutdown",
            "rehearse",
            "/state-dir",
        ]));
        let outcome_path = self
            .state_dir()
            .join(format!("handoff/{OPERATION}.outcome.json"));
        let text = fs::read_to_string(&outcome_path).unwrap_or_else(|e| {
            panic!(
                "no outcome at {} ({e}); stderr: {}",
                outcome_path.display(),
                stderr(&output)
            )
        });
        (
            output.status.success(),
            serde_json::from_str(&text).expect("outcome is JSON"),
        )
    }

    fn storage_unchanged(&self) -> bool {
        partition_sha256(&self.disk(), "local-storage").map(|(sha, _)| sha)
            == Some(self.storage_sha.clone())
    }
}

#[test]
fn an_installed_handoff_writes_the_image_staged_on_the_state_filesystem() {
    let test = "an_installed_handoff_writes_the_image_staged_on_the_state_filesystem";
    if let Some(reason) = cannot_chroot() {
        return skip(test, &reason);
    }
    let rehearsal = Rehearsal::new(false);
    rehearsal.install();
    let root = rehearsal.root();
    for file in ["shutdown", "reimage-plan.json"] {
        assert!(root.join(file).is_file(), "{file} installed");
    }
    let (ok, outcome) = rehearsal.rehearse();
    assert!(ok, "rehearsal failed: {outcome}");
    assert_eq!(outcome["result"], "written", "{outcome}");
    assert_eq!(outcome["operationId"], OPERATION);
    assert_eq!(outcome["sha256"], sha256(&rehearsal.image));
    let disk = fs::read(rehearsal.disk()).expect("disk");
    let image = &rehearsal.image;
    assert!(
        disk[MIB as usize..image.len()] == image[MIB as usize..],
        "the image past its first MiB is on the disk"
    );
    let labels = labels(&rehearsal.disk());
    assert_eq!(labels, ["efi", "root", "local-storage"]);
    assert!(rehearsal.storage_unchanged(), "local-storage kept");
}

#[test]
fn a_staged_image_changed_after_staging_is_refused_and_nothing_is_written() {
    let test = "a_staged_image_changed_after_staging_is_refused_and_nothing_is_written";
    if let Some(reason) = cannot_chroot() {
        return skip(test, &reason);
    }
    let rehearsal = Rehearsal::new(false);
    rehearsal.install();
    let disk_before = sha256(&fs::read(rehearsal.disk()).expect("disk"));
    let staged = rehearsal.state_dir().join("staging/op.img");
    let mut bytes = fs::read(&staged).expect("staged");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    fs::write(&staged, bytes).expect("tamper");

    let (ok, outcome) = rehearsal.rehearse();
    assert!(!ok, "a tampered image must not count as written");
    assert_eq!(outcome["result"], "refused", "{outcome}");
    assert_eq!(outcome["code"], "ImageChecksumMismatch", "{outcome}");
    assert_eq!(
        sha256(&fs::read(rehearsal.disk()).expect("disk")),
        disk_before,
        "the old system is untouched"
    );
    assert!(rehearsal.storage_unchanged());
}

#[test]
fn a_ram_staged_image_moves_into_the_handoff_root() {
    let test = "a_ram_staged_image_moves_into_the_handoff_root";
    if let Some(reason) = cannot_chroot() {
        return skip(test, &reason);
    }
    let rehearsal = Rehearsal::new(true);
    rehearsal.install();
    assert!(
        !rehearsal.dir.path().join("run-staging.img").exists(),
        "moved, not copied: RAM is scarce"
    );
    let installed: Value = serde_json::from_slice(
        &fs::read(rehearsal.root().join("reimage-plan.json")).expect("installed plan"),
    )
    .expect("plan JSON");
    assert_eq!(installed["staged"]["path"], "/staged/run-staging.img");
    let (ok, outcome) = rehearsal.rehearse();
    assert!(ok, "rehearsal failed: {outcome}");
    assert_eq!(outcome["result"], "written");
    assert!(rehearsal.storage_unchanged());
}

#[test]
fn install_refuses_a_bad_plan_and_installs_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan.json");
    fs::write(&plan, r#"{"version": 1}"#).expect("plan");
    let root = dir.path().join("root");
    let report = dir.path().join("helper-error.txt");
    let output = run(agent(&["handoff", "install", "--plan"])
        .arg(&plan)
        .arg("--root")
        .arg(&root)
        .arg("--report")
        .arg(&report));
    assert!(!output.status.success());
    let text = stderr(&output);
    assert!(text.contains("not valid"), "{text}");
    assert!(!root.join("shutdown").exists(), "nothing installed");
    // What the daemon reads back when systemd-run says only "failed".
    let reported = fs::read_to_string(&report).expect("the error is reported");
    assert!(
        reported.contains("InvalidArgument") && reported.contains("not valid"),
        "{reported}"
    );
}
