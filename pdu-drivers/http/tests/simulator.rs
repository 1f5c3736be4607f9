//! Acceptance point 2 (HTTP half): Tasmota- and Shelly-style devices simulated with axum in
//! the test: switch ports, read them back; a dead or hanging device is a clear error within
//! the timeout, never OFF.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use dutgate_pdu_driver::{DriverError, PduDriver, PowerState, Switch};
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Sim {
    relays: Arc<Mutex<Vec<bool>>>,
    password: Option<String>,
    queries: Arc<Mutex<Vec<String>>>,
}

async fn tasmota_cm(
    State(sim): State<Sim>,
    RawQuery(raw): RawQuery,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    sim.queries.lock().unwrap().push(raw.unwrap_or_default());
    if let Some(pw) = &sim.password
        && q.get("password") != Some(pw)
    {
        return Json(json!({"WARNING": "Need user=<username>&password=<password>"}));
    }
    let cmnd = q.get("cmnd").cloned().unwrap_or_default();
    let mut r = sim.relays.lock().unwrap();
    let word = |on: bool| if on { "ON" } else { "OFF" };
    let (cmd, arg) = cmnd.split_once(' ').unwrap_or((&cmnd, ""));
    let cmd = cmd.to_ascii_uppercase();
    if let Some(n) = cmd.strip_prefix("POWER") {
        let n: usize = if n.is_empty() {
            1
        } else {
            n.parse().unwrap_or(0)
        };
        if n == 0 || n > r.len() {
            return Json(json!({"Command": "Unknown"}));
        }
        match arg.to_ascii_uppercase().as_str() {
            "ON" | "1" => r[n - 1] = true,
            "OFF" | "0" => r[n - 1] = false,
            "TOGGLE" => r[n - 1] = !r[n - 1],
            _ => {}
        }
        return Json(json!({format!("POWER{n}"): word(r[n - 1])}));
    }
    match cmd.as_str() {
        "STATE" => {
            let mut m = serde_json::Map::new();
            m.insert("Uptime".into(), json!("0T00:01:00"));
            for (i, on) in r.iter().enumerate() {
                m.insert(format!("POWER{}", i + 1), json!(word(*on)));
            }
            Json(Value::Object(m))
        }
        "STATUS" => {
            let names: Vec<String> = (1..=r.len()).map(|i| format!("Socket {i}")).collect();
            Json(json!({"Status": {"Module": 0, "FriendlyName": names, "Topic": "sim"}}))
        }
        _ => Json(json!({"Command": "Unknown"})),
    }
}

async fn shelly_rpc(
    State(sim): State<Sim>,
    Path(method): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut s = sim.relays.lock().unwrap();
    let status =
        |i: usize, on: bool| json!({"id": i, "output": on, "apower": if on { 40.0 } else { 0.0 }});
    let id = q.get("id").and_then(|v| v.parse::<usize>().ok());
    let not_found = || {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"code": -105, "message": format!("Argument 'id', value {} not found!", q.get("id").cloned().unwrap_or_default())})),
        )
            .into_response()
    };
    match method.as_str() {
        "Switch.Set" => match id {
            Some(i) if i < s.len() => {
                let was = s[i];
                s[i] = q.get("on").map(|v| v == "true").unwrap_or(was);
                Json(json!({"was_on": was})).into_response()
            }
            _ => not_found(),
        },
        "Switch.GetStatus" => match id {
            Some(i) if i < s.len() => Json(status(i, s[i])).into_response(),
            _ => not_found(),
        },
        "Shelly.GetStatus" => {
            let mut m = serde_json::Map::new();
            for (i, on) in s.iter().enumerate() {
                m.insert(format!("switch:{i}"), status(i, *on));
            }
            Json(Value::Object(m)).into_response()
        }
        "Shelly.GetConfig" => {
            let mut m = serde_json::Map::new();
            for i in 0..s.len() {
                m.insert(format!("switch:{i}"), json!({"id": i, "name": null}));
            }
            Json(Value::Object(m)).into_response()
        }
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"code": 404, "message": "No handler"})),
        )
            .into_response(),
    }
}

