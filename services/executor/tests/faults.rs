//! Fault tests with real processes (docs/architecture.md, "Dispatch and teardown protocol"):
//! the executor process aborted at each failpoint of a dispatch — after the lease, after the
//! record, after the launch — and started again; mars killed for longer than the lease TTL
//! while a job runs, then started again; salad gone while a job runs (every connection of
//! the job processes to it closed and refused, as a killed salad's are), then back. After
//! each, within a bounded time ([`checks::assert_nothing_left`]): every job ended exactly
//! once and ran at most once, no lease outlives its job, and no machine is powered (as its
//! PDU reads) or keeps a boot config while no job holds it. (`kill -9` of a job process is
//! in `process_deaths.rs`.)
//!
//! The executor processes of the failpoint tests are this test binary: libtest runs the
//! ignored test [`executor_process`] in them ([`executor_mode`]), with the failpoint in their
//! environment (`DUTGATE_EXECUTOR_FAILPOINT`, see `dutgate_executor::scheduler`).

mod common;

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::checks::assert_nothing_left;
use common::procs::{alive, wait_gone};
use common::relay::SaladRelays;
use common::*;
use dutgate_core::JobStatus;
use dutgate_core::db::Db;
use dutgate_executor::model::{Event, JobState, kind};
use dutgate_executor::scheduler::FAILPOINT_ENV;
use dutgate_executor::store::Store;
use dutgate_mars::model::MachineState;

const T: Duration = Duration::from_secs(60);

/// One farm at a time: the scenarios' timings (leases of a few seconds) are meant for two
/// cores, not for several farms sharing them.
static ONE_FARM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This test binary as an executor process (libtest runs [`executor_process`] in it), with
/// `failpoint` in its environment.
fn executor_mode(failpoint: Option<&str>) -> ExecutorMode {
    let mut argv: Vec<OsString> = Vec::new();
    if let Some(point) = failpoint {
        // `env` execs the executor: the process the farm started (its pid, its group) is
        // the executor itself.
        argv.push("/usr/bin/env".into());
        argv.push(format!("{FAILPOINT_ENV}={point}").into());
    }
    argv.push(
        std::env::current_exe()
            .expect("the test binary's path")
            .into(),
    );
    // `executor-process` first, as `executor_process_main` wants it; for libtest it is a
    // filter that matches nothing, and `executor_process` (exactly) the one test to run.
    for arg in [
        EXECUTOR_PROCESS_ARG,
        "executor_process",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ] {
        argv.push(arg.into());
    }
    ExecutorMode::Process(argv)
}

/// The executor process of the failpoint tests, which start it ([`executor_mode`]). Run
/// otherwise, it has nothing to do.
#[test]
#[ignore = "the executor process that the failpoint tests start"]
fn executor_process() {
    if let Some(code) = executor_process_main() {
        std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
    }
}

/// Starts the farm's executor again, with its config changed by `change`.
async fn restart_executor(farm: &mut Farm, change: impl FnOnce(&mut dutgate_executor::Config)) {
    farm.kill_executor(0);
    change(&mut farm.exec_cfg);
    farm.start_executor(0).await;
}

fn count(events: &[Event], kind: &str) -> usize {
    events.iter().filter(|e| e.kind == kind).count()
}

