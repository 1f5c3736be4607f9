//! Cache counters: kept as atomics (so `/api/v1/registry/stats`, tests and benchmarks can read
//! exact values) and mirrored to Prometheus through the `metrics` facade.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    BlobHits,
    BlobMisses,
    ManifestHits,
    ManifestMisses,
    /// Requests that joined a download already in flight instead of starting one.
    Coalesced,
    /// Tags served from cache because the upstream was down or rate-limiting.
    StaleServes,
    /// Tags whose TTL ran out and that the upstream confirmed (HEAD) or replaced.
    Revalidations,
    UpstreamBytes,
    ServedBytes,
    /// Upstream content refused because it did not match its digest.
    VerifyFailures,
    Evictions,
}

#[derive(Debug, Default)]
pub struct Stats {
    blob_hits: AtomicU64,
    blob_misses: AtomicU64,
    manifest_hits: AtomicU64,
    manifest_misses: AtomicU64,
    coalesced: AtomicU64,
    stale_serves: AtomicU64,
    revalidations: AtomicU64,
    upstream_bytes: AtomicU64,
    served_bytes: AtomicU64,
    verify_failures: AtomicU64,
    evictions: AtomicU64,
    cache_bytes: AtomicU64,
}

/// A point-in-time copy of the counters (`GET /api/v1/registry/stats`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct StatsSnapshot {
    pub blob_hits: u64,
    pub blob_misses: u64,
    pub manifest_hits: u64,
    pub manifest_misses: u64,
    pub coalesced: u64,
    pub stale_serves: u64,
    pub revalidations: u64,
    pub upstream_bytes: u64,
    pub served_bytes: u64,
    pub verify_failures: u64,
    pub evictions: u64,
    pub cache_bytes: u64,
}

impl Stats {
    pub fn add(&self, counter: Counter, n: u64) {
        let (cell, name, kind): (&AtomicU64, &'static str, Option<&'static str>) = match counter {
            Counter::BlobHits => (&self.blob_hits, "registry_cache_hits_total", Some("blob")),
            Counter::BlobMisses => (
                &self.blob_misses,
                "registry_cache_misses_total",
                Some("blob"),
            ),
            Counter::ManifestHits => (
                &self.manifest_hits,
                "registry_cache_hits_total",
                Some("manifest"),
            ),
            Counter::ManifestMisses => (
                &self.manifest_misses,
                "registry_cache_misses_total",
                Some("manifest"),
            ),
            Counter::Coalesced => (&self.coalesced, "registry_coalesced_requests_total", None),
            Counter::StaleServes => (&self.stale_serves, "registry_stale_serves_total", None),
            Counter::Revalidations => (
                &self.revalidations,
                "registry_tag_revalidations_total",
                None,
            ),
            Counter::UpstreamBytes => (&self.upstream_bytes, "registry_upstream_bytes_total", None),
            Counter::ServedBytes => (&self.served_bytes, "registry_served_bytes_total", None),
            Counter::VerifyFailures => (
                &self.verify_failures,
                "registry_verify_failures_total",
                None,
            ),
            Counter::Evictions => (&self.evictions, "registry_evictions_total", None),
        };
        cell.fetch_add(n, Ordering::Relaxed);
        match kind {
            Some(kind) => metrics::counter!(name, "kind" => kind).increment(n),
            None => metrics::counter!(name).increment(n),
        }
    }

    pub fn set_cache_bytes(&self, bytes: u64) {
        self.cache_bytes.store(bytes, Ordering::Relaxed);
        metrics::gauge!("registry_cache_bytes").set(bytes as f64);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            blob_hits: g(&self.blob_hits),
            blob_misses: g(&self.blob_misses),
            manifest_hits: g(&self.manifest_hits),
            manifest_misses: g(&self.manifest_misses),
            coalesced: g(&self.coalesced),
            stale_serves: g(&self.stale_serves),
            revalidations: g(&self.revalidations),
            upstream_bytes: g(&self.upstream_bytes),
            served_bytes: g(&self.served_bytes),
            verify_failures: g(&self.verify_failures),
            evictions: g(&self.evictions),
            cache_bytes: g(&self.cache_bytes),
        }
    }
}
