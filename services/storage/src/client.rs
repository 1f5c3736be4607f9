//! `S3Client`: the one place that makes S3 calls.
//!
//! Object transfers (PUT, multipart upload, GET, HEAD, DELETE of an object) go through
//! `object_store`'s S3 client, which retries failed attempts (connection errors, 5xx,
//! a body cut off half-way: a GET resumes where it stopped) within [`RetryConfig`], and
//! uploads files above the part size in parts ([`S3Client::with_part_size`]).
//!
//! What `object_store` has no call for stays on our own SigV4 requests ([`crate::sigv4`]):
//! bucket create/delete/HEAD, the embedded endpoint's key administration, and listings
//! (`object_store` turns every listed key into its `Path`, which refuses keys S3 accepts,
//! such as `dir/` or `a//b`: one such key uploaded by a DUT would fail the whole listing of
//! its job). Keys that a `Path` cannot carry unchanged are fetched and deleted over the
//! same signed requests.
//!
//! Every request has a timeout: control calls a total one; transfers an idle (read)
//! timeout so that a large object is never cut off for being large.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use object_store::path::Path as StorePath;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::error::StorageError;
use crate::sigv4::{self, RequestParts, Signer};

/// Files above this size are uploaded in parts of this size (S3's smallest part is 5 MiB).
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one upload in flight at once (memory: this many parts).
const PART_CONCURRENCY: usize = 4;
/// Reads of a file being uploaded.
const READ_BLOCK: usize = 1024 * 1024;

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// As the server wrote it (RFC 3339).
    pub last_modified: String,
    pub etag: Option<String>,
}

enum BodySource {
    Store(BoxStream<'static, object_store::Result<Bytes>>),
    Http(reqwest::Response),
}

/// A streaming object body.
pub struct ObjectBody {
    /// `Content-Length`, when the server sent one.
    pub size: Option<u64>,
    pub content_type: Option<String>,
    source: BodySource,
}

impl ObjectBody {
    /// The body as a stream of chunks; each chunk read is bounded by the idle timeout.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, StorageError>> + Send {
        match self.source {
            BodySource::Store(s) => s
                .map_err(|e| StorageError::Transfer(error_chain(&e)))
                .boxed(),
            BodySource::Http(r) => r.bytes_stream().map_err(StorageError::transfer).boxed(),
        }
    }

    /// Writes the body into `path` (created or truncated); returns the bytes written.
    pub async fn write_to(self, path: &Path) -> Result<u64, StorageError> {
        use tokio::io::AsyncWriteExt;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| StorageError::io(path, e))?;
        let mut stream = std::pin::pin!(self.into_stream());
        let mut written = 0u64;
        while let Some(chunk) = stream.try_next().await? {
            file.write_all(&chunk)
                .await
                .map_err(|e| StorageError::io(path, e))?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(|e| StorageError::io(path, e))?;
        Ok(written)
    }
}

/// `object_store`'s HTTP client: our reqwest client (timeouts, source address), counting
/// the attempts that failed in a way `object_store` retries (transport errors, 5xx, 429),
/// so that retries show in the metrics (`s3_client_failed_attempts_total`) and logs.
#[derive(Debug)]
struct CountingService {
    http: reqwest::Client,
    failed_attempts: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl HttpService for CountingService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let method = req.method().clone();
        let mut result = HttpService::call(&self.http, req).await;
        // A transport failure `object_store` cannot classify (hyper's "connection closed"
        // races) is not retried by it at all. Every S3 request but a POST (create or complete
        // a multipart upload) may be sent again, so it counts as interrupted: retried for the
        // requests `object_store` marks idempotent (GET, HEAD, PUT of an object or part).
        if let Err(e) = &result
            && e.kind() == HttpErrorKind::Unknown
            && method != Method::POST
        {
            let message = error_chain(e);
            result = Err(HttpError::new(
                HttpErrorKind::Interrupted,
                std::io::Error::other(message),
            ));
        }
        let failure = match &result {
            Err(e) => Some(e.to_string()),
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                Some(r.status().to_string())
            }
            Ok(_) => None,
        };
        if let Some(reason) = failure {
            self.failed_attempts.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("s3_client_failed_attempts_total").increment(1);
            tracing::warn!(%method, %reason, "S3 request attempt failed; retried while the retry budget lasts");
        }
        result
    }
}

#[derive(Debug, Clone)]
struct Connector(Arc<CountingService>);

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(SharedService(self.0.clone())))
    }
}

