//! Randomized interleavings of the dispatch protocol (docs/architecture.md, "Dispatch and
//! teardown protocol") on the real stores and a real mars, on SQLite and on PostgreSQL: no
//! machine is ever given to two jobs and no job is ever lost.
//!
//! Real parts: the executor's [`Store`] (SQLite in a tmpfs directory, or a PostgreSQL schema
//! of its own), mars served over HTTP on 127.0.0.1 (its store on the same backend) with the
//! pdu service (dummy driver) behind it, and per executor the real [`Supervisor`] and
//! [`Scheduler`]: rounds, leases through [`MarsClient`], the conditional record, the give-back,
//! the launch, cancellation, lease-expiry handling and the start-up recovery
//! (`Supervisor::reattach_all`). On PostgreSQL two executors share the queue and mars, as
//! several gateways do (design.md §11). Nothing is a model: the test only chooses the order.
//!
//! The test plays the rest of the world. Job processes are simulated at the point where the
//! scheduler launches them (an [`InlineRunner`]): the test records the job as started
//! (`Store::set_started`) and later ends it as a job process's teardown does (release the
//! lease through mars' API, then `Store::finish`), as cancelled if its cancellation was
//! requested. The test also plays mars' event stream (reloading a scheduler's copy of mars'
//! machines, handing lease expiries to `Supervisor::lease_expired`) and the trainer (a
//! machine's quick check passes after an expiry).
//!
//! Each step is one random operation, or two at once: submit a job (random tags, machine,
//! priority, sometimes a deadline a few ms away), a scheduler round, a job process starts,
//! a job process ends (lease released), cancel a job through an executor, mars' events reach
//! an executor, a lease expires in mars (forced: its expiry moved to now, then mars' sweep),
//! a quick check passes, an executor crashes (all its in-memory state and its job processes
//! gone) and restarts over the same databases (with its recovery), on PostgreSQL an executor
//! stays down for a while, and in some worlds an executor crashes in the middle of a round
//! (the round task is aborted at a random instant: between the lease and the record, say).
//!
//! After every step the invariants are checked against the stores and mars:
//! - every job submitted is in the queue, in exactly one state; nothing else is;
//! - a `DISPATCHED`/`RUNNING` job holds the lease mars granted it on its machine (or mars just
//!   took that lease back by expiry), so no job is shown dispatched without a granted lease
//!   and no machine is held by two jobs;
//! - every lease mars holds belongs to the active job recorded under it, except a lease the
//!   protocol leaves to expire on purpose: a job the executor ended for a dead process
//!   (`Supervisor::teardown_dead`), or, in worlds with crashes in the middle of a round, a
//!   lease taken before the record the crash cut off;
//! - a job is launched under one lease only, and never while its previous process lives;
//! - an executor told that a job's lease expired has ended that job.
//!
//! A sequence of steps is followed by a drain: restart every executor, deliver mars' events,
//! expire the leases left to expire, pass quick checks, run rounds, end every job process —
//! until every job is finished, every lease released and every machine `IDLE` (no lost job).
//! At rest, each job of the sequence has one `dispatched` event if it was dispatched, none
//! otherwise, under the lease it is recorded with (never dispatched twice).
//!
//! What is counted: a *step* (one random operation, or two run at once, then the invariant
//! check). Per backend: [`WORLDS`] worlds (fresh databases, mars and executors, each from its
//! own seed) × [`SEQUENCES`] sequences × [`STEPS`] steps = 10,240 steps, i.e. 160 random
//! sequences of 64 steps, each ending in a drain. The drains are not counted.
//!
//! The seed: `DUTGATE_TEST_SEED=<n>` (decimal or 0x-hex) sets the first world's seed, the
//! next worlds take n+1, n+2, …; unset, it is random. It is printed at the start and in every
//! failure, with the failing world's seed (which, given as `DUTGATE_TEST_SEED`, runs first)
//! and the steps of the failing sequence. The seed fixes the operations; how two operations
//! run at once interleave, and where an aborted round is cut, is up to the runtime.
//!
//! PostgreSQL: `DUTGATE_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1/test`); the
//! test creates its own schemas and drops them. When the variable is set and the server is
//! unreachable the test fails naming the `postgresql` package; when it is not set only
//! SQLite runs (as every store test of the workspace).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dutgate_core::config::GatewayConfig;
use dutgate_core::db::Db;
use dutgate_core::db::testing::POSTGRES_ENV;
use dutgate_core::{JobStatus, MachineId, Secret};
use dutgate_executor::model::{JobState, Purpose, kind};
use dutgate_executor::scheduler::Scheduler;
use dutgate_executor::store::{JobRow, ListFilter, MIGRATIONS, NewJob, Store, now_ms};
use dutgate_executor::supervisor::{CancelError, InlineRunner, Supervisor};
use dutgate_executor::testing::dispatch::{self, RoundOutcome};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::Timestamp;
use dutgate_mars::model::{Lease, MachinePatch, MachineState, Registration, ReleaseOutcome};
use dutgate_mars::state::Trigger as MachineTrigger;
use dutgate_mars::store::Cause;
use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Worlds per backend (each: fresh databases, mars and executors, its own seed).
const WORLDS: u64 = 4;
/// Random sequences per world, each followed by a drain.
const SEQUENCES: usize = 40;
/// Random steps per sequence.
const STEPS: usize = 64;
/// Machines per world, all on one dummy PDU.
const MACHINES: u8 = 5;
/// The pid a simulated job process records: no process has it (above Linux's `pid_max`, and
/// not an `i32`, so no signal can ever be sent to it).
const SIMULATED_PID: u32 = u32::MAX - 1;
/// The admin token of the world's services.
const ADMIN: &str = "interleavings-admin";
/// A world's databases are dropped within this (a connection left inside a transaction
/// would hold their locks forever).
const CLEANUP_WITHIN: Duration = Duration::from_secs(30);
/// Most drain passes before the jobs still unfinished are declared lost.
const DRAIN_PASSES: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_interleavings_on_sqlite() {
    run(Backend::Sqlite).await;
}

/// Two executors on one PostgreSQL database share the queue and mars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_interleavings_on_postgres() {
    let Ok(url) = std::env::var(POSTGRES_ENV) else {
        eprintln!(
            "{POSTGRES_ENV} is not set: the PostgreSQL interleavings do not run \
             (`cargo xtask test --postgres` sets it)"
        );
        return;
    };
    run(Backend::Postgres(url)).await;
}

// ---- the run ---------------------------------------------------------------------------------

#[derive(Clone)]
enum Backend {
    Sqlite,
    Postgres(String),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres(_) => "PostgreSQL",
        }
    }

    /// Executors sharing the queue: one on SQLite (the embedded gateway), two on PostgreSQL.
    fn executors(&self) -> usize {
        match self {
            Backend::Sqlite => 1,
            Backend::Postgres(_) => 2,
        }
    }
}

