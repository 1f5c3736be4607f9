//! The executor's side of job processes: start them (own process group), follow them through
//! their control socket, re-attach after an executor restart, cancel them (SIGTERM → grace →
//! SIGKILL), and tear down after a process that died.
//!
//! Invariant: a job whose process is gone is always finished — by the process itself, or here
//! (`INCOMPLETE`, machine powered off, boot config cleared; the lease is left to expire so mars
//! sends the machine to `QUICK_CHECK`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dutgate_core::JobStatus;
use dutgate_core::config::GatewayConfig;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::control::{self, Progress};
use crate::model::{JobState, kind};
use crate::process::{self, Peers, ProcessSetup, Reporter};
use crate::storage::JobStorage;
use crate::store::{JobRow, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("job {0} is already finished")]
    Finished(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting the job process: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job process this executor follows.
#[derive(Clone)]
struct Tracked {
    pid: u32,
    progress: watch::Receiver<Progress>,
    alive: watch::Receiver<bool>,
}

/// Runs a dispatched job inside the executor instead of in a process: `(job id, machine,
/// lease id)`. For the scheduler benchmark, which measures dispatch without the cost of 10,000
/// process starts; the runner must finish the job and release the lease itself.
pub type InlineRunner = Arc<
    dyn Fn(i64, dutgate_core::MachineId, String) -> futures::future::BoxFuture<'static, ()>
        + Send
        + Sync,
>;

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    gw: Arc<GatewayConfig>,
    cfg: Config,
    name: String,
    state_dir: PathBuf,
    peers: Peers,
    storage: Option<Arc<dyn JobStorage>>,
    jobs: Mutex<HashMap<i64, Tracked>>,
    handled: Mutex<HashSet<i64>>,
    inline: Option<InlineRunner>,
    /// Woken when a job finishes (the scheduler may have work).
    finished: Arc<Notify>,
}

/// Sends `sig` to the process group led by `pid`.
fn kill_group(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names the group.
    unsafe { libc::kill(-pid, sig) == 0 }
}

/// Whether `pid` is alive and is job `id`'s process (not a recycled pid).
fn is_job_process(pid: u32, id: i64) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        && let Some(rest) = stat.rsplit(')').next()
        && rest.trim_start().starts_with('Z')
    {
        return false;
    }
    let id = id.to_string();
    cmdline.split(|b| *b == 0).any(|a| a == id.as_bytes())
}

