//! The cache index on disk: which URL is which blob, and when each blob was last used.
//!
//! The index is local to this gateway (a file next to the blobs, not a database table): the
//! blobs it describes live on this machine's disk, and a lost index only costs re-downloads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// An upstream artifact: its URL and, when the job pinned it, its expected sha256.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Source {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A cached artifact: the blob a source resolved to, and what the upstream said about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub source: Source,
    pub sha256: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// Unix ms of the last fetch or successful revalidation.
    pub validated_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMeta {
    pub size: u64,
    /// Unix ms of the last time the blob was served (LRU order).
    pub last_access_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct IndexFile {
    pub entries: BTreeMap<String, Entry>,
    pub blobs: BTreeMap<String, BlobMeta>,
}

pub fn index_path(dir: &Path) -> PathBuf {
    dir.join("index.json")
}

pub fn blob_dir(dir: &Path) -> PathBuf {
    dir.join("blobs").join("sha256")
}

pub fn tmp_dir(dir: &Path) -> PathBuf {
    dir.join("tmp")
}

/// Loads the index and makes it agree with the disk: blobs that are missing or have the
/// wrong size are forgotten, files no entry refers to and unfinished downloads are deleted.
/// Blocking: run it off the async runtime.
pub fn load_and_repair(dir: &Path) -> std::io::Result<IndexFile> {
    std::fs::create_dir_all(blob_dir(dir))?;
    let tmp = tmp_dir(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut index: IndexFile = match std::fs::read(index_path(dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "artifact cache index unreadable; starting empty");
            IndexFile::default()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => IndexFile::default(),
        Err(e) => return Err(e),
    };
    let blobs = blob_dir(dir);
    index.blobs.retain(|sha, meta| {
        std::fs::metadata(blobs.join(sha)).is_ok_and(|m| m.is_file() && m.len() == meta.size)
    });
    let known = &index.blobs;
    index.entries.retain(|_, e| known.contains_key(&e.sha256));
    let referenced: std::collections::HashSet<&String> =
        index.entries.values().map(|e| &e.sha256).collect();
    for item in std::fs::read_dir(&blobs)? {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        if !referenced.contains(&name) {
            let _ = std::fs::remove_file(item.path());
        }
    }
    index.blobs.retain(|sha, _| referenced.contains(sha));
    Ok(index)
}

/// Writes the index atomically (temporary file + rename). Blocking.
pub fn save(dir: &Path, index: &IndexFile) -> std::io::Result<()> {
    let path = index_path(dir);
    let tmp = dir.join("index.json.tmp");
    let bytes = serde_json::to_vec(index).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repair_drops_what_the_disk_does_not_back() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(blob_dir(d)).unwrap();
        std::fs::write(blob_dir(d).join("aa"), b"1234").unwrap();
        std::fs::write(blob_dir(d).join("bb"), b"12").unwrap();
        std::fs::write(blob_dir(d).join("orphan"), b"x").unwrap();
        let entry = |sha: &str| Entry {
            source: Source {
                url: format!("http://x/{sha}"),
                sha256: None,
            },
            sha256: sha.into(),
            size: 4,
            etag: None,
            last_modified: None,
            validated_at_ms: 1,
        };
        let mut index = IndexFile::default();
        index.entries.insert("e1".into(), entry("aa"));
        index.entries.insert("e2".into(), entry("bb"));
        index.entries.insert("e3".into(), entry("cc"));
        for sha in ["aa", "bb", "cc"] {
            index.blobs.insert(
                sha.into(),
                BlobMeta {
                    size: 4,
                    last_access_ms: 1,
                },
            );
        }
        save(d, &index).unwrap();
        let loaded = load_and_repair(d).unwrap();
        assert_eq!(loaded.entries.keys().collect::<Vec<_>>(), vec!["e1"]);
        assert_eq!(loaded.blobs.keys().collect::<Vec<_>>(), vec!["aa"]);
        assert!(!blob_dir(d).join("orphan").exists());
        assert!(!blob_dir(d).join("bb").exists(), "wrong-size blob must go");
    }
}
