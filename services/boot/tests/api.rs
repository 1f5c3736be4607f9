//! The REST API and the script endpoints, served in-process on 127.0.0.1:0.

mod common;

use dutgate_boot::testing::{ADMIN_TOKEN, TestBoot, USER_TOKEN, gateway};
use dutgate_boot::{Artifact, BootConfig, Config, Kernel};
use dutgate_core::MachineId;
use reqwest::StatusCode;
use serde_json::json;

const MAC: &str = "52:54:00:12:34:56";

fn job_config(job: &str) -> BootConfig {
    BootConfig {
        kernel: Kernel {
            url: "http://upstream.example/k/vmlinuz".into(),
            cmdline: "console=ttyS0 a;b".into(),
            sha256: None,
        },
        initramfs: vec![Artifact {
            url: "http://upstream.example/i/initrd.img".into(),
            sha256: None,
        }],
        job_id: Some(job.into()),
    }
}

fn default_config() -> Config {
    Config {
        default: Some(BootConfig {
            kernel: Kernel {
                url: "http://upstream.example/default/vmlinuz".into(),
                cmdline: "console=ttyS0 register".into(),
                sha256: None,
            },
            initramfs: vec![],
            job_id: None,
        }),
        ..Config::default()
    }
}

/// GET a script as an admin (who reads any machine's job script; DUT peers are checked in
/// tests/scripts.rs).
async fn script(url: String) -> String {
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("#!ipxe\n"), "{text}");
    text
}

