//! Teardown always has what it needs and always runs (docs/jobs.md §6): the executor's own
//! teardown of a dead job process works with the tokens `dutgate up` keeps in files; a job
//! cannot shorten its teardown below the floor; a cancellation reaches a job that another
//! executor sharing the database runs.

mod common;

use std::time::{Duration, Instant};

use common::*;
use dutgate_boot::client::BootClient;
use dutgate_core::{JobStatus, PowerState, Secret};
use dutgate_executor::model::Event;
use dutgate_mars::model::MachineState;

const T: Duration = Duration::from_secs(60);

fn step_ok(events: &[Event], step: &str) -> bool {
    events
        .iter()
        .any(|e| e.kind == "teardown" && e.data["step"] == step && e.data["ok"] == true)
}

/// `kill -9` of a job process under an executor whose config holds no token (they are in
/// `<state>/tokens/`, as `dutgate up` writes them): the executor's teardown still powers the
/// machine off and clears its boot config.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_job_is_torn_down_with_the_token_files() {
    let farm = Farm::start(Options {
        machines: 1,
        tokens_in_files: true,
        ..options()
    })
    .await;
    assert!(farm.exec_gw.auth.admin_token.is_none());
    let id = farm.submit(&slow_job(1), "").await;
    farm.wait_phase(id, "running", T).await;
    assert_eq!(farm.power(1), PowerState::On);
    let boot = BootClient::new(
        format!("http://127.0.0.1:{}", farm.gw.ports.boot),
        Some(Secret::new(ADMIN)),
    );
    assert!(boot.get(mac(1)).await.unwrap().is_some());
    common::procs::sigkill(farm.job_pid(id).await);
    let job = farm.wait_finished(id, T).await;
    let events = farm.events(id).await;
    assert_eq!(
        job.status,
        Some(JobStatus::Incomplete),
        "{:#?}",
        kinds(&events)
    );
    assert!(step_ok(&events, "power_off"), "{:#?}", kinds(&events));
    assert!(
        step_ok(&events, "clear_boot_config"),
        "{:#?}",
        kinds(&events)
    );
    assert_eq!(farm.power(1), PowerState::Off);
    assert!(boot.get(mac(1)).await.unwrap().is_none());
    farm.wait_machine(mac(1), MachineState::QuickCheck, T).await;
    common::checks::assert_nothing_left(&farm, &farm.mars, &[id], T).await;
    farm.stop().await;
}

/// `timeouts.infra_teardown: {seconds: 0}` does not skip the teardown: the machine is
/// powered off and its lease released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zero_infra_teardown_still_tears_down() {
    let farm = Farm::start(Options {
        machines: 1,
        ..options()
    })
    .await;
    let id = farm
        .submit(
            &job_yaml(
                &by_id(1),
                "slow",
                "slow",
                "  infra_teardown: {seconds: 0}",
                "",
            ),
            "",
        )
        .await;
    let job = farm.wait_finished(id, T).await;
    let events = farm.events(id).await;
    assert_eq!(job.status, Some(JobStatus::Pass), "{:#?}", kinds(&events));
    for step in ["power_off", "clear_boot_config", "release_lease"] {
        assert!(step_ok(&events, step), "{step}: {:#?}", kinds(&events));
    }
    assert!(
        !events.iter().any(|e| e.data["step"] == "infra_teardown"),
        "{:#?}",
        kinds(&events)
    );
    assert_eq!(farm.power(1), PowerState::Off);
    farm.wait_machine(mac(1), MachineState::Idle, T).await;
    assert!(farm.mars.leases().await.unwrap().is_empty());
    farm.stop().await;
}

/// Two executors on one queue: a cancellation asked of the executor that does not run the
/// job reaches the job's process within seconds (its executor finds the flag in the store),
/// and the job is torn down as any cancelled job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_reaches_a_job_run_by_another_executor() {
    let farm = Farm::start(Options {
        machines: 1,
        executors: 2,
        ..options()
    })
    .await;
    let id = farm.submit(&slow_job(1), "").await;
    farm.wait_phase(id, "running", T).await;
    let events = farm.events(id).await;
    let runner = events
        .iter()
        .find(|e| e.kind == "dispatched")
        .and_then(|e| e.data["executor"].as_str())
        .unwrap_or_else(|| panic!("no dispatching executor: {:#?}", kinds(&events)))
        .to_string();
    let other = farm
        .executors
        .iter()
        .find(|e| e.name != runner)
        .expect("the other executor");
    let asked = Instant::now();
    let r = farm
        .http
        .post(format!("{}/api/v1/jobs/{id}/cancel", other.url))
        .bearer_auth(USER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job = farm.wait_finished(id, T).await;
    let took = asked.elapsed();
    let events = farm.events(id).await;
    assert_eq!(
        (job.status, job.reason.as_deref()),
        (Some(JobStatus::Incomplete), Some("cancelled")),
        "{:#?}",
        kinds(&events)
    );
    // The process was signalled (its own teardown ran, lease released), not left to end.
    assert!(step_ok(&events, "release_lease"), "{:#?}", kinds(&events));
    assert!(took < Duration::from_secs(10), "the cancel took {took:?}");
    assert_eq!(farm.power(1), PowerState::Off);
    farm.wait_machine(mac(1), MachineState::Idle, T).await;
    farm.stop().await;
}
