//! Writing machine rows and their events: the second half of every state change (the first,
//! reading the row and deciding, is [`super::Store::apply_with`]'s).
//!
//! A change is written only if the row's `version` is still the one it was decided on
//! (optimistic concurrency), and the row gets its event in the same transaction.

use dutgate_core::MachineId;
use dutgate_core::db::{Backend, Db};
use sqlx::{Any, Row, Transaction};

use super::{Cause, MachineRow, StoreError};
use crate::model::{MachineEvent, MachineState, Timestamp};

/// One row to write: `next` replaces the row if its version is still `expected`; the event
/// records `from` → `next.state` as `kind`, with `cause`.
pub(crate) struct RowChange<'a> {
    pub next: &'a MachineRow,
    pub expected: i64,
    pub from: MachineState,
    pub kind: &'a str,
    pub cause: &'a Cause,
}

/// Writes `change` and its event in one transaction: the event, or `None` when another writer
/// changed the row first (nothing was written). The caller holds the write turn and announces
/// the event.
pub(crate) async fn write_change(
    db: &Db,
    c: &RowChange<'_>,
) -> Result<Option<MachineEvent>, StoreError> {
    let mut tx = db.pool().begin().await?;
    if !update_row(&mut tx, c.next, c.expected).await? {
        tx.rollback().await?;
        return Ok(None);
    }
    commit_in_seq_order(&mut tx, db.backend()).await?;
    let event = insert_event(&mut tx, c.next.id, c.from, c.next.state, c.kind, c.cause).await?;
    tx.commit().await?;
    Ok(Some(event))
}

/// The error a unique violation of a row write means: a lease id already in use (ids a lease
/// requester chose itself), else a PDU port taken by another machine.
fn unique_conflict(e: &sqlx::Error, m: &MachineRow) -> StoreError {
    let on_lease_id = match e {
        sqlx::Error::Database(d) => {
            d.constraint().is_some_and(|c| c.contains("lease_id"))
                || d.message().contains("lease_id")
        }
        _ => false,
    };
    if on_lease_id {
        return StoreError::Conflict("this lease id is already in use".into());
    }
    StoreError::Conflict(format!(
        "PDU {} port {} is already assigned to another machine",
        m.pdu.as_deref().unwrap_or("?"),
        m.pdu_port_id.as_deref().unwrap_or("?")
    ))
}

pub(crate) fn tags_to_json(t: &[dutgate_core::Tag]) -> String {
    serde_json::to_string(t).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// The columns a machine row's writes set besides its identity (id, name, first seen), in the
/// order [`bind_row_columns`] binds them: the tail of both the insert and the update.
pub(crate) const ROW_COLUMNS: &str = "tags, manual_tags, ip_address, local_tty_device, pdu, \
     pdu_port_id, pdu_off_delay, state, comment, last_seen, consecutive_infra_failures, \
     training_failures, training_next_at, trained_at, lease_id, lease_job_id, lease_holder, \
     lease_purpose, lease_acquired_at, lease_expires_at, lease_ttl, version";

/// How many columns [`ROW_COLUMNS`] lists.
const ROW_COLUMN_COUNT: usize = 22;

type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>;

/// Binds `m`'s values for [`ROW_COLUMNS`], in that order.
pub(crate) fn bind_row_columns<'q>(q: AnyQuery<'q>, m: &MachineRow) -> AnyQuery<'q> {
    let lease = m.lease.as_ref();
    q.bind(tags_to_json(&m.tags))
        .bind(tags_to_json(&m.manual_tags))
        .bind(m.ip_address.map(|i| i.to_string()))
        .bind(m.local_tty_device.clone())
        .bind(m.pdu.clone())
        .bind(m.pdu_port_id.clone())
        .bind(m.pdu_off_delay)
        .bind(m.state.as_str())
        .bind(m.comment.clone())
        .bind(m.last_seen.millis())
        .bind(m.consecutive_infra_failures)
        .bind(m.training_failures)
        .bind(m.training_next_at.map(Timestamp::millis))
        .bind(m.trained_at.map(Timestamp::millis))
        .bind(lease.map(|l| l.id.clone()))
        .bind(lease.map(|l| l.job_id.clone()))
        .bind(lease.map(|l| l.holder.clone()))
        .bind(lease.map(|l| l.purpose.as_str().to_string()))
        .bind(lease.map(|l| l.acquired_at.millis()))
        .bind(lease.map(|l| l.expires_at.millis()))
        .bind(lease.map(|l| l.ttl_seconds as i64))
        .bind(m.version)
}

/// `$from, $from+1, …` for [`ROW_COLUMNS`].
fn row_placeholders(from: usize) -> Vec<String> {
    (from..from + ROW_COLUMN_COUNT)
        .map(|i| format!("${i}"))
        .collect()
}

