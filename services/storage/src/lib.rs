//! dutgate-storage: job buckets over the S3 API.
//!
//! - [`JobStorage`] (one per gateway, used by the executor and the per-job process):
//!   create a job bucket with DUT-scoped keys, fill it from the submitter's tarball, list,
//!   stream or download its objects, revoke the keys, delete the bucket.
//! - [`S3Client`]: the one module that makes S3 calls (object transfers on `object_store`,
//!   with retries and multipart upload; bucket and admin calls signed with [`sigv4`]).
//! - The embedded endpoint `dutgate s3` (port `gateway.ports.s3`, default 9000): s3s over our
//!   filesystem backend in a directory of the state dir, with its own credential store: the admin key pair opens
//!   everything, a job's key pair opens that job's bucket and nothing else.
//!
//! Configuration is the `s3` section ([`Config`]); see `docs/storage.md`.
//!
//! Invariant: no other crate speaks S3 or SigV4; they go through [`JobStorage`]/[`S3Client`].

pub mod client;
pub mod config;
pub mod error;
pub mod fuzzing;
pub mod jobs;
pub mod keys;
pub mod server;
pub mod sigv4;
pub mod telemetry;

pub use client::{ListPage, ObjectBody, ObjectInfo, S3Client};
pub use config::{Backend, Config};
pub use error::StorageError;
pub use jobs::{DownloadSummary, JobBucket, JobStorage, UploadSummary};
pub use keys::KeyPair;
pub use server::{openapi, run};
