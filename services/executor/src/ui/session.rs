//! Dashboard sign-in: a token is exchanged for a session cookie, and the cookie is accepted
//! only under `/ui/` and by the console WebSocket (never by the REST API).
//!
//! - The cookie holds an opaque session id (256 random bits), never the token: the token
//!   stays in this process's memory and every request re-checks it with [`Auth`], so a
//!   revoked or expired token ends its sessions at once.
//! - Cookie: `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends
//!   it), `Path=/` (the WebSocket lives under `/api/`), `Secure` when the request came over
//!   https (through a proxy that says so).
//! - State-changing requests authenticated by the cookie pass [`same_origin`] (Sec-Fetch-Site
//!   or Origin against Host) and carry the session's CSRF token in the form.
//! - The console WebSocket, authenticated by the cookie, checks Origin against Host.
//!
//! Sessions live in memory: a restart of the executor signs everybody out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dutgate_core::auth::{Auth, Identity, Role};
use dutgate_core::{ApiError, Secret};

/// The session cookie's name.
pub const COOKIE: &str = "dutgate_session";
/// A session ends this long after sign-in, whatever it does.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// At most this many sessions at once; the oldest goes first (sign-in needs a valid token,
/// so this only bounds what a token holder can make the process keep).
const MAX_SESSIONS: usize = 10_000;

/// One signed-in browser.
#[derive(Clone)]
pub struct Session {
    /// The token signed in with: re-checked on every request, forwarded to mars and pdu for
    /// admin actions so that they decide.
    pub token: Secret,
    /// Goes in every form of the session; a state-changing request must carry it back.
    pub csrf: Secret,
    created: Instant,
}

/// The signed-in caller of a dashboard request (a request extension).
#[derive(Clone)]
pub struct UiCaller {
    pub who: Identity,
    pub session: Session,
}

/// The executor's dashboard sessions.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Session>>>,
}

impl Sessions {
    /// A new session for `token` (already checked); returns its id for the cookie.
    pub fn create(&self, token: &str) -> String {
        let id = random_id();
        let session = Session {
            token: Secret::new(token),
            csrf: Secret::new(random_id()),
            created: Instant::now(),
        };
        let mut map = self.lock();
        map.retain(|_, s| s.created.elapsed() < SESSION_LIFETIME);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(id.clone(), session);
        id
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.lock();
        match map.get(id) {
            Some(s) if s.created.elapsed() < SESSION_LIFETIME => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session and identity of a request's cookie; `None` without a cookie, an unknown
    /// or expired session, or a token that is no longer valid (its session is dropped).
    pub fn caller(&self, auth: &Auth, headers: &HeaderMap) -> Option<UiCaller> {
        let id = session_id(headers)?;
        let session = self.get(&id)?;
        match auth.identify_token(session.token.expose()) {
            Ok(who) => Some(UiCaller { who, session }),
            Err(_) => {
                self.remove(&id);
                None
            }
        }
    }
}

fn random_id() -> String {
    // 256 random bits, hex: the same generator as named tokens, without their prefix.
    let t = dutgate_core::auth::store::new_token();
    t.trim_start_matches("dgt_").to_string()
}

/// The session id of the request's cookie, if any.
pub fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether the request came over https (directly or through a proxy that says so).
fn is_https(headers: &HeaderMap) -> bool {
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("https://"));
    forwarded || origin
}

/// `Set-Cookie` for a new session.
pub fn set_cookie(id: &str, headers: &HeaderMap) -> String {
    let secure = if is_https(headers) { "; Secure" } else { "" };
    format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_LIFETIME.as_secs()
    )
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// The host (and port) of an Origin header value (`http://host:port` → `host:port`).
fn origin_authority(origin: &str) -> Option<&str> {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))?;
    Some(rest.trim_end_matches('/'))
}

