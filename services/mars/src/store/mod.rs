//! mars's tables (machines with their lease, machine events, training runs and loops, the
//! discovery in progress) and the only code that touches them.
//!
//! - this module: the machine row, reads, and the one write path ([`Store::apply_with`]);
//! - [`write`]: the conditional row update and event insert of that path;
//! - `rows`: decoding rows; `leases`: lease expiry, heartbeats, grace; `discovery`: the
//!   discovery record; `runs`: training runs and loops.
//!
//! Every change of a machine row goes through [`Store::apply_with`]: read the row, let the
//! caller decide, ask [`crate::state::transition`], apply the caller's edit (which cannot
//! change `state`), write the row back on the condition that its `version` is unchanged, and
//! insert the event, in one transaction. A lost race re-reads and retries, so concurrent
//! writers (several HTTP requests, the trainer, the lease sweeper, other gateways on the same
//! PostgreSQL) never overwrite each other. Rows are created by [`Store::insert_new`] (always
//! `WAIT_FOR_CONFIG`); a heartbeat, the restart grace and an expiry claim move only
//! `lease_expires_at` ([`Store::extend_lease`], [`Store::grant_grace`],
//! [`Store::claim_expiry`]).

mod discovery;
mod leases;
mod rows;
mod runs;
pub(crate) mod write;

use std::net::IpAddr;
use std::sync::Arc;

use dutgate_core::db::{Db, Migrations};
use dutgate_core::{MachineId, Tag};
use sqlx::Row;
use sqlx::migrate::Migrator;
use tokio::sync::watch;

use crate::model::{Lease, Machine, MachineEvent, MachineState, Timestamp, TrainingSummary};
use crate::state::{InvalidTransition, Trigger, transition};
use rows::{MACHINE_COLUMNS, row_to_event, row_to_machine};
use write::{
    RowChange, commit_in_seq_order, insert_event, insert_row, is_unique_violation, write_change,
};

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
    /// A decision refused the change for who asked for it (403).
    #[error("{0}")]
    Forbidden(String),
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

#[derive(Clone)]
pub struct Store {
    db: Db,
    farm: Arc<str>,
    /// The newest event seq this process committed: wakes the event stream's long polls and
    /// the trainer.
    events_tx: Arc<watch::Sender<i64>>,
}

impl Store {
    pub fn new(db: Db, farm: &str) -> Self {
        let (tx, _rx) = watch::channel(0);
        Self {
            db,
            farm: Arc::from(farm),
            events_tx: Arc::new(tx),
        }
    }

    /// Wakes up on every event this process records (the value is the latest seq it knows).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.events_tx.subscribe()
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
            Some(r) => row_to_machine(&r),
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

    /// How many machines are in `state`.
    pub async fn count_in_state(&self, state: MachineState) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM machines WHERE state = $1")
            .bind(state.as_str())
            .fetch_one(self.db.pool())
            .await?;
        Ok(row.try_get::<i64, _>("n")?)
    }

    /// The machines whose recorded address is `ip`.
    pub async fn machines_at(&self, ip: IpAddr) -> Result<Vec<MachineId>, StoreError> {
        let rows = sqlx::query("SELECT id FROM machines WHERE ip_address = $1")
            .bind(ip.to_string())
            .fetch_all(self.db.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                MachineId::parse(&id).map_err(rows::decode_err)
            })
            .collect()
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
    ///
    /// The new state is the state machine's answer alone: whatever `edit` does to `state`
    /// (and to the row's identity and version) is overwritten, so a record edit (PATCH,
    /// registration) cannot move a machine past the state machine.
    pub async fn apply_with(
        &self,
        id: MachineId,
        cause: &Cause,
        decide: &(dyn Fn(&MachineRow) -> Decision + Send + Sync),
        edit: &(dyn Fn(&mut MachineRow) + Send + Sync),
    ) -> Result<MachineRow, StoreError> {
        for _ in 0..MAX_RETRIES {
            let cur = self.get(id).await?;
            let (to, kind) = match decide(&cur) {
                Decision::Apply(trigger) => (transition(cur.state, trigger)?, trigger.kind()),
                Decision::Record(kind) => (cur.state, kind),
                Decision::Refuse(e) => return Err(e),
            };
            let mut next = cur.clone();
            // The edit sees the new state (e.g. to schedule a quarantined machine's retry)…
            next.state = to;
            edit(&mut next);
            // …and cannot change it.
            next.id = cur.id;
            next.state = to;
            next.version = cur.version + 1;
            let turn = self.db.write_turn().await;
            let change = RowChange {
                next: &next,
                expected: cur.version,
                from: cur.state,
                kind,
                cause,
            };
            let Some(event) = write_change(&self.db, &change).await? else {
                // Another writer changed the row since it was read: decide again on a fresh
                // read, after letting that writer finish.
                drop(turn);
                tokio::task::yield_now().await;
                continue;
            };
            drop(turn);
            self.notify(event.seq);
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

    /// Inserts a new machine in `WAIT_FOR_CONFIG` with a stable full name, and its
    /// `registered` event. Returns `None` when it already exists. Binding it to a discovered
    /// port is a state change like any other ([`Store::apply_with`]).
    pub async fn insert_new(
        &self,
        mut row: MachineRow,
        cause: &Cause,
    ) -> Result<Option<MachineRow>, StoreError> {
        row.state = MachineState::WaitForConfig;
        for _ in 0..MAX_RETRIES {
            let idx_row = sqlx::query(
                "SELECT COALESCE(MAX(name_index), 0) + 1 AS n FROM machines WHERE base_name = $1",
            )
            .bind(&row.base_name)
            .fetch_one(self.db.pool())
            .await?;
            row.name_index = idx_row.try_get::<i64, _>("n")?;
            row.full_name = format!("{}-{}-{}", self.farm, row.base_name, row.name_index);
            let turn = self.db.write_turn().await;
            let mut tx = self.db.pool().begin().await?;
            match insert_row(&mut tx, &row).await {
                Ok(()) => {}
                Err(e) if is_unique_violation(&e) => {
                    tx.rollback().await?;
                    drop(turn);
                    if self.find(row.id).await?.is_some() {
                        return Ok(None);
                    }
                    // Someone took the same full name: next index.
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            commit_in_seq_order(&mut tx, self.db.backend()).await?;
            let event =
                insert_event(&mut tx, row.id, row.state, row.state, "registered", cause).await?;
            tx.commit().await?;
            drop(turn);
            self.notify(event.seq);
            tracing::info!(machine = %row.id, full_name = %row.full_name, state = %row.state, "machine registered");
            return Ok(Some(row));
        }
        Err(StoreError::Contention(row.id))
    }
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
