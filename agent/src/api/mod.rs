//! HTTP API v1 (axum): the routes of DESIGN.md, one error body, a
//! `request-id` on every answer, bearer-token roles, and `client-request-id`
//! idempotency for POSTs.

pub mod auth;
pub mod body;
pub mod error;
pub mod seed;

use crate::config::TokenConfig;
use crate::ops::Agent;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use body::{JsonBody, OptionalJsonBody};
use error::ApiError;
use reimage_protocol::api::{
    AddTaskRequest, DisableSchedulingRequest, List, Operation, RebootRequest, ReimageRequest,
};
use std::fmt::Write as _;
use std::sync::Arc;

/// `request-id`: set on every response (the operation id for reimage and reboot).
pub const REQUEST_ID: HeaderName = HeaderName::from_static("request-id");
/// `client-request-id`: a caller's retry key for POSTs.
pub const CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("client-request-id");

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub agent: Arc<Agent>,
    pub tokens: Arc<Vec<TokenConfig>>,
}

/// The API's router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/node", get(node))
        .route("/v1/node/reimage", post(reimage))
        .route("/v1/node/reboot", post(reboot))
        .route("/v1/node/disablescheduling", post(disable_scheduling))
        .route("/v1/node/enablescheduling", post(enable_scheduling))
        .route("/v1/operations", get(operations))
        .route("/v1/operations/{id}", get(operation))
        .route("/v1/tasks", post(add_task).get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task).delete(delete_task))
        .route("/v1/tasks/{id}/files/{name}", get(task_file))
        .route("/metrics", get(metrics))
        .route("/pools/{pool}/nodes/{node}/reimage", post(seed::batch_reimage))
        .route(
            "/{subscription}/services/hostedservices/{service}/deployments/{deployment}/roleinstances/{role}",
            post(seed::role_instance),
        )
        .route("/{subscription}/operations/{request_id}", get(seed::operation_status))
        .fallback(|| async { ApiError::not_found("ResourceNotFound", "no such route") })
        .layer(DefaultBodyLimit::max(body::BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

/// Gives every response a `request-id`, unless the handler set one.
async fn request_id(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if !response.headers().contains_key(REQUEST_ID)
        && let Ok(value) = HeaderValue::from_str(&crate::ops::new_request_id())
    {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Refuses requests without the role their route needs.
async fn authenticate(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(needed) = auth::required_role(request.method(), request.uri().path())
        && let Err(err) = auth::authorize(&state.tokens, request.headers(), needed)
    {
        tracing::info!(method = %request.method(), path = request.uri().path(), code = %err.body.code, "request refused");
        let mut response = err.into_response();
        if response.status() == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        return response;
    }
    next.run(request).await
}

pub(crate) fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(&CLIENT_REQUEST_ID) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .ok()
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .ok_or_else(|| {
            ApiError::bad_request(
                "InvalidHeaderValue",
                "client-request-id must be 1-128 visible characters",
            )
        })?;
    Ok(Some(text.to_string()))
}

async fn node(State(state): State<ApiState>) -> impl IntoResponse {
    Json(state.agent.node())
}

/// `202 Accepted` with the operation, its id as `request-id` and `Location`.
fn accepted(operation: Operation) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(&operation)).into_response();
    let headers = response.headers_mut();
    if let Ok(id) = HeaderValue::from_str(&operation.id) {
        headers.insert(REQUEST_ID, id);
    }
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/operations/{}", operation.id)) {
        headers.insert(LOCATION, location);
    }
    response
}

async fn reimage(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<ReimageRequest>,
) -> Result<Response, ApiError> {
    let client_id = client_request_id(&headers)?;
    let operation = state.agent.reimage(request, client_id.as_deref()).await?;
    Ok(accepted(operation))
}

async fn reboot(
    State(state): State<ApiState>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<RebootRequest>,
) -> Result<Response, ApiError> {
    let client_id = client_request_id(&headers)?;
    let operation = state
        .agent
        .reboot(request.node_reboot_option, client_id.as_deref())
        .await?;
    Ok(accepted(operation))
}

