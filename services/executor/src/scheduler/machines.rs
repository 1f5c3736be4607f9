//! The scheduler's view of mars' machines: a cache of their records, kept current by mars'
//! event stream (followed with a long poll), which also wakes the scheduler when a machine is
//! freed and reports expired leases to the supervisor. A stale entry only costs a refused
//! lease (409), after which the machine is marked busy and the round planned again.

use std::time::Duration;

use dutgate_core::MachineId;
use dutgate_mars::model::{Machine, MachineState};
use tokio_util::sync::CancellationToken;

use super::{Scheduler, TargetError, plan};
use crate::model::Purpose;
use crate::store::{QueuedJob, now_ms};

impl Scheduler {
    pub(super) async fn load_machines(&self) -> Result<(), String> {
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
    pub(super) async fn free_machines(&self) -> Result<Vec<Machine>, TargetError> {
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
        if plan::target_verdict(&self.machines().await?, id, tags).is_ok() {
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
        plan::target_verdict(&self.machines().await?, id, tags)
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
        Ok(self
            .machines()
            .await?
            .iter()
            .any(|m| plan::matches(m, &probe)))
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

    /// Marks machines busy in the cache (leased by this executor, or found leased by a
    /// refusal) until mars' event stream says otherwise.
    pub(super) async fn mark_busy(&self, ids: &[MachineId]) {
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
