//! The scheduler benchmark behind `cargo xtask bench scheduler`.
//!
//! N machines on dummy PDUs (no consoles) in a real mars and a real pdu service, the executor
//! with its REST API, queue and scheduler; jobs run inline (power on through the pdu service,
//! power off, finish, release the lease) instead of in a process each, so the figures are the
//! gateway's dispatch path, not process start-up. Each service runs on a runtime (threads) of
//! its own, as each is a process of its own on a gateway; the inline jobs and the load
//! generator run on the main runtime, niced as job processes are (see [`Runtimes`]). A job is
//! launched when the executor calls its runner.
//!
//! 0. **Floor**: one write transaction (`UPDATE` of one row, commit) on the executor's
//!    database, 500 times in a row on the idle gateway: what one dispatch would cost if it
//!    were a single transaction and nothing else.
//! 1. Idle gateway: jobs submitted one at a time; **submit → power-on** is measured from the
//!    client's POST to the pdu service's read-back of ON (off delay 0).
//! 2. Saturated gateway: a third of the jobs queued at once, each job releasing its machine
//!    right after power-off: **jobs/s** is the gateway's ceiling; a freed machine then waits
//!    its turn (Little's law: machines ÷ jobs/s), reported as *freed → next launched*.
//! 3. Loaded gateway, once per `--load` (fractions of the ceiling measured in 2, default 0.2
//!    and 0.5): the rest of the jobs, split between the loads, queued at once, each holding
//!    its machine for a while (0.5–1.5 × a mean chosen so that the offered load is that
//!    fraction of the ceiling). **Dispatch latency** is the time the gateway takes from "a job
//!    is dispatchable" — it is queued and a matching machine is free — to "job launched". Jobs
//!    of a group are interchangeable on that group's machines and dispatched FIFO, so the k-th
//!    job of a group (by id) is dispatchable at the later of its submission and the k-th
//!    instant a machine of the group became free: the phase start, then each release, taken
//!    (a) when mars announces the release's commit to its event subscribers — the machine is
//!    free from then on — and (b) when the release request was *sent*, an upper bound that
//!    also counts mars' handling of the release. Only jobs that waited for a machine count
//!    (not the first wave, which waits for its own submission).
//!
//! The goal (docs/jobs.md §3): a dispatch p99 under 50 ms at 200 machines on SQLite and on
//! PostgreSQL — real farms have 10–200 machines whose jobs last minutes.
//!
//! Usage: `scheduler_bench [--backend sqlite|postgres] [--postgres-url URL] [--machines N]
//! [--jobs M] [--load F[,F…]]` (defaults: sqlite, 200 machines, 2,000 jobs, loads 0.2 and
//! 0.5); `--help` prints this. Prints one JSON line and one `RESULT key=value …` line per
//! load.

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

/// job → instant the executor launched it. Apart from [`Log`]: written on the executor's
/// threads only, so that a launch never waits for a lock an inline job's (niced) thread holds.
type Launches = Arc<Mutex<HashMap<i64, (MachineId, Instant)>>>;

#[derive(Default)]
struct Log {
    /// job → instant the executor launched it (copied from [`Launches`] after each phase).
    launched: HashMap<i64, (MachineId, Instant)>,
    /// job → instant the pdu read back ON.
    powered: HashMap<i64, Instant>,
    /// machine → release instants (response received), in order.
    released: HashMap<MachineId, Vec<Instant>>,
    /// (machine, instant the release request was sent), in order.
    release_sent: Vec<(MachineId, Instant)>,
    /// Release round trips: (request sent, ms until the response), in order.
    release_ms: Vec<(Instant, f64)>,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The farm benchmark's /proc readers (only the per-process CPU time is used here).
#[path = "farm_bench/procfs.rs"]
#[allow(dead_code)]
mod procfs;

/// CPU time so far, in seconds: every core busy and in all (`/proc/stat`), this process, and
/// the PostgreSQL server's processes.
#[derive(Clone, Copy, Default)]
struct CpuSample {
    busy: f64,
    total: f64,
    own: f64,
    postgres: f64,
}

fn cpu_sample() -> CpuSample {
    let tps = procfs::ticks_per_second();
    let mut s = CpuSample::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/stat")
        && let Some(line) = stat.lines().next()
    {
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() == 8 {
            s.total = v.iter().sum::<f64>() / tps;
            s.busy = s.total - (v[3] + v[4]) / tps;
        }
    }
    s.own = procfs::stat_of("/proc/self/stat", tps).map_or(0.0, |t| t.1);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let path = e.path();
            if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "postgres")
                && let Some((_, cpu, _)) =
                    procfs::stat_of(&path.join("stat").to_string_lossy(), tps)
            {
                s.postgres += cpu;
            }
        }
    }
    s
}

