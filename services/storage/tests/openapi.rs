//! The served OpenAPI document: its operations, and live admin answers validated against it.

mod common;

use common::{Embedded, Raw};
use dutgate_e2e::api_schema::{assert_answer, assert_operations};
use serde_json::Value;
use time::OffsetDateTime;

#[tokio::test]
async fn document_lists_the_routes_and_matches_live_answers() {
    let doc = serde_json::to_value(dutgate_storage::openapi()).unwrap();
    assert_operations(
        &doc,
        &[
            "DELETE /dutgate-admin/v1/keys",
            "GET /api/v1/openapi.json",
            "GET /dutgate-admin/v1/keys",
            "GET /healthz",
            "GET /metrics",
            "POST /dutgate-admin/v1/keys",
        ],
    );

    let e = Embedded::start().await;
    let served = reqwest::get(format!("{}/api/v1/openapi.json", e.url)).await;
    assert_eq!(served.unwrap().json::<Value>().await.unwrap(), doc);
    let job = e.storage.create_job_bucket("doc").await.unwrap();
    let path = "/dutgate-admin/v1/keys";
    let reader = Raw::new("POST", path)
        .query("bucket", &job.bucket)
        .query("access", "read")
        .query("networks", "10.0.2.0/24")
        .query("expires_in_seconds", "60");
    let cases = [
        (reader, 201),
        (Raw::new("GET", path), 200),
        (Raw::new("DELETE", path).query("bucket", &job.bucket), 200),
    ];
    for (raw, status) in cases {
        let method = raw.method.to_lowercase();
        let (key, secret) = (&e.admin.access_key, e.admin.secret_key.expose());
        let res = raw
            .signed(&e.url, key, secret, OffsetDateTime::now_utc())
            .await;
        assert_eq!(res.status, status, "{method}: {res:?}");
        let body: Value = serde_json::from_str(&res.body).unwrap();
        assert_answer(&doc, &method, path, status, &body);
    }
    e.stop().await;
}
