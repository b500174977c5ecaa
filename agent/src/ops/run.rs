//! Running an operation to its end: the task policy, the write (direct, or
//! staged for the shutdown handoff), the reboot, and the record of how it
//! ended, which is kept: a finished operation still says what it wrote.

use super::image_choice::{self, ImageChoice};
use super::record::NodeRecord;
use super::{Agent, Table};
use crate::boot::BootLayout;
use crate::handoff::prepare::{self, InPlaceRequest};
use crate::image::http::HttpOptions;
use crate::pipeline::{self, BlockCounts, ImageRequest, WriteFailure, WriteRequest};
use crate::reboot::{self, RebootMethod};
use crate::tasks::StopMode;
use jiff::Timestamp;
use reimage_protocol::api::{
    ImageRef, NameValuePair, NodeError, NodeReimageOption, OperationError, OperationKind,
    OperationProgress, OperationStatus, RebootKind, RebootReport,
};
use reimage_protocol::{ErrorCode, Phase, WriteProgress};
use std::sync::Arc;
use std::time::Duration;

/// What a finished write leaves in the operation's record.
pub(super) struct Written {
    pub image: ImageRef,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Written through a block index: what was fetched, kept and written.
    pub blocks: Option<BlockCounts>,
    /// Staged through a block index: the encoded bytes fetched.
    pub downloaded: Option<u64>,
    /// The image's EFI system partition and partitions, and the loader its
    /// manifest names: what the firmware's boot entry is made of.
    pub boot: BootLayout,
    pub boot_loader: Option<String>,
}

impl Written {
    /// The record's progress: what was written in all, at what average rate
    /// of the image's size.
    pub fn progress(&self) -> OperationProgress {
        let seconds = self.elapsed.as_secs_f64();
        OperationProgress {
            bytes_written: self.blocks.map_or(self.bytes, |b| b.written),
            total_bytes: Some(self.bytes),
            bytes_per_second: if seconds > 0.0 {
                (self.bytes as f64 / seconds) as u64
            } else {
                0
            },
            bytes_downloaded: self.blocks.map(|b| b.downloaded).or(self.downloaded),
            bytes_unchanged: self.blocks.map(|b| b.unchanged),
        }
    }
}

impl Agent {
    /// Runs operation `id` to its end.
    pub(super) async fn run(self: Arc<Self>, id: String) {
        let outcome = self.drive(&id).await;
        if let Err(failure) = outcome
            && let Err(err) = self.fail(
                &id,
                failure.error.code(),
                &failure.error.to_string(),
                failure.disk_touched,
            )
        {
            tracing::error!(operation = %id, %err, "could not record the failure");
        }
    }

    async fn drive(self: &Arc<Self>, id: &str) -> Result<(), WriteFailure> {
        let record = self
            .lock()
            .operations
            .get(id)
            .cloned()
            .ok_or_else(|| crate::Error::InvalidArgument(format!("operation {id} vanished")))?;
        self.apply_task_policy(id, record.operation.node_reimage_option)
            .await?;
        let mut kexec_into = None;
        if record.operation.kind == OperationKind::Reimage {
            let request = record
                .request
                .clone()
                .ok_or_else(|| crate::Error::InvalidArgument("reimage without a request".into()))?;
            // Checked again: the configured image may have changed with a
            // restart, and the request was accepted under the old config.
            let image = image_choice::choose(
                &self.config,
                request.image.as_ref(),
                request.manifest_url.as_deref(),
            )
            .map_err(|refusal| crate::Error::InvalidArgument(refusal.to_string()))?;
            if self.wants_kexec(request.reboot) {
                kexec_into = Some(image.clone());
            }
            let written = self.write(id, image).await?;
            // The agent that confirms it may be the next boot's.
            self.update_node(|node| node.pending_image = Some(written.image.clone()))?;
            self.update(id, |op| {
                op.progress = written.progress();
                op.image = Some(written.image.clone());
            })?;
            self.point_firmware_at(id, &written)?;
        }
        self.reboot_now(id, kexec_into).await?;
        Ok(())
    }

    /// Whether a reimage boots its new kernel by kexec: the request says
    /// so, or it says nothing and `[reboot] method` is `kexec`.
    fn wants_kexec(&self, asked: Option<RebootKind>) -> bool {
        match asked {
            Some(kind) => kind == RebootKind::Kexec,
            None => self.config.reboot.method == RebootMethod::Kexec,
        }
    }

