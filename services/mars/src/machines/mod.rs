//! The operations of mars on machines. HTTP handlers ([`crate::api`]) and the trainer call
//! these; these call the store (persisted state machine) and the PDU.
//!
//! - this module: [`Mars`], errors, the checks of names and addresses, the wire view;
//! - `registration`: `POST /api/v1/machine/` and who may make it;
//! - `admin`: PATCH, retire, activate;
//! - `leases`: acquire, heartbeat, release, expiry (with its power-off);
//! - `discovery`: binding an unknown machine to the PDU port it booted from.

mod admin;
mod discovery;
mod leases;
mod registration;

pub use registration::{CheckedRegistration, Source, check_registration, parse_registration};

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use dutgate_core::{MachineId, PowerState, Tag};

use crate::Config;
use crate::model::{Timestamp, TrainingSummary};
use crate::power::Power;
use crate::store::{MachineRow, Store, StoreError};
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
    /// Not allowed from where it came (403).
    #[error("{0}")]
    Forbidden(String),
    /// A bound was reached (429).
    #[error("{0}")]
    TooMany(String),
}

/// Everything the handlers and the trainer share.
#[derive(Clone)]
pub struct Mars {
    pub store: Store,
    pub config: Arc<Config>,
    pub power: Arc<dyn Power>,
    /// Set when the trainer is wired; used to cancel a job when retiring with `cancel_job`.
    pub runner: Option<Arc<dyn JobRunner>>,
    /// Expiries this process claimed whose power-off failed: (lease id, claim), retried on
    /// the next sweep.
    failed_claims: Arc<std::sync::Mutex<std::collections::HashSet<(String, i64)>>>,
    /// Creations of unknown machines from the DUT network: their rate, and one at a time.
    new_machines: Arc<tokio::sync::Mutex<registration::RateLimit>>,
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
            failed_claims: Arc::default(),
            new_machines: Arc::default(),
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
}
