//! The set of PDUs the service runs: declared in the config or added over REST (persisted).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dutgate_pdu_driver::{ConfigError, DriverError, DriverInfo, PduDriver, Registry};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::actor::Tuning;
use crate::pdu::{Pdu, PduSetup, PortView, Source};
use crate::store::{Store, StoreError, StoredPdu};
use crate::{Config, PduSpec};

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("invalid driver config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot talk to the device: {0}")]
    Unreachable(String),
    #[error("a PDU named {0:?} already exists")]
    Exists(String),
    #[error("PDU {0:?} is declared in the config file; remove it there")]
    Declared(String),
    #[error("no PDU named {0:?}")]
    NoSuchPdu(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pdudaemon(#[from] crate::pdudaemon::StartError),
}

/// A PDU in `GET /api/v1/pdus`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PduInfo {
    pub name: String,
    pub driver: String,
    pub source: Source,
    /// The driver config with secrets masked.
    #[schema(value_type = Value)]
    pub config: serde_json::Value,
    pub port_count: usize,
    /// Unix ms of the last poll.
    pub last_polled: Option<i64>,
    /// Why the last poll failed, if it did.
    pub error: Option<String>,
}

/// `GET /api/v1/pdus/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PduDetail {
    #[serde(flatten)]
    pub info: PduInfo,
    pub ports: Vec<PortView>,
}

/// `POST /api/v1/pdus`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPdu {
    pub name: String,
    /// One of `GET /api/v1/drivers`.
    pub driver: String,
    /// The driver's config (docs/pdu.md).
    #[serde(default)]
    #[schema(value_type = Value)]
    pub config: serde_json::Value,
    /// Ids of the ports nobody may switch.
    #[serde(default)]
    pub reserved: Vec<String>,
    /// Port id to the label shown instead of the device's.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub poll_interval_seconds: Option<f64>,
}

impl NewPdu {
    fn into_parts(self) -> (String, PduSpec) {
        (
            self.name,
            PduSpec {
                driver: self.driver,
                config: self.config,
                reserved: self.reserved,
                labels: self.labels,
                poll_interval_seconds: self.poll_interval_seconds,
            },
        )
    }
}

#[derive(Clone)]
pub struct PduService {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    store: Store,
    tuning: Arc<Tuning>,
    default_off: Duration,
    max_off: Duration,
    pdus: tokio::sync::RwLock<BTreeMap<String, Arc<Pdu>>>,
    shutdown: CancellationToken,
}

fn secs(v: f64, default: f64) -> Duration {
    Duration::try_from_secs_f64(v).unwrap_or_else(|_| Duration::from_secs_f64(default))
}

