//! `dutctl`: the command-line client of a dutgate gateway.
//!
//! Errors are one line on stderr and a non-zero exit code; `dutctl run` exits with the job's
//! pinned status code (design.md §8).

mod cmd_audit;
mod cmd_completion;
mod cmd_console;
mod cmd_gitlab;
mod cmd_job;
mod cmd_jobs;
mod cmd_machines;
mod cmd_pdus;
mod cmd_run;
mod cmd_stats;
mod cmd_status;
mod cmd_tokens;
mod gateway;
mod identity;
mod interactive;
mod mcli;
mod output;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use dutgate_core::Secret;
use dutgate_core::client::ClientError;
use reqwest::StatusCode;

use gateway::{Gateway, Wanted};
use identity::SourcedToken;
use output::Format;

#[derive(Parser)]
#[command(
    name = "dutctl",
    version,
    about = "Client of a dutgate CI farm gateway"
)]
struct Cli {
    /// The gateway's executor URL, e.g. http://gateway:8000 (other services: same host, their
    /// default ports, unless DUTGATE_<SERVICE>_URL says otherwise). Wins over --gateway.
    #[arg(long, env = "DUTGATE_URL", global = true)]
    url: Option<String>,
    /// API token. Else: the gateway's token in the config file, or the state dir's.
    #[arg(long, env = "DUTGATE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A gateway of the config file ($XDG_CONFIG_HOME/dutgate/config.yml, else
    /// ~/.config/dutgate/config.yml); unset: its `default`.
    #[arg(long, env = "DUTGATE_GATEWAY", global = true)]
    gateway: Option<String>,
    /// A local gateway's state dir: its endpoints and tokens are read from there. Given, it
    /// comes before the config file's default gateway.
    #[arg(long, env = "DUTGATE_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Text, global = true)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that every service of the gateway answers.
    Status,
    /// Job descriptions: `validate` checks one offline.
    #[command(subcommand)]
    Job(cmd_job::JobCommand),
    /// Machines: list, show, retire, activate, set, discover, training, events.
    #[command(subcommand)]
    Machines(cmd_machines::MachinesCommand),
    /// PDUs and ports: list, ports, set, cycle.
    #[command(subcommand)]
    Pdus(cmd_pdus::PdusCommand),
    /// Submit a job, follow its phases and console, exit with its status code (0–6).
    Run(cmd_run::RunArgs),
    /// Jobs: list, show, cancel, log, artifacts, resubmit.
    #[command(subcommand)]
    Jobs(cmd_jobs::JobsCommand),
    /// A machine's console (salad's WebSocket): two-way for admins and lease holders, `~.`
    /// quits; `--read-only` follows its log.
    Console(cmd_console::ConsoleArgs),
    /// GitLab Runner custom executor driver and runner configuration.
    #[command(subcommand)]
    Gitlab(cmd_gitlab::GitlabCommand),
    /// Named tokens (admins): create, list, revoke.
    #[command(subcommand)]
    Tokens(cmd_tokens::TokensCommand),
    /// Every service's audit log (admins), merged by time.
    Audit(cmd_audit::AuditArgs),
    /// Queue-wait percentiles (p50/p90/p99) and long waits over a period, from the job
    /// records.
    Stats(cmd_stats::StatsArgs),
    /// Shell completions: `dutctl completion bash > /etc/bash_completion.d/dutctl`.
    Completion(cmd_completion::CompletionArgs),
    /// The manual page (roff) on stdout: `dutctl man | man -l -`.
    Man,
}

/// Exit code for failed commands: the gateway unreachable or refusing, a file unreadable (job
/// statuses use 0–6, see `run`).
const EXIT_ERROR: u8 = 10;
/// Exit code for a bad command line (EX_USAGE of sysexits.h). clap's own is 2, which is also
/// `run`'s COMPLETE: a mistyped flag in a CI script must never pass for a job status.
const EXIT_USAGE: u8 = 64;

