//! Dispatching a planned batch: lease → record the granted → give back the lost → launch
//! (steps 2–5 of the protocol in [`super`]).

use std::time::Instant;

use dutgate_core::MachineId;
use dutgate_mars::model::{Lease, LeasePurpose, LeaseRequest, ReleaseOutcome};

use super::{Next, Scheduler};
use crate::model::Purpose;
use crate::store::{Dispatch, QueuedJob};

impl Scheduler {
    /// Dispatches `plan` (at most [`super::MAX_BATCH`] jobs): one lease request for all, one
    /// transaction recording the jobs whose lease was granted, the leases of lost records
    /// given back, then the launches. A job's record exists only once its lease does; a
    /// lease outlives no failed record.
    pub(super) async fn dispatch(
        &self,
        plan: &[(QueuedJob, MachineId)],
        round: u64,
    ) -> Result<Next, String> {
        let started = Instant::now();
        let reqs = self.lease_requests(plan);
        let results = match self.inner.mars.acquire_many(&reqs).await {
            Ok(r) => r,
            Err(e) => {
                // The request may have been granted before its answer was lost: the lease
                // ids are ours, give them back (unknown ids are simply not found).
                let ids: Vec<&str> = reqs.iter().filter_map(|r| r.lease_id.as_deref()).collect();
                self.release_ids(&ids, "the lease request failed").await;
                return Err(format!("leases: {e}"));
            }
        };
        self.failpoint("after_lease");
        metrics::histogram!("executor_dispatch_step_seconds", "step" => "lease")
            .record(started.elapsed().as_secs_f64());

        let mut next = Next::Wait;
        let mut refused = Vec::new();
        let mut failure = None;
        let mut granted: Vec<(Dispatch, Lease)> = Vec::new();
        for ((job, machine), result) in plan.iter().zip(results) {
            match result {
                Ok(lease) => granted.push((
                    Dispatch {
                        id: job.id,
                        machine: *machine,
                        lease_id: lease.id.clone(),
                    },
                    lease,
                )),
                // Leased or not in a leasable state behind the cache's back, or gone: the
                // job stays queued (it was never recorded) and the next round plans it on
                // another machine.
                Err(refusal) if refusal.status == 409 || refusal.status == 404 => {
                    tracing::debug!(job_id = job.id, machine_id = %machine, error = %refusal.error, "lease refused");
                    refused.push(*machine);
                    next = Next::Again;
                }
                Err(refusal) => {
                    tracing::warn!(job_id = job.id, machine_id = %machine, status = refusal.status, error = %refusal.error, "lease failed");
                    failure = Some(format!("lease of {machine}: {}", refusal.error));
                }
            }
        }
        self.mark_busy(&refused).await;

        let t_record = Instant::now();
        let items: Vec<Dispatch> = granted.iter().map(|(d, _)| d.clone()).collect();
        let recorded = match self
            .inner
            .store
            .record_dispatches(&items, self.inner.sup.name(), round)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                // Nothing was recorded: the jobs are still queued; give the machines back.
                let ids: Vec<&str> = items.iter().map(|d| d.lease_id.as_str()).collect();
                self.release_ids(&ids, "the dispatch could not be recorded")
                    .await;
                return Err(e.to_string());
            }
        };
        self.failpoint("after_record");
        metrics::histogram!("executor_dispatch_step_seconds", "step" => "record")
            .record(t_record.elapsed().as_secs_f64());

        let mut lost = Vec::new();
        let mut dispatched = Vec::new();
        for ((d, lease), ok) in granted.into_iter().zip(recorded) {
            if ok {
                dispatched.push((d, lease));
            } else {
                // Cancelled, expired or taken by another executor since it was planned: its
                // machine was never touched; give it back untouched.
                lost.push(d.lease_id);
            }
        }
        if !lost.is_empty() {
            let ids: Vec<&str> = lost.iter().map(String::as_str).collect();
            self.release_ids(&ids, "the job left the queue before it was dispatched")
                .await;
            next = Next::Again;
        }
        let machines: Vec<MachineId> = dispatched.iter().map(|(d, _)| d.machine).collect();
        self.mark_busy(&machines).await;

        let elapsed = started.elapsed().as_secs_f64();
        metrics::counter!("executor_dispatch_batches_total").increment(1);
        let mut launches = Vec::new();
        for (d, lease) in &dispatched {
            metrics::histogram!("executor_dispatch_seconds").record(elapsed);
            metrics::counter!("executor_jobs_dispatched_total").increment(1);
            tracing::info!(job_id = d.id, machine_id = %d.machine, lease = %lease.id, round, "dispatched");
            launches.push(self.launch(d.id, d.machine, lease));
        }
        futures::future::join_all(launches).await;
        self.failpoint("after_launch");
        match failure {
            Some(e) => Err(e),
            None => Ok(next),
        }
    }

    /// The lease request for `plan`'s jobs, each with a lease id chosen here.
    fn lease_requests(&self, plan: &[(QueuedJob, MachineId)]) -> Vec<LeaseRequest> {
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

    /// Gives leases back (best effort, concurrently; one that is not found was never granted
    /// or is gone already). A lease left behind expires after its TTL.
    pub(super) async fn release_ids(&self, ids: &[&str], reason: &str) {
        let results = futures::future::join_all(ids.iter().map(|id| {
            self.inner
                .mars
                .release(id, ReleaseOutcome::Ok, Some(reason))
        }))
        .await;
        for (id, r) in ids.iter().zip(results) {
            match r {
                Ok(_) => tracing::info!(lease = id, reason, "lease given back"),
                Err(e)
                    if dutgate_mars::client::is_gone(&e)
                        || e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {}
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "cannot give the lease back; it expires")
                }
            }
        }
    }

    /// Starts the job process of a dispatched job; if it cannot start, the machine is given
    /// back and the job ends in `SetupFail`.
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
        self.release_ids(&[lease.id.as_str()], "the job process could not start")
            .await;
        let _ = store
            .finish(
                id,
                dutgate_core::JobStatus::SetupFail,
                &format!("the job process could not start: {e}"),
            )
            .await;
    }
}
