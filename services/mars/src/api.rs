//! mars's REST routes (design.md §3, valve-infra compatible where it had the route).
//!
//! Access: read routes answer the DUT network, any valid token or the holder of a current
//! lease (`X-Lease-Id`); registration the DUT network or the admin token (with the rules of
//! `machines::registration`); admin routes (PATCH, retire, activate, discovery changes) need
//! the admin token; lease routes need the service role (the executor, the trainer), and a
//! lease's heartbeat and release also accept that lease itself in `X-Lease-Id` (its job
//! process). Lease ids are shown to admins, services and each lease's own holder only. Admin
//! changes and every refused change go to the audit log. See `docs/machines.md` for bodies
//! and errors.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dutgate_core::audit::{Actor, AuditList, AuditLog, AuditQuery};
use dutgate_core::auth::{Auth, Role};
use dutgate_core::lease::presented;
use dutgate_core::{ApiError, ApiJson, MachineId, Secret, Tag};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::machines::{Mars, MarsError, Source, check_registration};
use crate::model::{
    ActivateRequest, DiscoverRequest, DiscoveryStatus, EventBatch, Lease, LeaseBatchRequest,
    LeaseBatchResponse, LeaseList, LeaseRefusal, LeaseRequest, LeaseResult, LoopReport,
    MAX_LEASE_BATCH, Machine, MachineEvents, MachineList, MachinePatch, MachineState, Registration,
    ReleaseRequest, RetireRequest, TrainingReport, TrainingRun,
};
use crate::power::PowerError;
use crate::store::StoreError;

/// Largest request body: a registration with 256 tags of 128 bytes fits many times over.
const BODY_LIMIT: usize = 256 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub mars: Mars,
    pub auth: Auth,
    pub shutdown: CancellationToken,
    /// `None` for a mars started without a state dir (tests and benchmarks of other parts):
    /// audited calls are then only traced.
    pub audit: Option<AuditLog>,
}

impl AppState {
    async fn audit(&self, actor: &Actor, action: &str, target: &str, outcome: &str) {
        dutgate_core::audit::record_or_trace(self.audit.as_ref(), actor, action, target, outcome)
            .await;
    }

    /// The caller, who must have `needed`; a refusal is audited.
    async fn require(
        &self,
        headers: &HeaderMap,
        source: &str,
        needed: Role,
        action: &str,
        target: &str,
    ) -> Result<Actor, ApiError> {
        match self.auth.check_identity(headers, needed) {
            Ok(id) => Ok(Actor::known(&id, source)),
            Err(e) => {
                let actor = Actor::from_headers(&self.auth, headers, source);
                self.audit(&actor, action, target, &refused(&e)).await;
                Err(e)
            }
        }
    }

    /// Records an admin change and its outcome.
    async fn audit_outcome<T>(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        result: &Result<T, ApiError>,
    ) {
        let outcome = match result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("failed: {}", e.body.error),
        };
        self.audit(actor, action, target, &outcome).await;
    }
}

fn refused(e: &ApiError) -> String {
    format!("refused: {}", e.body.error)
}

/// Extractor: the caller's address, for logs and the audit log.
pub struct Peer(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Peer(peer_of(parts)))
    }
}

fn peer_of(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.to_string())
}

impl From<MarsError> for ApiError {
    fn from(e: MarsError) -> Self {
        match e {
            MarsError::Invalid(i) => ApiError::bad_request(i.to_string()).with_field(i.field),
            MarsError::Conflict(m) => ApiError::conflict(m),
            MarsError::Power(p @ PowerError::NoSuchPort { .. }) => {
                ApiError::unprocessable(p.to_string()).with_field("port_id")
            }
            MarsError::Power(p) => ApiError::unprocessable(p.to_string()),
            MarsError::Store(s) => s.into(),
            MarsError::Forbidden(m) => ApiError::forbidden(m),
            MarsError::TooMany(m) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, m),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(id) => ApiError::not_found(format!("unknown machine {id}")),
            StoreError::Transition(t) => ApiError::conflict(t.to_string()),
            StoreError::Conflict(m) => ApiError::conflict(m),
            StoreError::Forbidden(m) => ApiError::forbidden(m),
            StoreError::LeaseGone(l) => ApiError::new(
                StatusCode::GONE,
                format!("lease {l} is gone (expired or released)"),
            ),
            StoreError::Contention(id) => {
                ApiError::unavailable(format!("machine {id} is too busy; retry"))
            }
            other => ApiError::internal(other),
        }
    }
}