async fn serve(sim: Sim) -> String {
    let app = Router::new()
        .route("/cm", get(tasmota_cm))
        .route("/rpc/{method}", get(shelly_rpc))
        .with_state(sim);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn build(cfg: Value) -> Box<dyn PduDriver> {
    dutgate_pdu_http::build(yaml_serde::to_value(cfg).unwrap()).unwrap()
}

#[tokio::test]
async fn tasmota_over_http() {
    let sim = Sim {
        relays: Arc::new(Mutex::new(vec![false; 3])),
        password: Some("hunter22".into()),
        ..Default::default()
    };
    let url = serve(sim.clone()).await;
    let mut d = build(
        json!({"url": url, "device": "tasmota", "username": "admin", "password": "hunter22"}),
    );
    let ports = d.ports().await.unwrap();
    assert_eq!(ports.len(), 3);
    assert_eq!(ports[0].label.as_deref(), Some("Socket 1"));
    d.set("3", Switch::On).await.unwrap();
    assert!(sim.relays.lock().unwrap()[2]);
    assert_eq!(d.get("3").await.unwrap(), PowerState::On);
    assert!(
        sim.queries
            .lock()
            .unwrap()
            .iter()
            .any(|q| q.starts_with("cmnd=Power3%20On&user=admin")),
        "the documented /cm?cmnd=Power<n>%20On form: {:?}",
        sim.queries.lock().unwrap()
    );
    d.set("3", Switch::Off).await.unwrap();
    sim.relays.lock().unwrap()[0] = true;
    let all = d.get_all().await.unwrap();
    assert_eq!(
        all,
        vec![
            ("1".into(), PowerState::On),
            ("2".into(), PowerState::Off),
            ("3".into(), PowerState::Off)
        ]
    );
    assert_eq!(
        d.get("4").await.unwrap_err(),
        DriverError::no_such_port("4")
    );

    let mut wrong = build(
        json!({"url": url, "device": "tasmota", "ports": 3, "username": "admin", "password": "nope"}),
    );
    let e = wrong.get("1").await.unwrap_err();
    assert!(matches!(e, DriverError::Refused { .. }), "{e}");
}

#[tokio::test]
async fn shelly_gen2_over_http() {
    let sim = Sim {
        relays: Arc::new(Mutex::new(vec![false; 2])),
        ..Default::default()
    };
    let url = serve(sim.clone()).await;
    let mut d = build(json!({"url": url, "device": "shelly"}));
    let ports = d.ports().await.unwrap();
    assert_eq!(
        ports.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
        ["0", "1"]
    );
    d.set("0", Switch::On).await.unwrap();
    assert!(sim.relays.lock().unwrap()[0]);
    assert_eq!(d.get("0").await.unwrap(), PowerState::On);
    assert_eq!(d.power_w("0").await.unwrap(), Some(40.0));
    assert_eq!(
        d.get_all().await.unwrap(),
        vec![("0".into(), PowerState::On), ("1".into(), PowerState::Off)]
    );
    d.set("0", Switch::Off).await.unwrap();
    assert_eq!(d.get("0").await.unwrap(), PowerState::Off);

    let mut three = build(json!({"url": url, "device": "shelly", "ports": 3}));
    assert_eq!(
        three.get("2").await.unwrap_err(),
        DriverError::no_such_port("2")
    );
}

#[tokio::test]
async fn dead_and_hanging_devices_are_errors_within_the_timeout() {
    // Nothing listens: connection refused. A socket bound but never listening holds the port
    // for the whole test, so no other process can start listening on it meanwhile.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = reserved.local_addr().unwrap().port();
    let mut d = build(
        json!({"url": format!("http://127.0.0.1:{port}"), "device": "tasmota", "ports": 2, "timeout_ms": 500}),
    );
    let e = d.get("1").await.unwrap_err();
    assert!(matches!(e, DriverError::Unreachable { .. }), "{e}");
    assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    assert!(d.get_all().await.is_err(), "never OFF");

    // Accepts the connection and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hang.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            held.push(s);
        }
    });
    let mut d = build(
        json!({"url": format!("http://{addr}"), "device": "shelly", "ports": 1, "timeout_ms": 400}),
    );
    let start = Instant::now();
    let e = d.set("0", Switch::On).await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2), "bounded");
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
}

#[test]
fn bad_configs_name_the_field() {
    let b = |v: Value| {
        dutgate_pdu_http::build(yaml_serde::to_value(v).unwrap())
            .err()
            .unwrap()
    };
    assert_eq!(
        b(json!({"url": "not a url", "device": "shelly"}))
            .field
            .as_deref(),
        Some("url")
    );
    assert_eq!(
        b(json!({"url": "ftp://x", "device": "shelly"}))
            .field
            .as_deref(),
        Some("url")
    );
    assert_eq!(
        b(json!({"url": "http://x", "device": "shelly", "password": "p"}))
            .field
            .as_deref(),
        Some("username")
    );
    assert_eq!(
        b(json!({"url": "http://x", "device": "sonoff"}))
            .field
            .as_deref(),
        Some("device")
    );
}
