//! Acceptance tests against real peers: Debian's `docker-registry` as the upstream and `skopeo`
//! as the client. The proxy runs in-process on 127.0.0.1:0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use dutgate_core::auth::Auth;
use dutgate_core::testing::require_program;
use dutgate_registry::reference::Digest;
use dutgate_registry::testkit::{
    DockerRegistry, ImageSpec, skopeo, tree_digests, write_image_layout, write_index_layout,
};
use dutgate_registry::{Config, Registry, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(120);

fn peers() {
    require_program("docker-registry", "docker-registry");
    require_program("skopeo", "skopeo");
}

struct Proxy {
    addr: SocketAddr,
    reg: Arc<Registry>,
    cache: Arc<tempfile::TempDir>,
    stop: CancellationToken,
}

impl Proxy {
    async fn start(upstream: &str, tag_ttl_seconds: u64) -> Self {
        Self::start_in(
            Arc::new(tempfile::tempdir().unwrap()),
            upstream,
            tag_ttl_seconds,
        )
        .await
    }

    /// A proxy on an existing cache directory (a restart).
    async fn start_in(cache: Arc<tempfile::TempDir>, upstream: &str, tag_ttl_seconds: u64) -> Self {
        let config = Config {
            tag_ttl_seconds,
            upstream_timeout_seconds: 10.0,
            upstreams: vec![UpstreamConfig::new("up/", upstream)],
            default_upstream: Some("up/".into()),
            ..Config::default()
        };
        let reg = Registry::open(&config, cache.path()).await.unwrap();
        let auth = Auth::new(None, None, dutgate_core::config::default_dut_networks());
        let app = dutgate_core::http::with_common_routes("registry", reg.router(auth), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            dutgate_core::http::serve(listener, app, s, Duration::from_secs(1)).await
        });
        Self {
            addr,
            reg,
            cache,
            stop,
        }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn blob_file_exists(&self, d: &Digest) -> bool {
        self.cache
            .path()
            .join("blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex())
            .exists()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn push(layout: &Path, tag: &str, dest: &str, extra: &[&str]) {
    let src = format!("oci:{}:{tag}", layout.display());
    let mut args = vec!["copy", "--dest-tls-verify=false"];
    args.extend_from_slice(extra);
    args.push(&src);
    args.push(dest);
    let out = skopeo(&args, LIMIT).await.unwrap();
    assert!(
        out.status.success(),
        "push failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `skopeo copy docker://<src> dir:<dest>`; returns the output for the caller to judge.
async fn pull(src: &str, dest: &Path, all: bool) -> std::process::Output {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    let d = format!("dir:{}", dest.display());
    let s = format!("docker://{src}");
    let mut args = vec!["copy", "--src-tls-verify=false"];
    if all {
        args.push("--all");
    }
    args.push(&s);
    args.push(&d);
    skopeo(&args, LIMIT).await.unwrap()
}

async fn pull_ok(src: &str, dest: &Path, all: bool) {
    let out = pull(src, dest, all).await;
    assert!(
        out.status.success(),
        "pull of {src} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spec_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["errors"][0]["code"].as_str().unwrap_or("").to_string()
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

async fn manifest_digest(base: &str, repo: &str, tag: &str) -> (String, String) {
    let r = reqwest::Client::new()
        .head(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let h = |k: &str| r.headers()[k].to_str().unwrap().to_string();
    (h("Docker-Content-Digest"), h("Content-Type"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_through_the_proxy_are_byte_identical() {
    peers();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut upstream = DockerRegistry::start(&w.join("up"), None).await.unwrap();
    let up = upstream.host();

    let multi = write_image_layout(
        &w.join("multi"),
        "v1",
        &ImageSpec::new(1, vec![300_000, 1_000_000, 2_000_000, 50_000], false),
    )
    .unwrap();
    let mut arm = ImageSpec::new(3, vec![200_000, 100_000], true);
    arm.architecture = "arm64".into();
    write_index_layout(
        &w.join("index"),
        "v1",
        &[ImageSpec::new(2, vec![200_000, 100_000], true), arm],
    )
    .unwrap();
    write_image_layout(
        &w.join("v2s2"),
        "v1",
        &ImageSpec::new(4, vec![500_000, 700_000], true),
    )
    .unwrap();
    push(
        &w.join("multi"),
        "v1",
        &format!("docker://{up}/lab/multi:v1"),
        &[],
    )
    .await;
    push(
        &w.join("index"),
        "v1",
        &format!("docker://{up}/lab/index:v1"),
        &["--all"],
    )
    .await;
    push(
        &w.join("v2s2"),
        "v1",
        &format!("docker://{up}/lab/v2s2:v1"),
        &["--format", "v2s2"],
    )
    .await;

    let proxy = Proxy::start(&upstream.url(), 300).await;
    let px = proxy.host();
    let cases = [
        (
            "lab/multi",
            false,
            "application/vnd.oci.image.manifest.v1+json",
        ),
        ("lab/index", true, "application/vnd.oci.image.index.v1+json"),
        (
            "lab/v2s2",
            false,
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
    ];
    for (i, (repo, all, media_type)) in cases.iter().enumerate() {
        let direct = w.join(format!("out/{i}/direct"));
        pull_ok(&format!("{up}/{repo}:v1"), &direct, *all).await;
        let want = tree_digests(&direct).unwrap();
        assert!(want.len() >= 3, "{repo}: {want:?}");

        // By tag, through the default upstream and through the `up/` prefix.
        for (j, name) in [repo.to_string(), format!("up/{repo}")].iter().enumerate() {
            let out = w.join(format!("out/{i}/tag{j}"));
            pull_ok(&format!("{px}/{name}:v1"), &out, *all).await;
            assert_eq!(tree_digests(&out).unwrap(), want, "{name} by tag");
        }
        // By digest.
        let (digest, ctype) = manifest_digest(&upstream.url(), repo, "v1").await;
        assert_eq!(&ctype, media_type);
        let out = w.join(format!("out/{i}/digest"));
        pull_ok(&format!("{px}/{repo}@{digest}"), &out, *all).await;
        assert_eq!(tree_digests(&out).unwrap(), want, "{repo} by digest");
        // Same headers as the upstream.
        let (pd, pt) = manifest_digest(&format!("http://{px}"), repo, "v1").await;
        assert_eq!((pd, pt), (digest, ctype));
    }
    assert_eq!(proxy.reg.stats.snapshot().verify_failures, 0);

    // Range and HEAD on a blob, compared with the upstream's bytes.
    let http = reqwest::Client::new();
    let m: serde_json::Value = http
        .get(format!("{}/v2/lab/multi/manifests/v1", upstream.url()))
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["layers"].as_array().unwrap().len(), multi.blobs.len() - 1);
    let layer = m["layers"][1]["digest"].as_str().unwrap().to_string();
    let full = http
        .get(format!("{}/v2/lab/multi/blobs/{layer}", upstream.url()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r = http
        .get(format!("http://{px}/v2/lab/multi/blobs/{layer}"))
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["Content-Range"],
        format!("bytes 1000-1999/{}", full.len()).as_str()
    );
    assert_eq!(&r.bytes().await.unwrap()[..], &full[1000..2000]);
    let r = http
        .head(format!("http://{px}/v2/lab/multi/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["Content-Length"],
        full.len().to_string().as_str()
    );
    assert_eq!(
        r.headers()["Docker-Content-Digest"],
        layer.to_string().as_str()
    );
    let r = http
        .get(format!("http://{px}/v2/lab/multi/blobs/{layer}"))
        .header("Range", format!("bytes={}-", full.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // Push is refused, with the spec's error.
    let r = http
        .post(format!("http://{px}/v2/lab/pushed/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(spec_code(&r.bytes().await.unwrap()), "UNSUPPORTED");
    let out = skopeo(
        &[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", w.join("multi").display()),
            &format!("docker://{px}/lab/pushed:v1"),
        ],
        LIMIT,
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        err.contains("unsupported") || err.contains("read-only"),
        "{err}"
    );
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_pulls_fetch_each_blob_once() {
    peers();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut upstream = DockerRegistry::start(&w.join("up"), None).await.unwrap();
    let image = write_image_layout(
        &w.join("big"),
        "v1",
        &ImageSpec::new(10, vec![10_000_000; 4], false),
    )
    .unwrap();
    push(
        &w.join("big"),
        "v1",
        &format!("docker://{}/lab/big:v1", upstream.host()),
        &[],
    )
    .await;
    let before = upstream.blob_gets("lab/big").unwrap();
    let proxy = Proxy::start(&upstream.url(), 300).await;

    const CLIENTS: usize = 20;
    let mut pulls = Vec::new();
    for i in 0..CLIENTS {
        let src = format!("{}/lab/big:v1", proxy.host());
        let dest = w.join(format!("out/{i}"));
        pulls.push(tokio::spawn(async move {
            pull_ok(&src, &dest, false).await;
            tree_digests(&dest).unwrap()
        }));
    }
    let mut trees = Vec::new();
    for p in pulls {
        trees.push(p.await.unwrap());
    }
    // skopeo verified every blob's digest; all copies are also the same bytes.
    assert!(trees.iter().all(|t| t == &trees[0]));
    assert_eq!(trees[0].len(), image.blobs.len() + 2, "{:?}", trees[0]);

    let gets = upstream.blob_gets("lab/big").unwrap() - before;
    let stats = proxy.reg.stats.snapshot();
    eprintln!("upstream blob GETs: {gets}; proxy stats: {stats:?}");
    assert_eq!(
        gets,
        image.blobs.len(),
        "each blob fetched upstream exactly once"
    );
    assert_eq!(stats.blob_misses, image.blobs.len() as u64);
    // skopeo gzips plain tar layers on push, so count what the upstream actually sent.
    let sent = upstream.blob_bytes_sent("lab/big").unwrap();
    assert!(sent >= image.blob_bytes(), "{sent}");
    assert_eq!(stats.upstream_bytes, sent);
    assert_eq!(
        stats.blob_hits + stats.coalesced + stats.blob_misses,
        (CLIENTS * image.blobs.len()) as u64
    );
    assert!(stats.served_bytes >= CLIENTS as u64 * image.blob_bytes());
    // The same counters over the API.
    let client = dutgate_registry::RegistryClient::new(format!("http://{}", proxy.host()), None);
    let over_api = client.stats().await.unwrap();
    assert_eq!(over_api.blob_misses, stats.blob_misses);
    assert_eq!(over_api.upstream_bytes, stats.upstream_bytes);
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_outage_serves_warm_content_and_fails_cold_pulls_fast() {
    peers();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let mut upstream = DockerRegistry::start(&w.join("up"), None).await.unwrap();
    let up = upstream.host();
    write_image_layout(
        &w.join("a"),
        "v1",
        &ImageSpec::new(20, vec![400_000, 90_000], false),
    )
    .unwrap();
    write_image_layout(
        &w.join("b"),
        "v1",
        &ImageSpec::new(21, vec![300_000], false),
    )
    .unwrap();
    push(&w.join("a"), "v1", &format!("docker://{up}/lab/a:v1"), &[]).await;
    push(&w.join("b"), "v1", &format!("docker://{up}/lab/b:v1"), &[]).await;
    let (digest, _) = manifest_digest(&upstream.url(), "lab/a", "v1").await;

    // TTL 0: every tag pull revalidates upstream, so the outage is noticed on the next pull.
    let proxy = Proxy::start(&upstream.url(), 0).await;
    let px = proxy.host();
    pull_ok(&format!("{px}/lab/a:v1"), &w.join("warm"), false).await;
    let want = tree_digests(&w.join("warm")).unwrap();
    pull_ok(&format!("{px}/lab/a@{digest}"), &w.join("warm-d"), false).await;

    upstream.stop().await;

    pull_ok(&format!("{px}/lab/a:v1"), &w.join("tag"), false).await;
    assert_eq!(tree_digests(&w.join("tag")).unwrap(), want);
    pull_ok(&format!("{px}/lab/a@{digest}"), &w.join("dig"), false).await;
    assert_eq!(tree_digests(&w.join("dig")).unwrap(), want);
    assert!(proxy.reg.stats.snapshot().stale_serves >= 1);

    // Restarted while the upstream is still down: the index comes back from disk.
    let cache = proxy.cache.clone();
    drop(proxy);
    let proxy = Proxy::start_in(cache, &upstream.url(), 0).await;
    let px = proxy.host();
    pull_ok(&format!("{px}/lab/a:v1"), &w.join("restarted"), false).await;
    assert_eq!(tree_digests(&w.join("restarted")).unwrap(), want);
    let s = proxy.reg.stats.snapshot();
    assert!(s.stale_serves >= 1 && s.blob_misses == 0, "{s:?}");

    // Cold: a clear error, quickly (the connection is refused; no retry loop).
    let started = std::time::Instant::now();
    let out = pull(&format!("{px}/lab/b:v1"), &w.join("cold"), false).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // skopeo 1.9 prints the status only; the body says why.
    assert!(err.contains("503"), "{err}");
    eprintln!("cold pull failed after {:?}: {err}", started.elapsed());
    let r = reqwest::get(format!("http://{px}/v2/lab/b/manifests/v1"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = r.bytes().await.unwrap();
    assert_eq!(spec_code(&body), "UNAVAILABLE");
    assert!(String::from_utf8_lossy(&body).contains("unreachable"));
}

/// A small upstream serving one image from an OCI layout, able to corrupt a layer or answer 429.
#[derive(Clone)]
struct FaultyUpstream {
    blobs: Arc<HashMap<String, Vec<u8>>>,
    manifest: Arc<(String, Vec<u8>)>,
    corrupt: Arc<AtomicBool>,
    rate_limited: Arc<AtomicBool>,
}

async fn faulty_upstream(layout: &Path, manifest_digest: &Digest) -> (String, FaultyUpstream) {
    use axum::extract::{Path as UrlPath, State};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let mut blobs = HashMap::new();
    for e in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        blobs.insert(
            format!("sha256:{}", e.file_name().to_str().unwrap()),
            std::fs::read(e.path()).unwrap(),
        );
    }
    let manifest = blobs[&manifest_digest.to_string()].clone();
    let state = FaultyUpstream {
        blobs: Arc::new(blobs),
        manifest: Arc::new((manifest_digest.to_string(), manifest)),
        corrupt: Arc::new(AtomicBool::new(true)),
        rate_limited: Arc::new(AtomicBool::new(false)),
    };
    let app = axum::Router::new()
        .route("/v2/", get(|| async { "{}" }))
        .route(
            "/v2/lab/bad/manifests/{reference}",
            get(
                |State(s): State<FaultyUpstream>, UrlPath(_r): UrlPath<String>| async move {
                    if s.rate_limited.load(Ordering::SeqCst) {
                        return StatusCode::TOO_MANY_REQUESTS.into_response();
                    }
                    (
                        [
                            (
                                "Content-Type",
                                dutgate_registry::testkit::OCI_MANIFEST.to_string(),
                            ),
                            ("Docker-Content-Digest", s.manifest.0.clone()),
                        ],
                        s.manifest.1.clone(),
                    )
                        .into_response()
                },
            ),
        )
        .route(
            "/v2/lab/bad/blobs/{digest}",
            get(
                |State(s): State<FaultyUpstream>, UrlPath(d): UrlPath<String>| async move {
                    if s.rate_limited.load(Ordering::SeqCst) {
                        return StatusCode::TOO_MANY_REQUESTS.into_response();
                    }
                    let Some(b) = s.blobs.get(&d) else {
                        return StatusCode::NOT_FOUND.into_response();
                    };
                    let mut b = b.clone();
                    if s.corrupt.load(Ordering::SeqCst) && b.len() > 100_000 {
                        b[50_000] ^= 0xff;
                    }
                    b.into_response()
                },
            ),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_upstream_blob_is_refused_and_not_cached() {
    peers();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let image = write_image_layout(
        &w.join("img"),
        "v1",
        &ImageSpec::new(30, vec![3_000_000, 20_000], false),
    )
    .unwrap();
    let (url, faults) = faulty_upstream(&w.join("img"), &image.top_digest).await;
    let proxy = Proxy::start(&url, 0).await;
    let px = proxy.host();
    let big = image.blobs[0].0.clone();

    let out = pull(&format!("{px}/lab/bad:v1"), &w.join("o1"), false).await;
    assert!(!out.status.success(), "a corrupted pull must fail");
    // A direct GET never yields a complete body either.
    let r = reqwest::get(format!("http://{px}/v2/lab/bad/blobs/{big}"))
        .await
        .unwrap();
    assert!(
        r.bytes().await.is_err(),
        "the body must be cut, not completed"
    );
    // The proxy counts the failure and removes the partial download after cutting the body.
    let leftovers = || {
        std::fs::read_dir(proxy.cache.path().join("tmp/blobs"))
            .unwrap()
            .count()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.reg.stats.snapshot().verify_failures < 1 || leftovers() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 10 s: {} verify failures, {} partial downloads left",
            proxy.reg.stats.snapshot().verify_failures,
            leftovers()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!proxy.reg.blobs.contains(&big));
    assert!(!proxy.blob_file_exists(&big));

    faults.corrupt.store(false, Ordering::SeqCst);
    pull_ok(&format!("{px}/lab/bad:v1"), &w.join("o2"), false).await;
    assert!(proxy.reg.blobs.contains(&big) && proxy.blob_file_exists(&big));

    // Rate-limited upstream: the cached tag is served (stale) and counted.
    faults.rate_limited.store(true, Ordering::SeqCst);
    let stale_before = proxy.reg.stats.snapshot().stale_serves;
    pull_ok(&format!("{px}/lab/bad:v1"), &w.join("o3"), false).await;
    assert_eq!(
        tree_digests(&w.join("o3")).unwrap(),
        tree_digests(&w.join("o2")).unwrap()
    );
    assert!(proxy.reg.stats.snapshot().stale_serves > stale_before);
}

async fn raw_request(addr: SocketAddr, method: &str, path: &str) -> (u16, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.as_bytes().to_vec())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_paths_get_spec_errors() {
    // Nothing listens on port 9: a cold request must fail fast and clearly.
    let proxy = Proxy::start("http://127.0.0.1:9", 300).await;
    let hex = "0".repeat(64);
    let long_name = "a".repeat(300);
    let long_tag = "t".repeat(200);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "GET",
            "/v2/../etc/passwd/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/lab/../../etc/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/lab/%2e%2e/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/lab%2f..%2fx/manifests/latest".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/lab/x/manifests/%2e%2e".into(),
            400,
            "TAG_INVALID",
        ),
        ("GET", "/v2/lab/x/manifests/..".into(), 400, "TAG_INVALID"),
        (
            "GET",
            format!("/v2/lab/x/blobs/md5:{hex}"),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/lab/x/blobs/sha512:{hex}{hex}"),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/lab/x/blobs/sha256:../../../etc/passwd".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            "GET",
            "/v2/lab/x/blobs/sha256:..%2f..%2fetc".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/lab/x/blobs/sha256:{}", "A".repeat(64)),
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            format!("/v2/{long_name}/manifests/latest"),
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            format!("/v2/lab/x/manifests/{long_tag}"),
            400,
            "TAG_INVALID",
        ),
        ("GET", "/v2/lab/x/nothing/here".into(), 404, "NAME_UNKNOWN"),
        (
            "DELETE",
            "/v2/lab/x/manifests/latest".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "PUT",
            "/v2/lab/x/manifests/latest".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "PATCH",
            "/v2/lab/x/blobs/uploads/123".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            "GET",
            format!("/v2/lab/x/blobs/sha256:{hex}"),
            503,
            "UNAVAILABLE",
        ),
        (
            "GET",
            "/v2/lab/x/manifests/latest".into(),
            503,
            "UNAVAILABLE",
        ),
    ];
    for (method, path, status, code) in cases {
        let (got, body) = raw_request(proxy.addr, method, &path).await;
        assert_eq!(
            got,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(spec_code(&body), code, "{method} {path}");
    }
    let r = reqwest::get(format!("http://{}/v2/", proxy.addr))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["Docker-Distribution-API-Version"],
        "registry/2.0"
    );
    // Nothing was written outside the store's own directories.
    let mut top: Vec<String> = std::fs::read_dir(proxy.cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["blobs", "manifests", "tags", "tmp"]);
}