async fn disable_scheduling(
    State(state): State<ApiState>,
    OptionalJsonBody(request): OptionalJsonBody<DisableSchedulingRequest>,
) -> Result<StatusCode, ApiError> {
    state
        .agent
        .disable_scheduling(request.node_disable_scheduling_option)
        .await?;
    Ok(StatusCode::OK)
}

async fn enable_scheduling(State(state): State<ApiState>) -> Result<StatusCode, ApiError> {
    state.agent.enable_scheduling().await?;
    Ok(StatusCode::OK)
}

async fn operations(State(state): State<ApiState>) -> impl IntoResponse {
    Json(List {
        value: state.agent.operations(),
    })
}

async fn operation(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Operation>, ApiError> {
    state
        .agent
        .operation(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("OperationNotFound", format!("no operation {id}")))
}

async fn add_task(
    State(state): State<ApiState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<AddTaskRequest>,
) -> Result<Response, ApiError> {
    let client_id = client_request_id(&headers)?;
    let task = state.agent.add_task(request, client_id.as_deref()).await?;
    let mut response = (StatusCode::CREATED, Json(&task)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/tasks/{}", task.id)) {
        response.headers_mut().insert(LOCATION, location);
    }
    Ok(response)
}

async fn list_tasks(State(state): State<ApiState>) -> impl IntoResponse {
    Json(List {
        value: state.agent.tasks.list(),
    })
}

async fn get_task(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let task = state
        .agent
        .tasks
        .get(&id)
        .ok_or_else(|| ApiError::not_found("TaskNotFound", format!("no task {id}")))?;
    Ok(Json(task).into_response())
}

async fn delete_task(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.agent.tasks.delete(&id).await?;
    Ok(StatusCode::OK)
}

async fn task_file(
    State(state): State<ApiState>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let path = state.agent.tasks.file(&id, &name)?;
    let file = tokio::fs::File::open(&path).await.map_err(|_| {
        ApiError::not_found(
            "TaskFileNotFound",
            format!("task {id} has no {name} (yet, or any more)"),
        )
    })?;
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

/// Prometheus text: operations by status, the write's bytes and rate, tasks
/// by state, bytes held by retained task data.
async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    let agent = &state.agent;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# HELP reimage_operations Operations by status.\n# TYPE reimage_operations gauge"
    );
    for (status, count) in agent.operation_counts() {
        let _ = writeln!(text, "reimage_operations{{status=\"{status}\"}} {count}");
    }
    let progress = agent.current_progress().unwrap_or_default();
    let _ = writeln!(
        text,
        "# HELP reimage_write_bytes Bytes of the running phase.\n# TYPE reimage_write_bytes gauge\nreimage_write_bytes {}",
        progress.bytes_written
    );
    let _ = writeln!(
        text,
        "# HELP reimage_write_bytes_per_second Rate of the running phase.\n# TYPE reimage_write_bytes_per_second gauge\nreimage_write_bytes_per_second {}",
        progress.bytes_per_second
    );
    let _ = writeln!(
        text,
        "# HELP reimage_tasks Tasks by state.\n# TYPE reimage_tasks gauge"
    );
    let counts = agent.tasks.counts_by_state();
    for (name, state) in [
        ("active", reimage_protocol::api::TaskState::Active),
        ("running", reimage_protocol::api::TaskState::Running),
        ("completed", reimage_protocol::api::TaskState::Completed),
    ] {
        let _ = writeln!(
            text,
            "reimage_tasks{{state=\"{name}\"}} {}",
            counts.get(&state).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        text,
        "# HELP reimage_retained_bytes Bytes held by completed tasks' retained data.\n# TYPE reimage_retained_bytes gauge\nreimage_retained_bytes {}",
        agent.tasks.retained_bytes()
    );
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}
