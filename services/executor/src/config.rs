//! The `executor` section of the gateway config (docs/jobs.md §8).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dutgate_core::ServiceName;
use dutgate_core::config::GatewayConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This executor's name (jobs it dispatched carry it). Unset: the host name.
    pub name: Option<String>,
    /// Program and leading arguments started as `<cmd…> <id>` per job. Unset: this binary
    /// with `job`.
    pub job_command: Option<Vec<PathBuf>>,
    /// SIGTERM → SIGKILL delay when a running job is cancelled.
    pub cancel_grace_seconds: f64,
    /// Niceness added to job processes (0–19): with hundreds of jobs running, the services
    /// (dispatch, PDU, consoles) keep their share of the CPU.
    pub job_nice: i32,
    /// TTL of job leases; unset: mars' default.
    pub lease_ttl_seconds: Option<u64>,
    /// Largest submission body (job text + initial tarball).
    pub max_upload_bytes: usize,
    /// Finished jobs' files are deleted after this many days; 0 keeps them forever.
    pub artifacts_retention_days: f64,
    pub mars_url: Option<String>,
    pub pdu_url: Option<String>,
    pub boot_url: Option<String>,
    pub salad_url: Option<String>,
    /// Host of salad's console ports. Unset: `gateway.internal_host`.
    pub console_host: Option<String>,
    /// The `registry` template variable. Unset: `<public_host>:<registry port>`.
    pub registry: Option<String>,
    /// Extra template variables (valve-infra's `EXECUTOR_JOB__*`).
    pub template_vars: BTreeMap<String, String>,
    /// Issue each job's bucket keys for its machine's recorded address only (the embedded S3
    /// endpoint refuses them from any other address). Off only where DUTs reach the gateway
    /// through NAT, as under QEMU user networking (`dutgate up --virtual-duts` without
    /// `--dut-bridge`), where every DUT comes from 127.0.0.1.
    pub job_keys_from_machine_address: bool,
    /// Who may read (show, list, events, console) other users' jobs: `all` (as LAVA's public
    /// jobs) or `owner` (only their owner and admins). Cancelling, typing into a job's console
    /// and downloading its artifacts are always for its owner and admins only.
    pub job_visibility: JobVisibility,
    /// Networks (CIDRs) whose clients may submit jobs and list the DUTs without a token, as
    /// ci-tron's `executorctl` does: typically the gateway's own CI runner containers. Such a
    /// job's owner is `network:<cidr>`. Never list a DUT network here. Empty: every
    /// submission needs a token.
    pub trusted_client_networks: Vec<ipnet::IpNet>,
    /// Webhooks sent on every job's end (docs/notifications.md): `url`, `secret_file`,
    /// `events` (`[job_end]`). Deliveries go through the outbound policy.
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// Object storage for job buckets: the gateway's `s3` section, set by the `dutgate`
    /// binary (not a key of the `executor` section). Unset: jobs run without a bucket.
    #[serde(skip)]
    pub object_store: Option<crate::storage::ObjectStore>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobVisibility {
    #[default]
    All,
    Owner,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: None,
            job_command: None,
            cancel_grace_seconds: 30.0,
            job_nice: 5,
            lease_ttl_seconds: None,
            max_upload_bytes: 256 * 1024 * 1024,
            artifacts_retention_days: 30.0,
            mars_url: None,
            pdu_url: None,
            boot_url: None,
            salad_url: None,
            console_host: None,
            registry: None,
            template_vars: BTreeMap::new(),
            job_keys_from_machine_address: true,
            job_visibility: JobVisibility::All,
            trusted_client_networks: Vec::new(),
            webhooks: Vec::new(),
            object_store: None,
        }
    }
}

impl Config {
    pub fn executor_name(&self) -> String {
        self.name.clone().unwrap_or_else(host_name)
    }

    pub fn cancel_grace(&self) -> Duration {
        Duration::try_from_secs_f64(self.cancel_grace_seconds).unwrap_or(Duration::from_secs(30))
    }

    pub fn url_of(&self, gw: &GatewayConfig, service: ServiceName) -> String {
        let configured = match service {
            ServiceName::Mars => &self.mars_url,
            ServiceName::Pdu => &self.pdu_url,
            ServiceName::Boot => &self.boot_url,
            ServiceName::Salad => &self.salad_url,
            _ => &None,
        };
        configured
            .clone()
            .unwrap_or_else(|| gw.internal_url(service))
    }

    pub fn console_host(&self, gw: &GatewayConfig) -> String {
        self.console_host
            .clone()
            .unwrap_or_else(|| gw.internal_host.clone())
    }

    pub fn registry(&self, gw: &GatewayConfig) -> String {
        self.registry
            .clone()
            .unwrap_or_else(|| format!("{}:{}", gw.public_host, gw.ports.registry))
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=86_400.0).contains(&self.cancel_grace_seconds) {
            return Err("executor.cancel_grace_seconds: must be between 0 and 86400".into());
        }
        if !(0..=19).contains(&self.job_nice) {
            return Err("executor.job_nice: must be between 0 and 19".into());
        }
        if self.artifacts_retention_days < 0.0 || !self.artifacts_retention_days.is_finite() {
            return Err("executor.artifacts_retention_days: must be >= 0".into());
        }
        if self.max_upload_bytes < 64 * 1024 {
            return Err("executor.max_upload_bytes: must be at least 65536".into());
        }
        if let Some(cmd) = &self.job_command
            && cmd.is_empty()
        {
            return Err("executor.job_command: must name a program".into());
        }
        if let Some(ttl) = self.lease_ttl_seconds
            && !(3..=3600).contains(&ttl)
        {
            return Err("executor.lease_ttl_seconds: must be between 3 and 3600".into());
        }
        Ok(())
    }
}

/// The host name (for the default executor name).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
