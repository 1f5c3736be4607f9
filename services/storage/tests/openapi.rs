//! The served OpenAPI document: its operations, and live admin answers validated against it.

mod common;

use common::{Embedded, Raw};
use serde_json::{Value, json};
use time::OffsetDateTime;

#[tokio::test]
async fn document_lists_the_routes_and_matches_live_answers() {
    let doc = serde_json::to_value(dutgate_storage::openapi()).unwrap();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let statuses = op["responses"].as_object().unwrap();
            assert!(
                statuses.keys().any(|s| s.starts_with('2')),
                "{method} {path}"
            );
            ops.push(format!("{method} {path}"));
        }
    }
    ops.sort();
    assert_eq!(
        ops.join(", "),
        "delete /dutgate-admin/v1/keys, get /api/v1/openapi.json, get /dutgate-admin/v1/keys, \
         get /healthz, get /metrics, post /dutgate-admin/v1/keys"
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
        let schema = &doc["paths"][path][&method]["responses"][status.to_string()]["content"]["application/json"]
            ["schema"];
        let root = json!({"allOf": [schema], "components": doc["components"]});
        jsonschema::validate(&root, &body).unwrap_or_else(|e| panic!("{method}: {e} in {body}"));
    }
    e.stop().await;
}
