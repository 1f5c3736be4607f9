//! The service end to end over HTTP, with the in-memory `dummy` driver: acceptance points
//! 3–6 of the pdu issue, persistence of PDUs added over REST, timeouts, auth.

mod common;

use std::time::Duration;

use common::*;
use dutgate_core::PowerState;
use dutgate_pdu::service::NewPdu;
use dutgate_pdu::{PortPatch, PowerError};
use dutgate_pdu_driver::Switch;
use dutgate_pdu_dummy as dummy;
use reqwest::StatusCode;

fn new_pdu(name: &str, driver: &str, config: serde_json::Value) -> NewPdu {
    NewPdu {
        name: name.into(),
        driver: driver.into(),
        config,
        reserved: vec![],
        labels: Default::default(),
        poll_interval_seconds: None,
    }
}

#[tokio::test]
async fn reserved_ports_refuse_changes_with_409() {
    let (db, _dir) = sqlite().await;
    let mut cfg = fast_config();
    cfg.pdus = pdus(
        "rack: {driver: dummy, config: {ports: [gw, dut1, dut2], device: reserved-test}, reserved: ['1'], labels: {'2': web}}",
    );
    let r = start(&db, cfg).await;
    let c = admin(&r);
    eventually(Duration::from_secs(5), "first poll", || async {
        let p = c.ports("rack").await.unwrap();
        !p.is_empty() && p.iter().all(|p| p.state != PowerState::Unknown)
    })
    .await;
    let ports = c.ports("rack").await.unwrap();
    assert!(ports[0].reserved && !ports[1].reserved);
    assert_eq!(ports[0].label.as_deref(), Some("gw"));
    assert_eq!(
        ports[1].label.as_deref(),
        Some("web"),
        "config label wins over the device's"
    );

    let e = c.set("rack", "1", Switch::On).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::CONFLICT), "{e}");
    let e = c
        .cycle("rack", "1", Some(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::CONFLICT), "{e}");
    let dev = dummy::device("reserved-test").unwrap();
    assert_eq!(
        dev.stats().sets,
        0,
        "a reserved port must never be switched"
    );

    // Reserving over REST works the same way, and is persisted.
    let res = c
        .patch(
            "rack",
            "2",
            &PortPatch {
                reserved: Some(true),
                label: Some("db".into()),
                state: None,
            },
        )
        .await
        .unwrap();
    assert!(res.port.reserved);
    assert_eq!(res.port.label.as_deref(), Some("db"));
    let e = c.set("rack", "2", Switch::On).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::CONFLICT));
    // Unreserving and switching in one request.
    let res = c
        .patch(
            "rack",
            "1",
            &PortPatch {
                reserved: Some(false),
                state: Some(Switch::On),
                label: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(res.port.state, PowerState::On);
    assert_eq!(dev.state("1"), Some(PowerState::On));

    // Bad query strings are JSON errors too.
    let resp = reqwest::get(format!(
        "{}/api/v1/pdus/rack/ports/1/history?limit=lots",
        r.url()
    ))
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["field"], "limit", "{body}");

    // Mutations need the admin token; reads do not.
    let e = anonymous(&r)
        .set("rack", "3", Switch::On)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(anonymous(&r).ports("rack").await.unwrap().len(), 3);
    r.stop().await;

    let r = start(&db, {
        let mut c = fast_config();
        c.pdus = pdus(
            "rack: {driver: dummy, config: {ports: 3, device: reserved-test}, reserved: ['1']}",
        );
        c
    })
    .await;
    admin(&r).set("rack", "3", Switch::On).await.unwrap();
    let p2 = admin(&r).port("rack", "2").await.unwrap();
    assert!(p2.reserved, "reservation made over REST survives a restart");
    assert_eq!(p2.label.as_deref(), Some("db"));
    assert!(
        !admin(&r).port("rack", "1").await.unwrap().reserved,
        "REST unreserve overrides the config"
    );
    r.stop().await;
    dummy::forget("reserved-test");
}

