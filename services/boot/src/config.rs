//! The `boot` section of the gateway config.

use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::BootConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// What a machine boots when no job has set a boot config for it: the registration
    /// environment. Unset: such machines get a script that says so and retries.
    pub default: Option<BootConfig>,
    /// Base URL DUTs use to reach this service (`http://10.42.0.1:8003`). Unset: the host the
    /// DUT itself used (its `Host` header), else `gateway.public_host` and the boot port.
    pub public_url: Option<String>,
    /// Delay before a failed or refused boot asks again, in seconds.
    pub retry_delay_seconds: u64,
    /// Directories `file://` URLs may point into (served in place, never copied). A boot
    /// config naming a file elsewhere is refused: jobs must not read the gateway's files.
    pub file_roots: Vec<PathBuf>,
    /// Directory of the DUT image that `dutgate dut-image` builds, served to the DUT networks
    /// at `<public URL>/dut-image/vmlinuz` and `/dut-image/initramfs.cpio`. Boot configs
    /// naming those URLs are served from the directory in place. Unset:
    /// `<state_dir>/dut-image`.
    pub dut_image_dir: Option<PathBuf>,
    /// URL prefixes DUTs can fetch directly (the gateway's own S3 storage); such URLs are put
    /// in scripts unchanged. Unset: `http://<public_host>:<ports.s3>/`.
    pub direct_url_prefixes: Option<Vec<String>>,
    /// Peers on these networks are served any machine's job boot script without checking
    /// that they are that machine. Only for setups where DUTs cannot be told apart by
    /// address: `dutgate up --virtual-duts` sets 127.0.0.0/8, because QEMU user networking
    /// shows every virtual DUT as 127.0.0.1. Default: none.
    pub unverified_peer_networks: Vec<IpNet>,
    /// The neighbour table consulted to match a peer's address with the MAC it asks for.
    pub arp_table: PathBuf,
    pub cache: CacheConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default: None,
            public_url: None,
            retry_delay_seconds: 10,
            file_roots: Vec::new(),
            dut_image_dir: None,
            direct_url_prefixes: None,
            unverified_peer_networks: Vec::new(),
            arp_table: PathBuf::from(crate::peer::ARP_TABLE),
            cache: CacheConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Where cached artifacts live. Unset: `<state_dir>/boot/artifacts`.
    pub dir: Option<PathBuf>,
    /// Size limit of the cache; least recently used artifacts are evicted beyond it.
    pub max_size_bytes: u64,
    /// Largest single artifact the cache downloads; a bigger one is refused (before its body
    /// when the upstream announces its length, else as soon as the limit is crossed).
    pub max_artifact_bytes: u64,
    /// After this many seconds a cached artifact is revalidated with the upstream
    /// (`If-None-Match` / `If-Modified-Since`) before it is served again. Artifacts pinned by
    /// a sha256 are never revalidated.
    pub ttl_seconds: u64,
    /// Time to connect to an upstream.
    pub connect_timeout_seconds: u64,
    /// Longest silence from an upstream during a download before it is abandoned.
    pub read_timeout_seconds: u64,
    /// Time budget of a revalidation request; on expiry the cached copy is served.
    pub revalidate_timeout_seconds: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_size_bytes: 20 * 1024 * 1024 * 1024,
            max_artifact_bytes: 2 * 1024 * 1024 * 1024,
            ttl_seconds: 3600,
            connect_timeout_seconds: 10,
            read_timeout_seconds: 60,
            revalidate_timeout_seconds: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_parse_and_unknown_keys_fail() {
        let c: Config = yaml_serde::from_str("{}").unwrap();
        assert_eq!(c.retry_delay_seconds, 10);
        assert!(c.default.is_none());
        let c: Config = yaml_serde::from_str(
            "default:\n  kernel: {url: 'http://x/vmlinuz', cmdline: 'console=ttyS0'}\n  initramfs: [{url: 'http://x/initrd'}]\ncache: {max_size_bytes: 1000}\n",
        )
        .unwrap();
        assert_eq!(c.cache.max_size_bytes, 1000);
        assert_eq!(c.default.unwrap().initramfs.len(), 1);
        assert!(yaml_serde::from_str::<Config>("cache: {ttl: 1}").is_err());
    }
}
