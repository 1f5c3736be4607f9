//! `dutctl tokens`, `dutctl audit` and how `dutctl` finds its gateway and token, against a
//! real executor and mars served in this process on 127.0.0.1:0, sharing a temporary state
//! dir (its bootstrap admin token, its token store, their audit logs) as a gateway's do.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_core::config::GatewayConfig;
use dutgate_core::db::Db;
use dutgate_executor::Executor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DUTCTL: &str = env!("CARGO_BIN_EXE_dutctl");
/// The bootstrap admin token, in `<state>/tokens/admin` as `dutgate up` writes it.
const BOOT_ADMIN: &str = "boot-admin-token-for-dutctl-tests";

struct Gateway {
    /// The state dir, and beside it the client's home and config dir.
    dir: tempfile::TempDir,
    url: String,
    mars_url: String,
    shutdown: CancellationToken,
}

impl Gateway {
    fn xdg(&self) -> PathBuf {
        self.dir.path().join("xdg")
    }

    fn config_file(&self) -> PathBuf {
        self.xdg().join("dutgate/config.yml")
    }
}

fn write_private(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn serve(
    listener: TcpListener,
    name: &'static str,
    router: axum::Router,
    stop: &CancellationToken,
) {
    let app = dutgate_core::http::with_common_routes(name, router, None);
    let stop = stop.clone();
    tokio::spawn(async move {
        let _ = dutgate_core::http::serve(listener, app, stop, Duration::from_millis(100)).await;
    });
}

async fn start() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    write_private(&state.join("tokens/admin"), BOOT_ADMIN);
    let l_exec = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l_mars = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut gw = GatewayConfig {
        state_dir: state.clone(),
        bind_address: "127.0.0.1".parse().unwrap(),
        internal_host: "127.0.0.1".into(),
        public_host: "127.0.0.1".into(),
        shutdown_grace_seconds: 0.5,
        ..Default::default()
    };
    gw.ports.executor = l_exec.local_addr().unwrap().port();
    gw.ports.mars = l_mars.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{}", gw.ports.executor);
    let mars_url = format!("http://127.0.0.1:{}", gw.ports.mars);
    // One token store for both, as every service of a gateway reads it.
    let auth = Auth::from_gateway(&gw);
    let shutdown = CancellationToken::new();

    let mars_db = Db::open_sqlite(&state.join("mars.db"), dutgate_mars::store::MIGRATIONS)
        .await
        .unwrap();
    let mars = dutgate_mars::machines::Mars::new(
        dutgate_mars::store::Store::new(mars_db, "lab"),
        dutgate_mars::Config::default(),
        Arc::new(dutgate_mars::power::MemoryPower::default()),
    );
    let router = dutgate_mars::start(mars, auth.clone(), shutdown.clone()).unwrap();
    serve(l_mars, "mars", router, &shutdown).await;

    let exec_db = Db::open_sqlite(
        &state.join("executor.db"),
        dutgate_executor::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let exec = Executor::start(
        Arc::new(gw),
        dutgate_executor::Config::default(),
        dutgate_executor::store::Store::new(exec_db),
        auth,
        shutdown.clone(),
    )
    .await
    .unwrap();
    serve(l_exec, "executor", exec.router(), &shutdown).await;
    Gateway {
        dir,
        url,
        mars_url,
        shutdown,
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn all(&self) -> String {
        format!(
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs dutctl with only `env` (plus a home and config dir of the test's own), in a directory
/// without `dutgate-state`: nothing of the machine's user leaks in.
async fn dutctl(g: &Gateway, env: &[(&str, &str)], args: &[&str]) -> Out {
    let mut c = Command::new(DUTCTL);
    c.args(args)
        .env_clear()
        .env("HOME", g.dir.path().join("home"))
        .env("XDG_CONFIG_HOME", g.xdg())
        .current_dir(g.dir.path());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_audit_and_identities() {
    let g = start().await;
    let admin = [
        ("DUTGATE_URL", g.url.as_str()),
        ("DUTGATE_TOKEN", BOOT_ADMIN),
    ];

    // Create: the token alone on stdout, what it is on stderr.
    let o = dutctl(&g, &admin, &["tokens", "create", "alice", "--role", "user"]).await;
    assert_eq!(o.code, 0, "{}", o.all());
    let alice = o.stdout.trim().to_string();
    assert!(
        alice.starts_with("dgt_") && o.stdout.lines().count() == 1,
        "{}",
        o.all()
    );
    assert!(
        o.stderr.contains("\"alice\"")
            && o.stderr.contains("role user")
            && o.stderr.contains("never")
            && !o.stderr.contains(&alice),
        "{}",
        o.all()
    );
    let o = dutctl(
        &g,
        &admin,
        &[
            "-o",
            "json",
            "tokens",
            "create",
            "ops",
            "--role",
            "admin",
            "--expires",
            "30",
        ],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.all());
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        (v["name"].as_str(), v["role"].as_str()),
        (Some("ops"), Some("admin"))
    );
    assert!(
        v["expires_at"].is_string() && v["created_by"] == "admin",
        "{v}"
    );
    let ops = v["token"].as_str().unwrap().to_string();
    assert!(ops.starts_with("dgt_"));

    // Errors: the server's reason, one line, exit ≠ 0.
    let o = dutctl(
        &g,
        &admin,
        &["tokens", "create", "alice", "--role", "runner"],
    )
    .await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("already exists") && o.stderr.lines().count() == 1,
        "{}",
        o.all()
    );
    let o = dutctl(
        &g,
        &admin,
        &["tokens", "create", "Bad Name", "--role", "user"],
    )
    .await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("token name") && o.stderr.lines().count() == 1,
        "{}",
        o.all()
    );
    let o = dutctl(&g, &admin, &["tokens", "create", "x", "--role", "root"]).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("unknown role"), "{}", o.all());
    let o = dutctl(&g, &admin, &["tokens", "revoke", "admin"]).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("bootstrap") && o.stderr.lines().count() == 1,
        "{}",
        o.all()
    );
    let o = dutctl(&g, &admin, &["tokens", "revoke", "nobody"]).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("no token named"), "{}", o.all());
    // A user token is no admin's.
    let o = dutctl(
        &g,
        &[("DUTGATE_URL", &g.url), ("DUTGATE_TOKEN", &alice)],
        &["tokens", "list"],
    )
    .await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("403") && o.stderr.contains("\"alice\""),
        "{}",
        o.all()
    );

    // List: names and roles, never a token.
    let o = dutctl(&g, &admin, &["tokens", "list"]).await;
    assert_eq!(o.code, 0, "{}", o.all());
    let line = |name: &str| {
        o.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {}", o.all()))
            .to_string()
    };
    assert!(line("alice").contains(" user ") && line("alice").contains("never"));
    assert!(line("ops").contains(" admin "));
    assert!(!o.stdout.contains("dgt_"), "{}", o.all());
    let o = dutctl(&g, &admin, &["-o", "json", "tokens", "list"]).await;
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "ops"]);
    assert!(!o.stdout.contains("dgt_") && !o.stdout.contains("\"token\""));

    // The config file's default gateway, with ops' token: no URL or token in the environment.
    // `old` is the same gateway (another spelling of its URL) with alice's token in a file.
    write_private(
        &g.config_file(),
        &format!(
            "default: lab\ngateways:\n  lab: {{url: '{url}', token: '{ops}'}}\n  \
             elsewhere: {{url: '{url}/elsewhere', token: dgt_elsewhere}}\n  \
             old: {{url: '{url}/', token_file: ~/old.token}}\n",
            url = g.url
        ),
    );
    write_private(&g.dir.path().join("home/old.token"), &alice);
    let o = dutctl(
        &g,
        &[],
        &["tokens", "create", "ci-runner", "--role", "runner"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.all());
    let o = dutctl(&g, &[], &["tokens", "list"]).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(
        o.stdout.contains("ci-runner") && o.stdout.contains("ops"),
        "{}",
        o.all()
    );
    // A named gateway: its URL (a path where the executor has nothing: 404).
    let o = dutctl(&g, &[("DUTGATE_GATEWAY", "elsewhere")], &["tokens", "list"]).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("/elsewhere/api/v1/tokens: 404"),
        "{}",
        o.all()
    );
    let o = dutctl(&g, &[], &["--gateway", "nope", "tokens", "list"]).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("no gateway \"nope\""), "{}", o.all());
    // An explicit --url wins over the selected gateway, with the token of the gateway whose
    // URL it is (lab's: ops, an admin; elsewhere's is alice's, a user's).
    let o = dutctl(
        &g,
        &[("DUTGATE_GATEWAY", "elsewhere")],
        &["--url", &g.url, "tokens", "revoke", "ci-runner"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(
        o.stdout.contains("revoked token \"ci-runner\""),
        "{}",
        o.all()
    );
    // --token beats the config file.
    let o = dutctl(&g, &[], &["--token", &alice, "tokens", "list"]).await;
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("403"), "{}", o.all());

    // Revoked: alice's token worked on a user endpoint, now it is refused (401), and dutctl
    // says which token it sent without showing it.
    let as_alice = [
        ("DUTGATE_URL", g.url.as_str()),
        ("DUTGATE_TOKEN", alice.as_str()),
    ];
    let o = dutctl(&g, &as_alice, &["jobs", "list"]).await;
    assert_eq!(o.code, 0, "{}", o.all());
    let o = dutctl(&g, &admin, &["tokens", "revoke", "alice"]).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(
        o.stdout.contains("revoked token \"alice\" (role user)"),
        "{}",
        o.all()
    );
    let o = dutctl(&g, &as_alice, &["jobs", "list"]).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("401")
            && o.stderr.contains("DUTGATE_TOKEN")
            && o.stderr.lines().count() == 1
            && !o.stderr.contains(&alice),
        "{}",
        o.all()
    );
    let o = dutctl(&g, &[], &["--gateway", "old", "jobs", "list"]).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("401") && o.stderr.contains("gateway \"old\"'s token_file"),
        "the config's token is named: {}",
        o.all()
    );

    // Audit: every token operation with its actor, merged over the services. mars answers
    // (or has no audit log yet: 404, a note); pdu, boot and salad are pointed at a path with
    // nothing (404, a note each).
    let nothing = format!("{}/nothing", g.url);
    let mut audit_env = admin.to_vec();
    audit_env.extend([
        ("DUTGATE_MARS_URL", g.mars_url.as_str()),
        ("DUTGATE_PDU_URL", nothing.as_str()),
        ("DUTGATE_BOOT_URL", nothing.as_str()),
        ("DUTGATE_SALAD_URL", nothing.as_str()),
    ]);
    let o = dutctl(&g, &audit_env, &["audit", "--since", "1h"]).await;
    assert_eq!(o.code, 0, "{}", o.all());
    for svc in ["pdu", "boot", "salad"] {
        assert!(
            o.stderr
                .contains(&format!("{svc} ({nothing}): no audit log there, skipped")),
            "{}",
            o.all()
        );
    }
    let row = |action: &str, target: &str| {
        o.stdout
            .lines()
            .find(|l| l.contains(&format!(" {action} ")) && l.contains(&format!(" {target} ")))
            .unwrap_or_else(|| panic!("no {action} {target} in {}", o.all()))
            .to_string()
    };
    let created = row("token.create", "token/alice");
    assert!(
        created.contains(" executor ")
            && created.contains(" admin ")
            && created.contains("ok: role user"),
        "{created}"
    );
    // Created through the config file's identity: ops.
    assert!(
        row("token.create", "token/ci-runner").contains(" ops "),
        "{}",
        o.all()
    );
    assert!(
        row("token.revoke", "token/ci-runner").contains(" ops "),
        "{}",
        o.all()
    );
    assert!(!o.stdout.contains("dgt_"), "{}", o.all());
    let o = dutctl(
        &g,
        &audit_env,
        &["-o", "json", "audit", "--service", "executor"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.all());
    let entries: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(entries.iter().all(|e| e["service"] == "executor"));
    let refused = entries
        .iter()
        .find(|e| e["action"] == "token.list" && e["actor"] == "alice")
        .unwrap_or_else(|| panic!("alice's refused list: {}", o.all()));
    assert_eq!(refused["role"], "user");
    assert!(refused["outcome"].as_str().unwrap().starts_with("refused"));
    let times: Vec<&str> = entries.iter().map(|e| e["at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_by_key(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap()
    });
    assert_eq!(times, sorted, "merged by time");
    let o = dutctl(
        &g,
        &audit_env,
        &[
            "audit",
            "--service",
            "executor",
            "--since",
            "2999-01-01T00:00:00Z",
        ],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert_eq!(o.stdout.lines().count(), 1, "only the header: {}", o.all());
    let o = dutctl(&g, &audit_env, &["audit", "--since", "yesterday"]).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("RFC 3339") && o.stderr.lines().count() == 1,
        "{}",
        o.all()
    );
    // Not an admin: refused by every service that has a log, one line for the executor's.
    let o = dutctl(
        &g,
        &[("DUTGATE_URL", &g.url), ("DUTGATE_TOKEN", "not-a-token")],
        &["audit", "--service", "executor"],
    )
    .await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("401") && o.stderr.contains("DUTGATE_TOKEN"),
        "{}",
        o.all()
    );

    // A config file others can read, holding a token, is refused (and the token not shown).
    std::fs::set_permissions(g.config_file(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = dutctl(&g, &[], &["tokens", "list"]).await;
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains("readable by others")
            && o.stderr.contains("chmod 600")
            && o.stderr.lines().count() == 1
            && !o.stderr.contains("dgt_"),
        "{}",
        o.all()
    );
    g.shutdown.cancel();
}
