//! One error body everywhere: `{"code","message":{"lang","value"},"values"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
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
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody::new(code, message),
        }
    }

    /// 400.
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404.
    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 409.
    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 500, for failures of the agent itself (the store, a thread).
    pub fn internal(err: impl fmt::Display) -> Self {
        tracing::error!(%err, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
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

impl From<crate::tasks::TaskError> for ApiError {
    fn from(err: crate::tasks::TaskError) -> Self {
        let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(status, err.code(), err.to_string())
    }
}
