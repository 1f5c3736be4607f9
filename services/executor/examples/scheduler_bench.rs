//! The scheduler benchmark behind `cargo xtask bench scheduler`.
//!
//! N machines on dummy PDUs (no consoles) in a real mars and a real pdu service, the executor
//! with its REST API, queue and scheduler; jobs run inline (power on through the pdu service,
//! power off, finish, release the lease) instead of in a process each, so the figures are the
//! gateway's dispatch path, not process start-up.
//!
//! 0. **Floor**: one write transaction (`UPDATE` of one row, commit) on the executor's
//!    database, 500 times in a row on the idle gateway: what one dispatch would cost if it
//!    were a single transaction and nothing else.
//! 1. Idle gateway: jobs submitted one at a time; **submit → power-on** is measured from the
//!    client's POST to the pdu service's read-back of ON (off delay 0).
//! 2. Saturated gateway: a third of the jobs queued at once, each job releasing its machine
//!    right after power-off: **jobs/s** is the gateway's ceiling; a freed machine then waits
//!    its turn (Little's law: machines ÷ jobs/s), reported as *freed → next launched*.
//! 3. Loaded gateway: the rest of the jobs queued at once, each holding its machine for a
//!    while (0.5–1.5 × a mean chosen so that the offered load is `--load` × the ceiling
//!    measured in 2). **Dispatch latency** is the time the gateway takes from "a job is
//!    dispatchable" — it is queued and a matching machine is free — to "job launched". Jobs of
//!    a group are interchangeable on that group's machines and dispatched FIFO, so the k-th
//!    job of a group (by id) is dispatchable at the later of its submission and the k-th
//!    instant a machine of the group became free (phase start, or a release request being
//!    *sent*: an upper bound, mars' commit comes later). Only jobs that waited for a machine
//!    count (not the first wave, which waits for its own submission).
//!
//! Usage: `scheduler_bench [--backend sqlite|postgres] [--postgres-url URL] [--machines N]
//! [--jobs M] [--load F]`; prints one JSON line and one `RESULT key=value …` line.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dutgate_core::auth::Auth;
use dutgate_core::config::GatewayConfig;
use dutgate_core::db::{Db, Migrations};
use dutgate_core::{JobStatus, MachineId, Secret};
use dutgate_executor::store::Store;
use dutgate_executor::supervisor::InlineRunner;
use dutgate_executor::{Config, Executor};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{MachinePatch, Registration, ReleaseOutcome};
use dutgate_pdu::PduClient;
use dutgate_pdu_driver::Switch;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "bench-admin";
const USER: &str = "bench-user";
const PORTS_PER_PDU: u32 = 64;

#[derive(Default)]
struct Log {
    /// job → instant its launch began.
    launched: HashMap<i64, (MachineId, Instant)>,
    /// job → instant the pdu read back ON.
    powered: HashMap<i64, Instant>,
    /// machine → release instants (response received), in order.
    released: HashMap<MachineId, Vec<Instant>>,
    /// (machine, instant the release request was sent), in order.
    release_sent: Vec<(MachineId, Instant)>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn pct(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i.min(samples.len() - 1)]
}

async fn open(backend: &str, pg: &str, name: &str, dir: &std::path::Path, m: Migrations) -> Db {
    match backend {
        "postgres" => {
            let schema = format!("bench_{name}_{}", std::process::id());
            Db::open_postgres(pg, &schema, m).await.expect("PostgreSQL")
        }
        _ => Db::open_sqlite(&dir.join(format!("{name}.db")), m)
            .await
            .expect("SQLite"),
    }
}

/// Upper bounds of the buckets holding the median and the 99th percentile of a Prometheus
/// histogram, and its count.
fn histogram_quantiles(text: &str, name: &str) -> (f64, f64, f64) {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let q = |p: f64| {
        buckets
            .iter()
            .find(|(_, c)| *c >= p * total)
            .map(|b| b.0)
            .unwrap_or(f64::NAN)
    };
    (q(0.5), q(0.99), total)
}

