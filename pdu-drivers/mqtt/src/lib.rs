//! `mqtt`: smart plugs and relay boards that speak MQTT through a broker.
//!
//! - `device: tasmota`: `cmnd/<topic>/POWER<n>` with `ON`/`OFF` (empty payload = query),
//!   answered on `stat/<topic>/POWER<n>` (or `stat/<topic>/RESULT {"POWER<n>": …}`). All
//!   states in one exchange with `cmnd/<topic>/STATE`; ports from `cmnd/<topic>/STATUS`
//!   (`FriendlyName`). Port ids `1`…`N`.
//! - `device: shelly`: Gen2 RPC over MQTT: requests on `<topic>/rpc`
//!   (`Switch.Set`, `Switch.GetStatus`, `Shelly.GetStatus`, `Shelly.GetConfig`), answers on
//!   `<client id>/rpc`. Port ids are the switch ids `0`…`N-1`; `apower` gives the power draw.
//!
//! One broker connection per PDU, opened on first use and kept; the event loop runs in its
//! own task, reconnects by itself and re-subscribes on every ConnAck (the broker forgets
//! subscriptions of a clean session). Every exchange has a time budget: a device that does
//! not answer is a timeout, never `OFF`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use dutgate_pdu_driver::{
    ConfigError, DriverError, DriverFactory, PduDriver, PortInfo, PortList, PowerState, Switch,
    parse_config, port_list,
};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

pub const NAME: &str = "mqtt";

