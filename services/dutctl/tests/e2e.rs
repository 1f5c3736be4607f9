//! End to end: `dutctl run` and the GitLab custom executor driver against a gateway in this
//! process (`dutgate_executor::testing`: real mars, pdu with the dummy driver, boot, salad,
//! executor, real job processes, simulated DUTs).
//!
//! This file has its own `main` (`harness = false`) because the test binary is also the job
//! process: the executor starts `<this binary> job <id>`, as it would start `dutgate job <id>`.
//!
//! The GitLab side is a harness that follows GitLab Runner's documented custom-executor
//! contract: `config_exec` (JSON on stdout), `prepare_exec`, `run_exec <script> <stage>` for
//! each stage with the job's variables as `CUSTOM_ENV_*` and `BUILD_FAILURE_EXIT_CODE` /
//! `SYSTEM_FAILURE_EXIT_CODE` / `BUILD_EXIT_CODE_FILE` set, then `cleanup_exec`; SIGTERM to the
//! running stage on cancel.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dutgate_core::{MachineId, PowerState};
use dutgate_executor::model::JobState;
use dutgate_executor::testing::{self, Farm, Options, USER};
use dutgate_mars::model::{MachineState, RetireRequest};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
const BUILD_FAILURE: i32 = 77;
const SYSTEM_FAILURE: i32 = 88;
const T: Duration = Duration::from_secs(60);

// ---- the gateway ------------------------------------------------------------------------------

