//! People and permissions on a real gateway (`dutgate up`, every service): named tokens with
//! roles, job ownership, revocation and expiry on every service at once, the audit log, and
//! no token in clear anywhere but the bootstrap token files.
//!
//! Two users (alice, bob) and a runner (ci): bob cannot cancel alice's job nor download its
//! artifacts; the runner submits but administers nothing; a revoked or expired token gets 401
//! from every service on its next request. The console and boot cases with QEMU DUTs are
//! played by `tests/isolation.rs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const MAC: &str = "52:54:00:00:07:01";

struct Gw {
    _gateway: common::Gateway,
    _dir: tempfile::TempDir,
    state: std::path::PathBuf,
    logs: Vec<std::path::PathBuf>,
    port: std::collections::BTreeMap<&'static str, u16>,
    admin: String,
    http: reqwest::Client,
}

impl Gw {
    fn start() -> Gw {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let gateway = common::Gateway::start(&state, &common::SERVICES, Duration::from_secs(90));
        let port = common::SERVICES
            .iter()
            .copied()
            .zip(gateway.ports.iter().copied())
            .collect();
        let admin = std::fs::read_to_string(state.join("tokens/admin"))
            .unwrap()
            .trim()
            .to_string();
        let logs = vec![gateway.stdout.clone(), gateway.stderr.clone()];
        Gw {
            _gateway: gateway,
            _dir: dir,
            state,
            logs,
            port,
            admin,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        }
    }

