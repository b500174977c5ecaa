//! Why a task request was refused, with the stable code and HTTP status the
//! API answers with.

use reimage_protocol::ErrorCode;

/// A refused or failed task request. `code()` is stable; `http_status()` is
/// what the API answers.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A task with this id (compared case-insensitively, as Batch does) exists.
    #[error("a task with id {0:?} already exists")]
    TaskExists(String),
    /// No task has this id.
    #[error("no task has id {0:?}")]
    TaskNotFound(String),
    /// The id is empty, too long or has characters outside `[A-Za-z0-9_-]`.
    #[error("invalid task id {id:?}: {reason}")]
    InvalidTaskId { id: String, reason: String },
    /// A duration is not an ISO 8601 duration the agent can honour.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidDuration {
        field: String,
        value: String,
        reason: String,
    },
    /// The command line is empty or holds a NUL byte.
    #[error("invalid commandLine: {0}")]
    InvalidCommandLine(String),
    /// An environment setting cannot be passed to a process or uses a reserved name.
    #[error("invalid environment setting {name:?}: {reason}")]
    InvalidEnvironmentSetting { name: String, reason: String },
    /// `userIdentity` names an account (`username`) or no `autoUser`: only
    /// automatic users are supported.
    #[error("unsupported userIdentity: {0}")]
    UnsupportedUserIdentity(String),
    /// `elevationLevel: admin` (root) from a caller without an admin token.
    #[error("elevationLevel admin runs the task as root: it needs an admin token")]
    ElevationNotAllowed,
    /// The node takes no new tasks now (a taskcompletion or retaineddata
    /// reimage or reboot is waiting for the work on it).
    #[error("the node is not accepting new tasks")]
    NodeNotAcceptingTasks,
    /// The task has no such file: not `stdout.txt`/`stderr.txt`, not written
    /// yet, or deleted when its retention time expired.
    #[error("task {id:?} has no file {name:?}")]
    TaskFileNotFound { id: String, name: String },
    /// The agent failed (the state store, the file system).
    #[error(transparent)]
    Agent(#[from] crate::Error),
}

impl TaskError {
    /// The stable error code the API shows as `code`.
    pub fn code(&self) -> ErrorCode {
        match self {
            TaskError::TaskExists(_) => ErrorCode::TaskExists,
            TaskError::TaskNotFound(_) => ErrorCode::TaskNotFound,
            TaskError::InvalidTaskId { .. } => ErrorCode::InvalidTaskId,
            TaskError::InvalidDuration { .. } => ErrorCode::InvalidDuration,
            TaskError::InvalidCommandLine(_) => ErrorCode::InvalidCommandLine,
            TaskError::InvalidEnvironmentSetting { .. } => ErrorCode::InvalidEnvironmentSetting,
            TaskError::UnsupportedUserIdentity(_) => ErrorCode::UnsupportedUserIdentity,
            TaskError::ElevationNotAllowed => ErrorCode::InsufficientPermissions,
            TaskError::NodeNotAcceptingTasks => ErrorCode::NodeNotAcceptingTasks,
            TaskError::TaskFileNotFound { .. } => ErrorCode::TaskFileNotFound,
            TaskError::Agent(err) => err.code(),
        }
    }
}
