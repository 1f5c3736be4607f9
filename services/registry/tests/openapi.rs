//! The served OpenAPI document: its operations, and live answers validated against it.

use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_registry::{Config, Registry, UpstreamConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn document_lists_the_routes_and_matches_live_answers() {
    let doc = serde_json::to_value(dutgate_registry::openapi()).unwrap();
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
        "get /api/v1/openapi.json, get /api/v1/registry/stats, get /healthz, get /metrics, \
         get /v2, get /v2/, get /v2/{rest}, head /v2, head /v2/, head /v2/{rest}"
    );

    // Nothing listens on port 9: a cold pull fails with the spec's UNAVAILABLE.
    let cache = tempfile::tempdir().unwrap();
    let config = Config {
        upstreams: vec![UpstreamConfig::new("up/", "http://127.0.0.1:9")],
        default_upstream: Some("up/".into()),
        ..Config::default()
    };
    let reg = Registry::open(&config, cache.path()).await.unwrap();
    let auth = Auth::new(None, None, dutgate_core::config::default_dut_networks());
    let app = dutgate_core::http::with_common_routes("registry", reg.router(auth), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let (s, grace) = (stop.clone(), Duration::from_secs(1));
    let server = tokio::spawn(dutgate_core::http::serve(listener, app, s, grace));
    let http = reqwest::Client::new();
    let cases = [
        ("GET", "/api/v1/openapi.json", "/api/v1/openapi.json", 200),
        (
            "GET",
            "/api/v1/registry/stats",
            "/api/v1/registry/stats",
            200,
        ),
        ("GET", "/v2/", "/v2/", 200),
        ("GET", "/v2/up/x/manifests/latest", "/v2/{rest}", 503),
        ("GET", "/v2/_catalog", "/v2/{rest}", 404),
        // Other methods than GET and HEAD get the answers of the GET operation.
        ("POST", "/v2/up/x/blobs/uploads/", "/v2/{rest}", 405),
    ];
    for (method, url, path, status) in cases {
        let res = http.request(method.parse().unwrap(), format!("{base}{url}"));
        let res = res.send().await.unwrap();
        assert_eq!(res.status().as_u16(), status, "{method} {url}");
        let body: Value = res.json().await.unwrap();
        let schema = &doc["paths"][path]["get"]["responses"][status.to_string()]["content"]["application/json"]
            ["schema"];
        let root = json!({"allOf": [schema], "components": doc["components"]});
        jsonschema::validate(&root, &body)
            .unwrap_or_else(|e| panic!("{method} {url}: {e} in {body}"));
    }
    stop.cancel();
    server.await.unwrap().unwrap();
}
