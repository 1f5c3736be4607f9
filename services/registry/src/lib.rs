//! dutgate-registry: an OCI distribution pull-through cache for several upstreams (design §7).
//!
//! Code map:
//! - [`reference`]: strict parsers for names, tags, digests and `/v2/` paths (untrusted input).
//! - [`upstream`]: upstream selection by name prefix, auth (Basic, bearer tokens), timeouts.
//! - [`blobs`]: content-addressed blob store, single-flight downloads, LRU eviction.
//! - [`manifests`]: manifests by digest (forever) and tags (TTL, revalidation, stale-if-error).
//! - [`api`]: the HTTP routes; [`error`]: spec error bodies; [`stats`]: counters and metrics.
//! - [`client`]: typed client for `/api/v1/registry/stats`.
//! - [`testkit`]: writes seeded OCI image layouts for tests and benchmarks.
//!
//! Invariant: the index (blob sizes and access times, tag records) lives next to the content on
//! the local disk, never in the shared database: it describes this host's files only.

pub mod api;
pub mod blobs;
pub mod client;
pub mod config;
pub mod error;
pub mod manifests;
pub mod reference;
pub mod stats;
mod telemetry;
pub mod testkit;
pub mod upstream;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_core::{ServiceContext, ServiceError};

pub use api::openapi;
pub use client::RegistryClient;
pub use config::{Config, UpstreamConfig};
pub use stats::StatsSnapshot;

/// The cache: blob store, manifest store, upstreams and counters.
pub struct Registry {
    pub blobs: Arc<blobs::BlobStore>,
    pub manifests: manifests::Manifests,
    pub upstreams: upstream::Upstreams,
    pub stats: Arc<stats::Stats>,
}

impl Registry {
    /// Validates `config` and opens the stores under `cache_dir`.
    pub async fn open(config: &Config, cache_dir: &Path) -> Result<Arc<Self>, ServiceError> {
        config
            .validate()
            .map_err(|e| ServiceError::Startup(e.to_string()))?;
        let upstreams = upstream::Upstreams::new(config)
            .map_err(|e| ServiceError::Startup(format!("registry: HTTP client: {e}")))?;
        let stats = Arc::new(stats::Stats::default());
        let dir = cache_dir.to_path_buf();
        let max = config.max_cache_bytes;
        let ttl = Duration::from_secs(config.tag_ttl_seconds);
        let st = stats.clone();
        let (blobs, manifests) = tokio::task::spawn_blocking(move || {
            let blobs = blobs::BlobStore::open(&dir, max, st.clone())?;
            let manifests = manifests::Manifests::open(&dir, ttl, st)?;
            Ok::<_, std::io::Error>((blobs, manifests))
        })
        .await
        .map_err(|e| ServiceError::Startup(e.to_string()))?
        .map_err(|e| {
            ServiceError::Startup(format!(
                "registry: cache directory {}: {e}",
                cache_dir.display()
            ))
        })?;
        Ok(Arc::new(Self {
            blobs,
            manifests,
            upstreams,
            stats,
        }))
    }

    /// The service's routes (without the shared `/healthz` and `/metrics`).
    pub fn router(self: &Arc<Self>, auth: Auth) -> axum::Router {
        api::router(self.clone(), auth)
    }
}

pub async fn run(ctx: ServiceContext, config: Config) -> Result<(), ServiceError> {
    telemetry::describe();
    let cache_dir = match &config.cache_dir {
        Some(d) => d.clone(),
        None => ctx
            .state_dir()
            .map_err(|e| ServiceError::Startup(format!("registry: state dir: {e}")))?,
    };
    let registry = Registry::open(&config, &cache_dir).await?;
    tracing::info!(
        cache_dir = %cache_dir.display(),
        upstreams = config.upstreams.len(),
        max_cache_bytes = config.max_cache_bytes,
        "registry ready"
    );
    ctx.serve_http(registry.router(ctx.auth()), None).await
}
