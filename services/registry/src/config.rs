//! The `registry` section of the gateway config.

use std::path::PathBuf;

use dutgate_core::Secret;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where blobs, manifests and tag records live. Unset: `<state_dir>/registry`.
    pub cache_dir: Option<PathBuf>,
    /// Size bound of the blob store; least recently used blobs go first (manifests are tiny
    /// and never evicted).
    pub max_cache_bytes: u64,
    /// How long a tag → digest answer is trusted before it is revalidated upstream (HEAD).
    pub tag_ttl_seconds: u64,
    /// TCP connect timeout towards upstreams.
    pub upstream_connect_timeout_seconds: f64,
    /// Whole-request budget for manifests, HEADs and token requests; for blob downloads, the
    /// longest silence tolerated between two reads (a 2 GB layer may take longer than this).
    pub upstream_timeout_seconds: f64,
    /// Upstream registries selected by name prefix (longest prefix wins).
    pub upstreams: Vec<UpstreamConfig>,
    /// `prefix` of the upstream used for names that match no prefix (names are passed on
    /// unchanged). Unset: such names are unknown (`NAME_UNKNOWN`).
    pub default_upstream: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_cache_bytes: 50 * 1024 * 1024 * 1024,
            tag_ttl_seconds: 300,
            upstream_connect_timeout_seconds: 5.0,
            upstream_timeout_seconds: 30.0,
            upstreams: vec![
                UpstreamConfig::new("docker.io/", "https://registry-1.docker.io").library(),
                UpstreamConfig::new(
                    "registry.freedesktop.org/",
                    "https://registry.freedesktop.org",
                ),
                UpstreamConfig::new("registry.gitlab.com/", "https://registry.gitlab.com"),
                UpstreamConfig::new("quay.io/", "https://quay.io"),
                UpstreamConfig::new("ghcr.io/", "https://ghcr.io"),
            ],
            default_upstream: Some("docker.io/".into()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Name prefix that selects this upstream, ending in `/` (`registry.freedesktop.org/`). It
    /// is stripped before the name is sent upstream.
    pub prefix: String,
    /// Base URL of the upstream registry (`https://registry-1.docker.io`).
    pub url: String,
    /// Credentials for the upstream's token service or Basic auth.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// A static bearer token sent as is (instead of the token flow).
    #[serde(default)]
    pub token: Option<Secret>,
    /// Docker Hub's rule: a one-component name `alpine` means `library/alpine`.
    #[serde(default)]
    pub library_namespace: bool,
}

impl UpstreamConfig {
    pub fn new(prefix: &str, url: &str) -> Self {
        Self {
            prefix: prefix.into(),
            url: url.into(),
            username: None,
            password: None,
            token: None,
            library_namespace: false,
        }
    }

    pub fn library(mut self) -> Self {
        self.library_namespace = true;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("registry.upstreams[{index}].prefix {prefix:?}: {reason}")]
    Prefix {
        index: usize,
        prefix: String,
        reason: &'static str,
    },
    #[error("registry.upstreams[{index}].url {url:?}: {reason}")]
    Url {
        index: usize,
        url: String,
        reason: String,
    },
    #[error("registry.default_upstream {0:?} names no configured upstream prefix")]
    Default(String),
    #[error("registry.{field}: {reason}")]
    Value {
        field: &'static str,
        reason: &'static str,
    },
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (index, u) in self.upstreams.iter().enumerate() {
            let prefix_ok = u.prefix.ends_with('/')
                && crate::reference::RepoName::parse(u.prefix.trim_end_matches('/')).is_ok();
            if !prefix_ok {
                return Err(ConfigError::Prefix {
                    index,
                    prefix: u.prefix.clone(),
                    reason: "must be one or more name components followed by '/'",
                });
            }
            if self.upstreams[..index].iter().any(|o| o.prefix == u.prefix) {
                return Err(ConfigError::Prefix {
                    index,
                    prefix: u.prefix.clone(),
                    reason: "appears twice",
                });
            }
            let parsed = reqwest::Url::parse(&u.url).map_err(|e| ConfigError::Url {
                index,
                url: u.url.clone(),
                reason: e.to_string(),
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(ConfigError::Url {
                    index,
                    url: u.url.clone(),
                    reason: "scheme must be http or https".into(),
                });
            }
            if u.token.is_some() && (u.username.is_some() || u.password.is_some()) {
                return Err(ConfigError::Url {
                    index,
                    url: u.url.clone(),
                    reason: "set either token or username/password, not both".into(),
                });
            }
        }
        if let Some(d) = &self.default_upstream
            && !self.upstreams.iter().any(|u| &u.prefix == d)
        {
            return Err(ConfigError::Default(d.clone()));
        }
        if !(self.upstream_timeout_seconds > 0.0 && self.upstream_connect_timeout_seconds > 0.0) {
            return Err(ConfigError::Value {
                field: "upstream_timeout_seconds",
                reason: "timeouts must be positive",
            });
        }
        if self.max_cache_bytes == 0 {
            return Err(ConfigError::Value {
                field: "max_cache_bytes",
                reason: "must be positive",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_configs_are_refused() {
        Config::default().validate().unwrap();
        let mut c = Config::default();
        c.upstreams[0].prefix = "docker.io".into();
        assert!(c.validate().is_err());
        let c = Config {
            default_upstream: Some("nope/".into()),
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.upstreams[1].url = "ftp://x".into();
        assert!(c.validate().is_err());
        let c: Config =
            yaml_serde::from_str("tag_ttl_seconds: 10\nupstreams: []\ndefault_upstream: null\n")
                .unwrap();
        c.validate().unwrap();
        assert!(yaml_serde::from_str::<Config>("tag_ttl: 10\n").is_err());
    }
}
