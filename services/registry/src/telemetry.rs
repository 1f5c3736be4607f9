//! HELP texts and units of the registry's metrics (docs/metrics.md lists them with their
//! labels). Exported as `dutgate_<name>`: the recorder adds the namespace
//! (`dutgate_core::telemetry`). The counters mirror [`crate::stats::Stats`].

use metrics::{Unit, describe_counter, describe_gauge};

/// Describes the registry's metrics to the process' recorder, installing it first: a
/// description given before the recorder exists goes nowhere.
pub fn describe() {
    let _ = dutgate_core::telemetry::metrics_handle();
    describe_counter!(
        "registry_cache_hits_total",
        Unit::Count,
        "Blob and manifest requests answered from the cache, by kind."
    );
    describe_counter!(
        "registry_cache_misses_total",
        Unit::Count,
        "Blob and manifest requests the cache could not answer (fetched upstream), by kind."
    );
    describe_counter!(
        "registry_coalesced_requests_total",
        Unit::Count,
        "Blob requests that joined a download already in flight instead of starting one."
    );
    describe_counter!(
        "registry_stale_serves_total",
        Unit::Count,
        "Tags served from the cache because the upstream was down or rate-limiting."
    );
    describe_counter!(
        "registry_tag_revalidations_total",
        Unit::Count,
        "Cached tags whose TTL ran out and that the upstream confirmed or replaced."
    );
    describe_counter!(
        "registry_upstream_bytes_total",
        Unit::Bytes,
        "Blob bytes downloaded from upstream registries."
    );
    describe_counter!(
        "registry_served_bytes_total",
        Unit::Bytes,
        "Manifest and blob bytes served to clients."
    );
    describe_counter!(
        "registry_verify_failures_total",
        Unit::Count,
        "Upstream manifests and blobs refused because they did not match their digest."
    );
    describe_counter!(
        "registry_evictions_total",
        Unit::Count,
        "Blobs evicted from the cache to stay under registry.max_cache_bytes."
    );
    describe_gauge!(
        "registry_cache_bytes",
        Unit::Bytes,
        "Size of the blobs in the cache."
    );
}
