//! `POST /api/v1/machine/`: a DUT (or an admin) registers a machine.
//!
//! Who may change what (docs/machines.md, "Registration integrity"); an admin (token) may do
//! anything here, a DUT (a peer on the DUT network, no token):
//!
//! - creates an unknown machine, within [`Config::max_unknown_machines`] machines waiting for
//!   configuration and the creation rate ([`Config::new_machines_per_minute`]);
//! - updates a known machine only from that machine's recorded address (and then not its
//!   address, and not while a job holds it), or while the machine is in its own
//!   registration/check boot (`TRAINING`/`QUICK_CHECK` under a live training lease);
//! - binds a running discovery only when the registration does not come from another known
//!   machine's address (a DUT in service cannot claim a new machine's port with a made-up
//!   MAC).
//!
//! Every refusal is a 403 or 429 naming the rule and a warning naming the source address.
//! The authorisation is decided again on the fresh row inside the store's write
//! ([`crate::store::Store::apply_with`]), so a state change between the read and the write
//! cannot slip a refused update through.

use std::collections::BTreeSet;
use std::net::IpAddr;

use dutgate_core::Tag;

use super::*;
use crate::model::{Discovery, LeasePurpose, MachineState, Registration, Timestamp};
use crate::state::Trigger;
use crate::store::{Cause, Decision, MachineRow, StoreError, new_row};

/// Where a registration comes from.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    /// The peer address of the connection.
    pub peer: IpAddr,
    /// Made with the admin token.
    pub admin: bool,
}

impl Source {
    pub fn new(peer: IpAddr, admin: bool) -> Self {
        Self {
            peer: peer.to_canonical(),
            admin,
        }
    }
}

/// A registration body, checked field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRegistration {
    pub id: MachineId,
    pub base_name: String,
    /// Sorted, without duplicates.
    pub tags: Vec<Tag>,
    pub ip: IpAddr,
    /// Normalised (`/dev/` stripped).
    pub tty: Option<String>,
}

impl CheckedRegistration {
    /// The body that registers the same thing.
    pub fn to_registration(&self) -> Registration {
        Registration {
            base_name: self.base_name.clone(),
            tags: self.tags.clone(),
            mac_address: self.id,
            ip_address: self.ip,
            local_tty_device: self.tty.clone(),
        }
    }
}

/// Parses and checks a registration body (untrusted bytes from the DUT network).
pub fn parse_registration(body: &[u8], max_tags: usize) -> Result<CheckedRegistration, Invalid> {
    let reg: Registration =
        serde_json::from_slice(body).map_err(|e| invalid("body", e.to_string()))?;
    check_registration(reg, max_tags)
}

/// Checks a registration's fields.
pub fn check_registration(
    reg: Registration,
    max_tags: usize,
) -> Result<CheckedRegistration, Invalid> {
    check_name("base_name", &reg.base_name)?;
    check_mac(reg.mac_address)?;
    check_ip(reg.ip_address)?;
    check_tags("tags", &reg.tags, max_tags)?;
    let tty = reg
        .local_tty_device
        .as_deref()
        .map(normalise_tty)
        .transpose()?;
    Ok(CheckedRegistration {
        id: reg.mac_address,
        base_name: reg.base_name,
        tags: dedup(reg.tags),
        ip: reg.ip_address,
        tty,
    })
}

/// The creations of unknown machines left (a token bucket of
/// [`Config::new_machines_burst`], refilled at [`Config::new_machines_per_minute`]).
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    /// `None`: full.
    tokens: Option<f64>,
    at: Option<std::time::Instant>,
}

impl RateLimit {
    fn take(&mut self, per_minute: u32, burst: u32) -> bool {
        let now = std::time::Instant::now();
        let burst = f64::from(burst);
        let elapsed = self.at.map_or(0.0, |t| now.duration_since(t).as_secs_f64());
        let tokens = self
            .tokens
            .map_or(burst, |t| t + elapsed * f64::from(per_minute) / 60.0)
            .min(burst);
        self.at = Some(now);
        if tokens >= 1.0 {
            self.tokens = Some(tokens - 1.0);
            true
        } else {
            self.tokens = Some(tokens);
            false
        }
    }
}

