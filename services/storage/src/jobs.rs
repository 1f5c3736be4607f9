//! `JobStorage`: job buckets for the executor. One per gateway (cheap to clone).
//!
//! Life of a job bucket, as the executor drives it:
//! 1. [`JobStorage::create_job_bucket`] → a [`JobBucket`] whose key pair is handed to the DUT
//!    (`job_bucket`, `job_bucket_access_key`, `job_bucket_secret_key`, `minio_url`/`s3_url`);
//! 2. [`JobStorage::upload_tarball`] with the submitter's
//!    `job_bucket_initial_state_tarball_file`;
//! 3. the DUT reads and writes the bucket;
//! 4. at teardown [`JobStorage::revoke`] (the DUT's keys stop working at once), then
//!    [`JobStorage::download_all`] into the job's artifact directory (or [`JobStorage::list`]
//!    + [`JobStorage::get`] to stream);
//! 5. when the caller's retention ends, [`JobStorage::delete_bucket`].
//!
//! Every step is idempotent, so a retried set-up or teardown does no harm.
//!
//! After the job, [`JobStorage::publish_for_reader`] puts the job's kept files into a bucket
//! of their own with a read-only key for the submitter (ci-tron's `job_bucket`, which
//! `executorctl -s` mirrors); that bucket is deleted with [`JobStorage::delete_bucket`] once
//! its key expired.

use std::path::{Component, Path, PathBuf};

use dutgate_core::Secret;
use dutgate_core::config::GatewayConfig;
use ipnet::IpNet;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::client::{ObjectBody, ObjectInfo, S3Client};
use crate::config::{Backend, Config};
use crate::error::StorageError;
use crate::keys;
use crate::sigv4::Signer;

/// The first path segment of the embedded endpoint's key administration routes. It is a
/// valid bucket name, so it can never be a job bucket (job buckets start with the prefix).
pub const ADMIN_PREFIX: &str = "dutgate-admin";

/// A job's bucket and the credentials the DUT gets for it.
#[derive(Clone, Debug, Serialize)]
pub struct JobBucket {
    pub bucket: String,
    /// The endpoint DUTs use (`minio_url`/`s3_url` in job templates).
    pub endpoint_url: String,
    pub access_key: String,
    /// Serialised masked; use `secret_key.expose()` to hand it to the job template.
    pub secret_key: Secret,
    /// True when the backend cannot make per-job keys (external S3 in generic mode): the
    /// DUT then holds the gateway's admin keys, which open every bucket.
    pub shared_admin_keys: bool,
}

/// A bucket a job's submitter may read: [`JobStorage::publish_for_reader`].
#[derive(Clone, Debug, Serialize)]
pub struct ReaderBucket {
    pub bucket: String,
    pub access_key: String,
    /// Serialised masked.
    pub secret_key: Secret,
    /// Objects put in the bucket.
    pub files: u64,
}

/// What an initial-state upload stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UploadSummary {
    pub files: u64,
    pub bytes: u64,
    /// Entries that are not regular files (links, devices, …): not uploaded.
    pub skipped: u64,
}

/// What [`JobStorage::download_all`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DownloadSummary {
    pub files: u64,
    pub bytes: u64,
    /// The files written, in key order.
    pub paths: Vec<PathBuf>,
}

#[derive(Deserialize)]
struct IssuedKeys {
    access_key: String,
    secret_key: String,
}

/// Job buckets on the configured backend.
#[derive(Clone, Debug)]
pub struct JobStorage {
    admin: S3Client,
    backend: Backend,
    dut_url: String,
    bucket_prefix: String,
    region: String,
    max_initial_state_bytes: u64,
}

