//! Who may do what on the embedded endpoint.
//!
//! - [`Auth`] gives s3s the secret of an access key (admin or job), so s3s verifies the
//!   SigV4 signature; unknown keys are refused.
//! - [`Access`] runs after the signature check, before the operation: the admin key may do
//!   everything; a job key may only use object and read-only bucket operations on its own
//!   bucket (ListBuckets, CreateBucket, DeleteBucket, bucket configuration: 403).
//! - Job keys are accepted only from the DUT networks (`gateway.auth.dut_networks`), like
//!   every DUT-facing endpoint; the admin key from anywhere.
//! - For everyone, object keys and list prefixes with a `..` segment are refused: the
//!   filesystem backend maps keys to paths, and `../other-bucket/x` would otherwise reach
//!   another bucket's directory.

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::{CopyObjectInput, CopySource, UploadPartCopyInput};
use s3s::path::S3Path;
use s3s::{S3Request, S3Result, s3_error};

use super::keystore::{Identity, KeyStore};

pub struct Auth(pub KeyStore);

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.0.lookup(access_key) {
            Some((secret, _)) => Ok(SecretKey::from(secret.expose())),
            None => {
                metrics::counter!("dutgate_s3_denied_total", "reason" => "unknown_key")
                    .increment(1);
                Err(s3_error!(InvalidAccessKeyId, "unknown access key"))
            }
        }
    }
}

pub struct Access {
    pub keys: KeyStore,
    /// Only its DUT-network check is used.
    pub networks: dutgate_core::auth::Auth,
}

/// Operations a job key may use on its own bucket besides the read-only ones
/// (`Get*`, `Head*`, `List*`).
const JOB_WRITE_OPS: &[&str] = &[
    "PutObject",
    "DeleteObject",
    "DeleteObjects",
    "CopyObject",
    "CreateMultipartUpload",
    "UploadPart",
    "UploadPartCopy",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "PutObjectTagging",
    "DeleteObjectTagging",
];

fn job_may(op: &str) -> bool {
    op.starts_with("Get")
        || op.starts_with("Head")
        || op.starts_with("List")
        || JOB_WRITE_OPS.contains(&op)
}

/// True when a key or prefix has a `..` path segment.
pub fn escapes(key: &str) -> bool {
    key.split('/').any(|seg| seg == "..")
}

fn query_param<'a>(query: &'a str, name: &str) -> impl Iterator<Item = String> + 'a {
    let name = name.to_string();
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

pub fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn deny(reason: &'static str, op: &str, message: String) -> s3s::S3Error {
    metrics::counter!("dutgate_s3_denied_total", "reason" => reason).increment(1);
    tracing::info!(op, reason, "access denied: {message}");
    s3_error!(AccessDenied, "{}", message)
}

#[async_trait::async_trait]
impl S3Access for Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let peer = cx
            .extensions_mut()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let op = cx.s3_op().name();
        let Some(cred) = cx.credentials() else {
            return Err(deny("anonymous", op, "a signature is required".into()));
        };
        let Some(identity) = self.keys.identity(&cred.access_key) else {
            return Err(deny("unknown_key", op, "unknown access key".into()));
        };
        if let S3Path::Object { key, .. } = cx.s3_path()
            && escapes(key)
        {
            return Err(deny(
                "path",
                op,
                "object keys may not contain a '..' segment".into(),
            ));
        }
        let query = cx.uri().query().unwrap_or("");
        for name in ["prefix", "start-after", "marker"] {
            if query_param(query, name).any(|v| escapes(&v)) {
                return Err(deny(
                    "path",
                    op,
                    format!("{name} may not contain a '..' segment"),
                ));
            }
        }
        match identity {
            Identity::Admin => Ok(()),
            Identity::Job { bucket } => {
                // No peer address (not served over TCP) fails closed.
                if !peer.is_some_and(|ip| self.networks.is_dut_address(ip)) {
                    return Err(deny(
                        "network",
                        op,
                        format!(
                            "job keys are accepted from the DUT networks only, not from {peer:?}"
                        ),
                    ));
                }
                let own = match cx.s3_path() {
                    S3Path::Root => false,
                    S3Path::Bucket { bucket: b } | S3Path::Object { bucket: b, .. } => {
                        **b == *bucket
                    }
                };
                if !own {
                    return Err(deny(
                        "other_bucket",
                        op,
                        format!("job keys open bucket {bucket} only"),
                    ));
                }
                if !job_may(op) {
                    return Err(deny("operation", op, format!("job keys may not use {op}")));
                }
                Ok(())
            }
        }
    }

    async fn copy_object(&self, req: &mut S3Request<CopyObjectInput>) -> S3Result<()> {
        check_copy_source(
            &self.keys,
            req.credentials.as_ref(),
            &req.input.copy_source,
            "CopyObject",
        )
    }

    async fn upload_part_copy(&self, req: &mut S3Request<UploadPartCopyInput>) -> S3Result<()> {
        check_copy_source(
            &self.keys,
            req.credentials.as_ref(),
            &req.input.copy_source,
            "UploadPartCopy",
        )
    }
}

/// A copy reads its source through the same rules as a GetObject.
fn check_copy_source(
    store: &KeyStore,
    cred: Option<&s3s::auth::Credentials>,
    source: &CopySource,
    op: &str,
) -> S3Result<()> {
    let Some(identity) = cred.and_then(|c| store.identity(&c.access_key)) else {
        return Err(deny("unknown_key", op, "unknown access key".into()));
    };
    let CopySource::Bucket { bucket, key, .. } = source else {
        return Err(deny(
            "operation",
            op,
            "only bucket/key copy sources are supported".into(),
        ));
    };
    if escapes(key) {
        return Err(deny(
            "path",
            op,
            "copy source keys may not contain a '..' segment".into(),
        ));
    }
    match identity {
        Identity::Admin => Ok(()),
        Identity::Job { bucket: own } if **bucket == *own => Ok(()),
        Identity::Job { bucket: own } => Err(deny(
            "other_bucket",
            op,
            format!("job keys open bucket {own} only"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_segments_are_caught() {
        assert!(escapes(".."));
        assert!(escapes("../job-b/x"));
        assert!(escapes("a/../../x"));
        assert!(!escapes("a..b/c"));
        assert!(!escapes("a/.hidden"));
    }

    #[test]
    fn job_operations() {
        for ok in [
            "GetObject",
            "PutObject",
            "ListObjectsV2",
            "HeadBucket",
            "DeleteObject",
            "UploadPart",
        ] {
            assert!(job_may(ok), "{ok}");
        }
        for no in [
            "CreateBucket",
            "DeleteBucket",
            "PutBucketPolicy",
            "DeleteBucketPolicy",
            "PutBucketVersioning",
        ] {
            assert!(!job_may(no), "{no}");
        }
    }

    #[test]
    fn query_values_are_decoded() {
        let q = "list-type=2&prefix=%2E%2E%2Fjob-b&x";
        assert_eq!(
            query_param(q, "prefix").collect::<Vec<_>>(),
            vec!["../job-b"]
        );
        assert_eq!(percent_decode("a%20b+c%zz"), "a b c%zz");
    }

    proptest::proptest! {
        /// Decoding never panics, and encoding then decoding gives the input back.
        #[test]
        fn percent_decoding_round_trips(s in "\\PC{0,40}") {
            let encoded = crate::sigv4::uri_encode(&s, false);
            proptest::prop_assert_eq!(percent_decode(&encoded), s.clone());
            let _ = percent_decode(&s);
        }
    }
}
