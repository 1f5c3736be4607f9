//! ci-tron's DUT list on the executor's port, from mars' machines: `GET /api/v1/duts`
//! (`executorctl duts`) answers `{"duts": {"<id>": <machine>}}`, `GET /api/v1/dut/{name}`
//! (`executorctl dut info NAME`) one machine by id or full name. The machine is mars' record
//! (it has valve-infra's fields: `full_name`, `state`, `ip_address`, `comment`,
//! `mac_address`, `ready_for_service`, `is_retired`, …) without lease ids, which prove a lease
//! to salad and are for admins only.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use dutgate_core::{ApiError, MachineId, ServiceName};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::Machine;
use serde::Serialize;

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

/// `GET /api/v1/duts`: mars' machines by id.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DutList {
    pub duts: BTreeMap<String, Machine>,
}

/// ci-tron's DUT list (`executorctl duts`).
///
/// mars' machine records (valve-infra's fields included: `full_name`, `state`, `ip_address`,
/// `comment`, …) by id, without lease ids. A token, or no `Authorization` header from
/// `executor.trusted_client_networks`. 503: mars is unreachable.
#[utoipa::path(get, path = "/api/v1/duts", tag = "executor", security(("bearer" = []), ()),
    operation_id = "list_duts",
    responses((status = 200, description = "The machines by id.", body = DutList)))]
pub async fn list(State(s): State<AppState>) -> Result<Json<DutList>, ApiError> {
    let duts = machines(&s)
        .await?
        .into_iter()
        .map(|m| (m.id.to_string(), m))
        .collect();
    Ok(Json(DutList { duts }))
}

/// One DUT by id or full name (`executorctl dut info NAME`).
///
/// Who may call: as `GET /api/v1/duts`. 503: mars is unreachable.
#[utoipa::path(get, path = "/api/v1/dut/{name}", tag = "executor", security(("bearer" = []), ()),
    operation_id = "show_dut",
    params(("name" = String, Path, description = "The machine's id (MAC) or full name.")),
    responses((status = 200, description = "mars' machine record, without its lease id.", body = Machine)))]
pub async fn show(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Machine>, ApiError> {
    let id = MachineId::parse(&name).ok();
    machines(&s)
        .await?
        .into_iter()
        .find(|m| Some(m.id) == id || m.full_name == name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no DUT named {name:?}")).with_field("name"))
}
