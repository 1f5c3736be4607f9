//! The executor's OpenAPI document: its operations, and live answers validated against it.

mod common;

use std::time::Duration;

use common::*;
use dutgate_e2e::api_schema::{assert_answer, assert_component, assert_operations};
use serde_json::Value;

#[test]
fn documents_every_route_with_its_answers() {
    let doc = serde_json::to_value(dutgate_executor::openapi()).unwrap();
    assert_operations(
        &doc,
        &[
            "POST /api/v1/jobs",
            "GET /api/v1/jobs",
            "GET /api/v1/jobs/{id}",
            "GET /api/v1/jobs/{id}/events",
            "GET /api/v1/jobs/{id}/console",
            "GET /api/v1/jobs/{id}/console/ws",
            "GET /api/v1/jobs/{id}/artifacts",
            "GET /api/v1/jobs/{id}/artifacts/{path}",
            "POST /api/v1/jobs/{id}/cancel",
            "GET /api/v1/stats/queue-wait",
            "GET /api/v1/tokens",
            "POST /api/v1/tokens",
            "DELETE /api/v1/tokens/{name}",
            "GET /api/v1/audit",
            "GET /api/v1/duts",
            "GET /api/v1/dut/{name}",
            "GET //{path}",
            "POST //{path}",
            "GET /healthz",
            "GET /metrics",
            "GET /api/v1/openapi.json",
        ],
    );
}

/// The token answers (the test farm has no token store): as the core crate's store makes them.
#[test]
fn token_answers_match_the_document() {
    let doc = serde_json::to_value(dutgate_executor::openapi()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dutgate_core::auth::TokenStore::in_state_dir(dir.path());
    let role = dutgate_core::auth::Role::User;
    let created = store.create("alice", role, Some(30), "admin").unwrap();
    let never = store.create("bob", role, None, "admin").unwrap();
    let created = serde_json::to_value(&created).unwrap();
    assert_component(&doc, "CreatedToken", &created);
    assert_component(
        &doc,
        "TokenInfo",
        &serde_json::to_value(&never.info).unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_answers_match_the_served_document() {
    let farm = Farm::start(Options {
        machines: 1,
        ..options()
    })
    .await;
    let get = |path: String, token: &'static str| {
        let req = farm
            .http
            .get(format!("{}{path}", farm.url))
            .bearer_auth(token);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, doc) = get("/api/v1/openapi.json".into(), USER).await;
    assert_eq!(status, 200);
    assert_eq!(
        doc,
        serde_json::to_value(dutgate_executor::openapi()).unwrap()
    );

    let r = farm
        .submit_raw(&job_yaml(&by_id(1), "pass", "pass", "", ""), "")
        .await;
    let status = r.status().as_u16();
    let submitted: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "{submitted}");
    assert_answer(&doc, "post", "/api/v1/jobs", status, &submitted);
    let id = submitted["id"].as_i64().unwrap();
    farm.wait_finished(id, Duration::from_secs(60)).await;
    for (path, templated, token) in [
        (format!("/api/v1/jobs/{id}"), "/api/v1/jobs/{id}", USER),
        ("/api/v1/jobs".into(), "/api/v1/jobs", USER),
        (
            format!("/api/v1/jobs/{id}/events"),
            "/api/v1/jobs/{id}/events",
            USER,
        ),
        (
            format!("/api/v1/jobs/{id}/artifacts"),
            "/api/v1/jobs/{id}/artifacts",
            USER,
        ),
        (
            "/api/v1/stats/queue-wait".into(),
            "/api/v1/stats/queue-wait",
            USER,
        ),
        ("/api/v1/duts".into(), "/api/v1/duts", USER),
        (
            format!("/api/v1/dut/{}", mac(1)),
            "/api/v1/dut/{name}",
            USER,
        ),
        ("/api/v1/audit".into(), "/api/v1/audit", ADMIN),
    ] {
        let (status, body) = get(path, token).await;
        assert_eq!(status, 200, "{templated}: {body}");
        assert_answer(&doc, "get", templated, status, &body);
    }
    farm.stop().await;
}
