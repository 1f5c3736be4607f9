//! The DUT image at stable URLs (`/dut-image/vmlinuz`, `/dut-image/initramfs.cpio`): who may
//! read it, what a missing image says, that no other path reaches the disk, and that boot
//! configs naming these URLs are served from the image directory in place.

use std::io::{Read, Write};

use dutgate_boot::testing::{ADMIN_TOKEN, TestBoot, USER_TOKEN, gateway};
use dutgate_boot::{Artifact, BootConfig, Config, Kernel};
use reqwest::StatusCode;

const KERNEL: &[u8] = b"kernel image bytes: 0123456789abcdef";
const INITRAMFS: &[u8] = b"initramfs bytes";

/// A state dir whose `dut-image/` holds the two files, plus a private file next to them.
fn state_with_image() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("dut-image");
    std::fs::create_dir_all(&image).unwrap();
    std::fs::write(image.join("vmlinuz"), KERNEL).unwrap();
    std::fs::write(image.join("initramfs.cpio"), INITRAMFS).unwrap();
    std::fs::write(image.join("image.json"), b"{\"private\": true}").unwrap();
    std::fs::write(dir.path().join("secret"), b"not for DUTs").unwrap();
    dir
}

async fn error_of(r: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    r.json().await.unwrap()
}

#[tokio::test]
async fn served_to_the_dut_network_with_validators_and_ranges() {
    let dir = state_with_image();
    // The test gateway's DUT networks are the defaults, which include loopback.
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/dut-image/vmlinuz", svc.url());
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let h = r.headers().clone();
    assert_eq!(h["content-length"], KERNEL.len().to_string().as_str());
    assert_eq!(h["accept-ranges"], "bytes");
    assert!(h.get("x-dutgate-cache").is_none());
    let etag = h["etag"].to_str().unwrap().to_string();
    let modified = h["last-modified"].to_str().unwrap().to_string();
    assert_eq!(r.bytes().await.unwrap().as_ref(), KERNEL);

    let r = http
        .get(&url)
        .header("range", "bytes=7-11")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 7-11/{}", KERNEL.len()).as_str()
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &KERNEL[7..12]);

    let r = http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = http
        .get(&url)
        .header("if-modified-since", &modified)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    // iPXE asks HEAD nowhere, but curl -I does: length without a body.
    let r = http.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-length"],
        KERNEL.len().to_string().as_str()
    );

    let r = http
        .get(format!("{}/dut-image/initramfs.cpio", svc.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), INITRAMFS);

    // A rebuild renames new files into place: the next answer is the new file, whole, with
    // a new validator.
    let image = dir.path().join("dut-image");
    std::fs::write(image.join(".vmlinuz.tmp"), b"rebuilt kernel").unwrap();
    std::fs::rename(image.join(".vmlinuz.tmp"), image.join("vmlinuz")).unwrap();
    let r = http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"rebuilt kernel");
}

#[tokio::test]
async fn outsiders_are_refused_and_tokens_admitted() {
    let dir = state_with_image();
    let mut gw = gateway(dir.path());
    // The test client (127.0.0.1) is not on the DUT network.
    gw.auth.dut_networks = vec!["10.99.0.0/24".parse().unwrap()];
    let svc = TestBoot::start(gw, Config::default()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/dut-image/vmlinuz", svc.url());
    for req in [http.get(&url), http.get(&url).bearer_auth(USER_TOKEN)] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let body = error_of(r).await;
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("gateway.auth.dut_networks"),
            "{body}"
        );
    }
    let r = http
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), KERNEL);
}

#[tokio::test]
async fn a_missing_image_names_the_command_that_builds_it() {
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let r = reqwest::get(format!("{}/dut-image/initramfs.cpio", svc.url()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body = error_of(r).await;
    let msg = body["error"].as_str().unwrap();
    assert!(msg.contains("`dutgate dut-image`"), "{msg}");
    assert!(msg.contains("initramfs.cpio"), "{msg}");
}

/// Sends `GET <path>` byte for byte (no client normalises `..` away) and returns the status
/// line and body.
fn raw_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.lines().next().unwrap_or_default().to_string();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (status, body)
}

#[tokio::test]
async fn no_other_path_reaches_the_disk() {
    let dir = state_with_image();
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let addr = svc.addr;
    let answers = tokio::task::spawn_blocking(move || {
        [
            "/dut-image/image.json",
            "/dut-image/..%2Fsecret",
            "/dut-image/%2e%2e%2fsecret",
            "/dut-image/../secret",
            "/dut-image/./vmlinuz/../../secret",
            "/dut-image/vmlinuz%00",
            "/dut-image/vmlinuz/",
            "/dut-image/",
        ]
        .map(|p| (p, raw_get(addr, p)))
    })
    .await
    .unwrap();
    for (path, (status, body)) in answers {
        assert!(status.contains(" 404 "), "{path}: {status}");
        assert!(!body.contains("not for DUTs"), "{path}: {body}");
        assert!(!body.contains("private"), "{path}: {body}");
    }
    // The one unknown name inside the route is answered in JSON naming the field.
    let r = reqwest::get(format!("{}/dut-image/image.json", svc.url()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_of(r).await["field"], "file");
}

/// A boot config naming the stable URLs (what the trainer's jobs and the registration
/// default do) is served from the image directory through `/artifacts/`, so the executor's
/// prefetch and lease checks apply as to any artifact, without the service fetching itself.
#[tokio::test]
async fn boot_configs_naming_the_image_are_served_in_place() {
    let dir = state_with_image();
    let public = "http://gw.test:8003";
    let image_url = |f: &str| format!("{public}/dut-image/{f}");
    let config = Config {
        public_url: Some(public.into()),
        default: Some(BootConfig {
            kernel: Kernel {
                url: image_url("vmlinuz"),
                cmdline: "dutgate.action=register".into(),
                sha256: None,
            },
            initramfs: vec![Artifact {
                url: image_url("initramfs.cpio"),
                sha256: None,
            }],
            job_id: None,
        }),
        ..Config::default()
    };
    let svc = TestBoot::start(gateway(dir.path()), config).await;
    let http = reqwest::Client::new();
    let script = http
        .get(format!("{}/boot/52:54:00:00:00:01/boot.ipxe", svc.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let artifacts: Vec<&str> = script
        .split_whitespace()
        .filter(|w| w.starts_with(&format!("{public}/artifacts/")))
        .collect();
    assert_eq!(artifacts.len(), 2, "{script}");
    for (url, want) in artifacts.iter().zip([KERNEL, INITRAMFS]) {
        let local = url.replace(public, &svc.url());
        let r = http.get(&local).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        assert_eq!(r.headers()["x-dutgate-cache"], "file");
        assert!(r.headers().contains_key("last-modified"));
        assert_eq!(r.bytes().await.unwrap().as_ref(), want);
    }
    assert_eq!(svc.cache.stats().upstream_requests, 0);

    // A job may name them too, with the job's own URL checks (none fetch anything).
    let job = BootConfig {
        kernel: Kernel {
            url: image_url("vmlinuz"),
            cmdline: String::new(),
            sha256: None,
        },
        initramfs: vec![],
        job_id: Some("7".into()),
    };
    let r = http
        .put(format!("{}/api/v1/boot/52:54:00:00:00:02", svc.url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert_eq!(svc.cache.stats().upstream_requests, 0);
}
