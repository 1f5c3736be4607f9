//! Entry points of the fuzz targets in `services/storage/fuzz` (cargo-fuzz, nightly). The
//! test suite runs them on stable too, over random and hand-made inputs, so they stay
//! compiled and panic-free between fuzzing runs.
//!
//! Each checks invariants, not only the absence of panics: a key the embedded endpoint
//! accepts stays inside its bucket, also after one more round of percent-decoding.

use s3s::xml::{Deserialize, Deserializer};

use crate::client::{parse_error_body, parse_list_page};
use crate::server::paths;

/// The XML bodies of the S3 requests a job key may send and the endpoint parses
/// (`DeleteObjects`, `CompleteMultipartUpload`, with s3s's parser, as the endpoint does),
/// then the answers the gateway's client parses (a listing page, an error).
pub fn s3_xml(data: &[u8]) {
    if let Some(delete) = parse_s3s::<s3s::dto::Delete>(data) {
        for o in &delete.objects {
            key_invariants(&o.key);
        }
    }
    if let Some(done) = parse_s3s::<s3s::dto::CompletedMultipartUpload>(data) {
        for part in done.parts.iter().flatten() {
            let _ = (part.part_number, part.e_tag.as_ref());
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(page) = parse_list_page(text) {
            for o in &page.objects {
                key_invariants(&o.key);
            }
        }
        let _ = parse_error_body(text);
    }
}

/// An object key (request path, copy source, query parameter) as the endpoint checks it.
pub fn object_key(data: &[u8]) {
    if let Ok(key) = std::str::from_utf8(data) {
        key_invariants(key);
        let _ = paths::check_prefix(key);
    }
}

/// Parses like s3s does for a request body: one document, nothing after it.
fn parse_s3s<T: for<'xml> Deserialize<'xml>>(data: &[u8]) -> Option<T> {
    let mut d = Deserializer::new(data);
    let value = T::deserialize(&mut d).ok()?;
    d.expect_eof().ok()?;
    Some(value)
}

fn key_invariants(key: &str) {
    if paths::check_key(key).is_ok() {
        assert!(
            paths::inside_bucket(key),
            "accepted key {key:?} leaves its bucket"
        );
        let again = paths::percent_decode(key);
        assert!(
            paths::inside_bucket(&again) || again.is_empty() || again.chars().all(|c| c == '/'),
            "accepted key {key:?} decodes to {again:?}, which leaves its bucket"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_made_bodies() {
        for body in [
            &b"<Delete><Object><Key>../job-b/x</Key></Object><Object><Key>a</Key></Object></Delete>"[..],
            b"<Delete><Quiet>true</Quiet><Object><Key>%2e%2e/x</Key><VersionId>1</VersionId></Object></Delete>",
            b"<Delete><Object><Key>&#46;&#46;/x</Key></Object></Delete>",
            b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"e\"</ETag></Part></CompleteMultipartUpload>",
            b"<ListBucketResult><Contents><Key>../up</Key><Size>1</Size></Contents><IsTruncated>true</IsTruncated></ListBucketResult>",
            b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>",
            b"<Delete><Object><Key>",
            b"\xff\xfe<",
            b"",
        ] {
            s3_xml(body);
        }
        for key in ["../x", "a/b", "%2e%2e", "/", "a\0", "\u{0}"] {
            object_key(key.as_bytes());
        }
    }

    #[test]
    fn entities_do_not_smuggle_dot_segments() {
        // XML character references decode before the key check sees the key.
        let d: s3s::dto::Delete =
            parse_s3s(b"<Delete><Object><Key>&#46;&#46;/job-b/x</Key></Object></Delete>").unwrap();
        assert_eq!(d.objects[0].key, "../job-b/x");
        assert!(paths::check_key(&d.objects[0].key).is_err());
    }

    proptest::proptest! {
        #[test]
        fn random_bytes(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            s3_xml(&data);
            object_key(&data);
        }

        #[test]
        fn random_delete_bodies(keys in proptest::collection::vec("[a-z./%\\\\2eEfF&#;0-9]{0,12}", 0..6)) {
            let mut xml = String::from("<Delete>");
            for k in &keys {
                xml.push_str(&format!("<Object><Key>{k}</Key></Object>"));
            }
            xml.push_str("</Delete>");
            s3_xml(xml.as_bytes());
        }
    }
}
