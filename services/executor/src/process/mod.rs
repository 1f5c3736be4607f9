//! The per-job process, `dutgate job <id>`: runs one job from its lease to its teardown.
//!
//! It is started by the executor in its own process group, with a [`ProcessSetup`] on stdin
//! (the config it needs, secrets included, so none are written to disk). It writes its
//! events and final status to the executor's store itself and its console to
//! `jobs/<id>/console.log`, so a restart of the executor loses nothing; it heartbeats the
//! machine's lease, so if it dies the machine is not held forever.
//!
//! It holds no token: its one credential is its machine's lease, presented in `X-Lease-Id`
//! to mars (heartbeat, release, reads), boot, pdu and salad, which accept it for that machine
//! only ([`dutgate_core::lease`]). The lease id rather than a service token, so that a job
//! process can act on its own machine and nothing else, and loses even that the moment its
//! lease expires.
//!
//! Steps: setup (bucket, render) → per boot: boot config, console, power cycle, watch →
//! teardown, always (also on errors, SIGTERM and a lost lease).

mod console;
mod session;
mod teardown;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dutgate_boot::client::BootClient;
use dutgate_core::client::ApiClient;
use dutgate_core::config::GatewayConfig;
use dutgate_core::secret::DatabaseUrl;
use dutgate_core::{JobStatus, MachineId, Secret, ServiceName};
use dutgate_mars::client::MarsClient;
use dutgate_pdu::PduClient;
use dutgate_salad::client::SaladClient;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{self, Progress};
use crate::model::{JobState, kind};
use crate::store::{JobRow, Store, StoreError};

/// What the executor hands a job process on stdin. No token: the job process's credential is
/// its lease, which it reads from the job's record.
#[derive(Clone, Serialize, Deserialize)]
pub struct ProcessSetup {
    /// The `gateway` section (its secrets are masked by serde; the database URL travels below,
    /// the tokens do not).
    pub gateway: Value,
    pub database_url: Option<String>,
    pub executor: Config,
    /// TTL of the job's lease; heartbeats go out every third of it.
    pub lease_ttl_seconds: u64,
    /// The `s3` section (`Config::object_store`, skipped by serde), its secret below.
    #[serde(default)]
    pub s3: Option<dutgate_storage::Config>,
    #[serde(default)]
    pub s3_secret_key: Option<String>,
}

impl ProcessSetup {
    pub fn new(gateway: &GatewayConfig, executor: &Config, lease_ttl_seconds: u64) -> Self {
        Self {
            gateway: serde_json::to_value(gateway).unwrap_or(Value::Null),
            database_url: gateway
                .database_url
                .as_ref()
                .map(|u| u.expose().to_string()),
            executor: executor.clone(),
            lease_ttl_seconds,
            s3: executor.object_store.as_ref().map(|o| o.0.clone()),
            s3_secret_key: executor
                .object_store
                .as_ref()
                .and_then(|o| o.0.secret_key.as_ref())
                .map(|s| s.expose().to_string()),
        }
    }

    pub fn gateway_config(&self) -> Result<GatewayConfig, String> {
        let mut gw: GatewayConfig = serde_json::from_value(self.gateway.clone())
            .map_err(|e| format!("gateway config: {e}"))?;
        gw.database_url = self.database_url.clone().map(DatabaseUrl::new);
        // The tokens arrive masked; the job process has none.
        gw.auth.admin_token = None;
        gw.auth.user_token = None;
        Ok(gw)
    }

    /// The executor section with its object store restored.
    pub fn executor_config(&self) -> Config {
        let mut cfg = self.executor.clone();
        cfg.object_store = self.s3.clone().map(|mut s3| {
            s3.secret_key = self.s3_secret_key.clone().map(Secret::new);
            crate::storage::ObjectStore(s3)
        });
        cfg
    }
}

/// The credential the executor's own calls to its peers carry, and the user token: the
/// service credential ([`dutgate_core::auth::service_token`]: `<state>/tokens/service`, else
/// the admin token), then `gateway.auth.user_token` or `<state>/tokens/user`.
pub fn gateway_tokens(gw: &GatewayConfig) -> (Option<Secret>, Option<Secret>) {
    let user = gw
        .auth
        .user_token
        .clone()
        .or_else(|| dutgate_core::auth::read_token(&gw.tokens_dir().join("user")));
    (dutgate_core::auth::service_token(gw), user)
}

/// Directory of job `id`'s files under the executor's state dir.
pub fn job_dir(executor_state: &Path, id: i64) -> PathBuf {
    executor_state.join("jobs").join(id.to_string())
}

