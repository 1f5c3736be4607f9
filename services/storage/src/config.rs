//! The `s3` section of the gateway config: which object store the gateway uses, and the
//! embedded endpoint's settings. Both `dutgate s3` (the embedded endpoint) and the executor's
//! [`JobStorage`](crate::JobStorage) read this one section, so they always agree.

use std::path::PathBuf;

use dutgate_core::Secret;
use dutgate_core::config::GatewayConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `embedded` (default): `dutgate s3` serves S3 from the state dir. `external`: an S3
    /// server (MinIO, Garage, Ceph RGW, …) at `url`, with the admin key pair below.
    pub backend: Backend,
    /// External backend: the S3 endpoint the gateway's services use (e.g.
    /// `http://minio.lab:9000`). Embedded backend: ignored (the gateway's
    /// `internal_host` and `ports.s3` are used).
    pub url: Option<String>,
    /// Endpoint DUTs are given (`minio_url`/`s3_url` in jobs). Default: embedded
    /// `http://<public_host>:<ports.s3>`; external: `url`.
    pub dut_url: Option<String>,
    /// Region written into signatures. S3-compatible servers mostly ignore it.
    pub region: String,
    /// Admin key pair. Embedded: unset means generated once into
    /// `<state_dir>/s3/admin-keys.json` (mode 0600). External: required.
    pub access_key: Option<String>,
    /// Secret of the admin key pair (set together with `access_key`).
    pub secret_key: Option<Secret>,
    /// Prefix of job bucket names (`<prefix><job id>`); lower-case letters, digits, `-`.
    pub bucket_prefix: String,
    /// Embedded: where objects live. Default `<state_dir>/s3/data`.
    pub data_dir: Option<PathBuf>,
    /// Timeout of one control request (bucket create/delete, list, credentials).
    pub request_timeout_seconds: f64,
    /// Transfers (object put/get) fail when no byte moves for this long.
    pub transfer_idle_timeout_seconds: f64,
    /// Largest unpacked size of a job's initial-state tarball (bytes); a larger one (or a
    /// decompression bomb) fails the upload instead of filling the disk.
    pub max_initial_state_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            url: None,
            dut_url: None,
            region: "us-east-1".into(),
            access_key: None,
            secret_key: None,
            bucket_prefix: "job-".into(),
            data_dir: None,
            request_timeout_seconds: 30.0,
            transfer_idle_timeout_seconds: 60.0,
            max_initial_state_bytes: 4 << 30,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `dutgate s3`: per-job key pairs that open only their bucket.
    Embedded,
    /// Any S3 server. Job credentials are the admin key pair (see docs/storage.md).
    External,
}

impl Config {
    /// The directory of the embedded endpoint's state (`<state_dir>/s3`).
    pub fn state_dir(gateway: &GatewayConfig) -> PathBuf {
        gateway.state_dir.join("s3")
    }

    pub fn data_dir(&self, gateway: &GatewayConfig) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| Self::state_dir(gateway).join("data"))
    }

    /// The endpoint the gateway's own services use.
    pub fn service_url(&self, gateway: &GatewayConfig) -> Option<String> {
        match self.backend {
            Backend::Embedded => Some(format!(
                "http://{}:{}",
                gateway.internal_host, gateway.ports.s3
            )),
            Backend::External => self.url.clone(),
        }
    }

    /// The endpoint handed to DUTs.
    pub fn dut_url(&self, gateway: &GatewayConfig) -> Option<String> {
        if let Some(u) = &self.dut_url {
            return Some(u.clone());
        }
        match self.backend {
            Backend::Embedded => Some(format!(
                "http://{}:{}",
                gateway.public_host, gateway.ports.s3
            )),
            Backend::External => self.url.clone(),
        }
    }

    pub fn request_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.request_timeout_seconds.clamp(0.1, 3600.0))
    }

    pub fn transfer_idle_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.transfer_idle_timeout_seconds.clamp(0.1, 3600.0))
    }
}