/// Replaces secret-looking values (community strings, passwords, tokens) with a mask.
pub fn mask_secrets(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let k_l = k.to_ascii_lowercase();
                    let secret = ["password", "community", "secret", "token", "passphrase"]
                        .iter()
                        .any(|s| k_l.contains(s));
                    let v = if secret && !v.is_null() {
                        Value::String(dutgate_core::secret::MASK.into())
                    } else {
                        mask_secrets(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(mask_secrets).collect()),
        other => other.clone(),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn to_yaml(v: &serde_json::Value) -> Result<yaml_serde::Value, ConfigError> {
    yaml_serde::to_value(v).map_err(|e| ConfigError::field("config", e.to_string()))
}

impl PduService {
    /// Starts every PDU of the config and of the store. A config PDU whose driver config is
    /// invalid stops the service (a typo must not go unnoticed); an unreachable one starts
    /// anyway and shows its error until it answers.
    pub async fn start(
        store: Store,
        config: Config,
        shutdown: CancellationToken,
    ) -> Result<Self, ManageError> {
        Self::start_with(crate::drivers::registry(), store, config, shutdown).await
    }

    pub async fn start_with(
        registry: Registry,
        store: Store,
        config: Config,
        shutdown: CancellationToken,
    ) -> Result<Self, ManageError> {
        let tuning = Arc::new(Tuning {
            poll_interval: secs(config.poll_interval_seconds, 10.0).max(Duration::from_millis(50)),
            op_timeout: secs(config.operation_timeout_seconds, 10.0),
            retries: config.retries,
            retry_backoff: Duration::from_millis(config.retry_backoff_ms),
            settle_timeout: secs(config.settle_timeout_seconds, 10.0),
            readback_interval: Duration::from_millis(config.readback_interval_ms.max(10)),
            verify_interval: Duration::from_millis(config.verify_interval_ms.max(10)),
            history_per_port: config.history_per_port,
        });
        let svc = Self {
            inner: Arc::new(Inner {
                registry,
                store,
                tuning,
                default_off: secs(config.default_off_seconds, 30.0),
                max_off: secs(config.max_off_seconds, 3600.0),
                pdus: Default::default(),
                shutdown,
            }),
        };
        for (name, spec) in &config.pdus {
            if !valid_name(name) {
                return Err(ManageError::Config(ConfigError::field(
                    format!("pdus.{name}"),
                    "PDU names use letters, digits, '-', '_' and '.' (at most 64)",
                )));
            }
            let driver = svc
                .build(spec)
                .map_err(|e| ManageError::Config(e.within(&format!("pdus.{name}"))))?;
            svc.launch(name, spec, Source::Config, driver).await?;
        }
        for stored in svc.inner.store.pdus().await? {
            if config.pdus.contains_key(&stored.name) {
                tracing::warn!(pdu = %stored.name, "PDU added over REST is also declared in the config; the config wins");
                continue;
            }
            let spec = PduSpec {
                driver: stored.driver,
                config: stored.config,
                reserved: stored.reserved,
                labels: stored.labels,
                poll_interval_seconds: stored.poll_interval_seconds,
            };
            match svc.build(&spec) {
                Ok(driver) => svc.launch(&stored.name, &spec, Source::Api, driver).await?,
                Err(e) => {
                    tracing::error!(pdu = %stored.name, error = %e, "stored PDU has an invalid config; not started")
                }
            }
        }
        Ok(svc)
    }

    fn build(&self, spec: &PduSpec) -> Result<Box<dyn PduDriver>, ConfigError> {
        if let Some(p) = spec.poll_interval_seconds
            && !(p.is_finite() && p > 0.0)
        {
            return Err(ConfigError::field(
                "poll_interval_seconds",
                "must be a positive number of seconds",
            ));
        }
        let value = to_yaml(&spec.config)?;
        self.inner.registry.build(&spec.driver, value)
    }

    async fn launch(
        &self,
        name: &str,
        spec: &PduSpec,
        source: Source,
        driver: Box<dyn PduDriver>,
    ) -> Result<(), ManageError> {
        let setup = PduSetup {
            name: name.to_string(),
            driver_name: spec.driver.clone(),
            source,
            config: spec.config.clone(),
            driver,
            reserved: spec.reserved.clone(),
            labels: spec.labels.clone(),
            poll_interval: spec
                .poll_interval_seconds
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .map(|d| d.max(Duration::from_millis(50))),
        };
        let pdu = Pdu::start(
            setup,
            self.inner.store.clone(),
            self.inner.tuning.clone(),
            &self.inner.shutdown,
        )
        .await?;
        tracing::info!(pdu = %name, driver = %spec.driver, ?source, "PDU started");
        self.inner.pdus.write().await.insert(name.to_string(), pdu);
        Ok(())
    }

    pub fn drivers(&self) -> Vec<DriverInfo> {
        self.inner.registry.list()
    }

    pub fn default_off(&self) -> Duration {
        self.inner.default_off
    }

    pub fn max_off(&self) -> Duration {
        self.inner.max_off
    }

    pub async fn get(&self, name: &str) -> Option<Arc<Pdu>> {
        self.inner.pdus.read().await.get(name).cloned()
    }

    pub async fn list(&self) -> Vec<PduInfo> {
        let pdus: Vec<Arc<Pdu>> = self.inner.pdus.read().await.values().cloned().collect();
        pdus.iter().map(|p| Self::info(p)).collect()
    }

    pub fn info(p: &Pdu) -> PduInfo {
        let (port_count, last_polled, error) = p.summary();
        PduInfo {
            name: p.name.clone(),
            driver: p.driver.clone(),
            source: p.source,
            config: mask_secrets(&p.config),
            port_count,
            last_polled,
            error,
        }
    }

    pub fn detail(p: &Pdu) -> PduDetail {
        PduDetail {
            info: Self::info(p),
            ports: p.ports(),
        }
    }

    /// Adds a PDU after checking that its config is valid and that the device answers.
    pub async fn add(&self, new: NewPdu) -> Result<PduDetail, ManageError> {
        let (name, spec) = new.into_parts();
        if !valid_name(&name) {
            return Err(ManageError::Config(ConfigError::field(
                "name",
                "PDU names use letters, digits, '-', '_' and '.' (at most 64)",
            )));
        }
        if self.get(&name).await.is_some() {
            return Err(ManageError::Exists(name));
        }
        let mut driver = self.build(&spec)?;
        // Talk to the device before accepting it: list the ports, read them all.
        let budget = self.inner.tuning.op_timeout;
        let check = async {
            let ports = driver.ports().await?;
            if ports.is_empty() {
                return Err(DriverError::protocol(&name, "the device lists no ports"));
            }
            driver.get_all().await?;
            Ok::<_, DriverError>(())
        };
        match tokio::time::timeout(budget * 2, check).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                driver.shutdown().await;
                return Err(ManageError::Unreachable(e.to_string()));
            }
            Err(_) => {
                driver.shutdown().await;
                return Err(ManageError::Unreachable(format!(
                    "no answer within {:.1} s",
                    (budget * 2).as_secs_f64()
                )));
            }
        }
        self.inner
            .store
            .insert_pdu(&StoredPdu {
                name: name.clone(),
                driver: spec.driver.clone(),
                config: spec.config.clone(),
                reserved: spec.reserved.clone(),
                labels: spec.labels.clone(),
                poll_interval_seconds: spec.poll_interval_seconds,
            })
            .await
            .map_err(|e| match e {
                StoreError::Exists(n) => ManageError::Exists(n),
                e => ManageError::Store(e),
            })?;
        self.launch(&name, &spec, Source::Api, driver).await?;
        let pdu = self
            .get(&name)
            .await
            .ok_or_else(|| ManageError::NoSuchPdu(name.clone()))?;
        // Fill the cache before answering so the caller sees real states.
        if let Err(e) = pdu.refresh().await {
            tracing::warn!(pdu = %name, error = %e, "first poll after adding failed");
        }
        Ok(Self::detail(&pdu))
    }

    pub async fn remove(&self, name: &str) -> Result<(), ManageError> {
        let pdu = self
            .get(name)
            .await
            .ok_or_else(|| ManageError::NoSuchPdu(name.to_string()))?;
        if pdu.source == Source::Config {
            return Err(ManageError::Declared(name.to_string()));
        }
        self.inner.pdus.write().await.remove(name);
        pdu.stop().await;
        self.inner.store.delete_pdu(name).await?;
        tracing::info!(pdu = %name, "PDU removed");
        Ok(())
    }

    /// Stops every actor (service shutdown).
    pub async fn stop_all(&self) {
        let pdus: Vec<Arc<Pdu>> = std::mem::take(&mut *self.inner.pdus.write().await)
            .into_values()
            .collect();
        for p in pdus {
            p.stop().await;
        }
    }
}
