//! HELP texts and units of the executor's metrics (docs/metrics.md lists them with their
//! labels). Exported as `dutgate_<name>`: the recorder adds the namespace
//! (`dutgate_core::telemetry`).

use metrics::{Unit, describe_counter, describe_histogram};

/// Describes the executor's metrics, and those of the S3 client it uses for job buckets, to
/// the process' recorder, installing it first: a description given before the recorder exists
/// goes nowhere.
pub fn describe() {
    let _ = dutgate_core::telemetry::metrics_handle();
    dutgate_storage::telemetry::describe_client();
    describe_counter!(
        "executor_jobs_submitted_total",
        Unit::Count,
        "Jobs accepted into the queue."
    );
    describe_counter!(
        "executor_jobs_dispatched_total",
        Unit::Count,
        "Jobs dispatched: a machine leased for them and the dispatch recorded."
    );
    describe_counter!(
        "executor_jobs_finished_total",
        Unit::Count,
        "Jobs that reached their final status, by status."
    );
    describe_counter!(
        "executor_dispatch_batches_total",
        Unit::Count,
        "Dispatch batches: one lease request to mars for up to 256 planned jobs."
    );
    describe_histogram!(
        "executor_dispatch_seconds",
        Unit::Seconds,
        "Per dispatched job: time from its batch's lease request to its dispatch being recorded."
    );
    describe_histogram!(
        "executor_dispatch_step_seconds",
        Unit::Seconds,
        "Time of one step of the scheduler: a whole round, planning it, a batch's lease request, recording a batch."
    );
    describe_histogram!(
        "executor_mars_event_delay_seconds",
        Unit::Seconds,
        "How long after a machine change in mars the executor learned of it."
    );
    describe_counter!(
        "executor_job_processes_started_total",
        Unit::Count,
        "Job processes started."
    );
    describe_counter!(
        "executor_job_processes_died_total",
        Unit::Count,
        "Job processes that ended without storing their job's final status."
    );
    describe_counter!(
        "executor_job_dirs_expired_total",
        Unit::Count,
        "Job directories deleted by the retention sweep (executor.artifacts_retention_days)."
    );
}
