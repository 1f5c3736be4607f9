//! The executor (design.md §8): job queue, scheduler, one process per job, console logs,
//! events and artifacts.
//!
//! - [`api`]: the REST routes (docs/jobs.md §4); [`citron`]: ci-tron's `executorctl` on them
//!   (its console protocol, connect-back, trusted client networks, DUT list).
//! - [`store`]: the `jobs` and `job_events` tables; [`model`]: wire types and the job state
//!   machine.
//! - [`scheduler`]: matches queued jobs to free machines and dispatches them (mars lease).
//! - [`supervisor`]: starts, follows, re-attaches, cancels job processes; finishes the jobs of
//!   dead ones.
//! - [`process`]: the per-job process `dutgate job <id>` (setup, boots, watch, teardown);
//!   [`control`]: its local socket.
//! - [`storage`]: the job bucket step behind one trait.
//! - [`webhooks`]: what the executor does when a job ends (metrics, webhooks); [`stats`]: the
//!   queue gauges and the exact queue-wait figures of `dutctl stats`.
//! - [`ui`]: the web dashboard under `/ui/` (docs/dashboard.md).
//! - `testing` (feature `testing`): a whole gateway with simulated DUTs, for end-to-end tests
//!   and farm benchmarks.
//!
//! Invariants: a job is persisted before its submission is answered; a job never powers a
//! machine it holds no lease on; every job whose process is gone is finished, and its machine
//! powered off.

pub mod api;
pub mod citron;
pub mod client;
pub mod config;
pub mod control;
pub mod model;
pub mod process;
pub mod scheduler;
pub mod stats;
pub mod storage;
pub mod store;
pub mod supervisor;
mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tokens;
pub mod ui;
pub mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_core::config::GatewayConfig;
use dutgate_core::{ServiceContext, ServiceError, ServiceName};
use dutgate_mars::client::MarsClient;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use api::openapi;
pub use config::Config;

use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::supervisor::Supervisor;

/// A started executor: background tasks running, routes ready to serve.
pub struct Executor {
    pub state: api::AppState,
}

impl Executor {
    /// Re-attaches to running job processes, starts the scheduler, the mars follower and the
    /// retention sweeper. Everything stops with `shutdown` (job processes keep running).
    pub async fn start(
        gw: Arc<GatewayConfig>,
        cfg: Config,
        store: Store,
        auth: Auth,
        shutdown: CancellationToken,
    ) -> Result<Self, ServiceError> {
        Self::start_with(gw, cfg, store, auth, shutdown, None).await
    }

    /// [`Executor::start`] with jobs run by `inline` instead of job processes (the scheduler
    /// benchmark).
    pub async fn start_with(
        gw: Arc<GatewayConfig>,
        cfg: Config,
        store: Store,
        auth: Auth,
        shutdown: CancellationToken,
        inline: Option<supervisor::InlineRunner>,
    ) -> Result<Self, ServiceError> {
        cfg.validate().map_err(ServiceError::Startup)?;
        let _ = dutgate_core::telemetry::metrics_handle();
        let (admin, _) = process::gateway_tokens(&gw);
        let mars = MarsClient::new(cfg.url_of(&gw, ServiceName::Mars), admin);
        let storage = storage::from_config(&gw, &cfg)
            .await
            .map_err(|e| ServiceError::Startup(format!("object storage: {e}")))?;
        let audit = dutgate_core::audit::AuditLog::new(&gw.state_dir, "executor");
        // Every job's end reaches one place in this long-lived process: counted, webhooks sent.
        let ended = webhooks::Ended::new(gw.clone(), &cfg.webhooks, audit.clone())
            .map_err(ServiceError::Startup)?;
        let (ended_tx, ended_rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(follower) = ended.machine_follower(mars.clone()) {
            tokio::spawn(follower.run(shutdown.clone()));
        }
        tokio::spawn(ended.run(ended_rx, shutdown.clone()));
        let store = store.with_finish_hook(ended_tx);
        tokio::spawn(stats::export_queue_gauges(store.clone(), shutdown.clone()));
        let wake = Arc::new(Notify::new());
        let sup = Supervisor::new(
            store.clone(),
            gw.clone(),
            cfg.clone(),
            storage,
            wake.clone(),
            inline,
        );
        let sched = Scheduler::new(
            store.clone(),
            mars,
            sup.clone(),
            cfg.lease_ttl_seconds.map(Duration::from_secs),
            wake,
        );
        match sup.reattach_all().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "re-attached to running jobs"),
            Err(e) => return Err(ServiceError::Startup(format!("re-attaching jobs: {e}"))),
        }
        tokio::spawn(sched.clone().follow_mars(shutdown.clone()));
        tokio::spawn(sup.clone().watch_cancels(shutdown.clone()));
        tokio::spawn(sched.clone().run(shutdown.clone()));
        if cfg.artifacts_retention_days > 0.0 {
            tokio::spawn(retention(
                store.clone(),
                sup.clone(),
                Duration::from_secs_f64(cfg.artifacts_retention_days * 86_400.0),
                shutdown,
            ));
        }
        let state = api::AppState {
            audit,
            store,
            sched,
            sup,
            cfg: Arc::new(cfg),
            gw,
            auth,
            ui: ui::UiShared::default(),
        };
        Ok(Self { state })
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }
}

/// Deletes the files of jobs finished longer ago than `keep` (hourly; the records stay).
async fn retention(store: Store, sup: Supervisor, keep: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    let mut after_id = 0i64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cutoff = store::now_ms() - keep.as_millis() as i64;
        match store.finished_before(cutoff, after_id, 1000).await {
            Ok(ids) => {
                for id in ids {
                    after_id = after_id.max(id);
                    let dir = sup.job_dir(id);
                    if dir.exists() {
                        let _ =
                            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                        metrics::counter!("executor_job_dirs_expired_total").increment(1);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
        }
    }
}

pub async fn run(ctx: ServiceContext, config: Config) -> Result<(), ServiceError> {
    telemetry::describe();
    let db = ctx.open_db(store::MIGRATIONS).await?;
    let exec = Executor::start(
        ctx.gateway.clone(),
        config,
        Store::new(db.clone()),
        ctx.auth(),
        ctx.shutdown.clone(),
    )
    .await?;
    ctx.serve_http(exec.router(), Some(dutgate_core::service::db_health(db)))
        .await
}

/// `dutgate job <id>`: the per-job process. Returns the process exit code (0: the job's
/// final status was stored, whatever it is).
pub async fn job_main(id: &str) -> i32 {
    let Ok(id) = id.parse::<i64>() else {
        eprintln!("dutgate job: {id:?} is not a job id");
        return 2;
    };
    match process::main(id).await {
        Ok(status) => {
            tracing::info!(job_id = id, %status, "job finished");
            0
        }
        Err(e) => {
            tracing::error!(job_id = id, error = %e, "job process failed");
            eprintln!("dutgate job {id}: {e}");
            1
        }
    }
}
