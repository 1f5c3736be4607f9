//! `PowerState`: what a PDU port reads back as. `Unknown` is never treated as `Off`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PowerState {
    On,
    Off,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid power state {0:?}: expected ON, OFF or UNKNOWN")]
pub struct InvalidPowerState(pub String);

impl PowerState {
    pub fn as_str(&self) -> &'static str {
        match self {
            PowerState::On => "ON",
            PowerState::Off => "OFF",
            PowerState::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for PowerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PowerState {
    type Err = InvalidPowerState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "ON" => Ok(PowerState::On),
            "OFF" => Ok(PowerState::Off),
            "UNKNOWN" => Ok(PowerState::Unknown),
            _ => Err(InvalidPowerState(s.chars().take(32).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_case_insensitively_and_serialises_upper() {
        assert_eq!("on".parse::<PowerState>().unwrap(), PowerState::On);
        assert_eq!("Off".parse::<PowerState>().unwrap(), PowerState::Off);
        assert!("maybe".parse::<PowerState>().is_err());
        assert_eq!(
            serde_json::to_string(&PowerState::Unknown).unwrap(),
            "\"UNKNOWN\""
        );
    }
}
