//! HTTP answers for artifacts: complete files with Range/ETag, downloads in progress as a
//! stream that follows the download.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dutgate_core::ApiError;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use super::{CacheStatus, Download, Phase, Progress, Served};

const CHUNK: usize = 256 * 1024;
pub const CACHE_HEADER: &str = "x-dutgate-cache";

/// A byte range request, resolved against a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// Serve everything (no Range, or one we ignore such as multiple ranges).
    Full,
    /// Inclusive byte range.
    Part(u64, u64),
    Unsatisfiable,
}

/// Parses a `Range` header (`bytes=a-b`, `bytes=a-`, `bytes=-n`). Multiple ranges and
/// other units are ignored (a full answer is always allowed).
pub fn parse_range(value: &str, size: u64) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeSpec::Full,
        (true, false) => match parse(b) {
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if size == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Part(size.saturating_sub(n), size - 1),
            None => RangeSpec::Full,
        },
        (false, _) => {
            let Some(start) = parse(a) else {
                return RangeSpec::Full;
            };
            let end = if b.is_empty() {
                Some(size.saturating_sub(1))
            } else {
                parse(b)
            };
            match end {
                None => RangeSpec::Full,
                Some(_) if start >= size => RangeSpec::Unsatisfiable,
                Some(end) if end < start => RangeSpec::Full,
                Some(end) => RangeSpec::Part(start, end.min(size - 1)),
            }
        }
    }
}

fn etag_matches(header_value: &str, etag: &str) -> bool {
    header_value
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == etag)
}

/// Where the bytes of a complete answer come from.
pub enum FileBody {
    /// Opened when the body is needed (a cache blob, which is never rewritten in place).
    Path(PathBuf),
    /// Opened already, its size and validators read from the open file: a file replaced by
    /// a rename meanwhile cannot make the headers disagree with the body.
    Open(tokio::fs::File, PathBuf),
}

/// A complete file to answer with.
pub struct FileAnswer<'a> {
    pub body: FileBody,
    pub size: u64,
    pub etag: &'a str,
    pub last_modified: Option<std::time::SystemTime>,
    /// For the `x-dutgate-cache` header; `None` for files that are not cache artifacts.
    pub cache_status: Option<CacheStatus>,
}

/// Answers with a complete file: 304 for a matching `If-None-Match`, 206 for a satisfiable
/// single range (unless `If-Range` names another version), 416 for an unsatisfiable one.
pub async fn complete_file(
    path: PathBuf,
    size: u64,
    etag: &str,
    status: CacheStatus,
    req: &HeaderMap,
) -> Response {
    file_response(
        FileAnswer {
            body: FileBody::Path(path),
            size,
            etag,
            last_modified: None,
            cache_status: Some(status),
        },
        req,
    )
    .await
}

/// Whether `If-Modified-Since` says the client's copy is current (only consulted without
/// `If-None-Match`, as RFC 9110 says; HTTP dates have whole seconds).
fn not_modified_since(req: &HeaderMap, last_modified: Option<std::time::SystemTime>) -> bool {
    let (Some(since), Some(modified)) = (
        req.get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok()),
        last_modified,
    ) else {
        return false;
    };
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    secs(modified) <= secs(since)
}

/// [`complete_file`] for any [`FileAnswer`]; adds `Last-Modified` and honours
/// `If-Modified-Since` when the answer has a modification time.
pub async fn file_response(answer: FileAnswer<'_>, req: &HeaderMap) -> Response {
    let FileAnswer {
        body,
        size,
        etag,
        last_modified,
        cache_status,
    } = answer;
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, v);
    }
    if let Some(m) = last_modified
        && let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(m))
    {
        headers.insert(header::LAST_MODIFIED, v);
    }
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(status) = cache_status {
        headers.insert(CACHE_HEADER, HeaderValue::from_static(status.as_str()));
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    match req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        Some(inm) if etag_matches(inm, etag) => {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        Some(_) => {}
        None if not_modified_since(req, last_modified) => {
            return (StatusCode::NOT_MODIFIED, headers).into_response();
        }
        None => {}
    }
    let mut range = req
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, size))
        .unwrap_or(RangeSpec::Full);
    if let Some(if_range) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok())
        && if_range.trim() != etag
    {
        range = RangeSpec::Full;
    }
    let (start, len, code) = match range {
        RangeSpec::Full => (0, size, StatusCode::OK),
        RangeSpec::Part(a, b) => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            (a, b - a + 1, StatusCode::PARTIAL_CONTENT)
        }
        RangeSpec::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            return (StatusCode::RANGE_NOT_SATISFIABLE, headers).into_response();
        }
    };
    let (mut file, path) = match body {
        FileBody::Open(f, path) => (f, path),
        FileBody::Path(path) => match tokio::fs::File::open(&path).await {
            Ok(f) => (f, path),
            Err(e) => {
                return ApiError::internal(format!("{}: {e}", path.display())).into_response();
            }
        },
    };
    if start > 0
        && let Err(e) = file.seek(SeekFrom::Start(start)).await
    {
        return ApiError::internal(format!("{}: {e}", path.display())).into_response();
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), CHUNK);
    (code, headers, Body::from_stream(stream)).into_response()
}