impl JobStorage {
    /// Builds the storage from the gateway config and its `s3` section. With the embedded
    /// backend the admin keys come from `<state_dir>/s3/admin-keys.json` (created when
    /// missing, so the executor may start before `dutgate s3`).
    pub async fn new(gateway: &GatewayConfig, config: &Config) -> Result<Self, StorageError> {
        let admin_keys = keys::admin_keys(gateway, config).await?;
        let url = config
            .service_url(gateway)
            .ok_or_else(|| StorageError::Config("the external S3 backend needs s3.url".into()))?;
        let dut_url = config.dut_url(gateway).unwrap_or_else(|| url.clone());
        Self::with_endpoint(&url, &dut_url, admin_keys, config)
    }

    /// Storage on an explicit endpoint (tests, tools).
    pub fn with_endpoint(
        url: &str,
        dut_url: &str,
        admin_keys: keys::KeyPair,
        config: &Config,
    ) -> Result<Self, StorageError> {
        check_prefix(&config.bucket_prefix)?;
        let signer = Signer::new(
            admin_keys.access_key,
            admin_keys.secret_key.expose(),
            config.region.clone(),
        );
        let admin = S3Client::new(
            url,
            signer,
            config.request_timeout(),
            config.transfer_idle_timeout(),
        )?;
        Ok(Self {
            admin,
            backend: config.backend,
            dut_url: dut_url.trim_end_matches('/').to_string(),
            bucket_prefix: config.bucket_prefix.clone(),
            region: config.region.clone(),
            max_initial_state_bytes: config.max_initial_state_bytes,
        })
    }

