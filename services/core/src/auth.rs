//! The three networks of trust (design.md §10): admin token, user token, DUT networks.
//!
//! Tokens come from the config or, when unset there, from `<state_dir>/tokens/{admin,user}`
//! (written by `dutgate up`). A service without an admin token refuses every admin request:
//! failing closed is the only safe default on a network where DUTs run untrusted code.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;

use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    User,
    Admin,
}

#[derive(Debug, Clone)]
pub struct Auth {
    inner: Arc<AuthInner>,
}

#[derive(Debug)]
struct AuthInner {
    admin: Option<Secret>,
    user: Option<Secret>,
    dut_networks: Vec<IpNet>,
}

impl Auth {
    pub fn new(admin: Option<Secret>, user: Option<Secret>, dut_networks: Vec<IpNet>) -> Self {
        let admin = admin.filter(|s| !s.is_empty());
        let user = user.filter(|s| !s.is_empty());
        Self {
            inner: Arc::new(AuthInner {
                admin,
                user,
                dut_networks,
            }),
        }
    }

    pub fn from_gateway(gw: &GatewayConfig) -> Self {
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
        if admin.is_none() {
            tracing::warn!("no admin token configured: admin endpoints will refuse every request");
        }
        Self::new(admin, user, gw.auth.dut_networks.clone())
    }

    /// Which role a bearer token grants, if any.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        if self.inner.admin.as_ref().is_some_and(|s| s.matches(token)) {
            return Some(Role::Admin);
        }
        if self.inner.user.as_ref().is_some_and(|s| s.matches(token)) {
            return Some(Role::User);
        }
        None
    }

    pub fn is_dut_address(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.inner.dut_networks.iter().any(|n| n.contains(&ip))
    }

    /// Checks the `Authorization: Bearer …` header for at least `needed`.
    pub fn check(&self, headers: &axum::http::HeaderMap, needed: Role) -> Result<Role, ApiError> {
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
        match self.role_of(token) {
            Some(role) if role >= needed => Ok(role),
            Some(_) => Err(ApiError::forbidden("this endpoint needs the admin token")),
            None => Err(ApiError::unauthorized("invalid token")),
        }
    }
}

/// Reads a token file; surrounding whitespace is ignored, an empty file is no token.
pub fn read_token(path: &Path) -> Option<Secret> {
    let text = std::fs::read_to_string(path).ok()?;
    let t = text.trim();
    (!t.is_empty()).then(|| Secret::new(t))
}

/// Middleware: admin token required.
pub async fn require_admin(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    match auth.check(req.headers(), Role::Admin) {
        Ok(_) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Middleware: user or admin token required.
pub async fn require_user(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    match auth.check(req.headers(), Role::User) {
        Ok(_) => next.run(req).await,
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
