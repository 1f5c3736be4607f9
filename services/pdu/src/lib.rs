//! The pdu service (design.md §5): PDUs, their ports, power history.
//!
//! - [`service`]: the set of PDUs (from the config and from `POST /api/v1/pdus`).
//! - [`pdu`]: one PDU: switching with read-back, the verified power cycle, per-port locks.
//! - [`actor`]: the task that owns a PDU's driver (serialised device access, polling).
//! - [`api`]: the REST routes; [`client`]: the typed client other services use.
//! - [`store`]: this service's tables.
//! - [`pdudaemon`]: pdudaemon's HTTP and TCP listeners, for LAVA and labgrid clients.
//!
//! Invariants: only this service talks to PDUs; `UNKNOWN` is never treated as `OFF`; a
//! power cycle succeeds only if the port read back OFF for the whole off delay.

pub mod actor;
pub mod api;
pub mod client;
pub mod drivers;
pub mod pdu;
pub mod pdudaemon;
pub mod service;
pub mod store;
mod telemetry;

use std::collections::BTreeMap;

use dutgate_core::audit::AuditLog;
use dutgate_core::config::GatewayConfig;
use dutgate_core::lease::LeaseCheck;
use dutgate_core::{ServiceContext, ServiceError};
use serde::{Deserialize, Serialize};

pub use api::openapi;
pub use client::PduClient;
pub use dutgate_pdu_driver::Switch;
pub use pdu::{CycleReport, OpResult, PortPatch, PortView, PowerError};
pub use service::PduService;

/// The `pdu` section of the gateway config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// PDUs declared here (name → spec). More can be added over REST.
    pub pdus: BTreeMap<String, PduSpec>,
    /// How often every port of every PDU is read (overridable per PDU).
    pub poll_interval_seconds: f64,
    /// Time budget of one device exchange (a GET, a SET, a walk).
    pub operation_timeout_seconds: f64,
    /// Extra attempts of an exchange that timed out or could not reach the device.
    pub retries: u32,
    /// First back-off between attempts; doubles each time.
    pub retry_backoff_ms: u64,
    /// How long a switched port may take to read back the new state.
    pub settle_timeout_seconds: f64,
    /// Pause between read-back attempts while a port settles.
    pub readback_interval_ms: u64,
    /// Pause between OFF checks during a power cycle's off delay.
    pub verify_interval_ms: u64,
    /// Off delay of a cycle request that gives none.
    pub default_off_seconds: f64,
    /// Longest off delay a cycle request may ask for.
    pub max_off_seconds: f64,
    /// History rows kept per port.
    pub history_per_port: u32,
    /// pdudaemon's API (off while neither listener is set).
    pub pdudaemon: pdudaemon::Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pdus: BTreeMap::new(),
            poll_interval_seconds: 10.0,
            operation_timeout_seconds: 10.0,
            retries: 2,
            retry_backoff_ms: 250,
            settle_timeout_seconds: 10.0,
            readback_interval_ms: 250,
            verify_interval_ms: 500,
            default_off_seconds: 30.0,
            max_off_seconds: 3600.0,
            history_per_port: 500,
            pdudaemon: pdudaemon::Config::default(),
        }
    }
}

/// One PDU: which driver, its config, and the service-side port settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PduSpec {
    pub driver: String,
    /// The driver's own config (see docs/pdu.md for each driver's keys).
    #[serde(default)]
    pub config: serde_json::Value,
    /// Ports nobody may switch (the gateway itself, a switch, …).
    #[serde(default)]
    pub reserved: Vec<String>,
    /// Port id → label shown instead of the device's own name.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub poll_interval_seconds: Option<f64>,
}

/// A service serving on a listener of the caller's choice (tests bind 127.0.0.1:0).
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub service: PduService,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    /// Where pdudaemon's listeners listen (none unless configured).
    pub pdudaemon: pdudaemon::Bound,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and stops every PDU actor.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
        self.service.stop_all().await;
    }
}