/// The executor's state dir (`<state_dir>/executor`).
pub fn executor_state_dir(gw: &GatewayConfig) -> PathBuf {
    gw.state_dir.join(ServiceName::Executor.as_str())
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("reading the setup from stdin: {0}")]
    Setup(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("storage: {0}")]
    Db(#[from] dutgate_core::db::DbError),
    #[error("job {0} is {1}, not dispatched to this process")]
    NotRunnable(i64, JobState),
    #[error("job {0} has no machine or lease")]
    NoLease(i64),
    #[error("the lease of job {0} cannot be presented in an HTTP header")]
    BadLease(i64),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// `dutgate job <id>`: reads the setup from stdin and runs the job. The return value is the
/// process exit code: 0 when a final status was stored.
pub async fn main(id: i64) -> Result<JobStatus, ProcessError> {
    // The executor writes the setup and closes the pipe at once; a blocking read is fine.
    let raw = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut raw = Vec::new();
        std::io::stdin()
            .take(1 << 20)
            .read_to_end(&mut raw)
            .map(|_| raw)
    })
    .await
    .map_err(|e| ProcessError::Setup(e.to_string()))?
    .map_err(|e| ProcessError::Setup(e.to_string()))?;
    let setup: ProcessSetup =
        serde_json::from_slice(&raw).map_err(|e| ProcessError::Setup(e.to_string()))?;
    run(id, setup).await
}

/// Clients of the peers. Every client presents one credential on every request (default
/// headers), set here and nowhere else: the job process its machine's lease
/// ([`Peers::for_lease`]), the executor the service credential ([`Peers::new`]).
#[derive(Clone)]
pub(crate) struct Peers {
    pub mars: MarsClient,
    pub pdu: PduClient,
    pub boot: BootClient,
    pub salad: SaladClient,
    /// The HTTP client all of the above share (one connection pool), for the machine's job
    /// script and its artifacts, read before power-on: boot serves a job script only to its
    /// machine, the holder of its lease, services and admins. Its calls time out after
    /// [`dutgate_core::client::DEFAULT_TIMEOUT`]; long downloads set their own timeout.
    pub http: reqwest::Client,
    pub boot_url: String,
    pub console_host: String,
}

impl Peers {
    /// The executor's own calls (renewing the lease of a job it re-attaches to, the teardown
    /// of a dead job's machine): the service credential. Under `dutgate up` it is in a file,
    /// not in the config: without it those calls are refused (401) and the DUT stays powered.
    pub fn new(gw: &GatewayConfig, cfg: &Config) -> Self {
        let headers = dutgate_core::auth::service_token(gw)
            .map(|t| dutgate_core::lease::bearer_headers(&t))
            .unwrap_or_default();
        Self::presenting(gw, cfg, headers)
    }

    /// A job process: its machine's lease, and nothing else.
    pub fn for_lease(gw: &GatewayConfig, cfg: &Config, lease: &str) -> Option<Self> {
        let headers = dutgate_core::lease::lease_headers(lease).ok()?;
        Some(Self::presenting(gw, cfg, headers))
    }

    fn presenting(gw: &GatewayConfig, cfg: &Config, credential: HeaderMap) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(dutgate_core::client::DEFAULT_TIMEOUT)
            .default_headers(credential)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let api = |service: ServiceName| {
            ApiClient::with_http(cfg.url_of(gw, service), None, http.clone())
        };
        Self {
            mars: MarsClient::from_api(api(ServiceName::Mars)),
            pdu: PduClient::from_api(api(ServiceName::Pdu)),
            boot: BootClient::from_api(api(ServiceName::Boot)),
            salad: SaladClient::from_api(api(ServiceName::Salad)),
            boot_url: cfg.url_of(gw, ServiceName::Boot),
            console_host: cfg.console_host(gw),
            http,
        }
    }
}

/// Writes events and keeps the progress the control socket publishes.
#[derive(Clone)]
pub(crate) struct Reporter {
    pub store: Store,
    pub id: i64,
    pub progress: Arc<watch::Sender<Progress>>,
}

impl Reporter {
    pub async fn event(&self, kind: &str, message: impl Into<String>, data: Value) {
        let message = message.into();
        tracing::info!(job_id = self.id, kind, %message, "event");
        match self.store.add_event(self.id, kind, &message, data).await {
            Ok(seq) => {
                self.progress
                    .send_modify(|p| p.event_seq = p.event_seq.max(seq));
            }
            Err(e) => tracing::error!(job_id = self.id, error = %e, "cannot store an event"),
        }
    }

    pub async fn phase(&self, phase: &str, message: impl Into<String>) {
        if let Err(e) = self.store.set_phase(self.id, phase).await {
            tracing::error!(job_id = self.id, error = %e, "cannot store the phase");
        }
        self.event(kind::PHASE, message, json!({"phase": phase}))
            .await;
    }
}

