//! Which object keys, list prefixes and copy sources the embedded endpoint accepts.
//!
//! The filesystem backend stores `<data_dir>/<bucket>/<key>` by joining the key to the
//! bucket's directory as a path: `../job-b/x` from bucket `job-a` would be
//! `<data_dir>/job-b/x`, and an absolute key would replace the bucket directory. So
//! every key that reaches the backend, wherever it comes from (request path, query, the
//! `x-amz-copy-source` header, a `DeleteObjects` body), passes [`check_key`] first.
//!
//! Refused: `.` and `..` segments, a leading `/`, backslashes (a path separator for other
//! tools that may handle the downloaded artifacts), control characters (NUL ends a path in
//! the kernel), keys longer than S3's 1024 bytes, and keys that would become any of these
//! when percent-decoded once more (a layer that decodes again must not find an escape).

use std::path::{Component, Path};

/// S3's limit on the UTF-8 length of a key.
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_KEY_BYTES} bytes")]
    TooLong,
    #[error("contains a control character (NUL included)")]
    Control,
    #[error("contains a backslash")]
    Backslash,
    #[error("starts with '/'")]
    Absolute,
    #[error("has a '.' or '..' path segment")]
    DotSegment,
    #[error("percent-decodes to a key that {0}")]
    Encoded(Box<KeyProblem>),
}

/// An object key (also a copy source's key, a `DeleteObjects` entry).
pub fn check_key(key: &str) -> Result<(), KeyProblem> {
    if key.is_empty() {
        return Err(KeyProblem::Empty);
    }
    check_text(key)
}

/// A list prefix, marker, `start-after` or continuation token: a key or a part of one, so
/// the same rules, except that it may be empty.
pub fn check_prefix(prefix: &str) -> Result<(), KeyProblem> {
    if prefix.is_empty() {
        return Ok(());
    }
    check_text(prefix)
}

fn check_text(key: &str) -> Result<(), KeyProblem> {
    check_plain(key)?;
    if key.contains('%') {
        let decoded = percent_decode(key);
        if decoded != key {
            check_plain(&decoded).map_err(|p| KeyProblem::Encoded(Box::new(p)))?;
        }
    }
    Ok(())
}

fn check_plain(key: &str) -> Result<(), KeyProblem> {
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyProblem::TooLong);
    }
    if key.chars().any(char::is_control) {
        return Err(KeyProblem::Control);
    }
    if key.contains('\\') {
        return Err(KeyProblem::Backslash);
    }
    if key.starts_with('/') {
        return Err(KeyProblem::Absolute);
    }
    if key.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(KeyProblem::DotSegment);
    }
    Ok(())
}

/// Structural check, independent of the rules above: joined to a bucket directory, `key`
/// names something strictly inside it. The backend calls this before every operation as a
/// second line of defence.
pub fn inside_bucket(key: &str) -> bool {
    if key.contains('\0') {
        return false;
    }
    let mut depth: usize = 0;
    for c in Path::new(key).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    depth > 0
}

/// Percent-decoding as in a query string (`+` is a space); invalid escapes stay as they
/// are, and bytes that are not UTF-8 become U+FFFD.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_refused() {
        for bad in [
            "..",
            "../job-b/x",
            "a/../../x",
            "a/..",
            ".",
            "./x",
            "a/./b",
            "/etc/passwd",
            "//x",
            "a\\..\\b",
            "a\0b",
            "a\nb",
            "%2e%2e/job-b/x",
            "%2E%2E%2Fjob-b%2Fx",
            "a%2f..%2fb",
            "%2fetc",
            "x%00y",
            "a%5cb",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
            assert!(check_prefix(bad).is_err(), "{bad:?} accepted as a prefix");
        }
        assert!(check_key(&"a".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert_eq!(check_key(""), Err(KeyProblem::Empty));
        assert_eq!(
            check_key("%2e%2e/x"),
            Err(KeyProblem::Encoded(Box::new(KeyProblem::DotSegment)))
        );
    }

    #[test]
    fn ordinary_keys_pass() {
        for ok in [
            "a",
            "a..b/c",
            "a/.hidden",
            "dir/",
            "a//b",
            "dir/ü+&=.bin",
            "100%25 done",
            "50%",
            "%zz",
            "results/junit.xml",
        ] {
            assert_eq!(check_key(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(check_prefix(""), Ok(()));
    }

    #[test]
    fn structural_check() {
        assert!(inside_bucket("a/b"));
        assert!(inside_bucket("a/../b"));
        assert!(!inside_bucket("../b"));
        assert!(!inside_bucket("a/../.."));
        assert!(!inside_bucket("/abs"));
        assert!(!inside_bucket(""));
        assert!(!inside_bucket("."));
        assert!(!inside_bucket("a\0"));
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("%2E%2E%2Fjob-b"), "../job-b");
        assert_eq!(percent_decode("a%20b+c%zz"), "a b c%zz");
        assert_eq!(percent_decode("%4"), "%4");
    }

    proptest::proptest! {
        /// Whatever the key, an accepted one stays inside its bucket, also after one more
        /// round of decoding.
        #[test]
        fn accepted_keys_stay_inside(key in "[a-z./%\\\\0-9EeFfCc]{1,24}") {
            if check_key(&key).is_ok() {
                proptest::prop_assert!(inside_bucket(&key), "{key:?}");
                let decoded = percent_decode(&key);
                proptest::prop_assert!(check_plain(&decoded).is_ok(), "{key:?} -> {decoded:?}");
            }
        }

        /// Encoding then decoding gives the input back, and decoding never panics.
        #[test]
        fn percent_decoding_round_trips(s in "\\PC{0,40}") {
            let encoded = crate::sigv4::uri_encode(&s, false);
            proptest::prop_assert_eq!(percent_decode(&encoded), s.clone());
            let _ = percent_decode(&s);
        }
    }
}
