//! The operations of mars on machines: registration, admin changes, retire/activate, leases
//! and discovery. HTTP handlers ([`crate::api`]) and the trainer call these; these call the
//! store (persisted state machine) and the PDU.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use dutgate_core::{MachineId, PowerState, Tag};

use crate::Config;
use crate::model::{
    Discovery, Lease, LeasePurpose, LeaseRequest, MachinePatch, MachineState, Registration,
    ReleaseOutcome, RetireRequest, Timestamp, TrainingSummary,
};
use crate::power::Power;
use crate::state::Trigger;
use crate::store::{BatchOp, Cause, Decision, MachineRow, Store, StoreError, new_row};
use crate::training::JobRunner;

/// A request that is wrong on its face: 400 naming the field.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        field,
        message: message.into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MarsError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Conflict(String),
    #[error("PDU: {0}")]
    Power(#[from] crate::power::PowerError),
}

/// Everything the handlers and the trainer share.
#[derive(Clone)]
pub struct Mars {
    pub store: Store,
    pub config: Arc<Config>,
    pub power: Arc<dyn Power>,
    /// Set when the trainer is wired; used to cancel a job when retiring with `cancel_job`.
    pub runner: Option<Arc<dyn JobRunner>>,
}

/// Names an admin or a DUT may give: 1–64 of `[A-Za-z0-9._-]`.
fn check_name(field: &'static str, s: &str) -> Result<(), Invalid> {
    if s.is_empty() || s.len() > 64 {
        return Err(invalid(field, "must be 1 to 64 characters long"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            field,
            format!("{s:?} may only contain letters, digits, '.', '_' and '-'"),
        ));
    }
    Ok(())
}

/// `ttyUSB0` or `/dev/ttyUSB0` → `ttyUSB0`; by-path names keep their directory.
fn normalise_tty(s: &str) -> Result<String, Invalid> {
    let t = s.strip_prefix("/dev/").unwrap_or(s);
    let ok = !t.is_empty()
        && t.len() <= 128
        && !t.contains("..")
        && !t.starts_with('/')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':'));
    if ok {
        Ok(t.to_string())
    } else {
        Err(invalid(
            "local_tty_device",
            format!("{s:?} is not a serial device name like ttyUSB0"),
        ))
    }
}

fn check_mac(id: MachineId) -> Result<(), Invalid> {
    let b = id.bytes();
    if b == [0; 6] || b == [0xff; 6] {
        return Err(invalid("mac_address", format!("{id} is not a NIC address")));
    }
    if b[0] & 1 == 1 {
        return Err(invalid(
            "mac_address",
            format!("{id} is a multicast address, not a NIC address"),
        ));
    }
    Ok(())
}

fn check_ip(ip: IpAddr) -> Result<(), Invalid> {
    let bad = match ip {
        IpAddr::V4(v4) => v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    };
    if bad {
        return Err(invalid(
            "ip_address",
            format!("{ip} is not a unicast host address"),
        ));
    }
    Ok(())
}

fn check_tags(field: &'static str, tags: &[Tag], max: usize) -> Result<(), Invalid> {
    if tags.len() > max {
        return Err(invalid(
            field,
            format!("{} tags, at most {max} are accepted", tags.len()),
        ));
    }
    Ok(())
}

fn dedup(tags: Vec<Tag>) -> Vec<Tag> {
    let set: BTreeSet<Tag> = tags.into_iter().collect();
    set.into_iter().collect()
}

impl Mars {
    pub fn new(store: Store, config: Config, power: Arc<dyn Power>) -> Self {
        Self {
            store,
            config: Arc::new(config),
            power,
            runner: None,
        }
    }

    /// The wire view of a row, with its training summary.
    pub fn view(
        &self,
        row: &MachineRow,
        latest: Option<&crate::model::TrainingRun>,
    ) -> crate::model::Machine {
        let t = &self.config.training;
        let mut s = TrainingSummary {
            is_active: false,
            is_registered: false,
            boot_loop_counts: t.boot_loops,
            qualifying_rate: t.qualifying,
            current_loop_count: 0,
            statuses: Vec::new(),
            consecutive_failures: row.training_failures.max(0) as u32,
            next_attempt_at: row.training_next_at,
            trained_at: row.trained_at,
        };
        if let Some(run) = latest {
            s.is_active = run.outcome == crate::model::RunOutcome::Running;
            s.is_registered = run
                .loops
                .iter()
                .any(|l| l.job_kind == "registration" && l.passed());
            let checks: Vec<_> = run
                .loops
                .iter()
                .filter(|l| l.job_kind != "registration")
                .collect();
            s.current_loop_count = checks.len() as u32;
            s.statuses = checks.iter().map(|l| l.status).collect();
        }
        row.to_machine(s)
    }

