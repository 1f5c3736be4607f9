//! salad's REST API (design.md §4; valve-infra's SALAD routes plus the console log). Its
//! OpenAPI document ([`openapi`]) is derived from the handlers below.
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

use axum::extract::FromRef;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use dutgate_core::audit::{Actor, AuditLog, AuditState};
use dutgate_core::auth::{Auth, Role};
use dutgate_core::lease::{self, Caller, LeaseCheck, Target};
use dutgate_core::{ApiError, ApiJson, ErrorBody, MachineId};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

/// The `id` path parameter.
const ID: &str =
    "The machine's MAC address: `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` or 12 hex digits.";

/// A 400 of a query or upgrade that axum's extractor refuses is plain text.
const TEXT_400: &str = "A malformed parameter: JSON `ErrorBody`, or plain text from the extractor.";

/// One machine's console, as `GET /api/v1/machine/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineConsole {
    pub id: MachineId,
    /// Read-write console: DUT output live (no replay), input goes to the DUT.
    pub tcp_port: u16,
    /// Read-only: replays the recent scrollback, then follows live.
    pub tcp_port_logs: u16,
    /// True while a client is connected to `tcp_port`.
    pub has_client: bool,
}

/// Every machine's console, keyed by machine id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineList {
    pub machines: BTreeMap<MachineId, MachineConsole>,
}

/// The open console streams.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortList {
    pub ports: Vec<StreamStatus>,
}

/// `PUT /api/v1/machine/{id}/secrets`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretsBody {
    /// Replaces the machine's secrets (8 to 256 bytes each, at most 32).
    #[schema(max_items = 32)]
    pub secrets: Vec<String>,
}

/// `GET /api/v1/machine/{id}/refusals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RefusalList {
    pub refusals: Vec<Refusal>,
    /// The `seq` of the last refusal returned (or `after`): pass it as the next `after`.
    pub next: u64,
}

/// `PUT /api/v1/ports/{stream}/machine`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
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

impl FromRef<AppState> for AuditState {
    fn from_ref(s: &AppState) -> Self {
        (s.audit.clone(), s.auth.clone())
    }
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

/// Every documented route; `/api/v1/machine/` (valve-infra's spelling of the list) is an
/// undocumented alias.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_machines))
        .route("/api/v1/machine/", get(list_machines))
        .routes(routes!(get_machine, delete_machine))
        .routes(routes!(get_log))
        .routes(routes!(expect))
        .routes(routes!(put_secrets, delete_secrets))
        .routes(routes!(get_refusals))
        .routes(routes!(console_ws))
        .routes(routes!(list_ports))
        .routes(routes!(bind_stream))
        .routes(routes!(dutgate_core::audit::list))
}

fn complete(doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let mut doc = dutgate_core::openapi::document(
        doc,
        "dutgate salad",
        "Serial consoles of the machines, relayed over TCP, with a persistent console log \
         (docs/salad.md). The consoles themselves are raw TCP: `tcp_port` (read-write) and \
         `tcp_port_logs` (read-only, replays the scrollback first), open to \
         `salad.console_client_networks` only; from elsewhere the read-write console is the \
         WebSocket `/api/v1/machine/{id}/console`. A job may present its machine's current \
         lease in `X-Lease-Id` instead of a token (checked with mars). Console servers \
         created, expectations, secrets, console input sessions, deletions, bindings and \
         refused attempts at them are audited.",
    );
    if let Some(c) = doc.components.as_mut() {
        c.security_schemes.insert(
            "lease".to_string(),
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(LEASE_HEADER))).into(),
        );
    }
    doc
}

/// salad's OpenAPI document, as `GET /api/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    complete(api().into_openapi())
}

pub fn router(hub: Arc<Hub>, access: Access) -> Router {
    let state = AppState {
        hub,
        auth: access.auth,
        leases: access.leases,
        audit: access.audit,
    };
    let (router, doc) = api().split_for_parts();
    router
        .with_state(state)
        .merge(dutgate_core::openapi::router(&complete(doc)))
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

/// Every machine's console ports (no token).
///
/// valve-infra's route; also answered at `/api/v1/machine/` (an undocumented alias).
#[utoipa::path(get, path = "/api/v1/machine", tag = "consoles",
    responses((status = 200, description = "The consoles, keyed by id.", body = MachineList)))]
async fn list_machines(State(s): State<AppState>) -> Json<MachineList> {
    let machines = s.hub.all().iter().map(|m| (m.id, console(m))).collect();
    Json(MachineList { machines })
}

/// A machine's console ports; creates its console server when new.
///
/// A known machine's ports need no token (they are in the list). Creating the console server
/// of a new machine (two ports, persisted) needs a token or the machine's lease, and is
/// bounded by `salad.max_consoles` (409); 503 when the `console_ports` range is exhausted.
#[utoipa::path(get, path = "/api/v1/machine/{id}", tag = "consoles",
    params(("id" = String, Path, description = ID)), security((), ("bearer" = []), ("lease" = [])),
    responses((status = 200, description = "The machine's console.", body = MachineConsole)))]
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

