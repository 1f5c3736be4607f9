//! `dutctl jobs list|show|cancel|log|artifacts|resubmit`: the executor's jobs (docs/jobs.md §4).

use dutgate_core::http::encode_component;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use dutgate_core::ServiceName;
use dutgate_executor::client::{ExecutorClient, SubmitOptions};
use dutgate_executor::model::{EventList, Job, JobList, Submitted};
use reqwest::Method;
use tokio::io::AsyncWriteExt;

use crate::cmd_run;
use crate::gateway::Gateway;
use crate::output::{Format, print};

#[derive(Subcommand)]
pub enum JobsCommand {
    /// The newest jobs.
    List {
        /// Only jobs in this state (QUEUED, DISPATCHED, RUNNING, FINISHED).
        #[arg(long)]
        state: Option<String>,
        /// Only jobs that ended with this status (PASS, FAIL, …).
        #[arg(long)]
        status: Option<String>,
        /// Only jobs that ran on this machine.
        #[arg(long)]
        machine: Option<String>,
        /// Only jobs whose target has this tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One job's record and its events.
    Show { id: i64 },
    /// Cancel a queued or running job (it ends INCOMPLETE, reason `cancelled`).
    Cancel { id: i64 },
    /// A job's console log; `-f` follows a running job live.
    Log {
        id: i64,
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Download a job's artifacts (console log, events, bucket files) as `run --share-dir` does.
    Artifacts {
        id: i64,
        /// Where to put them; created if missing. Default: `./job-<ID>`.
        #[arg(long)]
        to: Option<std::path::PathBuf>,
    },
    /// Submit a job's description again, as the caller, on the same target and priority.
    Resubmit(ResubmitArgs),
}

#[derive(clap::Args)]
pub struct ResubmitArgs {
    id: i64,
    /// Follow the new job as `run` does (events, console, artifacts) and exit with its
    /// status code.
    #[arg(long)]
    follow: bool,
    /// Like `--follow` without the console.
    #[arg(long, conflicts_with = "follow")]
    wait: bool,
    /// Share this directory with the new job, as `run --share-dir` (the original job's
    /// initial files are not kept by the gateway); implies `--wait` unless `--follow`.
    #[arg(short = 's', long)]
    share_dir: Option<PathBuf>,
    /// Run on this machine instead of the original job's target.
    #[arg(short = 'i', long = "machine")]
    machine: Option<String>,
    /// Run on a machine with these tags instead of the original job's target (repeatable).
    #[arg(short = 't', long = "tag")]
    tags: Vec<String>,
    /// Queue priority; default: the original job's.
    #[arg(long)]
    priority: Option<i64>,
    /// Fail at once (exit 10) when no matching machine is free instead of queueing.
    #[arg(long)]
    no_wait: bool,
}

/// `jobs resubmit` without `--follow`/`--wait`: what was submitted.
#[derive(serde::Serialize)]
struct Resubmitted {
    id: i64,
    url: String,
    state: dutgate_executor::model::JobState,
    resubmitted_from: i64,
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_string(), |x| x.to_string())
}

fn job_line(j: &Job) -> String {
    format!(
        "{:>6}  {:<10}  {:<10}  {:<17}  {:<11}  {}\n",
        j.id,
        j.state.to_string(),
        j.status.map_or("-", |s| s.as_str()),
        opt(&j.machine_id),
        j.phase.as_deref().unwrap_or("-"),
        j.reason.as_deref().unwrap_or(""),
    )
}

pub async fn run(cmd: JobsCommand, gw: &Gateway, format: Format) -> anyhow::Result<ExitCode> {
    let exec = ExecutorClient::new(gw.url(ServiceName::Executor), gw.token().cloned());
    match cmd {
        JobsCommand::Resubmit(args) => return resubmit(&exec, args, gw, format).await,
        JobsCommand::List {
            state,
            status,
            machine,
            tags,
            limit,
        } => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(s) = state {
                q.push(format!("state={}", encode_component(&s.to_uppercase())));
            }
            if let Some(s) = status {
                q.push(format!("status={}", encode_component(&s.to_uppercase())));
            }
            if let Some(m) = machine {
                q.push(format!("machine_id={}", encode_component(&m)));
            }
            for t in tags {
                q.push(format!("tag={}", encode_component(&t)));
            }
            let list: JobList = exec
                .api()
                .get(&format!("/api/v1/jobs?{}", q.join("&")))
                .await?;
            print(format, &list.jobs, |jobs| {
                let mut s = format!(
                    "{:>6}  {:<10}  {:<10}  {:<17}  {:<11}  REASON\n",
                    "ID", "STATE", "STATUS", "MACHINE", "PHASE"
                );
                for j in jobs {
                    s.push_str(&job_line(j));
                }
                s
            });
        }
        JobsCommand::Show { id } => {
            let job = exec.job(id).await?;
            let events: EventList = exec.events(id, 0).await?;
            let value = serde_json::json!({"job": job, "events": events.events});
            print(format, &value, |_| {
                let mut s = String::new();
                let _ = writeln!(s, "job {}  {}", job.id, job.url);
                let _ = writeln!(s, "  state     {}", job.state);
                let _ = writeln!(
                    s,
                    "  status    {} (exit code {})",
                    job.status.map_or("-", |x| x.as_str()),
                    opt(&job.exit_code)
                );
                let _ = writeln!(s, "  reason    {}", job.reason.as_deref().unwrap_or("-"));
                let _ = writeln!(s, "  machine   {}", opt(&job.machine_id));
                let _ = writeln!(
                    s,
                    "  target    id={} tags=[{}]",
                    opt(&job.target.id),
                    job.target.tags.join(", ")
                );
                let _ = writeln!(s, "  priority  {}", job.priority);
                let _ = writeln!(s, "  submitted {}", job.submitted_at);
                let _ = writeln!(s, "  finished  {}", opt(&job.finished_at));
                let _ = writeln!(s, "  boots     {}", job.boots);
                let _ = writeln!(s, "  console   {} bytes", job.console_bytes);
                let _ = writeln!(s, "events:");
                for e in &events.events {
                    let _ = writeln!(s, "  {:>4}  {}  {:<16} {}", e.seq, e.at, e.kind, e.message);
                }
                s
            });
        }
        JobsCommand::Cancel { id } => {
            let job = exec
                .cancel(id)
                .await
                .with_context(|| format!("cancelling job {id}"))?;
            print(format, &job, |j| {
                format!("job {}: cancellation requested ({})\n", j.id, j.state)
            });
        }
        JobsCommand::Log { id, follow } => {
            // Text: the bytes as they are. JSON/YAML: one document once the log is read
            // (with `-f`: once the job is finished).
            let mut buf: Vec<u8> = Vec::new();
            let mut stdout = tokio::io::stdout();
            let out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send) = if format == Format::Text {
                &mut stdout
            } else {
                &mut buf
            };
            if follow {
                let http = cmd_run::stream_client(gw);
                cmd_run::follow_console(&exec, &http, id, out).await?;
            } else {
                let path = format!("/api/v1/jobs/{id}/console?follow=false");
                let resp = exec
                    .api()
                    .request(Method::GET, &path)
                    .send()
                    .await
                    .with_context(|| format!("console of job {id}"))?;
                let status = resp.status();
                if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                    // An empty log.
                } else if !status.is_success() {
                    bail!("console of job {id}: {status}");
                } else {
                    let bytes = resp.bytes().await?;
                    out.write_all(&bytes).await?;
                    out.flush().await?;
                }
            }
            if format != Format::Text {
                let value = serde_json::json!({
                    "job": id,
                    "bytes": buf.len(),
                    "console": String::from_utf8_lossy(&buf),
                });
                print(format, &value, |_| String::new());
            }
        }
        JobsCommand::Artifacts { id, to } => {
            let dir = to.unwrap_or_else(|| std::path::PathBuf::from(format!("job-{id}")));
            tokio::fs::create_dir_all(&dir)
                .await
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let http = cmd_run::stream_client(gw);
            let progress = cmd_run::Progress::new();
            let files = cmd_run::download_artifacts(&exec, &http, id, &dir, &progress)
                .await
                .with_context(|| format!("artifacts of job {id}"))?;
            let value = serde_json::json!({"job": id, "dir": dir, "files": files});
            print(format, &value, |_| format!("{}\n", dir.display()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `jobs resubmit`: the job's description as the executor kept it (`GET /api/v1/jobs/{id}`
/// returns it to whoever may read the job), submitted again with the caller's token, so the
/// caller owns the new job.
async fn resubmit(
    exec: &ExecutorClient,
    args: ResubmitArgs,
    gw: &Gateway,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let id = args.id;
    let old = exec
        .job(id)
        .await
        .with_context(|| format!("cannot read job {id}"))?;
    let Some(yaml) = old.job.clone() else {
        bail!("job {id}: the gateway did not return its description");
    };
    // The original target (from the file or from `-i`/`-t`) unless replaced here.
    let (machine, tags) = if args.machine.is_some() || !args.tags.is_empty() {
        (args.machine.filter(|m| !m.is_empty()), args.tags)
    } else {
        (
            old.target.id.map(|m| m.to_string()),
            old.target.tags.clone(),
        )
    };
    let opts = SubmitOptions {
        priority: args.priority.unwrap_or(old.priority),
        wait: !args.no_wait,
        job_id: old.external_id.clone(),
        ..SubmitOptions::new()
    };
    if args.follow || args.wait || args.share_dir.is_some() {
        let launch = cmd_run::Launch {
            source: PathBuf::from(format!("job {id}")),
            yaml,
            machine,
            tags,
            opts,
            share_dir: args.share_dir,
            quiet: !args.follow,
            interactive: false,
        };
        return cmd_run::launch_and_follow(launch, gw, format).await;
    }
    let submitted: Submitted = cmd_run::submit(exec, &yaml, machine.as_deref(), &tags, &opts, None)
        .await
        .map_err(|e| anyhow::anyhow!("cannot resubmit job {id}: {e}"))?;
    let value = Resubmitted {
        id: submitted.id,
        url: submitted.url,
        state: submitted.state,
        resubmitted_from: id,
    };
    print(format, &value, |v| {
        format!("job {} resubmitted as job {}: {}\n", id, v.id, v.url)
    });
    Ok(ExitCode::SUCCESS)
}