/// Extractor: a peer on the DUT network, any valid token, or the holder of a current lease.
/// Remembers what decides which lease ids the caller may see: a lease id is a job process's
/// credential and must reach no one else (see [`hide_lease_ids`]).
pub struct DutOrToken {
    /// An admin or one of the gateway's services: sees every lease id.
    privileged: bool,
    /// The lease the caller presented: that lease's id is its own to see.
    lease: Option<Secret>,
}

impl FromRequestParts<AppState> for DutOrToken {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let checked = s.auth.check(&parts.headers, Role::User);
        let role = checked.as_ref().ok().copied();
        let lease = presented(&parts.headers).and_then(Result::ok);
        let caller = DutOrToken {
            privileged: role.is_some_and(|r| r.allows(Role::Service)),
            lease,
        };
        if role.is_some() || peer.is_some_and(|ip| s.auth.is_dut_address(ip)) {
            return Ok(caller);
        }
        // A job process has no token: the lease it holds lets it read.
        if let Some(l) = &caller.lease
            && s.mars.store.machine_by_lease(l.expose()).await.is_ok()
        {
            return Ok(caller);
        }
        match checked {
            // A token that is not valid (revoked, expired, unknown) is told so.
            Err(e) if parts.headers.contains_key(header::AUTHORIZATION) => Err(e),
            _ => Err(ApiError::forbidden(
                "this endpoint is only reachable from the DUT network, with a token or with a \
                 current lease (X-Lease-Id)",
            )),
        }
    }
}

/// Extractor: who registers. A peer on the DUT network (a DUT), or the admin token from
/// anywhere; a user token is not a DUT (403, logged with the source address).
pub struct Registrant(Source);

impl FromRequestParts<AppState> for Registrant {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let admin = s.auth.check(&parts.headers, Role::Admin).is_ok();
        match peer {
            Some(ip) if admin || s.auth.is_dut_address(ip) => {
                Ok(Registrant(Source::new(ip, admin)))
            }
            _ => {
                let source = peer_of(parts);
                tracing::warn!(
                    source,
                    "registration refused: not from the DUT network and no admin token"
                );
                let e = ApiError::forbidden(
                    "registration is accepted only from the DUT network or with the admin token",
                );
                let actor = Actor::from_headers(&s.auth, &parts.headers, &source);
                s.audit(&actor, "machine.register", "machines", &refused(&e))
                    .await;
                Err(e)
            }
        }
    }
}

/// The documented routes (and the trailing-slash alias of `/api/v1/machine/{id}`).
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_machines))
        .routes(routes!(register))
        .routes(routes!(register_as_valve_infra))
        .routes(routes!(get_discovery, start_discovery, stop_discovery))
        .routes(routes!(get_machine, patch_machine))
        .route(
            "/api/v1/machine/{id}/",
            get(get_machine).patch(patch_machine),
        )
        .routes(routes!(retire))
        .routes(routes!(activate))
        .routes(routes!(machine_events))
        .routes(routes!(training))
        .routes(routes!(training_loop))
        .routes(routes!(list_leases, acquire))
        .routes(routes!(acquire_batch))
        .routes(routes!(heartbeat))
        .routes(routes!(release))
        .routes(routes!(events))
        .routes(routes!(audit_log))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
}

/// mars' routes with their OpenAPI document (served at `OPENAPI_PATH`, no token needed).
pub fn router(state: AppState) -> Router {
    let (router, doc) = api().with_state(state).split_for_parts();
    router.merge(dutgate_core::openapi::router(&complete(doc)))
}

/// mars' OpenAPI document: the one [`router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    complete(api().into_openapi())
}

