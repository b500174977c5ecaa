//! The OpenAPI description of the API. Paths, bodies and responses come from
//! the handlers' `#[utoipa::path]` and the protocol types' `ToSchema`;
//! [`complete`] then adds what every route shares, from the same code that
//! enforces it: the role each route needs ([`auth::required_role`]), the
//! `401`/`403` of the token check and the `400`/`413`/`415` of JSON bodies.

use crate::api::{auth, seed};
use reimage_protocol::api::ErrorBody;
use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, PathItem};
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

/// `paths` (from the router) with everything the routes share added.
pub fn complete(paths: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
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
        }
    }
    doc
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
        let doc = serde_json::to_value(crate::api::description()).expect("serialises");
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
        let doc = serde_json::to_value(crate::api::description()).expect("serialises");
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
        let doc = serde_json::to_value(crate::api::description()).expect("serialises");
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
    #[ignore = "prints the description"]
    fn print() {
        println!(
            "{}",
            serde_json::to_string_pretty(&crate::api::description()).expect("serialises")
        );
    }
}
