//! Discovery: an admin powers a PDU port and the next unknown machine that registers is bound
//! to it.

use dutgate_core::PowerState;

use super::*;
use crate::model::{Discovery, Timestamp};
use crate::store::StoreError;

impl Mars {
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