    // ---- registration --------------------------------------------------------------------

    /// The discovery in progress, if it has not expired.
    pub async fn active_discovery(&self) -> Result<Option<Discovery>, StoreError> {
        Ok(self
            .store
            .discovery()
            .await?
            .filter(|d| d.expires_at > Timestamp::now()))
    }

    /// `POST /api/v1/machine/`: creates (`WAIT_FOR_CONFIG`, or `TRAINING` when a discovery
    /// binds it) or updates the machine. A second registration never duplicates.
    pub async fn register(&self, reg: Registration) -> Result<MachineRow, MarsError> {
        check_name("base_name", &reg.base_name)?;
        check_mac(reg.mac_address)?;
        check_ip(reg.ip_address)?;
        check_tags("tags", &reg.tags, self.config.max_tags)?;
        let tty = reg
            .local_tty_device
            .as_deref()
            .map(normalise_tty)
            .transpose()?;
        let tags = dedup(reg.tags);
        let id = reg.mac_address;
        let cause = Cause::new(
            "registration",
            format!("registered from {} as {}", reg.ip_address, reg.base_name),
        );

        let existing = self.store.find(id).await?;
        let needs_port = existing.as_ref().is_none_or(|m| !m.configured());
        let claimed = if needs_port {
            match self.active_discovery().await? {
                Some(d) if self.store.remove_discovery(&d).await? => Some(d),
                _ => None,
            }
        } else {
            None
        };
        if let Some(d) = &claimed {
            tracing::info!(machine = %id, pdu = %d.pdu, port = %d.port_id, "discovery bound the registering machine");
            metrics::counter!("mars_discoveries_total", "outcome" => "bound").increment(1);
        }

        if existing.is_none() {
            let row = new_row(
                id,
                &reg.base_name,
                tags.clone(),
                reg.ip_address,
                tty.clone(),
                self.config.pdu_off_delay,
            );
            if let Some(row) = self.store.insert_new(row, claimed.as_ref(), &cause).await? {
                metrics::counter!("mars_registrations_total", "kind" => "new").increment(1);
                return Ok(row);
            }
        }

        metrics::counter!("mars_registrations_total", "kind" => "update").increment(1);
        let new_tags: BTreeSet<Tag> = tags.iter().cloned().collect();
        let claimed_for_edit = claimed.clone();
        let decide = move |cur: &MachineRow| {
            let old: BTreeSet<Tag> = cur.tags.iter().cloned().collect();
            if cur.state == MachineState::WaitForConfig && claimed.is_some() {
                Decision::Apply(Trigger::Configure)
            } else if old != new_tags
                && matches!(cur.state, MachineState::Idle | MachineState::QuickCheck)
            {
                Decision::Apply(Trigger::HardwareChanged)
            } else {
                Decision::Record("registered")
            }
        };
        let base = reg.base_name.clone();
        let ip = reg.ip_address;
        let edit = move |row: &mut MachineRow| {
            row.base_name = base.clone();
            row.tags = tags.clone();
            row.ip_address = Some(ip);
            if let Some(t) = &tty {
                row.local_tty_device = Some(t.clone());
            }
            row.last_seen = Timestamp::now();
            if let Some(d) = &claimed_for_edit
                && !row.configured()
            {
                row.pdu = Some(d.pdu.clone());
                row.pdu_port_id = Some(d.port_id.clone());
            }
        };
        Ok(self.store.apply_with(id, &cause, &decide, &edit).await?)
    }

    // ---- admin ---------------------------------------------------------------------------