#[derive(Debug)]
struct SharedService(Arc<CountingService>);

#[async_trait::async_trait]
impl HttpService for SharedService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.0.call(req).await
    }
}

/// An S3 endpoint plus the key pair to sign with.
#[derive(Clone, Debug)]
pub struct S3Client {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    signer: Signer,
    control_timeout: Duration,
    idle_timeout: Duration,
    /// `max-keys` of listing requests; unset: the server's default (1000 on S3).
    list_page_size: Option<u32>,
    part_size: usize,
    retry: RetryConfig,
    service: Arc<CountingService>,
    /// One `object_store` client per bucket (it addresses a single bucket).
    stores: Arc<Mutex<HashMap<String, Arc<AmazonS3>>>>,
}

impl S3Client {
    /// `endpoint` is the server's base URL (`http://host:9000`); buckets go into the path.
    pub fn new(
        endpoint: &str,
        signer: Signer,
        control_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<Self, StorageError> {
        let endpoint = reqwest::Url::parse(endpoint)
            .map_err(|e| StorageError::Config(format!("S3 endpoint {endpoint:?}: {e}")))?;
        if endpoint.host_str().is_none() {
            return Err(StorageError::Config(format!(
                "S3 endpoint {endpoint} has no host"
            )));
        }
        let http = http_client(control_timeout, idle_timeout, None)?;
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 5,
            // Retried requests are not signed again: stay well inside SigV4's 15 minutes.
            retry_timeout: control_timeout.max(Duration::from_secs(60)),
        };
        Ok(Self {
            service: Arc::new(CountingService {
                http: http.clone(),
                failed_attempts: Arc::new(AtomicU64::new(0)),
            }),
            http,
            endpoint,
            signer,
            control_timeout,
            idle_timeout,
            list_page_size: None,
            part_size: DEFAULT_PART_SIZE,
            retry,
            stores: Arc::default(),
        })
    }

    /// Connects from `local` (the source address the server sees), e.g. to act as one DUT
    /// among several on a test machine.
    pub fn with_local_address(mut self, local: std::net::IpAddr) -> Result<Self, StorageError> {
        self.http = http_client(self.control_timeout, self.idle_timeout, Some(local))?;
        self.service = Arc::new(CountingService {
            http: self.http.clone(),
            failed_attempts: self.service.failed_attempts.clone(),
        });
        self.stores = Arc::default();
        Ok(self)
    }

    /// Retries of object transfers: at most `max_retries` per request, backing off from
    /// `first_backoff`.
    pub fn with_retries(mut self, max_retries: usize, first_backoff: Duration) -> Self {
        self.retry.max_retries = max_retries;
        self.retry.backoff.init_backoff = first_backoff;
        self.stores = Arc::default();
        self
    }

