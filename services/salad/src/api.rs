//! salad's REST API (design.md §4; valve-infra's SALAD routes plus the console log).
//!
//! - `GET /api/v1/machine` → `{"machines": {"<id>": MachineConsole}}`
//! - `GET /api/v1/machine/{id}` → `MachineConsole`; creating the console server of a new
//!   machine needs a token and is bounded (`max_consoles`)
//! - `DELETE /api/v1/machine/{id}` (admin) → frees the machine's ports
//! - `GET /api/v1/machine/{id}/log?since=<offset|RFC 3339 time>&limit=<bytes>` → raw log
//! - `PUT /api/v1/machine/{id}/expect` → a boot of the machine is about to start
//! - `PUT`/`DELETE /api/v1/machine/{id}/secrets` → the current job's secrets, masked on output
//! - `GET /api/v1/machine/{id}/refusals?after=<seq>` → refused bindings naming the machine
//! - `GET /api/v1/machine/{id}/console` → read-write console over a WebSocket
//! - `GET /api/v1/ports` → the open console streams (serial ports and netconsoles)
//! - `PUT /api/v1/ports/{stream}/machine` (admin) → bind or unbind a stream
//!
//! Who may do what (docs/salad.md): reads of console content (log, refusals) need a token or
//! the machine's lease; changing what happens on a machine's console (expect, secrets, the
//! console WebSocket) needs the service role (the gateway's own actors) or the machine's
//! current lease, presented in the [`LEASE_HEADER`] and checked with mars
//! ([`dutgate_core::lease`]); freeing ports and binding streams by hand need the admin token.
//! Changes, console input sessions and refused attempts go to the audit log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use bytes::Bytes;
use dutgate_core::audit::{Actor, AuditLog};
use dutgate_core::auth::{Auth, Role};
use dutgate_core::lease::{self, Caller, LeaseCheck, Target};
use dutgate_core::{ApiError, ApiJson, MachineId};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};

use crate::console_log::{self, Since};
use crate::hub::{Hub, HubError, StreamStatus};
use crate::relay::{Machine, Refusal, StreamId};
use crate::secrets::Masker;

/// The header a job process presents its lease id in (instead of a token).
pub use dutgate_core::lease::LEASE_HEADER;

/// Offset of the first byte of a log response.
pub const LOG_START_HEADER: &str = "x-log-start";
/// Offset just past the last byte of a log response: the next `since`.
pub const LOG_END_HEADER: &str = "x-log-end";
pub const DEFAULT_LOG_LIMIT: usize = 4 * 1024 * 1024;
pub const MAX_LOG_LIMIT: usize = 64 * 1024 * 1024;

/// One machine's console, as `GET /api/v1/machine/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConsole {
    pub id: MachineId,
    /// Read-write console: DUT output live (no replay), input goes to the DUT.
    pub tcp_port: u16,
    /// Read-only: replays the recent scrollback, then follows live.
    pub tcp_port_logs: u16,
    /// True while a client is connected to `tcp_port`.
    pub has_client: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineList {
    pub machines: BTreeMap<MachineId, MachineConsole>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortList {
    pub ports: Vec<StreamStatus>,
}

/// `PUT /api/v1/machine/{id}/secrets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsBody {
    /// Replaces the machine's secrets (8 to 256 bytes each, at most 32).
    pub secrets: Vec<String>,
}

/// `GET /api/v1/machine/{id}/refusals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalList {
    pub refusals: Vec<Refusal>,
    /// The `seq` of the last refusal returned (or `after`): pass it as the next `after`.
    pub next: u64,
}

/// `PUT /api/v1/ports/{stream}/machine`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindBody {
    /// The machine to bind the stream to; `null` unbinds it.
    pub machine: Option<MachineId>,
}

#[derive(Clone)]
struct AppState {
    hub: Arc<Hub>,
    auth: Auth,
    leases: LeaseCheck,
    audit: AuditLog,
}

/// What the REST API needs besides the hub.
#[derive(Clone)]
pub struct Access {
    pub auth: Auth,
    /// Checks the leases job processes present (with mars).
    pub leases: LeaseCheck,
    pub audit: AuditLog,
}

