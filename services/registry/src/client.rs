//! Typed client for the registry's own API (other services, `dutctl`, benchmarks). Image pulls
//! go through ordinary OCI tools, not this client.

use dutgate_core::Secret;
use dutgate_core::client::{ApiClient, ClientError};

use crate::stats::StatsSnapshot;

#[derive(Debug, Clone)]
pub struct RegistryClient {
    api: ApiClient,
}

impl RegistryClient {
    /// `base` is the registry's URL, e.g. `http://gateway:8002`.
    pub fn new(base: impl Into<String>, token: Option<Secret>) -> Self {
        Self {
            api: ApiClient::new(base, token),
        }
    }

    /// The cache counters (`GET /api/v1/registry/stats`).
    pub async fn stats(&self) -> Result<StatsSnapshot, ClientError> {
        self.api.get("/api/v1/registry/stats").await
    }
}
