//! dutgate-sigv4: AWS Signature Version 4 for S3 requests, header flavour.
//!
//! Shared by the gateway's S3 client (`dutgate-storage`) and the static DUT-side agent
//! (`dutgate-dut`), so it depends on nothing but hashing and time formatting.
//!
//! Small on purpose: the client signs only requests it builds itself (path-style URLs, a
//! handful of headers), so the canonicalisation rules needed are the S3 ones for exactly
//! that shape. Every S3 server we talk to (the embedded s3s endpoint, moto, MinIO, Garage,
//! Ceph RGW) verifies these signatures, which is what the tests rely on.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::macros::format_description;

type HmacSha256 = Hmac<Sha256>;

/// `x-amz-content-sha256` value for a body that is not hashed (streamed uploads).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// A key pair plus the region and service it signs for.
#[derive(Clone)]
pub struct Signer {
    access_key: String,
    secret_key: String,
    region: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("access_key", &self.access_key)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// What goes into one signature. `path` is the raw (not yet encoded) object path,
/// e.g. `/bucket/dir/file name.txt`; `query` holds raw (not yet encoded) pairs.
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// `host` or `host:port`, exactly as the `Host` header will carry it.
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a [(String, String)],
    /// Extra headers to sign (lower-case names), besides host/x-amz-date/x-amz-content-sha256.
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body, or [`UNSIGNED_PAYLOAD`].
    pub payload_hash: &'a str,
}

/// The headers to add to the request.
#[derive(Debug)]
pub struct Signed {
    pub authorization: String,
    pub amz_date: String,
    pub content_sha256: String,
}