/// A boot of the machine is about to start (service role or the machine's lease).
///
/// Call right before powering the machine on. For `salad.expect_window_seconds`, or until a
/// stream binds, a console stream that is not bound yet may bind to the machine by announcing
/// it (`SALAD.machine_id=`); a netconsole must also come from the machine's address
/// (docs/salad.md, "Binding rules").
#[utoipa::path(put, path = "/api/v1/machine/{id}/expect", tag = "consoles",
    params(("id" = String, Path, description = ID)), security(("bearer" = []), ("lease" = [])),
    responses((status = 204, description = "Announced.")))]
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

/// The current job's secrets, masked in all console output (service role or the lease).
///
/// Replaces the machine's secrets: every exact occurrence in the machine's output becomes
/// `[MASKED]` before any client, the scrollback or the console log sees it, also when split
/// over several reads (a possible secret's start is held back up to `salad.secret_hold_ms`).
#[utoipa::path(put, path = "/api/v1/machine/{id}/secrets", tag = "consoles",
    params(("id" = String, Path, description = ID)), request_body = SecretsBody,
    security(("bearer" = []), ("lease" = [])),
    responses((status = 204, description = "Set.")))]
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

/// Forgets the machine's secrets (service role or the machine's lease).
#[utoipa::path(delete, path = "/api/v1/machine/{id}/secrets", tag = "consoles",
    params(("id" = String, Path, description = ID)), security(("bearer" = []), ("lease" = [])),
    responses((status = 204, description = "Cleared.")))]
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct RefusalQuery {
    /// Only refusals with a larger `seq`; default 0.
    after: Option<u64>,
}

/// Console streams that announced the machine and were refused (token or the lease).
///
/// Kept in memory, the last 100 per machine with a console server: the machine's job reads
/// them (and shows them as events) from the `seq` it last saw.
#[utoipa::path(get, path = "/api/v1/machine/{id}/refusals", tag = "consoles",
    params(("id" = String, Path, description = ID), RefusalQuery),
    security(("bearer" = []), ("lease" = [])),
    responses((status = 200, description = "The refusals, oldest first.", body = RefusalList),
        (status = 400, description = TEXT_400,
            content((ErrorBody = "application/json"), (String = "text/plain")))))]
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

/// The machine's read-write console over a WebSocket (service role or the machine's lease).
///
/// The server sends the DUT output from now on (no replay) as binary messages; every binary
/// or text message the client sends goes to the DUT. A client that cannot keep up is dropped.
#[utoipa::path(get, path = "/api/v1/machine/{id}/console", tag = "consoles",
    params(("id" = String, Path, description = ID)), security(("bearer" = []), ("lease" = [])),
    responses((status = 101, description = "Switching to the WebSocket protocol."),
        (status = 400, description = TEXT_400,
            content((ErrorBody = "application/json"), (String = "text/plain")))))]
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

/// Binds an open console stream to a machine, or unbinds it (admin).
///
/// What an announcement never does: moves a bound stream (e.g. an adapter rewired to another
/// DUT). The machine's previous stream, if any, is unbound.
#[utoipa::path(put, path = "/api/v1/ports/{stream}/machine", tag = "consoles",
    params(("stream" = u64, Path, description = "The stream's `id` in `GET /api/v1/ports`.")),
    security(("bearer" = [])), request_body = BindBody,
    responses((status = 204, description = "Bound (or unbound).")))]
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

/// Frees the machine's console ports (admin).
#[utoipa::path(delete, path = "/api/v1/machine/{id}", tag = "consoles",
    params(("id" = String, Path, description = ID)), security(("bearer" = [])),
    responses((status = 204, description = "Deleted.")))]
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

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// A byte offset (digits) or an RFC 3339 time; empty or absent = 0.
    since: Option<String>,
    /// Most bytes to answer (1 to 67108864, default 4194304).
    #[param(minimum = 1, maximum = 67108864)]
    limit: Option<usize>,
}

/// The stored console log from an offset or a time (token or the machine's lease).
///
/// Raw bytes, at most `limit`. `X-Log-End` is the offset just past the last byte: pass it as
/// the next `since` to read on. 404 when the machine has no console server.
#[utoipa::path(get, path = "/api/v1/machine/{id}/log", tag = "consoles",
    params(("id" = String, Path, description = ID), LogQuery),
    security(("bearer" = []), ("lease" = [])),
    responses((status = 200, description = "The log slice.", content_type = "text/plain",
            body = String, headers(("x-log-start" = u64, description = "Offset of the first byte."),
                ("x-log-end" = u64, description = "Offset just past the last byte: the next `since`."))),
        (status = 400, description = TEXT_400,
            content((ErrorBody = "application/json"), (String = "text/plain")))))]
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

/// The open console streams: serial ports and netconsoles (no token).
#[utoipa::path(get, path = "/api/v1/ports", tag = "consoles",
    responses((status = 200, description = "The streams.", body = PortList)))]
async fn list_ports(State(s): State<AppState>) -> Json<PortList> {
    Json(PortList {
        ports: s.hub.streams(),
    })
}
