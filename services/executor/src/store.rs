//! The executor's tables: `jobs` (the queue and the records) and `job_events`. Nothing else
//! touches them. Both the executor and the job processes write here (SQLite in WAL mode or
//! PostgreSQL), so every state change is a conditional update checked against
//! [`crate::model::transition`].

use dutgate_core::db::{Backend, Db, DbError, Migrations};
use dutgate_core::{JobStatus, MachineId};
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::{Any, AnyPool, Row, Transaction};

use crate::model::{Event, JobState, Purpose, Timestamp, Trigger, transition};

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE,
    postgres: &POSTGRES,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("job {0} not found")]
    NotFound(i64),
    #[error("job {id}: {source}")]
    Transition {
        id: i64,
        #[source]
        source: crate::model::InvalidTransition,
    },
    #[error("job {id}: stored {field} is invalid: {value:?}")]
    Corrupt {
        id: i64,
        field: &'static str,
        value: String,
    },
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Query(q) => StoreError::Db(q),
            other => StoreError::Db(sqlx::Error::Protocol(other.to_string())),
        }
    }
}

pub fn now_ms() -> i64 {
    Timestamp::now().millis()
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: i64,
    pub external_id: Option<String>,
    pub state: JobState,
    pub phase: Option<String>,
    pub status: Option<JobStatus>,
    pub reason: Option<String>,
    pub priority: i64,
    pub purpose: Purpose,
    pub job_yaml: String,
    pub target_id: Option<MachineId>,
    pub target_tags: Vec<String>,
    pub deadline_ms: Option<i64>,
    pub submitted_at: i64,
    pub dispatched_at: Option<i64>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub machine_id: Option<MachineId>,
    pub lease_id: Option<String>,
    pub executor: Option<String>,
    pub pid: Option<i64>,
    pub boots: i64,
    pub cancel_requested: bool,
    pub has_tarball: bool,
    /// Name of the token that submitted the job.
    pub owner: String,
}

/// What a submission stores.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub external_id: Option<String>,
    pub priority: i64,
    pub purpose: Purpose,
    pub job_yaml: String,
    pub target_id: Option<MachineId>,
    pub target_tags: Vec<String>,
    pub deadline_ms: Option<i64>,
    pub has_tarball: bool,
    /// Name of the submitting token ([`dutgate_core::auth::Identity`]).
    pub owner: String,
}

/// The fields the scheduler needs to match a queued job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub id: i64,
    pub priority: i64,
    pub purpose: Purpose,
    pub target_id: Option<MachineId>,
    pub target_tags: Vec<String>,
}

/// Filters of `GET /api/v1/jobs`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<JobState>,
    pub status: Option<JobStatus>,
    pub machine_id: Option<MachineId>,
    pub tags: Vec<String>,
    pub before: Option<i64>,
    pub limit: u32,
    /// Only the jobs of this owner (`executor.job_visibility: owner`).
    pub owner: Option<String>,
}

const JOB_COLUMNS: &str = "id, external_id, state, phase, status, reason, priority, purpose, \
     job_yaml, target_id, target_tags, deadline_ms, submitted_at, dispatched_at, started_at, \
     finished_at, machine_id, lease_id, executor, pid, boots, cancel_requested, has_tarball, owner";

fn corrupt(id: i64, field: &'static str, value: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        id,
        field,
        value: value.into(),
    }
}