/// The shared harness's farm: 3 machines (`sim:n:<n>`), an in-process executor whose job
/// processes are this binary (`main` answers `job <id>`).
async fn start_farm() -> Farm {
    Farm::start(Options {
        machines: 3,
        tags: |n| vec![format!("sim:n:{n}")],
        lease_ttl: 5,
        ..Default::default()
    })
    .await
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn port(l: &TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

/// `dutctl` and other programs pointed at the farm (URLs by environment, user token).
trait Clients {
    fn dutctl(&self) -> tokio::process::Command;
    fn command(&self, program: &str) -> tokio::process::Command;
}

impl Clients for Farm {
    fn dutctl(&self) -> tokio::process::Command {
        self.command(env!("CARGO_BIN_EXE_dutctl"))
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(program);
        c.env_clear()
            .env("PATH", path_with_dutctl())
            .env("DUTGATE_URL", &self.url)
            .env("DUTGATE_MARS_URL", &self.mars_url)
            .env("DUTGATE_TOKEN", USER)
            .kill_on_drop(true);
        c
    }
}

fn path_with_dutctl() -> String {
    let dir = Path::new(env!("CARGO_BIN_EXE_dutctl")).parent().unwrap();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    )
}

/// A job for the simulated DUTs (`dutgate_executor::testing::sim`): the console script `sim`
/// for every boot, on any machine.
fn job_yaml(sim: &str, timeouts: &str) -> String {
    testing::job_yaml("  tags: [\"sim:any:yes\"]", sim, sim, timeouts, "")
}

// ---- GitLab Runner's side of the custom executor contract ---------------------------------------

struct GitlabJob<'a> {
    farm: &'a Farm,
    machine: MachineId,
    job_id: String,
    scratch: PathBuf,
    /// What `get_sources` "clones": the repository's files.
    repo: Vec<(&'static str, String)>,
    /// The job's `script:` lines.
    script: Vec<String>,
}

struct StageResult {
    code: i32,
    stdout: String,
    exit_code_file: Option<String>,
}

struct GitlabOutcome {
    build_code: i32,
    log: String,
    exit_code_file: Option<String>,
    builds_dir: PathBuf,
}

impl GitlabJob<'_> {
    fn custom_env(&self) -> Vec<(String, String)> {
        let m = self.farm.machines.iter().position(|m| *m == self.machine);
        vec![
            ("CUSTOM_ENV_CI_JOB_ID".into(), self.job_id.clone()),
            (
                "CUSTOM_ENV_CI_RUNNER_DESCRIPTION".into(),
                format!("farm-sim-{}", m.unwrap_or(0) + 1),
            ),
            ("CUSTOM_ENV_CI_PROJECT_PATH".into(), "lab/gpu-tests".into()),
            ("CUSTOM_ENV_CI_PIPELINE_ID".into(), "900".into()),
        ]
    }

    fn driver(&self, stage: &str) -> tokio::process::Command {
        let mut c = self.farm.dutctl();
        c.args(["gitlab", stage, "--machine", &self.machine.to_string()])
            .arg("--scratch-dir")
            .arg(&self.scratch)
            .envs(self.custom_env())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        c
    }

    async fn config(&self) -> serde_json::Value {
        let out = self.driver("config").output().await.unwrap();
        assert!(out.status.success(), "config_exec failed");
        serde_json::from_slice(&out.stdout).expect("config_exec prints JSON")
    }

    /// The runner writes each stage's script to a file and calls `run_exec <script> <stage>`.
    fn stage_command(
        &self,
        cfg: &serde_json::Value,
        stage: &str,
        body: &str,
    ) -> (tokio::process::Command, PathBuf) {
        let dir = self.scratch.join("runner-scripts").join(&self.job_id);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join(format!("script.{stage}"));
        let builds_dir = cfg["builds_dir"].as_str().unwrap();
        let project = format!("{builds_dir}/lab/gpu-tests");
        // Like the runner's generated scripts: job variables exported, errexit, cd to the
        // project directory for user stages.
        let text = format!(
            "#!/usr/bin/env bash\nset -eo pipefail\nexport CI_JOB_ID={job}\nexport CI_PROJECT_DIR={project}\nmkdir -p {project}\ncd {project}\n{body}\n",
            job = self.job_id
        );
        std::fs::write(&script, text).unwrap();
        let mut c = self.driver("run");
        c.arg(&script).arg(stage);
        for (k, v) in cfg["job_env"].as_object().unwrap() {
            c.env(k, v.as_str().unwrap());
        }
        c.env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
            .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string());
        (c, dir.join(format!("exit-code.{stage}")))
    }

    async fn stage(&self, cfg: &serde_json::Value, stage: &str, body: &str) -> StageResult {
        let (mut c, code_file) = self.stage_command(cfg, stage, body);
        c.env("BUILD_EXIT_CODE_FILE", &code_file);
        let out = c.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        StageResult {
            code: out.status.code().unwrap_or(-1),
            stdout,
            exit_code_file: std::fs::read_to_string(&code_file).ok(),
        }
    }

    async fn cleanup(&self) {
        let out = self.driver("cleanup").output().await.unwrap();
        assert!(out.status.success(), "cleanup_exec must not fail");
    }

    fn sources_script(&self) -> String {
        self.repo
            .iter()
            .map(|(name, text)| format!("cat > {name} <<'EOF_REPO'\n{text}EOF_REPO"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// config → prepare → the stages in the runner's order → cleanup.
    async fn run(&self) -> GitlabOutcome {
        let cfg = self.config().await;
        assert_eq!(cfg["builds_dir_is_shared"], false);
        assert_eq!(cfg["driver"]["name"], "dutgate");
        let builds_dir = PathBuf::from(cfg["builds_dir"].as_str().unwrap());
        let mut prep = self.driver("prepare");
        prep.env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
            .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string());
        let out = prep.output().await.unwrap();
        assert!(
            out.status.success(),
            "prepare_exec: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
        for (stage, body) in [
            (
                "prepare_script",
                "echo preparing on $(hostname)".to_string(),
            ),
            ("get_sources", self.sources_script()),
            ("restore_cache", "true".to_string()),
            ("download_artifacts", "true".to_string()),
        ] {
            let r = self.stage(&cfg, stage, &body).await;
            log.push_str(&r.stdout);
            assert_eq!(r.code, 0, "stage {stage}");
        }
        let build = self
            .stage(&cfg, "step_script", &self.script.join("\n"))
            .await;
        log.push_str(&build.stdout);
        let after = self.stage(&cfg, "after_script", "ls").await;
        log.push_str(&after.stdout);
        let upload = if build.code == 0 {
            "upload_artifacts_on_success"
        } else {
            "upload_artifacts_on_failure"
        };
        let r = self.stage(&cfg, upload, "ls out").await;
        log.push_str(&r.stdout);
        self.cleanup().await;
        GitlabOutcome {
            build_code: build.code,
            log,
            exit_code_file: build.exit_code_file,
            builds_dir,
        }
    }
}

/// The job id from `dutctl run`'s first line (`job N submitted: …`).
fn job_id_in(stderr: &str) -> i64 {
    stderr
        .split("job ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("no job id in {stderr}"))
}

// ---- tests ----------------------------------------------------------------------------------

type TestFn = for<'a> fn(&'a Farm) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

fn dutctl_run_pass_and_fail(farm: &Farm) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let dir = farm.tmp.path().join("run");
        std::fs::create_dir_all(&dir).unwrap();
        let complete =
            job_yaml("fail", "").replace("  job_success: {regex: \"^RESULT: PASS$\"}\n", "");
        let setup_fail = job_yaml("pass", "").replace("/vmlinuz\"", "/no-such-kernel\"");
        for (sim, yaml, want, verdict) in [
            // The script's name comes from --var (below).
            (
                "pass",
                job_yaml("pass", "").replace("sim=pass", "sim={{ sim_script }}"),
                0,
                "RESULT: PASS",
            ),
            ("warn", job_yaml("warn", ""), 1, "WARNING: flaky fan"),
            ("complete", complete, 2, "RESULT: FAIL"),
            ("fail", job_yaml("fail", ""), 3, "RESULT: FAIL"),
            ("setup_fail", setup_fail, 6, ""),
        ] {
            let job = dir.join(format!("{sim}.yml"));
            std::fs::write(&job, yaml).unwrap();
            let share = dir.join(format!("share-{sim}"));
            let out = farm
                .dutctl()
                .arg("run")
                .arg(&job)
                .args(["-i", &farm.machines[0].to_string()])
                .arg("--share-dir")
                .arg(&share)
                .args(["--var", "sim_script=pass"])
                .output()
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(want),
                "dutctl run {sim}\nstdout:\n{stdout}\nstderr:\n{stderr}"
            );
            assert!(share.join("events.json").exists(), "artifacts downloaded");
            if sim == "setup_fail" {
                assert!(stderr.contains("SETUP_FAIL"), "{stderr}");
                continue;
            }
            assert!(stdout.contains(verdict), "console printed: {stdout}");
            assert!(stdout.contains("SESSION END"), "whole console: {stdout}");
            assert!(stderr.contains("phase power"), "phases shown: {stderr}");
            assert!(stderr.contains("phase running"), "phases shown: {stderr}");
            let log = std::fs::read_to_string(share.join("console.log")).unwrap();
            assert!(log.contains(verdict), "console.log artifact: {log}");
            // `jobs log` gives the same console.
            let id = job_id_in(&stderr);
            let out = farm
                .dutctl()
                .args(["jobs", "log", &id.to_string()])
                .output()
                .await
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), log);
            // `jobs artifacts` downloads the same files as `run --share-dir`.
            let again = dir.join(format!("again-{sim}"));
            let out = farm
                .dutctl()
                .args(["-o", "json", "jobs", "artifacts", &id.to_string(), "--to"])
                .arg(&again)
                .output()
                .await
                .unwrap();
            assert_eq!(out.status.code(), Some(0), "{out:?}");
            let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(listed["job"], id, "{listed}");
            assert!(
                listed["files"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == "console.log")),
                "{listed}"
            );
            assert_eq!(
                std::fs::read_to_string(again.join("console.log")).unwrap(),
                log
            );
        }
        // `jobs show` lists the events; cancelling a finished job is refused (exit 10).
        let out = farm
            .dutctl()
            .args(["jobs", "show", "1"])
            .output()
            .await
            .unwrap();
        let show = String::from_utf8_lossy(&out.stdout);
        assert!(show.contains("PASS") && show.contains("finished"), "{show}");
        let out = farm
            .dutctl()
            .args(["jobs", "cancel", "1"])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(10));
        // A job the gateway refuses: one line pointing into the file, exit 10.
        let bad = dir.join("bad.yml");
        std::fs::write(&bad, job_yaml("pass", "  overall2: {minutes: 1}")).unwrap();
        let out = farm.dutctl().arg("run").arg(&bad).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(10), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("bad.yml:6"), "{stderr}");
        // Client-side errors: one line, exit 10.
        let out = farm
            .dutctl()
            .args(["run", "/nonexistent/job.yml"])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(10));
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
        let out = farm
            .dutctl()
            .env("DUTGATE_URL", "http://127.0.0.1:9")
            .arg("run")
            .arg(dir.join("pass.yml"))
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(10), "gateway down");
        // The jobs are listed and their console is there.
        let out = farm.dutctl().args(["jobs", "list"]).output().await.unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("PASS") && list.contains("FAIL"), "{list}");
    })
}

