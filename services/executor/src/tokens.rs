//! `/api/v1/tokens`: admins create, list and revoke the gateway's named tokens.
//!
//! The store is the core crate's ([`dutgate_core::auth::TokenStore`]): every service reads it,
//! so a revocation here holds on every service from its next request. A token's value is in
//! the answer to its creation and nowhere else (not in logs, not in the audit log).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use dutgate_core::ApiError;
use dutgate_core::audit::{Actor, AuditLog};
use dutgate_core::auth::{Auth, Role, TokenInfo, TokenStoreError, store::RESERVED_NAMES};
use serde::{Deserialize, Serialize};

#[derive(Clone)]
struct TokenState {
    auth: Auth,
    audit: AuditLog,
}

pub fn router(auth: Auth, audit: AuditLog) -> Router {
    Router::new()
        .route("/api/v1/tokens", get(list).post(create))
        .route("/api/v1/tokens/{name}", delete(revoke))
        .with_state(TokenState { auth, audit })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub role: Role,
    /// Days until the token stops working; unset: never.
    #[serde(default)]
    pub expires_days: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
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

async fn list(
    State(s): State<TokenState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<axum::Json<TokenList>, ApiError> {
    admin(&s, &headers, peer, "token.list", "tokens").await?;
    let tokens = store(&s)?.list().map_err(store_error)?;
    Ok(axum::Json(TokenList { tokens }))
}

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
