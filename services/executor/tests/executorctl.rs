//! ci-tron's own client, `executorctl` (`valve-gfx-ci-executor-client` 0.2.1 from PyPI, in a
//! venv kept under target/), against the executor, unchanged: it submits without a token
//! from a trusted client network, its connection is upgraded to ci-tron's console protocol,
//! the console streams and the control messages print, its exit code is the job's status
//! (PASS, FAIL, INCOMPLETE), `-i` names the machine of a job whose target is a template,
//! `-w` waits while every machine is busy, `-s DIR` gets back the file the DUT wrote (through
//! `dutctl` started as `mcli`), keystrokes reach the DUT, a dropped client cancels its job,
//! and `executorctl duts` / `dut info` list the machines. An older client's connect-back is
//! played by the test itself (0.2.1 always upgrades).
//!
//! This is the crate-level test, on the executor's simulated farm
//! ([`dutgate_executor::testing`]: real services, simulated DUTs); the same client against
//! QEMU DUTs through `dutgate up` belongs with the gateway's end-to-end tests.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use dutgate_core::JobStatus;
use dutgate_executor::model::JobState;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

const T: Duration = Duration::from_secs(60);
const CLIENT: &str = "valve-gfx-ci-executor-client==0.2.1";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

use dutgate_core::testing::{pypi_venv, run_ok, target_dir};

/// `executorctl` in `target/executorctl-venv`, installed from PyPI on first use.
fn executorctl() -> PathBuf {
    pypi_venv("executorctl-venv", CLIENT).join("executorctl")
}

/// A directory with `mcli`, a link to a copy of the built `dutctl` (built here when missing;
/// copied so that a rebuild during the test cannot change it).
fn mcli_dir(tmp: &Path) -> PathBuf {
    run_ok(
        std::process::Command::new(env!("CARGO"))
            .current_dir(workspace())
            .args(["build", "--quiet", "-p", "dutctl"]),
        "cargo build -p dutctl",
    );
    let dir = tmp.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        target_dir().join("debug").join("dutctl"),
        dir.join("dutctl"),
    )
    .unwrap();
    std::os::unix::fs::symlink("dutctl", dir.join("mcli")).unwrap();
    dir
}

/// One `executorctl` run.
struct Ectl {
    child: tokio::process::Child,
    out: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

struct Done {
    code: i32,
    out: String,
}

impl Ectl {
    fn spawn(path: &Path, args: &[&str], stdin: Stdio) -> Ectl {
        let mut cmd = tokio::process::Command::new(executorctl());
        cmd.args(args)
            .env("PATH", path_with(path))
            .env("PYTHONUNBUFFERED", "1")
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("executorctl starts");
        let out = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for stream in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(stderr),
        ] {
            let out = out.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    let mut o = out.lock().unwrap();
                    o.push_str(&l);
                    o.push('\n');
                }
            }));
        }
        Ectl {
            child,
            out,
            readers,
        }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits (bounded) until the output contains `text`.
    async fn wait_for(&self, text: &str) {
        let deadline = tokio::time::Instant::now() + T;
        while !self.output().contains(text) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "executorctl never printed {text:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn done(mut self) -> Done {
        let status = tokio::time::timeout(T, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("executorctl still running:\n{}", self.output()))
            .unwrap();
        for r in self.readers.drain(..) {
            let _ = r.await;
        }
        Done {
            code: status.code().unwrap_or(-1),
            out: self.output(),
        }
    }
}

fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut p = dir.as_os_str().to_owned();
    if let Some(old) = std::env::var_os("PATH") {
        p.push(":");
        p.push(old);
    }
    p
}

async fn ectl(path: &Path, args: &[&str]) -> Done {
    Ectl::spawn(path, args, Stdio::null()).done().await
}

fn job_file(dir: &Path, name: &str, yaml: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, yaml).unwrap();
    p.to_string_lossy().into_owned()
}

