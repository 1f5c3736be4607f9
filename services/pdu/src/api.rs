//! REST routes (design.md §5). Reads are open. Switching a port (`PATCH` with a `state`,
//! `POST …/cycle`) needs the service role (the gateway's own actors: mars, the executor's
//! teardown) or the current lease of the machine mars records on that port, presented in
//! `X-Lease-Id` by its job process; there is no other way to switch a port. Configuration
//! (adding and removing PDUs, a port's label and reservation, refreshing) needs the admin
//! token. Every change and every refused attempt goes to the audit log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use dutgate_core::audit::{Actor, AuditList, AuditLog, AuditQuery};
use dutgate_core::auth::{Auth, Role};
use dutgate_core::lease::{self, Caller, LeaseCheck, Target};
use dutgate_core::{ApiError, ApiJson};
use dutgate_pdu_driver::{DriverError, DriverInfo};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::pdu::{PortPatch, PowerError};
use crate::service::{ManageError, NewPdu, PduDetail, PduInfo, PduService};

#[derive(Clone)]
pub struct AppState {
    pub svc: PduService,
    pub auth: Auth,
    /// Checks the leases job processes present (with mars).
    pub leases: LeaseCheck,
    /// `None` for a service started without a state dir (tests of other parts): audited
    /// calls are then only traced.
    pub audit: Option<AuditLog>,
}

impl AppState {
    async fn audit(&self, actor: &Actor, action: &str, target: &str, outcome: &str) {
        dutgate_core::audit::record_or_trace(self.audit.as_ref(), actor, action, target, outcome)
            .await;
    }

    async fn refused(
        &self,
        headers: &HeaderMap,
        source: &str,
        action: &str,
        target: &str,
        e: &ApiError,
    ) {
        let actor = lease::refused_actor(&self.auth, headers, source);
        self.audit(
            &actor,
            action,
            target,
            &format!("refused: {}", e.body.error),
        )
        .await;
    }

    /// The admin; a refusal is audited.
    async fn admin(
        &self,
        headers: &HeaderMap,
        source: &str,
        action: &str,
        target: &str,
    ) -> Result<Actor, ApiError> {
        match self.auth.check_identity(headers, Role::Admin) {
            Ok(id) => Ok(Actor::known(&id, source)),
            Err(e) => {
                self.refused(headers, source, action, target, &e).await;
                Err(e)
            }
        }
    }

    /// Who may switch port `port` of PDU `pdu`: the service role, or the current lease of
    /// the machine mars records on that port. A refusal is audited.
    async fn switcher(
        &self,
        headers: &HeaderMap,
        source: &str,
        pdu: &str,
        port: &str,
        action: &str,
    ) -> Result<Caller, ApiError> {
        let target = Target::Port { pdu, port };
        match lease::authorize(&self.auth, &self.leases, headers, Role::Service, target).await {
            Ok(caller) => Ok(caller),
            Err(e) => {
                tracing::warn!(pdu, port, source, reason = %e.body.error, action, "port switch refused");
                self.refused(headers, source, action, &port_target(pdu, port), &e)
                    .await;
                Err(e)
            }
        }
    }
}

fn port_target(pdu: &str, port: &str) -> String {
    format!("pdu/{pdu}/port/{port}")
}

fn outcome<T>(r: &Result<T, ApiError>, ok: impl FnOnce(&T) -> String) -> String {
    match r {
        Ok(v) => ok(v),
        Err(e) => format!("failed: {}", e.body.error),
    }
}

/// Extractor: the caller's address, for logs and the audit log.
pub struct Peer(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| "unknown".to_string(), |c| c.0.to_string()),
        ))
    }
}

/// The REST routes with their documentation.
fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(drivers))
        .routes(routes!(list_pdus, add_pdu))
        .routes(routes!(get_pdu, delete_pdu))
        .routes(routes!(refresh_pdu))
        .routes(routes!(list_ports))
        .routes(routes!(get_port, patch_port))
        .routes(routes!(cycle_port))
        .routes(routes!(port_history))
        .routes(routes!(audit_log))
}

