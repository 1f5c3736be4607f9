//! `S3Client`: the one place that makes S3 calls. Path-style URLs, SigV4-signed with
//! [`crate::sigv4`], every request with a timeout. Control calls (bucket create/delete,
//! list, admin) have a total timeout; transfers have an idle (read) timeout so that a large
//! object is never cut off for being large.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use time::OffsetDateTime;

use crate::error::StorageError;
use crate::sigv4::{self, RequestParts, Signer};

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// As the server wrote it (RFC 3339).
    pub last_modified: String,
    pub etag: Option<String>,
}

/// A streaming object body.
pub struct ObjectBody {
    /// `Content-Length`, when the server sent one.
    pub size: Option<u64>,
    pub content_type: Option<String>,
    response: reqwest::Response,
}

impl ObjectBody {
    /// The body as a stream of chunks; each chunk read is bounded by the idle timeout.
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, StorageError>> + Send {
        self.response.bytes_stream().map_err(StorageError::transfer)
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
        Ok(Self {
            http,
            endpoint,
            signer,
            control_timeout,
            idle_timeout,
            list_page_size: None,
        })
    }

    /// Connects from `local` (the source address the server sees), e.g. to act as one DUT
    /// among several on a test machine.
    pub fn with_local_address(mut self, local: std::net::IpAddr) -> Result<Self, StorageError> {
        self.http = http_client(self.control_timeout, self.idle_timeout, Some(local))?;
        Ok(self)
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
            // Some servers (s3s-fs) say "exists" for their owner's bucket too: it is ours when
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
        let hash = sigv4::sha256_hex(&body);
        let headers = [("content-length".to_string(), body.len().to_string())];
        let resp = self
            .signed(Method::PUT, &object_path(bucket, key), &[], &headers, &hash)
            .body(body)
            .send()
            .await
            .map_err(|e| StorageError::request("PutObject", e))?;
        check("PutObject", resp).await.map(drop)
    }

    /// Streams a file into `bucket/key` without reading it into memory.
    pub async fn put_file(
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
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let started = std::time::Instant::now();
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
        metrics::histogram!("s3_client_request_seconds", "op" => "PutObject")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("s3_client_bytes_total", "direction" => "up").increment(len);
        Ok(len)
    }

    /// Starts a download; the body streams as it is read.
    pub async fn get(&self, bucket: &str, key: &str) -> Result<ObjectBody, StorageError> {
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
            response: resp,
        })
    }

    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), StorageError> {
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
        // HEAD answers carry no body: name the common cases like S3 would.
        match status {
            StatusCode::NOT_FOUND => "NotFound".to_string(),
            StatusCode::FORBIDDEN => "AccessDenied".to_string(),
            _ => status.as_str().to_string(),
        }
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
