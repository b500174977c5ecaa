//! The Azure Batch node routes (`/pools/{pool}/nodes/...`), answered in
//! Batch's shapes and headers so that Batch SDK clients, and the pollers
//! they build on `GET .../nodes/{node}`, work against the agent. Backed by
//! the same operations as API v1; the pool id is not checked (the agent
//! has no pools), the node id is.

use crate::api::body::OptionalJsonBody;
use crate::api::error::ApiError;
use crate::api::{ApiState, REQUEST_ID, client_request_id, insert_header};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{ETAG, HOST, LAST_MODIFIED, LOCATION};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{
    DisableSchedulingRequest, ErrorBody, NodeState, OperationKind, RebootRequest, ReimageRequest,
};
use reimage_protocol::batch::{ComputeNode, ComputeNodeList, NodeAgentInfo};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Batch's `DataServiceId` header: the URL of the entity a request changed.
pub const DATA_SERVICE_ID: HeaderName = HeaderName::from_static("dataserviceid");

/// Batch's query string: `api-version` is required; `timeout` must be an
/// int32, as the description says, and is otherwise ignored (every request
/// is answered at once); `$select` is ignored (the whole node is always
/// returned); `$filter` is refused, since the agent cannot honour it.
#[derive(Debug, Deserialize)]
pub struct BatchQuery {
    #[serde(rename = "api-version")]
    api_version: Option<String>,
    timeout: Option<String>,
    maxresults: Option<String>,
    #[serde(rename = "$filter")]
    filter: Option<String>,
}

impl BatchQuery {
    /// The query, or why it is refused: one that does not parse (a
    /// repeated parameter, say) gets the JSON error body too.
    fn checked(query: Result<Query<BatchQuery>, QueryRejection>) -> Result<(), ApiError> {
        let Query(query) = query.map_err(|rejection| {
            ApiError::bad_request(ErrorCode::InvalidQueryParameterValue, rejection.body_text())
        })?;
        query.check()
    }

    fn check(&self) -> Result<(), ApiError> {
        if self.api_version.as_deref().is_none_or(str::is_empty) {
            return Err(ApiError::bad_request(
                ErrorCode::MissingRequiredQueryParameter,
                "the api-version query parameter is required",
            )
            .with_value("QueryParameterName", "api-version"));
        }
        for (name, value) in [("timeout", &self.timeout), ("maxresults", &self.maxresults)] {
            if let Some(value) = value
                && value.parse::<i32>().is_err()
            {
                return Err(ApiError::bad_request(
                    ErrorCode::InvalidQueryParameterValue,
                    format!("{name} {value:?} is not an int32"),
                )
                .with_value("QueryParameterName", name));
            }
        }
        if self.filter.is_some() {
            return Err(ApiError::bad_request(
                ErrorCode::InvalidQueryParameterValue,
                "$filter is not supported: this agent serves one node",
            )
            .with_value("QueryParameterName", "$filter"));
        }
        Ok(())
    }
}

/// Batch "Compute Node - Get": this node in Batch's `ComputeNode` shape.
#[utoipa::path(get, path = "/pools/{pool}/nodes/{node}", tag = "seed",
    params(
        ("pool" = String, Path, description = "the pool id (any: the agent has no pools)"),
        ("node" = String, Path, description = "this node's id"),
        ("api-version" = String, Query, min_length = 1, description = "the Batch API version, e.g. 2024-07-01.20.0"),
        ("timeout" = Option<i32>, Query, description = "accepted and ignored"),
        ("$select" = Option<String>, Query, description = "accepted and ignored: the whole node is returned")),
    responses(
        (status = 200, description = "the node", body = ComputeNode, headers(
            ("ETag" = String, description = "changes whenever the node does"),
            ("Last-Modified" = String, description = "when the node last changed state"))),
        (status = 400, description = "MissingRequiredQueryParameter (api-version), InvalidQueryParameterValue ($filter)", body = ErrorBody),
        (status = 404, description = "NodeNotFound: another node's id", body = ErrorBody)))]
