//! `dutctl run job.yml`: submit a job, show its phases as they happen, stream its console live,
//! download its artifacts, exit with its pinned status code (docs/jobs.md §2).
//! `--share-dir DIR` is valve-infra's `-s`: DIR's files go to the job bucket before the job
//! starts (the submission's initial-state tarball) and the artifacts come back into it.
//! With `-o json|yaml` stdout holds one document describing the finished job; the console
//! then goes to stderr.
//!
//! The console and the event stream are both resumable (`?offset=` and `?after=`): a dropped
//! connection is re-opened where it stopped, so nothing is lost or printed twice. SIGINT and
//! SIGTERM cancel the job before `dutctl` exits: a CI that gives up on a job must not leave a
//! machine running it.

use dutgate_core::http::encode_component;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use dutgate_core::client::{ApiClient, ClientError};
use dutgate_core::{JobStatus, MachineId, ServiceName};
use dutgate_executor::client::{ExecutorClient, SubmitOptions};
use dutgate_executor::model::{ArtifactList, Event, Job, JobState, Submitted};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::gateway::Gateway;
use crate::output::{Format, print};
pub use crate::progress::Progress;

/// Environment variable naming a file where `dutctl run` records the jobs it submitted and how
/// they ended (`submitted <id>`, `finished <id> <STATUS>`): the GitLab driver reads it to map
/// the status and to cancel what is left.
pub const RUN_RECORD_ENV: &str = "DUTGATE_RUN_RECORD";

/// How long a stream may stay unreachable before `dutctl run` gives up (the job keeps running).
const RECONNECT_BUDGET: Duration = Duration::from_secs(120);
/// A stream that delivers nothing for this long is re-opened (a silent console is normal, a
/// half-open connection is not distinguishable from it otherwise).
const READ_IDLE: Duration = Duration::from_secs(30);
/// After a cancellation, how long to wait for the job's final status before exiting anyway.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The job description (YAML, a template rendered by the gateway per machine).
    pub file: PathBuf,
    /// Run on this machine (MAC address); replaces the job's `target`.
    #[arg(short = 'i', long = "machine", env = "DUTGATE_MACHINE_ID")]
    pub machine: Option<String>,
    /// Run on a machine with these tags (repeatable); replaces the job's `target`.
    #[arg(short = 't', long = "tag")]
    pub tags: Vec<String>,
    /// Share this directory with the job (valve-infra's `-s`): its files are the job bucket's
    /// initial state, and the job's artifacts are downloaded into it at the end.
    #[arg(short = 's', long)]
    pub share_dir: Option<PathBuf>,
    /// Template variable for this job, `name=value` (repeatable).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// Queue priority (higher runs first).
    #[arg(long, default_value_t = 0)]
    pub priority: i64,
    /// Fail at once (exit 10) when no matching machine is free instead of queueing.
    #[arg(long)]
    pub no_wait: bool,
    /// Client-side label of the job (kept as `external_id`).
    #[arg(long)]
    pub label: Option<String>,
    /// Do not print the console (phases and the result are still shown).
    #[arg(long)]
    pub quiet: bool,
    /// Interactive console: keystrokes go to the DUT, Ctrl-A Ctrl-C quits and cancels the
    /// job. Only when stdin is a terminal (otherwise the console is only shown).
    #[arg(short = 'I', long, conflicts_with = "quiet")]
    pub interactive: bool,
}

/// How the console is shown.
pub enum ConsoleMode {
    Quiet,
    /// Streamed to stdout, or to stderr when stdout holds a `-o json|yaml` document.
    Stream {
        to_stderr: bool,
    },
    /// Two-way, through the WebSocket, with the keyboard's input.
    Interactive(tokio::sync::mpsc::Receiver<crate::interactive::Input>),
}

/// `name=value` pairs as `{% set %}` statements glued to the front of the first line, so that
/// line numbers in the gateway's error messages still match the user's file.
pub fn with_vars(yaml: &str, vars: &[String]) -> anyhow::Result<String> {
    let mut prefix = String::new();
    for v in vars {
        let Some((name, value)) = v.split_once('=') else {
            bail!("--var {v:?}: expected NAME=VALUE");
        };
        let ident = !name.is_empty()
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident {
            bail!("--var {v:?}: {name:?} is not a valid variable name");
        }
        // A JSON string is a valid Jinja string literal (same escapes).
        let lit = serde_json::to_string(value)?;
        prefix.push_str(&format!("{{% set {name} = {lit} %}}"));
    }
    Ok(format!("{prefix}{yaml}"))
}