    /// Files larger than `bytes` are uploaded in parts of `bytes` (at least 5 MiB on S3,
    /// except the last part; the embedded endpoint takes any size).
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(1);
        self
    }

    /// Request attempts that failed in a retryable way (transport error, 5xx, 429) since
    /// this client was made; each is retried while the retry budget lasts.
    pub fn failed_attempts(&self) -> u64 {
        self.service.failed_attempts.load(Ordering::Relaxed)
    }

    /// The `object_store` client of `bucket`.
    fn store(&self, bucket: &str) -> Result<Arc<AmazonS3>, StorageError> {
        let mut stores = self
            .stores
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = stores.get(bucket) {
            return Ok(s.clone());
        }
        let store = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region(self.signer.region())
            .with_access_key_id(self.signer.access_key())
            .with_secret_access_key(self.signer.secret_key())
            .with_retry(self.retry.clone())
            .with_http_connector(Connector(self.service.clone()))
            .build()
            .map_err(|e| StorageError::Config(format!("S3 client for bucket {bucket}: {e}")))?;
        let store = Arc::new(store);
        stores.insert(bucket.to_string(), store.clone());
        Ok(store)
    }

    /// Lists in pages of `n` keys (the server may answer fewer).
    pub fn with_list_page_size(mut self, n: u32) -> Self {
        self.list_page_size = Some(n.max(1));
        self
    }

    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str().trim_end_matches('/')
    }

    pub fn access_key(&self) -> &str {
        self.signer.access_key()
    }

    pub(crate) fn secret_key(&self) -> &str {
        self.signer.secret_key()
    }

    fn host_header(&self) -> String {
        let host = self.endpoint.host_str().unwrap_or_default();
        match self.endpoint.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        }
    }

    /// Builds a signed request. `path` is raw (`/bucket/key`), `body_hash` the hex SHA-256
    /// of the body or UNSIGNED-PAYLOAD.
    fn signed(
        &self,
        method: Method,
        path: &str,
        query: &[(String, String)],
        extra_headers: &[(String, String)],
        body_hash: &str,
    ) -> reqwest::RequestBuilder {
        let base_path = self.endpoint.path().trim_end_matches('/');
        let full_path = format!("{base_path}{path}");
        let host = self.host_header();
        let signed = self.signer.sign(
            &RequestParts {
                method: method.as_str(),
                host: &host,
                path: &full_path,
                query,
                headers: extra_headers,
                payload_hash: body_hash,
            },
            OffsetDateTime::now_utc(),
        );
        let mut url = format!(
            "{}://{}{}",
            self.endpoint.scheme(),
            host,
            sigv4::encode_path(&full_path)
        );
        let qs = sigv4::canonical_query(query);
        if !qs.is_empty() {
            url.push('?');
            url.push_str(&qs);
        }
        let mut rb = self
            .http
            .request(method, url)
            .header("authorization", signed.authorization)
            .header("x-amz-date", signed.amz_date)
            .header("x-amz-content-sha256", signed.content_sha256);
        for (k, v) in extra_headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        rb
    }

    /// A control request with a small in-memory body and a total timeout.
    async fn control(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(String, String)],
        body: Bytes,
    ) -> Result<reqwest::Response, StorageError> {
        let hash = sigv4::sha256_hex(&body);
        let started = std::time::Instant::now();
        let result = self
            .signed(method, path, query, &[], &hash)
            .timeout(self.control_timeout)
            .body(body)
            .send()
            .await;
        metrics::histogram!("s3_client_request_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        let resp = result.map_err(|e| StorageError::request(op, e))?;
        check(op, resp).await
    }

    pub async fn create_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        match self
            .control(
                "CreateBucket",
                Method::PUT,
                &format!("/{bucket}"),
                &[],
                Bytes::new(),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Ours already: creating it again is what a retried job set-up does.
            Err(StorageError::Server { code, .. }) if code == "BucketAlreadyOwnedByYou" => Ok(()),
            // Some servers (the embedded one) say "exists" for their owner's bucket too: it is ours when
            // these credentials can open it (on a shared S3, someone else's answers 403).
            Err(StorageError::Server {
                code,
                op,
                status,
                message,
            }) if code == "BucketAlreadyExists" => {
                if self.bucket_exists(bucket).await? {
                    Ok(())
                } else {
                    Err(StorageError::Server {
                        code,
                        op,
                        status,
                        message,
                    })
                }
            }
            Err(e) => Err(e),
        }
    }

    /// True when the bucket exists (and these credentials may see it).
    pub async fn bucket_exists(&self, bucket: &str) -> Result<bool, StorageError> {
        match self
            .control(
                "HeadBucket",
                Method::HEAD,
                &format!("/{bucket}"),
                &[],
                Bytes::new(),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(StorageError::Server { status, .. })
                if status == StatusCode::NOT_FOUND.as_u16() =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes an empty bucket. See [`S3Client::empty_bucket`].
    pub async fn delete_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        self.control(
            "DeleteBucket",
            Method::DELETE,
            &format!("/{bucket}"),
            &[],
            Bytes::new(),
        )
        .await
        .map(drop)
    }

    /// Every object of the bucket (ListObjectsV2, all pages).
    pub async fn list(&self, bucket: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type".to_string(), "2".to_string())];
            if let Some(n) = self.list_page_size {
                query.push(("max-keys".into(), n.to_string()));
            }
            if let Some(t) = &token {
                query.push(("continuation-token".into(), t.clone()));
            }
            let resp = self
                .control(
                    "ListObjectsV2",
                    Method::GET,
                    &format!("/{bucket}"),
                    &query,
                    Bytes::new(),
                )
                .await?;
            let text = resp
                .text()
                .await
                .map_err(|e| StorageError::request("ListObjectsV2", e))?;
            let page = parse_list_page(&text)?;
            out.extend(page.objects);
            match (page.is_truncated, page.next_continuation_token) {
                (true, Some(t)) if token.as_deref() != Some(t.as_str()) => token = Some(t),
                (true, _) => {
                    return Err(StorageError::Protocol(
                        "ListObjectsV2 is truncated but gives no new continuation token".into(),
                    ));
                }
                _ => return Ok(out),
            }
        }
    }

    pub async fn put_bytes(
        &self,
        bucket: &str,
        key: &str,
        body: Bytes,
    ) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        match store_path(key) {
            Ok(location) => {
                self.store(bucket)?
                    .put(&location, PutPayload::from_bytes(body))
                    .await
                    .map_err(|e| from_store("PutObject", e))?;
            }
            // Sent as it is: the server decides (and the tests check that it refuses
            // keys that would leave their bucket).
            Err(_) => {
                let hash = sigv4::sha256_hex(&body);
                let headers = [("content-length".to_string(), body.len().to_string())];
                let resp = self
                    .signed(Method::PUT, &object_path(bucket, key), &[], &headers, &hash)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| StorageError::request("PutObject", e))?;
                check("PutObject", resp).await?;
            }
        }
        metrics::histogram!("s3_client_request_seconds", "op" => "PutObject")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Uploads a file into `bucket/key`, with `metadata` as `x-amz-meta-*`: in one PUT up
    /// to the part size, in parts above it (at most [`PART_CONCURRENCY`] parts in memory).
    pub async fn put_file(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        metadata: &[(String, String)],
    ) -> Result<u64, StorageError> {
        use tokio::io::AsyncReadExt;
        let Ok(location) = store_path(key) else {
            return self.put_file_signed(bucket, key, path, metadata).await;
        };
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| StorageError::io(path, e))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| StorageError::io(path, e))?
            .len();
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, "application/octet-stream".into());
        for (k, v) in metadata {
            attributes.insert(
                Attribute::Metadata(k.to_ascii_lowercase().into()),
                v.clone().into(),
            );
        }
        let store = self.store(bucket)?;
        let started = std::time::Instant::now();
        let op = if len <= self.part_size as u64 {
            let mut body = Vec::with_capacity(len as usize);
            file.read_to_end(&mut body)
                .await
                .map_err(|e| StorageError::io(path, e))?;
            let opts = PutOptions {
                attributes,
                ..Default::default()
            };
            store
                .put_opts(&location, PutPayload::from(body), opts)
                .await
                .map_err(|e| from_store("PutObject", e))?;
            "PutObject"
        } else {
            let opts = PutMultipartOptions {
                attributes,
                ..Default::default()
            };
            let upload = store
                .put_multipart_opts(&location, opts)
                .await
                .map_err(|e| from_store("CreateMultipartUpload", e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_size);
            let mut buf = vec![0u8; READ_BLOCK];
            loop {
                let n = match file.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = writer.abort().await;
                        return Err(StorageError::io(path, e));
                    }
                };
                if n == 0 {
                    break;
                }
                if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
                    let _ = writer.abort().await;
                    return Err(from_store("UploadPart", e));
                }
                writer.write(&buf[..n]);
            }
            // `finish` aborts the upload itself when a part or the completion fails.
            writer
                .finish()
                .await
                .map_err(|e| from_store("CompleteMultipartUpload", e))?;
            "MultipartUpload"
        };
        metrics::histogram!("s3_client_request_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("s3_client_bytes_total", "direction" => "up").increment(len);
        Ok(len)
    }

    /// PUT of a file under a key that an `object_store` path cannot carry unchanged: one
    /// streamed request, without retries.
    async fn put_file_signed(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        metadata: &[(String, String)],
    ) -> Result<u64, StorageError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| StorageError::io(path, e))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| StorageError::io(path, e))?
            .len();
        let mut headers = vec![
            ("content-length".to_string(), len.to_string()),
            (
                "content-type".to_string(),
                "application/octet-stream".to_string(),
            ),
        ];
        for (k, v) in metadata {
            headers.push((format!("x-amz-meta-{}", k.to_ascii_lowercase()), v.clone()));
        }
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
            file, READ_BLOCK,
        ));
        let resp = self
            .signed(
                Method::PUT,
                &object_path(bucket, key),
                &[],
                &headers,
                sigv4::UNSIGNED_PAYLOAD,
            )
            .body(body)
            .send()
            .await
            .map_err(|e| StorageError::request("PutObject", e))?;
        check("PutObject", resp).await?;
        metrics::counter!("s3_client_bytes_total", "direction" => "up").increment(len);
        Ok(len)
    }

    /// Starts a download; the body streams as it is read (and resumes where it stopped
    /// when the connection breaks, within the retry budget).
    pub async fn get(&self, bucket: &str, key: &str) -> Result<ObjectBody, StorageError> {
        let Ok(location) = store_path(key) else {
            return self.get_signed(bucket, key).await;
        };
        let result = self
            .store(bucket)?
            .get(&location)
            .await
            .map_err(|e| from_store("GetObject", e))?;
        let content_type = result
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string());
        Ok(ObjectBody {
            size: Some(result.meta.size),
            content_type,
            source: BodySource::Store(result.into_stream()),
        })
    }

    /// GET of a key that an `object_store` path cannot carry unchanged.
    async fn get_signed(&self, bucket: &str, key: &str) -> Result<ObjectBody, StorageError> {
        let resp = self
            .signed(
                Method::GET,
                &object_path(bucket, key),
                &[],
                &[],
                &sigv4::sha256_hex(b""),
            )
            .send()
            .await
            .map_err(|e| StorageError::request("GetObject", e))?;
        let resp = check("GetObject", resp).await?;
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        Ok(ObjectBody {
            size: resp.content_length(),
            content_type,
            source: BodySource::Http(resp),
        })
    }

    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
        if let Ok(location) = store_path(key) {
            return self
                .store(bucket)?
                .delete(&location)
                .await
                .map_err(|e| from_store("DeleteObject", e));
        }
        self.control(
            "DeleteObject",
            Method::DELETE,
            &object_path(bucket, key),
            &[],
            Bytes::new(),
        )
        .await
        .map(drop)
    }

    /// Deletes every object, then the bucket. A bucket that is already gone is not an error.
    pub async fn remove_bucket(&self, bucket: &str) -> Result<(), StorageError> {
        let objects = match self.list(bucket).await {
            Ok(o) => o,
            Err(StorageError::Server { code, .. }) if code == "NoSuchBucket" => return Ok(()),
            Err(e) => return Err(e),
        };
        for o in objects {
            match self.delete_object(bucket, &o.key).await {
                Ok(()) => {}
                Err(StorageError::Server { code, .. }) if code == "NoSuchKey" => {}
                Err(e) => return Err(e),
            }
        }
        match self.delete_bucket(bucket).await {
            Err(StorageError::Server { code, .. }) if code == "NoSuchBucket" => Ok(()),
            other => other,
        }
    }

    /// A signed call to a non-S3 route of the same server (the embedded endpoint's key
    /// administration); answers the response body.
    pub(crate) async fn admin(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        query: &[(String, String)],
    ) -> Result<Bytes, StorageError> {
        let resp = self.control(op, method, path, query, Bytes::new()).await?;
        resp.bytes().await.map_err(|e| StorageError::request(op, e))
    }
}