/// Starts the service on `listener` with its shared routes (`/healthz`, `/metrics`), for
/// tests of other parts: without a mars to check leases with (job processes' switches are
/// refused, 503) and without an audit log (audited calls are only traced). A service as the
/// gateway runs it: [`start_on_gateway`].
pub async fn start_on(
    listener: tokio::net::TcpListener,
    store: store::Store,
    config: Config,
    auth: dutgate_core::auth::Auth,
) -> Result<Running, service::ManageError> {
    serve_on(
        listener,
        store,
        config,
        auth,
        Access {
            dut_networks: Vec::new(),
            leases: LeaseCheck::without_mars(),
            audit: None,
        },
    )
    .await
}

/// [`start_on`] as a gateway's pdu service: leases checked with the gateway's mars, the audit
/// log under its state dir.
pub async fn start_on_gateway(
    listener: tokio::net::TcpListener,
    store: store::Store,
    config: Config,
    gw: &GatewayConfig,
    auth: dutgate_core::auth::Auth,
) -> Result<Running, service::ManageError> {
    serve_on(listener, store, config, auth, Access::for_gateway(gw)).await
}

/// How the service checks leases and which outlets are machines' (with mars), and its audit log.
struct Access {
    /// DUT networks the pdudaemon listeners' networks may not overlap.
    dut_networks: Vec<ipnet::IpNet>,
    leases: LeaseCheck,
    /// `None`: started without a state dir; audited calls are only traced.
    audit: Option<AuditLog>,
}

impl Access {
    /// The gateway's mars, the audit log under its state dir.
    fn for_gateway(gw: &GatewayConfig) -> Self {
        Self {
            dut_networks: gw.auth.dut_networks.clone(),
            leases: LeaseCheck::for_gateway(gw),
            audit: Some(AuditLog::new(&gw.state_dir, "pdu")),
        }
    }
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    store: store::Store,
    config: Config,
    auth: dutgate_core::auth::Auth,
    access: Access,
) -> Result<Running, service::ManageError> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let addr = listener
        .local_addr()
        .map_err(|e| service::ManageError::Unreachable(e.to_string()))?;
    let service = PduService::start(store, config.clone(), shutdown.clone()).await?;
    let pdudaemon = match pdudaemon::start(
        &config.pdudaemon,
        &access.dut_networks,
        service.clone(),
        access.leases.clone(),
        access.audit.clone(),
        shutdown.clone(),
    )
    .await
    {
        Ok(bound) => bound,
        Err(e) => {
            shutdown.cancel();
            service.stop_all().await;
            return Err(e.into());
        }
    };
    let router = api::router(api::AppState {
        svc: service.clone(),
        auth,
        leases: access.leases,
        audit: access.audit,
    });
    let app = dutgate_core::http::with_common_routes("pdu", router, None);
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        if let Err(e) =
            dutgate_core::http::serve(listener, app, stop, std::time::Duration::from_secs(1)).await
        {
            tracing::error!(error = %e, "pdu server failed");
        }
    });
    Ok(Running {
        addr,
        service,
        shutdown,
        task,
        pdudaemon,
    })
}

pub async fn run(ctx: ServiceContext, config: Config) -> Result<(), ServiceError> {
    telemetry::describe();
    let db = ctx.open_db(store::MIGRATIONS).await?;
    let service = PduService::start(
        store::Store::new(db.clone()),
        config.clone(),
        ctx.shutdown.clone(),
    )
    .await
    .map_err(|e| ServiceError::Startup(e.to_string()))?;
    let access = Access::for_gateway(&ctx.gateway);
    if let Err(e) = pdudaemon::start(
        &config.pdudaemon,
        &access.dut_networks,
        service.clone(),
        access.leases.clone(),
        access.audit.clone(),
        ctx.shutdown.clone(),
    )
    .await
    {
        service.stop_all().await;
        return Err(ServiceError::Startup(e.to_string()));
    }
    let router = api::router(api::AppState {
        svc: service.clone(),
        auth: ctx.auth(),
        leases: access.leases,
        audit: access.audit,
    });
    let r = ctx
        .serve_http(router, Some(dutgate_core::service::db_health(db)))
        .await;
    service.stop_all().await;
    r
}
