//! The boot artifact cache: DUTs fetch kernels and initramfs over plain HTTP from here, and
//! the upstream (often HTTPS, often far away) is asked once per artifact, not once per DUT.
//!
//! - An artifact is named by an id derived from its URL (and expected sha256); scripts point
//!   at `/artifacts/<id>/<name>`. Only URLs that a boot config registered have an id, so a DUT
//!   cannot make the gateway fetch arbitrary URLs.
//! - Single flight: the first request for an uncached id starts one download (a task of its
//!   own, so a client that disconnects does not cancel it); later requests attach to it and
//!   are streamed the bytes as they land in the temporary file. The last byte is held back
//!   until the length and sha256 are verified, so a client never receives a complete body of
//!   unverified content; on failure every client's body is cut and nothing is stored.
//! - Blobs are stored by sha256 (two URLs with the same content share one file), served with
//!   Range and a strong ETag, revalidated with the upstream after a TTL (conditional GET) and
//!   served stale when the upstream is unreachable. Least recently used blobs are evicted
//!   beyond the size limit.
//! - `file://` URLs under the configured roots are served in place; URLs of the gateway's own
//!   storage are left for DUTs to fetch directly. URLs of this service's own DUT image
//!   (`<public URL>/dut-image/<file>`) are `file://` sources in the image directory.

mod download;
pub mod index;
pub mod serve;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use download::{Download, Phase, Progress};
pub use index::Source;
use index::{BlobMeta, Entry, IndexFile};

use crate::config::CacheConfig;
use dutgate_core::outbound::OutboundPolicy;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{0:?} is not a valid URL: {1}")]
    BadUrl(String, String),
    #[error("unsupported URL scheme {0:?}: use http, https or file")]
    UnsupportedScheme(String),
    #[error("{0} is not under one of the configured boot.file_roots")]
    FileOutsideRoots(PathBuf),
    #[error("unknown artifact")]
    NotFound,
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: sha256 is {actual}, the boot config expects {expected}")]
    FileChecksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// The outbound policy refuses the URL (`gateway.outbound.allow`).
    #[error("artifact URL {0}")]
    Refused(#[from] dutgate_core::outbound::Refusal),
    #[error("cache storage: {0}")]
    Io(#[from] std::io::Error),
}

/// How a request was answered, for logs, metrics and the `x-dutgate-cache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheStatus {
    Hit,
    Miss,
    Coalesced,
    Revalidated,
    Stale,
    File,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Coalesced => "coalesced",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Stale => "stale",
            CacheStatus::File => "file",
        }
    }
}

/// Where a boot script should point for one artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactRef {
    /// Fetched by the DUT directly (the gateway's own storage).
    Direct(String),
    /// Served by this cache at `/artifacts/<id>/<name>`.
    Cached { id: String, name: String },
}

/// What answers an artifact request.
#[derive(Debug)]
pub enum Served {
    /// A complete, verified file (cached blob or `file://` source).
    Complete {
        path: PathBuf,
        size: u64,
        etag: String,
        status: CacheStatus,
    },
    /// A `file://` source, opened already (see [`serve::FileBody::Open`]).
    OpenFile {
        file: tokio::fs::File,
        path: PathBuf,
        size: u64,
        etag: String,
        modified: Option<std::time::SystemTime>,
    },
    /// A download (or revalidation) in progress.
    Streaming {
        download: Arc<Download>,
        status: CacheStatus,
    },
}

#[derive(Debug, Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    upstream_requests: AtomicU64,
    upstream_bytes: AtomicU64,
    revalidated: AtomicU64,
    stale_served: AtomicU64,
    evictions: AtomicU64,
    failures: AtomicU64,
}

/// Counters since start (also exported as Prometheus metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub upstream_requests: u64,
    pub upstream_bytes: u64,
    pub revalidated: u64,
    pub stale_served: u64,
    pub evictions: u64,
    pub failures: u64,
    pub size_bytes: u64,
    pub blobs: u64,
}

