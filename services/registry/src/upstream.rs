//! Upstream registries: which one serves a name, and how to talk to it (timeouts, Docker Hub's
//! `library/` rule, Basic auth, and the bearer-token flow with tokens cached until expiry).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use futures::StreamExt;
use reqwest::Method;
use reqwest::header::{ACCEPT, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde::Deserialize;

use crate::config::{Config, UpstreamConfig};
use crate::error::{Code, RegistryError};
use crate::reference::{Digest, RepoName};
use dutgate_core::Secret;

/// Every manifest type we cache and pass through. Schema 1 is deliberately absent: it is
/// deprecated, unsigned content whose digest does not cover what is served.
pub const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Manifests larger than this are refused (the distribution project uses the same bound).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("upstream {url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("upstream {url} refused our credentials: {reason}")]
    Auth { url: String, reason: String },
    #[error("upstream {url} sent a manifest larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge { url: String },
    #[error(
        "upstream {url} only has a schema 1 manifest ({media_type}), which this cache does not serve"
    )]
    Schema1 { url: String, media_type: String },
}

impl UpstreamError {
    /// An outage: the upstream cannot answer now (down, overloaded, rate-limited). Cached tags
    /// are served stale in that case.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Unreachable { .. } => true,
            UpstreamError::Status { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
            }
            _ => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, UpstreamError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// The client-facing error; `unknown` is what a 404 upstream becomes.
    pub fn to_registry_error(&self, unknown: RegistryError) -> RegistryError {
        let msg = self.to_string();
        match self {
            UpstreamError::Status { status, .. } if *status == StatusCode::NOT_FOUND => unknown,
            UpstreamError::Status { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                RegistryError::new(StatusCode::TOO_MANY_REQUESTS, Code::Toomanyrequests, msg)
            }
            UpstreamError::Status { status, .. }
                if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN =>
            {
                RegistryError::new(StatusCode::FORBIDDEN, Code::Denied, msg)
            }
            UpstreamError::Auth { .. } => {
                RegistryError::new(StatusCode::FORBIDDEN, Code::Denied, msg)
            }
            UpstreamError::TooLarge { .. } | UpstreamError::Schema1 { .. } => {
                RegistryError::new(StatusCode::BAD_GATEWAY, Code::ManifestInvalid, msg)
            }
            UpstreamError::Unreachable { .. } | UpstreamError::Status { .. } => {
                RegistryError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, msg)
            }
        }
    }
}

/// A name resolved to an upstream and the name to ask it for.
#[derive(Clone)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub remote: String,
}

/// All configured upstreams, longest prefix first.
pub struct Upstreams {
    by_prefix: Vec<Arc<Upstream>>,
    default: Option<Arc<Upstream>>,
}

impl Upstreams {
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(
                config.upstream_connect_timeout_seconds,
            ))
            .read_timeout(Duration::from_secs_f64(config.upstream_timeout_seconds))
            .user_agent(concat!("dutgate-registry/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let timeout = Duration::from_secs_f64(config.upstream_timeout_seconds);
        let mut by_prefix: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| Arc::new(Upstream::new(u, http.clone(), timeout)))
            .collect();
        by_prefix.sort_by_key(|u| std::cmp::Reverse(u.prefix.len()));
        let default = config
            .default_upstream
            .as_ref()
            .and_then(|p| by_prefix.iter().find(|u| &u.prefix == p).cloned());
        Ok(Self { by_prefix, default })
    }

    /// Which upstream serves `name`, and under which name.
    pub fn route(&self, name: &RepoName) -> Option<Route> {
        let n = name.as_str();
        for u in &self.by_prefix {
            if let Some(rest) = n.strip_prefix(u.prefix.as_str())
                && !rest.is_empty()
            {
                return Some(Route {
                    upstream: u.clone(),
                    remote: u.remote_name(rest),
                });
            }
        }
        self.default.as_ref().map(|u| Route {
            upstream: u.clone(),
            remote: u.remote_name(n),
        })
    }
}

struct CachedToken {
    token: Secret,
    expires: Instant,
}

pub struct Upstream {
    pub prefix: String,
    base: String,
    username: Option<String>,
    password: Option<Secret>,
    static_token: Option<Secret>,
    library_namespace: bool,
    /// Bearer tokens by scope (`repository:<name>:pull`), per upstream.
    tokens: std::sync::Mutex<HashMap<String, CachedToken>>,
    /// Set once the upstream asked for Basic auth, so later requests send it up front.
    basic: AtomicBool,
    http: reqwest::Client,
    timeout: Duration,
}

