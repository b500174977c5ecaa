//! Bearer tokens, hashed in the config and compared in constant time, the
//! roles they carry, and the role each route needs.

use crate::api::error::ApiError;
use axum::http::{HeaderMap, Method, StatusCode};
use reimage_protocol::ErrorCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// What a caller may do; each role includes the ones below it
/// (`Admin > Operator > Reader`), so a route checks `role >= needed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET routes.
    Reader,
    /// Tasks and scheduling, plus everything a reader may do.
    Operator,
    /// Reimage and reboot, plus everything an operator may do.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Reader, Role::Operator, Role::Admin];

    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// A non-zero number per role, so [`role_for_token`] can select one
    /// without branching on a secret comparison.
    fn rank(self) -> u8 {
        match self {
            Role::Reader => 1,
            Role::Operator => 2,
            Role::Admin => 3,
        }
    }

    fn from_rank(rank: u8) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.rank() == rank)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured bearer token. Only its hash is kept, so the config file
/// never holds a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// SHA-256 of the token as presented in `Authorization: Bearer <token>`.
    pub sha256: [u8; 32],
    /// What the token may do.
    pub role: Role,
}

impl Token {
    /// The entry for the token `secret`.
    pub fn for_secret(secret: &str, role: Role) -> Token {
        Token {
            sha256: Sha256::digest(secret.as_bytes()).into(),
            role,
        }
    }
}

/// The role of the token a caller presented, or `None`. The token is hashed
/// and compared with every configured hash in constant time, without
/// stopping at a match, so timing tells nothing about which hash matched.
pub fn role_for_token(tokens: &[Token], presented: &str) -> Option<Role> {
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let mut rank = 0u8;
    for token in tokens {
        rank.conditional_assign(&token.role.rank(), digest.ct_eq(&token.sha256));
    }
    Role::from_rank(rank)
}

/// The role a request needs: reading needs `reader`; tasks and scheduling
/// `operator`; reimage, reboot and the staged images (prefetch, delete)
/// `admin` (the Batch routes as their v1 twins). `None` for the open health check.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if path == "/healthz" {
        return None;
    }
    if method == Method::GET || method == Method::HEAD {
        return Some(Role::Reader);
    }
    let scheduling = path.ends_with("/disablescheduling") || path.ends_with("/enablescheduling");
    let operator = path.starts_with("/v1/tasks")
        || (scheduling && (path.starts_with("/v1/node/") || path.starts_with("/pools/")));
    Some(if operator {
        Role::Operator
    } else {
        Role::Admin
    })
}

/// Checks the request's bearer token against `tokens` for `needed`.
pub fn authorize(tokens: &[Token], headers: &HeaderMap, needed: Role) -> Result<Role, ApiError> {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::AuthenticationFailed,
                "send a bearer token: Authorization: Bearer <token>",
            )
        })?;
    let role = role_for_token(tokens, presented).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::AuthenticationFailed,
            "the token is not recognised",
        )
    })?;
    if role < needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::InsufficientPermissions,
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
    fn tokens_map_to_their_roles() {
        let tokens = [
            Token::for_secret("r", Role::Reader),
            Token::for_secret("o", Role::Operator),
            Token::for_secret("a", Role::Admin),
        ];
        assert_eq!(role_for_token(&tokens, "r"), Some(Role::Reader));
        assert_eq!(role_for_token(&tokens, "o"), Some(Role::Operator));
        assert_eq!(role_for_token(&tokens, "a"), Some(Role::Admin));
        assert_eq!(role_for_token(&tokens, "x"), None);
        assert_eq!(role_for_token(&tokens, ""), None);
        assert_eq!(role_for_token(&[], "a"), None);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Reader);
    }

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
        for (path, role) in [
            ("/pools/p/nodes/n/reimage", Role::Admin),
            ("/pools/p/nodes/n/reboot", Role::Admin),
            ("/pools/p/nodes/n/disablescheduling", Role::Operator),
            ("/pools/p/nodes/n/enablescheduling", Role::Operator),
            (
                "/s/services/hostedservices/h/deployments/d/roleinstances/n",
                Role::Admin,
            ),
        ] {
            assert_eq!(required_role(&Method::POST, path), Some(role), "{path}");
        }
        assert_eq!(
            required_role(&Method::GET, "/pools/p/nodes/n"),
            Some(Role::Reader)
        );
        assert_eq!(
            required_role(&Method::POST, "/v1/images/prefetch"),
            Some(Role::Admin)
        );
        assert_eq!(
            required_role(&Method::GET, "/v1/images"),
            Some(Role::Reader)
        );
        assert_eq!(
            required_role(&Method::DELETE, "/v1/images/ab"),
            Some(Role::Admin)
        );
    }
}
