//! The embedded endpoint's S3 operations over a directory: the operations job buckets, the
//! gateway's client and the DUT agents use, nothing else (every other operation answers
//! `NotImplemented` from s3s).
//!
//! Layout under the data directory (compatible with the objects s3s-fs wrote before):
//! - `<bucket>/<key>`: the object's bytes, one file per object;
//! - `.dutgate-meta/<bucket>/<sha256(key)>.json`: its ETag, content type and user metadata;
//! - `.dutgate-uploads/<upload id>/`: a multipart upload in progress (`upload.json` with
//!   the bucket, key and the access key that started it, then `part-NNNNN` files).
//!
//! Bucket names never start with `.`, so the two hidden directories are never buckets.
//!
//! Writes are atomic: the body goes to a temporary file (`.dutgate-tmp-*`) in the target's
//! directory, is fsynced, renamed over the target, and the directory is fsynced: a PUT or
//! CompleteMultipartUpload that was answered survives a crash or power loss, and a reader
//! sees either the old object or the new one, never a part. Reads stream in 1 MiB blocks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use s3s::crypto::{Checksum, Md5};
use s3s::dto::*;
use s3s::{S3, S3Error, S3Request, S3Response, S3Result, s3_error};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::access::{Caller, deny, is_uuid};
use super::paths;

/// Read and write block size: large blocks keep a big GET at disk/network speed.
const BLOCK: usize = 1024 * 1024;
const META_DIR: &str = ".dutgate-meta";
const UPLOAD_DIR: &str = ".dutgate-uploads";
/// Our own names inside a bucket directory start with this; keys may not contain a
/// segment that does, and listings skip them.
const RESERVED_PREFIX: &str = ".dutgate-";
const TMP_PREFIX: &str = ".dutgate-tmp-";
const MAX_PARTS: i32 = 10_000;

/// Second line of defence behind [`super::access::Access`]: whatever the access rules
/// let through, a key that would leave its bucket's directory (or name one of our own
/// files) never reaches the filesystem.
fn guard<T>(req: &S3Request<T>, op: &str, key: &str) -> S3Result<()> {
    if paths::inside_bucket(key)
        && !key
            .split('/')
            .any(|segment| segment.starts_with(RESERVED_PREFIX))
    {
        return Ok(());
    }
    Err(deny(
        "path",
        op,
        Caller::of(req),
        "object keys must stay inside their bucket".into(),
    ))
}

fn internal(what: &str, e: impl std::fmt::Display) -> S3Error {
    tracing::error!(error = %e, "embedded S3 backend: {what}");
    s3_error!(InternalError, "{what}")
}

fn hex_md5(d: [u8; 16]) -> String {
    hex::encode(d)
}

/// What is kept beside an object.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ObjectMeta {
    etag: String,
    content_type: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

/// A multipart upload in progress.
#[derive(Debug, Serialize, Deserialize)]
struct Upload {
    bucket: String,
    key: String,
    /// The access key that started it: only it may add parts, list, complete or abort.
    owner: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

pub struct Backend {
    root: PathBuf,
}

impl Backend {
    /// Blocking (creates the directories, takes over what s3s-fs left): call at start-up.
    pub fn open(root: PathBuf) -> Result<Self, crate::StorageError> {
        for dir in [root.clone(), root.join(META_DIR), root.join(UPLOAD_DIR)] {
            std::fs::create_dir_all(&dir).map_err(|e| crate::StorageError::io(&dir, e))?;
        }
        let backend = Self { root };
        backend.take_over_s3s_fs_files();
        Ok(backend)
    }