impl Signer {
    pub fn new(
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
        region: impl Into<String>,
    ) -> Self {
        Self {
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            region: region.into(),
        }
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// The region the signatures are for.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The secret key, for the few callers that must hand it on (a job's DUT credentials).
    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn sign(&self, parts: &RequestParts<'_>, now: OffsetDateTime) -> Signed {
        let amz_date = format_amz_date(now);
        let date = &amz_date[..8];

        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), parts.host.to_string()),
            (
                "x-amz-content-sha256".into(),
                parts.payload_hash.to_string(),
            ),
            ("x-amz-date".into(), amz_date.clone()),
        ];
        for (k, v) in parts.headers {
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        headers.sort();
        let signed_headers = headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();

        let canonical_request = format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            parts.method,
            encode_path(parts.path),
            canonical_query(parts.query),
            canonical_headers,
            signed_headers,
            parts.payload_hash
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let key = self.signing_key(date);
        let signature = hex::encode(hmac(&key, string_to_sign.as_bytes()));
        Signed {
            authorization: format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
                self.access_key
            ),
            amz_date,
            content_sha256: parts.payload_hash.to_string(),
        }
    }

    /// A presigned URL's query (SigV4 query flavour, `host` the only signed header, the
    /// payload unsigned): `query` plus the `X-Amz-*` parameters and the signature. Send it
    /// as [`canonical_query`] of the answer. `expires_seconds` counts from `now`.
    pub fn presign(
        &self,
        method: &str,
        host: &str,
        path: &str,
        query: &[(String, String)],
        expires_seconds: u64,
        now: OffsetDateTime,
    ) -> Vec<(String, String)> {
        let amz_date = format_amz_date(now);
        let date = &amz_date[..8];
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let mut pairs: Vec<(String, String)> = query.to_vec();
        pairs.extend([
            (
                "X-Amz-Algorithm".to_string(),
                "AWS4-HMAC-SHA256".to_string(),
            ),
            (
                "X-Amz-Credential".to_string(),
                format!("{}/{scope}", self.access_key),
            ),
            ("X-Amz-Date".to_string(), amz_date.clone()),
            ("X-Amz-Expires".to_string(), expires_seconds.to_string()),
            ("X-Amz-SignedHeaders".to_string(), "host".to_string()),
        ]);
        let canonical_request = format!(
            "{method}\n{}\n{}\nhost:{host}\n\nhost\n{UNSIGNED_PAYLOAD}",
            encode_path(path),
            canonical_query(&pairs),
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        );
        let signature = hex::encode(hmac(&self.signing_key(date), string_to_sign.as_bytes()));
        pairs.push(("X-Amz-Signature".to_string(), signature));
        pairs
    }

    fn signing_key(&self, date: &str) -> Vec<u8> {
        let k_date = hmac(
            format!("AWS4{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        let k_region = hmac(&k_date, self.region.as_bytes());
        let k_service = hmac(&k_region, b"s3");
        hmac(&k_service, b"aws4_request")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn format_amz_date(now: OffsetDateTime) -> String {
    let fmt = format_description!("[year][month][day]T[hour][minute][second]Z");
    now.to_offset(time::UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| "19700101T000000Z".into())
}

/// S3's URI encoding: everything but unreserved characters is percent-encoded.
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The path as it is both sent and signed (S3 does not normalise or double-encode).
pub fn encode_path(path: &str) -> String {
    uri_encode(path, true)
}

/// Sorted, encoded `k=v&…`; also the query string the request is sent with.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "GET Object" example of the AWS SigV4 documentation for S3.
    #[test]
    fn aws_documentation_example() {
        let signer = Signer::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "us-east-1",
        );
        let now = OffsetDateTime::from_unix_timestamp(1_369_353_600).unwrap(); // 2013-05-24
        let signed = signer.sign(
            &RequestParts {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: "/test.txt",
                query: &[],
                headers: &[("range".into(), "bytes=0-9".into())],
                payload_hash: &sha256_hex(b""),
            },
            now,
        );
        assert_eq!(signed.amz_date, "20130524T000000Z");
        assert!(
            signed.authorization.ends_with(
                "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
            ),
            "{}",
            signed.authorization
        );
        assert!(
            signed
                .authorization
                .contains("SignedHeaders=host;range;x-amz-content-sha256;x-amz-date")
        );
    }

    /// The "GET Bucket (List Objects)" example: query parameters are part of the signature.
    #[test]
    fn aws_documentation_list_example() {
        let signer = Signer::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "us-east-1",
        );
        let now = OffsetDateTime::from_unix_timestamp(1_369_353_600).unwrap();
        let signed = signer.sign(
            &RequestParts {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: "/",
                query: &[
                    ("prefix".into(), "J".into()),
                    ("max-keys".into(), "2".into()),
                ],
                headers: &[],
                payload_hash: &sha256_hex(b""),
            },
            now,
        );
        assert!(
            signed.authorization.ends_with(
                "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
            ),
            "{}",
            signed.authorization
        );
    }

    /// The presigned "GET Object" example of the AWS SigV4 query-parameter documentation.
    #[test]
    fn aws_documentation_presigned_example() {
        let signer = Signer::new(
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "us-east-1",
        );
        let now = OffsetDateTime::from_unix_timestamp(1_369_353_600).unwrap();
        let q = signer.presign(
            "GET",
            "examplebucket.s3.amazonaws.com",
            "/test.txt",
            &[],
            86400,
            now,
        );
        let sig = q.iter().find(|(k, _)| k == "X-Amz-Signature").unwrap();
        assert_eq!(
            sig.1,
            "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
        assert!(canonical_query(&q).contains(
            "X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        ));
    }

    #[test]
    fn encoding_follows_s3_rules() {
        assert_eq!(encode_path("/b/dir/a b+c~.txt"), "/b/dir/a%20b%2Bc~.txt");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(uri_encode("é", false), "%C3%A9");
        let q = canonical_query(&[
            ("prefix".into(), "x/y".into()),
            ("list-type".into(), "2".into()),
        ]);
        assert_eq!(q, "list-type=2&prefix=x%2Fy");
    }
}
