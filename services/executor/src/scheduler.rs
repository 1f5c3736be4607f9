//! The queue's scheduler: matches queued jobs (priority, then FIFO) to free machines and
//! dispatches them, a round's worth at a time: one batched lease request to mars (one mars
//! transaction, a result per lease) and, at the same time, one commit of the dispatched rows
//! and their events under the lease ids the executor chose (of the jobs still queued and, on
//! PostgreSQL, not held by another executor), then the job processes. A refused lease takes
//! its job's record back. After a job was missed, batches claim their jobs (`FOR UPDATE SKIP
//! LOCKED` on PostgreSQL) before the lease request for a while, and commit after it. The
//! queue's head comes from memory between rounds (see [`crate::queue_head`]).
//!
//! Event-driven: it runs a round when woken — a submission, a machine freed (mars' event
//! stream, followed with a long poll), a job finished — or at the next queued deadline. No
//! polling loop with sleeps on the hot path.
//!
//! Rounds overlap: a round only plans; each planned batch (leases, commit, launches)
//! runs as a task of its own, so a machine freed while a batch waits for mars is planned at
//! once instead of after that batch's commit and launches. The jobs and machines of batches
//! in flight are left out of later plans (see [`InFlight`]). (A variant that took one lease
//! request at a time and overlapped only the commits and launches measured a higher dispatch
//! p99 on SQLite at half the ceiling, 9–10 ms against 7, and no better on PostgreSQL.)
//!
//! Machines come from a cache of mars' records kept current by the same event stream; a stale
//! entry only costs a refused lease (409), after which the next machine is tried.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use dutgate_core::{MachineId, Tag};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{
    Lease, LeasePurpose, LeaseRefusal, LeaseRequest, Machine, MachineState, ReleaseOutcome,
};
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;

use crate::model::Purpose;
use crate::queue_head::QueueHead;
use crate::store::{ClaimBatch, Dispatch as StoreDispatch, QueuedJob, Store, StoreError, now_ms};
use crate::supervisor::Supervisor;

/// Jobs looked at per round.
const ROUND_LIMIT: u32 = 2000;
/// Most jobs dispatched in one batch (one lease request, one commit); mars takes
/// at most [`dutgate_mars::model::MAX_LEASE_BATCH`] leases per request.
const MAX_BATCH: usize = 256;
/// Most batches in flight at once; a round that would start another waits for one to end.
const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// When planned jobs could not be claimed (PostgreSQL: another executor is dispatching them),
/// the next round waits this long: planning them again at once would only find them locked
/// again, in a loop as fast as the database answers, until that executor commits.
const UNCLAIMED_RETRY: Duration = Duration::from_millis(20);
/// Longest time between two looks at the queue's deadlines even when none is known to be
/// due: jobs submitted through another executor sharing PostgreSQL are not noted here.
const DEADLINE_RECHECK_MS: i64 = 30_000;
/// After a planned job could not be claimed, batches claim (lock the jobs) before they ask
/// mars for leases (instead of not locking them at all) for this long (see [`Scheduler::dispatch_batch`]).
const CLAIM_FIRST_FOR_MS: i64 = 10_000;

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    mars: MarsClient,
    sup: Supervisor,
    holder: String,
    lease_ttl: Option<Duration>,
    machines: RwLock<Option<BTreeMap<MachineId, Machine>>>,
    wake: Arc<Notify>,
    rounds: std::sync::atomic::AtomicU64,
    in_flight: std::sync::Mutex<InFlight>,
    batches: Arc<tokio::sync::Semaphore>,
    /// No queued job's deadline is due before this instant (ms since the epoch): rounds skip
    /// the deadline query until then. Submissions with a deadline lower it
    /// ([`Scheduler::note_deadline`]); a look at the queue sets it to the earliest deadline
    /// found, or [`DEADLINE_RECHECK_MS`] ahead.
    deadline_check_at: AtomicI64,
    /// When a batch last found a planned job it could not claim (ms since the epoch).
    last_claim_miss: AtomicI64,
    /// The head of the queue between rounds (see [`crate::queue_head`]).
    head: std::sync::Mutex<QueueHead>,
}

/// The jobs and machines of the batches being dispatched: a round leaves them out of its
/// plan. A batch's entries go only after its commit (the jobs are no longer queued) and after
/// its machines are marked busy in the cache, and a round takes its snapshot before it reads
/// the queue and the cache, so no job or machine can be planned twice.
#[derive(Default)]
struct InFlight {
    jobs: HashSet<i64>,
    machines: HashSet<MachineId>,
}

/// What a batch's end asks of the scheduler.
enum Replan {
    No,
    /// A machine turned out busy behind the cache's back (now marked busy): plan again with
    /// what is left.
    Now,
    /// A planned job could not be claimed (its machine stayed free): plan again shortly.
    Soon,
}

/// A batch's place in the in-flight set, given up when dropped: also when the batch's task
/// panics or is dropped, so that its jobs and machines are never left out of plans for good.
struct InFlightEntry {
    sched: Scheduler,
    items: Vec<(i64, MachineId)>,
}

impl InFlightEntry {
    fn add(sched: &Scheduler, batch: &[(QueuedJob, MachineId)]) -> Self {
        let items: Vec<(i64, MachineId)> = batch.iter().map(|(j, m)| (j.id, *m)).collect();
        let mut f = sched.in_flight();
        for (job, machine) in &items {
            f.jobs.insert(*job);
            f.machines.insert(*machine);
        }
        drop(f);
        Self {
            sched: sched.clone(),
            items,
        }
    }
}

impl Drop for InFlightEntry {
    fn drop(&mut self) {
        let mut f = self.sched.in_flight();
        for (job, machine) in &self.items {
            f.jobs.remove(job);
            f.machines.remove(machine);
        }
    }
}

/// Why a target can never match.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown machine {0}")]
    UnknownMachine(MachineId),
    #[error("machine {id} does not have the tags {missing:?}")]
    MissingTags { id: MachineId, missing: Vec<String> },
    #[error("no machine has all the tags {0:?}")]
    NoMachineWithTags(Vec<String>),
    #[error("mars cannot be reached: {0}")]
    Mars(String),
}

fn fits(m: &Machine, purpose: Purpose) -> bool {
    match purpose {
        Purpose::Job => m.state == MachineState::Idle && m.lease.is_none(),
        Purpose::Training => {
            matches!(m.state, MachineState::Training | MachineState::QuickCheck)
                && m.lease.is_none()
        }
    }
}

