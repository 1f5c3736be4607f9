//! Configuration: one YAML file with a section per service, embedded defaults, and
//! `DUTGATE_<SECTION>__<KEY>` environment overrides.
//!
//! The top-level type is assembled by the `dutgate` binary from every service's own section
//! type; this module only knows the `gateway` section shared by all of them and how to load
//! any such type. Unknown keys are errors everywhere (`deny_unknown_fields`): a typo in a
//! farm's config must stop the gateway, not be silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::secret::{DatabaseUrl, Secret};
use crate::service::ServiceName;

/// Where the config file is looked for when neither `--config` nor `DUTGATE_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dutgate/gateway.yml";
/// Prefix of environment overrides: `DUTGATE_<SECTION>__<KEY>[__<SUBKEY>…]`.
pub const ENV_PREFIX: &str = "DUTGATE_";

/// The `gateway` section: what every service shares.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Name of the farm, used in machines' full names (`<farm>-<base_name>-<n>`).
    pub farm_name: String,
    /// Where every service keeps its state (SQLite files, logs, caches, tokens).
    pub state_dir: PathBuf,
    /// `postgres://…` to keep every service's tables in PostgreSQL (one schema per service).
    /// Unset: one SQLite file per service under `state_dir`.
    pub database_url: Option<DatabaseUrl>,
    /// Address every service listens on.
    pub bind_address: IpAddr,
    /// Host the services use to reach each other.
    pub internal_host: String,
    /// Host (name or IP) DUTs use to reach the gateway; goes into boot scripts and job variables.
    pub public_host: String,
    /// Port of each service.
    pub ports: ServicePorts,
    pub auth: AuthConfig,
    /// Where fetches made on a job's or user's behalf may go (see [`crate::outbound`]).
    pub outbound: crate::outbound::OutboundConfig,
    pub log: LogConfig,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace_seconds: f64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            farm_name: "dutgate".into(),
            state_dir: PathBuf::from("./dutgate-state"),
            database_url: None,
            bind_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            internal_host: "127.0.0.1".into(),
            public_host: "127.0.0.1".into(),
            ports: ServicePorts::default(),
            auth: AuthConfig::default(),
            outbound: crate::outbound::OutboundConfig::default(),
            log: LogConfig::default(),
            shutdown_grace_seconds: 3.0,
        }
    }
}

impl GatewayConfig {
    pub fn port_of(&self, service: ServiceName) -> u16 {
        match service {
            ServiceName::Executor => self.ports.executor,
            ServiceName::Mars => self.ports.mars,
            ServiceName::Registry => self.ports.registry,
            ServiceName::Boot => self.ports.boot,
            ServiceName::Pdu => self.ports.pdu,
            ServiceName::Salad => self.ports.salad,
            ServiceName::S3 => self.ports.s3,
        }
    }

    /// URL another service uses to reach `service` (internal network).
    pub fn internal_url(&self, service: ServiceName) -> String {
        format!("http://{}:{}", self.internal_host, self.port_of(service))
    }

    /// URL a DUT uses to reach `service`.
    pub fn public_url(&self, service: ServiceName) -> String {
        format!("http://{}:{}", self.public_host, self.port_of(service))
    }

    pub fn tokens_dir(&self) -> PathBuf {
        self.state_dir.join("tokens")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServicePorts {
    pub executor: u16,
    pub mars: u16,
    pub registry: u16,
    pub boot: u16,
    pub pdu: u16,
    pub salad: u16,
    pub s3: u16,
}

impl Default for ServicePorts {
    fn default() -> Self {
        Self {
            executor: 8000,
            mars: 8001,
            registry: 8002,
            boot: 8003,
            pdu: 8004,
            salad: 8005,
            s3: 9000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Token for admin endpoints. Unset: read from `<state_dir>/tokens/admin`.
    pub admin_token: Option<Secret>,
    /// Token for job submission. Unset: read from `<state_dir>/tokens/user`.
    pub user_token: Option<Secret>,
    /// Networks DUTs live on; DUT-facing endpoints answer only these.
    pub dut_networks: Vec<IpNet>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            admin_token: None,
            user_token: None,
            dut_networks: default_dut_networks(),
        }
    }
}

/// Loopback (the virtual farm's QEMU user networking NATs DUTs to 127.0.0.1) and the
/// virtual farm's guest network.
pub fn default_dut_networks() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128", "10.0.2.0/24"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `info,dutgate_salad=debug`. `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A config error, phrased for one line on a terminal.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Invalid { location: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

/// Where a config comes from: a file (explicit or the default path) or nothing (defaults).
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub text: String,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}", p.display()),
            None => f.write_str("<embedded defaults>"),
        }
    }
}

