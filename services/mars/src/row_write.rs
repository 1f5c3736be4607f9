//! Writing machine rows and their events: the second half of every state change (the first,
//! reading the row and deciding, is [`crate::store::Store::apply_with`]'s).
//!
//! Each change is written only if the row's `version` is still the one it was decided on
//! (optimistic concurrency), and each row written gets its event, all in one transaction.
//!
//! On SQLite that is a transaction of one `UPDATE` and one `INSERT` per change: statements
//! cost no round trip there. On PostgreSQL every statement is a round trip to the server, and
//! a lease batch or a release used to be six of them (begin, update, event-order lock, event
//! insert, commit, plus the read before). There the whole write is **one statement**: the
//! changes travel as one JSON document, a data-modifying CTE updates the rows whose version
//! still matches, takes the event-order lock once all of them are written, and inserts one
//! event per updated row; the statement commits on its own.

use dutgate_core::MachineId;
use dutgate_core::db::{Backend, Db};
use sqlx::{Any, Row, Transaction};

use crate::model::{MachineEvent, MachineState, Timestamp};
use crate::store::{Cause, MachineRow, StoreError};

/// One row to write: `next` replaces the row if its version is still `expected`; the event
/// records `from` → `next.state` as `kind`, with `cause`.
pub(crate) struct RowChange<'a> {
    pub next: &'a MachineRow,
    pub expected: i64,
    pub from: MachineState,
    pub kind: &'a str,
    pub cause: &'a Cause,
}

/// Writes `changes` (at most one per machine) in one transaction. One result per change, in
/// order: its event, or `None` when another writer changed the row first (nothing of that
/// change was written). The caller holds the write turn and announces the events.
pub(crate) async fn write_changes(
    db: &Db,
    changes: &[RowChange<'_>],
) -> Result<Vec<Option<MachineEvent>>, StoreError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    match db.backend() {
        Backend::Sqlite => write_in_transaction(db, changes).await,
        Backend::Postgres => write_in_one_statement(db, changes).await,
    }
}

async fn write_in_transaction(
    db: &Db,
    changes: &[RowChange<'_>],
) -> Result<Vec<Option<MachineEvent>>, StoreError> {
    let mut tx = db.pool().begin().await?;
    let mut written = Vec::with_capacity(changes.len());
    for c in changes {
        written.push(update_row(&mut tx, c.next, c.expected).await?);
    }
    if !written.contains(&true) {
        tx.rollback().await?;
        return Ok(vec![None; changes.len()]);
    }
    let mut out = Vec::with_capacity(changes.len());
    for (c, w) in changes.iter().zip(written) {
        out.push(if w {
            Some(insert_event(&mut tx, c.next.id, c.from, c.next.state, c.kind, c.cause).await?)
        } else {
            None
        });
    }
    tx.commit().await?;
    Ok(out)
}

/// The PostgreSQL write: one statement, one round trip, its own transaction.
///
/// Order matters for the event followers (see [`commit_in_seq_order`]): seqs must be drawn
/// under the event-order lock, so that transactions commit in seq order. `lock` reads every
/// row `updated` returns before it takes the lock (all row updates, and the row locks they
/// take, happen first: waiting for the event-order lock while holding row locks cannot
/// deadlock, as no one waits for a row lock while holding it); `events` needs `lock`'s row
/// before it produces any row, so its seqs (the column default) are drawn after the lock.
/// Nothing updated: no lock, no event.
///
/// `{ids}` is one placeholder per change, with the changed rows' ids: the planner cannot tell
/// how many rows `json_to_recordset` yields (it assumes 100) and would scan the whole table
/// to join them; with the ids listed it looks the rows up in the primary key.
const WRITE_STATEMENT: &str = "\
WITH change AS MATERIALIZED (
    SELECT * FROM json_to_recordset($1::json) AS c(
        n BIGINT, id TEXT, expected BIGINT, base_name TEXT, tags TEXT, manual_tags TEXT,
        ip_address TEXT, local_tty_device TEXT, pdu TEXT, pdu_port_id TEXT,
        pdu_off_delay DOUBLE PRECISION, state TEXT, comment TEXT, last_seen BIGINT,
        consecutive_infra_failures BIGINT, training_failures BIGINT, training_next_at BIGINT,
        trained_at BIGINT, lease_id TEXT, lease_job_id TEXT, lease_holder TEXT,
        lease_purpose TEXT, lease_acquired_at BIGINT, lease_expires_at BIGINT, lease_ttl BIGINT,
        version BIGINT, at BIGINT, from_state TEXT, kind TEXT, actor TEXT, reason TEXT,
        job_id TEXT)
), updated AS (
    UPDATE machines m SET base_name = c.base_name, tags = c.tags, manual_tags = c.manual_tags,
        ip_address = c.ip_address, local_tty_device = c.local_tty_device, pdu = c.pdu,
        pdu_port_id = c.pdu_port_id, pdu_off_delay = c.pdu_off_delay, state = c.state,
        comment = c.comment, last_seen = c.last_seen,
        consecutive_infra_failures = c.consecutive_infra_failures,
        training_failures = c.training_failures, training_next_at = c.training_next_at,
        trained_at = c.trained_at, lease_id = c.lease_id, lease_job_id = c.lease_job_id,
        lease_holder = c.lease_holder, lease_purpose = c.lease_purpose,
        lease_acquired_at = c.lease_acquired_at, lease_expires_at = c.lease_expires_at,
        lease_ttl = c.lease_ttl, version = c.version
    FROM change c WHERE m.id IN ({ids}) AND m.id = c.id AND m.version = c.expected
    RETURNING c.n, c.id, c.at, c.from_state, c.state, c.kind, c.actor, c.reason, c.job_id
), lock AS MATERIALIZED (
    SELECT pg_advisory_xact_lock(hashtext('mars events ' || current_schema())) AS taken
    FROM (SELECT count(*) AS rows FROM updated) u WHERE u.rows > 0
), events AS (
    INSERT INTO machine_events (machine_id, at, from_state, to_state, kind, actor, reason, job_id)
    SELECT u.id, u.at, u.from_state, u.state, u.kind, u.actor, u.reason, u.job_id
    FROM (SELECT * FROM updated ORDER BY n) u CROSS JOIN lock
    RETURNING seq, machine_id
)
SELECT seq, machine_id FROM events";

