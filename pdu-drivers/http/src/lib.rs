//! `http`: smart plugs and relay boards with a local HTTP API.
//!
//! - `device: tasmota`: `GET /cm?cmnd=Power<n>%20On|Off` switches, `GET /cm?cmnd=Power<n>`
//!   reads (`{"POWER<n>": "ON"}`), `GET /cm?cmnd=State` reads all relays at once, and
//!   `GET /cm?cmnd=Status%200` lists them (`FriendlyName`). Port ids `1`…`N`. Web-UI
//!   credentials go into the `user`/`password` query parameters, as Tasmota wants.
//! - `device: shelly`: Gen2 RPC over HTTP: `/rpc/Switch.Set?id=<n>&on=true|false`,
//!   `/rpc/Switch.GetStatus?id=<n>` (`output`, `apower`), `/rpc/Shelly.GetStatus` (all at
//!   once), `/rpc/Shelly.GetConfig` (names). Port ids `0`…`N-1`.
//!
//! One HTTP client (connection pool) per PDU; every request has the configured timeout.

use dutgate_core::http::encode_component;
use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use dutgate_pdu_driver::{
    ConfigError, DriverError, DriverFactory, PduDriver, PortInfo, PortList, PowerState, Switch,
    parse_config, port_list,
};
use serde::Deserialize;
use serde_json::Value;

pub const NAME: &str = "http";

pub fn factories() -> Vec<DriverFactory> {
    vec![DriverFactory {
        name: NAME,
        summary: "Tasmota (/cm) or Shelly Gen2 (/rpc) plugs over HTTP",
        build,
    }]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Tasmota,
    Shelly,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the device, e.g. `http://10.42.0.50`.
    pub url: String,
    pub device: Device,
    /// Ports, when the device should not be asked (count or labels).
    #[serde(default)]
    pub ports: Option<PortList>,
    /// Tasmota web credentials (sent as query parameters).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    3000
}

pub fn build(config: yaml_serde::Value) -> Result<Box<dyn PduDriver>, ConfigError> {
    let cfg: Config = parse_config(config)?;
    let base = reqwest::Url::parse(&cfg.url)
        .map_err(|e| ConfigError::field("url", format!("not a URL: {e}")))?;
    if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
        return Err(ConfigError::field("url", "expected http://host[:port]"));
    }
    if cfg.timeout_ms == 0 {
        return Err(ConfigError::field("timeout_ms", "must be more than 0"));
    }
    if cfg.device == Device::Shelly && (cfg.username.is_some() || cfg.password.is_some()) {
        return Err(ConfigError::field(
            "username",
            "Shelly Gen2 authentication (HTTP digest) is not supported; disable it on the plug's \
             management network or use the mqtt driver",
        ));
    }
    if let Some(p) = &cfg.ports
        && port_list(p, 0).is_empty()
    {
        return Err(ConfigError::field("ports", "a PDU needs at least one port"));
    }
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let client = reqwest::Client::builder()
        .connect_timeout(timeout)
        .timeout(timeout)
        .build()
        .map_err(|e| ConfigError::new(None, format!("HTTP client: {e}")))?;
    Ok(Box::new(HttpPdu {
        base: cfg.url.trim_end_matches('/').to_string(),
        target: format!("{:?} device at {}", cfg.device, cfg.url).to_lowercase(),
        timeout,
        client,
        cfg,
        ports: None,
    }))
}

pub struct HttpPdu {
    cfg: Config,
    base: String,
    target: String,
    timeout: Duration,
    client: reqwest::Client,
    ports: Option<Vec<PortInfo>>,
}

fn parse_power(s: &str) -> PowerState {
    match s.trim().to_ascii_uppercase().as_str() {
        "ON" | "1" | "TRUE" => PowerState::On,
        "OFF" | "0" | "FALSE" => PowerState::Off,
        _ => PowerState::Unknown,
    }
}

fn tasmota_powers(v: &Value) -> BTreeMap<String, PowerState> {
    let mut out = BTreeMap::new();
    if let Some(m) = v.as_object() {
        for (k, v) in m {
            let Some(rest) = k.strip_prefix("POWER") else {
                continue;
            };
            let port = if rest.is_empty() {
                "1".to_string()
            } else {
                rest.to_string()
            };
            if port.chars().all(|c| c.is_ascii_digit())
                && let Some(s) = v.as_str()
            {
                out.insert(port, parse_power(s));
            }
        }
    }
    out
}