    /// The admin client, for the few callers that need a raw S3 call.
    pub fn client(&self) -> &S3Client {
        &self.admin
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// `<prefix><job id>`, made a valid bucket name: lower case, `[a-z0-9-]`, 3–63 chars.
    pub fn bucket_name(&self, job_id: &str) -> Result<String, StorageError> {
        bucket_name(&self.bucket_prefix, job_id)
    }

    /// Creates the job's bucket (an existing one is kept) and a key pair that opens only it.
    pub async fn create_job_bucket(&self, job_id: &str) -> Result<JobBucket, StorageError> {
        self.create_job_bucket_for(job_id, None).await
    }

    /// Like [`JobStorage::create_job_bucket`], and with `source` set the key pair is
    /// accepted only from that address or network: the job's DUT (`IpNet::from(dut_ip)`
    /// for one address). The embedded endpoint refuses the key from anywhere else
    /// (`403 AccessDenied`, logged with the source). The external backend cannot restrict
    /// keys (it hands out the admin pair); there `source` is only logged.
    #[tracing::instrument(skip(self), fields(job_id = %job_id, source = ?source))]
    pub async fn create_job_bucket_for(
        &self,
        job_id: &str,
        source: Option<IpNet>,
    ) -> Result<JobBucket, StorageError> {
        let bucket = self.bucket_name(job_id)?;
        self.admin.create_bucket(&bucket).await?;
        let (access_key, secret_key, shared) = match self.backend {
            Backend::Embedded => {
                let mut query = vec![("bucket".to_string(), bucket.clone())];
                if let Some(net) = source {
                    query.push(("source".to_string(), net.to_string()));
                }
                let body = self
                    .admin
                    .admin(
                        "CreateJobKeys",
                        Method::POST,
                        &format!("/{ADMIN_PREFIX}/v1/keys"),
                        &query,
                    )
                    .await?;
                let issued: IssuedKeys = serde_json::from_slice(&body).map_err(|e| {
                    StorageError::Protocol(format!("key administration answer: {e}"))
                })?;
                (issued.access_key, Secret::new(issued.secret_key), false)
            }
            Backend::External => {
                tracing::warn!(
                    bucket = %bucket,
                    "external S3 backend: the DUT gets the gateway's admin keys (no per-job keys)"
                );
                // The signer is the admin pair; re-read it from the client's signer state.
                (
                    self.admin.access_key().to_string(),
                    self.admin_secret(),
                    true,
                )
            }
        };
        metrics::counter!("s3_job_buckets_created_total").increment(1);
        tracing::info!(bucket = %bucket, shared_admin_keys = shared, "job bucket ready");
        Ok(JobBucket {
            bucket,
            endpoint_url: self.dut_url.clone(),
            access_key,
            secret_key,
            shared_admin_keys: shared,
        })
    }

    fn admin_secret(&self) -> Secret {
        Secret::new(self.admin.secret_key().to_string())
    }

    /// Extracts a tar archive (gzip-compressed or not) into the bucket: each regular file
    /// becomes an object under its path in the archive, with mc's `mc-attrs` metadata (mode,
    /// owner, mtime) so that `mc mirror --preserve`/boot2container restore them. Links and
    /// special files are skipped: a link could otherwise make the gateway upload its own
    /// files.
    #[tracing::instrument(skip(self, reader), fields(bucket = %bucket))]
    pub async fn upload_tarball<R>(
        &self,
        bucket: &str,
        mut reader: R,
    ) -> Result<UploadSummary, StorageError>
    where
        R: AsyncRead + Unpin + Send,
    {
        let work = tempfile::tempdir().map_err(|e| StorageError::io(&std::env::temp_dir(), e))?;
        let archive = work.path().join("archive");
        {
            let mut f = tokio::fs::File::create(&archive)
                .await
                .map_err(|e| StorageError::io(&archive, e))?;
            tokio::io::copy(&mut reader, &mut f)
                .await
                .map_err(|e| StorageError::io(&archive, e))?;
            f.flush().await.map_err(|e| StorageError::io(&archive, e))?;
        }
        let tree = work.path().join("tree");
        let (files, skipped) = {
            let archive = archive.clone();
            let tree = tree.clone();
            let max = self.max_initial_state_bytes;
            tokio::task::spawn_blocking(move || unpack(&archive, &tree, max))
                .await
                .map_err(|e| StorageError::Tarball(format!("unpacking: {e}")))??
        };
        let mut summary = UploadSummary {
            skipped,
            ..Default::default()
        };
        for f in files {
            let path = tree.join(&f.key);
            let attrs = format!(
                "gid:{}/gname:{}/mode:{}/mtime:{}/uid:{}/uname:{}",
                f.gid,
                f.gname,
                0o100000 | (f.mode & 0o7777),
                f.mtime,
                f.uid,
                f.uname
            );
            let n = self
                .admin
                .put_file(bucket, &f.key, &path, &[("mc-attrs".into(), attrs)])
                .await?;
            summary.files += 1;
            summary.bytes += n;
        }
        tracing::info!(
            files = summary.files,
            bytes = summary.bytes,
            skipped = summary.skipped,
            "initial state uploaded"
        );
        // Removing the unpacked tree is blocking file-system work.
        let _ = tokio::task::spawn_blocking(move || drop(work)).await;
        Ok(summary)
    }

    pub async fn list(&self, bucket: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.admin.list(bucket).await
    }

    /// Streams one object.
    pub async fn get(&self, bucket: &str, key: &str) -> Result<ObjectBody, StorageError> {
        self.admin.get(bucket, key).await
    }

    /// Copies every object into `dest_dir` (created), keeping the key's path. Keys that would
    /// leave `dest_dir` (`..`, absolute) are refused.
    #[tracing::instrument(skip(self), fields(bucket = %bucket))]
    pub async fn download_all(
        &self,
        bucket: &str,
        dest_dir: &Path,
    ) -> Result<DownloadSummary, StorageError> {
        tokio::fs::create_dir_all(dest_dir)
            .await
            .map_err(|e| StorageError::io(dest_dir, e))?;
        let mut summary = DownloadSummary::default();
        for o in self.admin.list(bucket).await? {
            // "Directory" markers that mc and the console create hold no data.
            if o.key.ends_with('/') {
                continue;
            }
            let rel = safe_relative(&o.key)?;
            let path = dest_dir.join(rel);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| StorageError::io(parent, e))?;
            }
            let n = self
                .admin
                .get(bucket, &o.key)
                .await?
                .write_to(&path)
                .await?;
            summary.files += 1;
            summary.bytes += n;
            summary.paths.push(path);
        }
        metrics::counter!("s3_client_bytes_total", "direction" => "down").increment(summary.bytes);
        tracing::info!(
            files = summary.files,
            bytes = summary.bytes,
            "bucket downloaded"
        );
        Ok(summary)
    }

    /// Withdraws every DUT key of the bucket. With shared admin keys (external backend in
    /// generic mode) there is nothing that can be withdrawn, which is logged.
    #[tracing::instrument(skip(self), fields(bucket = %bucket))]
    pub async fn revoke(&self, bucket: &str) -> Result<(), StorageError> {
        match self.backend {
            Backend::Embedded => {
                self.admin
                    .admin(
                        "RevokeJobKeys",
                        Method::DELETE,
                        &format!("/{ADMIN_PREFIX}/v1/keys"),
                        &[("bucket".to_string(), bucket.to_string())],
                    )
                    .await?;
                tracing::info!("job keys revoked");
            }
            Backend::External => {
                tracing::warn!(
                    "external S3 backend: the DUT held the admin keys; nothing to revoke"
                );
            }
        }
        Ok(())
    }

    /// Makes the files under `dir` (each regular file, keyed by its path below `dir`) the
    /// objects of bucket `<prefix><name>` and issues a read-only key for it, accepted from
    /// `networks` only and unknown after `valid_for`: what a job's submitter downloads the
    /// job's files with. A missing `dir` gives an empty bucket. The external backend cannot
    /// issue such keys ([`StorageError::Config`]).
    #[tracing::instrument(skip(self, networks), fields(name = %name))]
    pub async fn publish_for_reader(
        &self,
        name: &str,
        dir: &Path,
        networks: &[IpNet],
        valid_for: std::time::Duration,
    ) -> Result<ReaderBucket, StorageError> {
        if self.backend != Backend::Embedded {
            return Err(StorageError::Config(
                "the external S3 backend cannot issue read-only keys: the job's files are \
                 its artifacts only"
                    .into(),
            ));
        }
        let bucket = self.bucket_name(name)?;
        self.admin.create_bucket(&bucket).await?;
        let files = {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || regular_files(&dir))
                .await
                .map_err(|e| StorageError::Config(format!("listing the job's files: {e}")))??
        };
        let mut count = 0;
        for (key, path) in files {
            if let Err(problem) = crate::server::paths::check_key(&key) {
                tracing::warn!(key = ?key, %problem, "file name is not a usable object key; not published");
                continue;
            }
            self.admin.put_file(&bucket, &key, &path, &[]).await?;
            count += 1;
        }
        let nets: Vec<String> = networks.iter().map(ToString::to_string).collect();
        let query = vec![
            ("bucket".to_string(), bucket.clone()),
            ("access".to_string(), "read".to_string()),
            ("networks".to_string(), nets.join(",")),
            (
                "expires_in_seconds".to_string(),
                valid_for.as_secs().max(1).to_string(),
            ),
        ];
        let body = self
            .admin
            .admin(
                "CreateReaderKey",
                Method::POST,
                &format!("/{ADMIN_PREFIX}/v1/keys"),
                &query,
            )
            .await?;
        let issued: IssuedKeys = serde_json::from_slice(&body)
            .map_err(|e| StorageError::Protocol(format!("key administration answer: {e}")))?;
        tracing::info!(bucket = %bucket, files = count, "job files published for their submitter");
        Ok(ReaderBucket {
            bucket,
            access_key: issued.access_key,
            secret_key: Secret::new(issued.secret_key),
            files: count,
        })
    }

    /// Deletes every object and the bucket (and revokes its keys). Gone already is fine.
    #[tracing::instrument(skip(self), fields(bucket = %bucket))]
    pub async fn delete_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        self.revoke(bucket).await?;
        self.admin.remove_bucket(bucket).await?;
        metrics::counter!("s3_job_buckets_deleted_total").increment(1);
        Ok(())
    }
}