fn dutctl_run_interactive_quit(farm: &Farm) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let job = farm.tmp.path().join("interactive.yml");
        std::fs::write(&job, job_yaml("hang", "")).unwrap();
        // `script` gives dutctl a terminal on stdin (bsdutils, always installed).
        let cmd = format!(
            "{} run -I -i {} {}",
            env!("CARGO_BIN_EXE_dutctl"),
            farm.machines[0],
            job.display()
        );
        let mut c = farm.command("script");
        c.args(["-qec", &cmd, "/dev/null"]);
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the DUT's output is on the terminal, then type and quit.
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let read_until = async {
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&seen).contains("running tests") {
                let n = tokio::io::AsyncReadExt::read(&mut stdout, &mut buf)
                    .await
                    .unwrap();
                assert!(
                    n > 0,
                    "dutctl ended early: {}",
                    String::from_utf8_lossy(&seen)
                );
                seen.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(T, read_until)
            .await
            .expect("the console is shown");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"echo hi\r\x01\x03").await.unwrap();
        stdin.flush().await.unwrap();
        let status = tokio::time::timeout(T, child.wait())
            .await
            .expect("Ctrl-A Ctrl-C quits")
            .unwrap();
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stdout, &mut rest).await;
        seen.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&seen);
        assert_eq!(status.code(), Some(4), "{text}");
        assert!(text.contains("cancelling job"), "{text}");
        let id = job_id_in(&text);
        let j = farm.wait_finished(id, T).await;
        assert_eq!(j.reason.as_deref(), Some("cancelled"), "{j:#?}");
        farm.wait_machine(farm.machines[0], MachineState::Idle, T)
            .await;
    })
}

