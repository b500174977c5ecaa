//! Local tasks, as Batch runs them on a node: `active → running →
//! completed`, each run a `sh -c <commandLine>` in a cgroup of its own
//! (see [`isolation`]), as the user its `userIdentity` names (see
//! [`identity`]), in its own directory (`work_dir/tasks/<id>/`: `wd/`,
//! `stdout.txt`, `stderr.txt`, see [`dirs`]), whose files are kept for the
//! task's retention time after it completed.
//!
//! Every state change is written to the [`Store`] before it is shown, so a
//! restarted agent (after `kill -9` or a reboot) picks up where the last one
//! stopped: retention timers are derived from the persisted expiry, and
//! tasks that were running are stopped for good and queued again.
//!
//! Three gates, persisted too, decide what runs: scheduling (enable/disable
//! scheduling), hold (a reimage or reboot is under way) and accepting (add
//! refused while a taskcompletion/retaineddata operation waits).

mod cgroup;
mod dirs;
mod error;
mod identity;
mod isolation;
mod process;
pub(crate) mod record;
#[cfg(test)]
mod tests;

pub use error::TaskError;
pub use identity::{DEFAULT_TASK_USER, Requester, TASK_UIDS};

use crate::store::{Store, Table};
use identity::{PrivilegeDrop, RunAs, TaskUsers};
use isolation::{Containment, Isolation};
use jiff::Timestamp;
use process::{Launch, ProcessIdentity, stop_group};
use record::{BATCH_ENV_PREFIX, RESERVED_ENV_PREFIX, TaskRecord};
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{AddTaskRequest, FailureInfo, Task, TaskIsolation, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::process::Child;
use tokio::sync::{Notify, oneshot, watch};

/// Retention of a completed task's files when its request names none (`P7D`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Time between SIGTERM and SIGKILL when a task is stopped (`PT30S`).
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(30);

/// The two files a task may be asked for.
pub const TASK_FILES: [&str; 2] = ["stdout.txt", "stderr.txt"];

/// [`Table::Node`] key of the persisted [`Gates`].
const GATES_KEY: &str = "tasks.gates";
/// [`Table::Node`] key of the number of tasks completed on this node.
const TOTAL_RUN_KEY: &str = "tasks.totalTasksRun";
/// [`Table::Node`] key of the number of those that succeeded (exit code 0).
const TOTAL_SUCCEEDED_KEY: &str = "tasks.totalTasksSucceeded";
/// Prefix of a task directory being deleted; task ids cannot start with a dot.
const DELETING_PREFIX: &str = ".deleting-";
/// The scheduler re-reads the wall clock at least this often, so a clock
/// step cannot hold a retention timer back for long.
const MAX_TIMER_NAP: Duration = Duration::from_secs(60);
/// Wait before retrying a task directory that could not be deleted.
const DELETE_RETRY: Duration = Duration::from_secs(60);

/// The `[tasks]` settings.
#[derive(Debug, Clone)]
pub struct TasksConfig {
    /// Where task directories live (`work_dir/tasks/<id>`).
    pub work_dir: PathBuf,
    /// Retention when a task's request names none.
    pub default_retention: Duration,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    pub kill_grace: Duration,
    /// The account pool-scoped tasks share (`[tasks] user`).
    pub user: String,
    /// The agent's state directory, kept out of the tasks' reach.
    pub state_dir: Option<PathBuf>,
    /// The node's id, for `AZ_BATCH_NODE_ID`.
    pub node_id: String,
}

impl TasksConfig {
    /// Tasks under `work_dir` with the default retention (`P7D`), kill grace
    /// (`PT30S`) and user (`reimage-task`), on a node called `node`.
    pub fn new(work_dir: impl Into<PathBuf>) -> TasksConfig {
        TasksConfig {
            work_dir: work_dir.into(),
            default_retention: DEFAULT_RETENTION,
            kill_grace: DEFAULT_KILL_GRACE,
            user: DEFAULT_TASK_USER.to_owned(),
            state_dir: None,
            node_id: "node".to_owned(),
        }
    }
}

/// What becomes of a task stopped by [`TaskManager::stop_running`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Back to `active` with `requeueCount + 1`: it runs again later.
    Requeue,
    /// `completed` with `failureInfo` `servererror`/`TaskTerminated`.
    Terminate,
}

/// What may start or be added; persisted so that a restarted agent keeps
/// refusing and holding until whoever set them decides otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Gates {
    scheduling_enabled: bool,
    held: bool,
    accepting: bool,
}

impl Default for Gates {
    fn default() -> Gates {
        Gates {
            scheduling_enabled: true,
            held: false,
            accepting: true,
        }
    }
}

/// A request to the supervisor of a running task.
struct StopRequest {
    mode: StopMode,
    /// Answered once the stop is persisted; dropped unanswered if the task
    /// ended on its own first.
    done: oneshot::Sender<()>,
}

