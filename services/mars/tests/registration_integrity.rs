//! Registration integrity (docs/machines.md): a DUT creates unknown machines (within a cap and
//! a rate) and changes only its own record; a made-up registration for another machine is
//! refused and changes nothing. Loopback has a whole /8: clients bound to 127.0.0.x play DUTs
//! at distinct addresses.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use dutgate_core::db::testing::databases;
use dutgate_mars::model::{
    DiscoverRequest, LeasePurpose, MachinePatch, MachineState, Registration, ReleaseOutcome,
};
use dutgate_mars::store::MIGRATIONS;
use reqwest::StatusCode;
use serde_json::Value;

/// `POST /api/v1/machine/` from the loopback address `from`, with `token` if given.
async fn register_from(
    t: &TestMars,
    from: &str,
    reg: &Registration,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let from: IpAddr = from.parse().unwrap();
    let client = reqwest::Client::builder()
        .local_address(from)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut rb = client.post(format!("{}/api/v1/machine", t.url)).json(reg);
    if let Some(tok) = token {
        rb = rb.bearer_auth(tok);
    }
    let r = rb.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn error_of(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_default()
}

/// Registration `n` as machine `n` would send it from `ip`.
fn registration_at(n: u8, ip: &str) -> Registration {
    let mut r = registration(n);
    r.ip_address = ip.parse().unwrap();
    r
}

/// The attack: a made-up registration for a trained IDLE machine (other tags, IP and
/// tty) from another DUT, for every machine of the farm. Each is refused with a 403 naming
/// the rule and the source, and leaves the record, state and events as they were.
#[tokio::test]
async fn made_up_registrations_for_known_machines_are_refused_and_change_nothing() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let victims = [idle_machine(&t, 1).await, idle_machine(&t, 2).await];
        for (i, id) in victims.into_iter().enumerate() {
            let before = t.admin.machine(id).await.unwrap();
            let events = t.admin.machine_events(id, None).await.unwrap().events;
            let n = i as u8 + 1;
            let mut forged = registration(n);
            forged.tags = vec!["gpu:evil:1".parse().unwrap()];
            forged.local_tty_device = Some("ttyS9".into());
            // From another DUT, with another IP, and claiming the victim's own IP.
            for (from, ip) in [
                ("127.0.0.1", "10.0.2.66"),
                ("127.0.0.2", "10.0.2.66"),
                ("127.0.0.2", &format!("10.0.2.{}", 10 + n)[..]),
            ] {
                forged.ip_address = ip.parse().unwrap();
                let (status, v) = register_from(&t, from, &forged, None).await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{backend:?} {from}: {v}");
                let e = error_of(&v);
                assert!(
                    e.contains("recorded address") && e.contains(from),
                    "{backend:?}: {v}"
                );
            }
            let after = t.admin.machine(id).await.unwrap();
            assert_eq!(after.state, MachineState::Idle, "{backend:?}");
            assert_eq!(after.tags, before.tags, "{backend:?}");
            assert_eq!(after.ip_address, before.ip_address, "{backend:?}");
            assert_eq!(after.local_tty_device.as_deref(), Some("ttyS0"));
            assert_eq!(
                t.admin.machine_events(id, None).await.unwrap().events,
                events,
                "{backend:?}: a refused registration records nothing"
            );
        }
        t.stop().await;
    }
}