/// A proxy in front of the executor that cuts every console and event stream after 250 ms:
/// `dutctl run` must resume both where they stopped, printing each console byte once.
async fn cutting_proxy(upstream: String) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = streams.clone();
    let l = bind().await;
    let addr = format!("http://127.0.0.1:{}", port(&l));
    let upstream = upstream.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = l.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let n = match tokio::io::AsyncReadExt::read(&mut client, &mut head).await {
                    Ok(n) if n > 0 => n,
                    _ => return,
                };
                let first = String::from_utf8_lossy(&head[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let stream = first.contains("/console") || first.contains("/events");
                if stream {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                if server.write_all(&head[..n]).await.is_err() {
                    return;
                }
                let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                if stream {
                    let _ = tokio::time::timeout(Duration::from_millis(250), copy).await;
                } else {
                    let _ = copy.await;
                }
            });
        }
    });
    (addr, streams)
}

fn dutctl_run_resumes_streams(farm: &Farm) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let (proxy, streams) = cutting_proxy(farm.url.clone()).await;
        let job = farm.tmp.path().join("slow.yml");
        std::fs::write(&job, job_yaml("slow", "")).unwrap();
        let out = farm
            .dutctl()
            .env("DUTGATE_URL", &proxy)
            .arg("run")
            .arg(&job)
            .args(["-i", &farm.machines[0].to_string()])
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
        // Exactly the job's console log, nothing lost, nothing twice.
        let id = job_id_in(&stderr);
        let log = farm
            .client()
            .api()
            .request(
                reqwest::Method::GET,
                &format!("/api/v1/jobs/{id}/console?follow=false"),
            )
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(stdout.as_bytes(), &log[..], "stderr:\n{stderr}");
        assert_eq!(stdout.matches("tick 5").count(), 1);
        assert_eq!(stderr.matches("phase running").count(), 1, "{stderr}");
        assert_eq!(stderr.matches("finished:").count(), 1, "{stderr}");
        let n = streams.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n >= 6, "the streams were re-opened {n} times only");
        eprintln!("console and event streams opened {n} times");
    })
}

