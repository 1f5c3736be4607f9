//! The `command` driver against a "device" made of files and shell commands.

use std::time::{Duration, Instant};

use dutgate_pdu_driver::{DriverError, PduDriver, PowerState, Switch};
use serde_json::json;

fn build(v: serde_json::Value) -> Box<dyn PduDriver> {
    dutgate_pdu_command::build(yaml_serde::to_value(v).unwrap()).unwrap()
}

#[tokio::test]
async fn switches_reads_back_and_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let mut pdu = build(json!({
        "ports": ["bench", "rig"],
        "on": format!("echo on > {d}/{{port}}"),
        "off": format!("echo off > {d}/$PDU_PORT"),
        "status": format!("cat {d}/{{port}} 2>/dev/null || echo off"),
        "status_all": format!("for p in 1 2; do printf '%s %s\\n' $p $(cat {d}/$p 2>/dev/null || echo off); done"),
    }));
    let ports = pdu.ports().await.unwrap();
    assert_eq!(ports[1].label.as_deref(), Some("rig"));
    assert_eq!(pdu.get("1").await.unwrap(), PowerState::Off);
    pdu.set("1", Switch::On).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("1"))
            .unwrap()
            .trim(),
        "on"
    );
    assert_eq!(pdu.get("1").await.unwrap(), PowerState::On);
    assert_eq!(
        pdu.get_all().await.unwrap(),
        vec![("1".into(), PowerState::On), ("2".into(), PowerState::Off)]
    );
    pdu.set("1", Switch::Off).await.unwrap();
    assert_eq!(pdu.get("1").await.unwrap(), PowerState::Off);
    assert_eq!(
        pdu.get("3").await.unwrap_err(),
        DriverError::no_such_port("3")
    );

    let mut broken = build(json!({
        "ports": 1, "on": "echo relay jammed >&2; exit 3", "off": "true",
        "status": "echo maybe", "timeout_ms": 300,
    }));
    let e = broken.set("1", Switch::On).await.unwrap_err();
    assert!(
        matches!(e, DriverError::Refused { .. }) && e.to_string().contains("relay jammed"),
        "{e}"
    );
    assert_eq!(
        broken.get("1").await.unwrap(),
        PowerState::Unknown,
        "unparseable is UNKNOWN, not OFF"
    );

    let mut hung = build(
        json!({"ports": 1, "on": "sleep 30", "off": "true", "status": "sleep 30", "timeout_ms": 300}),
    );
    let start = Instant::now();
    let e = hung.get("1").await.unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn bad_configs_name_the_field() {
    let b = |v: serde_json::Value| {
        dutgate_pdu_command::build(yaml_serde::to_value(v).unwrap())
            .err()
            .unwrap()
    };
    assert_eq!(
        b(json!({"ports": 1, "on": "x", "off": "y"}))
            .field
            .as_deref(),
        Some("status")
    );
    assert_eq!(
        b(json!({"ports": 1, "on": "", "off": "y", "status": "z"}))
            .field
            .as_deref(),
        Some("on")
    );
    assert_eq!(
        b(json!({"ports": 1, "on": "x", "off": "y", "status": "z", "status_off": ["on"]}))
            .field
            .as_deref(),
        Some("status_off")
    );
}
