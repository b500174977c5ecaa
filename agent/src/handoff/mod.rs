//! The in-place reimage's last act. A node's own root disk cannot be
//! written while it is mounted, so the daemon stages and verifies the whole
//! image first, leaves a [`HandoffPlan`] next to a copy of itself under
//! `/run/initramfs/`, and reboots through systemd; systemd runs that copy
//! as `/run/initramfs/shutdown` once the old root is unmounted. There the
//! plan is checked again — a missing or changed staged image writes
//! nothing and the node simply reboots into its old system — and then the
//! same pipeline writes the image, keeping the saved partitions.

use crate::disk::saved::SaveSpec;
use crate::image::http::HttpOptions;
use crate::image::source::Location;
use crate::pipeline::{self, ImageRequest, WriteFailure, WriteReport, WriteRequest};
use crate::{Error, Result};
use reimage_protocol::{ImageFormat, WriteProgress};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The plan format this build writes and reads.
pub const PLAN_VERSION: u32 = 1;
/// Where the plan lives inside the handoff root (`/run/initramfs`).
pub const PLAN_FILE: &str = "reimage-plan.json";

/// Everything the handoff needs, decided and verified while the old
/// system still ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandoffPlan {
    pub version: u32,
    /// The operation this write finishes (the new system confirms it).
    pub operation_id: String,
    /// The staged image as fetched (still encoded).
    pub staged_image: PathBuf,
    /// SHA-256 of the staged file: it must not have changed since staging.
    pub staged_sha256: String,
    /// Format, size and SHA-256 of the decoded image, checked again as it
    /// is written.
    pub format: ImageFormat,
    pub image_size: u64,
    pub image_sha256: String,
    /// The whole disk to write.
    pub target: PathBuf,
    pub save_partlabel: Vec<String>,
    pub save_partindex: Vec<u32>,
}

impl HandoffPlan {
    /// Writes the plan (aside, then renamed: a plan is whole or absent).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::io("serialising the handoff plan", std::io::Error::other(e)))?;
        let partial = path.with_extension("partial");
        std::fs::write(&partial, text)
            .and_then(|()| File::open(&partial).and_then(|f| f.sync_all()))
            .and_then(|()| std::fs::rename(&partial, path))
            .map_err(|e| Error::io(format!("writing the handoff plan {}", path.display()), e))
    }

    /// Reads and checks a plan.
    pub fn load(path: &Path) -> Result<HandoffPlan> {
        let text = std::fs::read(path)
            .map_err(|e| Error::io(format!("reading the handoff plan {}", path.display()), e))?;
        let plan: HandoffPlan = serde_json::from_slice(&text).map_err(|e| {
            Error::InvalidArgument(format!(
                "the handoff plan {} is not valid: {e}",
                path.display()
            ))
        })?;
        if plan.version != PLAN_VERSION {
            return Err(Error::InvalidArgument(format!(
                "the handoff plan is version {}, this agent reads {PLAN_VERSION}",
                plan.version
            )));
        }
        Ok(plan)
    }
}

/// Why the handoff did not write, or what went wrong while it did.
#[derive(Debug)]
pub enum HandoffFailure {
    /// Refused before touching the disk: the old system boots again.
    Refused(Error),
    /// The write failed: the disk holds only the saved partitions.
    WriteFailed(WriteFailure),
}

/// Checks the staged image against the plan, then writes it. Nothing is
/// written unless the staged file is there and hashes as it did when it
/// was verified.
pub fn run_plan(
    plan: &HandoffPlan,
    progress: &mut dyn FnMut(&WriteProgress),
) -> std::result::Result<WriteReport, HandoffFailure> {
    check_staged(plan).map_err(HandoffFailure::Refused)?;
    let request = WriteRequest {
        image: ImageRequest {
            location: Location::File(plan.staged_image.clone()),
            sha256: Some(plan.image_sha256.clone()),
            size: Some(plan.image_size),
            format: Some(plan.format),
        },
        target: plan.target.clone(),
        save: SaveSpec {
            labels: plan.save_partlabel.clone(),
            indexes: plan.save_partindex.clone(),
        },
        read_back: true,
        http: HttpOptions::default(),
    };
    pipeline::write_image(&request, progress).map_err(|failure| {
        if failure.disk_touched {
            HandoffFailure::WriteFailed(failure)
        } else {
            HandoffFailure::Refused(failure.error)
        }
    })
}

