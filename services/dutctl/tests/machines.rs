//! `dutctl machines …` against a mars served in this process on 127.0.0.1:0.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_core::db::testing::databases;
use dutgate_core::{PowerState, Secret};
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::Registration;
use dutgate_mars::power::MemoryPower;
use dutgate_mars::store::{MIGRATIONS, Store};
use tokio_util::sync::CancellationToken;

const DUTCTL: &str = env!("CARGO_BIN_EXE_dutctl");

async fn dutctl(url: &str, args: &[&str]) -> (i32, String, String) {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(DUTCTL)
            .args(&args)
            .env("DUTGATE_MARS_URL", &url)
            .env("DUTGATE_TOKEN", "adm")
            .env_remove("DUTGATE_STATE_DIR")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_commands() {
    let db = databases("mars", MIGRATIONS).await.remove(0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let power = Arc::new(MemoryPower::default());
    let mars = Mars::new(
        Store::new(db.db.clone(), "lab"),
        dutgate_mars::Config::default(),
        power.clone(),
    );
    let auth = Auth::new(
        Some(Secret::new("adm")),
        None,
        dutgate_core::config::default_dut_networks(),
    );
    let shutdown = CancellationToken::new();
    let router = dutgate_mars::start(mars, auth, shutdown.clone()).unwrap();
    let app = dutgate_core::http::with_common_routes("mars", router, None);
    let token = shutdown.clone();
    tokio::spawn(async move {
        let _ = dutgate_core::http::serve(listener, app, token, Duration::from_millis(100)).await;
    });
    let mars = MarsClient::new(&url, None);

    // Discovery: start, the next registration binds, status shows none.
    let (code, out, err) = dutctl(
        &url,
        &["machines", "discover", "pdu1", "3", "--timeout", "60"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("PDU pdu1 port 3"), "{out}");
    assert_eq!(power.state("pdu1", "3"), PowerState::On);
    let reg = Registration {
        base_name: "virtio".into(),
        tags: vec!["virtio:family:VIRTIO".parse().unwrap()],
        mac_address: "52:54:00:aa:bb:01".parse().unwrap(),
        ip_address: "10.0.2.15".parse().unwrap(),
        local_tty_device: Some("ttyS0".into()),
    };
    mars.register(&reg).await.unwrap();
    let (code, out, _) = dutctl(&url, &["machines", "discover"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("no discovery"), "{out}");

    let (code, out, err) = dutctl(&url, &["machines", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("lab-virtio-1") && out.contains("TRAINING") && out.contains("pdu1/3"),
        "{out}"
    );
    let (code, out, _) = dutctl(
        &url,
        &["-o", "json", "machines", "list", "--state", "TRAINING"],
    )
    .await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, out, _) = dutctl(&url, &["-o", "json", "machines", "list", "--state", "IDLE"]).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );

    // By full name or MAC.
    let (code, out, _) = dutctl(&url, &["machines", "show", "lab-virtio-1"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("52:54:00:aa:bb:01") && out.contains("ttyS0"),
        "{out}"
    );
    let (code, out, _) = dutctl(
        &url,
        &[
            "machines",
            "retire",
            "52:54:00:aa:bb:01",
            "--reason",
            "bad fan",
        ],
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("RETIRED"), "{out}");
    assert_eq!(power.state("pdu1", "3"), PowerState::Off);
    let (code, out, _) = dutctl(&url, &["machines", "activate", "lab-virtio-1"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("TRAINING"), "{out}");
    let (code, out, _) = dutctl(&url, &["machines", "events", "lab-virtio-1"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("bad fan") && out.contains("RETIRED → TRAINING"),
        "{out}"
    );
    let (code, out, _) = dutctl(&url, &["machines", "training", "lab-virtio-1"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("no training runs yet"), "{out}");
    let (code, out, err) = dutctl(
        &url,
        &[
            "machines",
            "set",
            "lab-virtio-1",
            "--off-delay",
            "5",
            "--tag",
            "rack:b",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rack:b (manual)") && out.contains("off delay 5"),
        "{out}"
    );

    // `discover --wait` returns the machine once one registers on the port.
    let u = url.clone();
    let waiter = tokio::spawn(async move {
        dutctl(
            &u,
            &[
                "machines",
                "discover",
                "pdu1",
                "5",
                "--timeout",
                "30",
                "--wait",
            ],
        )
        .await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while power.state("pdu1", "5") != PowerState::On {
        assert!(
            tokio::time::Instant::now() < deadline,
            "discovery did not power port 5"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut second = reg.clone();
    second.mac_address = "52:54:00:aa:bb:02".parse().unwrap();
    mars.register(&second).await.unwrap();
    let (code, out, err) = waiter.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("lab-virtio-2") && out.contains("pdu1 5"),
        "{out}"
    );

    // Errors: one line, non-zero.
    let (code, _, err) = dutctl(&url, &["machines", "show", "nope"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no machine"), "{err}");
    let (code, _, err) = dutctl(&url, &["machines", "retire", "lab-virtio-1"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = dutctl(&url, &["machines", "retire", "lab-virtio-1"]).await;
    assert_ne!(code, 0, "retiring twice is refused");
    assert!(err.contains("409") && err.lines().count() == 1, "{err}");
    shutdown.cancel();
    db.cleanup().await;
}
