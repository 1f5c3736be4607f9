//! HELP texts and units of the boot service's metrics (docs/metrics.md lists them with their
//! labels). Exported as `dutgate_<name>`: the recorder adds the namespace
//! (`dutgate_core::telemetry`).

use metrics::{Unit, describe_counter, describe_gauge};

/// Describes the boot service's metrics to the process' recorder, installing it first: a
/// description given before the recorder exists goes nowhere.
pub fn describe() {
    let _ = dutgate_core::telemetry::metrics_handle();
    describe_counter!(
        "boot_scripts_total",
        Unit::Count,
        "iPXE boot scripts answered, by the config they came from (job, default), or none, invalid_mac, error for a retry script."
    );
    describe_counter!(
        "boot_scripts_refused_total",
        Unit::Count,
        "Job boot scripts withheld from a peer that is not the machine (it got the default script)."
    );
    describe_counter!(
        "boot_dut_image_requests_total",
        Unit::Count,
        "Requests for the DUT image's files, by result."
    );
    describe_counter!(
        "boot_artifact_cache_hits_total",
        Unit::Count,
        "Boot artifacts served from the cache without asking the upstream."
    );
    describe_counter!(
        "boot_artifact_cache_misses_total",
        Unit::Count,
        "Boot artifacts not in the cache: downloaded while being served."
    );
    describe_counter!(
        "boot_artifact_cache_coalesced_total",
        Unit::Count,
        "Boot artifact requests that joined a download already in flight instead of starting one."
    );
    describe_counter!(
        "boot_artifact_cache_revalidations_total",
        Unit::Count,
        "Cached boot artifacts past their TTL that the upstream confirmed unchanged, by result."
    );
    describe_counter!(
        "boot_artifact_cache_stale_served_total",
        Unit::Count,
        "Cached boot artifacts served past their TTL because the upstream was unavailable."
    );
    describe_counter!(
        "boot_artifact_cache_failures_total",
        Unit::Count,
        "Boot artifact downloads that failed with nothing cached to serve instead."
    );
    describe_counter!(
        "boot_artifact_cache_evictions_total",
        Unit::Count,
        "Cached boot artifacts evicted to stay under boot.cache.max_size_bytes."
    );
    describe_counter!(
        "boot_artifact_cache_upstream_requests_total",
        Unit::Count,
        "Requests sent to boot artifact upstreams (downloads and revalidations)."
    );
    describe_counter!(
        "boot_artifact_cache_upstream_bytes_total",
        Unit::Bytes,
        "Bytes downloaded from boot artifact upstreams."
    );
    describe_gauge!(
        "boot_artifact_cache_size_bytes",
        Unit::Bytes,
        "Size of the boot artifacts in the cache."
    );
    describe_gauge!(
        "boot_artifact_cache_blobs",
        Unit::Count,
        "Boot artifacts (distinct contents) in the cache."
    );
}
