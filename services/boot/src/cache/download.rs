//! One upstream download: fetched into a temporary file while its progress is published to
//! every request waiting for it, verified, then moved into the blob store.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use dutgate_core::outbound::{OutboundPolicy, Refusal, SendError};

use super::CacheStatus;
use super::index::{self, Entry, Source};

/// Where a download stands.
#[derive(Debug, Clone)]
pub enum Phase {
    /// Waiting for the upstream's answer.
    Connecting,
    /// Bytes are arriving in `tmp`; `total` is the upstream's Content-Length.
    Body { tmp: PathBuf, total: Option<u64> },
    /// Verified and stored (or revalidated, or served stale): serve this file.
    Done {
        path: PathBuf,
        size: u64,
        etag: String,
        status: CacheStatus,
    },
    /// Nothing was stored; waiting clients get an error.
    Failed(String),
    /// Refused by the outbound policy or the size limit: waiting clients get a 403 that
    /// names the rule.
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct Progress {
    pub phase: Phase,
    /// Bytes of `tmp` that are written and readable.
    pub written: u64,
}

/// A download in flight, shared by the task doing it and every request reading it.
#[derive(Debug)]
pub struct Download {
    tx: watch::Sender<Progress>,
}

impl Default for Download {
    fn default() -> Self {
        Self::new()
    }
}

impl Download {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Progress {
            phase: Phase::Connecting,
            written: 0,
        });
        Self { tx }
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.tx.subscribe()
    }

    fn set_body(&self, tmp: PathBuf, total: Option<u64>) {
        self.tx.send_replace(Progress {
            phase: Phase::Body { tmp, total },
            written: 0,
        });
    }

    fn advance(&self, written: u64) {
        self.tx.send_modify(|p| p.written = written);
    }

    pub(super) fn finish(&self, phase: Phase) {
        self.tx.send_modify(|p| p.phase = phase);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("upstream {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("upstream {url}: no answer within {seconds} s")]
    Timeout { url: String, seconds: u64 },
    #[error("upstream {url} answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("upstream {url}: body truncated: got {got} of {expected} bytes")]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("upstream {url}: sha256 is {actual}, the boot config expects {expected}")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("artifact URL {0}")]
    Refused(Refusal),
    #[error("cache storage: {0}")]
    Io(#[from] std::io::Error),
}

impl FetchError {
    /// Refused by the outbound policy or the per-artifact size limit (`boot.cache.max_artifact_bytes`).
    pub fn is_refusal(&self) -> bool {
        matches!(self, FetchError::Refused(_))
    }

    /// Errors that mean "the upstream is down", after which a cached copy is still served.
    pub fn upstream_unavailable(&self) -> bool {
        match self {
            FetchError::Transport { .. } | FetchError::Timeout { .. } => true,
            FetchError::Status { status, .. } => status.is_server_error(),
            _ => false,
        }
    }
}

pub enum Outcome {
    NotModified,
    Stored(Entry),
}

/// Flush to the file (and tell the readers) at least this often while bytes trickle in.
const FLUSH_IDLE: Duration = Duration::from_millis(20);
const FLUSH_BYTES: usize = 256 * 1024;

#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    http: &reqwest::Client,
    policy: &OutboundPolicy,
    cfg: &crate::config::CacheConfig,
    dir: &Path,
    id: &str,
    source: &Source,
    prior: Option<&Entry>,
    dl: &Download,
    upstream_requests: &AtomicU64,
    upstream_bytes: &AtomicU64,
) -> Result<Outcome, FetchError> {
    let url = source.url.clone();
    let mut req = http.get(&url);
    if let Some(p) = prior {
        if let Some(etag) = &p.etag {
            req = req.header(IF_NONE_MATCH, etag);
        }
        if let Some(lm) = &p.last_modified {
            req = req.header(IF_MODIFIED_SINCE, lm);
        }
    }
    let head_seconds = if prior.is_some() {
        cfg.revalidate_timeout_seconds
    } else {
        cfg.read_timeout_seconds
    };
    upstream_requests.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("boot_artifact_cache_upstream_requests_total").increment(1);
    let resp = tokio::time::timeout(Duration::from_secs(head_seconds), policy.send(req))
        .await
        .map_err(|_| FetchError::Timeout {
            url: url.clone(),
            seconds: head_seconds,
        })?
        .map_err(|e| match e {
            SendError::Refused(r) => FetchError::Refused(r),
            SendError::Http(source) => FetchError::Transport {
                url: url.clone(),
                source,
            },
        })?;
    let status = resp.status();
    if status == StatusCode::NOT_MODIFIED && prior.is_some() {
        tracing::debug!(url = %url, "upstream: not modified");
        return Ok(Outcome::NotModified);
    }
    if status != StatusCode::OK {
        return Err(FetchError::Status { url, status });
    }
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let etag = header(ETAG);
    let last_modified = header(LAST_MODIFIED);
    let total = resp.content_length();
    let too_large = || {
        FetchError::Refused(Refusal::TooLarge {
            url: dutgate_core::outbound::redact(resp.url()),
            limit: cfg.max_artifact_bytes,
        })
    };
    if total.is_some_and(|n| n > cfg.max_artifact_bytes) {
        return Err(too_large());
    }
    let tmp = index::tmp_dir(dir).join(format!("{id}-{:016x}.part", rand_u64()));
    let result = receive(resp, &tmp, total, cfg, dl, &url, upstream_bytes).await;
    let (size, sha) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    if let Some(expected) = &source.sha256
        && !expected.eq_ignore_ascii_case(&sha)
    {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(FetchError::Checksum {
            url,
            expected: expected.clone(),
            actual: sha,
        });
    }
    let blob = index::blob_dir(dir).join(&sha);
    if tokio::fs::try_exists(&blob).await.unwrap_or(false) {
        // Same content under another URL: keep the one copy.
        let _ = tokio::fs::remove_file(&tmp).await;
    } else if let Err(e) = tokio::fs::rename(&tmp, &blob).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e.into());
    }
    tracing::info!(url = %url, sha256 = %sha, size, "artifact cached");
    Ok(Outcome::Stored(Entry {
        source: source.clone(),
        sha256: sha,
        size,
        etag,
        last_modified,
        validated_at_ms: super::now_ms(),
    }))
}

