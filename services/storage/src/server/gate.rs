//! What the embedded endpoint refuses before s3s sees a request.
//!
//! s3s also verifies AWS Signature Version 2 (header `Authorization: AWS <key>:<sig>`,
//! presigned `?AWSAccessKeyId=…&Signature=…`, and browser-form POSTs), with a plain `!=`
//! on the signature and no freshness check on the header form. Nothing here needs SigV2
//! (every DUT-side tool speaks SigV4), so it is refused outright, before any secret is
//! looked up or any signature computed:
//!
//! - an `Authorization` header that is not SigV4 (`AWS4-HMAC-SHA256 …`), or more than one;
//! - a query with `Signature` or `AWSAccessKeyId` (SigV2 presigned URLs);
//! - a presigned SigV4 URL valid for more than 7 days (`X-Amz-Expires`, S3's own limit);
//! - `multipart/form-data` POSTs (browser-form uploads, whose signature and object key come
//!   in the body): job buckets are written with PUT.
//!
//! - a SigV4 request whose `x-amz-date` is more than 15 minutes from the server's clock
//!   (`403 RequestTimeTooSkewed`), an expired presigned URL (`403 AccessDenied`, "Request
//!   has expired") or one dated more than 15 minutes ahead. s3s checks the same; checking
//!   here first keeps it true whatever s3s does, and before any secret is looked up.
//!
//! s3s compares SigV4 signatures (header, presigned, POST policy) in constant time
//! (`subtle`).
//!
//! Each refusal is an S3 XML error, counted in `dutgate_s3_denied_total` and logged with
//! the access key id (never a secret or a signature) and the source address.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, Uri, header};
use time::OffsetDateTime;

use super::access::{peer_of, percent_decode};

/// S3's longest presigned URL validity (7 days).
pub const MAX_PRESIGNED_EXPIRY_SECONDS: u64 = 604_800;

/// A refusal: an S3 error plus what goes into the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// `dutgate_s3_denied_total`'s `reason`.
    pub reason: &'static str,
    /// The access key id the request names, if any.
    pub access_key: Option<String>,
}

impl Refusal {
    fn new(
        status: StatusCode,
        code: &'static str,
        reason: &'static str,
        access_key: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            reason,
            access_key,
        }
    }

    /// `<Error><Code>…</Code><Message>…</Message></Error>`, as s3s writes its errors.
    pub fn into_s3_response(self) -> Response {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{}</Code><Message>{}</Message></Error>",
            self.code,
            quick_xml::escape::escape(self.message.as_str())
        );
        (
            self.status,
            [(header::CONTENT_TYPE, "application/xml")],
            body,
        )
            .into_response()
    }
}

const SIGV2_MESSAGE: &str = "Signature Version 2 is not accepted; sign requests with AWS4-HMAC-SHA256 (Signature Version 4)";

/// How far a SigV4 `x-amz-date` may be from the server's clock (S3's 15 minutes).
pub const MAX_CLOCK_SKEW: time::Duration = time::Duration::minutes(15);

fn parse_amz_date(s: &str) -> Option<OffsetDateTime> {
    let fmt = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::PrimitiveDateTime::parse(s.trim(), &fmt)
        .ok()
        .map(|t| t.assume_utc())
}

/// The access key id of a SigV4 `Credential=<key>/<scope>` (header or query).
fn credential_key(s: &str) -> Option<String> {
    let start = s
        .find("Credential=")
        .map(|i| i + "Credential=".len())
        .unwrap_or(0);
    s[start..].split('/').next().map(|k| k.trim().to_string())
}