/// Answers a request attached to a download: waits for the upstream's answer, then either
/// serves the stored file (revalidated, stale, or finished meanwhile) or streams the bytes
/// as they arrive. A failed download cuts the body, so the client sees an error.
pub async fn streaming(download: Arc<Download>, status: CacheStatus, req: &HeaderMap) -> Response {
    let mut rx = download.subscribe();
    drop(download);
    loop {
        let progress = rx.borrow_and_update().clone();
        match progress.phase {
            Phase::Connecting => {}
            Phase::Failed(msg) => return upstream_error(msg),
            Phase::Refused(msg) => return ApiError::forbidden(msg).into_response(),
            Phase::Done {
                path,
                size,
                etag,
                status: done,
            } => {
                let status = if status == CacheStatus::Coalesced {
                    status
                } else {
                    done
                };
                return complete_file(path, size, &etag, status, req).await;
            }
            Phase::Body { tmp, total } => {
                // The file may have been moved into the store already: then the next phase
                // is Done and the loop serves that.
                if let Ok(file) = tokio::fs::File::open(&tmp).await {
                    return stream_body(file, rx, total, status);
                }
            }
        }
        if rx.changed().await.is_err() {
            return upstream_error("the download ended without a result".into());
        }
    }
}

fn upstream_error(msg: String) -> Response {
    ApiError::new(StatusCode::BAD_GATEWAY, msg).into_response()
}

struct Follow {
    file: tokio::fs::File,
    rx: watch::Receiver<Progress>,
    offset: u64,
    buf: Vec<u8>,
    done: bool,
}

/// How many bytes readers may have: all that are written, except that the last byte of a
/// known-length body waits for verification (a client must not get a complete body of
/// content that then turns out to be wrong).
fn readable(p: &Progress) -> Result<(u64, bool), String> {
    match &p.phase {
        Phase::Connecting => Ok((0, false)),
        Phase::Body { total, .. } => Ok(match total {
            Some(t) if p.written >= *t => (t.saturating_sub(1), false),
            _ => (p.written, false),
        }),
        Phase::Done { size, .. } => Ok((*size, true)),
        Phase::Failed(msg) | Phase::Refused(msg) => Err(msg.clone()),
    }
}

fn stream_body(
    file: tokio::fs::File,
    rx: watch::Receiver<Progress>,
    total: Option<u64>,
    status: CacheStatus,
) -> Response {
    let state = Follow {
        file,
        rx,
        offset: 0,
        buf: vec![0u8; CHUNK],
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            let progress = st.rx.borrow_and_update().clone();
            let (limit, finished) = match readable(&progress) {
                Ok(v) => v,
                Err(msg) => {
                    st.done = true;
                    return Some((Err(std::io::Error::other(msg)), st));
                }
            };
            if st.offset < limit {
                let want = ((limit - st.offset) as usize).min(CHUNK);
                return match st.file.read(&mut st.buf[..want]).await {
                    Ok(0) => {
                        st.done = true;
                        Some((Err(std::io::Error::other("cache file ended early")), st))
                    }
                    Ok(n) => {
                        st.offset += n as u64;
                        let bytes = Bytes::copy_from_slice(&st.buf[..n]);
                        Some((Ok::<Bytes, std::io::Error>(bytes), st))
                    }
                    Err(e) => {
                        st.done = true;
                        Some((Err(e), st))
                    }
                };
            }
            if finished {
                return None;
            }
            if st.rx.changed().await.is_err() {
                st.done = true;
                return Some((
                    Err(std::io::Error::other("the download ended without a result")),
                    st,
                ));
            }
        }
    });
    let mut headers = HeaderMap::new();
    headers.insert(CACHE_HEADER, HeaderValue::from_static(status.as_str()));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(t) = total {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(t));
    }
    (StatusCode::OK, headers, Body::from_stream(stream)).into_response()
}

/// Answers an artifact request from what the cache resolved.
pub async fn respond(served: Served, req: &HeaderMap) -> Response {
    match served {
        Served::Complete {
            path,
            size,
            etag,
            status,
        } => complete_file(path, size, &etag, status, req).await,
        Served::OpenFile {
            file,
            path,
            size,
            etag,
            modified,
        } => {
            file_response(
                FileAnswer {
                    body: FileBody::Open(file, path),
                    size,
                    etag: &etag,
                    last_modified: modified,
                    cache_status: Some(CacheStatus::File),
                },
                req,
            )
            .await
        }
        Served::Streaming { download, status } => streaming(download, status, req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeSpec::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), Part(0, 99));
        assert_eq!(parse_range("bytes=50-1000", 100), Part(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range("items=0-1", 100), Full);
        assert_eq!(parse_range("bytes=9-3", 100), Full);
        assert_eq!(parse_range("bytes=x-3", 100), Full);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
    }

    #[test]
    fn etags() {
        assert!(etag_matches("\"a\", \"b\"", "\"b\""));
        assert!(etag_matches("*", "\"b\""));
        assert!(etag_matches("W/\"b\"", "\"b\""));
        assert!(!etag_matches("\"a\"", "\"b\""));
    }

    #[test]
    fn last_byte_waits_for_verification() {
        let body = |written, total| Progress {
            phase: Phase::Body {
                tmp: PathBuf::new(),
                total,
            },
            written,
        };
        assert_eq!(readable(&body(10, Some(100))), Ok((10, false)));
        assert_eq!(readable(&body(100, Some(100))), Ok((99, false)));
        assert_eq!(readable(&body(100, None)), Ok((100, false)));
        assert!(
            readable(&Progress {
                phase: Phase::Failed("x".into()),
                written: 5
            })
            .is_err()
        );
    }
}
