//! Sergeant Hartman against an in-process job runner that plays the executor: it leases the
//! machine through mars's real lease API (trainer privilege), "runs" the boot by returning a
//! scripted outcome, and releases the lease. The PDU is the in-memory one.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use dutgate_core::db::testing::databases;
use dutgate_core::{JobStatus, MachineId, Secret};
use dutgate_mars::Config;
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{
    ActivateRequest, FailedStage, LeasePurpose, MachinePatch, MachineState, ReleaseOutcome,
    RetireRequest, RunKind, RunOutcome,
};
use dutgate_mars::store::MIGRATIONS;
use dutgate_mars::training::{JobOutcome, JobRunner, RunnerError, TrainingConfig};
use futures::future::BoxFuture;
use tokio::sync::Notify;

#[derive(Clone)]
enum Step {
    Pass,
    Fail(JobStatus, FailedStage),
    /// Never ends on its own: only a cancel ends it.
    Hang,
}

struct Job {
    machine: MachineId,
    lease: String,
    kind: &'static str,
    cancelled: Arc<Notify>,
}

/// The test executor.
struct FakeExecutor {
    mars: MarsClient,
    next: AtomicU64,
    /// Per machine, the outcomes of its next check boots (then `Pass`).
    checks: Mutex<HashMap<MachineId, VecDeque<Step>>>,
    /// Per machine, the outcomes of its next registration boots (then `Pass`).
    registrations: Mutex<HashMap<MachineId, VecDeque<Step>>>,
    jobs: Mutex<HashMap<String, Job>>,
    /// (machine, kind, when) of every submission.
    submitted: Mutex<Vec<(MachineId, &'static str, Instant)>>,
    cancelled: Mutex<Vec<String>>,
}

impl FakeExecutor {
    fn new(url: &str) -> Arc<Self> {
        Arc::new(Self {
            mars: MarsClient::new(url, Some(Secret::new(ADMIN))),
            next: AtomicU64::new(1),
            checks: Mutex::default(),
            registrations: Mutex::default(),
            jobs: Mutex::default(),
            submitted: Mutex::default(),
            cancelled: Mutex::default(),
        })
    }

    fn script_checks(&self, m: MachineId, steps: Vec<Step>) {
        self.checks.lock().unwrap().insert(m, steps.into());
    }

    fn script_registrations(&self, m: MachineId, steps: Vec<Step>) {
        self.registrations.lock().unwrap().insert(m, steps.into());
    }

    fn submissions(&self, m: MachineId) -> Vec<(&'static str, Instant)> {
        self.submitted
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.0 == m)
            .map(|s| (s.1, s.2))
            .collect()
    }
}

impl JobRunner for FakeExecutor {
    fn submit(&self, machine: MachineId, job: &str) -> BoxFuture<'_, Result<String, RunnerError>> {
        let kind = if job.contains("dutgate.action=register") {
            "registration"
        } else {
            "check"
        };
        Box::pin(async move {
            let id = format!("job-{}", self.next.fetch_add(1, Ordering::SeqCst));
            // Like the executor: a training job must get a training lease.
            let lease = self
                .mars
                .acquire(machine, &id, "fake-executor", LeasePurpose::Training, None)
                .await
                .map_err(|e| RunnerError(e.to_string()))?;
            self.submitted
                .lock()
                .unwrap()
                .push((machine, kind, Instant::now()));
            self.jobs.lock().unwrap().insert(
                id.clone(),
                Job {
                    machine,
                    lease: lease.id,
                    kind,
                    cancelled: Arc::new(Notify::new()),
                },
            );
            Ok(id)
        })
    }

    fn wait(&self, job_id: &str) -> BoxFuture<'_, Result<JobOutcome, RunnerError>> {
        let job_id = job_id.to_string();
        Box::pin(async move {
            let (machine, lease, kind, cancelled) = {
                let jobs = self.jobs.lock().unwrap();
                let j = jobs
                    .get(&job_id)
                    .ok_or_else(|| RunnerError("no such job".into()))?;
                (j.machine, j.lease.clone(), j.kind, j.cancelled.clone())
            };
            let step = {
                let mut map = if kind == "registration" {
                    self.registrations.lock().unwrap()
                } else {
                    self.checks.lock().unwrap()
                };
                map.get_mut(&machine)
                    .and_then(|q| q.pop_front())
                    .unwrap_or(Step::Pass)
            };
            let outcome = match step {
                Step::Pass => JobOutcome {
                    status: JobStatus::Pass,
                    failed_stage: None,
                    console_log_url: Some(format!("http://executor/jobs/{job_id}/console.log")),
                    detail: None,
                },
                Step::Fail(status, stage) => JobOutcome {
                    status,
                    failed_stage: Some(stage),
                    console_log_url: Some(format!("http://executor/jobs/{job_id}/console.log")),
                    detail: Some(format!("{} failed", stage.as_str())),
                },
                Step::Hang => {
                    cancelled.notified().await;
                    JobOutcome {
                        status: JobStatus::Incomplete,
                        failed_stage: None,
                        console_log_url: None,
                        detail: Some("cancelled".into()),
                    }
                }
            };
            let _ = self.mars.release(&lease, ReleaseOutcome::Ok, None).await;
            Ok(outcome)
        })
    }

    fn cancel(&self, job_id: &str) -> BoxFuture<'_, Result<(), RunnerError>> {
        let job_id = job_id.to_string();
        Box::pin(async move {
            self.cancelled.lock().unwrap().push(job_id.clone());
            let lease = {
                let jobs = self.jobs.lock().unwrap();
                jobs.get(&job_id).map(|j| {
                    j.cancelled.notify_one();
                    j.lease.clone()
                })
            };
            if let Some(l) = lease {
                let _ = self
                    .mars
                    .release(&l, ReleaseOutcome::Ok, Some("cancelled"))
                    .await;
            }
            Ok(())
        })
    }
}

