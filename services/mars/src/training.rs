//! Sergeant Hartman: trains every machine that is not fit for service.
//!
//! A training run is one registration boot (loop 0), then up to `boot_loops` check boots; the
//! machine becomes `IDLE` when `qualifying` of them pass. The run stops early once it can no
//! longer qualify (no point booting 20 times a machine that failed 2 of 20 with 19 needed). A
//! failed run is retried after an exponential back-off; after
//! `quarantine_after_failed_trainings` failed runs in a row the machine is `QUARANTINED` and
//! retried only after `quarantine_retry_hours`. A quick check is one check boot.
//!
//! Every boot is a job submitted through a [`JobRunner`] (the executor, with the trainer's
//! privilege to lease `TRAINING`/`QUICK_CHECK` machines). Each boot leaves a [`LoopReport`]:
//! status, duration, the stage that failed, the console log URL.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::{JobStatus, MachineId};
use futures::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::machines::Mars;
use crate::model::{
    FailedStage, LeasePurpose, LoopReport, MachineState, RunKind, RunOutcome, Timestamp,
};
use crate::state::Trigger;
use crate::store::{Cause, MachineRow, StoreError};

/// How a job ended, as the trainer needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub status: JobStatus,
    /// Which stage failed when the runner could tell (power, firmware, console…).
    pub failed_stage: Option<FailedStage>,
    /// Where the job's console log can be read.
    pub console_log_url: Option<String>,
    /// One sentence, e.g. the timeout that expired.
    pub detail: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct RunnerError(pub String);

/// Runs the trainer's jobs. The real implementation is the executor's client; tests use an
/// in-process one.
pub trait JobRunner: Send + Sync + 'static {
    /// Submits `job` (a v1 job template; the executor renders it with the machine's variables)
    /// to run on `machine` with the trainer's privilege: the job leases the machine with
    /// purpose `training`, which only `TRAINING`/`QUICK_CHECK` machines accept. Returns the
    /// job id.
    fn submit(&self, machine: MachineId, job: &str) -> BoxFuture<'_, Result<String, RunnerError>>;
    /// Waits for the job's final status.
    fn wait(&self, job_id: &str) -> BoxFuture<'_, Result<JobOutcome, RunnerError>>;
    /// Cancels the job (it ends `INCOMPLETE`, the machine is powered off and released).
    fn cancel(&self, job_id: &str) -> BoxFuture<'_, Result<(), RunnerError>>;
}

/// The `mars.training` config section.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    /// Run Sergeant Hartman at all (needs a job runner).
    pub enabled: bool,
    /// Check boots per training run.
    pub boot_loops: u32,
    /// Passing boots needed to be admitted.
    pub qualifying: u32,
    /// Registration job template; unset: `gateway-image/jobs/register.yml.j2` (embedded).
    pub registration_job: Option<std::path::PathBuf>,
    /// Check job template; unset: `gateway-image/jobs/check.yml.j2` (embedded).
    pub check_job: Option<std::path::PathBuf>,
    /// Back-off after the first failed run; doubles per failure.
    pub retry_delay_seconds: u64,
    /// Upper bound of the back-off.
    pub max_retry_delay_seconds: u64,
    /// Failed runs in a row before `QUARANTINED`.
    pub quarantine_after_failed_trainings: u32,
    /// A quarantined machine is retrained after this long (0: only an admin brings it back).
    pub quarantine_retry_hours: f64,
    /// Quick-check every `IDLE` machine when mars starts (hardware may have changed while the
    /// gateway was off).
    pub quick_check_on_start: bool,
    /// Machines trained at the same time.
    pub max_concurrent: usize,
    /// Longest wait for one boot job to end before it is cancelled and counted as failed.
    pub job_timeout_seconds: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            boot_loops: 20,
            qualifying: 19,
            registration_job: None,
            check_job: None,
            retry_delay_seconds: 120,
            max_retry_delay_seconds: 3600,
            quarantine_after_failed_trainings: 3,
            quarantine_retry_hours: 24.0,
            quick_check_on_start: true,
            max_concurrent: 16,
            job_timeout_seconds: 1800,
        }
    }
}

