//! Key administration on the embedded endpoint, signed with the admin key pair like any
//! S3 request (s3s verifies the signature before this route runs):
//!
//! - `POST   /dutgate-admin/v1/keys?bucket=B[&source=NET]` → `201 {"access_key", "secret_key",
//!   "bucket"[, "source"]}`; with `source` (an address or a network, e.g. `10.0.2.15` or
//!   `10.0.2.0/24`) the key is accepted from there only
//! - `POST   /dutgate-admin/v1/keys?bucket=B&access=read&networks=NET[,NET…]&expires_in_seconds=N`
//!   → `201 {"access_key", "secret_key", "bucket", "networks", "expires_in_seconds"}`: a
//!   reader key (read-only, from those networks only, unknown after N seconds)
//! - `DELETE /dutgate-admin/v1/keys?bucket=B` → `200 {"bucket", "revoked": N}`
//! - `GET    /dutgate-admin/v1/keys`          → `200 [{"access_key", "bucket", "created_unix_ms"}]`
//!
//! Errors are S3 XML errors (403 AccessDenied for non-admin keys, 404 NoSuchBucket,
//! 400 InvalidArgument).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use ipnet::IpNet;
use s3s::route::S3Route;
use s3s::{Body, S3Request, S3Response, S3Result, s3_error};

use serde::Serialize;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::access::percent_decode;
use super::keystore::{Identity, KeyListing, KeyStore};
use crate::jobs::ADMIN_PREFIX;

/// The documented admin routes (with [`AdminRoute`] their only implementation).
pub(crate) fn api() -> OpenApiRouter {
    OpenApiRouter::new().routes(routes!(list_keys, issue_keys, revoke_keys))
}

/// A key pair issued by `POST /dutgate-admin/v1/keys`: the only time its secret is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedKeys {
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
    /// A DUT key's source restriction, as a network (`10.0.2.15/32`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A reader key's networks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// A reader key's life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<u64>,
}

/// What `DELETE /dutgate-admin/v1/keys` revoked.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RevokedKeys {
    pub bucket: String,
    pub revoked: usize,
}

// The three operations below document `AdminRoute::call`, which serves them inside s3s once
// it has verified the request's SigV4 signature: they are never routed themselves.

/// The job key pairs, sorted by bucket (no secrets).
///
/// Signed with the admin key pair like any S3 request; errors are S3 XML.
#[utoipa::path(get, path = "/dutgate-admin/v1/keys", tag = "keys", security(("sigv4" = [])),
    responses(
        (status = 200, description = "The keys.", body = Vec<KeyListing>),
        (status = 400, description = "`InvalidRequest`: not SigV4.", body = String, content_type = "application/xml"),
        (status = 403, description = "`AccessDenied` (not the admin key pair), `SignatureDoesNotMatch`, `RequestTimeTooSkewed`.", body = String, content_type = "application/xml"),
        (status = 500, description = "`InternalError`.", body = String, content_type = "application/xml"),
    ))]
async fn list_keys() {}

/// Issue a key pair for one bucket.
///
/// A DUT key (read and write) is accepted from the DUT networks, and with `source` only from
/// that address or network. With `access=read`, a reader key: read-only, from `networks`
/// only, unknown after `expires_in_seconds`. Errors are S3 XML.
#[utoipa::path(post, path = "/dutgate-admin/v1/keys", tag = "keys", security(("sigv4" = [])),
    params(
        ("bucket" = String, Query, description = "The bucket (it must exist)."),
        ("source" = Option<String>, Query, description = "DUT keys: an address (`10.0.2.15`, a /32 or /128) or a network (`10.0.2.0/24`)."),
        ("access" = Option<String>, Query, description = "`read` for a reader key."),
        ("networks" = Option<String>, Query, description = "Reader keys: comma-separated addresses or networks."),
        ("expires_in_seconds" = Option<u64>, Query, description = "Reader keys: 1 to 86400."),
    ),
    responses(
        (status = 201, description = "The new key pair.", body = IssuedKeys),
        (status = 400, description = "`InvalidArgument`, `InvalidBucketName`, `InvalidRequest`.", body = String, content_type = "application/xml"),
        (status = 403, description = "`AccessDenied`, `SignatureDoesNotMatch`, `RequestTimeTooSkewed`.", body = String, content_type = "application/xml"),
        (status = 404, description = "`NoSuchBucket`: create the bucket first.", body = String, content_type = "application/xml"),
        (status = 500, description = "`InternalError`.", body = String, content_type = "application/xml"),
    ))]
