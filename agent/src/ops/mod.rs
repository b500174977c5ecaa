//! The node's operations: reimage and reboot under the four task policies,
//! scheduling, and the node state that follows from them. Every
//! acknowledged change is in the store before the API answers, so `kill -9`
//! loses nothing; an agent that starts finds what it was doing and
//! finishes it.
//!
//! By lifecycle: [`accept`] checks and records a request, [`run`] drives an
//! operation to its end, [`recover`] finishes what an earlier agent left.
//! Refusals are domain errors ([`Refusal`]); the API maps them to statuses.

mod accept;
mod boot_entry;
pub mod image_choice;
mod prefetch;
mod record;
mod recover;
mod refusal;
mod replay;
mod run;
#[cfg(test)]
mod tests;

pub use refusal::{Refusal, RefusalKind};
pub use reimage_protocol::new_request_id;

use crate::config::Config;
use crate::prefetch::StagedImages;
use crate::store::{Store, Table};
use crate::tasks::TaskManager;
use jiff::Timestamp;
use record::{NodeRecord, OperationRecord};
use reimage_protocol::Phase;
use reimage_protocol::api::{
    DiskInfo, Node, NodeState, Operation, OperationKind, OperationStatus, SchedulingState,
    TaskState,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// [`Table::Node`] key of the [`NodeRecord`].
const NODE_KEY: &str = "node";

/// The agent's core: node state, operations, and the tasks it governs.
pub struct Agent {
    config: Config,
    store: Arc<Store>,
    /// The node's tasks (the API adds and lists them directly).
    pub tasks: Arc<TaskManager>,
    boot_id: String,
    boot_time: Option<Timestamp>,
    /// When this agent process started.
    started_at: Timestamp,
    state: Mutex<State>,
    /// Serialises POSTs that create operations, so two identical requests
    /// racing each other still create one operation.
    mutations: tokio::sync::Mutex<()>,
    /// Saved partitions found on the target at start, for `GET /v1/node`.
    disk: DiskInfo,
    /// Images prefetched into the staging area.
    staged: StagedImages,
}

struct State {
    node: NodeRecord,
    operations: BTreeMap<String, OperationRecord>,
    current: Option<String>,
    /// The phase the current operation entered last, and when.
    phase_clock: Option<(String, Phase, Instant)>,
}

impl Agent {
    /// Loads the node and its operations from the store and finishes what an
    /// earlier run of the agent left in progress (see [`recover`]).
    pub fn start(
        config: Config,
        store: Arc<Store>,
        tasks: Arc<TaskManager>,
        disk: DiskInfo,
    ) -> crate::Result<Arc<Agent>> {
        let node = store
            .get::<NodeRecord>(Table::Node, NODE_KEY)?
            .unwrap_or_else(NodeRecord::new);
        let operations: BTreeMap<String, OperationRecord> = store
            .list::<OperationRecord>(Table::Operations)?
            .into_iter()
            .collect();
        tasks.set_scheduling(node.scheduling == SchedulingState::Enabled);
        count_finished(operations.values());
        let staged = StagedImages::open(
            Arc::clone(&store),
            &config.agent.state_dir,
            config.image.prefetch_budget,
        )?;
        let agent = Arc::new(Agent {
            config,
            store,
            tasks,
            // Empty when it cannot be read, which no recorded boot id equals.
            boot_id: crate::system::boot_id().unwrap_or_default(),
            boot_time: crate::system::boot_time(),
            started_at: Timestamp::now(),
            state: Mutex::new(State {
                node,
                operations,
                current: None,
                phase_clock: None,
            }),
            mutations: tokio::sync::Mutex::new(()),
            disk,
            staged,
        });
        agent.recover()?;
        agent.watch_task_changes();
        Ok(agent)
    }

    /// Notes the node's state as tasks start and end (`idle` ↔ `running`),
    /// so its `stateTransitionTime` is when it changed, not when someone
    /// next asked.
    fn watch_task_changes(self: &Arc<Self>) {
        let mut changes = self.tasks.changes();
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(agent) = agent.upgrade() else { return };
                agent.note_state();
            }
        });
    }

    /// Stops running tasks for a clean shutdown of the agent; they are
    /// requeued and run again when it starts.
    pub async fn shutdown(&self) {
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

    /// The node's id, as configured.
    pub fn node_id(&self) -> &str {
        &self.config.agent.node_id
    }

    /// When this agent process started.
    pub fn started_at(&self) -> Timestamp {
        self.started_at
    }

    /// Notes a change of the node's state, with the time it happened.
    fn note_state(&self) {
        let mut state = self.lock();
        let current = self.node_state(&state);
        if current != state.node.last_state {
            state.node.last_state = current;
            state.node.state_transition_time = Timestamp::now();
        }
    }

    /// `GET /v1/node`.
    pub fn node(&self) -> Node {
        self.note_state();
        let state = self.lock();
        let current = state.node.last_state;
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
            errors: state.node.last_failure.iter().cloned().collect(),
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
                // A prefetch is never current: the node works on meanwhile.
                (OperationKind::Reimage | OperationKind::Prefetch, _) => NodeState::Reimaging,
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

    /// The operation in progress, if any.
    pub fn current_operation(&self) -> Option<Operation> {
        let state = self.lock();
        let id = state.current.as_ref()?;
        state.operations.get(id).map(|r| r.operation.clone())
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

    /// Sets the gauges of `/metrics` from the node's state now.
    pub fn observe_gauges(&self) {
        let metrics = crate::metrics::global();
        let node = self.node();
        for state in NodeState::ALL {
            metrics
                .node_state
                .with_label_values(&[state.as_str()])
                .set(i64::from(state == node.state));
        }
        for (name, scheduling) in [
            ("enabled", SchedulingState::Enabled),
            ("disabled", SchedulingState::Disabled),
        ] {
            metrics
                .scheduling_state
                .with_label_values(&[name])
                .set(i64::from(scheduling == node.scheduling_state));
        }
        let current = self.current_operation();
        let phase = current.as_ref().and_then(|op| op.phase);
        for each in Phase::ALL {
            metrics
                .operation_phase
                .with_label_values(&[each.as_str()])
                .set(i64::from(Some(each) == phase));
        }
        let progress = current.map(|op| op.progress).unwrap_or_default();
        let to_gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.progress_bytes.set(to_gauge(progress.bytes_written));
        metrics
            .progress_total_bytes
            .set(to_gauge(progress.total_bytes.unwrap_or(0)));
        for (state, count) in self.tasks.counts_by_state() {
            let name = match state {
                TaskState::Active => "active",
                TaskState::Running => "running",
                TaskState::Completed => "completed",
            };
            metrics
                .tasks_by_state
                .with_label_values(&[name])
                .set(to_gauge(count));
        }
        metrics
            .retained_bytes
            .set(to_gauge(self.tasks.retained_bytes()));
        // A store that cannot be read shows no staged images; the API's
        // GET /v1/images reports the failure.
        let staged = self.staged.list().unwrap_or_default();
        metrics.staged_images.set(to_gauge(staged.len() as u64));
        metrics
            .staged_bytes
            .set(to_gauge(staged.iter().map(|i| i.staged_bytes).sum()));
    }

    /// Notes that operation `id` entered `phase` (`None`: it ended): the
    /// phase it leaves is timed.
    fn clock_phase(&self, id: &str, phase: Option<Phase>) {
        let mut state = self.lock();
        let left = match (&state.phase_clock, phase) {
            (Some((op, was, _)), Some(now)) if op == id && *was == now => return,
            (Some((op, was, since)), _) if op == id => Some((*was, since.elapsed())),
            _ => None,
        };
        state.phase_clock = phase.map(|p| (id.to_string(), p, Instant::now()));
        drop(state);
        if let Some((was, took)) = left {
            crate::metrics::global()
                .phase_duration
                .with_label_values(&[was.as_str()])
                .observe(took.as_secs_f64());
        }
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
        let updated = self.update_record(id, |record| {
            change(&mut record.operation);
            record.operation.updated_at = Timestamp::now();
        });
        // A phase or an end may change the node's state.
        self.note_state();
        updated
    }

    /// Changes the node's record and persists it.
    fn update_node(&self, change: impl FnOnce(&mut NodeRecord)) -> crate::Result<()> {
        let mut state = self.lock();
        change(&mut state.node);
        self.store.put(Table::Node, NODE_KEY, &state.node)
    }
}

/// Counts the operations that ended before this agent started, so that
/// `reimage_operations_total` and the last-operation times tell the
/// node's history, not just this process's.
fn count_finished<'a>(records: impl Iterator<Item = &'a OperationRecord>) {
    for record in records {
        let op = &record.operation;
        if op.status != OperationStatus::InProgress {
            count_end(op);
        }
    }
}

/// Counts operation `op`, which ended.
fn count_end(op: &Operation) {
    let metrics = crate::metrics::global();
    let code = op
        .error
        .as_ref()
        .map(|e| e.code.to_string())
        .unwrap_or_default();
    metrics
        .operations
        .with_label_values(&[op.kind.as_str(), op.status.as_str(), &code])
        .inc();
    if let Some(ended) = op.ended_at {
        let last = metrics
            .last_operation
            .with_label_values(&[op.status.as_str()]);
        last.set(last.get().max(ended.as_second()));
    }
}
