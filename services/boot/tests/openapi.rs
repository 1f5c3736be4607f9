//! The OpenAPI document derived from the handlers: its operations, and live answers that
//! validate against it.

use dutgate_boot::testing::{ADMIN_TOKEN, TestBoot, gateway};
use dutgate_boot::{Config, api::openapi};
use serde_json::{Value, json};

const MAC: &str = "52:54:00:12:34:56";

fn document() -> Value {
    serde_json::to_value(openapi()).unwrap()
}

#[test]
fn operations_are_the_routes() {
    let doc = document();
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let answers = op["responses"].as_object().unwrap();
            assert!(
                answers.keys().any(|s| s.starts_with('2')),
                "{method} {path} documents no success"
            );
            ops.push(format!("{method} {path}"));
        }
    }
    ops.sort();
    let expected = [
        "delete /api/v1/boot/{mac}",
        "get /api/v1/audit",
        "get /api/v1/boot",
        "get /api/v1/boot-cache",
        "get /api/v1/boot/{mac}",
        "get /api/v1/openapi.json",
        "get /artifacts/{id}/{name}",
        "get /boot.ipxe",
        "get /boot/{mac}/boot.ipxe",
        "get /dut-image/{file}",
        "get /healthz",
        "get /metrics",
        "put /api/v1/boot/{mac}",
    ];
    assert_eq!(ops, expected);
}

/// Checks `body`, answered with `status` to `method path`, against the document.
fn check(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let answers = &doc["paths"][path][method]["responses"];
    let mut answer = answers
        .get(status.to_string())
        .unwrap_or(&answers["default"]);
    if let Some(r) = answer["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap();
        answer = &doc["components"]["responses"][name];
    }
    let schema = &answer["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status}: no JSON schema"
    );
    let root = json!({"allOf": [schema], "components": doc["components"]});
    let validator = jsonschema::validator_for(&root).unwrap();
    if let Err(e) = validator.validate(body) {
        panic!("{method} {path} {status}: {e}\n{body:#}");
    }
}

#[tokio::test]
async fn live_answers_match_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let http = reqwest::Client::new();
    let served: Value = http
        .get(format!("{}/api/v1/openapi.json", svc.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let doc = document();
    assert_eq!(served, doc);
    let config = json!({
        "kernel": {"url": "http://upstream.example/vmlinuz", "cmdline": ["console=ttyS0", "a=1"]},
        "initramfs": {"url": "http://upstream.example/initrd"},
        "job_id": "7",
    });
    let machine = format!("/api/v1/boot/{MAC}");
    for (method, path, template, status) in [
        ("put", machine.as_str(), "/api/v1/boot/{mac}", 200),
        ("get", machine.as_str(), "/api/v1/boot/{mac}", 200),
        ("get", "/api/v1/boot", "/api/v1/boot", 200),
        ("get", "/api/v1/boot-cache", "/api/v1/boot-cache", 200),
        ("get", "/api/v1/audit", "/api/v1/audit", 200),
        (
            "get",
            "/api/v1/boot/00:00:00:00:00:01",
            "/api/v1/boot/{mac}",
            404,
        ),
    ] {
        let url = format!("{}{path}", svc.url());
        let req = match method {
            "put" => http.put(url).json(&config),
            _ => http.get(url),
        };
        let r = req.bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        check(&doc, method, template, status, &r.json().await.unwrap());
    }
    svc.stop().await;
}
