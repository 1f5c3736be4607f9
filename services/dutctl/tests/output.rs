//! Every `dutctl` command with `-o json` (and some with `-o yaml`) against a whole gateway in
//! this process (`dutgate_executor::testing`: real mars, pdu with the dummy driver, boot,
//! salad, executor with the embedded S3 endpoint, real job processes, simulated DUTs): stdout
//! must be one document of the shape docs/dutctl.md gives (keys and types, not values), so a
//! command that ignores `-o` fails here. Also `run --share-dir` (the DUT reads the uploaded
//! files), `jobs resubmit`, and `dutctl console` over salad's WebSocket.
//!
//! Own `main` (`harness = false`): the test binary is also the job process the executor starts.

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::ServiceName;
use dutgate_executor::testing::{self, ADMIN, Farm, Options, USER};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(60);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn command(farm: &Farm, token: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_dutctl"));
    c.env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        )
        .env("HOME", farm.tmp.path())
        .env("DUTGATE_URL", &farm.url)
        .env("DUTGATE_TOKEN", token)
        .kill_on_drop(true);
    if let Some(s3) = &farm.s3 {
        c.env("DUTGATE_S3_URL", &s3.url);
    }
    for svc in [
        ServiceName::Mars,
        ServiceName::Pdu,
        ServiceName::Boot,
        ServiceName::Salad,
    ] {
        c.env(
            format!("DUTGATE_{}_URL", svc.as_str().to_uppercase()),
            farm.gw.public_url(svc),
        );
    }
    c
}

async fn dutctl(farm: &Farm, token: &str, args: &[&str]) -> Out {
    let out = command(farm, token)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `dutctl -o json ARGS`, expects `code`, and parses stdout as exactly one document.
async fn json(farm: &Farm, token: &str, args: &[&str], code: i32) -> Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let o = dutctl(farm, token, &all).await;
    assert_eq!(o.code, code, "dutctl {args:?}: {}{}", o.stdout, o.stderr);
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "dutctl -o json {args:?}: stdout is not one JSON document ({e}):\n{}",
            o.stdout
        )
    })
}

/// The same with `-o yaml`, parsed as YAML.
async fn yaml(farm: &Farm, token: &str, args: &[&str], code: i32) -> Value {
    let mut all = vec!["-o", "yaml"];
    all.extend_from_slice(args);
    let o = dutctl(farm, token, &all).await;
    assert_eq!(o.code, code, "dutctl {args:?}: {}{}", o.stdout, o.stderr);
    yaml_serde::from_str(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "dutctl -o yaml {args:?}: stdout is not one YAML document ({e}):\n{}",
            o.stdout
        )
    })
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `v` is an object with these keys of these types (`a|b`: either).
#[track_caller]
fn shape(what: &str, v: &Value, keys: &[(&str, &str)]) {
    assert!(v.is_object(), "{what}: not an object: {v}");
    for (k, ty) in keys {
        let Some(x) = v.get(*k) else {
            panic!("{what}: no key {k:?} in {v}");
        };
        assert!(
            ty.split('|').any(|t| t == type_of(x)),
            "{what}: {k} is {} ({x}), expected {ty}",
            type_of(x)
        );
    }
}

/// `v` is a non-empty array whose items have this shape.
#[track_caller]
fn array_of(what: &str, v: &Value, keys: &[(&str, &str)]) {
    let items = v
        .as_array()
        .unwrap_or_else(|| panic!("{what}: not an array: {v}"));
    assert!(!items.is_empty(), "{what}: empty");
    for i in items {
        shape(what, i, keys);
    }
}