pub const DEFAULT_REGISTRATION_JOB: &str =
    include_str!("../../../gateway-image/jobs/register.yml.j2");
pub const DEFAULT_CHECK_JOB: &str = include_str!("../../../gateway-image/jobs/check.yml.j2");

/// The two job templates the trainer submits.
#[derive(Debug, Clone)]
pub struct Templates {
    pub registration: String,
    pub check: String,
}

impl Templates {
    pub fn load(cfg: &TrainingConfig) -> Result<Self, String> {
        let read = |p: &Option<std::path::PathBuf>, default: &str| -> Result<String, String> {
            match p {
                Some(path) => read_template(path),
                None => Ok(default.to_string()),
            }
        };
        Ok(Self {
            registration: read(&cfg.registration_job, DEFAULT_REGISTRATION_JOB)?,
            check: read(&cfg.check_job, DEFAULT_CHECK_JOB)?,
        })
    }
}

fn read_template(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The back-off before attempt `failures + 1`: base · 2^(failures−1), capped.
pub fn backoff(cfg: &TrainingConfig, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    let secs = cfg
        .retry_delay_seconds
        .saturating_mul(1u64 << exp)
        .min(cfg.max_retry_delay_seconds.max(cfg.retry_delay_seconds));
    Duration::from_secs(secs)
}

/// What failed in a boot that did not pass, when the runner did not say.
fn stage_of(outcome: &JobOutcome) -> Option<FailedStage> {
    if outcome.status == JobStatus::Pass {
        return None;
    }
    if let Some(s) = outcome.failed_stage {
        return Some(s);
    }
    Some(match outcome.status {
        // The check job's verdict: `machine-registration check` found a difference.
        JobStatus::Fail => FailedStage::Identity,
        // The check job's warn pattern: the console does not reach salad both ways.
        JobStatus::Warn => FailedStage::Console,
        _ => FailedStage::Infrastructure,
    })
}

pub struct Trainer {
    mars: Mars,
    runner: Arc<dyn JobRunner>,
    templates: Arc<Templates>,
}

enum BootResult {
    Report(LoopReport),
    Cancelled,
}

impl Trainer {
    pub fn new(mars: Mars, runner: Arc<dyn JobRunner>, templates: Templates) -> Self {
        Self {
            mars,
            runner,
            templates: Arc::new(templates),
        }
    }

    fn cfg(&self) -> &TrainingConfig {
        &self.mars.config.training
    }

    /// Start-up work: forget runs of a previous process (their jobs are cancelled), and send
    /// every `IDLE` machine to a quick check.
    pub async fn start_up(&self) -> Result<(), StoreError> {
        let n = self.mars.store.abandon_running_runs().await?;
        if n > 0 {
            tracing::info!(
                runs = n,
                "training runs of the previous mars process marked cancelled"
            );
        }
        for row in self.mars.store.list().await? {
            if let Some(l) = &row.lease
                && l.purpose == LeasePurpose::Training
                && let Err(e) = self.runner.cancel(&l.job_id).await
            {
                tracing::warn!(machine = %row.id, job = %l.job_id, error = %e, "cannot cancel a training job of the previous mars process");
            }
            if self.cfg().quick_check_on_start && row.state == MachineState::Idle {
                let cause = Cause::new(
                    "trainer",
                    "gateway started: verify the machine before giving it to jobs",
                );
                match self
                    .mars
                    .store
                    .trigger(row.id, Trigger::QuickCheck, &cause, &|_| {})
                    .await
                {
                    Ok(_) | Err(StoreError::Transition(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// The supervisor: starts a run for every machine that needs one, stops runs of machines
    /// that left `TRAINING`/`QUICK_CHECK` (retired, unconfigured), wakes on every state change
    /// and on back-off deadlines.
    pub async fn run(self, shutdown: CancellationToken) {
        if let Err(e) = self.start_up().await {
            tracing::error!(error = %e, "trainer start-up failed");
        }
        let this = Arc::new(self);
        let mut events = this.mars.store.subscribe();
        let mut active: HashMap<MachineId, CancellationToken> = HashMap::new();
        let mut tasks: JoinSet<MachineId> = JoinSet::new();
        loop {
            events.borrow_and_update();
            let next_wake = match this.reconcile(&mut active, &mut tasks, &shutdown).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "trainer: cannot read machines");
                    Duration::from_secs(5)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = events.changed() => {}
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok(id) = done {
                        active.remove(&id);
                    }
                }
                _ = tokio::time::sleep(next_wake) => {}
            }
        }
        for t in active.values() {
            t.cancel();
        }
        // Let runs cancel their jobs and record it, bounded.
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }

    async fn reconcile(
        self: &Arc<Self>,
        active: &mut HashMap<MachineId, CancellationToken>,
        tasks: &mut JoinSet<MachineId>,
        shutdown: &CancellationToken,
    ) -> Result<Duration, StoreError> {
        let now = Timestamp::now();
        let mut next_wake = Duration::from_secs(60);
        let mut wake_at = |t: Timestamp| {
            let ms = (t.millis() - Timestamp::now().millis()).max(10) as u64;
            next_wake = next_wake.min(Duration::from_millis(ms));
        };
        for row in self.mars.store.list().await? {
            let in_training =
                matches!(row.state, MachineState::Training | MachineState::QuickCheck);
            if !in_training {
                if let Some(t) = active.get(&row.id) {
                    t.cancel();
                }
                if row.state == MachineState::Quarantined
                    && self.cfg().quarantine_retry_hours > 0.0
                    && let Some(at) = row.training_next_at
                {
                    if at <= now {
                        let cause = Cause::new("trainer", "quarantine period over: retraining");
                        match self
                            .mars
                            .store
                            .trigger(row.id, Trigger::Retrain, &cause, &|_| {})
                            .await
                        {
                            Ok(_) | Err(StoreError::Transition(_)) => {}
                            Err(e) => return Err(e),
                        }
                    } else {
                        wake_at(at);
                    }
                }
                continue;
            }
            if active.contains_key(&row.id) {
                continue;
            }
            if row.state == MachineState::Training
                && let Some(at) = row.training_next_at
                && at > now
            {
                wake_at(at);
                continue;
            }
            if active.len() >= self.cfg().max_concurrent.max(1) {
                break;
            }
            let token = shutdown.child_token();
            active.insert(row.id, token.clone());
            let this = Arc::clone(self);
            let id = row.id;
            let kind = if row.state == MachineState::QuickCheck {
                RunKind::QuickCheck
            } else {
                RunKind::Training
            };
            tasks.spawn(async move {
                if let Err(e) = this.run_machine(id, kind, token).await {
                    tracing::error!(machine = %id, error = %e, "training run failed");
                }
                id
            });
        }
        Ok(next_wake)
    }

    async fn run_machine(
        &self,
        id: MachineId,
        kind: RunKind,
        token: CancellationToken,
    ) -> Result<(), StoreError> {
        let cfg = self.cfg().clone();
        let (loops, qualifying) = match kind {
            RunKind::Training => (cfg.boot_loops, cfg.qualifying.min(cfg.boot_loops)),
            RunKind::QuickCheck => (1, 1),
        };
        let run_id = self
            .mars
            .store
            .start_run(id, kind, loops, qualifying)
            .await?;
        tracing::info!(machine = %id, kind = kind.as_str(), run = run_id, loops, qualifying, "training run started");

        if kind == RunKind::Training {
            match self.boot(id, run_id, 0, "registration", &token).await? {
                BootResult::Cancelled => return self.cancelled(run_id).await,
                BootResult::Report(r) if !r.passed() => {
                    let why = format!(
                        "registration boot failed ({}, stage {})",
                        r.status,
                        r.failed_stage.map(|s| s.as_str()).unwrap_or("unknown")
                    );
                    return self.training_failed(id, run_id, &why).await;
                }
                BootResult::Report(_) => {}
            }
        }

        let (mut passes, mut failures) = (0u32, 0u32);
        let mut last_failure = None;
        for n in 1..=loops {
            match self.boot(id, run_id, n, "check", &token).await? {
                BootResult::Cancelled => return self.cancelled(run_id).await,
                BootResult::Report(r) => {
                    if r.passed() {
                        passes += 1;
                    } else {
                        failures += 1;
                        last_failure = Some(r);
                    }
                }
            }
            if passes >= qualifying && kind == RunKind::QuickCheck {
                break;
            }
            if failures > loops - qualifying {
                break;
            }
        }

        let verdict = format!("{passes}/{loops} boots passed, {qualifying} needed");
        if passes >= qualifying {
            self.mars
                .store
                .end_run(run_id, RunOutcome::Passed, &verdict)
                .await?;
            let trigger = match kind {
                RunKind::Training => Trigger::TrainingPassed,
                RunKind::QuickCheck => Trigger::QuickCheckPassed,
            };
            let now = Timestamp::now();
            let edit = move |r: &mut MachineRow| {
                r.trained_at = Some(now);
                r.training_failures = 0;
                r.training_next_at = None;
                r.consecutive_infra_failures = 0;
            };
            let cause = Cause::new("trainer", format!("{} passed: {verdict}", kind.as_str()));
            self.apply_end(id, trigger, &cause, &edit).await?;
            metrics::counter!("mars_training_runs_total", "kind" => kind.as_str(), "outcome" => "passed").increment(1);
            return Ok(());
        }
        let why = match &last_failure {
            Some(r) => format!(
                "{verdict}; last failure: loop {} {} at stage {}",
                r.n,
                r.status,
                r.failed_stage.map(|s| s.as_str()).unwrap_or("unknown")
            ),
            None => verdict,
        };
        match kind {
            RunKind::Training => self.training_failed(id, run_id, &why).await,
            RunKind::QuickCheck => {
                self.mars
                    .store
                    .end_run(run_id, RunOutcome::Failed, &why)
                    .await?;
                let cause = Cause::new("trainer", format!("quick check failed: {why}"));
                let edit = |r: &mut MachineRow| r.training_next_at = None;
                self.apply_end(id, Trigger::QuickCheckFailed, &cause, &edit)
                    .await?;
                metrics::counter!("mars_training_runs_total", "kind" => "quick_check", "outcome" => "failed").increment(1);
                Ok(())
            }
        }
    }

    /// Applies the run's verdict unless the machine left training meanwhile (retired…).
    async fn apply_end(
        &self,
        id: MachineId,
        trigger: Trigger,
        cause: &Cause,
        edit: &(dyn Fn(&mut MachineRow) + Send + Sync),
    ) -> Result<(), StoreError> {
        match self.mars.store.trigger(id, trigger, cause, edit).await {
            Ok(_) => Ok(()),
            Err(StoreError::Transition(e)) => {
                tracing::info!(machine = %id, error = %e, "machine left training before the verdict");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn training_failed(
        &self,
        id: MachineId,
        run_id: i64,
        why: &str,
    ) -> Result<(), StoreError> {
        self.mars
            .store
            .end_run(run_id, RunOutcome::Failed, why)
            .await?;
        let cfg = self.cfg().clone();
        let cur = self.mars.store.get(id).await?;
        let failures = cur.training_failures.max(0) as u32 + 1;
        let quarantine = failures >= cfg.quarantine_after_failed_trainings.max(1);
        let now = Timestamp::now();
        let next = if quarantine {
            (cfg.quarantine_retry_hours > 0.0)
                .then(|| now.plus_ms((cfg.quarantine_retry_hours * 3_600_000.0) as i64))
        } else {
            Some(now.plus_ms(backoff(&cfg, failures).as_millis() as i64))
        };
        let edit = move |r: &mut MachineRow| {
            r.training_failures = i64::from(failures);
            r.training_next_at = next;
        };
        let (trigger, reason) = if quarantine {
            (
                Trigger::Quarantine,
                format!("training failed {failures} times in a row: {why}"),
            )
        } else {
            (
                Trigger::TrainingFailed,
                format!(
                    "training failed ({why}); attempt {} after {}",
                    failures + 1,
                    next.map(|t| t.to_string()).unwrap_or_default()
                ),
            )
        };
        self.apply_end(id, trigger, &Cause::new("trainer", reason), &edit)
            .await?;
        metrics::counter!("mars_training_runs_total", "kind" => "training", "outcome" => "failed")
            .increment(1);
        tracing::warn!(machine = %id, failures, quarantine, why, "training failed");
        Ok(())
    }

    async fn cancelled(&self, run_id: i64) -> Result<(), StoreError> {
        self.mars
            .store
            .end_run(
                run_id,
                RunOutcome::Cancelled,
                "the machine left training (retired, unconfigured or mars stopping)",
            )
            .await
    }

    /// One boot: submit, wait, classify, record.
    async fn boot(
        &self,
        id: MachineId,
        run_id: i64,
        n: u32,
        job_kind: &str,
        token: &CancellationToken,
    ) -> Result<BootResult, StoreError> {
        let template = if job_kind == "registration" {
            &self.templates.registration
        } else {
            &self.templates.check
        };
        let started = Timestamp::now();
        let clock = std::time::Instant::now();
        if job_kind == "check" && self.mars.store.get(id).await?.local_tty_device.is_none() {
            // The check job needs `console=<tty>`: without a registered console it cannot even
            // be rendered. Say why instead of reporting a vague setup failure.
            let report = LoopReport {
                n,
                job_kind: job_kind.to_string(),
                job_id: None,
                status: JobStatus::SetupFail,
                started_at: started,
                duration_ms: 0,
                failed_stage: Some(FailedStage::Console),
                console_log_url: None,
                detail: Some(
                    "no console registered: no serial port answered SALAD.ping at registration"
                        .into(),
                ),
            };
            self.mars.store.add_loop(run_id, &report).await?;
            return Ok(BootResult::Report(report));
        }
        let submitted = tokio::select! {
            _ = token.cancelled() => return Ok(BootResult::Cancelled),
            r = self.runner.submit(id, template) => r,
        };
        let (job_id, outcome) = match submitted {
            Err(e) => (
                None,
                JobOutcome {
                    status: JobStatus::SetupFail,
                    failed_stage: Some(FailedStage::Infrastructure),
                    console_log_url: None,
                    detail: Some(format!("job submission failed: {e}")),
                },
            ),
            Ok(job_id) => {
                let limit = Duration::from_secs(self.cfg().job_timeout_seconds.max(1));
                let waited = tokio::select! {
                    _ = token.cancelled() => {
                        if let Err(e) = self.runner.cancel(&job_id).await {
                            tracing::warn!(machine = %id, job = %job_id, error = %e, "cannot cancel the training job");
                        }
                        return Ok(BootResult::Cancelled);
                    }
                    r = tokio::time::timeout(limit, self.runner.wait(&job_id)) => r,
                };
                let outcome = match waited {
                    Ok(Ok(o)) => o,
                    Ok(Err(e)) => JobOutcome {
                        status: JobStatus::Unknown,
                        failed_stage: Some(FailedStage::Infrastructure),
                        console_log_url: None,
                        detail: Some(format!("lost track of the job: {e}")),
                    },
                    Err(_) => {
                        let _ = self.runner.cancel(&job_id).await;
                        JobOutcome {
                            status: JobStatus::Incomplete,
                            failed_stage: Some(FailedStage::Infrastructure),
                            console_log_url: None,
                            detail: Some(format!(
                                "job did not end within {}s; cancelled",
                                limit.as_secs()
                            )),
                        }
                    }
                };
                (Some(job_id), outcome)
            }
        };
        let report = LoopReport {
            n,
            job_kind: job_kind.to_string(),
            job_id,
            status: outcome.status,
            started_at: started,
            duration_ms: clock.elapsed().as_millis() as i64,
            failed_stage: stage_of(&outcome),
            console_log_url: outcome.console_log_url.clone(),
            detail: outcome.detail.clone(),
        };
        self.mars.store.add_loop(run_id, &report).await?;
        tracing::info!(
            machine = %id,
            run = run_id,
            n,
            job_kind,
            job = report.job_id.as_deref().unwrap_or("-"),
            status = %report.status,
            stage = report.failed_stage.map(|s| s.as_str()).unwrap_or("-"),
            "training boot done"
        );
        Ok(BootResult::Report(report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded templates are valid v1 jobs once rendered with a machine's variables.
    #[test]
    fn job_templates_parse() {
        use dutgate_jobspec::{JobSpec, TemplateVars};
        let vars = TemplateVars::placeholders();
        let reg = JobSpec::parse_and_render(DEFAULT_REGISTRATION_JOB, &vars)
            .unwrap_or_else(|e| panic!("register.yml.j2: {e:?}"));
        let check = JobSpec::parse_and_render(DEFAULT_CHECK_JOB, &vars)
            .unwrap_or_else(|e| panic!("check.yml.j2: {e:?}"));
        let reg_cmdline = &reg.deployment_for(1).1.kernel.cmdline;
        assert!(
            reg_cmdline.contains("dutgate.action=register"),
            "{reg_cmdline}"
        );
        assert!(
            reg_cmdline.contains("dutgate.mars_url=http://gateway:8001"),
            "{reg_cmdline}"
        );
        let check_cmdline = &check.deployment_for(1).1.kernel.cmdline;
        assert!(
            check_cmdline.contains("console=ttyUSB0,115200"),
            "{check_cmdline}"
        );
        assert!(check_cmdline.contains("SALAD.machine_id=52:54:00:00:00:01"));
        // The patterns the trainer's verdicts rely on.
        let mut engine = dutgate_jobspec::PatternEngine::for_job(&reg);
        engine.feed(b"MaRS: Registration complete\r\n");
        assert_eq!(engine.status(), JobStatus::Pass);
        let mut engine = dutgate_jobspec::PatternEngine::for_job(&reg);
        engine.feed(b"MaRS: Registration failed: mars answered 400\n");
        assert_eq!(engine.status(), JobStatus::Fail);
        let mut engine = dutgate_jobspec::PatternEngine::for_job(&check);
        engine.feed(b"The configured console is not connected to SALAD\r\n");
        engine.feed(b"+ Execution is over, pipeline status: 0\r\n");
        engine.feed(b"It's now safe to turn off your computer\r\n");
        assert_eq!(engine.status(), JobStatus::Warn);
        let mut engine = dutgate_jobspec::PatternEngine::for_job(&check);
        engine.feed(b"Execution is over, pipeline status: 1\r\n");
        engine.feed(b"It's now safe to turn off your computer\r\n");
        assert_eq!(engine.status(), JobStatus::Fail);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let cfg = TrainingConfig {
            retry_delay_seconds: 120,
            max_retry_delay_seconds: 600,
            ..Default::default()
        };
        let secs: Vec<u64> = (1..=6).map(|f| backoff(&cfg, f).as_secs()).collect();
        assert_eq!(secs, vec![120, 240, 480, 600, 600, 600]);
    }

    #[test]
    fn stages_when_the_runner_does_not_say() {
        let o = |status| JobOutcome {
            status,
            failed_stage: None,
            console_log_url: None,
            detail: None,
        };
        assert_eq!(stage_of(&o(JobStatus::Pass)), None);
        assert_eq!(stage_of(&o(JobStatus::Fail)), Some(FailedStage::Identity));
        assert_eq!(stage_of(&o(JobStatus::Warn)), Some(FailedStage::Console));
        assert_eq!(
            stage_of(&o(JobStatus::Incomplete)),
            Some(FailedStage::Infrastructure)
        );
        let mut x = o(JobStatus::Incomplete);
        x.failed_stage = Some(FailedStage::Firmware);
        assert_eq!(stage_of(&x), Some(FailedStage::Firmware));
    }
}
