//! Accepting requests: each is checked against the node's state and its
//! retry key before anything is recorded, recorded before it is
//! acknowledged, and only then started.

use super::image_choice;
use super::record::OperationRecord;
use super::refusal::Refusal;
use super::replay::{Replayable, RequestKind};
use super::{Agent, Table};
use crate::tasks::{Requester, StopMode};
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{
    AddTaskRequest, DisableSchedulingOption, NodeState, Operation, OperationKind, RebootRequest,
    ReimageRequest, SchedulingState, Task,
};
use std::sync::Arc;

/// The states a reimage or reboot may start from (`unusable` for recovery).
const STARTABLE: [NodeState; 3] = [NodeState::Idle, NodeState::Running, NodeState::Unusable];

impl Agent {
    /// `POST /v1/node/reimage`: checks the request and the node's state,
    /// records the operation and starts it. The same `client-request-id`
    /// with the same body returns the same operation.
    pub async fn reimage(
        self: &Arc<Self>,
        request: ReimageRequest,
        client_request_id: Option<&str>,
    ) -> Result<Operation, Refusal> {
        let _one_at_a_time = self.mutations.lock().await;
        let replay = client_request_id
            .map(|id| Replayable::new(id, RequestKind::Reimage, &request))
            .transpose()?;
        if let Some(existing) = self.earlier_operation(replay.as_ref())? {
            return Ok(existing);
        }
        let image = image_choice::choose(
            &self.config,
            request.image.as_ref(),
            request.manifest_url.as_deref(),
        )?;
        self.check_can_start()?;
        let record = OperationRecord::new(
            OperationKind::Reimage,
            request.node_reimage_option,
            Some(request),
            Some(image.url().to_string()),
        );
        self.begin(record, replay.as_ref())
    }

    /// `POST /v1/node/reboot`.
    pub async fn reboot(
        self: &Arc<Self>,
        request: RebootRequest,
        client_request_id: Option<&str>,
    ) -> Result<Operation, Refusal> {
        let _one_at_a_time = self.mutations.lock().await;
        let replay = client_request_id
            .map(|id| Replayable::new(id, RequestKind::Reboot, &request))
            .transpose()?;
        if let Some(existing) = self.earlier_operation(replay.as_ref())? {
            return Ok(existing);
        }
        self.check_can_start()?;
        let record = OperationRecord::new(
            OperationKind::Reboot,
            request.node_reboot_option,
            None,
            None,
        );
        self.begin(record, replay.as_ref())
    }

    /// `POST /v1/tasks`: the same `client-request-id` with the same body
    /// returns the same task. `requester` says who asks (only an admin may
    /// have a task run as root).
    pub async fn add_task(
        &self,
        request: AddTaskRequest,
        requester: Requester,
        client_request_id: Option<&str>,
    ) -> Result<Task, Refusal> {
        let _one_at_a_time = self.mutations.lock().await;
        let replay = client_request_id
            .map(|id| Replayable::new(id, RequestKind::AddTask, &request))
            .transpose()?;
        if let Some(replay) = &replay
            && let Some(task_id) = replay.earlier_result(&self.store)?
            && let Some(task) = self.tasks.get(&task_id)
        {
            return Ok(task);
        }
        let task = self.tasks.add(request, requester)?;
        if let Some(replay) = &replay {
            replay.remember(&self.store, &task.id)?;
        }
        Ok(task)
    }

    /// `POST /v1/node/disablescheduling`.
    pub async fn disable_scheduling(&self, option: DisableSchedulingOption) -> Result<(), Refusal> {
        let _one_at_a_time = self.mutations.lock().await;
        self.tasks.set_scheduling(false);
        self.update_node(|node| node.scheduling = SchedulingState::Disabled)?;
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
    pub async fn enable_scheduling(&self) -> Result<(), Refusal> {
        let _one_at_a_time = self.mutations.lock().await;
        self.update_node(|node| node.scheduling = SchedulingState::Enabled)?;
        self.tasks.set_scheduling(true);
        Ok(())
    }

    /// The operation an earlier use of this request's retry key created.
    pub(super) fn earlier_operation(
        &self,
        replay: Option<&Replayable<'_>>,
    ) -> Result<Option<Operation>, Refusal> {
        let Some(replay) = replay else {
            return Ok(None);
        };
        Ok(replay
            .earlier_result(&self.store)?
            .and_then(|id| self.operation(&id)))
    }

    /// Persists the new operation (and its retry key), makes it current and
    /// starts it.
    fn begin(
        self: &Arc<Self>,
        record: OperationRecord,
        replay: Option<&Replayable<'_>>,
    ) -> Result<Operation, Refusal> {
        let id = record.operation.id.clone();
        self.store.put(Table::Operations, &id, &record)?;
        if let Some(replay) = replay {
            replay.remember(&self.store, &id)?;
        }
        let operation = record.operation.clone();
        {
            let mut state = self.lock();
            state.operations.insert(id.clone(), record);
            state.current = Some(id.clone());
        }
        self.note_state();
        self.tasks.set_hold(true);
        tracing::info!(operation = %id, kind = ?operation.kind, option = %operation.node_reimage_option, "operation accepted");
        let agent = Arc::clone(self);
        tokio::spawn(async move { agent.run(id).await });
        Ok(operation)
    }

    /// Refuses a new operation unless the node is idle, running or unusable.
    fn check_can_start(&self) -> Result<(), Refusal> {
        let state = self.node().state;
        if STARTABLE.contains(&state) {
            return Ok(());
        }
        let code = match state {
            NodeState::Reimaging => ErrorCode::NodeBeingReimaged,
            NodeState::Rebooting => ErrorCode::NodeBeingRebooted,
            NodeState::Starting => ErrorCode::NodeBeingStarted,
            _ => ErrorCode::OperationInvalidForCurrentState,
        };
        let current = self.lock().current.clone().unwrap_or_default();
        Err(Refusal::conflict(
            code,
            format!("the node is {state:?}; try again when it is idle or running"),
        )
        .with_detail("nodeState", format!("{state:?}").to_lowercase())
        .with_detail("operationId", current))
    }
}
