//! SNMP PDU drivers: `apc_masterswitch`, `apc_rpdu2`, `cyberpower_pdu41004`,
//! `cyberpower_pdu15swhviec12atnet`, and `snmp` (generic: every OID and value from the
//! config). All share one implementation; a model is only a set of default OIDs and values,
//! and every model key can be overridden in the config.
//!
//! Ports are found by walking the outlet-name table; a port's id is the table index (the
//! last OID component). States of all ports are read with one walk of the status table
//! (GETBULK on v2c/v3, GETNEXT on v1).
//!
//! Sessions: one long-lived `snmp2::AsyncSession` per PDU, created on first use. snmp2 has
//! no timeouts, so every request is wrapped in one; after a timeout or a mismatched reply the
//! session is dropped and re-created, so a late reply can never be taken for the answer to
//! the next request.

mod model;
mod session;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use dutgate_pdu_driver::{
    ConfigError, DriverError, DriverFactory, PduDriver, PortInfo, PowerState, Switch, parse_config,
};
use serde::Deserialize;

pub use model::{Model, Oid};
use session::{Session, Value};

pub fn factories() -> Vec<DriverFactory> {
    model::MODELS
        .iter()
        .map(|m| DriverFactory {
            name: m.name,
            summary: m.summary,
            build: m.build,
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2c,
    V3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthProtocol {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivProtocol {
    Des,
    Aes128,
    Aes192,
    Aes256,
}

/// SNMPv3 user-based security.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V3Config {
    pub user: String,
    #[serde(default = "default_auth")]
    pub auth_protocol: AuthProtocol,
    /// Unset: noAuthNoPriv.
    #[serde(default)]
    pub auth_password: Option<String>,
    #[serde(default)]
    pub priv_protocol: Option<PrivProtocol>,
    #[serde(default)]
    pub priv_password: Option<String>,
}

fn default_auth() -> AuthProtocol {
    AuthProtocol::Sha1
}

/// The config every SNMP driver takes. The OID and value keys default to the model's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_version")]
    pub version: Version,
    /// Community for v1/v2c (reads and writes).
    #[serde(default = "default_community")]
    pub community: String,
    #[serde(default)]
    pub v3: Option<V3Config>,
    /// Time budget of one SNMP request.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Rows asked per GETBULK.
    #[serde(default = "default_bulk")]
    pub max_repetitions: u32,
    /// Outlet-name table (walked to list ports).
    #[serde(default)]
    pub names_oid: Option<Oid>,
    /// Outlet-state table (`<status_oid>.<port>` reads a port).
    #[serde(default)]
    pub status_oid: Option<Oid>,
    /// Outlet-control table (`<control_oid>.<port>` is SET); defaults to the status table.
    #[serde(default)]
    pub control_oid: Option<Oid>,
    /// Values written to switch on/off.
    #[serde(default)]
    pub on_value: Option<i64>,
    #[serde(default)]
    pub off_value: Option<i64>,
    /// Status values that read as ON / OFF; anything else reads UNKNOWN.
    #[serde(default)]
    pub status_on: Option<Vec<i64>>,
    #[serde(default)]
    pub status_off: Option<Vec<i64>>,
}

fn default_port() -> u16 {
    161
}
fn default_version() -> Version {
    Version::V2c
}
fn default_community() -> String {
    "private".into()
}
fn default_timeout_ms() -> u64 {
    2000
}
fn default_bulk() -> u32 {
    32
}

/// The resolved tables and values of one PDU.
#[derive(Debug, Clone, PartialEq)]
pub struct Tables {
    pub names: Oid,
    pub status: Oid,
    pub control: Oid,
    pub on_value: i64,
    pub off_value: i64,
    pub status_on: Vec<i64>,
    pub status_off: Vec<i64>,
}

impl Tables {
    fn resolve(model: &Model, cfg: &Config) -> Result<Self, ConfigError> {
        let need = |v: Option<Oid>, d: Option<&str>, field: &str| -> Result<Oid, ConfigError> {
            match (v, d) {
                (Some(v), _) => Ok(v),
                (None, Some(d)) => d.parse().map_err(|e: String| ConfigError::field(field, e)),
                (None, None) => Err(ConfigError::field(
                    field,
                    format!("the `{}` driver needs `{field}`", model.name),
                )),
            }
        };
        let names = need(cfg.names_oid.clone(), model.names, "names_oid")?;
        let status = need(cfg.status_oid.clone(), model.status, "status_oid")?;
        let control = match (&cfg.control_oid, model.control) {
            (Some(c), _) => c.clone(),
            (None, Some(d)) => d
                .parse()
                .map_err(|e: String| ConfigError::field("control_oid", e))?,
            (None, None) => status.clone(),
        };
        let num = |v: Option<i64>, d: Option<i64>, field: &str| {
            v.or(d).ok_or_else(|| {
                ConfigError::field(
                    field,
                    format!("the `{}` driver needs `{field}`", model.name),
                )
            })
        };
        let on_value = num(cfg.on_value, model.on_value, "on_value")?;
        let off_value = num(cfg.off_value, model.off_value, "off_value")?;
        let status_on = cfg
            .status_on
            .clone()
            .or_else(|| model.status_on.map(<[i64]>::to_vec))
            .unwrap_or_else(|| vec![on_value]);
        let status_off = cfg
            .status_off
            .clone()
            .or_else(|| model.status_off.map(<[i64]>::to_vec))
            .unwrap_or_else(|| vec![off_value]);
        if let Some(v) = status_on.iter().find(|v| status_off.contains(v)) {
            return Err(ConfigError::field(
                "status_off",
                format!("value {v} cannot mean both ON and OFF"),
            ));
        }
        Ok(Self {
            names,
            status,
            control,
            on_value,
            off_value,
            status_on,
            status_off,
        })
    }

    fn state_of(&self, v: i64) -> PowerState {
        if self.status_on.contains(&v) {
            PowerState::On
        } else if self.status_off.contains(&v) {
            PowerState::Off
        } else {
            PowerState::Unknown
        }
    }
}

pub(crate) fn build_model(
    model: &'static Model,
    config: yaml_serde::Value,
) -> Result<Box<dyn PduDriver>, ConfigError> {
    Ok(Box::new(SnmpPdu::new(model, parse_config(config)?)?))
}

/// An SNMP PDU (public so that benchmarks and tests can use it without the registry).
pub struct SnmpPdu {
    model: &'static Model,
    tables: Tables,
    session: Session,
    /// Port ids from the last walk of the name table, to tell "no such port" from errors.
    ports: Option<Vec<PortInfo>>,
}

impl SnmpPdu {
    pub fn new(model: &'static Model, cfg: Config) -> Result<Self, ConfigError> {
        if cfg.host.trim().is_empty() {
            return Err(ConfigError::field("host", "must not be empty"));
        }
        if cfg.timeout_ms == 0 {
            return Err(ConfigError::field("timeout_ms", "must be more than 0"));
        }
        if cfg.max_repetitions == 0 {
            return Err(ConfigError::field("max_repetitions", "must be more than 0"));
        }
        match (&cfg.version, &cfg.v3) {
            (Version::V3, None) => {
                return Err(ConfigError::field(
                    "v3",
                    "version v3 needs a `v3` section (user, …)",
                ));
            }
            (Version::V1 | Version::V2c, Some(_)) => {
                return Err(ConfigError::field("v3", "only used with `version: v3`"));
            }
            (Version::V3, Some(v3)) => {
                if v3.priv_protocol.is_some() != v3.priv_password.is_some() {
                    return Err(ConfigError::field(
                        "v3.priv_password",
                        "privacy needs both priv_protocol and priv_password",
                    ));
                }
                if v3.priv_protocol.is_some() && v3.auth_password.is_none() {
                    return Err(ConfigError::field(
                        "v3.auth_password",
                        "privacy (authPriv) needs authentication too",
                    ));
                }
                for (field, pw) in [
                    ("v3.auth_password", &v3.auth_password),
                    ("v3.priv_password", &v3.priv_password),
                ] {
                    if pw.as_ref().is_some_and(|p| p.len() < 8) {
                        return Err(ConfigError::field(
                            field,
                            "SNMPv3 passwords have at least 8 characters",
                        ));
                    }
                }
            }
            _ => {}
        }
        let tables = Tables::resolve(model, &cfg)?;
        Ok(Self {
            model,
            tables,
            session: Session::new(&cfg),
            ports: None,
        })
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    fn port_index(&self, port: &str) -> Result<u64, DriverError> {
        let idx: u64 = port.parse().map_err(|_| DriverError::no_such_port(port))?;
        if let Some(ports) = &self.ports
            && !ports.iter().any(|p| p.id == port)
        {
            return Err(DriverError::no_such_port(port));
        }
        Ok(idx)
    }

    /// Reads every port with one walk of the status table (what `get_all` does).
    pub async fn walk_states(&mut self) -> Result<Vec<(String, PowerState)>, DriverError> {
        let rows = self.session.walk(&self.tables.status).await?;
        let mut out = Vec::with_capacity(rows.len());
        for (index, value) in rows {
            let state = match value {
                Value::Int(v) => self.tables.state_of(v),
                _ => PowerState::Unknown,
            };
            out.push((index.to_string(), state));
        }
        if out.is_empty() {
            return Err(DriverError::protocol(
                self.session.target(),
                format!("the status table {} is empty", self.tables.status),
            ));
        }
        Ok(out)
    }
}

#[async_trait]
impl PduDriver for SnmpPdu {
    fn driver_name(&self) -> &'static str {
        self.model.name
    }

    async fn ports(&mut self) -> Result<Vec<PortInfo>, DriverError> {
        let rows = self.session.walk(&self.tables.names).await?;
        let ports: Vec<PortInfo> = rows
            .into_iter()
            .map(|(index, value)| {
                let label = match value {
                    Value::Str(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                    _ => None,
                };
                PortInfo::new(index.to_string(), label)
            })
            .collect();
        if ports.is_empty() {
            return Err(DriverError::protocol(
                self.session.target(),
                format!(
                    "the outlet-name table {} is empty: wrong model or OIDs?",
                    self.tables.names
                ),
            ));
        }
        self.ports = Some(ports.clone());
        Ok(ports)
    }

    async fn get(&mut self, port: &str) -> Result<PowerState, DriverError> {
        let idx = self.port_index(port)?;
        let oid = self.tables.status.child(idx);
        match self.session.get(&oid).await? {
            Value::Int(v) => Ok(self.tables.state_of(v)),
            Value::Missing => Err(DriverError::no_such_port(port)),
            other => Err(DriverError::protocol(
                self.session.target(),
                format!("{oid} is {other:?}, expected an integer"),
            )),
        }
    }

    async fn get_all(&mut self) -> Result<Vec<(String, PowerState)>, DriverError> {
        let mut all = self.walk_states().await?;
        // The status table may list rows the name table does not (or the other way round
        // on odd firmware); report exactly the listed ports.
        if let Some(ports) = &self.ports {
            let by_id: BTreeMap<String, PowerState> = all.drain(..).collect();
            return Ok(ports
                .iter()
                .map(|p| {
                    let s = by_id.get(&p.id).copied().unwrap_or(PowerState::Unknown);
                    (p.id.clone(), s)
                })
                .collect());
        }
        Ok(all)
    }

    async fn set(&mut self, port: &str, state: Switch) -> Result<(), DriverError> {
        let idx = self.port_index(port)?;
        let oid = self.tables.control.child(idx);
        let value = match state {
            Switch::On => self.tables.on_value,
            Switch::Off => self.tables.off_value,
        };
        self.session.set_int(&oid, value).await
    }

    async fn shutdown(&mut self) {
        self.session.close();
    }
}

/// How long one request may take (for callers that want to budget around a driver).
pub fn request_timeout(cfg: &Config) -> Duration {
    Duration::from_millis(cfg.timeout_ms)
}