fn http_client(
    control_timeout: Duration,
    idle_timeout: Duration,
    local: Option<std::net::IpAddr>,
) -> Result<reqwest::Client, StorageError> {
    reqwest::Client::builder()
        .connect_timeout(control_timeout.min(Duration::from_secs(10)))
        .read_timeout(idle_timeout)
        .local_address(local)
        .build()
        .map_err(|e| StorageError::Config(format!("HTTP client: {e}")))
}

/// `key` as an `object_store` path, when it carries the key unchanged (not for an empty
/// segment, a leading or trailing `/`, `.`/`..` segments or control characters).
fn store_path(key: &str) -> Result<StorePath, StorageError> {
    match StorePath::parse(key) {
        Ok(p) if p.as_ref() == key => Ok(p),
        _ => Err(StorageError::InvalidName(format!(
            "object key {key:?} cannot be sent through the S3 client"
        ))),
    }
}

/// The error and its sources, one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

/// `object_store`'s error as ours: an S3 error answer keeps its status, code and message
/// (they are only in the error's text: `object_store` does not export its request error).
fn from_store(op: &'static str, e: object_store::Error) -> StorageError {
    const MARK: &str = "Server returned non-2xx status code: ";
    let message = error_chain(&e);
    if let Some(at) = message.find(MARK) {
        let rest = &message[at + MARK.len()..];
        if let Some(status) = rest.get(..3).and_then(|s| s.parse::<u16>().ok()) {
            let body = rest.split_once(": ").map_or("", |(_, b)| b);
            let (code, text) = parse_error_body(body).unwrap_or_default();
            return StorageError::Server {
                op,
                status,
                code: if code.is_empty() {
                    default_code(status)
                } else {
                    code
                },
                message: if text.is_empty() {
                    body.chars().take(200).collect()
                } else {
                    text
                },
            };
        }
    }
    match e {
        object_store::Error::NotFound { .. } => StorageError::Server {
            op,
            status: 404,
            code: "NoSuchKey".into(),
            message,
        },
        object_store::Error::InvalidPath { .. } => StorageError::InvalidName(message),
        _ => StorageError::Unreachable { op, message },
    }
}