impl Supervisor {
    pub fn new(
        store: Store,
        gw: Arc<GatewayConfig>,
        cfg: Config,
        storage: Option<Arc<dyn JobStorage>>,
        finished: Arc<Notify>,
        inline: Option<InlineRunner>,
    ) -> Self {
        let peers = Peers::new(&gw, &cfg);
        let state_dir = process::executor_state_dir(&gw);
        Self {
            inner: Arc::new(Inner {
                store,
                name: cfg.executor_name(),
                peers,
                cfg,
                gw,
                state_dir,
                storage,
                jobs: Mutex::new(HashMap::new()),
                handled: Mutex::new(HashSet::new()),
                inline,
                finished,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn job_dir(&self, id: i64) -> PathBuf {
        process::job_dir(&self.inner.state_dir, id)
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Tracked>> {
        self.inner.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live progress of a job this executor follows.
    pub fn progress(&self, id: i64) -> Option<watch::Receiver<Progress>> {
        self.jobs().get(&id).map(|t| t.progress.clone())
    }

    /// Starts the process of a dispatched job.
    pub async fn launch(
        &self,
        id: i64,
        machine: dutgate_core::MachineId,
        lease_id: &str,
        lease_ttl_seconds: u64,
    ) -> Result<(), LaunchError> {
        if let Some(run) = &self.inner.inline {
            tokio::spawn(run(id, machine, lease_id.to_string()));
            return Ok(());
        }
        let dir = self.job_dir(id);
        std::fs::create_dir_all(&dir).map_err(LaunchError::Spawn)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("process.log"))
            .map_err(LaunchError::Spawn)?;
        let log2 = log.try_clone().map_err(LaunchError::Spawn)?;
        let (program, lead): (PathBuf, Vec<PathBuf>) = match &self.inner.cfg.job_command {
            Some(cmd) if !cmd.is_empty() => (cmd[0].clone(), cmd[1..].to_vec()),
            _ => (
                std::env::current_exe().map_err(LaunchError::Spawn)?,
                vec![PathBuf::from("job")],
            ),
        };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&lead)
            .arg(id.to_string())
            // Its own group: signals to the executor (Ctrl-C, systemd stop) do not reach it,
            // and cancellation reaches everything it started.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(false);
        let nice = self.inner.cfg.job_nice;
        if nice > 0 {
            // SAFETY: between fork and exec only async-signal-safe calls are allowed;
            // setpriority(2) is one, and it only changes the child being started.
            unsafe {
                cmd.pre_exec(move || {
                    // A job left at the executor's priority still runs: not worth failing.
                    let _ = libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(LaunchError::Spawn)?;
        let pid = child.id().unwrap_or(0);
        let setup = ProcessSetup::new(&self.inner.gw, &self.inner.cfg, lease_ttl_seconds);
        if let Some(mut stdin) = child.stdin.take() {
            let bytes = serde_json::to_vec(&setup).unwrap_or_default();
            if let Err(e) = stdin.write_all(&bytes).await {
                tracing::error!(job_id = id, error = %e, "cannot hand the setup to the job process");
            }
            drop(stdin);
        }
        self.inner
            .store
            .add_event(
                id,
                kind::PROCESS_STARTED,
                &format!("job process {pid} started"),
                json!({"pid": pid}),
            )
            .await?;
        metrics::counter!("executor_job_processes_started_total").increment(1);
        let (alive_tx, alive_rx) = watch::channel(true);
        let (ptx, prx) = watch::channel(Progress::default());
        self.jobs().insert(
            id,
            Tracked {
                pid,
                progress: prx,
                alive: alive_rx,
            },
        );
        let ptx = Arc::new(ptx);
        tokio::spawn(self.clone().follow(id, pid, ptx, None));
        let me = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let detail = match status {
                Ok(s) => describe_exit(s),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = alive_tx.send(false);
            me.process_gone(id, &detail).await;
        });
        Ok(())
    }

    /// Follows the control socket; for a process that is not our child, its closing is how
    /// we learn the process ended.
    async fn follow(
        self,
        id: i64,
        pid: u32,
        ptx: Arc<watch::Sender<Progress>>,
        not_child: Option<watch::Sender<bool>>,
    ) {
        let path = control::socket_path(&self.job_dir(id));
        let mut attached = false;
        for _ in 0..200 {
            if !is_job_process(pid, id) {
                break;
            }
            match control::follow(&path, &ptx).await {
                Ok(()) => {
                    attached = true;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        if !attached {
            tracing::warn!(
                job_id = id,
                pid,
                "could not follow the job process's control socket"
            );
        }
        let Some(alive) = not_child else {
            return;
        };
        // Not our child: wait until the pid is really gone, then conclude.
        while is_job_process(pid, id) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = alive.send(false);
        self.process_gone(id, "exited").await;
    }

    /// After a restart: follow every job this executor's processes were running.
    pub async fn reattach_all(&self) -> Result<usize, StoreError> {
        let rows = self.inner.store.active_of(&self.inner.name).await?;
        let mut n = 0;
        for row in rows {
            match (row.state, row.pid) {
                (JobState::Running, Some(pid)) if is_job_process(pid as u32, row.id) => {
                    self.attach(row.id, pid as u32).await?;
                    n += 1;
                }
                (JobState::Dispatched, None) => {
                    // The previous executor started the process, which has not recorded its
                    // pid yet: follow it, never start a second one.
                    if let Some(pid) = self.find_unrecorded_process(row.id) {
                        self.attach(row.id, pid).await?;
                        n += 1;
                        continue;
                    }
                    // Dispatched, but the executor died before starting the process.
                    let ttl = self.inner.cfg.lease_ttl_seconds.unwrap_or(30);
                    let (Some(machine), Some(lease)) = (row.machine_id, row.lease_id.as_deref())
                    else {
                        self.process_gone(row.id, "dispatched without a lease")
                            .await;
                        continue;
                    };
                    // The dispatch is recorded while its lease is taken: a lease mars does
                    // not hold (never granted, or expired while no executor ran) means the
                    // job never started — it goes back to the queue.
                    if let Ok(m) = self.inner.peers.mars.machine(machine).await
                        && m.lease.as_ref().is_none_or(|l| l.id != lease)
                    {
                        match self
                            .inner
                            .store
                            .withdraw_dispatch(
                                row.id,
                                lease,
                                "its lease is not held (the executor stopped while dispatching it)",
                            )
                            .await
                        {
                            Ok(_) => self.inner.finished.notify_one(),
                            Err(e) => {
                                tracing::error!(job_id = row.id, error = %e, "cannot withdraw the dispatch")
                            }
                        }
                        continue;
                    }
                    if let Err(e) = self.launch(row.id, machine, lease, ttl).await {
                        tracing::error!(job_id = row.id, error = %e, "cannot start the job process");
                        self.process_gone(row.id, &format!("cannot start: {e}"))
                            .await;
                    }
                    n += 1;
                }
                _ => {
                    self.process_gone(row.id, "not running after the executor restarted")
                        .await;
                }
            }
        }
        Ok(n)
    }

    /// Follows job `id`'s process `pid`, which another executor (process) started.
    async fn attach(&self, id: i64, pid: u32) -> Result<(), StoreError> {
        let (ptx, prx) = watch::channel(Progress::default());
        let (alive_tx, alive_rx) = watch::channel(true);
        self.jobs().insert(
            id,
            Tracked {
                pid,
                progress: prx,
                alive: alive_rx,
            },
        );
        self.inner
            .store
            .add_event(
                id,
                kind::EXECUTOR,
                &format!("executor {} re-attached to process {pid}", self.inner.name),
                json!({"action": "attached", "pid": pid}),
            )
            .await?;
        tokio::spawn(self.clone().follow(id, pid, Arc::new(ptx), Some(alive_tx)));
        Ok(())
    }

    /// The live process of job `id` that has not recorded its pid yet (the previous executor
    /// started it and died before the process got that far): the leader of its own process
    /// group whose stdout is the job's `process.log`.
    fn find_unrecorded_process(&self, id: i64) -> Option<u32> {
        let log = self.job_dir(id).join("process.log");
        let log = std::fs::canonicalize(&log).unwrap_or(log);
        let me = std::process::id();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            if pid == me || std::fs::read_link(format!("/proc/{pid}/fd/1")).ok()? != log {
                return None;
            }
            // `pid (comm) state ppid pgrp …`: alive and leading its group.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
            let state = fields.next()?;
            let pgrp = fields.nth(1)?.parse::<u32>().ok()?;
            (state != "Z" && pgrp == pid).then_some(pid)
        })
    }

    /// The job process ended. If it did not store a final status, the job ends here.
    async fn process_gone(&self, id: i64, detail: &str) {
        self.jobs().remove(&id);
        let row = match self.inner.store.get(id).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(job_id = id, error = %e, "cannot read the job after its process ended");
                return;
            }
        };
        if row.state == JobState::Finished {
            self.inner.finished.notify_one();
            return;
        }
        {
            let mut handled = self.inner.handled.lock().unwrap_or_else(|p| p.into_inner());
            if !handled.insert(id) {
                return;
            }
        }
        tracing::warn!(
            job_id = id,
            detail,
            "job process ended without a final status"
        );
        metrics::counter!("executor_job_processes_died_total").increment(1);
        let reason = if row.cancel_requested {
            "cancelled".to_string()
        } else {
            format!("job process died ({detail})")
        };
        self.teardown_dead(&row, &reason).await;
        if let Err(e) = self
            .inner
            .store
            .finish(id, JobStatus::Incomplete, &reason)
            .await
        {
            tracing::error!(job_id = id, error = %e, "cannot finish the job");
        }
        self.inner.finished.notify_one();
    }

    /// Teardown on behalf of a dead job process. The lease is not released: it expires and
    /// mars verifies the machine (`QUICK_CHECK`) before anyone else uses it.
    async fn teardown_dead(&self, row: &JobRow, reason: &str) {
        let (ptx, _) = watch::channel(Progress::default());
        let r = Reporter {
            store: self.inner.store.clone(),
            id: row.id,
            progress: Arc::new(ptx),
        };
        r.event(
            kind::EXECUTOR,
            format!("executor tears down: {reason}"),
            json!({"action": "teardown"}),
        )
        .await;
        let Some(machine_id) = row.machine_id else {
            return;
        };
        let machine = self.inner.peers.mars.machine(machine_id).await.ok();
        process::teardown_power_off(&self.inner.peers, machine.as_ref(), machine_id, &r).await;
        process::teardown_clear_boot(&self.inner.peers, machine_id, row.id, &r).await;
        if let Some(storage) = &self.inner.storage {
            let bucket = self
                .inner
                .store
                .events(row.id, 0)
                .await
                .ok()
                .and_then(|evs| {
                    evs.iter().find_map(|e| {
                        e.data
                            .get("bucket")
                            .and_then(|b| b.as_str())
                            .map(String::from)
                    })
                });
            if let Some(bucket) = bucket {
                process::teardown_keep_bucket(storage.as_ref(), &bucket, &self.job_dir(row.id), &r)
                    .await;
            }
        }
    }

    /// Cancels a job: queued ones end at once; running ones get SIGTERM, then SIGKILL after
    /// the grace period.
    pub async fn cancel(&self, id: i64) -> Result<JobRow, CancelError> {
        let row = self.inner.store.require(id).await?;
        match row.state {
            JobState::Finished => Err(CancelError::Finished(id)),
            JobState::Queued => {
                match self
                    .inner
                    .store
                    .finish(id, JobStatus::Incomplete, "cancelled")
                    .await?
                {
                    Some(r) => Ok(r),
                    // Dispatched meanwhile: cancel it as a running job.
                    None => Box::pin(self.cancel(id)).await,
                }
            }
            JobState::Dispatched | JobState::Running => {
                self.inner.store.request_cancel(id).await?;
                self.inner
                    .store
                    .add_event(
                        id,
                        kind::CANCEL_REQUESTED,
                        "cancellation requested",
                        json!({}),
                    )
                    .await?;
                let tracked = self.jobs().get(&id).cloned();
                match tracked {
                    Some(t) => {
                        kill_group(t.pid, libc::SIGTERM);
                        let me = self.clone();
                        let grace = self.inner.cfg.cancel_grace();
                        tokio::spawn(async move {
                            let mut alive = t.alive.clone();
                            let ended = tokio::time::timeout(grace, async {
                                let _ = alive.wait_for(|a| !*a).await;
                            })
                            .await
                            .is_ok();
                            if !ended && is_job_process(t.pid, id) {
                                kill_group(t.pid, libc::SIGKILL);
                                let _ = me
                                    .inner
                                    .store
                                    .add_event(
                                        id,
                                        kind::EXECUTOR,
                                        &format!(
                                            "job process {} still there after {:.1} s: killed",
                                            t.pid,
                                            grace.as_secs_f64()
                                        ),
                                        json!({"action": "killed", "pid": t.pid}),
                                    )
                                    .await;
                            }
                        });
                    }
                    None if row.executor.as_deref() == Some(self.inner.name.as_str()) => {
                        // Ours, but no process: the executor tears down itself.
                        if let Some(pid) = row.pid
                            && is_job_process(pid as u32, id)
                        {
                            kill_group(pid as u32, libc::SIGTERM);
                        } else {
                            self.process_gone(id, "no process").await;
                        }
                    }
                    // Another executor's job: it sees the flag when its process ends.
                    None => {}
                }
                Ok(self.inner.store.require(id).await?)
            }
        }
    }

    /// mars says the job's lease expired: its process is dead or stuck. Make sure it is gone
    /// and finish the job.
    pub async fn lease_expired(&self, id: i64) {
        let tracked = self.jobs().get(&id).cloned();
        if let Some(t) = tracked {
            if is_job_process(t.pid, id) {
                kill_group(t.pid, libc::SIGKILL);
            }
            return; // The exit (or the socket closing) finishes the job.
        }
        if let Ok(Some(row)) = self.inner.store.get(id).await
            && row.state != JobState::Finished
            && row.executor.as_deref() == Some(self.inner.name.as_str())
        {
            self.process_gone(id, "its lease expired").await;
        }
    }
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => "unknown exit".into(),
    }
}
