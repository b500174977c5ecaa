//! Seed-compatible routes of Cloud Services (Service Management): "Reimage
//! Role Instance" and "Get Operation Status", answered in their own XML
//! shapes and backed by the same operations as API v1. The Batch routes
//! are in [`crate::api::batch`].

use crate::api::error::ApiError;
use crate::api::{ApiState, REQUEST_ID, client_request_id, insert_header};
use crate::ops::Refusal;
use crate::pattern::Pattern;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use reimage_protocol::ErrorCode;
use reimage_protocol::api::{OperationStatus, ReimageRequest};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Service Management's request id header, on every one of its responses.
pub const MS_REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-request-id");
/// Service Management's API version header, required on every request.
pub const MS_VERSION: HeaderName = HeaderName::from_static("x-ms-version");
/// The `x-ms-version` values a Service Management operation takes: a date
/// (YYYY-MM-DD, months 01-12, days 01-31; the calendar is not consulted)
/// on or after the version that introduced the operation.
pub struct MsVersion {
    /// The oldest version with the operation.
    pub minimum: &'static str,
    /// Exactly the accepted values, for the API description.
    pub accepted: Pattern,
}

/// A date in `x-ms-version`'s shape, whatever its age.
static MS_VERSION_SHAPE: Pattern =
    Pattern::new("^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])$");

/// Reimage Role Instance: 2010-10-28 or later.
pub static MS_VERSION_REIMAGE: MsVersion = MsVersion {
    minimum: "2010-10-28",
    accepted: Pattern::new(
        "^(?:2010-(?:10-(?:2[89]|3[01])|1[12]-(?:0[1-9]|[12][0-9]|3[01]))\
         |(?:201[1-9]|20[2-9][0-9]|2[1-9][0-9]{2}|[3-9][0-9]{3})\
         -(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01]))$",
    ),
};

/// Get Operation Status: 2009-10-01 or later.
pub static MS_VERSION_OPERATION_STATUS: MsVersion = MsVersion {
    minimum: "2009-10-01",
    accepted: Pattern::new(
        "^(?:2009-1[0-2]-(?:0[1-9]|[12][0-9]|3[01])\
         |(?:20[1-9][0-9]|2[1-9][0-9]{2}|[3-9][0-9]{3})\
         -(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01]))$",
    ),
};

/// The deployment slots, in any letter case.
pub static SLOT: Pattern =
    Pattern::new("^(?:[pP][rR][oO][dD][uU][cC][tT][iI][oO][nN]|[sS][tT][aA][gG][iI][nN][gG])$");

/// The one `comp` of the role instance routes.
pub static COMP: Pattern = Pattern::new("^reimage$");

/// The versions the Service Management route `route` takes.
pub fn ms_version_of(route: &str) -> &'static MsVersion {
    if route.contains("/roleinstances/") {
        &MS_VERSION_REIMAGE
    } else {
        &MS_VERSION_OPERATION_STATUS
    }
}
/// Service Management's XML namespace.
pub const MS_NAMESPACE: &str = "http://schemas.microsoft.com/windowsazure";
/// Schema name of the Service Management error body in the API description.
pub const XML_ERROR: &str = "ServiceManagementError";

/// True for the route templates of the Service Management routes (which
/// answer XML), all rooted at the subscription id.
pub fn is_service_management(route: &str) -> bool {
    route.starts_with("/{subscription}/")
}

/// The role instance routes' query string: `comp=reimage`. As an
/// extractor it refuses anything else, a query string that does not parse
/// included, with the XML error body.
#[derive(Debug, Deserialize)]
pub struct RoleInstanceQuery {
    comp: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for RoleInstanceQuery {
    type Rejection = XmlError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, XmlError> {
        let query = Query::<RoleInstanceQuery>::from_request_parts(parts, state)
            .await
            .ok()
            .map(|Query(query)| query)
            .filter(|query| {
                query
                    .comp
                    .as_deref()
                    .is_some_and(|comp| COMP.is_match(comp))
            });
        query.ok_or_else(|| {
            XmlError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "role instances support only comp=reimage; add ?comp=reimage to the URI",
            )
        })
    }
}

