//! Acceptance point 1: every SNMP driver against net-snmp snmpd (pass_persist PDU that
//! remembers SETs): switch ports, read them back; wrong community, read-only community and
//! unreachable agents give clear errors within the timeout, never OFF.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, V3_AUTH, V3_PRIV, V3_USER};
use dutgate_pdu_driver::{DriverError, PduDriver, PowerState, Switch};

fn driver(name: &str, config: serde_json::Value) -> Box<dyn PduDriver> {
    let factory = dutgate_pdu_snmp::factories()
        .into_iter()
        .find(|f| f.name == name)
        .unwrap();
    factory
        .build(yaml_serde_value(config))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn yaml_serde_value(v: serde_json::Value) -> yaml_serde::Value {
    yaml_serde::to_value(v).unwrap()
}

async fn exercise(agent: &Agent, model: &str, mut d: Box<dyn PduDriver>) {
    let ports = d
        .ports()
        .await
        .unwrap_or_else(|e| panic!("{model}: {e}\n{}", agent.log()));
    assert_eq!(ports.len(), 6, "{model}");
    assert_eq!(ports[2].id, "3");
    assert_eq!(ports[2].label.as_deref(), Some("Outlet 3"));
    for (n, want) in [(2usize, Switch::On), (5, Switch::On), (2, Switch::Off)] {
        d.set(&n.to_string(), want)
            .await
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        assert_eq!(
            d.get(&n.to_string()).await.unwrap(),
            want.as_state(),
            "{model} port {n}"
        );
        assert_eq!(
            agent.outlet(model, n),
            want == Switch::On,
            "{model}: the agent itself agrees"
        );
    }
    let all = d.get_all().await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[1], ("2".to_string(), PowerState::Off));
    assert_eq!(all[4], ("5".to_string(), PowerState::On));
    assert_eq!(all[0], ("1".to_string(), PowerState::Off));
    let e = d.get("9").await.unwrap_err();
    assert_eq!(e, DriverError::no_such_port("9"), "{model}");
    d.shutdown().await;
}

fn base(agent: &Agent) -> serde_json::Value {
    serde_json::json!({"host": "127.0.0.1", "port": agent.port, "timeout_ms": 1500})
}

fn with(mut v: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[tokio::test]
async fn every_model_switches_and_reads_back_over_v2c() {
    let agent = Agent::start(6);
    for model in common::MODELS {
        exercise(&agent, model, driver(model, base(&agent))).await;
    }
}

#[tokio::test]
async fn generic_driver_with_configured_oids_and_values() {
    let agent = Agent::start(6);
    // The CyberPower RMCARD tables spelled out: separate control table, different values.
    let cfg = with(
        base(&agent),
        serde_json::json!({
            "names_oid": ".1.3.6.1.4.1.3808.1.1.5.6.3.1.2",
            "status_oid": "1.3.6.1.4.1.3808.1.1.5.6.3.1.3",
            "control_oid": "1.3.6.1.4.1.3808.1.1.5.6.5.1.3",
            "on_value": 2, "off_value": 3, "status_on": [1], "status_off": [2],
        }),
    );
    exercise(
        &agent,
        "cyberpower_pdu15swhviec12atnet",
        driver("snmp", cfg),
    )
    .await;
    // Without its tables the generic driver refuses to build, naming the field.
    let f = dutgate_pdu_snmp::factories()
        .into_iter()
        .find(|f| f.name == "snmp")
        .unwrap();
    let e = f.build(yaml_serde_value(base(&agent))).err().unwrap();
    assert_eq!(e.field.as_deref(), Some("names_oid"), "{e}");
}

#[tokio::test]
async fn v1_and_v3_sessions() {
    let agent = Agent::start(6);
    let v1 = with(base(&agent), serde_json::json!({"version": "v1"}));
    exercise(&agent, "apc_masterswitch", driver("apc_masterswitch", v1)).await;
    let v3 = with(
        base(&agent),
        serde_json::json!({"version": "v3", "v3": {
            "user": V3_USER, "auth_protocol": "sha1", "auth_password": V3_AUTH,
            "priv_protocol": "aes128", "priv_password": V3_PRIV}}),
    );
    exercise(&agent, "apc_rpdu2", driver("apc_rpdu2", v3)).await;

    let bad = with(
        base(&agent),
        serde_json::json!({"version": "v3", "timeout_ms": 500, "v3": {
            "user": V3_USER, "auth_protocol": "sha1", "auth_password": "not-the-password",
            "priv_protocol": "aes128", "priv_password": V3_PRIV}}),
    );
    let mut d = driver("apc_rpdu2", bad);
    let start = Instant::now();
    let e = d.get_all().await.unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3), "bounded: {e}");
    assert!(
        matches!(e, DriverError::Refused { .. } | DriverError::Timeout { .. }),
        "wrong v3 password is an error, never OFF: {e}"
    );
}