fn parse_row(r: &sqlx::any::AnyRow) -> Result<JobRow, StoreError> {
    let id: i64 = r.try_get("id")?;
    let state: String = r.try_get("state")?;
    let status: Option<String> = r.try_get("status")?;
    let purpose: String = r.try_get("purpose")?;
    let target_id: Option<String> = r.try_get("target_id")?;
    let machine_id: Option<String> = r.try_get("machine_id")?;
    let tags: String = r.try_get("target_tags")?;
    Ok(JobRow {
        id,
        external_id: r.try_get("external_id")?,
        state: state.parse().map_err(|_| corrupt(id, "state", &state))?,
        phase: r.try_get("phase")?,
        status: match status {
            Some(s) => Some(s.parse().map_err(|_| corrupt(id, "status", &s))?),
            None => None,
        },
        reason: r.try_get("reason")?,
        priority: r.try_get("priority")?,
        purpose: purpose
            .parse()
            .map_err(|_| corrupt(id, "purpose", &purpose))?,
        job_yaml: r.try_get("job_yaml")?,
        target_id: match target_id {
            Some(s) => Some(MachineId::parse(&s).map_err(|_| corrupt(id, "target_id", &s))?),
            None => None,
        },
        target_tags: serde_json::from_str(&tags).map_err(|_| corrupt(id, "target_tags", &tags))?,
        deadline_ms: r.try_get("deadline_ms")?,
        submitted_at: r.try_get("submitted_at")?,
        dispatched_at: r.try_get("dispatched_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        machine_id: match machine_id {
            Some(s) => Some(MachineId::parse(&s).map_err(|_| corrupt(id, "machine_id", &s))?),
            None => None,
        },
        lease_id: r.try_get("lease_id")?,
        executor: r.try_get("executor")?,
        pid: r.try_get("pid")?,
        boots: r.try_get("boots")?,
        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
        has_tarball: r.try_get::<i64, _>("has_tarball")? != 0,
        owner: r.try_get("owner")?,
    })
}

/// A job whose lease mars granted: its dispatch to record ([`Store::record_dispatches`]).
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub id: i64,
    pub machine: MachineId,
    pub lease_id: String,
}

#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    /// Where the long-lived executor hears of the jobs it ends itself (metrics, webhooks:
    /// [`crate::webhooks::Ended`]); unset in job processes, which have no `/metrics`.
    on_finish: Option<tokio::sync::mpsc::UnboundedSender<JobRow>>,
}

impl Store {
    pub fn new(db: Db) -> Self {
        Self {
            db,
            on_finish: None,
        }
    }

    /// This store, telling `tx` of every job it finishes.
    pub fn with_finish_hook(mut self, tx: tokio::sync::mpsc::UnboundedSender<JobRow>) -> Self {
        self.on_finish = Some(tx);
        self
    }

    /// Hands a job finished elsewhere (by its job process) to the finish hook, if any.
    pub fn note_finished(&self, row: &JobRow) {
        if let Some(tx) = &self.on_finish {
            let _ = tx.send(row.clone());
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    fn pool(&self) -> &AnyPool {
        self.db.pool()
    }

    /// Persists a submitted job and its `submitted` event in one transaction.
    pub async fn insert(&self, job: &NewJob) -> Result<i64, StoreError> {
        let tags = serde_json::to_string(&job.target_tags).unwrap_or_else(|_| "[]".into());
        let _gate = self.db.write_turn().await;
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query(
            "INSERT INTO jobs (external_id, state, priority, purpose, job_yaml, target_id, \
             target_tags, deadline_ms, submitted_at, has_tarball, owner) \
             VALUES ($1, 'QUEUED', $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .bind(job.external_id.clone())
        .bind(job.priority)
        .bind(job.purpose.as_str())
        .bind(job.job_yaml.clone())
        .bind(job.target_id.map(|m| m.to_string()))
        .bind(tags)
        .bind(job.deadline_ms)
        .bind(now_ms())
        .bind(i64::from(job.has_tarball))
        .bind(job.owner.clone())
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get(0)?;
        let data = serde_json::json!({
            "priority": job.priority,
            "target": {"id": job.target_id, "tags": job.target_tags},
            "owner": job.owner,
        });
        insert_event(
            &mut tx,
            id,
            crate::model::kind::SUBMITTED,
            "job submitted",
            &data,
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn get(&self, id: i64) -> Result<Option<JobRow>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(parse_row).transpose()
    }

    pub async fn require(&self, id: i64) -> Result<JobRow, StoreError> {
        self.get(id).await?.ok_or(StoreError::NotFound(id))
    }

    /// Jobs matching `filter`, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<JobRow>, StoreError> {
        // The tag filter is applied after the query (tags are a JSON column); fetch enough rows
        // to fill the page in the common case.
        let fetch = if filter.tags.is_empty() {
            filter.limit
        } else {
            filter.limit.saturating_mul(10).min(10_000)
        };
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 IS NULL OR state = $2) \
             AND ($3 IS NULL OR status = $4) AND ($5 IS NULL OR machine_id = $6) \
             AND id < $7 AND ($8 IS NULL OR owner = $9) ORDER BY id DESC LIMIT $10"
        );
        let state = filter.state.map(|s| s.as_str().to_string());
        let status = filter.status.map(|s| s.as_str().to_string());
        let machine = filter.machine_id.map(|m| m.to_string());
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state.clone())
            .bind(state)
            .bind(status.clone())
            .bind(status)
            .bind(machine.clone())
            .bind(machine)
            .bind(filter.before.unwrap_or(i64::MAX))
            .bind(filter.owner.clone())
            .bind(filter.owner.clone())
            .bind(i64::from(fetch))
            .fetch_all(self.pool())
            .await?;
        let mut out = Vec::new();
        for r in &rows {
            let job = parse_row(r)?;
            if filter.tags.iter().all(|t| job.target_tags.contains(t)) {
                out.push(job);
            }
            if out.len() >= filter.limit as usize {
                break;
            }
        }
        Ok(out)
    }

