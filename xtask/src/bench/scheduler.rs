//! `cargo xtask bench scheduler`: the executor's queue and scheduler with 200 machines on
//! dummy PDUs (no consoles) and 2,000 trivial jobs, on SQLite and on PostgreSQL.
//!
//! The measuring program is `services/executor/examples/scheduler_bench.rs` (real mars, pdu
//! and executor services in one process, each on a runtime of its own as each is a process of
//! its own on a gateway; each job powers its machine on and off through the pdu service, then
//! finishes and releases its lease, on a niced runtime as job processes are niced). This module builds it in release mode,
//! runs it per backend and writes the rows to docs/benchmarks.md. valve-infra had no queue
//! (clients retried a 409 every second), so there is no peer to run side by side: the
//! comparison is with the physical floor, one transaction of the same database per dispatch.
//! The goals are a dispatch p99 under 50 ms (a farm of 200 machines; real farms offer about
//! 1 job/s) and under 100 ms of gateway overhead from submission to power-on. The load average is recorded at the start and end of each run.
//! `-- <machines> <jobs>` overrides the sizes; PostgreSQL is `DUTGATE_BENCH_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`).

use std::collections::HashMap;
use std::process::Command;

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::append_table;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let exe = super::cargo_build(args, &["--example", "scheduler_bench"])?
        .join("examples")
        .join("scheduler_bench");
    let (machines, jobs) = match (args.extra.first(), args.extra.get(1)) {
        (Some(m), Some(j)) => (m.clone(), j.clone()),
        _ if args.quick => ("32".to_string(), "300".to_string()),
        _ => ("200".to_string(), "2000".to_string()),
    };
    let pg = std::env::var("DUTGATE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut rows = Vec::new();
    for backend in ["sqlite", "postgres"] {
        println!("  scheduler: {backend}, {machines} machines, {jobs} jobs");
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
        if let Some(json) = stdout.lines().find(|l| l.starts_with('{')) {
            println!("  {json}");
        }
        let lines: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("RESULT "))
            .collect();
        if lines.is_empty() {
            bail!("the {backend} scheduler benchmark printed no RESULT line");
        }
        for line in lines {
            let f: HashMap<&str, &str> = line
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let g = |k: &str| -> anyhow::Result<String> {
                f.get(k)
                    .map(|v| v.to_string())
                    .with_context(|| format!("RESULT line without {k}: {line}"))
            };
            rows.push(vec![
                g("backend")?,
                format!("{} / {}", g("machines")?, g("jobs")?),
                format!("{} / {}", g("power_p50")?, g("power_p99")?),
                format!(
                    "{} / {} (n = {})",
                    g("disp_p50")?,
                    g("disp_p99")?,
                    g("disp_n")?
                ),
                format!("{} / {}", g("sent_p50")?, g("sent_p99")?),
                format!(
                    "{} = {} × ceiling ({} ms hold); ran at {}",
                    g("offered")?,
                    g("load")?,
                    g("hold_ms")?,
                    g("loaded_jps")?
                ),
                format!("{} / {}", g("floor_p50")?, g("floor_p99")?),
                format!("×{}", g("ratio")?),
                g("max_jps")?,
                format!("{} / {}", g("freed_p50")?, g("freed_p99")?),
                g("submit_ps")?,
                g("cpu")?.replace('/', " / "),
                format!("{} → {}", g("load_start")?, g("load_end")?),
            ]);
        }
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
                "dispatch latency p50 / p99 (ms, from the release's commit)",
                "same, from the release request sent (ms)",
                "offered load (jobs/s)",
                "floor: one transaction p50 / p99 (ms)",
                "dispatch p50 ÷ floor p50",
                "ceiling (jobs/s, saturated)",
                "saturated: machine freed → next launched p50 / p99 (ms)",
                "submissions/s",
                "CPU during the load: busy / gateway process / PostgreSQL (% of both cores)",
                "load avg start → end",
            ],
            &rows,
            "Jobs run inline in the executor (power on, power off through the pdu service, \
             finish, release): the figures are the gateway's path, not process start-up. \
             *Dispatch latency*: from the instant a job is dispatchable (queued, and a \
             matching machine free) to its launch, for the jobs that waited for a machine, \
             while the jobs hold their machines so that the offered load is the stated \
             fraction of the ceiling. A machine is free from the moment mars commits its \
             release (announced to mars' event subscribers); the next column counts from the \
             release request being sent instead, so it also holds mars' handling of the \
             release. *Ceiling*: jobs/s with jobs that release their machine at once \
             (every machine always wanted); a freed machine then waits its turn, which is \
             the *saturated* column (machines ÷ ceiling), not dispatch work. *Floor*: one \
             write transaction (UPDATE of one row, commit) on the executor's database. \
             *CPU*: shares of both cores' time while the loaded phase ran (from /proc): \
             all processes, the benchmark's own (the three services, the inline jobs and \
             the load generator), the PostgreSQL server's processes. \
             Goals: dispatch p99 < 50 ms, submit → power-on < 100 ms.",
        )?;
    } else {
        for r in &rows {
            println!("  {}", r.join(" | "));
        }
    }
    Ok(())
}