async fn issue_keys() {}

/// Revoke every key pair of a bucket.
///
/// Errors are S3 XML.
#[utoipa::path(delete, path = "/dutgate-admin/v1/keys", tag = "keys", security(("sigv4" = [])),
    params(("bucket" = String, Query, description = "The bucket.")),
    responses(
        (status = 200, description = "How many were revoked.", body = RevokedKeys),
        (status = 400, description = "`InvalidArgument`: no `bucket`; `InvalidRequest`.", body = String, content_type = "application/xml"),
        (status = 403, description = "`AccessDenied`, `SignatureDoesNotMatch`, `RequestTimeTooSkewed`.", body = String, content_type = "application/xml"),
        (status = 500, description = "`InternalError`.", body = String, content_type = "application/xml"),
    ))]
async fn revoke_keys() {}

pub struct AdminRoute {
    pub keys: KeyStore,
    pub data_dir: PathBuf,
}

fn is_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
        && !b.contains("..")
}

fn json_response(status: StatusCode, value: &impl Serialize) -> S3Result<S3Response<Body>> {
    let json = serde_json::to_vec(value).map_err(|e| s3_error!(InternalError, "{e}"))?;
    let mut resp = S3Response::new(Body::from(Bytes::from(json)));
    resp.status = Some(status);
    if let Ok(v) = http::HeaderValue::from_str("application/json") {
        resp.headers.insert(http::header::CONTENT_TYPE, v);
    }
    Ok(resp)
}

/// An address (`10.0.2.15`, a /32 or /128) or a network (`10.0.2.0/24`).
pub fn parse_source(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

#[async_trait::async_trait]
impl S3Route for AdminRoute {
    fn is_match(
        &self,
        _method: &Method,
        uri: &Uri,
        _headers: &HeaderMap,
        _: &mut http::Extensions,
    ) -> bool {
        uri.path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(ADMIN_PREFIX))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    async fn check_access(&self, req: &mut S3Request<Body>) -> S3Result<()> {
        let admin = req
            .credentials
            .as_ref()
            .and_then(|c| self.keys.identity(&c.access_key))
            == Some(Identity::Admin);
        if admin {
            Ok(())
        } else {
            metrics::counter!("s3_denied_total", "reason" => "admin_route").increment(1);
            Err(s3_error!(
                AccessDenied,
                "key administration needs the admin key pair"
            ))
        }
    }

    async fn call(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        let path = req.uri.path().trim_end_matches('/');
        if path != format!("/{ADMIN_PREFIX}/v1/keys") {
            return Err(s3_error!(NoSuchKey, "no admin route {path}"));
        }
        let param = |name: &str| {
            req.uri.query().unwrap_or("").split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name).then(|| percent_decode(v))
            })
        };
        let bucket = param("bucket");
        let source = match param("source") {
            None => None,
            Some(s) => Some(parse_source(&s).ok_or_else(|| {
                s3_error!(
                    InvalidArgument,
                    "source: {s:?} is neither an IP address nor a network (e.g. 10.0.2.15 or 10.0.2.0/24)"
                )
            })?),
        };
        if param("access").as_deref() == Some("read")
            && req.method == Method::POST
            && let Some(bucket) = bucket
        {
            return self.issue_reader(&req, &bucket, source).await;
        }
        match (req.method.clone(), bucket) {
            (Method::GET, _) => json_response(StatusCode::OK, &self.keys.list()),
            (Method::POST, Some(bucket)) => {
                if !is_bucket_name(&bucket) {
                    return Err(s3_error!(InvalidBucketName));
                }
                let dir = self.data_dir.join(&bucket);
                if !tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
                    return Err(s3_error!(NoSuchBucket, "create the bucket first"));
                }
                let pair = self
                    .keys
                    .issue_for(&bucket, source)
                    .await
                    .map_err(|e| s3_error!(InternalError, "{e}"))?;
                tracing::info!(
                    bucket = %bucket,
                    access_key = %pair.access_key,
                    source = %source.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                    "job keys issued"
                );
                let answer = IssuedKeys {
                    access_key: pair.access_key,
                    secret_key: pair.secret_key.expose().to_string(),
                    bucket,
                    source: source.map(|net| net.to_string()),
                    networks: Vec::new(),
                    expires_in_seconds: None,
                };
                json_response(StatusCode::CREATED, &answer)
            }
            (Method::DELETE, Some(bucket)) => {
                let revoked = self
                    .keys
                    .revoke_bucket(&bucket)
                    .await
                    .map_err(|e| s3_error!(InternalError, "{e}"))?;
                tracing::info!(bucket = %bucket, revoked, "job keys revoked");
                json_response(StatusCode::OK, &RevokedKeys { bucket, revoked })
            }
            (Method::POST | Method::DELETE, None) => Err(s3_error!(
                InvalidArgument,
                "the bucket query parameter is required"
            )),
            _ => Err(s3_error!(MethodNotAllowed)),
        }
    }
}