fn console(m: &Machine) -> MachineConsole {
    MachineConsole {
        id: m.id,
        tcp_port: m.tcp_port,
        tcp_port_logs: m.tcp_port_logs,
        has_client: m.has_client(),
    }
}

pub fn router(hub: Arc<Hub>, access: Access) -> Router {
    let state = AppState {
        hub,
        auth: access.auth.clone(),
        leases: access.leases,
        audit: access.audit.clone(),
    };
    Router::new()
        .route("/api/v1/machine", get(list_machines))
        .route("/api/v1/machine/", get(list_machines))
        .route(
            "/api/v1/machine/{id}",
            get(get_machine).delete(delete_machine),
        )
        .route("/api/v1/machine/{id}/log", get(get_log))
        .route("/api/v1/machine/{id}/expect", put(expect))
        .route(
            "/api/v1/machine/{id}/secrets",
            put(put_secrets).delete(delete_secrets),
        )
        .route("/api/v1/machine/{id}/refusals", get(get_refusals))
        .route("/api/v1/machine/{id}/console", get(console_ws))
        .route("/api/v1/ports", get(list_ports))
        .route("/api/v1/ports/{stream}/machine", put(bind_stream))
        .with_state(state)
        .merge(
            Router::new()
                .route("/api/v1/audit", get(dutgate_core::audit::list))
                .with_state((access.audit, access.auth)),
        )
        .merge(dutgate_core::http::openapi(include_str!("../openapi.yaml")))
}

impl AppState {
    /// The admin; a refusal is audited.
    async fn admin(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        action: &str,
        target: &str,
    ) -> Result<Actor, ApiError> {
        match self.auth.check_identity(headers, Role::Admin) {
            Ok(id) => Ok(Actor::known(&id, peer)),
            Err(e) => {
                let actor = Actor::from_headers(&self.auth, headers, peer);
                self.audit
                    .record(&actor, action, target, &refused(&e))
                    .await;
                Err(e)
            }
        }
    }
}

fn refused(e: &ApiError) -> String {
    format!("refused: {}", e.body.error)
}

fn machine_target(id: MachineId) -> String {
    format!("machine/{id}")
}

