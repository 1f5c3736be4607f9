//! Drivers registered by name. Each driver crate exposes its [`DriverFactory`]s; the pdu
//! service puts them into one [`Registry`] (one line per driver family).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{ConfigError, PduDriver};

/// Builds a driver from its config. Must not do I/O: connecting happens on first use, so
/// that building is cheap and a config error is told apart from an unreachable device.
pub type BuildFn = fn(yaml_serde::Value) -> Result<Box<dyn PduDriver>, ConfigError>;

/// One driver name and how to build it.
#[derive(Clone, Copy)]
pub struct DriverFactory {
    pub name: &'static str,
    /// One line for `GET /api/v1/drivers` and `dutctl`.
    pub summary: &'static str,
    pub build: BuildFn,
}

impl DriverFactory {
    pub fn build(&self, config: yaml_serde::Value) -> Result<Box<dyn PduDriver>, ConfigError> {
        (self.build)(config)
    }
}

impl std::fmt::Debug for DriverFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverFactory")
            .field("name", &self.name)
            .finish()
    }
}

/// What `GET /api/v1/drivers` lists.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct DriverInfo {
    pub name: String,
    pub summary: String,
}

#[derive(Debug, Clone, Default)]
pub struct Registry {
    factories: BTreeMap<&'static str, DriverFactory>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds factories; a later one with the same name replaces the earlier one.
    pub fn register(&mut self, factories: impl IntoIterator<Item = DriverFactory>) -> &mut Self {
        for f in factories {
            self.factories.insert(f.name, f);
        }
        self
    }

    pub fn get(&self, name: &str) -> Option<&DriverFactory> {
        self.factories.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.factories.keys().copied()
    }

    pub fn list(&self) -> Vec<DriverInfo> {
        self.factories
            .values()
            .map(|f| DriverInfo {
                name: f.name.to_string(),
                summary: f.summary.to_string(),
            })
            .collect()
    }

    /// Builds a driver by name; an unknown name is a config error on the `driver` field.
    pub fn build(
        &self,
        driver: &str,
        config: yaml_serde::Value,
    ) -> Result<Box<dyn PduDriver>, ConfigError> {
        let factory = self.get(driver).ok_or_else(|| {
            ConfigError::field(
                "driver",
                format!(
                    "unknown driver {driver:?}; known drivers: {}",
                    self.names().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        factory.build(config).map_err(|e| e.within("config"))
    }
}