/// Whether the machine is in its own registration or check boot: the trainer holds it.
fn in_own_boot(cur: &MachineRow) -> bool {
    matches!(cur.state, MachineState::Training | MachineState::QuickCheck)
        && cur
            .lease
            .as_ref()
            .is_some_and(|l| l.purpose == LeasePurpose::Training && l.expires_at > Timestamp::now())
}

/// Whether `src` may change `cur`'s record with `reg`; the reason when not.
fn may_update(cur: &MachineRow, reg: &CheckedRegistration, src: Source) -> Result<(), String> {
    if src.admin || in_own_boot(cur) {
        return Ok(());
    }
    if cur.ip_address.map(|i| i.to_canonical()) != Some(src.peer) {
        return Err(format!(
            "machine {} changes only from its recorded address ({}) or during its own \
             registration/check boot; this registration comes from {}",
            cur.id,
            cur.ip_address
                .map_or_else(|| "none".to_string(), |i| i.to_string()),
            src.peer
        ));
    }
    if let Some(l) = &cur.lease
        && l.purpose == LeasePurpose::Job
    {
        return Err(format!(
            "machine {} runs job {}: its record does not change until the job ends",
            cur.id, l.job_id
        ));
    }
    if reg.ip != src.peer {
        return Err(format!(
            "ip_address {} is not the address this registration comes from ({}); a machine \
             changes its address only in its registration boot",
            reg.ip, src.peer
        ));
    }
    Ok(())
}

/// A refused registration: logged with its source, answered 403/429.
fn refuse(src: Source, id: MachineId, e: MarsError) -> MarsError {
    tracing::warn!(source = %src.peer, machine = %id, reason = %e, "registration refused");
    metrics::counter!("mars_registrations_refused_total").increment(1);
    e
}

impl Mars {
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
    pub async fn register(
        &self,
        reg: CheckedRegistration,
        src: Source,
    ) -> Result<MachineRow, MarsError> {
        let id = reg.id;
        let existing = self.store.find(id).await?;
        match &existing {
            Some(cur) => {
                may_update(cur, &reg, src).map_err(|r| refuse(src, id, MarsError::Forbidden(r)))?
            }
            None if !src.admin => return self.create_unknown(reg, src).await,
            None => {}
        }
        let needs_port = existing.as_ref().is_none_or(|m| !m.configured());
        let claimed = if needs_port {
            self.claim_discovery(id, src).await?
        } else {
            None
        };
        if existing.is_none()
            && let Some(row) = self.insert(&reg, claimed.clone()).await?
        {
            return Ok(row);
        }
        self.update(reg, src, claimed).await
    }

    /// A machine nobody knows, registered from the DUT network: within the cap and the rate.
    async fn create_unknown(
        &self,
        reg: CheckedRegistration,
        src: Source,
    ) -> Result<MachineRow, MarsError> {
        let id = reg.id;
        // Held from the count to the insert: this process's creations cannot overshoot the
        // cap together.
        let mut limit = self.new_machines.lock().await;
        let waiting = self
            .store
            .count_in_state(MachineState::WaitForConfig)
            .await?;
        let cap = self.config.max_unknown_machines;
        if waiting >= cap as i64 {
            return Err(refuse(
                src,
                id,
                MarsError::TooMany(format!(
                    "{waiting} machines already wait for configuration (at most {cap}): an \
                     admin must configure or retire them before more are registered"
                )),
            ));
        }
        if !limit.take(
            self.config.new_machines_per_minute,
            self.config.new_machines_burst,
        ) {
            return Err(refuse(
                src,
                id,
                MarsError::TooMany(format!(
                    "too many new machines registered lately (at most {} a minute); try again \
                     later",
                    self.config.new_machines_per_minute
                )),
            ));
        }
        let claimed = self.claim_discovery(id, src).await?;
        let inserted = self.insert(&reg, claimed.clone()).await?;
        drop(limit);
        match inserted {
            Some(row) => Ok(row),
            // Registered meanwhile by someone else: an update, with its rules.
            None => {
                let cur = self.store.get(id).await?;
                may_update(&cur, &reg, src)
                    .map_err(|r| refuse(src, id, MarsError::Forbidden(r)))?;
                self.update(reg, src, claimed).await
            }
        }
    }