async fn run(backend: Backend) {
    let base = base_seed();
    eprintln!(
        "dispatch interleavings on {}: base seed {base} ({WORLDS} worlds × {SEQUENCES} \
         sequences × {STEPS} steps; DUTGATE_TEST_SEED={base} repeats the operations)",
        backend.name()
    );
    let started = Instant::now();
    let pdu = Pdu::start().await;
    let mut totals = Stats::default();
    for w in 0..WORLDS {
        let seed = base.wrapping_add(w);
        let mut world = World::new(&backend, seed, &pdu).await;
        let result = world.run().await;
        totals.add(&world.stats);
        let where_ = format!(
            "world seed {seed} (base seed {base}); DUTGATE_TEST_SEED={seed} runs this world first"
        );
        let cleaned = tokio::time::timeout(CLEANUP_WITHIN, world.cleanup()).await;
        if let Err(failure) = result {
            panic!(
                "dispatch interleavings on {}: {failure}\n{where_}",
                backend.name()
            );
        }
        assert!(
            cleaned.is_ok(),
            "dispatch interleavings on {}: the world's databases could not be dropped within \
             {CLEANUP_WITHIN:?}: a connection still holds locks (PostgreSQL: a session `idle in \
             transaction` in pg_stat_activity)\n{where_}",
            backend.name()
        );
    }
    pdu.stop().await;
    eprintln!(
        "dispatch interleavings on {}: {} steps in {:.1} s: {totals}",
        backend.name(),
        totals.steps,
        started.elapsed().as_secs_f64()
    );
    totals.assert_coverage(&backend);
}

fn base_seed() -> u64 {
    match std::env::var("DUTGATE_TEST_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("DUTGATE_TEST_SEED={s:?} is not a number: {e}"))
        }
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            splitmix(nanos ^ u64::from(std::process::id()).rotate_left(32))
        }
    }
}

// ---- randomness ------------------------------------------------------------------------------

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64: small, fast, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix(self.0)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> Option<&'a T> {
        if xs.is_empty() {
            None
        } else {
            xs.get(self.below(xs.len() as u64) as usize)
        }
    }
}

// ---- peers shared by the worlds --------------------------------------------------------------

/// The pdu service (dummy driver, one port per machine) that mars' expiry power-off and the
/// executors' teardown of dead jobs switch. Its state does not matter between worlds.
struct Pdu {
    running: dutgate_pdu::Running,
    port: u16,
    device: String,
    _dir: tempfile::TempDir,
}

impl Pdu {
    async fn start() -> Pdu {
        let dir = scratch_dir();
        let device = format!(
            "interleavings-{}-{:x}",
            std::process::id(),
            dutgate_executor::testing::rand_u32()
        );
        let mut cfg = dutgate_pdu::Config {
            poll_interval_seconds: 5.0,
            settle_timeout_seconds: 2.0,
            readback_interval_ms: 5,
            verify_interval_ms: 5,
            default_off_seconds: 0.0,
            ..Default::default()
        };
        cfg.pdus.insert(
            "pdu1".into(),
            dutgate_pdu::PduSpec {
                driver: "dummy".into(),
                config: serde_json::json!({
                    "ports": MACHINES, "device": device, "initial": "OFF"
                }),
                reserved: vec![],
                labels: BTreeMap::new(),
                poll_interval_seconds: None,
            },
        );
        let db = Db::open_sqlite(&dir.path().join("pdu.db"), dutgate_pdu::store::MIGRATIONS)
            .await
            .expect("the pdu service's database");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on 127.0.0.1");
        let port = listener.local_addr().expect("a bound address").port();
        let running =
            dutgate_pdu::start_on(listener, dutgate_pdu::store::Store::new(db), cfg, auth())
                .await
                .expect("the pdu service");
        Pdu {
            running,
            port,
            device,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.running.stop().await;
        dutgate_pdu_dummy::forget(&self.device);
    }
}

fn auth() -> dutgate_core::auth::Auth {
    dutgate_core::auth::Auth::new(
        Some(Secret::new(ADMIN)),
        None,
        dutgate_core::config::default_dut_networks(),
    )
}

/// A scratch directory in tmpfs when there is one: SQLite's fsyncs cost nothing there.
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("dutgate-interleavings-");
        b
    };
    if shm.is_dir()
        && let Ok(dir) = builder().tempdir_in(shm)
    {
        return dir;
    }
    builder().tempdir().expect("a temporary directory")
}

// ---- one world -------------------------------------------------------------------------------

type Handovers = Arc<Mutex<Vec<(i64, MachineId, String)>>>;

/// One running instance of an executor: what a crash loses.
struct Incarnation {
    sched: Scheduler,
    sup: Supervisor,
    /// The jobs its scheduler launched (job, machine, lease), not yet taken over by the test.
    handed: Handovers,
}

struct Exec {
    name: String,
    /// Its own connection pool to the queue (on SQLite, the one file's).
    db: Db,
    live: Option<Incarnation>,
    /// Jobs whose lease expiry mars' event stream has not brought to this executor yet.
    pending_expiries: Vec<i64>,
}

/// A simulated job process.
struct Proc {
    exec: usize,
    machine: MachineId,
    lease: String,
    started: bool,
}

/// A machine of the world and its tags.
struct Dut {
    id: MachineId,
    tags: Vec<String>,
}

#[derive(Default)]
struct Stats {
    steps: u64,
    pairs: u64,
    submitted: u64,
    rounds: u64,
    rounds_again: u64,
    launches: u64,
    relaunches: u64,
    finished_by_process: u64,
    cancels: u64,
    cancels_of_active: u64,
    expiries: u64,
    expiry_deliveries: u64,
    quick_checks: u64,
    crashes: u64,
    crashes_mid_round: u64,
    downs: u64,
    reloads: u64,
    concurrent_rounds: u64,
    strays_left_to_expire: u64,
    drains: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.pairs += o.pairs;
        self.submitted += o.submitted;
        self.rounds += o.rounds;
        self.rounds_again += o.rounds_again;
        self.launches += o.launches;
        self.relaunches += o.relaunches;
        self.finished_by_process += o.finished_by_process;
        self.cancels += o.cancels;
        self.cancels_of_active += o.cancels_of_active;
        self.expiries += o.expiries;
        self.expiry_deliveries += o.expiry_deliveries;
        self.quick_checks += o.quick_checks;
        self.crashes += o.crashes;
        self.crashes_mid_round += o.crashes_mid_round;
        self.downs += o.downs;
        self.reloads += o.reloads;
        self.concurrent_rounds += o.concurrent_rounds;
        self.strays_left_to_expire += o.strays_left_to_expire;
        self.drains += o.drains;
    }

    /// A run that exercised too little of the protocol fails: a change that made the test
    /// drive less (no launches, no refused leases) must not pass as "no violation found".
    fn assert_coverage(&self, backend: &Backend) {
        let expected = WORLDS * SEQUENCES as u64 * STEPS as u64;
        assert_eq!(self.steps, expected, "steps counted");
        // About a third of what a run does (runs vary with the seed).
        let mut floors = vec![
            ("launches", self.launches, 1_000),
            ("rounds asking for another", self.rounds_again, 8),
            ("relaunches after a restart", self.relaunches, 4),
            ("jobs ended by their process", self.finished_by_process, 700),
            (
                "cancels of dispatched or running jobs",
                self.cancels_of_active,
                150,
            ),
            ("lease expiries", self.expiries, 150),
            (
                "expiries reported to executors",
                self.expiry_deliveries,
                150,
            ),
            ("crashes", self.crashes, 12),
            (
                "crashes in the middle of a round",
                self.crashes_mid_round,
                6,
            ),
            ("leases left to expire", self.strays_left_to_expire, 50),
            ("steps of two operations at once", self.pairs, 1_500),
        ];
        if backend.executors() > 1 {
            floors.push((
                "rounds of two executors at once",
                self.concurrent_rounds,
                300,
            ));
            floors.push(("executors down for a while", self.downs, 3));
        }
        for (what, n, floor) in floors {
            assert!(n >= floor, "too few {what}: {n} < {floor} ({self})");
        }
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pairs, {} jobs, {} rounds ({} again, {} concurrent), {} launches ({} after a \
             restart), {} ended by their process, {} cancels ({} active), {} expiries ({} \
             reported), {} quick checks, {} crashes ({} mid-round, {} down a while), {} cache \
             reloads, {} leases left to expire, {} drains",
            self.pairs,
            self.submitted,
            self.rounds,
            self.rounds_again,
            self.concurrent_rounds,
            self.launches,
            self.relaunches,
            self.finished_by_process,
            self.cancels,
            self.cancels_of_active,
            self.expiries,
            self.expiry_deliveries,
            self.quick_checks,
            self.crashes,
            self.crashes_mid_round,
            self.downs,
            self.reloads,
            self.strays_left_to_expire,
            self.drains
        )
    }
}

