//! The content-addressed blob store: `blobs/sha256/<2 hex>/<64 hex>` on disk, an in-memory index
//! (sizes, last access, leases) rebuilt from the files at start-up, single-flight downloads and
//! size-bounded LRU eviction.
//!
//! Invariants:
//! - A file reaches its final path only by `rename` after its sha256 matched and it was synced,
//!   so the store trusts its own files and never re-hashes them.
//! - One download per digest at a time. Everyone who asks while it runs reads the same temp
//!   file as it grows; the newest batch is held back until the digest is verified, so no client
//!   ever receives a complete body of unverified bytes (a bad download ends in a cut stream).
//! - A blob being read (a lease, or a reader still holding the download that produced it) is
//!   never evicted.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use sha2::Digest as _;
use tokio::sync::watch;

use crate::error::{Code, RegistryError};
use crate::reference::Digest;
use crate::stats::{Counter, Stats};
use crate::upstream::Route;

/// Bytes hashed and written per blocking call, and the most a reader takes per read.
const BATCH: usize = 1 << 20;
/// Access times are persisted (file mtime) at most this often per blob.
const TOUCH_EVERY_MS: u64 = 60_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How far a download has got.
#[derive(Debug, Clone)]
pub enum Progress {
    Connecting,
    /// `readable` bytes may be served; `total` is the upstream's Content-Length.
    Receiving {
        total: Option<u64>,
        readable: u64,
    },
    /// Verified and in the store.
    Done {
        size: u64,
    },
    Failed(Arc<RegistryError>),
}

/// One download in flight, shared by every client that asked for the digest meanwhile.
pub struct Inflight {
    pub digest: Digest,
    file: OnceLock<Arc<std::fs::File>>,
    progress: watch::Sender<Progress>,
}

impl Inflight {
    /// Waits until the blob's size is known (or the download failed).
    pub async fn size(&self) -> Result<u64, Arc<RegistryError>> {
        let mut rx = self.progress.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                Progress::Receiving {
                    total: Some(total), ..
                } => return Ok(*total),
                Progress::Done { size } => return Ok(*size),
                Progress::Failed(e) => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(Arc::new(RegistryError::internal("download vanished")));
            }
        }
    }
}

/// Streams bytes `[start, end)` of a download as they become readable. Holding the `Arc` keeps
/// the blob from being evicted until the stream ends.
pub fn stream_inflight(
    inflight: Arc<Inflight>,
    start: u64,
    end: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    let rx = inflight.progress.subscribe();
    futures::stream::unfold(
        (inflight, rx, start, false),
        move |(inflight, mut rx, pos, failed)| async move {
            if failed || pos >= end {
                return None;
            }
            loop {
                let progress = rx.borrow_and_update().clone();
                let readable = match progress {
                    Progress::Connecting => 0,
                    Progress::Receiving { readable, .. } => readable,
                    Progress::Done { size } => size,
                    Progress::Failed(e) => {
                        let err = io::Error::other(e.message.clone());
                        return Some((Err(err), (inflight, rx, pos, true)));
                    }
                };
                if readable > pos {
                    let len = (readable.min(end) - pos).min(BATCH as u64) as usize;
                    let Some(file) = inflight.file.get().cloned() else {
                        let err = io::Error::other("download has no file");
                        return Some((Err(err), (inflight, rx, pos, true)));
                    };
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len];
                        file.read_exact_at(&mut buf, pos).map(|_| Bytes::from(buf))
                    })
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                    return match read {
                        Ok(b) => Some((Ok(b), (inflight, rx, pos + len as u64, false))),
                        Err(e) => Some((Err(e), (inflight, rx, pos, true))),
                    };
                }
                if rx.changed().await.is_err() {
                    let err = io::Error::other("download vanished");
                    return Some((Err(err), (inflight, rx, pos, true)));
                }
            }
        },
    )
}

struct Entry {
    size: u64,
    last_access_ms: u64,
    touched_ms: u64,
    leases: usize,
    /// The download that produced the blob; readers still streaming from it hold it alive.
    producer: Weak<Inflight>,
}

impl Entry {
    fn in_use(&self) -> bool {
        self.leases > 0 || self.producer.strong_count() > 0
    }
}

#[derive(Default)]
struct State {
    index: HashMap<Digest, Entry>,
    total: u64,
    inflight: HashMap<Digest, Arc<Inflight>>,
}

/// A blob found in the store, pinned against eviction while the lease lives.
pub struct CachedBlob {
    pub path: PathBuf,
    pub size: u64,
    pub lease: BlobLease,
}

pub struct BlobLease {
    store: Arc<BlobStore>,
    digest: Digest,
}