fn shelly_output(v: &Value) -> PowerState {
    match v.get("output").and_then(Value::as_bool) {
        Some(true) => PowerState::On,
        Some(false) => PowerState::Off,
        None => PowerState::Unknown,
    }
}

fn shelly_switches(v: &Value) -> Vec<(u32, &Value)> {
    let mut out: Vec<(u32, &Value)> = v
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| k.strip_prefix("switch:")?.parse().ok().map(|n| (n, v)))
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|(n, _)| *n);
    out
}

impl HttpPdu {
    /// GET `path` with `query`, JSON answer. Maps every failure to a driver error.
    async fn call(&self, path: &str, query: &[(&str, String)]) -> Result<Value, DriverError> {
        let url = format!("{}{}", self.base, path);
        let mut q: Vec<(&str, String)> = query.to_vec();
        if self.cfg.device == Device::Tasmota {
            if let Some(u) = &self.cfg.username {
                q.push(("user", u.clone()));
            }
            if let Some(p) = &self.cfg.password {
                q.push(("password", p.clone()));
            }
        }
        let what = format!("GET {path}");
        // Spaces as %20 (`/cm?cmnd=Power1%20On`), the form Tasmota documents.
        let pairs: Vec<String> = q
            .iter()
            .map(|(k, v)| format!("{k}={}", encode_component(v)))
            .collect();
        let url = if pairs.is_empty() {
            url
        } else {
            format!("{url}?{}", pairs.join("&"))
        };
        let resp = self.client.get(url).send().await.map_err(|e| {
            if e.is_timeout() {
                DriverError::timeout(format!("{}: {what}", self.target), self.timeout)
            } else {
                DriverError::unreachable(&self.target, format!("{what}: {}", root_cause(&e)))
            }
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| {
            if e.is_timeout() {
                DriverError::timeout(format!("{}: {what} (body)", self.target), self.timeout)
            } else {
                DriverError::unreachable(&self.target, format!("{what}: {e}"))
            }
        })?;
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(DriverError::refused(
                &self.target,
                format!("{what}: HTTP {status} (credentials?)"),
            ));
        }
        if !status.is_success() {
            // Shelly answers RPC errors with a JSON body {code, message}.
            if let Some(v) = &json
                && let Some(code) = v.get("code").and_then(Value::as_i64)
            {
                let msg = v.get("message").and_then(Value::as_str).unwrap_or("error");
                if code == -105 {
                    let id = query
                        .iter()
                        .find(|(k, _)| *k == "id")
                        .map(|(_, v)| v.clone());
                    return Err(DriverError::no_such_port(id.unwrap_or_default()));
                }
                return Err(DriverError::refused(
                    &self.target,
                    format!("{what}: {msg} (code {code})"),
                ));
            }
            return Err(DriverError::protocol(
                &self.target,
                format!("{what}: HTTP {status}"),
            ));
        }
        let v = json.ok_or_else(|| {
            DriverError::protocol(&self.target, format!("{what}: answer is not JSON"))
        })?;
        // Tasmota answers unknown commands and bad passwords with 200 and a JSON marker.
        if let Some(c) = v.get("Command").and_then(Value::as_str) {
            return Err(DriverError::protocol(
                &self.target,
                format!("{what}: Command {c}"),
            ));
        }
        if v.get("WARNING").is_some() {
            return Err(DriverError::refused(
                &self.target,
                format!("{what}: {}", v["WARNING"].as_str().unwrap_or("refused")),
            ));
        }
        Ok(v)
    }

    async fn tasmota(&self, cmnd: String) -> Result<Value, DriverError> {
        self.call("/cm", &[("cmnd", cmnd)]).await
    }

    async fn tasmota_power(&self, port: &str, arg: &str) -> Result<PowerState, DriverError> {
        let cmnd = if arg.is_empty() {
            format!("Power{port}")
        } else {
            format!("Power{port} {arg}")
        };
        let v = self.tasmota(cmnd).await?;
        tasmota_powers(&v).get(port).copied().ok_or_else(|| {
            DriverError::protocol(&self.target, format!("answer without POWER{port}: {v}"))
        })
    }