/// A manifest as fetched from upstream.
#[derive(Debug)]
pub struct FetchedManifest {
    pub bytes: bytes::Bytes,
    pub media_type: String,
    /// The upstream's `Docker-Content-Digest`, when it sent one.
    pub digest_header: Option<Digest>,
}

impl Upstream {
    fn new(c: &UpstreamConfig, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            prefix: c.prefix.clone(),
            base: c.url.trim_end_matches('/').to_string(),
            username: c.username.clone(),
            password: c.password.clone(),
            static_token: c.token.clone(),
            library_namespace: c.library_namespace,
            tokens: std::sync::Mutex::new(HashMap::new()),
            basic: AtomicBool::new(false),
            http,
            timeout,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn remote_name(&self, rest: &str) -> String {
        if self.library_namespace && !rest.contains('/') {
            format!("library/{rest}")
        } else {
            rest.to_string()
        }
    }

    pub async fn get_manifest(
        &self,
        remote: &str,
        reference: &str,
    ) -> Result<FetchedManifest, UpstreamError> {
        let url = format!("{}/v2/{remote}/manifests/{reference}", self.base);
        let resp = self.send(Method::GET, remote, &url, true, true).await?;
        let digest_header = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        // Schema 1 is deprecated (its digest does not cover what is served); we never ask for
        // it, but a registry holding nothing else may send it anyway.
        if let Some(t) = media_type
            .as_deref()
            .filter(|t| t.starts_with("application/vnd.docker.distribution.manifest.v1"))
        {
            return Err(UpstreamError::Schema1 {
                url,
                media_type: t.to_string(),
            });
        }
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_MANIFEST_BYTES as u64)
        {
            return Err(UpstreamError::TooLarge { url });
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| unreachable(&url, &e))?;
            if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
                return Err(UpstreamError::TooLarge { url });
            }
            body.extend_from_slice(&chunk);
        }
        // Some registries send `application/json`; the manifest names its own type then.
        let media_type = match media_type {
            Some(t) if MANIFEST_TYPES.contains(&t.as_str()) => t,
            _ => media_type_from_body(&body).unwrap_or_else(|| MANIFEST_TYPES[0].to_string()),
        };
        Ok(FetchedManifest {
            bytes: body.into(),
            media_type,
            digest_header,
        })
    }

    /// The digest the upstream currently gives for `reference`, when it says.
    pub async fn head_manifest(
        &self,
        remote: &str,
        reference: &str,
    ) -> Result<Option<Digest>, UpstreamError> {
        let url = format!("{}/v2/{remote}/manifests/{reference}", self.base);
        let resp = self.send(Method::HEAD, remote, &url, true, true).await?;
        Ok(resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok()))
    }

    /// Starts a blob download; the caller streams the body (idle reads are bounded by the
    /// client's read timeout, not the whole transfer).
    pub async fn get_blob(
        &self,
        remote: &str,
        digest: &Digest,
    ) -> Result<reqwest::Response, UpstreamError> {
        let url = format!("{}/v2/{remote}/blobs/{digest}", self.base);
        self.send(Method::GET, remote, &url, false, false).await
    }

    pub async fn head_blob(
        &self,
        remote: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let url = format!("{}/v2/{remote}/blobs/{digest}", self.base);
        let resp = self.send(Method::HEAD, remote, &url, false, true).await?;
        Ok(resp
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    async fn send(
        &self,
        method: Method,
        remote: &str,
        url: &str,
        manifest_accept: bool,
        bounded: bool,
    ) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{remote}:pull");
        for attempt in 0..2 {
            let mut rb = self.http.request(method.clone(), url);
            if manifest_accept {
                rb = rb.header(ACCEPT, MANIFEST_TYPES.join(", "));
            }
            if bounded {
                rb = rb.timeout(self.timeout);
            }
            rb = self.authorize(rb, &scope);
            let resp = rb.send().await.map_err(|e| unreachable(url, &e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && attempt == 0 && self.static_token.is_none() {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                match challenge {
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope: asked,
                    }) => {
                        let ask = asked.unwrap_or_else(|| scope.clone());
                        self.fetch_token(&realm, service.as_deref(), &ask, &scope)
                            .await?;
                        continue;
                    }
                    Some(Challenge::Basic) if self.username.is_some() => {
                        self.basic.store(true, Ordering::Relaxed);
                        continue;
                    }
                    _ => {
                        return Err(UpstreamError::Auth {
                            url: url.to_string(),
                            reason: "401 without a challenge we can answer".into(),
                        });
                    }
                }
            }
            if status.is_success() {
                return Ok(resp);
            }
            return Err(UpstreamError::Status {
                url: url.to_string(),
                status,
            });
        }
        Err(UpstreamError::Auth {
            url: url.to_string(),
            reason: "still 401 after authenticating".into(),
        })
    }

    fn authorize(&self, rb: reqwest::RequestBuilder, scope: &str) -> reqwest::RequestBuilder {
        if let Some(t) = &self.static_token {
            return rb.bearer_auth(t.expose());
        }
        let cached = self.tokens.lock().ok().and_then(|tokens| {
            tokens
                .get(scope)
                .filter(|t| t.expires > Instant::now())
                .map(|t| t.token.clone())
        });
        if let Some(token) = cached {
            return rb.bearer_auth(token.expose());
        }
        if self.basic.load(Ordering::Relaxed)
            && let Some(user) = &self.username
        {
            return rb.basic_auth(user, self.password.as_ref().map(|p| p.expose()));
        }
        rb
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        cache_key: &str,
    ) -> Result<(), UpstreamError> {
        let auth_err = |reason: String| UpstreamError::Auth {
            url: realm.to_string(),
            reason,
        };
        let mut url =
            reqwest::Url::parse(realm).map_err(|e| auth_err(format!("bad realm: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut rb = self.http.get(url).timeout(self.timeout);
        if let Some(user) = &self.username {
            rb = rb.basic_auth(user, self.password.as_ref().map(|p| p.expose()));
        }
        let resp = rb.send().await.map_err(|e| unreachable(realm, &e))?;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS || resp.status().is_server_error() {
            return Err(UpstreamError::Status {
                url: realm.to_string(),
                status: resp.status(),
            });
        }
        if !resp.status().is_success() {
            return Err(auth_err(format!(
                "token service answered {}",
                resp.status()
            )));
        }
        let body: TokenResponse = resp
            .json()
            .await
            .map_err(|e| auth_err(format!("token response: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth_err("token response has no token".into()))?;
        // The spec's default lifetime is 60 s; refresh a little early so a token never expires
        // between our check and the upstream's.
        let lifetime = body.expires_in.unwrap_or(60).max(1);
        let margin = (lifetime / 10).min(30);
        let expires = Instant::now() + Duration::from_secs(lifetime - margin);
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.retain(|_, t| t.expires > Instant::now());
            tokens.insert(
                cache_key.to_string(),
                CachedToken {
                    token: Secret::new(token),
                    expires,
                },
            );
        }
        tracing::debug!(upstream = %self.base, scope, lifetime, "bearer token obtained");
        Ok(())
    }
}

fn unreachable(url: &str, e: &reqwest::Error) -> UpstreamError {
    let mut reason = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        src = s.source();
    }
    UpstreamError::Unreachable {
        url: url.to_string(),
        reason,
    }
}

fn media_type_from_body(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Probe>(body).ok()?.media_type
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    Basic,
}

impl Challenge {
    /// `Bearer realm="…",service="…",scope="repository:a/b:pull,push"` or `Basic realm="…"`.
    fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let params = parse_auth_params(params);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        })
    }
}

/// `k="v", k2=v2` with commas allowed inside quotes.
fn parse_auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        out.push((key.trim().to_string(), value.trim().to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Query, State};
    use axum::http::HeaderMap;
    use axum::response::IntoResponse;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn challenges() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull,push".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None);
        assert_eq!(Challenge::parse("Negotiate"), None);
        assert_eq!(Challenge::parse(""), None);
    }

    fn upstreams(cfg: Vec<UpstreamConfig>, default: Option<&str>) -> Upstreams {
        let config = Config {
            upstreams: cfg,
            default_upstream: default.map(str::to_string),
            ..Config::default()
        };
        config.validate().unwrap();
        Upstreams::new(&config).unwrap()
    }

    #[test]
    fn routing_by_prefix_with_library_rule() {
        let u = upstreams(Config::default().upstreams, Some("docker.io/"));
        let r = |n: &str| {
            let route = u.route(&RepoName::parse(n).unwrap()).unwrap();
            (route.upstream.prefix.clone(), route.remote)
        };
        assert_eq!(r("alpine"), ("docker.io/".into(), "library/alpine".into()));
        assert_eq!(
            r("docker.io/alpine"),
            ("docker.io/".into(), "library/alpine".into())
        );
        assert_eq!(
            r("docker.io/grafana/grafana"),
            ("docker.io/".into(), "grafana/grafana".into())
        );
        assert_eq!(
            r("registry.freedesktop.org/mesa/mesa"),
            ("registry.freedesktop.org/".into(), "mesa/mesa".into())
        );
        assert_eq!(
            r("quay.io"),
            ("docker.io/".into(), "library/quay.io".into())
        );
        let none = upstreams(Config::default().upstreams, None);
        assert!(none.route(&RepoName::parse("alpine").unwrap()).is_none());
    }

    #[derive(Clone, Default)]
    struct TokenServer {
        tokens_issued: Arc<AtomicUsize>,
        base: Arc<std::sync::OnceLock<String>>,
    }

    /// A registry that wants a bearer token from its own `/token` endpoint (which in turn wants
    /// Basic credentials), like Docker Hub and GitLab do.
    async fn serve_token_registry() -> (String, TokenServer) {
        use axum::routing::get;
        let state = TokenServer::default();
        let app = axum::Router::new()
            .route(
                "/token",
                get(
                    |State(s): State<TokenServer>,
                     headers: HeaderMap,
                     Query(q): Query<HashMap<String, String>>| async move {
                        let basic = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        // "user:pass" in base64.
                        if basic != "Basic dXNlcjpwYXNz" || q.get("service").map(String::as_str) != Some("reg") {
                            return StatusCode::UNAUTHORIZED.into_response();
                        }
                        s.tokens_issued.fetch_add(1, Ordering::SeqCst);
                        let scope = q.get("scope").cloned().unwrap_or_default();
                        axum::Json(serde_json::json!({"token": format!("tok:{scope}"), "expires_in": 300}))
                            .into_response()
                    },
                ),
            )
            .route(
                "/v2/{*rest}",
                get(|State(s): State<TokenServer>, headers: HeaderMap| async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if auth != "Bearer tok:repository:lab/x:pull" {
                        let base = s.base.get().cloned().unwrap_or_default();
                        return (
                            StatusCode::UNAUTHORIZED,
                            [(
                                "WWW-Authenticate",
                                format!(r#"Bearer realm="{base}/token",service="reg",scope="repository:lab/x:pull""#),
                            )],
                        )
                            .into_response();
                    }
                    (
                        [("Content-Type", MANIFEST_TYPES[0])],
                        r#"{"schemaVersion":2}"#,
                    )
                        .into_response()
                }),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        state.base.set(base.clone()).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, state)
    }

    #[tokio::test]
    async fn bearer_token_flow_caches_tokens() {
        let (base, server) = serve_token_registry().await;
        let mut cfg = UpstreamConfig::new("lab/", &base);
        cfg.username = Some("user".into());
        cfg.password = Some(Secret::new("pass"));
        let u = upstreams(vec![cfg], None);
        let route = u.route(&RepoName::parse("lab/lab/x").unwrap()).unwrap();
        for _ in 0..3 {
            let m = route
                .upstream
                .get_manifest(&route.remote, "latest")
                .await
                .unwrap();
            assert_eq!(&m.bytes[..], br#"{"schemaVersion":2}"#);
            assert_eq!(m.media_type, MANIFEST_TYPES[0]);
        }
        assert_eq!(
            server.tokens_issued.load(Ordering::SeqCst),
            1,
            "token reused from the cache"
        );

        // Wrong credentials: a clear auth error, not a loop.
        let mut bad = UpstreamConfig::new("lab/", &base);
        bad.username = Some("user".into());
        bad.password = Some(Secret::new("wrong"));
        let u = upstreams(vec![bad], None);
        let route = u.route(&RepoName::parse("lab/lab/x").unwrap()).unwrap();
        let err = route
            .upstream
            .get_manifest(&route.remote, "latest")
            .await
            .unwrap_err();
        assert!(matches!(err, UpstreamError::Auth { .. }), "{err}");
        assert!(!err.is_outage());
    }

    #[tokio::test]
    async fn unreachable_upstream_is_an_outage() {
        // Port 9 (discard) on loopback is closed here: connection refused, immediately.
        let u = upstreams(
            vec![UpstreamConfig::new("x/", "http://127.0.0.1:9")],
            Some("x/"),
        );
        let route = u.route(&RepoName::parse("a/b").unwrap()).unwrap();
        let err = route
            .upstream
            .head_manifest(&route.remote, "latest")
            .await
            .unwrap_err();
        assert!(err.is_outage(), "{err}");
        let e = err.to_registry_error(RegistryError::manifest_unknown("latest"));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