fn gitlab_statuses(farm: &Farm) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let hang = job_yaml("hang", "  console_activity: {seconds: 1, retries: 0}");
        for (n, (sim, yaml, want)) in [
            ("pass", job_yaml("pass", ""), 0),
            ("fail", job_yaml("fail", ""), BUILD_FAILURE),
            ("hang", hang, SYSTEM_FAILURE),
        ]
        .into_iter()
        .enumerate()
        {
            let job = GitlabJob {
                farm,
                machine: farm.machines[1],
                job_id: format!("10{n}"),
                scratch: farm.tmp.path().join("gitlab"),
                repo: vec![("job.yml", yaml)],
                script: vec!["dutctl run job.yml --share-dir out".into()],
            };
            let o = job.run().await;
            assert_eq!(
                o.build_code, want,
                "{sim}: build stage exit code\n{}",
                o.log
            );
            assert_eq!(
                o.exit_code_file.as_deref().map(str::trim),
                Some(want.to_string().as_str()),
                "{sim}: BUILD_EXIT_CODE_FILE"
            );
            assert!(
                o.log.contains("booting"),
                "{sim}: console on stdout\n{}",
                o.log
            );
            if sim != "hang" {
                assert!(
                    o.log.contains("SESSION END"),
                    "{sim}: whole console\n{}",
                    o.log
                );
                assert!(
                    o.log.contains("console.log"),
                    "artifacts downloaded\n{}",
                    o.log
                );
            }
            assert!(!o.builds_dir.exists(), "cleanup removes scratch data");
        }
        farm.wait_machine(farm.machines[1], MachineState::Idle, T)
            .await;
    })
}