fn has_tags(m: &Machine, tags: &[String]) -> bool {
    tags.iter()
        .all(|t| m.all_tags().any(|mt: &Tag| mt.as_str() == t))
}

fn matches(m: &Machine, job: &QueuedJob) -> bool {
    fits(m, job.purpose)
        && job.target_id.is_none_or(|id| id == m.id)
        && has_tags(m, &job.target_tags)
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
                in_flight: Default::default(),
                batches: Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT)),
                // The first round looks.
                deadline_check_at: AtomicI64::new(i64::MIN),
                last_claim_miss: AtomicI64::new(i64::MIN),
                head: Default::default(),
            }),
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

    async fn load_machines(&self) -> Result<(), String> {
        let list = self
            .inner
            .mars
            .machines()
            .await
            .map_err(|e| e.to_string())?;
        let map = list.into_iter().map(|m| (m.id, m)).collect();
        *self.inner.machines.write().await = Some(map);
        Ok(())
    }

    async fn ensure_loaded(&self) -> Result<(), TargetError> {
        if self.inner.machines.read().await.is_none() {
            self.load_machines().await.map_err(TargetError::Mars)?;
        }
        Ok(())
    }

    async fn machines(&self) -> Result<Vec<Machine>, TargetError> {
        self.ensure_loaded().await?;
        Ok(self
            .inner
            .machines
            .read()
            .await
            .as_ref()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }

    /// The machines that are neither leased nor running (only those are copied).
    async fn free_machines(&self) -> Result<Vec<Machine>, TargetError> {
        self.ensure_loaded().await?;
        Ok(self
            .inner
            .machines
            .read()
            .await
            .as_ref()
            .map(|map| {
                map.values()
                    .filter(|m| m.lease.is_none() && m.state != MachineState::Running)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Checks at submission that some machine could ever run a job with this target.
    ///
    /// Answers from the machine cache; when the cache says no (unknown machine, missing
    /// tags, no machine with the tags) it asks mars first — the cache follows mars' event
    /// stream and may not have seen a machine registered or retagged a moment ago.
    pub async fn check_target(
        &self,
        id: Option<MachineId>,
        tags: &[String],
    ) -> Result<(), TargetError> {
        if target_verdict(&self.machines().await?, id, tags).is_ok() {
            return Ok(());
        }
        match id {
            Some(id) => match self.inner.mars.machine(id).await {
                Ok(m) => {
                    if let Some(map) = self.inner.machines.write().await.as_mut() {
                        map.insert(m.id, m);
                    }
                }
                Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {}
                Err(e) => return Err(TargetError::Mars(e.to_string())),
            },
            None => self.load_machines().await.map_err(TargetError::Mars)?,
        }
        target_verdict(&self.machines().await?, id, tags)
    }

    /// Whether a machine for this target is free right now (`?wait=false`).
    pub async fn any_free(
        &self,
        purpose: Purpose,
        id: Option<MachineId>,
        tags: &[String],
    ) -> Result<bool, TargetError> {
        let probe = QueuedJob {
            id: 0,
            priority: 0,
            purpose,
            target_id: id,
            target_tags: tags.to_vec(),
        };
        Ok(self.machines().await?.iter().any(|m| matches(m, &probe)))
    }

    /// Follows mars' event stream: keeps the machine cache current, wakes the scheduler when a
    /// machine is freed, and reports expired leases to the supervisor.
    pub async fn follow_mars(self, shutdown: CancellationToken) {
        let mars = self.inner.mars.clone();
        'outer: loop {
            let cursor = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = mars.events_cursor() => c,
            };
            let mut cursor = match cursor {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "mars events unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Load after taking the cursor so that no change falls in between.
            if let Err(e) = self.load_machines().await {
                tracing::warn!(error = %e, "cannot list machines");
            }
            self.wake();
            loop {
                let batch = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    b = mars.events(cursor, Duration::from_secs(30)) => b,
                };
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "mars events failed; reloading");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'outer,
                        }
                    }
                };
                cursor = batch.next;
                let now = now_ms();
                for ev in &batch.events {
                    // How late the executor learns of mars' changes (ms resolution).
                    metrics::histogram!("executor_mars_event_delay_seconds")
                        .record((now - ev.at.millis()).max(0) as f64 / 1000.0);
                }
                let mut wake = false;
                for ev in batch.events {
                    let lease_event = ev.kind.starts_with("lease_");
                    {
                        let mut guard = self.inner.machines.write().await;
                        if let Some(map) = guard.as_mut()
                            && let Some(m) = map.get_mut(&ev.machine_id)
                        {
                            m.state = ev.to_state;
                            if lease_event && ev.kind != "lease_acquired" {
                                m.lease = None;
                            }
                        }
                    }
                    if !lease_event {
                        // Tags, PDU or a new machine: take the record as mars has it.
                        if let Ok(m) = mars.machine(ev.machine_id).await {
                            let mut guard = self.inner.machines.write().await;
                            if let Some(map) = guard.as_mut() {
                                map.insert(m.id, m);
                            }
                        }
                        wake = true;
                    }
                    if ev.frees_machine() {
                        wake = true;
                    }
                    if ev.kind == "lease_expired"
                        && let Some(job) = ev.job_id.as_deref().and_then(|j| j.parse().ok())
                    {
                        self.inner.sup.lease_expired(job).await;
                    }
                }
                if wake {
                    self.wake();
                }
            }
        }
    }

    /// The dispatch loop.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let notified = self.inner.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let retry_soon = match self.round().await {
                Ok(_) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch round failed");
                    true
                }
            };
            let check_at = self.inner.deadline_check_at.load(Ordering::SeqCst);
            let sleep_for = if retry_soon {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(
                    (check_at.saturating_sub(now_ms())).clamp(0, 3_600_000) as u64 + 1,
                )
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = notified => {}
                _ = tokio::time::sleep(sleep_for) => {}
            }
        }
        // Let the batches in flight finish their commit and launches (each step has its
        // own timeout); a batch cut off here would leave leases to expire.
        let all = u32::try_from(MAX_BATCHES_IN_FLIGHT).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            self.inner.batches.acquire_many(all),
        )
        .await;
    }

    /// Plans a round and starts its batches; the handles end with the batches.
    async fn round(&self) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
        let round = self.inner.rounds.fetch_add(1, Ordering::Relaxed) + 1;
        let t_round = Instant::now();
        let r = self.round_inner(round).await;
        metrics::histogram!("executor_dispatch_step_seconds", "step" => "round")
            .record(t_round.elapsed().as_secs_f64());
        r
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
                    .finish(
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

    async fn round_inner(&self, round: u64) -> Result<Vec<tokio::task::JoinHandle<()>>, String> {
        self.expire_deadlines().await?;
        // The snapshot first, then the cache and the queue (see `InFlight`).
        let (busy_jobs, busy_machines) = {
            let f = self.in_flight();
            (f.jobs.clone(), f.machines.clone())
        };
        let mut free = self.free_machines().await.map_err(|e| e.to_string())?;
        free.retain(|m| !busy_machines.contains(&m.id));
        if free.is_empty() {
            return Ok(Vec::new());
        }
        let t_plan = Instant::now();
        // Take the head of the queue first (a few jobs per free machine), and the whole
        // window only when free IDLE machines are left over: in steady state a round looks at
        // a few dozen jobs, not thousands (and from memory when the head kept there can
        // tell).
        let idle = free
            .iter()
            .filter(|m| m.state == MachineState::Idle)
            .count();
        let mut limit = u32::try_from((free.len() + busy_jobs.len()).saturating_mul(4))
            .unwrap_or(ROUND_LIMIT)
            .clamp(64, ROUND_LIMIT);
        let plan = loop {
            let (mut queued, complete) = self.queue_head(limit).await.map_err(|e| e.to_string())?;
            queued.retain(|j| !busy_jobs.contains(&j.id));
            let plan = plan_round(&queued, &free);
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
        let mut handles = Vec::new();
        for chunk in plan.chunks(MAX_BATCH) {
            let permit = self
                .inner
                .batches
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| "dispatch closed")?;
            let entry = InFlightEntry::add(self, chunk);
            let this = self.clone();
            let chunk = chunk.to_vec();
            handles.push(tokio::spawn(async move {
                let r = this.dispatch_batch(&chunk, round).await;
                drop(entry);
                drop(permit);
                match r {
                    Ok(Replan::No) => {}
                    Ok(Replan::Now) => this.wake(),
                    Ok(Replan::Soon) => {
                        tokio::time::sleep(UNCLAIMED_RETRY).await;
                        this.wake();
                    }
                    Err(e) => {
                        this.head().invalidate();
                        tracing::warn!(error = %e, round, "dispatch batch failed; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        this.wake();
                    }
                }
            }));
        }
        Ok(handles)
    }

    /// The first `limit` jobs of the queue, and whether they are all of it: from the head
    /// kept in memory when it can tell, else read from the store.
    async fn queue_head(&self, limit: u32) -> Result<(Vec<QueuedJob>, bool), StoreError> {
        let store = &self.inner.store;
        let n = usize::try_from(limit).unwrap_or(usize::MAX);
        if let Some(head) = self.head().current(store.queue_log(), n) {
            metrics::counter!("executor_queue_head_total", "from" => "memory").increment(1);
            return Ok(head);
        }
        metrics::counter!("executor_queue_head_total", "from" => "store").increment(1);
        let mark = store.queue_log().last();
        let read_at = Instant::now();
        let read = store.queued(limit).await?;
        Ok(self.head().fill(read, n, mark, store.queue_log(), read_at))
    }

    fn head(&self) -> std::sync::MutexGuard<'_, QueueHead> {
        // A poisoned lock only means a panic elsewhere while it was held: drop the head.
        self.inner.head.lock().unwrap_or_else(|p| {
            let mut head = p.into_inner();
            head.invalidate();
            head
        })
    }

    /// The in-flight set. A poisoned lock only means a panic elsewhere while it was held; each
    /// change under it is a single insert or remove, so the sets are still consistent.
    fn in_flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Dispatches a planned batch: a lease request (one for the batch) and the record of the
    /// dispatch (one commit), then the launches. Returns whether and when to plan again.
    ///
    /// Normally the two go out at once: the executor chooses each lease's id, so the
    /// dispatch is recorded under it while mars grants the lease, and a job is launched once
    /// both are durable — the dispatch costs the slower of two round trips, not their sum. A
    /// lease refused for a recorded job takes the record back (the job is queued again, in
    /// its place); a lease granted for a job that could not be recorded (cancelled, or taken
    /// by another executor) is given back. The record's conditional update is the guard
    /// against dispatching a job twice: on PostgreSQL it skips jobs another executor holds.
    /// Once a job was missed (another executor is dispatching from the same queue, or a job
    /// was cancelled meanwhile), batches claim first for a while (PostgreSQL: row locks,
    /// `SKIP LOCKED`), then take the leases, then commit — so that executors racing for the
    /// same jobs do not take and give back leases in every round.
    async fn dispatch_batch(
        &self,
        plan: &[(QueuedJob, MachineId)],
        round: u64,
    ) -> Result<Replan, String> {
        let started = Instant::now();
        let store = &self.inner.store;
        let ids: Vec<i64> = plan.iter().map(|(j, _)| j.id).collect();
        let claim_first = now_ms()
            .saturating_sub(self.inner.last_claim_miss.load(Ordering::Relaxed))
            < CLAIM_FIRST_FOR_MS;
        let (plan, unclaimed, outcomes) = if claim_first {
            let batch = store.claim_many(&ids).await.map_err(|e| e.to_string())?;
            let claimed: HashSet<i64> = batch.ids.iter().copied().collect();
            // Jobs not claimed left the queue or are another executor's right now; their
            // machines stay free: plan again once this batch is done.
            let plan: Vec<&(QueuedJob, MachineId)> = plan
                .iter()
                .filter(|(j, _)| claimed.contains(&j.id))
                .collect();
            let unclaimed = plan.len() < ids.len();
            if unclaimed {
                self.note_claim_miss();
            }
            if plan.is_empty() {
                return Ok(Replan::Soon);
            }
            metrics::histogram!("executor_dispatch_step_seconds", "step" => "claim")
                .record(started.elapsed().as_secs_f64());
            let outcomes = self.lease_then_record(&plan, batch, round).await?;
            (plan, unclaimed, outcomes)
        } else {
            let plan: Vec<&(QueuedJob, MachineId)> = plan.iter().collect();
            let outcomes = self.lease_and_record(&plan, round).await?;
            (plan, false, outcomes)
        };
        let elapsed = started.elapsed().as_secs_f64();
        let mut unclaimed = unclaimed;
        let mut busy = false;
        let mut refused = Vec::new();
        let mut other_refusal = None;
        let mut missed = Vec::new();
        let mut withdraw = Vec::new();
        let mut dispatched = Vec::new();
        for ((job, machine), (lease, recorded)) in plan.iter().zip(outcomes) {
            match lease {
                Ok(lease) if recorded.is_some() => dispatched.push((job.id, *machine, lease)),
                // Cancelled meanwhile, or being dispatched by another executor: give the
                // machine back untouched (it stays free in the cache).
                Ok(lease) => missed.push(lease),
                Err(refusal) => {
                    if let Some(lease_id) = recorded {
                        withdraw.push((job.id, lease_id));
                    }
                    if refusal.status == 409 || refusal.status == 404 {
                        // Leased or not in a leasable state behind the cache's back, or
                        // gone: the next round plans this job on another machine.
                        tracing::debug!(job_id = job.id, machine_id = %machine, error = %refusal.error, "lease refused");
                        refused.push(*machine);
                        busy = true;
                    } else {
                        tracing::warn!(job_id = job.id, machine_id = %machine, status = refusal.status, error = %refusal.error, "lease failed");
                        other_refusal = Some(format!("lease of {machine}: {}", refusal.error));
                    }
                }
            }
        }
        self.mark_busy(&refused).await;
        let machines: Vec<MachineId> = dispatched.iter().map(|(_, m, _)| *m).collect();
        self.mark_busy(&machines).await;
        metrics::counter!("executor_dispatch_batches_total").increment(1);
        let mut launches = Vec::new();
        for (id, machine, lease) in &dispatched {
            metrics::histogram!("executor_dispatch_seconds").record(elapsed);
            metrics::counter!("executor_jobs_dispatched_total").increment(1);
            tracing::info!(job_id = id, machine_id = %machine, lease = %lease.id, round, "dispatched");
            launches.push(self.launch(*id, *machine, lease));
        }
        futures::future::join_all(launches).await;
        if !withdraw.is_empty() {
            // The machine cache was wrong about a machine (another executor sharing the
            // database took it, say): lease first for a while, so that racing executors do
            // not record and take back dispatches in every round.
            self.note_claim_miss();
        }
        for (id, lease_id) in withdraw {
            self.withdraw(id, &lease_id, "the lease was refused").await;
        }
        if !missed.is_empty() {
            unclaimed = true;
            self.note_claim_miss();
            let leases: Vec<&Lease> = missed.iter().collect();
            self.release_all(&leases, "the job left the queue before it was dispatched")
                .await;
        }
        match other_refusal {
            Some(e) => Err(e),
            None => Ok(if busy {
                Replan::Now
            } else if unclaimed {
                Replan::Soon
            } else {
                Replan::No
            }),
        }
    }

    /// The lease request for `plan`'s jobs, each with a lease id chosen here.
    fn lease_requests(&self, plan: &[&(QueuedJob, MachineId)]) -> Vec<LeaseRequest> {
        plan.iter()
            .map(|(job, machine)| LeaseRequest {
                machine_id: *machine,
                job_id: job.id.to_string(),
                holder: self.inner.holder.clone(),
                purpose: match job.purpose {
                    Purpose::Job => LeasePurpose::Job,
                    Purpose::Training => LeasePurpose::Training,
                },
                ttl_seconds: self.inner.lease_ttl.map(|t| t.as_secs().max(1)),
                lease_id: Some(dutgate_mars::model::new_lease_id()),
            })
            .collect()
    }

    /// Unlocked jobs: the lease request and the dispatch record at once (see
    /// [`Scheduler::dispatch_batch`]). One outcome per job: its lease or refusal, and whether
    /// its dispatch is recorded. On an error nothing of the batch stays: recorded dispatches
    /// are taken back, granted leases given back.
    async fn lease_and_record(
        &self,
        plan: &[&(QueuedJob, MachineId)],
        round: u64,
    ) -> Result<Vec<Outcome>, String> {
        let store = &self.inner.store;
        let reqs = self.lease_requests(plan);
        let items: Vec<StoreDispatch> = plan
            .iter()
            .zip(&reqs)
            .map(|((job, machine), req)| StoreDispatch {
                id: job.id,
                machine: *machine,
                lease_id: req.lease_id.clone().unwrap_or_default(),
            })
            .collect();
        let ids: Vec<i64> = items.iter().map(|d| d.id).collect();
        let mut batch = ClaimBatch::unlocked(&ids);
        batch.round = round;
        let t0 = Instant::now();
        let leases = async {
            let r = self.inner.mars.acquire_many(&reqs).await;
            metrics::histogram!("executor_dispatch_step_seconds", "step" => "lease")
                .record(t0.elapsed().as_secs_f64());
            r
        };
        let record = async {
            let r = store
                .complete_many(batch, &items, self.inner.sup.name())
                .await;
            metrics::histogram!("executor_dispatch_step_seconds", "step" => "commit")
                .record(t0.elapsed().as_secs_f64());
            r
        };
        match tokio::join!(leases, record) {
            (Ok(leases), Ok(recorded)) => Ok(leases
                .into_iter()
                .zip(recorded)
                .zip(&items)
                .map(|((lease, ok), d)| (lease, ok.then(|| d.lease_id.clone())))
                .collect()),
            (Ok(leases), Err(e)) => {
                // Nothing was recorded: the jobs are still queued; give the machines back.
                let granted: Vec<&Lease> = leases.iter().filter_map(|r| r.as_ref().ok()).collect();
                self.release_all(&granted, "the dispatch could not be recorded")
                    .await;
                Err(e.to_string())
            }
            (Err(e), recorded) => {
                // No lease of the batch was taken: take back what was recorded.
                if let Ok(recorded) = recorded {
                    for (d, ok) in items.iter().zip(recorded) {
                        if ok {
                            self.withdraw(d.id, &d.lease_id, "the lease request failed")
                                .await;
                        }
                    }
                }
                Err(format!("leases: {e}"))
            }
        }
    }

    /// Claimed jobs: the leases first, then the record of the dispatches that got one, in the
    /// claim's transaction. One outcome per job, as [`Scheduler::lease_and_record`]'s.
    async fn lease_then_record(
        &self,
        plan: &[&(QueuedJob, MachineId)],
        mut batch: ClaimBatch,
        round: u64,
    ) -> Result<Vec<Outcome>, String> {
        let reqs = self.lease_requests(plan);
        let t_lease = Instant::now();
        // On error no lease of the batch was taken; dropping the claim rolls it back.
        let results = self
            .inner
            .mars
            .acquire_many(&reqs)
            .await
            .map_err(|e| format!("leases: {e}"))?;
        let t_commit = Instant::now();
        metrics::histogram!("executor_dispatch_step_seconds", "step" => "lease")
            .record((t_commit - t_lease).as_secs_f64());
        batch.round = round;
        let items: Vec<StoreDispatch> = plan
            .iter()
            .zip(&results)
            .filter_map(|((job, machine), r)| {
                r.as_ref().ok().map(|lease| StoreDispatch {
                    id: job.id,
                    machine: *machine,
                    lease_id: lease.id.clone(),
                })
            })
            .collect();
        let done = match self
            .inner
            .store
            .complete_many(batch, &items, self.inner.sup.name())
            .await
        {
            Ok(d) => d,
            Err(e) => {
                // Nothing was committed: the jobs are still queued; give the machines back.
                let granted: Vec<&Lease> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
                self.release_all(&granted, "the dispatch could not be recorded")
                    .await;
                return Err(e.to_string());
            }
        };
        metrics::histogram!("executor_dispatch_step_seconds", "step" => "commit")
            .record(t_commit.elapsed().as_secs_f64());
        let mut done = done.into_iter();
        Ok(results
            .into_iter()
            .map(|r| {
                let recorded = match &r {
                    Ok(lease) => done.next().unwrap_or(false).then(|| lease.id.clone()),
                    Err(_) => None,
                };
                (r, recorded)
            })
            .collect())
    }

    /// Takes back the recorded dispatch of job `id` (its lease was not granted): queued
    /// again. A failure is logged; the job then stays dispatched without a lease, which the
    /// executor's start-up check finds (see [`Supervisor::reattach_all`]).
    async fn withdraw(&self, id: i64, lease_id: &str, reason: &str) {
        match self
            .inner
            .store
            .withdraw_dispatch(id, lease_id, reason)
            .await
        {
            Ok(true) => {
                metrics::counter!("executor_dispatches_withdrawn_total").increment(1);
                tracing::info!(
                    job_id = id,
                    reason,
                    "dispatch withdrawn; the job is queued again"
                );
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(job_id = id, error = %e, "cannot withdraw the dispatch");
            }
        }
    }

    /// A planned job was not queued any more, another executor held it, or a lease was refused
    /// after its dispatch was recorded: claim first for [`CLAIM_FIRST_FOR_MS`], and read the
    /// queue again.
    fn note_claim_miss(&self) {
        self.inner
            .last_claim_miss
            .store(now_ms(), Ordering::Relaxed);
        self.head().invalidate();
    }

    /// Gives leases back (best effort, concurrently).
    async fn release_all(&self, leases: &[&Lease], reason: &str) {
        futures::future::join_all(leases.iter().map(|l| {
            self.inner
                .mars
                .release(&l.id, ReleaseOutcome::Ok, Some(reason))
        }))
        .await;
    }

    /// Starts the job process of a dispatched job; if it cannot start, the job ends in
    /// `SetupFail` and the machine is given back.
    async fn launch(&self, id: i64, machine: MachineId, lease: &Lease) {
        let store = &self.inner.store;
        let Err(e) = self
            .inner
            .sup
            .launch(id, machine, &lease.id, lease.ttl_seconds)
            .await
        else {
            return;
        };
        tracing::error!(job_id = id, error = %e, "cannot start the job process");
        let _ = store
            .add_event(
                id,
                crate::model::kind::EXECUTOR,
                &format!("cannot start the job process: {e}"),
                serde_json::json!({"action": "process_died"}),
            )
            .await;
        let _ = self
            .inner
            .mars
            .release(
                &lease.id,
                ReleaseOutcome::Ok,
                Some("the job process could not start"),
            )
            .await;
        let _ = store
            .finish(
                id,
                dutgate_core::JobStatus::SetupFail,
                &format!("the job process could not start: {e}"),
            )
            .await;
    }

    async fn mark_busy(&self, ids: &[MachineId]) {
        let mut guard = self.inner.machines.write().await;
        if let Some(map) = guard.as_mut() {
            for id in ids {
                if let Some(m) = map.get_mut(id) {
                    m.state = MachineState::Running;
                }
            }
        }
    }
}

