//! Recovering at start-up: operations an earlier agent (or boot) left
//! `InProgress` are finished from what the store and `state_dir` say: a
//! reboot that happened is confirmed, waiting is resumed, a write that was
//! cut off is failed with the reason.

use super::Agent;
use super::record::OperationRecord;
use crate::handoff::{HandoffPlan, Outcome, OutcomeRecord, outcome, prepare, stage};
use crate::reboot::RebootMethod;
use reimage_protocol::api::{OperationKind, OperationProgress, OperationStatus};
use reimage_protocol::{ErrorCode, Phase};
use std::sync::Arc;

impl Agent {
    /// Finishes operations an earlier agent left `InProgress`. A write that
    /// was cut off leaves the disk with only the saved partitions: the node
    /// is then `unusable` until reimaged.
    pub(super) fn recover(self: &Arc<Self>) -> crate::Result<()> {
        let unfinished: Vec<OperationRecord> = self
            .lock()
            .operations
            .values()
            .filter(|r| r.operation.status == OperationStatus::InProgress)
            .cloned()
            .collect();
        for record in unfinished {
            let id = record.operation.id.clone();
            if record.operation.kind == OperationKind::Prefetch {
                // Its partial download was removed when the staged images
                // were opened; the node never depended on it.
                self.fail_prefetch(
                    &id,
                    ErrorCode::AgentRestarted,
                    "the agent stopped while prefetching; the partial download was removed, prefetch again",
                )?;
                continue;
            }
            let rebooted = record.boot_id.as_deref() != Some(&self.boot_id);
            match record.operation.phase {
                Some(Phase::Rebooting) | Some(Phase::Confirming) if record.handoff => {
                    if rebooted {
                        self.resume(&id);
                        self.confirm_handoff(&id)?;
                    } else {
                        self.cancel_handoff(&id);
                        self.fail(
                            &id,
                            ErrorCode::RebootNotObserved,
                            "the agent restarted but the node did not reboot; the shutdown handoff was removed and nothing was written",
                            false,
                        )?;
                    }
                }
                Some(Phase::Rebooting) | Some(Phase::Confirming) => {
                    if rebooted || self.config.reboot.method == RebootMethod::None {
                        self.resume(&id);
                        self.confirm(&id)?;
                    } else {
                        self.fail(
                            &id,
                            ErrorCode::RebootNotObserved,
                            "the agent restarted but the node did not reboot",
                            true,
                        )?;
                    }
                }
                Some(Phase::Staging) => {
                    if record.handoff {
                        self.cancel_handoff(&id);
                    }
                    self.remove_handoff_files(&id);
                    self.fail(
                        &id,
                        ErrorCode::AgentRestarted,
                        "the agent stopped while staging the image; nothing was written, reimage again",
                        false,
                    )?;
                }
                Some(Phase::Comparing) => {
                    self.fail(
                        &id,
                        ErrorCode::AgentRestarted,
                        "the agent stopped while comparing the disk with the image's block index; nothing was written, reimage again",
                        false,
                    )?;
                }
                Some(phase @ (Phase::Downloading | Phase::Verifying | Phase::SavingPartitions)) => {
                    self.fail(
                        &id,
                        ErrorCode::AgentRestarted,
                        &format!(
                            "the agent stopped during {phase:?}; the disk holds only the saved partitions, reimage again to recover"
                        ),
                        true,
                    )?;
                }
                _ => {
                    tracing::info!(operation = %id, "resuming an operation interrupted while waiting");
                    self.resume(&id);
                    let agent = Arc::clone(self);
                    tokio::spawn(async move { agent.run(id).await });
                }
            }
        }
        if self.lock().current.is_none() {
            // The task gates are persisted: a crash between an operation's
            // end and their release must not hold the tasks forever.
            self.tasks.set_accepting(true);
            self.tasks.set_hold(false);
        }
        Ok(())
    }

    /// Makes `id` the current operation again, holding tasks meanwhile.
    fn resume(&self, id: &str) {
        self.lock().current = Some(id.to_string());
        self.tasks.set_hold(true);
    }

