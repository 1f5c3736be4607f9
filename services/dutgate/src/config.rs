//! The whole gateway config file: the shared `gateway` section plus one section per service,
//! each section type owned by its service crate.

use std::path::{Path, PathBuf};

use dutgate_core::config::{ConfigError, ConfigSource, GatewayConfig, process_env};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub gateway: GatewayConfig,
    pub executor: dutgate_executor::Config,
    pub mars: dutgate_mars::Config,
    pub registry: dutgate_registry::Config,
    pub boot: dutgate_boot::Config,
    pub pdu: dutgate_pdu::Config,
    pub salad: dutgate_salad::Config,
    pub s3: dutgate_storage::Config,
}

/// A loaded config and where it came from.
pub struct Loaded {
    pub config: FileConfig,
    pub source: ConfigSource,
}

/// Loads the config: file (or defaults), then `DUTGATE_*__*` env overrides, then the
/// `--state-dir` flag, which wins over both. The state dir is made absolute so that child
/// processes and messages agree on it.
///
/// A config file must name the DUT networks ([`require_dut_networks`]), except for
/// `dutgate up --virtual-duts N` (`virtual_farm`), whose DUTs are on loopback.
pub fn load(
    explicit: Option<&Path>,
    state_dir: Option<&Path>,
    virtual_farm: bool,
) -> Result<Loaded, ConfigError> {
    let source = ConfigSource::locate(explicit)?;
    let env = process_env();
    let mut config: FileConfig = source.load(env.clone())?;
    if !virtual_farm {
        require_dut_networks(&source, env.keys().map(String::as_str))?;
    }
    if let Some(dir) = state_dir {
        config.gateway.state_dir = dir.to_path_buf();
    }
    config.gateway.state_dir = absolute(&config.gateway.state_dir);
    Ok(Loaded { config, source })
}

/// The environment variable that sets `gateway.auth.dut_networks`.
pub const DUT_NETWORKS_ENV: &str = "DUTGATE_GATEWAY__AUTH__DUT_NETWORKS";

/// A config file on a real farm must say which networks the DUTs live on: the built-in
/// default (loopback and QEMU's user network) would make every process on the gateway a
/// "DUT". Only a config that sets nothing at all (no file, or an empty one) gets that
/// default, as `dutgate up` with no file always did. `env_keys` are the names of the
/// process's environment variables: setting `DUTGATE_GATEWAY__AUTH__DUT_NETWORKS` counts.
pub fn require_dut_networks<'a>(
    source: &ConfigSource,
    mut env_keys: impl Iterator<Item = &'a str>,
) -> Result<(), ConfigError> {
    if source.path.is_none() || source.text.trim().is_empty() {
        return Ok(());
    }
    if env_keys.any(|k| k.eq_ignore_ascii_case(DUT_NETWORKS_ENV)) {
        return Ok(());
    }
    // The file parsed already (load ran first): only the key's presence is in question.
    let tree: yaml_serde::Value = yaml_serde::from_str(&source.text).unwrap_or_default();
    let set = tree
        .get("gateway")
        .and_then(|g| g.get("auth"))
        .and_then(|a| a.get("dut_networks"))
        .is_some_and(|v| !v.is_null());
    if set {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        location: source.to_string(),
        message: "gateway.auth.dut_networks is not set: list the networks your DUTs boot on \
                  (the loopback default is only for `dutgate up` without a config file or \
                  with --virtual-duts)"
            .into(),
    })
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ConfigSource {
        ConfigSource {
            path: Some(PathBuf::from("/etc/dutgate/gateway.yml")),
            text: text.into(),
        }
    }

    #[test]
    fn dut_networks_required_in_a_file() {
        let none = std::iter::empty::<&str>;
        let e = require_dut_networks(&file("gateway: {farm_name: lab}\n"), none()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/etc/dutgate/gateway.yml: gateway.auth.dut_networks is not set"));
        assert!(!msg.contains('\n'), "{msg}");
        assert!(require_dut_networks(&file("gateway: {auth: {}}\n"), none()).is_err());
        assert!(
            require_dut_networks(&file("gateway: {auth: {dut_networks: ~}}\n"), none()).is_err()
        );
        require_dut_networks(
            &file("gateway: {auth: {dut_networks: [10.77.0.0/24]}}\n"),
            none(),
        )
        .unwrap();
        require_dut_networks(&file("gateway: {auth: {dut_networks: []}}\n"), none()).unwrap();
        require_dut_networks(&file("gateway: {}\n"), [DUT_NETWORKS_ENV].into_iter()).unwrap();
        require_dut_networks(&file(""), none()).unwrap();
        require_dut_networks(&ConfigSource::from_text(""), none()).unwrap();
    }
}