impl AdminRoute {
    /// `POST …/keys?bucket=B&access=read&networks=…&expires_in_seconds=N`.
    async fn issue_reader(
        &self,
        req: &S3Request<Body>,
        bucket: &str,
        source: Option<IpNet>,
    ) -> S3Result<S3Response<Body>> {
        if source.is_some() {
            return Err(s3_error!(
                InvalidArgument,
                "reader keys take `networks`, not `source`"
            ));
        }
        if !is_bucket_name(bucket) {
            return Err(s3_error!(InvalidBucketName));
        }
        let query = req.uri.query().unwrap_or("");
        let mut networks = Vec::new();
        let mut expires = None;
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "networks" => {
                    for n in v.split(',').filter(|n| !n.trim().is_empty()) {
                        networks.push(parse_source(n).ok_or_else(|| {
                            s3_error!(
                                InvalidArgument,
                                "networks: {n:?} is neither an IP address nor a network"
                            )
                        })?);
                    }
                }
                "expires_in_seconds" => {
                    expires = Some(
                        v.parse::<u64>()
                            .ok()
                            .filter(|s| (1..=MAX_READER_SECONDS).contains(s))
                            .ok_or_else(|| {
                                s3_error!(
                                    InvalidArgument,
                                    "expires_in_seconds: a number of seconds from 1 to {MAX_READER_SECONDS}"
                                )
                            })?,
                    )
                }
                _ => {}
            }
        }
        let Some(expires) = expires else {
            return Err(s3_error!(
                InvalidArgument,
                "reader keys need expires_in_seconds"
            ));
        };
        if networks.is_empty() {
            return Err(s3_error!(
                InvalidArgument,
                "reader keys need at least one network"
            ));
        }
        let dir = self.data_dir.join(bucket);
        if !tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
            return Err(s3_error!(NoSuchBucket, "create the bucket first"));
        }
        let pair = self
            .keys
            .issue_reader(bucket, networks.clone(), Duration::from_secs(expires))
            .await
            .map_err(|e| s3_error!(InternalError, "{e}"))?;
        let shown: Vec<String> = networks.iter().map(ToString::to_string).collect();
        tracing::info!(
            bucket = %bucket,
            access_key = %pair.access_key,
            networks = %shown.join(","),
            expires_in_seconds = expires,
            "reader key issued"
        );
        let answer = IssuedKeys {
            access_key: pair.access_key,
            secret_key: pair.secret_key.expose().to_string(),
            bucket: bucket.to_string(),
            source: None,
            networks: shown,
            expires_in_seconds: Some(expires),
        };
        json_response(StatusCode::CREATED, &answer)
    }
}

/// Longest life of a reader key: a day.
const MAX_READER_SECONDS: u64 = 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert_eq!(
            parse_source("10.0.2.15").unwrap().to_string(),
            "10.0.2.15/32"
        );
        assert_eq!(
            parse_source("10.0.2.77/24").unwrap().to_string(),
            "10.0.2.0/24"
        );
        assert_eq!(parse_source("::1").unwrap().to_string(), "::1/128");
        assert!(parse_source("10.0.2").is_none());
        assert!(parse_source("").is_none());
    }
}
