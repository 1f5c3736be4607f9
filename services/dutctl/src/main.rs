//! `dutctl`: the command-line client of a dutgate gateway.
//!
//! Errors are one line on stderr and a non-zero exit code; `dutctl run` exits with the job's
//! pinned status code (design.md §8).

mod cmd_gitlab;
mod cmd_job;
mod cmd_jobs;
mod cmd_machines;
mod cmd_pdus;
mod cmd_run;
mod cmd_status;
mod gateway;
mod interactive;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gateway::Gateway;
use output::Format;

#[derive(Parser)]
#[command(
    name = "dutctl",
    version,
    about = "Client of a dutgate CI farm gateway"
)]
struct Cli {
    /// The gateway's executor URL, e.g. http://gateway:8000 (other services: same host, their
    /// default ports, unless DUTGATE_<SERVICE>_URL or the state dir says otherwise).
    #[arg(long, env = "DUTGATE_URL", global = true)]
    url: Option<String>,
    /// API token (admin or user).
    #[arg(long, env = "DUTGATE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A local gateway's state dir: its endpoints and tokens are read from there.
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
    /// Jobs: list, show, cancel, log.
    #[command(subcommand)]
    Jobs(cmd_jobs::JobsCommand),
    /// GitLab Runner custom executor driver and runner configuration.
    #[command(subcommand)]
    Gitlab(cmd_gitlab::GitlabCommand),
}

/// Exit code for usage errors and failed commands (job statuses use 0–6, see `run`).
const EXIT_ERROR: u8 = 10;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = |k: &str| std::env::var(k).ok();
    let state_dir = cli
        .state_dir
        .clone()
        .or_else(|| gateway::default_state_dir(&env));
    let gw = Gateway::resolve(
        cli.url.as_deref(),
        cli.token.as_deref(),
        state_dir.as_deref(),
        &env,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dutctl: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result: anyhow::Result<ExitCode> = runtime.block_on(async {
        match cli.command {
            Command::Status => Ok(if cmd_status::run(&gw, cli.output).await? {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }),
            Command::Job(cmd) => cmd_job::run(cmd, cli.output),
            Command::Machines(cmd) => {
                cmd_machines::run(cmd, &gw, cli.output).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Pdus(cmd) => {
                cmd_pdus::run(cmd, &gw, cli.output).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Run(args) => cmd_run::run(args, &gw).await,
            Command::Jobs(cmd) => {
                cmd_jobs::run(cmd, &gw, cli.output).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Gitlab(cmd) => cmd_gitlab::run(cmd, &gw).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dutctl: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