/// clap's message (help and version on stdout, exit 0; a usage error on stderr, exit 64).
fn usage(e: clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// What the command line and the environment say about the gateway: `matches` tells a
/// `--token` from a `DUTGATE_TOKEN` (for messages) and a given state dir from a found one.
fn wanted(cli: &Cli, matches: &ArgMatches, env: &dyn Fn(&str) -> Option<String>) -> Wanted {
    let from_env = |id: &str| matches.value_source(id) == Some(ValueSource::EnvVariable);
    let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
    let token = given(&cli.token).map(|t| SourcedToken {
        token: Secret::new(t.trim()),
        source: if from_env("token") {
            "DUTGATE_TOKEN".to_string()
        } else {
            "--token".to_string()
        },
    });
    Wanted {
        url: given(&cli.url),
        token,
        gateway: given(&cli.gateway),
        state_dir: cli
            .state_dir
            .clone()
            .or_else(|| gateway::default_state_dir(env)),
        state_dir_given: cli.state_dir.is_some(),
        no_state_dir_token: matches!(&cli.command, Command::Gitlab(g) if g.is_driver_stage()),
        config_path: identity::config_path(env),
        home: env("HOME").map(PathBuf::from),
    }
}

/// The error's one line; a refused token (401) is named by where it came from.
fn error_line(e: &anyhow::Error, gw: Option<&Gateway>) -> String {
    let unauthorized = e
        .chain()
        .filter_map(|c| c.downcast_ref::<ClientError>())
        .any(|c| c.status() == Some(StatusCode::UNAUTHORIZED));
    match gw {
        Some(gw) if unauthorized => format!("{e:#} ({})", gw.token_source()),
        _ => format!("{e:#}"),
    }
}

fn main() -> ExitCode {
    if let Some(code) = mcli::run_if_invoked() {
        return code;
    }
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return usage(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return usage(e),
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let wanted = wanted(&cli, &matches, &env);
    let output = cli.output;
    // Byte streams and generated files have no document to print: an explicit -o json|yaml
    // is refused rather than silently ignored.
    let stream = match &cli.command {
        Command::Console(_) => Some("console"),
        Command::Completion(_) => Some("completion"),
        Command::Man => Some("man"),
        _ => None,
    };
    if let Some(name) = stream
        && output != Format::Text
    {
        eprintln!("dutctl: {name} prints a byte stream: -o json|yaml does not apply");
        return ExitCode::from(EXIT_USAGE);
    }
    let command = match cli.command {
        // Offline: no gateway, so no config file to get wrong.
        Command::Job(cmd) => return finish(cmd_job::run(cmd, output), None),
        Command::Completion(args) => {
            return finish(cmd_completion::completion(args, Cli::command()), None);
        }
        Command::Man => return finish(cmd_completion::man(Cli::command()), None),
        other => other,
    };
    let gw = match Gateway::resolve(wanted, &env) {
        Ok(gw) => gw,
        Err(e) => return finish(Err(e), None),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return finish(
                Err(anyhow::anyhow!("cannot start the async runtime: {e}")),
                None,
            );
        }
    };
    let gw = &gw;
    let result: anyhow::Result<ExitCode> = runtime.block_on(async {
        match command {
            Command::Status => Ok(if cmd_status::run(gw, output).await? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }),
            // Offline commands returned above.
            Command::Job(cmd) => cmd_job::run(cmd, output),
            Command::Completion(_) | Command::Man => Ok(ExitCode::SUCCESS),
            Command::Machines(cmd) => {
                cmd_machines::run(cmd, gw, output).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Pdus(cmd) => {
                cmd_pdus::run(cmd, gw, output).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Run(args) => cmd_run::run(args, gw, output).await,
            Command::Jobs(cmd) => cmd_jobs::run(cmd, gw, output).await,
            Command::Gitlab(cmd) => cmd_gitlab::run(cmd, gw, output).await,
            Command::Console(args) => {
                cmd_console::run(args, gw).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Tokens(cmd) => {
                cmd_tokens::run(cmd, gw, output).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Stats(args) => {
                cmd_stats::run(args, gw, output).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Audit(args) => Ok(if cmd_audit::run(args, gw, output).await? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }),
        }
    });
    finish(result, Some(gw))
}

/// The exit code; an error is one line on stderr.
fn finish(result: anyhow::Result<ExitCode>, gw: Option<&Gateway>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dutctl: {}", error_line(&e, gw));
            ExitCode::from(EXIT_ERROR)
        }
    }
}