    /// Loads the kernel of `image` for kexec; on any failure the node
    /// reboots through the firmware instead, and the operation says why.
    /// Returns whether the kernel is loaded.
    async fn load_kexec(self: &Arc<Self>, id: &str, image: ImageChoice) -> bool {
        let agent = Arc::clone(self);
        let loaded = tokio::task::spawn_blocking(move || {
            let http = agent.http_options();
            let request = image.kexec(&agent.config, &http)?.ok_or_else(|| {
                crate::Error::InvalidArgument(
                    "the image's manifest names no kernel (boot.kexec)".into(),
                )
            })?;
            reboot::kexec::load(&request, &http)
        })
        .await
        .unwrap_or_else(|e| {
            Err(crate::Error::io(
                "loading the kernel",
                std::io::Error::other(e),
            ))
        });
        let report = match loaded {
            Ok(()) => RebootReport {
                method: RebootKind::Kexec,
                fallback: None,
            },
            Err(err) => {
                tracing::warn!(operation = %id, %err, "kexec is not possible; rebooting through the firmware");
                RebootReport {
                    method: RebootKind::Firmware,
                    fallback: Some(format!("kexec: {err}")),
                }
            }
        };
        let kexec = report.method == RebootKind::Kexec;
        if let Err(err) = self.update(id, |op| op.reboot = Some(report)) {
            tracing::warn!(operation = %id, %err, "could not record how the node reboots");
        }
        kexec
    }

    /// Applies the operation's policy to the tasks on the node.
    async fn apply_task_policy(
        self: &Arc<Self>,
        id: &str,
        option: NodeReimageOption,
    ) -> crate::Result<()> {
        match option {
            NodeReimageOption::Requeue => {
                let stopped = self.tasks.stop_running(StopMode::Requeue).await;
                self.update(id, |op| op.requeued_tasks = stopped)?;
            }
            NodeReimageOption::Terminate => {
                let stopped = self.tasks.stop_running(StopMode::Terminate).await;
                self.update(id, |op| op.terminated_tasks = stopped)?;
            }
            NodeReimageOption::TaskCompletion | NodeReimageOption::RetainedData => {
                self.tasks.set_accepting(false);
                self.set_phase(id, Phase::WaitingForTasks)?;
                let prefetch = self.prefetch_while_waiting(id, option);
                self.tasks.wait_idle().await;
                if option == NodeReimageOption::RetainedData {
                    self.set_phase(id, Phase::WaitingForRetention)?;
                    self.tasks.wait_retention_expired().await;
                }
                if let Some(prefetch) = prefetch {
                    // Its download is this write's: let it finish rather
                    // than fetch the image a second time.
                    if let Err(err) = prefetch.await {
                        tracing::warn!(operation = %id, %err, "the prefetch while waiting did not finish");
                    }
                }
            }
        }
        Ok(())
    }

    /// Streams, verifies and writes the image (on a blocking thread), with
    /// the pipeline's phases and progress shown in the operation. A
    /// prefetched copy of the image is written instead of downloading it,
    /// still hashed as it is written; when it does not verify, the image
    /// is streamed from its URL after all.
    async fn write(
        self: &Arc<Self>,
        id: &str,
        image: ImageChoice,
    ) -> Result<Written, WriteFailure> {
        self.set_phase(id, Phase::Downloading)?;
        let agent = Arc::clone(self);
        let op_id = id.to_string();
        let job = tokio::task::spawn_blocking(move || {
            let http = agent.http_options();
            let mut touched = false;
            if let Some((record, request)) = agent.staged_copy(&image) {
                tracing::info!(operation = %op_id, sha256 = %record.info.sha256, "writing the prefetched copy of the image: nothing is downloaded");
                match agent.write_resolved(&op_id, &image, request, http.clone()) {
                    Ok(written) => {
                        agent.drop_staged(&record);
                        return Ok(written);
                    }
                    Err(failure) if super::prefetch::staged_copy_failed(&failure.error) => {
                        tracing::warn!(operation = %op_id, err = %failure.error, "the prefetched copy did not verify; streaming the image from its URL");
                        agent.drop_staged(&record);
                        touched = failure.disk_touched;
                    }
                    Err(failure) => return Err(failure),
                }
            }
            let request = image
                .resolve(&agent.config, &http)
                .map_err(|error| WriteFailure {
                    error,
                    disk_touched: touched,
                })?;
            agent
                .write_resolved(&op_id, &image, request, http)
                .map_err(|mut failure| {
                    failure.disk_touched |= touched;
                    failure
                })
        });
        job.await.map_err(|e| {
            WriteFailure::from(crate::Error::io(
                "running the write",
                std::io::Error::other(e),
            ))
        })?
    }