    /// A data directory written by s3s-fs (before this backend) keeps its objects as they
    /// are; its metadata files (`.bucket-<b64 bucket>.object-<b64 key>.metadata.json`, in
    /// the data directory itself) become ours, so that mc's attributes (modes, times) of
    /// retained artifacts survive the upgrade, and its other files (checksums, uploads in
    /// progress, temporary files) go. Blocking; failures only leave a file behind.
    fn take_over_s3s_fs_files(&self) {
        use base64::Engine;
        #[derive(Deserialize)]
        struct OldAttributes {
            user_metadata: Option<HashMap<String, String>>,
            content_type: Option<String>,
        }
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut taken = 0usize;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let ours = [".bucket-", ".upload-", ".upload_id-", ".tmp."]
                .iter()
                .any(|p| name.starts_with(p));
            if !ours || !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let object = name
                .strip_prefix(".bucket-")
                .and_then(|n| n.strip_suffix(".metadata.json"))
                .filter(|n| !n.contains(".upload-"))
                .and_then(|n| n.split_once(".object-"))
                .and_then(|(b, k)| {
                    let b = String::from_utf8(b64.decode(b).ok()?).ok()?;
                    let k = String::from_utf8(b64.decode(k).ok()?).ok()?;
                    Some((b, k))
                });
            if let Some((bucket, key)) = object
                && paths::inside_bucket(&key)
                && let Ok(file) = std::fs::metadata(self.object_path(&bucket, &key))
                && !self.meta_path(&bucket, &key).exists()
                && let Ok(old) = std::fs::read(entry.path())
                && let Ok(old) = serde_json::from_slice::<OldAttributes>(&old)
            {
                let meta = ObjectMeta {
                    content_type: old.content_type,
                    metadata: old.user_metadata.unwrap_or_default(),
                    ..fallback_meta(&file)
                };
                let path = self.meta_path(&bucket, &key);
                let tmp = path.with_extension("json.tmp");
                let written = path
                    .parent()
                    .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
                    && serde_json::to_vec(&meta)
                        .ok()
                        .is_some_and(|b| std::fs::write(&tmp, b).is_ok())
                    && std::fs::rename(&tmp, &path).is_ok();
                if !written {
                    continue;
                }
                taken += 1;
            }
            let _ = std::fs::remove_file(entry.path());
        }
        if taken > 0 {
            tracing::info!(
                objects = taken,
                "took over the metadata s3s-fs kept for objects"
            );
        }
    }

    fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.bucket_dir(bucket).join(key)
    }

    fn meta_path(&self, bucket: &str, key: &str) -> PathBuf {
        let name = hex::encode(sha2::Sha256::digest(key.as_bytes()));
        self.root
            .join(META_DIR)
            .join(bucket)
            .join(format!("{name}.json"))
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.root.join(UPLOAD_DIR).join(id)
    }

    async fn bucket_exists(&self, bucket: &str) -> bool {
        tokio::fs::metadata(self.bucket_dir(bucket))
            .await
            .is_ok_and(|m| m.is_dir())
    }

    async fn require_bucket(&self, bucket: &str) -> S3Result<()> {
        if self.bucket_exists(bucket).await {
            Ok(())
        } else {
            Err(s3_error!(NoSuchBucket))
        }
    }

    /// The object's metadata; objects written before this backend have none and get an
    /// ETag from their size and modification time.
    async fn load_meta(&self, bucket: &str, key: &str, file: &std::fs::Metadata) -> ObjectMeta {
        match tokio::fs::read(self.meta_path(bucket, key)).await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|_| fallback_meta(file)),
            Err(_) => fallback_meta(file),
        }
    }

    async fn save_meta(&self, bucket: &str, key: &str, meta: &ObjectMeta) -> S3Result<()> {
        let path = self.meta_path(bucket, key);
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let body = serde_json::to_vec(meta).map_err(|e| internal("object metadata", e))?;
        let stream =
            futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(body)) });
        write_atomic(&dir, &path, stream, true).await.map(drop)
    }

    async fn remove_object(&self, bucket: &str, key: &str) -> S3Result<()> {
        let path = self.object_path(bucket, key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // A key naming a directory (a prefix of other keys) is not an object.
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory => {}
            Err(e) => return Err(internal("deleting an object", e)),
        }
        let _ = tokio::fs::remove_file(self.meta_path(bucket, key)).await;
        // Empty directories left by the key's prefix go too (a listing never shows them,
        // but they would pile up).
        let top = self.bucket_dir(bucket);
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == top || !d.starts_with(&top) || tokio::fs::remove_dir(&d).await.is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    /// The upload `id`, if `req`'s caller started it for `bucket`/`key`.
    async fn load_upload<T>(
        &self,
        req: &S3Request<T>,
        op: &str,
        id: &str,
        bucket: &str,
        key: &str,
    ) -> S3Result<Upload> {
        if !is_uuid(id) {
            return Err(s3_error!(NoSuchUpload));
        }
        let bytes = tokio::fs::read(self.upload_dir(id).join("upload.json"))
            .await
            .map_err(|_| s3_error!(NoSuchUpload))?;
        let upload: Upload = serde_json::from_slice(&bytes).map_err(|_| s3_error!(NoSuchUpload))?;
        let caller = req.credentials.as_ref().map(|c| c.access_key.as_str());
        if upload.owner.as_deref() != caller {
            return Err(deny(
                "other_upload",
                op,
                Caller::of(req),
                "this upload was started with another key".into(),
            ));
        }
        if upload.bucket != bucket || upload.key != key {
            return Err(s3_error!(NoSuchUpload));
        }
        Ok(upload)
    }
}

