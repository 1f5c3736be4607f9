//! HTTP/1.1 requests written byte for byte, so that paths, headers and bodies reach a
//! service exactly as an attacker sends them (a client library would normalise `..` and
//! `%2e%2e` away, or refuse a malformed body), optionally signed with SigV4 for S3; and
//! the responses read back.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dutgate_sigv4::{RequestParts, Signer, canonical_query, sha256_hex};
use time::OffsetDateTime;

/// The region the embedded S3 endpoint signs for.
pub const REGION: &str = "us-east-1";

#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    /// As sent on the request line (may hold `..`, `%2e`, …).
    pub path: String,
    /// The query pairs, raw; sent encoded and sorted.
    pub query: Vec<(String, String)>,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.into(),
            path: path.into(),
            query: Vec::new(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    pub fn query(mut self, k: &str, v: &str) -> Self {
        self.query.push((k.into(), v.into()));
        self
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_ascii_lowercase(), v.into()));
        self
    }

    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }

    /// A JSON body (sent as is: it may be malformed on purpose).
    pub fn json(self, body: impl Into<Vec<u8>>) -> Self {
        self.header("content-type", "application/json").body(body)
    }

    /// Signs with SigV4 for `host` (`addr:port`, the Host header) as of `now`. The path is
    /// signed as the server decodes it, so that a percent-encoded path still verifies and
    /// reaches the access rules.
    pub fn signed(
        mut self,
        host: &str,
        access_key: &str,
        secret_key: &str,
        now: OffsetDateTime,
    ) -> Self {
        let decoded = percent_decode(&self.path);
        let hash = sha256_hex(&self.body);
        let signed = Signer::new(access_key, secret_key, REGION).sign(
            &RequestParts {
                method: &self.method,
                host,
                path: &decoded,
                query: &self.query,
                headers: &self.headers,
                payload_hash: &hash,
            },
            now,
        );
        self.headers
            .push(("authorization".into(), signed.authorization));
        self.headers.push(("x-amz-date".into(), signed.amz_date));
        self.headers
            .push(("x-amz-content-sha256".into(), signed.content_sha256));
        self
    }

    /// The request as sent to `host` (`addr:port`).
    pub fn to_bytes(&self, host: &str) -> Vec<u8> {
        let query = canonical_query(&self.query);
        let target = if query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{query}", self.path)
        };
        let mut head = format!(
            "{} {target} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n",
            self.method,
            self.body.len()
        );
        // The server closes the connection after its answer, unless the request says
        // otherwise (a WebSocket upgrade).
        if !self.headers.iter().any(|(k, _)| k == "connection") {
            head.push_str("connection: close\r\n");
        }
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// `METHOD path?query`, for messages.
    pub fn line(&self) -> String {
        let query = canonical_query(&self.query);
        if query.is_empty() {
            format!("{} {}", self.method, self.path)
        } else {
            format!("{} {}?{query}", self.method, self.path)
        }
    }
}

/// A response read to the end of the connection.
#[derive(Debug, Clone, Default)]
pub struct RawResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    /// Parses a whole HTTP/1.1 response (the server closed the connection after it);
    /// `None` when there is no status line (nothing came back).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let split = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&bytes[..split]);
        let mut lines = head.lines();
        let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let raw = &bytes[split + 4..];
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let body = if chunked { dechunk(raw) } else { raw.to_vec() };
        Some(Self {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `error` of a JSON error body (`{"error": "…", "field": …}`).
    pub fn json_error(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v["error"].as_str().map(str::to_string)
    }

    /// The `<Code>` of an S3 XML error body.
    pub fn s3_code(&self) -> Option<&str> {
        self.body
            .split("<Code>")
            .nth(1)
            .and_then(|s| s.split("</Code>").next())
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            return out;
        };
        let start = eol + 2;
        if size == 0 || raw.len() < start + size {
            return out;
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = raw.get(start + size + 2..).unwrap_or_default();
    }
}

/// Whether `bytes` hold a whole response: its head and as much body as it announced (a
/// server that keeps the connection open, after a refused WebSocket upgrade, is not waited
/// for).
fn complete(bytes: &[u8]) -> bool {
    let Some(split) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..split]).to_ascii_lowercase();
    let body = &bytes[split + 4..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .is_some_and(|n| body.len() >= n)
}

/// Sends `bytes` on `stream` and reads the response until it is whole or the server closes
/// the connection (or `timeout` passes without a byte).
pub fn exchange(
    mut stream: TcpStream,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<RawResponse> {
    let port = stream.peer_addr().map(|a| a.port()).unwrap_or(0);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // A server may answer (413, 401) and close before it read a large body: what it said
    // still counts, so a failed write is not the end.
    let written = stream.write_all(bytes);
    let mut out = Vec::new();
    let mut chunk = [0u8; 65536];
    let read = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                out.extend_from_slice(&chunk[..n]);
                if complete(&out) {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    match RawResponse::parse(&out) {
        Some(r) => {
            // The scenario's OpenAPI check, when one is active (`api_schema::activate`).
            crate::api_schema::observe(port, bytes, &r);
            Ok(r)
        }
        None => {
            written?;
            read?;
            Err(std::io::Error::other(format!(
                "no HTTP response: {:?}",
                String::from_utf8_lossy(&out)
            )))
        }
    }
}

/// Percent-decoding of a request path (`+` stays a `+`); invalid escapes stay as they are.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = b.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_parsed_plain_and_chunked() {
        let r = RawResponse::parse(
            b"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\n\r\n{\"error\":\"no\"}",
        )
        .unwrap();
        assert_eq!(r.status, 403);
        assert_eq!(r.json_error().as_deref(), Some("no"));
        let r = RawResponse::parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "abcdef");
        assert!(RawResponse::parse(b"").is_none());
    }

    #[test]
    fn whole_responses_are_recognised() {
        assert!(complete(b"HTTP/1.1 401 X\r\nContent-Length: 2\r\n\r\n{}"));
        assert!(!complete(b"HTTP/1.1 401 X\r\nContent-Length: 3\r\n\r\n{}"));
        assert!(!complete(b"HTTP/1.1 401 X\r\nContent-Length: 2\r\n"));
        assert!(complete(
            b"HTTP/1.1 200 X\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"
        ));
        assert!(!complete(b"HTTP/1.1 200 X\r\n\r\nuntil the end"));
    }

    #[test]
    fn paths_decode() {
        assert_eq!(percent_decode("/a/%2E%2E%2Fb"), "/a/../b");
        assert_eq!(percent_decode("/a/%252e"), "/a/%2e");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
