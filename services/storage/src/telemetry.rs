//! HELP texts and units of the S3 metrics (docs/metrics.md lists them with their labels):
//! the embedded endpoint's (`dutgate s3`) and the client's, which count in the process that
//! uses [`crate::JobStorage`] (the executor). Exported as `dutgate_<name>`: the recorder adds
//! the namespace (`dutgate_core::telemetry`).

use metrics::{Unit, describe_counter, describe_histogram};

/// Describes the embedded S3 endpoint's metrics to the process' recorder, installing it
/// first: a description given before the recorder exists goes nowhere.
pub fn describe() {
    let _ = dutgate_core::telemetry::metrics_handle();
    describe_counter!(
        "s3_requests_total",
        Unit::Count,
        "S3 requests answered by the embedded endpoint, by method and status code."
    );
    describe_histogram!(
        "s3_request_duration_seconds",
        Unit::Seconds,
        "Time the embedded endpoint took to answer an S3 request, by method."
    );
    describe_counter!(
        "s3_denied_total",
        Unit::Count,
        "S3 requests refused by the embedded endpoint's checks, by reason."
    );
    describe_counter!(
        "s3_job_keys_issued_total",
        Unit::Count,
        "Job key pairs issued (each opens one job bucket)."
    );
    describe_counter!(
        "s3_reader_keys_issued_total",
        Unit::Count,
        "Read-only key pairs issued for a job bucket."
    );
    describe_counter!(
        "s3_job_keys_revoked_total",
        Unit::Count,
        "Key pairs withdrawn with their job bucket (its job and reader keys)."
    );
}

/// Describes the S3 client's metrics (job buckets, transfers, request times) to the process'
/// recorder, installing it first.
pub fn describe_client() {
    let _ = dutgate_core::telemetry::metrics_handle();
    describe_counter!(
        "s3_job_buckets_created_total",
        Unit::Count,
        "Job buckets created."
    );
    describe_counter!(
        "s3_job_buckets_deleted_total",
        Unit::Count,
        "Job buckets deleted."
    );
    describe_counter!(
        "s3_client_bytes_total",
        Unit::Bytes,
        "Object bytes moved by the S3 client: direction=up uploaded, down downloaded."
    );
    describe_counter!(
        "s3_client_failed_attempts_total",
        Unit::Count,
        "S3 client request attempts that failed in a retryable way (connection error or reset, 5xx, 429); each is retried while the retry budget lasts."
    );
    describe_histogram!(
        "s3_client_request_seconds",
        Unit::Seconds,
        "Time of one S3 client request, by S3 operation."
    );
}
