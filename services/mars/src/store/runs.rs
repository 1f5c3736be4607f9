//! Training runs and their loops (boots): the trainer's bookkeeping, no machine state.

use dutgate_core::{JobStatus, MachineId};
use sqlx::Row;

use super::rows::{decode_err, row_to_run};
use super::{Store, StoreError};
use crate::model::{FailedStage, LoopReport, RunKind, RunOutcome, Timestamp, TrainingRun};

impl Store {
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
}