/// What became of one job of a batch: its lease (or why not), and the lease id its dispatch
/// is recorded under (`None`: not recorded).
type Outcome = (Result<Lease, LeaseRefusal>, Option<String>);

/// Plans a round in priority order: each job takes the first free machine it fits. The plan
/// alone decides who gets which machine; the leases are then taken concurrently.
fn plan_round(queued: &[QueuedJob], free: &[Machine]) -> Vec<(QueuedJob, MachineId)> {
    let mut taken: HashSet<MachineId> = HashSet::new();
    // Targets that found no free machine: later jobs with the same target cannot either (the
    // free set only shrinks), so they are skipped without a scan.
    let mut hopeless: HashSet<(Purpose, Option<MachineId>, &[String])> = HashSet::new();
    let mut plan = Vec::new();
    for job in queued {
        if taken.len() == free.len() {
            break;
        }
        let key = (job.purpose, job.target_id, job.target_tags.as_slice());
        if hopeless.contains(&key) {
            continue;
        }
        match free
            .iter()
            .find(|m| !taken.contains(&m.id) && matches(m, job))
        {
            Some(m) => {
                taken.insert(m.id);
                plan.push((job.clone(), m.id));
            }
            None => {
                hopeless.insert(key);
            }
        }
    }
    plan
}

