//! mars's tables (machines with their lease, machine events, training runs and loops, the
//! discovery in progress) and the only code that touches them.
//!
//! Every state change goes through [`Store::apply`]: read the row, ask
//! [`crate::state::transition`], write the row back on the condition that its `version` is
//! unchanged, and insert the event, in one transaction. A lost race re-reads and retries, so
//! concurrent writers (several HTTP requests, the trainer, the lease sweeper, other gateways
//! on the same PostgreSQL) never overwrite each other.

use std::net::IpAddr;
use std::sync::Arc;

use dutgate_core::db::{Backend, Db, Migrations};
use dutgate_core::{JobStatus, MachineId, Tag};
use sqlx::Row;
use sqlx::any::AnyRow;
use sqlx::migrate::Migrator;
use tokio::sync::watch;

use crate::known_rows::KnownRows;
use crate::model::{
    Discovery, FailedStage, Lease, LoopReport, Machine, MachineEvent, MachineState, RunKind,
    RunOutcome, Timestamp, TrainingRun, TrainingSummary,
};
use crate::recent_events::RecentEvents;
use crate::row_write::{
    RowChange, commit_in_seq_order, insert_event, insert_row, is_unique_violation, write_changes,
};
use crate::state::{InvalidTransition, Trigger, transition};

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// mars's migrations for [`dutgate_core::ServiceContext::open_db`].
pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE,
    postgres: &POSTGRES,
};

/// How many times a write is retried after losing an optimistic-concurrency race.
const MAX_RETRIES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unknown machine {0}")]
    NotFound(MachineId),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("{0}")]
    Conflict(String),
    #[error("lease {0} is gone (expired or released)")]
    LeaseGone(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("too much contention on machine {0}; try again")]
    Contention(MachineId),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A machine row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRow {
    pub id: MachineId,
    pub base_name: String,
    pub name_index: i64,
    pub full_name: String,
    pub tags: Vec<Tag>,
    pub manual_tags: Vec<Tag>,
    pub ip_address: Option<IpAddr>,
    pub local_tty_device: Option<String>,
    pub pdu: Option<String>,
    pub pdu_port_id: Option<String>,
    pub pdu_off_delay: f64,
    pub state: MachineState,
    pub comment: Option<String>,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    pub consecutive_infra_failures: i64,
    pub training_failures: i64,
    pub training_next_at: Option<Timestamp>,
    pub trained_at: Option<Timestamp>,
    pub lease: Option<Lease>,
    pub version: i64,
}

impl MachineRow {
    pub fn configured(&self) -> bool {
        self.pdu.is_some() && self.pdu_port_id.is_some()
    }

    pub fn to_machine(&self, summary: TrainingSummary) -> Machine {
        Machine {
            id: self.id,
            mac_address: self.id,
            base_name: self.base_name.clone(),
            full_name: self.full_name.clone(),
            tags: self.tags.clone(),
            manual_tags: self.manual_tags.clone(),
            ip_address: self.ip_address,
            local_tty_device: self.local_tty_device.clone(),
            pdu: self.pdu.clone(),
            pdu_port_id: self.pdu_port_id.clone(),
            pdu_off_delay: self.pdu_off_delay,
            state: self.state,
            comment: self.comment.clone(),
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            consecutive_infra_failures: self.consecutive_infra_failures.max(0) as u32,
            lease: self.lease.clone(),
            training: summary,
            ready_for_service: matches!(self.state, MachineState::Idle | MachineState::Running),
            is_retired: self.state == MachineState::Retired,
        }
    }
}

/// Who and why, persisted with every event.
#[derive(Debug, Clone)]
pub struct Cause {
    pub actor: String,
    pub reason: String,
    pub job_id: Option<String>,
}

impl Cause {
    pub fn new(actor: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            reason: reason.into(),
            job_id: None,
        }
    }

    pub fn with_job(mut self, job_id: impl Into<String>) -> Self {
        self.job_id = Some(job_id.into());
        self
    }
}

/// A decision made by [`Store::apply_with`]'s closure after reading the current row.
pub enum Decision {
    Apply(Trigger),
    Record(&'static str),
    Refuse(StoreError),
}

/// One operation of [`Store::apply_many`]: what [`Store::apply_with`] takes for one machine.
pub struct BatchOp<'a> {
    pub id: MachineId,
    pub cause: Cause,
    pub decide: &'a (dyn Fn(&MachineRow) -> Decision + Send + Sync),
    pub edit: &'a (dyn Fn(&mut MachineRow) + Send + Sync),
}

