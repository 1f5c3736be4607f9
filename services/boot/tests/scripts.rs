//! A machine's job boot script (which carries the job's credentials) goes only to that
//! machine: a peer whose address is its recorded address in a real mars, or whose neighbour
//! entry maps to its MAC; anyone else asking for that MAC gets the default script.
//!
//! Every loopback peer is 127.0.0.1 unless the client binds another loopback address, so the
//! clients bind 127.0.0.2 ("the DUT") and 127.0.0.3 ("another DUT").

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dutgate_boot::testing::{ADMIN_TOKEN, TestBoot, USER_TOKEN, gateway};
use dutgate_boot::{BootConfig, Config, Kernel};
use dutgate_core::auth::Auth;
use dutgate_core::db::Db;
use dutgate_core::{MachineId, Secret};
use dutgate_mars::machines::Mars;
use dutgate_mars::model::Registration;
use dutgate_mars::power::MemoryPower;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

const DUT_A: &str = "52:54:00:00:00:31";
const DUT_B: &str = "52:54:00:00:00:32";
const SECRET: &str = "dutgate.s3=http://10.0.2.2:9000,job-1,AKJOB1,s3cr3t-job-1";

/// A real mars on 127.0.0.1:0 (SQLite, in-memory PDU ports), with the boot tests' tokens.
struct TestMars {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl TestMars {
    async fn start(dir: &std::path::Path) -> Self {
        let db = Db::open_sqlite(&dir.join("mars.db"), dutgate_mars::store::MIGRATIONS)
            .await
            .unwrap();
        let store = dutgate_mars::store::Store::new(db, "farm");
        let mut config = dutgate_mars::Config::default();
        config.training.enabled = false;
        let mars = Mars::new(store, config, Arc::new(MemoryPower::default()));
        let auth = Auth::new(
            Some(Secret::new(ADMIN_TOKEN)),
            Some(Secret::new(USER_TOKEN)),
            dutgate_core::config::default_dut_networks(),
        );
        let stop = CancellationToken::new();
        let router = dutgate_mars::start(mars, auth, stop.clone()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ =
                dutgate_core::http::serve(listener, router, s, Duration::from_millis(100)).await;
        });
        Self { addr, stop }
    }

    /// Registers `mac` at `ip`, sent from `ip` (what the DUT's agent does).
    async fn register(&self, mac: &str, ip: &str) {
        let body = Registration {
            base_name: "virtio".into(),
            tags: vec![],
            mac_address: MachineId::parse(mac).unwrap(),
            ip_address: ip.parse().unwrap(),
            local_tty_device: Some("ttyS0".into()),
        };
        let r = client_from(ip)
            .post(format!("http://{}/api/v1/machine/", self.addr))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
}

impl Drop for TestMars {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A client whose connections come from `ip` (a loopback address other than 127.0.0.1
/// plays another machine).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn script_as(
    client: &reqwest::Client,
    svc: &TestBoot,
    mac: &str,
    token: Option<&str>,
) -> String {
    let mut rb = client.get(format!("{}/boot/{mac}/boot.ipxe", svc.url()));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap()
}

fn job_config() -> BootConfig {
    BootConfig {
        kernel: Kernel {
            url: "http://upstream.example/vmlinuz".into(),
            cmdline: format!("console=ttyS0 {SECRET}"),
            sha256: None,
        },
        initramfs: vec![],
        job_id: Some("1".into()),
    }
}

fn default_config(arp_table: std::path::PathBuf) -> Config {
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
        arp_table,
        ..Config::default()
    }
}

fn is_job(script: &str) -> bool {
    script.contains(SECRET) && script.contains("boots for job 1")
}

fn is_default(script: &str) -> bool {
    !script.contains("s3cr3t") && script.contains("boots the default config")
}

#[tokio::test]
async fn job_scripts_only_for_their_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mars = TestMars::start(dir.path()).await;
    mars.register(DUT_A, "127.0.0.2").await;
    // The neighbour table knows 127.0.0.3 as DUT B (same format as /proc/net/arp).
    let arp = dir.path().join("arp");
    std::fs::write(
        &arp,
        format!(
            "IP address       HW type     Flags       HW address            Mask     Device\n\
             127.0.0.3        0x1         0x2         {DUT_B}     *        br0\n"
        ),
    )
    .unwrap();
    let mut gw = gateway(&dir.path().join("state"));
    gw.internal_host = "127.0.0.1".into();
    gw.ports.mars = mars.addr.port();
    let svc = TestBoot::start(gw, default_config(arp)).await;
    for mac in [DUT_A, DUT_B] {
        common::writer(&svc)
            .put(MachineId::parse(mac).unwrap(), &job_config())
            .await
            .unwrap();
    }
    let dut_a = client_from("127.0.0.2");
    let dut_b = client_from("127.0.0.3");
    let other = client_from("127.0.0.1");

    // The machine itself: by its recorded address, by its neighbour entry.
    assert!(is_job(&script_as(&dut_a, &svc, DUT_A, None).await));
    assert!(is_job(&script_as(&dut_b, &svc, DUT_B, None).await));
    // Any other DUT asking for them: the default script, no credentials.
    assert!(is_default(&script_as(&other, &svc, DUT_A, None).await));
    assert!(is_default(&script_as(&dut_b, &svc, DUT_A, None).await));
    assert!(is_default(&script_as(&dut_a, &svc, DUT_B, None).await));
    assert!(is_default(&script_as(&other, &svc, DUT_B, None).await));
    // The query form is checked the same way.
    let r = other
        .get(format!("{}/boot.ipxe?mac={DUT_A}", svc.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(is_default(&r), "{r}");
    // A user token does not make its holder the machine.
    assert!(is_default(
        &script_as(&other, &svc, DUT_A, Some(USER_TOKEN)).await
    ));
    // An admin reads any machine's script.
    assert!(is_job(
        &script_as(&other, &svc, DUT_A, Some(ADMIN_TOKEN)).await
    ));

    // Without mars nobody is recognised by a recorded address: fail closed.
    drop(mars);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = script_as(&dut_a, &svc, DUT_A, None).await;
        if is_default(&s) {
            break;
        }
        assert!(is_job(&s), "{s}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "still served after mars stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The neighbour table still identifies B.
    assert!(is_job(&script_as(&dut_b, &svc, DUT_B, None).await));
    svc.stop().await;
}

#[tokio::test]
async fn unverified_peer_networks_get_job_scripts() {
    // The virtual farm's exemption: QEMU user networking shows every DUT as 127.0.0.1.
    let dir = tempfile::tempdir().unwrap();
    let mut config = default_config(dir.path().join("no-arp"));
    config.unverified_peer_networks = vec!["127.0.0.1/32".parse().unwrap()];
    let svc = TestBoot::start(gateway(&dir.path().join("state")), config).await;
    common::writer(&svc)
        .put(MachineId::parse(DUT_A).unwrap(), &job_config())
        .await
        .unwrap();
    assert!(is_job(
        &script_as(&client_from("127.0.0.1"), &svc, DUT_A, None).await
    ));
    assert!(is_default(
        &script_as(&client_from("127.0.0.2"), &svc, DUT_A, None).await
    ));
    svc.stop().await;
}
