//! `dutctl pdus …` against a pdu service served in this process on 127.0.0.1:0.

use std::process::Command;

use dutgate_core::Secret;
use dutgate_core::auth::Auth;
use dutgate_core::db::testing::databases;
use dutgate_pdu::store::{MIGRATIONS, Store};

const DUTCTL: &str = env!("CARGO_BIN_EXE_dutctl");

async fn dutctl(url: &str, args: &[&str]) -> (i32, String, String) {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(DUTCTL)
            .args(&args)
            .env("DUTGATE_PDU_URL", &url)
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
async fn pdus_commands() {
    let db = databases("pdu", MIGRATIONS).await.remove(0);
    let mut config = dutgate_pdu::Config {
        poll_interval_seconds: 0.2,
        readback_interval_ms: 20,
        verify_interval_ms: 50,
        ..Default::default()
    };
    config.pdus = yaml_serde::from_str(
        "lab: {driver: dummy, config: {ports: [dut1, dut2, switch], device: dutctl-test}, reserved: ['3']}",
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth = Auth::new(Some(Secret::new("adm")), None, vec![]);
    let r = dutgate_pdu::start_on(listener, Store::new(db.db.clone()), config, auth)
        .await
        .unwrap();
    let url = r.url();

    let (code, out, err) = dutctl(&url, &["pdus", "list"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("lab") && out.contains("dummy"), "{out}");

    let (code, out, err) = dutctl(&url, &["pdus", "set", "lab", "2", "on"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), "lab port 2: ON");

    let (code, out, err) = dutctl(&url, &["pdus", "ports", "lab"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("2 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("dut2") && line.contains("ON"), "{line}");

    let (code, out, err) =
        dutctl(&url, &["pdus", "cycle", "lab", "2", "--off-seconds", "0.3"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cycled") && out.ends_with("now ON\n"), "{out}");

    // A reserved port: one line on stderr, non-zero exit.
    let (code, out, err) = dutctl(&url, &["pdus", "set", "lab", "3", "on"]).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("reserved") && err.lines().count() == 1,
        "{err}"
    );

    let (code, out, err) = dutctl(&url, &["-o", "json", "pdus", "ports", "lab"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[2]["reserved"], true);
    r.stop().await;
}
