//! Who may do what on the embedded endpoint.
//!
//! - [`Auth`] gives s3s the secret of an access key (admin or job), so s3s verifies the
//!   SigV4 signature; unknown keys are refused. (SigV2 never gets this far: see
//!   [`super::gate`].)
//! - [`Access`] runs after the signature check, before the operation: the admin key may do
//!   everything; a job key may only use object and read-only bucket operations on its own
//!   bucket (ListBuckets, CreateBucket, DeleteBucket, bucket configuration: 403).
//! - Job keys are accepted only from the DUT networks (`gateway.auth.dut_networks`), like
//!   every DUT-facing endpoint, and a key issued with a source restriction only from that
//!   address or network (its DUT's); the admin key from anywhere.
//! - For everyone, every key that reaches the filesystem backend passes
//!   [`paths::check_key`](super::paths::check_key): the request path, list parameters in the
//!   query, the `x-amz-copy-source` header and each key of a `DeleteObjects` body. The
//!   backend would otherwise resolve `../other-bucket/x` into another bucket's directory.
//!
//! Every refusal is an S3 XML `AccessDenied` (403), counted in `dutgate_s3_denied_total`
//! and logged with the access key id (never the secret) and the source address.

use std::net::{IpAddr, SocketAddr};

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::{
    CopyObjectInput, CopySource, DeleteObjectsInput, ListObjectsInput, ListObjectsV2Input,
    ListPartsInput, UploadPartCopyInput,
};
use s3s::path::S3Path;
use s3s::{S3Request, S3Result, s3_error};

use super::RefusalLogged;
use super::keystore::{Identity, KeyStore};
use super::paths::{self, KeyProblem};

pub use super::paths::percent_decode;

pub struct Auth(pub KeyStore);

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.0.lookup(access_key) {
            Some((secret, _)) => Ok(SecretKey::from(secret.expose())),
            None => {
                metrics::counter!("s3_denied_total", "reason" => "unknown_key").increment(1);
                tracing::info!(access_key, "S3 request refused: unknown access key");
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

/// Query parameters that name keys or parts of keys (list prefixes, resume points).
const KEY_QUERY_PARAMS: &[&str] = &[
    "prefix",
    "start-after",
    "marker",
    "continuation-token",
    "key-marker",
];

fn job_may(op: &str) -> bool {
    op.starts_with("Get")
        || op.starts_with("Head")
        || op.starts_with("List")
        || JOB_WRITE_OPS.contains(&op)
}

/// True when a key or prefix is refused by the endpoint (see [`paths::check_prefix`]).
pub fn escapes(key: &str) -> bool {
    paths::check_prefix(key).is_err()
}

fn query_param<'a>(query: &'a str, name: &str) -> impl Iterator<Item = String> + 'a {
    let name = name.to_string();
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v))
    })
}

/// The TCP peer of a request (axum's `ConnectInfo`, set by the core server).
pub(crate) fn peer_of(extensions: &http::Extensions) -> Option<IpAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Who sent a request, for refusals and their log lines.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caller<'a> {
    pub access_key: Option<&'a str>,
    pub peer: Option<IpAddr>,
    /// The request's mark that its refusal is logged (see [`super::RefusalLogged`]).
    pub logged: Option<&'a RefusalLogged>,
}

impl<'a> Caller<'a> {
    pub(crate) fn of<T>(req: &'a S3Request<T>) -> Self {
        Self {
            access_key: req.credentials.as_ref().map(|c| c.access_key.as_str()),
            peer: peer_of(&req.extensions),
            logged: req.extensions.get::<RefusalLogged>(),
        }
    }
}

pub(crate) fn deny(
    reason: &'static str,
    op: &str,
    who: Caller<'_>,
    message: String,
) -> s3s::S3Error {
    metrics::counter!("s3_denied_total", "reason" => reason).increment(1);
    if let Some(l) = who.logged {
        l.set();
    }
    tracing::warn!(
        op,
        reason,
        access_key = who.access_key.unwrap_or("-"),
        peer = %who.peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        "S3 request refused: {message}"
    );
    s3_error!(AccessDenied, "{}", message)
}

fn bad_key(
    op: &str,
    who: Caller<'_>,
    field: &str,
    key: &str,
    problem: &KeyProblem,
) -> s3s::S3Error {
    // The key itself is attacker-chosen: logged in its escaped (Debug) form, shortened.
    let shown: String = key.chars().take(120).collect();
    deny(
        "path",
        op,
        who,
        format!("{field} {shown:?} {problem}: keys must stay inside their bucket"),
    )
}

