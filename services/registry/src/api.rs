//! The HTTP API: the OCI distribution pull API under `/v2/` and a JSON stats endpoint.
//!
//! Paths are parsed from the raw URI (see `reference.rs`), so one catch-all route takes every
//! `/v2/…` request and the parser decides what it is.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use utoipa::openapi::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use dutgate_core::auth::{Auth, Role};

use crate::Registry;
use crate::blobs::{Lookup, stream_file, stream_inflight};
use crate::error::{Code, OciErrors, RegistryError};
use crate::reference::{Digest, Reference, RepoName, V2Route, parse_v2_path};
use crate::stats::{Counter, StatsSnapshot};

const API_VERSION: (&str, &str) = ("Docker-Distribution-API-Version", "registry/2.0");

/// The documented routes: [`router`] serves them, [`openapi`] describes them.
fn api(auth: Auth) -> OpenApiRouter<Arc<Registry>> {
    // Every method reaches `pull` (as axum's `any`), which answers the unsupported ones 405.
    let any_method = |(schemas, paths, get_head): UtoipaMethodRouter<Arc<Registry>>| {
        (schemas, paths, get_head.fallback(pull))
    };
    let v2 = OpenApiRouter::new()
        .routes(any_method(routes!(version_bare)))
        .routes(any_method(routes!(version)))
        .routes(any_method(routes!(pull)))
        .layer(middleware::from_fn_with_state(auth, dut_network_only));
    OpenApiRouter::new().routes(routes!(stats)).merge(v2)
}

fn complete(doc: OpenApi) -> OpenApi {
    dutgate_core::openapi::document(
        doc,
        "dutgate registry",
        "A read-only pull-through cache of container images: the pull side of the OCI \
         distribution API (https://github.com/opencontainers/distribution-spec/blob/main/spec.md) \
         under `/v2/`, whose errors are `OciErrors` bodies, and its cache counters. \
         See docs/registry.md.",
    )
}

pub fn router(registry: Arc<Registry>, auth: Auth) -> Router {
    let (router, doc) = api(auth).split_for_parts();
    router
        .with_state(registry)
        .merge(dutgate_core::openapi::router(&complete(doc)))
}

/// The registry's OpenAPI document, as served at `/api/v1/openapi.json`.
pub fn openapi() -> OpenApi {
    complete(api(Auth::new(None, None, Vec::new())).into_openapi())
}

/// Design §10: pulls come from the DUT network (or a holder of a user/admin token). The
/// refusal is a spec `DENIED` so container tools print it.
async fn dut_network_only(State(auth): State<Auth>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let allowed = peer.is_some_and(|ip| auth.is_dut_address(ip))
        || auth.check(req.headers(), Role::User).is_ok();
    if allowed {
        next.run(req).await
    } else {
        RegistryError::new(
            StatusCode::FORBIDDEN,
            Code::Denied,
            "the registry only serves the DUT network",
        )
        .into_response()
    }
}

/// Cache counters since start (no token).
#[utoipa::path(get, path = "/api/v1/registry/stats", tag = "stats",
    responses((status = 200, description = "The counters.", body = StatsSnapshot)))]
async fn stats(State(reg): State<Arc<Registry>>) -> Response {
    axum::Json(reg.stats.snapshot()).into_response()
}

/// API version check (OCI `end-1`): `/v2/` without its slash.
#[utoipa::path(method(get, head), path = "/v2", tag = "oci", security((), ("bearer" = [])),
    responses(
        (status = 200, description = "`{}` with `Docker-Distribution-API-Version: registry/2.0`; no auth challenge.", body = Object),
        (status = 403, description = "`DENIED`: not from the DUT network and no token.", body = OciErrors),
    ))]
async fn version_bare(state: State<Arc<Registry>>, req: Request) -> Response {
    pull(state, req).await
}

/// API version check (OCI `end-1`).
///
/// Answers peers on the DUT networks or holders of the user/admin token; every other method
/// than GET and HEAD answers 405 `UNSUPPORTED`.
#[utoipa::path(method(get, head), path = "/v2/", tag = "oci", security((), ("bearer" = [])),
    responses(
        (status = 200, description = "`{}` with `Docker-Distribution-API-Version: registry/2.0`; no auth challenge.", body = Object),
        (status = 403, description = "`DENIED`: not from the DUT network and no token.", body = OciErrors),
    ))]
async fn version(state: State<Arc<Registry>>, req: Request) -> Response {
    pull(state, req).await
}