/// One operation that may run at the same time as another.
#[derive(Debug, Clone)]
enum Action {
    /// A submission through executor `.0` (which notes its deadline).
    Submit(usize, NewJob),
    Round(usize),
    /// The job process of job `.0` records itself started.
    Start(i64),
    /// The job process of job `.0` ends: lease released, job finished.
    Finish(i64),
    /// Cancel job `.1` through executor `.0`.
    Cancel(usize, i64),
    /// mars takes lease `.0` (of job `.1`) back: its holder stopped heartbeating.
    Expire(String, i64),
    /// mars' event stream reaches executor `.0`: the expiries of jobs `.1`, the machines.
    Events(usize, Vec<i64>),
    /// The trainer's quick check of machine `.0` passes.
    QuickCheck(MachineId),
}

impl Action {
    /// Who acts, when it is one of those that do one thing at a time: a job's process, an
    /// executor's scheduler loop, an executor's follower of mars' events.
    fn actor(&self) -> Option<(&'static str, i64)> {
        match self {
            Action::Start(j) | Action::Finish(j) => Some(("process", *j)),
            Action::Round(k) => Some(("scheduler", *k as i64)),
            Action::Events(k, _) => Some(("follower", *k as i64)),
            _ => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Submit(k, j) => write!(
                f,
                "submit via exec {k} (priority {}, machine {:?}, tags {:?}, deadline {:?})",
                j.priority,
                j.target_id.map(|m| m.to_string()),
                j.target_tags,
                j.deadline_ms.map(|d| d - now_ms())
            ),
            Action::Round(k) => write!(f, "round of exec {k}"),
            Action::Start(j) => write!(f, "job {j}'s process starts"),
            Action::Finish(j) => write!(f, "job {j}'s process ends"),
            Action::Cancel(k, j) => write!(f, "cancel job {j} via exec {k}"),
            Action::Expire(l, j) => write!(f, "lease {l} of job {j} expires"),
            Action::Events(k, jobs) => {
                write!(f, "mars' events reach exec {k} (expired jobs {jobs:?})")
            }
            Action::QuickCheck(m) => write!(f, "quick check of {m} passes"),
        }
    }
}

/// What an [`Action`] did, for the test's own records.
#[derive(Debug)]
enum Outcome {
    Submitted(i64),
    Round(RoundOutcome),
    /// Whether the job was still dispatched or running (else the process exits at once).
    Started(bool),
    /// Whether the job was still active when its process ended it.
    Finished(bool),
    /// The job's state at the last check (None: already finished or unknown).
    Cancelled(Option<JobState>),
    Expired(bool),
    Delivered,
    QuickChecked,
}

struct World {
    backend: Backend,
    rng: Rng,
    dir: tempfile::TempDir,
    stop: CancellationToken,
    mars: dutgate_mars::machines::Mars,
    client: MarsClient,
    gw: Arc<GatewayConfig>,
    /// The test's own handle on the queue: the simulated job processes and the checks.
    store: Store,
    mars_db: Db,
    /// PostgreSQL schemas to drop at the end.
    schemas: Vec<String>,
    execs: Vec<Exec>,
    duts: Vec<Dut>,
    /// The jobs submitted in this sequence (the earlier ones are finished), with the lease
    /// each was first launched under.
    jobs: BTreeMap<i64, Option<String>>,
    /// The simulated job processes alive, by job.
    procs: BTreeMap<i64, Proc>,
    /// Leases mars took back by expiry → their job.
    expired: HashMap<String, i64>,
    /// Leases found held outside an active job and judged left to expire on purpose.
    strays_ok: HashSet<String>,
    /// Whether this world crashes executors in the middle of a round.
    mid_round_crashes: bool,
    /// Whether one happened (from then on a lease may be left by a cut-off round).
    cut_rounds: bool,
    /// What the last check saw: job states and mars' leases.
    last_states: BTreeMap<i64, JobState>,
    /// Jobs whose cancellation was requested, at the last check.
    last_cancel_requested: HashSet<i64>,
    last_leases: Vec<Lease>,
    /// Machines in `QUICK_CHECK` at the last check (sent there by an expiry).
    quick_checking: Vec<MachineId>,
    log: Vec<String>,
    stats: Stats,
}