#[tokio::test]
async fn put_get_delete_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/boot/{MAC}", svc.url());
    let r = http.put(&url).json(&job_config("1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A user neither reads boot configs (they carry the jobs' keys) nor writes any: the
    // reason names what would do.
    let mac = MachineId::parse(MAC).unwrap();
    for r in [
        http.get(&url).bearer_auth(USER_TOKEN),
        http.get(format!("{}/api/v1/boot", svc.url()))
            .bearer_auth(USER_TOKEN),
        http.put(&url)
            .bearer_auth(USER_TOKEN)
            .json(&job_config("1")),
        http.delete(&url).bearer_auth(USER_TOKEN),
    ] {
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let v: serde_json::Value = r.json().await.unwrap();
        let why = v["error"].as_str().unwrap();
        assert!(
            (why.contains("service role") && why.contains("X-Lease-Id"))
                || why.contains("service or admin role"),
            "{why}"
        );
    }
    let client = common::writer(&svc);
    let stored = client.put(mac, &job_config("1")).await.unwrap();
    assert_eq!(stored.mac, mac);
    assert_eq!(
        client.get(mac).await.unwrap().unwrap().config,
        job_config("1")
    );
    // The admin token works too; other spellings of the MAC name the same machine.
    let r = http
        .get(format!("{}/api/v1/boot/52-54-00-12-34-56", svc.url()))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(client.list().await.unwrap().len(), 1);
    // A late teardown of another job does not clear this job's config.
    let err = client.delete(mac, Some("0")).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::CONFLICT));
    client.delete(mac, Some("1")).await.unwrap();
    assert_eq!(client.get(mac).await.unwrap(), None);
    client.delete(mac, None).await.unwrap(); // idempotent
    svc.stop().await;
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let http = reqwest::Client::new();
    let put = |mac: &str, body: serde_json::Value| {
        http.put(format!("{}/api/v1/boot/{mac}", svc.url()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let check = |r: reqwest::Response, status: StatusCode, field: &'static str| async move {
        assert_eq!(r.status(), status);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["field"], field, "{v}");
    };
    let ok = json!({"kernel": {"url": "http://x/k", "cmdline": "a"}});
    check(
        put("nope", ok.clone()).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "mac",
    )
    .await;
    let r = put(
        MAC,
        json!({"kernel": {"url": "http://x/k", "cmdline": "x=${y}"}}),
    )
    .await
    .unwrap();
    check(r, StatusCode::UNPROCESSABLE_ENTITY, "kernel.cmdline").await;
    let r = put(MAC, json!({"kernel": {"url": "ftp://x/k"}}))
        .await
        .unwrap();
    check(r, StatusCode::UNPROCESSABLE_ENTITY, "kernel.url").await;
    let r = put(
        MAC,
        json!({"kernel": {"url": "http://x/k"}, "initramfs": [{"url": "http://x/i", "sha256": "12"}]}),
    )
    .await
    .unwrap();
    check(r, StatusCode::UNPROCESSABLE_ENTITY, "initramfs[0].sha256").await;
    let r = put(MAC, json!({"kernel": {"url": "http://x/k", "cmd": "a"}}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(put(MAC, ok).await.unwrap().status(), StatusCode::OK);
    svc.stop().await;
}

#[tokio::test]
async fn scripts_for_job_default_and_malformed_macs() {
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(gateway(dir.path()), default_config()).await;
    let base = svc.url();
    // Unknown machine: the default (registration) config.
    let s = script(format!(
        "{base}/boot/{MAC}/boot.ipxe?platform=pcbios&buildarch=i386"
    ))
    .await;
    assert!(
        s.contains("console=ttyS0 register || goto dg_failed"),
        "{s}"
    );
    assert!(s.contains(&format!("kernel {base}/artifacts/")), "{s}");
    // A job's config, rewritten to the cache, escaped, with initrd= under EFI.
    let mac = MachineId::parse(MAC).unwrap();
    common::writer(&svc)
        .put(mac, &job_config("7"))
        .await
        .unwrap();
    let s = script(format!(
        "{base}/boot/{MAC}/boot.ipxe?platform=efi&buildarch=x86_64"
    ))
    .await;
    assert!(s.contains("set dg-semicolon:hex 3b\n"), "{s}");
    assert!(
        s.contains(
            "/vmlinuz initrd=initrd0 console=ttyS0 a${dg-semicolon:string}b || goto dg_failed"
        ),
        "{s}"
    );
    assert!(s.contains("initrd --name initrd0 http://"), "{s}");
    assert!(
        !s.contains("upstream.example"),
        "URLs must point at the cache: {s}"
    );
    assert!(s.contains("job 7"), "{s}");
    // The query form gives the same answer.
    let q = script(format!(
        "{base}/boot.ipxe?mac=52%3A54%3A00%3A12%3A34%3A56&platform=efi&buildarch=x86_64"
    ))
    .await;
    assert_eq!(q, s);
    // Malformed MAC: a script that says so and asks again with the NIC's MAC.
    for bad in ["not-a-mac", "%ff%fe", "52:54:00:12:34"] {
        let s = script(format!("{base}/boot/{bad}/boot.ipxe")).await;
        assert!(s.contains("is not a MAC address"), "{s}");
        assert!(s.contains("sleep 10\n"), "{s}");
        assert!(
            s.contains(&format!(
                "chain --replace {base}/boot/${{netX/mac}}/boot.ipxe"
            )),
            "{s}"
        );
        assert!(!s.contains("\nkernel "), "{s}");
    }
    let s = script(format!("{base}/boot.ipxe")).await;
    assert!(s.contains("is not a MAC address"), "{s}");
    svc.stop().await;
}

#[tokio::test]
async fn no_default_means_a_retry_script() {
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let s = script(format!("{}/boot/{MAC}/boot.ipxe", svc.url())).await;
    assert!(s.contains("no boot config for 52:54:00:12:34:56"), "{s}");
    assert!(s.contains(&format!(
        "chain --replace {}/boot/{MAC}/boot.ipxe",
        svc.url()
    )));
    svc.stop().await;
}

#[tokio::test]
async fn direct_urls_and_public_url() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        public_url: Some("http://10.42.0.1:8003/".into()),
        direct_url_prefixes: Some(vec!["http://10.42.0.1:9000/".into()]),
        ..Config::default()
    };
    let svc = TestBoot::start(gateway(dir.path()), config).await;
    let mut c = job_config("9");
    c.initramfs[0].url = "http://10.42.0.1:9000/boot/b2c.cpio".into();
    common::writer(&svc)
        .put(MachineId::parse(MAC).unwrap(), &c)
        .await
        .unwrap();
    let s = script(format!(
        "{}/boot/{MAC}/boot.ipxe?platform=pcbios",
        svc.url()
    ))
    .await;
    assert!(s.contains("kernel http://10.42.0.1:8003/artifacts/"), "{s}");
    assert!(
        s.contains("initrd --name initrd0 http://10.42.0.1:9000/boot/b2c.cpio "),
        "{s}"
    );
    svc.stop().await;
}

