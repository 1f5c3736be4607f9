//! The served OpenAPI document: its operations, and live answers validated against it.

use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_e2e::api_schema::{assert_answer, assert_operations};
use dutgate_registry::{Config, Registry, UpstreamConfig};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn document_lists_the_routes_and_matches_live_answers() {
    let doc = serde_json::to_value(dutgate_registry::openapi()).unwrap();
    assert_operations(
        &doc,
        &[
            "GET /api/v1/openapi.json",
            "GET /api/v1/registry/stats",
            "GET /healthz",
            "GET /metrics",
            "GET /v2",
            "GET /v2/",
            "GET /v2/{rest}",
            "HEAD /v2",
            "HEAD /v2/",
            "HEAD /v2/{rest}",
        ],
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
        assert_answer(&doc, "get", path, status, &body);
    }
    stop.cancel();
    server.await.unwrap().unwrap();
}