fn complete(doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    dutgate_core::openapi::document(
        doc,
        "dutgate mars",
        "The machine registry: machines, their states and leases, training reports, \
         discovery and machine events (docs/machines.md). Read routes answer a peer on the DUT \
         networks, any valid token or the holder of a current lease (`X-Lease-Id`); lease ids \
         are shown only to admins, services and each lease's own holder (`\"\"` to others). \
         Admin changes and every refused change go to the audit log. Bodies above 256 KiB are \
         refused (413); unknown query parameters too (400).",
    )
}

fn parse_id(s: &str) -> Result<MachineId, ApiError> {
    MachineId::parse(s).map_err(|e| ApiError::bad_request(e.to_string()).with_field("id"))
}

/// A JSON body that may be omitted (retire/activate work with an empty POST).
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

async fn view_one(mars: &Mars, id: MachineId) -> Result<Machine, ApiError> {
    let row = mars.store.get(id).await?;
    let latest = mars.store.runs(id, 1).await?;
    Ok(mars.view(&row, latest.first()))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only machines in this state.
    #[param(value_type = Option<MachineState>)]
    state: Option<String>,
    /// Comma-separated tags the machines must all have.
    tags: Option<String>,
}

/// Blanks the lease ids of machines shown to someone who is neither an admin nor one of the
/// gateway's services, except the caller's own lease: boot, pdu, salad and mars itself take a
/// lease id as proof of holding the machine.
fn hide_lease_ids<'a>(caller: &DutOrToken, machines: impl IntoIterator<Item = &'a mut Machine>) {
    hide_ids(
        caller,
        machines.into_iter().filter_map(|m| m.lease.as_mut()),
    );
}

fn hide_ids<'a>(caller: &DutOrToken, leases: impl IntoIterator<Item = &'a mut Lease>) {
    if caller.privileged {
        return;
    }
    for lease in leases {
        if !caller
            .lease
            .as_ref()
            .is_some_and(|own| own.matches(&lease.id))
        {
            lease.id.clear();
        }
    }
}

/// List machines (DUT network, any token or a current lease).
#[utoipa::path(get, path = "/api/v1/machines", tag = "mars", params(ListQuery),
    responses((status = 200, description = "The machines.", body = MachineList)))]
async fn list_machines(
    caller: DutOrToken,
    State(s): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<ApiJson<MachineList>, ApiError> {
    let q = query(q)?;
    let state: Option<MachineState> = q
        .state
        .as_deref()
        .map(|v| {
            v.parse()
                .map_err(|e: String| ApiError::bad_request(e).with_field("state"))
        })
        .transpose()?;
    let tags: Vec<Tag> = q
        .tags
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| Tag::parse(t).map_err(|e| ApiError::bad_request(e.to_string()).with_field("tags")))
        .collect::<Result<_, _>>()?;
    let rows = s.mars.store.list().await?;
    let runs: HashMap<MachineId, TrainingRun> = s
        .mars
        .store
        .latest_runs()
        .await?
        .into_iter()
        .map(|r| (r.machine_id, r))
        .collect();
    let mut machines: Vec<Machine> = rows
        .iter()
        .filter(|r| state.is_none_or(|st| r.state == st))
        .map(|r| s.mars.view(r, runs.get(&r.id)))
        .filter(|m| m.has_tags(&tags))
        .collect();
    hide_lease_ids(&caller, &mut machines);
    Ok(ApiJson(MachineList { machines }))
}

/// One machine (DUT network, any token or a current lease).
///
/// `/api/v1/machine/{id}/` (GET and PATCH) is an undocumented alias kept for valve-infra.
#[utoipa::path(get, path = "/api/v1/machine/{id}", tag = "mars",
    params(("id" = MachineId, Path, description = "The machine (MAC address).")),
    responses((status = 200, description = "The machine.", body = Machine)))]
