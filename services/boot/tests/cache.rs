//! Acceptance 2 and 3 and the cache's other promises, against a local counting upstream.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Mode, Upstream, sha256_hex};
use dutgate_boot::testing::{TestBoot, gateway};
use dutgate_boot::{BootConfig, CacheConfig, Config, Kernel};
use dutgate_core::MachineId;
use futures::StreamExt;
use reqwest::StatusCode;

const MAC: &str = "52:54:00:00:00:01";

/// Deterministic pseudo-random bytes (xorshift), so a wrong offset cannot go unnoticed.
fn generated(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out.into()
}

fn config_with(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    f(&mut c);
    c
}

/// Sets a boot config whose kernel is `url` and returns the cache URL the script names.
async fn artifact_url(svc: &TestBoot, url: &str, sha256: Option<String>) -> String {
    let mac = MachineId::parse(MAC).unwrap();
    common::writer(svc)
        .put(
            mac,
            &BootConfig {
                kernel: Kernel {
                    url: url.into(),
                    cmdline: "console=ttyS0".into(),
                    sha256,
                },
                initramfs: vec![],
                job_id: None,
            },
        )
        .await
        .unwrap();
    // As an admin: this machine has no address a DUT check could match.
    let script = reqwest::Client::new()
        .get(format!(
            "{}/boot/{MAC}/boot.ipxe?platform=pcbios",
            svc.url()
        ))
        .bearer_auth(dutgate_boot::testing::ADMIN_TOKEN)
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
    let url = line.split(' ').nth(1).unwrap().to_string();
    assert!(
        url.starts_with(&format!("{}/artifacts/", svc.url())),
        "{url}"
    );
    url
}

/// Reads a response body, comparing it with `expected` as it arrives (no copy of 100 MB per
/// client). Returns the number of matching bytes, or an error for a broken body.
async fn read_compare(resp: reqwest::Response, expected: &[u8]) -> Result<usize, String> {
    let mut off = 0usize;
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("body error after {off} bytes: {e}"))?;
        let end = off + chunk.len();
        if end > expected.len() || chunk[..] != expected[off..end] {
            return Err(format!("bytes differ at or after offset {off}"));
        }
        off = end;
    }
    Ok(off)
}

fn blob_files(svc: &TestBoot) -> usize {
    std::fs::read_dir(svc.cache.dir().join("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_clients_one_upstream_get_identical_bytes() {
    const SIZE: usize = 100 * 1000 * 1000;
    const CLIENTS: usize = 50;
    let body = generated(SIZE, 7);
    let upstream = Upstream::start(vec![("/big.img".into(), body.clone())]).await;
    let (open, gate) = tokio::sync::watch::channel(false);
    upstream.set_mode(
        "/big.img",
        Mode::Hold {
            first: 1 << 20,
            gate,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), Config::default()).await;
    let url = artifact_url(&svc, &format!("{}/big.img", upstream.url()), None).await;
    let http = reqwest::Client::new();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let http = http.clone();
        let url = url.clone();
        let body = body.clone();
        clients.push(tokio::spawn(async move {
            let resp = http.get(&url).send().await.map_err(|e| e.to_string())?;
            if resp.status() != StatusCode::OK {
                return Err(format!("status {}", resp.status()));
            }
            read_compare(resp, &body).await
        }));
    }
    // The upstream holds the body after 1 MiB until every client is attached to the one
    // download, so all 50 are served while it is still running.
    let mut waited = 0;
    while svc.cache.stats().coalesced < (CLIENTS - 1) as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
        assert!(
            waited < 12_000,
            "clients did not attach: {:?}",
            svc.cache.stats()
        );
    }
    open.send_replace(true);
    for c in clients {
        assert_eq!(c.await.unwrap(), Ok(SIZE));
    }
    assert_eq!(upstream.gets("/big.img"), 1);
    let stats = svc.cache.stats();
    assert_eq!((stats.misses, stats.coalesced), (1, 49), "{stats:?}");
    assert_eq!(stats.upstream_bytes, SIZE as u64);
    // Later requests are hits with a strong ETag; the upstream is not asked again.
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.headers()["x-dutgate-cache"], "hit");
    assert_eq!(
        resp.headers()["etag"].to_str().unwrap(),
        format!("\"{}\"", sha256_hex(&body))
    );
    assert_eq!(read_compare(resp, &body).await, Ok(SIZE));
    assert_eq!(upstream.gets("/big.img"), 1);
    svc.stop().await;
}