pub async fn get_node(
    State(state): State<ApiState>,
    Path((pool, node)): Path<(String, String)>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    BatchQuery::checked(query)?;
    check_node(&state, &node)?;
    let compute_node = compute_node(&state, &headers, &pool);
    let mut response = Json(&compute_node).into_response();
    entity_headers(response.headers_mut(), &compute_node);
    Ok(response)
}

/// Batch "Compute Node - List": `{"value": [this node]}`.
#[utoipa::path(get, path = "/pools/{pool}/nodes", tag = "seed",
    params(
        ("pool" = String, Path, description = "the pool id (any: the agent has no pools)"),
        ("api-version" = String, Query, min_length = 1, description = "the Batch API version"),
        ("timeout" = Option<i32>, Query, description = "accepted and ignored"),
        ("maxresults" = Option<i32>, Query, description = "accepted and ignored: there is one node"),
        ("$select" = Option<String>, Query, description = "accepted and ignored: whole nodes are returned")),
    responses(
        (status = 200, description = "this node", body = ComputeNodeList),
        (status = 400, description = "MissingRequiredQueryParameter (api-version), InvalidQueryParameterValue ($filter)", body = ErrorBody)))]
pub async fn list_nodes(
    State(state): State<ApiState>,
    Path(pool): Path<String>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<ComputeNodeList>, ApiError> {
    BatchQuery::checked(query)?;
    Ok(Json(ComputeNodeList {
        value: vec![compute_node(&state, &headers, &pool)],
    }))
}

/// Batch "Compute Node - Reimage": reimages this node. The body is Batch's
/// `{"nodeReimageOption"}` (the API v1 `image`/`manifestUrl` are accepted
/// too); empty means `requeue` and the configured image.
#[utoipa::path(post, path = "/pools/{pool}/nodes/{node}/reimage", tag = "seed",
    params(
        ("pool" = String, Path, description = "the pool id (any: the agent has no pools)"),
        ("node" = String, Path, description = "this node's id"),
        ("api-version" = String, Query, min_length = 1, description = "the Batch API version, e.g. 2024-07-01.20.0"),
        ("timeout" = Option<i32>, Query, description = "accepted and ignored"),
        ("client-request-id" = Option<String>, Header, description = "retry key: the same value with the same body returns the same operation"),
        ("return-client-request-id" = Option<bool>, Header, description = "echo client-request-id in the response"),
        ("ocp-date" = Option<String>, Header, description = "accepted and ignored")),
    request_body(content = Option<ReimageRequest>, content_type = "application/json; odata=minimalmetadata"),
    responses(
        (status = 202, description = "accepted; the node's state is reimaging until the operation ends", headers(
            ("request-id" = String, description = "the operation id: GET /v1/operations/{id}"),
            ("ETag" = String, description = "the node's, after the change"),
            ("Last-Modified" = String, description = "the node's, after the change"),
            ("DataServiceId" = String, description = "the node's URL"),
            ("Location" = String, description = "/v1/operations/{id}"),
            ("client-request-id" = String, description = "with return-client-request-id: true"))),
        (status = 400, description = "MissingRequiredQueryParameter (api-version), an invalid body, MissingImage, InvalidImageUrl, ImageUrlNotAllowed", body = ErrorBody),
        (status = 404, description = "NodeNotFound: another node's id", body = ErrorBody),
        (status = 409, description = "NodeBeingReimaged and the other state conflicts, RequestIdConflict", body = ErrorBody)))]
pub async fn reimage(
    State(state): State<ApiState>,
    Path((pool, node)): Path<(String, String)>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<ReimageRequest>,
) -> Result<Response, ApiError> {
    BatchQuery::checked(query)?;
    check_node(&state, &node)?;
    let client_id = client_request_id(&headers)?;
    let operation = state.agent.reimage(request, client_id.as_deref()).await?;
    Ok(changed(
        &state,
        &headers,
        &pool,
        StatusCode::ACCEPTED,
        Some(&operation.id),
    ))
}