async fn get_machine(
    caller: DutOrToken,
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<ApiJson<Machine>, ApiError> {
    let mut machine = view_one(&s.mars, parse_id(&id)?).await?;
    hide_lease_ids(&caller, [&mut machine]);
    Ok(ApiJson(machine))
}

/// Register or update a machine (DUT network or admin token).
///
/// The registration agent on the DUT posts what it found; a known MAC updates the machine.
/// From the DUT network without a token: an unknown MAC creates a machine, within
/// `max_unknown_machines` machines in `WAIT_FOR_CONFIG` and `new_machines_per_minute` (429
/// otherwise); a known machine changes only from its recorded `ip_address` (then not its
/// address, and not while a job holds it) or during its own registration/check boot; 403
/// otherwise, naming the rule. With the admin token: any machine, from anywhere. A user token
/// is not a DUT (403).
#[utoipa::path(post, path = "/api/v1/machine", tag = "mars", request_body = Registration,
    responses((status = 200, description = "An existing machine was updated.", body = Machine),
        (status = 201, description = "A new machine.", body = Machine)))]
async fn register(
    Registrant(source): Registrant,
    State(s): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Registration>,
) -> Result<Response, ApiError> {
    // DUT-supplied: `Registration`'s deserialisation and this check are what the fuzz
    // target (`machines::parse_registration`) exercises.
    let reg = check_registration(body, s.mars.config.max_tags).map_err(MarsError::from)?;
    let id = reg.id;
    let existed = s.mars.store.find(id).await?.is_some();
    let row = match s.mars.register(reg, source).await {
        Ok(row) => row,
        Err(e) => {
            let e = ApiError::from(e);
            // The registration rules' refusals (a known machine from elsewhere, too many
            // unknown ones); bad bodies are not attempts on anything.
            if matches!(
                e.status,
                StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
            ) {
                let actor = Actor::from_headers(&s.auth, &headers, &peer);
                s.audit(
                    &actor,
                    "machine.register",
                    &format!("machine/{id}"),
                    &refused(&e),
                )
                .await;
            }
            return Err(e);
        }
    };
    let mut view = view_one(&s.mars, row.id).await?;
    if !source.admin
        && let Some(lease) = view.lease.as_mut()
    {
        lease.id.clear();
    }
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, ApiJson(view)).into_response())
}

/// Register or update a machine, valve-infra's path (DUT network or admin token).
///
/// valve-infra's registration client (`machine_registration.py register`) reports
/// "Registration failed" unless the answer is `200`, so a new machine is answered `200` here
/// too. Otherwise exactly `POST /api/v1/machine` (`201` for a new machine).
#[utoipa::path(post, path = "/api/v1/machine/", tag = "mars", request_body = Registration,
    responses((status = 200, description = "The new or updated machine.", body = Machine)))]
async fn register_as_valve_infra(
    registrant: Registrant,
    state: State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    body: ApiJson<Registration>,
) -> Result<Response, ApiError> {
    let mut response = register(registrant, state, peer, headers, body).await?;
    if response.status() == StatusCode::CREATED {
        *response.status_mut() = StatusCode::OK;
    }
    Ok(response)
}

/// Change a machine's settings (admin).
///
/// Only the keys present change; `null` clears a nullable key. 409: the PDU port belongs to
/// another machine, or a `RUNNING` machine would lose its port; 422: the PDU does not know
/// the port.
#[utoipa::path(patch, path = "/api/v1/machine/{id}", tag = "mars",
    params(("id" = MachineId, Path, description = "The machine (MAC address).")),
    request_body = MachinePatch,
    responses((status = 200, description = "The machine.", body = Machine)))]
async fn patch_machine(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<ApiJson<MachinePatch>, ApiError>,
) -> Result<ApiJson<Machine>, ApiError> {
    let target = format!("machine/{id}");
    let actor = s
        .require(&headers, &source, Role::Admin, "machine.edit", &target)
        .await?;
    let ApiJson(body) = body?;
    let id = parse_id(&id)?;
    let r = s.mars.patch(id, body).await.map_err(ApiError::from);
    s.audit_outcome(&actor, "machine.edit", &target, &r).await;
    r?;
    Ok(ApiJson(view_one(&s.mars, id).await?))
}

/// Retire a machine (admin; the body may be empty).
///
/// A machine retired while its job runs stays `RETIRED` and is powered off when the job
/// lets go (or at once with `cancel_job`).
#[utoipa::path(post, path = "/api/v1/machine/{id}/retire", tag = "mars",
    params(("id" = MachineId, Path, description = "The machine (MAC address).")),
    request_body = Option<RetireRequest>,
    responses((status = 200, description = "The machine.", body = Machine),
        (status = 413, description = "Above 256 KiB.", body = String,
            content_type = "text/plain")))]
