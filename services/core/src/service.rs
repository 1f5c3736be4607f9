//! What a service process gets handed when it starts: its name, the shared config, a
//! shutdown token, and helpers to open its store and its HTTP listener.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::GatewayConfig;
use crate::db::{Db, DbError, Migrations};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceName {
    Executor,
    Mars,
    Registry,
    Boot,
    Pdu,
    Salad,
    /// The embedded S3 endpoint (crate `dutgate-storage`).
    S3,
}

impl ServiceName {
    pub const ALL: [ServiceName; 7] = [
        ServiceName::Executor,
        ServiceName::Mars,
        ServiceName::Registry,
        ServiceName::Boot,
        ServiceName::Pdu,
        ServiceName::Salad,
        ServiceName::S3,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::Executor => "executor",
            ServiceName::Mars => "mars",
            ServiceName::Registry => "registry",
            ServiceName::Boot => "boot",
            ServiceName::Pdu => "pdu",
            ServiceName::Salad => "salad",
            ServiceName::S3 => "s3",
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ServiceName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| format!("unknown service {s:?}"))
    }
}

/// Errors a service's `run` may end with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("storage: {0}")]
    Db(#[from] DbError),
    #[error("http: {0}")]
    Http(#[from] crate::http::HttpError),
    #[error("{0}")]
    Startup(String),
}

/// Handed to every service's `run`.
#[derive(Clone)]
pub struct ServiceContext {
    pub name: ServiceName,
    pub gateway: Arc<GatewayConfig>,
    pub shutdown: CancellationToken,
}

impl ServiceContext {
    pub fn new(name: ServiceName, gateway: GatewayConfig, shutdown: CancellationToken) -> Self {
        Self {
            name,
            gateway: Arc::new(gateway),
            shutdown,
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.gateway.bind_address, self.gateway.port_of(self.name))
    }

    /// The service's own directory under the state dir (created).
    pub fn state_dir(&self) -> std::io::Result<std::path::PathBuf> {
        let dir = self.gateway.state_dir.join(self.name.as_str());
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    pub async fn open_db(&self, migrations: Migrations) -> Result<Db, DbError> {
        Db::open_for_service(self.name.as_str(), &self.gateway, migrations).await
    }

    pub fn auth(&self) -> Auth {
        Auth::from_gateway(&self.gateway)
    }
}

impl ServiceContext {
    /// Binds the service's port (or takes the systemd socket), adds the shared routes, and
    /// serves until shutdown.
    pub async fn serve_http(
        &self,
        router: axum::Router,
        health: Option<crate::http::HealthCheck>,
    ) -> Result<(), ServiceError> {
        let auth = crate::auth::Auth::from_gateway_quiet(&self.gateway);
        let router = router.layer(axum::middleware::from_fn_with_state(
            auth,
            crate::auth::refuse_unknown_bearer,
        ));
        let app = crate::http::with_common_routes(self.name.as_str(), router, health);
        let listener = crate::http::listener(self.listen_addr()).await?;
        let grace =
            std::time::Duration::from_secs_f64(self.gateway.shutdown_grace_seconds.max(0.0));
        crate::http::serve(listener, app, self.shutdown.clone(), grace).await?;
        Ok(())
    }
}

/// A `/healthz` probe that pings a service's database.
pub fn db_health(db: Db) -> crate::http::HealthCheck {
    Arc::new(move || {
        let db = db.clone();
        Box::pin(async move { db.ping().await.map_err(|e| e.to_string()) })
    })
}