/// A task that is running now.
struct Run {
    /// Distinguishes this run from a later run of the same (requeued) task.
    run_id: u64,
    /// Taken by the first caller that stops the task.
    stop: Option<oneshot::Sender<StopRequest>>,
}

/// How a run ended.
enum Outcome {
    Exited,
    WallClockExceeded,
    Stopped(StopMode),
}

#[derive(Default)]
struct State {
    records: HashMap<String, TaskRecord>,
    running: HashMap<String, Run>,
    gates: Gates,
    next_seq: u64,
    next_run_id: u64,
    total_run: u64,
    total_succeeded: u64,
    /// Task directories whose deletion failed, and when to try again.
    delete_retry: HashMap<String, tokio::time::Instant>,
    /// The agent is stopping: nothing starts any more. Not persisted (the
    /// next agent runs the requeued tasks), unlike the hold gate.
    shutting_down: bool,
}

impl State {
    fn is_running(&self, id: &str, run_id: u64) -> bool {
        self.running.get(id).is_some_and(|run| run.run_id == run_id)
    }
}

/// Runs the node's local tasks. Share it as `Arc<TaskManager>`; it lives
/// until the tokio runtime shuts down.
///
/// Calls that change a task persist it before they return; they block on
/// the store's fsync (milliseconds), as [`Store`] calls do.
pub struct TaskManager {
    store: Arc<Store>,
    config: TasksConfig,
    max_running: usize,
    /// Cgroups or process groups, chosen at start.
    isolation: Isolation,
    /// The accounts tasks run as.
    users: TaskUsers,
    state: Mutex<State>,
    /// Wakes the scheduler loop (a task may start, a timer changed).
    wake: Notify,
    /// Ticks on every task or gate change.
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for TaskManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TaskManager {
    /// Loads the tasks from `store` and starts the scheduler loop.
    ///
    /// Tasks recorded as `running` by an earlier agent process (or boot) are
    /// orphans: every run cgroup left in the agent's subtree is stopped
    /// (SIGTERM, kill grace, `cgroup.kill`) and removed; with process
    /// groups, a group whose leader is still the same process (pid and
    /// start time, same boot) is stopped likewise. Then the task is
    /// `active` again with `requeueCount + 1`. Completed tasks whose
    /// retention expired while the agent was down are deleted at once.
    pub async fn start(store: Arc<Store>, config: TasksConfig) -> crate::Result<Arc<TaskManager>> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        TaskManager::start_with_limit(store, config, cpus).await
    }

    /// [`TaskManager::start`] running at most `max_running` tasks at once.
    pub async fn start_with_limit(
        store: Arc<Store>,
        mut config: TasksConfig,
        max_running: usize,
    ) -> crate::Result<Arc<TaskManager>> {
        // Tasks get absolute paths (HOME, REIMAGE_TASK_WORKING_DIR) even when
        // the sandbox's state directory is given relative to the cwd.
        let absolute = |dir: &Path| {
            std::path::absolute(dir)
                .map_err(|e| crate::Error::io(format!("resolving {}", dir.display()), e))
        };
        config.work_dir = absolute(&config.work_dir)?;
        config.state_dir = config.state_dir.as_deref().map(absolute).transpose()?;
        let tasks_dir = config.work_dir.join("tasks");
        dirs::prepare_tasks_root(&tasks_dir, config.state_dir.as_deref()).map_err(|e| {
            crate::Error::io(
                format!("preparing the task directory {}", tasks_dir.display()),
                e,
            )
        })?;
        remove_interrupted_deletions(&tasks_dir).await;
        let tasks_dir = tasks_dir.canonicalize().unwrap_or(tasks_dir);
        let isolation = Isolation::detect(&tasks_dir);
        let users = TaskUsers::find(&config.user);
        if users.can_switch()
            && let Some((dir, mode, owner)) = dirs::blocking_dir(
                &tasks_dir,
                RunAs {
                    uid: *TASK_UIDS.start(),
                    gid: *TASK_UIDS.start(),
                },
            )
        {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{mode:04o}"),
                owner,
                "unprivileged tasks cannot search this directory on the way to theirs: they will fail to start (chmod o+x it, or move [tasks] work_dir)"
            );
        }

        let gates = store.get(Table::Node, GATES_KEY)?.unwrap_or_default();
        let total_run = store.get(Table::Node, TOTAL_RUN_KEY)?.unwrap_or(0);
        let total_succeeded = store.get(Table::Node, TOTAL_SUCCEEDED_KEY)?.unwrap_or(0);
        let mut records = load_records(&store)?;
        if let Isolation::Cgroup(tree) = &isolation {
            stop_leftover_cgroups(tree, config.kill_grace).await;
        }
        requeue_orphans(&store, &mut records, config.kill_grace).await;
        let next_seq = records.values().map(|r| r.seq + 1).max().unwrap_or(0);