impl World {
    async fn new(backend: &Backend, seed: u64, pdu: &Pdu) -> World {
        let mut rng = Rng(seed);
        let dir = scratch_dir();
        let mut schemas = Vec::new();
        let (mars_db, exec_dbs, store) = match backend {
            Backend::Sqlite => {
                let mars_db =
                    Db::open_sqlite(&dir.path().join("mars.db"), dutgate_mars::store::MIGRATIONS)
                        .await
                        .expect("mars' SQLite database");
                let db = Db::open_sqlite(&dir.path().join("executor.db"), MIGRATIONS)
                    .await
                    .expect("the executor's SQLite database");
                (mars_db, vec![db.clone()], Store::new(db))
            }
            Backend::Postgres(url) => {
                let tag = format!("{}_{seed:016x}", std::process::id());
                let mars_schema = format!("t_interleavings_mars_{tag}");
                let exec_schema = format!("t_interleavings_exec_{tag}");
                let mars_db =
                    open_postgres(url, &mars_schema, dutgate_mars::store::MIGRATIONS).await;
                schemas.push(mars_schema);
                let test_db = open_postgres(url, &exec_schema, MIGRATIONS).await;
                schemas.push(exec_schema.clone());
                let mut dbs = Vec::new();
                for _ in 0..backend.executors() {
                    dbs.push(open_postgres(url, &exec_schema, MIGRATIONS).await);
                }
                (mars_db, dbs, Store::new(test_db))
            }
        };

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port on 127.0.0.1");
        let mars_port = listener.local_addr().expect("a bound address").port();
        let mut gw = GatewayConfig {
            state_dir: dir.path().to_path_buf(),
            internal_host: "127.0.0.1".into(),
            ..Default::default()
        };
        gw.auth.admin_token = Some(Secret::new(ADMIN));
        gw.ports.mars = mars_port;
        gw.ports.pdu = pdu.port;
        let gw = Arc::new(gw);

        let mut cfg = dutgate_mars::Config {
            // Leases end only when the test says so: a slow run must not see one lapse.
            lease_ttl_seconds: 3600,
            // Expiries are infrastructure failures; quarantine would take machines away for
            // the rest of the world.
            quarantine_after_infra_failures: u32::MAX / 2,
            ..Default::default()
        };
        cfg.training.enabled = false;
        let mars = dutgate_mars::machines::Mars::new(
            dutgate_mars::store::Store::new(mars_db.clone(), "farm"),
            cfg,
            Arc::new(dutgate_mars::power::HttpPower::for_gateway(&gw, None)),
        );
        let stop = CancellationToken::new();
        let router = dutgate_mars::start(mars.clone(), auth(), stop.clone()).expect("mars");
        tokio::spawn(dutgate_core::http::serve(
            listener,
            dutgate_core::http::with_common_routes("mars", router, None),
            stop.clone(),
            Duration::from_millis(100),
        ));
        let client = MarsClient::new(
            format!("http://127.0.0.1:{mars_port}"),
            Some(Secret::new(ADMIN)),
        );

        // Machines: an architecture each, some with a GPU, some with much memory; every job
        // target below is a subset of one machine's tags, so every job can run somewhere.
        let mut duts = Vec::new();
        for n in 1..=MACHINES {
            let id = MachineId::from_bytes([0x52, 0x54, 0x00, 0x1e, 0x00, n]);
            let mut tags = vec![if n % 2 == 0 {
                "cpu:arch:arm64"
            } else {
                "cpu:arch:amd64"
            }];
            match n % 3 {
                0 => tags.push("gpu:vendor:amd"),
                1 => tags.push("gpu:vendor:intel"),
                _ => {}
            }
            if rng.percent(50) {
                tags.push("mem:size:big");
            }
            let tags: Vec<String> = tags.into_iter().map(String::from).collect();
            admit(&mars, &client, id, n, &tags).await;
            duts.push(Dut { id, tags });
        }

        let execs = exec_dbs
            .into_iter()
            .enumerate()
            .map(|(k, db)| Exec {
                name: format!("exec-{}", (b'a' + k as u8) as char),
                db,
                live: None,
                pending_expiries: Vec::new(),
            })
            .collect();
        // Every other seed: with crashes in the middle of a round (they make leases left by a
        // cut-off round acceptable, which the other worlds do not tolerate).
        let mid_round_crashes = seed % 2 == 1;
        let mut world = World {
            backend: backend.clone(),
            rng,
            dir,
            stop,
            mars,
            client,
            gw,
            store,
            mars_db,
            schemas,
            execs,
            duts,
            jobs: BTreeMap::new(),
            procs: BTreeMap::new(),
            expired: HashMap::new(),
            strays_ok: HashSet::new(),
            mid_round_crashes,
            cut_rounds: false,
            last_states: BTreeMap::new(),
            last_cancel_requested: HashSet::new(),
            last_leases: Vec::new(),
            quick_checking: Vec::new(),
            log: Vec::new(),
            stats: Stats::default(),
        };
        for k in 0..world.execs.len() {
            if let Err(e) = world.start_exec(k).await {
                panic!("world {seed}: starting exec {k}: {e}");
            }
        }
        world
    }

    async fn cleanup(self) {
        for e in &self.execs {
            e.db.close().await;
        }
        if let Backend::Postgres(_) = self.backend {
            for schema in &self.schemas {
                let db = if schema.contains("_mars_") {
                    &self.mars_db
                } else {
                    self.store.db()
                };
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .execute(db.pool())
                .await;
            }
        }
        self.stop.cancel();
        self.store.db().close().await;
        self.mars_db.close().await;
        drop(self.dir);
    }

    /// Runs the world's sequences; a violation comes back with the failing sequence's steps.
    async fn run(&mut self) -> Result<(), String> {
        for seq in 0..SEQUENCES {
            self.log.clear();
            let r = async {
                for step in 0..STEPS {
                    self.step().await.map_err(|e| format!("step {step}: {e}"))?;
                    self.stats.steps += 1;
                }
                self.drain().await.map_err(|e| format!("drain: {e}"))
            }
            .await;
            if let Err(e) = r {
                let tail = self.log.len().saturating_sub(80);
                return Err(format!(
                    "sequence {seq}: {e}\n{}executors {}, mid-round crashes {}; the sequence:\n  {}",
                    if tail > 0 { "(last steps only) " } else { "" },
                    self.execs.len(),
                    self.mid_round_crashes,
                    self.log[tail..].join("\n  ")
                ));
            }
        }
        Ok(())
    }

    // ---- executors ---------------------------------------------------------------------------