async fn retire(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<ApiJson<Machine>, ApiError> {
    let target = format!("machine/{id}");
    let actor = s
        .require(&headers, &source, Role::Admin, "machine.retire", &target)
        .await?;
    let id = parse_id(&id)?;
    let req: RetireRequest = optional_body(&body)?;
    let r = s.mars.retire(id, req).await.map_err(ApiError::from);
    s.audit_outcome(&actor, "machine.retire", &target, &r).await;
    r?;
    Ok(ApiJson(view_one(&s.mars, id).await?))
}

/// Bring a retired or quarantined machine back to training (admin).
///
/// The body may be empty. 409 when the machine is neither retired nor quarantined.
#[utoipa::path(post, path = "/api/v1/machine/{id}/activate", tag = "mars",
    params(("id" = MachineId, Path, description = "The machine (MAC address).")),
    request_body = Option<ActivateRequest>,
    responses((status = 200, description = "The machine.", body = Machine),
        (status = 413, description = "Above 256 KiB.", body = String,
            content_type = "text/plain")))]
async fn activate(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<ApiJson<Machine>, ApiError> {
    let target = format!("machine/{id}");
    let actor = s
        .require(&headers, &source, Role::Admin, "machine.activate", &target)
        .await?;
    let id = parse_id(&id)?;
    let req: ActivateRequest = optional_body(&body)?;
    let r = s
        .mars
        .activate(id, req.reason)
        .await
        .map_err(ApiError::from);
    s.audit_outcome(&actor, "machine.activate", &target, &r)
        .await;
    r?;
    Ok(ApiJson(view_one(&s.mars, id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitQuery {
    limit: Option<i64>,
}

/// A machine's state changes, oldest first (DUT network, any token or a current lease).
#[utoipa::path(get, path = "/api/v1/machine/{id}/events", tag = "mars",
    params(("id" = MachineId, Path, description = "The machine (MAC address)."),
        ("limit" = Option<i64>, Query,
            description = "The newest `limit` events (default 1000, clamped to 1..10000).")),
    responses((status = 200, description = "The events.", body = MachineEvents)))]
async fn machine_events(
    _: DutOrToken,
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> Result<ApiJson<MachineEvents>, ApiError> {
    let id = parse_id(&id)?;
    let limit = query(q)?.limit.unwrap_or(1000).clamp(1, 10_000);
    s.mars.store.get(id).await?;
    let events = s.mars.store.machine_events(id, limit).await?;
    Ok(ApiJson(MachineEvents { events }))
}

/// A machine's training and quick-check runs, most recent first (DUT network, any token or
/// a current lease).
#[utoipa::path(get, path = "/api/v1/machine/{id}/training", tag = "mars",
    params(("id" = MachineId, Path, description = "The machine (MAC address)."),
        ("limit" = Option<i64>, Query,
            description = "How many runs (default 10, clamped to 1..1000).")),
    responses((status = 200, description = "The report.", body = TrainingReport)))]
async fn training(
    _: DutOrToken,
    State(s): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<LimitQuery>, QueryRejection>,
) -> Result<ApiJson<TrainingReport>, ApiError> {
    let id = parse_id(&id)?;
    let limit = query(q)?.limit.unwrap_or(10).clamp(1, 1000);
    let row = s.mars.store.get(id).await?;
    let runs = s.mars.store.runs(id, limit).await?;
    let view = s.mars.view(&row, runs.first());
    Ok(ApiJson(TrainingReport {
        machine_id: id,
        state: row.state,
        summary: view.training,
        runs,
    }))
}

/// Loop `n` of the latest training run, 0 = the registration boot (valve-infra/ci-tron).
///
/// With its console log reference. DUT network, any token or a current lease.
#[utoipa::path(get, path = "/api/v1/machine/{id}/training/loop/{n}", tag = "mars",
    params(("id" = MachineId, Path, description = "The machine (MAC address)."),
        ("n" = u32, Path, description = "The loop.")),
    responses((status = 200, description = "The loop.", body = LoopReport),
        (status = 400, description = "`n` is not a number.", body = String,
            content_type = "text/plain")))]