/// Whether the request's Origin names this very host (the Host header). A missing Origin
/// fails: browsers send it on every WebSocket and every POST.
pub fn origin_matches_host(headers: &HeaderMap) -> Result<(), String> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or("the request has no Host header")?;
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .ok_or("the request has no Origin header")?;
    match origin_authority(origin) {
        Some(a) if a.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(format!(
            "Origin {origin:?} is not this dashboard's origin (host {host:?})"
        )),
    }
}

/// The cross-site request check of a cookie-authenticated state change: the browser's
/// `Sec-Fetch-Site` when it sends one (it must be `same-origin`), else Origin against Host.
pub fn same_origin(headers: &HeaderMap) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site != "same-origin" {
            return Err(format!(
                "cross-site request refused (Sec-Fetch-Site: {site})"
            ));
        }
        // A browser that sends Sec-Fetch-Site also sends Origin on POST: check both.
        if headers.contains_key(header::ORIGIN) {
            return origin_matches_host(headers);
        }
        return Ok(());
    }
    origin_matches_host(headers)
}

/// Middleware of the console WebSocket: a bearer token as on every REST route, or else the
/// dashboard's session cookie, accepted only from a page of this very origin.
pub async fn token_or_cookie(
    State((auth, sessions)): State<(Auth, Sessions)>,
    mut req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    if !headers.contains_key(header::AUTHORIZATION) && session_id(headers).is_some() {
        let Some(caller) = sessions.caller(&auth, headers) else {
            return ApiError::unauthorized("the dashboard session has ended: sign in again")
                .into_response();
        };
        if let Err(e) = origin_matches_host(headers) {
            tracing::warn!(actor = %caller.who.name, reason = %e, "console WebSocket refused");
            return ApiError::forbidden(e).into_response();
        }
        if !caller.who.role.allows(Role::User) {
            return ApiError::forbidden("this endpoint needs the user role").into_response();
        }
        req.extensions_mut().insert(caller.who);
        return next.run(req).await;
    }
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
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn cookie_is_found_among_others() {
        let h = headers(&[("cookie", "a=1; dutgate_session=abc ; b=2")]);
        assert_eq!(session_id(&h).as_deref(), Some("abc"));
        assert_eq!(session_id(&headers(&[("cookie", "a=1")])), None);
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie("x", &HeaderMap::new());
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"));
        assert!(!c.contains("Secure"));
        let c = set_cookie("x", &headers(&[("x-forwarded-proto", "https")]));
        assert!(c.ends_with("; Secure"));
    }

    #[test]
    fn origin_checks() {
        let ok = headers(&[("host", "gw:8000"), ("origin", "http://gw:8000")]);
        assert!(origin_matches_host(&ok).is_ok());
        assert!(same_origin(&ok).is_ok());
        let evil = headers(&[("host", "gw:8000"), ("origin", "http://evil.example")]);
        assert!(origin_matches_host(&evil).is_err());
        assert!(same_origin(&evil).is_err());
        let none = headers(&[("host", "gw:8000")]);
        assert!(same_origin(&none).is_err());
        let cross = headers(&[
            ("host", "gw:8000"),
            ("origin", "http://gw:8000"),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert!(same_origin(&cross).is_err());
        let fetch_only = headers(&[("host", "gw:8000"), ("sec-fetch-site", "same-origin")]);
        assert!(same_origin(&fetch_only).is_ok());
    }

    #[test]
    fn revoked_token_ends_the_session() {
        let auth = Auth::new(Some(Secret::new("adm")), None, vec![]);
        let sessions = Sessions::default();
        let id = sessions.create("adm");
        let h = headers(&[("cookie", &format!("{COOKIE}={id}"))]);
        assert_eq!(sessions.caller(&auth, &h).unwrap().who.name, "admin");
        let other = Auth::new(Some(Secret::new("new")), None, vec![]);
        assert!(sessions.caller(&other, &h).is_none());
        assert!(sessions.get(&id).is_none());
    }
}