/// The job the farm's jobs id is `id`'s, by its `external_id` or the newest.
async fn newest_job(farm: &Farm) -> dutgate_executor::model::Job {
    let list: serde_json::Value = farm.get("/api/v1/jobs?limit=1").await.json().await.unwrap();
    let id = list["jobs"][0]["id"].as_i64().expect("a job");
    farm.job(id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executorctl_runs_jobs_unchanged() {
    let ectl_bin = tokio::task::spawn_blocking(executorctl).await.unwrap();
    assert!(ectl_bin.exists());
    let mut farm = Farm::start(Options {
        machines: 4,
        s3: true,
        tags: |n| vec![format!("ectl:slot:{n}")],
        ..options()
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let path = tokio::task::spawn_blocking({
        let w = work.path().to_path_buf();
        move || mcli_dir(&w)
    })
    .await
    .unwrap();
    // executorctl joins `-e` and `/api/v1/…`: a trailing slash gives `//api/v1/…`.
    let url = format!("{}/", farm.url);
    let pass = job_file(
        work.path(),
        "pass.yml",
        &job_yaml("  tags: []", "pass", "pass", "", ""),
    );

    // Without a trusted client network, a submission without a token is refused.
    let refused = ectl(&path, &["-e", &url, "run", "-t", "ectl:slot:1", &pass]).await;
    assert_eq!(refused.code, 6, "{}", refused.out);
    assert!(
        refused.out.contains("trusted_client_networks"),
        "{}",
        refused.out
    );

    farm.kill_executor(0);
    farm.exec_cfg.trusted_client_networks = vec!["127.0.0.0/8".parse().unwrap()];
    farm.start_executor(0).await;

    // PASS by tag, FAIL by id (the job's target is `{{ machine_id }}`), INCOMPLETE (a console
    // timeout), and the share directory on the 4th machine, all at once.
    let fail = job_file(
        work.path(),
        "fail.yml",
        &job_yaml("  id: \"{{ machine_id }}\"", "fail", "fail", "", ""),
    );
    let hang = job_file(
        work.path(),
        "hang.yml",
        &job_yaml(
            "  tags: []",
            "hang",
            "hang",
            "  console_activity: {seconds: 1, retries: 0}",
            "",
        ),
    );
    let bucket = job_file(
        work.path(),
        "bucket.yml",
        &job_yaml("  tags: []", "bucket", "bucket", "", "").replace(
            "\"sim=bucket\"]",
            "\"sim=bucket\", \"s3={{ s3_url }}\", \"bucket={{ job_bucket }}\", \
             \"ak={{ job_bucket_access_key }}\", \"sk={{ job_bucket_secret_key }}\", \
             \"other=job-nope\"]",
        ),
    );
    let share = work.path().join("share");
    std::fs::create_dir_all(share.join("input")).unwrap();
    std::fs::write(share.join("input/hello.txt"), "hello from the CI").unwrap();
    let share_arg = share.to_string_lossy().into_owned();
    let (m2, m4) = (mac(2).to_string(), mac(4).to_string());
    let pass_run = Ectl::spawn(
        &path,
        &["-e", &url, "run", "-t", "ectl:slot:1", &pass],
        Stdio::null(),
    );
    let fail_run = Ectl::spawn(&path, &["-e", &url, "run", "-i", &m2, &fail], Stdio::null());
    let hang_run = Ectl::spawn(
        &path,
        &["-e", &url, "run", "-t", "ectl:slot:3", &hang],
        Stdio::null(),
    );
    let share_run = Ectl::spawn(
        &path,
        &["-e", &url, "run", "-i", &m4, "-s", &share_arg, &bucket],
        Stdio::null(),
    );
    // A file that appears after the submission is not in the job's bucket: the mirror
    // removes it.
    share_run
        .wait_for("upgraded to the ci-tron console protocol")
        .await;
    std::fs::write(share.join("late.txt"), "not in the bucket").unwrap();

    let pass_done = pass_run.done().await;
    assert_eq!(pass_done.code, 0, "{}", pass_done.out);
    for text in [
        "The http connection got upgraded to the ci-tron console protocol",
        "s: setting up the job",
        "s: watching the console",
        "RESULT: PASS",
        "Console patterns matched",
        "job_success(1): RESULT: PASS",
    ] {
        assert!(
            pass_done.out.contains(text),
            "{text:?} in\n{}",
            pass_done.out
        );
    }
    let fail_done = fail_run.done().await;
    assert_eq!(fail_done.code, 3, "{}", fail_done.out);
    assert!(fail_done.out.contains("RESULT: FAIL"), "{}", fail_done.out);
    let hang_done = hang_run.done().await;
    assert_eq!(hang_done.code, 4, "{}", hang_done.out);
    assert!(
        hang_done.out.contains("timeout console_activity expired"),
        "{}",
        hang_done.out
    );
    let share_done = share_run.done().await;
    assert_eq!(share_done.code, 0, "{}", share_done.out);
    assert_eq!(
        std::fs::read_to_string(share.join("results/out.txt")).unwrap_or_default(),
        "written by the DUT",
        "{}",
        share_done.out
    );
    assert_eq!(
        std::fs::read_to_string(share.join("input/hello.txt")).unwrap(),
        "hello from the CI"
    );
    assert!(!share.join("late.txt").exists(), "{}", share_done.out);

    // The jobs belong to the trusted network they came from.
    let listed: serde_json::Value = farm.get("/api/v1/jobs").await.json().await.unwrap();
    for j in listed["jobs"].as_array().unwrap() {
        assert_eq!(j["owner"], "network:127.0.0.0/8", "{j}");
    }

    // A job whose target is a template, without -i, names no machine: refused, clearly.
    let no_id = ectl(&path, &["-e", &url, "run", &fail]).await;
    assert_eq!(no_id.code, 6, "{}", no_id.out);
    assert!(no_id.out.contains("machine variables"), "{}", no_id.out);
    // So is ci-tron's own `cache_reset.yml.j2` (PyPI), whose `target.id: machine_id` is
    // written literally: it is for the machine named with -i, never a placeholder one.
    let cache_reset = tokio::task::spawn_blocking(|| {
        dutgate_core::testing::pypi_files(
            "valve-gfx-ci-executor-server==0.0.3",
            dutgate_core::testing::PypiDist::Sdist,
        )
        .join(
            "valve_gfx_ci_executor_server-0.0.3/src/valve_gfx_ci/executor/server/\
             job_templates/cache_reset.yml.j2",
        )
    })
    .await
    .unwrap();
    let cache_reset = cache_reset.to_string_lossy().into_owned();
    let no_id = ectl(&path, &["-e", &url, "run", &cache_reset]).await;
    assert_eq!(no_id.code, 6, "{}", no_id.out);
    assert!(no_id.out.contains("machine variables"), "{}", no_id.out);
    // Attached artifacts are refused, clearly.
    let attached = ectl(
        &path,
        &[
            "-e",
            &url,
            "run",
            "-t",
            "ectl:slot:1",
            "-f",
            &format!("k:{pass}"),
            &pass,
        ],
    )
    .await;
    assert_eq!(attached.code, 6, "{}", attached.out);
    assert!(
        attached.out.contains("attached artifacts"),
        "{}",
        attached.out
    );

    keystrokes_reach_the_dut(&farm, &path, &url, work.path()).await;
    waits_while_every_machine_is_busy(&farm, &path, &url, &pass).await;
    a_dropped_client_cancels_its_job(&farm, &path, &url, work.path()).await;
    connect_back_for_older_clients(&farm).await;
    duts_are_listed(&farm, &path, &url).await;
    farm.stop().await;
}

/// Typed on executorctl's terminal, read by the DUT.
async fn keystrokes_reach_the_dut(farm: &Farm, path: &Path, url: &str, work: &Path) {
    let echo = job_file(
        work,
        "echo.yml",
        &job_yaml("  tags: []", "echo", "echo", "", ""),
    );
    let (mut master, slave) = pty();
    let run = Ectl::spawn(
        path,
        &["-e", url, "run", "-t", "ectl:slot:1", &echo],
        Stdio::from(slave),
    );
    run.wait_for("READY_FOR_INPUT").await;
    master.write_all(b"hello-ectl\n").unwrap();
    let done = run.done().await;
    assert_eq!(done.code, 0, "{}", done.out);
    assert!(done.out.contains("ECHO:hello-ectl"), "{}", done.out);
    let _ = farm;
}

/// A pseudo-terminal: (master, slave) — executorctl reads keys only from a terminal.
fn pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty(3) writes two new descriptors into the two ints; the name, termios
    // and window size pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// `-w` while every machine runs a job: the job queues (the server cannot see `-w`) and runs
/// on the first machine freed.
async fn waits_while_every_machine_is_busy(farm: &Farm, path: &Path, url: &str, pass: &str) {
    let mut busy = Vec::new();
    for n in 1..=4 {
        busy.push(farm.submit(&slow_job(n), "").await);
    }
    let deadline = tokio::time::Instant::now() + T;
    for id in &busy {
        while farm.job(*id).await.state != JobState::Running {
            assert!(tokio::time::Instant::now() < deadline, "job {id} never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let done = ectl(path, &["-e", url, "run", "-w", "-t", "sim:any:yes", pass]).await;
    assert_eq!(done.code, 0, "{}", done.out);
    let waited = newest_job(farm).await;
    assert!(
        busy.iter().all(|id| waited.id > *id),
        "the job was submitted after the busy ones: {waited:#?}"
    );
    // It ran on a machine once the busy job there was over (its teardown, which ends with
    // the lease given back, had begun).
    let machine = waited.machine_id.expect("the job ran on a machine");
    let mut freed = None;
    for id in &busy {
        let j = farm.wait_finished(*id, T).await;
        if j.machine_id == Some(machine) {
            freed = farm
                .events(*id)
                .await
                .iter()
                .find(|e| e.kind == "phase" && e.data["phase"] == "teardown")
                .map(|e| e.at.0);
        }
    }
    let freed = freed.expect("the busy job on that machine was torn down");
    assert!(
        waited.dispatched_at.unwrap().0 >= freed,
        "the job ran before a machine was free: {waited:#?}"
    );
}

/// executorctl killed mid-job: the job is cancelled and its machine freed.
async fn a_dropped_client_cancels_its_job(farm: &Farm, path: &Path, url: &str, work: &Path) {
    let hang = job_file(
        work,
        "forever.yml",
        &job_yaml("  tags: []", "hang", "hang", "", ""),
    );
    let mut run = Ectl::spawn(
        path,
        &["-e", url, "run", "-t", "ectl:slot:2", &hang],
        Stdio::null(),
    );
    run.wait_for("running tests").await;
    let job = newest_job(farm).await;
    assert_eq!(job.state, JobState::Running, "{job:#?}");
    run.child.kill().await.unwrap();
    let done = farm.wait_finished(job.id, T).await;
    assert_eq!(done.status, Some(JobStatus::Incomplete), "{done:#?}");
    assert_eq!(done.reason.as_deref(), Some("cancelled"), "{done:#?}");
}

/// An older client: no upgrade, `metadata.callback.port`; the executor answers 200 and
/// connects back to the submitting address.
async fn connect_back_for_older_clients(farm: &Farm) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let form = reqwest::multipart::Form::new()
        .part(
            "metadata",
            reqwest::multipart::Part::text(
                serde_json::json!({"version": 1, "job_id": null,
                    "target": {"id": mac(3).to_string(), "tags": null},
                    "minio": {"credentials": {}, "groups": []},
                    "callback": {"port": port, "host": "10.9.9.9"}, "environ": {}})
                .to_string(),
            )
            .mime_str("application/json")
            .unwrap(),
        )
        .part(
            "job",
            reqwest::multipart::Part::text(job_yaml("  tags: []", "pass", "pass", "", ""))
                .mime_str("application/x-yaml")
                .unwrap(),
        );
    let r = farm
        .http
        .post(format!("{}//api/v1/jobs", farm.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["version"], 1, "{body}");
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(15), listener.accept())
        .await
        .expect("the executor connects back within 15 s")
        .unwrap();
    let mut kinds = Vec::new();
    let end = loop {
        let mut len = [0u8; 4];
        tokio::time::timeout(T, conn.read_exact(&mut len))
            .await
            .expect("a frame")
            .expect("a frame before the end");
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        conn.read_exact(&mut frame).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        let kind = v["msg_type"].as_str().unwrap().to_string();
        if kind == "session_end" {
            break v;
        }
        if kind == "ctrl" {
            kinds.push(v["payload"]["tag"].as_u64().unwrap());
        }
    };
    assert_eq!(end["payload"]["status"], "PASS", "{end}");
    for tag in [100, 101, 200, 201, 300, 401, 105, 106] {
        assert!(kinds.contains(&tag), "no control message {tag}: {kinds:?}");
    }
}

async fn duts_are_listed(farm: &Farm, path: &Path, url: &str) {
    let list = ectl(path, &["-e", url, "duts"]).await;
    assert_eq!(list.code, 0, "{}", list.out);
    for m in farm.mars.machines().await.unwrap() {
        assert!(
            list.out.contains(&m.full_name),
            "{}: {}",
            m.full_name,
            list.out
        );
    }
    let info = ectl(path, &["-e", url, "dut", "info", &mac(1).to_string()]).await;
    assert_eq!(info.code, 0, "{}", info.out);
    assert!(info.out.contains("'full_name'"), "{}", info.out);
    let none = ectl(path, &["-e", url, "dut", "info", "nope"]).await;
    assert_eq!(none.code, 1, "{}", none.out);
    assert!(
        none.out.contains("No DUTs exist with this name"),
        "{}",
        none.out
    );
}
