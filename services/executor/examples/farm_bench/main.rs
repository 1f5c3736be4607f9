//! The farm benchmark behind `cargo xtask bench farm`.
//!
//! A farm of N simulated DUTs ([`duts`]) on a dummy PDU, behind the real gateway services of
//! `dutgate_executor::testing` (mars, pdu, boot, salad with its netconsole ingest, one or two
//! executors on SQLite or PostgreSQL). A submitter keeps the queue non-empty with short jobs
//! (a few KB of console ending with `SESSION END`); every job is a real `dutgate-job` process
//! that sets the boot config, attaches to the console through salad, power-cycles the machine
//! through the pdu service (with a small, nonzero off delay), watches the console and tears
//! down. After a warm-up, the program measures a fixed window and then prints
//! `ROW\t<figure>\t<value>` lines:
//!
//! - jobs/hour finished in the window, and how many were not PASS;
//! - machine utilisation: lease-held time / (machines × window), the share of it spent in the
//!   off delay, and the share with the DUT powered and printing its console;
//! - submit → power-on p50 / p99 (the client's POST to the job's power-on read back), and the
//!   queue wait and the gateway's part (dispatch → power-on) separately;
//! - where a job's time goes (medians per step), and the idle gap of a machine between two
//!   leases;
//! - gateway CPU seconds (this process minus the benchmark's own threads, plus the executor
//!   and job processes) and RSS (idle, peak under load; executors and job processes apart);
//! - console bytes relayed by salad (its metrics) in the window;
//! - with PostgreSQL: the peak of connections, and with two executors the split of jobs
//!   between them; always: that no job ran twice and no machine held two jobs at once.
//!
//! Usage: `farm_bench --job-command <dutgate-job> [--duts N] [--seconds S] [--warmup S]
//! [--backend sqlite|postgres] [--postgres-url URL] [--executors 1|2] [--off-delay S]
//! [--lines N] [--line-ms MS] [--executor-mode process|in-process] [--quick]`.

mod duts;
mod procfs;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dutgate_core::db::Db;
use dutgate_executor::store::{Store, now_ms};
use dutgate_executor::testing::{ExecutorMode, Farm, Options};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use dutgate_executor::testing::{ADMIN, USER};

struct Args {
    duts: u16,
    seconds: f64,
    warmup: f64,
    backend: String,
    postgres_url: String,
    executors: usize,
    off_delay: f64,
    lines: u32,
    line_ms: u64,
    job_command: PathBuf,
    in_process: bool,
}

fn parse_args() -> Result<Args, String> {
    let args: Vec<String> = std::env::args().collect();
    let get = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let quick = args.iter().any(|a| a == "--quick");
    fn num<T: std::str::FromStr>(v: Option<String>, name: &str, default: T) -> Result<T, String> {
        match v {
            Some(v) => v.parse().map_err(|_| format!("{name}: not a number: {v}")),
            None => Ok(default),
        }
    }
    let seconds: f64 = num(
        get("--seconds"),
        "--seconds",
        if quick { 5.0 } else { 45.0 },
    )?;
    Ok(Args {
        duts: num(get("--duts"), "--duts", if quick { 8 } else { 300 })?,
        seconds,
        warmup: num(
            get("--warmup"),
            "--warmup",
            if quick {
                2.0
            } else {
                (seconds / 4.0).clamp(5.0, 10.0)
            },
        )?,
        backend: get("--backend").unwrap_or_else(|| "sqlite".into()),
        postgres_url: get("--postgres-url")
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into()),
        executors: num(get("--executors"), "--executors", 1)?,
        off_delay: num(get("--off-delay"), "--off-delay", 0.5)?,
        lines: num(get("--lines"), "--lines", if quick { 10 } else { 40 })?,
        line_ms: num(get("--line-ms"), "--line-ms", 50)?,
        job_command: get("--job-command")
            .map(PathBuf::from)
            .ok_or("--job-command <path of dutgate-job> is required")?,
        in_process: get("--executor-mode").as_deref() == Some("in-process"),
    })
}