/// The executor process aborts at `failpoint` while it dispatches a job to the farm's one
/// machine (mars' lease TTL `lease_ttl` s) and is started again: the job runs exactly once
/// and passes, the machine ends `IDLE` (nothing counted against it), nothing is left.
async fn executor_aborted_at(failpoint: &str, lease_ttl: u64) {
    let _one = ONE_FARM.lock().await;
    let mut farm = Farm::start(Options {
        machines: 1,
        lease_ttl,
        executor_mode: executor_mode(Some(failpoint)),
        ..options()
    })
    .await;
    let pid = farm.executors[0].pid().expect("the executor is a process") as i32;
    let id = farm.submit(&slow_job(1), "").await;
    wait_gone(pid, T, &format!("the executor at failpoint {failpoint}")).await;
    let status = farm.reap_executor(0).expect("the executor process ended");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status}");

    // What the aborted dispatch left, read from the store and mars directly.
    let db = Db::open_for_service(
        "executor",
        &farm.exec_gw,
        dutgate_executor::store::MIGRATIONS,
    )
    .await
    .expect("the executor's database");
    let store = Store::new(db.clone());
    let row = store.require(id).await.expect("the job");
    let events = store.events(id, 0).await.expect("the job's events");
    db.close().await;
    let leases = farm.mars.leases().await.expect("mars' leases");
    let lease = leases
        .iter()
        .find(|l| l.job_id == id.to_string())
        .unwrap_or_else(|| panic!("{failpoint}: mars holds no lease for job {id}: {leases:?}"));
    match failpoint {
        "after_lease" => {
            assert_eq!(
                (row.state, row.lease_id.as_deref()),
                (JobState::Queued, None)
            );
        }
        "after_record" => {
            assert_eq!(row.state, JobState::Dispatched);
            assert_eq!(row.lease_id.as_deref(), Some(lease.id.as_str()));
            assert_eq!(count(&events, kind::PROCESS_STARTED), 0, "{events:#?}");
        }
        "after_launch" => {
            assert_eq!(row.lease_id.as_deref(), Some(lease.id.as_str()));
            assert_eq!(count(&events, kind::PROCESS_STARTED), 1, "{events:#?}");
        }
        other => panic!("unknown failpoint {other}"),
    }
    let job_pid = events
        .iter()
        .find(|e| e.kind == kind::PROCESS_STARTED)
        .and_then(|e| e.data["pid"].as_i64());

    farm.executor_mode = executor_mode(None);
    farm.start_executor(0).await;
    let job = farm.wait_finished(id, T).await;
    let events = farm.events(id).await;
    assert_eq!(
        job.status,
        Some(JobStatus::Pass),
        "{:#?}\n{}",
        kinds(&events),
        process_log(&farm, id)
    );
    assert_eq!(count(&events, kind::DISPATCHED), 1, "{:#?}", kinds(&events));
    assert_eq!(
        count(&events, kind::PROCESS_STARTED),
        1,
        "{:#?}",
        kinds(&events)
    );
    assert_eq!(farm.console(id).await.matches("RESULT: PASS").count(), 1);
    if let Some(job_pid) = job_pid {
        // The process the aborted executor started ran the job: the new one never started
        // another.
        assert_eq!(farm.job_pid(id).await, job_pid as i32);
    }
    farm.wait_machine(mac(1), MachineState::Idle, T).await;
    let machine = farm.mars.machine(mac(1)).await.expect("the machine");
    assert_eq!(machine.consecutive_infra_failures, 0, "{machine:#?}");
    assert_nothing_left(&farm, &farm.mars, &[id], T).await;
    let second = farm.executors[0].pid().expect("the executor is a process") as i32;
    farm.stop().await;
    assert!(!alive(second), "executor {second} outlived the test");
}

/// Aborted right after mars granted the lease, before the record: the job is still queued
/// and the lease is named by no record. The next run gives that lease back untouched (no
/// expiry, no `QUICK_CHECK`) and dispatches the job again. The TTL leaves the restart time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executor_aborted_after_the_lease() {
    executor_aborted_at("after_lease", 10).await;
}

/// Aborted right after the record, before the launch: the next run renews the lease and
/// starts the job's process. The job (about 4 s) outlasts the 3 s TTL: it holds the machine
/// only if its process heartbeats in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executor_aborted_after_the_record() {
    executor_aborted_at("after_record", 3).await;
}

/// Aborted right after the launch: the job process goes on alone, and the next run follows it
/// (or finds it finished) without starting another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executor_aborted_after_the_launch() {
    executor_aborted_at("after_launch", 5).await;
}

/// salad goes away while a job runs (the job's console connection closes, its API and
/// console port refuse: the [`SaladRelays`] are cut; the DUT side of salad stays up) and
/// comes back: the job's console reconnects and the job ends with its verdict; the lines
/// printed meanwhile are missing from its console; nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn salad_killed_while_a_job_runs() {
    let _one = ONE_FARM.lock().await;
    let mut farm = Farm::start(Options {
        machines: 1,
        ..options()
    })
    .await;
    let salad = SaladRelays::start(&farm).await;
    restart_executor(&mut farm, |cfg| salad.route(cfg)).await;

    let id = farm.submit(&slow_job(1), "").await;
    let log = console_log(&farm, id);
    let end = Instant::now() + T;
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("tick 1\r\n")) {
        assert!(
            Instant::now() < end,
            "the job's console never showed tick 1"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    salad.cut();
    // The outage itself: longer than a console line's interval (400 ms), shorter than what
    // is left of the script (about 3 s).
    tokio::time::sleep(Duration::from_millis(600)).await;
    salad.restore();

    let job = farm.wait_finished(id, T).await;
    let events = farm.events(id).await;
    assert_eq!(job.status, Some(JobStatus::Pass), "{:#?}", kinds(&events));
    let console = farm.console(id).await;
    assert_eq!(console.matches("RESULT: PASS").count(), 1, "{console}");
    let ticks = (1..=8)
        .filter(|n| console.contains(&format!("tick {n}\r\n")))
        .count();
    assert!(ticks < 8, "the outage did not reach the job: {console}");
    farm.wait_machine(mac(1), MachineState::Idle, T).await;
    assert_nothing_left(&farm, &farm.mars, &[id], T).await;
    farm.stop().await;
}