/// The staged file exists and has the hash it had when it was verified.
fn check_staged(plan: &HandoffPlan) -> Result<()> {
    let mut file = File::open(&plan.staged_image).map_err(|e| {
        Error::io(
            format!("opening the staged image {}", plan.staged_image.display()),
            e,
        )
    })?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| Error::io("reading the staged image", e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != plan.staged_sha256 {
        return Err(Error::ImageChecksumMismatch {
            expected: plan.staged_sha256.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    struct Staged {
        dir: tempfile::TempDir,
        plan: HandoffPlan,
        target_before: Vec<u8>,
    }

    /// A 4 MiB raw image staged as zstd, and a 16 MiB target of random bytes.
    fn staged() -> Staged {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut image = vec![0u8; 4 * MIB];
        fastrand::Rng::with_seed(1).fill(&mut image[MIB..2 * MIB]);
        let packed = zstd::encode_all(&image[..], 1).expect("zstd");
        let staged_image = dir.path().join("image.zst");
        std::fs::write(&staged_image, &packed).expect("staged");
        let target = dir.path().join("disk.img");
        let mut target_before = vec![0u8; 16 * MIB];
        fastrand::Rng::with_seed(2).fill(&mut target_before);
        std::fs::write(&target, &target_before).expect("target");
        let plan = HandoffPlan {
            version: PLAN_VERSION,
            operation_id: "op-1".into(),
            staged_image,
            staged_sha256: hex::encode(Sha256::digest(&packed)),
            format: ImageFormat::Zstd,
            image_size: image.len() as u64,
            image_sha256: hex::encode(Sha256::digest(&image)),
            target,
            save_partlabel: Vec::new(),
            save_partindex: Vec::new(),
        };
        Staged {
            dir,
            plan,
            target_before,
        }
    }

    fn target_unchanged(staged: &Staged) -> bool {
        std::fs::read(&staged.plan.target).expect("target") == staged.target_before
    }

    #[test]
    fn a_plan_round_trips_and_a_foreign_version_is_refused() {
        let staged = staged();
        let path = staged.dir.path().join(PLAN_FILE);
        staged.plan.save(&path).expect("saves");
        assert_eq!(HandoffPlan::load(&path).expect("loads"), staged.plan);
        let mut newer = staged.plan.clone();
        newer.version = PLAN_VERSION + 1;
        newer.save(&path).expect("saves");
        let err = HandoffPlan::load(&path).expect_err("newer plan");
        assert!(err.to_string().contains("version"), "{err}");
        std::fs::write(&path, b"{\"version\":1}").expect("partial plan");
        assert!(HandoffPlan::load(&path).is_err(), "missing fields");
    }

    #[test]
    fn a_missing_staged_image_writes_nothing() {
        let staged = staged();
        std::fs::remove_file(&staged.plan.staged_image).expect("remove");
        let outcome = run_plan(&staged.plan, &mut |_| {});
        assert!(
            matches!(outcome, Err(HandoffFailure::Refused(_))),
            "{outcome:?}"
        );
        assert!(target_unchanged(&staged), "the old system stays bootable");
    }

    #[test]
    fn a_staged_image_that_changed_since_staging_writes_nothing() {
        let staged = staged();
        let mut bytes = std::fs::read(&staged.plan.staged_image).expect("staged");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&staged.plan.staged_image, bytes).expect("corrupt");
        match run_plan(&staged.plan, &mut |_| {}) {
            Err(HandoffFailure::Refused(err)) => assert_eq!(err.code(), "ImageChecksumMismatch"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(target_unchanged(&staged), "the old system stays bootable");
    }

    #[test]
    fn a_good_plan_writes_the_image() {
        let staged = staged();
        let report = run_plan(&staged.plan, &mut |_| {}).expect("writes");
        assert_eq!(report.sha256, staged.plan.image_sha256);
        let written = std::fs::read(&staged.plan.target).expect("target");
        let image_len = staged.plan.image_size as usize;
        let mut expected = vec![0u8; image_len];
        fastrand::Rng::with_seed(1).fill(&mut expected[MIB..2 * MIB]);
        assert!(
            written[..image_len] == expected[..],
            "the image is on the disk"
        );
    }
}