fn check_prefix(prefix: &str) -> Result<(), StorageError> {
    let ok = prefix.len() <= 20
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && prefix
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(StorageError::Config(format!(
            "s3.bucket_prefix {prefix:?}: use at most 20 of [a-z0-9-], starting with a letter or digit"
        )))
    }
}

/// `<prefix><job id>` as a valid S3 bucket name.
pub fn bucket_name(prefix: &str, job_id: &str) -> Result<String, StorageError> {
    let mut name = String::with_capacity(prefix.len() + job_id.len());
    name.push_str(prefix);
    for c in job_id.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name: String = name.chars().take(63).collect();
    let name = name.trim_matches('-').to_string();
    if name.len() < 3 || job_id.chars().all(|c| !c.is_ascii_alphanumeric()) {
        return Err(StorageError::InvalidName(format!(
            "job id {job_id:?} gives no usable bucket name"
        )));
    }
    if name == ADMIN_PREFIX {
        return Err(StorageError::InvalidName(format!("{name:?} is reserved")));
    }
    Ok(name)
}

/// An object key as a relative path that stays inside the directory it is joined to.
fn safe_relative(key: &str) -> Result<PathBuf, StorageError> {
    let p = Path::new(key);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => {
                return Err(StorageError::InvalidName(format!(
                    "object key {key:?} would leave the download directory"
                )));
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(StorageError::InvalidName(format!(
            "object key {key:?} names no file"
        )));
    }
    Ok(out)
}