/// Runs job `id` with `setup` (what [`main`] does after reading stdin).
pub async fn run(id: i64, setup: ProcessSetup) -> Result<JobStatus, ProcessError> {
    let gw = setup.gateway_config().map_err(ProcessError::Setup)?;
    let cfg = setup.executor_config();
    // A small pool, closed when idle: hundreds of job processes share the database server.
    let db = dutgate_core::db::Db::open_for_service_sized(
        ServiceName::Executor.as_str(),
        &gw,
        crate::store::MIGRATIONS,
        dutgate_core::db::PoolSize::Worker,
    )
    .await?;
    let store = Store::new(db);
    let row = store.require(id).await?;
    if !matches!(row.state, JobState::Dispatched | JobState::Running) {
        return Err(ProcessError::NotRunnable(id, row.state));
    }
    let (Some(machine), Some(lease)) = (row.machine_id, row.lease_id.clone()) else {
        return Err(ProcessError::NoLease(id));
    };
    let dir = job_dir(&executor_state_dir(&gw), id);
    std::fs::create_dir_all(&dir)?;
    store.set_started(id, std::process::id()).await?;

    let (ptx, prx) = watch::channel(Progress {
        console_bytes: std::fs::metadata(dir.join("console.log"))
            .map(|m| m.len())
            .unwrap_or(0),
        event_seq: 0,
        finished: false,
    });
    let reporter = Reporter {
        store: store.clone(),
        id,
        progress: Arc::new(ptx),
    };
    let stop_socket = CancellationToken::new();
    let socket = tokio::spawn(control::serve(
        control::socket_path(&dir),
        prx,
        stop_socket.clone(),
    ));

    // Cancellation (SIGTERM from the executor) and a lost lease both stop the session;
    // teardown runs either way.
    let cancel = CancellationToken::new();
    let lease_lost = CancellationToken::new();
    spawn_signal_watch(cancel.clone());
    let peers = Peers::for_lease(&gw, &cfg, &lease).ok_or(ProcessError::BadLease(id))?;
    let heartbeat = tokio::spawn(heartbeat(
        peers.mars.clone(),
        lease.clone(),
        Duration::from_secs(setup.lease_ttl_seconds.max(3)),
        lease_lost.clone(),
        reporter.clone(),
    ));

    // A broken object store must not keep the job from tearing down: the job then runs
    // without a bucket, and one that uses the bucket variables fails to render (SETUP_FAIL).
    let storage = match crate::storage::from_config(&gw, &cfg).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(job_id = id, error = %e, "object storage unusable");
            reporter
                .event(
                    kind::PHASE,
                    format!("object storage unusable: {e}"),
                    serde_json::json!({"phase": "setup"}),
                )
                .await;
            None
        }
    };
    let job = JobContext {
        row,
        machine,
        lease,
        dir: dir.clone(),
        gw,
        cfg,
        peers,
        reporter: reporter.clone(),
        storage,
    };
    let mut state = session::SessionState::default();
    let outcome = session::run(&job, &cancel, &lease_lost, &mut state).await;
    let (status, reason) = teardown::run(&job, &outcome, &state).await;
    heartbeat.abort();
    let stored = store.finish(id, status, &reason).await;
    reporter.progress.send_modify(|p| p.finished = true);
    // Let followers read the final progress line before the socket goes away.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop_socket.cancel();
    let _ = socket.await;
    let _ = std::fs::remove_file(control::socket_path(&dir));
    stored?;
    Ok(status)
}

/// Everything one job's steps need.
pub(crate) struct JobContext {
    pub row: JobRow,
    pub machine: MachineId,
    pub lease: String,
    pub dir: PathBuf,
    pub gw: GatewayConfig,
    pub cfg: Config,
    pub peers: Peers,
    pub reporter: Reporter,
    pub storage: Option<Arc<dyn crate::storage::JobStorage>>,
}

pub(crate) async fn teardown_power_off(
    peers: &Peers,
    machine: Option<&dutgate_mars::model::Machine>,
    id: MachineId,
    r: &Reporter,
) {
    teardown::power_off(&peers.pdu, machine, id, r).await
}

pub(crate) async fn teardown_clear_boot(peers: &Peers, machine: MachineId, job: i64, r: &Reporter) {
    teardown::clear_boot(&peers.boot, machine, job, r).await
}

pub(crate) async fn teardown_keep_bucket(
    storage: &dyn crate::storage::JobStorage,
    bucket: &str,
    dir: &Path,
    r: &Reporter,
) {
    teardown::keep_bucket(storage, bucket, dir, r).await
}

fn spawn_signal_watch(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; cancellation needs SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("cancellation requested by signal");
        cancel.cancel();
    });
}

/// Extends the lease at once, then every third of its TTL. A lease mars says is gone stops
/// the job.
///
/// The first beat is at the start: the lease was taken before the process was launched (by a
/// round, or by an executor that stopped between the record and the launch), and what was
/// left of its TTL has been spent meanwhile.
async fn heartbeat(
    mars: MarsClient,
    lease: String,
    ttl: Duration,
    lost: CancellationToken,
    reporter: Reporter,
) {
    let mut beat = tokio::time::interval(ttl / 3);
    // A beat that took long (mars slow or away) is followed by the next a full period later,
    // not by a burst.
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        beat.tick().await;
        match mars.heartbeat(&lease).await {
            Ok(_) => {}
            Err(e) if dutgate_mars::client::is_gone(&e) => {
                reporter
                    .event(
                        kind::EXECUTOR,
                        format!("lease {lease} is gone: stopping the job"),
                        json!({"action": "lease_lost"}),
                    )
                    .await;
                lost.cancel();
                return;
            }
            // A transient error: the next beat (well within the TTL) retries.
            Err(e) => tracing::warn!(job_id = reporter.id, error = %e, "lease heartbeat failed"),
        }
    }
}