/// The insert of a new row: identity columns, then [`ROW_COLUMNS`]. Built once.
static INSERT_ROW: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO machines (id, base_name, name_index, full_name, first_seen, {ROW_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, {})",
        row_placeholders(6).join(", ")
    )
});

/// The conditional update of a row: `base_name` and [`ROW_COLUMNS`], then id and expected
/// version. Built once.
static UPDATE_ROW: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let sets: Vec<String> = ROW_COLUMNS
        .split(',')
        .map(str::trim)
        .zip(row_placeholders(2))
        .map(|(c, p)| format!("{c} = {p}"))
        .collect();
    let id = ROW_COLUMN_COUNT + 2;
    format!(
        "UPDATE machines SET base_name = $1, {} WHERE id = ${id} AND version = ${}",
        sets.join(", "),
        id + 1
    )
});

/// Inserts a new machine row.
pub(crate) async fn insert_row(
    tx: &mut Transaction<'_, Any>,
    m: &MachineRow,
) -> Result<(), sqlx::Error> {
    let q = sqlx::query(sqlx::AssertSqlSafe(INSERT_ROW.as_str()))
        .bind(m.id.to_string())
        .bind(m.base_name.clone())
        .bind(m.name_index)
        .bind(m.full_name.clone())
        .bind(m.first_seen.millis());
    bind_row_columns(q, m).execute(&mut **tx).await?;
    Ok(())
}

/// Writes the whole row if its version is still `expected`; false when another writer won.
async fn update_row(
    tx: &mut Transaction<'_, Any>,
    m: &MachineRow,
    expected: i64,
) -> Result<bool, StoreError> {
    let q = sqlx::query(sqlx::AssertSqlSafe(UPDATE_ROW.as_str())).bind(m.base_name.clone());
    let r = bind_row_columns(q, m)
        .bind(m.id.to_string())
        .bind(expected)
        .execute(&mut **tx)
        .await;
    match r {
        Ok(r) => Ok(r.rows_affected() == 1),
        Err(e) if is_unique_violation(&e) => Err(unique_conflict(&e, m)),
        Err(e) => Err(e.into()),
    }
}

/// Makes the transactions that write machine events commit in the order of their events'
/// `seq`. Followers of `GET /api/v1/events` read `seq > cursor` and move the cursor to the last
/// seq they got; on PostgreSQL seqs come from a sequence, so a transaction could take seq 104,
/// another 105, the second commit first, and a follower that read 105 would never see 104 —
/// a released machine the executor would believe busy for good. Every event-writing
/// transaction therefore takes one transaction-scoped advisory lock right before its first
/// event insert, keyed by the schema so that marses of other schemas in the same database do
/// not wait for it. Last, not first: the lock serialises every state change of the farm, so it
/// is held only for the event inserts and the commit, not for the row updates before them
/// (and with no lock taken after it, waiting for it while holding row locks cannot deadlock).
/// SQLite has a single writer already.
pub(crate) async fn commit_in_seq_order(
    tx: &mut Transaction<'_, Any>,
    backend: Backend,
) -> Result<(), StoreError> {
    if backend == Backend::Postgres {
        sqlx::query(
            "SELECT 1 FROM pg_advisory_xact_lock(hashtext('mars events ' || current_schema()))",
        )
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

pub(crate) async fn insert_event(
    tx: &mut Transaction<'_, Any>,
    id: MachineId,
    from: MachineState,
    to: MachineState,
    kind: &str,
    cause: &Cause,
) -> Result<MachineEvent, StoreError> {
    let at = Timestamp::now();
    let row = sqlx::query(
        "INSERT INTO machine_events (machine_id, at, from_state, to_state, kind, actor, reason, job_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING seq",
    )
    .bind(id.to_string())
    .bind(at.millis())
    .bind(from.as_str())
    .bind(to.as_str())
    .bind(kind)
    .bind(&cause.actor)
    .bind(&cause.reason)
    .bind(cause.job_id.clone())
    .fetch_one(&mut **tx)
    .await?;
    Ok(MachineEvent {
        seq: row.try_get::<i64, _>("seq")?,
        machine_id: id,
        at,
        from_state: from,
        to_state: to,
        kind: kind.to_string(),
        actor: cause.actor.clone(),
        reason: cause.reason.clone(),
        job_id: cause.job_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_statements_list_every_column_once() {
        assert_eq!(ROW_COLUMNS.split(',').count(), ROW_COLUMN_COUNT);
        assert!(INSERT_ROW.ends_with(&format!("${})", ROW_COLUMN_COUNT + 5)));
        assert!(UPDATE_ROW.contains("tags = $2,") && UPDATE_ROW.contains("version = $23 "));
        assert!(UPDATE_ROW.ends_with("WHERE id = $24 AND version = $25"));
    }
}