    /// Writes the resolved image `request`: straight to the target, or
    /// staged for the shutdown handoff when the target is in use.
    fn write_resolved(
        &self,
        id: &str,
        image: &ImageChoice,
        request: ImageRequest,
        http: HttpOptions,
    ) -> Result<Written, WriteFailure> {
        let name = image.name();
        self.note_partitions_before(id)?;
        let boot_loader = request.boot_loader.clone();
        if let Some(sha256) = &request.sha256 {
            let expected = ImageRef {
                name: name.clone(),
                sha256: sha256.clone(),
            };
            self.update(id, |op| op.image = Some(expected))?;
        }
        let disk = &self.config.disk;
        let busy = crate::disk::busy::users_of(&disk.target).unwrap_or_default();
        if !busy.is_empty() {
            return self.stage_in_place(id, name, request, http, &busy);
        }
        let write = WriteRequest {
            image: request,
            target: disk.target.clone(),
            save: disk.save_spec(),
            read_back: true,
            http,
            beside_mounts: Vec::new(),
        };
        let report = pipeline::write_image(&write, &mut |p| self.progress(id, p))?;
        Ok(Written {
            image: ImageRef {
                name,
                sha256: report.sha256,
            },
            bytes: report.size,
            elapsed: report.elapsed,
            blocks: report.blocks,
            downloaded: None,
            boot: report.boot,
            boot_loader,
        })
    }

    /// The target holds the running system (or something else mounted):
    /// stage and verify the image now, and install the shutdown handoff
    /// that writes it during the reboot.
    fn stage_in_place(
        &self,
        id: &str,
        name: String,
        image: ImageRequest,
        http: HttpOptions,
        busy: &[String],
    ) -> Result<Written, WriteFailure> {
        tracing::info!(operation = %id, users = ?busy, "the target is in use: in-place reimage through the shutdown handoff");
        let started = std::time::Instant::now();
        let boot_loader = image.boot_loader.clone();
        let disk = &self.config.disk;
        let request = InPlaceRequest {
            operation_id: id.to_string(),
            image,
            http,
            target: disk.target.clone(),
            save: disk.save_spec(),
            state_dir: self.config.agent.state_dir.clone(),
            staging: disk.staging,
            reboot: self.config.reboot.method,
        };
        let prepared = prepare::stage(&request, busy, &mut |p| self.progress(id, p))?;
        // Noted before the install: an agent that restarts from here on
        // knows a handoff may be in place and removes it.
        self.update_record(id, |record| record.handoff = true)?;
        if let Err(err) = prepare::install(&prepared.plan_path, &self.config.agent.state_dir) {
            self.cancel_handoff(id);
            return Err(err.into());
        }
        Ok(Written {
            image: ImageRef {
                name,
                sha256: prepared.staged.sha256,
            },
            bytes: prepared.staged.size,
            elapsed: started.elapsed(),
            blocks: None,
            downloaded: prepared.downloaded,
            boot: prepared.staged.boot,
            boot_loader,
        })
    }

    /// Shows the pipeline's progress in the operation. Phases are persisted
    /// (recovery depends on them); byte counts are shown live and persisted
    /// with the next phase.
    pub(super) fn progress(&self, id: &str, progress: &WriteProgress) {
        let Some((phase_changed, before)) = self.record_progress(id, progress) else {
            return;
        };
        if progress.phase == Phase::Downloading {
            // Bytes reach the target only in this phase (staging writes the
            // staging area, the handoff's write is counted at confirmation).
            let before = if phase_changed { 0 } else { before };
            crate::metrics::global()
                .bytes_written
                .inc_by(progress.bytes_written.saturating_sub(before));
        }
        if phase_changed {
            self.clock_phase(id, Some(progress.phase));
        }
    }

    /// Shows `progress` in operation `id`, persisting a new phase. Returns
    /// whether the phase changed and the bytes shown before, or `None`
    /// when there is no such operation.
    pub(super) fn record_progress(
        &self,
        id: &str,
        progress: &WriteProgress,
    ) -> Option<(bool, u64)> {
        let mut state = self.lock();
        let record = state.operations.get_mut(id)?;
        let phase_changed =
            progress.phase != Phase::Done && record.operation.phase != Some(progress.phase);
        let before = record.operation.progress.bytes_written;
        if progress.phase != Phase::Done {
            record.operation.phase = Some(progress.phase);
        }
        record.operation.progress = OperationProgress {
            bytes_written: progress.bytes_written,
            total_bytes: progress.total_bytes,
            bytes_per_second: progress.bytes_per_second,
            ..OperationProgress::default()
        };
        record.operation.updated_at = Timestamp::now();
        let persisted = if phase_changed {
            self.store.put(Table::Operations, id, &*record)
        } else {
            Ok(())
        };
        drop(state);
        if let Err(err) = persisted {
            tracing::warn!(operation = %id, %err, "could not persist the phase");
        }
        Some((phase_changed, before))
    }

