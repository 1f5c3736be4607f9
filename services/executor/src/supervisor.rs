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
    command: JobCommand,
    jobs: Mutex<HashMap<i64, Tracked>>,
    handled: Mutex<HashSet<i64>>,
    /// Jobs whose processes were sent SIGTERM for a cancellation (once each).
    signalled: Mutex<HashSet<i64>>,
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

/// The shortest lease TTL (`executor.lease_ttl_seconds` allows no less): assumed for a lease
/// whose TTL mars cannot tell, so that its process heartbeats early rather than late.
const SHORTEST_LEASE_TTL: u64 = 3;

/// How often the executor looks in the store for cancellations of its jobs requested through
/// another executor sharing the database.
const CANCEL_POLL: Duration = Duration::from_secs(1);

/// The command line of job processes: `<program> <lead…> <id>`, exactly as the executor
/// starts them. A process is taken for job `id`'s only when its argv is exactly that (never
/// when it merely contains the id: a recycled pid must not be signalled).
#[derive(Debug, Clone)]
pub struct JobCommand {
    program: PathBuf,
    lead: Vec<PathBuf>,
    /// A configured command of several elements may be a wrapper that ends by exec'ing its
    /// last element with the id: that element.
    exec_target: Option<PathBuf>,
}

impl JobCommand {
    /// `executor.job_command`, or this binary with `job`.
    pub fn from_config(cfg: &Config) -> Self {
        match &cfg.job_command {
            Some(cmd) if !cmd.is_empty() => Self {
                program: cmd[0].clone(),
                lead: cmd[1..].to_vec(),
                exec_target: (cmd.len() > 1).then(|| cmd[cmd.len() - 1].clone()),
            },
            _ => Self {
                // Unknown only if /proc is not mounted; the job processes would not start
                // either, which the launch reports.
                program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("dutgate")),
                lead: vec![PathBuf::from("job")],
                exec_target: None,
            },
        }
    }

    /// The argv of job `id`'s process.
    pub fn argv(&self, id: i64) -> Vec<std::ffi::OsString> {
        let mut argv = vec![self.program.clone().into_os_string()];
        argv.extend(self.lead.iter().map(|a| a.clone().into_os_string()));
        argv.push(id.to_string().into());
        argv
    }

    /// Whether `cmdline` (the NUL-separated argv of `/proc/<pid>/cmdline`) is that of job
    /// `id`'s process: exactly [`JobCommand::argv`], or — for a configured command of several
    /// elements, a wrapper that ends by exec'ing its last element with the id (`/bin/sh -c
    /// '…; exec "$0" "$@"' /usr/bin/dutgate-job`) — exactly `<last element> <id>`.
    pub fn matches(&self, id: i64, cmdline: &[u8]) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let args: Vec<&[u8]> = cmdline
            .strip_suffix(&[0])
            .unwrap_or(cmdline)
            .split(|b| *b == 0)
            .collect();
        let argv = self.argv(id);
        if args.iter().copied().eq(argv.iter().map(|a| a.as_bytes())) {
            return true;
        }
        let id = id.to_string();
        self.exec_target
            .as_ref()
            .is_some_and(|target| args == [target.as_os_str().as_bytes(), id.as_bytes()])
    }

    /// Whether `pid` is alive (not a zombie) and runs job `id`'s process.
    fn is_running(&self, pid: u32, id: i64) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(rest) = stat.rsplit(')').next()
            && rest.trim_start().starts_with('Z')
        {
            return false;
        }
        self.matches(id, &cmdline)
    }
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
                command: JobCommand::from_config(&cfg),
                peers,
                cfg,
                gw,
                state_dir,
                storage,
                jobs: Mutex::new(HashMap::new()),
                handled: Mutex::new(HashSet::new()),
                signalled: Mutex::new(HashSet::new()),
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
        // Exactly the argv the process is recognised by later (`JobCommand::matches`).
        let argv = self.inner.command.argv(id);
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
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
            // A child of ours is known to be the job's process (its end is learnt from
            // `wait`); right after the spawn its command line may even be empty still (the
            // kernel is finishing the exec). Another's is checked by its command line.
            if not_child.is_some() && !self.inner.command.is_running(pid, id) {
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
        // Not our child: wait until the pid is really gone, then conclude. Gone means gone
        // twice, 50 ms apart: while a wrapper execs the job program its command line is
        // briefly empty.
        loop {
            while self.inner.command.is_running(pid, id) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !self.inner.command.is_running(pid, id) {
                break;
            }
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
                (JobState::Running, Some(pid))
                    if self.inner.command.is_running(pid as u32, row.id) =>
                {
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
                    // Dispatched (recorded after mars granted the lease), but the executor
                    // died before starting the process.
                    let (Some(machine), Some(lease)) = (row.machine_id, row.lease_id.as_deref())
                    else {
                        self.process_gone(row.id, "dispatched without a lease")
                            .await;
                        continue;
                    };
                    // The lease was taken a while ago and nobody heartbeats it: renew it
                    // first (a lease gone meanwhile means the job must not start at all), and
                    // hand the process the TTL mars keeps for it.
                    let ttl = match self.inner.peers.mars.heartbeat(lease).await {
                        Ok(renewed) => renewed.ttl_seconds,
                        // The lease expired while no executor ran: the machine may serve
                        // another job already. Nothing of this job ever touched it, so it is
                        // not touched now either; the job ends without running.
                        Err(e) if dutgate_mars::client::is_gone(&e) => {
                            self.finish_unstarted(row.id, lease).await;
                            continue;
                        }
                        // mars cannot be asked: the job is launched, and its first heartbeat
                        // (soon: the shortest TTL is assumed) finds out.
                        Err(e) => {
                            tracing::warn!(job_id = row.id, lease, error = %e, "cannot renew the lease of a dispatched job");
                            self.inner
                                .cfg
                                .lease_ttl_seconds
                                .unwrap_or(SHORTEST_LEASE_TTL)
                        }
                    };
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

    /// A dispatched job whose lease expired before its process started: it ends `INCOMPLETE`
    /// without a teardown (it never touched its machine, which it no longer holds).
    async fn finish_unstarted(&self, id: i64, lease: &str) {
        let reason = format!(
            "its lease {lease} expired before its process started (no executor was running)"
        );
        tracing::warn!(
            job_id = id,
            lease,
            "lease expired before the job process started"
        );
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
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            (state != "Z" && pgrp == pid && self.inner.command.matches(id, &cmdline)).then_some(pid)
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
            // Stored by the job process, which has no `/metrics`: counted here.
            self.inner.store.note_finished(&row);
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
        let r = self.reporter(row.id);
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
        // Held under another lease (this one expired and mars gave the machine to someone
        // else): not this job's to power off.
        let other = machine
            .as_ref()
            .and_then(|m| m.lease.as_ref())
            .filter(|l| Some(l.id.as_str()) != row.lease_id.as_deref());
        match other {
            Some(l) => {
                r.event(
                    kind::TEARDOWN,
                    format!(
                        "power_off skipped: machine {machine_id} is held by lease {}",
                        l.id
                    ),
                    json!({"step": "power_off", "ok": false, "skipped": true}),
                )
                .await
            }
            None => {
                process::teardown_power_off(&self.inner.peers, machine.as_ref(), machine_id, &r)
                    .await
            }
        }
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
                    .finish_queued(id, JobStatus::Incomplete, "cancelled")
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
                    Some(t) => self.terminate(id, t),
                    None if row.executor.as_deref() == Some(self.inner.name.as_str()) => {
                        // Ours, but no process: the executor tears down itself.
                        if let Some(pid) = row.pid
                            && self.inner.command.is_running(pid as u32, id)
                        {
                            kill_group(pid as u32, libc::SIGTERM);
                        } else {
                            self.process_gone(id, "no process").await;
                        }
                    }
                    // Another executor's job: that executor finds the flag within
                    // `CANCEL_POLL` (`Supervisor::watch_cancels`) and signals its process.
                    None => {}
                }
                Ok(self.inner.store.require(id).await?)
            }
        }
    }

    /// Cancels job `id`'s process `t`: SIGTERM (the process tears down), SIGKILL after the
    /// grace period. Once per job.
    fn terminate(&self, id: i64, t: Tracked) {
        {
            let mut signalled = self
                .inner
                .signalled
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !signalled.insert(id) {
                return;
            }
        }
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
            if !ended && me.inner.command.is_running(t.pid, id) {
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

    /// Signals the processes of this executor's jobs whose cancellation was requested through
    /// another executor sharing the database: that executor only sets the flag in the store.
    /// Looks every [`CANCEL_POLL`] (one query for all of this executor's jobs).
    pub async fn watch_cancels(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(CANCEL_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ids = match self.inner.store.cancels_of(&self.inner.name).await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for cancellations");
                    continue;
                }
            };
            for id in ids {
                let tracked = self.jobs().get(&id).cloned();
                if let Some(t) = tracked {
                    tracing::info!(job_id = id, pid = t.pid, "cancellation found in the store");
                    self.terminate(id, t);
                }
            }
        }
    }

    /// mars says the job's lease expired: its process is dead or stuck. Make sure it is gone,
    /// finish the job, and clear the job's boot config.
    ///
    /// Only the executor that ran the job acts (every executor following mars hears of it).
    pub async fn lease_expired(&self, id: i64) {
        let tracked = self.jobs().get(&id).cloned();
        if let Some(t) = &tracked
            && self.inner.command.is_running(t.pid, id)
        {
            // Its exit (or its control socket closing) finishes the job.
            kill_group(t.pid, libc::SIGKILL);
        }
        let row = match self.inner.store.get(id).await {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(job_id = id, error = %e, "cannot read the job whose lease expired");
                return;
            }
        };
        if row.executor.as_deref() != Some(self.inner.name.as_str()) {
            return;
        }
        if tracked.is_none() && row.state != JobState::Finished {
            // No process: the executor tears down (boot config included) and ends the job.
            self.process_gone(id, "its lease expired").await;
            return;
        }
        // The process ended the job itself, or is being killed. Its own teardown cannot clear
        // the boot config once the lease is gone (boot takes a job's credential only while
        // its lease lives), and a killed one never gets there: the executor clears it with
        // the service credential — only if this job set it, never the next job's.
        if let Some(machine) = row.machine_id {
            let r = self.reporter(id);
            process::teardown_clear_boot(&self.inner.peers, machine, id, &r).await;
        }
    }

    /// Writes job `id`'s events on the executor's behalf (no process publishes its progress).
    fn reporter(&self, id: i64) -> Reporter {
        let (ptx, _) = watch::channel(Progress::default());
        Reporter {
            store: self.inner.store.clone(),
            id,
            progress: Arc::new(ptx),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn command(cmd: &[&str]) -> JobCommand {
        JobCommand::from_config(&Config {
            job_command: Some(cmd.iter().map(PathBuf::from).collect()),
            ..Default::default()
        })
    }

    /// A live process with `argv`, killed when dropped.
    struct Proc(std::process::Child);

    impl Proc {
        fn start(argv: &[&str]) -> Self {
            let child = std::process::Command::new(argv[0])
                .args(&argv[1..])
                .spawn()
                .unwrap();
            // `spawn` returns once the exec began; the kernel sets the new command line a
            // moment later (until then `/proc/<pid>/cmdline` is empty).
            let path = format!("/proc/{}/cmdline", child.id());
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::read(&path).is_ok_and(|c| c.is_empty()) {
                assert!(std::time::Instant::now() < end, "{argv:?} never exec'd");
                std::thread::yield_now();
            }
            Self(child)
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A process is a job's only when its argv is exactly the job's command line: one whose
    /// command line merely contains the id (a recycled pid, say) is not, nor is a zombie.
    #[test]
    fn job_processes_are_identified_by_their_exact_argv() {
        let cmd = command(&["/bin/sleep", "30"]);
        // `/bin/sleep 30 1` is exactly job 1's command line.
        let job = Proc::start(&["/bin/sleep", "30", "1"]);
        assert!(cmd.is_running(job.pid(), 1));
        // The same process holds "30" as an argument, but it is not job 30's.
        assert!(!cmd.is_running(job.pid(), 30));
        // Another program whose arguments contain the id, in other places.
        let other = Proc::start(&["/bin/sleep", "1", "30"]);
        assert!(!cmd.is_running(other.pid(), 1));
        assert!(!cmd.is_running(other.pid(), 30));
        let longer = Proc::start(&["/bin/sleep", "30", "1", "2"]);
        assert!(!cmd.is_running(longer.pid(), 1));
        // Gone (and reaped): not running.
        let pid = job.pid();
        drop(job);
        assert!(!cmd.is_running(pid, 1));
    }

    #[test]
    fn a_wrapper_command_is_recognised_before_and_after_its_exec() {
        let cmd = command(&[
            "/bin/sh",
            "-c",
            "exec \"$0\" \"$@\"",
            "/usr/bin/dutgate-job",
        ]);
        let started = b"/bin/sh\0-c\0exec \"$0\" \"$@\"\0/usr/bin/dutgate-job\x0042\0";
        assert!(cmd.matches(42, started));
        assert!(cmd.matches(42, b"/usr/bin/dutgate-job\x0042\0"));
        assert!(!cmd.matches(4, b"/usr/bin/dutgate-job\x0042\0"));
        assert!(!cmd.matches(42, b"/usr/bin/dutgate-job\0--x\x0042\0"));
        assert!(!cmd.matches(42, b"/bin/sh\0-c\0sleep 42\0"));
        // This binary's `job` subcommand: only `<exe> job <id>`.
        let default = JobCommand::from_config(&Config::default());
        let exe = std::env::current_exe().unwrap();
        let mut own = exe.as_os_str().as_encoded_bytes().to_vec();
        own.extend_from_slice(b"\0job\x007\0");
        assert!(default.matches(7, &own));
        assert!(!default.matches(7, b"job\x007\0"));
    }
}
