//! JSON request bodies: content type checked, size limited, and every
//! rejection answered with the API's error body.

use crate::api::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use reimage_protocol::ErrorCode;
use serde::de::DeserializeOwned;

/// Request bodies are small; anything larger is refused.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A required JSON body.
pub struct JsonBody<T>(pub T);

/// A JSON body that may be left out (then `T::default()`).
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let (json, bytes) = read(request, state).await?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request(
                ErrorCode::MissingRequestBody,
                "this request needs a JSON body",
            ));
        }
        parse(json, &bytes).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let (json, bytes) = read(request, state).await?;
        if bytes.is_empty() {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse(json, &bytes).map(OptionalJsonBody)
    }
}

async fn read<S: Send + Sync>(request: Request, state: &S) -> Result<(bool, Bytes), ApiError> {
    let json = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    let bytes = Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::RequestBodyTooLarge,
                    format!("request bodies are limited to {BODY_LIMIT} bytes"),
                )
            } else {
                ApiError::bad_request(ErrorCode::InvalidRequestBody, rejection.body_text())
            }
        })?;
    Ok((json, bytes))
}

fn parse<T: DeserializeOwned>(json: bool, bytes: &[u8]) -> Result<T, ApiError> {
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "send the body as application/json",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(
            ErrorCode::InvalidRequestBody,
            format!("the body is not valid: {e}"),
        )
    })
}
