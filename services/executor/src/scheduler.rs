//! The queue's scheduler: matches queued jobs (priority, then FIFO) to free machines and
//! dispatches them (a mars lease and the job row in one transaction, then the job process).
//!
//! Event-driven: it runs a round when woken — a submission, a machine freed (mars' event
//! stream, followed with a long poll), a job finished — or at the next queued deadline. No
//! polling loop with sleeps on the hot path.
//!
//! Machines come from a cache of mars' records kept current by the same event stream; a stale
//! entry only costs a refused lease (409), after which the next machine is tried.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dutgate_core::{MachineId, Tag};
use dutgate_mars::client::{MarsClient, is_conflict};
use dutgate_mars::model::{LeasePurpose, Machine, MachineState};
use futures::StreamExt;
use tokio::sync::{Notify, RwLock};
use tokio_util::sync::CancellationToken;

use crate::model::Purpose;
use crate::store::{QueuedJob, Store, now_ms};
use crate::supervisor::Supervisor;

/// Jobs looked at per round.
const ROUND_LIMIT: u32 = 2000;
/// Leases taken at the same time within a round.
const DISPATCH_CONCURRENCY: usize = 16;

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
            }),
        }
    }

    pub fn wake(&self) {
        self.inner.wake.notify_one();
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

    async fn machines(&self) -> Result<Vec<Machine>, TargetError> {
        if self.inner.machines.read().await.is_none() {
            self.load_machines().await.map_err(TargetError::Mars)?;
        }
        Ok(self
            .inner
            .machines
            .read()
            .await
            .as_ref()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }

    /// Checks at submission that some machine could ever run a job with this target.
    pub async fn check_target(
        &self,
        id: Option<MachineId>,
        tags: &[String],
    ) -> Result<(), TargetError> {
        let machines = self.machines().await?;
        let usable = |m: &&Machine| m.state != MachineState::Retired;
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
                if machines.iter().filter(usable).any(|m| has_tags(m, tags)) {
                    Ok(())
                } else {
                    Err(TargetError::NoMachineWithTags(tags.to_vec()))
                }
            }
        }
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
                Ok(()) => false,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch round failed");
                    true
                }
            };
            let next_deadline = self.inner.store.next_deadline().await.ok().flatten();
            let sleep_for = match (retry_soon, next_deadline) {
                (true, _) => Some(Duration::from_secs(1)),
                (false, Some(at)) => Some(Duration::from_millis(
                    (at - now_ms()).clamp(0, 3_600_000) as u64 + 1,
                )),
                (false, None) => None,
            };
            let sleep = async {
                match sleep_for {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = notified => {}
                _ = sleep => {}
            }
        }
    }

    async fn round(&self) -> Result<(), String> {
        let round = self
            .inner
            .rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let store = &self.inner.store;
        for id in store
            .expired_queued(now_ms())
            .await
            .map_err(|e| e.to_string())?
        {
            let _ = store
                .finish(
                    id,
                    dutgate_core::JobStatus::Incomplete,
                    "deadline expired while queued",
                )
                .await;
        }
        let machines = self.machines().await.map_err(|e| e.to_string())?;
        let free: Vec<Machine> = machines
            .into_iter()
            .filter(|m| m.lease.is_none() && m.state != MachineState::Running)
            .collect();
        if free.is_empty() {
            return Ok(());
        }
        // Read the head of the queue first (a few jobs per free machine), and the whole
        // window only when free IDLE machines are left over: in steady state a round reads a
        // few dozen rows, not thousands.
        let idle = free
            .iter()
            .filter(|m| m.state == MachineState::Idle)
            .count();
        let mut limit = u32::try_from(free.len().saturating_mul(4))
            .unwrap_or(ROUND_LIMIT)
            .clamp(64, ROUND_LIMIT);
        let plan = loop {
            let queued = store.queued(limit).await.map_err(|e| e.to_string())?;
            let plan = plan_round(&queued, &free);
            let planned_idle = plan
                .iter()
                .filter(|(_, m)| {
                    free.iter()
                        .any(|f| f.id == *m && f.state == MachineState::Idle)
                })
                .count();
            if planned_idle == idle || (queued.len() as u32) < limit || limit >= ROUND_LIMIT {
                break plan;
            }
            limit = ROUND_LIMIT;
        };
        let results: Vec<Result<Dispatch, String>> = futures::stream::iter(plan)
            .map(|(job, m)| {
                let me = self.clone();
                async move { me.dispatch(&job, m, round).await }
            })
            .buffer_unordered(DISPATCH_CONCURRENCY)
            .collect()
            .await;
        let mut busy = false;
        for r in results {
            match r? {
                Dispatch::MachineBusy => busy = true,
                Dispatch::Done | Dispatch::JobGone => {}
            }
        }
        if busy {
            // Some machine was taken behind the cache's back: plan again with what is left.
            self.wake();
        }
        Ok(())
    }

    async fn dispatch(
        &self,
        job: &QueuedJob,
        machine: MachineId,
        round: u64,
    ) -> Result<Dispatch, String> {
        let started = Instant::now();
        let store = &self.inner.store;
        let Some(mut claim) = store.claim(job.id).await.map_err(|e| e.to_string())? else {
            return Ok(Dispatch::JobGone);
        };
        claim.round = round;
        let purpose = match job.purpose {
            Purpose::Job => LeasePurpose::Job,
            Purpose::Training => LeasePurpose::Training,
        };
        let lease = match self
            .inner
            .mars
            .acquire(
                machine,
                &job.id.to_string(),
                &self.inner.holder,
                purpose,
                self.inner.lease_ttl,
            )
            .await
        {
            Ok(l) => l,
            Err(e) => {
                let _ = store.abandon_dispatch(claim).await;
                if is_conflict(&e) || e.status() == Some(reqwest::StatusCode::NOT_FOUND) {
                    self.mark_busy(machine).await;
                    return Ok(Dispatch::MachineBusy);
                }
                return Err(format!("lease of {machine}: {e}"));
            }
        };
        self.mark_busy(machine).await;
        let done = store
            .complete_dispatch(claim, machine, &lease.id, self.inner.sup.name())
            .await
            .map_err(|e| e.to_string())?;
        if !done {
            // Cancelled meanwhile: give the machine back untouched.
            let _ = self
                .inner
                .mars
                .release(
                    &lease.id,
                    dutgate_mars::model::ReleaseOutcome::Ok,
                    Some("job cancelled before it started"),
                )
                .await;
            return Ok(Dispatch::JobGone);
        }
        metrics::histogram!("executor_dispatch_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("executor_jobs_dispatched_total").increment(1);
        tracing::info!(job_id = job.id, machine_id = %machine, lease = %lease.id, "dispatched");
        if let Err(e) = self
            .inner
            .sup
            .launch(job.id, machine, &lease.id, lease.ttl_seconds)
            .await
        {
            tracing::error!(job_id = job.id, error = %e, "cannot start the job process");
            let _ = store
                .add_event(
                    job.id,
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
                    dutgate_mars::model::ReleaseOutcome::Ok,
                    Some("the job process could not start"),
                )
                .await;
            let _ = store
                .finish(
                    job.id,
                    dutgate_core::JobStatus::SetupFail,
                    &format!("the job process could not start: {e}"),
                )
                .await;
        }
        Ok(Dispatch::Done)
    }

    async fn mark_busy(&self, id: MachineId) {
        let mut guard = self.inner.machines.write().await;
        if let Some(m) = guard.as_mut().and_then(|map| map.get_mut(&id)) {
            m.state = MachineState::Running;
        }
    }
}

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

enum Dispatch {
    Done,
    MachineBusy,
    JobGone,
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
