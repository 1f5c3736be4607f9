//! Who is calling: named tokens with roles (design.md §10), and the DUT networks.
//!
//! Every request carries `Authorization: Bearer <token>`. A token is one of:
//! - a **named token** from the store ([`store::TokenStore`], `<state_dir>/auth/tokens.json`),
//!   created and revoked by admins (`dutctl tokens`, `dutgate tokens`, `POST /api/v1/tokens`);
//! - a **bootstrap token**: `gateway.auth.{admin,user}_token` from the config or, when unset
//!   there, `<state_dir>/tokens/{admin,user,service}` (written by `dutgate up` and
//!   `dutgate tokens bootstrap`). They are the identities `admin`, `user` and `service`, so
//!   setups from before named tokens keep working.
//!
//! A service without any admin token refuses every admin request: failing closed is the only
//! safe default on a network where DUTs run untrusted code.

pub mod store;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::secret::Secret;
pub use store::{CreatedToken, TokenInfo, TokenStore, TokenStoreError};

/// What a token may do.
///
/// - `runner`: what a GitLab runner or another automated submitter uses: submit jobs, read,
///   cancel its own jobs. The rights of `user`; a separate role so the audit log and the
///   token list say which submitter is a machine.
/// - `user`: a CI user: submit, read, cancel and type into their own jobs.
/// - `service`: the gateway's own actors (mars powering off an expired lease's machine, the
///   trainer, the executor's teardown): machine operations (power, boot configs, console
///   expectations) and what a user may do, but no administration of tokens, machines or
///   other people's jobs.
/// - `admin`: everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Runner,
    User,
    Service,
    Admin,
}

impl Role {
    /// Whether a caller with this role passes a check that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        match needed {
            Role::Runner | Role::User => true,
            Role::Service => matches!(self, Role::Service | Role::Admin),
            Role::Admin => self == Role::Admin,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Runner => "runner",
            Role::User => "user",
            Role::Service => "service",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "runner" => Ok(Role::Runner),
            "user" => Ok(Role::User),
            "service" => Ok(Role::Service),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: use runner, user, service or admin"
            )),
        }
    }
}

/// An authenticated caller: the token's name and role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

impl Identity {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

#[derive(Debug, Clone)]
pub struct Auth {
    inner: Arc<AuthInner>,
}

#[derive(Debug)]
struct AuthInner {
    /// Bootstrap tokens: (name, role, token).
    bootstrap: Vec<(&'static str, Role, Secret)>,
    store: Option<TokenStore>,
    dut_networks: Vec<IpNet>,
}

impl Auth {
    /// Bootstrap tokens only (no store): tests and tools.
    pub fn new(admin: Option<Secret>, user: Option<Secret>, dut_networks: Vec<IpNet>) -> Self {
        Self::build(admin, user, None, None, dut_networks)
    }

    fn build(
        admin: Option<Secret>,
        user: Option<Secret>,
        service: Option<Secret>,
        store: Option<TokenStore>,
        dut_networks: Vec<IpNet>,
    ) -> Self {
        let bootstrap = [
            ("admin", Role::Admin, admin),
            ("user", Role::User, user),
            ("service", Role::Service, service),
        ]
        .into_iter()
        .filter_map(|(n, r, s)| s.filter(|s| !s.is_empty()).map(|s| (n, r, s)))
        .collect();
        Self {
            inner: Arc::new(AuthInner {
                bootstrap,
                store,
                dut_networks,
            }),
        }
    }

    /// The gateway's tokens: bootstrap tokens from the config or `<state_dir>/tokens/`, named
    /// tokens from `<state_dir>/auth/tokens.json`.
    pub fn from_gateway(gw: &GatewayConfig) -> Self {
        let auth = Self::from_gateway_quiet(gw);
        let named_admin = auth.store().is_some_and(|st| {
            st.list()
                .map(|l| l.iter().any(|t| t.role == Role::Admin))
                .unwrap_or(false)
        });
        if !named_admin
            && !auth
                .inner
                .bootstrap
                .iter()
                .any(|(_, r, _)| *r == Role::Admin)
        {
            tracing::warn!("no admin token configured: admin endpoints will refuse every request");
        }
        auth
    }

