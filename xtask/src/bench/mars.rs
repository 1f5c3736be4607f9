//! `cargo xtask bench mars`: the lease path the executor's scheduler depends on (acquire and
//! release latency, cycles/s with 8 clients, contended acquire, release → "machine freed"
//! long-poll delay), over HTTP against an in-process mars, on SQLite and PostgreSQL.
//!
//! The measuring program is `services/mars/examples/mars_bench.rs`; this module builds it in
//! release mode, runs it and writes its rows to docs/benchmarks.md. valve-infra had no leases
//! (machine state lived in one process's memory), so there is no peer to run side by side;
//! the reference is the executor's goal of a dispatch p99 under 10 ms.

use std::process::Command;

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::append_table;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args(["build", "-p", "dutgate-mars", "--example", "mars_bench"])
        .current_dir(&args.root);
    if !args.quick {
        build.arg("--release");
    }
    if !build
        .status()
        .context("building the mars benchmark")?
        .success()
    {
        bail!("cargo build of the mars benchmark failed");
    }
    let profile = if args.quick { "debug" } else { "release" };
    let exe = args
        .root
        .join("target")
        .join(profile)
        .join("examples")
        .join("mars_bench");
    let mut cmd = Command::new(&exe);
    if args.quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "mars benchmark failed ({}):\n{stdout}\n{}",
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
        bail!("the mars benchmark printed no results:\n{stdout}");
    }
    for r in &rows {
        println!("{}: {}", r[0], r[1]);
    }
    if args.write && !args.quick {
        append_table(
            &args.root,
            "mars: machine leases over HTTP (SQLite and PostgreSQL)",
            "cargo xtask bench mars",
            &["figure", "value"],
            &rows,
            "In-process mars (release build) on 127.0.0.1 with 64 IDLE machines, typed client \
             (reqwest) in the same process, 2 tokio workers. Latencies are per HTTP call; a \
             cycle is acquire + release. Contended: 8 clients race for one machine per round \
             (exactly one won every round). Freed event: from the release call to the \
             long-polling client receiving the event. PostgreSQL 15 on 127.0.0.1.",
        )?;
    }
    Ok(())
}
