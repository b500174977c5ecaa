//! The handoff plan: everything the shutdown handoff needs, decided and
//! verified while the old system still ran, in one small JSON file.

use crate::{Error, Result};
use reimage_protocol::ImageFormat;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The plan format this build writes and reads.
pub const PLAN_VERSION: u32 = 2;

/// What the handoff does, and what it checks first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandoffPlan {
    pub version: u32,
    /// The operation this write finishes (the new system confirms it).
    pub operation_id: String,
    /// Where the staged image is.
    pub staged: StagedAt,
    /// SHA-256 of the staged file: it must not have changed since staging.
    pub staged_sha256: String,
    /// Staged through a block index: the SHA-256 of the staged file's own
    /// index, beside it (`.index.json`). The handoff then writes only the
    /// blocks the disk does not hold once the old root is unmounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staged_index_sha256: Option<String>,
    /// Format, size and SHA-256 of the decoded image, checked again as it
    /// is written.
    pub format: ImageFormat,
    pub image_size: u64,
    pub image_sha256: String,
    /// The whole disk to write.
    pub target: PathBuf,
    pub save_partlabel: Vec<String>,
    pub save_partindex: Vec<u32>,
    /// The filesystem of the agent's `state_dir`: the handoff mounts it to
    /// read an image staged there and to leave its outcome for the new
    /// system's agent.
    pub state: StateFilesystem,
}

/// Where the image was staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "area")]
pub enum StagedAt {
    /// In RAM: a path inside the handoff root (`/run/initramfs`), which is
    /// `/` while the handoff runs.
    Memory { path: PathBuf },
    /// On the state filesystem: a path relative to `state_dir`.
    StateDir { path: PathBuf },
}

/// A filesystem named so that the handoff can mount it again: the same
/// kernel still runs, so the device node and number are those of staging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateFilesystem {
    /// `/dev/vda2`.
    pub device: PathBuf,
    /// `major:minor`, checked against the node before mounting.
    pub dev: String,
    pub fstype: String,
    /// `state_dir` inside that filesystem.
    pub state_dir_in_fs: PathBuf,
    /// It is a (saved) partition of the target: it stays mounted read-only
    /// beside the write, so the target cannot be opened exclusively.
    pub on_target: bool,
}

impl HandoffPlan {
    /// Writes the plan (aside, then renamed: a plan is whole or absent).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::io("serialising the handoff plan", std::io::Error::other(e)))?;
        write_atomically(path, text.as_bytes())
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

    /// The staged image's path, with `state_dir` where the handoff sees it.
    pub fn staged_path(&self, state_dir: &Path) -> PathBuf {
        match &self.staged {
            StagedAt::Memory { path } => path.clone(),
            StagedAt::StateDir { path } => state_dir.join(path),
        }
    }
}

/// Writes `bytes` to `path.partial`, syncs it, renames it over `path` and
/// syncs the directory: after a crash the file is the old one or the new one.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)?;
    File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