/// Service Management "Reimage Role Instance" by deployment name: reimages
/// this node when `role` is its id. No body.
#[utoipa::path(post, path = "/{subscription}/services/hostedservices/{service}/deployments/{deployment}/roleinstances/{role}", tag = "seed",
    params(
        ("subscription" = String, Path, description = "any subscription id"),
        ("service" = String, Path, description = "any cloud service name"),
        ("deployment" = String, Path, description = "any deployment name"),
        ("role" = String, Path, description = "this node's id"),
        ("comp" = String, Query, description = "must be `reimage`"),
        ("x-ms-version" = String, Header, description = "2010-10-28 or later")),
    responses(
        (status = 200, description = "accepted; follow it with GET /{subscription}/operations/{x-ms-request-id}", headers(
            ("x-ms-request-id" = String, description = "the operation id"))),
        (status = 400, description = "comp is not reimage, or x-ms-version is missing, malformed or older than 2010-10-28",
            body = ServiceManagementError, content_type = "application/xml"),
        (status = 404, description = "ResourceNotFound: another role instance", body = ServiceManagementError, content_type = "application/xml"),
        (status = 409, description = "the node's state refuses a reimage", body = ServiceManagementError, content_type = "application/xml")))]
pub async fn role_instance(
    State(state): State<ApiState>,
    Path((_subscription, _service, _deployment, role)): Path<(String, String, String, String)>,
    _query: RoleInstanceQuery,
    headers: HeaderMap,
) -> Result<Response, XmlError> {
    reimage_role_instance(&state, &role, &headers).await
}

/// Service Management "Reimage Role Instance" by deployment slot
/// (`production` or `staging`): the same as by deployment name.
#[utoipa::path(post, path = "/{subscription}/services/hostedservices/{service}/deploymentslots/{slot}/roleinstances/{role}", tag = "seed",
    params(
        ("subscription" = String, Path, description = "any subscription id"),
        ("service" = String, Path, description = "any cloud service name"),
        ("slot" = String, Path, description = "`production` or `staging`"),
        ("role" = String, Path, description = "this node's id"),
        ("comp" = String, Query, description = "must be `reimage`"),
        ("x-ms-version" = String, Header, description = "2010-10-28 or later")),
    responses(
        (status = 200, description = "accepted; follow it with GET /{subscription}/operations/{x-ms-request-id}", headers(
            ("x-ms-request-id" = String, description = "the operation id"))),
        (status = 400, description = "comp is not reimage, x-ms-version is missing, malformed or too old, or the slot is not production or staging",
            body = ServiceManagementError, content_type = "application/xml"),
        (status = 404, description = "ResourceNotFound: another role instance", body = ServiceManagementError, content_type = "application/xml"),
        (status = 409, description = "the node's state refuses a reimage", body = ServiceManagementError, content_type = "application/xml")))]
pub async fn role_instance_by_slot(
    State(state): State<ApiState>,
    Path((_subscription, _service, slot, role)): Path<(String, String, String, String)>,
    _query: RoleInstanceQuery,
    headers: HeaderMap,
) -> Result<Response, XmlError> {
    if !SLOT.is_match(&slot) {
        return Err(XmlError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            &format!("the deployment slot must be production or staging, not {slot}"),
        ));
    }
    reimage_role_instance(&state, &role, &headers).await
}

async fn reimage_role_instance(
    state: &ApiState,
    role: &str,
    headers: &HeaderMap,
) -> Result<Response, XmlError> {
    check_ms_version(headers, &MS_VERSION_REIMAGE)?;
    if role != state.agent.node_id() {
        return Err(XmlError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ResourceNotFound,
            &format!("no role instance {role}"),
        ));
    }
    let client_id = client_request_id(headers).map_err(XmlError::from)?;
    let operation = state
        .agent
        .reimage(ReimageRequest::default(), client_id.as_deref())
        .await
        .map_err(XmlError::from)?;
    let mut response = StatusCode::OK.into_response();
    insert_header(response.headers_mut(), MS_REQUEST_ID, &operation.id);
    insert_header(response.headers_mut(), REQUEST_ID, &operation.id);
    Ok(response)
}

