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
pub fn load(explicit: Option<&Path>, state_dir: Option<&Path>) -> Result<Loaded, ConfigError> {
    let source = ConfigSource::locate(explicit)?;
    let mut config: FileConfig = source.load(process_env())?;
    if let Some(dir) = state_dir {
        config.gateway.state_dir = dir.to_path_buf();
    }
    config.gateway.state_dir = absolute(&config.gateway.state_dir);
    Ok(Loaded { config, source })
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(p))
        .unwrap_or_else(|_| p.to_path_buf())
}
