//! `cargo xtask bench scheduler`: the executor's queue and scheduler with 1,000 machines on
//! dummy PDUs (no consoles) and 10,000 trivial jobs, on SQLite and on PostgreSQL.
//!
//! The measuring program is `services/executor/examples/scheduler_bench.rs` (real mars, pdu
//! and executor services in one process; each job powers its machine on and off through the
//! pdu service, then finishes and releases its lease). This module builds it in release mode,
//! runs it per backend and writes the rows to docs/benchmarks.md. valve-infra had no queue
//! (clients retried a 409 every second), so there is no peer to run side by side; the goals
//! are a dispatch p99 under 10 ms and under 100 ms of gateway overhead from submission to
//! power-on. `-- <machines> <jobs>` overrides the sizes; PostgreSQL is
//! `DUTGATE_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`).

use std::process::Command;

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::append_table;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(&cargo);
    build
        .args([
            "build",
            "-p",
            "dutgate-executor",
            "--example",
            "scheduler_bench",
        ])
        .current_dir(&args.root);
    if !args.quick {
        build.arg("--release");
    }
    if !build
        .status()
        .context("building the scheduler benchmark")?
        .success()
    {
        bail!("cargo build of the scheduler benchmark failed");
    }
    let profile = if args.quick { "debug" } else { "release" };
    let exe = args
        .root
        .join("target")
        .join(profile)
        .join("examples")
        .join("scheduler_bench");
    let (machines, jobs) = match (args.extra.first(), args.extra.get(1)) {
        (Some(m), Some(j)) => (m.clone(), j.clone()),
        _ if args.quick => ("32".to_string(), "300".to_string()),
        _ => ("1000".to_string(), "10000".to_string()),
    };
    let pg = std::env::var("DUTGATE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut rows = Vec::new();
    for backend in ["sqlite", "postgres"] {
        println!("  scheduler: {backend}, {machines} machines, {jobs} jobs");
        // Other work on the machine shows in every figure: record how busy it was.
        let load = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "?".into());
        let out = Command::new(&exe)
            .args(["--backend", backend, "--postgres-url", &pg])
            .args(["--machines", &machines, "--jobs", &jobs])
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "scheduler benchmark on {backend} failed: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .context("the benchmark printed no RESULT line")?;
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 11 {
            bail!("unexpected RESULT line: {line}");
        }
        rows.push(vec![
            f[0].to_string(),
            format!("{} / {}", f[1], f[2]),
            format!("{} / {}", f[3], f[4]),
            format!("≤ {} / ≤ {}", f[7], f[8]),
            format!("{} / {}", f[5], f[6]),
            f[9].to_string(),
            f[10].to_string(),
            load,
        ]);
    }
    if args.write && !args.quick {
        append_table(
            &args.root,
            "Scheduler: dispatch latency and throughput",
            &format!("cargo xtask bench scheduler -- {machines} {jobs}"),
            &[
                "store",
                "machines / jobs",
                "submit → power-on p50 / p99 (ms, idle gateway)",
                "dispatch transaction p50 / p99 (ms, histogram bucket bound)",
                "machine freed → next job launched p50 / p99 (ms, loaded)",
                "jobs/s",
                "submissions/s",
                "load avg at start",
            ],
            &rows,
            "Jobs run inline in the executor (power on, power off through the pdu service, \
             finish, release): the figures are the gateway's path, not process start-up. \
             *Dispatch transaction*: claim of the job row (`FOR UPDATE SKIP LOCKED` on \
             PostgreSQL), mars lease, commit. *Machine freed → next job launched*: from a \
             lease release to the launch of the next queued job on that machine (mars event, \
             scheduler round, dispatch), while every machine is busy with the same kind of \
             short jobs: it includes waiting for the CPU those jobs use. Goals: dispatch p99 \
             < 10 ms, submit → power-on < 100 ms.",
        )?;
    } else {
        for r in &rows {
            println!("  {}", r.join(" | "));
        }
    }
    Ok(())
}
