//! Registration, discovery, admin routes and validation through the real HTTP API.

mod common;

use std::time::Duration;

use common::*;
use dutgate_core::PowerState;
use dutgate_core::db::testing::databases;
use dutgate_mars::model::{
    ActivateRequest, DiscoverRequest, MachinePatch, MachineState, RetireRequest,
};
use dutgate_mars::store::MIGRATIONS;
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn post_raw(
    t: &TestMars,
    path: &str,
    body: &Value,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let mut rb = reqwest::Client::new()
        .post(format!("{}{path}", t.url))
        .timeout(Duration::from_secs(10))
        .json(body);
    if let Some(tok) = token {
        rb = rb.bearer_auth(tok);
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, v)
}

/// valve-infra's registration client (`machine_registration.py register`, in valve-infra's
/// tree and its container image, in no package registry) replayed request for request: it
/// POSTs its probe to `/api/v1/machine/` with python-requests, PATCHes
/// `/api/v1/machine/<mac>/` when that answers 400, and prints "MaRS: Registration complete"
/// only on a 200, else "Registration failed". Its `check` then GETs
/// `/api/v1/machine/<mac>/` and compares `base_name`, `tags` (as a set), `mac_address` and
/// `ip_address`, types included.
#[tokio::test]
async fn valve_infras_registration_client_gets_the_answers_it_expects() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .user_agent("python-requests/2.25.1")
            .build()
            .unwrap();
        // `to_machine_registration_request()`: netifaces' lower-case MAC, the tty device
        // without /dev/ (null when it found none).
        let probe = |tty: Value| {
            json!({
                "base_name": "gfx1036",
                "tags": ["amdgpu:gfxversion:gfx10", "amdgpu:family:NV"],
                "mac_address": "52:54:00:00:00:21",
                "ip_address": "127.0.0.1",
                "local_tty_device": tty,
            })
        };
        // What `register` does with the answers, as it does it.
        let register = |params: Value| {
            let http = http.clone();
            let url = t.url.clone();
            async move {
                let r = http
                    .post(format!("{url}/api/v1/machine/"))
                    .json(&params)
                    .send()
                    .await
                    .unwrap();
                let r = if r.status() == StatusCode::BAD_REQUEST {
                    let mac = params["mac_address"].as_str().unwrap();
                    http.patch(format!("{url}/api/v1/machine/{mac}/"))
                        .json(&params)
                        .send()
                        .await
                        .unwrap()
                } else {
                    r
                };
                let status = r.status();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            }
        };
        // A new machine, then the same one again (the next boot): 200 both times.
        let (status, v) = register(probe(json!("ttyUSB0"))).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "Registration failed on a new machine: {v}"
        );
        assert_eq!(v["state"], "WAIT_FOR_CONFIG", "{v}");
        let (status, v) = register(probe(Value::Null)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "Registration failed on a known machine: {v}"
        );
        // `check`: what mars recorded is what the machine probes.
        let r = http
            .get(format!("{}/api/v1/machine/52:54:00:00:00:21/", t.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let stored: Value = r.json().await.unwrap();
        let local = probe(Value::Null);
        for key in ["base_name", "mac_address", "ip_address"] {
            assert_eq!(stored[key], local[key], "Mismatch for '{key}': {stored}");
        }
        let set = |v: &Value| -> std::collections::BTreeSet<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(set(&stored["tags"]), set(&local["tags"]), "{stored}");
        // dutgate's own path keeps its answers: 201 for a new machine, 200 for a known one.
        let mut other = probe(json!("ttyUSB1"));
        other["mac_address"] = json!("52:54:00:00:00:22");
        let (status, v) = post_raw(&t, "/api/v1/machine", &other, None).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let (status, v) = post_raw(&t, "/api/v1/machine", &other, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        // A probe mars refuses (no IPv4 address) is a 400; the client's PATCH then needs
        // the admin token it does not have: "Registration failed", nothing stored.
        let mut bad = probe(Value::Null);
        bad["mac_address"] = json!("52:54:00:00:00:23");
        bad["ip_address"] = Value::Null;
        let (status, _) = register(bad).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(t.admin.machines().await.unwrap().len(), 2);
        t.stop().await;
    }
}

#[tokio::test]
async fn new_mac_waits_for_config_and_a_second_registration_updates() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        // Registered with the address it registers from (the test client's): later
        // registrations from there update it.
        let mut first = registration(1);
        first.ip_address = "127.0.0.1".parse().unwrap();
        let body = serde_json::to_value(&first).unwrap();
        // dutgate's path: 201 for a new machine (valve-infra's, with the slash: 200 below).
        let (status, v) = post_raw(&t, "/api/v1/machine", &body, None).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(v["state"], "WAIT_FOR_CONFIG");
        assert_eq!(v["full_name"], "farm-virtio-1");
        assert_eq!(v["mac_address"], "52:54:00:00:00:01");
        assert_eq!(v["local_tty_device"], "ttyS0");
        // Same MAC again, other tty, spelled in upper case with dashes.
        let mut again = body.clone();
        again["mac_address"] = json!("52-54-00-00-00-01");
        again["local_tty_device"] = json!("/dev/ttyUSB3");
        let (status, v) = post_raw(&t, "/api/v1/machine", &again, None).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["ip_address"], "127.0.0.1");
        assert_eq!(v["local_tty_device"], "ttyUSB3");
        assert_eq!(v["full_name"], "farm-virtio-1");
        let all = t.admin.machines().await.unwrap();
        assert_eq!(all.len(), 1, "a second registration must not duplicate");
        // Full names are stable and per base name.
        let m2 = t.anon.register(&registration(2)).await.unwrap();
        assert_eq!(m2.full_name, "farm-virtio-2");
        let mut other = registration(3);
        other.base_name = "gfx9".into();
        assert_eq!(
            t.anon.register(&other).await.unwrap().full_name,
            "farm-gfx9-1"
        );
        // Re-registering machine 1 keeps its name even after others exist.
        assert_eq!(
            t.anon.register(&first).await.unwrap().full_name,
            "farm-virtio-1"
        );
        // Events say who and why.
        let ev = t.admin.machine_events(m2.id, None).await.unwrap().events;
        assert_eq!(ev[0].kind, "registered");
        assert_eq!(ev[0].actor, "registration");
        assert!(ev[0].reason.contains("10.0.2.12"), "{}", ev[0].reason);
        t.stop().await;
    }
}

