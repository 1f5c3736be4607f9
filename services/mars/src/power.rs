//! How mars powers PDU ports (discovery turns a port on, retiring or an expired discovery turns
//! it off). Only the pdu service talks to PDUs: [`HttpPower`] speaks its REST API
//! (design.md §5); tests use an in-memory [`Power`] when the PDU is not what they test.

use dutgate_core::http::encode_component;
use std::time::Duration;

use dutgate_core::PowerState;
use dutgate_core::client::ApiClient;
use dutgate_core::config::GatewayConfig;
use dutgate_core::{Secret, ServiceName};
use futures::future::BoxFuture;
use reqwest::Method;

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("PDU {pdu} has no port {port}")]
    NoSuchPort { pdu: String, port: String },
    #[error("PDU {pdu} port {port}: {message}")]
    Failed {
        pdu: String,
        port: String,
        message: String,
    },
}

/// Power control of one PDU port, as mars needs it.
pub trait Power: Send + Sync + 'static {
    /// The port's read-back state.
    fn get(&self, pdu: &str, port: &str) -> BoxFuture<'_, Result<PowerState, PowerError>>;
    /// Sets the port and returns the read-back state.
    fn set(
        &self,
        pdu: &str,
        port: &str,
        state: PowerState,
    ) -> BoxFuture<'_, Result<PowerState, PowerError>>;
}

/// The pdu service's REST API: `GET /api/v1/pdus/{name}/ports`,
/// `PATCH /api/v1/pdus/{name}/ports/{id} {"state": "ON"|"OFF"}` (answers the read-back).
#[derive(Debug, Clone)]
pub struct HttpPower {
    api: ApiClient,
}

impl HttpPower {
    pub fn new(base: impl Into<String>, token: Option<Secret>) -> Self {
        // A power change waits for the PDU's read-back; give it more than the default.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            api: ApiClient::with_http(base, token, http),
        }
    }

    /// The pdu service of the gateway (or at `url`), called with the service credential:
    /// switching and reading ports is what the service role may do on the pdu service.
    pub fn for_gateway(gw: &GatewayConfig, url: Option<&str>) -> Self {
        let token = dutgate_core::auth::service_token(gw);
        let base = url
            .map(str::to_string)
            .unwrap_or_else(|| gw.internal_url(ServiceName::Pdu));
        Self::new(base, token)
    }
}

/// Pulls a `state` out of a port object, tolerating lower case.
fn state_of(v: &serde_json::Value) -> Option<PowerState> {
    v.get("state")?.as_str()?.parse().ok()
}

impl Power for HttpPower {
    fn get(&self, pdu: &str, port: &str) -> BoxFuture<'_, Result<PowerState, PowerError>> {
        let (pdu, port) = (pdu.to_string(), port.to_string());
        Box::pin(async move {
            let path = format!("/api/v1/pdus/{}/ports", encode_component(&pdu));
            let fail = |message: String| PowerError::Failed {
                pdu: pdu.clone(),
                port: port.clone(),
                message,
            };
            let v: serde_json::Value =
                self.api.get(&path).await.map_err(|e| fail(e.to_string()))?;
            // Either a bare list or `{"ports": [...]}`.
            let list = v
                .as_array()
                .or_else(|| v.get("ports").and_then(|p| p.as_array()))
                .ok_or_else(|| fail("unexpected answer from the pdu service".into()))?;
            let found = list.iter().find(|p| match p.get("id") {
                Some(serde_json::Value::String(s)) => *s == port,
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().is_some() && port.parse::<u64>().ok() == n.as_u64()
                }
                Some(_) => false,
                None => false,
            });
            match found {
                Some(p) => Ok(state_of(p).unwrap_or(PowerState::Unknown)),
                None => Err(PowerError::NoSuchPort {
                    pdu: pdu.clone(),
                    port: port.clone(),
                }),
            }
        })
    }

    fn set(
        &self,
        pdu: &str,
        port: &str,
        state: PowerState,
    ) -> BoxFuture<'_, Result<PowerState, PowerError>> {
        let (pdu, port) = (pdu.to_string(), port.to_string());
        Box::pin(async move {
            let path = format!(
                "/api/v1/pdus/{}/ports/{}",
                encode_component(&pdu),
                encode_component(&port)
            );
            let body = serde_json::json!({ "state": state.as_str() });
            let rb = self.api.request(Method::PATCH, &path).json(&body);
            let v: serde_json::Value = self.api.send(rb, &path).await.map_err(|e| {
                match e.status().map(|s| s.as_u16()) {
                    Some(404) => PowerError::NoSuchPort {
                        pdu: pdu.clone(),
                        port: port.clone(),
                    },
                    _ => PowerError::Failed {
                        pdu: pdu.clone(),
                        port: port.clone(),
                        message: e.to_string(),
                    },
                }
            })?;
            Ok(state_of(&v).unwrap_or(PowerState::Unknown))
        })
    }
}

/// In-memory ports for tests and for farms without a pdu service: every port exists and
/// starts `OFF` unless told otherwise.
#[derive(Debug, Default)]
pub struct MemoryPower {
    ports: std::sync::Mutex<std::collections::BTreeMap<(String, String), PowerState>>,
    /// Ports that refuse to change (to test error paths).
    pub broken: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
}

impl MemoryPower {
    pub fn state(&self, pdu: &str, port: &str) -> PowerState {
        self.ports
            .lock()
            .map(|p| {
                p.get(&(pdu.to_string(), port.to_string()))
                    .copied()
                    .unwrap_or(PowerState::Off)
            })
            .unwrap_or(PowerState::Unknown)
    }
}

impl MemoryPower {
    /// Sets a port as if someone had switched it by hand.
    pub fn set_state(&self, pdu: &str, port: &str, state: PowerState) {
        if let Ok(mut p) = self.ports.lock() {
            p.insert((pdu.to_string(), port.to_string()), state);
        }
    }
}

impl Power for MemoryPower {
    fn get(&self, pdu: &str, port: &str) -> BoxFuture<'_, Result<PowerState, PowerError>> {
        let s = self.state(pdu, port);
        Box::pin(async move { Ok(s) })
    }

    fn set(
        &self,
        pdu: &str,
        port: &str,
        state: PowerState,
    ) -> BoxFuture<'_, Result<PowerState, PowerError>> {
        let key = (pdu.to_string(), port.to_string());
        let broken = self.broken.lock().map(|b| b.contains(&key)).unwrap_or(true);
        let r = if broken {
            Err(PowerError::Failed {
                pdu: key.0.clone(),
                port: key.1.clone(),
                message: "port does not respond".into(),
            })
        } else {
            if let Ok(mut p) = self.ports.lock() {
                p.insert(key, state);
            }
            Ok(state)
        };
        Box::pin(async move { r })
    }
}
