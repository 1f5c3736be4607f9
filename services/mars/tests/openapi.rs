//! mars' OpenAPI document: its operations, and live answers validated against it.

mod common;

use std::time::Duration;

use common::*;
use dutgate_core::db::testing::databases;
use dutgate_e2e::api_schema::{assert_answer, assert_operations};
use dutgate_mars::model::LeasePurpose;
use dutgate_mars::store::MIGRATIONS;
use serde_json::Value;

#[test]
fn documents_every_route_with_its_answers() {
    let doc = serde_json::to_value(dutgate_mars::openapi()).unwrap();
    assert_operations(
        &doc,
        &[
            "GET /api/v1/machines",
            "POST /api/v1/machine",
            "POST /api/v1/machine/",
            "GET /api/v1/machine/discover",
            "POST /api/v1/machine/discover",
            "DELETE /api/v1/machine/discover",
            "GET /api/v1/machine/{id}",
            "PATCH /api/v1/machine/{id}",
            "POST /api/v1/machine/{id}/retire",
            "POST /api/v1/machine/{id}/activate",
            "GET /api/v1/machine/{id}/events",
            "GET /api/v1/machine/{id}/training",
            "GET /api/v1/machine/{id}/training/loop/{n}",
            "GET /api/v1/leases",
            "POST /api/v1/leases",
            "POST /api/v1/leases/batch",
            "POST /api/v1/leases/{lease}/heartbeat",
            "POST /api/v1/leases/{lease}/release",
            "GET /api/v1/events",
            "GET /api/v1/audit",
            "GET /healthz",
            "GET /metrics",
            "GET /api/v1/openapi.json",
        ],
    );
}

#[tokio::test]
async fn live_answers_match_the_served_document() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let get = |path: String| {
            let req = http.get(format!("{}{path}", t.url)).bearer_auth(ADMIN);
            async move {
                let r = req.send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        let (status, doc) = get("/api/v1/openapi.json".into()).await;
        assert_eq!(status, 200);
        assert_eq!(doc, serde_json::to_value(dutgate_mars::openapi()).unwrap());

        let r = http
            .post(format!("{}/api/v1/machine", t.url))
            .json(&registration(1))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(status, 201);
        assert_answer(
            &doc,
            "post",
            "/api/v1/machine",
            status,
            &r.json().await.unwrap(),
        );
        let id = idle_machine(&t, 2).await;
        let lease = t
            .admin
            .acquire(id, "job-1", "test", LeasePurpose::Job, None)
            .await
            .unwrap();
        for (path, templated) in [
            ("/api/v1/machines".to_string(), "/api/v1/machines"),
            (format!("/api/v1/machine/{id}"), "/api/v1/machine/{id}"),
            (
                format!("/api/v1/machine/{id}/training"),
                "/api/v1/machine/{id}/training",
            ),
            ("/api/v1/leases".to_string(), "/api/v1/leases"),
            ("/api/v1/events?timeout=0".to_string(), "/api/v1/events"),
            (
                "/api/v1/machine/discover".to_string(),
                "/api/v1/machine/discover",
            ),
        ] {
            let (status, body) = get(path).await;
            assert_eq!(status, 200, "{templated}: {body}");
            assert_answer(&doc, "get", templated, status, &body);
        }
        let lease = serde_json::to_value(lease).unwrap();
        assert_answer(&doc, "post", "/api/v1/leases", 201, &lease);
        t.stop().await;
    }
}