#[derive(Clone)]
pub struct Store {
    db: Db,
    farm: Arc<str>,
    events_tx: Arc<watch::Sender<i64>>,
    recent: Arc<std::sync::Mutex<RecentEvents>>,
    /// The newest rows seen, to decide a change without reading its row first.
    known: Arc<KnownRows>,
}

fn decode_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn tags_from_json(s: &str) -> Result<Vec<Tag>, StoreError> {
    serde_json::from_str(s).map_err(decode_err)
}

fn opt_ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp)
}

fn row_to_machine(r: &AnyRow) -> Result<MachineRow, StoreError> {
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

fn row_to_event(r: &AnyRow) -> Result<MachineEvent, StoreError> {
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

const MACHINE_COLUMNS: &str = "id, base_name, name_index, full_name, tags, manual_tags, ip_address, \
    local_tty_device, pdu, pdu_port_id, pdu_off_delay, state, comment, first_seen, last_seen, \
    consecutive_infra_failures, training_failures, training_next_at, trained_at, lease_id, \
    lease_job_id, lease_holder, lease_purpose, lease_acquired_at, lease_expires_at, lease_ttl, version";

impl Store {
    pub fn new(db: Db, farm: &str) -> Self {
        let (tx, _rx) = watch::channel(0);
        Self {
            db,
            farm: Arc::from(farm),
            events_tx: Arc::new(tx),
            recent: Arc::default(),
            known: Arc::default(),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn farm(&self) -> &str {
        &self.farm
    }

    /// Wakes up on every event this process records (the value is the latest seq it knows).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.events_tx.subscribe()
    }

    /// Makes committed events known: to the recent events and to subscribers. Called right
    /// after the commit (before the write turn is given back on SQLite; on PostgreSQL two
    /// writers' announcements may come in either order, which the recent events allow for).
    fn announce(&self, events: Vec<MachineEvent>) {
        let Some(seq) = events.iter().map(|e| e.seq).max() else {
            return;
        };
        if let Ok(mut recent) = self.recent.lock() {
            for e in events {
                recent.push(e);
            }
        }
        self.notify(seq);
    }

    /// The events after `after` (at most `limit`) from memory, when the recent events
    /// provably hold all of them up to the newest announced; `None` means: read the table
    /// ([`Store::events_after`]) and pass what it returned to [`Store::learn_events`].
    pub fn recent_events_after(&self, after: i64, limit: usize) -> Option<Vec<MachineEvent>> {
        let latest = *self.events_tx.borrow();
        self.recent.lock().ok()?.after(after, latest, limit)
    }

    /// What a table read of the events after `after` returned, for the recent events to
    /// learn the seqs they miss (another process's events, seqs that were never committed).
    pub fn learn_events(&self, after: i64, events: &[MachineEvent]) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.learn(after, events);
        }
    }

    fn notify(&self, seq: i64) {
        self.events_tx.send_if_modified(|cur| {
            if seq > *cur {
                *cur = seq;
                true
            } else {
                false
            }
        });
    }

    // ---- reads ---------------------------------------------------------------------------

    pub async fn get(&self, id: MachineId) -> Result<MachineRow, StoreError> {
        let sql = format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .fetch_optional(self.db.pool())
            .await?;
        match row {
            Some(r) => {
                let row = row_to_machine(&r)?;
                self.known.learn(&row);
                Ok(row)
            }
            None => Err(StoreError::NotFound(id)),
        }
    }

    pub async fn find(&self, id: MachineId) -> Result<Option<MachineRow>, StoreError> {
        match self.get(id).await {
            Ok(r) => Ok(Some(r)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn list(&self) -> Result<Vec<MachineRow>, StoreError> {
        let sql = format!("SELECT {MACHINE_COLUMNS} FROM machines ORDER BY full_name");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(self.db.pool())
            .await?;
        rows.iter().map(row_to_machine).collect()
    }

    pub async fn machine_by_port(
        &self,
        pdu: &str,
        port_id: &str,
    ) -> Result<Option<MachineRow>, StoreError> {
        let sql =
            format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE pdu = $1 AND pdu_port_id = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(pdu)
            .bind(port_id)
            .fetch_optional(self.db.pool())
            .await?;
        row.as_ref().map(row_to_machine).transpose()
    }

    /// Events of one machine, oldest first; the newest `limit` when given.
    pub async fn machine_events(
        &self,
        id: MachineId,
        limit: i64,
    ) -> Result<Vec<MachineEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, machine_id, at, from_state, to_state, kind, actor, reason, job_id \
             FROM machine_events WHERE machine_id = $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(id.to_string())
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        let mut v: Vec<MachineEvent> = rows.iter().map(row_to_event).collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

    /// Events of all machines with `seq > after`, oldest first.
    pub async fn events_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<MachineEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, machine_id, at, from_state, to_state, kind, actor, reason, job_id \
             FROM machine_events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(row_to_event).collect()
    }

    pub async fn latest_seq(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS s FROM machine_events")
            .fetch_one(self.db.pool())
            .await?;
        Ok(row.try_get::<i64, _>("s")?)
    }

    // ---- the one write path for machine state ----------------------------------------------

    /// Reads the machine, lets `decide` pick what happens given its current row, applies the
    /// state machine and `edit`, and persists row + event atomically. Retries lost races.
    pub async fn apply_with(
        &self,
        id: MachineId,
        cause: &Cause,
        decide: &(dyn Fn(&MachineRow) -> Decision + Send + Sync),
        edit: &(dyn Fn(&mut MachineRow) + Send + Sync),
    ) -> Result<MachineRow, StoreError> {
        for attempt in 0..MAX_RETRIES {
            // The first attempt decides on the row known in memory, if any (see
            // `KnownRows`); a refusal is only given on a fresh read.
            let (cur, known) = match (attempt == 0).then(|| self.known.get(id)).flatten() {
                Some(row) => (row, true),
                None => (self.get(id).await?, false),
            };
            let decided = match decide(&cur) {
                Decision::Apply(trigger) => {
                    transition(cur.state, trigger).map(|to| (to, trigger.kind()))
                }
                Decision::Record(kind) => Ok((cur.state, kind)),
                Decision::Refuse(_) if known => continue,
                Decision::Refuse(e) => return Err(e),
            };
            let (to, kind) = match decided {
                Ok(d) => d,
                Err(_) if known => continue,
                Err(e) => return Err(e.into()),
            };
            let mut next = cur.clone();
            next.state = to;
            edit(&mut next);
            next.version = cur.version + 1;
            let turn = self.db.write_turn().await;
            let change = RowChange {
                next: &next,
                expected: cur.version,
                from: cur.state,
                kind,
                cause,
            };
            let Some(Some(event)) = write_changes(&self.db, &[change]).await?.pop() else {
                drop(turn);
                self.known.forget(id);
                tokio::task::yield_now().await;
                continue;
            };
            self.known.learn(&next);
            self.announce(vec![event]);
            drop(turn);
            if cur.state != to {
                tracing::info!(machine = %id, from = %cur.state, to = %to, kind, actor = %cause.actor, reason = %cause.reason, "machine state changed");
                metrics::counter!("mars_transitions_total", "to" => to.as_str()).increment(1);
            }
            return Ok(next);
        }
        Err(StoreError::Contention(id))
    }

    /// [`Store::apply_with`] for a fixed trigger.
    pub async fn trigger(
        &self,
        id: MachineId,
        trigger: Trigger,
        cause: &Cause,
        edit: &(dyn Fn(&mut MachineRow) + Send + Sync),
    ) -> Result<MachineRow, StoreError> {
        self.apply_with(id, cause, &move |_| Decision::Apply(trigger), edit)
            .await
    }

    // ---- registration ----------------------------------------------------------------------

    /// Inserts a new machine in `WAIT_FOR_CONFIG` (or bound to the claimed discovery port and
    /// in `TRAINING`) with a stable full name. Returns `None` when it already exists.
    pub async fn insert_new(
        &self,
        mut row: MachineRow,
        discovery: Option<&Discovery>,
        cause: &Cause,
    ) -> Result<Option<MachineRow>, StoreError> {
        for _ in 0..MAX_RETRIES {
            let idx_row = sqlx::query(
                "SELECT COALESCE(MAX(name_index), 0) + 1 AS n FROM machines WHERE base_name = $1",
            )
            .bind(&row.base_name)
            .fetch_one(self.db.pool())
            .await?;
            row.name_index = idx_row.try_get::<i64, _>("n")?;
            row.full_name = format!("{}-{}-{}", self.farm, row.base_name, row.name_index);
            let _turn = self.db.write_turn().await;
            let mut tx = self.db.pool().begin().await?;
            let initial = MachineState::WaitForConfig;
            row.state = initial;
            match insert_row(&mut tx, &row).await {
                Ok(()) => {}
                Err(e) if is_unique_violation(&e) => {
                    tx.rollback().await?;
                    if self.find(row.id).await?.is_some() {
                        return Ok(None);
                    }
                    // Someone took the same full name: next index.
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            // Row changes first, then the event-order lock and the events (see
            // `commit_in_seq_order`).
            let mut configured = None;
            if let Some(d) = discovery {
                let to = transition(initial, Trigger::Configure)?;
                let updated = sqlx::query(
                    "UPDATE machines SET pdu = $1, pdu_port_id = $2, state = $3 WHERE id = $4",
                )
                .bind(&d.pdu)
                .bind(&d.port_id)
                .bind(to.as_str())
                .bind(row.id.to_string())
                .execute(&mut *tx)
                .await;
                match updated {
                    Ok(_) => {
                        row.pdu = Some(d.pdu.clone());
                        row.pdu_port_id = Some(d.port_id.clone());
                        row.state = to;
                        configured = Some(Cause::new(
                            cause.actor.clone(),
                            format!("discovered on PDU {} port {}", d.pdu, d.port_id),
                        ));
                    }
                    Err(e) if is_unique_violation(&e) => {
                        tx.rollback().await?;
                        return Err(StoreError::Conflict(format!(
                            "PDU {} port {} is already assigned to another machine",
                            d.pdu, d.port_id
                        )));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            commit_in_seq_order(&mut tx, self.db.backend()).await?;
            let mut events =
                vec![insert_event(&mut tx, row.id, initial, initial, "registered", cause).await?];
            if let Some(c) = configured {
                events.push(
                    insert_event(
                        &mut tx,
                        row.id,
                        initial,
                        row.state,
                        Trigger::Configure.kind(),
                        &c,
                    )
                    .await?,
                );
            }
            tx.commit().await?;
            self.announce(events);
            tracing::info!(machine = %row.id, full_name = %row.full_name, state = %row.state, "machine registered");
            return Ok(Some(row));
        }
        Err(StoreError::Contention(row.id))
    }

    /// The rows of `ids` that exist (in no particular order).
    pub async fn get_many(&self, ids: &[MachineId]) -> Result<Vec<MachineRow>, StoreError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "SELECT {MACHINE_COLUMNS} FROM machines WHERE id IN ({})",
                marks.join(", ")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for r in q.fetch_all(self.db.pool()).await? {
                let row = row_to_machine(&r)?;
                self.known.learn(&row);
                out.push(row);
            }
        }
        Ok(out)
    }

    /// [`Store::apply_with`] for many machines in one transaction: one read of all the rows,
    /// then each operation's decision, row and event, and one commit. Each operation gets its
    /// own result (a refusal does not stop the others). An operation that lost a race with
    /// another writer (or that follows another operation on the same machine) is tried again
    /// in a further pass on a fresh read. A database error fails the whole batch: nothing of
    /// it is applied.
    pub async fn apply_many(
        &self,
        ops: &[BatchOp<'_>],
    ) -> Result<Vec<Result<MachineRow, StoreError>>, StoreError> {
        let mut out: Vec<Option<Result<MachineRow, StoreError>>> =
            (0..ops.len()).map(|_| None).collect();
        for pass in 0..MAX_RETRIES {
            let pending: Vec<usize> = (0..ops.len()).filter(|&i| out[i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            let mut ids: Vec<MachineId> = pending.iter().map(|&i| ops[i].id).collect();
            ids.sort();
            ids.dedup();
            // The first pass decides on the rows known in memory (see `KnownRows`) and reads
            // only the others; a refusal is only given on a fresh read.
            let mut rows = std::collections::HashMap::with_capacity(ids.len());
            let mut known = std::collections::HashSet::new();
            if pass == 0 {
                ids.retain(|id| match self.known.get(*id) {
                    Some(row) => {
                        known.insert(*id);
                        rows.insert(*id, row);
                        false
                    }
                    None => true,
                });
            }
            if !ids.is_empty() {
                rows.extend(self.get_many(&ids).await?.into_iter().map(|r| (r.id, r)));
            }
            let mut chosen = std::collections::HashSet::new();
            let mut candidates = Vec::new();
            for i in pending {
                let op = &ops[i];
                let Some(cur) = rows.get(&op.id) else {
                    out[i] = Some(Err(StoreError::NotFound(op.id)));
                    continue;
                };
                if chosen.contains(&op.id) {
                    // Another operation of this pass writes its row: decide on a fresh read.
                    continue;
                }
                let from_memory = known.contains(&op.id);
                let (to, kind) = match (op.decide)(cur) {
                    Decision::Apply(trigger) => match transition(cur.state, trigger) {
                        Ok(to) => (to, trigger.kind()),
                        // Decide again on a fresh read.
                        Err(_) if from_memory => continue,
                        Err(e) => {
                            out[i] = Some(Err(e.into()));
                            continue;
                        }
                    },
                    Decision::Record(kind) => (cur.state, kind),
                    Decision::Refuse(_) if from_memory => continue,
                    Decision::Refuse(e) => {
                        out[i] = Some(Err(e));
                        continue;
                    }
                };
                let mut next = cur.clone();
                next.state = to;
                (op.edit)(&mut next);
                next.version = cur.version + 1;
                chosen.insert(op.id);
                candidates.push((i, cur.state, cur.version, kind, next));
            }
            let changes: Vec<RowChange<'_>> = candidates
                .iter()
                .map(|(i, from, expected, kind, next)| RowChange {
                    next,
                    expected: *expected,
                    from: *from,
                    kind,
                    cause: &ops[*i].cause,
                })
                .collect();
            // The executor's lease batch is the dispatcher's write: it takes the fast lane
            // past releases, registrations and training bookkeeping queued before it.
            let turn = self.db.priority_write_turn().await;
            let events = write_changes(&self.db, &changes).await?;
            drop(changes);
            let mut applied = Vec::with_capacity(candidates.len());
            for ((i, from, _, kind, next), event) in candidates.into_iter().zip(events) {
                // No event: another writer changed the row first; the next pass re-reads it.
                match event {
                    Some(event) => {
                        self.known.learn(&next);
                        applied.push((i, from, kind, event, next));
                    }
                    None => self.known.forget(next.id),
                }
            }
            self.announce(applied.iter().map(|a| a.3.clone()).collect());
            drop(turn);
            for (i, from, kind, _, next) in applied {
                if from != next.state {
                    tracing::info!(machine = %next.id, from = %from, to = %next.state, kind, actor = %ops[i].cause.actor, reason = %ops[i].cause.reason, "machine state changed");
                    metrics::counter!("mars_transitions_total", "to" => next.state.as_str())
                        .increment(1);
                }
                out[i] = Some(Ok(next));
            }
            if out.iter().any(Option::is_none) {
                // Another pass follows: let the writer that won the race finish first. Not
                // after the last pass: a yield there only puts the lease answer at the back of
                // the run queue.
                tokio::task::yield_now().await;
            }
        }
        Ok(out
            .into_iter()
            .zip(ops)
            .map(|(r, op)| r.unwrap_or(Err(StoreError::Contention(op.id))))
            .collect())
    }

    // ---- leases --------------------------------------------------------------------------

    /// Machines whose lease expired before `now`.
    pub async fn expired_leases(&self, now: Timestamp) -> Result<Vec<MachineRow>, StoreError> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE lease_id IS NOT NULL AND lease_expires_at < $1"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now.millis())
            .fetch_all(self.db.pool())
            .await?;
        rows.iter().map(row_to_machine).collect()
    }

    /// Moves a lease's expiry to `expires` if it is still live at `now`. No event: heartbeats
    /// are not state changes. The version moves so that a concurrent writer re-reads the row.
    pub async fn extend_lease(
        &self,
        lease_id: &str,
        now: Timestamp,
        expires: Timestamp,
    ) -> Result<bool, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "UPDATE machines SET lease_expires_at = $1, version = version + 1 \
             WHERE lease_id = $2 AND lease_expires_at >= $3 RETURNING id",
        )
        .bind(expires.millis())
        .bind(lease_id)
        .bind(now.millis())
        .fetch_optional(self.db.pool())
        .await?;
        let Some(r) = r else {
            return Ok(false);
        };
        // The row in memory has the old version now: read it for the next change.
        let id: String = r.try_get(0)?;
        if let Ok(id) = MachineId::parse(&id) {
            self.known.forget(id);
        }
        Ok(true)
    }

    pub async fn machine_by_lease(&self, lease_id: &str) -> Result<MachineRow, StoreError> {
        let sql = format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE lease_id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(lease_id)
            .fetch_optional(self.db.pool())
            .await?;
        match row {
            Some(r) => row_to_machine(&r),
            None => Err(StoreError::LeaseGone(lease_id.to_string())),
        }
    }

    // ---- discovery -----------------------------------------------------------------------

    pub async fn discovery(&self) -> Result<Option<Discovery>, StoreError> {
        let row = sqlx::query(
            "SELECT pdu, port_id, started_at, expires_at, timeout FROM discovery WHERE id = 1",
        )
        .fetch_optional(self.db.pool())
        .await?;
        row.map(|r| -> Result<Discovery, StoreError> {
            Ok(Discovery {
                pdu: r.try_get("pdu")?,
                port_id: r.try_get("port_id")?,
                started_at: Timestamp(r.try_get("started_at")?),
                expires_at: Timestamp(r.try_get("expires_at")?),
                timeout: r.try_get("timeout")?,
            })
        })
        .transpose()
    }

    /// Starts a discovery; false when one is already recorded.
    pub async fn insert_discovery(&self, d: &Discovery) -> Result<bool, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "INSERT INTO discovery (id, pdu, port_id, started_at, expires_at, timeout) \
             VALUES (1, $1, $2, $3, $4, $5)",
        )
        .bind(&d.pdu)
        .bind(&d.port_id)
        .bind(d.started_at.millis())
        .bind(d.expires_at.millis())
        .bind(d.timeout)
        .execute(self.db.pool())
        .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the discovery if it is still `d` (same port and start); true when removed.
    /// Claiming a discovery for a registration and stopping it both go through here, so only
    /// one of them can win.
    pub async fn remove_discovery(&self, d: &Discovery) -> Result<bool, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "DELETE FROM discovery WHERE id = 1 AND pdu = $1 AND port_id = $2 AND started_at = $3",
        )
        .bind(&d.pdu)
        .bind(&d.port_id)
        .bind(d.started_at.millis())
        .execute(self.db.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    // ---- training runs -------------------------------------------------------------------

    pub async fn start_run(
        &self,
        id: MachineId,
        kind: RunKind,
        boot_loops: u32,
        qualifying: u32,
    ) -> Result<i64, StoreError> {
        let _turn = self.db.write_turn().await;
        let row = sqlx::query(
            "INSERT INTO training_runs (machine_id, kind, started_at, outcome, boot_loops, qualifying) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(id.to_string())
        .bind(kind.as_str())
        .bind(Timestamp::now().millis())
        .bind(RunOutcome::Running.as_str())
        .bind(i64::from(boot_loops))
        .bind(i64::from(qualifying))
        .fetch_one(self.db.pool())
        .await?;
        Ok(row.try_get::<i64, _>("id")?)
    }

    pub async fn add_loop(&self, run_id: i64, report: &LoopReport) -> Result<(), StoreError> {
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.pool().begin().await?;
        sqlx::query(
            "INSERT INTO training_loops (run_id, n, job_kind, job_id, status, started_at, duration_ms, \
             failed_stage, console_log_url, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(run_id)
        .bind(i64::from(report.n))
        .bind(&report.job_kind)
        .bind(report.job_id.clone())
        .bind(report.status.as_str())
        .bind(report.started_at.millis())
        .bind(report.duration_ms)
        .bind(report.failed_stage.map(|s| s.as_str().to_string()))
        .bind(report.console_log_url.clone())
        .bind(report.detail.clone())
        .execute(&mut *tx)
        .await?;
        // The registration boot (loop 0) gates the run but is not one of the N boot loops.
        if report.job_kind != "registration" {
            let q = if report.passed() {
                "UPDATE training_runs SET passes = passes + 1 WHERE id = $1"
            } else {
                "UPDATE training_runs SET failures = failures + 1 WHERE id = $1"
            };
            sqlx::query(q).bind(run_id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn end_run(
        &self,
        run_id: i64,
        outcome: RunOutcome,
        reason: &str,
    ) -> Result<(), StoreError> {
        let _turn = self.db.write_turn().await;
        sqlx::query(
            "UPDATE training_runs SET outcome = $1, ended_at = $2, reason = $3 WHERE id = $4",
        )
        .bind(outcome.as_str())
        .bind(Timestamp::now().millis())
        .bind(reason)
        .bind(run_id)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Runs still marked running (left over by a previous mars process).
    pub async fn abandon_running_runs(&self) -> Result<u64, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "UPDATE training_runs SET outcome = $1, ended_at = $2, reason = $3 WHERE outcome = $4",
        )
        .bind(RunOutcome::Cancelled.as_str())
        .bind(Timestamp::now().millis())
        .bind("mars restarted during the run")
        .bind(RunOutcome::Running.as_str())
        .execute(self.db.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// The machine's runs, most recent first, with their loops.
    pub async fn runs(&self, id: MachineId, limit: i64) -> Result<Vec<TrainingRun>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, machine_id, kind, started_at, ended_at, outcome, boot_loops, qualifying, \
             passes, failures, reason FROM training_runs WHERE machine_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(id.to_string())
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        let mut runs = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut run = row_to_run(r)?;
            run.loops = self.loops(run.id).await?;
            runs.push(run);
        }
        Ok(runs)
    }

    /// The latest run of every machine that has one (for list summaries), with loops.
    pub async fn latest_runs(&self) -> Result<Vec<TrainingRun>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, machine_id, kind, started_at, ended_at, outcome, boot_loops, qualifying, \
             passes, failures, reason FROM training_runs \
             WHERE id IN (SELECT MAX(id) FROM training_runs GROUP BY machine_id)",
        )
        .fetch_all(self.db.pool())
        .await?;
        let mut runs = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut run = row_to_run(r)?;
            run.loops = self.loops(run.id).await?;
            runs.push(run);
        }
        Ok(runs)
    }

    async fn loops(&self, run_id: i64) -> Result<Vec<LoopReport>, StoreError> {
        let rows = sqlx::query(
            "SELECT n, job_kind, job_id, status, started_at, duration_ms, failed_stage, \
             console_log_url, detail FROM training_loops WHERE run_id = $1 ORDER BY n",
        )
        .bind(run_id)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| -> Result<LoopReport, StoreError> {
                let status: String = r.try_get("status")?;
                let stage: Option<String> = r.try_get("failed_stage")?;
                Ok(LoopReport {
                    n: r.try_get::<i64, _>("n")?.max(0) as u32,
                    job_kind: r.try_get("job_kind")?,
                    job_id: r.try_get("job_id")?,
                    status: status.parse::<JobStatus>().map_err(decode_err)?,
                    started_at: Timestamp(r.try_get("started_at")?),
                    duration_ms: r.try_get("duration_ms")?,
                    failed_stage: stage
                        .map(|s| s.parse::<FailedStage>())
                        .transpose()
                        .map_err(decode_err)?,
                    console_log_url: r.try_get("console_log_url")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    pub fn backend(&self) -> Backend {
        self.db.backend()
    }
}

fn row_to_run(r: &AnyRow) -> Result<TrainingRun, StoreError> {
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

/// A fresh row for a machine seen for the first time.
pub fn new_row(
    id: MachineId,
    base_name: &str,
    tags: Vec<Tag>,
    ip: IpAddr,
    tty: Option<String>,
    off_delay: f64,
) -> MachineRow {
    let now = Timestamp::now();
    MachineRow {
        id,
        base_name: base_name.to_string(),
        name_index: 0,
        full_name: String::new(),
        tags,
        manual_tags: Vec::new(),
        ip_address: Some(ip),
        local_tty_device: tty,
        pdu: None,
        pdu_port_id: None,
        pdu_off_delay: off_delay,
        state: MachineState::WaitForConfig,
        comment: None,
        first_seen: now,
        last_seen: now,
        consecutive_infra_failures: 0,
        training_failures: 0,
        training_next_at: None,
        trained_at: None,
        lease: None,
        version: 0,
    }
}
