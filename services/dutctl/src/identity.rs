//! The client config file: named gateways, each a URL and a token, like lavacli's identities.
//!
//! `$XDG_CONFIG_HOME/dutgate/config.yml` (else `~/.config/dutgate/config.yml`):
//!
//! ```yaml
//! default: lab
//! gateways:
//!   lab: {url: http://gw.lab:8000, token: dgt_…}
//!   home: {url: http://192.168.1.2:8000, token_file: ~/.config/dutgate/home.token}
//! ```
//!
//! A file that holds a token must not be readable by group or others, and neither may a
//! `token_file`: like ssh with a private key, `dutctl` refuses to use it rather than go on
//! with a secret every local user can read.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use dutgate_core::Secret;
use serde::Deserialize;

/// Where the config file is: `$XDG_CONFIG_HOME/dutgate/config.yml`, else under `$HOME/.config`.
/// The XDG base directory spec says a relative `XDG_CONFIG_HOME` is to be ignored.
pub fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let base = env("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            env("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| Path::new(&h).join(".config"))
        })?;
    Some(base.join("dutgate").join("config.yml"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    gateways: BTreeMap<String, GatewayEntry>,
}

/// One named gateway of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayEntry {
    /// The executor's URL; the other services are on the same host at their default ports.
    pub url: String,
    #[serde(default)]
    token: Option<Secret>,
    #[serde(default)]
    token_file: Option<PathBuf>,
}

/// A token and where it came from (for messages: never the token itself).
#[derive(Debug, Clone)]
pub struct SourcedToken {
    pub token: Secret,
    pub source: String,
}

#[derive(Debug)]
pub struct ClientConfig {
    pub path: PathBuf,
    pub default: Option<String>,
    gateways: BTreeMap<String, GatewayEntry>,
}

/// The mode bits that let someone else than the owner read or change a file.
const NOT_OWNER_ONLY: u32 = 0o077;

/// `~/x` → `$HOME/x`; a relative path is relative to the config file's directory.
fn expand(path: &Path, config_dir: &Path, home: Option<&Path>) -> PathBuf {
    if let (Ok(rest), Some(home)) = (path.strip_prefix("~"), home) {
        return home.join(rest);
    }
    config_dir.join(path)
}

/// `http://Host:8000/` → `http://host:8000`: how two spellings of one gateway URL compare.
pub fn normalize_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_ascii_lowercase()
}

