//! The node's operations: reimage and reboot under the four task policies,
//! scheduling, and the node state that follows from them. Every acknowledged
//! change is in the store before the API answers, so `kill -9` loses
//! nothing; an agent that starts finds what it was doing and finishes it.

mod record;

pub use reimage_protocol::new_request_id;

use crate::api::error::ApiError;
use crate::config::Config;
use crate::handoff::prepare::{self, InPlaceRequest};
use crate::handoff::{HandoffPlan, Outcome, OutcomeRecord, outcome, stage};
use crate::image::http::HttpOptions;
use crate::pipeline::{self, ImageRequest, WriteFailure, WriteRequest};
use crate::reboot::{self, RebootMethod};
use crate::store::{Store, Table};
use crate::tasks::{Requester, StopMode, TaskManager};
use jiff::Timestamp;
use record::{NodeRecord, OperationRecord};
use reimage_protocol::api::{
    AddTaskRequest, DisableSchedulingOption, DiskInfo, ImageRef, Node, NodeReimageOption,
    NodeState, Operation, OperationError, OperationKind, OperationProgress, OperationStatus,
    ReimageRequest, SchedulingState, Task,
};
use reimage_protocol::{Phase, WriteProgress};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

const NODE_KEY: &str = "node";

/// The agent's core: node state, operations, and the tasks it governs.
pub struct Agent {
    config: Config,
    store: Arc<Store>,
    /// The node's tasks (the API adds and lists them directly).
    pub tasks: Arc<TaskManager>,
    boot_id: String,
    boot_time: Option<Timestamp>,
    state: Mutex<State>,
    /// Serialises POSTs that create operations, so two identical requests
    /// racing each other still create one operation.
    mutations: tokio::sync::Mutex<()>,
    /// Saved partitions found on the target at start, for `GET /v1/node`.
    disk: DiskInfo,
}

struct State {
    node: NodeRecord,
    operations: BTreeMap<String, OperationRecord>,
    current: Option<String>,
}

/// What to write, as asked in a reimage request or configured.
#[derive(Debug, Clone)]
enum ImageChoice {
    Inline {
        url: String,
        sha256: String,
        size: Option<u64>,
    },
    Manifest(String),
}

impl Agent {
    /// Loads the node and its operations from the store and finishes what an
    /// earlier run of the agent left in progress (see [`Agent::recover`]).
    pub fn start(
        config: Config,
        store: Arc<Store>,
        tasks: Arc<TaskManager>,
        disk: DiskInfo,
    ) -> crate::Result<Arc<Agent>> {
        let node = store
            .get::<NodeRecord>(Table::Node, NODE_KEY)?
            .unwrap_or_else(NodeRecord::new);
        let operations = store
            .list::<OperationRecord>(Table::Operations)?
            .into_iter()
            .collect();
        tasks.set_scheduling(node.scheduling == SchedulingState::Enabled);
        let agent = Arc::new(Agent {
            config,
            store,
            tasks,
            boot_id: read_boot_id(),
            boot_time: boot_time(),
            state: Mutex::new(State {
                node,
                operations,
                current: None,
            }),
            mutations: tokio::sync::Mutex::new(()),
            disk,
        });
        agent.recover()?;
        Ok(agent)
    }