/// The regular files under `dir` as (object key, path), in path order; links are not
/// followed (a link could otherwise publish the gateway's own files). Blocking.
fn regular_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, StorageError> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d == dir => return Ok(out),
            Err(e) => return Err(StorageError::io(&d, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io(&d, e))?;
            let kind = entry.file_type().map_err(|e| StorageError::io(&d, e))?;
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file()
                && let Ok(rel) = path.strip_prefix(dir)
                && let Some(key) = rel
                    .components()
                    .map(|c| c.as_os_str().to_str())
                    .collect::<Option<Vec<_>>>()
            {
                out.push((key.join("/"), path.clone()));
            }
        }
    }
    out.sort();
    Ok(out)
}

struct TarFile {
    key: String,
    mode: u32,
    uid: u64,
    gid: u64,
    uname: String,
    gname: String,
    mtime: u64,
}

/// Unpacks the regular files of `archive` under `tree`. Blocking.
fn unpack(
    archive: &Path,
    tree: &Path,
    max_bytes: u64,
) -> Result<(Vec<TarFile>, u64), StorageError> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(archive).map_err(|e| StorageError::io(archive, e))?;
    let mut magic = [0u8; 2];
    let n = f
        .read(&mut magic)
        .map_err(|e| StorageError::io(archive, e))?;
    f.rewind().map_err(|e| StorageError::io(archive, e))?;
    std::fs::create_dir_all(tree).map_err(|e| StorageError::io(tree, e))?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut ar = tar::Archive::new(reader);
    let mut files = Vec::new();
    let mut skipped = 0;
    let mut total: u64 = 0;
    let entries = ar
        .entries()
        .map_err(|e| StorageError::Tarball(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| StorageError::Tarball(e.to_string()))?;
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| StorageError::Tarball(e.to_string()))?
            .into_owned();
        if !(kind.is_file() || kind.is_contiguous()) {
            tracing::warn!(path = %path.display(), kind = ?kind, "tarball entry is not a regular file; skipped");
            skipped += 1;
            continue;
        }
        let rel = match path.to_str().map(safe_relative) {
            Some(Ok(rel)) => rel,
            _ => {
                tracing::warn!(path = %path.display(), "tarball entry path is unsafe or not UTF-8; skipped");
                skipped += 1;
                continue;
            }
        };
        let key = rel
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .collect::<Vec<_>>()
            .join("/");
        // The endpoint refuses keys with backslashes, control characters, … (they could
        // leave a bucket on some backend or tool): such a file is skipped, not a failed job.
        if let Err(problem) = crate::server::paths::check_key(&key) {
            tracing::warn!(key = ?key, %problem, "tarball entry name is not a usable object key; skipped");
            skipped += 1;
            continue;
        }
        let header = entry.header();
        let meta = TarFile {
            mode: header.mode().unwrap_or(0o644),
            uid: header.uid().unwrap_or(0),
            gid: header.gid().unwrap_or(0),
            uname: header.username().ok().flatten().unwrap_or("").to_string(),
            gname: header.groupname().ok().flatten().unwrap_or("").to_string(),
            mtime: header.mtime().unwrap_or(0),
            key,
        };
        let dest = tree.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StorageError::io(parent, e))?;
        }
        let mut out = std::fs::File::create(&dest).map_err(|e| StorageError::io(&dest, e))?;
        // Counted while copying: the header's size field is the archive's word, not a fact.
        let budget = max_bytes.saturating_sub(total).saturating_add(1);
        let copied = std::io::copy(&mut std::io::Read::take(&mut entry, budget), &mut out)
            .map_err(|e| StorageError::Tarball(format!("{}: {e}", meta.key)))?;
        total = total.saturating_add(copied);
        if total > max_bytes {
            return Err(StorageError::Tarball(format!(
                "unpacked initial state exceeds {max_bytes} bytes (s3.max_initial_state_bytes)"
            )));
        }
        // A later entry with the same path replaces the earlier one, like tar does.
        files.retain(|f: &TarFile| f.key != meta.key);
        files.push(meta);
    }
    Ok((files, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_are_valid() {
        assert_eq!(bucket_name("job-", "42").unwrap(), "job-42");
        assert_eq!(bucket_name("job-", "A_b.C:d").unwrap(), "job-a-b-c-d");
        assert_eq!(bucket_name("job-", "--x--").unwrap(), "job-x");
        let long = "x".repeat(100);
        assert_eq!(bucket_name("job-", &long).unwrap().len(), 63);
        assert!(bucket_name("job-", "").is_err());
        assert!(bucket_name("job-", "///").is_err());
        assert!(bucket_name("", "dutgate-admin").is_err());
        assert!(check_prefix("Job_").is_err());
        assert!(check_prefix("job-").is_ok());
    }

    #[test]
    fn keys_cannot_escape_the_download_dir() {
        assert_eq!(safe_relative("a/b.txt").unwrap(), PathBuf::from("a/b.txt"));
        assert_eq!(safe_relative("./a").unwrap(), PathBuf::from("a"));
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("").is_err());
    }

    #[test]
    fn published_files_are_regular_files_keyed_by_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("bucket");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("top.txt"), b"1").unwrap();
        std::fs::write(root.join("a/b/deep.txt"), b"2").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let keys: Vec<String> = regular_files(&root)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a/b/deep.txt", "top.txt"]);
        assert!(
            regular_files(&dir.path().join("missing"))
                .unwrap()
                .is_empty()
        );
    }

    /// The embedded endpoint on 127.0.0.1 (a DUT network by default), and storage on it.
    async fn embedded() -> (
        tempfile::TempDir,
        JobStorage,
        String,
        tokio_util::sync::CancellationToken,
    ) {
        let state = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut gateway = GatewayConfig {
            state_dir: state.path().to_path_buf(),
            ..Default::default()
        };
        gateway.ports.s3 = port;
        let config = Config {
            request_timeout_seconds: 10.0,
            ..Default::default()
        };
        let server = crate::server::build(&gateway, &config).await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::server::serve(
            listener,
            server.router,
            stop.clone(),
            std::time::Duration::from_millis(100),
        ));
        let storage = JobStorage::new(&gateway, &config).await.unwrap();
        (state, storage, format!("http://127.0.0.1:{port}"), stop)
    }

    fn client(url: &str, b: &ReaderBucket) -> S3Client {
        S3Client::new(
            url,
            Signer::new(
                b.access_key.clone(),
                b.secret_key.expose(),
                "us-east-1".to_string(),
            ),
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(10),
        )
        .unwrap()
    }

    async fn read(c: &S3Client, bucket: &str, key: &str) -> Result<Vec<u8>, Option<u16>> {
        use futures::StreamExt;
        let body = c.get(bucket, key).await.map_err(|e| e.status())?;
        let mut out = Vec::new();
        let mut s = std::pin::pin!(body.into_stream());
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.map_err(|e| e.status())?);
        }
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reader_keys_read_their_bucket_only_from_their_networks_until_they_expire() {
        let (_state, storage, url, stop) = embedded().await;
        let files = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(files.path().join("results")).unwrap();
        std::fs::write(files.path().join("results/out.txt"), b"from the DUT").unwrap();
        let here: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        let minute = std::time::Duration::from_secs(60);
        let b = storage
            .publish_for_reader("7-client", files.path(), &here, minute)
            .await
            .unwrap();
        assert_eq!((b.bucket.as_str(), b.files), ("job-7-client", 1));
        let reader = client(&url, &b);
        assert_eq!(
            reader.list(&b.bucket).await.unwrap()[0].key,
            "results/out.txt"
        );
        assert_eq!(
            read(&reader, &b.bucket, "results/out.txt").await.unwrap(),
            b"from the DUT"
        );
        // Read only: no write, no delete.
        let put = reader
            .put_bytes(&b.bucket, "x", bytes::Bytes::from_static(b"x"))
            .await;
        assert_eq!(put.unwrap_err().status(), Some(403));
        let del = reader.delete_object(&b.bucket, "results/out.txt").await;
        assert_eq!(del.unwrap_err().status(), Some(403));
        // Its own bucket only.
        let other = storage.create_job_bucket("8").await.unwrap();
        storage
            .client()
            .put_bytes(&other.bucket, "secret", bytes::Bytes::from_static(b"s"))
            .await
            .unwrap();
        assert_eq!(read(&reader, &other.bucket, "secret").await, Err(Some(403)));
        // From its networks only.
        let elsewhere = storage
            .publish_for_reader(
                "9-client",
                files.path(),
                &["10.9.9.9/32".parse().unwrap()],
                minute,
            )
            .await
            .unwrap();
        assert_eq!(
            read(
                &client(&url, &elsewhere),
                &elsewhere.bucket,
                "results/out.txt"
            )
            .await,
            Err(Some(403))
        );
        // Until it expires.
        let short = storage
            .publish_for_reader(
                "10-client",
                files.path(),
                &here,
                std::time::Duration::from_secs(1),
            )
            .await
            .unwrap();
        let short_client = client(&url, &short);
        assert!(
            read(&short_client, &short.bucket, "results/out.txt")
                .await
                .is_ok()
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while read(&short_client, &short.bucket, "results/out.txt")
            .await
            .is_ok()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the key never expired"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(
            read(&short_client, &short.bucket, "results/out.txt").await,
            Err(Some(403))
        );
        // Deleting the bucket withdraws its key.
        storage.delete_bucket(&b.bucket).await.unwrap();
        assert!(read(&reader, &b.bucket, "results/out.txt").await.is_err());
        stop.cancel();
    }

    proptest::proptest! {
        /// Whatever the job id, the name is a valid S3 bucket name or a clear error.
        #[test]
        fn any_job_id_gives_a_valid_bucket_name_or_an_error(id in "\\PC{0,80}") {
            if let Ok(name) = bucket_name("job-", &id) {
                proptest::prop_assert!((3..=63).contains(&name.len()));
                proptest::prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                proptest::prop_assert!(name.starts_with("job-"));
                proptest::prop_assert!(!name.ends_with('-'));
            }
        }

        /// A key accepted for download never leaves the directory it is joined to.
        #[test]
        fn accepted_keys_stay_inside(key in "[a-z./]{0,30}") {
            if let Ok(rel) = safe_relative(&key) {
                proptest::prop_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
            }
        }
    }
}
