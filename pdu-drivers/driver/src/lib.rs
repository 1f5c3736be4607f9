//! The contract between the pdu service and its drivers (design.md §5, conventions.md §3).
//!
//! - [`PduDriver`]: the one async trait every driver implements: list ports, read a port's
//!   state, switch a port, optionally read its power draw.
//! - [`DriverError`]: what went wrong talking to a device, typed so that the service can tell
//!   a timeout (retry) from a refusal (do not retry) and say which in its answer.
//! - [`ConfigError`] and [`parse_config`]: typed driver configs whose errors name the field.
//! - [`DriverFactory`] / [`Registry`]: drivers are found by name; the service knows nothing of
//!   SNMP or MQTT.
//!
//! Invariants: a driver never maps "I could not tell" to `Off` (that is `Unknown` or an
//! error), and a driver is only ever used by one task at a time (`&mut self`): the service's
//! per-PDU actor is the only owner, which is what serialises access to the device.

mod config;
mod error;
mod registry;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use config::{ConfigError, PortList, parse_config, port_list};
pub use dutgate_core::PowerState;
pub use error::DriverError;
pub use registry::{BuildFn, DriverFactory, DriverInfo, Registry};

/// One outlet as a driver sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortInfo {
    /// Stable id used in the API and in machine records (`pdu_port_id`), e.g. `"3"`.
    pub id: String,
    /// The name the device gives the outlet, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl PortInfo {
    pub fn new(id: impl Into<String>, label: Option<String>) -> Self {
        Self {
            id: id.into(),
            label,
        }
    }
}

/// The state a port is switched to. Separate from [`PowerState`] so that nobody can ask a
/// device to switch to `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn as_state(self) -> PowerState {
        match self {
            Switch::On => PowerState::On,
            Switch::Off => PowerState::Off,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Switch::On => "ON",
            Switch::Off => "OFF",
        }
    }
}

impl std::fmt::Display for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A PDU driver. Every method may be slow or fail; the caller (the service's actor) adds
/// the time budget around each call, retries transient errors and verifies read-back.
/// Drivers still bound their own network calls (`timeout` in their configs) so that a dead
/// device never pins a task.
#[async_trait]
pub trait PduDriver: Send {
    /// The registry name this driver was built under (for logs and metrics).
    fn driver_name(&self) -> &'static str;

    /// The device's outlets, in the device's order.
    async fn ports(&mut self) -> Result<Vec<PortInfo>, DriverError>;

    /// Reads one port's state back from the device.
    async fn get(&mut self, port: &str) -> Result<PowerState, DriverError>;

    /// Reads every port. Drivers that can do it in one exchange (an SNMP walk, one status
    /// request) override this; the default asks port by port and keeps going on per-port
    /// errors, reporting those ports as `Unknown`.
    async fn get_all(&mut self) -> Result<Vec<(String, PowerState)>, DriverError> {
        let ports = self.ports().await?;
        let mut out = Vec::with_capacity(ports.len());
        let mut first_err = None;
        for p in ports {
            match self.get(&p.id).await {
                Ok(s) => out.push((p.id, s)),
                Err(e) => {
                    out.push((p.id, PowerState::Unknown));
                    first_err.get_or_insert(e);
                }
            }
        }
        // A device that answers nothing at all is an error, not a PDU full of Unknowns.
        match first_err {
            Some(e) if out.iter().all(|(_, s)| *s == PowerState::Unknown) => Err(e),
            _ => Ok(out),
        }
    }

    /// Switches one port. Returns once the device accepted the command; the caller reads the
    /// state back separately.
    async fn set(&mut self, port: &str, state: Switch) -> Result<(), DriverError>;

    /// Instant power draw of a port in watts, for devices that measure it.
    async fn power_w(&mut self, _port: &str) -> Result<Option<f64>, DriverError> {
        Ok(None)
    }

    /// Called before the driver is dropped (PDU removed, service stopping): close sessions,
    /// stop background tasks. Must not switch ports.
    async fn shutdown(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_maps_to_power_state() {
        assert_eq!(Switch::On.as_state(), PowerState::On);
        assert_eq!(Switch::Off.as_state(), PowerState::Off);
        assert_eq!(serde_json::to_string(&Switch::Off).unwrap(), "\"OFF\"");
    }
}