    /// As [`Auth::from_gateway`], without the start-up warning (for a second instance).
    pub fn from_gateway_quiet(gw: &GatewayConfig) -> Self {
        let dir = gw.tokens_dir();
        let admin = gw
            .auth
            .admin_token
            .clone()
            .or_else(|| read_token(&dir.join("admin")));
        let user = gw
            .auth
            .user_token
            .clone()
            .or_else(|| read_token(&dir.join("user")));
        let service = read_token(&dir.join("service"));
        let store = TokenStore::in_state_dir(&gw.state_dir);
        Self::build(
            admin,
            user,
            service,
            Some(store),
            gw.auth.dut_networks.clone(),
        )
    }

    /// The named-token store, when this gateway has one.
    pub fn store(&self) -> Option<&TokenStore> {
        self.inner.store.as_ref()
    }

    /// Who a bearer token belongs to.
    pub fn identify_token(&self, token: &str) -> Result<Identity, ApiError> {
        if let Some((name, role, _)) = self
            .inner
            .bootstrap
            .iter()
            .find(|(_, _, s)| s.matches(token))
        {
            return Ok(Identity {
                name: (*name).to_string(),
                role: *role,
            });
        }
        if let Some(store) = &self.inner.store {
            match store.lookup(token) {
                Ok(Some(info)) if info.expired(OffsetDateTime::now_utc()) => {
                    return Err(ApiError::unauthorized(format!(
                        "token {:?} has expired",
                        info.name
                    )));
                }
                Ok(Some(info)) => {
                    return Ok(Identity {
                        name: info.name,
                        role: info.role,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    // Fail closed, and say why in the log (never the token).
                    tracing::error!(error = %e, "token store unreadable");
                    return Err(ApiError::unavailable("the token store is unreadable"));
                }
            }
        }
        Err(ApiError::unauthorized("invalid token"))
    }

    /// Which role a bearer token grants, if any.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        self.identify_token(token).ok().map(|i| i.role)
    }

    pub fn is_dut_address(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.inner.dut_networks.iter().any(|n| n.contains(&ip))
    }

    /// The caller named by the `Authorization: Bearer …` header.
    pub fn identify(&self, headers: &axum::http::HeaderMap) -> Result<Identity, ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "missing Authorization: Bearer <token> header",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("Authorization header is not a Bearer token"))?;
        self.identify_token(token)
    }

    /// The caller, if its role passes `needed`.
    pub fn check_identity(
        &self,
        headers: &axum::http::HeaderMap,
        needed: Role,
    ) -> Result<Identity, ApiError> {
        let id = self.identify(headers)?;
        if id.role.allows(needed) {
            Ok(id)
        } else {
            Err(ApiError::forbidden(format!(
                "this endpoint needs the {} role; token {:?} is a {} token",
                needed, id.name, id.role
            )))
        }
    }

    /// Checks the `Authorization: Bearer …` header for at least `needed`.
    pub fn check(&self, headers: &axum::http::HeaderMap, needed: Role) -> Result<Role, ApiError> {
        self.check_identity(headers, needed).map(|i| i.role)
    }
}

/// Reads a token file; surrounding whitespace is ignored, an empty file is no token.
pub fn read_token(path: &Path) -> Option<Secret> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    (!t.is_empty()).then(|| Secret::new(t))
}

/// The credential the gateway's own actors (mars, the trainer, the executor's teardown) call
/// other services with: `<state_dir>/tokens/service`, else the admin token (config or file),
/// for gateways set up before the service role existed.
pub fn service_token(gw: &GatewayConfig) -> Option<Secret> {
    let dir = gw.tokens_dir();
    read_token(&dir.join("service"))
        .or_else(|| gw.auth.admin_token.clone())
        .or_else(|| read_token(&dir.join("admin")))
}

