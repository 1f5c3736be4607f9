//! A virtual farm under test: the binaries and the DUT image built once, `dutgate up` as a
//! process of the test, and what the scenarios ask of it through `dutctl` (machines, jobs,
//! runs in the background, polled waits).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use dutgate_core::testing::run_ok;
use dutgate_core::testing::stop_child;
use serde_json::Value;

/// The workspace root.
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `cargo` (the one running the tests) in the workspace root.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// What a farm starts from: `<tmp>/state` holding the DUT image, `<tmp>/bin` holding run
/// copies of `dutgate` and `dutctl`.
pub struct Built {
    pub state: PathBuf,
    pub bin: PathBuf,
}

/// Builds `dutgate` and `dutctl`, the DUT image (static agents + Debian kernel + busybox;
/// `cargo xtask dut-image` installs the two packages when missing, like the demo) and copies
/// the binaries: the executor starts `dutgate job` from its own executable, which a rebuild
/// of target/ during the test would otherwise pull from under it.
pub fn build(tmp: &Path) -> Built {
    run_ok(
        cargo().args(["build", "-p", "dutgate", "-p", "dutctl"]),
        "building dutgate and dutctl",
    );
    let state = tmp.join("state");
    run_ok(
        cargo()
            .args([
                "run",
                "--quiet",
                "-p",
                "xtask",
                "--",
                "dut-image",
                "--state-dir",
            ])
            .arg(&state),
        "cargo xtask dut-image",
    );
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["dutgate", "dutctl"] {
        std::fs::copy(target_dir().join("debug").join(name), bin.join(name)).unwrap();
    }
    Built { state, bin }
}

/// A process of the test (`dutgate up`, dnsmasq, `nc`), its stdout and stderr in `log`:
/// SIGTERM when dropped (so that `dutgate up` stops its VMs), SIGKILL 10 s later.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Daemon { child, log }
    }

    /// Its whole output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its output.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.output();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}

/// A running `dutgate up` and the files of the test.
pub struct Farm {
    pub gateway: Daemon,
    /// The test's directory: state dir, logs, job files, `dutctl` outputs, share dirs.
    pub tmp: PathBuf,
    pub state: PathBuf,
    pub bin: PathBuf,
    /// The network namespace the gateway runs in (`dutctl` is run there too), if any.
    pub netns: Option<String>,
}

impl Farm {
    /// `program`, inside the farm's network namespace when it has one.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// `dutctl --state-dir <state> <args…>`.
    pub fn dutctl(&self, args: &[&str]) -> Command {
        let mut c = self.command(self.bin.join("dutctl"));
        c.arg("--state-dir").arg(&self.state).args(args);
        c
    }

