//! salad's REST API (design.md §4; valve-infra's SALAD routes plus the console log).
//!
//! - `GET /api/v1/machine` → `{"machines": {"<id>": MachineConsole}}`
//! - `GET /api/v1/machine/{id}` → `MachineConsole`, creating the console server if missing
//! - `DELETE /api/v1/machine/{id}` (admin) → frees the machine's ports
//! - `GET /api/v1/machine/{id}/log?since=<offset|RFC 3339 time>&limit=<bytes>` → raw log
//! - `GET /api/v1/ports` → the open console streams (serial ports and netconsoles)

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use dutgate_core::auth::{Auth, require_admin};
use dutgate_core::{ApiError, MachineId};
use serde::{Deserialize, Serialize};

use crate::console_log::{self, Since};
use crate::hub::{Hub, HubError, StreamStatus};
use crate::relay::Machine;

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

fn console(m: &Machine) -> MachineConsole {
    MachineConsole {
        id: m.id,
        tcp_port: m.tcp_port,
        tcp_port_logs: m.tcp_port_logs,
        has_client: m.has_client(),
    }
}

pub fn router(hub: Arc<Hub>, auth: Auth) -> Router {
    let admin = Router::new()
        .route(
            "/api/v1/machine/{id}",
            axum::routing::delete(delete_machine),
        )
        .route_layer(middleware::from_fn_with_state(auth, require_admin))
        .with_state(hub.clone());
    Router::new()
        .route("/api/v1/machine", get(list_machines))
        .route("/api/v1/machine/", get(list_machines))
        .route("/api/v1/machine/{id}", get(get_machine))
        .route("/api/v1/machine/{id}/log", get(get_log))
        .route("/api/v1/ports", get(list_ports))
        .with_state(hub)
        .merge(admin)
        .merge(dutgate_core::http::openapi(include_str!("../openapi.yaml")))
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
            other => ApiError::internal(other),
        }
    }
}

async fn list_machines(State(hub): State<Arc<Hub>>) -> Json<MachineList> {
    let machines = hub.all().iter().map(|m| (m.id, console(m))).collect();
    Json(MachineList { machines })
}

async fn get_machine(
    State(hub): State<Arc<Hub>>,
    Path(raw): Path<String>,
) -> Result<Json<MachineConsole>, ApiError> {
    let id = parse_id(&raw)?;
    let m = hub.get_or_create(id).await?;
    Ok(Json(console(&m)))
}

async fn delete_machine(
    State(hub): State<Arc<Hub>>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&raw)?;
    if hub.delete(id).await? {
        tracing::info!(machine = %id, "console server deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no console server for machine {id}"
        )))
    }
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    since: Option<String>,
    limit: Option<usize>,
}

async fn get_log(
    State(hub): State<Arc<Hub>>,
    Path(raw): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&raw)?;
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

async fn list_ports(State(hub): State<Arc<Hub>>) -> Json<PortList> {
    Json(PortList {
        ports: hub.streams(),
    })
}