fn main() -> ExitCode {
    // Executors run as processes of this very program.
    if let Some(code) = dutgate_executor::testing::executor_process_main() {
        return code;
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("farm_bench: {e}");
            return ExitCode::from(2);
        }
    };
    // Installed before any service registers its metrics.
    let Some(handle) = dutgate_core::telemetry::metrics_handle() else {
        eprintln!("farm_bench: no Prometheus recorder");
        return ExitCode::FAILURE;
    };
    let metrics: Render = Arc::new(move || handle.render());
    // The gateway's services run on one runtime; the benchmark's own work (simulated DUTs,
    // submitter, samplers) on another whose threads are named `bench-*`, so that their CPU
    // time can be told apart.
    let gateway = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gateway")
        .enable_all()
        .build()
        .expect("the gateway runtime");
    let bench = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-rt")
        .enable_all()
        .build()
        .expect("the benchmark runtime");
    let handle = bench.handle().clone();
    let result = gateway.block_on(run(args, handle, metrics));
    bench.shutdown_timeout(Duration::from_secs(2));
    gateway.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("farm_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn row(figure: &str, value: impl std::fmt::Display) {
    println!("ROW\t{figure}\t{value}");
}

/// Nearest-rank percentile (`p` in 0..=1) of unsorted samples.
fn pct(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

fn p50_p99(samples: &[f64]) -> String {
    format!(
        "{:.0} / {:.0} (n={})",
        pct(samples, 0.5),
        pct(samples, 0.99),
        samples.len()
    )
}

/// Length of `[a, b] ∩ [lo, hi]`.
fn overlap(a: i64, b: i64, lo: i64, hi: i64) -> i64 {
    (b.min(hi) - a.max(lo)).max(0)
}

/// Sum of a counter over all its label sets in Prometheus text.
fn counter_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .sum()
}

/// A database of its own on the PostgreSQL server of `base` (a URL naming any database).
fn database_url(base: &str, db: &str) -> String {
    let (main, query) = match base.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (base, None),
    };
    let prefix = match main.rsplit_once('/') {
        Some((p, _)) if p.contains("//") && p.len() > p.find("//").unwrap_or(0) + 2 => p,
        _ => main,
    };
    match query {
        Some(q) => format!("{prefix}/{db}?{q}"),
        None => format!("{prefix}/{db}"),
    }
}

async fn pg_admin(base: &str) -> Result<sqlx::AnyPool, String> {
    sqlx::any::install_default_drivers();
    sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(base)
        .await
        .map_err(|e| format!("PostgreSQL at {base}: {e}"))
}

/// One job's timeline, unix ms.
#[derive(Debug, Default, Clone)]
struct Timeline {
    machine: String,
    executor: String,
    status: String,
    reason: String,
    submitted: i64,
    /// The job process' first event (its setup phase).
    setup: Option<i64>,
    dispatched: Option<i64>,
    process_started: Option<i64>,
    power: Option<i64>,
    running: Option<i64>,
    teardown: Option<i64>,
    released: Option<i64>,
    /// The job's last action on the machine before it gave the lease back (teardown steps
    /// but the release).
    last_action: Option<i64>,
    /// The lease as mars recorded it (acquired, released or expired).
    lease: Option<(i64, Option<i64>)>,
    finished: Option<i64>,
    /// `dispatched` events (one per job: a dispatch is recorded only under a granted lease).
    dispatched_events: u32,
    process_started_events: u32,
    boots: i64,
}

