//! HELP texts and units of the executor's metrics (docs/metrics.md lists them with their
//! labels). Exported as `dutgate_<name>`: the recorder adds the namespace
//! (`dutgate_core::telemetry`).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

use crate::store::JobRow;

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
    describe_histogram!(
        "executor_job_queue_wait_seconds",
        Unit::Seconds,
        "Time ended jobs waited in the queue: from submission to dispatch (or to their end, for jobs that never left the queue), by final status."
    );
    describe_histogram!(
        "executor_job_duration_seconds",
        Unit::Seconds,
        "Time ended jobs held their machine: from dispatch to their final status, by final status."
    );
    describe_gauge!(
        "executor_queued_jobs",
        Unit::Count,
        "Jobs waiting in the queue, by kind of target: machine (one machine named), tags (a tag set), any (no constraint)."
    );
    describe_counter!(
        "executor_webhook_deliveries_total",
        Unit::Count,
        "Webhook deliveries that ended, by outcome: delivered, failed (every attempt failed), refused (the outbound policy refused the destination)."
    );
    describe_counter!(
        "executor_webhook_retries_total",
        Unit::Count,
        "Webhook delivery attempts that failed and were tried again after a back-off."
    );
}

/// Counts an ended job by its final status, with its queue wait and its duration. Called once
/// per job, in the long-lived executor ([`crate::webhooks::Ended`]).
pub fn job_ended(row: &JobRow) {
    let status = row.status.map_or("UNKNOWN", |s| s.as_str());
    metrics::counter!("executor_jobs_finished_total", "status" => status).increment(1);
    let end = row.finished_at.unwrap_or_else(crate::store::now_ms);
    let left_queue = row.dispatched_at.unwrap_or(end);
    let wait = (left_queue - row.submitted_at).max(0) as f64 / 1000.0;
    metrics::histogram!("executor_job_queue_wait_seconds", "status" => status).record(wait);
    if let Some(dispatched) = row.dispatched_at {
        let held = (end - dispatched).max(0) as f64 / 1000.0;
        metrics::histogram!("executor_job_duration_seconds", "status" => status).record(held);
    }
}