const TITLE: &str = "dutgate pdu";
const DESCRIPTION: &str = "The farm's PDUs, driven through drivers (snmp, mqtt, http, command, \
    dummy, virtual), and every port's cached state (docs/pdu.md). Reads need no token. \
    Switching a port needs the service role or an admin, or the current lease of the machine \
    mars records on that port in `X-Lease-Id` (503 when mars cannot be asked); configuration \
    needs the admin token. A driver failure is 502, a driver timeout 504. Times are Unix ms.";

/// The service's OpenAPI document, as `GET /api/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    dutgate_core::openapi::document(api().into_openapi(), TITLE, DESCRIPTION)
}

pub fn router(state: AppState) -> Router {
    let (router, doc) = api().with_state(state).split_for_parts();
    let doc = dutgate_core::openapi::document(doc, TITLE, DESCRIPTION);
    router.merge(dutgate_core::openapi::router(&doc))
}

/// `GET /api/v1/pdus` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PduList {
    pub pdus: Vec<PduInfo>,
}

/// `GET /api/v1/drivers` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DriverList {
    pub drivers: Vec<DriverInfo>,
}

/// `POST …/cycle` body; every key optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CycleRequest {
    /// Seconds OFF; default `pdu.default_off_seconds`, at most `pdu.max_off_seconds`.
    #[schema(minimum = 0)]
    pub off_seconds: Option<f64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryQuery {
    /// How many entries, newest first (default 100, clamped to 1..10000).
    limit: Option<u32>,
}

pub(crate) fn manage_error(e: ManageError) -> ApiError {
    match e {
        ManageError::Config(c) => {
            let field = c.field.clone();
            let mut err = ApiError::unprocessable(format!("invalid PDU: {c}"));
            if let Some(f) = field {
                err = err.with_field(f);
            }
            err
        }
        ManageError::Unreachable(_) => ApiError::unprocessable(e.to_string()),
        ManageError::Exists(_) | ManageError::Declared(_) => ApiError::conflict(e.to_string()),
        ManageError::NoSuchPdu(_) => ApiError::not_found(e.to_string()),
        ManageError::Store(e) => ApiError::internal(e),
        ManageError::Pdudaemon(e) => ApiError::internal(e),
    }
}

pub(crate) fn power_error(e: PowerError) -> ApiError {
    let msg = e.to_string();
    match e {
        PowerError::NoSuchPort { .. } => ApiError::not_found(msg),
        PowerError::Reserved { .. } => ApiError::conflict(msg),
        PowerError::NotReady { .. } | PowerError::Stopped(_) => ApiError::unavailable(msg),
        PowerError::Driver { source, .. } => match source {
            DriverError::NoSuchPort { .. } => ApiError::not_found(msg),
            DriverError::Timeout { .. } => ApiError::new(StatusCode::GATEWAY_TIMEOUT, msg),
            _ => ApiError::new(StatusCode::BAD_GATEWAY, msg),
        },
        PowerError::ReadBack { .. }
        | PowerError::CameBackOn { .. }
        | PowerError::Unverified { .. } => ApiError::new(StatusCode::BAD_GATEWAY, msg),
        PowerError::Store(e) => ApiError::internal(e),
    }
}

async fn pdu(s: &AppState, name: &str) -> Result<std::sync::Arc<crate::pdu::Pdu>, ApiError> {
    s.svc
        .get(name)
        .await
        .ok_or_else(|| ApiError::not_found(format!("no PDU named {name:?}")))
}

/// The drivers this build has.
#[utoipa::path(get, path = "/api/v1/drivers", tag = "pdu",
    responses((status = 200, description = "The drivers.", body = DriverList)))]
async fn drivers(State(s): State<AppState>) -> ApiJson<DriverList> {
    ApiJson(DriverList {
        drivers: s.svc.drivers(),
    })
}

/// Every PDU, from the config and added through the API.
#[utoipa::path(get, path = "/api/v1/pdus", tag = "pdu",
    responses((status = 200, description = "The PDUs.", body = PduList)))]
async fn list_pdus(State(s): State<AppState>) -> ApiJson<PduList> {
    ApiJson(PduList {
        pdus: s.svc.list().await,
    })
}