/// Manifests and blobs (OCI distribution pull API).
///
/// `<name>/manifests/<reference>` and `<name>/blobs/<digest>`, for peers on the DUT networks
/// or holders of the user/admin token. A HEAD answers the headers only (size, digest), asking
/// the upstream without downloading. Every other method answers 405 `UNSUPPORTED`.
#[utoipa::path(method(get, head), path = "/v2/{*rest}", tag = "oci", security((), ("bearer" = [])),
    params(
        ("rest" = String, Path, description = "`<name>/manifests/<reference>` or `<name>/blobs/<digest>` (may contain `/`).", example = "library/alpine/manifests/3.20"),
        ("Range" = Option<String>, Header, description = "Blobs only: `bytes=a-b`, `a-` or `-n`."),
    ),
    responses(
        (status = 200, description = "The manifest in its own media type, or the blob; `Docker-Content-Digest`.",
            content(("application/vnd.oci.image.manifest.v1+json"), ("application/vnd.oci.image.index.v1+json"), ("application/octet-stream"))),
        (status = 206, description = "A blob range (`Content-Range`).", content_type = "application/octet-stream"),
        (status = 400, description = "`NAME_INVALID`, `TAG_INVALID`, `DIGEST_INVALID`.", body = OciErrors),
        (status = 403, description = "`DENIED`: not from the DUT network and no token, or refused upstream.", body = OciErrors),
        (status = 404, description = "`MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`, `NAME_UNKNOWN`, `UNSUPPORTED` (listings).", body = OciErrors),
        (status = 405, description = "`UNSUPPORTED`: uploads (read-only cache).", body = OciErrors),
        (status = 416, description = "`SIZE_INVALID`: range outside the blob (`Content-Range: bytes */<size>`).", body = OciErrors),
        (status = 429, description = "`TOOMANYREQUESTS`: the upstream rate-limits and nothing is cached.", body = OciErrors),
        (status = 500, description = "`UNKNOWN`: see the registry log.", body = OciErrors),
        (status = 502, description = "`MANIFEST_INVALID` or a digest mismatch from the upstream.", body = OciErrors),
        (status = 503, description = "`UNAVAILABLE`: the upstream is unreachable.", body = OciErrors),
    ))]
