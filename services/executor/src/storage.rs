//! The job bucket step, behind one trait: create the bucket and the DUT-scoped credentials,
//! put the initial tarball in it, bring its files back as artifacts, revoke the credentials.
//!
//! The executor only needs these four operations; the S3 client and the embedded endpoint
//! live in the storage crate. A gateway without object storage configured runs jobs without a
//! bucket: the `job_bucket*` template variables are then undefined, so a job that uses them
//! fails to render with an error naming the variable (SETUP_FAIL), never silently.

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

#[async_trait::async_trait]
pub trait JobStorage: Send + Sync + 'static {
    /// Creates the job's bucket and credentials that open it and nothing else.
    async fn create(&self, job_id: i64, machine: MachineId) -> Result<BucketAccess, StorageError>;
    /// Extracts the initial `.tar.gz` into the bucket.
    async fn upload_tarball(&self, bucket: &str, tarball: &Path) -> Result<(), StorageError>;
    /// Downloads every object of the bucket under `dir`; returns the files written.
    async fn collect(&self, bucket: &str, dir: &Path) -> Result<Vec<PathBuf>, StorageError>;
    /// Revokes the DUT's credentials (the bucket's files stay until collected).
    async fn revoke(&self, bucket: &str) -> Result<(), StorageError>;
}

/// The object storage a job process uses, from the config. `None`: no object storage is
/// configured for jobs.
pub fn from_config(_gateway: &GatewayConfig, _config: &Config) -> Option<Arc<dyn JobStorage>> {
    None
}
