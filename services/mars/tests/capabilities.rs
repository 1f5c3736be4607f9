//! Capabilities scoped to a lease, service credentials and the audit log, on a real mars and
//! a real pdu service (dummy driver) that checks leases with that mars, both reading the
//! tokens of one state dir as a gateway's services do.
//!
//! Loopback is not a DUT network here: every request is judged by its credential alone.

use std::path::Path;
use std::time::Duration;

use dutgate_core::audit::{AuditEntry, AuditLog};
use dutgate_core::auth::{Auth, Role};
use dutgate_core::client::ApiClient;
use dutgate_core::config::GatewayConfig;
use dutgate_core::{MachineId, PowerState, Secret};
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::{LeasePurpose, MachinePatch, Registration, ReleaseOutcome};
use dutgate_mars::power::HttpPower;
use dutgate_pdu::{PduClient, Switch};
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "capabilities-admin";
const SERVICE: &str = "capabilities-service";

struct Gateway {
    auth: Auth,
    mars: Mars,
    mars_url: String,
    pdu: dutgate_pdu::Running,
    stop_mars: CancellationToken,
    http: reqwest::Client,
}

fn mac(n: u8) -> MachineId {
    MachineId::from_bytes([0x52, 0x54, 0x00, 0x00, 0x0c, n])
}

async fn start(dir: &Path) -> Gateway {
    let mars_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pdu_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut gw = GatewayConfig {
        state_dir: dir.to_path_buf(),
        internal_host: "127.0.0.1".into(),
        ..Default::default()
    };
    gw.ports.mars = mars_listener.local_addr().unwrap().port();
    gw.ports.pdu = pdu_listener.local_addr().unwrap().port();
    gw.auth.admin_token = Some(Secret::new(ADMIN));
    gw.auth.dut_networks = Vec::new();
    std::fs::create_dir_all(gw.tokens_dir()).unwrap();
    std::fs::write(gw.tokens_dir().join("service"), SERVICE).unwrap();
    let auth = Auth::from_gateway(&gw);

    let pdu_db =
        dutgate_core::db::Db::open_sqlite(&dir.join("pdu.db"), dutgate_pdu::store::MIGRATIONS)
            .await
            .unwrap();
    let config = dutgate_pdu::Config {
        pdus: yaml_serde::from_str("rack: {driver: dummy, config: {ports: 4, device: caps}}")
            .unwrap(),
        poll_interval_seconds: 0.2,
        readback_interval_ms: 20,
        verify_interval_ms: 20,
        settle_timeout_seconds: 2.0,
        operation_timeout_seconds: 2.0,
        default_off_seconds: 0.1,
        ..Default::default()
    };
    let pdu = dutgate_pdu::start_on_gateway(
        pdu_listener,
        dutgate_pdu::store::Store::new(pdu_db),
        config,
        &gw,
        auth.clone(),
    )
    .await
    .unwrap();

    let mars_db =
        dutgate_core::db::Db::open_sqlite(&dir.join("mars.db"), dutgate_mars::store::MIGRATIONS)
            .await
            .unwrap();
    let mut config = dutgate_mars::Config::default();
    config.training.enabled = false;
    let mars = Mars::new(
        dutgate_mars::store::Store::new(mars_db, "farm"),
        config,
        std::sync::Arc::new(HttpPower::for_gateway(&gw, None)),
    );
    let stop_mars = CancellationToken::new();
    let router = dutgate_mars::start_with_audit(
        mars.clone(),
        auth.clone(),
        Some(AuditLog::new(&gw.state_dir, "mars")),
        stop_mars.clone(),
    )
    .unwrap();
    let app = dutgate_core::http::with_common_routes("mars", router, None);
    let token = stop_mars.clone();
    tokio::spawn(async move {
        let _ =
            dutgate_core::http::serve(mars_listener, app, token, Duration::from_millis(100)).await;
    });
    Gateway {
        mars_url: gw.internal_url(dutgate_core::ServiceName::Mars),
        auth,
        mars,
        pdu,
        stop_mars,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
    }
}

impl Gateway {
    fn mars_as(&self, token: &str) -> MarsClient {
        MarsClient::new(&self.mars_url, Some(Secret::new(token)))
    }

    fn lease_api(&self, base: &str, lease: &str) -> ApiClient {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .default_headers(dutgate_core::lease::lease_headers(lease).unwrap())
            .build()
            .unwrap();
        ApiClient::with_http(base, None, http)
    }