fn gitlab_sigterm_cancels(farm: &Farm) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let job = GitlabJob {
            farm,
            machine: farm.machines[2],
            job_id: "200".into(),
            scratch: farm.tmp.path().join("gitlab"),
            repo: vec![],
            script: vec![],
        };
        let cfg = job.config().await;
        std::fs::create_dir_all(cfg["builds_dir"].as_str().unwrap()).unwrap();
        let yaml = farm.tmp.path().join("hang.yml");
        std::fs::write(&yaml, job_yaml("hang", "")).unwrap();
        let (mut c, _) = job.stage_command(
            &cfg,
            "step_script",
            &format!("dutctl run {}", yaml.display()),
        );
        let mut child = c.spawn().unwrap();
        // Wait until the job runs on the machine (the DUT printed its first lines).
        let exec = farm.client();
        let end = Instant::now() + T;
        let id = loop {
            let jobs = exec.jobs(Some(JobState::Running), 10).await.unwrap();
            if let Some(j) = jobs
                .iter()
                .find(|j| j.machine_id == Some(farm.machines[2]) && j.console_bytes > 0)
            {
                break j.id;
            }
            assert!(Instant::now() < end, "the job never ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(farm.power(3), PowerState::On);
        let sent = Instant::now();
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
        }
        let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the driver exits within 10 s of SIGTERM")
            .unwrap();
        eprintln!("driver exited {:?} after SIGTERM", sent.elapsed());
        assert_eq!(status.code(), Some(SYSTEM_FAILURE));
        job.cleanup().await;
        let j = farm.wait_finished(id, T).await;
        assert_eq!(j.status, Some(dutgate_core::JobStatus::Incomplete));
        assert_eq!(j.reason.as_deref(), Some("cancelled"), "{j:#?}");
        farm.wait_machine(farm.machines[2], MachineState::Idle, T)
            .await;
        let m = farm.mars.machine(farm.machines[2]).await.unwrap();
        assert!(m.lease.is_none(), "machine released: {m:#?}");
        assert_eq!(farm.power(3), PowerState::Off);
    })
}