fn config(training: TrainingConfig) -> Config {
    Config {
        training,
        ..Default::default()
    }
}

async fn give_port(t: &TestMars, id: MachineId, port: &str) {
    t.admin
        .patch(
            id,
            &MachinePatch {
                pdu: Some(Some("pdu1".into())),
                pdu_port_id: Some(Some(port.into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_at_19_of_20_and_refuses_at_18_with_reports_and_backoff() {
    for db in databases("mars", MIGRATIONS).await {
        let mut fake = None;
        let t = start_with_runner_factory(
            db,
            Options {
                config: config(TrainingConfig {
                    retry_delay_seconds: 3600,
                    ..Default::default()
                }),
                ..Default::default()
            },
            |url| {
                let f = FakeExecutor::new(url);
                fake = Some(f.clone());
                Some(f as Arc<dyn JobRunner>)
            },
        )
        .await;
        let fake = fake.unwrap();
        let good = t.anon.register(&registration(1)).await.unwrap().id;
        let bad = t.anon.register(&registration(2)).await.unwrap().id;
        // good: one firmware failure in loop 5 → 19/20.
        let mut steps = vec![Step::Pass; 20];
        steps[4] = Step::Fail(JobStatus::Incomplete, FailedStage::Firmware);
        fake.script_checks(good, steps);
        // bad: failures in loops 3 (console) and 7 (identity) → cannot reach 19.
        let mut steps = vec![Step::Pass; 20];
        steps[2] = Step::Fail(JobStatus::Warn, FailedStage::Console);
        steps[6] = Step::Fail(JobStatus::Fail, FailedStage::Identity);
        fake.script_checks(bad, steps);
        give_port(&t, good, "1").await;
        give_port(&t, bad, "2").await;

        t.wait_state(good, MachineState::Idle, LONG).await;
        let report = t.admin.training(good).await.unwrap();
        let run = &report.runs[0];
        assert_eq!(run.outcome, RunOutcome::Passed);
        assert_eq!(run.kind, RunKind::Training);
        assert_eq!(
            (run.passes, run.failures, run.boot_loops, run.qualifying),
            (19, 1, 20, 19)
        );
        assert_eq!(run.loops.len(), 21, "registration + 20 check boots");
        assert_eq!(run.loops[0].job_kind, "registration");
        let failed = &run.loops[5];
        assert_eq!(failed.n, 5);
        assert_eq!(failed.status, JobStatus::Incomplete);
        assert_eq!(failed.failed_stage, Some(FailedStage::Firmware));
        assert!(
            failed
                .console_log_url
                .as_deref()
                .unwrap()
                .ends_with("console.log")
        );
        assert!(
            run.loops
                .iter()
                .filter(|l| l.n != 5)
                .all(|l| l.failed_stage.is_none())
        );
        let m = t.admin.machine(good).await.unwrap();
        assert!(m.ready_for_service);
        assert!(m.training.trained_at.is_some());
        assert_eq!(m.training.statuses.len(), 20);
        // Loop endpoint (valve-infra/ci-tron route).
        let l: serde_json::Value = t
            .admin
            .api()
            .get(&format!("/api/v1/machine/{good}/training/loop/5"))
            .await
            .unwrap();
        assert_eq!(l["failed_stage"], "firmware");

        // bad: the run stops once it cannot qualify; the machine stays TRAINING with a
        // back-off and a report naming the failing stages.
        let deadline = Instant::now() + LONG;
        let report = loop {
            let r = t.admin.training(bad).await.unwrap();
            if r.runs
                .first()
                .is_some_and(|r| r.outcome == RunOutcome::Failed)
            {
                break r;
            }
            assert!(Instant::now() < deadline, "training of {bad} did not fail");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let run = &report.runs[0];
        assert_eq!((run.passes, run.failures), (5, 2));
        let stages: Vec<_> = run.loops.iter().filter_map(|l| l.failed_stage).collect();
        assert_eq!(stages, vec![FailedStage::Console, FailedStage::Identity]);
        let reason = run.reason.as_deref().unwrap();
        assert!(
            reason.contains("5/20") && reason.contains("identity"),
            "{reason}"
        );
        let m = t.admin.machine(bad).await.unwrap();
        assert_eq!(m.state, MachineState::Training);
        assert_eq!(m.training.consecutive_failures, 1);
        assert!(
            m.training.next_attempt_at.unwrap().millis()
                > dutgate_mars::model::Timestamp::now().millis() + 3_000_000
        );
        let ev = t.admin.machine_events(bad, None).await.unwrap().events;
        let last = ev.last().unwrap();
        assert_eq!(
            (last.kind.as_str(), last.actor.as_str()),
            ("training_failed", "trainer")
        );
        // Backed off: no new attempt is started.
        let before = fake.submissions(bad).len();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(fake.submissions(bad).len(), before);
        t.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_training_retries_after_backoff_then_quarantines() {
    let db = databases("mars", MIGRATIONS).await.remove(0);
    let mut fake = None;
    let t = start_with_runner_factory(
        db,
        Options {
            config: config(TrainingConfig {
                boot_loops: 3,
                qualifying: 3,
                retry_delay_seconds: 1,
                max_retry_delay_seconds: 1,
                quarantine_after_failed_trainings: 3,
                quarantine_retry_hours: 0.0,
                ..Default::default()
            }),
            ..Default::default()
        },
        |url| {
            let f = FakeExecutor::new(url);
            fake = Some(f.clone());
            Some(f as Arc<dyn JobRunner>)
        },
    )
    .await;
    let fake = fake.unwrap();
    let id = t.anon.register(&registration(1)).await.unwrap().id;
    // The registration boot never passes (no power draw, say).
    fake.script_registrations(
        id,
        vec![Step::Fail(JobStatus::SetupFail, FailedStage::Power); 10],
    );
    give_port(&t, id, "1").await;
    t.wait_state(id, MachineState::Quarantined, LONG).await;
    let subs = fake.submissions(id);
    assert_eq!(subs.len(), 3, "three attempts: {subs:?}");
    assert!(subs.iter().all(|s| s.0 == "registration"));
    for w in subs.windows(2) {
        assert!(
            w[1].1 - w[0].1 >= Duration::from_millis(900),
            "retried without back-off"
        );
    }
    let report = t.admin.training(id).await.unwrap();
    assert_eq!(report.runs.len(), 3);
    assert!(report.runs.iter().all(|r| r.outcome == RunOutcome::Failed));
    assert!(
        report.runs[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("registration boot failed")
    );
    assert_eq!(
        report.runs[0].loops[0].failed_stage,
        Some(FailedStage::Power)
    );
    // Quarantined without automatic retry: nothing more happens.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.submissions(id).len(), 3);
    // An admin brings it back: training again, and this time it passes.
    fake.script_registrations(id, vec![]);
    t.admin
        .activate(id, &ActivateRequest::default())
        .await
        .unwrap();
    t.wait_state(id, MachineState::Idle, LONG).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_during_training_stops_it_and_activate_rechecks() {
    let db = databases("mars", MIGRATIONS).await.remove(0);
    let mut fake = None;
    let t = start_with_runner_factory(
        db,
        Options {
            config: config(TrainingConfig {
                boot_loops: 4,
                qualifying: 4,
                ..Default::default()
            }),
            ..Default::default()
        },
        |url| {
            let f = FakeExecutor::new(url);
            fake = Some(f.clone());
            Some(f as Arc<dyn JobRunner>)
        },
    )
    .await;
    let fake = fake.unwrap();
    let id = t.anon.register(&registration(1)).await.unwrap().id;
    fake.script_checks(id, vec![Step::Pass, Step::Hang]);
    give_port(&t, id, "1").await;
    // Wait for the hanging boot (loop 2) to be submitted.
    let deadline = Instant::now() + LONG;
    while fake.submissions(id).len() < 3 {
        assert!(Instant::now() < deadline, "training did not reach loop 2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.admin
        .retire(
            id,
            &RetireRequest {
                cancel_job: false,
                reason: Some("moving racks".into()),
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + LONG;
    let run = loop {
        let r = t.admin.training(id).await.unwrap().runs.remove(0);
        if r.outcome == RunOutcome::Cancelled {
            break r;
        }
        assert!(Instant::now() < deadline, "training was not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        run.loops.len(),
        2,
        "registration + loop 1; the cancelled boot is not a loop"
    );
    assert_eq!(fake.cancelled.lock().unwrap().len(), 1);
    let m = t.admin.machine(id).await.unwrap();
    assert_eq!(m.state, MachineState::Retired);
    assert!(m.lease.is_none(), "the training job let go of the machine");
    // Never finished training: activation trains again, and it passes this time.
    t.admin
        .activate(id, &ActivateRequest::default())
        .await
        .unwrap();
    t.wait_state(id, MachineState::Idle, LONG).await;
    // Trained: retire + activate → one quick-check boot → IDLE.
    let before = fake.submissions(id).len();
    t.admin.retire(id, &RetireRequest::default()).await.unwrap();
    let m = t
        .admin
        .activate(id, &ActivateRequest::default())
        .await
        .unwrap();
    assert_eq!(m.state, MachineState::QuickCheck);
    t.wait_state(id, MachineState::Idle, LONG).await;
    let subs = fake.submissions(id);
    assert_eq!(subs.len(), before + 1);
    assert_eq!(subs.last().unwrap().0, "check");
    let run = t.admin.training(id).await.unwrap().runs.remove(0);
    assert_eq!(
        (run.kind, run.outcome),
        (RunKind::QuickCheck, RunOutcome::Passed)
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_machines_are_quick_checked_when_mars_starts() {
    for db in databases("mars", MIGRATIONS).await {
        // First life: no trainer; machines become IDLE.
        let first = start(db, Options::default()).await;
        let ok = idle_machine(&first, 1).await;
        let swapped = idle_machine(&first, 2).await;
        let store = first.mars.store.clone();
        first.shutdown.cancel();
        // Second life on the same database, with the trainer.
        let mut fake = None;
        let db2 = first.db;
        let t = start_with_runner_factory(db2, Options::default(), |url| {
            let f = FakeExecutor::new(url);
            // The hardware of `swapped` changed while the gateway was off.
            f.script_checks(
                swapped,
                vec![Step::Fail(JobStatus::Fail, FailedStage::Identity)],
            );
            fake = Some(f.clone());
            Some(f as Arc<dyn JobRunner>)
        })
        .await;
        drop(store);
        // The machine is IDLE before and after: wait for the quick check's events, not a state.
        let deadline = Instant::now() + LONG;
        loop {
            let ev = t.admin.machine_events(ok, None).await.unwrap().events;
            if ev.iter().any(|e| e.kind == "quick_check_passed") {
                assert!(
                    ev.iter()
                        .any(|e| e.kind == "quick_check" && e.actor == "trainer"),
                    "{ev:?}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "no quick check: {ev:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t.wait_state(ok, MachineState::Idle, LONG).await;
        // The swapped machine failed its quick check: back to training (which then passes
        // with the fake's default, re-registering its new hardware).
        let deadline = Instant::now() + LONG;
        loop {
            let ev = t.admin.machine_events(swapped, None).await.unwrap().events;
            if let Some(e) = ev.iter().find(|e| e.kind == "quick_check_failed") {
                assert_eq!(e.to_state, MachineState::Training);
                assert!(e.reason.contains("identity"), "{}", e.reason);
                break;
            }
            assert!(Instant::now() < deadline, "no quick check failure: {ev:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t.wait_state(swapped, MachineState::Idle, LONG).await;
        let _ = fake;
        t.stop().await;
    }
}
