//! `cargo xtask bench <name>|all`: each benchmark runs dutgate and its peer on the same inputs,
//! alternating runs, and appends a dated table to `docs/benchmarks.md`.
//!
//! To add one: a module `bench/<name>.rs` with `pub fn run(args: &BenchArgs) -> anyhow::Result<()>`
//! and one line in `BENCHES`.

pub mod boot;
pub mod farm;
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
    ("farm", farm::run),
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

/// Builds `example` of `package` (release unless `--quick`), runs it (with `--quick` when asked)
/// and returns the `ROW\t<figure>\t<value>` lines it printed, for benchmarks whose measuring
/// program lives next to the service it measures.
pub fn run_example_rows(
    args: &BenchArgs,
    package: &str,
    example: &str,
) -> anyhow::Result<Vec<Vec<String>>> {
    use anyhow::Context;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(&cargo);
    build
        .args(["build", "-p", package, "--example", example])
        .current_dir(&args.root);
    if !args.quick {
        build.arg("--release");
    }
    if !build
        .status()
        .with_context(|| format!("building the {example} benchmark"))?
        .success()
    {
        bail!("cargo build of the {example} benchmark failed");
    }
    let profile = if args.quick { "debug" } else { "release" };
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| args.root.join("target"));
    let exe = target_dir.join(profile).join("examples").join(example);
    let mut cmd = std::process::Command::new(&exe);
    if args.quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{example} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rows: Vec<Vec<String>> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("ROW\t"))
        .filter_map(|l| l.split_once('\t'))
        .map(|(figure, value)| vec![figure.to_string(), value.to_string()])
        .collect();
    if rows.is_empty() {
        bail!("{example} printed no results:\n{stdout}");
    }
    for r in &rows {
        println!("{}: {}", r[0], r[1]);
    }
    Ok(rows)
}
