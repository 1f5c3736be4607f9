//! salad's OpenAPI document: its operations, and live answers that validate against it.

mod common;

use common::*;
use dutgate_e2e::api_schema::{answer_errors, assert_operations};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

fn doc() -> Value {
    serde_json::to_value(dutgate_salad::api::openapi()).unwrap()
}

#[test]
fn every_route_is_documented_with_its_answers() {
    let doc = doc();
    assert_operations(
        &doc,
        &[
            "GET /api/v1/machine",
            "GET /api/v1/machine/{id}",
            "DELETE /api/v1/machine/{id}",
            "GET /api/v1/machine/{id}/log",
            "PUT /api/v1/machine/{id}/expect",
            "PUT /api/v1/machine/{id}/secrets",
            "DELETE /api/v1/machine/{id}/secrets",
            "GET /api/v1/machine/{id}/refusals",
            "GET /api/v1/machine/{id}/console",
            "GET /api/v1/ports",
            "PUT /api/v1/ports/{stream}/machine",
            "GET /api/v1/audit",
            "GET /healthz",
            "GET /metrics",
            "GET /api/v1/openapi.json",
        ],
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["lease"]["in"],
        "header"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_answers_match_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let salad = Salad::start(
        &dir.path().join("state"),
        test_config(&format!("{}/none-*", dir.path().display()), port_range(10)),
    )
    .await;
    // An open, unbound stream for the port list.
    let mut dut = tokio::net::TcpStream::connect(salad.handle().netconsole_addr.unwrap())
        .await
        .unwrap();
    dut.write_all(b"SALAD.ping\n").await.unwrap();
    read_until(&mut dut, b"SALAD.pong\n", "netconsole pong").await;

    let doc = doc();
    let base = format!("http://{}", salad.handle().http_addr);
    let http = reqwest::Client::new();
    let id = machine(1);
    let calls = [
        ("/api/v1/machine/{id}", format!("/api/v1/machine/{id}"), 200),
        ("/api/v1/machine", "/api/v1/machine".to_string(), 200),
        ("/api/v1/ports", "/api/v1/ports".to_string(), 200),
        (
            "/api/v1/machine/{id}/refusals",
            format!("/api/v1/machine/{id}/refusals"),
            200,
        ),
        ("/api/v1/audit", "/api/v1/audit".to_string(), 200),
        (
            "/api/v1/machine/{id}",
            "/api/v1/machine/not-a-mac".to_string(),
            400,
        ),
    ];
    for (template, path, status) in calls {
        let res = http
            .get(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status, "GET {path}");
        let body: Value = res.json().await.unwrap();
        let e = answer_errors(&doc, "get", template, status, &body);
        assert!(e.is_empty(), "GET {path}: {e:?} in {body:#}");
    }
    let wrong = json!({"ports": [{"id": 1, "kind": "serial", "name": "x", "opened_at": 1}]});
    assert!(!answer_errors(&doc, "get", "/api/v1/ports", 200, &wrong).is_empty());
    let served: Value = http
        .get(format!("{base}/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(served, doc);
}
