//! Leases: a job (or the trainer) holds a machine; the holder heartbeats and releases;
//! a lease whose holder went silent expires.

use super::*;
use crate::model::{Lease, LeasePurpose, LeaseRequest, MachineState, ReleaseOutcome, Timestamp};
use crate::state::Trigger;
use crate::store::{Cause, Decision, MachineRow, StoreError};

impl Mars {
    /// Checks a lease request and makes its lease (not yet stored).
    fn new_lease(&self, req: &LeaseRequest) -> Result<Lease, MarsError> {
        for (field, v) in [("job_id", &req.job_id), ("holder", &req.holder)] {
            if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                return Err(invalid(field, "must be 1 to 256 printable characters").into());
            }
        }
        let ttl = req
            .ttl_seconds
            .unwrap_or(self.config.lease_ttl_seconds)
            .clamp(1, 3600);
        let id = match &req.lease_id {
            Some(id) if crate::model::is_lease_id(id) => id.clone(),
            Some(_) => {
                return Err(invalid(
                    "lease_id",
                    "must be 32 lowercase hex digits (or left out: mars picks one)",
                )
                .into());
            }
            None => crate::model::new_lease_id(),
        };
        let now = Timestamp::now();
        Ok(Lease {
            id,
            machine_id: req.machine_id,
            job_id: req.job_id.clone(),
            holder: req.holder.clone(),
            purpose: req.purpose,
            acquired_at: now,
            expires_at: now.plus_ms(ttl as i64 * 1000),
            ttl_seconds: ttl,
        })
    }

    pub async fn acquire(&self, req: LeaseRequest) -> Result<Lease, MarsError> {
        let lease = self.new_lease(&req)?;
        let purpose = req.purpose;
        let decide = move |cur: &MachineRow| lease_decision(purpose, cur);
        let l2 = lease.clone();
        let edit = move |row: &mut MachineRow| row.lease = Some(l2.clone());
        self.store
            .apply_with(req.machine_id, &lease_cause(&req), &decide, &edit)
            .await?;
        metrics::counter!("mars_leases_acquired_total", "purpose" => purpose.as_str()).increment(1);
        tracing::info!(machine = %req.machine_id, job = %req.job_id, lease = %lease.id, "lease acquired");
        Ok(lease)
    }

    /// Many lease requests, one result per request in order: each is granted or refused
    /// exactly as [`Mars::acquire`] would, on its own (one request's failure, even of the
    /// store, takes nothing from the others).
    pub async fn acquire_many(&self, reqs: &[LeaseRequest]) -> Vec<Result<Lease, MarsError>> {
        let mut out = Vec::with_capacity(reqs.len());
        for req in reqs {
            out.push(self.acquire(req.clone()).await);
        }
        out
    }

    /// Extends a lease by its TTL from now. A lease past its expiry time whose expiry no
    /// sweeper has claimed yet is still the holder's, as for [`Mars::release`]: nothing has
    /// touched its machine, and the claim (a compare-and-set on the expiry time) fails once
    /// the heartbeat moved it. That is what lets holders back in after mars was away: their
    /// first heartbeat may come before the sweeper's restart grace.
    pub async fn heartbeat(&self, lease_id: &str) -> Result<Lease, MarsError> {
        let row = self.store.machine_by_lease(lease_id).await?;
        let now = Timestamp::now();
        let lease = row
            .lease
            .clone()
            .ok_or_else(|| StoreError::LeaseGone(lease_id.into()))?;
        if lease.expires_at.millis() < 0 {
            // Claimed: the machine is being powered off.
            return Err(StoreError::LeaseGone(lease_id.into()).into());
        }
        let expires = now.plus_ms(lease.ttl_seconds as i64 * 1000);
        if !self.store.extend_lease(lease_id, expires).await? {
            return Err(StoreError::LeaseGone(lease_id.into()).into());
        }
        Ok(Lease {
            expires_at: expires,
            ..lease
        })
    }

    pub async fn release(
        &self,
        lease_id: &str,
        outcome: ReleaseOutcome,
        reason: Option<String>,
    ) -> Result<MachineRow, MarsError> {
        let row = self.store.machine_by_lease(lease_id).await?;
        let job = row
            .lease
            .as_ref()
            .map(|l| l.job_id.clone())
            .unwrap_or_default();
        let threshold = i64::from(self.config.quarantine_after_infra_failures.max(1));
        let lid = lease_id.to_string();
        let decide = move |cur: &MachineRow| {
            // A claimed expiry (negative) is being powered off by a sweeper: too late.
            let Some(l) = cur
                .lease
                .as_ref()
                .filter(|l| l.id == lid && l.expires_at.millis() >= 0)
            else {
                return Decision::Refuse(StoreError::LeaseGone(lid.clone()));
            };
            if l.purpose == LeasePurpose::Training {
                return Decision::Record("lease_released");
            }
            match cur.state {
                MachineState::Running
                    if outcome == ReleaseOutcome::InfrastructureFailure
                        && cur.consecutive_infra_failures + 1 >= threshold =>
                {
                    Decision::Apply(Trigger::Quarantine)
                }
                MachineState::Running | MachineState::Retired => {
                    Decision::Apply(Trigger::LeaseReleased(outcome))
                }
                _ => Decision::Record("lease_released"),
            }
        };
        let retry_at = self.quarantine_retry_at();
        let edit = move |r: &mut MachineRow| {
            let was_job = r
                .lease
                .as_ref()
                .is_some_and(|l| l.purpose == LeasePurpose::Job);
            r.lease = None;
            if was_job {
                match outcome {
                    ReleaseOutcome::Ok => r.consecutive_infra_failures = 0,
                    ReleaseOutcome::InfrastructureFailure => r.consecutive_infra_failures += 1,
                    ReleaseOutcome::MachineUnfit => {}
                }
            }
            if r.state == MachineState::Quarantined {
                r.training_next_at = retry_at;
            }
        };
        let reason = reason.unwrap_or_else(|| format!("job ended: {}", outcome.as_str()));
        let cause = Cause::new("executor", reason).with_job(job.clone());
        let row = self
            .store
            .apply_with(row.id, &cause, &decide, &edit)
            .await?;
        metrics::counter!("mars_leases_released_total", "outcome" => outcome.as_str()).increment(1);
        tracing::info!(machine = %row.id, job = %job, outcome = outcome.as_str(), state = %row.state, "lease released");
        if row.state == MachineState::Retired {
            self.power_off(&row).await;
        }
        Ok(row)
    }

    /// Frees the machines whose holder stopped heartbeating and records an infrastructure
    /// failure for each. Returns how many expired.
    ///
    /// Each expiry is claimed first ([`crate::store::Store::claim_expiry`]: from then on no
    /// heartbeat or release can revive or free the lease), then the machine is powered off,
    /// and only once its PDU reads OFF is the lease removed: a machine is never free while the
    /// dead holder's code may still run on it. A power-off that fails keeps the claim; this
    /// process retries it on its next sweep, any process after `STALE_CLAIM_MS`.
    pub async fn expire_leases(&self) -> Result<usize, StoreError> {
        let now = Timestamp::now();
        let mut n = 0;
        for row in self.store.expired_leases(now).await? {
            let Some(lease) = row.lease.clone() else {
                continue;
            };
            let seen = lease.expires_at.millis();
            let ours = self.retry_claim(&lease.id, seen);
            // `seen` < 0: claimed at -seen.
            if seen < 0 && !ours && now.millis().saturating_add(seen) < STALE_CLAIM_MS {
                continue;
            }
            let claim = if -now.millis() == seen {
                seen - 1
            } else {
                -now.millis()
            };
            if !self.store.claim_expiry(&lease.id, seen, claim).await? {
                continue;
            }
            if let Err(e) = self.power_off_for_expiry(&row).await {
                tracing::warn!(machine = %row.id, job = %lease.job_id, lease = %lease.id, error = %e, "lease expired but the machine cannot be powered off: it stays leased, retrying");
                self.remember_claim(&lease.id, claim);
                continue;
            }
            if self.free_expired(&row, &lease, claim).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Whether `claim` on `lease_id` is this process's claim whose power-off failed (and
    /// forgets it: the caller claims again).
    fn retry_claim(&self, lease_id: &str, claim: i64) -> bool {
        let mut failed = self.failed_claims.lock().unwrap_or_else(|p| p.into_inner());
        failed.remove(&(lease_id.to_string(), claim))
    }

    fn remember_claim(&self, lease_id: &str, claim: i64) {
        let mut failed = self.failed_claims.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded by the number of leases (one claim per lease at a time).
        failed.retain(|(l, _)| l != lease_id);
        failed.insert((lease_id.to_string(), claim));
    }

    /// Powers the machine of an expired lease off and checks the read-back.
    async fn power_off_for_expiry(&self, row: &MachineRow) -> Result<(), String> {
        let (Some(pdu), Some(port)) = (&row.pdu, &row.pdu_port_id) else {
            // No port (unconfigured by an admin while leased): mars cannot power it at all.
            tracing::warn!(machine = %row.id, "expired lease on a machine without a PDU port: nothing to power off");
            return Ok(());
        };
        match self.power.set(pdu, port, PowerState::Off).await {
            Ok(PowerState::Off) => {
                tracing::info!(machine = %row.id, pdu, port, "powered off: its lease expired");
                Ok(())
            }
            Ok(s) => Err(format!("PDU {pdu} port {port} reads {s} after power-off")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Removes the claimed lease (the machine is off) with the infrastructure failure it
    /// means. False when the claim is no longer `claim` (another sweeper took it over).
    async fn free_expired(
        &self,
        row: &MachineRow,
        lease: &Lease,
        claim: i64,
    ) -> Result<bool, StoreError> {
        let threshold = i64::from(self.config.quarantine_after_infra_failures.max(1));
        let lid = lease.id.clone();
        let decide = move |cur: &MachineRow| {
            let Some(l) = cur
                .lease
                .as_ref()
                .filter(|l| l.id == lid && l.expires_at.millis() == claim)
            else {
                return Decision::Refuse(StoreError::LeaseGone(lid.clone()));
            };
            if l.purpose == LeasePurpose::Training {
                return Decision::Record("lease_expired");
            }
            match cur.state {
                MachineState::Running if cur.consecutive_infra_failures + 1 >= threshold => {
                    Decision::Apply(Trigger::Quarantine)
                }
                MachineState::Running | MachineState::Retired => {
                    Decision::Apply(Trigger::LeaseExpired)
                }
                _ => Decision::Record("lease_expired"),
            }
        };
        let retry_at = self.quarantine_retry_at();
        let edit = move |r: &mut MachineRow| {
            if r.lease
                .as_ref()
                .is_some_and(|l| l.purpose == LeasePurpose::Job)
            {
                r.consecutive_infra_failures += 1;
            }
            r.lease = None;
            if r.state == MachineState::Quarantined {
                r.training_next_at = retry_at;
            }
        };
        let cause = Cause::new(
            "mars",
            format!(
                "infrastructure failure: lease of job {} expired (no heartbeat from {}); machine powered off",
                lease.job_id, lease.holder,
            ),
        )
        .with_job(lease.job_id.clone());
        match self.store.apply_with(row.id, &cause, &decide, &edit).await {
            Ok(r) => {
                metrics::counter!("mars_leases_expired_total").increment(1);
                tracing::warn!(machine = %r.id, job = %lease.job_id, state = %r.state, "lease expired");
                Ok(true)
            }
            Err(StoreError::LeaseGone(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// After this long a claimed expiry whose power-off did not complete may be claimed again by
/// any sweeper: longer than a power request may take (the pdu client's 60 s timeout), so that
/// a power-off still in flight never lands after the machine was freed and leased again.
const STALE_CLAIM_MS: i64 = 90_000;

/// Whether a lease for `purpose` may be taken on the machine as it is now.
fn lease_decision(purpose: LeasePurpose, cur: &MachineRow) -> Decision {
    if let Some(l) = &cur.lease {
        return Decision::Refuse(StoreError::Conflict(format!(
            "machine {} is leased by job {}",
            cur.id, l.job_id
        )));
    }
    match (purpose, cur.state) {
        (LeasePurpose::Job, MachineState::Idle) => Decision::Apply(Trigger::LeaseAcquired),
        (LeasePurpose::Training, MachineState::Training | MachineState::QuickCheck) => {
            Decision::Record("lease_acquired")
        }
        (LeasePurpose::Job, s) => Decision::Refuse(StoreError::Conflict(format!(
            "machine {} is {s}, not IDLE",
            cur.id
        ))),
        (LeasePurpose::Training, s) => Decision::Refuse(StoreError::Conflict(format!(
            "machine {} is {s}, not TRAINING or QUICK_CHECK",
            cur.id
        ))),
    }
}

fn lease_cause(req: &LeaseRequest) -> Cause {
    Cause::new(
        format!("executor:{}", req.holder),
        format!("{} lease for job {}", req.purpose.as_str(), req.job_id),
    )
    .with_job(req.job_id.clone())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dutgate_core::db::Db;

    use super::*;
    use crate::power::MemoryPower;
    use crate::store::{Store, new_row};

    /// A mars without its sweeper (this test sweeps) and one machine leased by a job.
    async fn leased(dir: &std::path::Path) -> (Mars, Lease) {
        let db = Db::open_sqlite(&dir.join("mars.db"), crate::store::MIGRATIONS)
            .await
            .unwrap();
        let mars = Mars::new(
            Store::new(db, "farm"),
            crate::Config::default(),
            Arc::new(MemoryPower::default()),
        );
        let id = MachineId::from_bytes([0x52, 0x54, 0, 0, 0, 1]);
        let row = new_row(id, "dut", vec![], "10.0.0.1".parse().unwrap(), None, 0.0);
        let cause = Cause::new("test", "admitted");
        mars.store.insert_new(row, &cause).await.unwrap();
        mars.patch(
            id,
            crate::model::MachinePatch {
                pdu: Some(Some("pdu1".into())),
                pdu_port_id: Some(Some("1".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        mars.store
            .trigger(id, Trigger::TrainingPassed, &cause, &|_| {})
            .await
            .unwrap();
        let lease = mars
            .acquire(LeaseRequest {
                machine_id: id,
                job_id: "7".into(),
                holder: "test".into(),
                purpose: LeasePurpose::Job,
                ttl_seconds: None,
                lease_id: None,
            })
            .await
            .unwrap();
        (mars, lease)
    }

    /// A lease past its expiry time that no sweeper claimed yet (mars was away, say) is still
    /// its holder's: a heartbeat extends it, and a sweeper that read the old expiry time then
    /// fails to claim it. Once claimed, it is gone for heartbeats.
    #[tokio::test]
    async fn a_heartbeat_keeps_a_lapsed_lease_until_its_expiry_is_claimed() {
        let dir = tempfile::tempdir().unwrap();
        let (mars, lease) = leased(dir.path()).await;
        let lapsed = Timestamp::now().plus_ms(-1);
        assert!(mars.store.extend_lease(&lease.id, lapsed).await.unwrap());
        let seen = mars.store.expired_leases(Timestamp::now()).await.unwrap();
        assert_eq!(seen.len(), 1);

        let renewed = mars.heartbeat(&lease.id).await.unwrap();
        assert!(renewed.expires_at > Timestamp::now(), "{renewed:?}");
        // The sweeper's claim on what it read before the heartbeat loses.
        assert!(
            !mars
                .store
                .claim_expiry(&lease.id, lapsed.millis(), -Timestamp::now().millis())
                .await
                .unwrap()
        );
        assert_eq!(mars.expire_leases().await.unwrap(), 0);
        assert!(mars.store.machine_by_lease(&lease.id).await.is_ok());

        // Lapsed again and claimed: the machine is being powered off; no heartbeat revives it.
        let lapsed = Timestamp::now().plus_ms(-1);
        assert!(mars.store.extend_lease(&lease.id, lapsed).await.unwrap());
        let claim = -Timestamp::now().millis();
        assert!(
            mars.store
                .claim_expiry(&lease.id, lapsed.millis(), claim)
                .await
                .unwrap()
        );
        let e = mars.heartbeat(&lease.id).await.unwrap_err();
        assert!(
            matches!(e, MarsError::Store(StoreError::LeaseGone(_))),
            "{e:?}"
        );
        assert!(
            !mars
                .store
                .extend_lease(&lease.id, Timestamp::now())
                .await
                .unwrap()
        );
    }
}
