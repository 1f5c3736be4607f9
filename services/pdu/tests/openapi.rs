//! The OpenAPI document derived from the handlers: its operations, and live answers of the
//! service validated against its schemas.

mod common;

use std::time::Duration;

use common::*;
use dutgate_core::PowerState;
use dutgate_e2e::api_schema::{assert_answer, assert_operations};
use serde_json::{Value, json};

#[test]
fn document_lists_every_operation_with_a_success_answer() {
    let doc = serde_json::to_value(dutgate_pdu::openapi()).unwrap();
    assert_operations(
        &doc,
        &[
            "GET /api/v1/drivers",
            "GET /api/v1/pdus",
            "POST /api/v1/pdus",
            "GET /api/v1/pdus/{name}",
            "DELETE /api/v1/pdus/{name}",
            "POST /api/v1/pdus/{name}/refresh",
            "GET /api/v1/pdus/{name}/ports",
            "GET /api/v1/pdus/{name}/ports/{id}",
            "PATCH /api/v1/pdus/{name}/ports/{id}",
            "POST /api/v1/pdus/{name}/ports/{id}/cycle",
            "GET /api/v1/pdus/{name}/ports/{id}/history",
            "GET /api/v1/audit",
            "GET /healthz",
            "GET /metrics",
            "GET /api/v1/openapi.json",
        ],
    );
}

#[tokio::test]
async fn live_answers_match_the_served_document() {
    let (db, _dir) = sqlite().await;
    let mut cfg = fast_config();
    cfg.pdus = pdus("rack: {driver: dummy, config: {ports: [gw, dut1], device: openapi-test}}");
    let r = start(&db, cfg).await;
    let c = admin(&r);
    eventually(Duration::from_secs(5), "first poll", || async {
        let p = c.ports("rack").await.unwrap();
        !p.is_empty() && p.iter().all(|p| p.state != PowerState::Unknown)
    })
    .await;

    let http = reqwest::Client::new();
    let get = |path: &str| {
        let req = http.get(format!("{}{path}", r.url()));
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let doc = get("/api/v1/openapi.json").await;
    assert_eq!(doc, serde_json::to_value(dutgate_pdu::openapi()).unwrap());

    for (path, url) in [
        ("/api/v1/drivers", "/api/v1/drivers"),
        ("/api/v1/pdus", "/api/v1/pdus"),
        ("/api/v1/pdus/{name}", "/api/v1/pdus/rack"),
        (
            "/api/v1/pdus/{name}/ports/{id}",
            "/api/v1/pdus/rack/ports/2",
        ),
    ] {
        assert_answer(&doc, "get", path, 200, &get(url).await);
    }
    let cycled = http
        .post(format!("{}/api/v1/pdus/rack/ports/2/cycle", r.url()))
        .bearer_auth(ADMIN)
        .json(&json!({"off_seconds": 0.1}))
        .send()
        .await
        .unwrap();
    assert_eq!(cycled.status(), 200);
    let cycled: Value = cycled.json().await.unwrap();
    assert_answer(
        &doc,
        "post",
        "/api/v1/pdus/{name}/ports/{id}/cycle",
        200,
        &cycled,
    );
    let history = get("/api/v1/pdus/rack/ports/2/history").await;
    assert!(!history.as_array().unwrap().is_empty());
    assert_answer(
        &doc,
        "get",
        "/api/v1/pdus/{name}/ports/{id}/history",
        200,
        &history,
    );
    r.stop().await;
    dutgate_pdu_dummy::forget("openapi-test");
}
