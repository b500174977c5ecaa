//! What the shutdown handoff did, left in `state_dir` for the agent of the
//! next boot: it is the only witness of a write that happened while no
//! agent ran. No outcome at all means the handoff never ran.

use super::plan::write_atomically;
use crate::pipeline::BlockCounts;
use crate::{Error, Result};
use jiff::Timestamp;
use reimage_protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The directory under `state_dir` that holds plans and outcomes.
pub const HANDOFF_DIR: &str = "handoff";

/// How the handoff ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum Outcome {
    /// The image is on the disk, verified, with the merged partition table;
    /// through a block index, what was written and kept.
    Written {
        sha256: String,
        size: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blocks: Option<BlockCounts>,
    },
    /// Nothing was written; the node boots its old system.
    Refused { code: ErrorCode, message: String },
    /// The write failed part way; the disk holds only the saved partitions.
    WriteFailed { code: ErrorCode, message: String },
}

/// The outcome file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutcomeRecord {
    pub operation_id: String,
    pub finished_at: Timestamp,
    pub elapsed_seconds: f64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// `state_dir/handoff/<operation>.plan.json`: the plan as the agent wrote it.
pub fn plan_path(state_dir: &Path, operation_id: &str) -> PathBuf {
    state_dir
        .join(HANDOFF_DIR)
        .join(format!("{operation_id}.plan.json"))
}

/// `state_dir/handoff/<operation>.outcome.json`.
pub fn outcome_path(state_dir: &Path, operation_id: &str) -> PathBuf {
    state_dir
        .join(HANDOFF_DIR)
        .join(format!("{operation_id}.outcome.json"))
}

impl OutcomeRecord {
    /// Writes the outcome (aside, then renamed).
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let path = outcome_path(state_dir, &self.operation_id);
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::io("serialising the handoff outcome", std::io::Error::other(e)))?;
        std::fs::create_dir_all(state_dir.join(HANDOFF_DIR))
            .and_then(|()| write_atomically(&path, &text))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// The outcome of operation `id`, `None` if the handoff left none.
    pub fn load(state_dir: &Path, operation_id: &str) -> Result<Option<OutcomeRecord>> {
        let path = outcome_path(state_dir, operation_id);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_slice(&text).map(Some).map_err(|e| {
            Error::InvalidArgument(format!(
                "the handoff outcome {} is not valid: {e}",
                path.display()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            OutcomeRecord::load(dir.path(), "op-1").expect("loads"),
            None
        );
        let record = OutcomeRecord {
            operation_id: "op-1".into(),
            finished_at: Timestamp::now(),
            elapsed_seconds: 1.5,
            outcome: Outcome::Refused {
                code: ErrorCode::ImageChecksumMismatch,
                message: "changed".into(),
            },
        };
        record.save(dir.path()).expect("saves");
        let text = std::fs::read_to_string(outcome_path(dir.path(), "op-1")).expect("file");
        assert!(text.contains("\"result\": \"refused\""), "{text}");
        assert_eq!(
            OutcomeRecord::load(dir.path(), "op-1").expect("loads"),
            Some(record)
        );
    }
}
