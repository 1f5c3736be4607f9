//! ci-tron's `executorctl` (valve-infra's executor client) against this executor, unchanged
//! (docs/migrating.md):
//!
//! - `POST /api/v1/jobs` with `Connection: Upgrade`, `Upgrade: ci-tron-console`: the job is
//!   queued as any submission, then the connection switches protocols (`101`,
//!   `Ci_tron_version: 1`) and carries ci-tron's console protocol ([`wire`], [`session`]):
//!   control messages for every phase, the console, keystrokes back to the DUT, the final
//!   status, and a read-only key to the job's files ([`bucket`]).
//! - Older clients that want no upgrade but name a `metadata.callback.port`: `200` with
//!   ci-tron's answer, then the executor connects back to the submitting address (never
//!   another one) and speaks the same protocol ([`connect_back_target`]).
//! - Submissions without a token from `executor.trusted_client_networks`, recorded with the
//!   owner `network:<cidr>` ([`token_or_trusted_network`]).
//! - `GET /api/v1/duts`, `GET /api/v1/dut/{name}` ([`duts`]), and a leading `//` in paths,
//!   which the client makes of `-e http://host/` ([`with_double_slash`]).

pub mod bucket;
pub mod duts;
pub mod events;
pub mod session;
pub mod wire;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dutgate_core::ApiError;
use dutgate_core::auth::{Identity, Role};
use dutgate_core::outbound::{OutboundPolicy, canonical};
use dutgate_jobspec::{JobSpec, TemplateVars};
use serde::{Deserialize, Deserializer, Serialize};

use crate::api::AppState;
pub use session::Client;

/// Pause between the `101` and the first frame. The client reads the answer's head through
/// a buffered reader, then takes the socket itself: bytes that reach it before it read the
/// head are lost in that buffer. Its reader runs as soon as the head arrives; this leaves it
/// that long to do so.
const FIRST_FRAME_DELAY: Duration = Duration::from_millis(500);
/// Connecting back to a client (it waits 15 s for the connection).
const CONNECT_BACK_TIMEOUT: Duration = Duration::from_secs(10);

/// `metadata.callback`: where an older client waits for the executor's connection (without
/// `Upgrade: ci-tron-console`): the submitting address, on `port`.
#[derive(Debug, Default, Clone, Deserialize, utoipa::ToSchema)]
pub struct Callback {
    /// Not followed: the submitting address is used.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

/// `metadata.minio`: MinIO groups the job user should join (`executorctl -g`).
#[derive(Debug, Default, Clone, Deserialize, utoipa::ToSchema)]
pub struct Minio {
    /// Must be empty (422 otherwise).
    #[serde(default, deserialize_with = "null_as_empty")]
    #[schema(value_type = Option<Vec<String>>)]
    pub groups: Vec<String>,
}

/// `null` as an empty list (ci-tron's client sends `"tags": null` with `-i` alone).
pub fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

// ---- who may submit ---------------------------------------------------------------------

/// Authentication of submissions and of the DUT list: a token as everywhere (its identity
/// in the request's extensions), or no `Authorization` header at all from an address of
/// `executor.trusted_client_networks`, which then is the identity `network:<cidr>` (role
/// runner). Anything else is refused as without this (401).
pub async fn token_or_trusted_network(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let has_token = req.headers().contains_key(header::AUTHORIZATION);
    let identity = match trusted_network(&s, peer.ip()) {
        Some(net) if !has_token => Identity {
            name: format!("network:{net}"),
            role: Role::Runner,
        },
        _ => match s.auth.check_identity(req.headers(), Role::User) {
            Ok(id) => id,
            Err(mut e) => {
                if !has_token {
                    tracing::warn!(peer = %peer, path = %req.uri().path(), "request without a token from outside executor.trusted_client_networks refused");
                    e.body.error.push_str(&format!(
                        "; requests without a token are accepted from executor.trusted_client_networks only, and {} is not in them",
                        canonical(peer.ip())
                    ));
                }
                return e.into_response();
            }
        },
    };
    req.extensions_mut().insert(identity);
    next.run(req).await
}

fn trusted_network(s: &AppState, ip: IpAddr) -> Option<ipnet::IpNet> {
    let ip = canonical(ip);
    s.cfg
        .trusted_client_networks
        .iter()
        .find(|n| n.contains(&ip))
        .copied()
}

// ---- the upgrade ------------------------------------------------------------------------

/// The connection's pending upgrade when the request asks for ci-tron's console protocol.
/// Taken before the body is read: the request is consumed by then.
pub fn take_upgrade(req: &mut Request) -> Option<hyper::upgrade::OnUpgrade> {
    if !wants_console(req.headers()) {
        return None;
    }
    req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>()
}

fn wants_console(h: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::UPGRADE, wire::PROTOCOL) && has(header::CONNECTION, "upgrade")
}