#[tokio::test]
async fn discovery_binds_the_next_unknown_machine_and_delete_powers_off() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        let req = DiscoverRequest {
            pdu: "pdu1".into(),
            port_id: "7".into(),
            timeout: Some(60.0),
        };
        // Admin only.
        let e = t.user.discover(&req).await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::FORBIDDEN));
        let d = t.admin.discover(&req).await.unwrap().discovery.unwrap();
        assert_eq!((d.pdu.as_str(), d.port_id.as_str()), ("pdu1", "7"));
        assert_eq!(t.power.state("pdu1", "7"), PowerState::On);
        // One at a time.
        let e = t
            .admin
            .discover(&DiscoverRequest {
                port_id: "8".into(),
                ..req.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::CONFLICT));
        assert!(t.anon.discovery().await.unwrap().discovery.is_some());
        // The next unknown machine that registers gets the port and goes to training.
        let m = t.anon.register(&registration(1)).await.unwrap();
        assert_eq!(m.state, MachineState::Training);
        assert_eq!(m.pdu.as_deref(), Some("pdu1"));
        assert_eq!(m.pdu_port_id.as_deref(), Some("7"));
        assert!(t.anon.discovery().await.unwrap().discovery.is_none());
        assert_eq!(
            t.power.state("pdu1", "7"),
            PowerState::On,
            "the bound machine keeps power"
        );
        let ev = t.admin.machine_events(m.id, None).await.unwrap().events;
        assert!(
            ev.iter()
                .any(|e| e.kind == "configured" && e.reason.contains("port 7")),
            "{ev:?}"
        );
        // The next one is not bound to anything.
        let m2 = t.anon.register(&registration(2)).await.unwrap();
        assert_eq!(m2.state, MachineState::WaitForConfig);
        // A port that is assigned cannot be discovered.
        let e = t.admin.discover(&req).await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::CONFLICT));
        // DELETE stops a discovery and powers the port off.
        let req9 = DiscoverRequest {
            port_id: "9".into(),
            ..req.clone()
        };
        t.admin.discover(&req9).await.unwrap();
        assert_eq!(t.power.state("pdu1", "9"), PowerState::On);
        let stopped = t.admin.stop_discovery().await.unwrap().discovery.unwrap();
        assert_eq!(stopped.port_id, "9");
        assert_eq!(t.power.state("pdu1", "9"), PowerState::Off);
        assert!(t.admin.stop_discovery().await.unwrap().discovery.is_none());
        // A discovery that times out powers its port off by itself.
        let short = DiscoverRequest {
            port_id: "10".into(),
            timeout: Some(1.0),
            ..req.clone()
        };
        t.admin.discover(&short).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while t.power.state("pdu1", "10") != PowerState::Off {
            assert!(
                tokio::time::Instant::now() < deadline,
                "discovery did not time out"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(t.anon.discovery().await.unwrap().discovery.is_none());
        // An expired discovery binds nothing.
        assert_eq!(
            t.anon.register(&registration(3)).await.unwrap().state,
            MachineState::WaitForConfig
        );
        // A port that is already on is refused (it may be powering something unknown).
        t.power.set_state("pdu1", "11", PowerState::On);
        let e = t
            .admin
            .discover(&DiscoverRequest {
                port_id: "11".into(),
                ..req.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::CONFLICT));
        t.stop().await;
    }
}