#[tokio::test]
async fn wrong_community_unreachable_agent_and_read_only_community() {
    let agent = Agent::start(4);
    // Agents drop requests with an unknown community: a timeout, with a hint.
    let cfg = with(
        base(&agent),
        serde_json::json!({"community": "wrong", "timeout_ms": 400}),
    );
    let mut d = driver("apc_rpdu2", cfg);
    for attempt in 0..2 {
        let start = Instant::now();
        let e = d.get("1").await.unwrap_err();
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "attempt {attempt} took {took:?}"
        );
        assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("wrong community"), "{e}");
    }
    assert!(
        d.get_all().await.is_err(),
        "a walk with a wrong community is an error, not OFF"
    );

    // The read-only community can read but its SET is refused by the agent (noAccess).
    let ro = with(base(&agent), serde_json::json!({"community": "public"}));
    let mut d = driver("apc_rpdu2", ro);
    assert_eq!(d.get("1").await.unwrap(), PowerState::Off);
    let e = d.set("1", Switch::On).await.unwrap_err();
    assert!(matches!(e, DriverError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("noAccess"), "{e}");
    assert!(!e.is_transient());
    assert!(!agent.outlet("apc_rpdu2", 1));

    // Nothing listening: ICMP port unreachable comes back at once on loopback.
    let (_reserved, dead_port) = common::unreachable_udp_port();
    let cfg = serde_json::json!({"host": "127.0.0.1", "port": dead_port, "timeout_ms": 500});
    let mut d = driver("apc_masterswitch", cfg);
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
    // A host that does not exist on the network: a timeout, bounded.
    let cfg = serde_json::json!({"host": "192.0.2.1", "port": 161, "timeout_ms": 300});
    let mut d = driver("apc_masterswitch", cfg);
    let start = Instant::now();
    assert!(d.ports().await.is_err());
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn bad_configs_name_the_field() {
    let f = |name: &str| {
        dutgate_pdu_snmp::factories()
            .into_iter()
            .find(|f| f.name == name)
            .unwrap()
    };
    let cases = [
        (serde_json::json!({"port": 161}), "host"),
        (serde_json::json!({"host": "h", "version": "v4"}), "version"),
        (
            serde_json::json!({"host": "h", "comunity": "x"}),
            "comunity",
        ),
        (serde_json::json!({"host": "h", "version": "v3"}), "v3"),
        (
            serde_json::json!({"host": "h", "status_oid": "1.3.x"}),
            "status_oid",
        ),
        (
            serde_json::json!({"host": "h", "version": "v3", "v3": {"user": "u", "auth_password": "short"}}),
            "v3.auth_password",
        ),
        (
            serde_json::json!({"host": "h", "version": "v3", "v3": {"user": "u", "auth_password": "longenough", "priv_protocol": "aes128"}}),
            "v3.priv_password",
        ),
    ];
    for (cfg, field) in cases {
        let e = f("apc_masterswitch")
            .build(yaml_serde_value(cfg.clone()))
            .err()
            .unwrap();
        assert_eq!(e.field.as_deref(), Some(field), "{cfg}: {e}");
    }
}

#[tokio::test]
async fn a_late_reply_is_never_taken_for_the_next_answer() {
    let agent = Agent::start(8);
    let cfg = with(base(&agent), serde_json::json!({"timeout_ms": 300}));
    let mut d = driver("apc_masterswitch", cfg);
    d.set("1", Switch::On).await.unwrap();
    // Outlet 7 answers after 450 ms: the GET times out, and its reply arrives while the
    // next request (outlet 1, ON) waits behind it in the single-threaded agent.
    agent.slow(7, 450);
    let e = d.get("7").await.unwrap_err();
    assert!(matches!(e, DriverError::Timeout { .. }), "{e}");
    assert_eq!(
        d.get("1").await.unwrap(),
        PowerState::On,
        "the answer for outlet 1, not 7's late OFF"
    );
    assert_eq!(d.get("2").await.unwrap(), PowerState::Off);
}