/// Answers the submission of job `id` with `101`; once the connection is switched, the
/// session runs on it.
pub fn switch_protocols(
    s: AppState,
    id: i64,
    upgrade: hyper::upgrade::OnUpgrade,
    client: Client,
) -> Response {
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => {
                tokio::time::sleep(FIRST_FRAME_DELAY).await;
                session::run(s, id, hyper_util::rt::TokioIo::new(io), client).await;
            }
            Err(e) => {
                let why = format!("the connection upgrade failed: {e}");
                session::client_gone(&s, id, &client, &why).await;
            }
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(wire::PROTOCOL));
    h.insert("ci_tron_version", HeaderValue::from_static(wire::VERSION));
    resp
}

// ---- connecting back --------------------------------------------------------------------

/// Where to connect back to for `callback`: the submitting address, on the client's port.
/// `callback.host` is only honoured when it is that address (a client cannot send the
/// gateway's connection elsewhere). The address must be in
/// `executor.trusted_client_networks` or pass the outbound policy (a public address, or
/// one of `gateway.outbound.allow`); otherwise the submission is refused (403), before
/// anything is queued.
pub fn connect_back_target(
    s: &AppState,
    peer: SocketAddr,
    callback: &Callback,
) -> Result<Option<SocketAddr>, ApiError> {
    let Some(port) = callback.port.filter(|p| *p != 0) else {
        return Ok(None);
    };
    let ip = canonical(peer.ip());
    if let Some(host) = callback.host.as_deref()
        && host.parse::<IpAddr>().map(canonical).ok() != Some(ip)
    {
        tracing::info!(peer = %ip, host, "metadata.callback.host ignored: connecting back to the submitting address");
    }
    if trusted_network(s, ip).is_some() {
        return Ok(Some(SocketAddr::new(ip, port)));
    }
    match OutboundPolicy::from_gateway(&s.gw).check_ip(ip, Some(port)) {
        Ok(()) => Ok(Some(SocketAddr::new(ip, port))),
        Err(class) => {
            tracing::warn!(peer = %ip, port, "connect-back refused by the outbound policy");
            Err(ApiError::forbidden(format!(
                "the executor does not connect back to {ip}:{port}: it is {} (allow it with \
                 executor.trusted_client_networks or {}), or use a client that upgrades the \
                 submission connection",
                class.describe(),
                dutgate_core::outbound::ALLOW_KEY
            ))
            .with_field("metadata.callback"))
        }
    }
}

/// Connects to the client waiting at `addr` and runs the session there. A client that
/// cannot be reached gets its job cancelled.
pub fn connect_back(s: AppState, id: i64, addr: SocketAddr, client: Client) {
    tokio::spawn(async move {
        match tokio::time::timeout(CONNECT_BACK_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
        {
            Ok(Ok(conn)) => session::run(s, id, conn, client).await,
            Ok(Err(e)) => {
                let why = format!("connecting back to {addr}: {e}");
                session::client_gone(&s, id, &client, &why).await;
            }
            Err(_) => {
                let why = format!(
                    "connecting back to {addr}: no answer within {} s",
                    CONNECT_BACK_TIMEOUT.as_secs()
                );
                session::client_gone(&s, id, &client, &why).await;
            }
        }
    });
}

/// ci-tron's `200` answer to a submission with `metadata.callback.port`, with the job's id,
/// URL and state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectBackAnswer {
    /// Always 1.
    pub version: u32,
    /// Always `success`.
    pub error_msg: &'static str,
    pub id: i64,
    pub url: String,
    pub state: crate::model::JobState,
}

pub fn connect_back_answer(s: &AppState, id: i64) -> Response {
    let answer = ConnectBackAnswer {
        version: 1,
        error_msg: "success",
        id,
        url: crate::api::job_url(&s.gw, id),
        state: crate::model::JobState::Queued,
    };
    (StatusCode::OK, axum::Json(answer)).into_response()
}

/// The host (name or address, without the port) in the request's `Host` header, if it is
/// one: where the client reaches the gateway ([`Client::host`]).
pub fn client_host(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::HOST)?.to_str().ok()?;
    let url = reqwest::Url::parse(&format!("http://{value}/")).ok()?;
    // Only a bare `host[:port]`: anything else (credentials, a path) is not a Host header.
    if !url.username().is_empty() || url.path() != "/" || url.query().is_some() {
        return None;
    }
    url.host_str().map(str::to_string)
}

// ---- the job's target -------------------------------------------------------------------

/// The template variables a submission is validated with (`dutctl job validate`'s).
pub fn validation_vars(s: &AppState) -> TemplateVars {
    let mut vars = TemplateVars::placeholders();
    for (k, v) in &s.cfg.template_vars {
        vars.set(k.clone(), v.clone());
    }
    vars
}

