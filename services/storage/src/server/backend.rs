//! The embedded endpoint's S3 operations: s3s-fs's filesystem backend, restricted to the
//! operations job buckets need, plus clean-up of the metadata files s3s-fs keeps beside
//! the objects (it leaves them behind when an object or a bucket is deleted, which on a
//! gateway that runs for months would pile up one file per object ever written).

use std::path::PathBuf;

use base64::Engine;
use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result};
use s3s_fs::FileSystem;

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
        self.fs.put_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
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
        self.fs.upload_part_copy(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.fs.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.fs.complete_multipart_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.fs.abort_multipart_upload(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
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
