//! Who changes what happens on a machine's console: the service role (the gateway's own
//! actors), admins, and the holder of that machine's current lease, checked with a real mars;
//! a user reads and changes nothing; a revoked named token is refused from its next request;
//! changes, input sessions and refusals are in salad's audit log, never with a lease id.

mod common;

use common::*;
use dutgate_core::auth::{Auth, Role};
use dutgate_salad::client::SaladClientError;
use reqwest::StatusCode;

const SERVICE: &str = "salad-capabilities-service";

fn status(e: SaladClientError) -> Option<StatusCode> {
    match e {
        SaladClientError::Api(e) => e.status(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_role_and_lease_holders_change_consoles_users_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("tokens")).unwrap();
    std::fs::write(state.join("tokens/service"), SERVICE).unwrap();
    let config = test_config(
        &format!("{}/*-adapter", dir.path().display()),
        port_range(8),
    );
    let salad = Salad::start(&state, config).await;
    let (a, b) = (machine(0x3101), machine(0x3102));
    let lease_a = salad.mars.running(a, "127.0.0.2").await;
    let lease_b = salad.mars.running(b, "127.0.0.3").await;

    let service = salad.client_with(Some(SERVICE));
    service.expect(b).await.unwrap();
    let holder = salad.client_with(None).with_lease(&lease_a);
    holder.expect(a).await.unwrap();
    holder
        .set_secrets(a, &["AKIAJOBSECRET01".into()])
        .await
        .unwrap();
    let e = holder.expect(b).await.unwrap_err();
    assert_eq!(status(e), Some(StatusCode::FORBIDDEN));
    let user = salad.client_with(Some(USER));
    let e = user.expect(a).await.unwrap_err();
    assert_eq!(status(e), Some(StatusCode::FORBIDDEN));
    let e = user.clear_secrets(a).await.unwrap_err();
    assert_eq!(status(e), Some(StatusCode::FORBIDDEN));
    // The user still reads what users read.
    user.refusals(a, 0).await.unwrap();
    // Freeing a machine's ports is administration.
    let e = service.delete_machine(a).await.unwrap_err();
    assert_eq!(status(e), Some(StatusCode::FORBIDDEN));

    // A named token works until it is revoked.
    let auth = Auth::from_gateway(&dutgate_core::config::GatewayConfig {
        state_dir: state.clone(),
        ..Default::default()
    });
    let store = auth.store().unwrap();
    let created = store.create("dave", Role::User, None, "admin").unwrap();
    let dave = salad.client_with(Some(&created.token));
    dave.refusals(a, 0).await.unwrap();
    store.revoke("dave").unwrap();
    let e = dave.refusals(a, 0).await.unwrap_err();
    assert_eq!(status(e), Some(StatusCode::UNAUTHORIZED));

    let log: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{}/api/v1/audit", salad.handle().http_addr))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = log["entries"].as_array().unwrap();
    let has = |actor: &str, action: &str, target: dutgate_core::MachineId, outcome: &str| {
        entries.iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["target"] == format!("machine/{target}")
                && e["outcome"].as_str().unwrap_or("").starts_with(outcome)
        })
    };
    let holder_name = format!("lease:{a}");
    assert!(has("service", "console.expect", b, "ok"), "{log:#}");
    assert!(has(&holder_name, "console.expect", a, "ok"), "{log:#}");
    assert!(
        has(&holder_name, "console.secrets.set", a, "ok: 1 secrets"),
        "{log:#}"
    );
    assert!(has("lease", "console.expect", b, "refused: "), "{log:#}");
    assert!(has("user", "console.expect", a, "refused: "), "{log:#}");
    assert!(
        has("user", "console.secrets.clear", a, "refused: "),
        "{log:#}"
    );
    assert!(has("service", "console.delete", a, "refused: "), "{log:#}");
    let text = std::fs::read_to_string(state.join("salad/audit.jsonl")).unwrap();
    for secret in [
        &lease_a,
        &lease_b,
        &created.token,
        &"AKIAJOBSECRET01".to_string(),
    ] {
        assert!(!text.contains(secret.as_str()), "a secret in the audit log");
    }
}