pub fn factories() -> Vec<DriverFactory> {
    vec![DriverFactory {
        name: NAME,
        summary: "Tasmota or Shelly Gen2 plugs over an MQTT broker",
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
    /// Broker host name or address.
    pub broker: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    pub device: Device,
    /// Tasmota: the device's `%topic%`; Shelly: its MQTT prefix (device id).
    pub topic: String,
    /// Ports, when the device should not be asked (count or labels).
    #[serde(default)]
    pub ports: Option<PortList>,
    /// Time budget of one exchange (and of connecting to the broker).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// MQTT client id; also the Shelly RPC `src`. Default: unique per driver instance.
    #[serde(default)]
    pub client_id: Option<String>,
}

fn default_port() -> u16 {
    1883
}
fn default_timeout_ms() -> u64 {
    3000
}

fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#', '\0']) && !t.starts_with('/') && !t.ends_with('/')
}

pub fn build(config: yaml_serde::Value) -> Result<Box<dyn PduDriver>, ConfigError> {
    let cfg: Config = parse_config(config)?;
    if cfg.broker.trim().is_empty() {
        return Err(ConfigError::field("broker", "must not be empty"));
    }
    if !valid_topic(&cfg.topic) {
        return Err(ConfigError::field(
            "topic",
            "a plain topic without wildcards or leading/trailing '/'",
        ));
    }
    if cfg.timeout_ms == 0 {
        return Err(ConfigError::field("timeout_ms", "must be more than 0"));
    }
    if cfg.password.is_some() && cfg.username.is_none() {
        return Err(ConfigError::field(
            "username",
            "a password needs a username",
        ));
    }
    if let Some(p) = &cfg.ports
        && port_list(p, 0).is_empty()
    {
        return Err(ConfigError::field("ports", "a PDU needs at least one port"));
    }
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let client_id = cfg.client_id.clone().unwrap_or_else(|| {
        format!(
            "dutgate-pdu-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    });
    if !valid_topic(&client_id) {
        return Err(ConfigError::field(
            "client_id",
            "must be usable as a topic level",
        ));
    }
    Ok(Box::new(MqttPdu {
        timeout: Duration::from_millis(cfg.timeout_ms),
        client_id,
        cfg,
        conn: None,
        ports: None,
        rpc_id: 0,
    }))
}

#[derive(Debug, Clone, PartialEq)]
enum Link {
    Connecting,
    Ready,
    Failed(String),
    Refused(String),
}

struct Conn {
    client: AsyncClient,
    incoming: broadcast::Sender<(String, Vec<u8>)>,
    link: watch::Receiver<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

pub struct MqttPdu {
    cfg: Config,
    client_id: String,
    timeout: Duration,
    conn: Option<Conn>,
    ports: Option<Vec<PortInfo>>,
    rpc_id: u64,
}

fn parse_power(s: &str) -> PowerState {
    match s.trim().to_ascii_uppercase().as_str() {
        "ON" | "1" | "TRUE" => PowerState::On,
        "OFF" | "0" | "FALSE" => PowerState::Off,
        _ => PowerState::Unknown,
    }
}

/// `{"POWER1": "ON", "POWER": "OFF", …}` → port → state (`POWER` is port 1).
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

impl MqttPdu {
    fn target(&self) -> String {
        format!("MQTT broker {}:{}", self.cfg.broker, self.cfg.port)
    }

    fn subscriptions(&self) -> Vec<String> {
        match self.cfg.device {
            Device::Tasmota => vec![
                format!("stat/{}/#", self.cfg.topic),
                format!("tele/{}/#", self.cfg.topic),
            ],
            Device::Shelly => vec![format!("{}/rpc", self.client_id)],
        }
    }

    fn start(&self) -> Conn {
        let mut opts = MqttOptions::new(&self.client_id, &self.cfg.broker, self.cfg.port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_clean_session(true);
        if let Some(u) = &self.cfg.username {
            opts.set_credentials(u, self.cfg.password.clone().unwrap_or_default());
        }
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (incoming, _) = broadcast::channel(256);
        let (link_tx, link) = watch::channel(Link::Connecting);
        let subs = self.subscriptions();
        let tx = incoming.clone();
        let sub_client = client.clone();
        let target = self.target();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if ack.code == ConnectReturnCode::Success {
                            for s in &subs {
                                if let Err(e) =
                                    sub_client.try_subscribe(s.as_str(), QoS::AtMostOnce)
                                {
                                    let _ =
                                        link_tx.send(Link::Failed(format!("subscribe {s}: {e}")));
                                }
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = link_tx.send(Link::Ready);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                        let _ = link_tx.send(Link::Refused(format!(
                            "broker refused the connection: {code:?}"
                        )));
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    Err(e) => {
                        tracing::debug!(%target, error = %e, "MQTT connection error");
                        let _ = link_tx.send(Link::Failed(e.to_string()));
                        // poll() reconnects on the next call; do not spin.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Conn {
            client,
            incoming,
            link,
            task,
        }
    }

    /// The connection, once the broker accepted us and our subscriptions.
    async fn ready(&mut self) -> Result<(), DriverError> {
        if self.conn.is_none() {
            self.conn = Some(self.start());
        }
        let target = self.target();
        let timeout = self.timeout;
        let Some(conn) = self.conn.as_mut() else {
            return Err(DriverError::Local("MQTT connection vanished".into()));
        };
        let mut link = conn.link.clone();
        let wait = async {
            loop {
                let state = link.borrow_and_update().clone();
                match state {
                    Link::Ready => return Ok(()),
                    Link::Refused(r) => return Err(DriverError::refused(&target, r)),
                    Link::Connecting | Link::Failed(_) => {}
                }
                if link.changed().await.is_err() {
                    return Err(DriverError::unreachable(&target, "connection task ended"));
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => {
                let last = conn.link.borrow().clone();
                Err(match last {
                    Link::Failed(e) => DriverError::unreachable(&target, e),
                    _ => DriverError::timeout(format!("{target}: connecting"), timeout),
                })
            }
        }
    }

    /// Publishes a request and waits for the first message `matcher` accepts.
    async fn exchange<T>(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        what: &str,
        matcher: impl Fn(&str, &[u8]) -> Option<T>,
    ) -> Result<T, DriverError> {
        self.ready().await?;
        let target = self.target();
        let timeout = self.timeout;
        let Some(conn) = self.conn.as_ref() else {
            return Err(DriverError::Local("MQTT connection vanished".into()));
        };
        let mut rx = conn.incoming.subscribe();
        let client = conn.client.clone();
        let work = async {
            client
                .publish(topic.as_str(), QoS::AtMostOnce, false, payload)
                .await
                .map_err(|e| DriverError::unreachable(&target, format!("publish {topic}: {e}")))?;
            loop {
                match rx.recv().await {
                    Ok((t, p)) => {
                        if let Some(v) = matcher(&t, &p) {
                            return Ok(v);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(DriverError::unreachable(&target, "connection closed"));
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::timeout(
                format!("{target}: {what} (is the device online and its topic right?)"),
                timeout,
            )),
        }
    }

    /// Sends `POWER<n>` and waits for `stat/<topic>/POWER<n>`. Tasmota publishes that topic
    /// exactly once per command (the `RESULT` copy is ignored), so a reply is never left over
    /// to be taken for the answer to the next command.
    async fn tasmota_power(
        &mut self,
        port: &str,
        want: Option<Switch>,
    ) -> Result<PowerState, DriverError> {
        let base = self.cfg.topic.clone();
        let stat = format!("stat/{base}/POWER{port}");
        let stat_single = (port == "1").then(|| format!("stat/{base}/POWER"));
        let payload = want.map(|w| w.as_str()).unwrap_or("");
        self.exchange(
            format!("cmnd/{base}/POWER{port}"),
            payload.as_bytes().to_vec(),
            &format!("POWER{port}"),
            move |t, p| {
                if t != stat && stat_single.as_deref() != Some(t) {
                    return None;
                }
                Some(parse_power(&String::from_utf8_lossy(p)))
            },
        )
        .await
    }

    async fn shelly_rpc(&mut self, method: &str, params: Value) -> Result<Value, DriverError> {
        self.rpc_id += 1;
        let id = self.rpc_id;
        let switch_id = params.get("id").map(|v| v.to_string());
        let req = json!({"id": id, "src": self.client_id, "method": method, "params": params});
        let reply_topic = format!("{}/rpc", self.client_id);
        let target = self.target();
        let reply = self
            .exchange(
                format!("{}/rpc", self.cfg.topic),
                req.to_string().into_bytes(),
                method,
                move |t, p| {
                    if t != reply_topic {
                        return None;
                    }
                    let v: Value = serde_json::from_slice(p).ok()?;
                    (v.get("id").and_then(Value::as_u64) == Some(id)).then_some(v)
                },
            )
            .await?;
        if let Some(err) = reply.get("error") {
            let msg = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("error");
            let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
            // -105: "Argument 'id', value N not found!"
            if code == -105 {
                return Err(DriverError::no_such_port(switch_id.unwrap_or_default()));
            }
            return Err(DriverError::refused(
                target,
                format!("{method}: {msg} (code {code})"),
            ));
        }
        reply
            .get("result")
            .cloned()
            .ok_or_else(|| DriverError::protocol(target, format!("{method}: reply without result")))
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

fn shelly_output(v: &Value) -> PowerState {
    match v.get("output").and_then(Value::as_bool) {
        Some(true) => PowerState::On,
        Some(false) => PowerState::Off,
        None => PowerState::Unknown,
    }
}

/// `switch:<n>` keys of a Shelly GetConfig/GetStatus answer, in numeric order.
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

#[async_trait]
impl PduDriver for MqttPdu {
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
        let target = self.target();
        let ports = match self.cfg.device {
            Device::Tasmota => {
                let base = self.cfg.topic.clone();
                let status = format!("stat/{base}/STATUS");
                let v = self
                    .exchange(
                        format!("cmnd/{base}/STATUS"),
                        b"0".to_vec(),
                        "STATUS",
                        move |t, p| {
                            if t != status {
                                return None;
                            }
                            serde_json::from_slice::<Value>(p).ok()
                        },
                    )
                    .await?;
                let names = v
                    .pointer("/Status/FriendlyName")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        DriverError::protocol(&target, "STATUS without Status.FriendlyName")
                    })?;
                names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        PortInfo::new((i + 1).to_string(), n.as_str().map(str::to_string))
                    })
                    .collect::<Vec<_>>()
            }
            Device::Shelly => {
                let v = self.shelly_rpc("Shelly.GetConfig", json!({})).await?;
                shelly_switches(&v)
                    .into_iter()
                    .map(|(n, c)| {
                        let label = c.get("name").and_then(Value::as_str).map(str::to_string);
                        PortInfo::new(n.to_string(), label)
                    })
                    .collect()
            }
        };
        if ports.is_empty() {
            return Err(DriverError::protocol(target, "the device lists no relays"));
        }
        self.ports = Some(ports.clone());
        Ok(ports)
    }

    async fn get(&mut self, port: &str) -> Result<PowerState, DriverError> {
        let n = self.check_port(port)?;
        match self.cfg.device {
            Device::Tasmota => self.tasmota_power(port, None).await,
            Device::Shelly => {
                let v = self
                    .shelly_rpc("Switch.GetStatus", json!({"id": n}))
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
            Device::Tasmota => {
                let base = self.cfg.topic.clone();
                let result = format!("stat/{base}/RESULT");
                let state = format!("tele/{base}/STATE");
                let ids: Vec<String> = ports.iter().map(|p| p.id.clone()).collect();
                // Only a full state report counts: a `RESULT` of one POWER command is not it.
                self.exchange(
                    format!("cmnd/{base}/STATE"),
                    Vec::new(),
                    "STATE",
                    move |t, p| {
                        if t != result && t != state {
                            return None;
                        }
                        let v: Value = serde_json::from_slice(p).ok()?;
                        let powers = tasmota_powers(&v);
                        ids.iter()
                            .all(|id| powers.contains_key(id))
                            .then_some(powers)
                    },
                )
                .await?
            }
            Device::Shelly => {
                let v = self.shelly_rpc("Shelly.GetStatus", json!({})).await?;
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
                self.tasmota_power(port, Some(state)).await?;
            }
            Device::Shelly => {
                self.shelly_rpc("Switch.Set", json!({"id": n, "on": state == Switch::On}))
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
                    .shelly_rpc("Switch.GetStatus", json!({"id": n}))
                    .await?;
                Ok(v.get("apower").and_then(Value::as_f64))
            }
        }
    }

    async fn shutdown(&mut self) {
        self.conn = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tasmota_and_shelly_payloads() {
        let v = json!({"POWER1": "ON", "POWER2": "off", "POWER": "ON", "Wifi": {}});
        let p = tasmota_powers(&v);
        assert_eq!(p["1"], PowerState::On);
        assert_eq!(p["2"], PowerState::Off);
        assert_eq!(parse_power("maybe"), PowerState::Unknown);
        let s = json!({"switch:1": {"output": false}, "switch:0": {"output": true}, "sys": {}});
        let sw = shelly_switches(&s);
        assert_eq!(sw.len(), 2);
        assert_eq!(sw[0].0, 0);
        assert_eq!(shelly_output(sw[0].1), PowerState::On);
        assert_eq!(shelly_output(&json!({})), PowerState::Unknown);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cfg = |t: &str| yaml_serde::from_str::<yaml_serde::Value>(t).unwrap();
        let e = build(cfg("{broker: b, device: tasmota, topic: 'a/#'}"))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("topic"));
        let e = build(cfg("{broker: b, device: zigbee, topic: a}"))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some("device"));
        let e = build(cfg("{device: shelly, topic: a}")).err().unwrap();
        assert_eq!(e.field.as_deref(), Some("broker"));
        assert!(build(cfg("{broker: b, device: shelly, topic: shellyplus-1}")).is_ok());
    }
}
