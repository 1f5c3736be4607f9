//! The embedded endpoint's credential store: the admin key pair, and the job key pairs,
//! each bound to one bucket. Job keys live in `<state_dir>/s3/job-keys.json` (mode 0600),
//! rewritten atomically on every change, so a restarted `dutgate s3` keeps honouring the
//! keys of running jobs.
//!
//! A job key is of one of two kinds ([`KeyKind`]): a DUT's (read and write, from the DUT
//! networks) or a reader's (read only, from the networks it was issued for, until it
//! expires): what a job's submitter gets to download the job's files (ci-tron's
//! `job_bucket`). An expired key is unknown, as if revoked.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use dutgate_core::Secret;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::keys::{self, KeyPair};

pub const JOB_KEYS_FILE: &str = "job-keys.json";

/// Who signed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Admin,
    /// A job's DUT: only this bucket, and when `source` is set only from there.
    Job {
        bucket: String,
        source: Option<IpNet>,
    },
    /// A job's submitter: read-only operations on this bucket, from `networks` only.
    Reader {
        bucket: String,
        networks: Vec<IpNet>,
    },
}

/// What a job key may do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// A DUT's: read and write its bucket, from the DUT networks.
    #[default]
    Dut,
    /// A submitter's: read its bucket, from the key's networks.
    Reader,
}

impl KeyKind {
    fn is_dut(&self) -> bool {
        *self == KeyKind::Dut
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct JobKey {
    secret_key: String,
    bucket: String,
    created_unix_ms: i64,
    /// The only address or network the key is accepted from (its DUT's); keys written
    /// before this field existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<IpNet>,
    /// Keys written before this field existed are DUT keys.
    #[serde(default, skip_serializing_if = "KeyKind::is_dut")]
    kind: KeyKind,
    /// Reader keys: the networks the key is accepted from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    networks: Vec<IpNet>,
    /// After this instant the key is unknown (and dropped at the next change of the store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_unix_ms: Option<i64>,
}

impl JobKey {
    fn expired(&self, now_ms: i64) -> bool {
        self.expires_unix_ms.is_some_and(|t| t <= now_ms)
    }
}

/// A key as listed by the admin route (no secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyListing {
    pub access_key: String,
    pub bucket: String,
    pub created_unix_ms: i64,
    /// A DUT key's only address or network (absent: any DUT-network address).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "10.0.2.15/32")]
    pub source: Option<IpNet>,
    pub kind: KeyKind,
    /// A reader key's networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>)]
    pub networks: Vec<IpNet>,
    /// When a reader key stops being accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<i64>,
}

#[derive(Clone)]
pub struct KeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    admin: KeyPair,
    path: PathBuf,
    jobs: RwLock<HashMap<String, JobKey>>,
    /// Serialises file rewrites so that the file always holds the latest map.
    write: tokio::sync::Mutex<()>,
}

