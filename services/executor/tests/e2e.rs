//! End to end: real services, real job processes, simulated DUTs (docs/jobs.md).

mod common;

use std::time::Duration;

use common::*;
use dutgate_core::{JobStatus, PowerState};
use dutgate_mars::model::MachineState;

const T: Duration = Duration::from_secs(60);

fn by_id(n: u8) -> String {
    format!("  id: \"{}\"", mac(n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statuses_from_simulated_behaviour() {
    let farm = Farm::start(Options {
        machines: 2,
        ..Default::default()
    })
    .await;
    let id = farm
        .submit(&job_yaml(&by_id(1), "pass", "pass", "", ""), "")
        .await;
    let job = farm.wait_finished(id, T).await;
    let events: Vec<String> = farm
        .events(id)
        .await
        .iter()
        .map(|e| format!("{}: {}", e.kind, e.message))
        .collect();
    assert_eq!(job.status, Some(JobStatus::Pass), "{job:#?} {events:#?}");
    for e in farm.events(id).await { eprintln!("{} {} {}", e.at, e.kind, e.message); }
    farm.stop().await;
}