async fn pull(State(reg): State<Arc<Registry>>, req: Request) -> Response {
    match handle(reg, req.method().clone(), req.uri().path(), req.headers()).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(
    reg: Arc<Registry>,
    method: Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<Response, RegistryError> {
    let route = parse_v2_path(path)?;
    let read = method == Method::GET || method == Method::HEAD;
    match route {
        V2Route::Upload { name } => Err(RegistryError::unsupported(format!(
            "{name}: this registry is a read-only pull-through cache; push to the upstream"
        ))),
        _ if !read => Err(RegistryError::unsupported(format!(
            "{method} is not supported: this registry is a read-only pull-through cache"
        ))),
        V2Route::Base => Ok(([API_VERSION], axum::Json(serde_json::json!({}))).into_response()),
        V2Route::Catalog | V2Route::TagsList { .. } => Err(RegistryError::new(
            StatusCode::NOT_FOUND,
            Code::Unsupported,
            "listing repositories or tags is not offered by the pull-through cache",
        )),
        V2Route::Manifest { name, reference } => manifest(&reg, method, &name, &reference).await,
        V2Route::Blob { name, digest } => blob(&reg, method, &name, &digest, headers).await,
    }
}

async fn manifest(
    reg: &Registry,
    method: Method,
    name: &RepoName,
    reference: &Reference,
) -> Result<Response, RegistryError> {
    let route = reg.upstreams.route(name);
    let m = match reference {
        Reference::Digest(d) => reg.manifests.by_digest(route.as_ref(), d).await?,
        Reference::Tag(t) => {
            let route = route.ok_or_else(|| no_upstream(name))?;
            reg.manifests.by_tag(name, &route, t).await?
        }
    };
    let mut h = HeaderMap::new();
    h.insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    if let Ok(v) = HeaderValue::from_str(&m.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    insert_digest(&mut h, &m.digest);
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(m.bytes.len() as u64),
    );
    if method == Method::HEAD {
        return Ok((h, Body::empty()).into_response());
    }
    reg.stats.add(Counter::ServedBytes, m.bytes.len() as u64);
    Ok((h, Body::from(m.bytes)).into_response())
}

fn no_upstream(name: &RepoName) -> RegistryError {
    RegistryError::new(
        StatusCode::NOT_FOUND,
        Code::NameUnknown,
        format!("no upstream is configured for {name} and there is no default upstream"),
    )
}

fn insert_digest(h: &mut HeaderMap, d: &Digest) {
    if let Ok(v) = HeaderValue::from_str(&d.to_string()) {
        h.insert("Docker-Content-Digest", v.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{d}\"")) {
        h.insert(header::ETAG, v);
    }
}

/// A single byte range `[start, end)`, already checked against the size.
#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    Full,
    Part(u64, u64),
    Unsatisfiable,
}

/// `bytes=a-b`, `bytes=a-`, `bytes=-n`. Anything else (several ranges, other units, garbage)
/// is ignored and the whole blob is served, as RFC 9110 allows.
fn parse_range(header: Option<&str>, size: u64) -> RangeSpec {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = if a.is_empty() {
        match b.parse::<u64>() {
            Ok(0) => return RangeSpec::Unsatisfiable,
            Ok(n) => Some((size.saturating_sub(n), size)),
            Err(_) => None,
        }
    } else {
        match (a.parse::<u64>(), b) {
            (Ok(start), "") => Some((start, size)),
            (Ok(start), b) => match b.parse::<u64>() {
                Ok(end) if end >= start => Some((start, end.saturating_add(1).min(size))),
                _ => None,
            },
            _ => None,
        }
    };
    match parsed {
        None => RangeSpec::Full,
        Some((start, _)) if start >= size => RangeSpec::Unsatisfiable,
        Some((start, end)) => RangeSpec::Part(start, end),
    }
}

async fn blob(
    reg: &Arc<Registry>,
    method: Method,
    name: &RepoName,
    digest: &Digest,
    headers: &HeaderMap,
) -> Result<Response, RegistryError> {
    let route = reg.upstreams.route(name);
    let lookup = if method == Method::HEAD {
        reg.blobs.lookup(digest)
    } else {
        match route.clone() {
            Some(r) => reg.blobs.get_or_fetch(digest, r),
            None => reg.blobs.lookup(digest),
        }
    };
    let size = match &lookup {
        Lookup::Cached(c) => c.size,
        Lookup::Inflight(i) => i.size().await.map_err(|e| (*e).clone())?,
        Lookup::Missing => {
            // HEAD of a blob we do not have: ask upstream, do not download.
            let Some(route) = route else {
                return Err(RegistryError::blob_unknown(digest));
            };
            let size = route
                .upstream
                .head_blob(&route.remote, digest)
                .await
                .map_err(|e| e.to_registry_error(RegistryError::blob_unknown(digest)))?;
            let mut h = blob_headers(digest);
            if let Some(s) = size {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(s));
            }
            return Ok((h, Body::empty()).into_response());
        }
    };
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        size,
    );
    let mut h = blob_headers(digest);
    let (status, start, end) = match range {
        RangeSpec::Full => (StatusCode::OK, 0, size),
        RangeSpec::Part(s, e) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {s}-{}/{size}", e - 1)) {
                h.insert(header::CONTENT_RANGE, v);
            }
            (StatusCode::PARTIAL_CONTENT, s, e)
        }
        RangeSpec::Unsatisfiable => {
            let mut e = RegistryError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::SizeInvalid,
                format!("range outside the blob's {size} bytes"),
            );
            e.content_range_size = Some(size);
            return Err(e);
        }
    };
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if method == Method::HEAD {
        return Ok((status, h, Body::empty()).into_response());
    }
    let stats = reg.stats.clone();
    let count = move |r: std::io::Result<bytes::Bytes>| {
        if let Ok(b) = &r {
            stats.add(Counter::ServedBytes, b.len() as u64);
        }
        r
    };
    let body = match lookup {
        Lookup::Cached(c) => {
            let s = stream_file(c, start, end)
                .await
                .map_err(RegistryError::internal)?;
            Body::from_stream(s.map(count))
        }
        Lookup::Inflight(i) => Body::from_stream(stream_inflight(i, start, end).map(count)),
        Lookup::Missing => return Err(RegistryError::blob_unknown(digest)),
    };
    Ok((status, h, body).into_response())
}

fn blob_headers(digest: &Digest) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    insert_digest(&mut h, digest);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), RangeSpec::Part(0, 5));
        assert_eq!(parse_range(Some("bytes=5-"), 10), RangeSpec::Part(5, 10));
        assert_eq!(parse_range(Some("bytes=-3"), 10), RangeSpec::Part(7, 10));
        assert_eq!(parse_range(Some("bytes=-30"), 10), RangeSpec::Part(0, 10));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), RangeSpec::Part(8, 10));
        assert_eq!(parse_range(Some("bytes=10-"), 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=5-4"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), RangeSpec::Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 10), RangeSpec::Full);
    }
}