fn default_code(status: u16) -> String {
    // HEAD answers carry no body: name the common cases like S3 would.
    match status {
        404 => "NotFound".to_string(),
        403 => "AccessDenied".to_string(),
        _ => status.to_string(),
    }
}

fn object_path(bucket: &str, key: &str) -> String {
    format!("/{bucket}/{key}")
}

/// Turns a non-2xx answer into [`StorageError::Server`] with S3's error code.
async fn check(
    op: &'static str,
    resp: reqwest::Response,
) -> Result<reqwest::Response, StorageError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = match parse_error_body(&text) {
        Some(parsed) => parsed,
        None => (String::new(), text.chars().take(200).collect()),
    };
    let code = if code.is_empty() {
        default_code(status.as_u16())
    } else {
        code
    };
    Err(StorageError::Server {
        op,
        status: status.as_u16(),
        code,
        message,
    })
}

/// One `ListObjectsV2` answer page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    pub is_truncated: bool,
    pub next_continuation_token: Option<String>,
}

/// Parses a `ListObjectsV2` answer. The body comes from whatever S3 server the gateway is
/// configured with, so this is also what the `s3_xml` fuzz target exercises.
pub fn parse_list_page(xml: &str) -> Result<ListPage, StorageError> {
    let page: ListBucketResult = quick_xml::de::from_str(xml).map_err(|e| {
        StorageError::Protocol(format!("ListObjectsV2 answer is not a listing: {e}"))
    })?;
    Ok(ListPage {
        objects: page
            .contents
            .into_iter()
            .map(|c| ObjectInfo {
                key: c.key,
                size: c.size,
                last_modified: c.last_modified.unwrap_or_default(),
                etag: c.etag,
            })
            .collect(),
        is_truncated: page.is_truncated == Some(true),
        next_continuation_token: page.next_continuation_token,
    })
}

