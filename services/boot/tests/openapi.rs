//! The OpenAPI document derived from the handlers: its operations, and live answers that
//! validate against it.

use dutgate_boot::testing::{ADMIN_TOKEN, TestBoot, gateway};
use dutgate_boot::{Config, api::openapi};
use dutgate_e2e::api_schema::{assert_answer, assert_operations};
use serde_json::{Value, json};

const MAC: &str = "52:54:00:12:34:56";

fn document() -> Value {
    serde_json::to_value(openapi()).unwrap()
}

#[test]
fn operations_are_the_routes() {
    assert_operations(
        &document(),
        &[
            "DELETE /api/v1/boot/{mac}",
            "GET /api/v1/audit",
            "GET /api/v1/boot",
            "GET /api/v1/boot-cache",
            "GET /api/v1/boot/{mac}",
            "GET /api/v1/openapi.json",
            "GET /artifacts/{id}/{name}",
            "GET /boot.ipxe",
            "GET /boot/{mac}/boot.ipxe",
            "GET /dut-image/{file}",
            "GET /healthz",
            "GET /metrics",
            "PUT /api/v1/boot/{mac}",
        ],
    );
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
        assert_answer(&doc, method, template, status, &r.json().await.unwrap());
    }
    svc.stop().await;
}
