//! JSON request bodies: content type checked, size limited, and every
//! rejection answered with the API's error body.

use crate::api::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use reimage_protocol::ErrorCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Request bodies are small; anything larger is refused.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A required JSON body: a JSON object of `T`'s shape.
pub struct JsonBody<T>(pub T);

/// A JSON body that may be left out, or be `null` (then `T::default()`).
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let (json, bytes) = read(request, state).await?;
        let missing = || {
            ApiError::bad_request(
                ErrorCode::MissingRequestBody,
                "this request needs a JSON object as its body",
            )
        };
        if bytes.is_empty() {
            return Err(missing());
        }
        parse(json, &bytes)?.map(JsonBody).ok_or_else(missing)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let (json, bytes) = read(request, state).await?;
        if bytes.is_empty() {
            return Ok(OptionalJsonBody(T::default()));
        }
        Ok(OptionalJsonBody(parse(json, &bytes)?.unwrap_or_default()))
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

/// The body as `T`; `None` for `null`. Anything but an object (or `null`)
/// is refused: serde would otherwise map an array onto the fields by
/// position, and `["terminate"]` would reimage with `terminate`.
fn parse<T: DeserializeOwned>(json: bool, bytes: &[u8]) -> Result<Option<T>, ApiError> {
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::UnsupportedMediaType,
            "send the body as application/json",
        ));
    }
    let invalid = |why: String| ApiError::bad_request(ErrorCode::InvalidRequestBody, why);
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("the body is not JSON: {e}")))?;
    let kind = match &value {
        Value::Object(_) => {
            return serde_json::from_value(value)
                .map(Some)
                .map_err(|e| invalid(format!("the body is not valid: {e}")));
        }
        Value::Null => return Ok(None),
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
    };
    Err(invalid(format!(
        "the body must be a JSON object, not {kind}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reimage_protocol::api::{AddTaskRequest, NodeReimageOption, ReimageRequest};

    #[test]
    fn only_objects_are_bodies() {
        for body in [r#"["terminate"]"#, "[]", "1", r#""requeue""#, "true"] {
            let err = parse::<ReimageRequest>(true, body.as_bytes()).expect_err(body);
            assert_eq!(err.body.code, ErrorCode::InvalidRequestBody, "{body}");
            assert!(
                err.body.message.value.contains("JSON object"),
                "{body}: {err}"
            );
        }
        let parsed = parse::<ReimageRequest>(true, br#"{"nodeReimageOption":"Terminate"}"#)
            .expect("an object")
            .expect("not null");
        assert_eq!(parsed.node_reimage_option, NodeReimageOption::Terminate);
        assert_eq!(parse::<ReimageRequest>(true, b"null").expect("null"), None);
        let err = parse::<AddTaskRequest>(true, b"{").expect_err("not JSON");
        assert!(err.body.message.value.contains("not JSON"), "{err}");
        let err = parse::<ReimageRequest>(false, b"{}").expect_err("not JSON typed");
        assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