    fn url(&self, svc: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port[svc])
    }

    /// One request; the status and the JSON body (Null when there is none).
    async fn call(
        &self,
        token: Option<&str>,
        method: Method,
        svc: &str,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut rb = self.http.request(method, self.url(svc, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn create_token(&self, name: &str, role: &str) -> String {
        let (st, body) = self
            .call(
                Some(&self.admin),
                Method::POST,
                "executor",
                "/api/v1/tokens",
                Some(json!({"name": name, "role": role})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{body}");
        assert_eq!(body["role"], role);
        body["token"].as_str().unwrap().to_string()
    }

    async fn submit(&self, token: &str) -> i64 {
        let job = "version: 1\ntarget:\n  tags: [\"cpu:arch:x86_64\"]\ndeployment:\n  start:\n    \
                   kernel:\n      url: http://upstream.example/k\n    initramfs:\n      \
                   url: http://upstream.example/i\n";
        let resp = self
            .http
            .post(self.url("executor", "/api/v1/jobs"))
            .bearer_auth(token)
            .body(job)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_i64().unwrap()
    }
}

/// Requests that need a valid token on each service (a bad body after the token check, so a
/// valid token gets a 4xx other than 401 and never changes anything).
fn token_checks() -> Vec<(&'static str, Method, String, Option<Value>)> {
    vec![
        ("executor", Method::GET, "/api/v1/jobs".into(), None),
        (
            "mars",
            Method::POST,
            "/api/v1/leases".into(),
            Some(json!({"bad": 1})),
        ),
        (
            "pdu",
            Method::POST,
            "/api/v1/pdus".into(),
            Some(json!({"bad": 1})),
        ),
        ("boot", Method::GET, "/api/v1/boot-cache".into(), None),
        (
            "salad",
            Method::GET,
            format!("/api/v1/machine/{MAC}/log"),
            None,
        ),
        (
            "registry",
            Method::GET,
            "/api/v1/registry/stats".into(),
            None,
        ),
    ]
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or("")
}

async fn assert_refused_everywhere(gw: &Gw, token: &str, why: &str) {
    for (svc, method, path, body) in token_checks() {
        let (st, b) = gw.call(Some(token), method.clone(), svc, &path, body).await;
        assert_eq!(
            st,
            StatusCode::UNAUTHORIZED,
            "{why}: {svc} {method} {path}: {b}"
        );
        assert!(!error_of(&b).is_empty(), "{svc}: no JSON reason: {b}");
    }
}

async fn assert_accepted_everywhere(gw: &Gw, token: &str) {
    for (svc, method, path, body) in token_checks() {
        let (st, b) = gw.call(Some(token), method.clone(), svc, &path, body).await;
        assert!(
            st != StatusCode::UNAUTHORIZED && st != StatusCode::FORBIDDEN,
            "a valid admin token refused by {svc} {method} {path}: {st} {b}"
        );
    }
}

/// Every file under `dir` (recursively) except those under `skip`.
fn files(dir: &Path, skip: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.starts_with(skip) {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => files(&p, skip, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_and_a_runner_on_a_real_gateway() {
    let gw = Gw::start();
    let alice = gw.create_token("alice", "user").await;
    let bob = gw.create_token("bob", "user").await;
    let ci = gw.create_token("ci", "runner").await;
    let temp = gw.create_token("temp-admin", "admin").await;
    let old = gw.create_token("old", "admin").await;

    // A machine for the jobs to target (registered from loopback, a DUT network by default).
    let (st, b) = gw
        .call(
            None,
            Method::POST,
            "mars",
            "/api/v1/machine",
            Some(
                json!({"base_name": "qemu", "tags": ["cpu:arch:x86_64"], "mac_address": MAC,
                        "ip_address": "10.0.2.15"}),
            ),
        )
        .await;
    assert!(st.is_success(), "registration: {st} {b}");

    let alices = gw.submit(&alice).await;
    let cis = gw.submit(&ci).await;
    let (_, job) = gw
        .call(
            Some(&bob),
            Method::GET,
            "executor",
            &format!("/api/v1/jobs/{alices}"),
            None,
        )
        .await;
    assert_eq!(job["owner"], "alice", "{job}");
    let (_, job) = gw
        .call(
            Some(&ci),
            Method::GET,
            "executor",
            &format!("/api/v1/jobs/{cis}"),
            None,
        )
        .await;
    assert_eq!(job["owner"], "ci", "{job}");

    // bob cannot cancel alice's job, nor download its files.
    let (st, b) = gw
        .call(
            Some(&bob),
            Method::POST,
            "executor",
            &format!("/api/v1/jobs/{alices}/cancel"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    assert!(error_of(&b).contains("another user"), "{b}");
    let artifact = format!("/api/v1/jobs/{alices}/artifacts/results/out.txt");
    let (st, b) = gw
        .call(Some(&bob), Method::GET, "executor", &artifact, None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    let (st, _) = gw
        .call(Some(&alice), Method::GET, "executor", &artifact, None)
        .await;
    assert_eq!(
        st,
        StatusCode::NOT_FOUND,
        "alice may look for her own files"
    );

    // No user writes a boot config, not even for a machine their job targets: only the
    // service role, admins and the machine's current lease holder do.
    let boot = json!({"kernel": {"url": "http://upstream.example/k"}});
    let (st, b) = gw
        .call(
            Some(&alice),
            Method::PUT,
            "boot",
            &format!("/api/v1/boot/{MAC}"),
            Some(boot),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    assert!(error_of(&b).contains("lease"), "{b}");

    // The runner submits (above) but administers nothing.
    let (st, b) = gw
        .call(
            Some(&ci),
            Method::POST,
            "executor",
            "/api/v1/tokens",
            Some(json!({"name": "sneaky", "role": "admin"})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    assert!(error_of(&b).contains("admin"), "{b}");
    let (st, b) = gw
        .call(
            Some(&ci),
            Method::POST,
            "mars",
            &format!("/api/v1/machine/{MAC}/retire"),
            Some(json!({"reason": "mine now"})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    let (st, b) = gw
        .call(
            Some(&ci),
            Method::POST,
            "pdu",
            "/api/v1/pdus",
            Some(json!({"name": "x", "driver": "dummy", "config": {"ports": 1}})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");

    // alice cancels her own job.
    let (st, b) = gw
        .call(
            Some(&alice),
            Method::POST,
            "executor",
            &format!("/api/v1/jobs/{alices}/cancel"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{b}");

    // Revocation holds on every service from the next request.
    assert_accepted_everywhere(&gw, &temp).await;
    let (st, b) = gw
        .call(
            Some(&gw.admin),
            Method::DELETE,
            "executor",
            "/api/v1/tokens/temp-admin",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_refused_everywhere(&gw, &temp, "revoked").await;

    // Expiry: the store's entry for `old` is dated in the past, as an admin's clock would see
    // it once its days have run out.
    assert_accepted_everywhere(&gw, &old).await;
    let store = gw.state.join("auth/tokens.json");
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&store).unwrap()).unwrap();
    for t in doc["tokens"].as_array_mut().unwrap() {
        if t["name"] == "old" {
            t["expires_at"] = json!("2020-01-01T00:00:00Z");
        }
    }
    let tmp = store.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&doc).unwrap()).unwrap();
    std::fs::rename(&tmp, &store).unwrap();
    assert_refused_everywhere(&gw, &old, "expired").await;
    let (_, b) = gw
        .call(Some(&old), Method::GET, "executor", "/api/v1/jobs", None)
        .await;
    assert!(error_of(&b).contains("expired"), "{b}");

    // The audit log names each actor and outcome.
    let (st, audit) = gw
        .call(
            Some(&gw.admin),
            Method::GET,
            "executor",
            "/api/v1/audit",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{audit}");
    let entries = audit["entries"].as_array().unwrap();
    let has = |actor: &str, action: &str, outcome: &str| {
        entries.iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["outcome"].as_str().unwrap_or("").starts_with(outcome)
        })
    };
    assert!(has("admin", "token.create", "ok"), "{audit:#}");
    assert!(has("alice", "job.submit", "ok"), "{audit:#}");
    assert!(has("ci", "job.submit", "ok"), "{audit:#}");
    assert!(has("bob", "job.cancel", "refused"), "{audit:#}");
    assert!(has("bob", "job.artifact.download", "refused"), "{audit:#}");
    assert!(has("ci", "token.create", "refused"), "{audit:#}");
    assert!(has("alice", "job.cancel", "ok"), "{audit:#}");
    assert!(has("admin", "token.revoke", "ok"), "{audit:#}");
    // Each service keeps its own: boot recorded alice's refused write.
    let (st, boot_audit) = gw
        .call(Some(&gw.admin), Method::GET, "boot", "/api/v1/audit", None)
        .await;
    assert_eq!(st, StatusCode::OK, "{boot_audit}");
    assert!(
        boot_audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "alice"
                && e["outcome"].as_str().unwrap_or("").starts_with("refused")),
        "{boot_audit:#}"
    );
    // Non-admins do not read it.
    let (st, _) = gw
        .call(Some(&alice), Method::GET, "executor", "/api/v1/audit", None)
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);

    // No token in clear anywhere: service logs, the whole state dir but the bootstrap files.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !gw.logs.iter().all(|l| l.exists()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut all = gw.logs.clone();
    files(&gw.state, &gw.state.join("tokens"), &mut all);
    let secrets = [&alice, &bob, &ci, &temp, &old, &gw.admin];
    for f in &all {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        for s in secrets {
            assert!(
                !contains(&bytes, s.as_bytes()),
                "a token in clear in {}",
                f.display()
            );
        }
    }
}
