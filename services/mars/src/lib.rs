//! mars: the machine registry of the gateway (design.md §3).
//!
//! - [`model`]: the wire types (machines, leases, events, training reports).
//! - [`client`]: the typed client the executor and `dutctl` use.
//! - [`state`]: the machine state machine (one enum, one transition function).
//! - [`store`]: mars's tables; every state change is persisted with actor and reason.
//! - [`machines`]: registration, admin changes, leases, discovery.
//! - [`training`]: Sergeant Hartman and the [`training::JobRunner`] it submits boots through.
//! - [`power`]: PDU port control through the pdu service.
//! - [`api`]: the REST routes and their OpenAPI document ([`openapi`]).
//! - [`fuzzing`]: the entry points of the fuzz targets (`services/mars/fuzz`).
//!
//! Invariants: a machine row is created in `WAIT_FOR_CONFIG` ([`store::Store::insert_new`]);
//! after that only [`store::Store::apply_with`] changes it, its state only through
//! [`state::transition`] (an edit cannot set `state`), except a lease's expiry time, which
//! heartbeats, the restart grace and expiry claims move (`store/leases.rs`); a machine has
//! at most one lease; an expired lease frees its machine only once the machine is powered off;
//! only the pdu service talks to PDUs.

pub mod api;
pub use api::openapi;
pub mod client;
pub mod fuzzing;
pub mod machines;
pub mod model;
pub mod power;
pub mod state;
pub mod store;
mod telemetry;
pub mod training;

use std::sync::Arc;
use std::time::Duration;

use dutgate_core::service::db_health;
use dutgate_core::{ServiceContext, ServiceError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::machines::Mars;
use crate::power::HttpPower;
use crate::store::Store;
use crate::training::{JobRunner, Templates, Trainer, TrainingConfig};

/// The `mars` section of the gateway config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TTL of a lease; the holder heartbeats well within it.
    pub lease_ttl_seconds: u64,
    /// When mars starts, or its sweeper resumes after not running for longer than
    /// [`SWEEP_GAP`] (database unreachable, process stopped), every lease that lapsed
    /// meanwhile gets this long before it can expire: its holder could not heartbeat.
    pub lease_grace_seconds: u64,
    /// Off delay given to newly registered machines (seconds).
    pub pdu_off_delay: f64,
    /// Infrastructure failures in a row (failed or expired job leases) before `QUARANTINED`.
    pub quarantine_after_infra_failures: u32,
    /// Most tags a registration or PATCH may carry.
    pub max_tags: usize,
    /// Most machines waiting for configuration (`WAIT_FOR_CONFIG`) before registrations of
    /// unknown machines from the DUT network are refused (429).
    pub max_unknown_machines: usize,
    /// Creations of unknown machines from the DUT network: this many a minute…
    pub new_machines_per_minute: u32,
    /// …after a burst of this many.
    pub new_machines_burst: u32,
    /// Default discovery timeout (seconds).
    pub discovery_timeout_seconds: f64,
    /// Base URL of the pdu service; unset: the gateway's internal URL of `pdu`.
    pub pdu_url: Option<String>,
    pub training: TrainingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_ttl_seconds: 30,
            lease_grace_seconds: 60,
            pdu_off_delay: 30.0,
            quarantine_after_infra_failures: 3,
            max_tags: 256,
            max_unknown_machines: 64,
            new_machines_per_minute: 60,
            new_machines_burst: 256,
            discovery_timeout_seconds: 150.0,
            pdu_url: None,
            training: TrainingConfig::default(),
        }
    }
}

/// A sweeper that has not completed a sweep for this long was not watching the leases (mars
/// stopped, its database unreachable): their holders may not have reached mars either, so
/// leases get [`Config::lease_grace_seconds`] before they can expire.
pub const SWEEP_GAP: Duration = Duration::from_secs(5);