/// Why a target can never match, judged on `machines`.
fn target_verdict(
    machines: &[Machine],
    id: Option<MachineId>,
    tags: &[String],
) -> Result<(), TargetError> {
    match id {
        Some(id) => {
            let m = machines
                .iter()
                .find(|m| m.id == id)
                .ok_or(TargetError::UnknownMachine(id))?;
            let missing: Vec<String> = tags
                .iter()
                .filter(|t| !has_tags(m, std::slice::from_ref(t)))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(TargetError::MissingTags { id, missing });
            }
            Ok(())
        }
        None => {
            if machines
                .iter()
                .any(|m| m.state != MachineState::Retired && has_tags(m, tags))
            {
                Ok(())
            } else {
                Err(TargetError::NoMachineWithTags(tags.to_vec()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dutgate_mars::model::Timestamp;

    fn machine(n: u8, state: MachineState, tags: &[&str]) -> Machine {
        let id = MachineId::from_bytes([2, 0, 0, 0, 0, n]);
        Machine {
            id,
            mac_address: id,
            base_name: "m".into(),
            full_name: format!("farm-m-{n}"),
            tags: tags.iter().map(|t| t.parse().unwrap()).collect(),
            manual_tags: vec![],
            ip_address: None,
            local_tty_device: None,
            pdu: None,
            pdu_port_id: None,
            pdu_off_delay: 0.0,
            state,
            comment: None,
            first_seen: Timestamp(0),
            last_seen: Timestamp(0),
            consecutive_infra_failures: 0,
            lease: None,
            training: Default::default(),
            ready_for_service: true,
            is_retired: false,
        }
    }

    fn job(id: i64, tags: &[&str]) -> QueuedJob {
        QueuedJob {
            id,
            priority: 0,
            purpose: Purpose::Job,
            target_id: None,
            target_tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// A real mars (SQLite, in-memory PDU) served on 127.0.0.1, and a scheduler on it whose
    /// machine cache is not fed by the event stream (`follow_mars` does not run), with an
    /// inline runner that records the launches.
    struct Rig {
        _dir: tempfile::TempDir,
        mars: dutgate_mars::machines::Mars,
        client: MarsClient,
        sched: Scheduler,
        sup: Supervisor,
        store: Store,
        launched: Arc<std::sync::Mutex<Vec<(i64, MachineId)>>>,
        shutdown: CancellationToken,
    }

    async fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let db = dutgate_core::db::Db::open_sqlite(
            &dir.path().join("executor.db"),
            crate::store::MIGRATIONS,
        )
        .await
        .unwrap();
        rig_on(dir, db).await
    }

    /// [`rig`] with the executor's queue in `db`.
    async fn rig_on(dir: tempfile::TempDir, db: dutgate_core::db::Db) -> Rig {
        use dutgate_core::Secret;
        use dutgate_core::db::Db;
        let mars_db = Db::open_sqlite(&dir.path().join("mars.db"), dutgate_mars::store::MIGRATIONS)
            .await
            .unwrap();
        let mut cfg = dutgate_mars::Config::default();
        cfg.training.enabled = false;
        let mars = dutgate_mars::machines::Mars::new(
            dutgate_mars::store::Store::new(mars_db, "farm"),
            cfg,
            Arc::new(dutgate_mars::power::MemoryPower::default()),
        );
        let auth = dutgate_core::auth::Auth::new(
            Some(Secret::new("admin")),
            None,
            dutgate_core::config::default_dut_networks(),
        );
        let shutdown = CancellationToken::new();
        let router = dutgate_mars::start(mars.clone(), auth, shutdown.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(dutgate_core::http::serve(
            listener,
            dutgate_core::http::with_common_routes("mars", router, None),
            shutdown.clone(),
            Duration::from_millis(100),
        ));
        let client = MarsClient::new(&url, Some(Secret::new("admin")));
        let store = Store::new(db);
        let mut gw = dutgate_core::config::GatewayConfig {
            state_dir: dir.path().to_path_buf(),
            internal_host: "127.0.0.1".into(),
            ..Default::default()
        };
        // The supervisor's own mars client (start-up checks) talks to this mars.
        gw.ports.mars = url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap();
        let gw = Arc::new(gw);
        let launched: Arc<std::sync::Mutex<Vec<(i64, MachineId)>>> = Default::default();
        let l2 = launched.clone();
        let inline: crate::supervisor::InlineRunner = Arc::new(move |id, m, _lease| {
            l2.lock().unwrap().push((id, m));
            Box::pin(async {})
        });
        let sup = Supervisor::new(
            store.clone(),
            gw,
            crate::Config::default(),
            None,
            Arc::new(Notify::new()),
            Some(inline),
        );
        let sched = Scheduler::new(
            store.clone(),
            client.clone(),
            sup.clone(),
            None,
            Arc::new(Notify::new()),
        );
        Rig {
            _dir: dir,
            mars,
            client,
            sched,
            sup,
            store,
            launched,
            shutdown,
        }
    }

    /// Registers machine `n` with `tags` and, when `idle`, configures and admits it.
    async fn register(rig: &Rig, n: u8, tags: &[&str], idle: bool) -> MachineId {
        let id = MachineId::from_bytes([0x52, 0x54, 0, 0, 0, n]);
        rig.client
            .register(&dutgate_mars::model::Registration {
                base_name: "m".into(),
                tags: tags.iter().map(|t| t.parse().unwrap()).collect(),
                mac_address: id,
                ip_address: "10.0.2.15".parse().unwrap(),
                local_tty_device: None,
            })
            .await
            .unwrap();
        if idle {
            rig.client
                .patch(
                    id,
                    &dutgate_mars::model::MachinePatch {
                        pdu: Some(Some("pdu".into())),
                        pdu_port_id: Some(Some(n.to_string())),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            rig.mars
                .store
                .trigger(
                    id,
                    dutgate_mars::state::Trigger::TrainingPassed,
                    &dutgate_mars::store::Cause::new("test", "admitted"),
                    &|_| {},
                )
                .await
                .unwrap();
        }
        id
    }

    fn new_job(priority: i64, tags: &[&str]) -> crate::store::NewJob {
        crate::store::NewJob {
            external_id: None,
            priority,
            purpose: Purpose::Job,
            job_yaml: "version: 1\n".into(),
            target_id: None,
            target_tags: tags.iter().map(|t| t.to_string()).collect(),
            deadline_ms: None,
            has_tarball: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn check_target_asks_mars_about_machines_the_cache_has_not_seen() {
        let rig = rig().await;
        let sched = &rig.sched;
        // Loads the cache: no machine yet.
        assert!(matches!(
            sched.check_target(None, &["a:b:c".into()]).await,
            Err(TargetError::NoMachineWithTags(_))
        ));
        // Registered after the cache was loaded (a machine's first training is submitted
        // right after its registration): known by id and by tags all the same.
        let fresh = register(&rig, 1, &["a:b:c"], false).await;
        sched.check_target(Some(fresh), &[]).await.unwrap();
        sched
            .check_target(Some(fresh), &["a:b:c".into()])
            .await
            .unwrap();
        let other = register(&rig, 2, &["x:y:z"], false).await;
        sched.check_target(None, &["x:y:z".into()]).await.unwrap();
        sched.check_target(Some(other), &[]).await.unwrap();
        // What mars does not know either is still refused.
        let unknown = MachineId::from_bytes([0x52, 0x54, 0, 0, 0, 99]);
        assert!(matches!(
            sched.check_target(Some(unknown), &[]).await,
            Err(TargetError::UnknownMachine(id)) if id == unknown
        ));
        assert!(matches!(
            sched.check_target(Some(fresh), &["x:y:z".into()]).await,
            Err(TargetError::MissingTags { .. })
        ));
        assert!(matches!(
            sched.check_target(None, &["q:q:q".into()]).await,
            Err(TargetError::NoMachineWithTags(_))
        ));
        rig.shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batch_dispatch_falls_back_when_a_lease_is_refused() {
        let rig = rig().await;
        let mut ms = Vec::new();
        for n in 1..=4 {
            ms.push(register(&rig, n, &["a:b:c"], true).await);
        }
        // Load the cache, then take the first machine behind its back.
        assert!(rig.sched.any_free(Purpose::Job, None, &[]).await.unwrap());
        let foreign = rig
            .client
            .acquire(
                ms[0],
                "elsewhere",
                "another-executor",
                LeasePurpose::Job,
                None,
            )
            .await
            .unwrap();
        let low1 = rig.store.insert(&new_job(0, &["a:b:c"])).await.unwrap();
        let high = rig.store.insert(&new_job(5, &["a:b:c"])).await.unwrap();
        let low2 = rig.store.insert(&new_job(0, &[])).await.unwrap();
        let low3 = rig.store.insert(&new_job(0, &[])).await.unwrap();
        // Round 1 plans high → ms[0] (refused: leased elsewhere), low1 → ms[1], low2 → ms[2],
        // low3 → ms[3]; round 2 has no free machine left; high waits for one.
        for batch in rig.sched.round().await.unwrap() {
            batch.await.unwrap();
        }
        let launched = rig.launched.lock().unwrap().clone();
        assert_eq!(
            launched.iter().map(|l| l.0).collect::<HashSet<_>>(),
            HashSet::from([low1, low2, low3])
        );
        let machines: HashSet<MachineId> = launched.iter().map(|l| l.1).collect();
        assert_eq!(machines.len(), 3, "one job per machine: {launched:?}");
        assert!(!machines.contains(&ms[0]));
        let row = rig.store.require(high).await.unwrap();
        assert_eq!(row.state, crate::model::JobState::Queued);
        assert_eq!((row.machine_id, row.lease_id), (None, None));
        // Its dispatch was recorded while the lease was asked for, then taken back.
        let events = rig.store.events(high, 0).await.unwrap();
        let kinds: Vec<(&str, Option<&str>)> = events
            .iter()
            .map(|e| {
                (
                    e.kind.as_str(),
                    e.data.get("action").and_then(|a| a.as_str()),
                )
            })
            .collect();
        assert!(
            kinds.ends_with(&[
                (crate::model::kind::DISPATCHED, None),
                (crate::model::kind::EXECUTOR, Some("dispatch_withdrawn")),
            ]),
            "{kinds:?}"
        );
        // The foreign lease is untouched.
        let m0 = rig.client.machine(ms[0]).await.unwrap();
        assert_eq!(m0.lease.map(|l| l.id), Some(foreign.id.clone()));
        // The machine comes back (the cache learns it as the event stream would tell it):
        // the queued job takes it.
        rig.client
            .release(&foreign.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        rig.sched.load_machines().await.unwrap();
        for batch in rig.sched.round().await.unwrap() {
            batch.await.unwrap();
        }
        let row = rig.store.require(high).await.unwrap();
        assert_eq!(
            (row.state, row.machine_id),
            (crate::model::JobState::Dispatched, Some(ms[0]))
        );
        let all = rig.launched.lock().unwrap().clone();
        assert_eq!(all.len(), 4);
        for (id, m) in &all {
            let row = rig.store.require(*id).await.unwrap();
            assert_eq!(row.machine_id, Some(*m));
            let lease = rig.client.machine(*m).await.unwrap().lease.unwrap();
            assert_eq!(lease.job_id, id.to_string());
            assert_eq!(row.lease_id, Some(lease.id));
        }
        rig.shutdown.cancel();
    }

    /// The dispatch is recorded while its lease is taken: an executor that stopped in between
    /// leaves a job dispatched under a lease mars never granted. At start-up such a job goes
    /// back to the queue (it never ran); one whose lease mars holds is launched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dispatch_under_a_lease_mars_does_not_hold_is_queued_again_at_start_up() {
        let rig = rig().await;
        let m = register(&rig, 1, &["a:b:c"], true).await;
        let record = |id: i64, lease_id: String| {
            let store = rig.store.clone();
            let name = rig.sup.name().to_string();
            async move {
                store
                    .complete_many(
                        ClaimBatch::unlocked(&[id]),
                        &[StoreDispatch {
                            id,
                            machine: m,
                            lease_id,
                        }],
                        &name,
                    )
                    .await
                    .unwrap()
            }
        };
        let never = rig.store.insert(&new_job(0, &[])).await.unwrap();
        let lease = dutgate_mars::model::new_lease_id();
        assert_eq!(record(never, lease).await, vec![true]);
        rig.sup.reattach_all().await.unwrap();
        let row = rig.store.require(never).await.unwrap();
        assert_eq!(
            (row.state, row.machine_id, row.lease_id),
            (crate::model::JobState::Queued, None, None)
        );
        let events = rig.store.events(never, 0).await.unwrap();
        assert_eq!(
            events
                .last()
                .and_then(|e| e.data.get("action"))
                .and_then(|a| a.as_str()),
            Some("dispatch_withdrawn"),
            "{events:?}"
        );
        assert!(rig.launched.lock().unwrap().is_empty());
        // Held by mars: launched, not withdrawn.
        let held = rig.store.insert(&new_job(0, &[])).await.unwrap();
        let granted = rig
            .client
            .acquire(m, &held.to_string(), "test", LeasePurpose::Job, None)
            .await
            .unwrap();
        assert_eq!(record(held, granted.id.clone()).await, vec![true]);
        rig.sup.reattach_all().await.unwrap();
        assert_eq!(
            rig.store.require(held).await.unwrap().state,
            crate::model::JobState::Dispatched
        );
        assert_eq!(rig.launched.lock().unwrap().clone(), vec![(held, m)]);
        rig.shutdown.cancel();
    }

    /// A round that starts while an earlier round's batch is still leasing leaves that
    /// batch's jobs and machines alone: no job is planned twice, no machine leased twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_rounds_plan_nothing_twice() {
        let rig = rig().await;
        for n in 1..=4 {
            register(&rig, n, &[], true).await;
        }
        assert!(rig.sched.any_free(Purpose::Job, None, &[]).await.unwrap());
        let mut jobs = HashSet::new();
        for _ in 0..6 {
            jobs.insert(rig.store.insert(&new_job(0, &[])).await.unwrap());
        }
        let from = rig.mars.store.latest_seq().await.unwrap();
        // The first round's batch is in flight (its lease request not answered yet) when
        // the second round plans.
        let first = rig.sched.round().await.unwrap();
        let second = rig.sched.round().await.unwrap();
        assert_eq!(first.len(), 1);
        assert!(second.is_empty(), "every free machine is in flight");
        for batch in first.into_iter().chain(second) {
            batch.await.unwrap();
        }
        let launched = rig.launched.lock().unwrap().clone();
        let ids: HashSet<i64> = launched.iter().map(|l| l.0).collect();
        let machines: HashSet<MachineId> = launched.iter().map(|l| l.1).collect();
        assert_eq!((launched.len(), ids.len(), machines.len()), (4, 4, 4));
        let leases = rig
            .mars
            .store
            .events_after(from, 1000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.kind == "lease_acquired")
            .count();
        assert_eq!(leases, 4, "no lease was taken and given back");
        // Once the batch is done, its jobs are dispatched and the other two still queued.
        for batch in rig.sched.round().await.unwrap() {
            batch.await.unwrap();
        }
        let queued = rig.store.queued(100).await.unwrap();
        assert_eq!(queued.len(), 2);
        assert!(
            queued
                .iter()
                .all(|j| jobs.contains(&j.id) && !ids.contains(&j.id))
        );
        rig.shutdown.cancel();
    }

    /// PostgreSQL (the claim takes row locks there; on SQLite every planned job is claimed):
    /// a job another executor holds is not dispatched, the lease taken for it at the same
    /// time as the claim is given back, and for a while after that miss batches claim before
    /// they lease, so no lease is taken and given back again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_for_a_job_it_could_not_claim_is_given_back() {
        for test_db in
            dutgate_core::db::testing::databases("executor", crate::store::MIGRATIONS).await
        {
            if test_db.backend() != dutgate_core::db::Backend::Postgres {
                continue;
            }
            let pool = test_db.pool().clone();
            let rig = rig_on(tempfile::tempdir().unwrap(), test_db.db.clone()).await;
            let ms = [
                register(&rig, 1, &["a:b:c"], true).await,
                register(&rig, 2, &["a:b:c"], true).await,
            ];
            assert!(rig.sched.any_free(Purpose::Job, None, &[]).await.unwrap());
            let held = rig.store.insert(&new_job(0, &["a:b:c"])).await.unwrap();
            let free = rig.store.insert(&new_job(0, &["a:b:c"])).await.unwrap();
            // Another executor is dispatching `held`: it holds its row lock.
            let mut other = pool.begin().await.unwrap();
            sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(held)
                .fetch_all(&mut *other)
                .await
                .unwrap();
            let from = rig.mars.store.latest_seq().await.unwrap();
            for batch in rig.sched.round().await.unwrap() {
                batch.await.unwrap();
            }
            let launched: Vec<i64> = rig.launched.lock().unwrap().iter().map(|l| l.0).collect();
            assert_eq!(launched, vec![free]);
            let events = rig.mars.store.events_after(from, 1000).await.unwrap();
            let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
            assert_eq!(
                kinds,
                vec!["lease_acquired", "lease_acquired", "lease_released"],
                "{events:?}"
            );
            assert_eq!(
                events[2].reason,
                "the job left the queue before it was dispatched"
            );
            let leased: Vec<bool> =
                futures::future::join_all(ms.iter().map(|m| rig.client.machine(*m)))
                    .await
                    .into_iter()
                    .map(|m| m.unwrap().lease.is_some())
                    .collect();
            assert_eq!(leased.iter().filter(|l| **l).count(), 1, "{leased:?}");
            // Still held: the next round claims first and takes no lease.
            let from = rig.mars.store.latest_seq().await.unwrap();
            for batch in rig.sched.round().await.unwrap() {
                batch.await.unwrap();
            }
            assert_eq!(
                rig.mars.store.events_after(from, 1000).await.unwrap(),
                vec![]
            );
            assert_eq!(
                rig.store.require(held).await.unwrap().state,
                crate::model::JobState::Queued
            );
            // The other executor lets go: the job is dispatched.
            other.rollback().await.unwrap();
            for batch in rig.sched.round().await.unwrap() {
                batch.await.unwrap();
            }
            let row = rig.store.require(held).await.unwrap();
            assert_eq!(row.state, crate::model::JobState::Dispatched);
            assert_eq!(rig.launched.lock().unwrap().len(), 2);
            rig.shutdown.cancel();
            test_db.cleanup().await;
        }
    }

    #[test]
    fn plan_follows_queue_order_and_tags() {
        let free = vec![
            machine(1, MachineState::Idle, &["gpu:vendor:a"]),
            machine(2, MachineState::Idle, &["gpu:vendor:b"]),
            machine(3, MachineState::Training, &["gpu:vendor:a"]),
        ];
        // Queue order is the store's (priority, FIFO); the plan keeps it.
        let queued = vec![
            job(10, &["gpu:vendor:a"]),
            job(11, &["gpu:vendor:a"]),
            job(12, &["gpu:vendor:b"]),
            job(13, &[]),
        ];
        let plan: Vec<(i64, u8)> = plan_round(&queued, &free)
            .into_iter()
            .map(|(j, m)| (j.id, m.bytes()[5]))
            .collect();
        // 11 finds no free "a" machine (3 is training, not for users' jobs); 13 finds none
        // left.
        assert_eq!(plan, vec![(10, 1), (12, 2)]);
    }

    #[test]
    fn training_jobs_take_training_machines_by_id() {
        let free = vec![
            machine(1, MachineState::Idle, &[]),
            machine(3, MachineState::QuickCheck, &[]),
        ];
        let mut t = job(20, &[]);
        t.purpose = Purpose::Training;
        t.target_id = Some(MachineId::from_bytes([2, 0, 0, 0, 0, 3]));
        let mut wrong = t.clone();
        wrong.id = 21;
        wrong.target_id = Some(MachineId::from_bytes([2, 0, 0, 0, 0, 1]));
        let plan: Vec<i64> = plan_round(&[wrong, t], &free)
            .into_iter()
            .map(|(j, _)| j.id)
            .collect();
        assert_eq!(plan, vec![20], "an IDLE machine is not a training machine");
    }
}