#[tokio::test]
async fn cycle_verifies_off_for_the_whole_delay_and_reports_a_port_that_comes_back() {
    let (db, _dir) = sqlite().await;
    let mut cfg = fast_config();
    cfg.pdus = pdus(
        "p: {driver: dummy, config: {ports: 2, device: cycle-test, initial: ON, faults: {flip_on_after_ms: {'2': 300}}}}",
    );
    let r = start(&db, cfg).await;
    let c = admin(&r);
    let dev = dummy::device("cycle-test").unwrap();
    eventually(Duration::from_secs(5), "first poll", || async {
        c.port("p", "1")
            .await
            .map(|p| p.state == PowerState::On)
            .unwrap_or(false)
    })
    .await;

    let report = c
        .cycle("p", "1", Some(Duration::from_millis(400)))
        .await
        .unwrap();
    assert_eq!(report.port.state, PowerState::On);
    assert!(report.off_checks >= 3, "OFF verified all along: {report:?}");
    let log = dev.stats().set_log;
    assert_eq!(
        log,
        vec![
            ("1".to_string(), Switch::Off),
            ("1".to_string(), Switch::On)
        ]
    );
    let h = c.history("p", "1", 10).await.unwrap();
    let states: Vec<_> = h.iter().map(|e| (e.state, e.event.as_str())).collect();
    assert!(states.contains(&(PowerState::Off, "cycle")), "{states:?}");
    assert_eq!(h.last().unwrap().event, "cycle");

    // Port 2 turns itself back on 300 ms into a 1 s off delay.
    let e = c
        .cycle("p", "2", Some(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::BAD_GATEWAY), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("seen ON") && msg.contains("off delay"),
        "{msg}"
    );
    let h = c.history("p", "2", 10).await.unwrap();
    let failed = h
        .iter()
        .find(|e| e.event == "cycle_failed")
        .expect("failure recorded");
    assert!(failed.detail.as_deref().unwrap().contains("seen ON"));
    let port = c.port("p", "2").await.unwrap();
    assert!(port.last_error.as_deref().unwrap().contains("seen ON"));
    // The cycle must not have gone on to switch the port ON; it was put back OFF.
    let log: Vec<_> = dev
        .stats()
        .set_log
        .into_iter()
        .filter(|(p, _)| p == "2")
        .collect();
    assert_eq!(
        log,
        vec![
            ("2".to_string(), Switch::Off),
            ("2".to_string(), Switch::Off)
        ]
    );
    let metrics = reqwest::get(format!("{}/metrics", r.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dutgate_pdu_cycles_total") && l.contains("came_back_on")),
        "{metrics}"
    );
    r.stop().await;
    dummy::forget("cycle-test");
}

#[tokio::test]
async fn fifty_concurrent_requests_are_serialised_and_none_is_lost() {
    let (db, _dir) = sqlite().await;
    let mut cfg = fast_config();
    cfg.pdus =
        pdus("p: {driver: dummy, config: {ports: 4, device: concurrency-test, latency_ms: 2}}");
    let r = start(&db, cfg).await;
    let c = admin(&r);
    eventually(Duration::from_secs(5), "first poll", || async {
        c.ports("p")
            .await
            .map(|p| !p.is_empty() && p.iter().all(|p| p.state == PowerState::Off))
            .unwrap_or(false)
    })
    .await;
    let dev = dummy::device("concurrency-test").unwrap();
    let sets_before = dev.stats().sets;

    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let c = c.clone();
        let port = ((i % 4) + 1).to_string();
        tasks.push(tokio::spawn(async move {
            // Every fifth request is a cycle, the others alternate ON/OFF in a scrambled way.
            if i % 5 == 0 {
                let rep = c
                    .cycle("p", &port, Some(Duration::from_millis(30)))
                    .await
                    .unwrap();
                (port, rep.op_seq, PowerState::On, 2u64)
            } else {
                let want = if (i * 7) % 3 == 0 {
                    Switch::On
                } else {
                    Switch::Off
                };
                let res = c.set("p", &port, want).await.unwrap();
                assert_eq!(
                    res.port.state,
                    want.as_state(),
                    "read-back state in the answer"
                );
                (port, res.op_seq, want.as_state(), 1u64)
            }
        }));
    }
    let results: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let mut seqs: Vec<u64> = results.iter().map(|r| r.1).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        50,
        "every operation got its own place in the order"
    );
    let expected_sets: u64 = results.iter().map(|r| r.3).sum();
    assert_eq!(
        dev.stats().sets - sets_before,
        expected_sets,
        "no command lost or doubled"
    );
    assert_eq!(
        dev.max_in_flight(),
        1,
        "the device never saw two requests at once"
    );
    for port in ["1", "2", "3", "4"] {
        let last = results
            .iter()
            .filter(|r| r.0 == port)
            .max_by_key(|r| r.1)
            .unwrap();
        assert_eq!(
            dev.state(port),
            Some(last.2),
            "port {port} ends as its last command said"
        );
        assert_eq!(c.port("p", port).await.unwrap().state, last.2);
    }
    r.stop().await;
    dummy::forget("concurrency-test");
}

