//! `/api/v1/tokens`: admins create, list and revoke the gateway's named tokens.
//!
//! The store is the core crate's ([`dutgate_core::auth::TokenStore`]): every service reads it,
//! so a revocation here holds on every service from its next request. A token's value is in
//! the answer to its creation and nowhere else (not in logs, not in the audit log).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use dutgate_core::ApiError;
use dutgate_core::audit::{Actor, AuditLog};
use dutgate_core::auth::{Auth, Role, TokenInfo, TokenStoreError, store::RESERVED_NAMES};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Clone)]
pub(crate) struct TokenState {
    pub(crate) auth: Auth,
    pub(crate) audit: AuditLog,
}

/// The token routes, documented (each checks the admin token itself, auditing refusals).
pub(crate) fn api() -> OpenApiRouter<TokenState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(revoke))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// `[a-z0-9._@-]{1,64}`, not a bootstrap token's name (`admin`, `user`, `service`).
    #[schema(pattern = "^[a-z0-9._@-]{1,64}$")]
    pub name: String,
    pub role: Role,
    /// Days until the token stops working; unset: never.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3650)]
    pub expires_days: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

fn store_error(e: TokenStoreError) -> ApiError {
    match e {
        TokenStoreError::BadName(_) | TokenStoreError::ReservedName(_) => {
            ApiError::unprocessable(e.to_string()).with_field("name")
        }
        TokenStoreError::BadExpiry(_) => {
            ApiError::unprocessable(e.to_string()).with_field("expires_days")
        }
        TokenStoreError::Exists(_) => ApiError::conflict(e.to_string()),
        TokenStoreError::NotFound(_) => ApiError::not_found(e.to_string()),
        TokenStoreError::Io { .. } | TokenStoreError::Corrupt { .. } => ApiError::internal(e),
    }
}

/// The caller, who must be an admin; refusals are audited.
async fn admin(
    s: &TokenState,
    headers: &HeaderMap,
    peer: SocketAddr,
    action: &str,
    target: &str,
) -> Result<Actor, ApiError> {
    match s.auth.check_identity(headers, Role::Admin) {
        Ok(id) => Ok(Actor::known(&id, peer)),
        Err(e) => {
            let actor = Actor::from_headers(&s.auth, headers, peer);
            s.audit
                .record(
                    &actor,
                    action,
                    target,
                    &format!("refused: {}", e.body.error),
                )
                .await;
            Err(e)
        }
    }
}

fn store(s: &TokenState) -> Result<&dutgate_core::auth::TokenStore, ApiError> {
    s.auth
        .store()
        .ok_or_else(|| ApiError::unavailable("this gateway has no token store"))
}

/// List the named tokens (admin).
///
/// Names, roles, creation and expiry; never the tokens. Bootstrap tokens (`admin`, `user`,
/// `service` from `<state_dir>/tokens/` or the config) are not listed.
#[utoipa::path(get, path = "/api/v1/tokens", tag = "executor", security(("bearer" = [])),
    operation_id = "list_tokens",
    responses((status = 200, description = "The tokens.", body = TokenList)))]
async fn list(
    State(s): State<TokenState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<axum::Json<TokenList>, ApiError> {
    admin(&s, &headers, peer, "token.list", "tokens").await?;
    let tokens = store(&s)?.list().map_err(store_error)?;
    Ok(axum::Json(TokenList { tokens }))
}

/// Create a named token (admin).
///
/// The answer holds the token; it is shown this once and stored only as its SHA-256 digest.
/// Every service accepts it from its next request. 409: a token of that name exists; 422: a
/// reserved or malformed name, or an expiry out of range.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "executor", security(("bearer" = [])),
    request_body = CreateToken,
    responses((status = 201, description = "The new token.", body = dutgate_core::auth::store::CreatedToken)))]
async fn create(
    State(s): State<TokenState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<axum::Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let actor = admin(&s, &headers, peer, "token.create", "tokens").await?;
    let axum::Json(req) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let target = format!("token/{}", req.name);
    let created = store(&s)?
        .create(&req.name, req.role, req.expires_days, &actor.name)
        .map_err(store_error);
    let outcome = match &created {
        Ok(c) => format!("ok: role {}", c.info.role),
        Err(e) => format!("failed: {}", e.body.error),
    };
    s.audit
        .record(&actor, "token.create", &target, &outcome)
        .await;
    Ok((StatusCode::CREATED, axum::Json(created?)).into_response())
}

/// Revoke a named token (admin).
///
/// Every service refuses the token (401) from its next request. 409: a bootstrap token
/// (`admin`, `user`, `service`), revoked by replacing its file.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}", tag = "executor", security(("bearer" = [])),
    params(("name" = String, Path, description = "The token's name.")),
    responses((status = 200, description = "The revoked token.", body = TokenInfo)))]
async fn revoke(
    State(s): State<TokenState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<axum::Json<TokenInfo>, ApiError> {
    let target = format!("token/{name}");
    let actor = admin(&s, &headers, peer, "token.revoke", &target).await?;
    if RESERVED_NAMES.contains(&name.as_str()) {
        return Err(ApiError::conflict(format!(
            "{name:?} is a bootstrap token: replace <state_dir>/tokens/{name} (or the config's \
             gateway.auth) and restart the gateway"
        )));
    }
    let revoked = store(&s)?.revoke(&name).map_err(store_error);
    let outcome = match &revoked {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("failed: {}", e.body.error),
    };
    s.audit
        .record(&actor, "token.revoke", &target, &outcome)
        .await;
    Ok(axum::Json(revoked?))
}