impl ConfigSource {
    /// `explicit` is `--config`/`DUTGATE_CONFIG`: it must exist. Without it the default path is
    /// used when present, else the embedded defaults.
    pub fn locate(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_PATH);
                p.exists().then_some(p)
            }
        };
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(&p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Ok(Self {
                    path: Some(p),
                    text,
                })
            }
            None => Ok(Self {
                path: None,
                text: String::new(),
            }),
        }
    }

    pub fn from_text(text: impl Into<String>) -> Self {
        Self {
            path: None,
            text: text.into(),
        }
    }

    /// Parses the source into `T`, then applies the environment overrides found in `env`.
    pub fn load<T, I>(&self, env: I) -> Result<T, ConfigError>
    where
        T: DeserializeOwned + Serialize + Default,
        I: IntoIterator<Item = (String, String)>,
    {
        let base: T = if self.text.trim().is_empty() {
            T::default()
        } else {
            yaml_serde::from_str(&self.text).map_err(|e| self.invalid(&e))?
        };
        let overrides = collect_overrides(env);
        if overrides.is_empty() {
            return Ok(base);
        }
        let mut tree = yaml_serde::to_value(&base).map_err(|e| ConfigError::Invalid {
            location: self.to_string(),
            message: e.to_string(),
        })?;
        // Masked secrets would be written back masked: re-read them from the source text.
        if !self.text.trim().is_empty() {
            tree = yaml_serde::from_str(&self.text).map_err(|e| self.invalid(&e))?;
        }
        apply_overrides::<T>(&mut tree, &overrides)
    }

    fn invalid(&self, e: &yaml_serde::Error) -> ConfigError {
        let location = match e.location() {
            Some(loc) => format!("{}:{}:{}", self, loc.line(), loc.column()),
            None => self.to_string(),
        };
        // yaml_serde appends " at line L column C"; the location is already in front.
        let message = e.to_string();
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        ConfigError::Invalid { location, message }
    }
}

#[derive(Debug, Clone)]
struct Override {
    var: String,
    path: Vec<String>,
    raw: String,
}

fn collect_overrides<I: IntoIterator<Item = (String, String)>>(env: I) -> Vec<Override> {
    let mut out: Vec<Override> = env
        .into_iter()
        .filter_map(|(var, raw)| {
            let rest = var.strip_prefix(ENV_PREFIX)?;
            if !rest.contains("__") {
                return None;
            }
            let path = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
            Some(Override { var, path, raw })
        })
        .collect();
    out.sort_by(|a, b| a.var.cmp(&b.var));
    out
}

fn apply_overrides<T: DeserializeOwned>(
    tree: &mut yaml_serde::Value,
    overrides: &[Override],
) -> Result<T, ConfigError> {
    // Each value is first read as YAML (numbers, booleans, lists); if the result does not fit
    // the schema, the same text is tried as a plain string (a token that looks like a number).
    for ov in overrides {
        if ov.path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Env {
                var: ov.var.clone(),
                message: "empty key segment".into(),
            });
        }
        let typed: yaml_serde::Value = yaml_serde::from_str(&ov.raw)
            .unwrap_or_else(|_| yaml_serde::Value::String(ov.raw.clone()));
        set_path(tree, &ov.path, typed.clone());
        if yaml_serde::from_value::<T>(tree.clone()).is_err() {
            set_path(tree, &ov.path, yaml_serde::Value::String(ov.raw.clone()));
            if let Err(e) = yaml_serde::from_value::<T>(tree.clone()) {
                set_path(tree, &ov.path, typed);
                return Err(ConfigError::Env {
                    var: ov.var.clone(),
                    message: e.to_string(),
                });
            }
        }
    }
    yaml_serde::from_value(tree.clone()).map_err(|e| ConfigError::Env {
        var: overrides
            .iter()
            .map(|o| o.var.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        message: e.to_string(),
    })
}

