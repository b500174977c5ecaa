//! What the store keeps of a task: the wire [`Task`] plus what only the
//! agent needs (creation order, parsed limits, the running process's
//! identity, the user it runs as, whether the retention timer already
//! deleted the files).

use super::TaskError;
use super::identity::{self, Requester, RunAs};
use super::process::ProcessIdentity;
use crate::duration::parse_duration;
use crate::pattern::Pattern;
use reimage_protocol::api::{AddTaskRequest, ExecutionInfo, Task, TaskState};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Longest task id, as in Batch.
const MAX_ID_LEN: usize = 64;

/// Prefix of the environment variables the agent sets for every task.
pub(crate) const RESERVED_ENV_PREFIX: &str = "REIMAGE_TASK_";
/// Prefix of Batch's standard task environment, which the agent sets too.
pub(crate) const BATCH_ENV_PREFIX: &str = "AZ_BATCH_";

/// One task as persisted in [`crate::store::Table::Tasks`] under its id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TaskRecord {
    /// What the API shows.
    pub task: Task,
    /// Creation order: tasks start in this order.
    pub seq: u64,
    /// `constraints.maxWallClockTime`, parsed.
    pub max_wall_clock: Option<Duration>,
    /// `constraints.retentionTime`, parsed, or the default when the task was added.
    pub retention: Duration,
    /// The process group leader while the task is `running`.
    pub process: Option<ProcessIdentity>,
    /// The account its last run used (`None`: root); a task-scoped task
    /// keeps its own uid here until its files are deleted.
    #[serde(default)]
    pub user: Option<RunAs>,
    /// Size of the task's directory when it completed (what retention holds).
    pub retained_bytes: u64,
    /// The retention timer fired and the task's directory is gone.
    pub files_deleted: bool,
}

impl TaskRecord {
    /// Checks `request` (from `requester`) and makes the record of a new
    /// `active` task.
    pub fn new(
        request: AddTaskRequest,
        requester: Requester,
        seq: u64,
        default_retention: Duration,
        now: jiff::Timestamp,
    ) -> Result<TaskRecord, TaskError> {
        check_id(&request.id)?;
        check_command_line(&request.command_line)?;
        let user_identity = identity::resolve(request.user_identity.as_ref(), requester)?;
        for setting in &request.environment_settings {
            check_env(&setting.name, &setting.value)?;
        }
        let max_wall_clock = match &request.constraints.max_wall_clock_time {
            Some(value) => {
                let limit = duration("maxWallClockTime", value)?;
                if limit.is_zero() {
                    return Err(TaskError::InvalidDuration {
                        field: "maxWallClockTime".into(),
                        value: value.clone(),
                        reason: "a task needs some time to run".into(),
                    });
                }
                Some(limit)
            }
            None => None,
        };
        let retention = match &request.constraints.retention_time {
            Some(value) => duration("retentionTime", value)?,
            None => default_retention,
        };
        Ok(TaskRecord {
            task: Task {
                id: request.id,
                command_line: request.command_line,
                environment_settings: request.environment_settings,
                constraints: request.constraints,
                state: TaskState::Active,
                creation_time: now,
                state_transition_time: now,
                execution_info: ExecutionInfo::default(),
                retention_expiry: None,
                user_identity,
            },
            seq,
            max_wall_clock,
            retention,
            process: None,
            user: None,
            retained_bytes: 0,
            files_deleted: false,
        })
    }

    /// The task's directory is kept (not yet deleted by its retention timer).
    pub fn holds_files(&self) -> bool {
        self.task.state == TaskState::Completed && !self.files_deleted
    }

    /// The per-task uid this task holds: from its first run until its
    /// files are deleted, since they are owned by it.
    pub fn per_task_uid(&self) -> Option<u32> {
        self.user
            .filter(|u| u.is_per_task() && !self.files_deleted)
            .map(|u| u.uid)
    }
}

/// The duration `value` given for `field`.
fn duration(field: &str, value: &str) -> Result<Duration, TaskError> {
    parse_duration(value).map_err(|e| TaskError::InvalidDuration {
        field: field.to_owned(),
        value: value.to_owned(),
        reason: e.to_string(),
    })
}

/// Task ids: 1 to 64 characters of `[A-Za-z0-9_-]`. They name a
/// directory, so nothing else (no `/`, no `..`) may get in.
pub static ID_PATTERN: Pattern = Pattern::new("^[A-Za-z0-9_-]{1,64}$");

/// A command line: not blank (space, tab, CR and LF are blank), no NUL.
pub static COMMAND_LINE_PATTERN: Pattern =
    Pattern::new("^[^\\u0000]*[^\\u0000\\t\\n\\r ][^\\u0000]*$");

/// An environment variable's name: not empty, no `=`, no NUL. (Names with
/// the agent's prefixes are refused too, which the pattern leaves out: its
/// dialect here has no look-ahead.)
pub static ENV_NAME_PATTERN: Pattern = Pattern::new("^[^=\\u0000]+$");

/// An environment variable's value: no NUL.
pub static ENV_VALUE_PATTERN: Pattern = Pattern::new("^[^\\u0000]*$");

pub(crate) fn check_id(id: &str) -> Result<(), TaskError> {
    let invalid = |reason: &str| TaskError::InvalidTaskId {
        id: id.to_owned(),
        reason: reason.to_owned(),
    };
    if id.is_empty() {
        return Err(invalid("an id cannot be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid("an id has at most 64 characters"));
    }
    if !ID_PATTERN.is_match(id) {
        return Err(invalid(
            "an id may hold only letters, digits, hyphens and underscores",
        ));
    }
    Ok(())
}

fn check_command_line(command_line: &str) -> Result<(), TaskError> {
    if command_line.contains('\0') {
        return Err(TaskError::InvalidCommandLine("it holds a NUL byte".into()));
    }
    if !COMMAND_LINE_PATTERN.is_match(command_line) {
        return Err(TaskError::InvalidCommandLine("it is blank".into()));
    }
    Ok(())
}

fn check_env(name: &str, value: &str) -> Result<(), TaskError> {
    let invalid = |reason: &str| TaskError::InvalidEnvironmentSetting {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if !ENV_NAME_PATTERN.is_match(name) {
        return Err(invalid("a name must be non-empty, without '=' or NUL"));
    }
    if !ENV_VALUE_PATTERN.is_match(value) {
        return Err(invalid("the value holds a NUL byte"));
    }
    for prefix in [RESERVED_ENV_PREFIX, BATCH_ENV_PREFIX] {
        if name.starts_with(prefix) {
            return Err(invalid(&format!(
                "names starting with {prefix} are set by the agent"
            )));
        }
    }
    Ok(())
}