impl ClientConfig {
    /// Reads the config file; `None` when there is none. Errors name the file and say what to
    /// fix.
    pub fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
        };
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let body: FileBody = if text.trim().is_empty() {
            FileBody::default()
        } else {
            yaml_serde::from_str(&text).with_context(|| format!("{}", path.display()))?
        };
        let mode = meta.permissions().mode();
        if mode & NOT_OWNER_ONLY != 0 && body.gateways.values().any(|g| g.token.is_some()) {
            bail!(
                "{}: holds tokens but is readable by others (mode {:03o}): run chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
        for (name, g) in &body.gateways {
            if !(g.url.starts_with("http://") || g.url.starts_with("https://")) {
                bail!(
                    "{}: gateway {name:?}: url {:?} is not an http:// or https:// URL",
                    path.display(),
                    g.url
                );
            }
            if g.token.is_some() && g.token_file.is_some() {
                bail!(
                    "{}: gateway {name:?}: give token or token_file, not both",
                    path.display()
                );
            }
        }
        if let Some(d) = &body.default
            && !body.gateways.contains_key(d)
        {
            bail!(
                "{}: default {d:?} is not one of the gateways ({})",
                path.display(),
                Self::names(&body.gateways)
            );
        }
        Ok(Some(Self {
            path: path.to_path_buf(),
            default: body.default,
            gateways: body.gateways,
        }))
    }

    fn names(gateways: &BTreeMap<String, GatewayEntry>) -> String {
        if gateways.is_empty() {
            "none".to_string()
        } else {
            gateways.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    /// The gateway named `name`, or an error listing the ones there are.
    pub fn get(&self, name: &str) -> anyhow::Result<&GatewayEntry> {
        self.gateways.get(name).with_context(|| {
            format!(
                "no gateway {name:?} in {} (there: {})",
                self.path.display(),
                Self::names(&self.gateways)
            )
        })
    }

    /// The gateway whose URL is `url`: the first of `prefer` that matches, else the first
    /// by name.
    pub fn matching(&self, url: &str, prefer: &[&str]) -> Option<(&str, &GatewayEntry)> {
        let wanted = normalize_url(url);
        let matches = |g: &GatewayEntry| normalize_url(&g.url) == wanted;
        prefer
            .iter()
            .filter_map(|p| self.gateways.get_key_value(*p))
            .chain(self.gateways.iter())
            .find(|(_, g)| matches(g))
            .map(|(name, g)| (name.as_str(), g))
    }

    /// The token of gateway `name`, if it has one. `home` expands `~/` in `token_file`.
    pub fn token_of(
        &self,
        name: &str,
        entry: &GatewayEntry,
        home: Option<&Path>,
    ) -> anyhow::Result<Option<SourcedToken>> {
        if let Some(t) = &entry.token {
            return Ok(Some(SourcedToken {
                token: t.clone(),
                source: format!("gateway {name:?} in {}", self.path.display()),
            }));
        }
        let Some(file) = &entry.token_file else {
            return Ok(None);
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let file = expand(file, dir, home);
        let what = || {
            format!(
                "{}: gateway {name:?}: token_file {}",
                self.path.display(),
                file.display()
            )
        };
        let meta = std::fs::metadata(&file).with_context(what)?;
        let mode = meta.permissions().mode();
        if mode & NOT_OWNER_ONLY != 0 {
            bail!(
                "{}: readable by others (mode {:03o}): run chmod 600 {}",
                what(),
                mode & 0o777,
                file.display()
            );
        }
        let token = dutgate_core::auth::read_token(&file)
            .with_context(|| format!("{}: empty or unreadable", what()))?;
        Ok(Some(SourcedToken {
            token,
            source: format!("gateway {name:?}'s token_file {}", file.display()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn config_path_honours_xdg_config_home() {
        let env = |k: &str| match k {
            "XDG_CONFIG_HOME" => Some("/x/cfg".to_string()),
            "HOME" => Some("/home/a".to_string()),
            _ => None,
        };
        assert_eq!(
            config_path(&env).unwrap(),
            Path::new("/x/cfg/dutgate/config.yml")
        );
        // A relative XDG_CONFIG_HOME is ignored, as the spec says.
        let env = |k: &str| match k {
            "XDG_CONFIG_HOME" => Some("cfg".to_string()),
            "HOME" => Some("/home/a".to_string()),
            _ => None,
        };
        assert_eq!(
            config_path(&env).unwrap(),
            Path::new("/home/a/.config/dutgate/config.yml")
        );
        assert!(config_path(&|_| None).is_none());
    }

    #[test]
    fn loads_gateways_and_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dutgate/config.yml");
        write(&dir.path().join("home/t/lab2.token"), "dgt_file\n", 0o600);
        write(
            &path,
            "default: lab\ngateways:\n  lab: {url: 'http://GW.lab:8000/', token: dgt_inline}\n  \
             lab2: {url: 'http://gw2:8000', token_file: ~/t/lab2.token}\n  bare: {url: 'http://gw3:8000'}\n",
            0o600,
        );
        let c = ClientConfig::load(&path).unwrap().unwrap();
        assert_eq!(c.default.as_deref(), Some("lab"));
        let home = dir.path().join("home");
        let lab = c.get("lab").unwrap();
        let t = c.token_of("lab", lab, Some(&home)).unwrap().unwrap();
        assert!(t.token.matches("dgt_inline"));
        assert!(t.source.contains("\"lab\"") && !t.source.contains("dgt_"));
        let t = c
            .token_of("lab2", c.get("lab2").unwrap(), Some(&home))
            .unwrap()
            .unwrap();
        assert!(t.token.matches("dgt_file"), "{}", t.source);
        assert!(
            c.token_of("bare", c.get("bare").unwrap(), Some(&home))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            c.matching("http://gw.lab:8000", &["lab2"]).unwrap().0,
            "lab"
        );
        assert!(c.matching("http://gw.lab:8001", &[]).is_none());
        let e = c.get("nope").unwrap_err().to_string();
        assert!(e.contains("bare, lab, lab2"), "{e}");
    }

    #[test]
    fn missing_file_is_no_config() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            ClientConfig::load(&dir.path().join("config.yml"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn readable_by_others_with_a_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yml");
        write(
            &path,
            "gateways:\n  lab: {url: 'http://gw:8000', token: dgt_secret}\n",
            0o644,
        );
        let e = format!("{:#}", ClientConfig::load(&path).unwrap_err());
        assert!(
            e.contains("readable by others") && e.contains("chmod 600") && !e.contains("dgt_"),
            "{e}"
        );
        // Without a token in it, the file is no secret.
        write(&path, "gateways:\n  lab: {url: 'http://gw:8000'}\n", 0o644);
        assert!(ClientConfig::load(&path).unwrap().is_some());
        // A token file readable by others is refused too.
        write(&dir.path().join("t"), "dgt_x", 0o640);
        write(
            &path,
            "gateways:\n  lab: {url: 'http://gw:8000', token_file: t}\n",
            0o600,
        );
        let c = ClientConfig::load(&path).unwrap().unwrap();
        let e = format!(
            "{:#}",
            c.token_of("lab", c.get("lab").unwrap(), None).unwrap_err()
        );
        assert!(e.contains("readable by others"), "{e}");
    }

    #[test]
    fn bad_files_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yml");
        for (text, needle) in [
            ("default: x\ngateways: {}\n", "default \"x\""),
            ("gateways:\n  a: {url: gw:8000}\n", "not an http"),
            (
                "gateways:\n  a: {url: 'http://g', tokn: x}\n",
                "unknown field",
            ),
            (
                "gateways:\n  a: {url: 'http://g', token: x, token_file: y}\n",
                "not both",
            ),
        ] {
            write(&path, text, 0o600);
            let e = format!("{:#}", ClientConfig::load(&path).unwrap_err());
            assert!(
                e.contains(needle) && e.contains("config.yml"),
                "{text}: {e}"
            );
        }
    }
}
