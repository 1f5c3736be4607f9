//! `dutctl gitlab runner-config` and the driver's job token, against a real mars and executor
//! served in this process on 127.0.0.1:0, sharing a temporary state dir (bootstrap tokens, the
//! token store) as a gateway's services do.
//!
//! Checked: `--job-token-file` is required and names the command that makes one; the file must
//! be the owner's alone, hold one token, of role runner (where the state dir tells) and valid
//! on the gateway (a revoked one is refused); the token never appears in the config or in
//! dutctl's output; the config is written 0600; an existing config keeps its comments, its
//! order and the runners dutgate does not manage byte for byte, the managed entry is updated
//! in place, and a second run changes nothing; the driver hands the build script the job
//! token, and never its own; the driver's stages work from that runner token alone, never
//! taking the state dir's admin token even when it is readable: they cancel the left-over job
//! this runner owns and report, in one line, the 403 for another runner's.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::MachineId;
use dutgate_core::auth::Auth;
use dutgate_core::config::GatewayConfig;
use dutgate_core::db::Db;
use dutgate_executor::Executor;
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{MachinePatch, Registration};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DUTCTL: &str = env!("CARGO_BIN_EXE_dutctl");
/// The bootstrap tokens, in `<state>/tokens/` as `dutgate up` writes them.
const BOOT_ADMIN: &str = "boot-admin-token-for-runner-config-tests";
const BOOT_USER: &str = "boot-user-token-for-runner-config-tests";

struct Gateway {
    dir: tempfile::TempDir,
    state: PathBuf,
    url: String,
    mars_url: String,
    machines: Vec<MachineId>,
    shutdown: CancellationToken,
}

