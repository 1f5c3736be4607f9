//! `DriverError`: what went wrong talking to a device.

use std::time::Duration;

/// A driver failure, phrased for an operator ("what failed, where, what next").
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DriverError {
    /// The device did not answer in time (dead host, wrong SNMP community: agents drop those
    /// requests silently, a broker that never delivers the reply, …).
    #[error("{what}: no answer within {}", fmt_duration(*after))]
    Timeout { what: String, after: Duration },
    /// The device (or its broker) cannot be reached at all.
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: String, reason: String },
    /// The device answered and refused the request (bad credentials, read-only community,
    /// wrong value, HTTP 401/403, …). Retrying will not help.
    #[error("{target} refused the request: {reason}")]
    Refused { target: String, reason: String },
    /// The device answered something we do not understand.
    #[error("{target} sent an unexpected answer: {reason}")]
    Protocol { target: String, reason: String },
    /// The port id is not one of the device's ports.
    #[error("no port {port:?} on this PDU")]
    NoSuchPort { port: String },
    /// A local failure (spawning a process, a temp file, …).
    #[error("{0}")]
    Local(String),
}

impl DriverError {
    pub fn timeout(what: impl Into<String>, after: Duration) -> Self {
        Self::Timeout {
            what: what.into(),
            after,
        }
    }
    pub fn unreachable(target: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Unreachable {
            target: target.into(),
            reason: reason.to_string(),
        }
    }
    pub fn refused(target: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Refused {
            target: target.into(),
            reason: reason.to_string(),
        }
    }
    pub fn protocol(target: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Protocol {
            target: target.into(),
            reason: reason.to_string(),
        }
    }
    pub fn no_such_port(port: impl Into<String>) -> Self {
        Self::NoSuchPort { port: port.into() }
    }

    /// Whether trying again later may succeed. Refusals, unknown ports and answers we do
    /// not understand will not get better by retrying.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DriverError::Timeout { .. } | DriverError::Unreachable { .. } | DriverError::Local(_)
        )
    }

    /// A short machine-readable kind, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            DriverError::Timeout { .. } => "timeout",
            DriverError::Unreachable { .. } => "unreachable",
            DriverError::Refused { .. } => "refused",
            DriverError::Protocol { .. } => "protocol",
            DriverError::NoSuchPort { .. } => "no_such_port",
            DriverError::Local(_) => "local",
        }
    }
}

fn fmt_duration(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_kinds() {
        let e = DriverError::timeout("SNMP GET 127.0.0.1:1161", Duration::from_millis(1500));
        assert_eq!(
            e.to_string(),
            "SNMP GET 127.0.0.1:1161: no answer within 1.5 s"
        );
        assert!(e.is_transient());
        assert_eq!(e.kind(), "timeout");
        let e = DriverError::refused("127.0.0.1:1161", "noAccess");
        assert!(!e.is_transient());
        assert_eq!(
            DriverError::no_such_port("9").to_string(),
            "no port \"9\" on this PDU"
        );
    }
}