const SERVICE: &[(&str, &str)] = &[
    ("service", "string"),
    ("url", "string"),
    ("healthy", "bool"),
    ("detail", "string"),
];
const JOB: &[(&str, &str)] = &[
    ("id", "number"),
    ("url", "string"),
    ("state", "string"),
    ("status", "string|null"),
    ("exit_code", "number|null"),
    ("reason", "string|null"),
    ("priority", "number"),
    ("target", "object"),
    ("machine_id", "string|null"),
    ("submitted_at", "string"),
    ("finished_at", "string|null"),
    ("console_bytes", "number"),
    ("owner", "string"),
];
const RUN: &[(&str, &str)] = &[
    ("id", "number"),
    ("url", "string"),
    ("state", "string"),
    ("status", "string"),
    ("exit_code", "number"),
    ("reason", "string|null"),
    ("machine_id", "string|null"),
    ("console_url", "string"),
    ("artifacts_url", "string"),
    ("share_dir", "string|null"),
    ("uploaded", "array"),
    ("artifacts", "array"),
];
const MACHINE: &[(&str, &str)] = &[
    ("id", "string"),
    ("full_name", "string"),
    ("state", "string"),
    ("tags", "array"),
];
const TOKEN: &[(&str, &str)] = &[
    ("name", "string"),
    ("role", "string"),
    ("created_at", "string"),
    ("expires_at", "string|null"),
    ("created_by", "string"),
];

fn pass_job() -> String {
    testing::job_yaml("  tags: [\"sim:any:yes\"]", "pass", "pass", "", "")
}

/// A job whose DUT reads `input/hello.txt` from its bucket and writes `results/out.txt`.
fn bucket_job() -> String {
    testing::job_yaml("  tags: [\"sim:any:yes\"]", "bucket", "bucket", "", "").replace(
        "\"sim=bucket\"]",
        "\"sim=bucket\", \"s3={{ s3_url }}\", \"bucket={{ job_bucket }}\", \
         \"ak={{ job_bucket_access_key }}\", \"sk={{ job_bucket_secret_key }}\", \
         \"other=job-no-such-bucket\"]",
    )
}