fn set_path(tree: &mut yaml_serde::Value, path: &[String], value: yaml_serde::Value) {
    use yaml_serde::{Mapping, Value};
    let mut node = tree;
    for (i, key) in path.iter().enumerate() {
        if !node.is_mapping() {
            *node = Value::Mapping(Mapping::new());
        }
        let Some(map) = node.as_mapping_mut() else {
            return;
        };
        let k = Value::String(key.clone());
        if i + 1 == path.len() {
            map.insert(k, value);
            return;
        }
        if !map.contains_key(&k) {
            map.insert(k.clone(), Value::Mapping(Mapping::new()));
        }
        let Some(next) = map.get_mut(&k) else {
            return;
        };
        node = next;
    }
}

/// Renders a config for a person: YAML with every secret masked.
pub fn render<T: Serialize>(config: &T) -> String {
    yaml_serde::to_string(config).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
}

/// The process environment as pairs, for [`ConfigSource::load`].
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct TestFile {
        gateway: GatewayConfig,
        salad: TestSection,
    }

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct TestSection {
        baud: u32,
        name: String,
    }

    impl Default for TestSection {
        fn default() -> Self {
            Self {
                baud: 115200,
                name: "x".into(),
            }
        }
    }

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn empty_source_gives_defaults() {
        let c: TestFile = ConfigSource::from_text("").load(no_env()).unwrap();
        assert_eq!(c.salad.baud, 115200);
        assert_eq!(c.gateway.ports.executor, 8000);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = "gateway:\n  farm_name: lab\nsalad:\n  baud: 9600\n  bauds: 1\n";
        let err = ConfigSource::from_text(text)
            .load::<TestFile, _>(no_env())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bauds"), "{err}");
        assert!(err.contains(":5:"), "{err}");
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let text = "gateway:\n  ports:\n    salad: lots\n";
        let err = ConfigSource::from_text(text)
            .load::<TestFile, _>(no_env())
            .unwrap_err()
            .to_string();
        assert!(err.contains(":3:"), "{err}");
        assert!(err.contains("salad"), "{err}");
    }

    #[test]
    fn env_overrides_win_and_are_typed() {
        let text = "salad:\n  baud: 9600\n";
        let env = vec![
            ("DUTGATE_SALAD__BAUD".to_string(), "57600".to_string()),
            ("DUTGATE_SALAD__NAME".to_string(), "1234".to_string()),
            (
                "DUTGATE_GATEWAY__PORTS__PDU".to_string(),
                "18004".to_string(),
            ),
            ("DUTGATE_URL".to_string(), "ignored".to_string()),
        ];
        let c: TestFile = ConfigSource::from_text(text).load(env).unwrap();
        assert_eq!(c.salad.baud, 57600);
        assert_eq!(c.salad.name, "1234");
        assert_eq!(c.gateway.ports.pdu, 18004);
    }

    #[test]
    fn env_override_errors_name_the_variable() {
        let env = vec![("DUTGATE_SALAD__BAUDS".to_string(), "1".to_string())];
        let err = ConfigSource::from_text("")
            .load::<TestFile, _>(env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("DUTGATE_SALAD__BAUDS"), "{err}");
        let env = vec![("DUTGATE_SALAD__BAUD".to_string(), "fast".to_string())];
        assert!(
            ConfigSource::from_text("")
                .load::<TestFile, _>(env)
                .is_err()
        );
    }

    #[test]
    fn secrets_survive_overrides_and_are_masked_when_rendered() {
        let text = "gateway:\n  auth:\n    admin_token: s3cret\n";
        let env = vec![("DUTGATE_SALAD__BAUD".to_string(), "1".to_string())];
        let c: TestFile = ConfigSource::from_text(text).load(env).unwrap();
        assert!(
            c.gateway
                .auth
                .admin_token
                .as_ref()
                .unwrap()
                .matches("s3cret")
        );
        let shown = render(&c);
        assert!(!shown.contains("s3cret"));
        assert!(shown.contains(crate::secret::MASK));
    }
}
