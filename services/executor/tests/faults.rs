//! Fault tests with real processes (docs/architecture.md, "Dispatch and teardown protocol"):
//! the executor process aborted at each failpoint of a dispatch — after the lease, after the
//! record, after the launch — and started again; mars killed for longer than the lease TTL
//! while a job runs, then started again (the job goes on; or, its process killed too, its
//! lease expires after the restart grace with the machine powered off); salad gone while a
//! job runs (every connection of the job processes to it closed and refused, as a killed
//! salad's are), then back. After each, within a bounded time ([`checks::assert_nothing_left`]): every job ended exactly
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
use common::procs::{alive, sigkill, wait_gone};
use common::relay::SaladRelays;
use common::*;
use dutgate_core::JobStatus;
use dutgate_core::db::Db;
use dutgate_executor::model::{Event, JobState, kind};
use dutgate_executor::scheduler::FAILPOINT_ENV;
use dutgate_executor::store::Store;
use dutgate_mars::model::{Lease, MachineState, Timestamp};

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

/// A job on machine `n` that runs about 8 s after its DUT boots (`tick 1` … `tick 20`).
fn long_job(n: u16) -> String {
    job_yaml(&by_id(n), "long", "long", "", "")
}

/// Waits (bounded) until job `id`'s console shows the line `line`.
async fn wait_console_line(farm: &Farm, id: i64, line: &str) {
    let log = console_log(farm, id);
    let end = Instant::now() + T;
    let line = format!("{line}\r\n");
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains(&line)) {
        assert!(
            Instant::now() < end,
            "the job's console never showed {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The lease mars holds for job `id`.
async fn lease_of(farm: &Farm, id: i64) -> Lease {
    let leases = farm.mars.leases().await.expect("mars' leases");
    leases
        .into_iter()
        .find(|l| l.job_id == id.to_string())
        .unwrap_or_else(|| panic!("mars holds no lease for job {id}"))
}

/// While mars is away, reads its database (the farm's own handle on it) until the lease of
/// machine 1 has lapsed, i.e. the outage is longer than the lease TTL. Returns that lease.
async fn wait_lapsed(farm: &Farm, lease: &Lease) -> Lease {
    let end = Instant::now() + T;
    loop {
        let row = farm
            .mars_handle
            .store
            .get(mac(1))
            .await
            .expect("machine 1 in mars' database");
        let held = row
            .lease
            .filter(|l| l.id == lease.id)
            .unwrap_or_else(|| panic!("lease {} is gone while mars is away", lease.id));
        if held.expires_at < Timestamp::now() {
            return held;
        }
        assert!(
            Instant::now() < end,
            "lease {} never lapsed: {held:?}",
            lease.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    wait_console_line(&farm, id, "tick 1").await;
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

/// mars is killed (`kill -9`: every task of it gone at once) while a job runs, stays away
/// until the job's lease has lapsed in its database (longer than the TTL), and starts again
/// over the same database and port. The job's process is alive and heartbeats as soon as mars
/// answers: a lapsed lease whose expiry no sweeper claimed is still its holder's, and the
/// restart grace keeps any sweeper from claiming it first. The job passes with all of its
/// console, nothing is counted against the machine, nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mars_killed_for_longer_than_the_lease_ttl_while_a_job_runs() {
    let _one = ONE_FARM.lock().await;
    let mut farm = Farm::start(Options {
        machines: 1,
        lease_ttl: 3,
        lease_grace: 10,
        ..options()
    })
    .await;
    let id = farm.submit(&long_job(1), "").await;
    wait_console_line(&farm, id, "tick 1").await;
    let lease = lease_of(&farm, id).await;

    farm.kill_mars();
    wait_lapsed(&farm, &lease).await;
    // The job still runs: its DUT prints on.
    assert_eq!(farm.power(1), dutgate_core::PowerState::On);
    farm.start_mars().await;

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
    let console = farm.console(id).await;
    assert!(console.contains("tick 20\r\n"), "{console}");
    assert_eq!(console.matches("RESULT: PASS").count(), 1, "{console}");
    farm.wait_machine(mac(1), MachineState::Idle, T).await;
    let machine = farm.mars.machine(mac(1)).await.expect("the machine");
    assert_eq!(machine.consecutive_infra_failures, 0, "{machine:#?}");
    assert_nothing_left(&farm, &farm.mars, &[id], T).await;
    farm.stop().await;
}

/// The restart grace in these tests (seconds).
const GRACE: u64 = 4;

/// mars, the executor and the job's process are all killed (`kill -9`) while the job runs;
/// the DUT stays powered, running the dead job's code. mars starts again after the job's
/// lease lapsed: the lease first gets the restart grace (its holder might come back), then
/// expires — and mars powers the machine off (read from the PDU) before it frees it to
/// `QUICK_CHECK`, counting an infrastructure failure. The executor, started again, ends the
/// job `INCOMPLETE` and clears its boot config: nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_lapsed_while_mars_was_away_expires_after_the_grace_with_a_power_off() {
    let _one = ONE_FARM.lock().await;
    let mut farm = Farm::start(Options {
        machines: 1,
        lease_ttl: 3,
        lease_grace: GRACE,
        ..options()
    })
    .await;
    let id = farm.submit(&long_job(1), "").await;
    wait_console_line(&farm, id, "tick 1").await;
    let lease = lease_of(&farm, id).await;
    let pid = farm.job_pid(id).await;

    farm.kill_mars();
    farm.kill_executor(0);
    sigkill(pid);
    wait_gone(pid, T, "the job process").await;
    wait_lapsed(&farm, &lease).await;
    assert_eq!(farm.power(1), dutgate_core::PowerState::On);

    let restarted = Timestamp::now();
    farm.start_mars().await;
    // The grace: the lapsed lease is kept, its expiry moved to GRACE after the restart.
    let end = Instant::now() + T;
    loop {
        let machine = farm.mars.machine(mac(1)).await.expect("the machine");
        let held = machine
            .lease
            .as_ref()
            .filter(|l| l.id == lease.id)
            .unwrap_or_else(|| {
                panic!("the lapsed lease was not given the restart grace: {machine:#?}")
            });
        if held.expires_at.millis() >= restarted.millis() + GRACE as i64 * 1000 {
            break;
        }
        assert!(Instant::now() < end, "no grace given: {held:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then it expires, the machine off first.
    let machine = loop {
        let machine = farm.mars.machine(mac(1)).await.expect("the machine");
        if machine.lease.is_none() {
            break machine;
        }
        assert!(
            Instant::now() < end,
            "the lease never expired: {machine:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let waited = Timestamp::now().millis() - restarted.millis();
    assert!(
        waited >= GRACE as i64 * 1000,
        "the lease expired {waited} ms after the restart, within the grace"
    );
    // Nobody but mars was left to power it off.
    assert_eq!(farm.power(1), dutgate_core::PowerState::Off);
    assert_eq!(machine.state, MachineState::QuickCheck, "{machine:#?}");
    assert_eq!(machine.consecutive_infra_failures, 1, "{machine:#?}");

    farm.start_executor(0).await;
    let job = farm.wait_finished(id, T).await;
    let events = farm.events(id).await;
    assert_eq!(
        job.status,
        Some(JobStatus::Incomplete),
        "{:#?}",
        kinds(&events)
    );
    assert_eq!(
        count(&events, kind::PROCESS_STARTED),
        1,
        "{:#?}",
        kinds(&events)
    );
    assert_nothing_left(&farm, &farm.mars, &[id], T).await;
    farm.stop().await;
}