    /// Queued jobs in dispatch order: priority (high first), then FIFO.
    pub async fn queued(&self, limit: u32) -> Result<Vec<QueuedJob>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, priority, purpose, target_id, target_tags FROM jobs \
             WHERE state = 'QUEUED' ORDER BY priority DESC, id ASC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.try_get("id")?;
            let purpose: String = r.try_get("purpose")?;
            let target_id: Option<String> = r.try_get("target_id")?;
            let tags: String = r.try_get("target_tags")?;
            out.push(QueuedJob {
                id,
                priority: r.try_get("priority")?,
                purpose: purpose
                    .parse()
                    .map_err(|_| corrupt(id, "purpose", &purpose))?,
                target_id: match target_id {
                    Some(s) => {
                        Some(MachineId::parse(&s).map_err(|_| corrupt(id, "target_id", &s))?)
                    }
                    None => None,
                },
                target_tags: serde_json::from_str(&tags)
                    .map_err(|_| corrupt(id, "target_tags", &tags))?,
            });
        }
        Ok(out)
    }

    /// Records the dispatch of jobs whose leases mars granted, in one transaction: each job
    /// still `QUEUED` becomes `DISPATCHED` on its machine under its lease, with its
    /// `dispatched` event. A job that left the queue meanwhile (cancelled, expired, or
    /// dispatched by another executor sharing the database) is left as it is: its flag is
    /// `false` and the caller gives its lease back. This conditional update (`… WHERE state =
    /// 'QUEUED'`) is what keeps a job from being dispatched twice; a job is never shown
    /// dispatched before it holds its lease.
    pub async fn record_dispatches(
        &self,
        items: &[Dispatch],
        executor: &str,
        round: u64,
    ) -> Result<Vec<bool>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let next = transition(JobState::Queued, Trigger::Dispatch).map_err(|source| {
            StoreError::Transition {
                id: items[0].id,
                source,
            }
        })?;
        let at = now_ms();
        let _gate = self.db.write_turn().await;
        if self.db.backend() == Backend::Postgres {
            let statement = DispatchStatement {
                items,
                next,
                round,
                executor,
                at,
            };
            // One statement, its own transaction: one round trip for the whole round.
            return statement.run(&mut *self.pool().acquire().await?).await;
        }
        let mut tx = self.pool().begin().await?;
        let mut out = Vec::with_capacity(items.len());
        for d in items {
            let done = sqlx::query(
                "UPDATE jobs SET state = $1, machine_id = $2, lease_id = $3, executor = $4, \
                 dispatched_at = $5 WHERE id = $6 AND state = 'QUEUED'",
            )
            .bind(next.as_str())
            .bind(d.machine.to_string())
            .bind(d.lease_id.clone())
            .bind(executor.to_string())
            .bind(at)
            .bind(d.id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if done {
                let (message, data) = dispatched_event(d, executor, round);
                insert_event(
                    &mut tx,
                    d.id,
                    crate::model::kind::DISPATCHED,
                    &message,
                    &data,
                )
                .await?;
            }
            out.push(done);
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Applies `trigger` to job `id` if its state allows it, setting `set` (extra columns,
    /// bound from `$4` on) and appending `event` in the same transaction; returns the new
    /// row, or `None` when the state did not allow it (e.g. already finished: the first
    /// writer wins).
    async fn apply(
        &self,
        id: i64,
        trigger: Trigger,
        set: &'static str,
        binds: Vec<Bind>,
        event: Option<(&str, &str, &Value)>,
        only_from: Option<JobState>,
    ) -> Result<Option<JobRow>, StoreError> {
        let Some(cur) = self.get(id).await? else {
            return Err(StoreError::NotFound(id));
        };
        if only_from.is_some_and(|from| from != cur.state) {
            return Ok(None);
        }
        let Ok(next) = transition(cur.state, trigger) else {
            return Ok(None);
        };
        let sql = format!(
            "UPDATE jobs SET state = $1{set} WHERE id = $2 AND state = $3",
            set = if set.is_empty() {
                String::new()
            } else {
                format!(", {set}")
            }
        );
        // The event's sequence number may race with another writer's event on PostgreSQL
        // (the primary key refuses the loser): the whole change is tried again then.
        let mut last = None;
        for _ in 0..8 {
            let _gate = self.db.write_turn().await;
            let mut tx = self.pool().begin().await?;
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(next.as_str())
                .bind(id)
                .bind(cur.state.as_str());
            for b in &binds {
                q = match b {
                    Bind::Int(v) => q.bind(*v),
                    Bind::Text(v) => q.bind(v.clone()),
                };
            }
            if q.execute(&mut *tx).await?.rows_affected() == 0 {
                // Lost a race with another writer.
                tx.rollback().await?;
                return Ok(None);
            }
            if let Some((kind, message, data)) = event
                && let Err(e) = insert_event(&mut tx, id, kind, message, data).await
            {
                let _ = tx.rollback().await;
                last = Some(e);
                continue;
            }
            tx.commit().await?;
            return self.get(id).await;
        }
        Err(last.map_or(StoreError::NotFound(id), StoreError::Db))
    }

    /// The job process runs (pid recorded).
    pub async fn set_started(&self, id: i64, pid: u32) -> Result<Option<JobRow>, StoreError> {
        self.apply(
            id,
            Trigger::Start,
            "pid = $4, started_at = COALESCE(started_at, $5)",
            vec![Bind::Int(i64::from(pid)), Bind::Int(now_ms())],
            None,
            None,
        )
        .await
    }

    /// Ends the job with `status` and `reason`, with its `finished` event, in one
    /// transaction. Returns `None` when it was already finished (the first writer wins).
    pub async fn finish(
        &self,
        id: i64,
        status: JobStatus,
        reason: &str,
    ) -> Result<Option<JobRow>, StoreError> {
        self.finish_from(id, status, reason, None).await
    }

    /// Ends the job only if it is still `QUEUED` (cancelled, or its deadline passed, before
    /// any executor dispatched it). `None` when it left the queue meanwhile: a job just
    /// recorded as dispatched holds a lease, and ending it needs its teardown.
    pub async fn finish_queued(
        &self,
        id: i64,
        status: JobStatus,
        reason: &str,
    ) -> Result<Option<JobRow>, StoreError> {
        self.finish_from(id, status, reason, Some(JobState::Queued))
            .await
    }

    async fn finish_from(
        &self,
        id: i64,
        status: JobStatus,
        reason: &str,
        only_from: Option<JobState>,
    ) -> Result<Option<JobRow>, StoreError> {
        let data = serde_json::json!({
            "status": status,
            "exit_code": status.exit_code(),
            "reason": reason,
        });
        let message = format!("{status}: {reason}");
        let row = self
            .apply(
                id,
                Trigger::Finish,
                "status = $4, reason = $5, finished_at = $6",
                vec![
                    Bind::Text(status.as_str().to_string()),
                    Bind::Text(reason.to_string()),
                    Bind::Int(now_ms()),
                ],
                Some((crate::model::kind::FINISHED, &message, &data)),
                only_from,
            )
            .await?;
        if let Some(row) = &row {
            self.note_finished(row);
        }
        Ok(row)
    }

    pub async fn set_phase(&self, id: i64, phase: &str) -> Result<(), StoreError> {
        let _gate = self.db.write_turn().await;
        sqlx::query("UPDATE jobs SET phase = $1 WHERE id = $2")
            .bind(phase.to_string())
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn set_boots(&self, id: i64, boots: i64) -> Result<(), StoreError> {
        let _gate = self.db.write_turn().await;
        sqlx::query("UPDATE jobs SET boots = $1 WHERE id = $2")
            .bind(boots)
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn set_has_tarball(&self, id: i64, has: bool) -> Result<(), StoreError> {
        let _gate = self.db.write_turn().await;
        sqlx::query("UPDATE jobs SET has_tarball = $1 WHERE id = $2")
            .bind(i64::from(has))
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Flags a cancellation request (for a dispatched or running job).
    pub async fn request_cancel(&self, id: i64) -> Result<bool, StoreError> {
        let _gate = self.db.write_turn().await;
        let n = sqlx::query(
            "UPDATE jobs SET cancel_requested = 1 WHERE id = $1 AND state <> 'FINISHED'",
        )
        .bind(id)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// The unfinished jobs dispatched by `executor` whose cancellation was requested (through
    /// any executor sharing the database): the executor polls it to signal their processes.
    pub async fn cancels_of(&self, executor: &str) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE state IN ('DISPATCHED', 'RUNNING') AND executor = $1 \
             AND cancel_requested <> 0",
        )
        .bind(executor.to_string())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| r.try_get::<i64, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Appends an event; returns its sequence number.
    pub async fn add_event(
        &self,
        job_id: i64,
        kind: &str,
        message: &str,
        data: Value,
    ) -> Result<i64, StoreError> {
        // Writers of one job's events (executor, job process, several tasks of each) take the
        // next seq in turn: on PostgreSQL the job's row is locked first, as the other writers
        // of events (state changes, dispatch) already hold it. Without that, 20 concurrent
        // writers could each lose the primary-key race more times than the retries allow.
        // The retry stays for a job row that does not exist yet or a lock wait cut short.
        let mut last = None;
        for _ in 0..8 {
            let _gate = self.db.write_turn().await;
            let mut tx = self.pool().begin().await?;
            if self.db.backend() == Backend::Postgres
                && let Err(e) = sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
                    .bind(job_id)
                    .fetch_optional(&mut *tx)
                    .await
            {
                let _ = tx.rollback().await;
                last = Some(e);
                continue;
            }
            match insert_event(&mut tx, job_id, kind, message, &data).await {
                Ok(seq) => {
                    tx.commit().await?;
                    return Ok(seq);
                }
                Err(e) => {
                    let _ = tx.rollback().await;
                    last = Some(e);
                }
            }
        }
        Err(last.map_or_else(|| StoreError::NotFound(job_id), StoreError::Db))
    }

    /// Events of `job_id` with `seq > after`, oldest first.
    pub async fn events(&self, job_id: i64, after: i64) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, message, data FROM job_events \
             WHERE job_id = $1 AND seq > $2 ORDER BY seq ASC LIMIT 10000",
        )
        .bind(job_id)
        .bind(after)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let data: String = r.try_get("data")?;
                Ok(Event {
                    seq: r.try_get("seq")?,
                    at: Timestamp(r.try_get("at")?),
                    kind: r.try_get("kind")?,
                    message: r.try_get("message")?,
                    data: serde_json::from_str(&data).unwrap_or(Value::Null),
                })
            })
            .collect()
    }

    /// Queued jobs whose deadline is before `now`.
    pub async fn expired_queued(&self, now: i64) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE state = 'QUEUED' AND deadline_ms IS NOT NULL \
             AND deadline_ms < $1",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| r.try_get::<i64, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// The earliest deadline among queued jobs (to wake the scheduler then).
    pub async fn next_deadline(&self) -> Result<Option<i64>, StoreError> {
        let row = sqlx::query(
            "SELECT MIN(deadline_ms) FROM jobs WHERE state = 'QUEUED' AND deadline_ms IS NOT NULL",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?)
    }

    /// Jobs `executor` dispatched that are not finished (re-attach after a restart).
    pub async fn active_of(&self, executor: &str) -> Result<Vec<JobRow>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('DISPATCHED', 'RUNNING') \
             AND executor = $1 ORDER BY id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(executor.to_string())
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(parse_row).collect()
    }

    /// Finished jobs whose end is older than `before_ms` (artifact retention).
    pub async fn finished_before(
        &self,
        before_ms: i64,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE state = 'FINISHED' AND finished_at < $1 AND id > $2 \
             ORDER BY id LIMIT $3",
        )
        .bind(before_ms)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| r.try_get::<i64, _>(0).map_err(StoreError::from))
            .collect()
    }

    /// Number of queued jobs (metrics).
    pub async fn queued_count(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED'")
            .fetch_one(self.pool())
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// Queued jobs by kind of target: `machine` (one named), `any` (no tag), `tags`.
    pub async fn queued_by_target_kind(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT CASE WHEN target_id IS NOT NULL THEN 'machine' \
             WHEN target_tags = '[]' THEN 'any' ELSE 'tags' END AS kind, COUNT(*) AS n \
             FROM jobs WHERE state = 'QUEUED' GROUP BY 1",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>("kind")?, r.try_get::<i64, _>("n")?)))
            .collect()
    }

    /// `(submitted_at, dispatched_at, finished_at)` of the jobs (purpose `job`) submitted in
    /// `[from_ms, to_ms)`, of `owner` only when given (queue-wait statistics).
    pub async fn queue_times(
        &self,
        from_ms: i64,
        to_ms: i64,
        owner: Option<&str>,
    ) -> Result<Vec<(i64, Option<i64>, Option<i64>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT submitted_at, dispatched_at, finished_at FROM jobs \
             WHERE purpose = 'job' AND submitted_at >= $1 AND submitted_at < $2 \
             AND ($3 IS NULL OR owner = $4)",
        )
        .bind(from_ms)
        .bind(to_ms)
        .bind(owner.map(str::to_string))
        .bind(owner.map(str::to_string))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>(0)?,
                    r.try_get::<Option<i64>, _>(1)?,
                    r.try_get::<Option<i64>, _>(2)?,
                ))
            })
            .collect()
    }
}

