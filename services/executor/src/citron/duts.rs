//! ci-tron's DUT list on the executor's port, from mars' machines: `GET /api/v1/duts`
//! (`executorctl duts`) answers `{"duts": {"<id>": <machine>}}`, `GET /api/v1/dut/{name}`
//! (`executorctl dut info NAME`) one machine by id or full name. The machine is mars' record
//! (it has valve-infra's fields: `full_name`, `state`, `ip_address`, `comment`,
//! `mac_address`, `ready_for_service`, `is_retired`, …) without lease ids, which prove a lease
//! to salad and are for admins only.

use axum::Json;
use axum::extract::{Path, State};
use dutgate_core::{ApiError, MachineId, ServiceName};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::Machine;
use serde_json::{Map, Value, json};

use crate::api::AppState;

fn mars(s: &AppState) -> MarsClient {
    let (admin, _) = crate::process::gateway_tokens(&s.gw);
    MarsClient::new(s.cfg.url_of(&s.gw, ServiceName::Mars), admin)
}

async fn machines(s: &AppState) -> Result<Vec<Machine>, ApiError> {
    let mut list = mars(s)
        .machines()
        .await
        .map_err(|e| ApiError::unavailable(format!("mars is unreachable: {e}")))?;
    for m in &mut list {
        if let Some(lease) = m.lease.as_mut() {
            lease.id.clear();
        }
    }
    Ok(list)
}

fn as_json(m: &Machine) -> Result<Value, ApiError> {
    serde_json::to_value(m).map_err(ApiError::internal)
}

pub async fn list(State(s): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut duts = Map::new();
    for m in machines(&s).await? {
        duts.insert(m.id.to_string(), as_json(&m)?);
    }
    Ok(Json(json!({ "duts": duts })))
}

pub async fn show(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = MachineId::parse(&name).ok();
    machines(&s)
        .await?
        .iter()
        .find(|m| Some(m.id) == id || m.full_name == name)
        .map(as_json)
        .transpose()?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no DUT named {name:?}")).with_field("name"))
}