/// What a request does to a machine's console, for [`authorize`].
#[derive(Debug, Clone, Copy)]
enum Request<'a> {
    /// Reads console content (log, refusals) or allocates a console server: any token or the
    /// machine's lease. Refusals are logged.
    Read(&'a str),
    /// Changes what happens on the console (expect, secrets, input): the service role or the
    /// machine's lease. Refusals are logged and audited under this action.
    Change(&'a str),
}

/// A token of the role `request` needs, or the machine's current lease. Refusals are logged
/// with the source (and audited for changes).
async fn authorize(
    s: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
    id: MachineId,
    request: Request<'_>,
) -> Result<Caller, ApiError> {
    let (needed, what) = match request {
        Request::Read(what) => (Role::User, what),
        Request::Change(what) => (Role::Service, what),
    };
    let r = lease::authorize(&s.auth, &s.leases, headers, needed, Target::Machine(id)).await;
    if let Err(e) = &r {
        tracing::warn!(machine = %id, source = %peer, status = e.status.as_u16(), reason = %e.body.error, request = what, "console request refused");
        if let Request::Change(action) = request {
            let actor = lease::refused_actor(&s.auth, headers, peer);
            s.audit
                .record(&actor, action, &machine_target(id), &refused(e))
                .await;
        }
    }
    r
}

fn parse_id(raw: &str) -> Result<MachineId, ApiError> {
    MachineId::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()).with_field("id"))
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::RangeExhausted { .. } | HubError::ShuttingDown => {
                ApiError::unavailable(e.to_string())
            }
            HubError::Full(_) | HubError::UnregisteredFull(_) => ApiError::conflict(e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

async fn list_machines(State(s): State<AppState>) -> Json<MachineList> {
    let machines = s.hub.all().iter().map(|m| (m.id, console(m))).collect();
    Json(MachineList { machines })
}

/// A known machine's ports are no secret (they are in the list); creating a console server
/// takes two ports, so it needs a token.
async fn get_machine(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<MachineConsole>, ApiError> {
    let id = parse_id(&raw)?;
    if let Some(m) = s.hub.get(id) {
        return Ok(Json(console(&m)));
    }
    let caller = authorize(
        &s,
        &headers,
        peer,
        id,
        Request::Read("create console server"),
    )
    .await?;
    let r = s.hub.get_or_create(id).await.inspect_err(|e| {
        tracing::warn!(machine = %id, source = %peer, error = %e, "console server not created");
    });
    let outcome = match &r {
        Ok(m) => format!("ok: ports {} and {}", m.tcp_port, m.tcp_port_logs),
        Err(e) => format!("failed: {e}"),
    };
    s.audit
        .record(
            &caller.actor(peer),
            "console.create",
            &machine_target(id),
            &outcome,
        )
        .await;
    let m = r?;
    Ok(Json(console(&m)))
}

/// The holder of the machine's lease (or an admin) is about to power it on.
async fn expect(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&raw)?;
    let caller = authorize(&s, &headers, peer, id, Request::Change("console.expect")).await?;
    s.hub.expect(id);
    tracing::info!(machine = %id, ?caller, window_s = s.hub.config.expect_window_seconds, "boot announced: the machine's console may bind");
    s.audit
        .record(
            &caller.actor(peer),
            "console.expect",
            &machine_target(id),
            "ok",
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_secrets(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    ApiJson(body): ApiJson<SecretsBody>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&raw)?;
    let caller = authorize(
        &s,
        &headers,
        peer,
        id,
        Request::Change("console.secrets.set"),
    )
    .await?;
    let r = set_secrets(&s, id, &body).await;
    // The count only: secrets are never logged, nor audited.
    let outcome = match &r {
        Ok(()) => format!("ok: {} secrets", body.secrets.len()),
        Err(e) => format!("failed: {}", e.body.error),
    };
    s.audit
        .record(
            &caller.actor(peer),
            "console.secrets.set",
            &machine_target(id),
            &outcome,
        )
        .await;
    r?;
    tracing::info!(machine = %id, ?caller, count = body.secrets.len(), "console secrets set");
    Ok(StatusCode::NO_CONTENT)
}

async fn set_secrets(s: &AppState, id: MachineId, body: &SecretsBody) -> Result<(), ApiError> {
    Masker::check(&body.secrets)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field("secrets"))?;
    let m = s.hub.get_or_create(id).await?;
    m.set_secrets(&body.secrets)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field("secrets"))
}