/// Decides on a request from its method, URI and headers (the body is never read), as of
/// `now`.
pub fn inspect(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    now: OffsetDateTime,
) -> Result<(), Refusal> {
    let auth: Vec<&[u8]> = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if auth.len() > 1 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "auth_scheme",
            None,
            "more than one Authorization header",
        ));
    }
    if let Some(value) = auth.first() {
        let value = String::from_utf8_lossy(value);
        if let Some(rest) = value.strip_prefix("AWS ") {
            let key = rest.split(':').next().map(|k| k.trim().to_string());
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "InvalidRequest",
                "sigv2",
                key,
                SIGV2_MESSAGE,
            ));
        }
        if !value.starts_with("AWS4-HMAC-SHA256 ") {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "InvalidRequest",
                "auth_scheme",
                None,
                "unsupported Authorization scheme; sign requests with AWS4-HMAC-SHA256 (Signature Version 4)",
            ));
        }
        // s3s checks this too; checked here as well so that a stale request is refused
        // before any secret is looked up, whatever the s3s version.
        let key = credential_key(&value);
        let date = headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_amz_date);
        match date {
            Some(d) if (now - d).abs() <= MAX_CLOCK_SKEW => {}
            Some(_) => {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "RequestTimeTooSkewed",
                    "stale",
                    key,
                    "x-amz-date is more than 15 minutes from the server's time; check the clock, and sign each request when it is sent",
                ));
            }
            None => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequest",
                    "stale",
                    key,
                    "a SigV4 request needs an x-amz-date header (YYYYMMDDTHHMMSSZ)",
                ));
            }
        }
    }
    let query = uri.query().unwrap_or("");
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    if param("Signature").is_some() || param("AWSAccessKeyId").is_some() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "sigv2",
            param("AWSAccessKeyId").cloned(),
            SIGV2_MESSAGE,
        ));
    }
    if param("X-Amz-Signature").is_some() || param("X-Amz-Expires").is_some() {
        let key = param("X-Amz-Credential").and_then(|c| credential_key(c));
        let expires = param("X-Amz-Expires").map(|e| e.parse::<u64>());
        let date = param("X-Amz-Date").and_then(|d| parse_amz_date(d));
        match (expires, date) {
            (Some(Ok(n)), Some(d)) if n <= MAX_PRESIGNED_EXPIRY_SECONDS => {
                // `n` is at most 7 days, so the addition cannot overflow.
                if now > d + time::Duration::seconds(n as i64) {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "AccessDenied",
                        "stale",
                        key,
                        "Request has expired: the presigned URL's X-Amz-Date plus X-Amz-Expires is past",
                    ));
                }
                if d - now > MAX_CLOCK_SKEW {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "RequestTimeTooSkewed",
                        "stale",
                        key,
                        "the presigned URL's X-Amz-Date is more than 15 minutes ahead of the server's time",
                    ));
                }
            }
            _ => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "AuthorizationQueryParametersError",
                    "presign_expiry",
                    key,
                    format!(
                        "a presigned URL needs X-Amz-Date and X-Amz-Expires, a number of seconds from 0 to {MAX_PRESIGNED_EXPIRY_SECONDS} (7 days)"
                    ),
                ));
            }
        }
    }
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    if *method == Method::POST && form {
        return Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "form_post",
            None,
            "browser-form POST uploads are not supported; upload objects with PUT",
        ));
    }
    Ok(())
}