async fn every_command(farm: &Farm) {
    let dir = farm.tmp.path().join("output-test");
    std::fs::create_dir_all(&dir).unwrap();
    let mac1 = farm.machines[0].to_string();

    // status (json and yaml): the farm runs no registry, so exit 1 with the document.
    array_of("status", &json(farm, USER, &["status"], 1).await, SERVICE);
    array_of("status", &yaml(farm, USER, &["status"], 1).await, SERVICE);

    // job validate (offline).
    let job_file = dir.join("pass.yml");
    std::fs::write(&job_file, pass_job()).unwrap();
    let jf = job_file.to_str().unwrap();
    let v = json(
        farm,
        USER,
        &["job", "validate", jf, "--var", "artifacts=http://x"],
        0,
    )
    .await;
    shape(
        "job validate",
        &v,
        &[
            ("version", "number"),
            ("target", "object"),
            ("deployment", "object"),
        ],
    );

    // run: one document on stdout, the console on stderr; the share dir goes to the bucket.
    let share = dir.join("share");
    std::fs::create_dir_all(share.join("input")).unwrap();
    std::fs::write(share.join("input/hello.txt"), "hello from the CI").unwrap();
    let bucket_file = dir.join("bucket.yml");
    std::fs::write(&bucket_file, bucket_job()).unwrap();
    let o = dutctl(
        farm,
        USER,
        &[
            "-o",
            "json",
            "run",
            bucket_file.to_str().unwrap(),
            "--share-dir",
            share.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(o.code, 0, "{}{}", o.stdout, o.stderr);
    let run: Value = serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("run -o json: not one document ({e}):\n{}", o.stdout));
    shape("run", &run, RUN);
    assert_eq!(run["status"], "PASS");
    assert_eq!(run["uploaded"], serde_json::json!(["input/hello.txt"]));
    // The DUT read the uploaded file with its own keys (its console, on stderr in json mode).
    assert!(
        o.stderr.contains("INITIAL: hello from the CI"),
        "the DUT did not see the share dir:\n{}",
        o.stderr
    );
    let artifacts: Vec<&str> = run["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        artifacts.contains(&"bucket/results/out.txt"),
        "{artifacts:?}"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("bucket/results/out.txt")).unwrap(),
        "written by the DUT"
    );
    // stderr is no terminal here: progress is plain lines, no control codes.
    assert!(
        o.stderr.contains("uploading 1 files (17 bytes)"),
        "{}",
        o.stderr
    );
    assert!(
        !o.stderr.contains('\x1b'),
        "control codes on a non-terminal:\n{}",
        o.stderr
    );
    let id = run["id"].as_i64().unwrap();
    let ids = id.to_string();

    // run -o yaml.
    let v = yaml(farm, USER, &["run", jf], 0).await;
    shape("run (yaml)", &v, RUN);

    // jobs *.
    array_of(
        "jobs list",
        &json(farm, USER, &["jobs", "list"], 0).await,
        JOB,
    );
    array_of(
        "jobs list",
        &yaml(farm, USER, &["jobs", "list"], 0).await,
        JOB,
    );
    let v = json(farm, USER, &["jobs", "show", &ids], 0).await;
    shape("jobs show", &v, &[("job", "object"), ("events", "array")]);
    shape("jobs show .job", &v["job"], JOB);
    array_of(
        "jobs show .events",
        &v["events"],
        &[
            ("seq", "number"),
            ("at", "string"),
            ("kind", "string"),
            ("message", "string"),
        ],
    );
    let v = json(farm, USER, &["jobs", "log", &ids], 0).await;
    shape(
        "jobs log",
        &v,
        &[
            ("job", "number"),
            ("bytes", "number"),
            ("console", "string"),
        ],
    );
    assert!(v["console"].as_str().unwrap().contains("INITIAL:"), "{v}");
    let v = json(farm, USER, &["jobs", "log", "-f", &ids], 0).await;
    shape(
        "jobs log -f",
        &v,
        &[
            ("job", "number"),
            ("bytes", "number"),
            ("console", "string"),
        ],
    );
    let to = dir.join("artifacts");
    let v = json(
        farm,
        USER,
        &["jobs", "artifacts", &ids, "--to", to.to_str().unwrap()],
        0,
    )
    .await;
    shape(
        "jobs artifacts",
        &v,
        &[("job", "number"), ("dir", "string"), ("files", "array")],
    );

    // jobs resubmit: the same description again, owned by the caller.
    let v = json(farm, USER, &["jobs", "resubmit", &ids], 0).await;
    shape(
        "jobs resubmit",
        &v,
        &[
            ("id", "number"),
            ("url", "string"),
            ("state", "string"),
            ("resubmitted_from", "number"),
        ],
    );
    assert_eq!(v["resubmitted_from"], id);
    let again = v["id"].as_i64().unwrap();
    let done = farm.wait_finished(again, T).await;
    assert_eq!(done.status, Some(dutgate_core::JobStatus::Pass));
    assert!(
        farm.console(again).await.contains("INITIAL:"),
        "the resubmitted job ran the same description"
    );
    let v = json(
        farm,
        USER,
        &[
            "jobs",
            "resubmit",
            &ids,
            "--wait",
            "--share-dir",
            share.to_str().unwrap(),
        ],
        0,
    )
    .await;
    shape("jobs resubmit --wait", &v, RUN);
    assert_eq!(v["status"], "PASS");
    assert!(
        v["uploaded"]
            .as_array()
            .unwrap()
            .contains(&Value::from("input/hello.txt"))
    );

    // jobs cancel: a job that hangs, cancelled.
    let hang = dir.join("hang.yml");
    std::fs::write(
        &hang,
        testing::job_yaml("  tags: [\"sim:any:yes\"]", "hang", "hang", "", ""),
    )
    .unwrap();
    let hang_id = farm
        .submit(&std::fs::read_to_string(&hang).unwrap(), "")
        .await;
    let v = json(farm, USER, &["jobs", "cancel", &hang_id.to_string()], 0).await;
    shape("jobs cancel", &v, JOB);
    farm.wait_finished(hang_id, T).await;

    // machines *.
    array_of(
        "machines list",
        &json(farm, ADMIN, &["machines", "list"], 0).await,
        MACHINE,
    );
    shape(
        "machines show",
        &json(farm, ADMIN, &["machines", "show", &mac1], 0).await,
        MACHINE,
    );
    shape(
        "machines set",
        &json(
            farm,
            ADMIN,
            &["machines", "set", &mac1, "--comment", "rack 2"],
            0,
        )
        .await,
        MACHINE,
    );
    shape(
        "machines discover",
        &json(farm, ADMIN, &["machines", "discover"], 0).await,
        &[("discovery", "object|null")],
    );
    let v = json(farm, ADMIN, &["machines", "events", &mac1], 0).await;
    assert!(v.is_array() || v.is_object(), "machines events: {v}");
    let v = json(farm, ADMIN, &["machines", "training", &mac1], 0).await;
    assert!(v.is_object(), "machines training: {v}");

    // pdus *.
    array_of(
        "pdus list",
        &json(farm, ADMIN, &["pdus", "list"], 0).await,
        &[("name", "string"), ("driver", "string")],
    );
    let v = json(farm, ADMIN, &["pdus", "ports", "pdu1"], 0).await;
    array_of("pdus ports", &v, &[("id", "string"), ("state", "string")]);
    let v = json(
        farm,
        ADMIN,
        &["pdus", "set", "pdu1", "8", "--label", "spare"],
        0,
    )
    .await;
    assert!(v.is_object(), "pdus set: {v}");
    let v = json(
        farm,
        ADMIN,
        &["pdus", "cycle", "pdu1", "8", "--off-seconds", "0"],
        0,
    )
    .await;
    assert!(v.is_object(), "pdus cycle: {v}");

    // tokens *.
    let v = json(
        farm,
        ADMIN,
        &["tokens", "create", "ci-shape", "--role", "runner"],
        0,
    )
    .await;
    shape("tokens create", &v, TOKEN);
    shape("tokens create", &v, &[("token", "string")]);
    array_of(
        "tokens list",
        &json(farm, ADMIN, &["tokens", "list"], 0).await,
        TOKEN,
    );
    array_of(
        "tokens list",
        &yaml(farm, ADMIN, &["tokens", "list"], 0).await,
        TOKEN,
    );
    shape(
        "tokens revoke",
        &json(farm, ADMIN, &["tokens", "revoke", "ci-shape"], 0).await,
        TOKEN,
    );

    // audit: one object per line (for jq), each of the same shape.
    let o = dutctl(
        farm,
        ADMIN,
        &["-o", "json", "audit", "--service", "executor"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
        .collect();
    array_of(
        "audit",
        &Value::Array(lines),
        &[
            ("at", "string"),
            ("service", "string"),
            ("actor", "string"),
            ("source", "string"),
            ("action", "string"),
            ("target", "string"),
            ("outcome", "string"),
        ],
    );

    // gitlab runner-config.
    let job_token = dir.join("job-token");
    std::fs::write(&job_token, USER).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&job_token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("config.toml");
    let v = json(
        farm,
        USER,
        &[
            "gitlab",
            "runner-config",
            "--gitlab-url",
            "https://gitlab.example.com",
            "--job-token-file",
            job_token.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        0,
    )
    .await;
    shape(
        "gitlab runner-config",
        &v,
        &[
            ("config_file", "string"),
            ("changed", "bool"),
            ("missing", "array"),
        ],
    );

    // A byte stream has no document: refused rather than ignored.
    let o = dutctl(farm, ADMIN, &["-o", "json", "console", &mac1]).await;
    assert_eq!(o.code, 64, "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
}

/// Reads `out` until it holds `want` (or the deadline passes).
async fn read_until(out: &mut (impl AsyncReadExt + Unpin), seen: &mut String, want: &str) {
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "never saw {want:?} in:\n{seen}");
        match tokio::time::timeout(left, out.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("stream ended before {want:?}:\n{seen}"),
            Ok(Ok(n)) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Ok(Err(e)) => panic!("reading: {e}"),
            Err(_) => panic!("never saw {want:?} in:\n{seen}"),
        }
    }
}

async fn console(farm: &Farm) {
    // A machine running the `echo` DUT: it answers the first line typed.
    let yaml = testing::job_yaml(
        &format!("  id: \"{}\"", farm.machines[1]),
        "echo",
        "echo",
        "",
        "",
    );
    let id = farm.submit(&yaml, "").await;
    let deadline = Instant::now() + T;
    while !farm.console(id).await.contains("READY_FOR_INPUT") {
        assert!(Instant::now() < deadline, "the echo DUT never got ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mac = farm.machines[1].to_string();

    // A user may not open it: exit 10, one line naming the reason and the read-only way.
    let o = dutctl(farm, USER, &["console", &mac]).await;
    assert_eq!(o.code, 10, "{}{}", o.stdout, o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(o.stderr.contains("403"), "{}", o.stderr);
    assert!(o.stderr.contains("--read-only"), "{}", o.stderr);

    // Read-only: the log so far, then live; any token.
    let mut c = command(farm, USER);
    c.args(["console", "--read-only", &mac])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut seen = String::new();
    read_until(child.stdout.as_mut().unwrap(), &mut seen, "READY_FOR_INPUT").await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // An admin: two-way. stdin is a pipe, so its bytes go as they are.
    let mut c = command(farm, ADMIN);
    c.args(["console", &mac])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    // The WebSocket shows output from its opening on: type until the DUT answers (the first
    // line may be typed before the session is up).
    let mut seen = String::new();
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 4096];
    while !seen.contains("ECHO:hello") {
        assert!(Instant::now() < deadline, "no echo from the DUT:\n{seen}");
        stdin.write_all(b"hello\r\n").await.unwrap();
        stdin.flush().await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), stdout.read(&mut buf)).await
        {
            assert!(n > 0, "console ended:\n{seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // On a terminal (`script` gives it one: bsdutils): raw mode, and `~.` at a line's start
    // quits with exit 0.
    let cmd = format!("{} console {mac}", env!("CARGO_BIN_EXE_dutctl"));
    // The same environment as `command`'s, for `script` to pass on.
    let env = command(farm, ADMIN);
    let mut c = tokio::process::Command::new("script");
    c.env_clear();
    for (k, v) in env.as_std().get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c.args(["-qec", &cmd, "/dev/null"]).kill_on_drop(true);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (Debian package bsdutils)");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    read_until(&mut stdout, &mut seen, "~. quits").await;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\r~.").await.unwrap();
    stdin.flush().await.unwrap();
    let status = tokio::time::timeout(T, child.wait())
        .await
        .expect("~. quits")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{seen}");

    let _ = farm.client().cancel(id).await;
    farm.wait_finished(id, T).await;
}

fn main() -> ExitCode {
    // The executor runs as a process of its own, as `dutgate executor` does: with the state
    // dir's token store, which `tokens` needs.
    if let Some(code) = testing::executor_process_main() {
        return code;
    }
    // The job process the executor starts.
    if let Some(code) = testing::job_process_main() {
        return code;
    }
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        println!("every_command: test");
        println!("console: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (run_all, run_console) = (want("every_command"), want("console"));
    if !run_all && !run_console {
        return ExitCode::SUCCESS;
    }
    let failed = rt.block_on(async move {
        let farm = std::sync::Arc::new(
            Farm::start(Options {
                machines: 2,
                s3: true,
                lease_ttl: 5,
                executor_mode: testing::ExecutorMode::this_binary(),
                ..Default::default()
            })
            .await,
        );
        let mut failed = Vec::new();
        let tests: [(&str, bool); 2] = [("console", run_console), ("every_command", run_all)];
        for (name, selected) in tests {
            if !selected {
                continue;
            }
            let start = Instant::now();
            let f = farm.clone();
            let r = tokio::spawn(async move {
                match name {
                    "console" => console(&f).await,
                    _ => every_command(&f).await,
                }
            })
            .await;
            println!(
                "test {name} ... {} ({:.1} s)",
                if r.is_ok() { "ok" } else { "FAILED" },
                start.elapsed().as_secs_f64()
            );
            if r.is_err() {
                failed.push(name);
            }
        }
        if let Ok(farm) = std::sync::Arc::try_unwrap(farm) {
            farm.stop().await;
        }
        failed
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    if failed.is_empty() {
        println!("test result: ok");
        ExitCode::SUCCESS
    } else {
        println!("test result: FAILED: {failed:?}");
        ExitCode::from(101)
    }
}