fn write_mode(path: &Path, text: &str, mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
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

/// mars with two machines in service (`IDLE`) and an executor, on one state dir.
async fn start() -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    write_mode(&state.join("tokens/admin"), BOOT_ADMIN, 0o600);
    write_mode(&state.join("tokens/user"), BOOT_USER, 0o600);
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
    let store = mars.store.clone();
    let router = dutgate_mars::start(mars, auth.clone(), shutdown.clone()).unwrap();
    serve(l_mars, "mars", router, &shutdown).await;
    // Registered from loopback (a DUT network), given a PDU port, then admitted as the farm
    // harness does.
    let anon = MarsClient::new(&mars_url, None);
    let admin = MarsClient::new(&mars_url, Some(dutgate_core::Secret::new(BOOT_ADMIN)));
    let mut machines = Vec::new();
    for n in 1..=2u8 {
        let id: MachineId = format!("52:54:00:00:00:0{n}").parse().unwrap();
        anon.register(&Registration {
            base_name: "sim".into(),
            tags: vec![format!("sim:n:{n}").parse().unwrap()],
            mac_address: id,
            ip_address: format!("10.2.0.{n}").parse().unwrap(),
            local_tty_device: Some("ttyS0".into()),
        })
        .await
        .unwrap();
        admin
            .patch(
                id,
                &MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some(n.to_string())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        store
            .trigger(
                id,
                dutgate_mars::state::Trigger::TrainingPassed,
                &dutgate_mars::store::Cause::new("test", "admitted by the test"),
                &|r| r.trained_at = Some(dutgate_mars::model::Timestamp::now()),
            )
            .await
            .unwrap();
        machines.push(id);
    }

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
        state,
        url,
        mars_url,
        machines,
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

async fn output(mut c: Command) -> Out {
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Gateway {
    /// dutctl with the admin token and the gateway's URLs, nothing of the machine's user.
    fn dutctl(&self) -> Command {
        let mut c = Command::new(DUTCTL);
        c.env_clear()
            .env("HOME", self.dir.path().join("home"))
            .env("PATH", "/usr/bin:/bin")
            .env("DUTGATE_URL", &self.url)
            .env("DUTGATE_MARS_URL", &self.mars_url)
            .env("DUTGATE_TOKEN", BOOT_ADMIN)
            .current_dir(self.dir.path());
        c
    }

    fn runner_dir(&self) -> PathBuf {
        self.dir.path().join("gitlab-runner")
    }

    fn config(&self) -> PathBuf {
        self.runner_dir().join("config.toml")
    }

    /// GitLab's runner tokens for the gateway runner and both machines.
    fn glrt_file(&self) -> PathBuf {
        let p = self.runner_dir().join("glrt.toml");
        write_mode(
            &p,
            &format!(
                "gateway = \"glrt-gw\"\n[machines]\n\"{}\" = \"glrt-1\"\n\"{}\" = \"glrt-2\"\n",
                self.machines[0], self.machines[1]
            ),
            0o600,
        );
        p
    }

    /// `dutctl gitlab runner-config` with the state dir, GitLab tokens, `job_token` (if any).
    async fn runner_config(&self, job_token: Option<&Path>) -> Out {
        let mut c = self.dutctl();
        c.args([
            "gitlab",
            "runner-config",
            "--gitlab-url",
            "https://gitlab.example.com",
            "--dutctl",
            "/usr/bin/dutctl",
        ])
        .arg("--token-file")
        .arg(self.glrt_file())
        .arg("--config")
        .arg(self.config())
        // The global --state-dir: where the job token's role is checked.
        .arg("--state-dir")
        .arg(&self.state);
        if let Some(f) = job_token {
            c.arg("--job-token-file").arg(f);
        }
        output(c).await
    }

    /// A named token made with `dutctl tokens create NAME --role ROLE`, in a 0600 file.
    async fn token_file(&self, name: &str, role: &str) -> (String, PathBuf) {
        let mut c = self.dutctl();
        c.args(["tokens", "create", name, "--role", role]);
        let o = output(c).await;
        assert_eq!(o.code, 0, "{}", o.all());
        let token = o.stdout.trim().to_string();
        let path = self.dir.path().join(format!("{name}.token"));
        write_mode(&path, &o.stdout, 0o600);
        (token, path)
    }
}

/// The one line dutctl prints for an error, and its exit code.
fn refused(o: &Out, wants: &[&str]) {
    assert_eq!(o.code, 10, "{}", o.all());
    assert_eq!(o.stderr.lines().count(), 1, "one line: {}", o.all());
    for w in wants {
        assert!(o.stderr.contains(w), "{w:?} in {}", o.all());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_token_file_is_required_and_checked() {
    let g = start().await;

    // Missing: the error says what to run.
    let o = g.runner_config(None).await;
    refused(
        &o,
        &[
            "--job-token-file is required",
            "dutctl tokens create gitlab-ci --role runner",
        ],
    );
    assert!(!g.config().exists());

    // Readable by others, not a token alone, a token of another role: refused, nothing written.
    let (runner, runner_file) = g.token_file("gitlab-ci", "runner").await;
    std::fs::set_permissions(&runner_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = g.runner_config(Some(runner_file.as_path())).await;
    refused(&o, &["readable by others (mode 644)", "chmod 600"]);
    assert!(!o.stderr.contains(&runner), "{}", o.all());
    std::fs::set_permissions(&runner_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let json = g.dir.path().join("json.token");
    write_mode(
        &json,
        &format!("{{\"name\": \"gitlab-ci\", \"role\": \"runner\", \"token\": \"{runner}\"}}\n"),
        0o600,
    );
    let o = g.runner_config(Some(json.as_path())).await;
    refused(&o, &["not a token alone", "jq -r .token"]);
    assert!(!o.stderr.contains(&runner), "{}", o.all());
    let (_, alice) = g.token_file("alice", "user").await;
    for (file, wants) in [
        (alice, ["\"alice\" has role user", "--role runner"]),
        (
            g.state.join("tokens/user"),
            ["\"user\" has role user", "--role runner"],
        ),
        (
            g.state.join("tokens/admin"),
            ["\"admin\" has role admin", "--role runner"],
        ),
    ] {
        let o = g.runner_config(Some(file.as_path())).await;
        refused(&o, &wants);
        assert!(!o.stderr.contains(BOOT_ADMIN) && !o.stderr.contains(BOOT_USER));
    }
    assert!(!g.config().exists());

    // The runner token: the config names its file (absolute) in every stage of every runner,
    // never the token; written 0600.
    let relative = PathBuf::from("gitlab-ci.token");
    let o = g.runner_config(Some(relative.as_path())).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(!o.stdout.contains(&runner) && !o.stderr.contains(&runner));
    assert_eq!(mode_of(&g.config()), 0o600);
    let text = std::fs::read_to_string(g.config()).unwrap();
    assert!(!text.contains(&runner), "{text}");
    let doc: toml::Table = toml::from_str(&text).unwrap();
    let runners = doc["runners"].as_array().unwrap();
    assert_eq!(runners.len(), 3, "{text}");
    let abs = runner_file.canonicalize().unwrap().display().to_string();
    for r in runners {
        for stage in ["config", "prepare", "run", "cleanup"] {
            let args: Vec<&str> = r["custom"][format!("{stage}_args").as_str()]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            assert!(
                args.windows(2)
                    .any(|w| w == ["--job-token-file", abs.as_str()]),
                "{args:?}"
            );
            // The driver gets no state dir: GitLab Runner need not read the gateway's files.
            assert!(!args.contains(&"--state-dir"), "{args:?}");
        }
    }

    // The driver gives the build script that token, and never its own (here the admin token
    // of the state dir).
    let scratch = g.dir.path().join("scratch");
    let seen = g.dir.path().join("seen");
    let script = g.dir.path().join("step_script.sh");
    std::fs::write(
        &script,
        format!(
            "printf '%s' \"${{DUTGATE_TOKEN:-none}}\" > {}\n",
            seen.display()
        ),
    )
    .unwrap();
    for (job_token, want) in [(Some(&runner_file), runner.as_str()), (None, "none")] {
        let mut c = Command::new(DUTCTL);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("DUTGATE_URL", &g.url)
            .env("CUSTOM_ENV_CI_JOB_ID", "7")
            .arg("--state-dir")
            .arg(&g.state)
            .args(["gitlab", "run", "--gateway-only", "--scratch-dir"])
            .arg(&scratch);
        if let Some(f) = job_token {
            c.arg("--job-token-file").arg(f);
        }
        c.arg(&script).arg("step_script");
        let o = output(c).await;
        assert_eq!(o.code, 0, "{}", o.all());
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), want);
    }

    // Revoked: refused at once, with the file named and never the token.
    let mut c = g.dutctl();
    c.args(["tokens", "revoke", "gitlab-ci"]);
    assert_eq!(output(c).await.code, 0);
    let before = std::fs::read(g.config()).unwrap();
    let o = g.runner_config(Some(runner_file.as_path())).await;
    refused(
        &o,
        &[
            "refuses this token (unknown, revoked or expired)",
            abs.as_str(),
        ],
    );
    assert!(!o.stderr.contains(&runner), "{}", o.all());
    assert_eq!(std::fs::read(g.config()).unwrap(), before);
    g.shutdown.cancel();
}

/// An admin's config: comments, its own order, settings dutgate does not know, a runner of
/// its own, and the entry of machine 1 as an older dutctl wrote it (sorted keys, the bootstrap
/// user token for the jobs), with a comment and a key GitLab Runner added.
fn admin_config(machine: MachineId) -> (String, [&'static str; 3]) {
    let head = "# GitLab Runner on the farm gateway.\n\
                # Edited by hand and by `dutctl gitlab runner-config`.\n\
                concurrent = 1   # raised by dutctl when lower\n\
                check_interval = 3\n\
                \n\
                [session_server]\n\
                \x20 # the debug terminal\n\
                \x20 session_timeout = 1800\n";
    let docker = "\n\
                  # A docker runner for the linters: not dutgate's.\n\
                  [[runners]]\n\
                  \x20 name   = \"docker-lint\"   # aligned by hand\n\
                  \x20 url    = \"https://gitlab.example.com\"\n\
                  \x20 token  = \"glrt-docker\"\n\
                  \x20 executor = \"docker\"\n\
                  \x20 [runners.docker]\n\
                  \x20   image = \"debian:trixie\"  # keep in step with CI\n\
                  \x20   volumes = [\"/cache\",\n\
                  \x20              \"/srv/lint:/lint:ro\"]\n";
    let tail = "\n# End of the admin's part.\n";
    let args = |stage: &str| {
        format!(
            "[\"--url\", \"http://old\", \"gitlab\", \"{stage}\", \"--machine\", \"{machine}\", \"--job-token-file\", \"/var/lib/dutgate/tokens/user\"]"
        )
    };
    let managed = format!(
        "\n\
         # The bench machine.\n\
         [[runners]]\n\
         environment = []\n\
         executor = \"custom\"\n\
         id = 42\n\
         limit = 2  # tried two at once\n\
         name = \"old-name\"\n\
         token = \"glrt-1\"\n\
         url = \"https://gitlab.example.com\"\n\
         \n\
         [runners.custom]\n\
         cleanup_args = {}\n\
         cleanup_exec = \"/usr/bin/dutctl\"\n\
         config_args = {}\n\
         config_exec = \"/usr/bin/dutctl\"\n\
         prepare_args = {}\n\
         prepare_exec = \"/usr/bin/dutctl\"\n\
         run_args = {}\n\
         run_exec = \"/usr/bin/dutctl\"\n",
        args("cleanup"),
        args("config"),
        args("prepare"),
        args("run"),
    );
    (
        format!("{head}{managed}{docker}{tail}"),
        [head, docker, tail],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_keep_comments_order_and_other_runners() {
    let g = start().await;
    let (_, job_token) = g.token_file("gitlab-ci", "runner").await;
    let abs = job_token.canonicalize().unwrap().display().to_string();
    let (old, kept) = admin_config(g.machines[0]);
    write_mode(&g.config(), &old, 0o644);
    let o = g.runner_config(Some(job_token.as_path())).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stderr.contains("written"), "{}", o.all());
    let new = std::fs::read_to_string(g.config()).unwrap();
    // Rewritten, so 0600 whatever it was.
    assert_eq!(mode_of(&g.config()), 0o600);

    // The admin's parts, byte for byte and in their order; `concurrent` raised in place, its
    // comment kept.
    let mut at = 0;
    for part in kept {
        let part = part.replace("concurrent = 1 ", "concurrent = 4 ");
        let found = new[at..]
            .find(&part)
            .unwrap_or_else(|| panic!("kept in order:\n{part}\n--- in ---\n{new}"));
        at += found + part.len();
    }
    assert!(new.ends_with(kept[2]), "{new}");

    // The managed entry, in place (after the session server, before the docker runner), its
    // comment and GitLab's `id` kept, its values updated (a value's trailing comment stays).
    let start = new.find("# The bench machine.\n[[runners]]\n").unwrap();
    let end = new.find(kept[1]).unwrap();
    assert!(new.find("[session_server]").unwrap() < start && start < end);
    let entry = &new[start..end];
    let m = g.machines[0];
    let stage_args = |stage: &str| {
        format!(
            "[\"--url\", \"{}\", \"gitlab\", \"{stage}\", \"--machine\", \"{m}\", \"--job-token-file\", \"{abs}\"]",
            g.url,
        )
    };
    let want = format!(
        "# The bench machine.\n\
         [[runners]]\n\
         environment = [\"DUTGATE_MACHINE_ID={m}\", \"DUTGATE_MACHINE_TAGS=sim:n:1\"]\n\
         executor = \"custom\"\n\
         id = 42\n\
         limit = 1  # tried two at once\n\
         name = \"lab-sim-1\"\n\
         token = \"glrt-1\"\n\
         url = \"https://gitlab.example.com\"\n\
         \n\
         [runners.custom]\n\
         cleanup_args = {}\n\
         cleanup_exec = \"/usr/bin/dutctl\"\n\
         config_args = {}\n\
         config_exec = \"/usr/bin/dutctl\"\n\
         prepare_args = {}\n\
         prepare_exec = \"/usr/bin/dutctl\"\n\
         run_args = {}\n\
         run_exec = \"/usr/bin/dutctl\"\n",
        stage_args("cleanup"),
        stage_args("config"),
        stage_args("prepare"),
        stage_args("run"),
    );
    assert_eq!(entry, want, "the managed entry, updated in place");

    // New entries (the gateway runner, machine 2) after the last runner, before the admin's
    // closing comment.
    let doc: toml::Table = toml::from_str(&new).unwrap();
    let names: Vec<&str> = doc["runners"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["lab-sim-1", "docker-lint", "dutgate-gateway", "lab-sim-2"],
        "{new}"
    );
    assert_eq!(doc["concurrent"].as_integer(), Some(4));
    assert_eq!(doc["check_interval"].as_integer(), Some(3));

    // Again: nothing to change, the file is not rewritten.
    let modified = std::fs::metadata(g.config()).unwrap().modified().unwrap();
    let o = g.runner_config(Some(job_token.as_path())).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stderr.contains("unchanged"), "{}", o.all());
    assert_eq!(std::fs::read_to_string(g.config()).unwrap(), new);
    assert_eq!(
        std::fs::metadata(g.config()).unwrap().modified().unwrap(),
        modified
    );
    // The token itself is nowhere in the config.
    let token = std::fs::read_to_string(&job_token).unwrap();
    assert!(!new.contains(token.trim()));
    g.shutdown.cancel();
}

/// The driver's stages as GitLab Runner runs them: the gateway's URLs, the runner token file,
/// no token in the environment, and the gateway's state dir named by `DUTGATE_STATE_DIR` and
/// readable (the tests run as root, so a chmod would not keep it from us): whatever the driver
/// does, it must do as the runner, never with the admin token found there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_works_from_the_runner_token_alone() {
    use dutgate_executor::client::{ExecutorClient, SubmitOptions};
    use dutgate_executor::model::JobState;

    let g = start().await;
    let (mine, mine_file) = g.token_file("gitlab-ci", "runner").await;
    let (other, _) = g.token_file("other-ci", "runner").await;
    let scratch = g.dir.path().join("scratch");
    let driver = |stage: &str, job_token: Option<&Path>| {
        let mut c = Command::new(DUTCTL);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", g.dir.path().join("home"))
            .env("DUTGATE_URL", &g.url)
            .env("DUTGATE_MARS_URL", &g.mars_url)
            .env("DUTGATE_STATE_DIR", &g.state)
            .env("CUSTOM_ENV_CI_JOB_ID", "31")
            .env("CUSTOM_ENV_CI_RUNNER_DESCRIPTION", "lab-sim-1")
            .args(["gitlab", stage, "--scratch-dir"])
            .arg(&scratch);
        if let Some(f) = job_token {
            c.arg("--job-token-file").arg(f);
        }
        c
    };
    let mine_file = mine_file.as_path();

    // config and prepare: the machine found by its name (the runner's description) and by MAC.
    let o = output(driver("config", Some(mine_file))).await;
    assert_eq!(o.code, 0, "{}", o.all());
    let cfg: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(cfg["hostname"], "lab-sim-1");
    let o = output(driver("prepare", Some(mine_file))).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stdout.contains("machine lab-sim-1"), "{}", o.all());
    let mut c = driver("prepare", Some(mine_file));
    c.args(["--machine", &g.machines[1].to_string()]);
    let o = output(c).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(o.stdout.contains("machine lab-sim-2"), "{}", o.all());
    // A job token file that is not there: a system failure, in one line.
    let o = output(driver("prepare", Some(&g.dir.path().join("nope")))).await;
    assert_eq!(o.code, 2, "{}", o.all());
    assert_eq!(o.stdout.lines().count(), 1, "{}", o.all());
    assert!(o.stdout.contains("no token in"), "{}", o.all());

    // The build stage: the machine's id and the runner token, nothing else.
    let seen = g.dir.path().join("seen");
    let script = g.dir.path().join("step_script.sh");
    std::fs::write(
        &script,
        format!(
            "printf '%s %s' \"$DUTGATE_MACHINE_ID\" \"${{DUTGATE_TOKEN:-none}}\" > {}\n",
            seen.display()
        ),
    )
    .unwrap();
    let mut c = driver("run", Some(mine_file));
    c.arg(&script).arg("step_script");
    let o = output(c).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        format!("{} {mine}", g.machines[0])
    );

    // Left over by a cancelled GitLab job: a job its build script submitted (so this runner's),
    // and one of another runner's in the same run record. Both target a machine that has just
    // registered and is not in service (no PDU port, untrained), so they wait in the queue and
    // cancelling is never too late.
    MarsClient::new(&g.mars_url, None)
        .register(&Registration {
            base_name: "sim".into(),
            tags: vec!["sim:n:9".parse().unwrap()],
            mac_address: "52:54:00:00:00:09".parse().unwrap(),
            ip_address: "10.2.0.9".parse().unwrap(),
            local_tty_device: Some("ttyS0".into()),
        })
        .await
        .unwrap();
    let yaml =
        "version: 1\ntarget:\n  tags: [\"sim:n:9\"]\ndeployment:\n  start:\n    kernel:\n      \
                url: \"http://127.0.0.1:9/vmlinuz\"\n"
            .to_string();
    let submit = |token: &str| {
        let c = ExecutorClient::new(&g.url, Some(dutgate_core::Secret::new(token)));
        let yaml = yaml.clone();
        async move { c.submit(&yaml, &SubmitOptions::new()).await.unwrap().id }
    };
    let own_job = submit(&mine).await;
    let others_job = submit(&other).await;
    let record = scratch.join("jobs/31/run-record");
    let write_record = || {
        std::fs::create_dir_all(record.parent().unwrap()).unwrap();
        std::fs::write(
            &record,
            format!("submitted {own_job}\nsubmitted {others_job}\n"),
        )
        .unwrap();
    };
    let admin = ExecutorClient::new(&g.url, Some(dutgate_core::Secret::new(BOOT_ADMIN)));
    let state_of = |id: i64| {
        let admin = admin.clone();
        async move { admin.job(id).await.unwrap().state }
    };

    // Without the job token file the driver has no token at all: the readable admin token of
    // the state dir is not taken, so nothing is cancelled.
    write_record();
    let o = output(driver("cleanup", None)).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(!o.stdout.contains("cancelled job"), "{}", o.all());
    assert_eq!(state_of(own_job).await, JobState::Queued);
    assert_eq!(state_of(others_job).await, JobState::Queued);
    assert!(!record.exists(), "cleanup removes the scratch data");

    // With it: its own job is cancelled; the other runner's is refused (403), said in one line
    // naming the job, and left alone.
    write_record();
    let o = output(driver("cleanup", Some(mine_file))).await;
    assert_eq!(o.code, 0, "{}", o.all());
    assert!(
        o.stdout
            .contains(&format!("dutgate: cancelled job {own_job}\n")),
        "{}",
        o.all()
    );
    let refusal: Vec<&str> = o
        .stdout
        .lines()
        .filter(|l| l.contains(&format!("job {others_job}")))
        .collect();
    assert_eq!(refusal.len(), 1, "{}", o.all());
    assert!(
        refusal[0].starts_with(&format!("dutgate: cancelling job {others_job}: "))
            && refusal[0].contains("403")
            && refusal[0].contains("belongs to another user"),
        "{}",
        o.all()
    );
    assert!(!o.all().contains(&mine) && !o.all().contains(BOOT_ADMIN));
    assert_eq!(state_of(own_job).await, JobState::Finished);
    let j = admin.job(own_job).await.unwrap();
    assert_eq!(j.reason.as_deref(), Some("cancelled"), "{j:#?}");
    assert_eq!(state_of(others_job).await, JobState::Queued);
    g.shutdown.cancel();
}