/// Batch "Compute Node - Reboot": reboots this node under
/// `nodeRebootOption` (the four reimage options).
#[utoipa::path(post, path = "/pools/{pool}/nodes/{node}/reboot", tag = "seed",
    params(
        ("pool" = String, Path, description = "the pool id (any: the agent has no pools)"),
        ("node" = String, Path, description = "this node's id"),
        ("api-version" = String, Query, min_length = 1, description = "the Batch API version"),
        ("timeout" = Option<i32>, Query, description = "accepted and ignored"),
        ("client-request-id" = Option<String>, Header, description = "retry key: the same value with the same body returns the same operation")),
    request_body(content = Option<RebootRequest>, content_type = "application/json; odata=minimalmetadata"),
    responses(
        (status = 202, description = "accepted; the node's state is rebooting until it is back", headers(
            ("request-id" = String, description = "the operation id: GET /v1/operations/{id}"),
            ("ETag" = String, description = "the node's, after the change"),
            ("Last-Modified" = String, description = "the node's, after the change"),
            ("DataServiceId" = String, description = "the node's URL"))),
        (status = 400, description = "MissingRequiredQueryParameter (api-version) or an invalid body", body = ErrorBody),
        (status = 404, description = "NodeNotFound: another node's id", body = ErrorBody),
        (status = 409, description = "the node's state refuses a reboot, RequestIdConflict", body = ErrorBody)))]
pub async fn reboot(
    State(state): State<ApiState>,
    Path((pool, node)): Path<(String, String)>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<RebootRequest>,
) -> Result<Response, ApiError> {
    BatchQuery::checked(query)?;
    check_node(&state, &node)?;
    let client_id = client_request_id(&headers)?;
    let operation = state.agent.reboot(request, client_id.as_deref()).await?;
    Ok(changed(
        &state,
        &headers,
        &pool,
        StatusCode::ACCEPTED,
        Some(&operation.id),
    ))
}

/// Batch "Compute Node - Disable Scheduling": no new tasks start; running
/// ones are requeued, terminated or left to complete
/// (`nodeDisableSchedulingOption`).
#[utoipa::path(post, path = "/pools/{pool}/nodes/{node}/disablescheduling", tag = "seed",
    params(
        ("pool" = String, Path, description = "the pool id (any: the agent has no pools)"),
        ("node" = String, Path, description = "this node's id"),
        ("api-version" = String, Query, min_length = 1, description = "the Batch API version"),
        ("timeout" = Option<i32>, Query, description = "accepted and ignored")),
    request_body(content = Option<DisableSchedulingRequest>, content_type = "application/json; odata=minimalmetadata"),
    responses(
        (status = 200, description = "scheduling disabled", headers(
            ("ETag" = String, description = "the node's, after the change"),
            ("Last-Modified" = String, description = "the node's, after the change"),
            ("DataServiceId" = String, description = "the node's URL"))),
        (status = 400, description = "MissingRequiredQueryParameter (api-version) or an invalid body", body = ErrorBody),
        (status = 404, description = "NodeNotFound: another node's id", body = ErrorBody)))]
pub async fn disable_scheduling(
    State(state): State<ApiState>,
    Path((pool, node)): Path<(String, String)>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    headers: HeaderMap,
    OptionalJsonBody(request): OptionalJsonBody<DisableSchedulingRequest>,
) -> Result<Response, ApiError> {
    BatchQuery::checked(query)?;
    check_node(&state, &node)?;
    state
        .agent
        .disable_scheduling(request.node_disable_scheduling_option)
        .await?;
    Ok(changed(&state, &headers, &pool, StatusCode::OK, None))
}

/// Batch "Compute Node - Enable Scheduling": tasks may start again.
#[utoipa::path(post, path = "/pools/{pool}/nodes/{node}/enablescheduling", tag = "seed",
    params(
        ("pool" = String, Path, description = "the pool id (any: the agent has no pools)"),
        ("node" = String, Path, description = "this node's id"),
        ("api-version" = String, Query, min_length = 1, description = "the Batch API version"),
        ("timeout" = Option<i32>, Query, description = "accepted and ignored")),
    responses(
        (status = 200, description = "scheduling enabled", headers(
            ("ETag" = String, description = "the node's, after the change"),
            ("Last-Modified" = String, description = "the node's, after the change"),
            ("DataServiceId" = String, description = "the node's URL"))),
        (status = 400, description = "MissingRequiredQueryParameter (api-version)", body = ErrorBody),
        (status = 404, description = "NodeNotFound: another node's id", body = ErrorBody)))]