/// Appends a line to the run record, if one is asked for. Best effort: the record serves the
/// GitLab driver; failing to write it must not fail the job.
fn record(line: &str) {
    let Some(path) = std::env::var_os(RUN_RECORD_ENV) else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// A client of the executor for long-lived streams: bounded connect and idle read, no total
/// timeout (a console may legitimately stream for hours).
pub fn stream_client(gw: &Gateway) -> ApiClient {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(READ_IDLE)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new());
    ApiClient::with_http(gw.url(ServiceName::Executor), gw.token().cloned(), http)
}

fn describe(e: &Event) -> String {
    match e.kind.as_str() {
        "phase" => {
            let p = e.data["phase"].as_str().unwrap_or("?");
            if e.message.is_empty() {
                format!("phase {p}")
            } else {
                format!("phase {p}: {}", e.message)
            }
        }
        k if e.message.is_empty() => k.to_string(),
        k => format!("{k}: {}", e.message),
    }
}

/// Submits `yaml`; `-i`/`-t` go through valve-infra's multipart `metadata.target`, the share
/// dir's tarball as its `job_bucket_initial_state_tarball_file` part.
pub async fn submit(
    exec: &ExecutorClient,
    yaml: &str,
    machine: Option<&str>,
    tags: &[String],
    opts: &SubmitOptions,
    tarball: Option<Vec<u8>>,
) -> Result<Submitted, ClientError> {
    if machine.is_none() && tags.is_empty() && tarball.is_none() {
        return exec.submit(yaml, opts).await;
    }
    let mut target = serde_json::Map::new();
    if let Some(m) = machine {
        target.insert("id".into(), m.into());
    }
    if !tags.is_empty() {
        target.insert("tags".into(), tags.to_vec().into());
    }
    let mut metadata = serde_json::json!({
        "version": 1,
        "job_id": opts.job_id,
        "priority": opts.priority,
        "wait": opts.wait,
    });
    // A `target` part, even empty, replaces the job's own: only sent when one is given.
    if !target.is_empty() {
        metadata["target"] = target.into();
    }
    let mut form = reqwest::multipart::Form::new()
        .text("metadata", metadata.to_string())
        .text("job", yaml.to_string());
    if let Some(t) = tarball {
        form = form.part(
            "job_bucket_initial_state_tarball_file",
            reqwest::multipart::Part::bytes(t).file_name("share.tar.gz"),
        );
    }
    let path = "/api/v1/jobs";
    let rb = exec.api().request(Method::POST, path).multipart(form);
    exec.api().send(rb, path).await
}

/// One line saying why the gateway refused the job, pointing into the file when it can.
fn submission_error(file: &Path, e: &ClientError) -> String {
    match e {
        ClientError::Api { status, body, .. } => {
            let mut at = String::new();
            if let Some(line) = body.line {
                at = format!("{}:{line}", file.display());
                if let Some(col) = body.column {
                    at.push_str(&format!(":{col}"));
                }
                at.push_str(": ");
            }
            let field = body
                .field
                .as_deref()
                .map(|f| format!(" (field {f})"))
                .unwrap_or_default();
            format!("{at}job refused ({status}): {}{field}", body.error)
        }
        other => format!("cannot submit the job: {other}"),
    }
}

/// What `run` and `jobs resubmit` submit, and how they follow the job.
pub struct Launch {
    /// Where the job came from, for messages pointing into it (`job.yml`, `job 42`).
    pub source: PathBuf,
    pub yaml: String,
    pub machine: Option<String>,
    pub tags: Vec<String>,
    pub opts: SubmitOptions,
    pub share_dir: Option<PathBuf>,
    pub quiet: bool,
    pub interactive: bool,
}