/// Middleware of every service ([`crate::service::ServiceContext::serve_http`]): a request
/// that presents a bearer token the gateway does not know (revoked, expired, made up) gets 401
/// whatever the route, even one open to the DUT network without a token, so a client learns at
/// once that its token is no longer valid. Other `Authorization` schemes (S3's SigV4) pass.
pub async fn refuse_unknown_bearer(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") || v.starts_with("bearer "));
    if bearer && let Err(e) = auth.identify(req.headers()) {
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.to_string())
            .unwrap_or_default();
        tracing::warn!(source = %peer, path = %req.uri().path(), reason = %e.body.error, "request with an unknown token refused");
        return e.into_response();
    }
    next.run(req).await
}

/// Middleware: admin token required.
pub async fn require_admin(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    match auth.check(req.headers(), Role::Admin) {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Middleware: any valid token (runner, user, service or admin). The caller's [`Identity`]
/// is put in the request's extensions for the handlers.
pub async fn require_user(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    match auth.check_identity(req.headers(), Role::User) {
        Ok(id) => {
            req.extensions_mut().insert(id);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue, StatusCode};

    fn auth() -> Auth {
        Auth::new(
            Some(Secret::new("adm")),
            Some(Secret::new("usr")),
            crate::config::default_dut_networks(),
        )
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    #[test]
    fn roles() {
        let a = auth();
        assert_eq!(a.check(&bearer("adm"), Role::Admin).unwrap(), Role::Admin);
        assert_eq!(a.check(&bearer("adm"), Role::User).unwrap(), Role::Admin);
        assert_eq!(a.check(&bearer("usr"), Role::User).unwrap(), Role::User);
        assert_eq!(
            a.check(&bearer("usr"), Role::Admin).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            a.check(&bearer("nope"), Role::User).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            a.check(&HeaderMap::new(), Role::User).unwrap_err().status,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn named_tokens_and_roles() {
        let dir = tempfile::tempdir().unwrap();
        let mut gw = GatewayConfig {
            state_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        gw.auth.admin_token = Some(Secret::new("adm"));
        let a = Auth::from_gateway(&gw);
        let store = a.store().unwrap();
        let runner = store.create("gitlab", Role::Runner, None, "admin").unwrap();
        let svc = store
            .create("trainer", Role::Service, None, "admin")
            .unwrap();
        let id = a
            .check_identity(&bearer(&runner.token), Role::User)
            .unwrap();
        assert_eq!((id.name.as_str(), id.role), ("gitlab", Role::Runner));
        let e = a.check(&bearer(&runner.token), Role::Admin).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e.body.error.contains("gitlab"), "{}", e.body.error);
        assert_eq!(
            a.check(&bearer(&svc.token), Role::Service).unwrap(),
            Role::Service
        );
        assert!(a.check(&bearer(&svc.token), Role::Admin).is_err());
        assert!(a.check(&bearer("adm"), Role::Service).is_ok());
        store.revoke("gitlab").unwrap();
        assert_eq!(
            a.check(&bearer(&runner.token), Role::User)
                .unwrap_err()
                .status,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn no_token_configured_means_nobody_gets_in() {
        let a = Auth::new(None, Some(Secret::new("")), vec![]);
        assert!(a.role_of("").is_none());
        assert!(a.role_of("anything").is_none());
    }

    #[test]
    fn dut_networks() {
        let a = auth();
        assert!(a.is_dut_address("127.0.0.1".parse().unwrap()));
        assert!(a.is_dut_address("10.0.2.15".parse().unwrap()));
        assert!(a.is_dut_address("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!a.is_dut_address("192.168.1.4".parse().unwrap()));
    }
}
