//! Strict parsers for what a client puts in a `/v2/` URL: repository names, tags, digests,
//! and the route shape itself.
//!
//! Invariant: everything that later becomes part of a file name or an upstream URL went through
//! these parsers first. They work on the *raw* request path (never percent-decoded): no valid
//! name, tag or digest contains `%`, `..` or an empty component, so refusing those bytes up front
//! closes every path-traversal trick (`../`, `%2e%2e`, `%2f`) at once.

use std::fmt;

/// Longest repository name accepted (the distribution spec's limit, counted in bytes).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted (OCI distribution spec: 128 characters).
pub const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid repository name: {0}")]
    Name(String),
    #[error("invalid tag: {0}")]
    Tag(String),
    #[error("invalid digest: {0}")]
    Digest(String),
    #[error("unsupported digest algorithm {0:?}: this registry stores sha256 content only")]
    Algorithm(String),
    #[error("no such route: {0}")]
    Route(String),
}

/// A validated repository name (`lab/big`, `registry.freedesktop.org/mesa/mesa`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() {
            return Err(ParseError::Name("empty".into()));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(ParseError::Name(format!(
                "{} bytes long, the limit is {MAX_NAME_LEN}",
                s.len()
            )));
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(ParseError::Name(format!(
                    "component {:?} must match [a-z0-9]+((.|_|__|-+)[a-z0-9]+)*",
                    truncate(component)
                )));
            }
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, written by hand so that no regex engine sits on the
/// request path and the rules are visible in one place.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return false;
    };
    if !is_alnum(first) || !is_alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A validated tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let b = s.as_bytes();
        let Some(&first) = b.first() else {
            return Err(ParseError::Tag("empty".into()));
        };
        if b.len() > MAX_TAG_LEN {
            return Err(ParseError::Tag(format!(
                "{} bytes long, the limit is {MAX_TAG_LEN}",
                b.len()
            )));
        }
        let head_ok = first.is_ascii_alphanumeric() || first == b'_';
        let tail_ok = b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if !(head_ok && tail_ok) {
            return Err(ParseError::Tag(format!(
                "{:?} must match [A-Za-z0-9_][A-Za-z0-9._-]*",
                truncate(s)
            )));
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A sha256 digest; the hex part is 64 lower-case hex digits, so it is safe as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        let Some((algorithm, encoded)) = s.split_once(':') else {
            return Err(ParseError::Digest(format!(
                "{:?} is not <algorithm>:<hex>",
                truncate(s)
            )));
        };
        if !valid_algorithm(algorithm) {
            return Err(ParseError::Digest(format!(
                "algorithm {:?} is malformed",
                truncate(algorithm)
            )));
        }
        if algorithm != "sha256" {
            return Err(ParseError::Algorithm(truncate(algorithm)));
        }
        let hex_ok = encoded.len() == 64
            && encoded
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
        if !hex_ok {
            return Err(ParseError::Digest(
                "a sha256 digest is 64 lower-case hex digits".into(),
            ));
        }
        Ok(Self {
            hex: encoded.to_string(),
        })
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_hash(&sha2::Sha256::digest(bytes))
    }

    pub fn from_hash(hash: &[u8]) -> Self {
        Self {
            hex: hex::encode(hash),
        }
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// `[a-z0-9]+([+._-][a-z0-9]+)*` (OCI image spec, digest algorithm grammar).
fn valid_algorithm(a: &str) -> bool {
    let b = a.as_bytes();
    if b.is_empty() || b.len() > 32 {
        return false;
    }
    let mut prev_sep = true;
    for &c in b {
        let sep = matches!(c, b'+' | b'.' | b'_' | b'-');
        if sep {
            if prev_sep {
                return false;
            }
        } else if !is_alnum(c) {
            return false;
        }
        prev_sep = sep;
    }
    !prev_sep
}

/// What a manifest is asked by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A reference with a `:` is a digest (tags cannot contain one).
    pub fn parse(s: &str) -> Result<Self, ParseError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// The shape of a `/v2/…` request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V2Route {
    /// `/v2/`: the API version check.
    Base,
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    Blob {
        name: RepoName,
        digest: Digest,
    },
    /// `/v2/<name>/blobs/uploads/…`: push, which a pull-through cache refuses.
    Upload {
        name: RepoName,
    },
    /// `/v2/<name>/tags/list`.
    TagsList {
        name: RepoName,
    },
    /// `/v2/_catalog`.
    Catalog,
}

