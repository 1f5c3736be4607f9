//! The shared harness ([`dutgate_executor::testing`]) with this crate's job binary, and what
//! the process and fault tests share: the processes they kill ([`procs`]), the checks that
//! nothing of a fault is left ([`checks`]), and peers they take down: a mars of its own
//! ([`mars`]) and relays in front of salad ([`relay`]).

#![allow(dead_code)]

pub mod checks;
pub mod procs;
pub mod relay;

pub use dutgate_executor::testing::*;

use std::path::PathBuf;

use dutgate_executor::model::Event;

/// The job process these tests' executors start.
pub const JOB: &str = env!("CARGO_BIN_EXE_dutgate-job");

/// [`Options`] whose executors start `dutgate-job <id>` per job.
pub fn options() -> Options {
    Options {
        job_command: Some(vec![JOB.into()]),
        ..Default::default()
    }
}

/// The `target:` of a job for machine `n` of the farm.
pub fn by_id(n: u16) -> String {
    format!("  id: \"{}\"", mac(n))
}

/// A job's events as `kind: message` lines, for failure messages.
pub fn kinds(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{}: {}", e.kind, e.message))
        .collect()
}

/// A job for machine `n` whose DUT prints `tick 1` … `tick 8`, 400 ms apart, then passes
/// (about 4 s): long enough for a fault to strike while it runs.
pub fn slow_job(n: u16) -> String {
    job_yaml(&by_id(n), "slow", "slow", "", "")
}

/// Job `id`'s console log, as its process writes it.
pub fn console_log(farm: &Farm, id: i64) -> PathBuf {
    job_dir(farm, id).join("console.log")
}

/// What job `id`'s process printed (its log lines, its errors), for failure messages.
pub fn process_log(farm: &Farm, id: i64) -> String {
    std::fs::read_to_string(job_dir(farm, id).join("process.log")).unwrap_or_default()
}

fn job_dir(farm: &Farm, id: i64) -> PathBuf {
    dutgate_executor::process::job_dir(&dutgate_executor::process::executor_state_dir(&farm.gw), id)
}
