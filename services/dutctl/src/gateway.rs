//! How `dutctl` finds the gateway's services and its token.
//!
//! The gateway, first match wins: an explicit `--url`/`DUTGATE_URL` (the executor's URL);
//! the config file's gateway named by `--gateway`/`DUTGATE_GATEWAY`; the config file's
//! `default`, unless a state dir was given (`--state-dir`/`DUTGATE_STATE_DIR` names the local
//! gateway); the local state dir (`endpoints.json`, which `dutgate up` writes); localhost.
//!
//! URL of a service: `DUTGATE_<SERVICE>_URL`; else, for a gateway given by a URL (`--url` or
//! the config file), that URL for the executor and its host with the service's default port for
//! the others; else the state dir's `endpoints.json`; else `http://127.0.0.1:<default port>`.
//!
//! Token: `--token`, `DUTGATE_TOKEN`; the config file's gateway (with `--url`: the gateway
//! whose URL it is, so a token is only ever sent where its file says); `<state dir>/tokens/admin`,
//! else `…/user`, except for a gateway of the config file: a local token never goes to a remote
//! gateway, nor for the GitLab driver's stages ([`Wanted::no_state_dir_token`]): they work from
//! the runner token of `--job-token-file`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dutgate_core::client::ApiClient;
use dutgate_core::config::ServicePorts;
use dutgate_core::{Secret, ServiceName};

use crate::identity::{ClientConfig, GatewayEntry, SourcedToken};

#[derive(Debug, Clone)]
pub struct Gateway {
    urls: BTreeMap<ServiceName, String>,
    token: Option<SourcedToken>,
    /// Where a token could have come from, for the message when there is none.
    config_path: Option<PathBuf>,
    /// `--state-dir`/`DUTGATE_STATE_DIR` (or `./dutgate-state`), for commands that check
    /// things against the local gateway's files.
    state_dir: Option<PathBuf>,
}

/// What the command line and the environment say about the gateway.
#[derive(Debug, Default)]
pub struct Wanted {
    /// `--url`/`DUTGATE_URL`.
    pub url: Option<String>,
    /// `--token` or `DUTGATE_TOKEN`, and which of them (for messages).
    pub token: Option<SourcedToken>,
    /// `--gateway`/`DUTGATE_GATEWAY`.
    pub gateway: Option<String>,
    /// `--state-dir`/`DUTGATE_STATE_DIR`, else `./dutgate-state` when it exists.
    pub state_dir: Option<PathBuf>,
    /// Whether `state_dir` was given rather than found.
    pub state_dir_given: bool,
    /// Never take a token from the state dir: for the GitLab driver, whose stages run as GitLab
    /// Runner's user and must not depend on (or use) the gateway's bootstrap tokens.
    pub no_state_dir_token: bool,
    /// The client config file, present or not.
    pub config_path: Option<PathBuf>,
    /// `$HOME`, for `~/` in `token_file`.
    pub home: Option<PathBuf>,
}

pub fn default_port(service: ServiceName) -> u16 {
    let p = ServicePorts::default();
    match service {
        ServiceName::Executor => p.executor,
        ServiceName::Mars => p.mars,
        ServiceName::Registry => p.registry,
        ServiceName::Boot => p.boot,
        ServiceName::Pdu => p.pdu,
        ServiceName::Salad => p.salad,
        ServiceName::S3 => p.s3,
    }
}

/// `http://host:8000/x` → `http://host`.
fn scheme_and_host(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let hostport = rest.split('/').next()?;
    let host = if let Some(end) = hostport.strip_prefix('[').and_then(|h| h.find(']')) {
        &hostport[..end + 2]
    } else {
        hostport.split(':').next()?
    };
    (!host.is_empty()).then(|| format!("{scheme}://{host}"))
}

/// The state dir's bootstrap token: `tokens/admin`, else `tokens/user`.
fn state_dir_token(state_dir: &Path) -> Option<SourcedToken> {
    let dir = state_dir.join("tokens");
    ["admin", "user"].into_iter().find_map(|name| {
        let path = dir.join(name);
        dutgate_core::auth::read_token(&path).map(|token| SourcedToken {
            token,
            source: path.display().to_string(),
        })
    })
}

