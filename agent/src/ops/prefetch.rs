//! Prefetch operations, and the reimage's use of what they staged. A
//! prefetch runs beside the node's work: it is never the node's current
//! operation, holds no task gate, and its failure is its own (the node's
//! state, image and errors stay as they were).

use super::image_choice::{self, ImageChoice, ImageSource};
use super::record::OperationRecord;
use super::refusal::{Refusal, RefusalKind};
use super::replay::{Replayable, RequestKind};
use super::{Agent, Table};
use crate::image::http::HttpOptions;
use crate::pipeline::ImageRequest;
use crate::prefetch::{self, StagedRecord};
use reimage_protocol::api::{
    ImageRef, NodeReimageOption, Operation, OperationError, OperationKind, OperationProgress,
    OperationStatus, PrefetchRequest, StagedImageInfo,
};
use reimage_protocol::{ErrorCode, Phase};
use std::sync::Arc;

impl Agent {
    /// `POST /v1/images/prefetch`: records a prefetch operation and starts
    /// it. The same `client-request-id` with the same body returns the
    /// same operation.
    pub async fn prefetch(
        self: &Arc<Self>,
        request: PrefetchRequest,
        client_request_id: Option<&str>,
    ) -> Result<Operation, Refusal> {
        let _one_at_a_time = self.mutations.lock().await;
        let replay = client_request_id
            .map(|id| Replayable::new(id, RequestKind::Prefetch, &request))
            .transpose()?;
        if let Some(existing) = self.earlier_operation(replay.as_ref())? {
            return Ok(existing);
        }
        if self.staged.budget() == 0 {
            return Err(Refusal::invalid(
                ErrorCode::StagingSpaceInsufficient,
                "[image] prefetch_budget_mib is 0: prefetching is off on this node",
            ));
        }
        let image = image_choice::choose(
            &self.config,
            request.image.as_ref(),
            request.manifest_url.as_deref(),
        )?;
        let record = OperationRecord::new(
            OperationKind::Prefetch,
            NodeReimageOption::default(),
            None,
            Some(image.url().to_string()),
        );
        let id = record.operation.id.clone();
        self.store.put(Table::Operations, &id, &record)?;
        if let Some(replay) = &replay {
            replay.remember(&self.store, &id)?;
        }
        let operation = record.operation.clone();
        self.lock().operations.insert(id.clone(), record);
        tracing::info!(operation = %id, image = %image.url(), "prefetch accepted");
        let agent = Arc::clone(self);
        tokio::spawn(async move { agent.run_prefetch(id, image).await });
        Ok(operation)
    }

    /// `GET /v1/images`.
    pub fn staged_images(&self) -> Result<Vec<StagedImageInfo>, Refusal> {
        Ok(self.staged.list()?)
    }

    /// `DELETE /v1/images/{sha256}`.
    pub fn delete_staged_image(&self, sha256: &str) -> Result<(), Refusal> {
        if self.staged.remove(&sha256.to_ascii_lowercase())? {
            return Ok(());
        }
        Err(Refusal::new(
            RefusalKind::NotFound,
            ErrorCode::StagedImageNotFound,
            format!("no staged image has sha256 {sha256}"),
        )
        .with_detail("sha256", sha256))
    }

    /// Downloads and verifies the image, then records how it went.
    async fn run_prefetch(self: Arc<Self>, id: String, image: ImageChoice) {
        let agent = Arc::clone(&self);
        let op_id = id.clone();
        let job = tokio::task::spawn_blocking(move || {
            let http = agent.http_options();
            prefetch::fetch(
                &agent.staged,
                &agent.config,
                &image,
                &http,
                &op_id,
                &mut |p| {
                    agent.record_progress(&op_id, p);
                },
            )
        });
        let fetched = job.await.unwrap_or_else(|e| {
            Err(crate::Error::io(
                "running the prefetch",
                std::io::Error::other(e),
            ))
        });
        let ended = match fetched {
            Ok(record) => {
                tracing::info!(operation = %id, sha256 = %record.info.sha256, "prefetch succeeded");
                self.finish(&id, OperationStatus::Succeeded, |op| {
                    op.phase = Some(Phase::Done);
                    op.image = Some(ImageRef {
                        name: record.info.name.clone(),
                        sha256: record.info.sha256.clone(),
                    });
                    op.progress = OperationProgress {
                        bytes_written: record.info.staged_bytes,
                        total_bytes: Some(record.info.staged_bytes),
                        bytes_per_second: op.progress.bytes_per_second,
                        ..OperationProgress::default()
                    };
                })
            }
            Err(err) => self.fail_prefetch(&id, err.code(), &err.to_string()),
        };
        if let Err(err) = ended {
            tracing::error!(operation = %id, %err, "could not record the prefetch's end");
        }
    }

