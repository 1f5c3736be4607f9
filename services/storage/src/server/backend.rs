//! The embedded endpoint's S3 operations: s3s-fs's filesystem backend, restricted to the
//! operations job buckets need, plus clean-up of the metadata files s3s-fs keeps beside
//! the objects (it leaves them behind when an object or a bucket is deleted, which on a
//! gateway that runs for months would pile up one file per object ever written).

use std::path::PathBuf;

use base64::Engine;
use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};
use s3s_fs::FileSystem;

use super::access::{Caller, deny, is_uuid};
use super::paths;

/// Second line of defence behind [`super::access::Access`]: whatever the access rules
/// let through, a key that would leave its bucket's directory never reaches s3s-fs.
fn guard<T>(req: &S3Request<T>, op: &str, key: &str) -> S3Result<()> {
    if paths::inside_bucket(key) {
        return Ok(());
    }
    Err(deny(
        "path",
        op,
        Caller::of(req),
        "object keys must stay inside their bucket".into(),
    ))
}

fn guard_source<T>(req: &S3Request<T>, op: &str, source: &CopySource) -> S3Result<()> {
    match source {
        CopySource::Bucket { key, .. } => guard(req, op, key),
        // s3s-fs answers NotImplemented for the others; nothing to resolve.
        _ => Ok(()),
    }
}

pub struct Backend {
    fs: FileSystem,
    root: PathBuf,
}

impl Backend {
    /// Blocking (s3s-fs canonicalises and cleans the root): call at start-up.
    pub fn open(root: PathBuf) -> Result<Self, crate::StorageError> {
        std::fs::create_dir_all(&root).map_err(|e| crate::StorageError::io(&root, e))?;
        let fs = FileSystem::new(&root)
            .map_err(|e| crate::StorageError::Config(format!("{}: {e:?}", root.display())))?;
        Ok(Self { fs, root })
    }

    fn sidecar_prefix(bucket: &str) -> String {
        format!(
            ".bucket-{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bucket)
        )
    }

    async fn remove_sidecars(&self, bucket: &str, key: Option<&str>) {
        let prefix = match key {
            Some(k) => format!(
                "{}object-{}.",
                Self::sidecar_prefix(bucket),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k)
            ),
            None => Self::sidecar_prefix(bucket),
        };
        let Ok(mut dir) = tokio::fs::read_dir(&self.root).await else {
            return;
        };
        while let Ok(Some(entry)) = dir.next_entry().await {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // Object sidecars end in `.metadata.json` / `.internal.json`; multipart ones
            // carry `.upload-<id>` between key and suffix and belong to live uploads.
            let is_object_sidecar =
                name.ends_with(".metadata.json") || name.ends_with(".internal.json");
            let is_upload = name.contains(".upload-");
            if name.starts_with(&prefix) && is_object_sidecar && (key.is_none() || !is_upload) {
                let _ = tokio::fs::remove_file(entry.path()).await;
            }
        }
    }

    /// s3s-fs checks that the caller started an upload before it writes, completes or
    /// aborts it, but not before it lists its parts: the same check, from the file s3s-fs
    /// keeps per upload (`.upload-<id>.json`, the starting access key as JSON).
    async fn check_upload_owner(&self, req: &S3Request<ListPartsInput>) -> S3Result<()> {
        let id = &req.input.upload_id;
        if !is_uuid(id) {
            return Err(s3_error!(NoSuchUpload));
        }
        let path = self.root.join(format!(".upload-{id}.json"));
        let started_by: Option<String> = match tokio::fs::read(&path).await {
            Ok(b) => serde_json::from_slice(&b).map_err(|_| s3_error!(NoSuchUpload))?,
            Err(_) => return Err(s3_error!(NoSuchUpload)),
        };
        let caller = req.credentials.as_ref().map(|c| c.access_key.as_str());
        if started_by.as_deref() == caller {
            return Ok(());
        }
        Err(deny(
            "other_upload",
            "ListParts",
            Caller::of(req),
            "this upload was started with another key".into(),
        ))
    }
}

// Plain forwarding; written out because `async_trait` cannot see into a macro.
#[async_trait::async_trait]
impl S3 for Backend {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }

    async fn copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        guard(&req, "CopyObject", &req.input.key)?;
        guard_source(&req, "CopyObject", &req.input.copy_source)?;
        self.fs.copy_object(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.fs.get_bucket_location(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        guard(&req, "GetObject", &req.input.key)?;
        self.fs.get_object(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        guard(&req, "HeadObject", &req.input.key)?;
        self.fs.head_object(req).await
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        self.fs.list_buckets(req).await
    }

    async fn list_objects(
        &self,
        req: S3Request<ListObjectsInput>,
    ) -> S3Result<S3Response<ListObjectsOutput>> {
        self.fs.list_objects(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        guard(&req, "PutObject", &req.input.key)?;
        self.fs.put_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        guard(&req, "CreateMultipartUpload", &req.input.key)?;
        self.fs.create_multipart_upload(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        self.fs.upload_part(req).await
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        guard_source(&req, "UploadPartCopy", &req.input.copy_source)?;
        self.fs.upload_part_copy(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.check_upload_owner(&req).await?;
        self.fs.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        guard(&req, "CompleteMultipartUpload", &req.input.key)?;
        self.fs.complete_multipart_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        guard(&req, "AbortMultipartUpload", &req.input.key)?;
        self.fs.abort_multipart_upload(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        guard(&req, "DeleteObject", &req.input.key)?;
        let bucket = req.input.bucket.clone();
        let key = req.input.key.clone();
        let out = self.fs.delete_object(req).await?;
        self.remove_sidecars(&bucket, Some(&key)).await;
        Ok(out)
    }

    async fn delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        for o in &req.input.delete.objects {
            guard(&req, "DeleteObjects", &o.key)?;
        }
        let bucket = req.input.bucket.clone();
        let keys: Vec<String> = req
            .input
            .delete
            .objects
            .iter()
            .map(|o| o.key.clone())
            .collect();
        let out = self.fs.delete_objects(req).await?;
        for k in keys {
            self.remove_sidecars(&bucket, Some(&k)).await;
        }
        Ok(out)
    }

    async fn delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = req.input.bucket.clone();
        let out = self.fs.delete_bucket(req).await?;
        self.remove_sidecars(&bucket, None).await;
        Ok(out)
    }
}