/// The middleware in front of s3s.
pub async fn gate(req: Request, next: Next) -> Response {
    match inspect(
        req.method(),
        req.uri(),
        req.headers(),
        OffsetDateTime::now_utc(),
    ) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            let peer = peer_of(req.extensions());
            if let Some(l) = req.extensions().get::<super::RefusalLogged>() {
                l.set();
            }
            metrics::counter!("s3_denied_total", "reason" => refusal.reason).increment(1);
            tracing::warn!(
                reason = refusal.reason,
                access_key = refusal.access_key.as_deref().unwrap_or("-"),
                peer = %peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                method = %req.method(),
                "S3 request refused: {}",
                refusal.message
            );
            refusal.into_s3_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(method: Method, uri: &str, headers: &[(&str, &str)]) -> Result<(), Refusal> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        inspect(&method, &uri.parse().unwrap(), &map, now())
    }

    /// 2026-01-01T12:00:00Z, the clock of these tests.
    fn now() -> OffsetDateTime {
        time::macros::datetime!(2026-01-01 12:00:00 UTC)
    }

    const V4: &str = "AWS4-HMAC-SHA256 Credential=DGJOBKEY/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00";

    #[test]
    fn sigv4_dates_are_checked() {
        let at = |d: &str| {
            check(
                Method::GET,
                "/b/x",
                &[("authorization", V4), ("x-amz-date", d)],
            )
        };
        at("20260101T120000Z").unwrap();
        at("20260101T114500Z").unwrap();
        at("20260101T121500Z").unwrap();
        let r = at("20260101T114459Z").unwrap_err();
        assert_eq!(
            (r.status, r.code),
            (StatusCode::FORBIDDEN, "RequestTimeTooSkewed")
        );
        assert_eq!(r.access_key.as_deref(), Some("DGJOBKEY"));
        assert!(at("20260101T121501Z").is_err());
        assert!(at("garbage").is_err());
        assert!(check(Method::GET, "/b/x", &[("authorization", V4)]).is_err());
        let q = |date: &str, expires: &str| {
            check(
                Method::GET,
                &format!("/b/x?X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-Signature=00"),
                &[],
            )
        };
        q("20260101T110000Z", "3601").unwrap();
        assert_eq!(
            q("20260101T110000Z", "3599").unwrap_err().code,
            "AccessDenied"
        );
        assert_eq!(
            q("20260101T121600Z", "60").unwrap_err().code,
            "RequestTimeTooSkewed"
        );
        assert!(q("20260101T120000Z", "604801").is_err());
        assert!(check(Method::GET, "/b/x?X-Amz-Signature=00", &[]).is_err());
    }

    #[test]
    fn sigv2_is_refused_in_every_form() {
        let r = check(
            Method::GET,
            "/job-a/x",
            &[("authorization", "AWS DGJOBKEY:c2lnbmF0dXJl")],
        )
        .unwrap_err();
        assert_eq!(
            (r.status, r.code, r.reason),
            (StatusCode::BAD_REQUEST, "InvalidRequest", "sigv2")
        );
        assert_eq!(r.access_key.as_deref(), Some("DGJOBKEY"));
        let r = check(
            Method::GET,
            "/job-a/x?AWSAccessKeyId=DGJOBKEY&Expires=99999999999&Signature=abc%3D",
            &[],
        )
        .unwrap_err();
        assert_eq!(r.reason, "sigv2");
        assert_eq!(r.access_key.as_deref(), Some("DGJOBKEY"));
        assert!(check(Method::GET, "/job-a/x?Signature=abc", &[]).is_err());
        assert_eq!(
            check(Method::GET, "/", &[("authorization", "Bearer x")])
                .unwrap_err()
                .reason,
            "auth_scheme"
        );
        assert!(
            check(
                Method::GET,
                "/",
                &[
                    ("authorization", "AWS4-HMAC-SHA256 Credential=a"),
                    ("authorization", "AWS4-HMAC-SHA256 Credential=b"),
                ]
            )
            .is_err()
        );
    }

    #[test]
    fn sigv4_and_anonymous_pass_the_gate() {
        check(
            Method::GET,
            "/job-a/x?list-type=2",
            &[("authorization", V4), ("x-amz-date", "20260101T120000Z")],
        )
        .unwrap();
        check(
            Method::GET,
            "/job-a/x?X-Amz-Date=20260101T120000Z&X-Amz-Expires=604800&X-Amz-Signature=00",
            &[],
        )
        .unwrap();
        check(
            Method::PUT,
            "/job-a/x",
            &[("content-type", "multipart/form-data; boundary=x")],
        )
        .unwrap();
        check(Method::GET, "/healthz", &[]).unwrap();
    }

    #[test]
    fn long_presigned_urls_and_form_posts_are_refused() {
        let r = check(
            Method::GET,
            "/job-a/x?X-Amz-Credential=DGJOBKEY%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T120000Z&X-Amz-Expires=604801",
            &[],
        )
        .unwrap_err();
        assert_eq!(r.code, "AuthorizationQueryParametersError");
        assert_eq!(r.access_key.as_deref(), Some("DGJOBKEY"));
        assert!(check(Method::GET, "/job-a/x?X-Amz-Expires=-1", &[]).is_err());
        let r = check(
            Method::POST,
            "/job-a",
            &[("content-type", "Multipart/Form-Data; boundary=x")],
        )
        .unwrap_err();
        assert_eq!(
            (r.status, r.reason),
            (StatusCode::NOT_IMPLEMENTED, "form_post")
        );
    }

    #[test]
    fn refusals_are_s3_xml() {
        let r = Refusal::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "sigv2",
            None,
            "a <b> & c",
        );
        let resp = r.into_s3_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            resp.headers().get(header::CONTENT_TYPE).unwrap(),
            "application/xml"
        );
    }
}
