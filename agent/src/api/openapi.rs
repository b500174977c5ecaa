//! The OpenAPI description of the API. Paths, bodies and responses come from
//! the handlers' `#[utoipa::path]` and the protocol types' `ToSchema`;
//! [`complete`] then adds what every route shares, from the same code that
//! enforces it: the role each route needs ([`auth::required_role`]), the
//! `401`/`403` of the token check and the `400`/`413`/`415` of JSON bodies.

use crate::api::{CLIENT_REQUEST_ID_PATTERN, auth, seed};
use crate::duration::{DURATION_PATTERN, ZERO_DURATION_PATTERN};
use crate::image::source::API_URL_PATTERN;
use crate::pattern::Pattern;
use crate::tasks::record::{
    COMMAND_LINE_PATTERN, ENV_NAME_PATTERN, ENV_VALUE_PATTERN, ID_PATTERN as TASK_ID_PATTERN,
};
use reimage_protocol::api::ErrorBody;
use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};

/// Name of the bearer-token security scheme.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "reimage-agent API",
        description = "Reimages this node: streams, verifies and writes an OS image while keeping \
            its local-storage partitions. Every route but /healthz needs `Authorization: Bearer \
            <token>` with the role its description names (reader < operator < admin). When the \
            agent is configured with `[api] client_ca`, the TLS handshake also needs a client \
            certificate that CA signed; the token is required on top of it. Errors use one body: \
            ErrorBody (XML `<Error>` on the Service Management routes)."
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "agent", description = "health, metrics and this description"),
        (name = "node", description = "the node: reimage, reboot, scheduling"),
        (name = "operations", description = "reimage, reboot and prefetch operations"),
        (name = "tasks", description = "local tasks and their retained files"),
        (name = "images", description = "images prefetched into the staging area"),
        (name = "seed", description = "Azure Batch and Cloud Services compatible routes"),
    )
)]
struct ApiDoc;

/// `paths` (from the router) with everything the routes share added, as
/// the JSON `/v1/openapi.json` serves.
pub fn complete(paths: utoipa::openapi::OpenApi) -> serde_json::Value {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.merge(paths);
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("a token configured in [[api.tokens]] by its SHA-256"))
                    .build(),
            ),
        );
    for (path, item) in doc.paths.paths.iter_mut() {
        let xml = seed::is_service_management(path);
        for (method, operation) in operations(item) {
            add_shared(path, &method, xml, operation);
            constrain_parameters(path, operation);
        }
    }
    if let Some(components) = doc.components.as_mut() {
        for (schema, field, pattern) in field_patterns() {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(schema)
                && let Some(RefOr::T(Schema::Object(property))) = object.properties.get_mut(field)
            {
                property.pattern = Some(pattern.source().to_string());
            }
        }
    }
    let mut json = serde_json::to_value(&doc).unwrap_or_else(|err| {
        // Only a bug in a schema can get here; the API itself must still serve.
        tracing::error!(%err, "cannot serialise the OpenAPI description");
        serde_json::Value::Null
    });
    forbid_image_with_manifest(&mut json);
    forbid_zero_wall_clock(&mut json);
    json
}

/// A task's `maxWallClockTime` cannot be zero (`tasks::record` refuses
/// it: a task needs some time to run).
fn forbid_zero_wall_clock(json: &mut serde_json::Value) {
    if let Some(field) = json
        .pointer_mut("/components/schemas/TaskConstraints/properties/maxWallClockTime")
        .and_then(serde_json::Value::as_object_mut)
    {
        field.insert(
            "not".into(),
            serde_json::json!({"type": "string", "pattern": ZERO_DURATION_PATTERN.source()}),
        );
    }
}

/// A reimage or prefetch names its image inline or by manifest, not both
/// (`ops::image_choice` refuses that): JSON Schema's `not`, which the
/// typed description has no field for.
fn forbid_image_with_manifest(json: &mut serde_json::Value) {
    for name in ["ReimageRequest", "PrefetchRequest"] {
        let Some(schema) = json
            .pointer_mut(&format!("/components/schemas/{name}"))
            .and_then(serde_json::Value::as_object_mut)
        else {
            continue;
        };
        schema.insert(
            "not".into(),
            serde_json::json!({
                "required": ["image", "manifestUrl"],
                "properties": {
                    "image": {"type": "object"},
                    "manifestUrl": {"type": "string"},
                },
            }),
        );
    }
}

