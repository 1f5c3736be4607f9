//! Acceptance point 2 (MQTT half): Tasmota- and Shelly-style devices, simulated in Rust
//! with rumqttc, through a real Mosquitto broker (our own instance on an ephemeral port):
//! switch ports, read them back; a dead broker or a silent device is a clear error within
//! the timeout, never OFF.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dutgate_pdu_driver::{DriverError, PduDriver, PowerState, Switch};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port number nobody held a moment ago: only a candidate, since another process may
/// take it before mosquitto binds it; [`broker`] then retries with another.
fn candidate_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether an MQTT 3.1.1 CONNECT on `port` is answered with an accepting CONNACK.
fn answers_connect(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    // CONNECT: protocol "MQTT" level 4, clean session, keep-alive 60 s, client id "probe".
    let connect = [
        0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 5, b'p', b'r', b'o', b'b', b'e',
    ];
    let mut connack = [0u8; 4];
    s.write_all(&connect).is_ok()
        && s.read_exact(&mut connack).is_ok()
        && connack == [0x20, 2, 0, 0]
}

/// Our own mosquitto on 127.0.0.1. mosquitto cannot bind port 0 (in its config, port 0
/// means a Unix socket), so it is started on a candidate port and started again on another
/// when its log says the port is taken. It is ours once its log says "running", which it
/// prints only after every listener is bound (a broker of another test on the same port is
/// never taken for it), and ready once it answers a CONNECT.
fn broker() -> Broker {
    let bin = dutgate_core::testing::require_program("mosquitto", "mosquitto");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mosquitto.conf");
    let log = dir.path().join("mosquitto.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    for _attempt in 0..20 {
        let port = candidate_port();
        // `user root`: mosquitto started as root would otherwise switch to user `mosquitto`,
        // which cannot read a private temp dir.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
            ),
        )
        .unwrap();
        let out = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(" running") && answers_connect(port) {
                return Broker {
                    child,
                    port,
                    _dir: dir,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                assert!(
                    text.contains("Address already in use"),
                    "mosquitto exited ({status}):\n{text}"
                );
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mosquitto not ready within 30 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("mosquitto found every candidate port taken");
}

/// A simulated device: connects, subscribes, answers with `handle`.
async fn device(
    port: u16,
    id: &str,
    sub: String,
    handle: impl Fn(&AsyncClient, &str, &[u8]) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 64);
    client.subscribe(sub, QoS::AtMostOnce).await.unwrap();
    // Wait for the SubAck so that no command is published before the device listens.
    loop {
        match el.poll().await.unwrap() {
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => continue,
        }
    }
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                handle(&client, &p.topic, &p.payload);
            }
        }
    })
}