/// Expires leases and discoveries. A 1 s tick: an expiry is acted on within a second, and
/// the query is one indexed read.
pub async fn sweep(mars: Mars, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    // The last completed sweep; none yet: mars (re)started.
    let mut last_sweep: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if last_sweep.is_none_or(|t| t.elapsed() > SWEEP_GAP) {
            let grace = Duration::from_secs(mars.config.lease_grace_seconds);
            let now = model::Timestamp::now();
            let until = now.plus_ms(grace.as_millis() as i64);
            match mars.store.grant_grace(now, until).await {
                Ok(0) => {}
                Ok(leases) => {
                    tracing::warn!(
                        leases,
                        grace_seconds = grace.as_secs(),
                        "lease sweeper resumed after a gap: leases get a grace period for their holders to heartbeat"
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot grant the leases their grace period");
                    continue;
                }
            }
        }
        match mars.expire_leases().await {
            Ok(_) => last_sweep = Some(tokio::time::Instant::now()),
            Err(e) => tracing::warn!(error = %e, "lease sweep failed"),
        }
        if let Err(e) = mars.expire_discovery().await {
            tracing::warn!(error = %e, "discovery sweep failed");
        }
        n += 1;
        if n % 15 == 1 {
            export_state_gauges(&mars).await;
        }
    }
}

/// `mars_machines{state}`: how many machines are in each state.
async fn export_state_gauges(mars: &Mars) {
    match mars.store.list().await {
        Ok(rows) => {
            for st in model::MachineState::ALL {
                let count = rows.iter().filter(|r| r.state == st).count();
                metrics::gauge!("mars_machines", "state" => st.as_str()).set(count as f64);
            }
            // In service: fit and free, or held by a job (training leases are not service).
            let count = |st| rows.iter().filter(|r| r.state == st).count();
            let (idle, running) = (
                count(model::MachineState::Idle),
                count(model::MachineState::Running),
            );
            let share = if idle + running == 0 {
                0.0
            } else {
                running as f64 / (idle + running) as f64
            };
            metrics::gauge!("mars_lease_utilisation").set(share);
        }
        Err(e) => tracing::warn!(error = %e, "cannot count machines"),
    }
}

/// Starts the background tasks (sweeper, trainer when a runner is given) and returns the
/// router, without an audit log (tests and benchmarks of other parts: audited calls are only
/// traced). See [`start_with_audit`].
pub fn start(
    mars: Mars,
    auth: dutgate_core::auth::Auth,
    shutdown: CancellationToken,
) -> Result<axum::Router, ServiceError> {
    start_with_audit(mars, auth, None, shutdown)
}

/// [`start`] with the audit log admin changes and refused calls go to
/// (`AuditLog::new(state_dir, "mars")`). Used by [`run_with_runner`] and by tests that serve
/// on their own listener.
pub fn start_with_audit(
    mars: Mars,
    auth: dutgate_core::auth::Auth,
    audit: Option<dutgate_core::audit::AuditLog>,
    shutdown: CancellationToken,
) -> Result<axum::Router, ServiceError> {
    tokio::spawn(sweep(mars.clone(), shutdown.clone()));
    match (&mars.runner, mars.config.training.enabled) {
        (Some(runner), true) => {
            let templates =
                Templates::load(&mars.config.training).map_err(ServiceError::Startup)?;
            let trainer = Trainer::new(mars.clone(), Arc::clone(runner), templates);
            tokio::spawn(trainer.run(shutdown.clone()));
        }
        (None, true) => tracing::warn!(
            "no job runner wired: Sergeant Hartman is not running, machines stay in TRAINING/QUICK_CHECK"
        ),
        (_, false) => tracing::info!("training disabled by config"),
    }
    Ok(api::router(api::AppState {
        mars,
        auth,
        shutdown,
        audit,
    }))
}

pub async fn run(ctx: ServiceContext, config: Config) -> Result<(), ServiceError> {
    run_with_runner(ctx, config, None).await
}

/// `run` with the trainer's job runner (the executor's client, wired by the `dutgate` binary).
pub async fn run_with_runner(
    ctx: ServiceContext,
    config: Config,
    runner: Option<Arc<dyn JobRunner>>,
) -> Result<(), ServiceError> {
    telemetry::describe();
    let db = ctx.open_db(store::MIGRATIONS).await?;
    let store = Store::new(db.clone(), &ctx.gateway.farm_name);
    let power = Arc::new(HttpPower::for_gateway(
        &ctx.gateway,
        config.pdu_url.as_deref(),
    ));
    let mut mars = Mars::new(store, config, power);
    mars.runner = runner;
    let audit = dutgate_core::audit::AuditLog::new(&ctx.gateway.state_dir, "mars");
    let router = start_with_audit(mars, ctx.auth(), Some(audit), ctx.shutdown.clone())?;
    ctx.serve_http(router, Some(db_health(db))).await
}