    /// A registered machine on `rack` port `n`, trained (IDLE).
    async fn idle_machine(&self, n: u8) -> MachineId {
        use dutgate_mars::state::Trigger;
        use dutgate_mars::store::Cause;
        let admin = self.mars_as(ADMIN);
        let id = admin
            .register(&Registration {
                base_name: "virtio".into(),
                tags: vec!["virtio:family:VIRTIO".parse().unwrap()],
                mac_address: mac(n),
                ip_address: format!("10.0.2.{}", 10 + n).parse().unwrap(),
                local_tty_device: Some("ttyS0".into()),
            })
            .await
            .unwrap()
            .id;
        admin
            .patch(
                id,
                &MachinePatch {
                    pdu: Some(Some("rack".into())),
                    pdu_port_id: Some(Some(n.to_string())),
                    pdu_off_delay: Some(0.1),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        self.mars
            .store
            .trigger(
                id,
                Trigger::TrainingPassed,
                &Cause::new("test", "trained"),
                &|r| r.trained_at = Some(dutgate_mars::model::Timestamp::now()),
            )
            .await
            .unwrap();
        id
    }

    /// `(status, JSON body)` of one request with `headers`.
    async fn call(
        &self,
        method: reqwest::Method,
        url: String,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut rb = self.http.request(method, url);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn audit(&self, base: &str) -> Vec<AuditEntry> {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                format!("{base}/api/v1/audit"),
                &[("authorization", &format!("Bearer {ADMIN}"))],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body["entries"].clone()).unwrap()
    }
}

fn has(entries: &[AuditEntry], actor: &str, action: &str, outcome_starts: &str) -> bool {
    entries
        .iter()
        .any(|e| e.actor == actor && e.action == action && e.outcome.starts_with(outcome_starts))
}

/// No audit log holds a lease id: it is a credential.
fn assert_no_lease_in_audit_logs(dir: &Path, leases: &[&str]) {
    for service in ["mars", "pdu"] {
        let text = std::fs::read_to_string(dir.join(service).join("audit.jsonl")).unwrap();
        for l in leases {
            assert!(!text.contains(l), "{service}'s audit log holds a lease id");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_opens_its_own_machine_and_a_service_token_administers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path()).await;
    let (m1, m2) = (g.idle_machine(1).await, g.idle_machine(2).await);
    let service = g.mars_as(SERVICE);

    // The service role (the executor) leases; it sees lease ids.
    let l1 = service
        .acquire(m1, "job-1", "exec", LeasePurpose::Job, None)
        .await
        .unwrap();
    let l2 = service
        .acquire(m2, "job-2", "exec", LeasePurpose::Job, None)
        .await
        .unwrap();
    assert_eq!(service.machine(m1).await.unwrap().lease.unwrap().id, l1.id);
    // ...but administers nothing.
    let e = service.retire(m1, &Default::default()).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    let e = service
        .patch(m1, &MachinePatch::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");

    // The holder of m1's lease, with no token: reads (its own lease id only), heartbeats and
    // later releases that lease; nothing else.
    let holder = MarsClient::from_api(g.lease_api(&g.mars_url, &l1.id));
    let machines = holder.machines().await.unwrap();
    let lease_of = |id| {
        machines
            .iter()
            .find(|m| m.id == id)
            .and_then(|m| m.lease.clone())
            .unwrap()
            .id
    };
    assert_eq!(lease_of(m1), l1.id);
    assert_eq!(
        lease_of(m2),
        "",
        "another machine's lease id is shown to a lease holder"
    );
    holder.heartbeat(&l1.id).await.unwrap();
    let e = holder.heartbeat(&l2.id).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    let (status, body) = g
        .call(
            reqwest::Method::POST,
            format!("{}/api/v1/leases/{}/heartbeat", g.mars_url, l1.id),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let e = holder
        .acquire(mac(3), "job-3", "exec", LeasePurpose::Job, None)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");
    // A lease that is no lease opens nothing.
    let stranger = MarsClient::from_api(g.lease_api(&g.mars_url, &"0".repeat(32)));
    let e = stranger.machines().await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");

    // pdu: the service role switches any port; the lease holder its machine's port only.
    let pdu_url = g.pdu.url();
    let pdu_service = PduClient::new(&pdu_url, Some(Secret::new(SERVICE)));
    let op = pdu_service.set("rack", "3", Switch::On).await.unwrap();
    assert_eq!(op.port.state, PowerState::On);
    let pdu_holder = PduClient::from_api(g.lease_api(&pdu_url, &l1.id));
    let op = pdu_holder.set("rack", "1", Switch::On).await.unwrap();
    assert_eq!(op.port.state, PowerState::On);
    pdu_holder
        .cycle("rack", "1", Some(Duration::from_millis(100)))
        .await
        .unwrap();
    let e = pdu_holder.set("rack", "2", Switch::On).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    let e = pdu_holder
        .cycle("rack", "3", Some(Duration::ZERO))
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    // A port's label is configuration: admins only.
    let e = pdu_service
        .patch(
            "rack",
            "3",
            &dutgate_pdu::PortPatch {
                label: Some("gpu box".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");

    // The lease released, it opens nothing any more.
    holder
        .release(&l1.id, ReleaseOutcome::Ok, Some("done"))
        .await
        .unwrap();
    let e = pdu_holder.set("rack", "1", Switch::Off).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");
    let e = holder.machine(m1).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN), "{e}");

    // The audit logs: who did what, refusals included, never a lease id.
    let mars_audit = g.audit(&g.mars_url).await;
    assert!(
        has(&mars_audit, "service", "machine.retire", "refused: "),
        "{mars_audit:#?}"
    );
    assert!(
        has(&mars_audit, "service", "machine.edit", "refused: "),
        "{mars_audit:#?}"
    );
    assert!(
        has(&mars_audit, "admin", "machine.edit", "ok"),
        "{mars_audit:#?}"
    );
    assert!(
        has(&mars_audit, "lease", "lease.heartbeat", "refused: "),
        "{mars_audit:#?}"
    );
    assert!(
        has(&mars_audit, "anonymous", "lease.acquire", "refused: "),
        "{mars_audit:#?}"
    );
    let pdu_audit = g.audit(&pdu_url).await;
    let holder_name = format!("lease:{m1}");
    assert!(
        has(&pdu_audit, "service", "pdu.switch", "ok: ON"),
        "{pdu_audit:#?}"
    );
    assert!(
        has(&pdu_audit, &holder_name, "pdu.switch", "ok: ON"),
        "{pdu_audit:#?}"
    );
    assert!(
        has(&pdu_audit, &holder_name, "pdu.cycle", "ok"),
        "{pdu_audit:#?}"
    );
    assert!(
        has(&pdu_audit, "lease", "pdu.switch", "refused: "),
        "{pdu_audit:#?}"
    );
    assert!(
        has(&pdu_audit, "service", "pdu.port.edit", "refused: "),
        "{pdu_audit:#?}"
    );
    assert!(
        pdu_audit
            .iter()
            .any(|e| e.target == "pdu/rack/port/2" && e.outcome.starts_with("refused: ")),
        "{pdu_audit:#?}"
    );
    assert_no_lease_in_audit_logs(dir.path(), &[&l1.id, &l2.id]);

    // mars unreachable: a lease cannot be checked, and the pdu service says so (503).
    let pdu_holder2 = PduClient::from_api(g.lease_api(&pdu_url, &l2.id));
    g.stop_mars.cancel();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match pdu_holder2.set("rack", "2", Switch::On).await {
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
    g.pdu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_named_token_gets_401_on_mars_and_pdu() {
    let dir = tempfile::tempdir().unwrap();
    let g = start(dir.path()).await;
    let m = g.idle_machine(1).await;
    let store = g.auth.store().unwrap();
    let created = store
        .create("trainer-2", Role::Service, None, "admin")
        .unwrap();
    let named = g.mars_as(&created.token);
    let pdu = PduClient::new(g.pdu.url(), Some(Secret::new(&created.token)));
    named.machines().await.unwrap();
    let lease = named
        .acquire(m, "job-1", "exec", LeasePurpose::Job, None)
        .await
        .unwrap();
    pdu.set("rack", "1", Switch::On).await.unwrap();

    store.revoke("trainer-2").unwrap();
    let e = named.machines().await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");
    let e = named.heartbeat(&lease.id).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");
    let e = pdu.set("rack", "1", Switch::Off).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED), "{e}");

    let entries = g.audit(&g.pdu.url()).await;
    assert!(
        has(&entries, "trainer-2", "pdu.switch", "ok"),
        "{entries:#?}"
    );
    assert!(
        has(&entries, "invalid", "pdu.switch", "refused: "),
        "{entries:#?}"
    );
    g.stop_mars.cancel();
    g.pdu.stop().await;
}