#[tokio::test]
async fn add_validates_config_and_device_then_persists() {
    let (db, _dir) = sqlite().await;
    let mut cfg = fast_config();
    cfg.pdus = pdus("fixed: {driver: dummy, config: {ports: 1}}");
    let r = start(&db, cfg.clone()).await;
    let c = admin(&r);

    let e = c
        .add(&new_pdu(
            "bad",
            "dummy",
            serde_json::json!({"ports": "many"}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    let dutgate_core::client::ClientError::Api { body, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(body.field.as_deref(), Some("config.ports"), "{body:?}");

    let e = c
        .add(&new_pdu(
            "bad",
            "dummy",
            serde_json::json!({"ports": 2, "latncy_ms": 3}),
        ))
        .await
        .unwrap_err();
    let dutgate_core::client::ClientError::Api { body, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(body.field.as_deref(), Some("config.latncy_ms"), "{body:?}");

    let e = c
        .add(&new_pdu("bad", "nope", serde_json::json!({})))
        .await
        .unwrap_err();
    let dutgate_core::client::ClientError::Api { status, body, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(
        (*status, body.field.as_deref()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("driver"))
    );
    assert!(
        body.error.contains("dummy"),
        "lists the known drivers: {}",
        body.error
    );

    let e = c
        .add(&NewPdu {
            poll_interval_seconds: Some(-1.0),
            ..new_pdu("bad", "dummy", serde_json::json!({"ports": 1}))
        })
        .await
        .unwrap_err();
    let dutgate_core::client::ClientError::Api { body, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(body.field.as_deref(), Some("poll_interval_seconds"));

    let e = c
        .add(&new_pdu(
            "bad name",
            "dummy",
            serde_json::json!({"ports": 1}),
        ))
        .await
        .unwrap_err();
    let dutgate_core::client::ClientError::Api { body, .. } = &e else {
        panic!("{e}")
    };
    assert_eq!(body.field.as_deref(), Some("name"));

    let e = c
        .add(&new_pdu(
            "gone",
            "dummy",
            serde_json::json!({"ports": 2, "faults": {"unreachable": true}}),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    assert!(
        e.to_string().contains("cannot talk to the device") && e.to_string().contains("unplugged"),
        "{e}"
    );

    let e = c
        .add(&new_pdu("fixed", "dummy", serde_json::json!({"ports": 1})))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::CONFLICT));

    let added = c
        .add(&NewPdu {
            reserved: vec!["2".into()],
            ..new_pdu(
                "extra",
                "dummy",
                serde_json::json!({"ports": ["a", "b"], "device": "add-test", "initial": "ON"}),
            )
        })
        .await
        .unwrap();
    assert_eq!(added.ports.len(), 2);
    assert_eq!(
        added.ports[0].state,
        PowerState::On,
        "state read before answering"
    );
    assert!(c.pdus().await.unwrap().iter().any(|p| p.name == "extra"));
    let e = anonymous(&r).remove("extra").await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED));
    r.stop().await;

    let r = start(&db, cfg.clone()).await;
    let c = admin(&r);
    let pdu = c.pdu("extra").await.expect("persisted PDU restarted");
    assert_eq!(pdu.info.source, dutgate_pdu::pdu::Source::Api);
    let e = c.remove("fixed").await.unwrap_err();
    assert_eq!(
        e.status(),
        Some(StatusCode::CONFLICT),
        "config PDUs are removed in the config"
    );
    c.remove("extra").await.unwrap();
    assert_eq!(
        c.pdu("extra").await.unwrap_err().status(),
        Some(StatusCode::NOT_FOUND)
    );
    r.stop().await;
    let r = start(&db, cfg).await;
    assert!(
        admin(&r).pdu("extra").await.is_err(),
        "removal is persisted"
    );
    r.stop().await;
    dummy::forget("add-test");
}

#[tokio::test]
async fn hanging_device_times_out_and_unknown_is_never_off() {
    let (db, _dir) = sqlite().await;
    let mut cfg = fast_config();
    cfg.operation_timeout_seconds = 0.3;
    cfg.pdus = pdus("p: {driver: dummy, config: {ports: 2, device: hang-test}}");
    let r = start(&db, cfg).await;
    let c = admin(&r);
    eventually(Duration::from_secs(5), "first poll", || async {
        c.port("p", "1")
            .await
            .map(|p| p.state == PowerState::Off)
            .unwrap_or(false)
    })
    .await;
    let dev = dummy::device("hang-test").unwrap();
    dev.set_faults(dummy::Faults {
        hang_ports: vec!["1".into()],
        ..Default::default()
    });
    let start = std::time::Instant::now();
    let e = c.set("p", "1", Switch::On).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::GATEWAY_TIMEOUT), "{e}");
    assert!(e.to_string().contains("no answer within"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "bounded by the op timeout and retries"
    );

    // A device that stops answering: its ports become UNKNOWN, not OFF.
    dev.set_faults(dummy::Faults {
        unreachable: true,
        ..Default::default()
    });
    eventually(Duration::from_secs(5), "ports UNKNOWN", || async {
        let p = c.ports("p").await.unwrap();
        !p.is_empty() && p.iter().all(|p| p.state == PowerState::Unknown)
    })
    .await;
    let info = c.pdus().await.unwrap();
    assert!(info[0].error.as_deref().unwrap().contains("unplugged"));
    // A cycle cannot be verified on a PDU that does not answer.
    let e = c.cycle("p", "2", Some(Duration::ZERO)).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::BAD_GATEWAY), "{e}");
    r.stop().await;
    dummy::forget("hang-test");
}

#[test]
fn unknown_is_not_off_in_errors() {
    // The cycle's failure kinds are distinct errors, so an UNKNOWN read can never be taken
    // for a successful OFF check.
    let e = PowerError::Unverified {
        pdu: "p".into(),
        port: "1".into(),
        after: Duration::from_millis(1500),
        reason: "the port reads UNKNOWN".into(),
    };
    assert!(
        e.to_string()
            .contains("could not verify OFF 1.5 s into the off delay")
    );
}