/// Service Management "Get Operation Status": the XML `Operation` for the
/// `x-ms-request-id` of a role instance reimage (or any operation id).
#[utoipa::path(get, path = "/{subscription}/operations/{request_id}", tag = "seed",
    params(
        ("subscription" = String, Path, description = "any subscription id"),
        ("request_id" = String, Path, description = "the x-ms-request-id of the reimage"),
        ("x-ms-version" = String, Header, description = "2009-10-01 or later")),
    responses(
        (status = 200, description = "the operation", body = ServiceManagementOperation, content_type = "application/xml",
            headers(("x-ms-request-id" = String, description = "this request's id"))),
        (status = 400, description = "x-ms-version is missing, malformed or older than 2009-10-01",
            body = ServiceManagementError, content_type = "application/xml"),
        (status = 404, description = "ResourceNotFound: no such operation", body = ServiceManagementError, content_type = "application/xml")))]
pub async fn operation_status(
    State(state): State<ApiState>,
    Path((_subscription, request_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, XmlError> {
    check_ms_version(&headers, &MS_VERSION_OPERATION_STATUS)?;
    let operation = state.agent.operation(&request_id).ok_or_else(|| {
        XmlError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::ResourceNotFound,
            &format!("no operation {request_id}"),
        )
    })?;
    let body = ServiceManagementOperation {
        id: operation.id,
        status: operation.status,
        // Only a finished operation has the status code it ended with.
        http_status_code: match operation.status {
            OperationStatus::InProgress => None,
            OperationStatus::Succeeded => Some(200),
            OperationStatus::Failed => Some(500),
        },
        error: operation.error.map(|e| ServiceManagementError {
            code: e.code,
            message: e.message,
        }),
    };
    let mut response = (
        [(CONTENT_TYPE, "application/xml; charset=utf-8")],
        body.to_xml(),
    )
        .into_response();
    insert_header(
        response.headers_mut(),
        MS_REQUEST_ID,
        &crate::ops::new_request_id(),
    );
    Ok(response)
}

/// Service Management's `Operation` body (namespace
/// `http://schemas.microsoft.com/windowsazure`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
#[schema(xml(
    name = "Operation",
    namespace = "http://schemas.microsoft.com/windowsazure"
))]
pub struct ServiceManagementOperation {
    /// The request id the operation was started with.
    #[serde(rename = "ID")]
    pub id: String,
    pub status: OperationStatus,
    /// Set once the operation ended: 200 when it succeeded, 500 when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status_code: Option<u16>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ServiceManagementError>,
}

impl ServiceManagementOperation {
    fn to_xml(&self) -> String {
        let status = self.status.as_str();
        let mut xml = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Operation xmlns=\"{MS_NAMESPACE}\" xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">\n  <ID>{}</ID>\n  <Status>{status}</Status>\n",
            escape(&self.id)
        );
        if let Some(code) = self.http_status_code {
            xml.push_str(&format!("  <HttpStatusCode>{code}</HttpStatusCode>\n"));
        }
        if let Some(error) = &self.error {
            xml.push_str(&format!(
                "  <Error>\n    <Code>{}</Code>\n    <Message>{}</Message>\n  </Error>\n",
                escape(error.code.as_str()),
                escape(&error.message)
            ));
        }
        xml.push_str("</Operation>\n");
        xml
    }
}

/// Service Management's error body: `<Error><Code/><Message/></Error>`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "PascalCase")]
#[schema(xml(
    name = "Error",
    namespace = "http://schemas.microsoft.com/windowsazure"
))]
pub struct ServiceManagementError {
    pub code: ErrorCode,
    pub message: String,
}

