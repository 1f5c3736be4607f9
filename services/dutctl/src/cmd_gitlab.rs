//! `dutctl gitlab …`: GitLab Runner's *custom executor* driver (config, prepare, run, cleanup)
//! and the runner configuration writer (docs/gitlab.md).
//!
//! One GitLab runner per machine (`limit = 1`): the runner that picks a job *is* the machine,
//! so the build stage runs the user's script on the gateway with `DUTGATE_MACHINE_ID` set and
//! `dutctl run job.yml` targets that machine. Every other stage (sources, caches, artifacts)
//! runs GitLab's own script in a scratch directory on the gateway.
//!
//! The driver calls the gateway with the runner token of `--job-token-file` alone (the one
//! the build script gets): it looks machines up and cancels the jobs it owns, which a runner
//! may do, and never reads the gateway state dir's tokens (`main` resolves the gateway without
//! them for the driver's stages), so GitLab Runner needs no access to that directory.
//!
//! Exit codes follow the contract: a test verdict of FAIL is a build failure, an
//! infrastructure outcome (INCOMPLETE, SETUP_FAIL, UNKNOWN, gateway unreachable) is a system
//! failure, which GitLab can retry.

mod runner_config;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use dutgate_core::{JobStatus, MachineId, ServiceName};
use dutgate_executor::client::ExecutorClient;
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{Machine, MachineState};
use serde_json::json;

use crate::cmd_run::RUN_RECORD_ENV;
use crate::gateway::Gateway;
use crate::identity::SourcedToken;

pub use runner_config::RunnerConfigArgs;

#[derive(Subcommand)]
pub enum GitlabCommand {
    /// `config_exec`: the driver's settings as JSON on stdout.
    Config(DriverArgs),
    /// `prepare_exec`: checks the gateway and the machine.
    Prepare(DriverArgs),
    /// `run_exec <script> <stage>`: runs one stage of the job.
    Run {
        #[command(flatten)]
        driver: DriverArgs,
        /// The script GitLab Runner generated for this stage.
        script: PathBuf,
        /// The stage name (`get_sources`, `step_script`, …).
        stage: String,
    },
    /// `cleanup_exec`: cancels what is left of the job and removes its scratch data.
    Cleanup(DriverArgs),
    /// Writes GitLab Runner's config.toml: one runner per exposed machine plus a gateway runner.
    RunnerConfig(RunnerConfigArgs),
}

#[derive(Args, Debug, Clone)]
pub struct DriverArgs {
    /// The machine this runner drives (MAC address or full name). Default: the runner's
    /// description (`CUSTOM_ENV_CI_RUNNER_DESCRIPTION`); none for the gateway runner.
    #[arg(long)]
    machine: Option<String>,
    /// This runner drives no machine (jobs run on the gateway only).
    #[arg(long, conflicts_with = "machine")]
    gateway_only: bool,
    /// Where builds, caches and per-job state live.
    #[arg(
        long,
        env = "DUTGATE_GITLAB_DIR",
        default_value = "/var/lib/dutgate/gitlab"
    )]
    scratch_dir: PathBuf,
    /// After SIGTERM, how long the stage's processes get to cancel their jobs before the
    /// driver cancels them itself and exits (GitLab's graceful kill time is longer).
    #[arg(long, default_value_t = 5.0)]
    cancel_grace_seconds: f64,
    /// File with the runner token the driver calls the gateway with (machine look-ups,
    /// cancelling what a cancelled job left running) and gives the build stage's script
    /// (`DUTGATE_TOKEN`). Unset: the driver uses --token/DUTGATE_TOKEN (never the state dir's
    /// tokens) and sets no DUTGATE_TOKEN for the script.
    #[arg(long)]
    job_token_file: Option<PathBuf>,
}