/// Parses a raw (not percent-decoded) request path.
pub fn parse_v2_path(path: &str) -> Result<V2Route, ParseError> {
    let Some(rest) = path.strip_prefix("/v2") else {
        return Err(ParseError::Route(truncate(path)));
    };
    if rest.is_empty() || rest == "/" {
        return Ok(V2Route::Base);
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Err(ParseError::Route(truncate(path)));
    };
    if rest == "_catalog" {
        return Ok(V2Route::Catalog);
    }
    // Uploads first: `<name>/blobs/uploads/` and `<name>/blobs/uploads/<session>`.
    if let Some(idx) = rest.rfind("/blobs/uploads") {
        let after = &rest[idx + "/blobs/uploads".len()..];
        if after.is_empty() || after.starts_with('/') {
            let name = RepoName::parse(&rest[..idx])?;
            return Ok(V2Route::Upload { name });
        }
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(V2Route::TagsList {
            name: RepoName::parse(name)?,
        });
    }
    // The last component is the reference: tags and digests never contain '/'.
    let (head, last) = rest
        .rsplit_once('/')
        .ok_or_else(|| ParseError::Route(truncate(path)))?;
    let (name, kind) = head
        .rsplit_once('/')
        .ok_or_else(|| ParseError::Route(truncate(path)))?;
    match kind {
        "manifests" => Ok(V2Route::Manifest {
            name: RepoName::parse(name)?,
            reference: Reference::parse(last)?,
        }),
        "blobs" => Ok(V2Route::Blob {
            name: RepoName::parse(name)?,
            digest: Digest::parse(last)?,
        }),
        _ => Err(ParseError::Route(truncate(path))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn names() {
        for ok in [
            "a",
            "lab/big",
            "registry.freedesktop.org/mesa/mesa",
            "a__b/c-d---e/f.g_h",
            "library/alpine",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/a", "a/", "a//b", "A", "..", "a/../b", "a/./b", "%2e%2e", "a___b", "a-", "-a",
            "a..b", "a:b", "a b", "a\0b", "é",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(RepoName::parse(&"a".repeat(255)).is_ok());
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags_and_digests() {
        assert!(Tag::parse("latest").is_ok());
        assert!(Tag::parse("_x.Y-1").is_ok());
        assert!(Tag::parse(".x").is_err());
        assert!(Tag::parse("-x").is_err());
        assert!(Tag::parse("..").is_err());
        assert!(Tag::parse(&"a".repeat(128)).is_ok());
        assert!(Tag::parse(&"a".repeat(129)).is_err());
        assert!(Digest::parse(D).is_ok());
        assert_eq!(Digest::parse(D).unwrap().to_string(), D);
        assert!(matches!(
            Digest::parse(&D.replace("sha256", "sha512")),
            Err(ParseError::Algorithm(_))
        ));
        assert!(matches!(
            Digest::parse(&D.replace("sha256", "md5")),
            Err(ParseError::Algorithm(_))
        ));
        assert!(matches!(
            Digest::parse(&D.replace("sha256", "SHA256")),
            Err(ParseError::Digest(_))
        ));
        assert!(Digest::parse(&D.to_uppercase()).is_err());
        assert!(Digest::parse(&D[..70]).is_err());
        assert!(Digest::parse(&format!("{D}0")).is_err());
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
        assert_eq!(
            Digest::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn routes() {
        assert_eq!(parse_v2_path("/v2/"), Ok(V2Route::Base));
        assert_eq!(parse_v2_path("/v2"), Ok(V2Route::Base));
        assert_eq!(parse_v2_path("/v2/_catalog"), Ok(V2Route::Catalog));
        let r = parse_v2_path("/v2/a/manifests/b/manifests/latest").unwrap();
        assert_eq!(
            r,
            V2Route::Manifest {
                name: RepoName::parse("a/manifests/b").unwrap(),
                reference: Reference::Tag(Tag::parse("latest").unwrap()),
            }
        );
        assert!(matches!(
            parse_v2_path(&format!("/v2/lab/x/blobs/{D}")),
            Ok(V2Route::Blob { .. })
        ));
        assert!(matches!(
            parse_v2_path(&format!("/v2/lab/x/manifests/{D}")),
            Ok(V2Route::Manifest {
                reference: Reference::Digest(_),
                ..
            })
        ));
        assert!(matches!(
            parse_v2_path("/v2/lab/x/blobs/uploads/"),
            Ok(V2Route::Upload { .. })
        ));
        assert!(matches!(
            parse_v2_path("/v2/lab/x/blobs/uploads/abc-123"),
            Ok(V2Route::Upload { .. })
        ));
        assert!(matches!(
            parse_v2_path("/v2/lab/x/tags/list"),
            Ok(V2Route::TagsList { .. })
        ));
        for bad in [
            "/v2/../etc/passwd/manifests/latest",
            "/v2/lab/%2e%2e/manifests/latest",
            "/v2/lab/x/manifests/..",
            "/v2/lab/x/manifests/%2e%2e",
            "/v2/lab/x/blobs/sha256:zz",
            "/v2/lab/x/blobs/latest",
            "/v2/lab/x/manifests/",
            "/v2/lab/x/other/latest",
            "/v2/x",
            "/v2//x/manifests/latest",
            "/v3/x/manifests/latest",
            "/v2x/manifests/latest",
        ] {
            assert!(parse_v2_path(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The parsers never panic, and whatever they accept is safe to use in a path.
        #[test]
        fn arbitrary_paths_never_panic_and_accepted_parts_are_safe(s in "\\PC{0,300}") {
            let path = format!("/v2/{s}");
            if let Ok(route) = parse_v2_path(&path) {
                let name = match &route {
                    V2Route::Manifest { name, .. } | V2Route::Blob { name, .. }
                    | V2Route::Upload { name } | V2Route::TagsList { name } => Some(name),
                    V2Route::Base | V2Route::Catalog => None,
                };
                if let Some(n) = name {
                    prop_assert!(n.as_str().len() <= MAX_NAME_LEN);
                    prop_assert!(!n.as_str().split('/').any(|c| c.is_empty() || c == "." || c == ".."));
                    prop_assert!(!n.as_str().contains('%'));
                }
                if let V2Route::Manifest { reference: Reference::Tag(t), .. } = &route {
                    prop_assert!(!t.as_str().contains('/') && !t.as_str().starts_with('.'));
                }
            }
        }

        /// Strings built from the grammar's alphabet, including separators and dots.
        #[test]
        fn grammar_alphabet(s in "[a-z0-9._/%-]{0,300}") {
            if let Ok(n) = RepoName::parse(&s) {
                prop_assert!(!n.as_str().contains(".."));
                prop_assert!(!n.as_str().starts_with('/') && !n.as_str().ends_with('/'));
            }
            let _ = Reference::parse(&s);
            let _ = Digest::parse(&s);
        }

        /// Valid names round-trip through route parsing.
        #[test]
        fn valid_names_roundtrip(parts in proptest::collection::vec("[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", 1..5),
                                 tag in "[A-Za-z0-9_][A-Za-z0-9._-]{0,20}") {
            let name = parts.join("/");
            let route = parse_v2_path(&format!("/v2/{name}/manifests/{tag}"));
            prop_assert_eq!(route, Ok(V2Route::Manifest {
                name: RepoName::parse(&name).unwrap(),
                reference: Reference::Tag(Tag::parse(&tag).unwrap()),
            }));
        }

        #[test]
        fn digests(hex in "[0-9a-f]{64}", alg in "[a-z0-9]{1,10}") {
            let d = Digest::parse(&format!("sha256:{hex}")).unwrap();
            prop_assert_eq!(d.hex(), hex.as_str());
            if alg != "sha256" {
                let is_algorithm_error = matches!(Digest::parse(&format!("{alg}:{hex}")), Err(ParseError::Algorithm(_)));
                prop_assert!(is_algorithm_error);
            }
        }
    }
}