async fn training_loop(
    _: DutOrToken,
    State(s): State<AppState>,
    Path((id, n)): Path<(String, u32)>,
) -> Result<ApiJson<LoopReport>, ApiError> {
    let id = parse_id(&id)?;
    s.mars.store.get(id).await?;
    let runs = s.mars.store.runs(id, 1).await?;
    runs.first()
        .and_then(|r| r.loops.iter().find(|l| l.n == n).cloned())
        .map(ApiJson)
        .ok_or_else(|| {
            ApiError::not_found(format!("machine {id} has no loop {n} in its latest run"))
        })
}

/// The discovery in progress, if any (DUT network, any token or a current lease).
#[utoipa::path(get, path = "/api/v1/machine/discover", tag = "mars",
    responses((status = 200, description = "The discovery, or null.", body = DiscoveryStatus)))]
async fn get_discovery(
    _: DutOrToken,
    State(s): State<AppState>,
) -> Result<ApiJson<DiscoveryStatus>, ApiError> {
    Ok(ApiJson(DiscoveryStatus {
        discovery: s.mars.active_discovery().await?,
    }))
}

/// Start discovering the machine behind a PDU port (admin).
///
/// Powers the port on; the next unknown machine to register gets that port. 409 while
/// another discovery runs; 422 when the PDU refuses or does not know the port.
#[utoipa::path(post, path = "/api/v1/machine/discover", tag = "mars",
    request_body = DiscoverRequest,
    responses((status = 201, description = "Started.", body = DiscoveryStatus)))]
async fn start_discovery(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    body: Result<ApiJson<DiscoverRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let actor = s
        .require(
            &headers,
            &source,
            Role::Admin,
            "discovery.start",
            "discovery",
        )
        .await?;
    let ApiJson(body) = body?;
    let target = format!("pdu/{}/port/{}", body.pdu, body.port_id);
    let r = s
        .mars
        .start_discovery(body.pdu, body.port_id, body.timeout)
        .await
        .map_err(ApiError::from);
    s.audit_outcome(&actor, "discovery.start", &target, &r)
        .await;
    let d = r?;
    Ok((
        StatusCode::CREATED,
        ApiJson(DiscoveryStatus { discovery: Some(d) }),
    )
        .into_response())
}

/// Stop the discovery in progress (admin).
#[utoipa::path(delete, path = "/api/v1/machine/discover", tag = "mars",
    responses((status = 200, description = "The stopped discovery, or null.",
        body = DiscoveryStatus)))]
async fn stop_discovery(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
) -> Result<ApiJson<DiscoveryStatus>, ApiError> {
    let actor = s
        .require(
            &headers,
            &source,
            Role::Admin,
            "discovery.stop",
            "discovery",
        )
        .await?;
    let r = s.mars.stop_discovery().await.map_err(ApiError::from);
    s.audit_outcome(&actor, "discovery.stop", "discovery", &r)
        .await;
    Ok(ApiJson(DiscoveryStatus { discovery: r? }))
}

/// Every current lease (DUT network, any token or a current lease).
#[utoipa::path(get, path = "/api/v1/leases", tag = "mars",
    responses((status = 200, description = "The leases.", body = LeaseList)))]
async fn list_leases(
    caller: DutOrToken,
    State(s): State<AppState>,
) -> Result<ApiJson<LeaseList>, ApiError> {
    let mut leases: Vec<Lease> = s
        .mars
        .store
        .list()
        .await?
        .into_iter()
        .filter_map(|r| r.lease)
        .collect();
    hide_ids(&caller, &mut leases);
    Ok(ApiJson(LeaseList { leases }))
}

/// Lease a machine for a job (service role or admin).
///
/// `purpose: job` takes an `IDLE` machine (it becomes `RUNNING`); `purpose: training` a
/// `TRAINING` or `QUICK_CHECK` one (its state does not change). One lease per machine (409).
/// The holder heartbeats within `ttl_seconds` or the lease expires: mars powers the machine
/// off, then frees it (a job's machine goes to `QUICK_CHECK`, an infrastructure failure is
/// counted). A lease that lapsed while mars was down gets `lease_grace_seconds` from mars'
/// return for its holder to heartbeat again.
#[utoipa::path(post, path = "/api/v1/leases", tag = "mars", request_body = LeaseRequest,
    responses((status = 201, description = "Granted.", body = Lease)))]
