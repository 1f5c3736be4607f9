//! The queue's scheduler: matches queued jobs (priority, then FIFO) to free machines and
//! dispatches them, one round at a time, by one protocol:
//!
//! 1. plan the round ([`plan::plan_round`], pure: the queue's head against the free machines);
//! 2. lease the planned machines from mars (one batched request; the executor chooses each
//!    lease's id, so it can give back even leases whose answer it never got);
//! 3. record the dispatch of the jobs whose lease was granted, and only those, in one
//!    conditional transaction ([`Store::record_dispatches`]: `… WHERE state = 'QUEUED'`);
//! 4. give back the leases whose record lost (the job was cancelled, expired, or taken by
//!    another executor sharing the database meanwhile);
//! 5. launch the recorded jobs' processes.
//!
//! So a job is never shown dispatched before it holds its lease, a job is dispatched at most
//! once (the conditional update), and a machine is leased to at most one job (mars). Several
//! executors on one PostgreSQL database share the queue this way without a central
//! dispatcher (design.md §11): they may lease for the same job, and the loser gives its lease
//! back.
//!
//! A previous run of this executor that stopped between steps 2 and 3 left leases that no
//! record names: the first round of a run gives them back untouched ([`recovery`]), instead of
//! leaving them to expire (an expiry counts an infrastructure failure against a machine that
//! nothing touched, and sends it to `QUICK_CHECK`).
//!
//! Test-only failpoints: in builds with the `testing` feature, the environment variable
//! `DUTGATE_EXECUTOR_FAILPOINT` (read once, when the scheduler is made) names a point of
//! [`Scheduler::dispatch`] where the executor process aborts at once, with no destructor and
//! no cleanup, as `kill -9` would: `after_lease` (mars granted the batch, nothing recorded),
//! `after_record` (recorded, no process started), `after_launch` (the processes started). It
//! is read from the executor's own environment only: no config key, request or job reaches
//! it, and the `dutgate` binary (built without `testing`) does not read it at all. The fault
//! tests (`tests/faults.rs`) use it.
//!
//! Event-driven: a round runs when woken — a submission, a machine freed (mars' event stream,
//! followed with a long poll, see [`machines`]), a job finished — or at the next queued
//! deadline. No polling loop with sleeps on the hot path.

mod dispatch;
mod machines;
mod plan;
mod recovery;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use dutgate_core::MachineId;
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{Machine, MachineState};
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;

pub use plan::TargetError;

use crate::store::{Store, now_ms};
use crate::supervisor::Supervisor;

/// Most jobs looked at per round.
const ROUND_LIMIT: u32 = 2000;
/// Most jobs leased in one request (mars takes at most
/// [`dutgate_mars::model::MAX_LEASE_BATCH`]) and recorded in one transaction.
const MAX_BATCH: usize = 256;
/// Longest time between two looks at the queue's deadlines even when none is known to be
/// due: jobs submitted through another executor sharing PostgreSQL are not noted here.
const DEADLINE_RECHECK_MS: i64 = 30_000;
/// After a round that could not complete (mars or the database failing), the next one waits
/// this long.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    mars: MarsClient,
    sup: Supervisor,
    /// The holder of this run's leases, `<executor name>/<pid>`: [`recovery`] tells a
    /// previous run's leases by it.
    holder: String,
    lease_ttl: Option<Duration>,
    /// mars' machines as last known (see [`machines`]).
    machines: RwLock<Option<BTreeMap<MachineId, Machine>>>,
    wake: Arc<Notify>,
    rounds: std::sync::atomic::AtomicU64,
    /// No queued job's deadline is due before this instant (ms since the epoch): rounds skip
    /// the deadline query until then. Submissions with a deadline lower it
    /// ([`Scheduler::note_deadline`]); a look at the queue sets it to the earliest deadline
    /// found, or [`DEADLINE_RECHECK_MS`] ahead.
    deadline_check_at: AtomicI64,
    /// The leases previous runs took but never recorded were given back ([`recovery`]).
    recovered: AtomicBool,
    /// The test-only failpoint of this process (see the module's doc).
    failpoint: Option<String>,
}

/// The environment variable naming the test-only failpoint (see the module's doc).
pub const FAILPOINT_ENV: &str = "DUTGATE_EXECUTOR_FAILPOINT";

/// What a round asks of the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Nothing: wait to be woken.
    Wait,
    /// Plan again at once: a lease was refused (the machine cache was wrong about it, now
    /// corrected) or a job's record lost (its machine is free again).
    Again,
}

impl Scheduler {
    pub fn new(
        store: Store,
        mars: MarsClient,
        sup: Supervisor,
        lease_ttl: Option<Duration>,
        wake: Arc<Notify>,
    ) -> Self {
        let holder = format!("{}/{}", sup.name(), std::process::id());
        Self {
            inner: Arc::new(Inner {
                store,
                mars,
                sup,
                holder,
                lease_ttl,
                machines: RwLock::new(None),
                wake,
                rounds: Default::default(),
                // The first round looks.
                deadline_check_at: AtomicI64::new(i64::MIN),
                recovered: AtomicBool::new(false),
                failpoint: failpoint_from_env(),
            }),
        }
    }

