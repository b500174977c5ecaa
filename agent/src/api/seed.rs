//! Seed-compatible routes: the Azure Batch "reimage a node" and the Cloud
//! Services "reimage role instance" requests, answered in their own shapes
//! and backed by the same operations as API v1.

use crate::api::body::OptionalJsonBody;
use crate::api::error::ApiError;
use crate::api::{ApiState, REQUEST_ID, client_request_id};
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use reimage_protocol::api::{OperationStatus, ReimageRequest};
use serde::Deserialize;
use std::collections::HashMap;

/// Cloud Services' request id header.
const MS_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-request-id");
/// The oldest service management API version with role instance reimage.
const MIN_MS_VERSION: &str = "2010-10-28";

/// Batch's query string: `api-version` is required.
#[derive(Debug, Deserialize)]
pub struct BatchQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
}

/// `POST /pools/{poolId}/nodes/{nodeId}/reimage?api-version=…`.
pub async fn batch_reimage(
    State(state): State<ApiState>,
    Path((pool, node)): Path<(String, String)>,
    Query(query): Query<BatchQuery>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<ReimageRequest>,
) -> Result<Response, ApiError> {
    if query.api_version.as_deref().is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "MissingRequiredQueryParameter",
            "the api-version query parameter is required",
        )
        .with_value("QueryParameterName", "api-version"));
    }
    check_node(&state, &node)?;
    let client_id = client_request_id(&headers)?;
    let operation = state.agent.reimage(request, client_id.as_deref()).await?;
    let mut response = StatusCode::ACCEPTED.into_response();
    let headers = response.headers_mut();
    insert(headers, REQUEST_ID, &operation.id);
    insert(
        headers,
        HeaderName::from_static("dataserviceid"),
        &format!("/pools/{pool}/nodes/{node}"),
    );
    insert(
        headers,
        axum::http::header::LOCATION,
        &format!("/v1/operations/{}", operation.id),
    );
    Ok(response)
}

/// `POST /{subscriptionId}/services/hostedservices/{service}/deployments/{deployment}/roleinstances/{role}?comp=reimage`.
pub async fn role_instance(
    State(state): State<ApiState>,
    Path((_subscription, _service, _deployment, role)): Path<(String, String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, XmlError> {
    if query.get("comp").map(String::as_str) != Some("reimage") {
        return Err(XmlError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "only comp=reimage is supported on role instances",
        ));
    }
    let version = headers.get("x-ms-version").and_then(|v| v.to_str().ok());
    match version {
        None => {
            return Err(XmlError::new(
                StatusCode::BAD_REQUEST,
                "MissingOrInvalidRequiredHeader",
                "the x-ms-version header is required",
            ));
        }
        // ISO dates compare correctly as strings.
        Some(v) if !is_iso_date(v) || v < MIN_MS_VERSION => {
            return Err(XmlError::new(
                StatusCode::BAD_REQUEST,
                "InvalidHeader",
                &format!(
                    "x-ms-version {v} is not supported: reimage needs {MIN_MS_VERSION} or later"
                ),
            ));
        }
        Some(_) => {}
    }
    if role != state.agent.node().id {
        return Err(XmlError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("no role instance {role}"),
        ));
    }
    let client_id = client_request_id(&headers).map_err(XmlError::from)?;
    let operation = state
        .agent
        .reimage(ReimageRequest::default(), client_id.as_deref())
        .await
        .map_err(XmlError::from)?;
    let mut response = StatusCode::OK.into_response();
    insert(response.headers_mut(), MS_REQUEST_ID, &operation.id);
    insert(response.headers_mut(), REQUEST_ID, &operation.id);
    Ok(response)
}

/// `GET /{subscriptionId}/operations/{requestId}`: the XML `Operation`.
pub async fn operation_status(
    State(state): State<ApiState>,
    Path((_subscription, request_id)): Path<(String, String)>,
) -> Result<Response, XmlError> {
    let operation = state.agent.operation(&request_id).ok_or_else(|| {
        XmlError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            &format!("no operation {request_id}"),
        )
    })?;
    let (status, http, error) = match operation.status {
        OperationStatus::InProgress => ("InProgress", None, None),
        OperationStatus::Succeeded => ("Succeeded", Some(200), None),
        OperationStatus::Failed => ("Failed", Some(500), operation.error),
    };
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Operation xmlns=\"http://schemas.microsoft.com/windowsazure\" xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">\n  <ID>{}</ID>\n  <Status>{status}</Status>\n",
        escape(&operation.id)
    );
    if let Some(code) = http {
        xml.push_str(&format!("  <HttpStatusCode>{code}</HttpStatusCode>\n"));
    }
    if let Some(error) = error {
        xml.push_str(&format!(
            "  <Error>\n    <Code>{}</Code>\n    <Message>{}</Message>\n  </Error>\n",
            escape(&error.code),
            escape(&error.message)
        ));
    }
    xml.push_str("</Operation>\n");
    let mut response = ([(CONTENT_TYPE, "application/xml; charset=utf-8")], xml).into_response();
    insert(response.headers_mut(), MS_REQUEST_ID, &request_id);
    Ok(response)
}

fn check_node(state: &ApiState, node: &str) -> Result<(), ApiError> {
    let id = state.agent.node().id;
    if node == id {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "NodeNotFound",
            format!("this agent is node {id}, not {node}"),
        )
        .with_value("nodeId", node))
    }
}

fn is_iso_date(v: &str) -> bool {
    v.len() == 10 && v.parse::<jiff::civil::Date>().is_ok()
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// XML text escaping for element content.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// Service management errors are XML:
/// `<Error><Code>…</Code><Message>…</Message></Error>`.
#[derive(Debug)]
pub struct XmlError {
    status: StatusCode,
    code: String,
    message: String,
}

impl XmlError {
    fn new(status: StatusCode, code: &str, message: &str) -> Self {
        XmlError {
            status,
            code: code.to_string(),
            message: message.to_string(),
        }
    }
}

impl From<ApiError> for XmlError {
    fn from(err: ApiError) -> Self {
        XmlError {
            status: err.status,
            code: err.body.code,
            message: err.body.message.value,
        }
    }
}

impl IntoResponse for XmlError {
    fn into_response(self) -> Response {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Error xmlns=\"http://schemas.microsoft.com/windowsazure\" xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">\n  <Code>{}</Code>\n  <Message>{}</Message>\n</Error>\n",
            escape(&self.code),
            escape(&self.message)
        );
        (
            self.status,
            [(CONTENT_TYPE, "application/xml; charset=utf-8")],
            xml,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_be_dates_at_or_after_the_first_with_reimage() {
        assert!(is_iso_date("2010-10-28"));
        assert!(!is_iso_date("2010-10-2"));
        assert!(!is_iso_date("latest"));
        assert!("2009-10-01" < MIN_MS_VERSION);
        assert!("2024-11-01" >= MIN_MS_VERSION);
    }

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(escape("a<b & 'c'"), "a&lt;b &amp; &apos;c&apos;");
    }
}
