//! `cargo xtask bench <name>|all`: each benchmark runs dutgate and its peer on the same inputs,
//! alternating runs, and appends a dated table to `docs/benchmarks.md`.
//!
//! To add one: a module `bench/<name>.rs` with `pub fn run(args: &BenchArgs) -> anyhow::Result<()>`
//! and one line in `BENCHES`.

pub mod boot;
pub mod footprint;
pub mod jobspec;
pub mod mars;
pub mod pdu;
pub mod registry;
pub mod report;
pub mod s3;
pub mod salad;
pub mod scheduler;

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchCli {
    /// Which benchmark: one of the registered names, or `all`.
    pub name: String,
    /// A short run that only checks the harness works (used by the test suite).
    #[arg(long)]
    pub quick: bool,
    /// Do not append results to docs/benchmarks.md.
    #[arg(long)]
    pub no_write: bool,
    /// Extra arguments passed to the benchmark.
    #[arg(last = true)]
    pub extra: Vec<String>,
}

/// What every benchmark gets.
#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub quick: bool,
    pub write: bool,
    pub extra: Vec<String>,
    pub root: PathBuf,
}

type BenchFn = fn(&BenchArgs) -> anyhow::Result<()>;

/// The registered benchmarks, in the order `all` runs them.
const BENCHES: &[(&str, BenchFn)] = &[
    ("footprint", footprint::run),
    ("salad", salad::run),
    ("jobspec", jobspec::run),
    ("registry", registry::run),
    ("boot", boot::run),
    ("pdu", pdu::run),
    ("mars", mars::run),
    ("s3", s3::run),
    ("scheduler", scheduler::run),
];

pub fn run(cli: &BenchCli) -> anyhow::Result<()> {
    let args = BenchArgs {
        quick: cli.quick,
        write: !cli.no_write,
        extra: cli.extra.clone(),
        root: crate::workspace_root(),
    };
    let selected: Vec<&(&str, BenchFn)> = if cli.name == "all" {
        BENCHES.iter().collect()
    } else {
        BENCHES.iter().filter(|(n, _)| *n == cli.name).collect()
    };
    if selected.is_empty() {
        let names: Vec<&str> = BENCHES.iter().map(|(n, _)| *n).collect();
        bail!(
            "unknown benchmark {:?}; available: {} or all",
            cli.name,
            names.join(", ")
        );
    }
    for (name, f) in selected {
        println!("== bench {name}");
        f(&args)?;
    }
    Ok(())
}