/// Adds a PDU (admin).
///
/// The driver must reach the device before the PDU is kept: 422 when the config is invalid
/// (`field` names the key) or the device unreachable, 409 when the name is taken.
#[utoipa::path(post, path = "/api/v1/pdus", tag = "pdu", request_body = NewPdu,
    responses((status = 201, description = "Added.", body = PduDetail)))]
async fn add_pdu(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    body: Result<ApiJson<NewPdu>, ApiError>,
) -> Result<Response, ApiError> {
    let actor = s.admin(&headers, &source, "pdu.add", "pdus").await?;
    let ApiJson(new) = body?;
    let target = format!("pdu/{}", new.name);
    let r = s.svc.add(new).await.map_err(manage_error);
    s.audit(&actor, "pdu.add", &target, &outcome(&r, |_| "ok".into()))
        .await;
    Ok((StatusCode::CREATED, ApiJson(r?)).into_response())
}

/// One PDU with its ports.
#[utoipa::path(get, path = "/api/v1/pdus/{name}", tag = "pdu", params(("name" = String, Path, description = "The PDU's name.")),
    responses((status = 200, description = "The PDU.", body = PduDetail)))]
async fn get_pdu(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<ApiJson<PduDetail>, ApiError> {
    let p = pdu(&s, &name).await?;
    Ok(ApiJson(PduService::detail(&p)))
}

/// Removes a PDU added through the API (admin).
///
/// One declared in the config file is removed there (409).
#[utoipa::path(delete, path = "/api/v1/pdus/{name}", tag = "pdu", params(("name" = String, Path, description = "The PDU's name.")),
    responses((status = 204, description = "Removed.")))]
async fn delete_pdu(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let target = format!("pdu/{name}");
    let actor = s.admin(&headers, &source, "pdu.remove", &target).await?;
    let r = s.svc.remove(&name).await.map_err(manage_error);
    s.audit(&actor, "pdu.remove", &target, &outcome(&r, |_| "ok".into()))
        .await;
    r?;
    Ok(StatusCode::NO_CONTENT)
}

/// Polls the PDU now (admin).
///
/// Reads every port of the PDU again (changes nothing, so it is not audited).
#[utoipa::path(post, path = "/api/v1/pdus/{name}/refresh", tag = "pdu", params(("name" = String, Path, description = "The PDU's name.")),
    responses((status = 200, description = "The PDU after the poll.", body = PduDetail)))]
async fn refresh_pdu(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<ApiJson<PduDetail>, ApiError> {
    s.auth.check(&headers, Role::Admin)?;
    let p = pdu(&s, &name).await?;
    p.refresh().await.map_err(power_error)?;
    Ok(ApiJson(PduService::detail(&p)))
}

/// The PDU's ports (cached states).
#[utoipa::path(get, path = "/api/v1/pdus/{name}/ports", tag = "pdu", params(("name" = String, Path, description = "The PDU's name.")),
    responses((status = 200, description = "The ports.", body = Vec<crate::PortView>)))]
async fn list_ports(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<ApiJson<Vec<crate::PortView>>, ApiError> {
    Ok(ApiJson(pdu(&s, &name).await?.ports()))
}

/// One port.
#[utoipa::path(get, path = "/api/v1/pdus/{name}/ports/{id}", tag = "pdu", params(("name" = String, Path, description = "The PDU's name."), ("id" = String, Path, description = "The port's id.")),
    responses((status = 200, description = "The port.", body = crate::PortView)))]
async fn get_port(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<ApiJson<crate::PortView>, ApiError> {
    let p = pdu(&s, &name).await?;
    Ok(ApiJson(p.port(&id).map_err(power_error)?))
}

/// Switches a port, relabels it or (un)reserves it.
///
/// Switching (`state` alone) needs the service role or the lease of the port's machine; the
/// switch is read back from the device before the answer. `label` and `reserved` need the admin
/// token. A reserved port answers 409.
#[utoipa::path(patch, path = "/api/v1/pdus/{name}/ports/{id}", tag = "pdu", params(("name" = String, Path, description = "The PDU's name."), ("id" = String, Path, description = "The port's id.")),
    request_body = PortPatch,
    responses((status = 200, description = "The port after the change.", body = crate::OpResult)))]