enum Bind {
    Int(i64),
    Text(String),
}

/// The message and data of a job's `dispatched` event.
fn dispatched_event(d: &Dispatch, executor: &str, round: u64) -> (String, Value) {
    let data = serde_json::json!({
        "machine_id": d.machine,
        "lease_id": d.lease_id,
        "executor": executor,
        "round": round,
    });
    (format!("dispatched to {}", d.machine), data)
}

/// [`Store::record_dispatches`] on PostgreSQL in one statement (one round trip instead of
/// two per job): the dispatches travel as one JSON document; each job still queued is marked
/// `DISPATCHED` and gets its `dispatched` event.
struct DispatchStatement<'a> {
    items: &'a [Dispatch],
    next: JobState,
    round: u64,
    executor: &'a str,
    at: i64,
}

impl DispatchStatement<'_> {
    /// Runs the statement on `conn` (it commits by itself). Returns one flag per item.
    async fn run(&self, conn: &mut sqlx::AnyConnection) -> Result<Vec<bool>, StoreError> {
        let rows: Vec<Value> = self
            .items
            .iter()
            .map(|d| {
                let (message, data) = dispatched_event(d, self.executor, self.round);
                serde_json::json!({
                    "id": d.id,
                    "machine": d.machine.to_string(),
                    "lease": d.lease_id,
                    "message": message,
                    "data": data.to_string(),
                })
            })
            .collect();
        let query = self.items.iter().fold(
            sqlx::query(sqlx::AssertSqlSafe(dispatch_sql(self.items.len())))
                .bind(Value::Array(rows).to_string())
                .bind(self.next.as_str())
                .bind(self.executor.to_string())
                .bind(self.at)
                .bind(crate::model::kind::DISPATCHED),
            |q, d| q.bind(d.id),
        );
        let done = query.fetch_all(&mut *conn).await?;
        let mut ids = std::collections::HashSet::with_capacity(done.len());
        for r in &done {
            ids.insert(r.try_get::<i64, _>(0)?);
        }
        Ok(self.items.iter().map(|d| ids.contains(&d.id)).collect())
    }
}