#[tokio::test]
async fn truncated_upstream_body_is_not_cached_and_is_retried() {
    let body = generated(4 << 20, 3);
    let upstream = Upstream::start(vec![("/k".into(), body.clone())]).await;
    upstream.set_mode("/k", Mode::Truncate { send: 1 << 20 });
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), Config::default()).await;
    let url = artifact_url(&svc, &format!("{}/k", upstream.url()), None).await;
    let resp = reqwest::get(&url).await.unwrap();
    let got = if resp.status() == StatusCode::OK {
        read_compare(resp, &body).await
    } else {
        Err(format!("status {}", resp.status()))
    };
    assert!(got.is_err(), "client must see an error, got {got:?}");
    assert_eq!(svc.cache.stats().blobs, 0);
    assert_eq!(blob_files(&svc), 0);
    // The next request goes upstream again, and this time it works.
    upstream.set_mode("/k", Mode::Normal);
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(read_compare(resp, &body).await, Ok(body.len()));
    assert_eq!(upstream.gets("/k"), 2);
    assert_eq!(svc.cache.stats().blobs, 1);
    svc.stop().await;
}

#[tokio::test]
async fn wrong_sha256_is_not_cached_and_is_retried() {
    let body = generated(3 << 20, 5);
    let upstream = Upstream::start(vec![("/i".into(), body.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), Config::default()).await;
    let wrong = sha256_hex(b"something else");
    let url = artifact_url(&svc, &format!("{}/i", upstream.url()), Some(wrong)).await;
    for attempt in 1..=2u64 {
        let resp = reqwest::get(&url).await.unwrap();
        let got = if resp.status() == StatusCode::OK {
            read_compare(resp, &body).await
        } else {
            Err(format!("status {}", resp.status()))
        };
        assert!(got.is_err(), "attempt {attempt}: client must see an error");
        assert_eq!(
            upstream.gets("/i"),
            attempt,
            "every request retries upstream"
        );
        assert_eq!(svc.cache.stats().blobs, 0);
        assert_eq!(blob_files(&svc), 0);
    }
    // With the right checksum it is fetched, verified and kept.
    let url = artifact_url(
        &svc,
        &format!("{}/i", upstream.url()),
        Some(sha256_hex(&body)),
    )
    .await;
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(read_compare(resp, &body).await, Ok(body.len()));
    assert_eq!(svc.cache.stats().blobs, 1);
    svc.stop().await;
}

#[tokio::test]
async fn revalidates_after_ttl_and_serves_stale_when_upstream_is_down() {
    let v1 = generated(1 << 20, 11);
    let v2 = generated(1 << 20, 12);
    let upstream = Upstream::start(vec![("/r".into(), v1.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(|c| {
        c.cache = CacheConfig {
            ttl_seconds: 0,
            revalidate_timeout_seconds: 2,
            ..CacheConfig::default()
        }
    });
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), config).await;
    let url = artifact_url(&svc, &format!("{}/r", upstream.url()), None).await;
    let get = |url: String| async move {
        let resp = reqwest::get(&url).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let how = resp.headers()["x-dutgate-cache"]
            .to_str()
            .unwrap()
            .to_string();
        (how, resp.bytes().await.unwrap())
    };
    assert_eq!(get(url.clone()).await, ("miss".to_string(), v1.clone()));
    // TTL 0: the next request asks the upstream with the validators; it says 304.
    assert_eq!(
        get(url.clone()).await,
        ("revalidated".to_string(), v1.clone())
    );
    let c = upstream.counts("/r");
    assert_eq!((c.gets, c.conditional, c.not_modified), (1, 1, 1));
    // Changed upstream: the new content replaces the old.
    upstream.set_data("/r", v2.clone());
    assert_eq!(get(url.clone()).await.1, v2);
    assert_eq!(upstream.gets("/r"), 2);
    assert_eq!(
        svc.cache.stats().blobs,
        1,
        "the replaced content is dropped"
    );
    assert_eq!(blob_files(&svc), 1);
    // Upstream gone: the cached copy is still served.
    upstream.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(get(url.clone()).await, ("stale".to_string(), v2.clone()));
    assert_eq!(svc.cache.stats().stale_served, 1);
    svc.stop().await;
}

#[tokio::test]
async fn range_and_etag() {
    let body = generated(100_000, 13);
    let upstream = Upstream::start(vec![("/x".into(), body.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), Config::default()).await;
    let url = artifact_url(&svc, &format!("{}/x", upstream.url()), None).await;
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(&url).send().await.unwrap().bytes().await.unwrap(),
        body
    );
    let r = http
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    let etag = r.headers()["etag"].clone();
    assert_eq!(r.bytes().await.unwrap(), body.slice(10..20));
    let r = http
        .get(&url)
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), body.slice(99_995..));
    let r = http
        .get(&url)
        .header("range", "bytes=200000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let r = http
        .get(&url)
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = http
        .get(&url)
        .header("range", "bytes=0-0")
        .header("if-range", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "stale If-Range gets the whole body"
    );
    let r = http.head(&url).send().await.unwrap();
    assert_eq!(r.headers()["content-length"], "100000");
    assert_eq!(upstream.gets("/x"), 1);
    svc.stop().await;
}

#[tokio::test]
async fn evicts_least_recently_used_beyond_the_size_limit() {
    const MB: usize = 1 << 20;
    let (a, b, c) = (generated(MB, 21), generated(MB, 22), generated(MB, 23));
    let upstream = Upstream::start(vec![
        ("/a".into(), a.clone()),
        ("/b".into(), b.clone()),
        ("/c".into(), c.clone()),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_with(|c| {
        c.cache = CacheConfig {
            max_size_bytes: (5 * MB / 2) as u64,
            ..CacheConfig::default()
        }
    });
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), config).await;
    let mut urls = Vec::new();
    for p in ["/a", "/b", "/c"] {
        urls.push(artifact_url(&svc, &format!("{}{p}", upstream.url()), None).await);
    }
    let fetch = |u: String| async move { reqwest::get(&u).await.unwrap().bytes().await.unwrap() };
    let tick = || tokio::time::sleep(Duration::from_millis(5));
    assert_eq!(fetch(urls[0].clone()).await, a);
    tick().await;
    assert_eq!(fetch(urls[1].clone()).await, b);
    tick().await;
    assert_eq!(fetch(urls[0].clone()).await, a); // a is now more recent than b
    tick().await;
    assert_eq!(fetch(urls[2].clone()).await, c); // 3 MB > 2.5 MB: b goes
    let stats = svc.cache.stats();
    assert_eq!((stats.evictions, stats.blobs), (1, 2), "{stats:?}");
    assert_eq!(blob_files(&svc), 2);
    assert_eq!(fetch(urls[0].clone()).await, a);
    assert_eq!(upstream.gets("/a"), 1, "a was kept");
    assert_eq!(fetch(urls[1].clone()).await, b);
    assert_eq!(upstream.gets("/b"), 2, "b was evicted and fetched again");
    svc.stop().await;
}

#[tokio::test]
async fn file_urls_are_served_in_place_and_confined_to_roots() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    std::fs::create_dir_all(&root).unwrap();
    let data = generated(300_000, 31);
    std::fs::write(root.join("vmlinuz"), &data).unwrap();
    let config = config_with(|c| c.file_roots = vec![root.clone()]);
    let svc = TestBoot::start(gateway(&dir.path().join("state")), config).await;
    let url = artifact_url(&svc, &format!("file://{}/vmlinuz", root.display()), None).await;
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.headers()["x-dutgate-cache"], "file");
    assert_eq!(resp.bytes().await.unwrap(), data);
    assert_eq!(
        svc.cache.stats().blobs,
        0,
        "file:// sources are never copied"
    );
    // A pinned checksum is checked.
    let url = artifact_url(
        &svc,
        &format!("file://{}/vmlinuz", root.display()),
        Some(sha256_hex(b"nope")),
    )
    .await;
    assert_eq!(
        reqwest::get(&url).await.unwrap().status(),
        StatusCode::BAD_GATEWAY
    );
    // Files outside the roots are refused when the config is set.
    let err = common::writer(&svc)
        .put(
            MachineId::parse(MAC).unwrap(),
            &BootConfig {
                kernel: Kernel {
                    url: "file:///etc/shadow".into(),
                    cmdline: String::new(),
                    sha256: None,
                },
                initramfs: vec![],
                job_id: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    svc.stop().await;
}

#[tokio::test]
async fn cache_survives_a_restart() {
    let body = generated(500_000, 41);
    let upstream = Upstream::start(vec![("/p".into(), body.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), Config::default()).await;
    let url = artifact_url(&svc, &format!("{}/p", upstream.url()), None).await;
    assert_eq!(
        reqwest::get(&url).await.unwrap().bytes().await.unwrap(),
        body
    );
    let path = url.split_once("/artifacts/").unwrap().1.to_string();
    svc.stop().await;
    let svc = TestBoot::start(upstream.allowed(gateway(dir.path())), Config::default()).await;
    let resp = reqwest::get(format!("{}/artifacts/{path}", svc.url()))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-dutgate-cache"], "hit");
    assert_eq!(resp.bytes().await.unwrap(), body);
    assert_eq!(upstream.gets("/p"), 1);
    svc.stop().await;
}
