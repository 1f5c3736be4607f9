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
    dut_image_defaults(&mut config);
    Ok(Loaded { config, source })
}

/// The job template variables that name the DUT image, and the image files they point at.
pub const DUT_IMAGE_VARS: [(&str, &str); 2] = [
    ("dut_kernel_url", "vmlinuz"),
    ("dut_initramfs_url", "initramfs.cpio"),
];

/// `executor.template_vars.dut_kernel_url`/`dut_initramfs_url` default to the DUT image on
/// the boot service (`http://<public_host>:<boot port>/dut-image/…`, or under
/// `boot.public_url`), which `dutgate dut-image` builds: the trainer's jobs and users' jobs
/// boot it with nothing else serving it. A value set in the file or the environment wins.
pub fn dut_image_defaults(config: &mut FileConfig) {
    for (var, file) in DUT_IMAGE_VARS {
        if !config.executor.template_vars.contains_key(var) {
            let url = dutgate_boot::dut_image::url(&config.boot, &config.gateway, file);
            config.executor.template_vars.insert(var.to_string(), url);
        }
    }
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
    fn dut_image_urls_default_to_the_boot_service() {
        let mut c: FileConfig = yaml_serde::from_str(
            "gateway: {public_host: 10.42.0.1, ports: {boot: 8103}}\nexecutor: {template_vars: {other: x}}\n",
        )
        .unwrap();
        dut_image_defaults(&mut c);
        let vars = &c.executor.template_vars;
        assert_eq!(
            vars["dut_kernel_url"],
            "http://10.42.0.1:8103/dut-image/vmlinuz"
        );
        assert_eq!(
            vars["dut_initramfs_url"],
            "http://10.42.0.1:8103/dut-image/initramfs.cpio"
        );
        assert_eq!(vars["other"], "x");
        let mut c: FileConfig = yaml_serde::from_str(
            "boot: {public_url: 'http://gw.lan:80/'}\nexecutor: {template_vars: {dut_kernel_url: 'https://elsewhere/k'}}\n",
        )
        .unwrap();
        dut_image_defaults(&mut c);
        let vars = &c.executor.template_vars;
        assert_eq!(vars["dut_kernel_url"], "https://elsewhere/k");
        assert_eq!(
            vars["dut_initramfs_url"],
            "http://gw.lan:80/dut-image/initramfs.cpio"
        );
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
