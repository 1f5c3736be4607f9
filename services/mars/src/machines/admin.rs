//! Admin changes of a machine: its record (PATCH), retire, activate.

use dutgate_core::MachineId;

use super::*;
use crate::model::{LeasePurpose, MachinePatch, MachineState, RetireRequest};
use crate::state::Trigger;
use crate::store::{Cause, Decision, MachineRow};

impl Mars {
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
}