pub async fn enable_scheduling(
    State(state): State<ApiState>,
    Path((pool, node)): Path<(String, String)>,
    query: Result<Query<BatchQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    BatchQuery::checked(query)?;
    check_node(&state, &node)?;
    state.agent.enable_scheduling().await?;
    Ok(changed(&state, &headers, &pool, StatusCode::OK, None))
}

/// 404 `NodeNotFound` unless `node` is this agent's id.
pub fn check_node(state: &ApiState, node: &str) -> Result<(), ApiError> {
    let id = state.agent.node_id();
    if node == id {
        Ok(())
    } else {
        Err(ApiError::not_found(
            ErrorCode::NodeNotFound,
            format!("this agent is node {id}, not {node}"),
        )
        .with_value("nodeId", node))
    }
}

/// This node as Batch describes a compute node. A reimage keeps the node
/// `reimaging` through its reboot: a Batch client polls until the state
/// changes and must not take the reboot for the end.
fn compute_node(state: &ApiState, headers: &HeaderMap, pool: &str) -> ComputeNode {
    let agent = &state.agent;
    let node = agent.node();
    let reimaging = agent
        .current_operation()
        .is_some_and(|op| op.kind == OperationKind::Reimage);
    let running = node.running_tasks_count;
    ComputeNode {
        url: node_url(state, headers, pool, &node.id),
        id: node.id,
        state: if reimaging {
            NodeState::Reimaging
        } else {
            node.state
        },
        scheduling_state: node.scheduling_state,
        state_transition_time: node.state_transition_time,
        last_boot_time: node.last_boot_time,
        total_tasks_run: node.total_tasks_run,
        running_tasks_count: running,
        running_task_slots_count: running,
        total_tasks_succeeded: agent.tasks.total_tasks_succeeded(),
        is_dedicated: true,
        errors: node.errors,
        node_agent_info: NodeAgentInfo {
            version: node.agent_version,
            last_update_time: agent.started_at(),
        },
    }
}

/// `{scheme}://{host}/pools/{pool}/nodes/{node}`, the host as the caller
/// named it.
fn node_url(state: &ApiState, headers: &HeaderMap, pool: &str, node: &str) -> String {
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("{}://{host}/pools/{pool}/nodes/{node}", state.scheme)
}

/// The answer to a request that changed the node: its status and the
/// node's entity headers after the change, and for an operation its id.
fn changed(
    state: &ApiState,
    headers: &HeaderMap,
    pool: &str,
    status: StatusCode,
    operation_id: Option<&str>,
) -> Response {
    let node = compute_node(state, headers, pool);
    let mut response = status.into_response();
    let out = response.headers_mut();
    entity_headers(out, &node);
    insert_header(out, DATA_SERVICE_ID, &node.url);
    if let Some(id) = operation_id {
        insert_header(out, REQUEST_ID, id);
        insert_header(out, LOCATION, &format!("/v1/operations/{id}"));
    }
    response
}

/// `ETag` (a digest of the node as shown, so it changes whenever anything
/// shown does) and `Last-Modified` (its last state change, as an HTTP date).
fn entity_headers(headers: &mut HeaderMap, node: &ComputeNode) {
    let json = serde_json::to_vec(node).unwrap_or_default();
    let digest = Sha256::digest(&json);
    insert_header(
        headers,
        ETAG,
        &format!("\"0x{}\"", hex::encode(&digest[..8])),
    );
    let modified = jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&node.state_transition_time);
    if let Ok(modified) = modified {
        insert_header(headers, LAST_MODIFIED, &modified);
    }
}
