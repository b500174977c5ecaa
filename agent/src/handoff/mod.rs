//! The in-place reimage. A node's own root disk cannot be written while it
//! is mounted, so the daemon first stages the whole image — downloaded,
//! decoded and verified, in RAM or on the state filesystem — while the old
//! system still runs ([`stage`]); then it installs a copy of itself as
//! `/run/initramfs/shutdown` beside a [`HandoffPlan`] ([`install`]) and
//! reboots through systemd. systemd runs that copy as PID 1 once the old
//! root is unmounted ([`shutdown`]): it checks the plan again — a missing
//! or changed staged image writes nothing and the node simply reboots into
//! its old system — writes the image with the same pipeline, leaves an
//! [`Outcome`] in `state_dir` and reboots. The agent of the next boot reads
//! that outcome to confirm the operation.

pub mod install;
pub mod outcome;
pub mod plan;
pub mod prepare;
pub mod shutdown;
pub mod stage;

pub use outcome::{Outcome, OutcomeRecord};
pub use plan::{HandoffPlan, PLAN_VERSION, StagedAt, StateFilesystem};

use crate::disk::saved::SaveSpec;
use crate::image::block_index::IndexRef;
use crate::image::http::HttpOptions;
use crate::image::source::Location;
use crate::pipeline::{self, ImageRequest, WriteFailure, WriteReport, WriteRequest};
use crate::{Error, Result};
use reimage_protocol::WriteProgress;
use std::path::{Path, PathBuf};

/// Where systemd looks for a shutdown handoff.
pub const HANDOFF_ROOT: &str = "/run/initramfs";
/// Where the plan lives inside the handoff root.
pub const PLAN_FILE: &str = "reimage-plan.json";

/// Why the handoff did not write, or what went wrong while it did.
#[derive(Debug)]
pub enum HandoffFailure {
    /// Refused before touching the disk: the old system boots again.
    Refused(Error),
    /// The write failed: the disk holds only the saved partitions.
    WriteFailed(WriteFailure),
}

/// Checks the staged image at `staged` against the plan, then writes it.
/// Nothing is written unless the staged file is there and hashes as it did
/// when it was verified. `beside_mounts` are the read-only mounts of saved
/// partitions that may stay while the target is written.
pub fn run_plan(
    plan: &HandoffPlan,
    staged: &Path,
    beside_mounts: &[PathBuf],
    progress: &mut dyn FnMut(&WriteProgress),
) -> std::result::Result<WriteReport, HandoffFailure> {
    check_staged(staged, &plan.staged_sha256).map_err(HandoffFailure::Refused)?;
    let request = WriteRequest {
        image: ImageRequest {
            location: Location::File(staged.to_path_buf()),
            sha256: Some(plan.image_sha256.clone()),
            size: Some(plan.image_size),
            format: Some(plan.format),
            block_index: plan.staged_index_sha256.as_ref().map(|sha256| IndexRef {
                location: Location::File(stage::staged_index_path(staged)),
                sha256: sha256.clone(),
            }),
            boot_loader: None,
        },
        target: plan.target.clone(),
        save: SaveSpec {
            labels: plan.save_partlabel.clone(),
            indexes: plan.save_partindex.clone(),
        },
        read_back: true,
        http: HttpOptions::default(),
        beside_mounts: beside_mounts.to_vec(),
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
fn check_staged(staged: &Path, expected: &str) -> Result<()> {
    let (actual, _) = stage::hash_file(staged)?;
    if actual != expected {
        return Err(Error::ImageChecksumMismatch {
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reimage_protocol::ImageFormat;
    use sha2::{Digest, Sha256};

    const MIB: usize = 1 << 20;

    struct Staged {
        dir: tempfile::TempDir,
        plan: HandoffPlan,
        /// The staged file, as the handoff would find it.
        staged: PathBuf,
        target_before: Vec<u8>,
    }

    impl Staged {
        fn run(&self) -> std::result::Result<WriteReport, HandoffFailure> {
            run_plan(&self.plan, &self.staged, &[], &mut |_| {})
        }
    }

    /// A 4 MiB raw image staged as zstd, and a 16 MiB target of random bytes.
    fn staged() -> Staged {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut image = vec![0u8; 4 * MIB];
        fastrand::Rng::with_seed(1).fill(&mut image[MIB..2 * MIB]);
        let packed = zstd::encode_all(&image[..], 1).expect("zstd");
        let staged = dir.path().join("staging/image.zst");
        std::fs::create_dir(dir.path().join("staging")).expect("staging dir");
        std::fs::write(&staged, &packed).expect("staged");
        let target = dir.path().join("disk.img");
        let mut target_before = vec![0u8; 16 * MIB];
        fastrand::Rng::with_seed(2).fill(&mut target_before);
        std::fs::write(&target, &target_before).expect("target");
        let plan = HandoffPlan {
            version: PLAN_VERSION,
            operation_id: "op-1".into(),
            staged: StagedAt::StateDir {
                path: "staging/image.zst".into(),
            },
            staged_sha256: hex::encode(Sha256::digest(&packed)),
            staged_index_sha256: None,
            format: ImageFormat::Zstd,
            image_size: image.len() as u64,
            image_sha256: hex::encode(Sha256::digest(&image)),
            target,
            save_partlabel: Vec::new(),
            save_partindex: Vec::new(),
            state: StateFilesystem {
                device: "/dev/vda2".into(),
                dev: "254:2".into(),
                fstype: "ext4".into(),
                state_dir_in_fs: "/".into(),
                on_target: true,
            },
        };
        assert_eq!(plan.staged_path(dir.path()), staged);
        Staged {
            dir,
            plan,
            staged,
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
        std::fs::remove_file(&staged.staged).expect("remove");
        let outcome = staged.run();
        assert!(
            matches!(outcome, Err(HandoffFailure::Refused(_))),
            "{outcome:?}"
        );
        assert!(target_unchanged(&staged), "the old system stays bootable");
    }

    #[test]
    fn a_staged_image_that_changed_since_staging_writes_nothing() {
        let staged = staged();
        let mut bytes = std::fs::read(&staged.staged).expect("staged");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&staged.staged, bytes).expect("corrupt");
        match staged.run() {
            Err(HandoffFailure::Refused(err)) => assert_eq!(err.code(), "ImageChecksumMismatch"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(target_unchanged(&staged), "the old system stays bootable");
    }

    #[test]
    fn a_good_plan_writes_the_image() {
        let staged = staged();
        let report = staged.run().expect("writes");
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
