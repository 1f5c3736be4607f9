//! `cargo xtask bench farm`: a farm of simulated DUTs (dummy PDUs, netconsole consoles) runs
//! a continuous stream of short jobs through the real gateway path (executor, one real
//! `dutgate-job` process per job, mars leases, pdu power cycles with an off delay, boot
//! configs, salad consoles) for a fixed time.
//!
//! The measuring program is `services/executor/examples/farm_bench.rs` (built with the
//! executor's `testing` feature); it prints `ROW\t<figure>\t<value>` lines. This module builds
//! it (release unless `--quick`) and runs it: SQLite with one executor, the same with a third
//! of the DUTs (not in the quick variant), then PostgreSQL with two executors sharing the
//! queue; it writes one table with a column per run to docs/benchmarks.md. `-- <duts> <seconds>` overrides the farm size and the measured time;
//! PostgreSQL is `DUTGATE_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`;
//! the program creates and drops a database of its own next to it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::append_table;

/// (column title, DUTs, arguments of the run). Besides the full farm on SQLite and on
/// PostgreSQL, a third of it on SQLite shows what the machine sustains when it is not
/// saturated (not in the quick variant).
fn runs(pg: &str, duts: u32, quick: bool) -> Vec<(&'static str, u32, Vec<String>)> {
    let sqlite = || {
        vec![
            "--backend".into(),
            "sqlite".into(),
            "--executors".into(),
            "1".into(),
        ]
    };
    let mut runs = vec![("SQLite, 1 executor", duts, sqlite())];
    if !quick {
        runs.push((
            "SQLite, 1 executor, a third of the DUTs",
            (duts / 3).max(1),
            sqlite(),
        ));
    }
    runs.push((
        "PostgreSQL, 2 executors",
        duts,
        vec![
            "--backend".into(),
            "postgres".into(),
            "--executors".into(),
            "2".into(),
            "--postgres-url".into(),
            pg.into(),
        ],
    ));
    runs
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (duts, seconds) = match (args.extra.first(), args.extra.get(1)) {
        (Some(d), Some(s)) => (
            d.parse::<u32>()
                .context("the first extra argument is the number of DUTs")?,
            s.parse::<u32>()
                .context("the second extra argument is the measured time in seconds")?,
        ),
        (Some(_), None) => bail!("usage: cargo xtask bench farm [-- <duts> <seconds>]"),
        _ if args.quick => (8, 5),
        _ => (300, 45),
    };
    let (exe, job) = build(args)?;
    let pg = std::env::var("DUTGATE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    run_all(args, duts, seconds, &exe, &job, &pg)
}

/// Builds the program (the executor's `testing` feature comes with the dev-dependency
/// features that [`super::cargo_build`] resolves) and the job process binary; returns both
/// paths. `DUTGATE_BENCH_BIN_DIR` takes them as they are.
fn build(args: &BenchArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = super::cargo_build(args, &["--example", "farm_bench", "--bin", "dutgate-job"])?;
    Ok((
        dir.join("examples").join("farm_bench"),
        dir.join("dutgate-job"),
    ))
}

fn run_all(
    args: &BenchArgs,
    duts: u32,
    seconds: u32,
    exe: &std::path::Path,
    job: &std::path::Path,
    pg: &str,
) -> anyhow::Result<()> {
    // figure → value per run, in the order the first run printed them.
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let runs = runs(pg, duts, args.quick);
    for (i, (title, duts, run_args)) in runs.iter().enumerate() {
        let load = load_average();
        println!("  farm: {title}, {duts} DUTs, {seconds} s (load average {load})");
        let mut cmd = Command::new(exe);
        cmd.args(run_args)
            .args(["--duts", &duts.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .arg("--job-command")
            .arg(job);
        if args.quick {
            cmd.arg("--quick");
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", exe.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "farm benchmark ({title}) failed: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut rows: Vec<(String, String)> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("ROW\t"))
            .filter_map(|l| l.split_once('\t'))
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect();
        if rows.is_empty() {
            bail!("the farm benchmark ({title}) printed no results:\n{stdout}");
        }
        rows.push(("load average at the start".into(), load));
        for (figure, value) in rows {
            println!("    {figure}: {value}");
            if !values.contains_key(&figure) {
                order.push(figure.clone());
            }
            let v = values
                .entry(figure)
                .or_insert_with(|| vec!["–".to_string(); runs.len()]);
            v[i] = value;
        }
    }
    let table: Vec<Vec<String>> = order
        .iter()
        .map(|f| {
            let mut row = vec![f.clone()];
            row.extend(values[f].iter().cloned());
            row
        })
        .collect();
    if args.write && !args.quick {
        let mut header = vec!["figure"];
        header.extend(runs.iter().map(|(t, _, _)| *t));
        let command = if args.extra.is_empty() {
            "cargo xtask bench farm".to_string()
        } else {
            format!("cargo xtask bench farm -- {duts} {seconds}")
        };
        append_table(
            &args.root,
            "Farm: simulated DUTs running a stream of short jobs",
            &command,
            &header,
            &table,
            "The program: `services/executor/examples/farm_bench/main.rs`, release build. \
             One process holds the gateway (mars, pdu with dummy PDUs, boot, salad with its \
             netconsole ingest, the executor(s)) and the simulated DUTs; every job is a real \
             `dutgate-job` process. Figures are over the measured window, while the submitter \
             kept the queue filled (the *queue non-empty* row); what they mean and where the time goes: the *Farm* section above.",
        )?;
    }
    Ok(())
}
