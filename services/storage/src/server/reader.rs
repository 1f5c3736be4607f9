//! The access rule of reader keys ([`Identity::Reader`](super::keystore::Identity)): what a
//! job's submitter is given to download the job's files once it has ended (ci-tron's
//! `job_bucket`, mirrored by `mcli mirror`).
//!
//! A reader key opens its own bucket, for read operations only (`Get*`, `Head*`, `List*`),
//! from the networks it was issued for only. Unlike a DUT's key it is not tied to the DUT
//! networks: submitters are not DUTs. Its expiry is the key store's (an expired key is
//! unknown).

use std::net::IpAddr;

use ipnet::IpNet;
use s3s::S3Result;
use s3s::path::S3Path;

use super::access::{Caller, deny};

/// Whether a reader key may run `op` on `path`, sent from `peer`.
pub(crate) fn check(
    op: &str,
    who: Caller<'_>,
    path: &S3Path,
    bucket: &str,
    networks: &[IpNet],
) -> S3Result<()> {
    // No peer address (not served over TCP) fails closed.
    let Some(ip) = who.peer.map(dutgate_core::outbound::canonical) else {
        return Err(deny(
            "network",
            op,
            who,
            "reader keys need a known source address".into(),
        ));
    };
    if !accepted_from(networks, ip) {
        return Err(deny(
            "source",
            op,
            who,
            format!("this reader key is not accepted from {ip}"),
        ));
    }
    let own = match path {
        S3Path::Root => false,
        S3Path::Bucket { bucket: b } | S3Path::Object { bucket: b, .. } => **b == *bucket,
    };
    if !own {
        return Err(deny(
            "other_bucket",
            op,
            who,
            format!("reader keys open bucket {bucket} only"),
        ));
    }
    if !is_read_only(op) {
        return Err(deny(
            "operation",
            op,
            who,
            format!("reader keys may only read, not use {op}"),
        ));
    }
    Ok(())
}

fn accepted_from(networks: &[IpNet], ip: IpAddr) -> bool {
    networks.iter().any(|n| n.contains(&ip))
}

fn is_read_only(op: &str) -> bool {
    op.starts_with("Get") || op.starts_with("Head") || op.starts_with("List")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_operations_only() {
        for ok in ["GetObject", "HeadObject", "ListObjectsV2", "HeadBucket"] {
            assert!(is_read_only(ok), "{ok}");
        }
        for no in [
            "PutObject",
            "DeleteObject",
            "DeleteObjects",
            "CopyObject",
            "CreateMultipartUpload",
            "PutObjectTagging",
            "CreateBucket",
        ] {
            assert!(!is_read_only(no), "{no}");
        }
    }

    #[test]
    fn networks() {
        let nets: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(accepted_from(&nets, "10.1.2.3".parse().unwrap()));
        assert!(accepted_from(&nets, "::1".parse().unwrap()));
        assert!(!accepted_from(&nets, "10.2.0.1".parse().unwrap()));
        assert!(!accepted_from(&[], "10.1.2.3".parse().unwrap()));
    }
}
