//! How `dutctl` finds the gateway's services and its token.
//!
//! URL of a service, first match wins: `DUTGATE_<SERVICE>_URL`; the `endpoints.json` that
//! `dutgate up` writes into the state dir (`DUTGATE_STATE_DIR`); the host of `--url`/`DUTGATE_URL`
//! (the executor's URL) with the service's default port; `http://127.0.0.1:<default port>`.
//! Token: `--token`/`DUTGATE_TOKEN`, else `<state dir>/tokens/admin`, else `.../user`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dutgate_core::client::ApiClient;
use dutgate_core::config::ServicePorts;
use dutgate_core::{Secret, ServiceName};

#[derive(Debug, Clone)]
pub struct Gateway {
    urls: BTreeMap<ServiceName, String>,
    token: Option<Secret>,
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

impl Gateway {
    pub fn resolve(
        url: Option<&str>,
        token: Option<&str>,
        state_dir: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Self {
        let endpoints: BTreeMap<String, String> = state_dir
            .and_then(|d| std::fs::read(d.join("endpoints.json")).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let host = url.and_then(scheme_and_host);
        let mut urls = BTreeMap::new();
        for svc in ServiceName::ALL {
            let var = format!("DUTGATE_{}_URL", svc.as_str().to_uppercase());
            let chosen = env(&var)
                .or_else(|| endpoints.get(svc.as_str()).cloned())
                .or_else(|| {
                    if svc == ServiceName::Executor {
                        url.map(|u| u.trim_end_matches('/').to_string())
                    } else {
                        None
                    }
                })
                .or_else(|| host.as_ref().map(|h| format!("{h}:{}", default_port(svc))))
                .unwrap_or_else(|| format!("http://127.0.0.1:{}", default_port(svc)));
            urls.insert(svc, chosen);
        }
        let token = token.map(Secret::new).or_else(|| {
            let dir = state_dir?.join("tokens");
            dutgate_core::auth::read_token(&dir.join("admin"))
                .or_else(|| dutgate_core::auth::read_token(&dir.join("user")))
        });
        Self { urls, token }
    }

    pub fn url(&self, service: ServiceName) -> &str {
        self.urls.get(&service).map(String::as_str).unwrap_or("")
    }

    pub fn client(&self, service: ServiceName) -> ApiClient {
        ApiClient::new(self.url(service), self.token.clone())
    }

    pub fn token(&self) -> Option<&Secret> {
        self.token.as_ref()
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
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_to_localhost_default_ports() {
        let g = Gateway::resolve(None, None, None, &no_env);
        assert_eq!(g.url(ServiceName::Mars), "http://127.0.0.1:8001");
        assert!(g.token().is_none());
    }

    #[test]
    fn url_host_gives_every_service() {
        let g = Gateway::resolve(Some("http://gw.lab:8000/"), Some("t"), None, &no_env);
        assert_eq!(g.url(ServiceName::Executor), "http://gw.lab:8000");
        assert_eq!(g.url(ServiceName::Pdu), "http://gw.lab:8004");
        assert!(g.token().unwrap().matches("t"));
    }

    #[test]
    fn state_dir_endpoints_and_tokens_win() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tokens")).unwrap();
        std::fs::write(dir.path().join("tokens/user"), "usertoken\n").unwrap();
        std::fs::write(
            dir.path().join("endpoints.json"),
            r#"{"salad": "http://127.0.0.1:18005"}"#,
        )
        .unwrap();
        let env = |k: &str| (k == "DUTGATE_PDU_URL").then(|| "http://pdu:1".to_string());
        let g = Gateway::resolve(None, None, Some(dir.path()), &env);
        assert_eq!(g.url(ServiceName::Salad), "http://127.0.0.1:18005");
        assert_eq!(g.url(ServiceName::Pdu), "http://pdu:1");
        assert!(g.token().unwrap().matches("usertoken"));
    }
}
