//! Bearer tokens, hashed in the config and compared in constant time, and
//! the role each route needs.

use crate::api::error::ApiError;
use crate::config::{Role, TokenConfig};
use axum::http::{HeaderMap, Method, StatusCode};

/// The role a request needs: reading needs `reader`; tasks and scheduling
/// `operator`; reimage and reboot `admin`. `None` for the open health check.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if path == "/healthz" {
        return None;
    }
    if method == Method::GET || method == Method::HEAD {
        return Some(Role::Reader);
    }
    let operator = path.starts_with("/v1/tasks")
        || path == "/v1/node/disablescheduling"
        || path == "/v1/node/enablescheduling";
    Some(if operator {
        Role::Operator
    } else {
        Role::Admin
    })
}

/// Checks the request's bearer token against `tokens` for `needed`.
pub fn authorize(
    tokens: &[TokenConfig],
    headers: &HeaderMap,
    needed: Role,
) -> Result<Role, ApiError> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "AuthenticationFailed",
                "send a bearer token: Authorization: Bearer <token>",
            )
        })?;
    let role = crate::config::role_for_token(tokens, presented).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AuthenticationFailed",
            "the token is not recognised",
        )
    })?;
    if role < needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "InsufficientPermissions",
            format!("this request needs the {needed:?} role; the token has {role:?}")
                .to_lowercase(),
        ));
    }
    Ok(role)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_roles_of_the_contract() {
        assert_eq!(required_role(&Method::GET, "/healthz"), None);
        assert_eq!(required_role(&Method::GET, "/v1/node"), Some(Role::Reader));
        assert_eq!(
            required_role(&Method::POST, "/v1/tasks"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role(&Method::DELETE, "/v1/tasks/t1"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/node/disablescheduling"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/node/reimage"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/node/reboot"),
            Some(Role::Admin)
        );
    }
}