/// Shares of both cores' time between two samples, in %: all busy, this process, PostgreSQL.
fn cpu_shares(a: CpuSample, b: CpuSample) -> serde_json::Value {
    let total = (b.total - a.total).max(1e-9);
    let share = |x: f64, y: f64| ((y - x).max(0.0) / total * 100.0).round();
    json!({
        "busy_pct": share(a.busy, b.busy),
        "gateway_pct": share(a.own, b.own),
        "postgres_pct": share(a.postgres, b.postgres),
    })
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
fn histogram_quantiles(text: &str, series: &str) -> (f64, f64, f64) {
    let prefix = match series.split_once('{') {
        Some((name, labels)) => format!("{name}_bucket{{{},le=\"", labels.trim_end_matches('}')),
        None => format!("{series}_bucket{{le=\""),
    };
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

/// Dispatch latencies (with the instant the job became dispatchable) of the phase-3 jobs that
/// waited for a machine, and how many did not
/// (the first wave). A group's jobs are interchangeable on its machines and dispatched FIFO, so
/// the k-th job of a group (by id) is dispatchable at the later of its submission and the k-th
/// instant a machine of the group was free: the phase start, then each instant of `freed`
/// (machine, instant) at or after it.
fn dispatch_latencies(
    log: &Log,
    jobs: &[(i64, Instant)],
    freed: &[(MachineId, Instant)],
    t3: Instant,
    machines: u32,
    groups: &HashMap<MachineId, u32>,
) -> (Vec<(Instant, f64)>, usize) {
    let group = |m: &MachineId| (groups[m] % 4) as usize;
    let mut slots: Vec<Vec<Instant>> = vec![Vec::new(); 4];
    for n in 0..machines {
        slots[(n % 4) as usize].push(t3);
    }
    for (m, at) in freed {
        if *at >= t3 {
            slots[group(m)].push(*at);
        }
    }
    for s in &mut slots {
        s.sort();
    }
    let mut next = [0usize; 4];
    let mut out = Vec::new();
    let mut first_wave = 0;
    for (id, queued_at) in jobs {
        let (m, launched) = log.launched[id];
        let g = group(&m);
        let Some(slot) = slots[g].get(next[g]).copied() else {
            continue;
        };
        next[g] += 1;
        if slot <= *queued_at {
            // A machine was free before the job was queued: it waited for its own
            // submission, not for a machine.
            first_wave += 1;
            continue;
        }
        out.push((
            slot,
            launched.saturating_duration_since(slot).as_secs_f64() * 1000.0,
        ));
    }
    (out, first_wave)
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

/// The runtimes the benchmark runs on. On a gateway each service is a process of its own
/// (gateway-image/systemd) and each job a process of its own, niced (`executor.job_nice`):
/// here each service gets a runtime (threads) of its own, and the inline jobs and the load
/// generator (CI clients, elsewhere on a real farm) share this process's main runtime, niced
/// like job processes.
struct Runtimes {
    pdu: tokio::runtime::Handle,
    mars: tokio::runtime::Handle,
    executor: tokio::runtime::Handle,
    /// Where the inline jobs run.
    jobs: tokio::runtime::Handle,
}

/// Runs `f` on `rt` and waits for it.
async fn on<F>(rt: &tokio::runtime::Handle, f: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    rt.spawn(f).await.expect("service start-up task")
}

/// Lowers the calling thread's priority (Linux: the nice value is per thread).
fn nice_this_thread(nice: i32) {
    // SAFETY: gettid and setpriority have no memory-safety preconditions.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

fn runtime(name: &str, nice: Option<i32>) -> tokio::runtime::Runtime {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name(format!("bench-{name}"));
    if let Some(n) = nice {
        b.on_thread_start(move || nice_this_thread(n));
    }
    b.build().expect("tokio runtime")
}

fn main() {
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "scheduler_bench [--backend sqlite|postgres] [--postgres-url URL] [--machines N] \
             [--jobs M] [--load F[,F...]]\n\
             defaults: --backend sqlite --postgres-url postgres://postgres@127.0.0.1:5432/test \
             --machines 200 --jobs 2000 --load 0.2,0.5"
        );
        return;
    }
    let nice = Config::default().job_nice;
    let (pdu, mars, executor) = (
        runtime("pdu", None),
        runtime("mars", None),
        runtime("executor", None),
    );
    nice_this_thread(nice);
    let main_rt = runtime("jobs", Some(nice));
    let rts = Runtimes {
        pdu: pdu.handle().clone(),
        mars: mars.handle().clone(),
        executor: executor.handle().clone(),
        jobs: main_rt.handle().clone(),
    };
    main_rt.block_on(bench(rts));
    for rt in [pdu, mars, executor, main_rt] {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}

async fn bench(rts: Runtimes) {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let backend = arg("--backend", "sqlite");
    let pg = arg("--postgres-url", "postgres://postgres@127.0.0.1:5432/test");
    let machines: u32 = arg("--machines", "200").parse().expect("--machines");
    let jobs: usize = arg("--jobs", "2000").parse().expect("--jobs");
    let loads: Vec<f64> = arg("--load", "0.2,0.5")
        .split(',')
        .map(|l| {
            l.trim()
                .parse()
                .expect("--load: fractions of the ceiling, comma-separated")
        })
        .collect();
    let idle_samples: usize = 200.min(jobs);
    let load_start = loadavg();

    let tmp = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let auth = Auth::new(
        Some(Secret::new(ADMIN)),
        Some(Secret::new(USER)),
        dutgate_core::config::default_dut_networks(),
    );
    // Bound here, taken over by each service's runtime.
    let bind = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        l
    };
    let (l_mars, l_pdu, l_exec) = (bind(), bind(), bind());
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
    let (pdu_db, pdu_running) = {
        let (backend, pg, dir, auth) = (
            backend.clone(),
            pg.clone(),
            tmp.path().to_path_buf(),
            auth.clone(),
        );
        on(&rts.pdu, async move {
            let db = open(&backend, &pg, "pdu", &dir, dutgate_pdu::store::MIGRATIONS).await;
            let l = TcpListener::from_std(l_pdu).expect("listener");
            let running =
                dutgate_pdu::start_on(l, dutgate_pdu::store::Store::new(db.clone()), pdu_cfg, auth)
                    .await
                    .expect("pdu");
            (db, running)
        })
        .await
    };

    // mars, without a trainer: machines are admitted directly.
    let (mars_db, mars) = {
        let (backend, pg, dir, auth, gw, shutdown) = (
            backend.clone(),
            pg.clone(),
            tmp.path().to_path_buf(),
            auth.clone(),
            gw.clone(),
            shutdown.clone(),
        );
        on(&rts.mars, async move {
            let db = open(&backend, &pg, "mars", &dir, dutgate_mars::store::MIGRATIONS).await;
            let mut mars_cfg = dutgate_mars::Config::default();
            mars_cfg.training.enabled = false;
            let mars = dutgate_mars::machines::Mars::new(
                dutgate_mars::store::Store::new(db.clone(), "bench"),
                mars_cfg,
                Arc::new(dutgate_mars::power::HttpPower::for_gateway(&gw, None)),
            );
            let router = dutgate_mars::start(mars.clone(), auth, shutdown.clone()).expect("mars");
            let app = dutgate_core::http::with_common_routes("mars", router, None);
            let l = TcpListener::from_std(l_mars).expect("listener");
            tokio::spawn(dutgate_core::http::serve(
                l,
                app,
                shutdown,
                Duration::from_millis(100),
            ));
            (db, mars)
        })
        .await
    };
    let mars_url = format!("http://127.0.0.1:{}", gw.ports.mars);
    let admin = MarsClient::new(&mars_url, Some(Secret::new(ADMIN)));
    let anon = MarsClient::new(&mars_url, None);
    // The instant mars announces each event (right after its commit): when a released machine
    // really is free, for the dispatch latency measured from the commit. Taken on a thread of
    // its own at normal priority, which wakes the moment mars announces, not when a runtime
    // busy with other tasks gets to it (a late instant would shorten the latencies).
    let announced: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    {
        let mut rx = mars.store.subscribe();
        let announced = announced.clone();
        let watcher = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("watcher runtime");
        std::thread::Builder::new()
            .name("bench-announced".into())
            .spawn(move || {
                watcher.block_on(async move {
                    while rx.changed().await.is_ok() {
                        let seq = *rx.borrow_and_update();
                        announced
                            .lock()
                            .expect("announced")
                            .push((seq, Instant::now()));
                    }
                });
            })
            .expect("watcher thread");
    }
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
    let exec_db = {
        let (backend, pg, dir) = (backend.clone(), pg.clone(), tmp.path().to_path_buf());
        on(&rts.executor, async move {
            open(
                &backend,
                &pg,
                "executor",
                &dir,
                dutgate_executor::store::MIGRATIONS,
            )
            .await
        })
        .await
    };
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
    let launches: Launches = Arc::default();
    // Brings `Log::launched` up to date once a phase is over.
    let sync_launched = || {
        let copy = launches.lock().expect("launches").clone();
        log.lock().expect("log").launched = copy;
    };
    let inline: InlineRunner = {
        let (log, done, done_notify, store, admin, hold_ms) = (
            log.clone(),
            done.clone(),
            done_notify.clone(),
            store.clone(),
            admin.clone(),
            hold_ms.clone(),
        );
        let (launches, jobs_rt) = (launches.clone(), rts.jobs.clone());
        Arc::new(move |id, m, lease| {
            // Called by the executor as it launches the job: the launch instant. The job's
            // work then runs where job processes would (see `Runtimes`).
            launches
                .lock()
                .expect("launches")
                .insert(id, (m, Instant::now()));
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
            let work = async move {
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
                let sent = Instant::now();
                log.lock().expect("log").release_sent.push((m, sent));
                admin
                    .release(&lease, ReleaseOutcome::Ok, None)
                    .await
                    .expect("release");
                let back = Instant::now();
                let mut log = log.lock().expect("log");
                log.released.entry(m).or_default().push(back);
                log.release_ms
                    .push((sent, back.duration_since(sent).as_secs_f64() * 1000.0));
                drop(log);
                done.fetch_add(1, Ordering::SeqCst);
                done_notify.notify_one();
            };
            let job = jobs_rt.spawn(work);
            Box::pin(async move {
                let _ = job.await;
            })
        })
    };
    let cfg = Config {
        artifacts_retention_days: 0.0,
        // Inline jobs do not heartbeat their lease: it must outlive the longest hold.
        lease_ttl_seconds: Some(3600),
        ..Default::default()
    };
    {
        let (gw, store, auth, shutdown) =
            (gw.clone(), store.clone(), auth.clone(), shutdown.clone());
        on(&rts.executor, async move {
            let exec = Executor::start_with(gw, cfg, store, auth, shutdown.clone(), Some(inline))
                .await
                .expect("executor");
            let app = dutgate_core::http::with_common_routes("executor", exec.router(), None);
            let l = TcpListener::from_std(l_exec).expect("listener");
            tokio::spawn(dutgate_core::http::serve(
                l,
                app,
                shutdown,
                Duration::from_millis(100),
            ));
        })
        .await;
    }
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
    // Waits until `target` jobs are done; a run in which no job ends for a minute beyond the
    // longest hold is broken (a lost job, a machine out of service): fail, do not hang.
    let wait_done = |target: usize| {
        let (done, done_notify, hold_ms) = (done.clone(), done_notify.clone(), hold_ms.clone());
        async move {
            let mut last = (done.load(Ordering::SeqCst), Instant::now());
            while done.load(Ordering::SeqCst) < target {
                let _ = tokio::time::timeout(Duration::from_secs(1), done_notify.notified()).await;
                let now = done.load(Ordering::SeqCst);
                if now != last.0 {
                    last = (now, Instant::now());
                }
                let patience = Duration::from_millis(60_000 + 2 * hold_ms.load(Ordering::SeqCst));
                assert!(
                    last.1.elapsed() < patience,
                    "no job ended for {} s: {now} of {target} done",
                    patience.as_secs()
                );
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
    sync_launched();
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

    // 3. Loaded gateway, once per offered load (a fraction of the ceiling): the rest of the
    // jobs split evenly between the loads. A machine cycles in hold + job time, so
    // machines ÷ (hold + job) = load × ceiling.
    let job_p50_ms = pct(&mut job_ms.clone(), 0.5);
    let loaded_total = jobs - idle_samples - saturated;
    let mut phases = Vec::new();
    for (k, load) in loads.iter().copied().enumerate() {
        let loaded = if k + 1 == loads.len() {
            loaded_total - loaded_total / loads.len() * k
        } else {
            loaded_total / loads.len()
        };
        let offered = load * max_jobs_per_s;
        let hold = ((machines as f64 / offered) * 1000.0 - job_p50_ms).max(0.0);
        hold_ms.store(hold as u64, Ordering::SeqCst);
        let start_done = done.load(Ordering::SeqCst);
        let seq3 = mars.store.latest_seq().await.expect("mars seq");
        let t3 = Instant::now();
        let cpu3 = cpu_sample();
        let load_jobs = submit_many(loaded).await;
        wait_done(start_done + loaded).await;
        sync_launched();
        let cpu = cpu_shares(cpu3, cpu_sample());
        let loaded_secs = t3.elapsed().as_secs_f64();
        // When each machine released in this phase was free in mars: the first announcement
        // of its release event's seq or a later one (seqs are assigned in commit order on
        // SQLite; on PostgreSQL in insertion order, close to it).
        let mut committed: Vec<(MachineId, Instant)> = Vec::new();
        {
            let announced = announced.lock().expect("announced").clone();
            let mut cursor = seq3;
            loop {
                let events = mars
                    .store
                    .events_after(cursor, 5000)
                    .await
                    .expect("mars events");
                let Some(last) = events.last() else { break };
                cursor = last.seq;
                for ev in events.iter().filter(|e| e.kind == "lease_released") {
                    let i = announced.partition_point(|(seq, _)| *seq < ev.seq);
                    if let Some((_, at)) = announced.get(i) {
                        committed.push((ev.machine_id, *at));
                    }
                }
            }
        }
        let log = log.lock().expect("log");
        let mut release_ms: Vec<f64> = log
            .release_ms
            .iter()
            .filter(|(sent, _)| *sent >= t3)
            .map(|(_, ms)| *ms)
            .collect();
        let (sent, first_wave) =
            dispatch_latencies(&log, &load_jobs, &log.release_sent, t3, machines, &groups);
        let (from_commit, _) =
            dispatch_latencies(&log, &load_jobs, &committed, t3, machines, &groups);
        drop(log);
        let mut sent: Vec<f64> = sent.into_iter().map(|(_, ms)| ms).collect();
        let mut from_commit: Vec<f64> = from_commit.into_iter().map(|(_, ms)| ms).collect();
        let phase = json!({
            "jobs": loaded,
            "load": load,
            "offered_jobs_per_s": offered,
            "hold_ms_mean": hold,
            "jobs_per_s": loaded as f64 / loaded_secs,
            "from_commit_ms": {"p50": pct(&mut from_commit.clone(), 0.5), "p99": pct(&mut from_commit.clone(), 0.99), "max": pct(&mut from_commit, 1.0), "n": from_commit.len()},
            "from_release_sent_ms": {"p50": pct(&mut sent.clone(), 0.5), "p99": pct(&mut sent.clone(), 0.99), "max": pct(&mut sent, 1.0), "n": sent.len()},
            "release_round_trip_ms": {"p50": pct(&mut release_ms.clone(), 0.5), "p99": pct(&mut release_ms, 0.99)},
            "first_wave": first_wave,
            "cpu": cpu,
            "loadavg_end": loadavg(),
        });
        eprintln!("phase at {load} × the ceiling: {phase}");
        phases.push(phase);
    }
    let load_end = loadavg();
    for name in ["executor", "mars", "pdu"] {
        let wal = tmp.path().join(format!("{name}.db-wal"));
        if let Ok(meta) = std::fs::metadata(&wal) {
            eprintln!("{name}: WAL {} KiB at the end", meta.len() / 1024);
        }
    }

    // The batch dispatch itself (lease + record), from the executor's own histograms.
    let metrics = http
        .get(format!("http://127.0.0.1:{}/metrics", gw.ports.executor))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics");
    let (dispatch_txn_p50, dispatch_txn_p99, dispatch_txn_n) =
        histogram_quantiles(&metrics, "dutgate_executor_dispatch_seconds");
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
    // Per step of a dispatch round, over the whole run: mean and the upper bound of the
    // bucket holding the 99th percentile.
    let steps: serde_json::Map<String, serde_json::Value> = [
        "dutgate_db_checkpoint_seconds",
        "dutgate_executor_mars_event_delay_seconds",
        "dutgate_executor_dispatch_step_seconds{step=\"round\"}",
        "dutgate_executor_dispatch_step_seconds{step=\"plan\"}",
        "dutgate_executor_dispatch_step_seconds{step=\"lease\"}",
        "dutgate_executor_dispatch_step_seconds{step=\"record\"}",
    ]
    .iter()
    .map(|s| {
        let (_, p99, _) = histogram_quantiles(&metrics, s);
        (
            s.to_string(),
            json!({"mean": mean_ms(s), "p99_le": p99 * 1000.0}),
        )
    })
    .collect();
    let mean_batch = counter("dutgate_executor_jobs_dispatched_total")
        / counter("dutgate_executor_dispatch_batches_total");
    let f2 = |v: &serde_json::Value| format!("{:.2}", v.as_f64().unwrap_or(f64::NAN));
    let floor_p50 = pct(&mut floor_ms.clone(), 0.5);
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
        "loaded": phases,
        "dispatch_txn_s_histogram": {"p50_le": dispatch_txn_p50, "p99_le": dispatch_txn_p99, "n": dispatch_txn_n},
        "mean_dispatch_batch": mean_batch,
        "step_ms": steps,
        "loadavg": {"start": load_start, "end": load_end},
    });
    println!("{result}");
    // Plain lines for `cargo xtask bench scheduler` (which has no JSON parser): one per load.
    for phase in &phases {
        println!(
            "RESULT backend={backend} machines={machines} jobs={jobs} load={} floor_p50={} \
             floor_p99={} power_p50={} power_p99={} disp_p50={} disp_p99={} disp_n={} \
             sent_p50={} sent_p99={} rel_p50={} rel_p99={} offered={:.0} hold_ms={:.0} \
             loaded_jps={:.0} max_jps={:.0} freed_p50={:.0} freed_p99={:.0} submit_ps={:.0} \
             ratio={:.1} cpu={:.0}/{:.0}/{:.0} load_start={load_start} load_end={}",
            phase["load"],
            f2(&result["floor_txn_ms"]["p50"]),
            f2(&result["floor_txn_ms"]["p99"]),
            f2(&result["submit_to_power_on_ms"]["p50"]),
            f2(&result["submit_to_power_on_ms"]["p99"]),
            f2(&phase["from_commit_ms"]["p50"]),
            f2(&phase["from_commit_ms"]["p99"]),
            phase["from_commit_ms"]["n"],
            f2(&phase["from_release_sent_ms"]["p50"]),
            f2(&phase["from_release_sent_ms"]["p99"]),
            f2(&phase["release_round_trip_ms"]["p50"]),
            f2(&phase["release_round_trip_ms"]["p99"]),
            phase["offered_jobs_per_s"].as_f64().unwrap_or(f64::NAN),
            phase["hold_ms_mean"].as_f64().unwrap_or(f64::NAN),
            phase["jobs_per_s"].as_f64().unwrap_or(f64::NAN),
            max_jobs_per_s,
            result["saturated"]["freed_to_next_launch_ms"]["p50"]
                .as_f64()
                .unwrap_or(f64::NAN),
            result["saturated"]["freed_to_next_launch_ms"]["p99"]
                .as_f64()
                .unwrap_or(f64::NAN),
            saturated as f64 / submit_secs,
            phase["from_commit_ms"]["p50"].as_f64().unwrap_or(f64::NAN) / floor_p50,
            phase["cpu"]["busy_pct"].as_f64().unwrap_or(f64::NAN),
            phase["cpu"]["gateway_pct"].as_f64().unwrap_or(f64::NAN),
            phase["cpu"]["postgres_pct"].as_f64().unwrap_or(f64::NAN),
            phase["loadavg_end"].as_str().unwrap_or("?"),
        );
    }
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
