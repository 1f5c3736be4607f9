//! The job bucket step, behind one trait: create the bucket and the DUT-scoped credentials,
//! put the initial tarball in it, bring its files back as artifacts, revoke the credentials,
//! delete the bucket.
//!
//! The executor only needs these operations; the S3 client and the embedded endpoint live in
//! the storage crate ([`S3JobStorage`] adapts it). A gateway without object storage
//! configured (`Config::object_store` unset) runs jobs without a bucket: the `job_bucket*`
//! template variables are then undefined, so a job that uses them fails to render with an
//! error naming the variable (SETUP_FAIL), never silently.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dutgate_core::config::GatewayConfig;
use dutgate_core::{MachineId, Secret};

use crate::config::Config;

/// A job's bucket and the credentials the DUT gets for it.
#[derive(Debug, Clone)]
pub struct BucketAccess {
    pub bucket: String,
    pub access_key: String,
    pub secret_key: Secret,
    /// The S3 endpoint as DUTs reach it (`s3_url`/`minio_url`).
    pub s3_url: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StorageError(pub String);

impl From<dutgate_storage::StorageError> for StorageError {
    fn from(e: dutgate_storage::StorageError) -> Self {
        Self(e.to_string())
    }
}

#[async_trait::async_trait]
pub trait JobStorage: Send + Sync + 'static {
    /// Creates the job's bucket and credentials that open it and nothing else, and, with
    /// `source`, only from that address (the machine's).
    async fn create(
        &self,
        job_id: i64,
        machine: MachineId,
        source: Option<IpAddr>,
    ) -> Result<BucketAccess, StorageError>;
    /// Extracts the initial `.tar.gz` into the bucket.
    async fn upload_tarball(&self, bucket: &str, tarball: &Path) -> Result<(), StorageError>;
    /// Downloads every object of the bucket under `dir`; returns the files written.
    async fn collect(&self, bucket: &str, dir: &Path) -> Result<Vec<PathBuf>, StorageError>;
    /// Revokes the DUT's credentials (the bucket's files stay until collected).
    async fn revoke(&self, bucket: &str) -> Result<(), StorageError>;
    /// Deletes the bucket and its objects (once they are kept as artifacts).
    async fn delete(&self, bucket: &str) -> Result<(), StorageError>;
}

/// The gateway's `s3` section as the executor carries it. The `dutgate` binary sets it from
/// the config file's `s3` section; it is not read from the `executor` section.
#[derive(Debug, Clone)]
pub struct ObjectStore(pub dutgate_storage::Config);

impl PartialEq for ObjectStore {
    fn eq(&self, other: &Self) -> bool {
        // Serialisation masks the secret, so it is compared on its own.
        serde_json::to_value(&self.0).ok() == serde_json::to_value(&other.0).ok()
            && self.0.secret_key.as_ref().map(Secret::expose)
                == other.0.secret_key.as_ref().map(Secret::expose)
    }
}

/// [`JobStorage`] over the storage crate (embedded endpoint or external S3).
pub struct S3JobStorage {
    inner: dutgate_storage::JobStorage,
}

impl S3JobStorage {
    pub fn new(inner: dutgate_storage::JobStorage) -> Self {
        Self { inner }
    }
}

#[async_trait::async_trait]
impl JobStorage for S3JobStorage {
    async fn create(
        &self,
        job_id: i64,
        machine: MachineId,
        source: Option<IpAddr>,
    ) -> Result<BucketAccess, StorageError> {
        let b = self
            .inner
            .create_job_bucket_for(&job_id.to_string(), source.map(ipnet::IpNet::from))
            .await?;
        if b.shared_admin_keys {
            tracing::warn!(job_id, machine_id = %machine, bucket = %b.bucket,
                "the DUT gets the gateway's S3 admin keys (external backend)");
        }
        Ok(BucketAccess {
            bucket: b.bucket,
            access_key: b.access_key,
            secret_key: b.secret_key,
            s3_url: b.endpoint_url,
        })
    }

    async fn upload_tarball(&self, bucket: &str, tarball: &Path) -> Result<(), StorageError> {
        let f = tokio::fs::File::open(tarball)
            .await
            .map_err(|e| StorageError(format!("{}: {e}", tarball.display())))?;
        self.inner.upload_tarball(bucket, f).await?;
        Ok(())
    }

    async fn collect(&self, bucket: &str, dir: &Path) -> Result<Vec<PathBuf>, StorageError> {
        Ok(self.inner.download_all(bucket, dir).await?.paths)
    }

    async fn revoke(&self, bucket: &str) -> Result<(), StorageError> {
        Ok(self.inner.revoke(bucket).await?)
    }

    async fn delete(&self, bucket: &str) -> Result<(), StorageError> {
        Ok(self.inner.delete_bucket(bucket).await?)
    }
}

/// The object storage jobs use, from the config. `Ok(None)`: no object storage is configured
/// for jobs.
pub async fn from_config(
    gateway: &GatewayConfig,
    config: &Config,
) -> Result<Option<Arc<dyn JobStorage>>, StorageError> {
    let Some(ObjectStore(s3)) = &config.object_store else {
        return Ok(None);
    };
    let inner = dutgate_storage::JobStorage::new(gateway, s3).await?;
    Ok(Some(Arc::new(S3JobStorage::new(inner))))
}
