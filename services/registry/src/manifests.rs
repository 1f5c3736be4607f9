//! Manifests and tags.
//!
//! - By digest: fetched once, verified (sha256 of the bytes), kept forever under
//!   `manifests/sha256/<hex>` (one file: the media type, a newline, the manifest bytes).
//! - By tag: a record `tags/<sha256(name:tag)>.json` says which digest the tag meant and when
//!   the upstream last confirmed it. Within the TTL it is answered locally; after it, a HEAD
//!   upstream revalidates it (a changed digest fetches the new manifest). If the upstream is
//!   down or rate-limiting, the cached answer is served anyway and counted as stale.
//!
//! Concurrent requests for the same tag or digest wait for one upstream exchange (a per-key
//! async lock) instead of each asking upstream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Code, RegistryError};
use crate::reference::{Digest, RepoName, Tag};
use crate::stats::{Counter, Stats};
use crate::upstream::{FetchedManifest, Route, UpstreamError};

#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TagRecord {
    name: String,
    tag: String,
    digest: String,
    /// When the upstream last confirmed the digest (unix ms).
    checked_at_ms: u64,
}

type TagKey = (String, String);

pub struct Manifests {
    dir: PathBuf,
    tags_dir: PathBuf,
    tmp: PathBuf,
    ttl: Duration,
    tags: Mutex<HashMap<TagKey, TagRecord>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    stats: Arc<Stats>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Manifests {
    /// Opens the manifest store under `root` (blocking: loads the tag records).
    pub fn open(root: &Path, ttl: Duration, stats: Arc<Stats>) -> std::io::Result<Self> {
        let dir = root.join("manifests").join("sha256");
        let tags_dir = root.join("tags");
        let tmp = root.join("tmp").join("manifests");
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&tags_dir)?;
        std::fs::create_dir_all(&tmp)?;
        let mut tags = HashMap::new();
        for f in std::fs::read_dir(&tags_dir)? {
            let path = f?.path();
            let rec = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<TagRecord>(&b).ok())
                .filter(|r| {
                    RepoName::parse(&r.name).is_ok()
                        && Tag::parse(&r.tag).is_ok()
                        && Digest::parse(&r.digest).is_ok()
                });
            match rec {
                Some(r) => {
                    tags.insert((r.name.clone(), r.tag.clone()), r);
                }
                None => tracing::warn!(path = %path.display(), "ignoring an unreadable tag record"),
            }
        }
        tracing::info!(tags = tags.len(), "manifest store opened");
        Ok(Self {
            dir,
            tags_dir,
            tmp,
            ttl,
            tags: Mutex::new(tags),
            locks: Mutex::new(HashMap::new()),
            stats,
        })
    }

    fn key_lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget locks nobody holds or waits for, so the map stays as small as the traffic.
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(key).or_default().clone()
    }

    fn path_of(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }

    async fn read_cached(&self, digest: &Digest) -> Option<Manifest> {
        let raw = tokio::fs::read(self.path_of(digest)).await.ok()?;
        let nl = raw.iter().position(|&b| b == b'\n')?;
        let media_type = String::from_utf8(raw[..nl].to_vec()).ok()?;
        let bytes = Bytes::from(raw).slice(nl + 1..);
        Some(Manifest {
            bytes,
            media_type,
            digest: digest.clone(),
        })
    }

    async fn write_atomic(&self, path: PathBuf, data: Vec<u8>) -> std::io::Result<()> {
        let tmp = self.tmp.join(format!("{:016x}", rand::random::<u64>()));
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    async fn store(&self, m: &Manifest) -> Result<(), RegistryError> {
        let mut data = Vec::with_capacity(m.media_type.len() + 1 + m.bytes.len());
        data.extend_from_slice(m.media_type.as_bytes());
        data.push(b'\n');
        data.extend_from_slice(&m.bytes);
        self.write_atomic(self.path_of(&m.digest), data)
            .await
            .map_err(RegistryError::internal)
    }

    fn tag_file(&self, key: &TagKey) -> PathBuf {
        let id = Digest::of(format!("{}:{}", key.0, key.1).as_bytes());
        self.tags_dir.join(format!("{}.json", id.hex()))
    }

    async fn save_tag(&self, rec: TagRecord) -> Result<(), RegistryError> {
        let key = (rec.name.clone(), rec.tag.clone());
        let data = serde_json::to_vec(&rec).map_err(RegistryError::internal)?;
        self.write_atomic(self.tag_file(&key), data)
            .await
            .map_err(RegistryError::internal)?;
        self.tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, rec);
        Ok(())
    }

    async fn forget_tag(&self, key: &TagKey) {
        self.tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        let _ = tokio::fs::remove_file(self.tag_file(key)).await;
    }

    /// Checks a fetched manifest against the digest it must have.
    fn verify(
        &self,
        fetched: FetchedManifest,
        expected: Option<&Digest>,
    ) -> Result<Manifest, RegistryError> {
        let digest = Digest::of(&fetched.bytes);
        let claimed = expected.or(fetched.digest_header.as_ref());
        if let Some(want) = claimed
            && want != &digest
        {
            self.stats.add(Counter::VerifyFailures, 1);
            return Err(RegistryError::new(
                StatusCode::BAD_GATEWAY,
                Code::DigestInvalid,
                format!("upstream served a manifest for {want} whose sha256 is {digest}; refused"),
            ));
        }
        Ok(Manifest {
            bytes: fetched.bytes,
            media_type: fetched.media_type,
            digest,
        })
    }

    /// A manifest by digest: from the store, or fetched once from `route` and verified.
    pub async fn by_digest(
        &self,
        route: Option<&Route>,
        digest: &Digest,
    ) -> Result<Manifest, RegistryError> {
        if let Some(m) = self.read_cached(digest).await {
            self.stats.add(Counter::ManifestHits, 1);
            return Ok(m);
        }
        let Some(route) = route else {
            return Err(RegistryError::manifest_unknown(digest));
        };
        let lock = self.key_lock(format!("d:{}", digest.hex()));
        let _guard = lock.lock().await;
        if let Some(m) = self.read_cached(digest).await {
            self.stats.add(Counter::ManifestHits, 1);
            return Ok(m);
        }
        self.stats.add(Counter::ManifestMisses, 1);
        let fetched = route
            .upstream
            .get_manifest(&route.remote, &digest.to_string())
            .await
            .map_err(|e| e.to_registry_error(RegistryError::manifest_unknown(digest)))?;
        let m = self.verify(fetched, Some(digest))?;
        self.store(&m).await?;
        Ok(m)
    }

    /// A manifest by tag, with TTL, revalidation and stale-if-error.
    pub async fn by_tag(
        &self,
        name: &RepoName,
        route: &Route,
        tag: &Tag,
    ) -> Result<Manifest, RegistryError> {
        let key: TagKey = (name.as_str().to_string(), tag.as_str().to_string());
        let lock = self.key_lock(format!("t:{}:{}", key.0, key.1));
        let _guard = lock.lock().await;
        let record = self
            .tags
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let cached = match &record {
            Some(r) => match Digest::parse(&r.digest) {
                Ok(d) => self.read_cached(&d).await.map(|m| (r.clone(), m)),
                Err(_) => None,
            },
            None => None,
        };
        let Some((mut rec, cached)) = cached else {
            return self.fetch_tag(name, route, tag).await;
        };
        let age = now_ms().saturating_sub(rec.checked_at_ms);
        if u128::from(age) < self.ttl.as_millis() {
            self.stats.add(Counter::ManifestHits, 1);
            return Ok(cached);
        }
        self.stats.add(Counter::Revalidations, 1);
        match route
            .upstream
            .head_manifest(&route.remote, tag.as_str())
            .await
        {
            Ok(Some(d)) if d == cached.digest => {
                rec.checked_at_ms = now_ms();
                self.save_tag(rec).await?;
                self.stats.add(Counter::ManifestHits, 1);
                Ok(cached)
            }
            Ok(_) => match self.fetch_tag(name, route, tag).await {
                Err(e)
                    if e.status == StatusCode::SERVICE_UNAVAILABLE
                        || e.status == StatusCode::TOO_MANY_REQUESTS =>
                {
                    self.stale(name, tag, &e.message);
                    Ok(cached)
                }
                other => other,
            },
            Err(e) if e.is_outage() => {
                self.stale(name, tag, &e.to_string());
                Ok(cached)
            }
            Err(e) if e.is_not_found() => {
                self.forget_tag(&key).await;
                Err(RegistryError::manifest_unknown(tag))
            }
            Err(e) => Err(e.to_registry_error(RegistryError::manifest_unknown(tag))),
        }
    }

    fn stale(&self, name: &RepoName, tag: &Tag, why: &str) {
        self.stats.add(Counter::StaleServes, 1);
        tracing::warn!(%name, %tag, reason = why, "upstream unavailable; serving the cached tag");
    }

    async fn fetch_tag(
        &self,
        name: &RepoName,
        route: &Route,
        tag: &Tag,
    ) -> Result<Manifest, RegistryError> {
        self.stats.add(Counter::ManifestMisses, 1);
        let fetched = route
            .upstream
            .get_manifest(&route.remote, tag.as_str())
            .await
            .map_err(|e: UpstreamError| {
                e.to_registry_error(RegistryError::manifest_unknown(tag))
            })?;
        let m = self.verify(fetched, None)?;
        self.store(&m).await?;
        self.save_tag(TagRecord {
            name: name.as_str().to_string(),
            tag: tag.as_str().to_string(),
            digest: m.digest.to_string(),
            checked_at_ms: now_ms(),
        })
        .await?;
        tracing::info!(%name, %tag, digest = %m.digest, upstream = route.upstream.base_url(), "tag resolved upstream");
        Ok(m)
    }
}