/// Tasmota: `cmnd/<t>/POWERn`, `cmnd/<t>/STATE`, `cmnd/<t>/STATUS`.
async fn tasmota(
    port: u16,
    topic: &str,
    relays: Arc<Mutex<Vec<bool>>>,
) -> tokio::task::JoinHandle<()> {
    let t = topic.to_string();
    device(port, &format!("sim-{topic}"), format!("cmnd/{topic}/#"), move |c, topic, payload| {
        let cmd = topic.rsplit('/').next().unwrap_or("").to_ascii_uppercase();
        let payload = String::from_utf8_lossy(payload).to_ascii_uppercase();
        let mut r = relays.lock().unwrap();
        let word = |on: bool| if on { "ON" } else { "OFF" };
        if let Some(n) = cmd.strip_prefix("POWER") {
            let n: usize = if n.is_empty() { 1 } else { n.parse().unwrap_or(0) };
            if n == 0 || n > r.len() {
                let _ = c.try_publish(format!("stat/{t}/RESULT"), QoS::AtMostOnce, false, r#"{"Command":"Unknown"}"#);
                return;
            }
            match payload.as_str() {
                "ON" | "1" => r[n - 1] = true,
                "OFF" | "0" => r[n - 1] = false,
                "TOGGLE" | "2" => r[n - 1] = !r[n - 1],
                _ => {}
            }
            let s = word(r[n - 1]);
            let _ = c.try_publish(format!("stat/{t}/RESULT"), QoS::AtMostOnce, false, json!({format!("POWER{n}"): s}).to_string());
            let _ = c.try_publish(format!("stat/{t}/POWER{n}"), QoS::AtMostOnce, false, s);
        } else if cmd == "STATE" {
            let mut m = serde_json::Map::new();
            m.insert("Uptime".into(), json!("0T00:01:00"));
            for (i, on) in r.iter().enumerate() {
                m.insert(format!("POWER{}", i + 1), json!(word(*on)));
            }
            let _ = c.try_publish(format!("stat/{t}/RESULT"), QoS::AtMostOnce, false, Value::Object(m).to_string());
        } else if cmd == "STATUS" {
            let names: Vec<String> = (1..=r.len()).map(|i| format!("Relay {i}")).collect();
            let _ = c.try_publish(
                format!("stat/{t}/STATUS"),
                QoS::AtMostOnce,
                false,
                json!({"Status": {"Module": 0, "DeviceName": t, "FriendlyName": names, "Topic": t}}).to_string(),
            );
        }
    })
    .await
}

/// Shelly Gen2: JSON-RPC on `<id>/rpc`, answers on `<src>/rpc`.
async fn shelly(
    port: u16,
    id: &str,
    switches: Arc<Mutex<Vec<bool>>>,
) -> tokio::task::JoinHandle<()> {
    let me = id.to_string();
    device(port, &format!("sim-{id}"), format!("{id}/rpc"), move |c, _topic, payload| {
        let Ok(req) = serde_json::from_slice::<Value>(payload) else { return };
        let src = req["src"].as_str().unwrap_or("").to_string();
        let mut s = switches.lock().unwrap();
        let switch = |i: usize, on: bool| json!({"id": i, "source": "mqtt", "output": on, "apower": if on { 12.5 } else { 0.0 }, "voltage": 230.1});
        let sid = req["params"]["id"].as_u64().map(|v| v as usize);
        let result: Result<Value, (i64, String)> = match req["method"].as_str().unwrap_or("") {
            "Switch.Set" | "Switch.GetStatus" => match sid {
                Some(i) if i < s.len() => {
                    if req["method"] == "Switch.Set" {
                        let was = s[i];
                        s[i] = req["params"]["on"].as_bool().unwrap_or(was);
                        Ok(json!({"was_on": was}))
                    } else {
                        Ok(switch(i, s[i]))
                    }
                }
                other => Err((-105, format!("Argument 'id', value {} not found!", other.unwrap_or(99)))),
            },
            "Shelly.GetStatus" => {
                let mut m = serde_json::Map::new();
                for (i, on) in s.iter().enumerate() {
                    m.insert(format!("switch:{i}"), switch(i, *on));
                }
                m.insert("sys".into(), json!({"uptime": 60}));
                Ok(Value::Object(m))
            }
            "Shelly.GetConfig" => {
                let mut m = serde_json::Map::new();
                for i in 0..s.len() {
                    m.insert(format!("switch:{i}"), json!({"id": i, "name": format!("plug {i}")}));
                }
                Ok(Value::Object(m))
            }
            _ => Err((-114, "Method not found".into())),
        };
        let mut reply = json!({"id": req["id"], "src": me, "dst": src});
        match result {
            Ok(r) => reply["result"] = r,
            Err((code, message)) => reply["error"] = json!({"code": code, "message": message}),
        }
        let _ = c.try_publish(format!("{src}/rpc"), QoS::AtMostOnce, false, reply.to_string());
    })
    .await
}

fn build(cfg: Value) -> Box<dyn PduDriver> {
    dutgate_pdu_mqtt::build(yaml_serde::to_value(cfg).unwrap()).unwrap()
}

#[tokio::test]
async fn tasmota_over_mosquitto() {
    let b = broker();
    let relays = Arc::new(Mutex::new(vec![false; 4]));
    let _sim = tasmota(b.port, "rack-plug", relays.clone()).await;
    let mut d = build(
        json!({"broker": "127.0.0.1", "port": b.port, "device": "tasmota", "topic": "rack-plug", "timeout_ms": 2000}),
    );
    let ports = d.ports().await.unwrap();
    assert_eq!(ports.len(), 4);
    assert_eq!(ports[3].id, "4");
    assert_eq!(ports[3].label.as_deref(), Some("Relay 4"));
    d.set("2", Switch::On).await.unwrap();
    assert!(relays.lock().unwrap()[1], "the device switched");
    assert_eq!(d.get("2").await.unwrap(), PowerState::On);
    d.set("4", Switch::On).await.unwrap();
    d.set("2", Switch::Off).await.unwrap();
    assert_eq!(d.get("2").await.unwrap(), PowerState::Off);
    let all = d.get_all().await.unwrap();
    let states: Vec<_> = all.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        states,
        vec![
            PowerState::Off,
            PowerState::Off,
            PowerState::Off,
            PowerState::On
        ]
    );
    // Someone presses the button on the plug: read-back sees it.
    relays.lock().unwrap()[0] = true;
    assert_eq!(d.get("1").await.unwrap(), PowerState::On);
    assert_eq!(
        d.get("7").await.unwrap_err(),
        DriverError::no_such_port("7")
    );
    d.shutdown().await;
}