async fn delete_secrets(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&raw)?;
    let caller = authorize(
        &s,
        &headers,
        peer,
        id,
        Request::Change("console.secrets.clear"),
    )
    .await?;
    if let Some(m) = s.hub.get(id) {
        m.set_secrets(&[])
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    tracing::info!(machine = %id, ?caller, "console secrets cleared");
    s.audit
        .record(
            &caller.actor(peer),
            "console.secrets.clear",
            &machine_target(id),
            "ok",
        )
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct RefusalQuery {
    after: Option<u64>,
}

async fn get_refusals(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(q): Query<RefusalQuery>,
) -> Result<Json<RefusalList>, ApiError> {
    let id = parse_id(&raw)?;
    authorize(&s, &headers, peer, id, Request::Read("read refusals")).await?;
    let after = q.after.unwrap_or(0);
    let refusals = s.hub.get(id).map(|m| m.refusals(after)).unwrap_or_default();
    let next = refusals.last().map_or(after, |r| r.seq);
    Ok(Json(RefusalList { refusals, next }))
}

/// The machine's read-write console over a WebSocket: output from now on as binary
/// messages, every binary or text message the client sends goes to the DUT.
async fn console_ws(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    let caller = authorize(&s, &headers, peer, id, Request::Change("console.open")).await?;
    let m = s.hub.get_or_create(id).await?;
    tracing::info!(machine = %id, source = %peer, ?caller, "console WebSocket opened");
    s.audit
        .record(
            &caller.actor(peer),
            "console.open",
            &machine_target(id),
            "ok: input session",
        )
        .await;
    Ok(ws.on_upgrade(move |socket| relay_ws(m, peer, socket)))
}

async fn relay_ws(m: Arc<Machine>, peer: SocketAddr, socket: WebSocket) {
    let mut client = m.channel_client(peer);
    let (mut sink, mut stream) = socket.split();
    let write_timeout = m.write_timeout();
    loop {
        tokio::select! {
            out = client.recv() => {
                let Some(chunk) = out else { break };
                match tokio::time::timeout(write_timeout, sink.send(Message::Binary(chunk))).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
            msg = stream.next() => {
                let data = match msg {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => Bytes::copy_from_slice(t.as_str().as_bytes()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                if !data.is_empty() {
                    client.machine().send_input(data).await;
                }
            }
        }
    }
    let _ = sink.send(Message::Close(None)).await;
}

async fn bind_stream(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Result<ApiJson<BindBody>, ApiError>,
) -> Result<StatusCode, ApiError> {
    let target = format!("stream/{raw}");
    let actor = s.admin(&headers, peer, "console.bind", &target).await?;
    let ApiJson(body) = body?;
    let stream: u64 = raw.parse().map_err(|_| {
        ApiError::bad_request("stream must be a stream id from GET /api/v1/ports")
            .with_field("stream")
    })?;
    let r = match s.hub.admin_bind(StreamId(stream), body.machine).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(
            ApiError::not_found(format!("no open console stream {stream}")).with_field("stream"),
        ),
        Err(e) => Err(ApiError::from(e)),
    };
    let outcome = match &r {
        Ok(()) => match body.machine {
            Some(m) => format!("ok: bound to machine/{m}"),
            None => "ok: unbound".to_string(),
        },
        Err(e) => format!("failed: {}", e.body.error),
    };
    s.audit
        .record(&actor, "console.bind", &target, &outcome)
        .await;
    r?;
    tracing::info!(stream, machine = ?body.machine, "admin (re)binds a console stream");
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_machine(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let target = format!("machine/{raw}");
    let actor = s.admin(&headers, peer, "console.delete", &target).await?;
    let id = parse_id(&raw)?;
    let r = match s.hub.delete(id).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::not_found(format!(
            "no console server for machine {id}"
        ))),
        Err(e) => Err(ApiError::from(e)),
    };
    let outcome = match &r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("failed: {}", e.body.error),
    };
    s.audit
        .record(&actor, "console.delete", &target, &outcome)
        .await;
    r?;
    tracing::info!(machine = %id, "console server deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    since: Option<String>,
    limit: Option<usize>,
}

async fn get_log(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
    authorize(&s, &headers, peer, id, Request::Read("read log")).await?;
    let hub = &s.hub;
    if hub.get(id).is_none() {
        return Err(ApiError::not_found(format!(
            "no console server for machine {id}"
        )));
    }
    let since = match q.since.as_deref() {
        None | Some("") => Since::Offset(0),
        Some(s) => Since::parse(s).map_err(|e| ApiError::bad_request(e).with_field("since"))?,
    };
    let limit = q.limit.unwrap_or(DEFAULT_LOG_LIMIT);
    if limit == 0 || limit > MAX_LOG_LIMIT {
        return Err(
            ApiError::bad_request(format!("limit must be between 1 and {MAX_LOG_LIMIT}"))
                .with_field("limit"),
        );
    }
    let slice = console_log::read(&hub.log_dir(id), &since, limit)
        .await
        .map_err(ApiError::internal)?;
    let mut resp = slice.data.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(
        HeaderName::from_static(LOG_START_HEADER),
        HeaderValue::from(slice.start),
    );
    h.insert(
        HeaderName::from_static(LOG_END_HEADER),
        HeaderValue::from(slice.end),
    );
    Ok(resp)
}

async fn list_ports(State(s): State<AppState>) -> Json<PortList> {
    Json(PortList {
        ports: s.hub.streams(),
    })
}
