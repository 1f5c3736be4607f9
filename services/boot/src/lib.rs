//! The boot service (`dutgate boot`, port 8003): answers a DUT's iPXE with the boot script of
//! the job holding it (or the default registration config), and serves the kernels and
//! initramfs those scripts name from a local artifact cache, and the DUT image that
//! `dutgate dut-image` builds at stable URLs (`/dut-image/…`).
//!
//! - [`ipxe`]: script rendering and command-line escaping for iPXE's parser.
//! - [`model`]: boot configs (REST bodies); [`store`]: their table.
//! - [`cache`]: the artifact cache (single flight, verification, Range/ETag, LRU).
//! - [`peer`]: who may read a machine's job boot script.
//! - [`dut_image`]: the DUT image at stable URLs (`/dut-image/vmlinuz`, `…/initramfs.cpio`).
//! - [`api`]: the routes; [`client`]: the typed client the executor uses.
//! - [`testing`]: in-process service and a tiny initramfs builder for tests.

pub mod api;
pub mod cache;
pub mod client;
pub mod config;
pub mod dut_image;
pub mod ipxe;
pub mod model;
pub mod peer;
pub mod store;
mod telemetry;
pub mod testing;

use std::sync::Arc;

use dutgate_core::db::Db;
use dutgate_core::service::db_health;
use dutgate_core::{ServiceContext, ServiceError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{CacheConfig, Config};
pub use model::{Artifact, BootConfig, Kernel, StoredBootConfig};

use cache::ArtifactCache;
use store::Store;

/// The service, opened (database migrated, cache index loaded) but not yet listening.
pub struct BootService {
    state: api::AppState,
}

fn startup(msg: impl std::fmt::Display) -> ServiceError {
    ServiceError::Startup(msg.to_string())
}

impl BootService {
    pub async fn open(ctx: &ServiceContext, config: Config) -> Result<Self, ServiceError> {
        if let Some(default) = &config.default {
            default
                .validate()
                .map_err(|e| startup(format!("boot.default: {}", e.body.error)))?;
        }
        let db = ctx.open_db(store::MIGRATIONS).await?;
        let dir = match &config.cache.dir {
            Some(d) => d.clone(),
            None => ctx
                .state_dir()
                .map_err(|e| startup(format!("state dir: {e}")))?
                .join("artifacts"),
        };
        let gw = &ctx.gateway;
        let direct = config
            .direct_url_prefixes
            .clone()
            .unwrap_or_else(|| vec![format!("http://{}:{}/", gw.public_host, gw.ports.s3)]);
        let policy = dutgate_core::outbound::OutboundPolicy::from_gateway(gw);
        // The DUT image directory is a file root of its own, created if missing so that the
        // root holds before the first `dutgate dut-image` (the routes then answer 404).
        let image_dir = dut_image::dir(&config, gw);
        if let Err(e) = tokio::fs::create_dir_all(&image_dir).await {
            tracing::warn!(dir = %image_dir.display(), error = %e, "cannot create the DUT image directory");
        }
        let own_image = match tokio::fs::canonicalize(&image_dir).await {
            Ok(dir) => Some(cache::OwnImage {
                url_prefix: format!(
                    "{}{}/",
                    dut_image::public_base(&config, gw),
                    dut_image::PATH
                ),
                dir,
            }),
            Err(e) => {
                tracing::warn!(dir = %image_dir.display(), error = %e, "DUT image directory unusable; boot configs cannot name its URLs");
                None
            }
        };
        let mut roots = config.file_roots.clone();
        roots.extend(own_image.as_ref().map(|o| o.dir.clone()));
        let cache =
            ArtifactCache::open(dir, config.cache.clone(), &roots, direct, own_image, policy)
                .await
                .map_err(|e| startup(format!("artifact cache: {e}")))?;
        let store = Store::new(db);
        // Artifacts of the default config must be servable; a bad one is a config error.
        if let Some(default) = &config.default {
            for (field, url, sha) in default.artifacts() {
                cache
                    .register(url, sha)
                    .map_err(|e| startup(format!("boot.default.{field}: {e}")))?;
            }
        }
        // Ids in scripts handed out before a restart keep working.
        let stored = store
            .list()
            .await
            .map_err(|e| startup(format!("reading boot configs: {e}")))?;
        let mut configs = std::collections::HashMap::new();
        for s in stored {
            let prepared = api::Prepared::new(s.config, &cache);
            if let Some(e) = prepared.error() {
                tracing::warn!(machine_id = %s.mac, error = %e, "stored boot config names an artifact that is no longer allowed");
            }
            configs.insert(s.mac, Arc::new(prepared));
        }
        let default = config
            .default
            .clone()
            .map(|d| Arc::new(api::Prepared::new(d, &cache)));
        Ok(Self {
            state: api::AppState {
                store,
                configs: Arc::new(std::sync::RwLock::new(configs)),
                default,
                write_lock: Arc::new(tokio::sync::Mutex::new(())),
                cache,
                peers: peer::PeerCheck {
                    mars: dutgate_mars::client::MarsClient::for_gateway(&ctx.gateway),
                    arp_table: config.arp_table.clone(),
                    unverified: config.unverified_peer_networks.clone(),
                },
                leases: dutgate_core::lease::LeaseCheck::for_gateway(&ctx.gateway),
                audit: dutgate_core::audit::AuditLog::new(&ctx.gateway.state_dir, "boot"),
                auth: ctx.auth(),
                config: Arc::new(config),
                gateway: ctx.gateway.clone(),
            },
        })
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    pub fn cache(&self) -> &ArtifactCache {
        &self.state.cache
    }

    pub fn db(&self) -> Db {
        self.state.store.db().clone()
    }

    /// Serves on `listener` until `shutdown` (used by tests and benchmarks to run the service
    /// in-process on an ephemeral port).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServiceError> {
        let app = dutgate_core::http::with_common_routes(
            "boot",
            self.router(),
            Some(db_health(self.db())),
        );
        let res =
            dutgate_core::http::serve(listener, app, shutdown, std::time::Duration::from_secs(3))
                .await;
        self.state.cache.save().await;
        res.map_err(ServiceError::from)
    }
}

pub async fn run(ctx: ServiceContext, config: Config) -> Result<(), ServiceError> {
    telemetry::describe();
    let service = BootService::open(&ctx, config).await?;
    let health = db_health(service.db());
    let cache = service.cache().clone();
    let res = ctx.serve_http(service.router(), Some(health)).await;
    cache.save().await;
    res
}