async fn timelines(
    store: &Store,
    mars: &dutgate_mars::client::MarsClient,
) -> Result<BTreeMap<i64, Timeline>, String> {
    let pool = store.db().pool();
    let err = |e: sqlx::Error| format!("reading the results: {e}");
    let mut jobs: BTreeMap<i64, Timeline> = BTreeMap::new();
    let rows = sqlx::query(
        "SELECT id, machine_id, executor, status, submitted_at, dispatched_at, finished_at, boots, \
         reason FROM jobs",
    )
    .fetch_all(pool)
    .await
    .map_err(err)?;
    for r in rows {
        let id: i64 = r.try_get(0).map_err(err)?;
        jobs.insert(
            id,
            Timeline {
                machine: r
                    .try_get::<Option<String>, _>(1)
                    .map_err(err)?
                    .unwrap_or_default(),
                executor: r
                    .try_get::<Option<String>, _>(2)
                    .map_err(err)?
                    .unwrap_or_default(),
                status: r
                    .try_get::<Option<String>, _>(3)
                    .map_err(err)?
                    .unwrap_or_default(),
                submitted: r.try_get(4).map_err(err)?,
                dispatched: r.try_get(5).map_err(err)?,
                finished: r.try_get(6).map_err(err)?,
                boots: r.try_get(7).map_err(err)?,
                reason: r
                    .try_get::<Option<String>, _>(8)
                    .map_err(err)?
                    .unwrap_or_default(),
                ..Default::default()
            },
        );
    }
    let rows = sqlx::query(
        "SELECT job_id, at, kind, data FROM job_events \
         WHERE kind IN ('dispatched', 'process_started', 'phase', 'teardown', 'executor') \
         ORDER BY job_id, seq",
    )
    .fetch_all(pool)
    .await
    .map_err(err)?;
    for r in rows {
        let id: i64 = r.try_get(0).map_err(err)?;
        let at: i64 = r.try_get(1).map_err(err)?;
        let kind: String = r.try_get(2).map_err(err)?;
        let data: String = r.try_get(3).map_err(err)?;
        let Some(t) = jobs.get_mut(&id) else {
            continue;
        };
        let data: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
        match kind.as_str() {
            "dispatched" => t.dispatched_events += 1,
            "process_started" => {
                t.process_started_events += 1;
                t.process_started.get_or_insert(at);
            }
            "phase" => match data["phase"].as_str() {
                Some("setup") => {
                    t.setup.get_or_insert(at);
                }
                Some("power") => {
                    t.power.get_or_insert(at);
                }
                Some("running") => {
                    t.running.get_or_insert(at);
                }
                Some("teardown") => {
                    t.teardown.get_or_insert(at);
                }
                _ => {}
            },
            "teardown" if data["step"] == "release_lease" && data["ok"] == true => {
                t.released = Some(at);
            }
            "teardown" => {
                t.last_action = Some(t.last_action.map_or(at, |l| l.max(at)));
            }
            _ => {}
        }
    }
    // Leases, from mars' event stream (its record of its machines' state changes).
    let mut rows = Vec::new();
    let mut after = 0;
    loop {
        let batch = mars
            .events(after, Duration::ZERO)
            .await
            .map_err(|e| format!("reading mars' machine events: {e}"))?;
        if batch.events.is_empty() {
            break;
        }
        after = batch.next;
        rows.extend(batch.events.into_iter().filter(|e| {
            matches!(
                e.kind.as_str(),
                "lease_acquired" | "lease_released" | "lease_expired"
            )
        }));
    }
    let mut holder: HashMap<String, i64> = HashMap::new();
    for r in rows {
        let (at, kind, job, machine) = (r.at.millis(), r.kind, r.job_id, r.machine_id.to_string());
        if kind == "lease_acquired" {
            let Some(id) = job.and_then(|j| j.parse::<i64>().ok()) else {
                continue;
            };
            holder.insert(machine, id);
            if let Some(t) = jobs.get_mut(&id) {
                t.lease = Some((at, None));
            }
        } else if let Some(id) = holder.remove(&machine)
            && let Some(t) = jobs.get_mut(&id)
            && let Some((_, end)) = t.lease.as_mut()
        {
            *end = Some(at);
        }
    }
    Ok(jobs)
}

const FARM_JOB: &str = r#"version: 1
target:
  tags: ["sim:any:yes"]
timeouts:
  overall: {minutes: 10}
console_patterns:
  session_end: {regex: "^SESSION END$"}
  job_success: {regex: "^RESULT: PASS$"}
deployment:
  start:
    kernel:
      url: "{{ artifacts }}/vmlinuz"
      cmdline: ["SALAD.machine_id={{ machine_id }}", "sim=farm"]
    initramfs:
      url: "{{ artifacts }}/initrd"
"#;

/// Renders the process' Prometheus metrics.
type Render = Arc<dyn Fn() -> String + Send + Sync>;