impl GitlabCommand {
    /// The stages GitLab Runner runs (everything but `runner-config`, which an admin runs).
    pub fn is_driver_stage(&self) -> bool {
        !matches!(self, GitlabCommand::RunnerConfig(_))
    }
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

fn exit_var(name: &str, default: u8) -> u8 {
    env(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn build_failure() -> u8 {
    exit_var("BUILD_FAILURE_EXIT_CODE", 1)
}

fn system_failure() -> u8 {
    exit_var("SYSTEM_FAILURE_EXIT_CODE", 2)
}

/// GitLab's job id, which names this job's scratch data.
fn ci_job_id() -> String {
    env("CUSTOM_ENV_CI_JOB_ID")
        .filter(|v| v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or_else(|| "local".to_string())
}

impl DriverArgs {
    fn builds_dir(&self) -> PathBuf {
        self.scratch_dir.join("builds").join(ci_job_id())
    }
    fn state_dir(&self) -> PathBuf {
        self.scratch_dir.join("jobs").join(ci_job_id())
    }
    fn record_path(&self) -> PathBuf {
        self.state_dir().join("run-record")
    }
    /// The gateway with the token of `--job-token-file`, read afresh at each stage (a token
    /// replaced in the file takes effect at the next job).
    fn gateway(&self, gw: &Gateway) -> anyhow::Result<Gateway> {
        let Some(f) = &self.job_token_file else {
            return Ok(gw.clone());
        };
        let token = dutgate_core::auth::read_token(f).with_context(|| {
            format!("no token in {} (missing, unreadable or empty)", f.display())
        })?;
        Ok(gw.with_token(SourcedToken {
            token,
            source: f.display().to_string(),
        }))
    }

    /// The machine's name as configured or described, if this runner drives one.
    fn machine_ref(&self) -> Option<String> {
        if self.gateway_only {
            return None;
        }
        self.machine
            .clone()
            .or_else(|| env("CUSTOM_ENV_CI_RUNNER_DESCRIPTION"))
    }
}

/// The machine named by MAC address or full name.
async fn find_machine(mars: &MarsClient, name: &str) -> anyhow::Result<Machine> {
    if let Ok(id) = name.parse::<MachineId>() {
        return mars
            .machine(id)
            .await
            .with_context(|| format!("machine {name}"));
    }
    let all = mars.machines().await.context("listing machines")?;
    all.into_iter()
        .find(|m| m.full_name == name)
        .with_context(|| format!("no machine named {name:?}"))
}

fn mars_client(gw: &Gateway) -> MarsClient {
    MarsClient::new(gw.url(ServiceName::Mars), gw.token().cloned())
}

/// `format` is for `runner-config`: the driver stages speak GitLab Runner's protocol.
pub async fn run(
    cmd: GitlabCommand,
    gw: &Gateway,
    format: crate::output::Format,
) -> anyhow::Result<ExitCode> {
    match cmd {
        GitlabCommand::Config(d) => config(&d, gw),
        GitlabCommand::Prepare(d) => Ok(prepare(&d, gw).await),
        GitlabCommand::Run {
            driver,
            script,
            stage,
        } => Ok(run_stage(&driver, gw, &script, &stage).await),
        GitlabCommand::Cleanup(d) => Ok(cleanup(&d, gw).await),
        GitlabCommand::RunnerConfig(args) => {
            runner_config::run(&args, gw, format).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn config(d: &DriverArgs, gw: &Gateway) -> anyhow::Result<ExitCode> {
    let hostname = d
        .machine_ref()
        .unwrap_or_else(|| "dutgate-gateway".to_string());
    let mut job_env = serde_json::Map::new();
    job_env.insert("DUTGATE_URL".into(), gw.url(ServiceName::Executor).into());
    for svc in [ServiceName::Mars, ServiceName::S3, ServiceName::Registry] {
        job_env.insert(
            format!("DUTGATE_{}_URL", svc.as_str().to_uppercase()),
            gw.url(svc).into(),
        );
    }
    let out = json!({
        "builds_dir": d.builds_dir(),
        "cache_dir": d.scratch_dir.join("cache"),
        "builds_dir_is_shared": false,
        "hostname": hostname,
        "driver": {"name": "dutgate", "version": env!("CARGO_PKG_VERSION")},
        "job_env": job_env,
    });
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

async fn prepare(d: &DriverArgs, gw: &Gateway) -> ExitCode {
    match prepare_checks(d, gw).await {
        Ok(line) => {
            println!("dutgate: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("dutgate: {e:#}");
            ExitCode::from(system_failure())
        }
    }
}

async fn prepare_checks(d: &DriverArgs, gw: &Gateway) -> anyhow::Result<String> {
    let gw = &d.gateway(gw)?;
    let exec = gw.client(ServiceName::Executor);
    let _: serde_json::Value = exec
        .get("/healthz")
        .await
        .with_context(|| format!("gateway {} unreachable", exec.base()))?;
    std::fs::create_dir_all(d.state_dir())
        .with_context(|| format!("cannot create {}", d.state_dir().display()))?;
    std::fs::create_dir_all(d.builds_dir())
        .with_context(|| format!("cannot create {}", d.builds_dir().display()))?;
    let Some(name) = d.machine_ref() else {
        return Ok(format!("gateway {} reachable", exec.base()));
    };
    let m = find_machine(&mars_client(gw), &name).await?;
    // Jobs for these would wait in the queue until GitLab's timeout.
    if matches!(
        m.state,
        MachineState::Retired | MachineState::WaitForConfig | MachineState::Quarantined
    ) {
        anyhow::bail!(
            "machine {} ({}) is {} and takes no jobs",
            m.full_name,
            m.id,
            m.state
        );
    }
    Ok(format!(
        "machine {} ({}) is {}; gateway {}",
        m.full_name,
        m.id,
        m.state,
        exec.base()
    ))
}

/// The build stage of GitLab jobs (`build_script` before Runner 16, `step_script` after).
fn is_build_stage(stage: &str) -> bool {
    matches!(stage, "build_script" | "step_script") || stage.starts_with("step_")
}

/// The jobs a run record names: (submitted, finished with status).
fn read_record(path: &Path) -> (Vec<i64>, Vec<(i64, Option<JobStatus>)>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut submitted = Vec::new();
    let mut finished = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next(), w.next().and_then(|i| i.parse::<i64>().ok())) {
            (Some("submitted"), Some(id)) => submitted.push(id),
            (Some("finished"), Some(id)) => {
                let st = w.next().and_then(|s| s.parse::<JobStatus>().ok());
                finished.push((id, st));
            }
            _ => {}
        }
    }
    (submitted, finished)
}

/// The stage's exit code from the jobs `dutctl run` ran in it and the script's own exit code.
fn build_exit_code(record: &Path, script_code: Option<i32>) -> u8 {
    let (submitted, finished) = read_record(record);
    let unfinished = submitted
        .iter()
        .any(|id| !finished.iter().any(|(f, _)| f == id));
    let mut code = 0u8;
    let mut worst = 0u8; // 0 ok, 1 build failure, 2 system failure
    for (_, st) in &finished {
        let w = match st {
            Some(JobStatus::Pass | JobStatus::Warn | JobStatus::Complete) => 0,
            Some(JobStatus::Fail) => 1,
            _ => 2,
        };
        worst = worst.max(w);
    }
    if unfinished {
        worst = 2;
    }
    match worst {
        2 => code = system_failure(),
        1 => code = build_failure(),
        _ => {
            // `dutctl run` exits 1 (WARN) or 2 (COMPLETE) for good outcomes; with the runner's
            // `set -e` that code ends the script, which then is no failure of the script.
            let last = finished
                .last()
                .and_then(|(_, s)| *s)
                .map(JobStatus::exit_code);
            if script_code != Some(0) && script_code != last {
                code = build_failure();
            }
        }
    }
    code
}

async fn run_stage(d: &DriverArgs, gw: &Gateway, script: &Path, stage: &str) -> ExitCode {
    let build = is_build_stage(stage);
    let code = match run_stage_inner(d, gw, script, stage, build).await {
        Ok(c) => c,
        Err(e) => {
            println!("dutgate: stage {stage}: {e:#}");
            system_failure()
        }
    };
    if let Some(f) = env("BUILD_EXIT_CODE_FILE")
        && let Err(e) = std::fs::write(&f, format!("{code}\n"))
    {
        println!("dutgate: cannot write {f}: {e}");
    }
    ExitCode::from(code)
}

async fn run_stage_inner(
    d: &DriverArgs,
    gw: &Gateway,
    script: &Path,
    stage: &str,
    build: bool,
) -> anyhow::Result<u8> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let gw = &d.gateway(gw)?;
    std::fs::create_dir_all(d.state_dir())?;
    std::fs::create_dir_all(d.builds_dir())?;
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(script)
        .current_dir(d.builds_dir())
        .stdin(Stdio::null())
        // Its own group: on cancellation every process of the stage gets the signal.
        .process_group(0)
        .kill_on_drop(false)
        .env("DUTGATE_URL", gw.url(ServiceName::Executor));
    if build {
        if let Some(name) = d.machine_ref() {
            let m = find_machine(&mars_client(gw), &name).await?;
            cmd.env("DUTGATE_MACHINE_ID", m.id.to_string());
        }
        // The driver's token is the file's (read above): the script gets the same runner token.
        if d.job_token_file.is_some()
            && let Some(token) = gw.token()
        {
            cmd.env("DUTGATE_TOKEN", token.expose());
        }
        cmd.env(RUN_RECORD_ENV, d.record_path());
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", script.display()))?;
    let pid = child.id().unwrap_or(0);
    tokio::select! {
        status = child.wait() => {
            let status = status?;
            Ok(if build {
                build_exit_code(&d.record_path(), status.code())
            } else if status.success() {
                0
            } else {
                build_failure()
            })
        }
        _ = sigterm.recv() => {
            println!("dutgate: cancelled (SIGTERM): stopping stage {stage}");
            signal_group(pid, libc::SIGTERM);
            let grace = Duration::from_secs_f64(d.cancel_grace_seconds.clamp(0.0, 60.0));
            let _ = tokio::time::timeout(grace, child.wait()).await;
            signal_group(pid, libc::SIGKILL);
            cancel_unfinished(d, gw).await;
            Ok(system_failure())
        }
    }
}

fn signal_group(pid: u32, sig: libc::c_int) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names the group.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

/// Cancels every job of this GitLab job that has not finished (409 = already finished). A job
/// the driver's token does not own (403) is reported in one line and left alone.
async fn cancel_unfinished(d: &DriverArgs, gw: &Gateway) -> usize {
    let (submitted, finished) = read_record(&d.record_path());
    let exec = ExecutorClient::new(gw.url(ServiceName::Executor), gw.token().cloned());
    let mut n = 0;
    for id in submitted {
        if finished.iter().any(|(f, _)| *f == id) {
            continue;
        }
        match exec.job(id).await {
            Ok(j) if j.state == dutgate_executor::model::JobState::Finished => continue,
            _ => {}
        }
        match exec.cancel(id).await {
            Ok(_) => {
                println!("dutgate: cancelled job {id}");
                n += 1;
            }
            Err(e) if e.status() == Some(reqwest::StatusCode::CONFLICT) => {}
            Err(e) => println!("dutgate: cancelling job {id}: {e}"),
        }
    }
    n
}

async fn cleanup(d: &DriverArgs, gw: &Gateway) -> ExitCode {
    match d.gateway(gw) {
        Ok(gw) => {
            cancel_unfinished(d, &gw).await;
        }
        // Left-over jobs end at their own timeouts; the scratch data goes anyway.
        Err(e) => println!("dutgate: cannot cancel left-over jobs: {e:#}"),
    }
    for dir in [d.builds_dir(), d.state_dir()] {
        if dir.exists() {
            let dir2 = dir.clone();
            let r = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir2)).await;
            if let Ok(Err(e)) = r {
                println!("dutgate: cannot remove {}: {e}", dir.display());
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names() {
        assert!(is_build_stage("build_script"));
        assert!(is_build_stage("step_script"));
        assert!(!is_build_stage("get_sources"));
        assert!(!is_build_stage("after_script"));
    }

    #[test]
    fn exit_codes_from_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r");
        let code = |text: &str, script: i32| {
            std::fs::write(&p, text).unwrap();
            build_exit_code(&p, Some(script))
        };
        // No job ran: the script's own verdict.
        assert_eq!(code("", 0), 0);
        assert_eq!(code("", 7), build_failure());
        assert_eq!(code("submitted 1\nfinished 1 PASS\n", 0), 0);
        assert_eq!(code("submitted 1\nfinished 1 WARN\n", 1), 0);
        assert_eq!(code("submitted 1\nfinished 1 COMPLETE\n", 2), 0);
        // The job passed, a later command of the script failed.
        assert_eq!(code("submitted 1\nfinished 1 PASS\n", 1), build_failure());
        assert_eq!(code("submitted 1\nfinished 1 FAIL\n", 3), build_failure());
        assert_eq!(
            code("submitted 1\nfinished 1 INCOMPLETE\n", 4),
            system_failure()
        );
        assert_eq!(
            code("submitted 1\nfinished 1 SETUP_FAIL\n", 6),
            system_failure()
        );
        // dutctl died before the job ended.
        assert_eq!(code("submitted 1\n", 10), system_failure());
        // The worst of several jobs.
        assert_eq!(
            code(
                "submitted 1\nfinished 1 FAIL\nsubmitted 2\nfinished 2 UNKNOWN\n",
                3
            ),
            system_failure()
        );
    }
}