#[tokio::test]
async fn bad_registration_bodies_are_400_with_the_field_and_store_nothing() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        let good = serde_json::to_value(registration(1)).unwrap();
        let many: Vec<String> = (0..300).map(|i| format!("pci:1af4:{i:04x}")).collect();
        let cases: Vec<(&str, Value)> = vec![
            ("mac_address", json!("52:54:00:zz:00:01")),
            ("mac_address", json!("52:54:00:00:01")),
            ("mac_address", json!("01:00:5e:00:00:01")),
            ("mac_address", json!("ff:ff:ff:ff:ff:ff")),
            ("ip_address", json!("10.0.2.300")),
            ("ip_address", json!("not an ip")),
            ("ip_address", json!("0.0.0.0")),
            ("ip_address", json!("224.0.0.1")),
            ("tags", json!(many)),
            ("tags", json!(["has space"])),
            ("base_name", json!("")),
            ("base_name", json!("../etc")),
            ("local_tty_device", json!("../../etc/passwd")),
        ];
        for (field, value) in cases {
            let mut body = good.clone();
            body[field] = value.clone();
            let (status, v) = post_raw(&t, "/api/v1/machine/", &body, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{field}={value}: {v}");
            let named = v["field"].as_str().unwrap_or_default();
            assert!(named.starts_with(field), "{field}={value}: {v}");
        }
        // Unknown and missing fields.
        let mut body = good.clone();
        body["colour"] = json!("red");
        assert_eq!(
            post_raw(&t, "/api/v1/machine/", &body, None).await.0,
            StatusCode::BAD_REQUEST
        );
        let mut body = good.clone();
        body.as_object_mut().unwrap().remove("mac_address");
        assert_eq!(
            post_raw(&t, "/api/v1/machine/", &body, None).await.0,
            StatusCode::BAD_REQUEST
        );
        assert!(
            t.admin.machines().await.unwrap().is_empty(),
            "nothing may be stored"
        );
        assert_eq!(
            t.mars.store.latest_seq().await.unwrap(),
            0,
            "no event either"
        );
        t.stop().await;
    }
}

