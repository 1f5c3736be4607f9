//! The virtual farm end to end: `dutgate up --virtual-duts 2 --no-discover` on ports below
//! the ephemeral range (started again on others if one turns out taken), two QEMU DUTs (TCG) netbooting the DUT image with iPXE from the
//! boot service, their consoles in salad through its netconsole port, powered by the `virtual`
//! PDU.
//!
//! 1. Port 1 is discovered (`dutctl machines discover virtual 1 --wait`); port 2 is only
//!    switched on (`dutctl pdus set virtual 2 on`): its VM registers by itself, waits for
//!    configuration, and is bound with `dutctl machines set`. Both train and become IDLE.
//! 2. `examples/hello.yml` targeted by a tag both machines registered PASSes and returns the
//!    file the DUT wrote (through the job bucket); at the same time a job whose command fails
//!    ends FAIL; the machine's read-only salad port replays the boot.
//! 3. Both machines are busy (hello.yml on the first, a job that sleeps 20 s more on the
//!    second, submitted with `--url`/`--token`); a tagged job queues behind them; the first
//!    machine is retired; the executor is killed (SIGKILL) mid-job and restarted by `dutgate
//!    up`: both running jobs still PASS, the retired machine, free first, takes nothing more
//!    and the queued job runs on the second machine. `nc` on the retired machine's console
//!    port (the quickstart's command) showed its boot live.
//! 4. A job whose kernel writes nothing to the watched console (`console=tty0`, no
//!    `SALAD.machine_id`) is power-cycled once by `first_console_activity` (`retries: 1`) and
//!    ends INCOMPLETE with an empty console.
//!
//! Peers: qemu-system-x86 + ipxe-qemu (the VMs), linux-image-amd64 + busybox-static (the DUT
//! image, built by `cargo xtask dut-image`), netcat-openbsd and curl (the quickstart's `nc`
//! line). Runs for about 5–6 minutes on 2 cores.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::testing::require_program;
use serde_json::Value;

/// A tag the DUT image's registration agent reports for every QEMU DUT (virtio NIC).
const COMMON_TAG: &str = "virtio:family:VIRTIO";

fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Port numbers nobody listened on a moment ago, below the kernel's ephemeral range: while a
/// service restarts, a client's outgoing connection could otherwise take its port as a source
/// port (even connect to itself) and keep it from listening again. Only candidates: another
/// process may take one before the gateway binds it, which [`start_gateway`] detects.
fn candidate_ports(n: usize) -> Vec<u16> {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    // A start that differs between runs and attempts, so parallel runs rarely probe the same
    // ports.
    let span = u32::from(low.saturating_sub(10_000)).max(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id() ^ nanos;
    let mut port = 10_000 + (seed.wrapping_mul(7919) % span) as u16;
    let mut listeners = Vec::new();
    for _ in 0..u32::from(low) {
        if listeners.len() == n {
            break;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
        port = if port + 1 >= low { 10_000 } else { port + 1 };
    }
    assert_eq!(listeners.len(), n, "not enough free ports below {low}");
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// TCP ports process `pid` listens on, read from /proc: proof that a port belongs to this
/// gateway and not to another process that answers on the same number.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            // `sl local_address rem_address st … inode`: local "0100007F:1F90", st 0A = LISTEN.
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as the gateway writes them
/// (`2026-11-22T14:40:17.123Z`).
fn rfc3339_secs(s: &str) -> f64 {
    let (date, clock) = s
        .trim_end_matches('Z')
        .split_once('T')
        .unwrap_or_else(|| panic!("not an RFC 3339 timestamp: {s}"));
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let c: Vec<f64> = clock.split(':').map(|x| x.parse().unwrap()).collect();
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days as f64 * 86_400.0 + c[0] * 3600.0 + c[1] * 60.0 + c[2]
}

/// `dutgate up`, stopped with SIGTERM (so that it stops the VMs) when the test ends.
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child the test started (`nc`), killed when the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Farm {
    gateway: Gateway,
    tmp: PathBuf,
    state: PathBuf,
    dutctl: PathBuf,
    executor_port: u16,
    salad_port: u16,
}

/// A `dutctl run` in the background.
struct Run {
    name: String,
    child: Child,
    record: PathBuf,
    share: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

struct Finished {
    code: i32,
    stdout: String,
    stderr: String,
    share: PathBuf,
}

impl Run {
    /// The executor's id of the job, once `dutctl` has submitted it.
    fn job_id(&self) -> Option<i64> {
        let text = std::fs::read_to_string(&self.record).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("submitted "))
            .and_then(|id| id.trim().parse().ok())
    }

    fn wait(mut self, timeout: Duration) -> Finished {
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
            share: self.share,
        }
    }

    /// [`Run::wait`], then panics with dutctl's output unless it exited with `code`.
    fn wait_for_code(self, timeout: Duration, code: i32, what: &str) -> Finished {
        let done = self.wait(timeout);
        assert_eq!(
            done.code, code,
            "{what}: dutctl exited {} instead of {code}:\n{}\n{}",
            done.code, done.stderr, done.stdout
        );
        done
    }
}

impl Farm {
    fn dutctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.dutctl);
        c.arg("--state-dir").arg(&self.state).args(args);
        c
    }

    /// Runs dutctl; panics with its output unless it succeeds; returns its stdout.
    fn dutctl_ok(&self, args: &[&str]) -> String {
        let out = self.dutctl(args).output().unwrap();
        assert!(
            out.status.success(),
            "dutctl {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.dutctl(&all).stderr(Stdio::null()).output().unwrap();
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn machines(&self) -> Vec<Value> {
        match self.json(&["machines", "list"]) {
            Some(Value::Array(v)) => v,
            _ => Vec::new(),
        }
    }

    fn machine(&self, id: &str) -> Value {
        self.machines()
            .into_iter()
            .find(|m| m["id"] == id)
            .unwrap_or(Value::Null)
    }

    /// The job's record and its events (`dutctl jobs show`).
    fn job(&self, id: i64) -> Option<(Value, Vec<Value>)> {
        let v = self.json(&["jobs", "show", &id.to_string()])?;
        let events = v["events"].as_array().cloned().unwrap_or_default();
        Some((v["job"].clone(), events))
    }

    /// Starts `dutctl <global…> run job --share-dir <tmp>/<name> <extra…>` in the background;
    /// `global` defaults to `--state-dir <state>`.
    fn spawn_run(&self, name: &str, job: &Path, global: &[&str], extra: &[&str]) -> Run {
        let share = self.tmp.join(name);
        let record = self.tmp.join(format!("{name}.record"));
        let out = self.tmp.join(format!("{name}.stdout"));
        let err = self.tmp.join(format!("{name}.stderr"));
        let mut cmd = Command::new(&self.dutctl);
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

    /// Polls `f` every second until it gives a value; panics after `timeout` or when `dutgate
    /// up` exits.
    fn wait_for<T>(
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
                    self.gateway.log_tail()
                );
            }
            if let Some(v) = f(&*self) {
                return v;
            }
            assert!(
                start.elapsed() < timeout,
                "no {what} after {timeout:?}; machines: {:#?}\n{}\n{}",
                self.machines(),
                self.gateway.log_tail(),
                self.runs_stderr()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// What every `dutctl run` of the test printed on stderr so far, and where the files are.
    fn runs_stderr(&self) -> String {
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

    /// The pid of the `dutgate … executor` child of `dutgate up`.
    fn executor_pid(&self) -> Option<u32> {
        let parent = self.gateway.child.id();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`: comm may hold spaces, so split after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(parent) {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .collect();
            if args.last() == Some(&&b"executor"[..]) {
                return Some(pid);
            }
        }
        None
    }
}

fn start_farm(tmp: &Path) -> Farm {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    require_program("nc", "netcat-openbsd");
    require_program("curl", "curl");
    assert!(
        Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists()
            || Path::new("/usr/lib/ipxe/qemu/pxe-virtio.rom").exists(),
        "the virtio iPXE ROM is missing: apt-get install ipxe-qemu"
    );
    let status = cargo()
        .args(["build", "-p", "dutgate", "-p", "dutctl"])
        .status()
        .unwrap();
    assert!(status.success(), "building dutgate and dutctl failed");
    let state = tmp.join("state");
    // The DUT image: static agents + Debian kernel + busybox (installs the two packages when
    // missing, like the demo).
    let status = cargo()
        .args([
            "run",
            "--quiet",
            "-p",
            "xtask",
            "--",
            "dut-image",
            "--state-dir",
        ])
        .arg(&state)
        .status()
        .unwrap();
    assert!(status.success(), "cargo xtask dut-image failed");

    // Run copies: the executor starts `dutgate job` from its own executable, which a rebuild
    // of target/ during the test would otherwise pull from under it.
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["dutgate", "dutctl"] {
        std::fs::copy(target_dir().join("debug").join(name), bin.join(name)).unwrap();
    }
    let dutgate = bin.join("dutgate");
    let config = tmp.join("gateway.yml");
    let log = tmp.join("gateway.log");
    // The services find each other through their configured ports, so they cannot bind port
    // 0: the gateway starts on candidate ports and again on others when `up` refuses one or
    // a service reports it taken. It counts as started once its own children listen on
    // every port (another gateway answering on the same number is never taken for it).
    let deadline = Instant::now() + Duration::from_secs(120);
    for _attempt in 0..10 {
        let p = candidate_ports(8);
        // QEMU user networking NATs the DUTs to 127.0.0.1 (10.0.2.0/24 inside the guests):
        // the DUT networks an operator of this farm lists.
        std::fs::write(
            &config,
            format!(
                "gateway:\n  bind_address: 127.0.0.1\n  ports: {{executor: {}, mars: {}, registry: {}, boot: {}, pdu: {}, salad: {}, s3: {}}}\n  auth:\n    dut_networks: [127.0.0.0/8, \"::1/128\", 10.0.2.0/24]\nsalad:\n  netconsole_port: {}\n",
                p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
            ),
        )
        .unwrap();
        // The config the services will load is valid (what an operator checks first).
        let out = Command::new(&dutgate)
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args(["config", "check"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dutgate config check failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&dutgate)
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args(["up", "--virtual-duts", "2", "--no-discover"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut gateway = Gateway {
            child,
            log: log.clone(),
        };
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Ok(Some(status)) = gateway.child.try_wait() {
                assert!(
                    text.contains("is not available"),
                    "dutgate up exited ({status}):\n{}",
                    gateway.log_tail()
                );
                break;
            }
            if text.contains("Address already in use") {
                // Dropping the gateway stops it; the next attempt starts afresh.
                break;
            }
            let held: Vec<u16> = children_of(gateway.child.id())
                .into_iter()
                .flat_map(listening_ports)
                .collect();
            if p.iter().all(|port| held.contains(port)) {
                return Farm {
                    gateway,
                    tmp: tmp.to_path_buf(),
                    state,
                    dutctl: bin.join("dutctl"),
                    executor_port: p[0],
                    salad_port: p[5],
                };
            }
            assert!(
                Instant::now() < deadline,
                "dutgate up did not listen on {p:?} within 120 s:\n{}",
                gateway.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("dutgate up found a taken port on every attempt");
}

/// `examples/hello.yml` with `from` replaced by `to` (each must occur).
fn hello_variant(tmp: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
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

const HELLO_RUN: &str =
    "dutgate.run=\\\"echo Hello from $(uname -n) running $(uname -r) | tee hello.txt\\\"";

fn events_of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// What the machine's read-only salad port (`tcp_port_logs`) replays.
fn salad_replay(salad_port: u16, machine: &str) -> String {
    let salad: Value = {
        let mut s = TcpStream::connect(("127.0.0.1", salad_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /api/v1/machine/{machine} HTTP/1.0\r\nHost: localhost\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {resp}"))
    };
    let logs_port = salad["tcp_port_logs"].as_u64().unwrap() as u16;
    let mut s = TcpStream::connect(("127.0.0.1", logs_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut replay = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        replay.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&replay).into_owned()
}

#[test]
fn virtual_farm_end_to_end() {
    let t0 = Instant::now();
    // Kept when the test fails (state dir, service logs, dutctl outputs); removed at the end.
    let tmp = tempfile::Builder::new()
        .prefix("dutgate-e2e-")
        .tempdir()
        .unwrap()
        .keep();
    let mut farm = start_farm(&tmp);
    let job_timeout = Duration::from_secs(300);

    // The virtual PDU answers with its two ports, both off (nothing is discovered by itself).
    let ports = farm.wait_for("virtual PDU with 2 ports", Duration::from_secs(60), |f| {
        let v = f.json(&["pdus", "ports", "virtual"])?;
        let list = v.get("ports").cloned().unwrap_or(v);
        let list = list.as_array()?.clone();
        (list.len() == 2).then_some(list)
    });
    for p in &ports {
        assert!(
            p["state"]
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("off")),
            "{p:#}"
        );
    }
    let start = Instant::now();

    // 1a. Port 1 is discovered: powered on by mars, its VM registers and is bound to it.
    let out = farm.dutctl_ok(&[
        "-o",
        "json",
        "machines",
        "discover",
        "virtual",
        "1",
        "--timeout",
        "300",
        "--wait",
    ]);
    let first: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(first["pdu"], "virtual", "{first:#}");
    assert_eq!(first["pdu_port_id"], "1", "{first:#}");
    let a = first["id"].as_str().unwrap().to_string();
    // The virtual PDU's MACs are 52:54:00:00:<pdu>:<port> (docs/quickstart.md names them).
    assert_eq!(a, "52:54:00:00:01:01");
    eprintln!(
        "[{:>5.1}s] port 1 discovered: {a}",
        t0.elapsed().as_secs_f64()
    );

    // 1b. Port 2 is only switched on: its VM netboots the default (registration) environment
    // and registers by itself, without a PDU port.
    farm.dutctl_ok(&["pdus", "set", "virtual", "2", "on"]);
    let b = farm.wait_for(
        "second machine registered by itself",
        Duration::from_secs(300),
        |f| {
            f.machines()
                .into_iter()
                .find(|m| m["id"] != a.as_str() && m["state"] == "WAIT_FOR_CONFIG")
        },
    );
    assert!(b["pdu"].is_null(), "{b:#}");
    assert!(b["pdu_port_id"].is_null(), "{b:#}");
    let b = b["id"].as_str().unwrap().to_string();
    assert_eq!(b, "52:54:00:00:01:02");
    eprintln!(
        "[{:>5.1}s] {b} registered by itself (WAIT_FOR_CONFIG)",
        t0.elapsed().as_secs_f64()
    );
    farm.dutctl_ok(&["machines", "set", &b, "--pdu", "virtual", "--port", "2"]);

    // Both train (2 loops) and go IDLE.
    farm.wait_for("two IDLE machines", Duration::from_secs(600), |f| {
        let m = f.machines();
        (m.len() == 2 && m.iter().all(|m| m["state"] == "IDLE")).then_some(())
    });
    let machines = farm.machines();
    for m in &machines {
        assert_eq!(m["pdu"], "virtual", "{m:#}");
        assert_eq!(m["local_tty_device"], "ttyS0", "{m:#}");
        let tags: Vec<&str> = m["tags"]
            .as_array()
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(tags.contains(&COMMON_TAG), "{m:#}");
    }
    assert_eq!(farm.machine(&b)["pdu_port_id"], "2");
    eprintln!(
        "[{:>5.1}s] both machines IDLE, {:.1} s after the discovery started",
        t0.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );

    // 2. A tagged job PASSes with the file the DUT wrote; a failing job at the same time FAILs.
    let hello = root().join("examples").join("hello.yml");
    let failing = hello_variant(
        &tmp,
        "fail",
        &[(HELLO_RUN, "dutgate.run=\\\"echo about to fail; exit 7\\\"")],
    );
    let pass = farm.spawn_run("hello", &hello, &[], &["-t", COMMON_TAG]);
    let fail = farm.spawn_run("fail", &failing, &[], &[]);
    let pass_id = farm.wait_for("hello job id", Duration::from_secs(30), |_| pass.job_id());
    let pass = pass.wait_for_code(job_timeout, 0, "hello.yml did not PASS");
    assert!(pass.stdout.contains("Hello from"), "{}", pass.stdout);
    let console = std::fs::read_to_string(pass.share.join("console.log")).unwrap();
    assert!(
        console.contains("Execution is over, pipeline status: 0"),
        "{console}"
    );
    let written = std::fs::read_to_string(pass.share.join("bucket").join("hello.txt")).unwrap();
    assert!(written.starts_with("Hello from"), "{written}");
    let (job, _) = farm.job(pass_id).unwrap();
    assert_eq!(
        job["target"]["tags"],
        serde_json::json!([COMMON_TAG]),
        "{job:#}"
    );
    let fail = fail.wait_for_code(job_timeout, 3, "the failing job did not FAIL");
    assert!(
        fail.stdout
            .contains("Execution is over, pipeline status: 7"),
        "{}",
        fail.stdout
    );
    let ran_on = job["machine_id"].as_str().unwrap().to_string();
    let replay = salad_replay(farm.salad_port, &ran_on);
    assert!(
        replay.contains("It's now safe to turn off your computer"),
        "{replay}"
    );
    eprintln!(
        "[{:>5.1}s] PASS and FAIL jobs done",
        t0.elapsed().as_secs_f64()
    );

    // 3. Both machines busy; a tagged job queues; machine A is retired; the executor is killed
    // mid-job. `nc` on A's console port (the quickstart's command line) watches A's boot.
    let nc_out = tmp.join("nc.out");
    let nc = Killed(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec nc 127.0.0.1 $(curl -s http://127.0.0.1:{}/api/v1/machine/{a} \
                 | grep -o '\"tcp_port\":[0-9]*' | cut -d: -f2)",
                farm.salad_port
            ))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&nc_out).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let slow = hello_variant(
        &tmp,
        "slow",
        &[(
            HELLO_RUN,
            "dutgate.run=\\\"echo Hello from $(uname -n) | tee hello.txt; sleep 20; echo slept\\\"",
        )],
    );
    let admin = std::fs::read_to_string(farm.state.join("tokens").join("admin")).unwrap();
    let url = format!("http://127.0.0.1:{}", farm.executor_port);
    let on_a = farm.spawn_run("on-a", &hello, &[], &["-i", &a]);
    let on_b = farm.spawn_run(
        "on-b",
        &slow,
        &["--url", &url, "--token", admin.trim()],
        &["-i", &b],
    );
    farm.wait_for("both machines RUNNING", Duration::from_secs(60), |f| {
        let m = f.machines();
        (m.len() == 2 && m.iter().all(|m| m["state"] == "RUNNING")).then_some(())
    });
    let queued = farm.spawn_run("queued", &hello, &[], &["-t", COMMON_TAG]);
    let queued_id = farm.wait_for("queued job id", Duration::from_secs(30), |_| {
        queued.job_id()
    });
    let (job, _) = farm.job(queued_id).unwrap();
    assert_eq!(job["state"], "QUEUED", "{job:#}");
    farm.dutctl_ok(&["machines", "retire", &a, "--reason", "virtual farm test"]);
    assert_eq!(farm.machine(&a)["state"], "RETIRED");
    eprintln!(
        "[{:>5.1}s] job {queued_id} queued, {a} retired",
        t0.elapsed().as_secs_f64()
    );

    // Kill the executor once B's job has console output (it is mid-job).
    let on_b_id = farm.wait_for("job id on B", Duration::from_secs(30), |_| on_b.job_id());
    farm.wait_for(
        "console output of the job on B",
        Duration::from_secs(120),
        |f| {
            let (job, _) = f.job(on_b_id)?;
            (job["console_bytes"].as_u64().unwrap_or(0) > 0).then_some(())
        },
    );
    let old = farm
        .executor_pid()
        .expect("no executor child of dutgate up");
    let status = Command::new("kill")
        .args(["-KILL", &old.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let new = farm.wait_for("a restarted executor", Duration::from_secs(60), |f| {
        f.executor_pid().filter(|p| *p != old)
    });
    eprintln!(
        "[{:>5.1}s] executor {old} killed, {new} started by dutgate up",
        t0.elapsed().as_secs_f64()
    );
    farm.wait_for(
        "the restarted executor answering",
        Duration::from_secs(30),
        |f| f.job(on_b_id),
    );

    let on_a_id = on_a.job_id().unwrap();
    on_a.wait_for_code(job_timeout, 0, "the job on the retired machine");
    let on_b = on_b.wait_for_code(job_timeout, 0, "the job across the restart");
    assert!(on_b.stdout.contains("slept"), "{}", on_b.stdout);
    let written = std::fs::read_to_string(on_b.share.join("bucket").join("hello.txt")).unwrap();
    assert!(written.starts_with("Hello from"), "{written}");
    let (job_b, events_b) = farm.job(on_b_id).unwrap();
    assert_eq!(job_b["status"], "PASS", "{job_b:#}");
    assert!(
        events_of(&events_b, "executor")
            .iter()
            .any(|e| e["data"]["action"] == "attached"),
        "the restarted executor did not re-attach to job {on_b_id}: {events_b:#?}"
    );
    queued.wait_for_code(job_timeout, 0, "the queued job");
    let (job_q, _) = farm.job(queued_id).unwrap();
    assert_eq!(job_q["machine_id"], b.as_str(), "{job_q:#}");
    // A was free (and retired) well before B: the queued job waited for B. B's machine is
    // free once its teardown gave the lease back, which can be a moment before B's
    // `finished_at` is written (the job process records its end after the teardown): the
    // queued job must come after B's teardown began.
    let (job_a, _) = farm.job(on_a_id).unwrap();
    let a_free = rfc3339_secs(job_a["finished_at"].as_str().unwrap());
    let dispatched = rfc3339_secs(job_q["dispatched_at"].as_str().unwrap());
    let b_teardown = events_of(&events_b, "phase")
        .iter()
        .find(|e| e["data"]["phase"] == "teardown")
        .and_then(|e| e["at"].as_str())
        .map(rfc3339_secs)
        .unwrap_or_else(|| panic!("job {on_b_id} has no teardown phase: {events_b:#?}"));
    assert!(
        a_free < dispatched && b_teardown <= dispatched,
        "job on A finished at {a_free}, B's teardown began at {b_teardown}, queued job \
         dispatched at {dispatched}"
    );
    assert_eq!(farm.machine(&a)["state"], "RETIRED");
    drop(nc);
    let watched = std::fs::read_to_string(&nc_out).unwrap_or_default();
    assert!(
        watched.contains("dutgate-dut: DUT environment up") && watched.contains("Hello from"),
        "nc on {a}'s console port showed:\n{watched}"
    );
    eprintln!(
        "[{:>5.1}s] retired machine skipped; queued job ran on {b}",
        t0.elapsed().as_secs_f64()
    );

    // 4. A DUT whose console never reaches the gateway: the kernel and /init write to tty0
    // only and nothing binds the stream to the machine. Power-cycled once, then INCOMPLETE.
    let silent = hello_variant(
        &tmp,
        "silent",
        &[
            (
                "first_console_activity:\n    minutes: 2",
                "first_console_activity:\n    seconds: 30\n    retries: 1",
            ),
            ("        - \"SALAD.machine_id={{ machine_id }}\"\n", ""),
            ("console={{ local_tty_device }},115200", "console=tty0"),
        ],
    );
    let silent = farm.spawn_run("silent", &silent, &[], &["-i", &b]);
    let silent_id = farm.wait_for("silent job id", Duration::from_secs(30), |_| {
        silent.job_id()
    });
    silent.wait_for_code(job_timeout, 4, "the silent job");
    let (job_s, events_s) = farm.job(silent_id).unwrap();
    assert_eq!(job_s["status"], "INCOMPLETE", "{job_s:#}");
    assert_eq!(job_s["console_bytes"], 0, "{job_s:#}");
    assert!(
        job_s["reason"]
            .as_str()
            .is_some_and(|r| r.contains("first_console_activity")),
        "{job_s:#}"
    );
    let timeouts = events_of(&events_s, "timeout");
    assert_eq!(timeouts.len(), 2, "{events_s:#?}");
    assert_eq!(timeouts[0]["data"]["action"], "retry", "{events_s:#?}");
    assert_eq!(timeouts[1]["data"]["action"], "abort", "{events_s:#?}");
    assert_eq!(events_of(&events_s, "retry").len(), 1, "{events_s:#?}");
    let power_cycles = events_of(&events_s, "phase")
        .into_iter()
        .filter(|e| e["data"]["phase"] == "power")
        .count();
    assert_eq!(power_cycles, 2, "{events_s:#?}");
    assert!(
        events_of(&events_s, "console_activity").is_empty(),
        "{events_s:#?}"
    );
    eprintln!(
        "[{:>5.1}s] silent console: INCOMPLETE after one retry; whole test {:.1} s",
        t0.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop(farm);
    std::fs::remove_dir_all(&tmp).unwrap();
}