    /// Finishes operations an earlier agent left `InProgress`: a reboot that
    /// happened is confirmed, waiting is resumed, and a write that was cut
    /// off is failed with the reason (the disk then holds only the saved
    /// partitions: the node is `unusable` until reimaged).
    fn recover(self: &Arc<Self>) -> crate::Result<()> {
        let unfinished: Vec<OperationRecord> = self
            .lock()
            .operations
            .values()
            .filter(|r| r.operation.status == OperationStatus::InProgress)
            .cloned()
            .collect();
        for record in unfinished {
            let id = record.operation.id.clone();
            match record.operation.phase {
                Some(Phase::Rebooting) | Some(Phase::Confirming) if record.handoff => {
                    let rebooted = record.boot_id.as_deref() != Some(&self.boot_id);
                    if rebooted {
                        self.lock().current = Some(id.clone());
                        self.tasks.set_hold(true);
                        self.confirm_handoff(&id)?;
                    } else {
                        self.cancel_handoff(&id);
                        self.fail(
                            &id,
                            "RebootNotObserved",
                            "the agent restarted but the node did not reboot; the shutdown handoff was removed and nothing was written",
                            false,
                        )?;
                    }
                }
                Some(Phase::Rebooting) | Some(Phase::Confirming) => {
                    let rebooted = record.boot_id.as_deref() != Some(&self.boot_id);
                    if rebooted || self.config.reboot.method == RebootMethod::None {
                        self.lock().current = Some(id.clone());
                        self.tasks.set_hold(true);
                        self.confirm(&id)?;
                    } else {
                        self.fail(
                            &id,
                            "RebootNotObserved",
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
                        "AgentRestarted",
                        "the agent stopped while staging the image; nothing was written, reimage again",
                        false,
                    )?;
                }
                Some(Phase::Downloading)
                | Some(Phase::Verifying)
                | Some(Phase::SavingPartitions) => {
                    let phase = record.operation.phase;
                    self.fail(
                        &id,
                        "AgentRestarted",
                        &format!(
                            "the agent stopped during {phase:?}; the disk holds only the saved partitions, reimage again to recover"
                        ),
                        true,
                    )?;
                }
                _ => {
                    tracing::info!(operation = %id, "resuming an operation interrupted while waiting");
                    self.lock().current = Some(id.clone());
                    self.tasks.set_hold(true);
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

    /// Stops running tasks for a clean shutdown of the agent; they are
    /// requeued and run again when it starts.
    pub async fn shutdown(&self) {
        // Not stop_running: the scheduler would start them again before the
        // agent exits, and that run would outlive it.
        let stopped = self.tasks.shutdown().await;
        if !stopped.is_empty() {
            tracing::info!(tasks = ?stopped, "requeued running tasks for the shutdown");
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still
        // consistent (each change is one assignment), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET /v1/node`.
    pub fn node(&self) -> Node {
        let mut state = self.lock();
        let current = self.node_state(&state);
        if current != state.node.last_state {
            state.node.last_state = current;
            state.node.state_transition_time = Timestamp::now();
        }
        Node {
            id: self.config.agent.node_id.clone(),
            state: current,
            scheduling_state: state.node.scheduling,
            running_tasks_count: self.tasks.running_count(),
            total_tasks_run: self.tasks.total_tasks_run(),
            state_transition_time: state.node.state_transition_time,
            last_boot_time: self.boot_time,
            image: state.node.image.clone(),
            disk: self.disk.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            task_isolation: self.tasks.isolation(),
        }
    }

    fn node_state(&self, state: &State) -> NodeState {
        if let Some(record) = state
            .current
            .as_ref()
            .and_then(|id| state.operations.get(id))
        {
            return match (record.operation.kind, record.operation.phase) {
                (_, Some(Phase::Confirming)) => NodeState::Starting,
                (OperationKind::Reboot, _) | (_, Some(Phase::Rebooting)) => NodeState::Rebooting,
                (OperationKind::Reimage, _) => NodeState::Reimaging,
            };
        }
        if state.node.unusable {
            NodeState::Unusable
        } else if self.tasks.running_count() > 0 {
            NodeState::Running
        } else {
            NodeState::Idle
        }
    }

    /// `GET /v1/operations/{id}`.
    pub fn operation(&self, id: &str) -> Option<Operation> {
        self.lock().operations.get(id).map(|r| r.operation.clone())
    }

    /// `GET /v1/operations`, oldest first.
    pub fn operations(&self) -> Vec<Operation> {
        let mut all: Vec<Operation> = self
            .lock()
            .operations
            .values()
            .map(|r| r.operation.clone())
            .collect();
        all.sort_by_key(|op| op.created_at);
        all
    }

    /// `POST /v1/node/reimage`: checks the request and the node's state,
    /// records the operation and starts it. The same `client-request-id`
    /// returns the same operation.
    pub async fn reimage(
        self: &Arc<Self>,
        request: ReimageRequest,
        client_request_id: Option<&str>,
    ) -> Result<Operation, ApiError> {
        let _one_at_a_time = self.mutations.lock().await;
        if let Some(existing) = self.replay(client_request_id)? {
            return Ok(existing);
        }
        let image = self.choose_image(&request)?;
        self.check_can_start(&[NodeState::Idle, NodeState::Running, NodeState::Unusable])?;
        let record = OperationRecord::new(
            OperationKind::Reimage,
            request.node_reimage_option,
            Some(request),
            Some(image.describe()),
        );
        self.begin(record, client_request_id)
    }

    /// `POST /v1/node/reboot`.
    pub async fn reboot(
        self: &Arc<Self>,
        option: NodeReimageOption,
        client_request_id: Option<&str>,
    ) -> Result<Operation, ApiError> {
        let _one_at_a_time = self.mutations.lock().await;
        if let Some(existing) = self.replay(client_request_id)? {
            return Ok(existing);
        }
        self.check_can_start(&[NodeState::Idle, NodeState::Running, NodeState::Unusable])?;
        let record = OperationRecord::new(OperationKind::Reboot, option, None, None);
        self.begin(record, client_request_id)
    }

    fn replay(&self, client_request_id: Option<&str>) -> Result<Option<Operation>, ApiError> {
        let Some(client_id) = client_request_id else {
            return Ok(None);
        };
        let Some(op_id) = self
            .store
            .get::<String>(Table::RequestIds, &format!("operation:{client_id}"))
            .map_err(ApiError::internal)?
        else {
            return Ok(None);
        };
        Ok(self.operation(&op_id))
    }

    fn begin(
        self: &Arc<Self>,
        record: OperationRecord,
        client_request_id: Option<&str>,
    ) -> Result<Operation, ApiError> {
        let id = record.operation.id.clone();
        self.store
            .put(Table::Operations, &id, &record)
            .map_err(ApiError::internal)?;
        if let Some(client_id) = client_request_id {
            self.store
                .put(Table::RequestIds, &format!("operation:{client_id}"), &id)
                .map_err(ApiError::internal)?;
        }
        let operation = record.operation.clone();
        {
            let mut state = self.lock();
            state.operations.insert(id.clone(), record);
            state.current = Some(id.clone());
        }
        self.tasks.set_hold(true);
        tracing::info!(operation = %id, kind = ?operation.kind, option = ?operation.node_reimage_option, "operation accepted");
        let agent = Arc::clone(self);
        tokio::spawn(async move { agent.run(id).await });
        Ok(operation)
    }

    fn check_can_start(&self, allowed: &[NodeState]) -> Result<(), ApiError> {
        let state = self.node().state;
        if allowed.contains(&state) {
            return Ok(());
        }
        let code = match state {
            NodeState::Reimaging => "NodeBeingReimaged",
            NodeState::Rebooting => "NodeBeingRebooted",
            NodeState::Starting => "NodeBeingStarted",
            _ => "OperationInvalidForCurrentState",
        };
        let current = self.lock().current.clone().unwrap_or_default();
        Err(ApiError::conflict(
            code,
            format!("the node is {state:?}; try again when it is idle or running"),
        )
        .with_value("nodeState", format!("{state:?}").to_lowercase())
        .with_value("operationId", current))
    }

    /// The image a reimage writes: the request's, or the configured default.
    /// URLs must match `allowed_urls` when set.
    fn choose_image(&self, request: &ReimageRequest) -> Result<ImageChoice, ApiError> {
        let choice = match (&request.image, &request.manifest_url) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "InvalidRequestBody",
                    "give either image or manifestUrl, not both",
                ));
            }
            (Some(image), None) => {
                crate::image::manifest::parse_sha256(&image.sha256).map_err(|e| {
                    ApiError::bad_request("InvalidRequestBody", format!("image.sha256: {e}"))
                })?;
                Some(ImageChoice::Inline {
                    url: image.url.clone(),
                    sha256: image.sha256.clone(),
                    size: image.size,
                })
            }
            (None, Some(manifest)) => Some(ImageChoice::Manifest(manifest.clone())),
            (None, None) => self.configured_image(),
        };
        let Some(choice) = choice else {
            return Err(ApiError::bad_request(
                "MissingImage",
                "the request names no image and no [image] is configured",
            ));
        };
        if !self.config.image.trusted_keys.is_empty()
            && matches!(choice, ImageChoice::Inline { .. })
        {
            return Err(ApiError::bad_request(
                "ManifestUnsigned",
                "[image] trusted_keys is set: give a signed manifest (manifestUrl), not an image URL and hash",
            ));
        }
        let url = choice.url();
        crate::image::source::Location::parse(url)
            .map_err(|e| ApiError::bad_request("InvalidImageUrl", e.to_string()))?;
        if !self.config.allows_url(url) {
            return Err(ApiError::bad_request(
                "ImageUrlNotAllowed",
                format!("{url} does not match [image] allowed_urls"),
            )
            .with_value("url", url));
        }
        Ok(choice)
    }

    fn configured_image(&self) -> Option<ImageChoice> {
        let image = &self.config.image;
        if let Some(manifest) = &image.manifest_url {
            return Some(ImageChoice::Manifest(manifest.clone()));
        }
        match (&image.url, &image.sha256) {
            (Some(url), Some(sha256)) => Some(ImageChoice::Inline {
                url: url.clone(),
                sha256: sha256.clone(),
                size: None,
            }),
            _ => None,
        }
    }

    /// `POST /v1/tasks` from `requester`: the same `client-request-id`
    /// returns the same task.
    pub async fn add_task(
        &self,
        request: AddTaskRequest,
        requester: Requester,
        client_request_id: Option<&str>,
    ) -> Result<Task, ApiError> {
        let _one_at_a_time = self.mutations.lock().await;
        let key = client_request_id.map(|id| format!("task:{id}"));
        if let Some(key) = &key
            && let Some(task_id) = self
                .store
                .get::<String>(Table::RequestIds, key)
                .map_err(ApiError::internal)?
            && let Some(task) = self.tasks.get(&task_id)
        {
            return Ok(task);
        }
        let task = self.tasks.add(request, requester)?;
        if let Some(key) = &key {
            self.store
                .put(Table::RequestIds, key, &task.id)
                .map_err(ApiError::internal)?;
        }
        Ok(task)
    }

    /// `POST /v1/node/disablescheduling`.
    pub async fn disable_scheduling(
        &self,
        option: DisableSchedulingOption,
    ) -> Result<(), ApiError> {
        let _one_at_a_time = self.mutations.lock().await;
        self.tasks.set_scheduling(false);
        self.set_scheduling_state(SchedulingState::Disabled)?;
        match option {
            DisableSchedulingOption::Requeue => {
                self.tasks.stop_running(StopMode::Requeue).await;
            }
            DisableSchedulingOption::Terminate => {
                self.tasks.stop_running(StopMode::Terminate).await;
            }
            DisableSchedulingOption::TaskCompletion => {}
        }
        Ok(())
    }

    /// `POST /v1/node/enablescheduling`.
    pub async fn enable_scheduling(&self) -> Result<(), ApiError> {
        let _one_at_a_time = self.mutations.lock().await;
        self.set_scheduling_state(SchedulingState::Enabled)?;
        self.tasks.set_scheduling(true);
        Ok(())
    }

    fn set_scheduling_state(&self, scheduling: SchedulingState) -> Result<(), ApiError> {
        let mut state = self.lock();
        state.node.scheduling = scheduling;
        self.store
            .put(Table::Node, NODE_KEY, &state.node)
            .map_err(ApiError::internal)
    }

    /// Runs operation `id` to its end.
    async fn run(self: Arc<Self>, id: String) {
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
        if record.operation.kind == OperationKind::Reimage {
            let request = record
                .request
                .clone()
                .ok_or_else(|| crate::Error::InvalidArgument("reimage without a request".into()))?;
            let image = self
                .choose_image(&request)
                .map_err(|e| crate::Error::InvalidArgument(e.to_string()))?;
            let written = self.write(id, image).await?;
            let mut state = self.lock();
            state.node.pending_image = Some(written);
            // The agent that confirms it may be the next boot's.
            self.store.put(Table::Node, NODE_KEY, &state.node)?;
        }
        self.reboot_now(id).await?;
        Ok(())
    }

    /// Applies the operation's policy to the tasks on the node.
    async fn apply_task_policy(&self, id: &str, option: NodeReimageOption) -> crate::Result<()> {
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
                self.tasks.wait_idle().await;
                if option == NodeReimageOption::RetainedData {
                    self.set_phase(id, Phase::WaitingForRetention)?;
                    self.tasks.wait_retention_expired().await;
                }
            }
        }
        Ok(())
    }

    /// Streams, verifies and writes the image (on a blocking thread), with
    /// the pipeline's phases and progress shown in the operation.
    async fn write(
        self: &Arc<Self>,
        id: &str,
        image: ImageChoice,
    ) -> Result<ImageRef, WriteFailure> {
        self.set_phase(id, Phase::Downloading)?;
        let agent = Arc::clone(self);
        let op_id = id.to_string();
        let disk = self.config.disk.clone();
        let config = self.config.clone();
        let job = tokio::task::spawn_blocking(move || {
            let http = HttpOptions {
                url_policy: config.url_policy(),
                ..HttpOptions::default()
            };
            let request = image.resolve(&http, &config.image.trusted_keys)?;
            // A manifest may name a local path; with allowed_urls only
            // allowed URLs may be written.
            if http.url_policy.is_some()
                && let crate::image::source::Location::File(path) = &request.location
            {
                return Err(crate::Error::ImageUrlNotAllowed(format!(
                    "{} (from the manifest) is a local path; [image] allowed_urls admits URLs only",
                    path.display()
                ))
                .into());
            }
            let name = image.name();
            let busy = crate::disk::busy::users_of(&disk.target).unwrap_or_default();
            if !busy.is_empty() {
                let sha256 = agent.stage_in_place(&op_id, request, http, &busy)?;
                return Ok(ImageRef { name, sha256 });
            }
            let write = WriteRequest {
                image: request,
                target: disk.target.clone(),
                save: disk.save_spec(),
                read_back: true,
                http,
                beside_mounts: Vec::new(),
            };
            let report = pipeline::write_image(&write, &mut |p| agent.progress(&op_id, p))?;
            Ok::<_, WriteFailure>(ImageRef {
                name,
                sha256: report.sha256,
            })
        });
        job.await.map_err(|e| {
            WriteFailure::from(crate::Error::io(
                "running the write",
                std::io::Error::other(e),
            ))
        })?
    }

    /// The target holds the running system (or something else mounted):
    /// stage and verify the image now, and install the shutdown handoff
    /// that writes it during the reboot. Returns the image's SHA-256.
    fn stage_in_place(
        &self,
        id: &str,
        image: ImageRequest,
        http: HttpOptions,
        busy: &[String],
    ) -> crate::Result<String> {
        tracing::info!(operation = %id, users = ?busy, "the target is in use: in-place reimage through the shutdown handoff");
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
            return Err(err);
        }
        Ok(prepared.staged.sha256)
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
                    "HandoffNotRun",
                    "the node rebooted, but the shutdown handoff left no outcome: it did not run (was /run/initramfs/shutdown in place and /run executable?); the node is on its old image",
                    false,
                );
            }
            (Err(err), _) | (_, Err(err)) => {
                return self.fail(id, "HandoffOutcomeUnreadable", &err.to_string(), false);
            }
        };
        tracing::info!(operation = %id, outcome = ?record.outcome, seconds = record.elapsed_seconds, "the shutdown handoff's outcome");
        match record.outcome {
            Outcome::Written { sha256, .. } if sha256 == expected => self.confirm(id),
            Outcome::Written { sha256, .. } => self.fail(
                id,
                "HandoffImageMismatch",
                &format!("the shutdown handoff wrote an image with sha256 {sha256}, the operation expected {expected}"),
                false,
            ),
            Outcome::Refused { code, message } => self.fail(
                id,
                "HandoffRefused",
                &format!("the shutdown handoff wrote nothing ({code}: {message}); the node rebooted into its old image"),
                false,
            ),
            Outcome::WriteFailed { code, message } => self.fail(
                id,
                &code,
                &format!("the shutdown handoff's write failed: {message}; the disk holds only the saved partitions"),
                true,
            ),
        }
    }

    /// Removes the shutdown handoff of operation `id`, if installed; logged,
    /// not fatal: the operation ends either way.
    fn cancel_handoff(&self, id: &str) {
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

    fn progress(&self, id: &str, progress: &WriteProgress) {
        let mut state = self.lock();
        let Some(record) = state.operations.get_mut(id) else {
            return;
        };
        let phase_changed =
            progress.phase != Phase::Done && record.operation.phase != Some(progress.phase);
        if progress.phase != Phase::Done {
            record.operation.phase = Some(progress.phase);
        }
        record.operation.progress = OperationProgress {
            bytes_written: progress.bytes_written,
            total_bytes: progress.total_bytes,
            bytes_per_second: progress.bytes_per_second,
        };
        record.operation.updated_at = Timestamp::now();
        // Phases are persisted (recovery depends on them); byte counts are
        // shown live and persisted with the next phase.
        if phase_changed && let Err(err) = self.store.put(Table::Operations, id, &*record) {
            tracing::warn!(operation = %id, %err, "could not persist the phase");
        }
    }

    /// Records the boot the reboot leaves from, then reboots by the
    /// configured method. With `none` the new image is confirmed at once.
    async fn reboot_now(self: &Arc<Self>, id: &str) -> crate::Result<()> {
        let boot_id = self.boot_id.clone();
        {
            let mut state = self.lock();
            if let Some(record) = state.operations.get_mut(id) {
                record.boot_id = Some(boot_id);
            }
        }
        self.set_phase(id, Phase::Rebooting)?;
        let method = self.config.reboot.method;
        if method == RebootMethod::None {
            return self.confirm(id);
        }
        crate::service::notify_status("rebooting into the new image");
        let rebooted = tokio::task::spawn_blocking(move || reboot::reboot(method))
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
    fn confirm(&self, id: &str) -> crate::Result<()> {
        self.set_phase(id, Phase::Confirming)?;
        {
            let mut state = self.lock();
            if let Some(image) = state.node.pending_image.take() {
                state.node.image = Some(image);
            }
            state.node.unusable = false;
            self.store.put(Table::Node, NODE_KEY, &state.node)?;
        }
        self.update(id, |op| {
            op.status = OperationStatus::Succeeded;
            op.phase = None;
        })?;
        self.finish(id);
        tracing::info!(operation = %id, "operation succeeded");
        Ok(())
    }

    /// Records a failure. A disk that was touched holds only the saved
    /// partitions: the node is `unusable` until a reimage succeeds.
    fn fail(&self, id: &str, code: &str, message: &str, disk_touched: bool) -> crate::Result<()> {
        tracing::warn!(operation = %id, code, message, "operation failed");
        if disk_touched {
            let mut state = self.lock();
            state.node.unusable = true;
            state.node.pending_image = None;
            self.store.put(Table::Node, NODE_KEY, &state.node)?;
        }
        self.update(id, |op| {
            op.status = OperationStatus::Failed;
            op.error = Some(OperationError {
                code: code.to_string(),
                message: message.to_string(),
            });
        })?;
        self.finish(id);
        Ok(())
    }

    fn finish(&self, id: &str) {
        let mut state = self.lock();
        if state.current.as_deref() == Some(id) {
            state.current = None;
        }
        drop(state);
        self.tasks.set_accepting(true);
        self.tasks.set_hold(false);
    }

    fn set_phase(&self, id: &str, phase: Phase) -> crate::Result<()> {
        self.update(id, |op| {
            op.phase = Some(phase);
            op.progress = OperationProgress::default();
        })
    }

    /// Changes the record of operation `id` and persists it.
    fn update_record(
        &self,
        id: &str,
        change: impl FnOnce(&mut OperationRecord),
    ) -> crate::Result<()> {
        let mut state = self.lock();
        let Some(record) = state.operations.get_mut(id) else {
            return Ok(());
        };
        change(record);
        self.store.put(Table::Operations, id, &*record)
    }

    /// Changes operation `id` and persists it before anyone can see it.
    fn update(&self, id: &str, change: impl FnOnce(&mut Operation)) -> crate::Result<()> {
        let mut state = self.lock();
        let Some(record) = state.operations.get_mut(id) else {
            return Ok(());
        };
        change(&mut record.operation);
        record.operation.updated_at = Timestamp::now();
        self.store.put(Table::Operations, id, &*record)
    }

    /// Counts for `/metrics`.
    pub fn operation_counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::from([("InProgress", 0), ("Succeeded", 0), ("Failed", 0)]);
        for record in self.lock().operations.values() {
            let key = match record.operation.status {
                OperationStatus::InProgress => "InProgress",
                OperationStatus::Succeeded => "Succeeded",
                OperationStatus::Failed => "Failed",
            };
            *counts.entry(key).or_default() += 1;
        }
        counts
    }

    /// Progress of the running operation, for `/metrics`.
    pub fn current_progress(&self) -> Option<OperationProgress> {
        let state = self.lock();
        let id = state.current.as_ref()?;
        state
            .operations
            .get(id)
            .map(|r| r.operation.progress.clone())
    }
}