fn fallback_meta(file: &std::fs::Metadata) -> ObjectMeta {
    let mtime = file
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    ObjectMeta {
        etag: format!("{mtime:x}-{:x}", file.len()),
        ..Default::default()
    }
}

fn random_name() -> String {
    format!("{TMP_PREFIX}{:016x}", rand::random::<u64>())
}

fn new_upload_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(std::io::Error::other)?
}

/// A body written to a temporary file in its target's directory, not yet in place.
struct Staged {
    tmp: PathBuf,
    md5: [u8; 16],
}

impl Staged {
    async fn discard(&self) {
        let _ = tokio::fs::remove_file(&self.tmp).await;
    }

    /// Renames the file over `target` (atomic: readers see the old file or this one).
    async fn commit(&self, target: &Path) -> S3Result<()> {
        match tokio::fs::rename(&self.tmp, target).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.discard().await;
                Err(match e.kind() {
                    std::io::ErrorKind::IsADirectory | std::io::ErrorKind::DirectoryNotEmpty => {
                        s3_error!(InvalidArgument, "this key is a prefix of other objects")
                    }
                    _ => internal("renaming an object into place", e),
                })
            }
        }
    }
}

/// fsync of a file's data by its path (Linux flushes the file, whichever descriptor asks).
async fn sync_path(path: &Path) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.sync_data())
        .await
        .map_err(std::io::Error::other)?
}

/// Writes `body` to a temporary file in `dir` (created if needed), fsynced with `durable`.
async fn stage<S, E>(dir: &Path, body: S, durable: bool) -> S3Result<Staged>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| match e.kind() {
            // A prefix of the key is an object already.
            std::io::ErrorKind::NotADirectory | std::io::ErrorKind::AlreadyExists => {
                s3_error!(InvalidArgument, "a prefix of this key is an object")
            }
            _ => internal("creating a directory", e),
        })?;
    let tmp = dir.join(random_name());
    let result = async {
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| internal("creating a file", e))?;
        let mut out = tokio::io::BufWriter::with_capacity(BLOCK, file);
        let mut md5 = Md5::new();
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| s3_error!(IncompleteBody, "{e}"))?;
            md5.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| internal("writing an object", e))?;
        }
        out.flush()
            .await
            .map_err(|e| internal("writing an object", e))?;
        if durable {
            out.into_inner()
                .sync_data()
                .await
                .map_err(|e| internal("syncing an object", e))?;
        }
        Ok(md5.finalize())
    }
    .await;
    match result {
        Ok(md5) => Ok(Staged { tmp, md5 }),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

/// Writes `body` to `target` through a temporary file in `dir` (the target's directory),
/// renamed over the target once complete; with `durable`, the file and then the directory
/// are fsynced. Answers the body's MD5.
async fn write_atomic<S, E>(dir: &Path, target: &Path, body: S, durable: bool) -> S3Result<[u8; 16]>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: std::fmt::Display,
{
    let staged = stage(dir, body, durable).await?;
    staged.commit(target).await?;
    if durable {
        sync_dir(dir)
            .await
            .map_err(|e| internal("syncing a directory", e))?;
    }
    Ok(staged.md5)
}

fn timestamp(m: &std::fs::Metadata) -> Option<Timestamp> {
    m.modified().ok().map(Timestamp::from)
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// One file of a bucket, found by a listing.
struct Listed {
    key: String,
    size: u64,
    modified: Option<SystemTime>,
}

/// Every object of the bucket directory whose key starts with `prefix` (blocking).
fn walk(bucket_dir: &Path, prefix: &str) -> std::io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let mut stack = vec![(bucket_dir.to_path_buf(), String::new())];
    while let Some((dir, key_prefix)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(RESERVED_PREFIX) {
                continue;
            }
            let key = format!("{key_prefix}{name}");
            let kind = entry.file_type()?;
            if kind.is_dir() {
                let sub = format!("{key}/");
                // Only directories that can hold keys with the prefix.
                if sub.starts_with(prefix) || prefix.starts_with(&sub) {
                    stack.push((entry.path(), sub));
                }
            } else if kind.is_file() && key.starts_with(prefix) {
                let m = entry.metadata()?;
                out.push(Listed {
                    key,
                    size: m.len(),
                    modified: m.modified().ok(),
                });
            }
        }
    }
    Ok(out)
}

