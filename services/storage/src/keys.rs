//! Key pairs: generation, and the embedded endpoint's admin pair kept in
//! `<state_dir>/s3/admin-keys.json` (mode 0600) so that `dutgate s3` and the executor agree
//! on it without configuration.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use dutgate_core::Secret;
use dutgate_core::config::GatewayConfig;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Backend, Config};
use crate::error::StorageError;

pub const ADMIN_KEYS_FILE: &str = "admin-keys.json";

/// An access key id and its secret.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub access_key: String,
    pub secret_key: Secret,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    access_key: String,
    secret_key: String,
}

const KEY_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A fresh key pair: 20-character access key starting with `prefix`, 40-character secret
/// (238 bits of entropy).
pub fn generate(prefix: &str) -> KeyPair {
    let mut rng = rand::rng();
    let mut pick = |alphabet: &[u8], n: usize| -> String {
        (0..n)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
            .collect()
    };
    let access_key = format!(
        "{prefix}{}",
        pick(KEY_ALPHABET, 20usize.saturating_sub(prefix.len()))
    );
    let secret_key = Secret::new(pick(SECRET_ALPHABET, 40));
    KeyPair {
        access_key,
        secret_key,
    }
}

pub fn admin_keys_path(gateway: &GatewayConfig) -> PathBuf {
    Config::state_dir(gateway).join(ADMIN_KEYS_FILE)
}

/// The admin key pair: from the config when set there, else (embedded backend) from the
/// key file, which is created on first use. Blocking file I/O: call from `spawn_blocking`
/// or at start-up.
pub fn admin_keys_blocking(
    gateway: &GatewayConfig,
    config: &Config,
) -> Result<KeyPair, StorageError> {
    match (&config.access_key, &config.secret_key) {
        (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => {
            return Ok(KeyPair {
                access_key: a.clone(),
                secret_key: s.clone(),
            });
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(StorageError::Config(
                "s3.access_key and s3.secret_key must be set together".into(),
            ));
        }
        _ => {}
    }
    if config.backend == Backend::External {
        return Err(StorageError::Config(
            "the external S3 backend needs s3.access_key and s3.secret_key".into(),
        ));
    }
    load_or_create(&admin_keys_path(gateway))
}

pub async fn admin_keys(gateway: &GatewayConfig, config: &Config) -> Result<KeyPair, StorageError> {
    let gateway = gateway.clone();
    let config = config.clone();
    tokio::task::spawn_blocking(move || admin_keys_blocking(&gateway, &config))
        .await
        .map_err(|e| StorageError::Config(format!("reading the admin keys: {e}")))?
}

/// Reads the key file, or writes a new one. Two processes starting together (the
/// executor and `dutgate s3`) end up with the same keys: the file appears atomically
/// (hard link of a complete temporary file) and the loser reads the winner's.
fn load_or_create(path: &Path) -> Result<KeyPair, StorageError> {
    if let Some(k) = read(path)? {
        return Ok(k);
    }
    let dir = path
        .parent()
        .ok_or_else(|| StorageError::Config(format!("{} has no parent", path.display())))?;
    std::fs::create_dir_all(dir).map_err(|e| StorageError::io(dir, e))?;
    let keys = generate("DGADMIN");
    let tmp = dir.join(format!(".{ADMIN_KEYS_FILE}.{}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| StorageError::io(&tmp, e))?;
        let body = serde_json::to_vec_pretty(&KeyFile {
            access_key: keys.access_key.clone(),
            secret_key: keys.secret_key.expose().to_string(),
        })
        .map_err(|e| StorageError::Config(e.to_string()))?;
        f.write_all(&body).map_err(|e| StorageError::io(&tmp, e))?;
        f.sync_all().map_err(|e| StorageError::io(&tmp, e))?;
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(keys),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read(path)?.ok_or_else(|| StorageError::Config(format!("{} vanished", path.display())))
        }
        Err(e) => Err(StorageError::io(path, e)),
    }
}

fn read(path: &Path) -> Result<Option<KeyPair>, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let k: KeyFile = serde_json::from_slice(&bytes).map_err(|e| {
                StorageError::Config(format!("{}: not a key file: {e}", path.display()))
            })?;
            Ok(Some(KeyPair {
                access_key: k.access_key,
                secret_key: Secret::new(k.secret_key),
            }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_shaped() {
        let a = generate("DGJOB");
        let b = generate("DGJOB");
        assert_eq!(a.access_key.len(), 20);
        assert!(a.access_key.starts_with("DGJOB"));
        assert_eq!(a.secret_key.expose().len(), 40);
        assert_ne!(a.access_key, b.access_key);
        assert_ne!(a.secret_key.expose(), b.secret_key.expose());
    }

    #[test]
    fn admin_key_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewayConfig {
            state_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let cfg = Config::default();
        let first = admin_keys_blocking(&gw, &cfg).unwrap();
        let second = admin_keys_blocking(&gw, &cfg).unwrap();
        assert_eq!(first.access_key, second.access_key);
        assert_eq!(first.secret_key, second.secret_key);
        let mode = std::fs::metadata(admin_keys_path(&gw))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn external_backend_needs_configured_keys() {
        let gw = GatewayConfig::default();
        let cfg = Config {
            backend: Backend::External,
            ..Default::default()
        };
        assert!(matches!(
            admin_keys_blocking(&gw, &cfg),
            Err(StorageError::Config(_))
        ));
        let half = Config {
            access_key: Some("a".into()),
            ..Default::default()
        };
        assert!(admin_keys_blocking(&gw, &half).is_err());
    }
}
