//! Boot configs are changed only by the service role, admins, or the holder of the machine's
//! current lease (its job process, `X-Lease-Id`, checked with a real mars), which also reads
//! that machine's job script and the artifacts it names, and nothing of any other machine.
//! Users read configs and change none. Changes and refusals are in the audit log.
//!
//! Loopback is not a DUT network here: every request is judged by its credential alone.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::Upstream;
use dutgate_boot::client::BootClient;
use dutgate_boot::testing::{ADMIN_TOKEN, TestBoot, USER_TOKEN, gateway};
use dutgate_boot::{BootConfig, Config, Kernel};
use dutgate_core::auth::{Auth, Role};
use dutgate_core::client::ApiClient;
use dutgate_core::{MachineId, Secret};
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::{LeasePurpose, Registration};
use dutgate_mars::power::MemoryPower;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;

const SERVICE: &str = "boot-leases-service";
const SECRET: &str = "dutgate.s3=job-keys-of-m1";

fn mac(n: u8) -> MachineId {
    MachineId::from_bytes([0x52, 0x54, 0x00, 0x00, 0x0b, n])
}

/// A real mars on 127.0.0.1:0 whose machines 1 and 2 are leased; returns its port, the two
/// lease ids and the handle that stops it.
async fn mars_with_two_leases(dir: &std::path::Path) -> (u16, String, String, CancellationToken) {
    use dutgate_mars::state::Trigger;
    use dutgate_mars::store::Cause;
    let db =
        dutgate_core::db::Db::open_sqlite(&dir.join("mars.db"), dutgate_mars::store::MIGRATIONS)
            .await
            .unwrap();
    let mut config = dutgate_mars::Config::default();
    config.training.enabled = false;
    let mars = Mars::new(
        dutgate_mars::store::Store::new(db, "farm"),
        config,
        Arc::new(MemoryPower::default()),
    );
    let auth = Auth::new(Some(Secret::new(ADMIN_TOKEN)), None, Vec::new());
    let stop = CancellationToken::new();
    let router = dutgate_mars::start(mars.clone(), auth, stop.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = stop.clone();
    tokio::spawn(async move {
        let _ = dutgate_core::http::serve(listener, router, s, Duration::from_millis(100)).await;
    });
    let admin = MarsClient::new(
        format!("http://127.0.0.1:{port}"),
        Some(Secret::new(ADMIN_TOKEN)),
    );
    let mut leases = Vec::new();
    for n in [1, 2] {
        admin
            .register(&Registration {
                base_name: "virtio".into(),
                tags: vec![],
                mac_address: mac(n),
                ip_address: format!("10.0.2.{n}").parse().unwrap(),
                local_tty_device: None,
            })
            .await
            .unwrap();
        admin
            .patch(
                mac(n),
                &dutgate_mars::model::MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some(n.to_string())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        mars.store
            .trigger(
                mac(n),
                Trigger::TrainingPassed,
                &Cause::new("test", "trained"),
                &|r| r.trained_at = Some(dutgate_mars::model::Timestamp::now()),
            )
            .await
            .unwrap();
        let l = admin
            .acquire(mac(n), &format!("job-{n}"), "exec", LeasePurpose::Job, None)
            .await
            .unwrap();
        leases.push(l.id);
    }
    let l2 = leases.pop().unwrap();
    let l1 = leases.pop().unwrap();
    (port, l1, l2, stop)
}

fn lease_http(lease: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .default_headers(dutgate_core::lease::lease_headers(lease).unwrap())
        .build()
        .unwrap()
}

fn job_config(kernel: &str, job: &str) -> BootConfig {
    BootConfig {
        kernel: Kernel {
            url: kernel.into(),
            cmdline: format!("console=ttyS0 {SECRET}"),
            sha256: None,
        },
        initramfs: vec![],
        job_id: Some(job.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_service_and_admins_change_a_machines_boot() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Upstream::start(vec![("/k".into(), Bytes::from_static(b"kernel"))]).await;
    let (mars_port, l1, l2, stop_mars) = mars_with_two_leases(dir.path()).await;
    let mut gw = upstream.allowed(gateway(&dir.path().join("state")));
    gw.auth.dut_networks = Vec::new();
    gw.internal_host = "127.0.0.1".into();
    gw.ports.mars = mars_port;
    std::fs::create_dir_all(gw.tokens_dir()).unwrap();
    std::fs::write(gw.tokens_dir().join("service"), SERVICE).unwrap();
    let state_dir = gw.state_dir.clone();
    let svc = TestBoot::start(gw.clone(), Config::default()).await;
    let kernel = format!("{}/k", upstream.url());
    let (m1, m2) = (mac(1), mac(2));

    // The holder of m1's lease sets m1's boot, and nothing else's.
    let holder_http = lease_http(&l1);
    let holder = BootClient::from_api(ApiClient::with_http(svc.url(), None, holder_http.clone()));
    holder.put(m1, &job_config(&kernel, "1")).await.unwrap();
    let e = holder.put(m2, &job_config(&kernel, "1")).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    assert!(e.to_string().contains(&m2.to_string()), "{e}");
    let e = holder.delete(m2, None).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");

    // A user may not write a boot config; the service role may.
    let user = svc.client();
    let e = user.put(m2, &job_config(&kernel, "2")).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    assert!(e.to_string().contains("X-Lease-Id"), "{e}");
    let service = BootClient::new(svc.url(), Some(Secret::new(SERVICE)));
    service.put(m2, &job_config(&kernel, "2")).await.unwrap();
    assert_eq!(service.list().await.unwrap().len(), 2);
    // Nor read one (they carry the jobs' keys): neither a machine's nor the list. The holder
    // reads its own machine's, not the other's.
    for e in [
        user.get(m1).await.unwrap_err(),
        user.list().await.unwrap_err(),
        holder.get(m2).await.unwrap_err(),
    ] {
        assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    }
    assert!(holder.get(m1).await.unwrap().is_some());

    // The holder reads m1's job script (with the job's keys) and its artifact, naming m1;
    // not m2's script, not m1's artifact as if it were m2's.
    let script_of = |m: MachineId| format!("{}/boot/{m}/boot.ipxe", svc.url());
    let r = holder_http.get(script_of(m1)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let script = r.text().await.unwrap();
    assert!(script.contains(SECRET), "{script}");
    let art = script
        .split_whitespace()
        .find(|w| w.contains("/artifacts/"))
        .unwrap_or_else(|| panic!("no artifact in\n{script}"))
        .to_string();
    let r = holder_http.get(script_of(m2)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let fetch = |machine: Option<MachineId>| {
        let mut url = reqwest::Url::parse(&art).unwrap();
        if let Some(m) = machine {
            url.query_pairs_mut().append_pair("machine", &m.to_string());
        }
        holder_http.get(url).send()
    };
    let r = fetch(Some(m1)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), Bytes::from_static(b"kernel"));
    assert_eq!(
        fetch(Some(m2)).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(fetch(None).await.unwrap().status(), StatusCode::BAD_REQUEST);
    // m2's holder reads m2's artifacts only: its config names the same kernel, so it may.
    let r = lease_http(&l2)
        .get(format!("{art}?machine={m2}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A user is no DUT, holds no lease.
    let r = reqwest::Client::new()
        .get(script_of(m1))
        .bearer_auth(USER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // The holder clears its own config.
    holder.delete(m1, Some("1")).await.unwrap();
    assert_eq!(service.get(m1).await.unwrap(), None);

    // The audit log: changes with their actor, refusals with theirs, never a lease id.
    let log: serde_json::Value = ApiClient::new(svc.url(), Some(Secret::new(ADMIN_TOKEN)))
        .get("/api/v1/audit")
        .await
        .unwrap();
    let entries = log["entries"].as_array().unwrap();
    let has = |actor: &str, action: &str, target: MachineId, outcome: &str| {
        entries.iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["target"] == format!("machine/{target}")
                && e["outcome"].as_str().unwrap_or("").starts_with(outcome)
        })
    };
    let holder_name = format!("lease:{m1}");
    assert!(
        has(&holder_name, "boot.config.set", m1, "ok: job 1"),
        "{log:#}"
    );
    assert!(has(&holder_name, "boot.config.clear", m1, "ok"), "{log:#}");
    assert!(has("lease", "boot.config.set", m2, "refused: "), "{log:#}");
    assert!(
        has("lease", "boot.config.clear", m2, "refused: "),
        "{log:#}"
    );
    assert!(has("user", "boot.config.set", m2, "refused: "), "{log:#}");
    assert!(has("service", "boot.config.set", m2, "ok"), "{log:#}");
    let text = std::fs::read_to_string(state_dir.join("boot/audit.jsonl")).unwrap();
    assert!(
        !text.contains(&l1) && !text.contains(&l2),
        "a lease id in the audit log"
    );

    // mars unreachable: a lease cannot be checked (503), and is not taken on trust.
    stop_mars.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match holder.put(m1, &job_config(&kernel, "1")).await {
            Err(e) if e.status() == Some(StatusCode::SERVICE_UNAVAILABLE) => {
                assert!(e.to_string().contains("mars"), "{e}");
                break;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "still {other:?} with mars stopped"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    svc.stop().await;
}

#[tokio::test]
async fn a_revoked_named_token_gets_401() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let auth = Auth::from_gateway(&gw);
    let svc = TestBoot::start(gw, Config::default()).await;
    let store = auth.store().unwrap();
    let created = store.create("carol", Role::User, None, "admin").unwrap();
    let carol = BootClient::new(svc.url(), Some(Secret::new(&created.token)));
    carol.cache_stats().await.unwrap();
    store.revoke("carol").unwrap();
    let e = carol.cache_stats().await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");
    let e = carol
        .put(mac(1), &job_config("http://upstream.example/k", "1"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");
    svc.stop().await;
}