#[async_trait::async_trait]
impl S3Access for Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let peer = peer_of(cx.extensions_mut());
        let logged = cx.extensions_mut().get::<RefusalLogged>().cloned();
        let op = cx.s3_op().name();
        let access_key = cx.credentials().map(|c| c.access_key.clone());
        let who = Caller {
            access_key: access_key.as_deref(),
            peer,
            logged: logged.as_ref(),
        };
        let Some(access_key) = access_key.as_deref() else {
            return Err(deny("anonymous", op, who, "a signature is required".into()));
        };
        let Some(identity) = self.keys.identity(access_key) else {
            return Err(deny("unknown_key", op, who, "unknown access key".into()));
        };
        if let S3Path::Object { key, .. } = cx.s3_path()
            && let Err(p) = paths::check_key(key)
        {
            return Err(bad_key(op, who, "object key", key, &p));
        }
        let query = cx.uri().query().unwrap_or("");
        for name in KEY_QUERY_PARAMS {
            for v in query_param(query, name) {
                if let Err(p) = paths::check_prefix(&v) {
                    return Err(bad_key(op, who, name, &v, &p));
                }
            }
        }
        match identity {
            Identity::Admin => Ok(()),
            Identity::Job { bucket, source } => {
                // No peer address (not served over TCP) fails closed.
                let Some(ip) = peer else {
                    return Err(deny(
                        "network",
                        op,
                        who,
                        "job keys need a known source address".into(),
                    ));
                };
                if !self.networks.is_dut_address(ip) {
                    return Err(deny(
                        "network",
                        op,
                        who,
                        format!("job keys are accepted from the DUT networks only, not from {ip}"),
                    ));
                }
                if let Some(net) = source
                    && !net.contains(&canonical(ip))
                {
                    return Err(deny(
                        "source",
                        op,
                        who,
                        format!("this job key is accepted from {net} only, not from {ip}"),
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
                        who,
                        format!("job keys open bucket {bucket} only"),
                    ));
                }
                if !job_may(op) {
                    return Err(deny(
                        "operation",
                        op,
                        who,
                        format!("job keys may not use {op}"),
                    ));
                }
                Ok(())
            }
            Identity::Reader { bucket, networks } => {
                super::reader::check(op, who, cx.s3_path(), &bucket, &networks)
            }
        }
    }

    async fn copy_object(&self, req: &mut S3Request<CopyObjectInput>) -> S3Result<()> {
        check_copy_source(
            &self.keys,
            Caller::of(req),
            &req.input.copy_source,
            "CopyObject",
        )
    }

    async fn upload_part_copy(&self, req: &mut S3Request<UploadPartCopyInput>) -> S3Result<()> {
        check_copy_source(
            &self.keys,
            Caller::of(req),
            &req.input.copy_source,
            "UploadPartCopy",
        )
    }

    /// The keys of a multi-delete come in the XML body, which s3s parses after
    /// [`Access::check`]: each one is checked here, and one bad key refuses the whole
    /// request (nothing is deleted).
    async fn delete_objects(&self, req: &mut S3Request<DeleteObjectsInput>) -> S3Result<()> {
        let who = Caller::of(req);
        for o in &req.input.delete.objects {
            if let Err(p) = paths::check_key(&o.key) {
                return Err(bad_key(
                    "DeleteObjects",
                    who,
                    "Delete.Object.Key",
                    &o.key,
                    &p,
                ));
            }
        }
        Ok(())
    }

    /// The list parameters as s3s decoded them (the query check above decoded them itself).
    async fn list_objects(&self, req: &mut S3Request<ListObjectsInput>) -> S3Result<()> {
        let who = Caller::of(req);
        let i = &req.input;
        check_list_params(
            "ListObjects",
            who,
            &[("prefix", &i.prefix), ("marker", &i.marker)],
        )
    }

    async fn list_objects_v2(&self, req: &mut S3Request<ListObjectsV2Input>) -> S3Result<()> {
        let who = Caller::of(req);
        let i = &req.input;
        check_list_params(
            "ListObjectsV2",
            who,
            &[
                ("prefix", &i.prefix),
                ("start-after", &i.start_after),
                ("continuation-token", &i.continuation_token),
            ],
        )
    }

    /// Only a full upload id is taken (an empty or partial one must never select other
    /// uploads); the backend then checks that the caller started that upload.
    async fn list_parts(&self, req: &mut S3Request<ListPartsInput>) -> S3Result<()> {
        if !is_uuid(&req.input.upload_id) {
            return Err(deny(
                "path",
                "ListParts",
                Caller::of(req),
                "uploadId is not an upload id".into(),
            ));
        }
        Ok(())
    }
}

fn check_list_params(
    op: &str,
    who: Caller<'_>,
    params: &[(&str, &Option<String>)],
) -> S3Result<()> {
    for (name, value) in params {
        if let Some(v) = value
            && let Err(p) = paths::check_prefix(v)
        {
            return Err(bad_key(op, who, name, v, &p));
        }
    }
    Ok(())
}

/// An IPv4 peer seen on an IPv6 socket (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// `8-4-4-4-12` hex digits, as the backend writes upload ids.
pub(crate) fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A copy reads its source through the same rules as a GetObject.
fn check_copy_source(
    store: &KeyStore,
    who: Caller<'_>,
    source: &CopySource,
    op: &str,
) -> S3Result<()> {
    let Some(identity) = who.access_key.and_then(|k| store.identity(k)) else {
        return Err(deny("unknown_key", op, who, "unknown access key".into()));
    };
    let CopySource::Bucket { bucket, key, .. } = source else {
        return Err(deny(
            "operation",
            op,
            who,
            "only bucket/key copy sources are supported".into(),
        ));
    };
    if let Err(p) = paths::check_key(key) {
        return Err(bad_key(op, who, "x-amz-copy-source key", key, &p));
    }
    match identity {
        Identity::Admin => Ok(()),
        Identity::Job { bucket: own, .. } if **bucket == *own => Ok(()),
        Identity::Job { bucket: own, .. } => Err(deny(
            "other_bucket",
            op,
            who,
            format!("job keys open bucket {own} only"),
        )),
        // A copy writes; `Access::check` refused it already. Kept for the second line.
        Identity::Reader { .. } => Err(deny(
            "operation",
            op,
            who,
            "reader keys may only read".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_caught() {
        assert!(escapes(".."));
        assert!(escapes("../job-b/x"));
        assert!(escapes("a/../../x"));
        assert!(escapes("%2e%2e/x"));
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
            "DeleteObjects",
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
            "PostObject",
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
    }

    #[test]
    fn upload_ids() {
        assert!(is_uuid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(!is_uuid(""));
        assert!(!is_uuid("0f8fad5b"));
        assert!(!is_uuid("0f8fad5b-d9cb-469f-a165-70867728950e.part-1"));
        assert!(!is_uuid("0f8fad5b-d9cb-469f-a165-7086772895zz"));
    }
}
