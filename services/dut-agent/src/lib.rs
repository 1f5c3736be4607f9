//! The job bucket sync of the DUT environment: list, get and put objects over the S3 API with
//! the job's DUT-scoped keys, signed with SigV4.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use dutgate_sigv4::{RequestParts, Signer, canonical_query, encode_path, sha256_hex};
use machine_registration::http::{Endpoint, HttpError, Response};

const REGION: &str = "us-east-1";
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("bad bucket spec: {0} (expected <endpoint>,<bucket>,<access key>,<secret key>)")]
    Spec(String),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("{method} {path}: HTTP {status}: {message}")]
    S3 {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing object key {0:?}: it would land outside the directory")]
    UnsafeKey(String),
}

/// Where the job bucket is and the keys that open it.
pub struct BucketSpec {
    endpoint: Endpoint,
    bucket: String,
    signer: Signer,
}

impl BucketSpec {
    pub fn parse(spec: &str) -> Result<Self, SyncError> {
        let parts: Vec<&str> = spec.split(',').collect();
        let [url, bucket, access, secret] = parts[..] else {
            return Err(SyncError::Spec(format!("{} fields", parts.len())));
        };
        if bucket.is_empty() || bucket.contains('/') {
            return Err(SyncError::Spec(format!("bad bucket name {bucket:?}")));
        }
        Ok(Self {
            endpoint: Endpoint::parse(url)?,
            bucket: bucket.to_string(),
            signer: Signer::new(access, secret, REGION),
        })
    }

    fn call(
        &self,
        method: &str,
        key: Option<&str>,
        query: &[(String, String)],
        body: Option<&[u8]>,
    ) -> Result<Response, SyncError> {
        let path = match key {
            Some(k) => format!("{}/{}/{k}", self.endpoint.base_path, self.bucket),
            None => format!("{}/{}", self.endpoint.base_path, self.bucket),
        };
        let payload_hash = sha256_hex(body.unwrap_or_default());
        let signed = self.signer.sign(
            &RequestParts {
                method,
                host: &self.endpoint.host,
                path: &path,
                query,
                headers: &[],
                payload_hash: &payload_hash,
            },
            time::OffsetDateTime::now_utc(),
        );
        let mut target = encode_path(&path);
        let q = canonical_query(query);
        if !q.is_empty() {
            target.push('?');
            target.push_str(&q);
        }
        let headers = vec![
            ("Authorization".to_string(), signed.authorization),
            ("x-amz-date".to_string(), signed.amz_date),
            ("x-amz-content-sha256".to_string(), signed.content_sha256),
        ];
        // The endpoint's base path is already part of `path`; send it from the root.
        let root = Endpoint {
            base_path: String::new(),
            ..self.endpoint.clone()
        };
        let resp = root.send(method, &target, &headers, body, TIMEOUT)?;
        if !(200..300).contains(&resp.status) {
            return Err(SyncError::S3 {
                method: method.to_string(),
                path,
                status: resp.status,
                message: s3_error_message(&resp.body),
            });
        }
        Ok(resp)
    }

    /// Every object key in the bucket.
    pub fn list(&self) -> Result<Vec<String>, SyncError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = vec![("list-type".to_string(), "2".to_string())];
            if let Some(t) = &token {
                query.push(("continuation-token".to_string(), t.clone()));
            }
            let resp = self.call("GET", None, &query, None)?;
            let xml = String::from_utf8_lossy(&resp.body);
            keys.extend(xml_values(&xml, "Key"));
            let truncated =
                xml_values(&xml, "IsTruncated").first().map(String::as_str) == Some("true");
            token = xml_values(&xml, "NextContinuationToken").into_iter().next();
            if !truncated || token.is_none() {
                return Ok(keys);
            }
        }
    }
}

/// Downloads every object of the bucket into `dir`; returns how many.
pub fn pull(bucket: &BucketSpec, dir: &Path) -> Result<usize, SyncError> {
    let keys = bucket.list()?;
    for key in &keys {
        if key.ends_with('/') {
            continue;
        }
        let dest = safe_join(dir, key)?;
        let resp = bucket.call("GET", Some(key), &[], None)?;
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|source| SyncError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&dest, &resp.body).map_err(|source| SyncError::Io {
            path: dest.clone(),
            source,
        })?;
    }
    Ok(keys.iter().filter(|k| !k.ends_with('/')).count())
}

/// Uploads every file under `dir` to the bucket (keys relative to `dir`); returns how many.
pub fn push(bucket: &BucketSpec, dir: &Path) -> Result<usize, SyncError> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    for (path, key) in &files {
        let data = std::fs::read(path).map_err(|source| SyncError::Io {
            path: path.clone(),
            source,
        })?;
        bucket.call("PUT", Some(key), &[], Some(&data))?;
    }
    Ok(files.len())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<(), SyncError> {
    let io = |source| SyncError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir).map_err(io)?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let ft = e.file_type().map_err(io)?;
        if ft.is_dir() {
            walk(root, &path, out)?;
        } else if ft.is_file() {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| SyncError::UnsafeKey(path.display().to_string()))?;
            let key = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push((path, key));
        }
    }
    Ok(())
}

/// `dir/key`, refusing keys that would escape `dir` (`..`, absolute paths).
pub fn safe_join(dir: &Path, key: &str) -> Result<PathBuf, SyncError> {
    let rel = Path::new(key);
    if key.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(SyncError::UnsafeKey(key.to_string()));
    }
    Ok(dir.join(rel))
}

/// The text of every `<tag>…</tag>` element, XML entities decoded.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(unescape(&after[..j]));
        rest = &after[j + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn s3_error_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let code = xml_values(&text, "Code").into_iter().next();
    let msg = xml_values(&text, "Message").into_iter().next();
    match (code, msg) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => text.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert!(BucketSpec::parse("http://10.0.2.2:9000,job-1,AK,SK").is_ok());
        assert!(BucketSpec::parse("http://10.0.2.2:9000,job-1,AK").is_err());
        assert!(BucketSpec::parse("http://10.0.2.2:9000,a/b,AK,SK").is_err());
        assert!(BucketSpec::parse("https://x,b,AK,SK").is_err());
    }

    #[test]
    fn keys_never_escape() {
        let d = Path::new("/results");
        assert_eq!(
            safe_join(d, "a/b.txt").unwrap(),
            Path::new("/results/a/b.txt")
        );
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            assert!(safe_join(d, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn list_xml() {
        let xml = "<ListBucketResult><IsTruncated>true</IsTruncated><Contents><Key>a&amp;b</Key></Contents><Contents><Key>c/d</Key></Contents><NextContinuationToken>t1</NextContinuationToken></ListBucketResult>";
        assert_eq!(xml_values(xml, "Key"), vec!["a&b", "c/d"]);
        assert_eq!(xml_values(xml, "NextContinuationToken"), vec!["t1"]);
    }
}