    /// Aborts the process, as `kill -9` would, when `point` is this process's test-only
    /// failpoint (see the module's doc).
    fn failpoint(&self, point: &str) {
        if self.inner.failpoint.as_deref() == Some(point) {
            eprintln!("executor: failpoint {point}: aborting");
            // A deliberate abort leaves no core file behind.
            // SAFETY: prctl(2) with PR_SET_DUMPABLE only changes this process's dumpable flag.
            unsafe {
                libc::prctl(libc::PR_SET_DUMPABLE, 0);
            }
            std::process::abort();
        }
    }

    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// A job with a deadline (ms since the epoch) was queued: the round after it expires
    /// looks at the queue's deadlines.
    pub fn note_deadline(&self, deadline_ms: i64) {
        self.inner
            .deadline_check_at
            .fetch_min(deadline_ms, Ordering::SeqCst);
    }

    /// The dispatch loop: one round at a time.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let notified = self.inner.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A round is not cut off by the shutdown: cut between the lease and the record,
            // it would leave leases to expire.
            let sleep_for = match self.round().await {
                Ok(Next::Again) => continue,
                Ok(Next::Wait) => {
                    let check_at = self.inner.deadline_check_at.load(Ordering::SeqCst);
                    Duration::from_millis(
                        (check_at.saturating_sub(now_ms())).clamp(0, 3_600_000) as u64 + 1,
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch round failed");
                    RETRY_AFTER_ERROR
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = notified => {}
                _ = tokio::time::sleep(sleep_for) => {}
            }
        }
    }

    /// One round: expire deadlines, plan, then dispatch the plan in batches.
    pub(crate) async fn round(&self) -> Result<Next, String> {
        let round = self.inner.rounds.fetch_add(1, Ordering::Relaxed) + 1;
        let t_round = Instant::now();
        let r = self.round_inner(round).await;
        metrics::histogram!("executor_dispatch_step_seconds", "step" => "round")
            .record(t_round.elapsed().as_secs_f64());
        r
    }

    async fn round_inner(&self, round: u64) -> Result<Next, String> {
        if !self.inner.recovered.load(Ordering::SeqCst) {
            self.give_back_unrecorded_leases().await?;
            self.inner.recovered.store(true, Ordering::SeqCst);
        }
        self.expire_deadlines().await?;
        let free = self.free_machines().await.map_err(|e| e.to_string())?;
        if free.is_empty() {
            return Ok(Next::Wait);
        }
        let t_plan = Instant::now();
        // Read the head of the queue first (a few jobs per free machine), and the whole
        // window only when free IDLE machines are left over: in steady state a round looks
        // at a few dozen jobs, not thousands.
        let idle = free
            .iter()
            .filter(|m| m.state == MachineState::Idle)
            .count();
        let mut limit = u32::try_from(free.len().saturating_mul(4))
            .unwrap_or(ROUND_LIMIT)
            .clamp(64, ROUND_LIMIT);
        let plan = loop {
            let queued = self
                .inner
                .store
                .queued(limit)
                .await
                .map_err(|e| e.to_string())?;
            let complete = queued.len() < limit as usize;
            let plan = plan::plan_round(&queued, &free);
            let planned_idle = plan
                .iter()
                .filter(|(_, m)| {
                    free.iter()
                        .any(|f| f.id == *m && f.state == MachineState::Idle)
                })
                .count();
            if planned_idle == idle || complete || limit >= ROUND_LIMIT {
                break plan;
            }
            limit = ROUND_LIMIT;
        };
        metrics::histogram!("executor_dispatch_step_seconds", "step" => "plan")
            .record(t_plan.elapsed().as_secs_f64());
        let mut next = Next::Wait;
        for chunk in plan.chunks(MAX_BATCH) {
            if self.dispatch(chunk, round).await? == Next::Again {
                next = Next::Again;
            }
        }
        Ok(next)
    }

    /// Ends queued jobs whose deadline passed, when one may have: the query runs only once
    /// the earliest known deadline is due (or [`DEADLINE_RECHECK_MS`] after the last look),
    /// not in every round.
    async fn expire_deadlines(&self) -> Result<(), String> {
        let now = now_ms();
        if self.inner.deadline_check_at.load(Ordering::SeqCst) > now {
            return Ok(());
        }
        let store = &self.inner.store;
        // Set before the look: a deadline noted meanwhile lowers it again.
        self.inner
            .deadline_check_at
            .store(now + DEADLINE_RECHECK_MS, Ordering::SeqCst);
        let r = async {
            for id in store.expired_queued(now).await? {
                let _ = store
                    .finish_queued(
                        id,
                        dutgate_core::JobStatus::Incomplete,
                        "deadline expired while queued",
                    )
                    .await;
            }
            store.next_deadline().await
        }
        .await;
        match r {
            Ok(next) => {
                if let Some(at) = next {
                    // A deadline still due here is a job whose end could not be written:
                    // try again soon, not in a tight loop.
                    self.note_deadline(at.max(now_ms() + 100));
                }
                Ok(())
            }
            Err(e) => {
                // Look again in the next round.
                self.note_deadline(i64::MIN);
                Err(e.to_string())
            }
        }
    }
}

/// The failpoint named by [`FAILPOINT_ENV`], in builds with the `testing` feature only.
fn failpoint_from_env() -> Option<String> {
    if cfg!(feature = "testing") {
        std::env::var(FAILPOINT_ENV).ok().filter(|p| !p.is_empty())
    } else {
        None
    }
}
