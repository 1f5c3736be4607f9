//! salad: serial consoles mapped to machines and relayed over TCP (design.md §4).
//!
//! Data flow: a console stream ([`serial`] port or [`netconsole`] connection) is read by
//! [`stream::drive`]; [`association`] spots `SALAD.ping` (answered with `SALAD.pong`) and
//! `SALAD.machine_id=` (asks to bind the stream to a machine: [`binding`] decides, asking
//! mars, off the read path); the bytes then go to that machine's [`relay`], which masks the
//! job's [`secrets`] and fans them out to its TCP and WebSocket clients, its scrollback and
//! its [`console_log`]. The [`hub`] owns the machines and allocates their ports (bounded),
//! persisted in the [`store`]. [`api`] serves the REST routes; [`client`] is the typed client
//! for them. [`fuzzing`] holds the checks the fuzz targets and the tests share.
//!
//! Invariants: reading a console never waits for a client, the disk, the database or mars; a
//! machine keeps its console ports for as long as it is in the store; the main console port
//! never replays old output; a stream bound to a machine is never re-bound by what it prints,
//! and only the bound stream's bytes reach a machine's sinks; no sink sees a live secret.

pub mod api;
pub mod association;
pub mod binding;
pub mod client;
pub mod config;
pub mod console_log;
pub mod fuzzing;
pub mod hub;
pub mod netconsole;
pub mod relay;
pub mod secrets;
pub mod serial;
pub mod store;
pub mod stream;
mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::audit::AuditLog;
use dutgate_core::lease::LeaseCheck;
use dutgate_core::{ServiceContext, ServiceError};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use api::openapi;
pub use config::Config;

use crate::hub::Hub;

/// The sockets salad serves on, bound by the caller (`run` binds the configured ports; tests
/// bind `127.0.0.1:0`).
pub struct Listeners {
    pub http: TcpListener,
    /// `None` disables netconsole ingest.
    pub netconsole: Option<TcpListener>,
}

/// A running salad.
pub struct SaladHandle {
    pub http_addr: SocketAddr,
    pub netconsole_addr: Option<SocketAddr>,
    pub hub: Arc<Hub>,
    shutdown: CancellationToken,
    http: JoinHandle<Result<(), ServiceError>>,
    tasks: TaskTracker,
}

impl SaladHandle {
    /// Waits until salad stops (its shutdown token is cancelled), then for every task to end,
    /// so that all its ports and devices are closed when this returns.
    pub async fn wait(self) -> Result<(), ServiceError> {
        let r = match self.http.await {
            Ok(r) => r,
            Err(e) => Err(ServiceError::Startup(format!(
                "HTTP server task failed: {e}"
            ))),
        };
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some console tasks did not stop within 5 s");
        }
        r
    }

    /// Stops salad and waits until everything is closed.
    pub async fn stop(self) -> Result<(), ServiceError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Opens the store, restores every machine's console servers, starts the serial scanner, the
/// netconsole listener and the REST API. Stops when `ctx.shutdown` is cancelled.
pub async fn start(
    ctx: ServiceContext,
    config: Config,
    listeners: Listeners,
) -> Result<SaladHandle, ServiceError> {
    config.validate().map_err(ServiceError::Startup)?;
    // Metric handles are taken once per port/machine: the recorder must exist before that.
    let _ = dutgate_core::telemetry::metrics_handle();
    let db = ctx.open_db(store::MIGRATIONS).await?;
    let state_dir = ctx
        .state_dir()
        .map_err(|e| ServiceError::Startup(format!("state dir: {e}")))?;
    let tasks = TaskTracker::new();
    let shutdown = ctx.shutdown.child_token();
    // The service credential: salad reads machines' states and leases, and mars shows lease
    // ids to the gateway's services.
    let service_token = dutgate_core::auth::service_token(&ctx.gateway);
    let (mars, leases) = match &config.mars_url {
        Some(url) => (
            dutgate_mars::client::MarsClient::new(url.clone(), service_token.clone()),
            LeaseCheck::new(url.clone(), service_token),
        ),
        None => (
            dutgate_mars::client::MarsClient::for_gateway(&ctx.gateway),
            LeaseCheck::for_gateway(&ctx.gateway),
        ),
    };
    let filter = relay::ClientFilter {
        networks: config.console_client_networks.clone(),
        auth: ctx.auth(),
    };
    let hub = Arc::new(Hub::new(
        Arc::new(config),
        store::Store::new(db.clone()),
        ctx.gateway.bind_address,
        state_dir.join("consoles"),
        tasks.clone(),
        shutdown.clone(),
        hub::Access { filter, mars },
    ));
    let restored = hub
        .load()
        .await
        .map_err(|e| ServiceError::Startup(format!("restoring console servers: {e}")))?;
    tracing::info!(machines = restored, "console servers restored");

    let access = api::Access {
        auth: ctx.auth(),
        leases,
        audit: AuditLog::new(&ctx.gateway.state_dir, "salad"),
    };
    tasks.spawn(serial::run(hub.clone(), shutdown.clone()));
    let netconsole_addr = match listeners.netconsole {
        Some(l) => {
            let addr = l.local_addr().ok();
            tracing::info!(addr = ?addr, "netconsole ingest listening");
            tasks.spawn(netconsole::run(
                hub.clone(),
                l,
                ctx.auth(),
                shutdown.clone(),
            ));
            addr
        }
        None => None,
    };

    let http_addr = listeners
        .http
        .local_addr()
        .map_err(|e| ServiceError::Startup(format!("REST listener: {e}")))?;
    let app = dutgate_core::http::with_common_routes(
        ctx.name.as_str(),
        api::router(hub.clone(), access),
        Some(dutgate_core::service::db_health(db)),
    );
    let grace = Duration::from_secs_f64(ctx.gateway.shutdown_grace_seconds.max(0.0));
    let http = tokio::spawn({
        let stop = shutdown.clone();
        async move {
            dutgate_core::http::serve(listeners.http, app, stop, grace)
                .await
                .map_err(ServiceError::from)
        }
    });
    Ok(SaladHandle {
        http_addr,
        netconsole_addr,
        hub,
        shutdown,
        http,
        tasks,
    })
}

/// `dutgate salad`: binds the configured ports (or takes the systemd socket for the REST
/// API) and serves until SIGTERM.
pub async fn run(ctx: ServiceContext, config: Config) -> Result<(), ServiceError> {
    telemetry::describe();
    config.validate().map_err(ServiceError::Startup)?;
    let http = dutgate_core::http::listener(ctx.listen_addr()).await?;
    let netconsole = if config.netconsole_port == 0 {
        None
    } else {
        let addr = SocketAddr::new(ctx.gateway.bind_address, config.netconsole_port);
        Some(TcpListener::bind(addr).await.map_err(|e| {
            ServiceError::Startup(format!("cannot listen for netconsoles on {addr}: {e}"))
        })?)
    };
    let handle = start(ctx, config, Listeners { http, netconsole }).await?;
    handle.wait().await
}