impl Gateway {
    /// Resolves the services' URLs and the token; `env` reads `DUTGATE_<SERVICE>_URL`.
    pub fn resolve(wanted: Wanted, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        // The file is read only when it can change the answer.
        let config = match &wanted.config_path {
            Some(p) if wanted.url.is_none() || wanted.token.is_none() => ClientConfig::load(p)?,
            _ => None,
        };
        if let (Some(name), None, None) = (&wanted.gateway, &wanted.url, &config) {
            anyhow::bail!(
                "gateway {name:?} asked for, but there is no config file ({})",
                wanted
                    .config_path
                    .as_ref()
                    .map_or("neither XDG_CONFIG_HOME nor HOME is set".to_string(), |p| {
                        format!("{} does not exist", p.display())
                    })
            );
        }
        let entry: Option<(&str, &GatewayEntry)> = match (&config, &wanted.url) {
            (None, _) => None,
            (Some(c), Some(url)) => {
                let prefer: Vec<&str> = [wanted.gateway.as_deref(), c.default.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect();
                c.matching(url, &prefer)
            }
            (Some(c), None) => match (&wanted.gateway, &c.default) {
                (Some(name), _) => Some((name.as_str(), c.get(name)?)),
                (None, _) if wanted.state_dir_given => None,
                (None, Some(d)) => Some((d.as_str(), c.get(d)?)),
                (None, None) => None,
            },
        };
        let base_url = wanted
            .url
            .clone()
            .or_else(|| entry.map(|(_, g)| g.url.clone()));
        let endpoints: BTreeMap<String, String> = match (&base_url, &wanted.state_dir) {
            (None, Some(d)) => std::fs::read(d.join("endpoints.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default(),
            _ => BTreeMap::new(),
        };
        let host = base_url.as_deref().and_then(scheme_and_host);
        let mut urls = BTreeMap::new();
        for svc in ServiceName::ALL {
            let var = format!("DUTGATE_{}_URL", svc.as_str().to_uppercase());
            let chosen = env(&var)
                .or_else(|| {
                    if svc == ServiceName::Executor {
                        base_url
                            .as_deref()
                            .map(|u| u.trim_end_matches('/').to_string())
                    } else {
                        host.as_ref().map(|h| format!("{h}:{}", default_port(svc)))
                    }
                })
                .or_else(|| endpoints.get(svc.as_str()).cloned())
                .unwrap_or_else(|| format!("http://127.0.0.1:{}", default_port(svc)));
            urls.insert(svc, chosen);
        }
        let token = match (wanted.token, entry, &config) {
            (Some(t), _, _) => Some(t),
            (None, Some((name, g)), Some(c)) => c.token_of(name, g, wanted.home.as_deref())?,
            (None, _, _) => None,
        };
        // A gateway of the config file gets its own token or none: the local state dir's
        // tokens are for the local gateway (or one given by --url, as before config files).
        let from_config_url = wanted.url.is_none() && entry.is_some();
        let token = match token {
            Some(t) => Some(t),
            None if from_config_url || wanted.no_state_dir_token => None,
            None => wanted.state_dir.as_deref().and_then(state_dir_token),
        };
        Ok(Self {
            urls,
            token,
            config_path: wanted.config_path,
            state_dir: wanted.state_dir,
        })
    }

    /// The same gateway, called with `token` instead.
    pub fn with_token(&self, token: SourcedToken) -> Self {
        Self {
            token: Some(token),
            ..self.clone()
        }
    }

    /// The local gateway's state dir, given or found (`./dutgate-state`), if any.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    pub fn url(&self, service: ServiceName) -> &str {
        self.urls.get(&service).map(String::as_str).unwrap_or("")
    }

    pub fn client(&self, service: ServiceName) -> ApiClient {
        ApiClient::new(self.url(service), self.token().cloned())
    }

    pub fn token(&self) -> Option<&Secret> {
        self.token.as_ref().map(|t| &t.token)
    }

    /// Where the token came from (`--token`, `DUTGATE_TOKEN`, a gateway of the config file,
    /// a state dir file), or what would have given one: for messages, never the token.
    pub fn token_source(&self) -> String {
        match (&self.token, &self.config_path) {
            (Some(t), _) => format!("the token from {}", t.source),
            (None, Some(p)) => format!(
                "no token: give --token, DUTGATE_TOKEN, a gateway with a token in {}, or \
                 --state-dir",
                p.display()
            ),
            (None, None) => "no token: give --token, DUTGATE_TOKEN or --state-dir".to_string(),
        }
    }
}

/// `DUTGATE_STATE_DIR`, or `./dutgate-state` when it exists (the `dutgate up` default).
pub fn default_state_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(d) = env("DUTGATE_STATE_DIR") {
        return Some(PathBuf::from(d));
    }
    let local = PathBuf::from("dutgate-state");
    local.join("tokens").exists().then_some(local)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn flag(t: &str) -> Option<SourcedToken> {
        Some(SourcedToken {
            token: Secret::new(t),
            source: "--token".into(),
        })
    }

    /// A state dir with a user token and an endpoints file, and a config file with gateways
    /// `lab` (the default, a token) and `bare` (no token).
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("tokens")).unwrap();
        std::fs::write(state.join("tokens/user"), "usertoken\n").unwrap();
        std::fs::write(
            state.join("endpoints.json"),
            r#"{"executor": "http://127.0.0.1:18000", "salad": "http://127.0.0.1:18005"}"#,
        )
        .unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            "default: lab\ngateways:\n  lab: {url: 'http://gw.lab:8000', token: labtoken}\n  \
             bare: {url: 'http://gw.bare:9000'}\n",
        )
        .unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        (dir, state, config)
    }

    #[test]
    fn defaults_to_localhost_default_ports() {
        let g = Gateway::resolve(Wanted::default(), &no_env).unwrap();
        assert_eq!(g.url(ServiceName::Mars), "http://127.0.0.1:8001");
        assert!(g.token().is_none());
        assert!(g.token_source().starts_with("no token"));
    }

    #[test]
    fn url_host_gives_every_service() {
        let wanted = Wanted {
            url: Some("http://gw.lab:8000/".into()),
            token: flag("t"),
            ..Default::default()
        };
        let g = Gateway::resolve(wanted, &no_env).unwrap();
        assert_eq!(g.url(ServiceName::Executor), "http://gw.lab:8000");
        assert_eq!(g.url(ServiceName::Pdu), "http://gw.lab:8004");
        assert!(g.token().unwrap().matches("t"));
        assert_eq!(g.token_source(), "the token from --token");
    }

    #[test]
    fn state_dir_endpoints_and_tokens() {
        let (_dir, state, _) = setup();
        let env = |k: &str| (k == "DUTGATE_PDU_URL").then(|| "http://pdu:1".to_string());
        let wanted = Wanted {
            state_dir: Some(state.clone()),
            ..Default::default()
        };
        let g = Gateway::resolve(wanted, &env).unwrap();
        assert_eq!(g.url(ServiceName::Salad), "http://127.0.0.1:18005");
        assert_eq!(g.url(ServiceName::Pdu), "http://pdu:1");
        assert!(g.token().unwrap().matches("usertoken"));
        assert!(g.token_source().ends_with("tokens/user"));
    }

    #[test]
    fn config_default_comes_before_a_found_state_dir() {
        let (_dir, state, config) = setup();
        let wanted = Wanted {
            state_dir: Some(state),
            config_path: Some(config),
            ..Default::default()
        };
        let g = Gateway::resolve(wanted, &no_env).unwrap();
        assert_eq!(g.url(ServiceName::Executor), "http://gw.lab:8000");
        assert_eq!(g.url(ServiceName::Salad), "http://gw.lab:8005");
        assert!(g.token().unwrap().matches("labtoken"));
        assert!(g.token_source().contains("gateway \"lab\""));
    }

    #[test]
    fn a_given_state_dir_beats_the_config_default() {
        let (_dir, state, config) = setup();
        let wanted = Wanted {
            state_dir: Some(state),
            state_dir_given: true,
            config_path: Some(config),
            ..Default::default()
        };
        let g = Gateway::resolve(wanted, &no_env).unwrap();
        assert_eq!(g.url(ServiceName::Executor), "http://127.0.0.1:18000");
        assert!(g.token().unwrap().matches("usertoken"));
    }

    #[test]
    fn named_gateway_never_gets_the_local_token() {
        let (_dir, state, config) = setup();
        let wanted = Wanted {
            gateway: Some("bare".into()),
            state_dir: Some(state),
            state_dir_given: true,
            config_path: Some(config.clone()),
            ..Default::default()
        };
        let g = Gateway::resolve(wanted, &no_env).unwrap();
        assert_eq!(g.url(ServiceName::Executor), "http://gw.bare:9000");
        assert!(g.token().is_none());
        let wanted = Wanted {
            gateway: Some("nope".into()),
            config_path: Some(config),
            ..Default::default()
        };
        let e = Gateway::resolve(wanted, &no_env).unwrap_err().to_string();
        assert!(e.contains("no gateway \"nope\""), "{e}");
    }

    #[test]
    fn explicit_url_wins_and_takes_the_matching_token() {
        let (_dir, state, config) = setup();
        // --url names lab while bare is selected: lab's URL and token.
        let wanted = Wanted {
            url: Some("http://GW.lab:8000/".into()),
            gateway: Some("bare".into()),
            state_dir: Some(state.clone()),
            config_path: Some(config.clone()),
            ..Default::default()
        };
        let g = Gateway::resolve(wanted, &no_env).unwrap();
        assert_eq!(g.url(ServiceName::Executor), "http://GW.lab:8000");
        assert!(g.token().unwrap().matches("labtoken"));
        // A URL no gateway has: the state dir's token, and none of its endpoints.
        let wanted = Wanted {
            url: Some("http://other:8000".into()),
            state_dir: Some(state),
            config_path: Some(config),
            ..Default::default()
        };
        let g = Gateway::resolve(wanted, &no_env).unwrap();
        assert_eq!(g.url(ServiceName::Salad), "http://other:8005");
        assert!(g.token().unwrap().matches("usertoken"));
    }

    #[test]
    fn driver_never_takes_the_state_dir_token() {
        let (_dir, state, _) = setup();
        let wanted = Wanted {
            url: Some("http://127.0.0.1:18000".into()),
            state_dir: Some(state.clone()),
            no_state_dir_token: true,
            ..Default::default()
        };
        let g = Gateway::resolve(wanted, &no_env).unwrap();
        assert!(g.token().is_none());
        assert_eq!(g.state_dir(), Some(state.as_path()));
        let g = g.with_token(flag("runner").unwrap());
        assert!(g.token().unwrap().matches("runner"));
    }

    #[test]
    fn gateway_without_config_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = Wanted {
            gateway: Some("lab".into()),
            config_path: Some(dir.path().join("config.yml")),
            ..Default::default()
        };
        let e = Gateway::resolve(wanted, &no_env).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}