/// A machine re-registers from its recorded address (new hardware: back to training), but
/// cannot move its address outside its registration boot, nor change while a job holds it.
#[tokio::test]
async fn a_machine_updates_itself_from_its_recorded_address_only() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let own = registration_at(5, "127.0.0.5");
        // Created from anywhere (it is unknown), recorded at 127.0.0.5.
        let (status, v) = register_from(&t, "127.0.0.1", &own, None).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let id = own.mac_address;
        admit(&t, id, 5).await;
        let mut changed = own.clone();
        changed.tags.push("gpu:amd:navi21".parse().unwrap());
        let (status, v) = register_from(&t, "127.0.0.5", &changed, None).await;
        assert_eq!(status, StatusCode::OK, "{backend:?}: {v}");
        assert_eq!(v["state"], "TRAINING", "hardware changed: retrain");
        // Its address changes only in its registration boot.
        let mut moved = changed.clone();
        moved.ip_address = "127.0.0.6".parse().unwrap();
        let (status, v) = register_from(&t, "127.0.0.5", &moved, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{backend:?}: {v}");
        assert!(error_of(&v).contains("ip_address"), "{v}");
        // While a job holds it, its record does not change, even from its own address.
        admit(&t, id, 5).await;
        let lease = t
            .admin
            .acquire(id, "job-1", "test", LeasePurpose::Job, None)
            .await
            .unwrap();
        let (status, v) = register_from(&t, "127.0.0.5", &own, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{backend:?}: {v}");
        assert!(error_of(&v).contains("job-1"), "{v}");
        let m = t.admin.machine(id).await.unwrap();
        assert_eq!(m.tags.len(), changed.tags.len(), "{backend:?}");
        t.admin
            .release(&lease.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        t.stop().await;
    }
}

/// Gives machine `id` port `n` and makes it IDLE (as a passed training would).
async fn admit(t: &TestMars, id: dutgate_core::MachineId, n: u8) {
    use dutgate_mars::state::Trigger;
    use dutgate_mars::store::Cause;
    let m = t.admin.machine(id).await.unwrap();
    if m.pdu_port_id.is_none() {
        t.admin
            .patch(
                id,
                &MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some(n.to_string())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    t.mars
        .store
        .trigger(
            id,
            Trigger::TrainingPassed,
            &Cause::new("test", "trained"),
            &|_| {},
        )
        .await
        .unwrap();
}

/// In its own registration/check boot (TRAINING under the trainer's lease) a machine
/// registers from whatever address its boot got; outside it, not. An admin may always.
#[tokio::test]
async fn in_its_own_boot_a_machine_registers_from_anywhere() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let id = t.anon.register(&registration(1)).await.unwrap().id;
        t.admin
            .patch(
                id,
                &MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some("1".into())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut boot = registration_at(1, "10.0.2.77");
        boot.local_tty_device = Some("ttyS1".into());
        // TRAINING but no boot running: refused.
        let (status, v) = register_from(&t, "127.0.0.1", &boot, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{backend:?}: {v}");
        let lease = t
            .admin
            .acquire(
                id,
                "registration-boot",
                "trainer",
                LeasePurpose::Training,
                None,
            )
            .await
            .unwrap();
        let (status, v) = register_from(&t, "127.0.0.1", &boot, None).await;
        assert_eq!(status, StatusCode::OK, "{backend:?}: {v}");
        assert_eq!(v["ip_address"], "10.0.2.77");
        assert_eq!(v["local_tty_device"], "ttyS1");
        assert_eq!(v["state"], "TRAINING");
        t.admin
            .release(&lease.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        let (status, v) = register_from(&t, "127.0.0.2", &registration(1), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{backend:?}: {v}");
        // The admin token: from anywhere, any machine.
        let (status, v) = register_from(&t, "127.0.0.2", &registration(1), Some(ADMIN)).await;
        assert_eq!(status, StatusCode::OK, "{backend:?}: {v}");
        assert_eq!(v["ip_address"], "10.0.2.11");
        t.stop().await;
    }
}

/// Unknown machines from the DUT network: at most `max_unknown_machines` waiting for
/// configuration, and `new_machines_burst` at once; 429 naming the bound. An admin is not
/// bounded.
#[tokio::test]
async fn creation_of_unknown_machines_is_capped_and_rate_limited() {
    let db = databases("mars", MIGRATIONS).await.remove(0);
    let t = start(
        db,
        Options {
            config: dutgate_mars::Config {
                max_unknown_machines: 2,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    for n in 1..=2 {
        let (status, v) = register_from(&t, "127.0.0.9", &registration(n), None).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    let (status, v) = register_from(&t, "127.0.0.9", &registration(3), None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(error_of(&v).contains("wait for configuration"), "{v}");
    assert_eq!(t.admin.machines().await.unwrap().len(), 2);
    // Configured by an admin: room for one more.
    admit(&t, mac(1), 1).await;
    let (status, v) = register_from(&t, "127.0.0.9", &registration(3), None).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    t.stop().await;

    let db = databases("mars", MIGRATIONS).await.remove(0);
    let t = start(
        db,
        Options {
            config: dutgate_mars::Config {
                new_machines_burst: 2,
                new_machines_per_minute: 1,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    for n in 1..=2 {
        let (status, v) = register_from(&t, "127.0.0.9", &registration(n), None).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    let (status, v) = register_from(&t, "127.0.0.9", &registration(3), None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert!(error_of(&v).contains("a minute"), "{v}");
    let (status, v) = register_from(&t, "127.0.0.9", &registration(3), Some(ADMIN)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    t.stop().await;
}

/// A running discovery binds a machine that boots and registers; a registration from another
/// known machine's address (a DUT in service making up a MAC) is not bound to the port.
#[tokio::test]
async fn discovery_is_not_claimed_from_another_machines_address() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let (status, _) =
            register_from(&t, "127.0.0.3", &registration_at(1, "127.0.0.3"), None).await;
        assert_eq!(status, StatusCode::CREATED);
        admit(&t, mac(1), 1).await;
        t.admin
            .discover(&DiscoverRequest {
                pdu: "pdu1".into(),
                port_id: "7".into(),
                timeout: Some(60.0),
            })
            .await
            .unwrap();
        // Machine 1's DUT makes up a MAC: created, not bound; the discovery still runs.
        let (status, v) =
            register_from(&t, "127.0.0.3", &registration_at(2, "127.0.0.3"), None).await;
        assert_eq!(status, StatusCode::CREATED, "{backend:?}: {v}");
        assert_eq!(v["state"], "WAIT_FOR_CONFIG", "{backend:?}: {v}");
        assert!(t.admin.discovery().await.unwrap().discovery.is_some());
        // The machine that booted on the port registers from its own address: bound.
        let (status, v) =
            register_from(&t, "127.0.0.4", &registration_at(3, "127.0.0.4"), None).await;
        assert_eq!(status, StatusCode::CREATED, "{backend:?}: {v}");
        assert_eq!(v["state"], "TRAINING", "{backend:?}: {v}");
        assert_eq!(v["pdu_port_id"], "7");
        t.stop().await;
    }
}

/// The one write path takes the state from the state machine only: an edit that sets
/// `state` (as a careless PATCH or registration edit would) changes nothing of it.
#[tokio::test]
async fn an_edit_cannot_change_a_machines_state() {
    use dutgate_mars::store::{Cause, Decision};
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let id = t.anon.register(&registration(1)).await.unwrap().id;
        let row = t
            .mars
            .store
            .apply_with(
                id,
                &Cause::new("test", "edit"),
                &|_| Decision::Record("patched"),
                &|r| {
                    r.state = MachineState::Idle;
                    r.comment = Some("edited".into());
                },
            )
            .await
            .unwrap();
        assert_eq!(row.state, MachineState::WaitForConfig, "{backend:?}");
        let m = t.admin.machine(id).await.unwrap();
        assert_eq!(m.state, MachineState::WaitForConfig, "{backend:?}");
        assert_eq!(m.comment.as_deref(), Some("edited"));
        t.stop().await;
    }
}
