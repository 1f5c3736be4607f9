//! Decoding the rows of mars's tables.

use dutgate_core::{MachineId, Tag};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{MachineRow, StoreError};
use crate::model::{
    Lease, MachineEvent, MachineState, RunKind, RunOutcome, Timestamp, TrainingRun,
};

pub(super) fn decode_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

pub(super) fn tags_from_json(s: &str) -> Result<Vec<Tag>, StoreError> {
    serde_json::from_str(s).map_err(decode_err)
}

pub(super) fn opt_ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp)
}

pub(super) fn row_to_machine(r: &AnyRow) -> Result<MachineRow, StoreError> {
    let id: String = r.try_get("id")?;
    let id = MachineId::parse(&id).map_err(decode_err)?;
    let state: String = r.try_get("state")?;
    let state: MachineState = state.parse().map_err(decode_err)?;
    let ip: Option<String> = r.try_get("ip_address")?;
    let ip_address = match ip {
        Some(s) => Some(s.parse().map_err(decode_err)?),
        None => None,
    };
    let lease_id: Option<String> = r.try_get("lease_id")?;
    let lease = match lease_id {
        Some(lid) => {
            let purpose: Option<String> = r.try_get("lease_purpose")?;
            Some(Lease {
                id: lid,
                machine_id: id,
                job_id: r
                    .try_get::<Option<String>, _>("lease_job_id")?
                    .unwrap_or_default(),
                holder: r
                    .try_get::<Option<String>, _>("lease_holder")?
                    .unwrap_or_default(),
                purpose: purpose
                    .as_deref()
                    .unwrap_or("job")
                    .parse()
                    .map_err(decode_err)?,
                acquired_at: Timestamp(
                    r.try_get::<Option<i64>, _>("lease_acquired_at")?
                        .unwrap_or(0),
                ),
                expires_at: Timestamp(
                    r.try_get::<Option<i64>, _>("lease_expires_at")?
                        .unwrap_or(0),
                ),
                ttl_seconds: r
                    .try_get::<Option<i64>, _>("lease_ttl")?
                    .unwrap_or(0)
                    .max(0) as u64,
            })
        }
        None => None,
    };
    Ok(MachineRow {
        id,
        base_name: r.try_get("base_name")?,
        name_index: r.try_get("name_index")?,
        full_name: r.try_get("full_name")?,
        tags: tags_from_json(&r.try_get::<String, _>("tags")?)?,
        manual_tags: tags_from_json(&r.try_get::<String, _>("manual_tags")?)?,
        ip_address,
        local_tty_device: r.try_get("local_tty_device")?,
        pdu: r.try_get("pdu")?,
        pdu_port_id: r.try_get("pdu_port_id")?,
        pdu_off_delay: r.try_get("pdu_off_delay")?,
        state,
        comment: r.try_get("comment")?,
        first_seen: Timestamp(r.try_get("first_seen")?),
        last_seen: Timestamp(r.try_get("last_seen")?),
        consecutive_infra_failures: r.try_get("consecutive_infra_failures")?,
        training_failures: r.try_get("training_failures")?,
        training_next_at: opt_ts(r.try_get("training_next_at")?),
        trained_at: opt_ts(r.try_get("trained_at")?),
        lease,
        version: r.try_get("version")?,
    })
}

pub(super) fn row_to_event(r: &AnyRow) -> Result<MachineEvent, StoreError> {
    let id: String = r.try_get("machine_id")?;
    Ok(MachineEvent {
        seq: r.try_get("seq")?,
        machine_id: MachineId::parse(&id).map_err(decode_err)?,
        at: Timestamp(r.try_get("at")?),
        from_state: r
            .try_get::<String, _>("from_state")?
            .parse()
            .map_err(decode_err)?,
        to_state: r
            .try_get::<String, _>("to_state")?
            .parse()
            .map_err(decode_err)?,
        kind: r.try_get("kind")?,
        actor: r.try_get("actor")?,
        reason: r.try_get("reason")?,
        job_id: r.try_get("job_id")?,
    })
}

pub(super) const MACHINE_COLUMNS: &str = "id, base_name, name_index, full_name, tags, manual_tags, ip_address, \
    local_tty_device, pdu, pdu_port_id, pdu_off_delay, state, comment, first_seen, last_seen, \
    consecutive_infra_failures, training_failures, training_next_at, trained_at, lease_id, \
    lease_job_id, lease_holder, lease_purpose, lease_acquired_at, lease_expires_at, lease_ttl, version";

pub(super) fn row_to_run(r: &AnyRow) -> Result<TrainingRun, StoreError> {
    let id: String = r.try_get("machine_id")?;
    let kind: String = r.try_get("kind")?;
    let outcome: String = r.try_get("outcome")?;
    Ok(TrainingRun {
        id: r.try_get("id")?,
        machine_id: MachineId::parse(&id).map_err(decode_err)?,
        kind: match kind.as_str() {
            "quick_check" => RunKind::QuickCheck,
            _ => RunKind::Training,
        },
        started_at: Timestamp(r.try_get("started_at")?),
        ended_at: opt_ts(r.try_get("ended_at")?),
        outcome: match outcome.as_str() {
            "passed" => RunOutcome::Passed,
            "failed" => RunOutcome::Failed,
            "cancelled" => RunOutcome::Cancelled,
            _ => RunOutcome::Running,
        },
        boot_loops: r.try_get::<i64, _>("boot_loops")?.max(0) as u32,
        qualifying: r.try_get::<i64, _>("qualifying")?.max(0) as u32,
        passes: r.try_get::<i64, _>("passes")?.max(0) as u32,
        failures: r.try_get::<i64, _>("failures")?.max(0) as u32,
        reason: r.try_get("reason")?,
        loops: Vec::new(),
    })
}
