//! Why the agent refused a request, in its own terms; the API layer turns
//! the [`RefusalKind`] into an HTTP status.

use crate::tasks::TaskError;
use reimage_protocol::ErrorCode;
use std::fmt;

/// What sort of refusal it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The request is malformed or names something unusable.
    Invalid,
    /// The caller may not ask for this.
    Forbidden,
    /// What the request names does not exist.
    NotFound,
    /// The node's state, or an earlier request, is in the way.
    Conflict,
    /// The agent itself failed (the store, a thread).
    Internal,
}

/// A refused request: a kind, a stable code, a message and details.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub code: ErrorCode,
    pub message: String,
    /// `(key, value)` pairs that name what the refusal is about.
    pub details: Vec<(String, String)>,
}

impl Refusal {
    /// A refusal of `kind`.
    pub fn new(kind: RefusalKind, code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// The request is malformed or names something unusable.
    pub fn invalid(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(RefusalKind::Invalid, code, message)
    }

    /// The node's state or an earlier request is in the way.
    pub fn conflict(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(RefusalKind::Conflict, code, message)
    }

    /// Adds a detail.
    pub fn with_detail(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.push((key.to_string(), value.into()));
        self
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<crate::Error> for Refusal {
    /// A failure of the agent while it handled the request.
    fn from(err: crate::Error) -> Self {
        Refusal::new(RefusalKind::Internal, err.code(), err.to_string())
    }
}

impl From<TaskError> for Refusal {
    fn from(err: TaskError) -> Self {
        let kind = match &err {
            TaskError::TaskExists(_) | TaskError::NodeNotAcceptingTasks => RefusalKind::Conflict,
            TaskError::TaskNotFound(_) | TaskError::TaskFileNotFound { .. } => {
                RefusalKind::NotFound
            }
            TaskError::InvalidTaskId { .. }
            | TaskError::InvalidDuration { .. }
            | TaskError::InvalidCommandLine(_)
            | TaskError::InvalidEnvironmentSetting { .. }
            | TaskError::UnsupportedUserIdentity(_) => RefusalKind::Invalid,
            TaskError::ElevationNotAllowed => RefusalKind::Forbidden,
            TaskError::Agent(_) => RefusalKind::Internal,
        };
        Refusal::new(kind, err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_errors_are_refusals_of_their_kind() {
        let cases = [
            (TaskError::TaskExists("t".into()), RefusalKind::Conflict),
            (TaskError::NodeNotAcceptingTasks, RefusalKind::Conflict),
            (TaskError::TaskNotFound("t".into()), RefusalKind::NotFound),
            (
                TaskError::InvalidCommandLine("empty".into()),
                RefusalKind::Invalid,
            ),
            (
                TaskError::UnsupportedUserIdentity("username".into()),
                RefusalKind::Invalid,
            ),
            (TaskError::ElevationNotAllowed, RefusalKind::Forbidden),
        ];
        for (err, kind) in cases {
            let code = err.code();
            let refusal = Refusal::from(err);
            assert_eq!(refusal.kind, kind, "{code}");
            assert_eq!(refusal.code, code);
        }
    }
}
