//! The service with real devices behind it: an SNMP PDU served by net-snmp `snmpd` is added
//! over REST, switched and power-cycled with read-back; an unreachable agent is refused with
//! 422 and the reason.

mod common;
#[path = "../../../pdu-drivers/snmp/tests/common/mod.rs"]
mod snmp_agent;

use std::time::Duration;

use common::*;
use dutgate_core::PowerState;
use dutgate_pdu::service::NewPdu;
use dutgate_pdu_driver::Switch;
use reqwest::StatusCode;

#[tokio::test]
async fn snmp_pdu_over_rest_with_read_back_and_unreachable_agent_refused() {
    let agent = snmp_agent::Agent::start(8);
    let (db, _dir) = sqlite().await;
    let r = start(&db, fast_config()).await;
    let c = admin(&r);

    // A port where no agent listens: 422 naming the reason, within the timeout.
    let (_reserved, dead) = snmp_agent::unreachable_udp_port();
    let start_t = std::time::Instant::now();
    let e = c
        .add(&NewPdu {
            name: "ghost".into(),
            driver: "apc_rpdu2".into(),
            config: serde_json::json!({"host": "127.0.0.1", "port": dead, "timeout_ms": 300}),
            reserved: vec![],
            labels: Default::default(),
            poll_interval_seconds: None,
        })
        .await
        .unwrap_err();
    let dutgate_core::client::ClientError::Api { status, body, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(*status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body.error.contains("cannot talk to the device") && body.error.contains(&dead.to_string()),
        "{}",
        body.error
    );
    assert!(start_t.elapsed() < Duration::from_secs(10));

    // A wrong community: same, with the hint.
    let e = c
        .add(&NewPdu {
            name: "wrongcomm".into(),
            driver: "apc_rpdu2".into(),
            config: serde_json::json!({"host": "127.0.0.1", "port": agent.port, "community": "nope", "timeout_ms": 300}),
            reserved: vec![],
            labels: Default::default(),
            poll_interval_seconds: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    assert!(e.to_string().contains("wrong community"), "{e}");

    // A bad field in the driver config: 422 naming it.
    let e = c
        .add(&NewPdu {
            name: "typo".into(),
            driver: "apc_rpdu2".into(),
            config: serde_json::json!({"host": "127.0.0.1", "port": agent.port, "versoin": "v2c"}),
            reserved: vec![],
            labels: Default::default(),
            poll_interval_seconds: None,
        })
        .await
        .unwrap_err();
    let dutgate_core::client::ClientError::Api { body, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(body.field.as_deref(), Some("config.versoin"));

    let pdu = c
        .add(&NewPdu {
            name: "rack-a".into(),
            driver: "apc_rpdu2".into(),
            config: serde_json::json!({"host": "127.0.0.1", "port": agent.port, "community": "private"}),
            reserved: vec!["8".into()],
            labels: Default::default(),
            poll_interval_seconds: Some(0.3),
        })
        .await
        .unwrap();
    assert_eq!(pdu.ports.len(), 8);
    assert_eq!(pdu.ports[0].label.as_deref(), Some("Outlet 1"));
    assert!(pdu.ports.iter().all(|p| p.state == PowerState::Off));
    assert_eq!(
        pdu.info.config["community"], "********",
        "secrets are masked"
    );

    let res = c.set("rack-a", "3", Switch::On).await.unwrap();
    assert_eq!(res.port.state, PowerState::On);
    assert!(agent.outlet("apc_rpdu2", 3));
    let rep = c
        .cycle("rack-a", "3", Some(Duration::from_millis(600)))
        .await
        .unwrap();
    assert_eq!(rep.port.state, PowerState::On);
    assert!(rep.off_checks >= 2);
    let sets = agent.set_log("apc_rpdu2");
    assert_eq!(
        sets,
        vec!["3 1", "3 2", "3 1"],
        "on, then the cycle's off and on"
    );
    assert_eq!(
        c.set("rack-a", "8", Switch::On).await.unwrap_err().status(),
        Some(StatusCode::CONFLICT)
    );

    // A change made behind the service's back shows up through polling.
    std::process::Command::new("snmpset")
        .args([
            "-v2c",
            "-c",
            "private",
            &format!("127.0.0.1:{}", agent.port),
            ".1.3.6.1.4.1.318.1.1.12.3.3.1.1.4.5",
            "i",
            "1",
        ])
        .output()
        .expect("snmpset (Debian package snmp)");
    eventually(Duration::from_secs(5), "poll sees port 5 ON", || async {
        c.port("rack-a", "5").await.unwrap().state == PowerState::On
    })
    .await;
    let h = c.history("rack-a", "5", 10).await.unwrap();
    assert_eq!(h.last().unwrap().event, "poll");
    assert_eq!(h.last().unwrap().state, PowerState::On);
    r.stop().await;
}
