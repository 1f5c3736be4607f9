//! Typed client of the boot service's REST API (the executor sets and clears boot configs).

use dutgate_core::client::{ApiClient, ClientError};
use dutgate_core::{MachineId, Secret};
use reqwest::Method;

use crate::cache::CacheStats;
use crate::model::{BootConfig, StoredBootConfig};

#[derive(Debug, Clone)]
pub struct BootClient {
    api: ApiClient,
}

impl BootClient {
    /// `base` is the service URL (`http://127.0.0.1:8003`); `token` a user or admin token.
    pub fn new(base: impl Into<String>, token: Option<Secret>) -> Self {
        Self {
            api: ApiClient::new(base, token),
        }
    }

    pub fn from_api(api: ApiClient) -> Self {
        Self { api }
    }

    /// Sets (or replaces) what `mac` boots next.
    pub async fn put(
        &self,
        mac: MachineId,
        config: &BootConfig,
    ) -> Result<StoredBootConfig, ClientError> {
        self.api.put(&format!("/api/v1/boot/{mac}"), config).await
    }

    /// The config set for `mac`, or `None` when it boots the default.
    pub async fn get(&self, mac: MachineId) -> Result<Option<StoredBootConfig>, ClientError> {
        match self.api.get(&format!("/api/v1/boot/{mac}")).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Clears the config of `mac`. With `job_id`, only if that job set it (a conflict error
    /// otherwise). Clearing a machine without a config succeeds.
    pub async fn delete(&self, mac: MachineId, job_id: Option<&str>) -> Result<(), ClientError> {
        let mut path = format!("/api/v1/boot/{mac}");
        if let Some(job) = job_id {
            let mut q = reqwest::Url::parse("http://q/").map_err(|e| ClientError::Decode {
                url: path.clone(),
                message: e.to_string(),
            })?;
            q.query_pairs_mut().append_pair("job_id", job);
            path = format!("{path}?{}", q.query().unwrap_or_default());
        }
        let rb = self.api.request(Method::DELETE, &path);
        self.api.send::<()>(rb, &path).await
    }

    pub async fn list(&self) -> Result<Vec<StoredBootConfig>, ClientError> {
        self.api.get("/api/v1/boot").await
    }

    pub async fn cache_stats(&self) -> Result<CacheStats, ClientError> {
        self.api.get("/api/v1/boot-cache").await
    }
}