/// The job as validated at submission; `None` if it no longer renders so.
pub fn validated_spec(s: &AppState, yaml: &str) -> Option<JobSpec> {
    JobSpec::parse_and_render(yaml, &validation_vars(s)).ok()
}

/// Whether the job's `target.id` comes from the machine variables (`{{ machine_id }}`): its
/// value then changes with the placeholder machine. Such a job names no machine of its own;
/// ci-tron's client names one with `-i` (`metadata.target`).
pub fn target_id_is_templated(s: &AppState, yaml: &str, validated: &JobSpec) -> bool {
    let mut other = validation_vars(s);
    if let Some(m) = other.machine.as_mut() {
        m.id = "52:54:00:00:00:02".into();
        m.full_name = "farm-dut-2".into();
    }
    JobSpec::parse_and_render(yaml, &other).is_ok_and(|spec| spec.target.id != validated.target.id)
}

// ---- `//api/…` --------------------------------------------------------------------------

/// `app` with its routes also answered under a leading `//` (`executorctl -e http://host/`
/// requests `http://host//api/v1/jobs`): such a path is served as the one with single
/// slashes. Other services' clients never send it; it is only `app`'s own routes.
pub fn with_double_slash(app: Router) -> Router {
    let inner = app.clone();
    app.route(
        "//{*path}",
        axum::routing::any(redispatch).with_state(inner),
    )
}

/// The documentation of the `//{*path}` route, for the service's document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(redispatch))]
pub struct DoubleSlash;

/// Any route of this service under a leading `//`, for every method.
///
/// `executorctl -e http://gateway:8000/` requests `http://gateway:8000//api/v1/jobs`: every
/// path starting with `//` is answered as the same path with single slashes (same rules,
/// same answers): `GET //api/v1/duts` is `GET /api/v1/duts`, and so on.
#[utoipa::path(method(get, post), path = "//{*path}", tag = "executor",
    security(("bearer" = []), ()),
    params(("path" = String, Path, description = "The route's path without its leading `/`.")),
    responses((status = "2XX", description = "The answer of the route with single slashes.",
        content((serde_json::Value = "application/json"), (String = "text/plain")))))]
async fn redispatch(State(inner): State<Router>, req: Request) -> Response {
    use tower::ServiceExt;
    let (parts, body) = req.into_parts();
    let path = collapse_slashes(parts.uri.path());
    let pq = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query = pq.parse().ok();
    let uri = match Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(e) => return ApiError::bad_request(format!("invalid path: {e}")).into_response(),
    };
    // A new request, not the routed one: that carries the `//{*path}` match, which the
    // inner route's own path parameters would be added to. It keeps what the connection
    // gave: the peer's address and the pending upgrade.
    let mut fresh = Request::new(body);
    *fresh.method_mut() = parts.method;
    *fresh.uri_mut() = uri;
    *fresh.version_mut() = parts.version;
    *fresh.headers_mut() = parts.headers;
    let mut ext = parts.extensions;
    if let Some(peer) = ext.remove::<ConnectInfo<SocketAddr>>() {
        fresh.extensions_mut().insert(peer);
    }
    if let Some(upgrade) = ext.remove::<hyper::upgrade::OnUpgrade>() {
        fresh.extensions_mut().insert(upgrade);
    }
    match inner.oneshot(fresh).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

fn collapse_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slashes() {
        assert_eq!(collapse_slashes("//api/v1/jobs"), "/api/v1/jobs");
        assert_eq!(collapse_slashes("///api//v1/dut/x"), "/api/v1/dut/x");
        assert_eq!(collapse_slashes("/a"), "/a");
    }

    #[test]
    fn upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("ci-tron-console"));
        assert!(!wants_console(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(wants_console(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!wants_console(&h));
    }

    #[test]
    fn client_hosts() {
        let host = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static(v));
            client_host(&h)
        };
        assert_eq!(host("127.0.0.1:8000").as_deref(), Some("127.0.0.1"));
        assert_eq!(host("[::1]:8000").as_deref(), Some("[::1]"));
        assert_eq!(host("ci-gateway").as_deref(), Some("ci-gateway"));
        assert_eq!(host("a@b:1"), None);
        assert_eq!(host("b/x"), None);
        assert_eq!(client_host(&HeaderMap::new()), None);
    }

    #[test]
    fn metadata_nulls() {
        let m: Minio = serde_json::from_str(r#"{"groups": null}"#).unwrap();
        assert!(m.groups.is_empty());
        let c: Callback = serde_json::from_str(r#"{"port": 4242}"#).unwrap();
        assert_eq!(c.port, Some(4242));
    }
}
