//! Who may switch a port: the service role (the gateway's own actors) and admins; a user
//! token may only read; a revoked named token is refused from its next request; every switch
//! and every refusal is in the audit log. Lease holders are checked with mars: that is played
//! against a real mars in `services/mars/tests/capabilities.rs`; here, with no mars, a lease
//! cannot be checked and is refused as such (503), never let through.

mod common;

use std::time::Duration;

use dutgate_core::auth::{Auth, Role};
use dutgate_core::client::ApiClient;
use dutgate_core::config::GatewayConfig;
use dutgate_core::{PowerState, Secret};
use dutgate_pdu::store::Store;
use dutgate_pdu::{PduClient, Switch};
use reqwest::StatusCode;

const ADMIN: &str = "access-admin";
const USER: &str = "access-user";
const SERVICE: &str = "access-service";

fn gateway(dir: &std::path::Path) -> GatewayConfig {
    let mut gw = GatewayConfig {
        state_dir: dir.to_path_buf(),
        ..Default::default()
    };
    gw.auth.admin_token = Some(Secret::new(ADMIN));
    gw.auth.user_token = Some(Secret::new(USER));
    gw.auth.dut_networks = Vec::new();
    std::fs::create_dir_all(gw.tokens_dir()).unwrap();
    std::fs::write(gw.tokens_dir().join("service"), SERVICE).unwrap();
    gw
}

fn config() -> dutgate_pdu::Config {
    dutgate_pdu::Config {
        pdus: common::pdus("rack: {driver: dummy, config: {ports: 2, device: access}}"),
        ..common::fast_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_switch_users_read_revoked_tokens_are_refused_and_all_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let auth = Auth::from_gateway(&gw);
    let (db, _db_dir) = common::sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running =
        dutgate_pdu::start_on_gateway(listener, Store::new(db), config(), &gw, auth.clone())
            .await
            .unwrap();
    let url = running.url();
    let as_token = |t: &str| PduClient::new(&url, Some(Secret::new(t)));

    let service = as_token(SERVICE);
    let op = service.set("rack", "1", Switch::On).await.unwrap();
    assert_eq!(op.port.state, PowerState::On);
    service
        .cycle("rack", "1", Some(Duration::from_millis(50)))
        .await
        .unwrap();

    // A user reads ports, and switches none.
    let user = as_token(USER);
    assert_eq!(user.ports("rack").await.unwrap().len(), 2);
    let e = user.set("rack", "2", Switch::On).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    assert!(e.to_string().contains("X-Lease-Id"), "{e}");
    let e = user.cycle("rack", "2", None).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    // Nor does the service role change configuration.
    let e = service
        .patch(
            "rack",
            "2",
            &dutgate_pdu::PortPatch {
                reserved: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");

    // A named token works until it is revoked.
    let store = auth.store().unwrap();
    let created = store
        .create("power-bot", Role::Service, None, "admin")
        .unwrap();
    let named = as_token(&created.token);
    named.set("rack", "2", Switch::On).await.unwrap();
    store.revoke("power-bot").unwrap();
    let e = named.set("rack", "2", Switch::Off).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");

    // No token at all.
    let e = common::anonymous(&running)
        .set("rack", "2", Switch::Off)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");

    // The audit log: admins only; switches with their actor, refusals with theirs.
    let e = user
        .api()
        .get::<serde_json::Value>("/api/v1/audit")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    let log: serde_json::Value = as_token(ADMIN).api().get("/api/v1/audit").await.unwrap();
    let entries = log["entries"].as_array().unwrap();
    let has = |actor: &str, action: &str, outcome: &str| {
        entries.iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["outcome"].as_str().unwrap_or("").starts_with(outcome)
        })
    };
    assert!(has("service", "pdu.switch", "ok: ON"), "{log:#}");
    assert!(has("service", "pdu.cycle", "ok"), "{log:#}");
    assert!(has("user", "pdu.switch", "refused: "), "{log:#}");
    assert!(has("user", "pdu.cycle", "refused: "), "{log:#}");
    assert!(has("service", "pdu.port.edit", "refused: "), "{log:#}");
    assert!(has("power-bot", "pdu.switch", "ok"), "{log:#}");
    assert!(has("invalid", "pdu.switch", "refused: "), "{log:#}");
    assert!(has("anonymous", "pdu.switch", "refused: "), "{log:#}");
    assert!(
        entries
            .iter()
            .all(|e| e["source"].as_str().unwrap_or("").starts_with("127.0.0.1:")),
        "{log:#}"
    );
    let text = std::fs::read_to_string(dir.path().join("pdu/audit.jsonl")).unwrap();
    assert!(!text.contains(&created.token), "a token in the audit log");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_cannot_be_checked_is_refused() {
    let (db, _dir) = common::sqlite().await;
    let running = common::start(&db, config()).await;
    let http = reqwest::Client::builder()
        .default_headers(dutgate_core::lease::lease_headers(&"a".repeat(32)).unwrap())
        .build()
        .unwrap();
    let holder = PduClient::from_api(ApiClient::with_http(running.url(), None, http));
    let e = holder.set("rack", "1", Switch::On).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{e}");
    assert!(e.to_string().contains("mars"), "{e}");
    // Started without a state dir: the audit route answers admins that there is no log.
    let e = common::admin(&running)
        .api()
        .get::<serde_json::Value>("/api/v1/audit")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::NOT_FOUND), "{e}");
    running.stop().await;
}
