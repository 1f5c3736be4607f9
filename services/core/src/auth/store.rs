//! The named-token store: one JSON file, `<state_dir>/auth/tokens.json`, shared by every
//! service of the gateway.
//!
//! Each entry holds a token's name, role, optional expiry and the SHA-256 digest of the token:
//! the token itself is shown once, when it is created, and never stored. Tokens are 256-bit
//! random values, so an unsalted digest is enough (nothing to brute-force).
//!
//! How the cache stays true (the one cache here): every lookup `stat`s the file, and writers
//! replace it by an atomic rename (a new inode), so a changed `(inode, length, mtime)` stamp is
//! seen at the next request of every service and the file is read again: a revocation holds
//! everywhere from the next request. Writers serialise on an exclusive lock of
//! `tokens.lock` beside it, so an offline `dutgate tokens create` and the REST API cannot
//! lose each other's writes.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::Role;

/// Names the gateway gives its bootstrap tokens (`<state_dir>/tokens/<name>` or the config):
/// not available to named tokens.
pub const RESERVED_NAMES: [&str; 3] = ["admin", "user", "service"];

/// The prefix of every token the store creates: recognisable by secret scanners and people.
pub const TOKEN_PREFIX: &str = "dgt_";

#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    #[error("token name {0:?}: use 1-64 characters of a-z, 0-9, '-', '_', '.', '@'")]
    BadName(String),
    #[error("token name {0:?} is reserved for the gateway's bootstrap tokens")]
    ReservedName(String),
    #[error("a token named {0:?} already exists")]
    Exists(String),
    #[error("no token named {0:?}")]
    NotFound(String),
    #[error("expiry must be 1 to 3650 days, not {0}")]
    BadExpiry(u32),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a token store: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One stored token, without the token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    /// Who created it (the creating identity's name, or `offline` for the `dutgate` command).
    #[serde(default)]
    pub created_by: String,
}

impl TokenInfo {
    pub fn expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    info: TokenInfo,
    /// Lower-case hex SHA-256 of the token.
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FileBody {
    tokens: Vec<Entry>,
}

/// A newly created token: the only time its value exists outside its owner's hands.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    pub token: String,
}

type Stamp = (u64, u64, i64, i64);

#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    cache: Mutex<Option<(Stamp, Vec<Entry>)>>,
}

/// A new random token: 256 bits, hex, after [`TOKEN_PREFIX`].
pub fn new_token() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    format!("{TOKEN_PREFIX}{}", hex::encode(raw))
}

/// SHA-256 of a token, lower-case hex.
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

pub fn check_name(name: &str) -> Result<(), TokenStoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b'@')
        });
    if !ok {
        return Err(TokenStoreError::BadName(name.to_string()));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(TokenStoreError::ReservedName(name.to_string()));
    }
    Ok(())
}