enum Entry {
    Object(Listed),
    Prefix(String),
}

impl Entry {
    fn name(&self) -> &str {
        match self {
            Entry::Object(o) => &o.key,
            Entry::Prefix(p) => p,
        }
    }
}

/// Sorted listing entries after `marker`, objects grouped into common prefixes by
/// `delimiter`, at most `max` of them; answers them and whether more follow.
fn page(
    mut objects: Vec<Listed>,
    prefix: &str,
    delimiter: Option<&str>,
    marker: Option<&str>,
    max: usize,
) -> (Vec<Entry>, bool) {
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let mut entries: Vec<Entry> = Vec::new();
    for o in objects {
        let grouped = delimiter.filter(|d| !d.is_empty()).and_then(|d| {
            let rest = o.key.get(prefix.len()..)?;
            rest.find(d)
                .map(|i| format!("{prefix}{}", &rest[..i + d.len()]))
        });
        match grouped {
            Some(p) => {
                if !matches!(entries.last(), Some(Entry::Prefix(last)) if *last == p) {
                    entries.push(Entry::Prefix(p));
                }
            }
            None => entries.push(Entry::Object(o)),
        }
    }
    if let Some(m) = marker {
        entries.retain(|e| match e {
            Entry::Object(o) => o.key.as_str() > m,
            Entry::Prefix(p) => p.as_str() > m && !m.starts_with(p.as_str()),
        });
    }
    let truncated = entries.len() > max;
    entries.truncate(max);
    (entries, truncated)
}