    /// Starts executor `k` over the same databases, with an executor's start-up recovery.
    async fn start_exec(&mut self, k: usize) -> Result<(), String> {
        let handed: Handovers = Arc::default();
        let h = handed.clone();
        let inline: InlineRunner = Arc::new(move |id, machine, lease| {
            h.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, machine, lease));
            Box::pin(async {})
        });
        let exec = &self.execs[k];
        let store = Store::new(exec.db.clone());
        let cfg = dutgate_executor::Config {
            name: Some(exec.name.clone()),
            ..Default::default()
        };
        let sup = Supervisor::new(
            store.clone(),
            self.gw.clone(),
            cfg,
            None,
            Arc::new(Notify::new()),
            Some(inline),
        );
        let sched = Scheduler::new(
            store,
            self.client.clone(),
            sup.clone(),
            None,
            Arc::new(Notify::new()),
        );
        sup.reattach_all()
            .await
            .map_err(|e| format!("exec {k} re-attaching at start-up: {e}"))?;
        self.execs[k].live = Some(Incarnation { sched, sup, handed });
        Ok(())
    }

    /// Executor `k` dies: its scheduler, supervisor, machine copy and job processes.
    fn kill_exec(&mut self, k: usize) {
        self.execs[k].live = None;
        self.execs[k].pending_expiries.clear();
        self.procs.retain(|_, p| p.exec != k);
    }

    fn live_execs(&self) -> Vec<usize> {
        (0..self.execs.len())
            .filter(|k| self.execs[*k].live.is_some())
            .collect()
    }

    fn live(&self, k: usize) -> Result<&Incarnation, String> {
        self.execs[k]
            .live
            .as_ref()
            .ok_or_else(|| format!("exec {k} is down"))
    }

    // ---- steps -------------------------------------------------------------------------------

    async fn step(&mut self) -> Result<(), String> {
        if self.live_execs().is_empty() {
            let k = self.rng.below(self.execs.len() as u64) as usize;
            self.log.push(format!("restart exec {k}"));
            self.start_exec(k).await?;
            return self.settle_step().await;
        }
        // Per mille: restarts are the dearest steps (an executor's start re-reads the queue
        // and builds its HTTP client, about 50 ms in a debug build), so crashes are rare.
        let roll = self.rng.below(1000);
        let down = self.execs.len() > self.live_execs().len();
        match roll {
            0 => self.crash(false).await?,
            1 if self.execs.len() > 1 => self.crash(true).await?,
            2..=31 if down => {
                let down: Vec<usize> = (0..self.execs.len())
                    .filter(|k| self.execs[*k].live.is_none())
                    .collect();
                let k = *self.rng.pick(&down).expect("an executor that is down");
                self.log.push(format!("restart exec {k}"));
                self.start_exec(k).await?;
            }
            32..=35 if self.mid_round_crashes => self.crash_mid_round().await?,
            36..=359 => {
                // Mostly a round against something else: the races of the protocol.
                let live = self.live_execs();
                let a = if self.rng.percent(60) {
                    Action::Round(*self.rng.pick(&live).expect("a live executor"))
                } else {
                    self.gen_action()
                };
                let mut b = if live.len() > 1 && self.rng.percent(25) {
                    let others: Vec<usize> = live
                        .iter()
                        .copied()
                        .filter(|k| !matches!(a, Action::Round(x) if x == *k))
                        .collect();
                    Action::Round(*self.rng.pick(&others).expect("another live executor"))
                } else {
                    self.gen_action()
                };
                if a.actor().is_some() && a.actor() == b.actor() {
                    // One process, one scheduler loop, one follower: one thing at a time.
                    let k = *self.rng.pick(&live).expect("a live executor");
                    b = self.gen_submit(k);
                }
                self.log.push(format!("at once: {a} | {b}"));
                self.stats.pairs += 1;
                if matches!((&a, &b), (Action::Round(x), Action::Round(y)) if x != y) {
                    self.stats.concurrent_rounds += 1;
                }
                let (ra, rb) = tokio::join!(self.run_action(&a), self.run_action(&b));
                self.apply(&a, ra?).await?;
                self.apply(&b, rb?).await?;
            }
            _ => {
                let a = self.gen_action();
                self.log.push(a.to_string());
                let r = self.run_action(&a).await?;
                self.apply(&a, r).await?;
            }
        }
        self.settle_step().await
    }

    /// After a step: take over the launched jobs, then check every invariant.
    async fn settle_step(&mut self) -> Result<(), String> {
        self.take_handovers()?;
        self.check().await
    }

    /// Executor `k` crashes; restarts at once, or (`stay_down`) at a later step.
    async fn crash(&mut self, stay_down: bool) -> Result<(), String> {
        let live = self.live_execs();
        let k = *self.rng.pick(&live).expect("a live executor");
        self.stats.crashes += 1;
        self.take_handovers()?;
        self.kill_exec(k);
        if stay_down {
            self.stats.downs += 1;
            self.log.push(format!("exec {k} crashes and stays down"));
            return Ok(());
        }
        self.log.push(format!("exec {k} crashes and restarts"));
        self.start_exec(k).await
    }

    /// Executor `k` crashes while a round runs: the round is cut at a random instant.
    async fn crash_mid_round(&mut self) -> Result<(), String> {
        let live = self.live_execs();
        let k = *self.rng.pick(&live).expect("a live executor");
        // Long enough to reach any step of a round (a round takes a few ms here).
        let cut = Duration::from_micros(self.rng.below(4_000));
        self.log.push(format!(
            "exec {k} crashes {} µs into a round, restarts",
            cut.as_micros()
        ));
        self.stats.crashes += 1;
        self.stats.crashes_mid_round += 1;
        self.take_handovers()?;
        let sched = self.live(k)?.sched.clone();
        let task = tokio::spawn(async move { dispatch::round(&sched).await });
        // Fault injection, not a wait for a condition: the crash lands wherever the round is.
        tokio::time::sleep(cut).await;
        task.abort();
        let finished = task.await;
        if let Ok(Err(e)) = finished {
            return Err(format!("round of exec {k} before its crash: {e}"));
        }
        self.cut_rounds = true;
        self.kill_exec(k);
        self.start_exec(k).await
    }

    /// A random operation that may run alongside another.
    fn gen_action(&mut self) -> Action {
        let live = self.live_execs();
        let k = *self.rng.pick(&live).expect("a live executor");
        let roll = self.rng.below(100);
        let picked = match roll {
            0..=19 => Some(self.gen_submit(k)),
            20..=29 => self.gen_start(),
            30..=44 => self.gen_finish(),
            45..=54 => self.gen_cancel(k),
            55..=63 => Some(self.gen_events(k)),
            64..=68 => self.gen_expire(),
            69..=72 => self.gen_quick_check(),
            _ => None,
        };
        picked.unwrap_or(Action::Round(k))
    }

    fn gen_submit(&mut self, k: usize) -> Action {
        let dut = &self.duts[self.rng.below(self.duts.len() as u64) as usize];
        let (id, all_tags) = (dut.id, dut.tags.clone());
        let tags: Vec<String> = all_tags
            .into_iter()
            .filter(|_| self.rng.percent(40))
            .collect();
        let target_id = self.rng.percent(15).then_some(id);
        let deadline_ms = self
            .rng
            .percent(8)
            .then(|| now_ms() + self.rng.below(30) as i64);
        Action::Submit(
            k,
            NewJob {
                external_id: None,
                priority: self.rng.below(3) as i64,
                purpose: Purpose::Job,
                job_yaml: "version: 1\n".into(),
                target_id,
                target_tags: tags,
                deadline_ms,
                has_tarball: false,
                owner: "user".into(),
            },
        )
    }

    fn gen_start(&mut self) -> Option<Action> {
        let unstarted: Vec<i64> = self
            .procs
            .iter()
            .filter(|(_, p)| !p.started)
            .map(|(j, _)| *j)
            .collect();
        self.rng.pick(&unstarted).map(|j| Action::Start(*j))
    }

    fn gen_finish(&mut self) -> Option<Action> {
        let ids: Vec<i64> = self.procs.keys().copied().collect();
        self.rng.pick(&ids).map(|j| Action::Finish(*j))
    }

    fn gen_cancel(&mut self, k: usize) -> Option<Action> {
        // Mostly jobs not finished yet; now and then a finished one (refused).
        let ids: Vec<i64> = if self.rng.percent(90) {
            self.last_states
                .iter()
                .filter(|(_, s)| **s != JobState::Finished)
                .map(|(j, _)| *j)
                .collect()
        } else {
            self.last_states.keys().copied().collect()
        };
        self.rng.pick(&ids).map(|j| Action::Cancel(k, *j))
    }

    fn gen_events(&mut self, k: usize) -> Action {
        Action::Events(k, std::mem::take(&mut self.execs[k].pending_expiries))
    }

    fn gen_expire(&mut self) -> Option<Action> {
        let leases: Vec<(String, i64)> = self
            .last_leases
            .iter()
            .filter(|l| l.expires_at.millis() >= 0)
            .map(|l| (l.id.clone(), l.job_id.parse().unwrap_or(-1)))
            .collect();
        self.rng
            .pick(&leases)
            .map(|(l, j)| Action::Expire(l.clone(), *j))
    }

    fn gen_quick_check(&mut self) -> Option<Action> {
        let checking = self.quick_checking.clone();
        self.rng.pick(&checking).map(|m| Action::QuickCheck(*m))
    }

    // ---- actions -----------------------------------------------------------------------------

    async fn run_action(&self, a: &Action) -> Result<Outcome, String> {
        match a {
            Action::Submit(_, job) => self
                .store
                .insert(job)
                .await
                .map(Outcome::Submitted)
                .map_err(|e| format!("submission: {e}")),
            Action::Round(k) => dispatch::round(&self.live(*k)?.sched)
                .await
                .map(Outcome::Round)
                .map_err(|e| format!("round of exec {k}: {e}")),
            Action::Start(id) => self.start_job(*id).await.map(Outcome::Started),
            Action::Finish(id) => self.finish_job(*id).await.map(Outcome::Finished),
            Action::Cancel(k, id) => {
                let before = self.last_states.get(id).copied();
                match self.live(*k)?.sup.cancel(*id).await {
                    Ok(_) => Ok(Outcome::Cancelled(before)),
                    Err(CancelError::Finished(_)) => Ok(Outcome::Cancelled(None)),
                    Err(e) => Err(format!("cancel of job {id} via exec {k}: {e}")),
                }
            }
            Action::Expire(lease, _) => {
                // The holder's last heartbeat was a TTL ago: the expiry moves to now, then
                // mars' sweep (claim, power-off read back OFF, free) runs.
                let moved = self
                    .mars
                    .store
                    .extend_lease(lease, Timestamp::now().plus_ms(-1))
                    .await
                    .map_err(|e| format!("expiring lease {lease}: {e}"))?;
                self.mars
                    .expire_leases()
                    .await
                    .map_err(|e| format!("mars' expiry sweep: {e}"))?;
                Ok(Outcome::Expired(moved))
            }
            Action::Events(k, jobs) => {
                let inc = self.live(*k)?;
                for job in jobs {
                    inc.sup.lease_expired(*job).await;
                }
                dispatch::reload_machines(&inc.sched)
                    .await
                    .map_err(|e| format!("exec {k} reloading mars' machines: {e}"))?;
                Ok(Outcome::Delivered)
            }
            Action::QuickCheck(m) => {
                // The trigger is refused unless the machine is in QUICK_CHECK.
                let _ = self
                    .mars
                    .store
                    .trigger(
                        *m,
                        MachineTrigger::QuickCheckPassed,
                        &Cause::new("trainer", "quick check passed"),
                        &|_| {},
                    )
                    .await;
                Ok(Outcome::QuickChecked)
            }
        }
    }

    /// What a job process does first: record its pid. False when the job is not dispatched or
    /// running any more (the process then exits without touching anything).
    async fn start_job(&self, id: i64) -> Result<bool, String> {
        let started = self
            .store
            .set_started(id, SIMULATED_PID)
            .await
            .map_err(|e| format!("job {id} starting: {e}"))?;
        if started.is_some() {
            return Ok(true);
        }
        // Lost a race with another writer of the row (a cancel, say): look again.
        let row = self
            .store
            .require(id)
            .await
            .map_err(|e| format!("job {id}: {e}"))?;
        Ok(matches!(
            row.state,
            JobState::Dispatched | JobState::Running
        ))
    }

    /// What a job process's teardown does at its end: release the lease (a lease already gone
    /// is not an error), then finish the job — cancelled if its cancellation was requested
    /// (the executor's SIGTERM). False when the job had ended already (the process was killed).
    async fn finish_job(&self, id: i64) -> Result<bool, String> {
        let Some(p) = self.procs.get(&id) else {
            return Err(format!("job {id} has no process"));
        };
        if !p.started && !self.start_job(id).await? {
            return Ok(false);
        }
        // The process learns of a cancellation by a signal; here, from the last look at the
        // queue (a cancellation at the same instant may come too late: the job passes).
        let (status, reason) = if self.last_cancel_requested.contains(&id) {
            (JobStatus::Incomplete, "cancelled")
        } else {
            (JobStatus::Pass, "session ended")
        };
        match self
            .client
            .release(&p.lease, ReleaseOutcome::Ok, Some(reason))
            .await
        {
            Ok(_) => {}
            Err(e)
                if dutgate_mars::client::is_gone(&e)
                    || e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {}
            Err(e) => return Err(format!("job {id} releasing lease {}: {e}", p.lease)),
        }
        let done = self
            .store
            .finish(id, status, reason)
            .await
            .map_err(|e| format!("job {id} finishing: {e}"))?;
        Ok(done.is_some())
    }

    /// Updates the test's side after an action.
    async fn apply(&mut self, a: &Action, outcome: Outcome) -> Result<(), String> {
        match (a, outcome) {
            (Action::Submit(k, job), Outcome::Submitted(id)) => {
                self.stats.submitted += 1;
                self.jobs.insert(id, None);
                if let (Some(d), Some(inc)) = (job.deadline_ms, self.execs[*k].live.as_ref()) {
                    inc.sched.note_deadline(d);
                }
                self.log.push(format!("  → job {id}"));
            }
            (Action::Round(_), Outcome::Round(next)) => {
                self.stats.rounds += 1;
                if next == RoundOutcome::Again {
                    self.stats.rounds_again += 1;
                }
            }
            (Action::Start(id), Outcome::Started(running)) => {
                if running {
                    if let Some(p) = self.procs.get_mut(id) {
                        p.started = true;
                    }
                } else {
                    // Not dispatched any more: the process exits without touching anything.
                    self.procs.remove(id);
                }
            }
            (Action::Finish(id), Outcome::Finished(ended)) => {
                if ended {
                    self.stats.finished_by_process += 1;
                }
                self.procs.remove(id);
            }
            (Action::Cancel(_, _), Outcome::Cancelled(before)) => {
                self.stats.cancels += 1;
                if matches!(before, Some(JobState::Dispatched | JobState::Running)) {
                    self.stats.cancels_of_active += 1;
                }
            }
            (Action::Expire(lease, job), Outcome::Expired(moved)) => {
                if moved {
                    self.stats.expiries += 1;
                    self.expired.insert(lease.clone(), *job);
                    // Every executor following mars' events gets the expiry, later.
                    for e in &mut self.execs {
                        if e.live.is_some() {
                            e.pending_expiries.push(*job);
                        }
                    }
                }
            }
            (Action::Events(k, jobs), Outcome::Delivered) => {
                self.stats.reloads += 1;
                let name = self.execs[*k].name.clone();
                for job in jobs {
                    let row = self
                        .store
                        .require(*job)
                        .await
                        .map_err(|e| format!("job {job}: {e}"))?;
                    let expired_here = row
                        .lease_id
                        .as_ref()
                        .is_some_and(|l| self.expired.contains_key(l));
                    if row.executor.as_deref() == Some(name.as_str()) && expired_here {
                        self.stats.expiry_deliveries += 1;
                        if row.state != JobState::Finished {
                            return Err(format!(
                                "exec {k} was told job {job}'s lease expired, the job is still {:?}: {row:?}",
                                row.state
                            ));
                        }
                    }
                }
            }
            (Action::QuickCheck(_), Outcome::QuickChecked) => self.stats.quick_checks += 1,
            (a, o) => return Err(format!("{a} gave {o:?}")),
        }
        Ok(())
    }

    /// Takes over the jobs the executors launched: each becomes a simulated job process.
    fn take_handovers(&mut self) -> Result<(), String> {
        for k in 0..self.execs.len() {
            let Some(inc) = &self.execs[k].live else {
                continue;
            };
            let handed: Vec<(i64, MachineId, String)> =
                std::mem::take(&mut *inc.handed.lock().unwrap_or_else(|p| p.into_inner()));
            for (id, machine, lease) in handed {
                self.log.push(format!(
                    "  exec {k} launches job {id} on {machine} under {lease}"
                ));
                let Some(first) = self.jobs.get_mut(&id) else {
                    return Err(format!("exec {k} launched job {id}, never submitted"));
                };
                match first {
                    None => *first = Some(lease.clone()),
                    Some(l) if *l == lease => self.stats.relaunches += 1,
                    Some(l) => {
                        return Err(format!(
                            "job {id} dispatched twice: launched under lease {l}, then under {lease} by exec {k}"
                        ));
                    }
                }
                if let Some(p) = self.procs.get(&id) {
                    return Err(format!(
                        "job {id} launched by exec {k} while its process (exec {}) still runs",
                        p.exec
                    ));
                }
                self.stats.launches += 1;
                self.procs.insert(
                    id,
                    Proc {
                        exec: k,
                        machine,
                        lease,
                        started: false,
                    },
                );
            }
        }
        Ok(())
    }

    // ---- invariants --------------------------------------------------------------------------

    async fn check(&mut self) -> Result<(), String> {
        // The jobs of earlier sequences are finished (checked at rest) and stay so: the newest
        // rows are this sequence's jobs, and any row nobody submitted would be among them.
        let rows = self
            .store
            .list(&ListFilter {
                limit: self.jobs.len() as u32,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("listing the jobs: {e}"))?;
        let rows: BTreeMap<i64, JobRow> = rows.into_iter().map(|r| (r.id, r)).collect();
        if rows.len() != self.jobs.len() || !rows.keys().eq(self.jobs.keys()) {
            let lost: Vec<&i64> = self.jobs.keys().filter(|j| !rows.contains_key(j)).collect();
            let unknown: Vec<&i64> = rows.keys().filter(|j| !self.jobs.contains_key(j)).collect();
            return Err(format!(
                "jobs lost: {lost:?}; jobs nobody submitted: {unknown:?}"
            ));
        }
        let machines = self
            .mars
            .store
            .list()
            .await
            .map_err(|e| format!("mars' machines: {e}"))?;
        let held: HashMap<MachineId, &Lease> = machines
            .iter()
            .filter_map(|m| m.lease.as_ref().map(|l| (m.id, l)))
            .collect();

        // The executor ended these jobs: their processes are killed (or never ran).
        self.procs
            .retain(|id, _| rows.get(id).is_some_and(|r| r.state != JobState::Finished));

        let mut on_machine: HashMap<MachineId, Vec<i64>> = HashMap::new();
        for row in rows.values() {
            match row.state {
                JobState::Queued => {
                    if row.machine_id.is_some() || row.lease_id.is_some() {
                        return Err(format!("job {} is queued with a machine: {row:?}", row.id));
                    }
                }
                JobState::Dispatched | JobState::Running => {
                    let (Some(m), Some(l)) = (row.machine_id, row.lease_id.as_deref()) else {
                        return Err(format!(
                            "job {} is {:?} without a machine and lease: {row:?}",
                            row.id, row.state
                        ));
                    };
                    if self.expired.contains_key(l) {
                        // mars took the lease back; the executor ends the job when it hears.
                        continue;
                    }
                    match held.get(&m) {
                        Some(lease) if lease.id == l && lease.job_id == row.id.to_string() => {}
                        other => {
                            return Err(format!(
                                "job {} is {:?} on {m} under lease {l}, which mars does not hold \
                                 for it (mars: {:?}): {row:?}",
                                row.id,
                                row.state,
                                other.map(|l| (&l.id, &l.job_id)),
                            ));
                        }
                    }
                    on_machine.entry(m).or_default().push(row.id);
                }
                JobState::Finished => {
                    if row.status.is_none() || row.finished_at.is_none() {
                        return Err(format!("job {} finished without a status: {row:?}", row.id));
                    }
                }
            }
        }
        if let Some((m, jobs)) = on_machine.iter().find(|(_, jobs)| jobs.len() > 1) {
            return Err(format!("machine {m} is given to jobs {jobs:?} at once"));
        }

        // Every lease mars holds is an active job's, or left to expire on purpose.
        for lease in held.values() {
            let Ok(job) = lease.job_id.parse::<i64>() else {
                return Err(format!("lease {} names no job: {lease:?}", lease.id));
            };
            let Some(row) = rows.get(&job) else {
                return Err(format!("lease {} for job {job}, never submitted", lease.id));
            };
            let active = matches!(row.state, JobState::Dispatched | JobState::Running);
            if active && row.lease_id.as_deref() == Some(lease.id.as_str()) {
                continue;
            }
            if self.strays_ok.contains(&lease.id) {
                continue;
            }
            if self.expired.contains_key(&lease.id) || lease.expires_at.millis() < 0 {
                // mars is taking it back (its expiry is claimed: the machine is being powered
                // off before it is freed).
                continue;
            }
            let dead_process = row.state == JobState::Finished
                && row.lease_id.as_deref() == Some(lease.id.as_str())
                && self.torn_down_by_executor(job).await?;
            if !(dead_process || self.cut_rounds) {
                return Err(format!(
                    "machine {} is leased ({}) to job {job}, which is {:?} under lease {:?}: the \
                     lease outlived its job",
                    lease.machine_id, lease.id, row.state, row.lease_id
                ));
            }
            self.stats.strays_left_to_expire += 1;
            self.strays_ok.insert(lease.id.clone());
        }

        // Each simulated process runs its job under the lease its job was recorded with.
        for (id, p) in &self.procs {
            let row = &rows[id];
            if row.machine_id != Some(p.machine) || row.lease_id.as_deref() != Some(&p.lease) {
                return Err(format!(
                    "job {id}'s process runs on {} under {}, the job is recorded {:?}",
                    p.machine, p.lease, row
                ));
            }
        }

        self.last_states = rows.iter().map(|(id, r)| (*id, r.state)).collect();
        self.last_cancel_requested = rows
            .values()
            .filter(|r| r.cancel_requested)
            .map(|r| r.id)
            .collect();
        self.last_leases = held.into_values().cloned().collect();
        self.quick_checking = machines
            .iter()
            .filter(|m| m.state == MachineState::QuickCheck && m.lease.is_none())
            .map(|m| m.id)
            .collect();
        Ok(())
    }

    /// Whether the executor ended job `id` for a dead process (its teardown, which leaves the
    /// lease to expire so that mars checks the machine).
    async fn torn_down_by_executor(&self, id: i64) -> Result<bool, String> {
        let events = self
            .store
            .events(id, 0)
            .await
            .map_err(|e| format!("job {id}'s events: {e}"))?;
        Ok(events.iter().any(|e| {
            e.kind == kind::EXECUTOR
                && e.data.get("action").and_then(|a| a.as_str()) == Some("teardown")
        }))
    }

    /// Every job of the sequence has one `dispatched` event if it was dispatched, none
    /// otherwise, under the lease it is recorded with (one query for the whole sequence).
    async fn check_dispatch_events(&self) -> Result<(), String> {
        let Some(first) = self.jobs.keys().next() else {
            return Ok(());
        };
        let rows = sqlx::query(
            "SELECT j.id, j.lease_id, j.dispatched_at, e.data FROM jobs j \
             LEFT JOIN job_events e ON e.job_id = j.id AND e.kind = $1 WHERE j.id >= $2",
        )
        .bind(kind::DISPATCHED)
        .bind(*first)
        .fetch_all(self.store.db().pool())
        .await
        .map_err(|e| format!("the dispatched events: {e}"))?;
        type Seen = (Option<String>, bool, Vec<Option<String>>);
        let mut jobs: BTreeMap<i64, Seen> = BTreeMap::new();
        for r in rows {
            let field = |e: sqlx::Error| format!("the dispatched events: {e}");
            let id: i64 = r.try_get(0).map_err(field)?;
            let lease: Option<String> = r.try_get(1).map_err(field)?;
            let at: Option<i64> = r.try_get(2).map_err(field)?;
            let data: Option<String> = r.try_get(3).map_err(field)?;
            let seen = jobs
                .entry(id)
                .or_insert_with(|| (lease, at.is_some(), Vec::new()));
            if let Some(data) = data {
                let data: serde_json::Value = serde_json::from_str(&data)
                    .map_err(|e| format!("job {id}'s dispatched event: {e}: {data}"))?;
                seen.2.push(data["lease_id"].as_str().map(String::from));
            }
        }
        for (id, (lease, dispatched, events)) in &jobs {
            let expected = usize::from(*dispatched);
            if events.len() != expected || events.iter().any(|l| l != lease) {
                return Err(format!(
                    "job {id} has {} dispatched events (leases {events:?}), recorded under {lease:?}",
                    events.len()
                ));
            }
        }
        Ok(())
    }

    // ---- drain -------------------------------------------------------------------------------

    /// Brings the world back to rest: every job finished, every lease released, every machine
    /// IDLE. A job that cannot be brought there is lost.
    async fn drain(&mut self) -> Result<(), String> {
        self.stats.drains += 1;
        self.log.push("drain".into());
        for _ in 0..DRAIN_PASSES {
            for k in 0..self.execs.len() {
                if self.execs[k].live.is_none() {
                    self.log.push(format!("  restart exec {k}"));
                    self.start_exec(k).await?;
                }
            }
            // Leases left to expire expire now; the quick checks of their machines pass.
            let strays: Vec<(String, i64)> = self
                .last_leases
                .iter()
                .filter(|l| {
                    let job: i64 = l.job_id.parse().unwrap_or(-1);
                    !matches!(
                        self.last_states.get(&job),
                        Some(JobState::Dispatched | JobState::Running)
                    )
                })
                .map(|l| (l.id.clone(), l.job_id.parse().unwrap_or(-1)))
                .collect();
            for (lease, job) in strays {
                let a = Action::Expire(lease, job);
                self.log.push(format!("  {a}"));
                let r = self.run_action(&a).await?;
                self.apply(&a, r).await?;
            }
            let checking: Vec<MachineId> = self
                .mars
                .store
                .list()
                .await
                .map_err(|e| format!("mars' machines: {e}"))?
                .into_iter()
                .filter(|m| m.state == MachineState::QuickCheck)
                .map(|m| m.id)
                .collect();
            for m in checking {
                let a = Action::QuickCheck(m);
                let r = self.run_action(&a).await?;
                self.apply(&a, r).await?;
            }
            // mars' events reach every executor, which dispatches what it can.
            for k in 0..self.execs.len() {
                let a = self.gen_events(k);
                let r = self.run_action(&a).await?;
                self.apply(&a, r).await?;
                let sched = self.live(k)?.sched.clone();
                let mut again = 0;
                while dispatch::round(&sched)
                    .await
                    .map_err(|e| format!("round of exec {k}: {e}"))?
                    == RoundOutcome::Again
                {
                    again += 1;
                    if again > 20 {
                        return Err(format!("exec {k} keeps asking for another round"));
                    }
                }
            }
            self.take_handovers()?;
            // Every job process ends.
            let ids: Vec<i64> = self.procs.keys().copied().collect();
            for id in ids {
                let a = Action::Finish(id);
                let r = self.run_action(&a).await?;
                self.apply(&a, r).await?;
            }
            self.settle_step().await?;
            let all_done = self.last_states.values().all(|s| *s == JobState::Finished);
            if all_done && self.last_leases.is_empty() {
                let machines = self
                    .mars
                    .store
                    .list()
                    .await
                    .map_err(|e| format!("mars' machines: {e}"))?;
                if let Some(m) = machines.iter().find(|m| m.state != MachineState::Idle) {
                    if m.state == MachineState::QuickCheck {
                        continue;
                    }
                    return Err(format!("machine {} is {} at rest", m.id, m.state));
                }
                self.check_dispatch_events().await?;
                for e in &mut self.execs {
                    e.pending_expiries.clear();
                }
                self.jobs.clear();
                self.expired.clear();
                self.strays_ok.clear();
                self.cut_rounds = false;
                return Ok(());
            }
        }
        let mut lost = Vec::new();
        for (id, state) in &self.last_states {
            if *state != JobState::Finished {
                let row = self.store.require(*id).await.map_err(|e| e.to_string())?;
                let events = self.store.events(*id, 0).await.map_err(|e| e.to_string())?;
                let events: Vec<String> = events
                    .iter()
                    .map(|e| format!("{} {} {}", e.kind, e.message, e.data))
                    .collect();
                lost.push(format!("{row:?}\n    events: {events:#?}"));
            }
        }
        Err(format!(
            "not at rest after {DRAIN_PASSES} drain passes: jobs lost:\n  {}\nleases held: {:?}",
            lost.join("\n  "),
            self.last_leases
        ))
    }
}