impl Drop for BlobLease {
    fn drop(&mut self) {
        if let Ok(mut st) = self.store.state.lock()
            && let Some(e) = st.index.get_mut(&self.digest)
        {
            e.leases = e.leases.saturating_sub(1);
        }
    }
}

pub enum Lookup {
    Cached(CachedBlob),
    Inflight(Arc<Inflight>),
    Missing,
}

pub struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    stats: Arc<Stats>,
}

impl BlobStore {
    /// Opens the store under `root` (blocking: scans the files; call it off the runtime).
    pub fn open(root: &Path, max_bytes: u64, stats: Arc<Stats>) -> io::Result<Arc<Self>> {
        let dir = root.join("blobs").join("sha256");
        let tmp = root.join("tmp").join("blobs");
        std::fs::create_dir_all(&dir)?;
        // Partial downloads of a previous run are worthless: they were never verified.
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let mut state = State::default();
        for shard in std::fs::read_dir(&dir)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(shard.path())? {
                let f = f?;
                let name = f.file_name();
                let Some(digest) = name
                    .to_str()
                    .and_then(|n| Digest::parse(&format!("sha256:{n}")).ok())
                else {
                    tracing::warn!(path = %f.path().display(), "ignoring a stray file in the blob store");
                    continue;
                };
                let meta = f.metadata()?;
                let mtime = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
                state.total += meta.len();
                state.index.insert(
                    digest,
                    Entry {
                        size: meta.len(),
                        last_access_ms: mtime,
                        touched_ms: mtime,
                        leases: 0,
                        producer: Weak::new(),
                    },
                );
            }
        }
        tracing::info!(blobs = state.index.len(), bytes = state.total, dir = %dir.display(), "blob store opened");
        stats.set_cache_bytes(state.total);
        Ok(Arc::new(Self {
            dir,
            tmp,
            max_bytes,
            state: Mutex::new(state),
            stats,
        }))
    }

    fn path_of(&self, d: &Digest) -> PathBuf {
        self.dir.join(&d.hex()[..2]).join(d.hex())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than refusing to serve at all; keep going with what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a lease on a cached blob (and records the access for the LRU).
    fn lease(self: &Arc<Self>, st: &mut State, d: &Digest) -> Option<CachedBlob> {
        let e = st.index.get_mut(d)?;
        let now = now_ms();
        e.leases += 1;
        e.last_access_ms = now;
        if now.saturating_sub(e.touched_ms) > TOUCH_EVERY_MS {
            e.touched_ms = now;
            let path = self.path_of(d);
            // Persist the access time so the LRU order survives a restart.
            tokio::task::spawn_blocking(move || {
                let r = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(SystemTime::now()));
                if let Err(e) = r {
                    tracing::debug!(path = %path.display(), error = %e, "cannot update access time");
                }
            });
        }
        Some(CachedBlob {
            path: self.path_of(d),
            size: e.size,
            lease: BlobLease {
                store: self.clone(),
                digest: d.clone(),
            },
        })
    }

    /// What the store has for `d`, without contacting anyone.
    pub fn lookup(self: &Arc<Self>, d: &Digest) -> Lookup {
        let mut st = self.lock();
        if let Some(c) = self.lease(&mut st, d) {
            return Lookup::Cached(c);
        }
        match st.inflight.get(d) {
            Some(i) => Lookup::Inflight(i.clone()),
            None => Lookup::Missing,
        }
    }

    /// The cached blob, the download in flight, or a new download from `route`.
    pub fn get_or_fetch(self: &Arc<Self>, d: &Digest, route: Route) -> Lookup {
        let mut st = self.lock();
        if let Some(c) = self.lease(&mut st, d) {
            self.stats.add(Counter::BlobHits, 1);
            return Lookup::Cached(c);
        }
        if let Some(i) = st.inflight.get(d) {
            self.stats.add(Counter::Coalesced, 1);
            return Lookup::Inflight(i.clone());
        }
        self.stats.add(Counter::BlobMisses, 1);
        let (tx, _) = watch::channel(Progress::Connecting);
        let inflight = Arc::new(Inflight {
            digest: d.clone(),
            file: OnceLock::new(),
            progress: tx,
        });
        st.inflight.insert(d.clone(), inflight.clone());
        drop(st);
        let store = self.clone();
        let task = inflight.clone();
        // The download runs in its own task: a client that hangs up must not abort the
        // transfer the other waiters (and the cache) depend on.
        tokio::spawn(async move { store.run_download(task, route).await });
        Lookup::Inflight(inflight)
    }

    async fn run_download(self: Arc<Self>, inflight: Arc<Inflight>, route: Route) {
        let digest = inflight.digest.clone();
        let upstream = route.upstream.base_url().to_string();
        let tmp_path = self
            .tmp
            .join(format!("{}.{:016x}", digest.hex(), rand::random::<u64>()));
        let result = self.download(&inflight, &route, &tmp_path).await;
        match result {
            Ok(size) => {
                {
                    let mut st = self.lock();
                    st.inflight.remove(&digest);
                    let prev = st.index.insert(
                        digest.clone(),
                        Entry {
                            size,
                            last_access_ms: now_ms(),
                            touched_ms: now_ms(),
                            leases: 0,
                            producer: Arc::downgrade(&inflight),
                        },
                    );
                    if let Some(p) = prev {
                        st.total -= p.size;
                    }
                    st.total += size;
                }
                inflight.progress.send_replace(Progress::Done { size });
                tracing::info!(%digest, size, upstream, remote = %route.remote, "blob cached");
                let store = self.clone();
                let _ = tokio::task::spawn_blocking(move || store.evict()).await;
            }
            Err(e) => {
                tracing::warn!(%digest, upstream, remote = %route.remote, error = %e, "blob download failed");
                self.lock().inflight.remove(&digest);
                inflight
                    .progress
                    .send_replace(Progress::Failed(Arc::new(e)));
                let _ = tokio::fs::remove_file(&tmp_path).await;
            }
        }
    }

    async fn download(
        &self,
        inflight: &Inflight,
        route: &Route,
        tmp_path: &Path,
    ) -> Result<u64, RegistryError> {
        let digest = &inflight.digest;
        let resp = route
            .upstream
            .get_blob(&route.remote, digest)
            .await
            .map_err(|e| e.to_registry_error(RegistryError::blob_unknown(digest)))?;
        let total = resp.content_length();
        let path = tmp_path.to_path_buf();
        let file = tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(path)
        })
        .await
        .map_err(RegistryError::internal)?
        .map_err(RegistryError::internal)?;
        let file = Arc::new(file);
        let _ = inflight.file.set(file.clone());
        inflight
            .progress
            .send_replace(Progress::Receiving { total, readable: 0 });

        let mut hasher = sha2::Sha256::new();
        let mut written: u64 = 0;
        let mut buf = BytesMut::with_capacity(BATCH);
        let mut body = resp.bytes_stream();
        let cut = |what: String| {
            RegistryError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, what)
        };
        loop {
            let chunk = body.next().await;
            let last = chunk.is_none();
            if let Some(chunk) = chunk {
                let chunk =
                    chunk.map_err(|e| cut(format!("upstream transfer of {digest} failed: {e}")))?;
                self.stats.add(Counter::UpstreamBytes, chunk.len() as u64);
                buf.extend_from_slice(&chunk);
                let so_far = written + buf.len() as u64;
                if total.is_some_and(|t| so_far > t) {
                    return Err(cut(format!(
                        "upstream sent more than its Content-Length for {digest}"
                    )));
                }
            }
            if buf.len() >= BATCH || (last && !buf.is_empty()) {
                let data = buf.split().freeze();
                let f = file.clone();
                let offset = written;
                let (h, res) = tokio::task::spawn_blocking(move || {
                    let mut h = hasher;
                    h.update(&data);
                    let r = f.write_all_at(&data, offset);
                    (h, r.map(|_| data.len() as u64))
                })
                .await
                .map_err(RegistryError::internal)?;
                hasher = h;
                let n = res.map_err(RegistryError::internal)?;
                // Publish up to the previous batch only: the newest one waits for the digest.
                let readable = written;
                written += n;
                inflight
                    .progress
                    .send_replace(Progress::Receiving { total, readable });
            }
            if last {
                break;
            }
        }
        if total.is_some_and(|t| t != written) {
            return Err(cut(format!(
                "upstream sent {written} bytes of {digest}, expected {total:?}"
            )));
        }
        let got = Digest::from_hash(&hasher.finalize());
        if &got != digest {
            self.stats.add(Counter::VerifyFailures, 1);
            return Err(RegistryError::new(
                StatusCode::BAD_GATEWAY,
                Code::DigestInvalid,
                format!("upstream served content for {digest} whose sha256 is {got}; refused"),
            )
            .with_detail(
                serde_json::json!({"expected": digest.to_string(), "got": got.to_string()}),
            ));
        }
        let final_path = self.path_of(digest);
        let tmp = tmp_path.to_path_buf();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            file.sync_data()?;
            if let Some(parent) = final_path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&tmp, &final_path)
        })
        .await
        .map_err(RegistryError::internal)?
        .map_err(RegistryError::internal)?;
        Ok(written)
    }

    /// Deletes least recently used blobs until the store fits its budget. Blocking.
    ///
    /// Files are deleted while the index lock is held, on purpose: if the lock were released
    /// between forgetting a blob and unlinking it, a new download of the same digest could be
    /// renamed into place in between and then be deleted. Unlinks are short.
    fn evict(&self) {
        let mut st = self.lock();
        while st.total > self.max_bytes {
            let victim = st
                .index
                .iter()
                .filter(|(_, e)| !e.in_use())
                .min_by_key(|(_, e)| e.last_access_ms)
                .map(|(d, e)| (d.clone(), e.size));
            let Some((digest, size)) = victim else {
                tracing::warn!(
                    total = st.total,
                    max = self.max_bytes,
                    "blob store over budget but every blob is being served"
                );
                break;
            };
            match std::fs::remove_file(self.path_of(&digest)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(%digest, error = %e, "cannot evict blob");
                    break;
                }
            }
            st.index.remove(&digest);
            st.total -= size;
            self.stats.add(Counter::Evictions, 1);
            tracing::info!(%digest, size, "blob evicted");
        }
        self.stats.set_cache_bytes(st.total);
    }

    /// Whether `d` is in the store (tests and the stats endpoint).
    pub fn contains(&self, d: &Digest) -> bool {
        self.lock().index.contains_key(d)
    }

    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }
}