async fn write_in_one_statement(
    db: &Db,
    changes: &[RowChange<'_>],
) -> Result<Vec<Option<MachineEvent>>, StoreError> {
    let at = Timestamp::now();
    let rows: Vec<serde_json::Value> = changes
        .iter()
        .enumerate()
        .map(|(n, c)| {
            let m = c.next;
            let lease = m.lease.as_ref();
            serde_json::json!({
                "n": n,
                "id": m.id.to_string(),
                "expected": c.expected,
                "base_name": m.base_name,
                "tags": tags_to_json(&m.tags),
                "manual_tags": tags_to_json(&m.manual_tags),
                "ip_address": m.ip_address.map(|i| i.to_string()),
                "local_tty_device": m.local_tty_device,
                "pdu": m.pdu,
                "pdu_port_id": m.pdu_port_id,
                "pdu_off_delay": m.pdu_off_delay,
                "state": m.state.as_str(),
                "comment": m.comment,
                "last_seen": m.last_seen.millis(),
                "consecutive_infra_failures": m.consecutive_infra_failures,
                "training_failures": m.training_failures,
                "training_next_at": m.training_next_at.map(Timestamp::millis),
                "trained_at": m.trained_at.map(Timestamp::millis),
                "lease_id": lease.map(|l| l.id.as_str()),
                "lease_job_id": lease.map(|l| l.job_id.as_str()),
                "lease_holder": lease.map(|l| l.holder.as_str()),
                "lease_purpose": lease.map(|l| l.purpose.as_str()),
                "lease_acquired_at": lease.map(|l| l.acquired_at.millis()),
                "lease_expires_at": lease.map(|l| l.expires_at.millis()),
                "lease_ttl": lease.map(|l| l.ttl_seconds as i64),
                "version": m.version,
                "at": at.millis(),
                "from_state": c.from.as_str(),
                "kind": c.kind,
                "actor": c.cause.actor,
                "reason": c.cause.reason,
                "job_id": c.cause.job_id,
            })
        })
        .collect();
    let doc = serde_json::Value::Array(rows).to_string();
    let ids: Vec<String> = (2..changes.len() + 2).map(|i| format!("${i}")).collect();
    let sql = WRITE_STATEMENT.replace("{ids}", &ids.join(", "));
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(doc);
    for c in changes {
        query = query.bind(c.next.id.to_string());
    }
    let result = query.fetch_all(db.pool()).await;
    let written = match result {
        Ok(rows) => rows,
        Err(e) if is_unique_violation(&e) => {
            return Err(unique_conflict(
                &e,
                match changes {
                    [one] => Some(one.next),
                    _ => None,
                },
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let mut seqs = std::collections::HashMap::with_capacity(written.len());
    for r in &written {
        let seq: i64 = r.try_get("seq")?;
        let machine: String = r.try_get("machine_id")?;
        seqs.insert(machine, seq);
    }
    Ok(changes
        .iter()
        .map(|c| {
            seqs.get(&c.next.id.to_string()).map(|&seq| MachineEvent {
                seq,
                machine_id: c.next.id,
                at,
                from_state: c.from,
                to_state: c.next.state,
                kind: c.kind.to_string(),
                actor: c.cause.actor.clone(),
                reason: c.cause.reason.clone(),
                job_id: c.cause.job_id.clone(),
            })
        })
        .collect())
}

/// The error a unique violation of a row write means: a lease id already in use (ids a lease
/// requester chose itself), else a PDU port taken by another machine. `m`: the row written,
/// when the write was of one row.
fn unique_conflict(e: &sqlx::Error, m: Option<&MachineRow>) -> StoreError {
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
    match m {
        Some(m) => StoreError::Conflict(format!(
            "PDU {} port {} is already assigned to another machine",
            m.pdu.as_deref().unwrap_or("?"),
            m.pdu_port_id.as_deref().unwrap_or("?")
        )),
        None => StoreError::Conflict(
            "a PDU port of this change is already assigned to another machine".into(),
        ),
    }
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
        Err(e) if is_unique_violation(&e) => Err(unique_conflict(&e, Some(m))),
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
/// SQLite has a single writer already. [`WRITE_STATEMENT`] takes the same lock.
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