#[tokio::test]
async fn scripts_only_for_the_dut_network() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path());
    gw.auth.dut_networks = vec!["10.99.0.0/16".parse().unwrap()];
    let svc = TestBoot::start(gw, default_config()).await;
    let url = format!("{}/boot/{MAC}/boot.ipxe", svc.url());
    assert_eq!(
        reqwest::get(&url).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    // A user token does not make its holder a DUT; the admin token opens it for debugging.
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(USER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("gateway.auth.dut_networks"),
        "{v}"
    );
    let r = reqwest::Client::new()
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Artifacts likewise.
    let art = format!("{}/artifacts/0123/vmlinuz", svc.url());
    let r = reqwest::Client::new()
        .get(&art)
        .bearer_auth(USER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    svc.stop().await;
}

#[tokio::test]
async fn boot_configs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mac = MachineId::parse(MAC).unwrap();
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    common::writer(&svc)
        .put(mac, &job_config("3"))
        .await
        .unwrap();
    svc.stop().await;
    let svc = TestBoot::start(gateway(dir.path()), Config::default()).await;
    let got = common::writer(&svc).get(mac).await.unwrap().unwrap();
    assert_eq!(got.config, job_config("3"));
    let s = script(format!("{}/boot/{MAC}/boot.ipxe", svc.url())).await;
    assert!(s.contains("job 3"), "{s}");
    svc.stop().await;
}

/// GET a script with an explicit Host header (the base of every URL in it).
async fn script_via(url: &str, host: &str) -> String {
    let resp = reqwest::Client::new()
        .get(url)
        .header(reqwest::header::HOST, host)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.text().await.unwrap()
}

#[tokio::test]
async fn repeated_scripts_follow_the_platform_the_host_and_config_changes() {
    // Scripts are kept per config after the first rendering: every request must still get
    // the script for its own MAC, platform and host, and a new config must show at once.
    let dir = tempfile::tempdir().unwrap();
    let svc = TestBoot::start(gateway(dir.path()), default_config()).await;
    let base = svc.url();
    let mac = MachineId::parse(MAC).unwrap();
    common::writer(&svc)
        .put(mac, &job_config("7"))
        .await
        .unwrap();
    let path = |platform: &str| format!("{base}/boot/{MAC}/boot.ipxe?platform={platform}");
    for _ in 0..2 {
        let bios = script_via(&path("pcbios"), "gw-a.example:8003").await;
        assert!(
            bios.contains("kernel http://gw-a.example:8003/artifacts/"),
            "{bios}"
        );
        assert!(!bios.contains("initrd=initrd0"), "{bios}");
        assert!(bios.contains("job 7"), "{bios}");
        let efi = script_via(&path("efi"), "gw-a.example:8003").await;
        assert!(efi.contains("initrd=initrd0"), "{efi}");
        let other_host = script_via(&path("efi"), "gw-b.example:8003").await;
        assert!(
            other_host.contains("kernel http://gw-b.example:8003/artifacts/"),
            "{other_host}"
        );
        assert!(!other_host.contains("gw-a.example"), "{other_host}");
    }
    // A new config for the same machine replaces the kept script.
    common::writer(&svc)
        .put(mac, &job_config("8"))
        .await
        .unwrap();
    let s = script_via(&path("pcbios"), "gw-a.example:8003").await;
    assert!(s.contains("job 8") && !s.contains("job 7"), "{s}");
    // The default config is shared: two MACs asking in turn each get their own script.
    let other = "52:54:00:12:34:57";
    for _ in 0..2 {
        for m in [other, "52:54:00:12:34:58"] {
            let s = script_via(
                &format!("{base}/boot/{m}/boot.ipxe?platform=pcbios"),
                "gw-a.example:8003",
            )
            .await;
            assert!(s.contains(&format!("{m} boots the default config")), "{s}");
            assert!(
                s.contains(&format!(
                    "chain --replace http://gw-a.example:8003/boot/{m}/"
                )),
                "{s}"
            );
        }
    }
    // Clearing the job's config falls back to the default at once.
    let resp = reqwest::Client::new()
        .delete(format!("{base}/api/v1/boot/{MAC}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let s = script_via(&path("pcbios"), "gw-a.example:8003").await;
    assert!(s.contains("boots the default config"), "{s}");
    svc.stop().await;
}