#[async_trait::async_trait]
impl S3 for Backend {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let dir = self.bucket_dir(&req.input.bucket);
        match tokio::fs::create_dir(&dir).await {
            Ok(()) => {}
            // The client takes "exists" for its own bucket when it can open it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(s3_error!(BucketAlreadyExists));
            }
            Err(e) => return Err(internal("creating a bucket", e)),
        }
        sync_dir(&self.root)
            .await
            .map_err(|e| internal("syncing the data directory", e))?;
        Ok(S3Response::new(CreateBucketOutput::default()))
    }

    /// Removes the bucket with whatever it still holds (the gateway's client empties it
    /// first; a job bucket left half-full by a crash goes all the same).
    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = &req.input.bucket;
        self.require_bucket(bucket).await?;
        tokio::fs::remove_dir_all(self.bucket_dir(bucket))
            .await
            .map_err(|e| internal("deleting a bucket", e))?;
        let _ = tokio::fs::remove_dir_all(self.root.join(META_DIR).join(bucket)).await;
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.require_bucket(&req.input.bucket).await?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.require_bucket(&req.input.bucket).await?;
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn list_buckets(
        &self,
        _req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let mut buckets = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.root)
            .await
            .map_err(|e| internal("listing buckets", e))?;
        while let Ok(Some(entry)) = dir.next_entry().await {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(m) = entry.metadata().await else {
                continue;
            };
            if !m.is_dir() || !s3s::path::check_bucket_name(name) {
                continue;
            }
            buckets.push(Bucket {
                creation_date: timestamp(&m),
                name: Some(name.to_string()),
                bucket_region: None,
            });
        }
        buckets.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            ..Default::default()
        }))
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        guard(&req, "GetObject", &req.input.key)?;
        let input = req.input;
        let path = self.object_path(&input.bucket, &input.key);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(_) => {
                self.require_bucket(&input.bucket).await?;
                return Err(s3_error!(NoSuchKey));
            }
        };
        let m = file
            .metadata()
            .await
            .map_err(|e| internal("reading an object", e))?;
        if !m.is_file() {
            return Err(s3_error!(NoSuchKey));
        }
        let size = m.len();
        let (range, content_range) = match &input.range {
            None => (0..size, None),
            Some(r) => {
                let range = r.check(size)?;
                let shown = format!(
                    "bytes {}-{}/{size}",
                    range.start,
                    range.end.saturating_sub(1)
                );
                (range, Some(shown))
            }
        };
        if range.start > 0 {
            file.seek(std::io::SeekFrom::Start(range.start))
                .await
                .map_err(|e| internal("reading an object", e))?;
        }
        let length = range.end - range.start;
        let meta = self.load_meta(&input.bucket, &input.key, &m).await;
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(length), BLOCK);
        let length = i64::try_from(length).map_err(|e| internal("object size", e))?;
        Ok(S3Response::new(GetObjectOutput {
            body: Some(StreamingBlob::wrap(body)),
            content_length: Some(length),
            content_range,
            accept_ranges: Some("bytes".into()),
            last_modified: timestamp(&m),
            e_tag: Some(ETag::Strong(meta.etag)),
            content_type: meta.content_type,
            metadata: (!meta.metadata.is_empty()).then_some(meta.metadata),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        guard(&req, "HeadObject", &req.input.key)?;
        let input = req.input;
        let m = match tokio::fs::metadata(self.object_path(&input.bucket, &input.key)).await {
            Ok(m) if m.is_file() => m,
            _ => {
                self.require_bucket(&input.bucket).await?;
                return Err(s3_error!(NoSuchKey));
            }
        };
        let meta = self.load_meta(&input.bucket, &input.key, &m).await;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(i64::try_from(m.len()).map_err(|e| internal("object size", e))?),
            accept_ranges: Some("bytes".into()),
            last_modified: timestamp(&m),
            e_tag: Some(ETag::Strong(meta.etag)),
            content_type: meta.content_type,
            metadata: (!meta.metadata.is_empty()).then_some(meta.metadata),
            ..Default::default()
        }))
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        guard(&req, "PutObject", &req.input.key)?;
        let input = req.input;
        if input.key.ends_with('/') {
            return Err(s3_error!(
                InvalidArgument,
                "keys ending in '/' (folder objects) are not stored"
            ));
        }
        self.require_bucket(&input.bucket).await?;
        let Some(body) = input.body else {
            return Err(s3_error!(IncompleteBody));
        };
        let path = self.object_path(&input.bucket, &input.key);
        let dir = parent_of(&path);
        let object = stage(&dir, body, false).await?;
        let etag = hex_md5(object.md5);
        if let Some(expected) = &input.content_md5 {
            use base64::Engine;
            let given = base64::engine::general_purpose::STANDARD.decode(expected);
            if given.as_deref() != Ok(&object.md5[..]) {
                object.discard().await;
                return Err(s3_error!(BadDigest, "Content-MD5 does not match the body"));
            }
        }
        let meta = ObjectMeta {
            etag: etag.clone(),
            content_type: input.content_type,
            metadata: input.metadata.unwrap_or_default(),
        };
        let meta_path = self.meta_path(&input.bucket, &input.key);
        let meta_dir = parent_of(&meta_path);
        let meta_body =
            Bytes::from(serde_json::to_vec(&meta).map_err(|e| internal("object metadata", e))?);
        let meta_stream = futures::stream::once(async move { Ok::<_, std::io::Error>(meta_body) });
        // The object's fsync and the metadata's write and fsync overlap; both files go in
        // place, then both directories are fsynced before the answer.
        let (synced, staged_meta) =
            tokio::join!(sync_path(&object.tmp), stage(&meta_dir, meta_stream, true));
        let staged_meta = match (synced, staged_meta) {
            (Ok(()), Ok(m)) => m,
            (synced, staged_meta) => {
                object.discard().await;
                if let Ok(m) = &staged_meta {
                    m.discard().await;
                }
                return Err(match (synced, staged_meta) {
                    (Err(e), _) => internal("syncing an object", e),
                    (_, Err(e)) => e,
                    _ => internal("storing an object", "unreachable"),
                });
            }
        };
        if let Err(e) = object.commit(&path).await {
            staged_meta.discard().await;
            return Err(e);
        }
        staged_meta.commit(&meta_path).await?;
        let (a, b) = tokio::join!(sync_dir(&dir), sync_dir(&meta_dir));
        a.and(b).map_err(|e| internal("syncing a directory", e))?;
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(etag)),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        guard(&req, "CopyObject", &req.input.key)?;
        let (src_bucket, src_key) = match &req.input.copy_source {
            CopySource::Bucket { bucket, key, .. } => (bucket.to_string(), key.to_string()),
            _ => return Err(s3_error!(NotImplemented)),
        };
        guard(&req, "CopyObject", &src_key)?;
        let input = req.input;
        self.require_bucket(&input.bucket).await?;
        let src = self.object_path(&src_bucket, &src_key);
        let file = tokio::fs::File::open(&src)
            .await
            .map_err(|_| s3_error!(NoSuchKey))?;
        let m = file
            .metadata()
            .await
            .map_err(|e| internal("reading an object", e))?;
        let src_meta = self.load_meta(&src_bucket, &src_key, &m).await;
        let dst = self.object_path(&input.bucket, &input.key);
        let body = tokio_util::io::ReaderStream::with_capacity(file, BLOCK);
        let md5 = write_atomic(&parent_of(&dst), &dst, body, true).await?;
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        let meta = ObjectMeta {
            etag: hex_md5(md5),
            content_type: if replace {
                input.content_type
            } else {
                src_meta.content_type
            },
            metadata: if replace {
                input.metadata.unwrap_or_default()
            } else {
                src_meta.metadata
            },
        };
        self.save_meta(&input.bucket, &input.key, &meta).await?;
        let written = tokio::fs::metadata(&dst).await.ok();
        Ok(S3Response::new(CopyObjectOutput {
            copy_object_result: Some(CopyObjectResult {
                e_tag: Some(ETag::Strong(meta.etag)),
                last_modified: written.as_ref().and_then(timestamp),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        guard(&req, "DeleteObject", &req.input.key)?;
        self.require_bucket(&req.input.bucket).await?;
        self.remove_object(&req.input.bucket, &req.input.key)
            .await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        for o in &req.input.delete.objects {
            guard(&req, "DeleteObjects", &o.key)?;
        }
        let input = req.input;
        self.require_bucket(&input.bucket).await?;
        let mut deleted = Vec::new();
        for o in input.delete.objects {
            self.remove_object(&input.bucket, &o.key).await?;
            deleted.push(DeletedObject {
                key: Some(o.key),
                version_id: o.version_id,
                ..Default::default()
            });
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        let marker = req.input.marker.clone();
        let v2 = self.list_objects_v2(req.map_input(Into::into)).await?;
        Ok(v2.map_output(|v2| ListObjectsOutput {
            contents: v2.contents,
            common_prefixes: v2.common_prefixes,
            delimiter: v2.delimiter,
            encoding_type: v2.encoding_type,
            name: v2.name,
            prefix: v2.prefix,
            max_keys: v2.max_keys,
            is_truncated: v2.is_truncated,
            marker,
            next_marker: v2.next_continuation_token,
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let input = req.input;
        self.require_bucket(&input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(1000).clamp(0, 1000);
        // S3's continuation token is opaque; ours is the last name of the previous page.
        let marker = match (&input.continuation_token, &input.start_after) {
            (Some(t), Some(s)) => Some(t.clone().max(s.clone())),
            (Some(t), None) => Some(t.clone()),
            (None, Some(s)) => Some(s.clone()),
            (None, None) => None,
        };
        let dir = self.bucket_dir(&input.bucket);
        let walk_prefix = prefix.clone();
        let objects = tokio::task::spawn_blocking(move || walk(&dir, &walk_prefix))
            .await
            .map_err(|e| internal("listing a bucket", e))?
            .map_err(|e| internal("listing a bucket", e))?;
        let (entries, truncated) = page(
            objects,
            &prefix,
            input.delimiter.as_deref(),
            marker.as_deref(),
            max_keys as usize,
        );
        let next = if truncated {
            entries.last().map(|e| e.name().to_string())
        } else {
            None
        };
        let mut contents = Vec::new();
        let mut prefixes = Vec::new();
        for e in entries {
            match e {
                Entry::Prefix(p) => prefixes.push(CommonPrefix { prefix: Some(p) }),
                Entry::Object(o) => {
                    let etag = match tokio::fs::read(self.meta_path(&input.bucket, &o.key)).await {
                        Ok(b) => serde_json::from_slice::<ObjectMeta>(&b)
                            .ok()
                            .map(|m| m.etag),
                        Err(_) => None,
                    };
                    let etag = etag.unwrap_or_else(|| {
                        let mtime = o
                            .modified
                            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_nanos());
                        format!("{mtime:x}-{:x}", o.size)
                    });
                    contents.push(Object {
                        key: Some(o.key),
                        size: Some(i64::try_from(o.size).unwrap_or(i64::MAX)),
                        last_modified: o.modified.map(Timestamp::from),
                        e_tag: Some(ETag::Strong(etag)),
                        ..Default::default()
                    });
                }
            }
        }
        let count = i32::try_from(contents.len() + prefixes.len()).unwrap_or(i32::MAX);
        Ok(S3Response::new(ListObjectsV2Output {
            key_count: Some(count),
            max_keys: Some(max_keys),
            is_truncated: Some(truncated),
            contents: (!contents.is_empty()).then_some(contents),
            common_prefixes: (!prefixes.is_empty()).then_some(prefixes),
            continuation_token: input.continuation_token,
            next_continuation_token: next,
            delimiter: input.delimiter,
            encoding_type: input.encoding_type,
            name: Some(input.bucket),
            prefix: input.prefix,
            start_after: input.start_after,
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        guard(&req, "CreateMultipartUpload", &req.input.key)?;
        let owner = req.credentials.as_ref().map(|c| c.access_key.clone());
        let input = req.input;
        if input.key.ends_with('/') {
            return Err(s3_error!(
                InvalidArgument,
                "keys ending in '/' (folder objects) are not stored"
            ));
        }
        self.require_bucket(&input.bucket).await?;
        let id = new_upload_id();
        let dir = self.upload_dir(&id);
        let upload = Upload {
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            owner,
            content_type: input.content_type,
            metadata: input.metadata.unwrap_or_default(),
        };
        let body = serde_json::to_vec(&upload).map_err(|e| internal("upload state", e))?;
        let stream =
            futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(body)) });
        write_atomic(&dir, &dir.join("upload.json"), stream, false).await?;
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        guard(&req, "UploadPart", &req.input.key)?;
        let (id, bucket, key) = (
            req.input.upload_id.clone(),
            req.input.bucket.clone(),
            req.input.key.clone(),
        );
        self.load_upload(&req, "UploadPart", &id, &bucket, &key)
            .await?;
        let n = req.input.part_number;
        if !(1..=MAX_PARTS).contains(&n) {
            return Err(s3_error!(
                InvalidArgument,
                "part numbers are 1 to {MAX_PARTS}"
            ));
        }
        let Some(body) = req.input.body else {
            return Err(s3_error!(IncompleteBody));
        };
        let dir = self.upload_dir(&id);
        // Parts are made durable when the upload completes (the object is fsynced).
        let part = dir.join(format!("part-{n:05}"));
        let md5 = write_atomic(&dir, &part, body, false).await?;
        let digest = Bytes::from(hex_md5(md5));
        let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(digest) });
        write_atomic(&dir, &part.with_extension("md5"), stream, false).await?;
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(hex_md5(md5))),
            ..Default::default()
        }))
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        let (id, bucket, key) = (
            req.input.upload_id.clone(),
            req.input.bucket.clone(),
            req.input.key.clone(),
        );
        self.load_upload(&req, "ListParts", &id, &bucket, &key)
            .await?;
        let mut parts = Vec::new();
        let mut dir = tokio::fs::read_dir(self.upload_dir(&id))
            .await
            .map_err(|_| s3_error!(NoSuchUpload))?;
        while let Ok(Some(entry)) = dir.next_entry().await {
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("part-"))
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(m) = entry.metadata().await else {
                continue;
            };
            parts.push(Part {
                part_number: Some(n),
                size: Some(i64::try_from(m.len()).unwrap_or(i64::MAX)),
                last_modified: timestamp(&m),
                ..Default::default()
            });
        }
        parts.sort_by_key(|p| p.part_number);
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(bucket),
            key: Some(key),
            upload_id: Some(id),
            parts: Some(parts),
            is_truncated: Some(false),
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        guard(&req, "CompleteMultipartUpload", &req.input.key)?;
        let (id, bucket, key) = (
            req.input.upload_id.clone(),
            req.input.bucket.clone(),
            req.input.key.clone(),
        );
        let upload = self
            .load_upload(&req, "CompleteMultipartUpload", &id, &bucket, &key)
            .await?;
        self.require_bucket(&bucket).await?;
        let given = req
            .input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default();
        if given.is_empty() {
            return Err(s3_error!(MalformedXML, "no parts"));
        }
        let mut numbers = Vec::with_capacity(given.len());
        for p in &given {
            let n = p.part_number.ok_or_else(|| s3_error!(InvalidPart))?;
            if numbers.last().is_some_and(|last| *last >= n) {
                return Err(s3_error!(InvalidPartOrder));
            }
            numbers.push(n);
        }
        let dir = self.upload_dir(&id);
        // Each part's MD5 (kept when it was uploaded) must be the ETag the client names.
        let mut digests = Vec::with_capacity(given.len());
        let mut paths = Vec::with_capacity(given.len());
        for (p, n) in given.iter().zip(&numbers) {
            let part = dir.join(format!("part-{n:05}"));
            let stored = tokio::fs::read_to_string(part.with_extension("md5"))
                .await
                .map_err(|_| s3_error!(InvalidPart, "part {n} was not uploaded"))?;
            if p.e_tag.as_ref().is_some_and(|e| e.value() != stored) {
                return Err(s3_error!(InvalidPart, "part {n} does not match its ETag"));
            }
            let mut d = [0u8; 16];
            hex::decode_to_slice(&stored, &mut d).map_err(|e| internal("part state", e))?;
            digests.push(d);
            paths.push(part);
        }
        let body = futures::stream::iter(paths)
            .then(|p| async move {
                tokio::fs::File::open(p)
                    .await
                    .map(|f| tokio_util::io::ReaderStream::with_capacity(f, BLOCK))
            })
            .try_flatten()
            .boxed();
        let target = self.object_path(&bucket, &key);
        write_atomic(&parent_of(&target), &target, body, true).await?;
        let mut all = Md5::new();
        for d in &digests {
            all.update(d);
        }
        let etag = format!("{}-{}", hex_md5(all.finalize()), digests.len());
        self.save_meta(
            &bucket,
            &key,
            &ObjectMeta {
                etag: etag.clone(),
                content_type: upload.content_type,
                metadata: upload.metadata,
            },
        )
        .await?;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(bucket),
            key: Some(key),
            e_tag: Some(ETag::Strong(etag)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        guard(&req, "AbortMultipartUpload", &req.input.key)?;
        let (id, bucket, key) = (
            req.input.upload_id.clone(),
            req.input.bucket.clone(),
            req.input.key.clone(),
        );
        self.load_upload(&req, "AbortMultipartUpload", &id, &bucket, &key)
            .await?;
        tokio::fs::remove_dir_all(self.upload_dir(&id))
            .await
            .map_err(|e| internal("aborting an upload", e))?;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(keys: &[&str]) -> Vec<Listed> {
        keys.iter()
            .map(|k| Listed {
                key: (*k).to_string(),
                size: 1,
                modified: None,
            })
            .collect()
    }

    fn names(e: &[Entry]) -> Vec<&str> {
        e.iter().map(Entry::name).collect()
    }

    #[test]
    fn pages_with_prefixes_and_markers() {
        let keys = ["a", "d/1", "d/2", "e/x/1", "z"];
        let (e, more) = page(listed(&keys), "", Some("/"), None, 10);
        assert_eq!(names(&e), ["a", "d/", "e/", "z"]);
        assert!(!more);
        let (e, more) = page(listed(&keys), "", None, None, 2);
        assert_eq!(names(&e), ["a", "d/1"]);
        assert!(more);
        let (e, _) = page(listed(&keys), "", None, Some("d/1"), 10);
        assert_eq!(names(&e), ["d/2", "e/x/1", "z"]);
        // A common prefix returned on the previous page is not repeated.
        let (e, _) = page(listed(&keys), "", Some("/"), Some("d/"), 10);
        assert_eq!(names(&e), ["e/", "z"]);
        let (e, _) = page(listed(&["e/x/1", "e/y"]), "e/", Some("/"), None, 10);
        assert_eq!(names(&e), ["e/x/", "e/y"]);
    }

    #[test]
    fn s3s_fs_metadata_is_taken_over() {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("job-1/dir")).unwrap();
        std::fs::write(root.join("job-1/dir/run.sh"), b"#!/bin/sh\n").unwrap();
        let sidecar = |key: &str, ext: &str| {
            root.join(format!(
                ".bucket-{}.object-{}{ext}",
                b64.encode("job-1"),
                b64.encode(key)
            ))
        };
        std::fs::write(
            sidecar("dir/run.sh", ".metadata.json"),
            br#"{"user_metadata":{"mc-attrs":"mode:33261"},"content_type":"text/x-sh"}"#,
        )
        .unwrap();
        std::fs::write(sidecar("dir/run.sh", ".internal.json"), b"{}").unwrap();
        // A sidecar whose object is gone.
        std::fs::write(sidecar("gone", ".metadata.json"), b"{}").unwrap();
        let backend = Backend::open(root.clone()).unwrap();
        let file = std::fs::metadata(root.join("job-1/dir/run.sh")).unwrap();
        let meta: ObjectMeta = serde_json::from_slice(
            &std::fs::read(backend.meta_path("job-1", "dir/run.sh")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta.content_type.as_deref(), Some("text/x-sh"));
        assert_eq!(meta.metadata["mc-attrs"], "mode:33261");
        assert_eq!(meta.etag, fallback_meta(&file).etag);
        let left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".bucket-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn upload_ids_are_uuids() {
        assert!(is_uuid(&new_upload_id()));
    }
}
