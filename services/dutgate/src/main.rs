//! `dutgate`: the multi-call gateway daemon. Each service runs as its own process
//! (`dutgate salad`, `dutgate pdu`, …); `dutgate up` starts and supervises all of them.

mod config;
mod dut_image;
mod services;
mod tokens;
mod up;
mod virtual_farm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dutgate_core::ServiceName;

/// Exit code for a bad config or bad command line.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "dutgate",
    version,
    about = "CI farm gateway: time-shares test machines between jobs"
)]
struct Cli {
    /// Config file (default: /etc/dutgate/gateway.yml when it exists, else embedded defaults).
    #[arg(long, env = "DUTGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// State directory (databases, logs, caches, tokens). Overrides `gateway.state_dir`.
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start every service as a supervised child process.
    Up(up::UpArgs),
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Job queue, scheduler and job records (port 8000).
    Executor,
    /// Machine registry and the Sergeant Hartman trainer (port 8001).
    Mars,
    /// OCI pull-through cache (port 8002).
    Registry,
    /// iPXE scripts and the boot artifact cache (port 8003).
    Boot,
    /// PDU control with read-back (port 8004).
    Pdu,
    /// Serial consoles relayed over TCP (port 8005).
    Salad,
    /// The embedded S3 endpoint for job buckets (port 9000).
    S3,
    /// Assemble the DUT environment (kernel, initramfs) the virtual farm boots; see
    /// `cargo xtask dut-image`, which builds the static agents first.
    DutImage(dut_image::DutImageArgs),
    /// The gateway's tokens, offline: bootstrap tokens, named tokens (create, list, revoke).
    Tokens {
        #[command(subcommand)]
        command: tokens::TokensCommand,
    },
    /// The per-job process (started by the executor, setup on stdin).
    #[command(hide = true)]
    Job {
        /// The job id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the config and print the effective result (secrets masked).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `up --virtual-duts N` brings its own DUT networks (loopback, QEMU's user network).
    let virtual_farm = matches!(&cli.command, Command::Up(args) if args.virtual_farm_enabled());
    let loaded = match config::load(
        cli.config.as_deref(),
        cli.state_dir.as_deref(),
        virtual_farm,
    ) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("dutgate: config error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let service = match &cli.command {
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            println!("# effective configuration from {}", loaded.source);
            print!("{}", dutgate_core::config::render(&loaded.config));
            return ExitCode::SUCCESS;
        }
        Command::DutImage(args) => {
            return match dut_image::run(args, &loaded.config.gateway.state_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dutgate: dut-image: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Tokens { command } => {
            return match tokens::run(command, &loaded.config.gateway) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dutgate: tokens: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Up(_) | Command::Job { .. } => None,
        Command::Executor => Some(ServiceName::Executor),
        Command::Mars => Some(ServiceName::Mars),
        Command::Registry => Some(ServiceName::Registry),
        Command::Boot => Some(ServiceName::Boot),
        Command::Pdu => Some(ServiceName::Pdu),
        Command::Salad => Some(ServiceName::Salad),
        Command::S3 => Some(ServiceName::S3),
    };
    dutgate_core::telemetry::init_tracing(&loaded.config.gateway.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dutgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match (service, cli.command) {
            (Some(name), _) => services::run(name, loaded.config)
                .await
                .map_err(|e| anyhow::anyhow!("{name}: {e}")),
            (None, Command::Up(args)) => up::run(args, loaded, cli.config).await,
            (None, Command::Job { id }) => match services::job(&id).await {
                0 => Ok(()),
                code => Err(anyhow::anyhow!(
                    "job {id}: job process ended with code {code}"
                )),
            },
            (None, _) => Ok(()),
        }
    });
    // Do not wait for lingering blocking tasks (e.g. a serial read) once the work is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dutgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