/// Refuses a request whose `x-ms-version` is missing, not a date, or older
/// than the operation.
fn check_ms_version(headers: &HeaderMap, version: &MsVersion) -> Result<(), XmlError> {
    let minimum = version.minimum;
    let Some(value) = headers.get(&MS_VERSION) else {
        return Err(XmlError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MissingOrInvalidRequiredHeader,
            &format!(
                "the x-ms-version header is required: send a Service Management version of {minimum} or later"
            ),
        ));
    };
    let text = value.to_str().unwrap_or_default();
    if !MS_VERSION_SHAPE.is_match(text) {
        return Err(XmlError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidHeader,
            &format!(
                "x-ms-version {text:?} is not a version: send a date such as {minimum} (YYYY-MM-DD)"
            ),
        ));
    }
    // Dates of this shape compare correctly as strings.
    if text < minimum {
        return Err(XmlError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidHeader,
            &format!("x-ms-version {text} is too old: this operation needs {minimum} or later"),
        ));
    }
    Ok(())
}

/// XML text escaping for element content.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// A Service Management failure: the status and the XML error body, with an
/// `x-ms-request-id` like every Service Management response.
#[derive(Debug)]
pub struct XmlError {
    status: StatusCode,
    body: ServiceManagementError,
}

impl XmlError {
    fn new(status: StatusCode, code: ErrorCode, message: &str) -> Self {
        XmlError {
            status,
            body: ServiceManagementError {
                code,
                message: message.to_string(),
            },
        }
    }
}

impl From<Refusal> for XmlError {
    fn from(refusal: Refusal) -> Self {
        ApiError::from(refusal).into()
    }
}

impl From<ApiError> for XmlError {
    fn from(err: ApiError) -> Self {
        XmlError {
            status: err.status,
            body: ServiceManagementError {
                code: err.body.code,
                message: err.body.message.value,
            },
        }
    }
}

impl IntoResponse for XmlError {
    fn into_response(self) -> Response {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Error xmlns=\"{MS_NAMESPACE}\" xmlns:i=\"http://www.w3.org/2001/XMLSchema-instance\">\n  <Code>{}</Code>\n  <Message>{}</Message>\n</Error>\n",
            escape(self.body.code.as_str()),
            escape(&self.body.message)
        );
        let mut response = (
            self.status,
            [(CONTENT_TYPE, "application/xml; charset=utf-8")],
            xml,
        )
            .into_response();
        insert_header(
            response.headers_mut(),
            MS_REQUEST_ID,
            &crate::ops::new_request_id(),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_be_dates_at_or_after_the_first_with_reimage() {
        let version = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(MS_VERSION, v.parse().expect("header"));
            check_ms_version(&headers, &MS_VERSION_REIMAGE)
        };
        assert!(version("2010-10-28").is_ok());
        assert!(version("2024-11-01").is_ok());
        assert!(version("2009-10-01").is_err());
        assert!(version("2010-10-2").is_err());
        assert!(version("latest").is_err());
        assert!(check_ms_version(&HeaderMap::new(), &MS_VERSION_REIMAGE).is_err());
    }

    /// Every date-like text from 2008 to 2012 and a few far ones: the
    /// description's pattern accepts exactly what the check accepts.
    #[test]
    fn the_described_versions_are_the_checked_ones() {
        let mut texts = Vec::new();
        for year in (2008..=2012).chain([2099, 2100, 9999, 1999, 0]) {
            for month in 0..=13 {
                for day in [0, 1, 9, 10, 19, 27, 28, 29, 30, 31, 32] {
                    texts.push(format!("{year:04}-{month:02}-{day:02}"));
                }
            }
        }
        texts.extend(["2011-1-01", "20110-01-01", "2011-01-01 ", "latest"].map(String::from));
        for version in [&MS_VERSION_REIMAGE, &MS_VERSION_OPERATION_STATUS] {
            for text in &texts {
                let mut headers = HeaderMap::new();
                headers.insert(MS_VERSION, text.parse().expect("header"));
                assert_eq!(
                    version.accepted.is_match(text),
                    check_ms_version(&headers, version).is_ok(),
                    "{text} against {}",
                    version.minimum
                );
            }
        }
    }

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(escape("a<b & 'c'"), "a&lt;b &amp; &apos;c&apos;");
    }

    #[test]
    fn only_subscription_rooted_routes_are_service_management() {
        assert!(is_service_management(
            "/{subscription}/operations/{request_id}"
        ));
        assert!(!is_service_management("/v1/operations/{id}"));
        assert!(!is_service_management("/pools/{pool}/nodes/{node}/reimage"));
    }
}