/// Streams `[start, end)` of a cached file; the lease rides along with the stream.
///
/// One blocking thread per response reads ahead in 1 MiB `pread`s into a two-slot channel, so
/// disk reads overlap socket writes and a 100 MB blob costs ~100 thread hand-offs instead of one
/// per small async read. A client that hangs up drops the receiver, which ends the thread.
pub async fn stream_file(
    blob: CachedBlob,
    start: u64,
    end: u64,
) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send> {
    let path = blob.path.clone();
    // Opened before the response starts, so a missing file is an error status, not a cut body.
    let file = tokio::task::spawn_blocking(move || std::fs::File::open(path))
        .await
        .map_err(io::Error::other)??;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(2);
    tokio::task::spawn_blocking(move || {
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(BATCH as u64) as usize;
            let mut buf = vec![0u8; len];
            let read = file.read_exact_at(&mut buf, pos).map(|_| Bytes::from(buf));
            let failed = read.is_err();
            if tx.blocking_send(read).is_err() || failed {
                return;
            }
            pos += len as u64;
        }
    });
    let lease = blob.lease;
    Ok(futures::stream::poll_fn(move |cx| {
        let _keep = &lease;
        rx.poll_recv(cx)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn put(store: &Arc<BlobStore>, data: &[u8]) -> Digest {
        let d = Digest::of(data);
        let path = store.path_of(&d);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        let mut st = store.lock();
        st.index.insert(
            d.clone(),
            Entry {
                size: data.len() as u64,
                last_access_ms: now_ms(),
                touched_ms: now_ms(),
                leases: 0,
                producer: Weak::new(),
            },
        );
        st.total += data.len() as u64;
        d
    }

    #[tokio::test]
    async fn lru_eviction_spares_blobs_in_use_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(Stats::default());
        let store = BlobStore::open(dir.path(), 250, stats.clone()).unwrap();
        let a = put(&store, &[1u8; 100]);
        std::thread::sleep(Duration::from_millis(5));
        let b = put(&store, &[2u8; 100]);
        std::thread::sleep(Duration::from_millis(5));
        // Touch `a`: now `b` is the least recently used.
        let Lookup::Cached(lease_a) = store.lookup(&a) else {
            panic!("a is cached")
        };
        drop(lease_a);
        std::thread::sleep(Duration::from_millis(5));
        let c = put(&store, &[3u8; 100]);
        store.evict();
        assert!(store.contains(&a) && !store.contains(&b) && store.contains(&c));
        assert!(!store.path_of(&b).exists());
        assert_eq!(stats.snapshot().evictions, 1);

        // Both remaining blobs leased: over budget, nothing may go.
        let Lookup::Cached(la) = store.lookup(&a) else {
            panic!()
        };
        std::thread::sleep(Duration::from_millis(5));
        let Lookup::Cached(lc) = store.lookup(&c) else {
            panic!()
        };
        std::thread::sleep(Duration::from_millis(5));
        let d = put(&store, &[4u8; 100]);
        let Lookup::Cached(ld) = store.lookup(&d) else {
            panic!()
        };
        store.evict();
        assert!(store.contains(&a) && store.contains(&c) && store.contains(&d));
        drop((la, ld));
        store.evict();
        // `a` was used before `c` and `d`: it goes, and that is enough.
        assert!(!store.contains(&a) && store.contains(&c) && store.contains(&d));
        drop(lc);
        assert_eq!(store.total_bytes(), 200);

        // The index is rebuilt from the files.
        let total = store.total_bytes();
        drop(store);
        let reopened = BlobStore::open(dir.path(), 250, Arc::new(Stats::default())).unwrap();
        assert_eq!(reopened.total_bytes(), total);
        assert!(reopened.contains(&c));
    }
}