#[tokio::test]
async fn shelly_gen2_rpc_over_mosquitto() {
    let b = broker();
    let sw = Arc::new(Mutex::new(vec![false; 2]));
    let _sim = shelly(b.port, "shellypro2-test", sw.clone()).await;
    let mut d = build(
        json!({"broker": "127.0.0.1", "port": b.port, "device": "shelly", "topic": "shellypro2-test", "timeout_ms": 2000}),
    );
    let ports = d.ports().await.unwrap();
    assert_eq!(
        ports.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        ["0", "1"]
    );
    assert_eq!(ports[1].label.as_deref(), Some("plug 1"));
    d.set("1", Switch::On).await.unwrap();
    assert!(sw.lock().unwrap()[1]);
    assert_eq!(d.get("1").await.unwrap(), PowerState::On);
    assert_eq!(d.power_w("1").await.unwrap(), Some(12.5));
    d.set("1", Switch::Off).await.unwrap();
    assert_eq!(
        d.get_all().await.unwrap(),
        vec![("0".into(), PowerState::Off), ("1".into(), PowerState::Off)]
    );
    d.shutdown().await;

    // Ports given in the config are not asked for, and an id the device does not have is
    // reported as such by the device.
    let mut d = build(
        json!({"broker": "127.0.0.1", "port": b.port, "device": "shelly", "topic": "shellypro2-test", "ports": 3}),
    );
    assert_eq!(d.ports().await.unwrap().len(), 3);
    assert_eq!(
        d.get("2").await.unwrap_err(),
        DriverError::no_such_port("2")
    );
}

#[tokio::test]
async fn silent_device_and_dead_broker_are_errors_within_the_timeout() {
    let b = broker();
    // Broker up, nobody on that topic.
    let mut d = build(
        json!({"broker": "127.0.0.1", "port": b.port, "device": "tasmota", "topic": "nobody-home", "ports": 2, "timeout_ms": 400}),
    );
    let start = Instant::now();
    let e = d.get("1").await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("is the device online"), "{e}");
    assert!(
        d.get_all().await.is_err(),
        "no answer is an error, never OFF"
    );

    let mut d = build(
        json!({"broker": "127.0.0.1", "port": b.port, "device": "shelly", "topic": "nobody-home", "ports": 1, "timeout_ms": 400}),
    );
    assert!(matches!(
        d.set("0", Switch::On).await.unwrap_err(),
        DriverError::Timeout { .. }
    ));

    // No broker at all.
    // A socket bound but never listening: connections are refused, and no broker can start
    // on that port while the test runs.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = reserved.local_addr().unwrap().port();
    let mut d = build(
        json!({"broker": "127.0.0.1", "port": dead, "device": "tasmota", "topic": "x", "ports": 1, "timeout_ms": 600}),
    );
    let start = Instant::now();
    let e = d.get("1").await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(
            e,
            DriverError::Unreachable { .. } | DriverError::Timeout { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains(&format!("127.0.0.1:{dead}")), "{e}");
}