impl TokenStore {
    /// The store of a gateway whose state dir is `state_dir`.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self::at(state_dir.join("auth").join("tokens.json"))
    }

    pub fn at(path: PathBuf) -> Self {
        Self {
            path,
            cache: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> TokenStoreError {
        TokenStoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn read_file(&self) -> Result<Vec<Entry>, TokenStoreError> {
        match fs::read(&self.path) {
            Ok(raw) => serde_json::from_slice::<FileBody>(&raw)
                .map(|b| b.tokens)
                .map_err(|source| TokenStoreError::Corrupt {
                    path: self.path.clone(),
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// The current entries: from the cache when the file has not changed since it was read.
    fn entries(&self) -> Result<Vec<Entry>, TokenStoreError> {
        let stamp = match fs::metadata(&self.path) {
            Ok(m) => Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.io(e)),
        };
        let Some(stamp) = stamp else {
            return Ok(Vec::new());
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, entries)) = cache.as_ref()
            && *s == stamp
        {
            return Ok(entries.clone());
        }
        let entries = self.read_file()?;
        *cache = Some((stamp, entries.clone()));
        Ok(entries)
    }

    /// The token's identity, if it is in the store. Expired tokens are returned too (the
    /// caller says "expired", which helps more than "invalid").
    pub fn lookup(&self, token: &str) -> Result<Option<TokenInfo>, TokenStoreError> {
        let d = digest(token);
        Ok(self
            .entries()?
            .into_iter()
            .find(|e| bool::from(e.sha256.as_bytes().ct_eq(d.as_bytes())))
            .map(|e| e.info))
    }

    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenStoreError> {
        let mut v: Vec<TokenInfo> = self.entries()?.into_iter().map(|e| e.info).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Creates a token named `name`; the returned value is the only copy of the token.
    pub fn create(
        &self,
        name: &str,
        role: Role,
        expires_days: Option<u32>,
        created_by: &str,
    ) -> Result<CreatedToken, TokenStoreError> {
        check_name(name)?;
        if let Some(d) = expires_days
            && !(1..=3650).contains(&d)
        {
            return Err(TokenStoreError::BadExpiry(d));
        }
        let token = new_token();
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or(OffsetDateTime::now_utc());
        let info = TokenInfo {
            name: name.to_string(),
            role,
            created_at: now,
            expires_at: expires_days.map(|d| now + time::Duration::days(i64::from(d))),
            created_by: created_by.to_string(),
        };
        self.modify(|entries| {
            if entries.iter().any(|e| e.info.name == name) {
                return Err(TokenStoreError::Exists(name.to_string()));
            }
            entries.push(Entry {
                info: info.clone(),
                sha256: digest(&token),
            });
            Ok(())
        })?;
        Ok(CreatedToken { info, token })
    }

    /// Removes the token named `name`: every service refuses it from its next request.
    pub fn revoke(&self, name: &str) -> Result<TokenInfo, TokenStoreError> {
        let mut removed = None;
        self.modify(|entries| {
            let Some(i) = entries.iter().position(|e| e.info.name == name) else {
                return Err(TokenStoreError::NotFound(name.to_string()));
            };
            removed = Some(entries.remove(i).info);
            Ok(())
        })?;
        removed.ok_or_else(|| TokenStoreError::NotFound(name.to_string()))
    }

    /// Read-modify-write under the lock file, replaced by an atomic rename.
    fn modify(
        &self,
        change: impl FnOnce(&mut Vec<Entry>) -> Result<(), TokenStoreError>,
    ) -> Result<(), TokenStoreError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir).map_err(|e| self.io(e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("tokens.lock"))
            .map_err(|e| self.io(e))?;
        lock.lock().map_err(|e| self.io(e))?;
        let mut entries = self.read_file()?;
        change(&mut entries)?;
        let body = serde_json::to_vec_pretty(&FileBody { tokens: entries })
            .map_err(|e| self.io(std::io::Error::other(e)))?;
        let tmp = dir.join(format!(".tokens.json.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f: File = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(dir)?.sync_all()
        };
        let result = write().map_err(|e| self.io(e));
        let _ = fs::remove_file(&tmp);
        result
    }
}

/// Creates `dir` (and parents) readable by the gateway's user only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_lookup_revoke_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let a = TokenStore::in_state_dir(dir.path());
        let b = TokenStore::in_state_dir(dir.path());
        let created = a.create("alice", Role::User, Some(30), "admin").unwrap();
        assert!(created.token.starts_with(TOKEN_PREFIX));
        assert_eq!(created.token.len(), TOKEN_PREFIX.len() + 64);
        // Another service's instance sees it at once, and its cache follows a revocation.
        assert_eq!(b.lookup(&created.token).unwrap().unwrap().name, "alice");
        assert!(b.lookup("dgt_nope").unwrap().is_none());
        a.revoke("alice").unwrap();
        assert!(b.lookup(&created.token).unwrap().is_none());
        // The token is never stored in clear.
        let raw = fs::read_to_string(a.path()).unwrap();
        assert!(!raw.contains(&created.token[TOKEN_PREFIX.len()..]));
        let mode = fs::metadata(a.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::in_state_dir(dir.path());
        assert!(matches!(
            s.create("admin", Role::Admin, None, "x"),
            Err(TokenStoreError::ReservedName(_))
        ));
        assert!(matches!(
            s.create("Bad Name", Role::User, None, "x"),
            Err(TokenStoreError::BadName(_))
        ));
        assert!(matches!(
            s.create("ok", Role::User, Some(0), "x"),
            Err(TokenStoreError::BadExpiry(0))
        ));
        s.create("ci-runner", Role::Runner, None, "x").unwrap();
        assert!(matches!(
            s.create("ci-runner", Role::Runner, None, "x"),
            Err(TokenStoreError::Exists(_))
        ));
        assert!(matches!(
            s.revoke("ghost"),
            Err(TokenStoreError::NotFound(_))
        ));
        assert_eq!(s.list().unwrap().len(), 1);
    }
}