impl KeyStore {
    /// Loads the job keys from `dir` (blocking; call at start-up).
    pub fn open(dir: &Path, admin: KeyPair) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
        let path = dir.join(JOB_KEYS_FILE);
        let jobs: HashMap<String, JobKey> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                StorageError::Config(format!("{}: not a key file: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(StorageError::io(&path, e)),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                admin,
                path,
                jobs: RwLock::new(jobs),
                write: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn admin_access_key(&self) -> &str {
        &self.inner.admin.access_key
    }

    /// The secret and identity behind an access key.
    pub fn lookup(&self, access_key: &str) -> Option<(Secret, Identity)> {
        if access_key == self.inner.admin.access_key {
            return Some((self.inner.admin.secret_key.clone(), Identity::Admin));
        }
        let jobs = self.inner.jobs.read().unwrap_or_else(|p| p.into_inner());
        let key = jobs.get(access_key).filter(|k| !k.expired(now_ms()))?;
        let identity = match key.kind {
            KeyKind::Dut => Identity::Job {
                bucket: key.bucket.clone(),
                source: key.source,
            },
            KeyKind::Reader => Identity::Reader {
                bucket: key.bucket.clone(),
                networks: key.networks.clone(),
            },
        };
        Some((Secret::new(key.secret_key.clone()), identity))
    }

    pub fn identity(&self, access_key: &str) -> Option<Identity> {
        self.lookup(access_key).map(|(_, id)| id)
    }

    /// A new key pair that opens `bucket` only.
    pub async fn issue(&self, bucket: &str) -> Result<KeyPair, StorageError> {
        self.issue_for(bucket, None).await
    }

    /// A new key pair that opens `bucket` only, and only from `source` when given (a single
    /// address is a /32 or /128 network).
    pub async fn issue_for(
        &self,
        bucket: &str,
        source: Option<IpNet>,
    ) -> Result<KeyPair, StorageError> {
        let pair = keys::generate("DGJOB");
        let key = JobKey {
            secret_key: pair.secret_key.expose().to_string(),
            bucket: bucket.to_string(),
            created_unix_ms: now_ms(),
            source,
            kind: KeyKind::Dut,
            networks: Vec::new(),
            expires_unix_ms: None,
        };
        self.update(|jobs| {
            jobs.insert(pair.access_key.clone(), key);
        })
        .await?;
        metrics::counter!("s3_job_keys_issued_total").increment(1);
        Ok(pair)
    }

    /// A new read-only key pair for `bucket`, accepted from `networks` only and unknown after
    /// `valid_for`. Without networks nothing would accept it: that is refused here.
    pub async fn issue_reader(
        &self,
        bucket: &str,
        networks: Vec<IpNet>,
        valid_for: std::time::Duration,
    ) -> Result<KeyPair, StorageError> {
        if networks.is_empty() {
            return Err(StorageError::Config(
                "a reader key needs at least one network to be accepted from".into(),
            ));
        }
        let pair = keys::generate("DGRD");
        let now = now_ms();
        let key = JobKey {
            secret_key: pair.secret_key.expose().to_string(),
            bucket: bucket.to_string(),
            created_unix_ms: now,
            source: None,
            kind: KeyKind::Reader,
            networks,
            expires_unix_ms: Some(now.saturating_add(valid_for.as_millis() as i64)),
        };
        self.update(|jobs| {
            jobs.insert(pair.access_key.clone(), key);
        })
        .await?;
        metrics::counter!("s3_reader_keys_issued_total").increment(1);
        Ok(pair)
    }

    /// Withdraws every key of `bucket`; answers how many there were.
    pub async fn revoke_bucket(&self, bucket: &str) -> Result<usize, StorageError> {
        let mut removed = 0;
        self.update(|jobs| {
            let before = jobs.len();
            jobs.retain(|_, k| k.bucket != bucket);
            removed = before - jobs.len();
        })
        .await?;
        metrics::counter!("s3_job_keys_revoked_total").increment(removed as u64);
        Ok(removed)
    }

    pub fn list(&self) -> Vec<KeyListing> {
        let jobs = self.inner.jobs.read().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        let mut out: Vec<KeyListing> = jobs
            .iter()
            .filter(|(_, k)| !k.expired(now))
            .map(|(ak, k)| KeyListing {
                access_key: ak.clone(),
                bucket: k.bucket.clone(),
                created_unix_ms: k.created_unix_ms,
                source: k.source,
                kind: k.kind,
                networks: k.networks.clone(),
                expires_unix_ms: k.expires_unix_ms,
            })
            .collect();
        out.sort_by(|a, b| {
            a.bucket
                .cmp(&b.bucket)
                .then(a.access_key.cmp(&b.access_key))
        });
        out
    }

    /// Applies `change` in memory, then persists the whole map. On a write failure the
    /// in-memory change is rolled back, so memory and file never disagree.
    async fn update(
        &self,
        change: impl FnOnce(&mut HashMap<String, JobKey>),
    ) -> Result<(), StorageError> {
        let _guard = self.inner.write.lock().await;
        let (before, snapshot) = {
            let mut jobs = self.inner.jobs.write().unwrap_or_else(|p| p.into_inner());
            let before = jobs.clone();
            change(&mut jobs);
            // Expired keys already answer as unknown; each change also drops them from the file.
            let now = now_ms();
            jobs.retain(|_, k| !k.expired(now));
            (before, jobs.clone())
        };
        let path = self.inner.path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomically(&path, &snapshot))
            .await
            .map_err(|e| StorageError::Config(format!("writing job keys: {e}")))
            .and_then(|r| r);
        if let Err(e) = written {
            *self.inner.jobs.write().unwrap_or_else(|p| p.into_inner()) = before;
            return Err(e);
        }
        Ok(())
    }
}

fn write_atomically(path: &Path, jobs: &HashMap<String, JobKey>) -> Result<(), StorageError> {
    let body = serde_json::to_vec(jobs).map_err(|e| StorageError::Config(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| StorageError::io(&tmp, e))?;
    f.write_all(&body).map_err(|e| StorageError::io(&tmp, e))?;
    f.sync_all().map_err(|e| StorageError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StorageError::io(path, e))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issued_keys_survive_a_reopen_and_revocation_is_per_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let admin = keys::generate("DGADMIN");
        let store = KeyStore::open(dir.path(), admin.clone()).unwrap();
        let a = store.issue("job-a").await.unwrap();
        let b = store.issue("job-b").await.unwrap();
        assert_eq!(store.identity(&admin.access_key), Some(Identity::Admin));

        let reopened = KeyStore::open(dir.path(), admin.clone()).unwrap();
        let (secret, id) = reopened.lookup(&a.access_key).unwrap();
        assert_eq!(secret, a.secret_key);
        assert_eq!(
            id,
            Identity::Job {
                bucket: "job-a".into(),
                source: None,
            }
        );
        let net: IpNet = "10.0.2.15/32".parse().unwrap();
        let c = reopened.issue_for("job-c", Some(net)).await.unwrap();
        let again = KeyStore::open(dir.path(), admin.clone()).unwrap();
        assert_eq!(
            again.identity(&c.access_key),
            Some(Identity::Job {
                bucket: "job-c".into(),
                source: Some(net),
            })
        );
        assert_eq!(reopened.revoke_bucket("job-c").await.unwrap(), 1);

        assert_eq!(reopened.revoke_bucket("job-a").await.unwrap(), 1);
        assert!(reopened.lookup(&a.access_key).is_none());
        assert!(reopened.lookup(&b.access_key).is_some());
        assert_eq!(KeyStore::open(dir.path(), admin).unwrap().list().len(), 1);
    }

    #[tokio::test]
    async fn reader_keys_survive_a_reopen_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let admin = keys::generate("DGADMIN");
        let store = KeyStore::open(dir.path(), admin.clone()).unwrap();
        let nets: Vec<IpNet> = vec!["10.9.0.0/16".parse().unwrap()];
        assert!(
            store
                .issue_reader("job-r", Vec::new(), std::time::Duration::from_secs(60))
                .await
                .is_err()
        );
        let r = store
            .issue_reader("job-r", nets.clone(), std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let short = store
            .issue_reader("job-r", nets.clone(), std::time::Duration::from_millis(1))
            .await
            .unwrap();
        let reopened = KeyStore::open(dir.path(), admin.clone()).unwrap();
        assert_eq!(
            reopened.identity(&r.access_key),
            Some(Identity::Reader {
                bucket: "job-r".into(),
                networks: nets,
            })
        );
        // Expired: unknown at once, and gone from the file at the next change.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert!(reopened.lookup(&short.access_key).is_none());
        assert_eq!(reopened.list().len(), 1);
        reopened.issue("job-other").await.unwrap();
        let file = std::fs::read_to_string(dir.path().join(JOB_KEYS_FILE)).unwrap();
        assert!(!file.contains(&short.access_key), "{file}");
        assert_eq!(reopened.revoke_bucket("job-r").await.unwrap(), 1);
        assert!(reopened.lookup(&r.access_key).is_none());
    }
}