    /// Claims the running discovery for machine `id` registering from `src` (only one
    /// registration can: the claim removes it). Not from the recorded address of another
    /// known machine, unless with the admin token.
    async fn claim_discovery(
        &self,
        id: MachineId,
        src: Source,
    ) -> Result<Option<Discovery>, StoreError> {
        let Some(d) = self.active_discovery().await? else {
            return Ok(None);
        };
        if !src.admin
            && let Some(other) = self
                .store
                .machines_at(src.peer)
                .await?
                .into_iter()
                .find(|m| *m != id)
        {
            tracing::warn!(source = %src.peer, machine = %id, other = %other, "discovery not bound: the registration comes from another machine's address");
            return Ok(None);
        }
        if !self.store.remove_discovery(&d).await? {
            return Ok(None);
        }
        tracing::info!(machine = %id, source = %src.peer, pdu = %d.pdu, port = %d.port_id, "discovery bound the registering machine");
        metrics::counter!("mars_discoveries_total", "outcome" => "bound").increment(1);
        Ok(Some(d))
    }

    /// Inserts the new machine (bound to `claimed` when given); `None` when it exists.
    async fn insert(
        &self,
        reg: &CheckedRegistration,
        claimed: Option<Discovery>,
    ) -> Result<Option<MachineRow>, MarsError> {
        let cause = Cause::new(
            "registration",
            format!("registered from {} as {}", reg.ip, reg.base_name),
        );
        let row = new_row(
            reg.id,
            &reg.base_name,
            reg.tags.clone(),
            reg.ip,
            reg.tty.clone(),
            self.config.pdu_off_delay,
        );
        let Some(row) = self.store.insert_new(row, &cause).await? else {
            return Ok(None);
        };
        metrics::counter!("mars_registrations_total", "kind" => "new").increment(1);
        let Some(d) = claimed else {
            return Ok(Some(row));
        };
        // Bound to the discovered port: configured, so training starts.
        let cause = Cause::new(
            "registration",
            format!("discovered on PDU {} port {}", d.pdu, d.port_id),
        );
        let edit = move |r: &mut MachineRow| {
            r.pdu = Some(d.pdu.clone());
            r.pdu_port_id = Some(d.port_id.clone());
        };
        Ok(Some(
            self.store
                .trigger(reg.id, Trigger::Configure, &cause, &edit)
                .await?,
        ))
    }

    /// A known machine's registration: its record, and `TRAINING` when the hardware changed
    /// or a discovery bound it.
    async fn update(
        &self,
        reg: CheckedRegistration,
        src: Source,
        claimed: Option<Discovery>,
    ) -> Result<MachineRow, MarsError> {
        metrics::counter!("mars_registrations_total", "kind" => "update").increment(1);
        let id = reg.id;
        let cause = Cause::new(
            "registration",
            format!(
                "registered from {} (ip_address {}) as {}",
                src.peer, reg.ip, reg.base_name
            ),
        );
        let new_tags: BTreeSet<Tag> = reg.tags.iter().cloned().collect();
        let claimed_for_edit = claimed.clone();
        let checked = reg.clone();
        let decide = move |cur: &MachineRow| {
            // Decided again on the row the write is conditional on.
            if let Err(r) = may_update(cur, &checked, src) {
                return Decision::Refuse(StoreError::Forbidden(r));
            }
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
        let edit = move |row: &mut MachineRow| {
            row.base_name = reg.base_name.clone();
            row.tags = reg.tags.clone();
            row.ip_address = Some(reg.ip);
            if let Some(t) = &reg.tty {
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
        match self.store.apply_with(id, &cause, &decide, &edit).await {
            Ok(row) => Ok(row),
            Err(StoreError::Forbidden(r)) => Err(refuse(src, id, MarsError::Forbidden(r))),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_refills_over_time() {
        let mut r = RateLimit::default();
        assert!(r.take(60, 2));
        assert!(r.take(60, 2));
        assert!(!r.take(60, 2), "the burst is spent");
        // A second later one more (60 a minute).
        r.at = r.at.map(|t| t - std::time::Duration::from_millis(1100));
        assert!(r.take(60, 2));
        assert!(!r.take(60, 2));
        assert!(!r.take(0, 0), "no burst: nothing");
    }
}
