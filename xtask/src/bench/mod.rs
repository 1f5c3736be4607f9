//! `cargo xtask bench <name>|all`: each benchmark runs dutgate and its peer on the same inputs,
//! alternating runs, and writes a dated table to `docs/benchmarks.md` in place of that
//! benchmark's previous one (which moves to `docs/benchmarks-history.md`).
//!
//! To add one: a module `bench/<name>.rs` with `pub fn run(args: &BenchArgs) -> anyhow::Result<()>`
//! and one line in `BENCHES`.

pub mod boot;
pub mod dashboard;
pub mod farm;
pub mod footprint;
pub mod jobspec;
pub mod mars;
pub mod overhead;
pub mod pdu;
mod ports;
pub mod registry;
pub mod report;
pub mod s3;
pub mod salad;
pub mod scheduler;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchCli {
    /// Which benchmark: one of the registered names, or `all`.
    pub name: String,
    /// A short run that only checks the harness works (used by the test suite).
    #[arg(long)]
    pub quick: bool,
    /// Do not write results to docs/benchmarks.md.
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

/// Milliseconds spent in [`cargo_build`] so far (compiling, or waiting for another cargo's
/// lock on a shared `target/`), so that the timings tell building from measuring.
static BUILD_MS: AtomicU64 = AtomicU64::new(0);

fn build_seconds() -> f64 {
    BUILD_MS.load(Ordering::Relaxed) as f64 / 1000.0
}

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
    ("overhead", overhead::run),
    ("farm", farm::run),
    ("dashboard", dashboard::run),
];

pub fn run(cli: &BenchCli) -> anyhow::Result<()> {
    let args = BenchArgs {
        quick: cli.quick,
        write: !cli.no_write,
        extra: cli.extra.clone(),
        root: crate::workspace_root(),
    };
    let all = cli.name == "all";
    let selected: Vec<&(&str, BenchFn)> = if all {
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
    if all && !cli.extra.is_empty() {
        bail!("extra arguments go to one benchmark, not to `all`");
    }
    let load = report::load_average();
    let started = Instant::now();
    let mut timings: Vec<(&str, Duration, f64, bool)> = Vec::new();
    let mut failures = Vec::new();
    for (name, f) in selected {
        println!("== bench {name}");
        let t = Instant::now();
        let built = build_seconds();
        let result = f(&args);
        let took = t.elapsed();
        let build = build_seconds() - built;
        timings.push((name, took, build, result.is_ok()));
        match result {
            Ok(()) => println!(
                "== bench {name}: ok in {:.1} s (of which building {build:.1} s)",
                took.as_secs_f64()
            ),
            Err(e) => {
                eprintln!(
                    "== bench {name}: FAILED after {:.1} s: {e:#}",
                    took.as_secs_f64()
                );
                failures.push(format!("{name}: {e:#}"));
            }
        }
        // One benchmark alone fails at once; `all` reports every failure at the end.
        if !all && let Some(f) = failures.first() {
            bail!("{f}");
        }
    }
    let total = started.elapsed();
    if all {
        println!("== timings{}", if args.quick { " (quick)" } else { "" });
        for (name, took, build, ok) in &timings {
            println!(
                "  {name:<12} {:>7.1} s  (building {build:>5.1} s){}",
                took.as_secs_f64(),
                if *ok { "" } else { "  FAILED" }
            );
        }
        println!(
            "  {:<12} {:>7.1} s ({:.1} min)",
            "total",
            total.as_secs_f64(),
            total.as_secs_f64() / 60.0
        );
        // The plain closing line test runners are read by.
        println!(
            "benchmarks: {} passed, {} failed",
            timings.len() - failures.len(),
            failures.len()
        );
        if !failures.is_empty() {
            bail!(
                "{} benchmark(s) failed:\n{}",
                failures.len(),
                failures.join("\n")
            );
        }
        if args.write && !args.quick {
            let per_bench: Vec<String> = timings
                .iter()
                .map(|(name, took, _, _)| format!("{name} {:.1}", took.as_secs_f64() / 60.0))
                .collect();
            report::append_line(
                &args.root,
                "`cargo xtask bench all`: time per benchmark",
                &format!(
                    "`cargo xtask bench all` took {:.1} min on {} (load average {load} at the start; \
                     {:.1} min of it building); per benchmark, in min: {}.",
                    total.as_secs_f64() / 60.0,
                    report::machine_description(),
                    build_seconds() / 60.0,
                    per_bench.join(", ")
                ),
            )?;
        }
    }
    Ok(())
}

/// Builds `targets` (cargo target options: `["--bin", "dutgate"]`, `["--example", "x"]`, …;
/// release unless `--quick`) and returns the profile's output directory. Features are resolved
/// for the whole workspace with dev-dependencies, as `cargo test --workspace` does, so the
/// debug binaries of the smoke run are the test suite's, and every benchmark's release build
/// shares the same crates.
///
/// `DUTGATE_BENCH_BIN_DIR=<dir>` skips the build and takes `<dir>/<binary>` and
/// `<dir>/examples/<example>` instead (e.g. built from a clean checkout while the working tree
/// is mid-edit, or kept from before a change to measure both in one session).
pub fn cargo_build(args: &BenchArgs, targets: &[&str]) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    if let Some(dir) = std::env::var_os("DUTGATE_BENCH_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(&cargo);
    build
        .args(["build", "--workspace"])
        .args(targets)
        // An example target makes cargo resolve features with the dev-dependencies (tokio's
        // test-util, …) as `cargo test --workspace` does; without one a binary-only build
        // would compile the whole workspace a second time with other features.
        .args(["--example", "boot_load"])
        .current_dir(&args.root);
    if !args.quick {
        build.arg("--release");
    }
    let what = targets.join(" ");
    let started = Instant::now();
    let status = build.status();
    BUILD_MS.fetch_add(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    if !status
        .with_context(|| format!("building {what}"))?
        .success()
    {
        bail!("cargo build {what} failed");
    }
    let profile = if args.quick { "debug" } else { "release" };
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| args.root.join("target"));
    Ok(target_dir.join(profile))
}

/// Builds `example` (of `package`; release unless `--quick`), runs it (with `--quick` when asked)
/// and returns the `ROW\t<figure>\t<value>` lines it printed, for benchmarks whose measuring
/// program lives next to the service it measures.
pub fn run_example_rows(
    args: &BenchArgs,
    package: &str,
    example: &str,
) -> anyhow::Result<Vec<Vec<String>>> {
    use anyhow::Context;
    let exe = cargo_build(args, &["--example", example])?
        .join("examples")
        .join(example);
    let mut cmd = std::process::Command::new(&exe);
    if args.quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {} (of {package})", exe.display()))?;
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