    /// The node rebooted after an in-place reimage: the handoff's outcome
    /// in `state_dir` says whether it wrote the image this operation
    /// expected.
    fn confirm_handoff(&self, id: &str) -> crate::Result<()> {
        let state_dir = &self.config.agent.state_dir;
        let expected =
            HandoffPlan::load(&outcome::plan_path(state_dir, id)).map(|p| p.image_sha256);
        let outcome = OutcomeRecord::load(state_dir, id);
        self.remove_handoff_files(id);
        let (record, expected) = match (outcome, expected) {
            (Ok(Some(record)), Ok(expected)) => (record, expected),
            (Ok(None), _) => {
                return self.fail(
                    id,
                    ErrorCode::HandoffNotRun,
                    "the node rebooted, but the shutdown handoff left no outcome: it did not run (was /run/initramfs/shutdown in place and /run executable?); the node is on its old image",
                    false,
                );
            }
            (Err(err), _) | (_, Err(err)) => {
                return self.fail(
                    id,
                    ErrorCode::HandoffOutcomeUnreadable,
                    &err.to_string(),
                    false,
                );
            }
        };
        tracing::info!(operation = %id, outcome = ?record.outcome, seconds = record.elapsed_seconds, "the shutdown handoff's outcome");
        match record.outcome {
            Outcome::Written {
                sha256,
                size,
                blocks,
            } if sha256 == expected => {
                // What the handoff wrote, at the rate it wrote it.
                let rate = if record.elapsed_seconds > 0.0 {
                    (size as f64 / record.elapsed_seconds) as u64
                } else {
                    0
                };
                let written = blocks.map_or(size, |b| b.written);
                let metrics = crate::metrics::global();
                metrics.bytes_written.inc_by(written);
                if let Some(blocks) = blocks {
                    metrics.bytes_unchanged.inc_by(blocks.unchanged);
                }
                self.update(id, |op| {
                    op.progress = OperationProgress {
                        bytes_written: written,
                        total_bytes: Some(size),
                        bytes_per_second: rate,
                        // Staging's download; the handoff read its own copy.
                        bytes_downloaded: op.progress.bytes_downloaded,
                        bytes_unchanged: blocks.map(|b| b.unchanged),
                    }
                })?;
                self.confirm(id)
            }
            Outcome::Written { sha256, .. } => self.fail(
                id,
                ErrorCode::HandoffImageMismatch,
                &format!(
                    "the shutdown handoff wrote an image with sha256 {sha256}, the operation expected {expected}"
                ),
                false,
            ),
            Outcome::Refused { code, message } => self.fail(
                id,
                ErrorCode::HandoffRefused,
                &format!(
                    "the shutdown handoff wrote nothing ({code}: {message}); the node rebooted into its old image"
                ),
                false,
            ),
            Outcome::WriteFailed { code, message } => self.fail(
                id,
                code,
                &format!(
                    "the shutdown handoff's write failed: {message}; the disk holds only the saved partitions"
                ),
                true,
            ),
        }
    }

    /// Removes the shutdown handoff of operation `id`, if installed; logged,
    /// not fatal: the operation ends either way.
    pub(super) fn cancel_handoff(&self, id: &str) {
        match prepare::cancel_installed(&self.config.agent.state_dir) {
            Ok(()) => tracing::info!(operation = %id, "removed the shutdown handoff"),
            Err(err) => {
                tracing::error!(operation = %id, %err, "could not remove the shutdown handoff: the next reboot may still write the staged image")
            }
        }
    }

    /// The staged image and the plan and outcome files of operation `id`.
    fn remove_handoff_files(&self, id: &str) {
        let state_dir = &self.config.agent.state_dir;
        for path in [
            outcome::plan_path(state_dir, id),
            outcome::outcome_path(state_dir, id),
        ] {
            if let Err(err) = std::fs::remove_file(&path)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), %err, "could not remove a handoff file");
            }
        }
        let staging = state_dir.join(stage::STATE_STAGING_DIR);
        if let Err(err) = std::fs::remove_dir_all(&staging)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %staging.display(), %err, "could not remove the staged image");
        }
    }
}