    pub async fn patch(&self, id: MachineId, patch: MachinePatch) -> Result<MachineRow, MarsError> {
        if let Some(Some(p)) = &patch.pdu {
            check_name("pdu", p)?;
        }
        if let Some(Some(p)) = &patch.pdu_port_id
            && (p.is_empty() || p.len() > 64 || p.chars().any(char::is_control))
        {
            return Err(invalid("pdu_port_id", "must be 1 to 64 printable characters").into());
        }
        if let Some(d) = patch.pdu_off_delay
            && !(0.0..=3600.0).contains(&d)
        {
            return Err(invalid("pdu_off_delay", "must be between 0 and 3600 seconds").into());
        }
        if let Some(t) = &patch.manual_tags {
            check_tags("manual_tags", t, self.config.max_tags)?;
        }
        if let Some(Some(c)) = &patch.comment
            && c.len() > 4096
        {
            return Err(invalid("comment", "at most 4096 bytes").into());
        }
        let tty = match &patch.local_tty_device {
            Some(Some(t)) => Some(Some(normalise_tty(t)?)),
            Some(None) => Some(None),
            None => None,
        };
        let apply_fields = move |row: &mut MachineRow| {
            if let Some(p) = &patch.pdu {
                row.pdu = p.clone();
            }
            if let Some(p) = &patch.pdu_port_id {
                row.pdu_port_id = p.clone();
            }
            if let Some(d) = patch.pdu_off_delay {
                row.pdu_off_delay = d;
            }
            if let Some(t) = &patch.manual_tags {
                row.manual_tags = dedup(t.clone());
            }
            if let Some(c) = &patch.comment {
                row.comment = c.clone();
            }
            if let Some(t) = &tty {
                row.local_tty_device = t.clone();
            }
        };
        let probe = apply_fields.clone();
        let decide = move |cur: &MachineRow| {
            let mut next = cur.clone();
            probe(&mut next);
            match (cur.configured(), next.configured(), cur.state) {
                (false, true, MachineState::WaitForConfig) => Decision::Apply(Trigger::Configure),
                (true, false, s)
                    if s != MachineState::Retired && s != MachineState::WaitForConfig =>
                {
                    Decision::Apply(Trigger::Unconfigure)
                }
                _ => Decision::Record("patched"),
            }
        };
        let cause = Cause::new("admin", "machine record edited");
        Ok(self
            .store
            .apply_with(id, &cause, &decide, &apply_fields)
            .await?)
    }

    /// Takes the machine out of service. Training stops (the trainer sees the state change);
    /// a running job is cancelled with `cancel_job`, else it finishes and the machine stays
    /// retired. A machine nobody holds is powered off now.
    pub async fn retire(&self, id: MachineId, req: RetireRequest) -> Result<MachineRow, MarsError> {
        let reason = req.reason.unwrap_or_else(|| "retired by an admin".into());
        let row = self
            .store
            .trigger(id, Trigger::Retire, &Cause::new("admin", reason), &|_| {})
            .await?;
        match &row.lease {
            Some(l) if l.purpose == LeasePurpose::Job && req.cancel_job => match &self.runner {
                Some(r) => {
                    if let Err(e) = r.cancel(&l.job_id).await {
                        tracing::warn!(machine = %id, job = %l.job_id, error = %e, "cannot cancel the running job");
                    }
                }
                None => {
                    tracing::warn!(machine = %id, job = %l.job_id, "no job runner wired: the running job cannot be cancelled from mars; it keeps the machine until it ends")
                }
            },
            Some(_) => {}
            None => self.power_off(&row).await,
        }
        Ok(row)
    }

    pub async fn activate(
        &self,
        id: MachineId,
        reason: Option<String>,
    ) -> Result<MachineRow, MarsError> {
        let reason = reason.unwrap_or_else(|| "activated by an admin".into());
        let decide = |cur: &MachineRow| {
            Decision::Apply(Trigger::Activate {
                configured: cur.configured(),
                trained: cur.trained_at.is_some(),
            })
        };
        let edit = |row: &mut MachineRow| {
            row.training_failures = 0;
            row.training_next_at = None;
            row.consecutive_infra_failures = 0;
        };
        Ok(self
            .store
            .apply_with(id, &Cause::new("admin", reason), &decide, &edit)
            .await?)
    }

    /// When a machine quarantined now gets retrained by itself (None: only by an admin).
    fn quarantine_retry_at(&self) -> Option<Timestamp> {
        let h = self.config.training.quarantine_retry_hours;
        (h > 0.0).then(|| Timestamp::now().plus_ms((h * 3_600_000.0) as i64))
    }