async fn receive(
    resp: reqwest::Response,
    tmp: &Path,
    total: Option<u64>,
    cfg: &crate::config::CacheConfig,
    dl: &Download,
    url: &str,
    upstream_bytes: &AtomicU64,
) -> Result<(u64, String), FetchError> {
    let mut file = tokio::fs::File::create(tmp).await?;
    dl.set_body(tmp.to_path_buf(), total);
    let read_timeout = Duration::from_secs(cfg.read_timeout_seconds);
    let mut stream = resp.bytes_stream();
    let mut hasher = Sha256::new();
    let mut buf: Vec<u8> = Vec::with_capacity(FLUSH_BYTES * 2);
    let mut written: u64 = 0;
    loop {
        let next = if buf.is_empty() {
            tokio::time::timeout(read_timeout, stream.next()).await
        } else {
            match tokio::time::timeout(FLUSH_IDLE, stream.next()).await {
                Ok(item) => Ok(item),
                Err(_) => {
                    written += flush(&mut file, &mut buf).await?;
                    dl.advance(written);
                    continue;
                }
            }
        };
        let item = next.map_err(|_| FetchError::Timeout {
            url: url.to_string(),
            seconds: cfg.read_timeout_seconds,
        })?;
        match item {
            None => break,
            Some(Err(source)) => {
                // reqwest reports a connection closed before Content-Length as a body error.
                let got = written + buf.len() as u64;
                return Err(match total {
                    Some(expected) if got < expected && !source.is_timeout() => {
                        FetchError::Truncated {
                            url: url.to_string(),
                            got,
                            expected,
                        }
                    }
                    _ => FetchError::Transport {
                        url: url.to_string(),
                        source,
                    },
                });
            }
            Some(Ok(chunk)) => {
                if written + (buf.len() + chunk.len()) as u64 > cfg.max_artifact_bytes {
                    return Err(FetchError::Refused(Refusal::TooLarge {
                        url: url.to_string(),
                        limit: cfg.max_artifact_bytes,
                    }));
                }
                hasher.update(&chunk);
                upstream_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                metrics::counter!("boot_artifact_cache_upstream_bytes_total")
                    .increment(chunk.len() as u64);
                buf.extend_from_slice(&chunk);
                if buf.len() >= FLUSH_BYTES {
                    written += flush(&mut file, &mut buf).await?;
                    dl.advance(written);
                }
            }
        }
    }
    written += flush(&mut file, &mut buf).await?;
    file.sync_data().await?;
    dl.advance(written);
    if let Some(expected) = total
        && written != expected
    {
        return Err(FetchError::Truncated {
            url: url.to_string(),
            got: written,
            expected,
        });
    }
    Ok((written, hex::encode(hasher.finalize())))
}

/// Writes the buffer and waits until the bytes are in the file (tokio's `File` completes
/// writes in the background; readers must only be told about bytes they can read).
async fn flush(file: &mut tokio::fs::File, buf: &mut Vec<u8>) -> std::io::Result<u64> {
    if buf.is_empty() {
        return Ok(0);
    }
    file.write_all(buf).await?;
    file.flush().await?;
    let n = buf.len() as u64;
    buf.clear();
    Ok(n)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(super::now_ms());
    h.finish()
}
