//! Discovery and retirement through the real pdu service (in-process, `dummy` driver): mars's
//! `HttpPower` speaks the pdu REST API, so this checks both sides agree.

mod common;

use std::sync::Arc;
use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_core::db::testing::databases;
use dutgate_core::{PowerState, Secret};
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::{DiscoverRequest, MachineState, RetireRequest};
use dutgate_mars::power::{HttpPower, Power};
use dutgate_mars::store::{MIGRATIONS, Store};
use tokio_util::sync::CancellationToken;

const PDU_ADMIN: &str = "pdu-admin";

async fn pdu_service(dir: &std::path::Path) -> dutgate_pdu::Running {
    let db = dutgate_core::db::Db::open_sqlite(&dir.join("pdu.db"), dutgate_pdu::store::MIGRATIONS)
        .await
        .unwrap();
    let config = dutgate_pdu::Config {
        pdus: yaml_serde::from_str("rack: {driver: dummy, config: {ports: 4, device: mars-test}}")
            .unwrap(),
        poll_interval_seconds: 0.2,
        readback_interval_ms: 20,
        verify_interval_ms: 50,
        settle_timeout_seconds: 2.0,
        operation_timeout_seconds: 2.0,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth = Auth::new(Some(Secret::new(PDU_ADMIN)), None, vec![]);
    dutgate_pdu::start_on(listener, dutgate_pdu::store::Store::new(db), config, auth)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_and_retire_switch_real_pdu_ports() {
    let dir = tempfile::tempdir().unwrap();
    let pdu = pdu_service(dir.path()).await;
    let power = Arc::new(HttpPower::new(pdu.url(), Some(Secret::new(PDU_ADMIN))));
    // Wait for the first poll so ports read a real state.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while power
        .get("rack", "2")
        .await
        .map(|s| s == PowerState::Unknown)
        .unwrap_or(true)
    {
        assert!(tokio::time::Instant::now() < deadline, "pdu never polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(power.get("rack", "2").await.unwrap(), PowerState::Off);
    assert!(matches!(
        power.get("rack", "99").await,
        Err(dutgate_mars::power::PowerError::NoSuchPort { .. })
    ));

    let db = databases("mars", MIGRATIONS).await.remove(0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mars = Mars::new(
        Store::new(db.db.clone(), "farm"),
        dutgate_mars::Config::default(),
        power.clone(),
    );
    let auth = Auth::new(
        Some(Secret::new(common::ADMIN)),
        None,
        dutgate_core::config::default_dut_networks(),
    );
    let shutdown = CancellationToken::new();
    let app = dutgate_core::http::with_common_routes(
        "mars",
        dutgate_mars::start(mars, auth, shutdown.clone()).unwrap(),
        None,
    );
    let token = shutdown.clone();
    tokio::spawn(async move {
        let _ = dutgate_core::http::serve(listener, app, token, Duration::from_millis(100)).await;
    });
    let admin = MarsClient::new(&url, Some(Secret::new(common::ADMIN)));

    // Discover on port 2: the real port goes ON; a registration binds it.
    let req = DiscoverRequest {
        pdu: "rack".into(),
        port_id: "2".into(),
        timeout: Some(60.0),
    };
    admin.discover(&req).await.unwrap();
    assert_eq!(power.get("rack", "2").await.unwrap(), PowerState::On);
    let m = admin.register(&common::registration(1)).await.unwrap();
    assert_eq!(m.state, MachineState::Training);
    assert_eq!(m.pdu_port_id.as_deref(), Some("2"));
    // Retiring the machine powers its port off for real.
    admin.retire(m.id, &RetireRequest::default()).await.unwrap();
    assert_eq!(power.get("rack", "2").await.unwrap(), PowerState::Off);

    // DELETE powers the discovery port off; an unknown port is a 422 naming the field.
    admin
        .discover(&DiscoverRequest {
            port_id: "3".into(),
            ..req.clone()
        })
        .await
        .unwrap();
    assert_eq!(power.get("rack", "3").await.unwrap(), PowerState::On);
    admin.stop_discovery().await.unwrap();
    assert_eq!(power.get("rack", "3").await.unwrap(), PowerState::Off);
    let e = admin
        .discover(&DiscoverRequest {
            port_id: "99".into(),
            ..req.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.status(),
        Some(reqwest::StatusCode::UNPROCESSABLE_ENTITY),
        "{e}"
    );
    assert!(admin.discovery().await.unwrap().discovery.is_none());

    shutdown.cancel();
    pdu.stop().await;
    db.cleanup().await;
}

/// A lease whose holder went silent: mars powers the machine off through the real pdu
/// service before it frees the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_powers_the_real_port_off_before_the_machine_is_free() {
    use dutgate_mars::model::{LeasePurpose, MachinePatch};
    use dutgate_mars::state::Trigger;
    use dutgate_mars::store::Cause;
    let dir = tempfile::tempdir().unwrap();
    let pdu = pdu_service(dir.path()).await;
    let power = Arc::new(HttpPower::new(pdu.url(), Some(Secret::new(PDU_ADMIN))));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while power
        .get("rack", "4")
        .await
        .map(|s| s == PowerState::Unknown)
        .unwrap_or(true)
    {
        assert!(tokio::time::Instant::now() < deadline, "pdu never polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db = databases("mars", MIGRATIONS).await.remove(0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mars = Mars::new(
        Store::new(db.db.clone(), "farm"),
        dutgate_mars::Config::default(),
        power.clone(),
    );
    let auth = Auth::new(
        Some(Secret::new(common::ADMIN)),
        None,
        dutgate_core::config::default_dut_networks(),
    );
    let shutdown = CancellationToken::new();
    let app = dutgate_core::http::with_common_routes(
        "mars",
        dutgate_mars::start(mars.clone(), auth, shutdown.clone()).unwrap(),
        None,
    );
    let token = shutdown.clone();
    tokio::spawn(async move {
        let _ = dutgate_core::http::serve(listener, app, token, Duration::from_millis(100)).await;
    });
    let admin = MarsClient::new(&url, Some(Secret::new(common::ADMIN)));
    let id = admin.register(&common::registration(1)).await.unwrap().id;
    admin
        .patch(
            id,
            &MachinePatch {
                pdu: Some(Some("rack".into())),
                pdu_port_id: Some(Some("4".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    mars.store
        .trigger(
            id,
            Trigger::TrainingPassed,
            &Cause::new("test", "trained"),
            &|_| {},
        )
        .await
        .unwrap();
    // A job leases the machine, powers it on, and dies (no heartbeat).
    admin
        .acquire(
            id,
            "dead-job",
            "test",
            LeasePurpose::Job,
            Some(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    power.set("rack", "4", PowerState::On).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = admin.machine(id).await.unwrap();
        if m.lease.is_none() {
            assert_eq!(m.state, MachineState::QuickCheck);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(power.get("rack", "4").await.unwrap(), PowerState::Off);
    shutdown.cancel();
    pdu.stop().await;
    db.cleanup().await;
}