impl ImageChoice {
    fn url(&self) -> &str {
        match self {
            ImageChoice::Inline { url, .. } | ImageChoice::Manifest(url) => url,
        }
    }

    fn describe(&self) -> String {
        self.url().to_string()
    }

    /// A short name for the image: the last path segment of its URL.
    fn name(&self) -> String {
        let url = self.url();
        let last = url.rsplit('/').next().unwrap_or(url);
        last.trim_end_matches(".manifest.json").to_string()
    }

    fn resolve(&self, http: &HttpOptions, trusted_keys: &[String]) -> crate::Result<ImageRequest> {
        match self {
            ImageChoice::Inline { url, sha256, size } => {
                let mut request =
                    ImageRequest::resolve(Some(url), None, Some(sha256), http, trusted_keys)?;
                request.size = *size;
                Ok(request)
            }
            ImageChoice::Manifest(manifest) => {
                ImageRequest::resolve(None, Some(manifest), None, http, trusted_keys)
            }
        }
    }
}

fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// When the machine booted: now minus its uptime.
fn boot_time() -> Option<Timestamp> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let seconds: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let now = Timestamp::now().as_millisecond();
    Timestamp::from_millisecond(now - (seconds * 1000.0) as i64).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::TasksConfig;

    /// An agent on `dir` whose store already holds `record` (a reimage that
    /// was rebooting) and a verified image waiting for the new boot.
    async fn agent_after_restart(dir: &std::path::Path, record: &OperationRecord) -> Arc<Agent> {
        let text = format!(
            "[agent]\nnode_id = \"n\"\nstate_dir = \"{0}/state\"\n[disk]\ntarget = \"{0}/disk.img\"\n[reboot]\nmethod = \"systemd\"\n",
            dir.display()
        );
        let config = Config::parse(&text, "test").expect("config");
        let store = Arc::new(Store::open(&dir.join("state")).expect("store"));
        store
            .put(Table::Operations, &record.operation.id, record)
            .expect("operation");
        let mut node = NodeRecord::new();
        node.pending_image = Some(ImageRef {
            name: "new".into(),
            sha256: "ab".repeat(32),
        });
        store.put(Table::Node, NODE_KEY, &node).expect("node");
        let tasks = TaskManager::start(Arc::clone(&store), TasksConfig::new(dir.join("tasks")))
            .await
            .expect("tasks");
        let disk = DiskInfo {
            target: "disk.img".into(),
            size_bytes: 0,
            saved_partitions: Vec::new(),
        };
        Agent::start(config, store, tasks, disk).expect("agent")
    }

    fn rebooting(boot_id: &str) -> OperationRecord {
        let mut record = OperationRecord::new(
            OperationKind::Reimage,
            NodeReimageOption::Requeue,
            None,
            None,
        );
        record.operation.phase = Some(Phase::Rebooting);
        record.boot_id = Some(boot_id.to_string());
        record
    }

    #[tokio::test]
    async fn a_reboot_into_a_new_boot_confirms_the_operation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = rebooting("a-boot-before-this-one");
        let agent = agent_after_restart(dir.path(), &record).await;
        let op = agent.operation(&record.operation.id).expect("operation");
        assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
        let node = agent.node();
        assert_eq!(node.image.map(|i| i.name), Some("new".to_string()));
        assert_eq!(node.state, NodeState::Idle);
    }

    #[tokio::test]
    async fn the_same_boot_after_a_restart_means_the_reboot_did_not_happen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = rebooting(&read_boot_id());
        let agent = agent_after_restart(dir.path(), &record).await;
        let op = agent.operation(&record.operation.id).expect("operation");
        assert_eq!(op.status, OperationStatus::Failed);
        assert_eq!(
            op.error.map(|e| e.code),
            Some("RebootNotObserved".to_string())
        );
        assert_eq!(agent.node().state, NodeState::Unusable);
    }

    /// An in-place reimage that was rebooting in an earlier boot, with its
    /// plan (expecting `expected`) and, if given, the handoff's outcome.
    fn handoff_rebooted(
        dir: &std::path::Path,
        expected: &str,
        outcome: Option<Outcome>,
    ) -> OperationRecord {
        let mut record = rebooting("a-boot-before-this-one");
        record.handoff = true;
        let id = record.operation.id.clone();
        let state_dir = dir.join("state");
        std::fs::create_dir_all(state_dir.join("handoff")).expect("handoff dir");
        let plan = HandoffPlan {
            version: crate::handoff::PLAN_VERSION,
            operation_id: id.clone(),
            staged: crate::handoff::StagedAt::StateDir {
                path: "staging/op.img".into(),
            },
            staged_sha256: "cd".repeat(32),
            format: reimage_protocol::ImageFormat::Zstd,
            image_size: 1 << 20,
            image_sha256: expected.to_string(),
            target: dir.join("disk.img"),
            save_partlabel: vec!["local-storage".into()],
            save_partindex: Vec::new(),
            state: crate::handoff::StateFilesystem {
                device: "/dev/vda2".into(),
                dev: "254:2".into(),
                fstype: "ext4".into(),
                state_dir_in_fs: "/".into(),
                on_target: true,
            },
        };
        plan.save(&outcome::plan_path(&state_dir, &id))
            .expect("plan");
        std::fs::create_dir_all(state_dir.join("staging")).expect("staging");
        std::fs::write(state_dir.join("staging/op.img"), b"staged").expect("staged image");
        if let Some(outcome) = outcome {
            OutcomeRecord {
                operation_id: id,
                finished_at: Timestamp::now(),
                elapsed_seconds: 3.0,
                outcome,
            }
            .save(&state_dir)
            .expect("outcome");
        }
        record
    }

    async fn after_handoff(outcome: Option<Outcome>) -> (tempfile::TempDir, Arc<Agent>, Operation) {
        let dir = tempfile::tempdir().expect("tempdir");
        let expected = "ab".repeat(32);
        let record = handoff_rebooted(dir.path(), &expected, outcome);
        let agent = agent_after_restart(dir.path(), &record).await;
        let op = agent.operation(&record.operation.id).expect("operation");
        (dir, agent, op)
    }

    #[tokio::test]
    async fn an_agent_killed_while_staging_fails_the_operation_and_wrote_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut record = rebooting("a-boot-before-this-one");
        record.operation.phase = Some(Phase::Staging);
        let staging = dir.path().join("state").join(stage::STATE_STAGING_DIR);
        std::fs::create_dir_all(&staging).expect("staging dir");
        std::fs::write(staging.join("op.img.partial"), b"half").expect("partial image");
        let agent = agent_after_restart(dir.path(), &record).await;
        let op = agent.operation(&record.operation.id).expect("operation");
        assert_eq!(op.status, OperationStatus::Failed);
        let error = op.error.expect("error");
        assert_eq!(error.code, "AgentRestarted");
        assert!(
            error.message.contains("nothing was written"),
            "{}",
            error.message
        );
        assert_eq!(
            agent.node().state,
            NodeState::Idle,
            "the disk was not touched"
        );
        assert!(!staging.exists(), "the half-staged image is removed");
    }

    #[tokio::test]
    async fn a_handoff_that_wrote_the_expected_image_confirms_the_operation() {
        let written = Outcome::Written {
            sha256: "ab".repeat(32),
            size: 1 << 20,
        };
        let (dir, agent, op) = after_handoff(Some(written)).await;
        assert_eq!(op.status, OperationStatus::Succeeded, "{op:?}");
        assert_eq!(agent.node().state, NodeState::Idle);
        let state_dir = dir.path().join("state");
        assert!(
            !state_dir.join("staging").exists(),
            "the staged image is removed"
        );
        assert!(!outcome::outcome_path(&state_dir, &op.id).exists());
    }

    #[tokio::test]
    async fn a_handoff_that_wrote_another_image_fails_the_operation() {
        let other = Outcome::Written {
            sha256: "ef".repeat(32),
            size: 1 << 20,
        };
        let (_dir, _agent, op) = after_handoff(Some(other)).await;
        assert_eq!(op.status, OperationStatus::Failed);
        assert_eq!(
            op.error.map(|e| e.code).as_deref(),
            Some("HandoffImageMismatch")
        );
    }

    #[tokio::test]
    async fn a_refused_handoff_fails_the_operation_and_the_node_stays_usable() {
        let refused = Outcome::Refused {
            code: "ImageChecksumMismatch".into(),
            message: "the staged image changed".into(),
        };
        let (_dir, agent, op) = after_handoff(Some(refused)).await;
        assert_eq!(op.status, OperationStatus::Failed);
        let error = op.error.expect("error");
        assert_eq!(error.code, "HandoffRefused");
        assert!(
            error.message.contains("ImageChecksumMismatch"),
            "{}",
            error.message
        );
        assert_eq!(
            agent.node().state,
            NodeState::Idle,
            "on its old image, usable"
        );
    }

    #[tokio::test]
    async fn a_reboot_without_a_handoff_outcome_is_handoff_not_run() {
        let (_dir, agent, op) = after_handoff(None).await;
        assert_eq!(op.status, OperationStatus::Failed);
        assert_eq!(op.error.map(|e| e.code).as_deref(), Some("HandoffNotRun"));
        assert_eq!(agent.node().state, NodeState::Idle);
    }

    #[tokio::test]
    async fn a_failed_handoff_write_makes_the_node_unusable() {
        let failed = Outcome::WriteFailed {
            code: "DiskWriteFailed".into(),
            message: "EIO".into(),
        };
        let (_dir, agent, op) = after_handoff(Some(failed)).await;
        assert_eq!(op.error.map(|e| e.code).as_deref(), Some("DiskWriteFailed"));
        assert_eq!(agent.node().state, NodeState::Unusable);
    }
}
