//! The artifact cache follows the gateway's outbound policy: real HTTP servers on loopback
//! play the allowed upstream and the internal services it must not reach.

mod common;

use bytes::Bytes;
use common::{Mode, Upstream};
use dutgate_boot::testing::{ADMIN_TOKEN, TestBoot, gateway};
use dutgate_boot::{BootConfig, CacheConfig, Config, Kernel};
use dutgate_core::MachineId;
use reqwest::StatusCode;
use serde_json::{Value, json};

const MAC: &str = "52:54:00:00:00:21";

async fn put_kernel(svc: &TestBoot, url: &str) -> (StatusCode, Value) {
    let r = reqwest::Client::new()
        .put(format!("{}/api/v1/boot/{MAC}", svc.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"kernel": {"url": url, "cmdline": "console=ttyS0"}, "job_id": "1"}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Stores a config (bypassing nothing: the URL must pass the policy at PUT time) and returns
/// the cache URL its script names.
async fn cached_url(svc: &TestBoot, url: &str) -> String {
    let mac = MachineId::parse(MAC).unwrap();
    common::writer(svc)
        .put(
            mac,
            &BootConfig {
                kernel: Kernel {
                    url: url.into(),
                    cmdline: "console=ttyS0".into(),
                    sha256: None,
                },
                initramfs: vec![],
                job_id: Some("1".into()),
            },
        )
        .await
        .unwrap();
    let script = reqwest::Client::new()
        .get(format!("{}/boot/{MAC}/boot.ipxe", svc.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = script
        .lines()
        .find(|l| l.starts_with("kernel "))
        .unwrap_or_else(|| panic!("no kernel line in\n{script}"));
    line.split(' ').nth(1).unwrap().to_string()
}

fn assert_names_rule(v: &Value, what: &str) {
    let e = v["error"].as_str().unwrap_or_default();
    assert!(e.contains(what), "{v}");
    assert!(e.contains("gateway.outbound.allow"), "{v}");
}

#[tokio::test]
async fn allowed_upstream_is_fetched_and_loopback_is_refused() {
    let body = Bytes::from_static(b"an allowed kernel");
    let allowed = Upstream::start(vec![("/k".into(), body.clone())]).await;
    let internal = Upstream::start(vec![("/admin".into(), Bytes::from_static(b"secret"))]).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(allowed.allowed(gateway(dir.path())), Config::default()).await;

    let url = cached_url(&svc, &format!("{}/k", allowed.url())).await;
    assert_eq!(
        reqwest::get(&url).await.unwrap().bytes().await.unwrap(),
        body
    );
    assert_eq!(allowed.gets("/k"), 1);

    // Another port on the same loopback address is not the allowed server.
    let (status, v) = put_kernel(&svc, &format!("{}/admin", internal.url())).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["field"], "kernel.url");
    assert_eq!(
        v["error"],
        format!(
            "artifact URL {}/admin: 127.0.0.1 is a loopback address; outbound fetches may not \
             reach it (gateway.outbound.allow)",
            internal.url()
        )
    );
    // Other spellings and other internal ranges, without a server behind them.
    for (u, what) in [
        (
            format!("http://[::ffff:127.0.0.1]:{}/admin", internal.addr.port()),
            "loopback",
        ),
        (
            format!("http://2130706433:{}/admin", internal.addr.port()),
            "loopback",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "link-local",
        ),
        (
            "http://10.1.2.3/cm?cmnd=Power%20Off".to_string(),
            "RFC 1918",
        ),
        ("http://100.64.0.1/x".to_string(), "CGNAT"),
        ("http://[fd00::1]/x".to_string(), "unique local"),
    ] {
        let (status, v) = put_kernel(&svc, &u).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{u}: {v}");
        assert_names_rule(&v, what);
    }
    // Nothing ever reached the internal server.
    assert_eq!(internal.gets("/admin"), 0);
    svc.stop().await;
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused() {
    let internal = Upstream::start(vec![("/admin".into(), Bytes::from_static(b"secret"))]).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let (status, v) = put_kernel(
        &svc,
        &format!("http://localhost:{}/admin", internal.addr.port()),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_names_rule(&v, "localhost resolves only to addresses");
    assert_eq!(internal.gets("/admin"), 0);
    svc.stop().await;
}

#[tokio::test]
async fn redirects_to_refused_addresses_are_not_followed() {
    let internal = Upstream::start(vec![("/admin".into(), Bytes::from_static(b"secret"))]).await;
    let allowed = Upstream::start(vec![
        ("/to-ip".into(), Bytes::new()),
        ("/to-name".into(), Bytes::new()),
        ("/to-metadata".into(), Bytes::new()),
    ])
    .await;
    allowed.set_mode(
        "/to-ip",
        Mode::Redirect(format!("{}/admin", internal.url())),
    );
    // A name is resolved at connection time, and the connection's peer is checked with its
    // port: the allow rule of the other server on the same address does not cover it.
    allowed.set_mode(
        "/to-name",
        Mode::Redirect(format!("http://localhost:{}/admin", internal.addr.port())),
    );
    allowed.set_mode(
        "/to-metadata",
        Mode::Redirect("http://169.254.169.254/latest/meta-data/".into()),
    );
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(allowed.allowed(gateway(dir.path())), Config::default()).await;
    for (path, what) in [
        ("/to-ip", "loopback"),
        ("/to-name", "loopback"),
        ("/to-metadata", "link-local"),
    ] {
        let url = cached_url(&svc, &format!("{}{path}", allowed.url())).await;
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_names_rule(&v, what);
        assert_eq!(allowed.gets(path), 1, "{path}");
    }
    assert_eq!(internal.gets("/admin"), 0);
    assert_eq!(svc.cache.stats().blobs, 0);
    svc.stop().await;
}

#[tokio::test]
async fn oversize_artifacts_are_refused() {
    let big = Bytes::from(vec![7u8; 300_000]);
    let small = Bytes::from(vec![1u8; 1000]);
    let upstream = Upstream::start(vec![
        ("/announced".into(), big.clone()),
        ("/chunked".into(), big.clone()),
        ("/small".into(), small.clone()),
    ])
    .await;
    upstream.set_mode("/chunked", Mode::Chunked);
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        cache: CacheConfig {
            max_artifact_bytes: 100_000,
            ..CacheConfig::default()
        },
        ..Config::default()
    };
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), config).await;
    for path in ["/announced", "/chunked"] {
        let url = cached_url(&svc, &format!("{}{path}", upstream.url())).await;
        // Announced: refused before the body. Chunked: the status may be sent before the
        // limit is crossed; then the body is cut there, so the client never gets the whole
        // artifact.
        let r = match reqwest::get(&url).await {
            Ok(r) => r,
            Err(e) => {
                assert_eq!(path, "/chunked", "{e}");
                continue;
            }
        };
        if r.status() == StatusCode::FORBIDDEN {
            let v: Value = r.json().await.unwrap();
            assert!(
                v["error"]
                    .as_str()
                    .unwrap()
                    .contains("larger than the limit of 100000 bytes"),
                "{v}"
            );
        } else {
            assert_eq!(path, "/chunked", "an announced size is refused up front");
            let got = r.bytes().await;
            assert!(
                got.as_ref().map_or(true, |b| b.len() < big.len()),
                "{path}: the whole oversize body was served"
            );
        }
    }
    assert_eq!(svc.cache.stats().blobs, 0);
    let url = cached_url(&svc, &format!("{}/small", upstream.url())).await;
    assert_eq!(
        reqwest::get(&url).await.unwrap().bytes().await.unwrap(),
        small
    );
    svc.stop().await;
}
