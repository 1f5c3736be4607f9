//! `cargo xtask …`: developer tasks, so that no shell scripts are scattered around.

mod bench;
mod deb;
mod demo;
mod dut_image;
mod fuzz;
mod packages;
mod test;
mod ui_assets;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "dutgate developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the test suite's system packages, then run fmt, clippy and every test.
    Test(test::TestArgs),
    /// Run benchmarks side by side with the peers and append the results to docs/benchmarks.md.
    Bench(bench::BenchCli),
    /// Run every cargo-fuzz target (or one) for N seconds each, on nightly.
    Fuzz {
        /// One target, by name or as `<crate>/<name>`.
        #[arg(long)]
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        time: u64,
    },
    /// Build the DUT environment (kernel, initramfs, static agents) into a gateway's state dir.
    DutImage(dut_image::DutImageArgs),
    /// Install the system packages the test suite needs (what `test` does first).
    InstallDeps,
    /// Start a virtual farm (one QEMU DUT), run examples/hello.yml on it, stop it.
    Demo(demo::DemoArgs),
    /// Build the Debian package of the gateway (docs/install.md); prints its path.
    Deb(deb::DebArgs),
    /// Refresh the dashboard's browser assets (xterm.js) from npm's lock file into
    /// services/executor/ui/assets/ (committed; `cargo build` never runs npm).
    UiAssets,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Test(args) => test::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Fuzz { target, time } => fuzz::run(target, time),
        Command::DutImage(args) => dut_image::run(&args),
        Command::InstallDeps => packages::install(&workspace_root()),
        Command::Demo(args) => demo::run(&args),
        Command::Deb(args) => deb::run(&args),
        Command::UiAssets => ui_assets::run(&workspace_root()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}
