//! One error body everywhere: `{"code","message":{"lang","value"},"values"}`.

use crate::ops::{Refusal, RefusalKind};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use reimage_protocol::ErrorCode;
use reimage_protocol::api::ErrorBody;
use std::fmt;

/// An API failure: an HTTP status and the Batch-style body.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with `status`, `code` and a message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody::new(code, message),
        }
    }

    /// 400.
    pub fn bad_request(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404.
    pub fn not_found(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409.
    pub fn conflict(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 500, for failures of the agent itself (the store, a thread).
    pub fn internal(err: impl fmt::Display) -> Self {
        tracing::error!(%err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            err.to_string(),
        )
    }

    /// Adds a `{"key","value"}` detail.
    pub fn with_value(mut self, key: &str, value: impl Into<String>) -> Self {
        self.body = self.body.with_value(key, value);
        self
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.body.code, self.body.message.value)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<Refusal> for ApiError {
    /// The status each kind of refusal is answered with.
    fn from(refusal: Refusal) -> Self {
        let status = match refusal.kind {
            RefusalKind::Invalid => StatusCode::BAD_REQUEST,
            RefusalKind::Forbidden => StatusCode::FORBIDDEN,
            RefusalKind::NotFound => StatusCode::NOT_FOUND,
            RefusalKind::Conflict => StatusCode::CONFLICT,
            RefusalKind::Internal => {
                tracing::error!(%refusal, "internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut error = ApiError::new(status, refusal.code, refusal.message);
        for (key, value) in refusal.details {
            error = error.with_value(&key, value);
        }
        error
    }
}

impl From<crate::tasks::TaskError> for ApiError {
    fn from(err: crate::tasks::TaskError) -> Self {
        Refusal::from(err).into()
    }
}