#[derive(Default)]
struct State {
    sources: HashMap<String, Source>,
    entries: HashMap<String, Entry>,
    blobs: HashMap<String, BlobMeta>,
    total_size: u64,
    inflight: HashMap<String, Arc<Download>>,
    /// sha256 of `file://` sources, by (path, size, mtime), so a pinned file is hashed once.
    file_hashes: HashMap<(PathBuf, u64, i128), String>,
    dirty: bool,
}

struct Inner {
    dir: PathBuf,
    cfg: CacheConfig,
    http: reqwest::Client,
    policy: OutboundPolicy,
    file_roots: Vec<PathBuf>,
    direct_prefixes: Vec<String>,
    own_image: Option<OwnImage>,
    state: Mutex<State>,
    stats: Stats,
    save_lock: tokio::sync::Mutex<()>,
}

/// The boot service's own DUT image: URLs `<url_prefix><file>` (one of
/// [`crate::dut_image::FILES`]) name `<dir>/<file>`, served in place like a `file://` URL.
#[derive(Debug, Clone)]
pub struct OwnImage {
    /// `http://10.42.0.1:8003/dut-image/`.
    pub url_prefix: String,
    /// The image directory; it must be one of the file roots.
    pub dir: PathBuf,
}

#[derive(Clone)]
pub struct ArtifactCache {
    inner: Arc<Inner>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The id of a source: stable across restarts, and different when the pinned sha differs.
pub fn source_id(source: &Source) -> String {
    let mut h = Sha256::new();
    h.update(source.url.as_bytes());
    h.update(b"\n");
    if let Some(s) = &source.sha256 {
        h.update(s.to_ascii_lowercase().as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// A file name for iPXE and humans: the URL's last path segment, tamed.
fn display_name(url: &reqwest::Url) -> String {
    let last = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("");
    let name: String = last
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = name.trim_start_matches('.').to_string();
    if name.is_empty() {
        "artifact".into()
    } else {
        name
    }
}

impl ArtifactCache {
    /// Opens the cache in `dir` (created), repairing its index against the disk. Every
    /// upstream fetch goes through `policy` (the gateway's outbound rules).
    pub async fn open(
        dir: PathBuf,
        cfg: CacheConfig,
        file_roots: &[PathBuf],
        direct_prefixes: Vec<String>,
        own_image: Option<OwnImage>,
        policy: OutboundPolicy,
    ) -> Result<Self, CacheError> {
        let load_dir = dir.clone();
        let index = tokio::task::spawn_blocking(move || index::load_and_repair(&load_dir))
            .await
            .map_err(std::io::Error::other)??;
        let mut roots = Vec::new();
        for r in file_roots {
            match tokio::fs::canonicalize(r).await {
                Ok(c) => roots.push(c),
                Err(e) => tracing::warn!(root = %r.display(), error = %e, "file root unusable"),
            }
        }
        // No whole-request timeout: a 2 GiB kernel image may take minutes; silence is bounded
        // by the read timeout instead.
        let http = policy
            .client_builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_seconds))
            .read_timeout(Duration::from_secs(cfg.read_timeout_seconds))
            .user_agent(concat!("dutgate-boot/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(std::io::Error::other)?;
        let state = State {
            total_size: index.blobs.values().map(|b| b.size).sum(),
            entries: index.entries.into_iter().collect(),
            blobs: index.blobs.into_iter().collect(),
            ..State::default()
        };
        let inner = Arc::new(Inner {
            dir,
            cfg,
            http,
            policy,
            file_roots: roots,
            direct_prefixes,
            own_image,
            state: Mutex::new(state),
            stats: Stats::default(),
            save_lock: tokio::sync::Mutex::new(()),
        });
        spawn_flusher(Arc::downgrade(&inner));
        let cache = Self { inner };
        cache.publish_size();
        Ok(cache)
    }

    /// Registers an artifact URL from a boot config and says how scripts refer to it.
    pub fn register(&self, url: &str, sha256: Option<&str>) -> Result<ArtifactRef, CacheError> {
        let mut parsed =
            reqwest::Url::parse(url).map_err(|e| CacheError::BadUrl(url.into(), e.to_string()))?;
        if let Some(file) = self.own_image_file(&parsed) {
            // Served from the disk in place: asking this service over HTTP for its own file
            // would only copy it into the cache (and the outbound policy refuses it anyway).
            parsed = reqwest::Url::from_file_path(&file).map_err(|_| {
                CacheError::BadUrl(url.into(), format!("{} is not absolute", file.display()))
            })?;
        }
        match parsed.scheme() {
            "http" | "https" => {
                if self
                    .inner
                    .direct_prefixes
                    .iter()
                    .any(|p| !p.is_empty() && parsed.as_str().starts_with(p.as_str()))
                {
                    // `$` is legal in URLs but would be expanded by iPXE.
                    return Ok(ArtifactRef::Direct(parsed.as_str().replace('$', "%24")));
                }
                // Fetched by the gateway on the job's behalf: the outbound policy decides.
                self.inner.policy.check_url(&parsed)?;
            }
            "file" => {
                let path = parsed
                    .to_file_path()
                    .map_err(|_| CacheError::BadUrl(url.into(), "not a local path".into()))?;
                if !self.inner.file_roots.iter().any(|r| path.starts_with(r)) {
                    return Err(CacheError::FileOutsideRoots(path));
                }
            }
            other => return Err(CacheError::UnsupportedScheme(other.into())),
        }
        let source = Source {
            url: parsed.as_str().to_string(),
            sha256: sha256.map(str::to_ascii_lowercase),
        };
        let id = source_id(&source);
        let name = display_name(&parsed);
        self.lock().sources.entry(id.clone()).or_insert(source);
        Ok(ArtifactRef::Cached { id, name })
    }

    /// The image file an own-image URL names (exactly `<prefix><file>`: no query, no
    /// other name).
    fn own_image_file(&self, url: &reqwest::Url) -> Option<PathBuf> {
        let own = self.inner.own_image.as_ref()?;
        let rest = url.as_str().strip_prefix(own.url_prefix.as_str())?;
        crate::dut_image::FILES
            .contains(&rest)
            .then(|| own.dir.join(rest))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than refusing all further service, so keep going with the data.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The outbound policy upstream fetches follow.
    pub fn policy(&self) -> &OutboundPolicy {
        &self.inner.policy
    }

    /// Whether the cache would fetch `url` now, with its host name resolved: an early,
    /// clear refusal for a boot config (the fetch itself checks every hop again). URLs the
    /// DUTs fetch directly and `file://` URLs are not fetched by the cache.
    pub async fn check_upstream(&self, url: &str) -> Result<(), CacheError> {
        let Ok(parsed) = reqwest::Url::parse(url) else {
            return Ok(());
        };
        if !matches!(parsed.scheme(), "http" | "https")
            || self.own_image_file(&parsed).is_some()
            || self
                .inner
                .direct_prefixes
                .iter()
                .any(|p| !p.is_empty() && parsed.as_str().starts_with(p.as_str()))
        {
            return Ok(());
        }
        let timeout = Duration::from_secs(self.inner.cfg.connect_timeout_seconds.max(1));
        self.inner
            .policy
            .check_url_resolved(&parsed, timeout)
            .await
            .map_err(CacheError::from)
    }

    pub fn stats(&self) -> CacheStats {
        let s = &self.inner.stats;
        let (size_bytes, blobs) = {
            let st = self.lock();
            (st.total_size, st.blobs.len() as u64)
        };
        CacheStats {
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            coalesced: s.coalesced.load(Ordering::Relaxed),
            upstream_requests: s.upstream_requests.load(Ordering::Relaxed),
            upstream_bytes: s.upstream_bytes.load(Ordering::Relaxed),
            revalidated: s.revalidated.load(Ordering::Relaxed),
            stale_served: s.stale_served.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            size_bytes,
            blobs,
        }
    }

    fn blob_path(&self, sha: &str) -> PathBuf {
        index::blob_dir(&self.inner.dir).join(sha)
    }

    /// Resolves an artifact request: a cached file, a `file://` source, or a download to
    /// attach to (started here when none is running).
    pub async fn open_artifact(&self, id: &str) -> Result<Served, CacheError> {
        enum Decision {
            File(Source),
            Attach(Arc<Download>),
            Hit(Entry),
            Fetch(Source, Option<Entry>),
        }
        let now = now_ms();
        let decision = {
            let mut st = self.lock();
            let source = st
                .sources
                .get(id)
                .or_else(|| st.entries.get(id).map(|e| &e.source))
                .cloned()
                .ok_or(CacheError::NotFound)?;
            let ttl_ms = self.inner.cfg.ttl_seconds.saturating_mul(1000);
            if source.url.starts_with("file:") {
                Decision::File(source)
            } else if let Some(dl) = st.inflight.get(id) {
                Decision::Attach(dl.clone())
            } else if let Some(entry) = st.entries.get(id).cloned() {
                let fresh =
                    source.sha256.is_some() || now.saturating_sub(entry.validated_at_ms) < ttl_ms;
                if fresh {
                    if let Some(b) = st.blobs.get_mut(&entry.sha256) {
                        b.last_access_ms = now;
                        st.dirty = true;
                    }
                    Decision::Hit(entry)
                } else {
                    Decision::Fetch(source, Some(entry))
                }
            } else {
                Decision::Fetch(source, None)
            }
        };
        let (source, prior) = match decision {
            Decision::File(source) => return self.open_file_source(&source).await,
            Decision::Attach(dl) => {
                self.count(
                    &self.inner.stats.coalesced,
                    "boot_artifact_cache_coalesced_total",
                );
                return Ok(Served::Streaming {
                    download: dl,
                    status: CacheStatus::Coalesced,
                });
            }
            Decision::Hit(entry) => {
                self.count(&self.inner.stats.hits, "boot_artifact_cache_hits_total");
                return Ok(Served::Complete {
                    path: self.blob_path(&entry.sha256),
                    size: entry.size,
                    etag: blob_etag(&entry.sha256),
                    status: CacheStatus::Hit,
                });
            }
            Decision::Fetch(source, prior) => (source, prior),
        };
        // Miss or stale: start the one download everybody else will attach to.
        let download = Arc::new(Download::new());
        let raced = {
            let mut st = self.lock();
            // Another request may have started it between the two locks.
            if let Some(dl) = st.inflight.get(id) {
                Some(dl.clone())
            } else {
                st.inflight.insert(id.to_string(), download.clone());
                None
            }
        };
        if let Some(dl) = raced {
            self.count(
                &self.inner.stats.coalesced,
                "boot_artifact_cache_coalesced_total",
            );
            return Ok(Served::Streaming {
                download: dl,
                status: CacheStatus::Coalesced,
            });
        }
        let status = if prior.is_some() {
            CacheStatus::Revalidated
        } else {
            self.count(&self.inner.stats.misses, "boot_artifact_cache_misses_total");
            CacheStatus::Miss
        };
        let this = self.clone();
        let id = id.to_string();
        let dl = download.clone();
        tokio::spawn(async move { this.run_download(id, source, prior, dl).await });
        Ok(Served::Streaming { download, status })
    }

    fn count(&self, counter: &AtomicU64, metric: &'static str) {
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric).increment(1);
    }

    fn publish_size(&self) {
        let (size, blobs) = {
            let st = self.lock();
            (st.total_size, st.blobs.len())
        };
        metrics::gauge!("boot_artifact_cache_size_bytes").set(size as f64);
        metrics::gauge!("boot_artifact_cache_blobs").set(blobs as f64);
    }

    async fn run_download(
        self,
        id: String,
        source: Source,
        prior: Option<Entry>,
        dl: Arc<Download>,
    ) {
        let result = download::fetch(
            &self.inner.http,
            &self.inner.policy,
            &self.inner.cfg,
            &self.inner.dir,
            &id,
            &source,
            prior.as_ref(),
            &dl,
            &self.inner.stats.upstream_requests,
            &self.inner.stats.upstream_bytes,
        )
        .await;
        let now = now_ms();
        let mut evicted = Vec::new();
        let final_phase = {
            let mut st = self.lock();
            st.inflight.remove(&id);
            match (result, prior) {
                (Ok(download::Outcome::NotModified), Some(mut entry)) => {
                    entry.validated_at_ms = now;
                    let phase = self.done_phase(&mut st, &entry, CacheStatus::Revalidated, now);
                    st.entries.insert(id.clone(), entry);
                    st.dirty = true;
                    self.inner.stats.revalidated.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("boot_artifact_cache_revalidations_total", "result" => "not_modified")
                        .increment(1);
                    phase
                }
                (Ok(download::Outcome::Stored(entry)), _) => {
                    if !st.blobs.contains_key(&entry.sha256) {
                        st.total_size += entry.size;
                        st.blobs.insert(
                            entry.sha256.clone(),
                            BlobMeta {
                                size: entry.size,
                                last_access_ms: now,
                            },
                        );
                    }
                    let phase = self.done_phase(&mut st, &entry, CacheStatus::Miss, now);
                    let keep = entry.sha256.clone();
                    let replaced = st.entries.insert(id.clone(), entry).map(|e| e.sha256);
                    st.dirty = true;
                    // New content at a revalidated URL: the old blob goes unless another URL
                    // still has the same content.
                    if let Some(old) = replaced
                        && old != keep
                        && !st.entries.values().any(|e| e.sha256 == old)
                        && let Some(meta) = st.blobs.remove(&old)
                    {
                        st.total_size = st.total_size.saturating_sub(meta.size);
                        evicted.push(self.blob_path(&old));
                    }
                    evicted.extend(self.evict(&mut st, &keep));
                    phase
                }
                (Err(e), Some(mut entry)) if e.upstream_unavailable() => {
                    tracing::warn!(url = %source.url, error = %e, "upstream unavailable; serving the cached copy");
                    self.inner
                        .stats
                        .stale_served
                        .fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("boot_artifact_cache_stale_served_total").increment(1);
                    // Ask the upstream again in a minute (or after the TTL, if shorter), not
                    // on every request: each attempt may cost a timeout.
                    let ttl_ms = self.inner.cfg.ttl_seconds.saturating_mul(1000);
                    entry.validated_at_ms =
                        now.saturating_sub(ttl_ms.saturating_sub(ttl_ms.min(60_000)));
                    let phase = self.done_phase(&mut st, &entry, CacheStatus::Stale, now);
                    st.entries.insert(id.clone(), entry);
                    phase
                }
                (Err(e), _) => {
                    tracing::warn!(url = %source.url, error = %e, "artifact download failed; nothing cached");
                    self.inner.stats.failures.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("boot_artifact_cache_failures_total").increment(1);
                    if e.is_refusal() {
                        Phase::Refused(e.to_string())
                    } else {
                        Phase::Failed(e.to_string())
                    }
                }
                (Ok(download::Outcome::NotModified), None) => {
                    self.inner.stats.failures.fetch_add(1, Ordering::Relaxed);
                    Phase::Failed("upstream answered 304 to an unconditional request".into())
                }
            }
        };
        // Published after the maps are updated, so a request that sees the end of this
        // download and asks again finds the entry.
        dl.finish(final_phase);
        for path in evicted {
            if let Err(e) = tokio::fs::remove_file(&path).await {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove evicted blob");
            }
        }
        self.publish_size();
        self.save().await;
    }

    fn done_phase(&self, st: &mut State, entry: &Entry, status: CacheStatus, now: u64) -> Phase {
        if let Some(b) = st.blobs.get_mut(&entry.sha256) {
            b.last_access_ms = now;
        }
        Phase::Done {
            path: self.blob_path(&entry.sha256),
            size: entry.size,
            etag: blob_etag(&entry.sha256),
            status,
        }
    }

    /// Drops least recently used blobs until the cache fits its limit. Returns the files to
    /// delete (outside the lock; readers that have them open keep reading).
    fn evict(&self, st: &mut State, keep: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        while st.total_size > self.inner.cfg.max_size_bytes {
            let victim = st
                .blobs
                .iter()
                .filter(|(sha, _)| sha.as_str() != keep)
                .min_by_key(|(_, b)| b.last_access_ms)
                .map(|(sha, b)| (sha.clone(), b.size));
            let Some((sha, size)) = victim else {
                tracing::warn!(
                    size = st.total_size,
                    limit = self.inner.cfg.max_size_bytes,
                    "one artifact is larger than the whole cache limit; keeping it"
                );
                break;
            };
            st.blobs.remove(&sha);
            st.entries.retain(|_, e| e.sha256 != sha);
            st.total_size = st.total_size.saturating_sub(size);
            self.inner.stats.evictions.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("boot_artifact_cache_evictions_total").increment(1);
            tracing::info!(sha256 = %sha, size, "evicted artifact");
            out.push(self.blob_path(&sha));
        }
        out
    }

    /// Writes the index if anything changed since the last write.
    pub async fn save(&self) {
        let _guard = self.inner.save_lock.lock().await;
        let snapshot = {
            let mut st = self.lock();
            if !st.dirty {
                return;
            }
            st.dirty = false;
            IndexFile {
                entries: st
                    .entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                blobs: st
                    .blobs
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }
        };
        let dir = self.inner.dir.clone();
        let res = tokio::task::spawn_blocking(move || index::save(&dir, &snapshot)).await;
        if !matches!(res, Ok(Ok(()))) {
            tracing::warn!("cannot write the artifact cache index: {res:?}");
            self.lock().dirty = true;
        }
    }

    async fn open_file_source(&self, source: &Source) -> Result<Served, CacheError> {
        let url = reqwest::Url::parse(&source.url)
            .map_err(|e| CacheError::BadUrl(source.url.clone(), e.to_string()))?;
        let path = url
            .to_file_path()
            .map_err(|_| CacheError::BadUrl(source.url.clone(), "not a local path".into()))?;
        let file_err = |source| CacheError::File {
            path: path.clone(),
            source,
        };
        // Checked again here (not only at registration): a symlink may point elsewhere now.
        let real = tokio::fs::canonicalize(&path).await.map_err(file_err)?;
        if !self.inner.file_roots.iter().any(|r| real.starts_with(r)) {
            return Err(CacheError::FileOutsideRoots(real));
        }
        // Size and time come from the open file: a file renamed over `real` meanwhile (a
        // rebuilt DUT image) cannot pair one version's length with the other's bytes.
        let file = tokio::fs::File::open(&real).await.map_err(file_err)?;
        let meta = file.metadata().await.map_err(file_err)?;
        if !meta.is_file() {
            return Err(file_err(std::io::Error::other("not a regular file")));
        }
        let mtime: i128 = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        if let Some(expected) = &source.sha256 {
            let key = (real.clone(), meta.len(), mtime);
            let known = self.lock().file_hashes.get(&key).cloned();
            let actual = match known {
                Some(h) => h,
                None => {
                    let p = real.clone();
                    let h = tokio::task::spawn_blocking(move || hash_file(&p))
                        .await
                        .map_err(std::io::Error::other)?
                        .map_err(file_err)?;
                    self.lock().file_hashes.insert(key, h.clone());
                    h
                }
            };
            if !actual.eq_ignore_ascii_case(expected) {
                return Err(CacheError::FileChecksum {
                    path: real,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        Ok(Served::OpenFile {
            file,
            size: meta.len(),
            etag: format!("\"f-{:x}-{:x}\"", meta.len(), mtime),
            path: real,
            modified: meta.modified().ok(),
        })
    }
}

fn blob_etag(sha: &str) -> String {
    format!("\"{sha}\"")
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes last-access times now and then (hits only touch memory).
fn spawn_flusher(inner: Weak<Inner>) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            ArtifactCache { inner }.save().await;
        }
    });
}