/// The dispatch statement for `n` jobs. The jobs to mark are those of the list still queued
/// and not locked by another transaction (`FOR UPDATE SKIP LOCKED`): a job another executor
/// is dispatching (or a client cancelling) right now is skipped instead of waited for; its
/// lease is given back.
///
/// The ids are also listed as placeholders: the planner cannot tell how many rows
/// `json_to_recordset` yields (it assumes 100) and would scan the whole queue to join them;
/// with the ids listed it looks the jobs up in the primary key.
fn dispatch_sql(n: usize) -> String {
    let marks: Vec<String> = (6..n + 6).map(|i| format!("${i}")).collect();
    format!(
        "WITH item AS MATERIALIZED ( \
             SELECT * FROM json_to_recordset($1::json) \
             AS i(id BIGINT, machine TEXT, lease TEXT, message TEXT, data TEXT) \
         ), target AS MATERIALIZED ( \
             SELECT id FROM jobs WHERE id IN ({}) AND state = 'QUEUED' \
             FOR UPDATE SKIP LOCKED \
         ), dispatched AS ( \
             UPDATE jobs j SET state = $2, machine_id = i.machine, lease_id = i.lease, \
                 executor = $3, dispatched_at = $4 \
             FROM item i, target t WHERE j.id = t.id AND j.id = i.id \
             RETURNING j.id, i.message, i.data \
         ), events AS ( \
             INSERT INTO job_events (job_id, seq, at, kind, message, data) \
             SELECT d.id, COALESCE((SELECT MAX(e.seq) FROM job_events e WHERE e.job_id = d.id), 0) + 1, \
                 $4, $5, d.message, d.data \
             FROM dispatched d RETURNING job_id \
         ) SELECT job_id FROM events",
        marks.join(", ")
    )
}

async fn insert_event(
    tx: &mut Transaction<'static, Any>,
    job_id: i64,
    kind: &str,
    message: &str,
    data: &Value,
) -> Result<i64, sqlx::Error> {
    let row = sqlx::query(
        "INSERT INTO job_events (job_id, seq, at, kind, message, data) \
         SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3, $4, $5 FROM job_events WHERE job_id = $6 \
         RETURNING seq",
    )
    .bind(job_id)
    .bind(now_ms())
    .bind(kind.to_string())
    .bind(message.to_string())
    .bind(data.to_string())
    .bind(job_id)
    .fetch_one(&mut **tx)
    .await?;
    row.try_get(0)
}