async fn run(args: Args, bench: tokio::runtime::Handle, metrics: Render) -> Result<(), String> {
    let mut duts = args.duts;
    // PostgreSQL: a database of its own, dropped at the end.
    let mut pg: Option<(sqlx::AnyPool, String, String)> = None;
    if args.backend == "postgres" {
        let admin = pg_admin(&args.postgres_url).await?;
        let name = format!("dutgate_farm_{}", std::process::id());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        // Every job process holds its own connection(s) for its life: the farm must leave
        // the server (shared with other users) room to breathe.
        let max: i64 =
            sqlx::query("SELECT setting::bigint FROM pg_settings WHERE name = 'max_connections'")
                .fetch_one(&admin)
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| format!("max_connections: {e}"))?;
        let used: i64 = sqlx::query("SELECT count(*) FROM pg_stat_activity")
            .fetch_one(&admin)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| format!("pg_stat_activity: {e}"))?;
        // Executors: up to 16 pooled connections each; 25 left for everyone else; job
        // processes at most 2 each (their pool's limit; see the row "PostgreSQL connections"
        // for what they really held).
        let budget = max - used - 25 - 16 * args.executors as i64;
        let per_job = 2;
        let cap = (budget / per_job).max(1);
        if i64::from(duts) > cap {
            eprintln!(
                "PostgreSQL max_connections = {max} ({used} in use): {duts} DUTs capped to {cap}"
            );
            row(
                "DUTs capped by PostgreSQL",
                format!(
                    "{duts} → {cap} (max_connections {max}, {used} in use; ~{per_job} per job process)"
                ),
            );
            duts = cap as u16;
        }
        pg = Some((admin, name.clone(), database_url(&args.postgres_url, &name)));
    }
    let result = measure(
        &args,
        duts,
        pg.as_ref().map(|p| p.2.clone()),
        &bench,
        &metrics,
    )
    .await;
    if let Some((admin, name, _)) = pg
        && let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
    {
        eprintln!("DROP DATABASE {name}: {e}");
    }
    result
}