/// The `Code` and `Message` of an S3 XML error body, when it is one.
pub fn parse_error_body(xml: &str) -> Option<(String, String)> {
    let e: ErrorXml = quick_xml::de::from_str(xml).ok()?;
    Some((e.code.unwrap_or_default(), e.message.unwrap_or_default()))
}

#[derive(Deserialize)]
struct ErrorXml {
    #[serde(rename = "Code")]
    code: Option<String>,
    #[serde(rename = "Message")]
    message: Option<String>,
}

#[derive(Deserialize)]
struct ListBucketResult {
    #[serde(rename = "Contents", default)]
    contents: Vec<Contents>,
    #[serde(rename = "IsTruncated")]
    is_truncated: Option<bool>,
    #[serde(rename = "NextContinuationToken")]
    next_continuation_token: Option<String>,
}

#[derive(Deserialize)]
struct Contents {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "LastModified")]
    last_modified: Option<String>,
    #[serde(rename = "ETag")]
    etag: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_listing_page() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<Contents><Key>a/b.txt</Key><LastModified>2026-11-22T12:00:00.000Z</LastModified><ETag>"x"</ETag><Size>12</Size></Contents>
<Contents><Key>c &amp; d</Key><Size>0</Size></Contents>
<IsTruncated>true</IsTruncated><NextContinuationToken>tok</NextContinuationToken></ListBucketResult>"#;
        let page: ListBucketResult = quick_xml::de::from_str(xml).unwrap();
        assert_eq!(page.contents.len(), 2);
        assert_eq!(page.contents[0].key, "a/b.txt");
        assert_eq!(page.contents[0].size, 12);
        assert_eq!(page.contents[1].key, "c & d");
        assert_eq!(page.is_truncated, Some(true));
        assert_eq!(page.next_continuation_token.as_deref(), Some("tok"));
        let empty: ListBucketResult = quick_xml::de::from_str(
            "<ListBucketResult><IsTruncated>false</IsTruncated></ListBucketResult>",
        )
        .unwrap();
        assert!(empty.contents.is_empty());
    }
}