    /// Best effort: a retired machine with no lease is switched off.
    pub async fn power_off(&self, row: &MachineRow) {
        if let (Some(pdu), Some(port)) = (&row.pdu, &row.pdu_port_id) {
            match self.power.set(pdu, port, PowerState::Off).await {
                Ok(s) => tracing::info!(machine = %row.id, pdu, port, state = %s, "powered off"),
                Err(e) => {
                    tracing::warn!(machine = %row.id, pdu, port, error = %e, "cannot power off")
                }
            }
        }
    }

    // ---- leases --------------------------------------------------------------------------

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

    /// Many leases in one store transaction ([`Store::apply_many`]), one result per request
    /// in order: each is granted or refused exactly as [`Mars::acquire`] would. `Err` only
    /// when the store failed, and then no lease of the batch was taken.
    pub async fn acquire_many(
        &self,
        reqs: &[LeaseRequest],
    ) -> Result<Vec<Result<Lease, MarsError>>, MarsError> {
        let mut out: Vec<Option<Result<Lease, MarsError>>> = Vec::with_capacity(reqs.len());
        let mut leases = Vec::new();
        for req in reqs {
            match self.new_lease(req) {
                Ok(l) => {
                    leases.push((out.len(), req, l));
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let decides: Vec<_> = leases
            .iter()
            .map(|(_, req, _)| {
                let purpose = req.purpose;
                move |cur: &MachineRow| lease_decision(purpose, cur)
            })
            .collect();
        let edits: Vec<_> = leases
            .iter()
            .map(|(_, _, l)| {
                let l = l.clone();
                move |row: &mut MachineRow| row.lease = Some(l.clone())
            })
            .collect();
        let ops: Vec<BatchOp<'_>> = leases
            .iter()
            .zip(decides.iter().zip(edits.iter()))
            .map(|((_, req, _), (decide, edit))| BatchOp {
                id: req.machine_id,
                cause: lease_cause(req),
                decide,
                edit,
            })
            .collect();
        let results = self.store.apply_many(&ops).await?;
        for ((slot, req, lease), r) in leases.into_iter().zip(results) {
            out[slot] = Some(match r {
                Ok(_) => {
                    metrics::counter!("mars_leases_acquired_total", "purpose" => req.purpose.as_str())
                        .increment(1);
                    tracing::info!(machine = %req.machine_id, job = %req.job_id, lease = %lease.id, "lease acquired");
                    Ok(lease)
                }
                Err(e) => Err(e.into()),
            });
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(MarsError::Conflict("not attempted".into()))))
            .collect())
    }

    pub async fn heartbeat(&self, lease_id: &str) -> Result<Lease, MarsError> {
        let row = self.store.machine_by_lease(lease_id).await?;
        let now = Timestamp::now();
        let lease = row
            .lease
            .clone()
            .ok_or_else(|| StoreError::LeaseGone(lease_id.into()))?;
        if lease.expires_at < now {
            return Err(StoreError::LeaseGone(lease_id.into()).into());
        }
        let expires = now.plus_ms(lease.ttl_seconds as i64 * 1000);
        if !self.store.extend_lease(lease_id, now, expires).await? {
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
            let Some(l) = cur.lease.as_ref().filter(|l| l.id == lid) else {
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
    pub async fn expire_leases(&self) -> Result<usize, StoreError> {
        let now = Timestamp::now();
        let threshold = i64::from(self.config.quarantine_after_infra_failures.max(1));
        let mut n = 0;
        for row in self.store.expired_leases(now).await? {
            let Some(lease) = row.lease.clone() else {
                continue;
            };
            let lid = lease.id.clone();
            let decide = move |cur: &MachineRow| {
                let Some(l) = cur.lease.as_ref().filter(|l| l.id == lid) else {
                    return Decision::Refuse(StoreError::LeaseGone(lid.clone()));
                };
                if l.expires_at >= Timestamp::now() {
                    // Heartbeat won the race.
                    return Decision::Refuse(StoreError::LeaseGone(lid.clone()));
                }
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
                    "infrastructure failure: lease of job {} expired (no heartbeat from {} since {})",
                    lease.job_id,
                    lease.holder,
                    Timestamp(lease.expires_at.millis() - lease.ttl_seconds as i64 * 1000)
                ),
            )
            .with_job(lease.job_id.clone());
            match self.store.apply_with(row.id, &cause, &decide, &edit).await {
                Ok(r) => {
                    n += 1;
                    metrics::counter!("mars_leases_expired_total").increment(1);
                    tracing::warn!(machine = %r.id, job = %lease.job_id, state = %r.state, "lease expired");
                    if r.state == MachineState::Retired {
                        self.power_off(&r).await;
                    }
                }
                Err(StoreError::LeaseGone(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    // ---- discovery -----------------------------------------------------------------------

    pub async fn start_discovery(
        &self,
        pdu: String,
        port_id: String,
        timeout: Option<f64>,
    ) -> Result<Discovery, MarsError> {
        check_name("pdu", &pdu)?;
        if port_id.is_empty() || port_id.len() > 64 || port_id.chars().any(char::is_control) {
            return Err(invalid("port_id", "must be 1 to 64 printable characters").into());
        }
        let timeout = timeout.unwrap_or(self.config.discovery_timeout_seconds);
        if !(1.0..=86400.0).contains(&timeout) {
            return Err(invalid("timeout", "must be between 1 and 86400 seconds").into());
        }
        if let Some(d) = self.active_discovery().await? {
            return Err(MarsError::Conflict(format!(
                "a discovery is already running on PDU {} port {}",
                d.pdu, d.port_id
            )));
        }
        // An expired one that the sweeper has not cleaned yet: clean it now.
        self.expire_discovery().await?;
        if let Some(m) = self.store.machine_by_port(&pdu, &port_id).await? {
            return Err(MarsError::Conflict(format!(
                "PDU {pdu} port {port_id} is assigned to machine {} ({})",
                m.id, m.full_name
            )));
        }
        match self.power.get(&pdu, &port_id).await? {
            PowerState::Off => {}
            s => {
                return Err(MarsError::Conflict(format!(
                    "PDU {pdu} port {port_id} reads {s}; discovery needs a port that is OFF"
                )));
            }
        }
        let now = Timestamp::now();
        let d = Discovery {
            pdu: pdu.clone(),
            port_id: port_id.clone(),
            started_at: now,
            expires_at: now.plus_ms((timeout * 1000.0) as i64),
            timeout,
        };
        if !self.store.insert_discovery(&d).await? {
            return Err(MarsError::Conflict("a discovery is already running".into()));
        }
        if let Err(e) = self.power.set(&pdu, &port_id, PowerState::On).await {
            self.store.remove_discovery(&d).await?;
            return Err(e.into());
        }
        metrics::counter!("mars_discoveries_total", "outcome" => "started").increment(1);
        tracing::info!(pdu, port = port_id, timeout, "discovery started");
        Ok(d)
    }

    /// `DELETE /api/v1/machine/discover`: stops it and powers the port off.
    pub async fn stop_discovery(&self) -> Result<Option<Discovery>, MarsError> {
        let Some(d) = self.store.discovery().await? else {
            return Ok(None);
        };
        if self.store.remove_discovery(&d).await? {
            self.discovery_port_off(&d).await;
            metrics::counter!("mars_discoveries_total", "outcome" => "stopped").increment(1);
            return Ok(Some(d));
        }
        Ok(None)
    }

    /// Removes an expired discovery and powers its port off (nobody registered on it).
    pub async fn expire_discovery(&self) -> Result<(), StoreError> {
        if let Some(d) = self.store.discovery().await?
            && d.expires_at <= Timestamp::now()
            && self.store.remove_discovery(&d).await?
        {
            tracing::warn!(pdu = %d.pdu, port = %d.port_id, "discovery timed out: no unknown machine registered");
            metrics::counter!("mars_discoveries_total", "outcome" => "expired").increment(1);
            self.discovery_port_off(&d).await;
        }
        Ok(())
    }

    async fn discovery_port_off(&self, d: &Discovery) {
        // A machine may have been bound to the port meanwhile (then it is training: keep it on).
        match self.store.machine_by_port(&d.pdu, &d.port_id).await {
            Ok(None) => {
                if let Err(e) = self.power.set(&d.pdu, &d.port_id, PowerState::Off).await {
                    tracing::warn!(pdu = %d.pdu, port = %d.port_id, error = %e, "cannot power the discovery port off");
                }
            }
            Ok(Some(_)) => {}
            Err(e) => tracing::warn!(error = %e, "discovery cleanup"),
        }
    }
}

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