    /// Records the boot the reboot leaves from, then reboots by the
    /// configured method: into the kernel of `kexec_into` when it loads.
    /// With `none` the new image is confirmed at once.
    async fn reboot_now(
        self: &Arc<Self>,
        id: &str,
        kexec_into: Option<ImageChoice>,
    ) -> crate::Result<()> {
        let boot_id = self.boot_id.clone();
        self.update_record(id, |record| record.boot_id = Some(boot_id))?;
        self.set_phase(id, Phase::Rebooting)?;
        let method = self.config.reboot.method;
        if method == RebootMethod::None {
            return self.confirm(id);
        }
        let kexec = match kexec_into {
            Some(image) => self.load_kexec(id, image).await,
            None => false,
        };
        crate::service::notify_status("rebooting into the new image");
        let rebooted = tokio::task::spawn_blocking(move || reboot::reboot(method, kexec))
            .await
            .map_err(|e| crate::Error::io("rebooting", std::io::Error::other(e)))?;
        let handoff = self.lock().operations.get(id).is_some_and(|r| r.handoff);
        if rebooted.is_err() && handoff {
            // No reboot now must not mean a surprise write at a later one.
            self.cancel_handoff(id);
        }
        rebooted
    }

    /// The node is up on its new image (or after its reboot): the operation
    /// succeeded, held tasks may run again.
    pub(super) fn confirm(&self, id: &str) -> crate::Result<()> {
        self.set_phase(id, Phase::Confirming)?;
        self.settle_boot_entries(id)?;
        self.update_node(|node| {
            if let Some(image) = node.pending_image.take() {
                node.image = Some(image);
            }
            node.unusable = false;
            node.last_failure = None;
        })?;
        self.end(id, OperationStatus::Succeeded, |op| {
            op.phase = Some(Phase::Done)
        })?;
        tracing::info!(operation = %id, "operation succeeded");
        Ok(())
    }

    /// Records a failure, in the operation and on the node. A disk that was
    /// touched holds only the saved partitions: the node is `unusable`, and
    /// names no image, until a reimage succeeds.
    pub(super) fn fail(
        &self,
        id: &str,
        code: ErrorCode,
        message: &str,
        disk_touched: bool,
    ) -> crate::Result<()> {
        tracing::warn!(operation = %id, %code, message, "operation failed");
        self.withdraw_boot_entry(id);
        if code == ErrorCode::ReadbackMismatch {
            crate::metrics::global().readback_mismatches.inc();
        }
        let error = NodeError {
            code: code.clone(),
            message: message.to_string(),
            error_details: vec![NameValuePair {
                name: "operationId".into(),
                value: id.to_string(),
            }],
        };
        self.update_node(|node: &mut NodeRecord| {
            if disk_touched {
                node.unusable = true;
                node.image = None;
                node.pending_image = None;
            }
            node.last_failure = Some(error);
        })?;
        self.end(id, OperationStatus::Failed, |op| {
            op.error = Some(OperationError {
                code,
                message: message.to_string(),
            });
        })
    }

    /// Ends operation `id` with `status`: its end time and duration are
    /// recorded with `change`, and the node takes tasks again.
    fn end(
        &self,
        id: &str,
        status: OperationStatus,
        change: impl FnOnce(&mut reimage_protocol::api::Operation),
    ) -> crate::Result<()> {
        let recorded = self.finish(id, status, change);
        self.clock_phase(id, None);
        {
            let mut state = self.lock();
            if state.current.as_deref() == Some(id) {
                state.current = None;
            }
        }
        self.note_state();
        self.tasks.set_accepting(true);
        self.tasks.set_hold(false);
        recorded
    }

    /// Records the end of operation `id` (`status`, end time, duration,
    /// `change`) and counts it; the node is left as it is.
    pub(super) fn finish(
        &self,
        id: &str,
        status: OperationStatus,
        change: impl FnOnce(&mut reimage_protocol::api::Operation),
    ) -> crate::Result<()> {
        let ended = Timestamp::now();
        let recorded = self.update(id, |op| {
            op.status = status;
            op.ended_at = Some(ended);
            op.duration_seconds = Some(ended.duration_since(op.created_at).as_secs_f64().max(0.0));
            change(op);
        });
        if let Some(op) = self.operation(id) {
            super::count_end(&op);
            crate::metrics::global()
                .operation_duration
                .with_label_values(&[op.kind.as_str(), op.status.as_str()])
                .observe(op.duration_seconds.unwrap_or(0.0));
        }
        recorded
    }

    pub(super) fn set_phase(&self, id: &str, phase: Phase) -> crate::Result<()> {
        self.clock_phase(id, Some(phase));
        self.update(id, |op| op.phase = Some(phase))
    }
}