/// The document `run -o json|yaml` prints once the job is finished (docs/dutctl.md).
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub id: i64,
    pub url: String,
    /// `FINISHED`, or the state it was in when `dutctl` stopped waiting after a cancellation.
    pub state: JobState,
    pub status: JobStatus,
    /// The job's pinned status code, which is also `dutctl`'s exit code.
    pub exit_code: u8,
    pub reason: Option<String>,
    pub machine_id: Option<MachineId>,
    pub console_url: String,
    pub artifacts_url: String,
    /// The share dir (`--share-dir`), else `null`.
    pub share_dir: Option<PathBuf>,
    /// Files of the share dir sent as the bucket's initial state (paths relative to it).
    pub uploaded: Vec<String>,
    /// Artifacts downloaded into the share dir (paths relative to it).
    pub artifacts: Vec<String>,
}

/// `dutctl run`.
pub async fn run(args: RunArgs, gw: &Gateway, format: Format) -> anyhow::Result<ExitCode> {
    let text = tokio::fs::read_to_string(&args.file)
        .await
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let yaml = with_vars(&text, &args.vars)?;
    let launch = Launch {
        source: args.file.clone(),
        yaml,
        machine: args.machine.clone().filter(|m| !m.is_empty()),
        tags: args.tags.clone(),
        opts: SubmitOptions {
            priority: args.priority,
            wait: !args.no_wait,
            job_id: args.label.clone(),
            ..SubmitOptions::new()
        },
        share_dir: args.share_dir.clone(),
        quiet: args.quiet,
        interactive: args.interactive,
    };
    launch_and_follow(launch, gw, format).await
}

/// The share dir's regular files as a gzipped tarball (paths relative to it), with their
/// relative paths and total size. Links and special files are left out: the gateway would
/// refuse them anyway, and a link could point anywhere on this machine.
fn pack_share_dir(dir: &Path) -> anyhow::Result<(Vec<u8>, Vec<String>, u64)> {
    fn walk(
        root: &Path,
        rel: &Path,
        out: &mut Vec<(PathBuf, PathBuf, u64)>,
    ) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
        // Sorted: the same directory gives the same tarball.
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let ty = e.file_type()?;
            let r = rel.join(e.file_name());
            if ty.is_dir() {
                walk(root, &r, out)?;
            } else if ty.is_file() {
                out.push((e.path(), r, e.metadata()?.len()));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, Path::new(""), &mut files)
        .with_context(|| format!("cannot read {}", dir.display()))?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut names = Vec::new();
    let mut total = 0;
    for (path, rel, len) in files {
        tar.append_path_with_name(&path, &rel)
            .with_context(|| format!("cannot pack {}", path.display()))?;
        names.push(rel.to_string_lossy().into_owned());
        total += len;
    }
    let gz = tar.into_inner().context("cannot pack the share dir")?;
    let bytes = gz.finish().context("cannot pack the share dir")?;
    Ok((bytes, names, total))
}