        let manager = Arc::new(TaskManager {
            store,
            config,
            max_running: max_running.max(1),
            isolation,
            users,
            state: Mutex::new(State {
                records,
                gates,
                next_seq,
                total_run,
                total_succeeded,
                ..State::default()
            }),
            wake: Notify::new(),
            changes: watch::channel(0).0,
        });
        tokio::spawn(Arc::clone(&manager).run_scheduler());
        Ok(manager)
    }

    /// Adds an `active` task; it is persisted before this returns. Refused
    /// with [`TaskError::NodeNotAcceptingTasks`] while the node does not
    /// accept tasks, [`TaskError::TaskExists`] for a taken id,
    /// [`TaskError::ElevationNotAllowed`] for a root task that `requester`
    /// may not add, and a 400-class error for a bad id, duration, command
    /// line, environment setting or user identity.
    pub fn add(&self, request: AddTaskRequest, requester: Requester) -> Result<Task, TaskError> {
        let mut state = self.lock();
        if !state.gates.accepting {
            return Err(TaskError::NodeNotAcceptingTasks);
        }
        let record = TaskRecord::new(
            request,
            requester,
            state.next_seq,
            self.config.default_retention,
            Timestamp::now(),
        )?;
        let id = record.task.id.clone();
        // Batch ids are case-insensitive; directories on some file systems are too.
        if state.records.keys().any(|k| k.eq_ignore_ascii_case(&id)) {
            return Err(TaskError::TaskExists(id));
        }
        self.store.put(Table::Tasks, &id, &record)?;
        state.next_seq += 1;
        let task = record.task.clone();
        state.records.insert(id, record);
        crate::metrics::global()
            .tasks
            .with_label_values(&["active"])
            .inc();
        drop(state);
        tracing::info!(task = %task.id, "task added");
        self.changed();
        Ok(task)
    }

    /// The task with this id.
    pub fn get(&self, id: &str) -> Option<Task> {
        self.lock().records.get(id).map(|r| r.task.clone())
    }

    /// Every task, in creation order.
    pub fn list(&self) -> Vec<Task> {
        let state = self.lock();
        let mut records: Vec<&TaskRecord> = state.records.values().collect();
        records.sort_by_key(|r| r.seq);
        records.into_iter().map(|r| r.task.clone()).collect()
    }

    /// Deletes a task: stops it first if it runs (as [`StopMode::Terminate`]),
    /// then removes its record and its directory.
    pub async fn delete(&self, id: &str) -> Result<(), TaskError> {
        loop {
            let stopping = {
                let mut state = self.lock();
                if !state.records.contains_key(id) {
                    return Err(TaskError::TaskNotFound(id.to_owned()));
                }
                match state.running.get_mut(id) {
                    Some(run) => {
                        if let Some(stop) = run.stop.take() {
                            let (done, _) = oneshot::channel();
                            // An error means it is ending on its own.
                            let _ = stop.send(StopRequest {
                                mode: StopMode::Terminate,
                                done,
                            });
                        }
                        Some(run.run_id)
                    }
                    None => None,
                }
            };
            if let Some(run_id) = stopping {
                self.wait_until(|s| !s.is_running(id, run_id)).await;
                continue;
            }
            // Not running: remove it under the lock so the scheduler cannot
            // start it in between.
            let doomed = {
                let mut state = self.lock();
                let Some(record) = state.records.get(id) else {
                    return Err(TaskError::TaskNotFound(id.to_owned()));
                };
                if state.running.contains_key(id) {
                    continue;
                }
                let seq = record.seq;
                self.store.delete(Table::Tasks, id)?;
                state.records.remove(id);
                state.delete_retry.remove(id);
                // Renamed now, removed outside the lock: a task added next
                // with the same id gets a fresh directory.
                self.set_aside(id, seq)
            };
            self.changed();
            tracing::info!(task = id, "task deleted");
            if let Some(dir) = doomed {
                let _ = remove_dir(dir).await;
            }
            return Ok(());
        }
    }

    /// The path of a task's `stdout.txt` or `stderr.txt`. Any other name,
    /// a file not written yet or deleted by retention is
    /// [`TaskError::TaskFileNotFound`].
    pub fn file(&self, id: &str, name: &str) -> Result<PathBuf, TaskError> {
        let not_found = || TaskError::TaskFileNotFound {
            id: id.to_owned(),
            name: name.to_owned(),
        };
        let deleted = {
            let state = self.lock();
            let record = state
                .records
                .get(id)
                .ok_or_else(|| TaskError::TaskNotFound(id.to_owned()))?;
            record.files_deleted
        };
        // Only the two names themselves: nothing a client sends is joined
        // into a path, so no traversal can be built.
        let Some(name) = TASK_FILES.iter().find(|f| **f == name) else {
            return Err(not_found());
        };
        let path = self.task_dir(id).join(name);
        if deleted || !path.is_file() {
            return Err(not_found());
        }
        Ok(path)
    }

    /// Enables or disables scheduling: while disabled, `active` tasks stay
    /// queued (and `add` still works). Persisted.
    pub fn set_scheduling(&self, enabled: bool) {
        self.set_gates(|g| g.scheduling_enabled = enabled);
    }

    /// Holds (or releases) all task starts, while the node reimages or
    /// reboots. Persisted: a restarted agent stays held until released.
    pub fn set_hold(&self, held: bool) {
        self.set_gates(|g| g.held = held);
    }

    /// Refuses (or accepts again) new tasks with
    /// [`TaskError::NodeNotAcceptingTasks`]. Persisted.
    pub fn set_accepting(&self, accepting: bool) {
        self.set_gates(|g| g.accepting = accepting);
    }

    /// Stops every running task: SIGTERM to its process group, the kill
    /// grace, SIGKILL to the group. [`StopMode::Requeue`] puts it back to
    /// `active` (it runs again once scheduling allows: hold first if it
    /// must not); [`StopMode::Terminate`] completes it with a failure.
    /// Returns the ids this call stopped, in creation order, once their new
    /// state is persisted and once every task that was running has ended.
    pub async fn stop_running(&self, mode: StopMode) -> Vec<String> {
        let mut requested = Vec::new();
        let mut running = Vec::new();
        {
            let mut state = self.lock();
            let State {
                running: runs,
                records,
                ..
            } = &mut *state;
            for (id, run) in runs.iter_mut() {
                running.push((id.clone(), run.run_id));
                let Some(stop) = run.stop.take() else {
                    continue; // someone else is stopping it
                };
                let (done, stopped) = oneshot::channel();
                if stop.send(StopRequest { mode, done }).is_ok() {
                    let seq = records.get(id).map_or(u64::MAX, |r| r.seq);
                    requested.push((seq, id.clone(), stopped));
                }
            }
        }
        requested.sort_by_key(|(seq, ..)| *seq);
        let mut ids = Vec::new();
        for (_, id, stopped) in requested {
            if stopped.await.is_ok() {
                ids.push(id);
            }
        }
        self.wait_until(|s| running.iter().all(|(id, run)| !s.is_running(id, *run)))
            .await;
        ids
    }

    /// For the agent's clean stop: starts nothing from now on, requeues
    /// every running task (stopping all of its processes) and removes the
    /// agent's cgroup subtree. Returns the ids it requeued.
    pub async fn shutdown(&self) -> Vec<String> {
        self.lock().shutting_down = true;
        let stopped = self.stop_running(StopMode::Requeue).await;
        if let Isolation::Cgroup(tree) = &self.isolation {
            tree.remove_if_empty();
        }
        stopped
    }

    /// Resolves when no task is running.
    pub async fn wait_idle(&self) {
        self.wait_until(|s| s.running.is_empty()).await;
    }

    /// Resolves when every completed task's retention timer expired and its
    /// directory was deleted.
    pub async fn wait_retention_expired(&self) {
        self.wait_until(|s| !s.records.values().any(TaskRecord::holds_files))
            .await;
    }

    /// How task runs are contained on this node.
    pub fn isolation(&self) -> TaskIsolation {
        self.isolation.kind()
    }

    /// How many tasks run now.
    pub fn running_count(&self) -> u32 {
        u32::try_from(self.lock().running.len()).unwrap_or(u32::MAX)
    }

    /// How many tasks completed on this node, ever (persisted).
    pub fn total_tasks_run(&self) -> u64 {
        self.lock().total_run
    }

    /// How many of those succeeded: their command exited with code 0 (persisted).
    pub fn total_tasks_succeeded(&self) -> u64 {
        self.lock().total_succeeded
    }

    /// The number of tasks in each state (every state present).
    pub fn counts_by_state(&self) -> HashMap<TaskState, u64> {
        let mut counts = HashMap::from([
            (TaskState::Active, 0),
            (TaskState::Running, 0),
            (TaskState::Completed, 0),
        ]);
        for record in self.lock().records.values() {
            *counts.entry(record.task.state).or_default() += 1;
        }
        counts
    }

    /// Bytes held by completed tasks' directories until their retention expires.
    pub fn retained_bytes(&self) -> u64 {
        self.lock()
            .records
            .values()
            .filter(|r| r.holds_files())
            .map(|r| r.retained_bytes)
            .sum()
    }

    /// A watch that ticks on every task state change and gate change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug, but the state stays
        // consistent per field; serving on beats wedging the node.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.wake.notify_one();
    }

    async fn wait_until(&self, mut done: impl FnMut(&State) -> bool) {
        let mut changes = self.changes.subscribe();
        loop {
            if done(&self.lock()) {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    fn set_gates(&self, change: impl FnOnce(&mut Gates)) {
        let mut state = self.lock();
        change(&mut state.gates);
        if let Err(err) = self.store.put(Table::Node, GATES_KEY, &state.gates) {
            tracing::error!(%err, gates = ?state.gates, "persisting the task gates");
        }
        drop(state);
        self.changed();
    }

    fn persist(&self, record: &TaskRecord) {
        if let Err(err) = self.store.put(Table::Tasks, &record.task.id, record) {
            tracing::error!(task = %record.task.id, %err, "persisting a task");
        }
    }

    fn task_dir(&self, id: &str) -> PathBuf {
        self.config.work_dir.join("tasks").join(id)
    }

    /// Renames a task's directory out of the way for deletion; `None` if it
    /// has none.
    fn set_aside(&self, id: &str, seq: u64) -> Option<PathBuf> {
        let dir = self.task_dir(id);
        let aside = dir.with_file_name(format!("{DELETING_PREFIX}{id}-{seq}"));
        match std::fs::rename(&dir, &aside) {
            Ok(()) => Some(aside),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                tracing::warn!(dir = %dir.display(), %err, "renaming a task directory for deletion");
                Some(dir)
            }
        }
    }

    /// Starts queued tasks, and deletes the files of tasks whose retention
    /// expired, until the runtime shuts down.
    async fn run_scheduler(self: Arc<Self>) {
        loop {
            self.start_runnable();
            let next_expiry = self.expire_retention().await;
            let nap = next_expiry.map_or(MAX_TIMER_NAP, |d| d.min(MAX_TIMER_NAP));
            // `notify_one` leaves a permit when nobody waits, so a change
            // made during the pass above still wakes this.
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Starts `active` tasks in creation order, up to the limit, if the gates allow.
    fn start_runnable(self: &Arc<Self>) {
        let mut state = self.lock();
        if !state.gates.scheduling_enabled || state.gates.held || state.shutting_down {
            return;
        }
        let free = self.max_running.saturating_sub(state.running.len());
        let mut queued: Vec<(u64, String)> = state
            .records
            .values()
            .filter(|r| r.task.state == TaskState::Active)
            .map(|r| (r.seq, r.task.id.clone()))
            .collect();
        queued.sort();
        for (_, id) in queued.into_iter().take(free) {
            self.launch(&mut state, &id);
        }
    }

    /// Starts one run of task `id` and hands it to a supervisor.
    fn launch(self: &Arc<Self>, state: &mut State, id: &str) {
        // Per-task uids other tasks hold, with their files.
        let taken: HashSet<u32> = state
            .records
            .values()
            .filter(|r| r.task.id != id)
            .filter_map(TaskRecord::per_task_uid)
            .collect();
        let Some(record) = state.records.get(id) else {
            return;
        };
        let max_wall_clock = record.max_wall_clock;
        let started = self.spawn(record, &taken);
        let now = Timestamp::now();
        let Started {
            child,
            pid,
            containment,
            run_as,
        } = match started {
            Ok(started) => started,
            Err(err) => {
                tracing::error!(task = id, %err, "starting a task");
                let failure = FailureInfo {
                    category: "servererror".into(),
                    code: ErrorCode::TaskStartFailed,
                    message: format!("the node could not start the task: {err}"),
                };
                self.complete(state, id, now, None, Some(failure), 0);
                return;
            }
        };
        let identity = ProcessIdentity::of(pid)
            .inspect_err(|err| {
                tracing::warn!(task = id, pid, %err, "reading the identity of a task process")
            })
            .ok();
        let run_id = state.next_run_id;
        state.next_run_id += 1;
        let Some(record) = state.records.get_mut(id) else {
            return;
        };
        record.task.state = TaskState::Running;
        crate::metrics::global()
            .tasks
            .with_label_values(&["running"])
            .inc();
        record.task.state_transition_time = now;
        let info = &mut record.task.execution_info;
        info.start_time = Some(now);
        info.end_time = None;
        info.exit_code = None;
        info.failure_info = None;
        record.process = identity;
        record.user = run_as;
        self.persist(record);
        let (stop, stop_requests) = oneshot::channel();
        state.running.insert(
            id.to_owned(),
            Run {
                run_id,
                stop: Some(stop),
            },
        );
        tracing::info!(
            task = id,
            pid,
            uid = run_as.map_or(0, |r| r.uid),
            ?containment,
            "task started"
        );
        tokio::spawn(Arc::clone(self).supervise(
            id.to_owned(),
            child,
            containment,
            max_wall_clock,
            stop_requests,
        ));
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Prepares the task's directory, its user and its cgroup, and starts
    /// its process. `taken`: per-task uids other tasks hold.
    fn spawn(&self, record: &TaskRecord, taken: &HashSet<u32>) -> io::Result<Started> {
        let id = &record.task.id;
        let run_as = self
            .users
            .run_as(&record.task.user_identity, record.user, taken)
            .map_err(|e| context("choosing the task's user", e))?;
        if let Some(run_as) = run_as
            && let Some((dir, mode, owner)) =
                dirs::blocking_dir(&self.config.work_dir.join("tasks"), run_as)
        {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "its user (uid {}) cannot reach its working directory: {} (mode {mode:04o}, owner uid {owner}) does not let others search it; chmod o+x it or move [tasks] work_dir",
                    run_as.uid,
                    dir.display()
                ),
            ));
        }
        let dir = self.task_dir(id);
        let files = dirs::prepare_run(&dir, run_as)
            .map_err(|e| context(&format!("preparing {}", dir.display()), e))?;
        let wd = files.working_dir.to_string_lossy().into_owned();
        let mut env = vec![("HOME".to_owned(), wd.clone())];
        env.extend(
            record
                .task
                .environment_settings
                .iter()
                .map(|s| (s.name.clone(), s.value.clone())),
        );
        env.push((format!("{RESERVED_ENV_PREFIX}ID"), id.clone()));
        env.push((format!("{RESERVED_ENV_PREFIX}WORKING_DIR"), wd.clone()));
        env.push((
            format!("{BATCH_ENV_PREFIX}NODE_ID"),
            self.config.node_id.clone(),
        ));
        env.push((format!("{BATCH_ENV_PREFIX}TASK_ID"), id.clone()));
        env.push((format!("{BATCH_ENV_PREFIX}TASK_WORKING_DIR"), wd));
        env.push((
            format!("{BATCH_ENV_PREFIX}TASK_DIR"),
            dir.to_string_lossy().into_owned(),
        ));

        let cgroup = match &self.isolation {
            Isolation::Cgroup(tree) => Some(
                tree.create_run(id, record.task.execution_info.requeue_count)
                    .map_err(|e| context("creating the run's cgroup", e))?,
            ),
            Isolation::ProcessGroup => None,
        };
        // An empty cgroup goes at once; one whose child got in before
        // failing waits for the next start's sweep.
        let discard = |cgroup: &Option<cgroup::TaskCgroup>| {
            if let Some(cgroup) = cgroup {
                let _ = std::fs::remove_dir(cgroup.dir());
            }
        };
        let launched = cgroup
            .as_ref()
            .map(cgroup::TaskCgroup::join)
            .transpose()
            .and_then(|join| {
                process::spawn(Launch {
                    command_line: record.task.command_line.clone(),
                    working_dir: files.working_dir,
                    stdout: files.stdout,
                    stderr: files.stderr,
                    env,
                    cgroup: join,
                    privileges: run_as.map(PrivilegeDrop::to),
                })
            })
            .map_err(|e| {
                let who = run_as.map_or("root".to_owned(), |r| format!("uid {}", r.uid));
                context(&format!("starting sh as {who}"), e)
            })
            .and_then(
                |child| match child.id().and_then(|p| i32::try_from(p).ok()) {
                    Some(pid) => Ok((child, pid)),
                    None => Err(io::Error::other(
                        "the process ended before it could be watched",
                    )),
                },
            );
        let (child, pid) = match launched {
            Ok(launched) => launched,
            Err(err) => {
                discard(&cgroup);
                return Err(err);
            }
        };
        let containment = match cgroup {
            Some(cgroup) => Containment::Cgroup(cgroup),
            None => Containment::ProcessGroup(pid),
        };
        Ok(Started {
            child,
            pid,
            containment,
            run_as,
        })
    }

    /// Watches one run: waits for it to exit, to exceed its wall clock time
    /// or to be stopped, and records how it ended.
    async fn supervise(
        self: Arc<Self>,
        id: String,
        mut child: Child,
        containment: Containment,
        max_wall_clock: Option<Duration>,
        mut stop_requests: oneshot::Receiver<StopRequest>,
    ) {
        let wall_clock = async {
            match max_wall_clock {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let grace = self.config.kill_grace;
        let mut answer = None;
        let (status, outcome) = tokio::select! {
            status = child.wait() => {
                // Background processes the command left behind must not
                // outlive the task: they would write into a directory that
                // retention deletes, or hold the disk during a reimage.
                if containment.is_occupied() {
                    containment.stop(grace).await;
                }
                (status, Outcome::Exited)
            }
            () = wall_clock => {
                containment.stop(grace).await;
                (child.wait().await, Outcome::WallClockExceeded)
            }
            Ok(request) = &mut stop_requests => {
                containment.stop(grace).await;
                answer = Some(request.done);
                (child.wait().await, Outcome::Stopped(request.mode))
            }
        };
        // Before the run counts as ended: a reimage waits for that.
        containment.release().await;
        // A stop asked for after the task ended goes unanswered: it stopped nothing.
        drop(stop_requests);
        let retained_bytes = match outcome {
            Outcome::Stopped(StopMode::Requeue) => 0,
            _ => {
                let dir = self.task_dir(&id);
                tokio::task::spawn_blocking(move || dir_size(&dir))
                    .await
                    .unwrap_or(0)
            }
        };
        self.finish(&id, status, outcome, retained_bytes);
        if let Some(done) = answer {
            let _ = done.send(());
        }
    }

    /// Records how a run ended.
    fn finish(
        &self,
        id: &str,
        status: io::Result<ExitStatus>,
        outcome: Outcome,
        retained_bytes: u64,
    ) {
        let now = Timestamp::now();
        let mut state = self.lock();
        state.running.remove(id);
        let exit_code = status.as_ref().ok().and_then(|s| process::exit_code(*s));
        let how = match &status {
            Ok(status) => describe_exit(*status),
            Err(err) => format!("could not be waited for ({err})"),
        };
        tracing::info!(task = id, "task process {how}");
        let failure = |category: &str, code: ErrorCode, message: String| {
            Some(FailureInfo {
                category: category.into(),
                code,
                message,
            })
        };
        let failure = match outcome {
            Outcome::Stopped(StopMode::Requeue) => {
                if let Some(record) = state.records.get_mut(id) {
                    record.task.state = TaskState::Active;
                    crate::metrics::global()
                        .tasks
                        .with_label_values(&["active"])
                        .inc();
                    record.task.state_transition_time = now;
                    record.task.execution_info.requeue_count += 1;
                    record.process = None;
                    self.persist(record);
                }
                drop(state);
                self.changed();
                return;
            }
            Outcome::Exited if exit_code == Some(0) => None,
            Outcome::Exited => failure(
                "usererror",
                ErrorCode::TaskFailed,
                format!("the command {how}"),
            ),
            Outcome::WallClockExceeded => {
                let limit = state
                    .records
                    .get(id)
                    .and_then(|r| r.task.constraints.max_wall_clock_time.clone())
                    .unwrap_or_default();
                failure(
                    "usererror",
                    ErrorCode::MaxWallClockTimeExceeded,
                    format!(
                        "the task ran longer than its maxWallClockTime {limit} and was stopped; it {how}"
                    ),
                )
            }
            Outcome::Stopped(StopMode::Terminate) => failure(
                "servererror",
                ErrorCode::TaskTerminated,
                format!("the node terminated the task; it {how}"),
            ),
        };
        self.complete(&mut state, id, now, exit_code, failure, retained_bytes);
    }

    /// Moves task `id` to `completed` and starts its retention time.
    fn complete(
        &self,
        state: &mut State,
        id: &str,
        now: Timestamp,
        exit_code: Option<i32>,
        failure_info: Option<FailureInfo>,
        retained_bytes: u64,
    ) {
        let Some(record) = state.records.get_mut(id) else {
            return;
        };
        record.task.state = TaskState::Completed;
        crate::metrics::global()
            .tasks
            .with_label_values(&["completed"])
            .inc();
        record.task.state_transition_time = now;
        record.task.retention_expiry =
            Some(now.checked_add(record.retention).unwrap_or(Timestamp::MAX));
        let succeeded = failure_info.is_none();
        let info = &mut record.task.execution_info;
        info.end_time = Some(now);
        info.exit_code = exit_code;
        info.failure_info = failure_info;
        record.process = None;
        record.retained_bytes = retained_bytes;
        record.files_deleted = false;
        self.persist(record);
        state.total_run += 1;
        if let Err(err) = self.store.put(Table::Node, TOTAL_RUN_KEY, &state.total_run) {
            tracing::error!(%err, "persisting the number of tasks run");
        }
        if succeeded {
            state.total_succeeded += 1;
            if let Err(err) =
                self.store
                    .put(Table::Node, TOTAL_SUCCEEDED_KEY, &state.total_succeeded)
            {
                tracing::error!(%err, "persisting the number of tasks that succeeded");
            }
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        self.wake.notify_one();
    }

    /// Deletes the directories of tasks whose retention expired; returns the
    /// time until the next expiry.
    async fn expire_retention(&self) -> Option<Duration> {
        let now = Timestamp::now();
        let clock = tokio::time::Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Duration> = None;
        {
            let state = self.lock();
            for record in state.records.values().filter(|r| r.holds_files()) {
                let id = &record.task.id;
                let left = record
                    .task
                    .retention_expiry
                    .map_or(jiff::SignedDuration::ZERO, |expiry| {
                        expiry.duration_since(now)
                    });
                let wait = match state.delete_retry.get(id) {
                    Some(retry) if *retry > clock => Some(*retry - clock),
                    _ if left.is_positive() => Some(left.unsigned_abs()),
                    _ => None,
                };
                match wait {
                    Some(wait) => next = Some(next.map_or(wait, |n| n.min(wait))),
                    None => due.push(id.clone()),
                }
            }
        }
        for id in due {
            let dir = self.task_dir(&id);
            let removed = remove_dir(dir.clone()).await;
            let mut state = self.lock();
            if let Err(err) = removed {
                tracing::error!(task = %id, dir = %dir.display(), %err, "deleting an expired task directory");
                state.delete_retry.insert(id, clock + DELETE_RETRY);
                next = Some(next.map_or(DELETE_RETRY, |n| n.min(DELETE_RETRY)));
                continue;
            }
            state.delete_retry.remove(&id);
            if let Some(record) = state.records.get_mut(&id).filter(|r| r.holds_files()) {
                record.files_deleted = true;
                self.persist(record);
                tracing::info!(task = %id, "retention expired; task files deleted");
            }
            drop(state);
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        next
    }
}

/// A run just started.
struct Started {
    child: Child,
    pid: i32,
    containment: Containment,
    /// `None`: root, or the agent's own user.
    run_as: Option<RunAs>,
}

/// `err` with `what` the agent was doing in front.
fn context(what: &str, err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// "exited with code 3" or "was killed by SIGTERM".
fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => match nix::sys::signal::Signal::try_from(signal) {
            Ok(signal) => format!("was killed by {signal}"),
            Err(_) => format!("was killed by signal {signal}"),
        },
        (None, None) => format!("ended with {status}"),
    }
}

/// Reads every task record. One that does not decode is left in the store
/// and skipped with an error in the log: a damaged record must not keep the
/// node from serving the others.
fn load_records(store: &Store) -> crate::Result<HashMap<String, TaskRecord>> {
    let mut records = HashMap::new();
    for (id, value) in store.list::<serde_json::Value>(Table::Tasks)? {
        match serde_json::from_value::<TaskRecord>(value) {
            Ok(record) => {
                records.insert(id, record);
            }
            Err(err) => {
                tracing::error!(task = %id, %err, "skipping a task record that does not decode")
            }
        }
    }
    Ok(records)
}

/// Stops and removes the run cgroups an earlier agent left (after
/// `kill -9`), all at once, each with the kill grace.
async fn stop_leftover_cgroups(tree: &cgroup::CgroupTree, grace: Duration) {
    let mut stops = tokio::task::JoinSet::new();
    for cgroup in tree.leftovers() {
        if cgroup.is_populated() {
            tracing::warn!(task = cgroup.task_id(), cgroup = %cgroup.dir().display(), pids = ?cgroup.pids(), "stopping the processes of a task left running by an earlier agent");
        }
        stops.spawn(async move {
            cgroup.stop(grace).await;
            cgroup.remove().await;
        });
    }
    stops.join_all().await;
}

/// Tasks recorded as `running` were left by an earlier agent or boot: stop
/// what is left of their process groups (only if still the same processes)
/// and queue them again.
async fn requeue_orphans(
    store: &Store,
    records: &mut HashMap<String, TaskRecord>,
    grace: Duration,
) {
    let mut stops = tokio::task::JoinSet::new();
    for record in records
        .values()
        .filter(|r| r.task.state == TaskState::Running)
    {
        if let Some(process) = &record.process {
            let members = process.surviving_members();
            if !members.is_empty() {
                tracing::warn!(task = %record.task.id, pgid = process.pid, ?members, "stopping the processes of a task left running by an earlier agent");
                stops.spawn(stop_group(process.pid, grace));
            }
        }
    }
    stops.join_all().await;
    let now = Timestamp::now();
    for record in records
        .values_mut()
        .filter(|r| r.task.state == TaskState::Running)
    {
        record.task.state = TaskState::Active;
        crate::metrics::global()
            .tasks
            .with_label_values(&["active"])
            .inc();
        record.task.state_transition_time = now;
        record.task.execution_info.requeue_count += 1;
        record.process = None;
        tracing::info!(task = %record.task.id, "requeued a task that was running when the agent stopped");
        if let Err(err) = store.put(Table::Tasks, &record.task.id, &*record) {
            tracing::error!(task = %record.task.id, %err, "persisting a requeued task");
        }
    }
}

/// Removes task directories whose deletion an earlier agent began.
async fn remove_interrupted_deletions(tasks_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(tasks_dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(DELETING_PREFIX)
        {
            let _ = remove_dir(entry.path()).await;
        }
    }
}

/// Removes a directory tree off the async threads; a missing one is fine.
async fn remove_dir(dir: PathBuf) -> io::Result<()> {
    let shown = dir.display().to_string();
    let result = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    })
    .await
    .unwrap_or_else(|join| Err(io::Error::other(join)));
    if let Err(err) = &result {
        tracing::warn!(dir = shown, %err, "removing a task directory");
    }
    result
}

/// Bytes in the files under `dir` (symlinks not followed).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => pending.push(entry.path()),
                Ok(meta) => total += meta.len(),
                Err(_) => {}
            }
        }
    }
    total
}