fn machine(n: u32) -> MachineId {
    let b = n.to_be_bytes();
    MachineId::from_bytes([0x52, 0x54, 0x00, b[1], b[2], b[3]])
}

fn port_of(n: u32) -> (String, String) {
    (
        format!("pdu{}", n / PORTS_PER_PDU),
        (n % PORTS_PER_PDU + 1).to_string(),
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let backend = arg("--backend", "sqlite");
    let pg = arg("--postgres-url", "postgres://postgres@127.0.0.1:5432/test");
    let machines: u32 = arg("--machines", "1000").parse().expect("--machines");
    let jobs: usize = arg("--jobs", "10000").parse().expect("--jobs");
    let load: f64 = arg("--load", "0.5").parse().expect("--load");
    let idle_samples: usize = 200.min(jobs);
    let load_start = loadavg();

    let tmp = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let auth = Auth::new(
        Some(Secret::new(ADMIN)),
        Some(Secret::new(USER)),
        dutgate_core::config::default_dut_networks(),
    );
    let (l_mars, l_pdu, l_exec) = (
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    );
    let mut gw = GatewayConfig {
        state_dir: tmp.path().to_path_buf(),
        internal_host: "127.0.0.1".into(),
        public_host: "127.0.0.1".into(),
        ..Default::default()
    };
    gw.ports.mars = l_mars.local_addr().expect("addr").port();
    gw.ports.pdu = l_pdu.local_addr().expect("addr").port();
    gw.ports.executor = l_exec.local_addr().expect("addr").port();
    gw.auth.admin_token = Some(Secret::new(ADMIN));
    gw.auth.user_token = Some(Secret::new(USER));
    let gw = Arc::new(gw);

    // pdu: dummy PDUs of 64 ports.
    let mut pdu_cfg = dutgate_pdu::Config {
        poll_interval_seconds: 5.0,
        readback_interval_ms: 10,
        verify_interval_ms: 10,
        ..Default::default()
    };
    let device_prefix = format!("sched-bench-{}", std::process::id());
    for p in 0..machines.div_ceil(PORTS_PER_PDU) {
        pdu_cfg.pdus.insert(
            format!("pdu{p}"),
            dutgate_pdu::PduSpec {
                driver: "dummy".into(),
                config: json!({"ports": PORTS_PER_PDU, "device": format!("{device_prefix}-{p}")}),
                reserved: vec![],
                labels: BTreeMap::new(),
                poll_interval_seconds: None,
            },
        );
    }
    let pdu_db = open(
        &backend,
        &pg,
        "pdu",
        tmp.path(),
        dutgate_pdu::store::MIGRATIONS,
    )
    .await;
    let pdu_running = dutgate_pdu::start_on(
        l_pdu,
        dutgate_pdu::store::Store::new(pdu_db.clone()),
        pdu_cfg,
        auth.clone(),
    )
    .await
    .expect("pdu");

    // mars, without a trainer: machines are admitted directly.
    let mars_db = open(
        &backend,
        &pg,
        "mars",
        tmp.path(),
        dutgate_mars::store::MIGRATIONS,
    )
    .await;
    let mut mars_cfg = dutgate_mars::Config::default();
    mars_cfg.training.enabled = false;
    let mars = dutgate_mars::machines::Mars::new(
        dutgate_mars::store::Store::new(mars_db.clone(), "bench"),
        mars_cfg,
        Arc::new(dutgate_mars::power::HttpPower::for_gateway(&gw, None)),
    );
    let router = dutgate_mars::start(mars.clone(), auth.clone(), shutdown.clone()).expect("mars");
    let app = dutgate_core::http::with_common_routes("mars", router, None);
    tokio::spawn(dutgate_core::http::serve(
        l_mars,
        app,
        shutdown.clone(),
        Duration::from_millis(100),
    ));
    let mars_url = format!("http://127.0.0.1:{}", gw.ports.mars);
    let admin = MarsClient::new(&mars_url, Some(Secret::new(ADMIN)));
    let anon = MarsClient::new(&mars_url, None);
    let t_reg = Instant::now();
    for n in 0..machines {
        let id = machine(n);
        anon.register(&Registration {
            base_name: "bench".into(),
            tags: vec![format!("bench:group:{}", n % 4).parse().expect("tag")],
            mac_address: id,
            ip_address: "10.0.2.15".parse().expect("ip"),
            local_tty_device: None,
        })
        .await
        .expect("register");
        let (pdu, port) = port_of(n);
        admin
            .patch(
                id,
                &MachinePatch {
                    pdu: Some(Some(pdu)),
                    pdu_port_id: Some(Some(port)),
                    pdu_off_delay: Some(0.0),
                    ..Default::default()
                },
            )
            .await
            .expect("patch");
        mars.store
            .trigger(
                id,
                dutgate_mars::state::Trigger::TrainingPassed,
                &dutgate_mars::store::Cause::new("bench", "admitted"),
                &|_| {},
            )
            .await
            .expect("admit");
    }
    eprintln!(
        "{machines} machines registered in {:.1} s",
        t_reg.elapsed().as_secs_f64()
    );

    // The executor with the inline runner.
    let exec_db = open(
        &backend,
        &pg,
        "executor",
        tmp.path(),
        dutgate_executor::store::MIGRATIONS,
    )
    .await;
    let store = Store::new(exec_db.clone());
    let log = Arc::new(Mutex::new(Log::default()));
    let done = Arc::new(AtomicUsize::new(0));
    let done_notify = Arc::new(Notify::new());
    let pdu = PduClient::new(
        format!("http://127.0.0.1:{}", gw.ports.pdu),
        Some(Secret::new(ADMIN)),
    );
    let index: Arc<HashMap<MachineId, u32>> =
        Arc::new((0..machines).map(|n| (machine(n), n)).collect());
    let groups = index.clone();
    // Mean time a job holds its machine after power-on (phase 3), ms; 0 in phases 1 and 2.
    let hold_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let inline: InlineRunner = {
        let (log, done, done_notify, store, admin, hold_ms) = (
            log.clone(),
            done.clone(),
            done_notify.clone(),
            store.clone(),
            admin.clone(),
            hold_ms.clone(),
        );
        Arc::new(move |id, m, lease| {
            let (log, done, done_notify, store, admin, pdu, index) = (
                log.clone(),
                done.clone(),
                done_notify.clone(),
                store.clone(),
                admin.clone(),
                pdu.clone(),
                index.clone(),
            );
            // 0.5–1.5 × the mean, spread by a hash of the job id (reproducible).
            let spread = (id as u64).wrapping_mul(2_654_435_761) % 1000;
            let hold = hold_ms.load(Ordering::SeqCst) * (500 + spread) / 1000;
            Box::pin(async move {
                let t = Instant::now();
                log.lock().expect("log").launched.insert(id, (m, t));
                let (p, port) = port_of(index[&m]);
                pdu.set(&p, &port, Switch::On).await.expect("power on");
                log.lock().expect("log").powered.insert(id, Instant::now());
                if hold > 0 {
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                }
                pdu.set(&p, &port, Switch::Off).await.expect("power off");
                store
                    .finish(id, JobStatus::Pass, "benchmark job")
                    .await
                    .expect("finish");
                log.lock()
                    .expect("log")
                    .release_sent
                    .push((m, Instant::now()));
                admin
                    .release(&lease, ReleaseOutcome::Ok, None)
                    .await
                    .expect("release");
                log.lock()
                    .expect("log")
                    .released
                    .entry(m)
                    .or_default()
                    .push(Instant::now());
                done.fetch_add(1, Ordering::SeqCst);
                done_notify.notify_one();
            })
        })
    };
    let cfg = Config {
        artifacts_retention_days: 0.0,
        ..Default::default()
    };
    let exec = Executor::start_with(
        gw.clone(),
        cfg,
        store.clone(),
        auth.clone(),
        shutdown.clone(),
        Some(inline),
    )
    .await
    .expect("executor");
    let app = dutgate_core::http::with_common_routes("executor", exec.router(), None);
    tokio::spawn(dutgate_core::http::serve(
        l_exec,
        app,
        shutdown.clone(),
        Duration::from_millis(100),
    ));
    let url = format!("http://127.0.0.1:{}/api/v1/jobs", gw.ports.executor);
    let http = reqwest::Client::new();
    // Give the executor's machine cache time to load.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Four kinds of jobs, one per machine group, so that every machine works.
    let texts: Arc<Vec<String>> = Arc::new(
        (0..4)
            .map(|g| {
                format!(
                    "version: 1\ntarget: {{tags: [\"bench:group:{g}\"]}}\ndeployment:\n  start:\n    kernel: {{url: \"http://gw/k\", cmdline: \"x\"}}\n"
                )
            })
            .collect(),
    );
    let counter = Arc::new(AtomicUsize::new(0));
    let submit = |http: reqwest::Client, url: String| {
        let job = texts[counter.fetch_add(1, Ordering::SeqCst) % 4].clone();
        async move {
            let r = http
                .post(url)
                .bearer_auth(USER)
                .header("content-type", "application/x-yaml")
                .body(job)
                .send()
                .await
                .expect("submit");
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
            r.json::<serde_json::Value>().await.expect("json")["id"]
                .as_i64()
                .expect("id")
        }
    };

    // 0. The floor: one write transaction on the executor's database.
    let mut floor_ms = Vec::new();
    {
        let pool = exec_db.pool();
        sqlx::query("CREATE TABLE bench_floor (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")
            .execute(pool)
            .await
            .expect("floor table");
        sqlx::query("INSERT INTO bench_floor (id, v) VALUES (1, 0)")
            .execute(pool)
            .await
            .expect("floor row");
        for _ in 0..500 {
            let t = Instant::now();
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query("UPDATE bench_floor SET v = v + 1 WHERE id = 1")
                .execute(&mut *tx)
                .await
                .expect("update");
            tx.commit().await.expect("commit");
            floor_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }

    // 1. Idle gateway: one job at a time.
    let mut to_power = Vec::new();
    for _ in 0..idle_samples {
        let before = done.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let id = submit(http.clone(), url.clone()).await;
        while done.load(Ordering::SeqCst) == before {
            done_notify.notified().await;
        }
        let on = log.lock().expect("log").powered[&id];
        to_power.push(on.duration_since(t0).as_secs_f64() * 1000.0);
    }

    // Submits `n` jobs, 16 in flight; returns (id, instant its POST returned) in id order.
    let submit_many = |n: usize| {
        let (http, url) = (http.clone(), url.clone());
        let submit = &submit;
        async move {
            let mut out = Vec::with_capacity(n);
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                if set.len() >= 16
                    && let Some(r) = set.join_next().await
                {
                    out.push(r.expect("join"));
                }
                let f = submit(http.clone(), url.clone());
                set.spawn(async move { (f.await, Instant::now()) });
            }
            while let Some(r) = set.join_next().await {
                out.push(r.expect("join"));
            }
            out.sort_by_key(|(id, _)| *id);
            out
        }
    };
    let wait_done = |target: usize| {
        let (done, done_notify) = (done.clone(), done_notify.clone());
        async move {
            while done.load(Ordering::SeqCst) < target {
                let _ = tokio::time::timeout(Duration::from_secs(1), done_notify.notified()).await;
            }
        }
    };

    // 2. Saturated gateway: a third of the rest queued at once, no hold.
    let saturated = (jobs - idle_samples) / 3;
    let start_done = done.load(Ordering::SeqCst);
    let t_submit = Instant::now();
    let sat_jobs = submit_many(saturated).await;
    let submit_secs = t_submit.elapsed().as_secs_f64();
    wait_done(start_done + saturated).await;
    let sat_secs = t_submit.elapsed().as_secs_f64();
    let max_jobs_per_s = saturated as f64 / sat_secs;
    let ids: Vec<i64> = sat_jobs.iter().map(|(id, _)| *id).collect();

    // Freed → next launched on the same machine, saturated: queueing, not dispatch work.
    let mut freed_to_next = Vec::new();
    {
        let log = log.lock().expect("log");
        for id in &ids {
            let (m, launched) = log.launched[id];
            if let Some(prev) = log
                .released
                .get(&m)
                .and_then(|rels| rels.iter().filter(|r| **r <= launched).max().copied())
                && prev >= t_submit
            {
                freed_to_next.push(launched.duration_since(prev).as_secs_f64() * 1000.0);
            }
        }
    }
    // How long the inline job itself took (power on, off, finish, release): not the gateway's
    // dispatch, but the load the dispatcher shares the machine with.
    let mut job_ms: Vec<f64> = {
        let log = log.lock().expect("log");
        ids.iter()
            .filter_map(|id| {
                let (m, l) = log.launched[id];
                log.released
                    .get(&m)?
                    .iter()
                    .filter(|r| **r >= l)
                    .min()
                    .map(|r| r.duration_since(l).as_secs_f64() * 1000.0)
            })
            .collect()
    };

    // 3. Loaded gateway: the offered load is `load` × the ceiling. A machine cycles in
    // hold + job time, so machines ÷ (hold + job) = load × ceiling.
    let job_p50_ms = pct(&mut job_ms.clone(), 0.5);
    let offered = load * max_jobs_per_s;
    let hold = ((machines as f64 / offered) * 1000.0 - job_p50_ms).max(0.0);
    hold_ms.store(hold as u64, Ordering::SeqCst);
    let loaded = jobs - idle_samples - saturated;
    let start_done = done.load(Ordering::SeqCst);
    let t3 = Instant::now();
    let load_jobs = submit_many(loaded).await;
    wait_done(start_done + loaded).await;
    let loaded_secs = t3.elapsed().as_secs_f64();
    let load_end = loadavg();
    let mut dispatch = Vec::new();
    let mut first_wave = 0usize;
    {
        let log = log.lock().expect("log");
        let group = |m: &MachineId| groups[m] % 4;
        // Instants a machine of each group became free: phase start, then each release.
        let mut slots: Vec<Vec<Instant>> = vec![Vec::new(); 4];
        for n in 0..machines {
            slots[(n % 4) as usize].push(t3);
        }
        for (m, at) in &log.release_sent {
            if *at >= t3 {
                slots[group(m) as usize].push(*at);
            }
        }
        for s in &mut slots {
            s.sort();
        }
        let mut next = [0usize; 4];
        for (id, queued_at) in &load_jobs {
            let (m, launched) = log.launched[id];
            let g = group(&m) as usize;
            let slot = slots[g][next[g]];
            next[g] += 1;
            if slot <= *queued_at {
                // A machine was free before the job was queued: it waited for its own
                // submission, not for a machine.
                first_wave += 1;
                continue;
            }
            dispatch.push(launched.saturating_duration_since(slot).as_secs_f64() * 1000.0);
        }
    }

    // The batch dispatch itself (claim + lease + commit), from the executor's own histograms.
    let metrics = http
        .get(format!("http://127.0.0.1:{}/metrics", gw.ports.executor))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics");
    let (dispatch_txn_p50, dispatch_txn_p99, dispatch_txn_n) =
        histogram_quantiles(&metrics, "executor_dispatch_seconds");
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    // Mean of a histogram series (its _sum over its _count), in ms.
    let mean_ms = |series: &str| -> f64 {
        let (name, labels) = series.split_once('{').map_or((series, ""), |(n, l)| (n, l));
        let get = |suffix: &str| -> f64 {
            let key = if labels.is_empty() {
                format!("{name}{suffix} ")
            } else {
                format!("{name}{suffix}{{{labels} ")
            };
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(key.as_str())?.trim().parse().ok())
                .unwrap_or(f64::NAN)
        };
        get("_sum") / get("_count") * 1000.0
    };
    let steps: serde_json::Map<String, serde_json::Value> = [
        "executor_mars_event_delay_seconds",
        "executor_dispatch_step_seconds{step=\"round\"}",
        "executor_dispatch_step_seconds{step=\"plan\"}",
        "executor_dispatch_step_seconds{step=\"claim\"}",
        "executor_dispatch_step_seconds{step=\"lease\"}",
        "executor_dispatch_step_seconds{step=\"commit\"}",
    ]
    .iter()
    .map(|s| (s.to_string(), json!(mean_ms(s))))
    .collect();
    eprintln!("mean ms per step: {}", json!(steps));
    let mean_batch =
        counter("executor_jobs_dispatched_total") / counter("executor_dispatch_batches_total");
    let f2 = |v: f64| format!("{v:.2}");
    let floor_p50 = pct(&mut floor_ms.clone(), 0.5);
    let dispatch_p50 = pct(&mut dispatch.clone(), 0.5);
    let result = json!({
        "backend": backend,
        "machines": machines,
        "jobs": jobs,
        "floor_txn_ms": {"p50": floor_p50, "p99": pct(&mut floor_ms, 0.99)},
        "submit_to_power_on_ms": {"p50": pct(&mut to_power.clone(), 0.5), "p99": pct(&mut to_power, 0.99)},
        "saturated": {
            "jobs": saturated,
            "jobs_per_s": max_jobs_per_s,
            "submit_per_s": saturated as f64 / submit_secs,
            "freed_to_next_launch_ms": {"p50": pct(&mut freed_to_next.clone(), 0.5), "p99": pct(&mut freed_to_next, 0.99)},
            "job_ms": {"p50": job_p50_ms, "p99": pct(&mut job_ms, 0.99)},
        },
        "loaded": {
            "jobs": loaded,
            "load": load,
            "offered_jobs_per_s": offered,
            "hold_ms_mean": hold,
            "jobs_per_s": loaded as f64 / loaded_secs,
            "dispatch_latency_ms": {"p50": dispatch_p50, "p99": pct(&mut dispatch.clone(), 0.99), "max": pct(&mut dispatch.clone(), 1.0), "n": dispatch.len()},
            "first_wave": first_wave,
        },
        "dispatch_txn_s_histogram": {"p50_le": dispatch_txn_p50, "p99_le": dispatch_txn_p99, "n": dispatch_txn_n},
        "mean_dispatch_batch": mean_batch,
        "mean_step_ms": steps,
        "loadavg": {"start": load_start, "end": load_end},
    });
    println!("{result}");
    // One plain line for `cargo xtask bench scheduler` (which has no JSON parser).
    println!(
        "RESULT backend={backend} machines={machines} jobs={jobs} floor_p50={} floor_p99={} \
         power_p50={} power_p99={} disp_p50={} disp_p99={} disp_n={} offered={:.0} hold_ms={:.0} \
         loaded_jps={:.0} max_jps={:.0} freed_p50={:.0} freed_p99={:.0} submit_ps={:.0} \
         ratio={:.1} load_start={load_start} load_end={load_end}",
        f2(floor_p50),
        f2(result["floor_txn_ms"]["p99"].as_f64().unwrap_or(f64::NAN)),
        f2(result["submit_to_power_on_ms"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN)),
        f2(result["submit_to_power_on_ms"]["p99"]
            .as_f64()
            .unwrap_or(f64::NAN)),
        f2(dispatch_p50),
        f2(result["loaded"]["dispatch_latency_ms"]["p99"]
            .as_f64()
            .unwrap_or(f64::NAN)),
        dispatch.len(),
        offered,
        hold,
        loaded as f64 / loaded_secs,
        max_jobs_per_s,
        result["saturated"]["freed_to_next_launch_ms"]["p50"]
            .as_f64()
            .unwrap_or(f64::NAN),
        result["saturated"]["freed_to_next_launch_ms"]["p99"]
            .as_f64()
            .unwrap_or(f64::NAN),
        saturated as f64 / submit_secs,
        dispatch_p50 / floor_p50,
    );
    shutdown.cancel();
    pdu_running.stop().await;
    if backend == "postgres" {
        for (db, name) in [(&exec_db, "executor"), (&mars_db, "mars"), (&pdu_db, "pdu")] {
            let schema = format!("bench_{name}_{}", std::process::id());
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE"
            )))
            .execute(db.pool())
            .await;
        }
    }
}