/// Submits the job and follows it to its end: events on stderr, the console on stdout (on
/// stderr with `-o json|yaml`, whose document is then the only thing on stdout), artifacts
/// into the share dir; exits with the job's status code.
pub async fn launch_and_follow(
    launch: Launch,
    gw: &Gateway,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let progress = Progress::new();
    let document = format != Format::Text;
    if document && launch.interactive {
        bail!("-I/--interactive needs the terminal's stdout: it cannot be used with -o json|yaml");
    }
    let mut tarball = None;
    let mut uploaded = Vec::new();
    if let Some(dir) = &launch.share_dir {
        tokio::fs::create_dir_all(dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let d = dir.clone();
        let (bytes, names, total) = tokio::task::spawn_blocking(move || pack_share_dir(&d))
            .await
            .context("packing the share dir")??;
        if !names.is_empty() {
            progress.spin(&format!(
                "uploading {} files ({total} bytes) from {}",
                names.len(),
                dir.display()
            ));
            tarball = Some(bytes);
            uploaded = names;
        }
    }
    let exec = ExecutorClient::new(gw.url(ServiceName::Executor), gw.token().cloned());
    // Before the submission: a signal arriving while it is in flight still cancels the job.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let submitted = submit(
        &exec,
        &launch.yaml,
        launch.machine.as_deref(),
        &launch.tags,
        &launch.opts,
        tarball,
    )
    .await;
    progress.done();
    let submitted = match submitted {
        Ok(s) => s,
        Err(e) => bail!("{}", submission_error(&launch.source, &e)),
    };
    let id = submitted.id;
    record(&format!("submitted {id}"));
    progress.line(&format!("job {id} submitted: {}", submitted.url));
    if !uploaded.is_empty() {
        progress.line(&format!(
            "{} files of the share dir sent as the job bucket's initial state",
            uploaded.len()
        ));
    }
    if submitted.state == JobState::Queued {
        progress.spin(&format!("job {id} queued: waiting for a machine"));
    }

    let http = stream_client(gw);
    let mut raw = None;
    let mode = if launch.quiet {
        ConsoleMode::Quiet
    } else if launch.interactive && crate::interactive::stdin_is_tty() {
        raw = crate::interactive::RawMode::enable();
        progress.line("interactive console: Ctrl-A Ctrl-C quits and cancels the job");
        ConsoleMode::Interactive(crate::interactive::keyboard())
    } else {
        ConsoleMode::Stream {
            to_stderr: document,
        }
    };
    let follow = follow(&exec, &http, gw, id, &progress, mode);
    tokio::pin!(follow);
    let outcome = tokio::select! {
        r = &mut follow => match r {
            Ok(Some(job)) => Some(Ok(job)),
            // Ctrl-A Ctrl-C.
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        },
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
    };
    drop(raw);
    progress.done();
    let job = match outcome {
        Some(r) => r?,
        None => {
            progress.line(&format!("cancelling job {id}"));
            match exec.cancel(id).await {
                Ok(_) => {}
                Err(e) if e.status() == Some(StatusCode::CONFLICT) => {}
                Err(e) => bail!("cancelling job {id}: {e}"),
            }
            let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
            loop {
                match exec.job(id).await {
                    Ok(j) if j.state == JobState::Finished => break j,
                    Ok(j) if tokio::time::Instant::now() >= deadline => break j,
                    Ok(_) => {}
                    Err(e) if tokio::time::Instant::now() >= deadline => {
                        bail!("job {id}: {e}")
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut artifacts = Vec::new();
    if let Some(dir) = &launch.share_dir
        && job.state == JobState::Finished
    {
        artifacts = download_artifacts(&exec, &http, id, dir, &progress).await?;
    }
    let status = job.status.unwrap_or(JobStatus::Unknown);
    // A job still being torn down after a cancellation ends INCOMPLETE (reason `cancelled`).
    let status = if job.state == JobState::Finished {
        status
    } else {
        JobStatus::Incomplete
    };
    record(&format!("finished {id} {}", status.as_str()));
    progress.line(&format!(
        "job {id} {}: {}",
        status.as_str(),
        job.reason.as_deref().unwrap_or("")
    ));
    let exit_code = u8::try_from(status.exit_code()).unwrap_or(5);
    if document {
        let result = RunResult {
            id,
            console_url: format!("{}/console", job.url),
            artifacts_url: format!("{}/artifacts", job.url),
            url: job.url,
            state: job.state,
            status,
            exit_code,
            reason: job.reason,
            machine_id: job.machine_id,
            share_dir: launch.share_dir,
            uploaded,
            artifacts,
        };
        print(format, &result, |_| String::new());
    }
    Ok(ExitCode::from(exit_code))
}

/// Follows the job's events (shown on stderr) and console (stdout) until it is finished and
/// every console byte was printed; `None` when the user quit the interactive console.
pub async fn follow(
    exec: &ExecutorClient,
    http: &ApiClient,
    gw: &Gateway,
    id: i64,
    progress: &Progress,
    mode: ConsoleMode,
) -> anyhow::Result<Option<Job>> {
    let events = follow_events(exec, http, id, progress);
    let console = async {
        match mode {
            ConsoleMode::Quiet => Ok(true),
            ConsoleMode::Stream { to_stderr: false } => {
                follow_console(exec, http, id, &mut tokio::io::stdout())
                    .await
                    .map(|()| true)
            }
            ConsoleMode::Stream { to_stderr: true } => {
                follow_console(exec, http, id, &mut tokio::io::stderr())
                    .await
                    .map(|()| true)
            }
            ConsoleMode::Interactive(mut keys) => {
                let token = gw.token().map(|t| t.expose().to_string());
                crate::interactive::console(
                    gw.url(ServiceName::Executor),
                    token.as_deref(),
                    id,
                    &mut keys,
                )
                .await
                .map(|end| matches!(end, crate::interactive::End::Finished))
            }
        }
    };
    tokio::pin!(events);
    tokio::pin!(console);
    // The user quitting ends everything at once; otherwise both streams run to their end.
    let mut events_done = false;
    let mut console_done = false;
    while !(events_done && console_done) {
        tokio::select! {
            r = &mut events, if !events_done => {
                r?;
                events_done = true;
            }
            r = &mut console, if !console_done => {
                if !r? {
                    return Ok(None);
                }
                console_done = true;
            }
        }
    }
    Ok(Some(exec.job(id).await?))
}

/// Tracks how long a stream has been failing, to give up after [`RECONNECT_BUDGET`].
struct Retry {
    failing_since: Option<Instant>,
}

impl Retry {
    async fn failed(&mut self, what: &str, err: impl std::fmt::Display) -> anyhow::Result<()> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > RECONNECT_BUDGET {
            bail!("{what}: {err} (gave up after {RECONNECT_BUDGET:?}; the job keeps running)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }
    fn ok(&mut self) {
        self.failing_since = None;
    }
}

async fn follow_events(
    exec: &ExecutorClient,
    http: &ApiClient,
    id: i64,
    progress: &Progress,
) -> anyhow::Result<()> {
    let mut after = 0i64;
    let mut retry = Retry {
        failing_since: None,
    };
    loop {
        let rb = http
            .request(
                Method::GET,
                &format!("/api/v1/jobs/{id}/events?after={after}"),
            )
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let resp = match rb.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                bail!("events of job {id}: {status}: {}", error_text(&body));
            }
            Ok(r) => {
                retry.failed("events", r.status()).await?;
                continue;
            }
            Err(e) => {
                retry.failed("events", e).await?;
                continue;
            }
        };
        retry.ok();
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut finished = false;
        // A transport error ends this connection; the loop around re-opens it.
        while let Some(Ok(chunk)) = stream.next().await {
            buf.extend_from_slice(&chunk);
            while let Some(end) = find_blank_line(&buf) {
                let block: Vec<u8> = buf.drain(..end.1).collect();
                if let Some(ev) = parse_sse(&block[..end.0]) {
                    after = after.max(ev.seq);
                    // The wait for a machine is over once the job got one (or ended).
                    if matches!(ev.kind.as_str(), "dispatched" | "phase" | "finished") {
                        progress.done();
                    }
                    progress.line(&describe(&ev));
                    if ev.kind == "finished" {
                        finished = true;
                    }
                }
            }
        }
        if finished {
            return Ok(());
        }
        // The stream ended without `finished` (dropped connection): resume after `after`.
        match exec.job(id).await {
            Ok(j) if j.state == JobState::Finished => {
                // Print what the stream did not deliver, then stop.
                if let Ok(list) = exec.events(id, after).await {
                    for ev in list.events {
                        progress.line(&describe(&ev));
                    }
                }
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => retry.failed("events", e).await?,
        }
    }
}

/// The end of the first SSE message in `buf`: (end of its text, end including the blank line).
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| (p, p + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, p + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn parse_sse(block: &[u8]) -> Option<Event> {
    let text = String::from_utf8_lossy(block);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return None;
    }
    serde_json::from_str(&data.join("\n")).ok()
}

fn error_text(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// Streams the console from byte 0 into `out`, resuming by offset after a dropped connection.
pub async fn follow_console<W: tokio::io::AsyncWrite + Unpin + ?Sized>(
    exec: &ExecutorClient,
    http: &ApiClient,
    id: i64,
    out: &mut W,
) -> anyhow::Result<()> {
    let mut offset = 0u64;
    let mut retry = Retry {
        failing_since: None,
    };
    loop {
        let rb = http.request(
            Method::GET,
            &format!("/api/v1/jobs/{id}/console?offset={offset}&follow=true"),
        );
        let resp = match rb.send().await {
            Ok(r) if r.status() == StatusCode::RANGE_NOT_SATISFIABLE => return Ok(()),
            Ok(r) if r.status().is_success() => r,
            Ok(r) if r.status().is_client_error() => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                bail!("console of job {id}: {status}: {}", error_text(&body));
            }
            Ok(r) => {
                retry.failed("console", r.status()).await?;
                continue;
            }
            Err(e) => {
                retry.failed("console", e).await?;
                continue;
            }
        };
        retry.ok();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    out.write_all(&bytes).await?;
                    out.flush().await?;
                    offset += bytes.len() as u64;
                }
                Err(_) => break,
            }
        }
        // Ended: either the job is finished and everything was sent, or the connection dropped.
        match exec.job(id).await {
            Ok(j) if j.state == JobState::Finished && offset >= j.console_bytes => return Ok(()),
            Ok(_) => {}
            Err(e) => retry.failed("console", e).await?,
        }
    }
}

/// `path` from the artifact list as a relative path under the share dir, or `None` when it
/// would escape it.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let p = Path::new(path);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

pub async fn download_artifacts(
    exec: &ExecutorClient,
    http: &ApiClient,
    id: i64,
    dir: &Path,
    progress: &Progress,
) -> anyhow::Result<Vec<String>> {
    let list: ArtifactList = exec
        .api()
        .get(&format!("/api/v1/jobs/{id}/artifacts"))
        .await
        .context("listing artifacts")?;
    let mut total = 0u64;
    let mut written = Vec::new();
    progress.bar(list.artifacts.len() as u64, false, "downloading artifacts");
    for a in &list.artifacts {
        progress.advance(1, &a.path);
        let Some(rel) = safe_relative(&a.path) else {
            progress.line(&format!("skipping artifact with unsafe path {:?}", a.path));
            continue;
        };
        let dest = dir.join(&rel);
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let encoded: Vec<String> = a.path.split('/').map(encode_component).collect();
        let rb = http.request(
            Method::GET,
            &format!("/api/v1/jobs/{id}/artifacts/{}", encoded.join("/")),
        );
        let resp = rb
            .send()
            .await
            .with_context(|| format!("downloading {}", a.path))?;
        if !resp.status().is_success() {
            bail!("downloading {}: {}", a.path, resp.status());
        }
        let tmp = dest.with_extension("part");
        let mut f = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.with_context(|| format!("downloading {}", a.path))?;
            total += chunk.len() as u64;
            f.write_all(&chunk).await?;
        }
        f.flush().await?;
        drop(f);
        tokio::fs::rename(&tmp, &dest).await?;
        written.push(rel.to_string_lossy().into_owned());
    }
    progress.done();
    progress.line(&format!(
        "{} artifacts ({total} bytes) in {}",
        list.artifacts.len(),
        dir.display()
    ));
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vars_keep_line_numbers() {
        let y = with_vars("version: 1\nx: 2\n", &["a=b \"c\"".into(), "n_1=".into()]).unwrap();
        assert_eq!(y.lines().count(), 2);
        assert!(y.starts_with("{% set a = \"b \\\"c\\\"\" %}{% set n_1 = \"\" %}version: 1"));
        assert!(with_vars("", &["1a=x".into()]).is_err());
        assert!(with_vars("", &["novalue".into()]).is_err());
        assert!(with_vars("", &["a-b=x".into()]).is_err());
    }

    #[test]
    fn sse_blocks() {
        let raw = b"id: 3\nevent: phase\ndata: {\"seq\":3,\"at\":\"2026-11-22T12:00:01.250Z\",\"kind\":\"phase\",\"message\":\"m\",\"data\":{\"phase\":\"power\"}}\n\nrest";
        let (end, next) = find_blank_line(raw).unwrap();
        let ev = parse_sse(&raw[..end]).unwrap();
        assert_eq!(ev.seq, 3);
        assert_eq!(describe(&ev), "phase power: m");
        assert_eq!(&raw[next..], b"rest");
        assert!(parse_sse(b": keep-alive").is_none());
    }

    #[test]
    fn artifact_paths_stay_inside() {
        assert_eq!(
            safe_relative("bucket/a/b.xml"),
            Some(PathBuf::from("bucket/a/b.xml"))
        );
        assert_eq!(safe_relative("../etc/passwd"), None);
        assert_eq!(safe_relative("/etc/passwd"), None);
        assert_eq!(safe_relative(""), None);
    }
}