#[tokio::test]
async fn access_control() {
    let db = databases("mars", MIGRATIONS).await.remove(0);
    let t = start(
        db,
        Options {
            loopback_is_dut: false,
            ..Default::default()
        },
    )
    .await;
    let body = serde_json::to_value(registration(1)).unwrap();
    // Not on the DUT network and no token: refused, nothing stored.
    let (status, v) = post_raw(&t, "/api/v1/machine/", &body, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(
        t.anon.machines().await.unwrap_err().status(),
        Some(StatusCode::FORBIDDEN)
    );
    // A user token does not make its holder a DUT: refused, nothing stored.
    let (status, v) = post_raw(&t, "/api/v1/machine/", &body, Some(USER)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("DUT network"),
        "{v}"
    );
    assert!(t.admin.machines().await.unwrap().is_empty());
    // With the admin token (an admin debugging from elsewhere) it works.
    let (status, _) = post_raw(&t, "/api/v1/machine", &body, Some(ADMIN)).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = registration(1).mac_address;
    // Admin routes: no token 401, user token 403.
    let e = t
        .anon
        .retire(id, &RetireRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED));
    let e = t
        .user
        .retire(id, &RetireRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN));
    let e = t
        .user
        .acquire(id, "j", "h", dutgate_mars::model::LeasePurpose::Job, None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN));
    assert_eq!(t.user.machines().await.unwrap().len(), 1);
    t.stop().await;
}

#[tokio::test]
async fn patch_retire_activate() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        let id = t.anon.register(&registration(1)).await.unwrap().id;
        // Giving it a port starts training.
        let m = t
            .admin
            .patch(
                id,
                &MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some("1".into())),
                    manual_tags: Some(vec!["rack:a".parse().unwrap()]),
                    comment: Some(Some("top shelf".into())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(m.state, MachineState::Training);
        assert!(m.has_tags(&[
            "rack:a".parse().unwrap(),
            "virtio:family:VIRTIO".parse().unwrap()
        ]));
        // Another machine cannot take the same port.
        let id2 = t.anon.register(&registration(2)).await.unwrap().id;
        let e = t
            .admin
            .patch(
                id2,
                &MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some("1".into())),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::CONFLICT));
        let e = t
            .admin
            .patch(
                id,
                &MachinePatch {
                    pdu_off_delay: Some(-1.0),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::BAD_REQUEST));
        // Retire: RETIRED and powered off.
        t.power.set_state("pdu1", "1", PowerState::On);
        let m = t
            .admin
            .retire(
                id,
                &RetireRequest {
                    cancel_job: false,
                    reason: Some("flaky NIC".into()),
                },
            )
            .await
            .unwrap();
        assert_eq!(m.state, MachineState::Retired);
        assert!(m.is_retired);
        assert_eq!(t.power.state("pdu1", "1"), PowerState::Off);
        let e = t
            .admin
            .retire(id, &RetireRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::CONFLICT));
        // Never trained: activation sends it to training.
        let m = t
            .admin
            .activate(id, &ActivateRequest::default())
            .await
            .unwrap();
        assert_eq!(m.state, MachineState::Training);
        // Trained before: activation sends it to a quick check.
        let idle = idle_machine(&t, 3).await;
        t.admin
            .retire(idle, &RetireRequest::default())
            .await
            .unwrap();
        let m = t
            .admin
            .activate(idle, &ActivateRequest::default())
            .await
            .unwrap();
        assert_eq!(m.state, MachineState::QuickCheck);
        // A running job on a retired machine finishes; the machine stays retired and is
        // powered off when the job lets go.
        let idle4 = idle_machine(&t, 4).await;
        let l = t
            .admin
            .acquire(
                idle4,
                "long-job",
                "test",
                dutgate_mars::model::LeasePurpose::Job,
                None,
            )
            .await
            .unwrap();
        t.power.set_state("pdu1", "4", PowerState::On);
        t.admin
            .retire(idle4, &RetireRequest::default())
            .await
            .unwrap();
        assert_eq!(
            t.power.state("pdu1", "4"),
            PowerState::On,
            "the job still runs"
        );
        let m = t
            .admin
            .release(&l.id, dutgate_mars::model::ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        assert_eq!(m.state, MachineState::Retired);
        assert_eq!(t.power.state("pdu1", "4"), PowerState::Off);
        let ev = t.admin.machine_events(id, None).await.unwrap().events;
        let retired = ev.iter().find(|e| e.kind == "retired").unwrap();
        assert_eq!(retired.actor, "admin");
        assert_eq!(retired.reason, "flaky NIC");
        // Unknown machine, malformed id.
        let e = t.admin.machine(mac(99)).await.unwrap_err();
        assert_eq!(e.status(), Some(StatusCode::NOT_FOUND));
        let r = reqwest::get(format!("{}/api/v1/machine/not-a-mac", t.url))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        t.stop().await;
    }
}