async fn measure(
    args: &Args,
    duts: u16,
    database_url: Option<String>,
    bench: &tokio::runtime::Handle,
    metrics: &Render,
) -> Result<(), String> {
    let t_setup = std::time::Instant::now();
    let farm = Farm::start(Options {
        machines: duts,
        lease_ttl: 60,
        cancel_grace: 5.0,
        job_command: Some(vec![args.job_command.clone()]),
        executors: args.executors,
        executor_mode: if args.in_process {
            ExecutorMode::InProcess
        } else {
            ExecutorMode::this_binary()
        },
        database_url: database_url.clone(),
        off_delay: args.off_delay,
        sims: false,
        ..Default::default()
    })
    .await;
    let setup_s = t_setup.elapsed().as_secs_f64();
    eprintln!("farm of {duts} machines up in {setup_s:.1} s");
    let pdu_device = farm.device.clone();
    let stop = CancellationToken::new();
    let dut_stats = Arc::new(duts::DutStats::default());
    {
        let _g = bench.enter();
        duts::start(
            pdu_device,
            farm.machines
                .iter()
                .enumerate()
                .map(|(i, id)| ((i + 1).to_string(), *id))
                .collect(),
            format!("http://127.0.0.1:{}", farm.gw.ports.boot),
            farm.netconsole,
            Arc::new(duts::Script {
                lines: args.lines,
                line_ms: args.line_ms,
            }),
            dut_stats.clone(),
            stop.clone(),
        );
    }
    let executor_pids: Vec<u32> = farm.executors.iter().filter_map(|e| e.pid()).collect();
    let exec_urls: Vec<String> = farm.executors.iter().map(|e| e.url.clone()).collect();

    // The queue as the executors see it.
    let store = Store::new(
        Db::open_for_service(
            "executor",
            &farm.exec_gw,
            dutgate_executor::store::MIGRATIONS,
        )
        .await
        .map_err(|e| format!("the executor's database: {e}"))?,
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = procfs::mem_now();
    let idle_exec_kib: Vec<u64> = executor_pids
        .iter()
        .filter_map(|p| procfs::rss_kib(*p))
        .collect();

    // PostgreSQL connections to the farm's database, sampled: before any job (`pg_idle`)
    // and at their peak.
    let pg_peak = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let pg_idle = Arc::new(std::sync::atomic::AtomicI64::new(-1));
    if let Some(url) = &database_url {
        let (pg_peak, pg_idle, stop, url) =
            (pg_peak.clone(), pg_idle.clone(), stop.clone(), url.clone());
        let db = url
            .rsplit('/')
            .next()
            .and_then(|s| s.split('?').next())
            .unwrap_or_default()
            .to_string();
        bench.spawn(async move {
            let Ok(pool) = pg_admin(&url).await else {
                return;
            };
            while !stop.is_cancelled() {
                if let Ok(n) =
                    sqlx::query("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                        .bind(db.clone())
                        .fetch_one(&pool)
                        .await
                        .and_then(|r| r.try_get::<i64, _>(0))
                {
                    let _ = pg_idle.compare_exchange(-1, n, Ordering::Relaxed, Ordering::Relaxed);
                    pg_peak.fetch_max(n, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            pool.close().await;
        });
    }

    // The first sample (before any job) is the baseline.
    for _ in 0..100 {
        if database_url.is_none() || pg_idle.load(Ordering::Relaxed) >= 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Submitter: keeps `depth` jobs queued, alternating between the executors' APIs.
    let depth = (i64::from(duts) / 3).max(4);
    let submitted: Arc<Mutex<HashMap<i64, i64>>> = Arc::default();
    let queue_samples: Arc<Mutex<Vec<(i64, i64)>>> = Arc::default();
    let submit_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let submitting = CancellationToken::new();
    let submitter = {
        let (store, submitted, queue_samples, submitting, http, errors) = (
            store.clone(),
            submitted.clone(),
            queue_samples.clone(),
            submitting.clone(),
            farm.http.clone(),
            submit_errors.clone(),
        );
        bench.spawn(async move {
            let mut turn = 0usize;
            while !submitting.is_cancelled() {
                let queued = store.queued_count().await.unwrap_or(depth);
                queue_samples
                    .lock()
                    .expect("samples")
                    .push((now_ms(), queued));
                let mut set = tokio::task::JoinSet::new();
                for _ in queued..depth {
                    let url = format!("{}/api/v1/jobs", exec_urls[turn % exec_urls.len()]);
                    turn += 1;
                    let http = http.clone();
                    set.spawn(async move {
                        let at = now_ms();
                        let r = http
                            .post(url)
                            .bearer_auth(USER)
                            .header("content-type", "application/x-yaml")
                            .body(FARM_JOB)
                            .send()
                            .await
                            .map_err(|e| e.to_string())?;
                        if r.status() != 201 {
                            return Err(format!("submission refused: {}", r.status()));
                        }
                        let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
                        v["id"]
                            .as_i64()
                            .map(|id| (id, at))
                            .ok_or_else(|| "no job id".to_string())
                    });
                }
                while let Some(r) = set.join_next().await {
                    match r {
                        Ok(Ok((id, at))) => {
                            submitted.lock().expect("submitted").insert(id, at);
                        }
                        Ok(Err(e)) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("submit: {e}");
                            }
                        }
                        Err(_) => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Warm-up, then the window.
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let t0 = now_ms();
    let cpu0 = procfs::cpu_now(&executor_pids);
    let salad0 = counter_sum(&(metrics)(), "dutgate_salad_machine_bytes_from_dut_total");
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let executor_pids = executor_pids.clone();
        std::thread::Builder::new()
            .name("bench-sampler".into())
            .spawn(move || {
                let (mut peak_process_kib, mut peak_count) = (0u64, 0usize);
                let mut peak_children_kib = 0u64;
                let mut peak_exec_kib: Vec<u64> = vec![0; executor_pids.len()];
                let mut per_job: Vec<f64> = Vec::new();
                while sampling.load(Ordering::Relaxed) {
                    let m = procfs::mem_now();
                    let job_kib: Vec<u64> = m
                        .children
                        .iter()
                        .filter(|(pid, _)| !executor_pids.contains(pid))
                        .map(|(_, k)| *k)
                        .collect();
                    per_job.extend(job_kib.iter().map(|k| *k as f64));
                    let sum: u64 = job_kib.iter().sum();
                    if sum > peak_children_kib {
                        peak_children_kib = sum;
                    }
                    for (i, pid) in executor_pids.iter().enumerate() {
                        if let Some(k) = procfs::rss_kib(*pid) {
                            peak_exec_kib[i] = peak_exec_kib[i].max(k);
                        }
                    }
                    peak_process_kib = peak_process_kib.max(m.process_kib);
                    peak_count = peak_count.max(job_kib.len());
                    std::thread::sleep(Duration::from_millis(500));
                }
                (
                    peak_process_kib,
                    peak_count,
                    peak_children_kib,
                    peak_exec_kib,
                    per_job,
                )
            })
            .map_err(|e| e.to_string())?
    };
    let dut_bytes0 = dut_stats.bytes.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let t1 = now_ms();
    let cpu1 = procfs::cpu_now(&executor_pids);
    let salad1 = counter_sum(&(metrics)(), "dutgate_salad_machine_bytes_from_dut_total");
    let dut_bytes1 = dut_stats.bytes.load(Ordering::Relaxed);
    submitting.cancel();
    let _ = submitter.await;
    sampling.store(false, Ordering::Relaxed);
    let (peak_process_kib, peak_count, peak_jobs_kib, peak_exec_kib, per_job_kib) =
        sampler.join().map_err(|_| "the sampler panicked")?;
    let load_end = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();

    // Drain: every job submitted runs to its end.
    let t_drain = std::time::Instant::now();
    loop {
        let active: i64 = sqlx::query("SELECT COUNT(*) FROM jobs WHERE state <> 'FINISHED'")
            .fetch_one(store.db().pool())
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| format!("counting active jobs: {e}"))?;
        if active == 0 {
            break;
        }
        if t_drain.elapsed() > Duration::from_secs(180) {
            return Err(format!(
                "{active} jobs still not finished 180 s after the window"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_s = t_drain.elapsed().as_secs_f64();
    stop.cancel();

    // ---- analysis --------------------------------------------------------------------
    let jobs = timelines(&store, &farm.mars).await?;
    let submitted = submitted.lock().expect("submitted").clone();
    let window_ms = (t1 - t0) as f64;
    let window_h = window_ms / 3_600_000.0;
    let off_ms = (args.off_delay * 1000.0).round() as i64;
    let machines = f64::from(duts);

    let mut busy = 0i64;
    let mut off = 0i64;
    let mut console = 0i64;
    let mut finished_in_window = 0usize;
    let mut not_pass: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_executor: BTreeMap<String, usize> = BTreeMap::new();
    let mut submit_to_on = Vec::new();
    let mut queue_wait = Vec::new();
    let mut dispatch_to_on = Vec::new();
    let (mut s_proc, mut s_setup, mut s_power, mut s_console, mut s_teardown, mut s_total) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut twice = 0usize;
    let mut by_machine: BTreeMap<&str, Vec<(i64, i64, i64)>> = BTreeMap::new();
    let mut outside_lease = 0usize;
    let mut first_reason: Option<String> = None;
    for (id, t) in &jobs {
        let Some(d) = t.dispatched else { continue };
        let Some((acquired, released)) = t.lease else {
            eprintln!("job {id} has no lease in mars' record: {t:?}");
            outside_lease += 1;
            continue;
        };
        let end = released.unwrap_or(t1);
        busy += overlap(acquired, end, t0, t1);
        // The job acted on the machine only while it held the lease.
        if t.setup.is_some_and(|p| p < acquired) || t.last_action.is_some_and(|l| l > end) {
            eprintln!("job {id} acted on its machine outside its lease: {t:?}");
            outside_lease += 1;
        }
        if let Some(p) = t.power {
            off += overlap(p, p + off_ms, t0, t1);
        }
        if let (Some(on), Some(td)) = (t.running, t.teardown) {
            console += overlap(on, td, t0, t1);
        }
        if t.process_started_events > 1 || t.dispatched_events > 1 || t.boots > 1 {
            twice += 1;
            eprintln!("job {id} ran more than once: {t:?}");
        }
        by_machine
            .entry(t.machine.as_str())
            .or_default()
            .push((acquired, end, *id));
        if let Some(f) = t.finished
            && f >= t0
            && f < t1
        {
            finished_in_window += 1;
            *per_executor.entry(t.executor.clone()).or_default() += 1;
            if t.status != "PASS" {
                *not_pass.entry(t.status.clone()).or_default() += 1;
                if not_pass.values().sum::<usize>() <= 5 {
                    eprintln!("job {id}: {} ({})", t.status, t.reason);
                }
                first_reason.get_or_insert_with(|| format!("{}: {}", t.status, t.reason));
            }
        }
        // Latencies of the jobs submitted in the window.
        let Some(&posted) = submitted.get(id) else {
            continue;
        };
        if posted < t0 || posted >= t1 {
            continue;
        }
        if let Some(on) = t.running {
            submit_to_on.push((on - posted) as f64);
            dispatch_to_on.push((on - d) as f64);
        }
        queue_wait.push((d - t.submitted) as f64);
        if let (Some(ps), Some(pw), Some(on), Some(td), Some(rel)) =
            (t.setup, t.power, t.running, t.teardown, t.released)
        {
            s_proc.push((ps - d) as f64);
            s_setup.push((pw - ps) as f64);
            s_power.push((on - pw) as f64);
            s_console.push((td - on) as f64);
            s_teardown.push((rel - td) as f64);
            s_total.push((rel - d) as f64);
        }
    }
    // No machine held two jobs at once: leases of a machine do not overlap, and the next
    // job's process starts after the previous one's last action on it. Idle gaps between
    // leases.
    let mut overlaps = outside_lease;
    let mut gaps = Vec::new();
    for (m, v) in by_machine.iter_mut() {
        v.sort();
        for w in v.windows(2) {
            let ((_, end_a, a), (start_b, _, b)) = (w[0], w[1]);
            let last_a = jobs[&a].last_action.unwrap_or(end_a);
            let first_b = jobs[&b].setup.unwrap_or(start_b);
            if start_b < end_a || first_b < last_a {
                overlaps += 1;
                eprintln!(
                    "machine {m}: job {b} (lease {start_b}, process {first_b}) overlaps job {a} \
                     (last action {last_a}, released {end_a})"
                );
            } else if start_b >= t0 && start_b < t1 {
                gaps.push((start_b - end_a) as f64);
            }
        }
    }
    let queue_samples = queue_samples.lock().expect("samples").clone();
    let in_window: Vec<i64> = queue_samples
        .iter()
        .filter(|(t, _)| *t >= t0 && *t < t1)
        .map(|(_, q)| *q)
        .collect();
    let nonempty = in_window.iter().filter(|q| **q > 0).count();
    let cpu_s = cpu1.gateway() - cpu0.gateway();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let jobs_cpu = cpu1.jobs - cpu0.jobs;
    let exec_cpu = cpu1.executors - cpu0.executors;
    let services_cpu = (cpu1.process - cpu1.bench_threads) - (cpu0.process - cpu0.bench_threads);
    let bench_cpu = cpu1.bench_threads - cpu0.bench_threads;
    let util = busy as f64 / (machines * window_ms) * 100.0;
    let off_share = off as f64 / (machines * window_ms) * 100.0;
    let console_share = console as f64 / (machines * window_ms) * 100.0;
    let mib = |kib: u64| kib as f64 / 1024.0;

    let store_name = match args.backend.as_str() {
        "postgres" => "PostgreSQL",
        _ => "SQLite",
    };
    row(
        "farm",
        format!(
            "{duts} DUTs, {} executor(s) on {store_name}, {} s window after {} s warm-up",
            args.executors, args.seconds, args.warmup
        ),
    );
    row(
        "job",
        format!(
            "{} console lines ({} ms apart, ~{:.1} KB), off delay {:.2} s",
            args.lines,
            args.line_ms,
            (f64::from(args.lines) * 80.0 + 60.0) / 1000.0,
            args.off_delay
        ),
    );
    row(
        "jobs/hour (finished in the window)",
        format!(
            "{:.0} ({finished_in_window} jobs)",
            finished_in_window as f64 / window_h
        ),
    );
    row(
        "jobs not PASS",
        if not_pass.is_empty() {
            "0".to_string()
        } else {
            format!(
                "{not_pass:?}; the first: {}",
                first_reason.as_deref().unwrap_or("?").replace('|', "/")
            )
        },
    );
    row(
        "queue non-empty (share of samples)",
        format!(
            "{:.1} % of {} (target depth {depth})",
            nonempty as f64 / in_window.len().max(1) as f64 * 100.0,
            in_window.len()
        ),
    );
    row(
        "utilisation: lease held (goal ≥ 99 %)",
        format!("{util:.1} %"),
    );
    row(
        "of which off delay (goal: lease held − off delay ≥ 99 % − off delay)",
        format!("{off_share:.1} % → {:.1} % without it", util - off_share),
    );
    row(
        "DUT powered and on the job's console (power-on → session end)",
        format!("{console_share:.1} %"),
    );
    row("submit → power-on p50 / p99 (ms)", p50_p99(&submit_to_on));
    row(
        "  queue wait (submitted → dispatched) p50 / p99 (ms)",
        p50_p99(&queue_wait),
    );
    row(
        "  dispatch → power-on p50 / p99 (ms)",
        p50_p99(&dispatch_to_on),
    );
    row(
        "job, median ms: dispatch → process up · setup · power cycle · console · teardown = lease",
        format!(
            "{:.0} · {:.0} · {:.0} · {:.0} · {:.0} = {:.0}",
            pct(&s_proc, 0.5),
            pct(&s_setup, 0.5),
            pct(&s_power, 0.5),
            pct(&s_console, 0.5),
            pct(&s_teardown, 0.5),
            pct(&s_total, 0.5)
        ),
    );
    row(
        "job, p99 ms: dispatch → process up · setup · power cycle · console · teardown = lease",
        format!(
            "{:.0} · {:.0} · {:.0} · {:.0} · {:.0} = {:.0}",
            pct(&s_proc, 0.99),
            pct(&s_setup, 0.99),
            pct(&s_power, 0.99),
            pct(&s_console, 0.99),
            pct(&s_teardown, 0.99),
            pct(&s_total, 0.99)
        ),
    );
    row("machine idle between leases p50 / p99 (ms)", p50_p99(&gaps));
    row(
        "gateway CPU in the window (s; share of all cores)",
        format!(
            "{cpu_s:.1} ({:.0} % of {cores:.0} cores) = services {services_cpu:.1} + executor \
             processes {exec_cpu:.1} + job processes {jobs_cpu:.1} ({:.0} ms per job); \
             simulated DUTs and benchmark {bench_cpu:.1}",
            cpu_s / (window_ms / 1000.0 * cores) * 100.0,
            jobs_cpu * 1000.0 / finished_in_window.max(1) as f64
        ),
    );
    row(
        "RSS idle: services + DUTs (one process) / executor process(es) (MiB)",
        format!(
            "{:.0} / {}",
            mib(idle.process_kib),
            if idle_exec_kib.is_empty() {
                "in the same process".to_string()
            } else {
                idle_exec_kib
                    .iter()
                    .map(|k| format!("{:.0}", mib(*k)))
                    .collect::<Vec<_>>()
                    .join(" + ")
            }
        ),
    );
    row(
        "RSS peak under load: services + DUTs / executor(s) (MiB)",
        format!(
            "{:.0} (VmHWM {:.0}) / {}",
            mib(peak_process_kib),
            mib(procfs::process_peak_kib()),
            if peak_exec_kib.is_empty() {
                "in the same process".to_string()
            } else {
                peak_exec_kib
                    .iter()
                    .map(|k| format!("{:.0}", mib(*k)))
                    .collect::<Vec<_>>()
                    .join(" + ")
            }
        ),
    );
    row(
        "job processes: peak count, peak total RSS (MiB), median RSS each (MiB)",
        format!(
            "{}, {:.0}, {:.1}",
            peak_count,
            mib(peak_jobs_kib),
            pct(&per_job_kib, 0.5) / 1024.0
        ),
    );
    row(
        "console bytes relayed by salad in the window",
        format!(
            "{:.2} MB ({:.0} KB/s; DUTs wrote {:.2} MB)",
            (salad1 - salad0) / 1e6,
            (salad1 - salad0) / window_ms,
            (dut_bytes1 - dut_bytes0) as f64 / 1e6
        ),
    );
    if database_url.is_some() {
        row(
            "PostgreSQL connections: before the jobs, peak (per job process)",
            format!(
                "{}, {} ({:.1})",
                pg_idle.load(Ordering::Relaxed),
                pg_peak.load(Ordering::Relaxed),
                (pg_peak.load(Ordering::Relaxed) - pg_idle.load(Ordering::Relaxed)) as f64
                    / peak_count.max(1) as f64
            ),
        );
    }
    if args.executors > 1 {
        row(
            "jobs per executor (window)",
            per_executor
                .iter()
                .map(|(e, n)| format!("{e}: {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    row(
        "jobs run twice / machines with two jobs at once",
        format!("{twice} / {overlaps} (of {} jobs)", jobs.len()),
    );
    row(
        "set-up, drain (s); submission errors; load average at the end",
        format!(
            "{setup_s:.1}, {drain_s:.1}; {}; {load_end}",
            submit_errors.load(Ordering::Relaxed)
        ),
    );
    farm.stop().await;
    if twice > 0 || overlaps > 0 {
        return Err(format!(
            "{twice} job(s) ran more than once, {overlaps} lease overlap(s) on a machine"
        ));
    }
    if finished_in_window == 0 || not_pass.values().sum::<usize>() == finished_in_window {
        return Err("no job passed in the window".into());
    }
    Ok(())
}