/// Registers machine `n`, gives it its PDU port and admits it (`IDLE`) without training.
async fn admit(
    mars: &dutgate_mars::machines::Mars,
    client: &MarsClient,
    id: MachineId,
    n: u8,
    tags: &[String],
) {
    client
        .register(&Registration {
            base_name: "dut".into(),
            tags: tags
                .iter()
                .map(|t| t.parse().expect("a machine tag"))
                .collect(),
            mac_address: id,
            ip_address: format!("10.42.0.{n}").parse().expect("an address"),
            local_tty_device: None,
        })
        .await
        .expect("machine registration");
    client
        .patch(
            id,
            &MachinePatch {
                pdu: Some(Some("pdu1".into())),
                pdu_port_id: Some(Some(n.to_string())),
                ..Default::default()
            },
        )
        .await
        .expect("the machine's PDU port");
    mars.store
        .trigger(
            id,
            MachineTrigger::TrainingPassed,
            &Cause::new("test", "admitted without training"),
            &|_| {},
        )
        .await
        .expect("the machine admitted");
}

/// Opens (and migrates) `schema` on the server at `url`, whose commits do not wait for the
/// disk: the worlds are thrown away, and a flush per commit would make a step wait on the
/// disk rather than on the protocol (as SQLite in tmpfs does not).
async fn open_postgres(url: &str, schema: &str, migrations: dutgate_core::db::Migrations) -> Db {
    let sep = if url.contains('?') { '&' } else { '?' };
    let unflushed = format!("{url}{sep}options[synchronous_commit]=off");
    Db::open_postgres(&unflushed, schema, migrations)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{POSTGRES_ENV}={url}: PostgreSQL is not usable ({e}); install and start the \
                 Debian package `postgresql` (or point {POSTGRES_ENV} at a running server)"
            )
        })
}
