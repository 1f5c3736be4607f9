//! Acceptance: `kill -9` of the executor process mid-job (the job finishes and its result and
//! events are visible through the restarted executor); `kill -9` of a job process, under no
//! executor and under the running one (INCOMPLETE, powered off, QUICK_CHECK; after each, no
//! lease, no boot config and no powered machine is left: `checks::assert_nothing_left`).
//!
//! The executor runs as a separate OS process: this test binary re-executed as
//! `<binary> executor-process`, which runs the same service entry as `dutgate executor`
//! (`dutgate_executor::run`) from a gateway config file. Hence its own `main`
//! (`harness = false`). Its job processes are `dutgate-job`.

mod common;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::checks::assert_nothing_left;
use common::procs::{alive, sigkill};
use common::*;
use dutgate_core::{JobStatus, PowerState};
use dutgate_executor::model::Event;
use dutgate_mars::model::MachineState;

const T: Duration = Duration::from_secs(60);

async fn executor_process_kill_and_job_process_kill() {
    let mut farm = Farm::start(Options {
        machines: 2,
        executor_mode: ExecutorMode::this_binary(),
        ..options()
    })
    .await;
    let first = farm.executors[0].pid().expect("the executor is a process") as i32;
    let survivor = farm.submit(&slow_job(1), "").await;
    let victim = farm.submit(&slow_job(2), "").await;
    for id in [survivor, victim] {
        farm.wait_phase(id, "running", T).await;
    }
    let survivor_pid = farm.job_pid(survivor).await;
    let victim_pid = farm.job_pid(victim).await;
    // Job processes run below the services' priority (executor.job_nice, default 5).
    for pid in [survivor_pid, victim_pid] {
        assert_eq!(niceness(pid) - niceness(first), 5, "job process {pid}");
    }

    // kill -9 of the executor process.
    sigkill(first);
    let status = farm.reap_executor(0).expect("the executor process ended");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    // Its job processes keep running, and the job goes on: its console grows while no
    // executor is there.
    let console = console_log(&farm, survivor);
    let len = || std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
    let before = len();
    let end = Instant::now() + Duration::from_secs(10);
    while len() == before {
        assert!(
            Instant::now() < end,
            "the job's console did not grow without an executor"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        alive(survivor_pid),
        "job process {survivor_pid} died with the executor"
    );
    assert!(
        alive(victim_pid),
        "job process {victim_pid} died with the executor"
    );
    assert_eq!(farm.power(1), PowerState::On);
    // And one job process dies while no executor watches it.
    sigkill(victim_pid);

    // A new executor process: it re-attaches to the survivor.
    farm.start_executor(0).await;
    let second = farm.executors[0].pid().expect("the executor is a process") as i32;
    assert_ne!(first, second);
    // The live console through the new executor follows the job to its end.
    let streamed = tokio::time::timeout(T, async {
        farm.get(&format!("/api/v1/jobs/{survivor}/console"))
            .await
            .bytes()
            .await
            .unwrap()
    })
    .await
    .expect("the live console ends with the job");
    let streamed = String::from_utf8_lossy(&streamed).into_owned();
    assert!(streamed.contains("SESSION END"), "{streamed}");
    let job = farm.wait_finished(survivor, T).await;
    let events = farm.events(survivor).await;
    assert_eq!(job.status, Some(JobStatus::Pass), "{:#?}", kinds(&events));
    assert_eq!(streamed, farm.console(survivor).await);
    for n in 1..=8 {
        assert_eq!(streamed.matches(&format!("tick {n}\r\n")).count(), 1);
    }
    let attached = events
        .iter()
        .position(|e| e.kind == "executor" && e.data["action"] == "attached")
        .unwrap_or_else(|| panic!("no re-attach event: {:#?}", kinds(&events)));
    assert_eq!(
        events[attached].data["pid"],
        survivor_pid,
        "{:#?}",
        kinds(&events)
    );
    // The job's own events after the re-attach are there, up to its end.
    assert!(
        events[attached..].iter().any(|e| e.kind == "finished"),
        "{:#?}",
        kinds(&events)
    );
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    farm.wait_machine(mac(1), MachineState::Idle, T).await;
    assert_eq!(farm.power(1), PowerState::Off);

    let job = farm.wait_finished(victim, T).await;
    assert_eq!(job.status, Some(JobStatus::Incomplete));
    assert!(
        job.reason.as_deref().unwrap().contains("job process died"),
        "{job:#?}"
    );
    assert_eq!(farm.power(2), PowerState::Off);
    farm.wait_machine(mac(2), MachineState::QuickCheck, Duration::from_secs(15))
        .await;

    // A job process killed under a running executor (which started it).
    let id = farm.submit(&slow_job(1), "").await;
    farm.wait_phase(id, "running", T).await;
    let pid = farm.job_pid(id).await;
    sigkill(pid);
    let job = farm.wait_finished(id, T).await;
    assert_eq!(job.status, Some(JobStatus::Incomplete));
    assert!(
        job.reason.as_deref().unwrap().contains("signal 9"),
        "{job:#?}"
    );
    assert_eq!(farm.power(1), PowerState::Off);
    farm.wait_machine(mac(1), MachineState::QuickCheck, Duration::from_secs(15))
        .await;
    assert!(farm.mars.leases().await.unwrap().is_empty());
    // Of the three jobs, nothing is left: no lease, no boot config, both machines off.
    assert_nothing_left(&farm, &farm.mars, &[survivor, victim, id], T).await;

    // The trainer's verification boot goes through the queue with its privilege: a user may
    // not submit one, the admin (mars' runner) may, and it runs on the QUICK_CHECK machine.
    let pass = job_yaml(&by_id(1), "pass", "pass", "", "");
    assert_eq!(
        farm.submit_raw(&pass, "?purpose=training").await.status(),
        403
    );
    let runner = farm.client();
    use dutgate_mars::training::JobRunner;
    let jid = JobRunner::submit(&runner, mac(1), &pass).await.unwrap();
    let out = JobRunner::wait(&runner, &jid).await.unwrap();
    assert_eq!(out.status, JobStatus::Pass, "{out:?}");
    assert!(
        out.console_log_url
            .unwrap()
            .ends_with("/artifacts/console.log")
    );
    // Its outcome is the trainer's to judge: the machine is still in QUICK_CHECK.
    assert_eq!(
        farm.mars.machine(mac(1)).await.unwrap().state,
        MachineState::QuickCheck
    );
    assert!(farm.mars.leases().await.unwrap().is_empty());

    // Nothing outlives the farm.
    let training_pid = farm.job_pid(jid.parse().unwrap()).await;
    farm.stop().await;
    for pid in [first, second, survivor_pid, victim_pid, pid, training_pid] {
        assert!(!alive(pid), "process {pid} outlived the test");
    }
}

/// The executor dies after starting a job process but before that process recorded its pid
/// (the job is still `dispatched`): the next executor follows that process instead of starting
/// a second one for the same job.
async fn executor_killed_before_its_job_process_started() {
    // The job process takes 5 s to get going (`sh` sleeps, then becomes `dutgate-job`), well
    // within its lease's TTL.
    let mut farm = Farm::start(Options {
        machines: 1,
        lease_ttl: 15,
        executor_mode: ExecutorMode::this_binary(),
        job_command: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "sleep 5; exec \"$0\" \"$@\"".into(),
            JOB.into(),
        ]),
        ..options()
    })
    .await;
    let first = farm.executors[0].pid().expect("the executor is a process") as i32;
    let id = farm
        .submit(&job_yaml(&by_id(1), "pass", "pass", "", ""), "")
        .await;
    let end = Instant::now() + T;
    let pid = loop {
        let events = farm.events(id).await;
        if let Some(pid) = events
            .iter()
            .find(|e| e.kind == "process_started")
            .and_then(|e| e.data["pid"].as_i64())
        {
            break pid as i32;
        }
        assert!(Instant::now() < end, "the job process never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    sigkill(first);
    farm.reap_executor(0);
    // Still the wrapper: the job process has not recorded anything yet.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.starts_with(b"/bin/sh\0"), "{cmdline:?}");
    farm.start_executor(0).await;
    assert_eq!(
        farm.job(id).await.state,
        dutgate_executor::model::JobState::Dispatched,
        "the restart must happen while the process still sleeps"
    );

    let job = farm.wait_finished(id, T).await;
    let events = farm.events(id).await;
    assert_eq!(job.status, Some(JobStatus::Pass), "{:#?}", kinds(&events));
    let started: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == "process_started")
        .collect();
    assert_eq!(
        started.len(),
        1,
        "one process per job: {:#?}",
        kinds(&events)
    );
    assert!(
        events.iter().any(|e| e.kind == "executor"
            && e.data["action"] == "attached"
            && e.data["pid"] == pid),
        "{:#?}",
        kinds(&events)
    );
    assert_eq!(farm.console(id).await.matches("RESULT: PASS").count(), 1);
    farm.wait_machine(mac(1), MachineState::Idle, T).await;
    assert_nothing_left(&farm, &farm.mars, &[id], T).await;
    let second = farm.executors[0].pid().unwrap() as i32;
    farm.stop().await;
    for pid in [first, second, pid] {
        assert!(!alive(pid), "process {pid} outlived the test");
    }
}

type TestFn = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn main() -> ExitCode {
    if let Some(code) = executor_process_main() {
        return code;
    }
    let args: Vec<String> = std::env::args().collect();
    let tests: [(&str, TestFn); 2] = [
        ("executor_process_kill_and_job_process_kill", || {
            Box::pin(executor_process_kill_and_job_process_kill())
        }),
        ("executor_killed_before_its_job_process_started", || {
            Box::pin(executor_killed_before_its_job_process_started())
        }),
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let selected: Vec<_> = tests
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in selected {
        let start = Instant::now();
        // A panic unwinds through the farm, whose drop kills the executor and job processes.
        let ok = rt.block_on(async { tokio::spawn(f()).await.is_ok() });
        println!(
            "test {name} ... {} ({:.1} s)",
            if ok { "ok" } else { "FAILED" },
            start.elapsed().as_secs_f64()
        );
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    println!(
        "test result: {}. {passed} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(101)
    }
}

/// The nice value of `pid` (field 19 of /proc/<pid>/stat).
fn niceness(pid: i32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) may hold spaces: count from its closing parenthesis.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split_whitespace().nth(16).unwrap().parse().unwrap()
}