/// The fields whose shape the agent checks with a pattern (the derive
/// cannot see them): schema, field, the pattern the check uses.
fn field_patterns() -> [(&'static str, &'static str, &'static Pattern); 9] {
    [
        ("AddTaskRequest", "id", &TASK_ID_PATTERN),
        ("AddTaskRequest", "commandLine", &COMMAND_LINE_PATTERN),
        ("EnvironmentSetting", "name", &ENV_NAME_PATTERN),
        ("EnvironmentSetting", "value", &ENV_VALUE_PATTERN),
        ("TaskConstraints", "maxWallClockTime", &DURATION_PATTERN),
        ("TaskConstraints", "retentionTime", &DURATION_PATTERN),
        ("ImageSpec", "url", &API_URL_PATTERN),
        ("ReimageRequest", "manifestUrl", &API_URL_PATTERN),
        ("PrefetchRequest", "manifestUrl", &API_URL_PATTERN),
    ]
}

/// Gives the parameters the agent checks by pattern that pattern, and
/// `return-client-request-id` its one type.
fn constrain_parameters(path: &str, operation: &mut Operation) {
    for parameter in operation.parameters.iter_mut().flatten() {
        let RefOr::T(parameter) = parameter else {
            continue;
        };
        if parameter.name == "return-client-request-id" {
            // A header is absent or has a value: `true` or `false`, never
            // `null` (which the derive adds for an optional boolean).
            if let Some(RefOr::T(Schema::Object(schema))) = parameter.schema.as_mut() {
                schema.schema_type = SchemaType::Type(Type::Boolean);
            }
            continue;
        }
        let pattern = match parameter.name.as_str() {
            "client-request-id" => &CLIENT_REQUEST_ID_PATTERN,
            "x-ms-version" => &seed::ms_version_of(path).accepted,
            "slot" => &seed::SLOT,
            "comp" => &seed::COMP,
            _ => continue,
        };
        if let Some(RefOr::T(Schema::Object(schema))) = parameter.schema.as_mut() {
            schema.pattern = Some(pattern.source().to_string());
        }
    }
}

/// The operations of a path item with their HTTP methods.
fn operations(item: &mut PathItem) -> Vec<(axum::http::Method, &mut Operation)> {
    use axum::http::Method;
    [
        (Method::GET, item.get.as_mut()),
        (Method::PUT, item.put.as_mut()),
        (Method::POST, item.post.as_mut()),
        (Method::DELETE, item.delete.as_mut()),
        (Method::PATCH, item.patch.as_mut()),
        (Method::HEAD, item.head.as_mut()),
        (Method::OPTIONS, item.options.as_mut()),
    ]
    .into_iter()
    .filter_map(|(method, operation)| operation.map(|op| (method, op)))
    .collect()
}

fn add_shared(path: &str, method: &axum::http::Method, xml: bool, operation: &mut Operation) {
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_string())
            .or_insert_with(|| error_response(description, xml));
    };
    match auth::required_role(method, path) {
        None => operation.security = Some(Vec::new()),
        Some(role) => {
            operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            add(
                "401",
                "AuthenticationFailed: no bearer token, or an unknown one",
            );
            add(
                "403",
                "InsufficientPermissions: the token's role is too low",
            );
            let role = format!("{role:?}").to_lowercase();
            let note = format!("Needs the `{role}` role.");
            operation.description = Some(match operation.description.take() {
                Some(text) if !text.is_empty() => format!("{text}\n\n{note}"),
                _ => note,
            });
        }
    }
    let takes_request_id = operation
        .parameters
        .iter()
        .flatten()
        .any(|p| matches!(p, RefOr::T(p) if p.name == "client-request-id"));
    if takes_request_id {
        add(
            "409",
            "RequestIdConflict: the client-request-id was sent before with another request",
        );
    }
    if operation.request_body.is_some() {
        add("400", "InvalidRequestBody: the body does not parse");
        add("413", "RequestBodyTooLarge");
        add("415", "UnsupportedMediaType: send application/json");
    }
}