async fn acquire(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    body: Result<ApiJson<LeaseRequest>, ApiError>,
) -> Result<Response, ApiError> {
    s.require(&headers, &source, Role::Service, "lease.acquire", "leases")
        .await?;
    let ApiJson(body) = body?;
    let lease = s.mars.acquire(body).await?;
    Ok((StatusCode::CREATED, ApiJson(lease)).into_response())
}

/// Many leases in one request (service role or admin).
///
/// Each is granted or refused on its own, exactly as `POST /api/v1/leases` would: 200 with
/// one result per request, in order. Another status means the batch itself was refused (more
/// than 1000 requests, bad body) and no lease was granted.
#[utoipa::path(post, path = "/api/v1/leases/batch", tag = "mars", request_body = LeaseBatchRequest,
    responses((status = 200, description = "One result per request.", body = LeaseBatchResponse)))]
async fn acquire_batch(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    body: Result<ApiJson<LeaseBatchRequest>, ApiError>,
) -> Result<ApiJson<LeaseBatchResponse>, ApiError> {
    s.require(&headers, &source, Role::Service, "lease.batch", "leases")
        .await?;
    let ApiJson(body) = body?;
    if body.leases.len() > MAX_LEASE_BATCH {
        return Err(
            ApiError::bad_request(format!("at most {MAX_LEASE_BATCH} leases per batch"))
                .with_field("leases"),
        );
    }
    let results = s
        .mars
        .acquire_many(&body.leases)
        .await
        .into_iter()
        .map(|r| match r {
            Ok(lease) => LeaseResult {
                lease: Some(lease),
                error: None,
            },
            Err(e) => {
                let e = ApiError::from(e);
                LeaseResult {
                    lease: None,
                    error: Some(LeaseRefusal {
                        status: e.status.as_u16(),
                        error: e.body.error,
                    }),
                }
            }
        })
        .collect();
    Ok(ApiJson(LeaseBatchResponse { results }))
}

/// The service role, or the lease itself in `X-Lease-Id` (its holder, the job process: the
/// lease id is a secret only its holder, admins and services see). Refusals are audited; the
/// lease id never is.
async fn lease_holder_or_service(
    s: &AppState,
    headers: &HeaderMap,
    source: &str,
    lease: &str,
    action: &str,
) -> Result<(), ApiError> {
    let presented = presented(headers);
    let refusal = if headers.contains_key(header::AUTHORIZATION) || presented.is_none() {
        match s.auth.check_identity(headers, Role::Service) {
            Ok(_) => return Ok(()),
            // A token that is not enough, with a lease beside it: the lease decides.
            Err(_) if presented.is_some() => None,
            Err(e) => Some(ApiError::new(
                e.status,
                format!(
                    "{}: this endpoint needs a service token or the lease itself in X-Lease-Id",
                    e.body.error
                ),
            )),
        }
    } else {
        None
    };
    let refusal = refusal.or_else(|| match presented {
        Some(Ok(l)) if l.matches(lease) => None,
        Some(Ok(_)) => Some(ApiError::forbidden(
            "X-Lease-Id is not the lease this request names",
        )),
        Some(Err(e)) => Some(ApiError::from(e)),
        None => Some(ApiError::unauthorized("X-Lease-Id is missing")),
    });
    match refusal {
        None => Ok(()),
        Some(e) => {
            let actor = dutgate_core::lease::refused_actor(&s.auth, headers, source);
            s.audit(&actor, action, "lease", &refused(&e)).await;
            Err(e)
        }
    }
}

/// Extend a lease by its TTL (service role, or the lease itself in `X-Lease-Id`).
///
/// 410 once it expired or was released.
#[utoipa::path(post, path = "/api/v1/leases/{lease}/heartbeat", tag = "mars",
    params(("lease" = String, Path, description = "The lease id.")),
    responses((status = 200, description = "The lease with its new `expires_at`.", body = Lease)))]