    fn check_port(&self, port: &str) -> Result<u32, DriverError> {
        let n: u32 = port.parse().map_err(|_| DriverError::no_such_port(port))?;
        if let Some(ports) = &self.ports
            && !ports.iter().any(|p| p.id == port)
        {
            return Err(DriverError::no_such_port(port));
        }
        Ok(n)
    }
}

/// The innermost error (reqwest's outer message is just "error sending request").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[async_trait]
impl PduDriver for HttpPdu {
    fn driver_name(&self) -> &'static str {
        NAME
    }

    async fn ports(&mut self) -> Result<Vec<PortInfo>, DriverError> {
        let first = match self.cfg.device {
            Device::Tasmota => 1,
            Device::Shelly => 0,
        };
        if let Some(list) = &self.cfg.ports {
            let ports = port_list(list, first);
            self.ports = Some(ports.clone());
            return Ok(ports);
        }
        let ports: Vec<PortInfo> = match self.cfg.device {
            Device::Tasmota => {
                let v = self.tasmota("Status 0".into()).await?;
                let names = v
                    .pointer("/Status/FriendlyName")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        DriverError::protocol(&self.target, "Status without FriendlyName")
                    })?;
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        PortInfo::new((i + 1).to_string(), n.as_str().map(str::to_string))
                    })
                    .collect()
            }
            Device::Shelly => {
                let v = self.call("/rpc/Shelly.GetConfig", &[]).await?;
                shelly_switches(&v)
                    .into_iter()
                    .map(|(n, c)| {
                        PortInfo::new(
                            n.to_string(),
                            c.get("name").and_then(Value::as_str).map(str::to_string),
                        )
                    })
                    .collect()
            }
        };
        if ports.is_empty() {
            return Err(DriverError::protocol(
                &self.target,
                "the device lists no relays",
            ));
        }
        self.ports = Some(ports.clone());
        Ok(ports)
    }

    async fn get(&mut self, port: &str) -> Result<PowerState, DriverError> {
        let n = self.check_port(port)?;
        match self.cfg.device {
            Device::Tasmota => self.tasmota_power(port, "").await,
            Device::Shelly => {
                let v = self
                    .call("/rpc/Switch.GetStatus", &[("id", n.to_string())])
                    .await?;
                Ok(shelly_output(&v))
            }
        }
    }

    async fn get_all(&mut self) -> Result<Vec<(String, PowerState)>, DriverError> {
        let ports = match &self.ports {
            Some(p) => p.clone(),
            None => self.ports().await?,
        };
        let by_port: BTreeMap<String, PowerState> = match self.cfg.device {
            Device::Tasmota => tasmota_powers(&self.tasmota("State".into()).await?),
            Device::Shelly => {
                let v = self.call("/rpc/Shelly.GetStatus", &[]).await?;
                shelly_switches(&v)
                    .into_iter()
                    .map(|(n, s)| (n.to_string(), shelly_output(s)))
                    .collect()
            }
        };
        Ok(ports
            .into_iter()
            .map(|p| {
                let s = by_port.get(&p.id).copied().unwrap_or(PowerState::Unknown);
                (p.id, s)
            })
            .collect())
    }

    async fn set(&mut self, port: &str, state: Switch) -> Result<(), DriverError> {
        let n = self.check_port(port)?;
        match self.cfg.device {
            Device::Tasmota => {
                let arg = match state {
                    Switch::On => "On",
                    Switch::Off => "Off",
                };
                self.tasmota_power(port, arg).await?;
            }
            Device::Shelly => {
                let on = if state == Switch::On { "true" } else { "false" };
                self.call(
                    "/rpc/Switch.Set",
                    &[("id", n.to_string()), ("on", on.to_string())],
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn power_w(&mut self, port: &str) -> Result<Option<f64>, DriverError> {
        match self.cfg.device {
            Device::Tasmota => Ok(None),
            Device::Shelly => {
                let n = self.check_port(port)?;
                let v = self
                    .call("/rpc/Switch.GetStatus", &[("id", n.to_string())])
                    .await?;
                Ok(v.get("apower").and_then(Value::as_f64))
            }
        }
    }
}
