//! The shared harness ([`dutgate_executor::testing`]) with this crate's job binary.

#![allow(dead_code)]

pub use dutgate_executor::testing::*;

/// The job process these tests' executors start.
pub const JOB: &str = env!("CARGO_BIN_EXE_dutgate-job");

/// [`Options`] whose executors start `dutgate-job <id>` per job.
pub fn options() -> Options {
    Options {
        job_command: Some(vec![JOB.into()]),
        ..Default::default()
    }
}