async fn heartbeat(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    Path(lease): Path<String>,
) -> Result<Response, ApiError> {
    lease_holder_or_service(&s, &headers, &source, &lease, "lease.heartbeat").await?;
    let l = s.mars.heartbeat(&lease).await?;
    Ok(ApiJson(l).into_response())
}

/// Give a leased machine back (service role, or the lease itself in `X-Lease-Id`).
///
/// `ok` → `IDLE`; `infrastructure_failure` → `IDLE` (counted, `QUARANTINED` after
/// `quarantine_after_infra_failures` in a row); `machine_unfit` → `TRAINING`. 410 once the
/// lease expired or was released.
#[utoipa::path(post, path = "/api/v1/leases/{lease}/release", tag = "mars",
    params(("lease" = String, Path, description = "The lease id.")),
    request_body = ReleaseRequest,
    responses((status = 200, description = "The machine after the release.", body = Machine)))]
async fn release(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    Path(lease): Path<String>,
    body: Result<ApiJson<ReleaseRequest>, ApiError>,
) -> Result<ApiJson<Machine>, ApiError> {
    lease_holder_or_service(&s, &headers, &source, &lease, "lease.release").await?;
    let ApiJson(body) = body?;
    let row = s.mars.release(&lease, body.outcome, body.reason).await?;
    Ok(ApiJson(view_one(&s.mars, row.id).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Events with a greater `seq` (default 0).
    #[serde(default)]
    after: i64,
    /// Seconds to wait for an event; 0 answers at once. Default 30, at most 60.
    timeout: Option<f64>,
    /// Answer at once with no events and `next` = the latest seq.
    #[serde(default)]
    latest: bool,
}

/// Long-poll for machine events, JSON (DUT network, any token or a current lease).
///
/// Answers as soon as an event with `seq > after` exists (at most 1000 per answer), or with
/// no events once `timeout` passed; pass `next` as `after` on the next call. Start from
/// `?latest=true`. With several gateways on one PostgreSQL an event may become visible after
/// one with a higher seq: re-scan after a timeout.
// Wakes on this process's own writes at once; re-reads the store every 2 s so that writes by
// other gateways sharing PostgreSQL are seen too.
#[utoipa::path(get, path = "/api/v1/events", tag = "mars", params(EventsQuery),
    responses((status = 200, description = "The events and the cursor.", body = EventBatch)))]
async fn events(
    _: DutOrToken,
    State(s): State<AppState>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<ApiJson<EventBatch>, ApiError> {
    let q = query(q)?;
    if q.latest {
        let next = s.mars.store.latest_seq().await?;
        return Ok(ApiJson(EventBatch {
            events: Vec::new(),
            next,
        }));
    }
    let wait = q.timeout.unwrap_or(30.0);
    if !wait.is_finite() || wait < 0.0 {
        return Err(
            ApiError::bad_request("timeout must be a number of seconds ≥ 0").with_field("timeout"),
        );
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait.min(60.0));
    let mut rx = s.mars.store.subscribe();
    loop {
        rx.borrow_and_update();
        let events = s.mars.store.events_after(q.after, 1000).await?;
        let now = tokio::time::Instant::now();
        if !events.is_empty() || now >= deadline || s.shutdown.is_cancelled() {
            let next = events.last().map(|e| e.seq).unwrap_or(q.after);
            return Ok(ApiJson(EventBatch { events, next }));
        }
        let recheck = (now + Duration::from_secs(2)).min(deadline);
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep_until(recheck) => {}
            _ = s.shutdown.cancelled() => {}
        }
    }
}

/// mars' audit log (admin).
///
/// Machine edits, retirements, activations, discovery changes and refused attempts, oldest
/// first. A mars started without a state dir keeps none (404).
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "The entries, oldest first.", body = AuditList)))]
async fn audit_log(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<axum::Json<AuditList>, ApiError> {
    match s.audit.clone() {
        Some(log) => dutgate_core::audit::list(State((log, s.auth.clone())), headers, q).await,
        None => {
            s.auth.check(&headers, Role::Admin)?;
            Err(ApiError::not_found(
                "this mars keeps no audit log: it was started without a state dir",
            ))
        }
    }
}