    /// Runs dutctl; panics with its output unless it succeeds; returns its stdout.
    pub fn dutctl_ok(&self, args: &[&str]) -> String {
        let out = run_ok(&mut self.dutctl(args), &format!("dutctl {args:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `dutctl -o json <args…>`, `None` when it fails.
    pub fn json(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.dutctl(&all).stderr(Stdio::null()).output().ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn machines(&self) -> Vec<Value> {
        match self.json(&["machines", "list"]) {
            Some(Value::Array(v)) => v,
            _ => Vec::new(),
        }
    }

    /// The machine's record (`Value::Null` when mars does not know it).
    pub fn machine(&self, id: &str) -> Value {
        self.machines()
            .into_iter()
            .find(|m| m["id"] == id)
            .unwrap_or(Value::Null)
    }

    /// The job's record and its events (`dutctl jobs show`).
    pub fn job(&self, id: i64) -> Option<(Value, Vec<Value>)> {
        let v = self.json(&["jobs", "show", &id.to_string()])?;
        let events = v["events"].as_array().cloned().unwrap_or_default();
        Some((v["job"].clone(), events))
    }

    /// The admin token `dutgate up` wrote.
    pub fn admin_token(&self) -> String {
        self.token("admin")
    }

    fn token(&self, name: &str) -> String {
        let path = self.state.join("tokens").join(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// Polls `f` every second until it gives a value; panics after `timeout` or when `dutgate
    /// up` exits.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Farm) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.gateway.child.try_wait() {
                panic!(
                    "dutgate up exited ({status}) while waiting for {what}:\n{}",
                    self.gateway.log_tail(80)
                );
            }
            if let Some(v) = f(&*self) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "no {what} after {timeout:?}; machines: {:#?}\n{}\n{}",
                self.machines(),
                self.gateway.log_tail(80),
                self.runs_stderr()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// What every `dutctl run` of the test printed on stderr so far, and where the files are.
    pub fn runs_stderr(&self) -> String {
        let mut out = format!("(files of this test kept in {})\n", self.tmp.display());
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.tmp)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        names.sort();
        for p in names
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "stderr"))
        {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            out.push_str(&format!("--- {}:\n{text}\n", p.display()));
        }
        out
    }

    /// Starts `dutctl <global…> run job --share-dir <tmp>/<name> <extra…>` in the background;
    /// `global` defaults to `--state-dir <state>`.
    pub fn spawn_run(&self, name: &str, job: &Path, global: &[&str], extra: &[&str]) -> Run {
        let share = self.tmp.join(name);
        let record = self.tmp.join(format!("{name}.record"));
        let out = self.tmp.join(format!("{name}.stdout"));
        let err = self.tmp.join(format!("{name}.stderr"));
        let mut cmd = self.command(self.bin.join("dutctl"));
        if global.is_empty() {
            cmd.arg("--state-dir").arg(&self.state);
        } else {
            cmd.args(global);
        }
        cmd.arg("run")
            .arg(job)
            .arg("--share-dir")
            .arg(&share)
            .args(extra);
        let child = cmd
            .env("DUTGATE_RUN_RECORD", &record)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Run {
            name: name.to_string(),
            child,
            record,
            share,
            out,
            err,
        }
    }
}

/// A `dutctl run` in the background.
pub struct Run {
    pub name: String,
    child: Child,
    record: PathBuf,
    share: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

/// How a `dutctl run` ended.
pub struct Finished {
    /// dutctl's exit code: the job's pinned status code.
    pub code: i32,
    /// The console.
    pub stdout: String,
    /// The phases and the verdict.
    pub stderr: String,
    /// The artifacts: `console.log`, `bucket/…`.
    pub share: PathBuf,
}

impl Run {
    /// The executor's id of the job, once `dutctl` has submitted it.
    pub fn job_id(&self) -> Option<i64> {
        let text = std::fs::read_to_string(&self.record).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("submitted "))
            .and_then(|id| id.trim().parse().ok())
    }

    pub fn wait(mut self, timeout: Duration) -> Finished {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "dutctl run ({}) still running after {timeout:?}:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        Finished {
            code: status.code().unwrap_or(-1),
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err).unwrap_or_default(),
            share: self.share.clone(),
        }
    }

    /// [`Run::wait`], then panics with dutctl's output unless it exited with `code`.
    pub fn wait_for_code(self, timeout: Duration, code: i32, what: &str) -> Finished {
        let done = self.wait(timeout);
        assert_eq!(
            done.code, code,
            "{what}: dutctl exited {} instead of {code}:\n{}\n{}",
            done.code, done.stderr, done.stdout
        );
        done
    }
}

impl Drop for Run {
    /// A run the test gave up on (a failed assertion) does not outlive it.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The command line `examples/hello.yml` runs on the DUT.
pub const HELLO_RUN: &str =
    "dutgate.run=\\\"echo Hello from $(uname -n) running $(uname -r) | tee hello.txt\\\"";

/// `examples/hello.yml` with each `from` replaced by its `to` (each must occur), written to
/// `<tmp>/<name>.yml`.
pub fn hello_variant(tmp: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let hello = root().join("examples").join("hello.yml");
    let mut text = std::fs::read_to_string(&hello).unwrap();
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "examples/hello.yml no longer contains {from:?}; update this test"
        );
        text = text.replace(from, to);
    }
    let path = tmp.join(format!("{name}.yml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// `examples/hello.yml` running `command` on the DUT (a shell line run in /results; it
/// cannot hold double quotes: they end the kernel parameter).
pub fn job_running(tmp: &Path, name: &str, command: &str) -> PathBuf {
    assert!(
        !command.contains('"'),
        "a kernel parameter cannot hold double quotes: {command}"
    );
    hello_variant(
        tmp,
        name,
        &[(HELLO_RUN, &format!("dutgate.run=\\\"{command}\\\""))],
    )
}