/// An error response: the JSON [`ErrorBody`], or the Service Management XML
/// `<Error><Code/><Message/></Error>`.
fn error_response(description: &str, xml: bool) -> RefOr<Response> {
    let content = if xml {
        (
            "application/xml",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(Ref::from_schema_name(seed::XML_ERROR))))
                .build(),
        )
    } else {
        (
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody"))))
                .build(),
        )
    };
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(content.0, content.1)
            .build(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn refs(value: &Value, found: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(target)) = map.get("$ref") {
                    found.push(target.clone());
                }
                map.values().for_each(|v| refs(v, found));
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves_to_a_component() {
        let doc = crate::api::description();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for target in found {
            let name = target
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {target}"));
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{target} is referenced but not described"
            );
        }
    }

    #[test]
    fn every_route_but_the_health_check_needs_a_token() {
        let doc = crate::api::description();
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        let paths = doc["paths"].as_object().expect("paths");
        for (path, item) in paths {
            for (method, operation) in item.as_object().expect("path item") {
                let security = &operation["security"];
                if path == "/healthz" {
                    assert_eq!(security, &serde_json::json!([]), "{method} {path}");
                    continue;
                }
                assert_eq!(
                    security,
                    &serde_json::json!([{ BEARER: [] }]),
                    "{method} {path}"
                );
                for status in ["401", "403"] {
                    assert!(
                        operation["responses"].get(status).is_some(),
                        "{method} {path} lacks {status}"
                    );
                }
            }
        }
    }

    #[test]
    fn service_management_errors_are_described_as_xml() {
        let doc = crate::api::description();
        let unauthorized = &doc["paths"]["/{subscription}/operations/{request_id}"]["get"]["responses"]
            ["401"]["content"];
        assert!(
            unauthorized.get("application/xml").is_some(),
            "{unauthorized}"
        );
        let unauthorized = &doc["paths"]["/v1/node"]["get"]["responses"]["401"]["content"];
        assert!(
            unauthorized.get("application/json").is_some(),
            "{unauthorized}"
        );
    }

    #[test]
    fn checked_fields_and_parameters_carry_their_patterns() {
        let doc = crate::api::description();
        let schemas = &doc["components"]["schemas"];
        for (schema, field, pattern) in field_patterns() {
            assert_eq!(
                schemas[schema]["properties"][field]["pattern"],
                pattern.source(),
                "{schema}.{field}"
            );
        }
        let parameters = |path: &str, method: &str| {
            doc["paths"][path][method]["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let pattern_of = |path: &str, method: &str, name: &str| {
            parameters(path, method)
                .iter()
                .find(|p| p["name"] == name)
                .map(|p| p["schema"]["pattern"].clone())
                .unwrap_or_else(|| panic!("{method} {path} has no {name}"))
        };
        assert_eq!(
            pattern_of("/v1/node/reimage", "post", "client-request-id"),
            CLIENT_REQUEST_ID_PATTERN.source()
        );
        assert_eq!(
            pattern_of(
                "/{subscription}/operations/{request_id}",
                "get",
                "x-ms-version"
            ),
            seed::MS_VERSION_OPERATION_STATUS.accepted.source()
        );
        let by_slot = "/{subscription}/services/hostedservices/{service}/deploymentslots/{slot}/roleinstances/{role}";
        assert_eq!(
            pattern_of(by_slot, "post", "x-ms-version"),
            seed::MS_VERSION_REIMAGE.accepted.source()
        );
        assert_eq!(pattern_of(by_slot, "post", "slot"), seed::SLOT.source());
        assert_eq!(pattern_of(by_slot, "post", "comp"), seed::COMP.source());
    }

    #[test]
    #[ignore = "prints the description"]
    fn print() {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::api::description()).expect("serialises")
        );
    }
}
