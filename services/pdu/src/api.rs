//! REST routes (design.md §5). Reads are open; every change needs the admin token.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRef, FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dutgate_core::auth::{Auth, Role};
use dutgate_core::{ApiError, ApiJson};
use dutgate_pdu_driver::{DriverError, DriverInfo};
use serde::{Deserialize, Serialize};

use crate::pdu::{PortPatch, PowerError};
use crate::service::{ManageError, NewPdu, PduDetail, PduInfo, PduService};

#[derive(Clone)]
pub struct AppState {
    pub svc: PduService,
    pub auth: Auth,
}

impl FromRef<AppState> for Auth {
    fn from_ref(s: &AppState) -> Auth {
        s.auth.clone()
    }
}

/// Extractor: the request carries the admin token.
pub struct Admin;

impl<S: Send + Sync> FromRequestParts<S> for Admin
where
    Auth: FromRef<S>,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Auth::from_ref(state).check(&parts.headers, Role::Admin)?;
        Ok(Admin)
    }
}

pub fn router(svc: PduService, auth: Auth) -> Router {
    Router::new()
        .route("/api/v1/drivers", get(drivers))
        .route("/api/v1/pdus", get(list_pdus).post(add_pdu))
        .route("/api/v1/pdus/{name}", get(get_pdu).delete(delete_pdu))
        .route("/api/v1/pdus/{name}/refresh", post(refresh_pdu))
        .route("/api/v1/pdus/{name}/ports", get(list_ports))
        .route(
            "/api/v1/pdus/{name}/ports/{id}",
            get(get_port).patch(patch_port),
        )
        .route("/api/v1/pdus/{name}/ports/{id}/cycle", post(cycle_port))
        .route("/api/v1/pdus/{name}/ports/{id}/history", get(port_history))
        .with_state(AppState { svc, auth })
        .merge(dutgate_core::http::openapi(include_str!("../openapi.yaml")))
}

/// `GET /api/v1/pdus` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PduList {
    pub pdus: Vec<PduInfo>,
}

/// `GET /api/v1/drivers` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriverList {
    pub drivers: Vec<DriverInfo>,
}

/// `POST …/cycle` body; every key optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CycleRequest {
    pub off_seconds: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
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

async fn drivers(State(s): State<AppState>) -> ApiJson<DriverList> {
    ApiJson(DriverList {
        drivers: s.svc.drivers(),
    })
}

async fn list_pdus(State(s): State<AppState>) -> ApiJson<PduList> {
    ApiJson(PduList {
        pdus: s.svc.list().await,
    })
}

async fn add_pdu(
    _: Admin,
    State(s): State<AppState>,
    ApiJson(new): ApiJson<NewPdu>,
) -> Result<Response, ApiError> {
    let detail = s.svc.add(new).await.map_err(manage_error)?;
    Ok((StatusCode::CREATED, ApiJson(detail)).into_response())
}

async fn get_pdu(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<ApiJson<PduDetail>, ApiError> {
    let p = pdu(&s, &name).await?;
    Ok(ApiJson(PduService::detail(&p)))
}

async fn delete_pdu(
    _: Admin,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    s.svc.remove(&name).await.map_err(manage_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn refresh_pdu(
    _: Admin,
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<ApiJson<PduDetail>, ApiError> {
    let p = pdu(&s, &name).await?;
    p.refresh().await.map_err(power_error)?;
    Ok(ApiJson(PduService::detail(&p)))
}

async fn list_ports(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<ApiJson<Vec<crate::PortView>>, ApiError> {
    Ok(ApiJson(pdu(&s, &name).await?.ports()))
}

async fn get_port(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<ApiJson<crate::PortView>, ApiError> {
    let p = pdu(&s, &name).await?;
    Ok(ApiJson(p.port(&id).map_err(power_error)?))
}

async fn patch_port(
    _: Admin,
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    ApiJson(patch): ApiJson<PortPatch>,
) -> Result<ApiJson<crate::OpResult>, ApiError> {
    let p = pdu(&s, &name).await?;
    Ok(ApiJson(p.patch(&id, patch).await.map_err(power_error)?))
}

async fn cycle_port(
    _: Admin,
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<ApiJson<crate::CycleReport>, ApiError> {
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
    let p = pdu(&s, &name).await?;
    Ok(ApiJson(p.cycle(&id, off).await.map_err(power_error)?))
}

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