async fn patch_port(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
    body: Result<ApiJson<PortPatch>, ApiError>,
) -> Result<ApiJson<crate::OpResult>, ApiError> {
    let caller = s
        .switcher(&headers, &source, &name, &id, "pdu.switch")
        .await?;
    let ApiJson(patch) = body?;
    let target = port_target(&name, &id);
    let configures = patch.label.is_some() || patch.reserved.is_some();
    let action = if configures {
        "pdu.port.edit"
    } else {
        "pdu.switch"
    };
    if configures && !caller.has_role(Role::Admin) {
        let e = ApiError::forbidden(
            "changing a port's label or reservation needs the admin token; switching it \
             (`state` alone) is what the service role and the machine's lease allow",
        );
        s.refused(&headers, &source, action, &target, &e).await;
        return Err(e);
    }
    let state = patch.state;
    let r = match pdu(&s, &name).await {
        Ok(p) => p.patch(&id, patch).await.map_err(power_error),
        Err(e) => Err(e),
    };
    let outcome = outcome(&r, |o| match state {
        Some(st) => format!("ok: {st}, read back {}", o.port.state),
        None => "ok".into(),
    });
    s.audit(&caller.actor(&source), action, &target, &outcome)
        .await;
    Ok(ApiJson(r?))
}

/// Power-cycles a port (service role or the lease of the port's machine).
///
/// OFF, wait `off_seconds` (checking it stays off), ON. The body may be empty; `off_seconds`
/// out of range is 422, a reserved port 409.
#[utoipa::path(post, path = "/api/v1/pdus/{name}/ports/{id}/cycle", tag = "pdu", params(("name" = String, Path, description = "The PDU's name."), ("id" = String, Path, description = "The port's id.")),
    request_body = Option<CycleRequest>,
    responses((status = 200, description = "The port after the cycle.", body = crate::CycleReport)))]
async fn cycle_port(
    State(s): State<AppState>,
    Peer(source): Peer,
    headers: HeaderMap,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<ApiJson<crate::CycleReport>, ApiError> {
    let caller = s
        .switcher(&headers, &source, &name, &id, "pdu.cycle")
        .await?;
    let req: CycleRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CycleRequest::default()
    } else {
        let de = &mut serde_json::Deserializer::from_slice(&body);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ApiError::bad_request(e.inner().to_string()).with_field(field)
        })?
    };
    let off = match req.off_seconds {
        None => s.svc.default_off(),
        Some(v) => Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| *d <= s.svc.max_off())
            .ok_or_else(|| {
                ApiError::unprocessable(format!(
                    "off_seconds must be between 0 and {}",
                    s.svc.max_off().as_secs_f64()
                ))
                .with_field("off_seconds")
            })?,
    };
    let r = match pdu(&s, &name).await {
        Ok(p) => p.cycle(&id, off).await.map_err(power_error),
        Err(e) => Err(e),
    };
    let outcome = outcome(&r, |_| format!("ok: off {:.1} s", off.as_secs_f64()));
    s.audit(
        &caller.actor(&source),
        "pdu.cycle",
        &port_target(&name, &id),
        &outcome,
    )
    .await;
    Ok(ApiJson(r?))
}

/// The port's recorded state changes and operations, newest first.
#[utoipa::path(get, path = "/api/v1/pdus/{name}/ports/{id}/history", tag = "pdu",
    params(("name" = String, Path, description = "The PDU's name."), ("id" = String, Path, description = "The port's id."), HistoryQuery),
    responses((status = 200, description = "The history.", body = Vec<crate::store::HistoryEntry>)))]
async fn port_history(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ApiJson<Vec<crate::store::HistoryEntry>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()).with_field("limit"))?;
    let p = pdu(&s, &name).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    Ok(ApiJson(
        p.port_history(&id, limit).await.map_err(power_error)?,
    ))
}

/// This service's audit log (admin).
///
/// Ports switched and cycled (who, which port, the outcome), ports relabelled or reserved, PDUs
/// added and removed, and refused attempts. A lease holder is named `lease:<machine id>`
/// (`lease` when refused), never by its lease id. A service started without a state dir keeps
/// none and answers 404.
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
                "this pdu service keeps no audit log: it was started without a state dir",
            ))
        }
    }
}