    /// Ends prefetch `id` as failed; the node is not concerned.
    pub(super) fn fail_prefetch(
        &self,
        id: &str,
        code: ErrorCode,
        message: &str,
    ) -> crate::Result<()> {
        tracing::warn!(operation = %id, %code, message, "prefetch failed");
        self.finish(id, OperationStatus::Failed, |op| {
            op.error = Some(OperationError {
                code,
                message: message.to_string(),
            });
        })
    }

    /// While a reimage waits for tasks or retention, its image is fetched
    /// into the staging area, so the wait is spent downloading; the write
    /// then reads the staged copy. Nothing is started when there is
    /// nothing to wait for (streaming straight to the disk is faster) or
    /// prefetching is off. A failure is logged: the write downloads then.
    pub(super) fn prefetch_while_waiting(
        self: &Arc<Self>,
        id: &str,
        option: NodeReimageOption,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let waits = self.tasks.running_count() > 0
            || (option == NodeReimageOption::RetainedData && self.tasks.retained_bytes() > 0);
        if !waits || self.staged.budget() == 0 {
            return None;
        }
        let request = self.lock().operations.get(id)?.request.clone()?;
        let image = image_choice::choose(
            &self.config,
            request.image.as_ref(),
            request.manifest_url.as_deref(),
        )
        .ok()?;
        let agent = Arc::clone(self);
        let id = id.to_string();
        Some(tokio::task::spawn_blocking(move || {
            tracing::info!(operation = %id, image = %image.url(), "prefetching the image while the reimage waits");
            let http = agent.http_options();
            if let Err(err) = prefetch::fetch(
                &agent.staged,
                &agent.config,
                &image,
                &http,
                &id,
                &mut |_| {},
            ) {
                tracing::warn!(operation = %id, %err, "could not prefetch the image while waiting; the write downloads it");
            }
        }))
    }

    /// The staged copy of the image `image` names, ready to be written,
    /// if one is there. An inline image is found by its SHA-256 (waiting
    /// for a prefetch of it in progress), a manifest by its URL (without
    /// fetching it again).
    pub(super) fn staged_copy(&self, image: &ImageChoice) -> Option<(StagedRecord, ImageRequest)> {
        let found = match &image.what {
            ImageSource::Inline { sha256, .. } => {
                let _waited = self.staged.claim(sha256);
                self.staged.get(sha256)
            }
            ImageSource::Manifest(url) => self.staged.by_manifest(url),
        };
        let record = found
            .inspect_err(|err| tracing::warn!(%err, "cannot look up the staged images"))
            .ok()
            .flatten()?;
        let Some(request) = prefetch::write_request(&self.staged, &record) else {
            tracing::warn!(sha256 = %record.info.sha256, "the staged copy is gone or cut short; downloading the image");
            self.drop_staged(&record);
            return None;
        };
        Some((record, request))
    }

    /// Removes a staged copy that was used (or found bad).
    pub(super) fn drop_staged(&self, record: &StagedRecord) {
        if let Err(err) = self.staged.remove(&record.info.sha256) {
            tracing::warn!(sha256 = %record.info.sha256, %err, "could not remove the staged copy");
        }
    }

    /// How the agent fetches images over HTTP.
    pub(super) fn http_options(&self) -> HttpOptions {
        HttpOptions {
            url_policy: self.config.image.allowed_urls.http_policy(),
            ..HttpOptions::default()
        }
    }
}

/// A write from a staged copy failed because of the copy (unreadable, cut
/// short, corrupt, another image): the image's URL can still do.
pub(super) fn staged_copy_failed(err: &crate::Error) -> bool {
    use crate::Error;
    matches!(
        err,
        Error::DownloadFailed(_)
            | Error::ImageTruncated(_)
            | Error::ImageChecksumMismatch { .. }
            | Error::ImageSizeMismatch { .. }
            | Error::ImageCorrupt(_)
            | Error::ImageTrailingData(_)
            | Error::ImageFormatMismatch { .. }
            | Error::Io { .. }
    )
}
