//! Recovery of the dispatch protocol at the start of a run: leases that a previous run of this
//! executor took (step 2) but never recorded (step 3), because it stopped in between.
//!
//! Nothing of such a lease's job ever ran — the job is still queued, or finished or
//! dispatched under another lease — so its machine was never touched: the lease is given back
//! as it is, and the machine is free at once. Left alone it would expire, which counts an
//! infrastructure failure against the machine and sends it to `QUICK_CHECK`.
//!
//! A lease is a previous run's when its holder is `<this executor's name>/<pid>` with another
//! pid than this process's, and no live process has that pid any more: a run that is still
//! stopping (it may yet record the lease) keeps its leases.

use super::Scheduler;

impl Scheduler {
    /// Gives back the leases previous runs of this executor took and never recorded. Fails
    /// only when mars or the store cannot be asked (the next round tries again).
    pub(super) async fn give_back_unrecorded_leases(&self) -> Result<(), String> {
        let leases = self
            .inner
            .mars
            .leases()
            .await
            .map_err(|e| format!("leases: {e}"))?;
        let prefix = format!("{}/", self.inner.sup.name());
        let mut unrecorded = Vec::new();
        for lease in leases {
            let Some(pid) = lease.holder.strip_prefix(&prefix) else {
                continue;
            };
            if lease.holder == self.inner.holder || process_alive(pid) {
                continue;
            }
            // Not a job id of this executor's: not ours to judge.
            let Ok(job) = lease.job_id.parse::<i64>() else {
                continue;
            };
            let row = self.inner.store.get(job).await.map_err(|e| e.to_string())?;
            if row.is_some_and(|r| r.lease_id.as_deref() != Some(lease.id.as_str())) {
                tracing::warn!(job_id = job, lease = %lease.id, holder = %lease.holder, machine_id = %lease.machine_id, "a previous run stopped between the lease and its record: giving the lease back");
                unrecorded.push(lease.id);
            }
        }
        if !unrecorded.is_empty() {
            let ids: Vec<&str> = unrecorded.iter().map(String::as_str).collect();
            self.release_ids(
                &ids,
                "the executor stopped before recording this dispatch; the machine was never touched",
            )
            .await;
        }
        Ok(())
    }
}

/// Whether `pid` (as a holder names it) is a live process of this host. Unparsable: taken as
/// alive, so that the lease is left to expire rather than given back wrongly.
fn process_alive(pid: &str) -> bool {
    let Ok(pid) = pid.parse::<u32>() else {
        return true;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) state …`: a zombie has stopped for good.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