fn runner_config(farm: &Farm) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        let dir = farm.tmp.path().join("runner");
        std::fs::create_dir_all(&dir).unwrap();
        let tokens = dir.join("tokens.toml");
        std::fs::write(
            &tokens,
            format!("gateway = \"glrt-gw\"\n[machines]\n\"farm-sim-1\" = \"glrt-1\"\n\"farm-sim-2\" = \"glrt-2\"\n\"{}\" = \"glrt-3\"\n", farm.machines[2]),
        )
        .unwrap();
        // The token the jobs' build scripts get (the farm has no token store: its user token).
        let job_token = dir.join("job-token");
        std::fs::write(&job_token, USER).unwrap();
        std::fs::set_permissions(&job_token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let job_token = job_token.canonicalize().unwrap();
        let config = dir.join("config.toml");
        // A runner the admin wrote by hand stays.
        std::fs::write(
            &config,
            "concurrent = 2\n\n[[runners]]\nname = \"docker\"\nurl = \"https://gitlab.example.com\"\ntoken = \"glrt-docker\"\nexecutor = \"docker\"\n",
        )
        .unwrap();
        let write = || {
            let mut c = farm.dutctl();
            c.args([
                "gitlab",
                "runner-config",
                "--gitlab-url",
                "https://gitlab.example.com",
            ])
            .arg("--token-file")
            .arg(&tokens)
            .arg("--job-token-file")
            .arg(&job_token)
            .arg("--config")
            .arg(&config);
            c
        };
        let out = write().output().await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let first = std::fs::read(&config).unwrap();
        let doc: toml::Table = toml::from_str(std::str::from_utf8(&first).unwrap()).unwrap();
        let runners = doc["runners"].as_array().unwrap();
        assert_eq!(runners.len(), 1 + 1 + farm.machines.len(), "{doc:#?}");
        assert_eq!(runners[0]["name"].as_str(), Some("docker"));
        assert_eq!(runners[1]["name"].as_str(), Some("dutgate-gateway"));
        assert_eq!(runners[1]["token"].as_str(), Some("glrt-gw"));
        assert_eq!(runners[1]["limit"].as_integer(), Some(3));
        for (n, id) in farm.machines.iter().enumerate() {
            let r = runners
                .iter()
                .find(|r| r["name"].as_str() == Some(&format!("farm-sim-{}", n + 1)))
                .unwrap_or_else(|| panic!("runner for machine {id}: {doc:#?}"));
            assert_eq!(r["limit"].as_integer(), Some(1));
            assert_eq!(r["executor"].as_str(), Some("custom"));
            assert_eq!(
                r["token"].as_str(),
                Some(format!("glrt-{}", n + 1).as_str())
            );
            let env: Vec<&str> = r["environment"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            assert!(env.contains(&format!("DUTGATE_MACHINE_ID={id}").as_str()));
            assert!(
                env.contains(&format!("DUTGATE_MACHINE_TAGS=sim:any:yes,sim:n:{}", n + 1).as_str()),
                "{env:?}"
            );
            let args: Vec<&str> = r["custom"]["run_args"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            assert!(args.ends_with(&[
                "gitlab",
                "run",
                "--machine",
                &id.to_string(),
                "--job-token-file",
                &job_token.display().to_string()
            ]));
        }
        // Unchanged machines: byte-identical, and GitLab's own additions are kept.
        let out = write().output().await.unwrap();
        assert!(out.status.success());
        assert_eq!(std::fs::read(&config).unwrap(), first);
        let added = String::from_utf8(first.clone()).unwrap().replacen(
            "token = \"glrt-1\"",
            "token = \"glrt-1\"\nid = 42",
            1,
        );
        std::fs::write(&config, &added).unwrap();
        write().output().await.unwrap();
        let again = std::fs::read_to_string(&config).unwrap();
        assert!(again.contains("id = 42"), "{again}");
        // A retired machine leaves the config.
        farm.mars
            .retire(
                farm.machines[2],
                &RetireRequest {
                    reason: Some("broken fan".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        write().output().await.unwrap();
        let doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        let names: Vec<&str> = doc["runners"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(
            names,
            ["docker", "dutgate-gateway", "farm-sim-1", "farm-sim-2"]
        );
        // `prepare` for the retired machine, or with the gateway down: a system failure with
        // one clear line.
        for (url, want) in [
            (farm.url.as_str(), "RETIRED"),
            ("http://127.0.0.1:9", "unreachable"),
        ] {
            let mut c = farm.dutctl();
            c.env("DUTGATE_URL", url)
                .env("SYSTEM_FAILURE_EXIT_CODE", SYSTEM_FAILURE.to_string())
                .env("BUILD_FAILURE_EXIT_CODE", BUILD_FAILURE.to_string())
                .args([
                    "gitlab",
                    "prepare",
                    "--machine",
                    "farm-sim-3",
                    "--scratch-dir",
                ])
                .arg(dir.join("scratch"));
            let out = c.output().await.unwrap();
            let line = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(SYSTEM_FAILURE), "{line}");
            assert_eq!(line.lines().count(), 1, "{line}");
            assert!(line.contains(want), "{line}");
        }
    })
}

// ---- main -------------------------------------------------------------------------------------

fn main() -> ExitCode {
    // The job process the executor starts.
    if let Some(code) = dutgate_executor::testing::job_process_main() {
        return code;
    }
    let args: Vec<String> = std::env::args().collect();
    let tests: [(&str, TestFn); 6] = [
        ("dutctl_run_pass_and_fail", dutctl_run_pass_and_fail),
        ("dutctl_run_resumes_streams", dutctl_run_resumes_streams),
        ("dutctl_run_interactive_quit", dutctl_run_interactive_quit),
        ("gitlab_statuses", gitlab_statuses),
        ("gitlab_sigterm_cancels", gitlab_sigterm_cancels),
        // Last: it retires a machine.
        ("runner_config", runner_config),
    ];
    let filters: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &tests {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let selected: Vec<_> = tests
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();
    if selected.is_empty() {
        return ExitCode::SUCCESS;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let failed = rt.block_on(async {
        let farm = Arc::new(start_farm().await);
        let mut failed = Vec::new();
        for (name, f) in selected {
            let start = Instant::now();
            let farm2 = farm.clone();
            let f = *f;
            let r = tokio::spawn(async move { f(&farm2).await }).await;
            let ok = r.is_ok();
            println!(
                "test {name} ... {} ({:.1} s)",
                if ok { "ok" } else { "FAILED" },
                start.elapsed().as_secs_f64()
            );
            if !ok {
                failed.push(name.to_string());
            }
        }
        if let Ok(farm) = Arc::try_unwrap(farm) {
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
