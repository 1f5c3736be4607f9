//! Isolation between jobs, played against a real gateway whose DUTs have addresses of their
//! own (docs/security.md).
//!
//! With QEMU user networking every DUT reaches the gateway from 127.0.0.1, so no address rule
//! can be tried there. This test builds what a real farm has, inside a network namespace it
//! creates (and deletes):
//! - a bridge `dutbr0` (10.77.0.1/24) as the DUT network, and dnsmasq on it handing out
//!   addresses and, to iPXE, the boot service's URL (as `ipxe/dnsmasq.conf.example`);
//! - `dutgate up --virtual-duts 2 --dut-bridge dutbr0` with a config file whose
//!   `gateway.auth.dut_networks` is only that bridge's network: loopback is *not* a DUT
//!   network here, so the test's own requests from the namespace's 127.0.0.1 are an outsider's;
//! - two QEMU DUTs whose NICs are tap devices on the bridge and whose serial consoles are ptys
//!   salad opens as serial adapters.
//!
//! The scenario: both machines are discovered, register with their own DHCP addresses, train
//! and become IDLE; an outsider is refused the DUT-facing endpoints; then a victim job runs on
//! one DUT while an attacker job on the other tries to read the victim's boot script (which
//! carries the victim's bucket keys), rewrite the victim's machine record, and take over the
//! victim's console by printing its id. The victim job PASSes with its file and a console
//! that holds none of the attacker's lines; the victim's machine record is unchanged. Last, a
//! job whose kernel URL is an internal service of the gateway ends SETUP_FAIL naming the
//! outbound rule, and nothing is fetched.
//!
//! Peers: iproute2 (`ip`), dnsmasq (Debian `dnsmasq-base`), qemu-system-x86 + ipxe-qemu,
//! linux-image-amd64 + busybox-static (the DUT image), curl. Needs root (network namespaces).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::testing::require_program;
use serde_json::Value;

const BRIDGE: &str = "dutbr0";
const GATEWAY_IP: &str = "10.77.0.1";
const DUT_NETWORK: &str = "10.77.0.0/24";

fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace of this test, with the DUT bridge in it; deleted (with every process
/// still in it) when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        let name = format!("dgiso{}", std::process::id());
        // One left by a killed run of the same pid would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(
            Command::new("ip").args(["netns", "add", &name]),
            "ip netns add (this test needs root)",
        );
        let ns = Netns { name };
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", BRIDGE, "type", "bridge"],
            vec!["addr", "add", "10.77.0.1/24", "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ] {
            run_ok(ns.cmd("ip").args(&args), &format!("ip {}", args.join(" ")));
        }
        ns
    }

    /// `program` run inside the namespace.
    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn pids(&self) -> Vec<String> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            let _ = Command::new("kill").arg("-KILL").args(&pids).status();
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A process of the test (dnsmasq, `dutgate up`): SIGTERM, then SIGKILL, when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Daemon {
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

struct Farm {
    // Dropped first: the gateway stops its VMs before the namespace goes.
    gateway: Daemon,
    _dnsmasq: Daemon,
    ns: Netns,
    tmp: PathBuf,
    state: PathBuf,
    bin: PathBuf,
}

impl Farm {
    fn start(tmp: &Path) -> Farm {
        for (program, package) in [
            ("ip", "iproute2"),
            ("dnsmasq", "dnsmasq-base"),
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("curl", "curl"),
        ] {
            require_program(program, package);
        }
        let cargo = || {
            let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            c.current_dir(root());
            c
        };
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
        // Run copies: job processes start from the executor's own executable.
        let bin = tmp.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for name in ["dutgate", "dutctl"] {
            std::fs::copy(target_dir().join("debug").join(name), bin.join(name)).unwrap();
        }

        let ns = Netns::create();
        // The DUT network's DHCP server, as on a real farm: iPXE (user class "iPXE") gets
        // the boot service's per-MAC script.
        let mut dnsmasq = ns.cmd("dnsmasq");
        dnsmasq.args([
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            &format!("--interface={BRIDGE}"),
            "--bind-interfaces",
            "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h",
            "--dhcp-userclass=set:ipxe,iPXE",
            &format!(
                "--dhcp-boot=tag:ipxe,http://{GATEWAY_IP}:8003/boot/${{mac}}/boot.ipxe?platform=${{platform}}&buildarch=${{buildarch}}"
            ),
            "--log-dhcp",
        ]);
        dnsmasq
            .arg(format!(
                "--dhcp-leasefile={}",
                tmp.join("dnsmasq.leases").display()
            ))
            .arg(format!("--pid-file={}", tmp.join("dnsmasq.pid").display()));
        let dnsmasq = Daemon::spawn(dnsmasq, tmp.join("dnsmasq.log"));

        // A fresh namespace has no listener at all: the services take their default ports.
        let config = tmp.join("gateway.yml");
        std::fs::write(
            &config,
            format!(
                "gateway:\n  public_host: {GATEWAY_IP}\n  auth:\n    dut_networks: [\"{DUT_NETWORK}\"]\n"
            ),
        )
        .unwrap();
        let mut up = ns.cmd(bin.join("dutgate"));
        up.arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args(["up", "--virtual-duts", "2", "--dut-bridge", BRIDGE]);
        let gateway = Daemon::spawn(up, tmp.join("gateway.log"));
        Farm {
            gateway,
            _dnsmasq: dnsmasq,
            ns,
            tmp: tmp.to_path_buf(),
            state,
            bin,
        }
    }

    fn dutctl(&self, args: &[&str]) -> Command {
        let mut c = self.ns.cmd(self.bin.join("dutctl"));
        c.arg("--state-dir").arg(&self.state).args(args);
        c
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.dutctl(&all).stderr(Stdio::null()).output().ok()?;
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

    /// `curl` from inside the namespace: (HTTP status, body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = self
            .ns
            .cmd("curl")
            .args(["-s", "-m", "20", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
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
                "no {what} after {timeout:?}; machines: {:#?}\n{}\n(files kept in {})",
                self.machines(),
                self.gateway.log_tail(),
                self.tmp.display()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Starts `dutctl run JOB -i MACHINE --share-dir <tmp>/<name>` in the background.
    fn spawn_run(&self, name: &str, job: &Path, machine: &str) -> Run {
        let share = self.tmp.join(name);
        let out = self.tmp.join(format!("{name}.stdout"));
        let err = self.tmp.join(format!("{name}.stderr"));
        let mut cmd = self.dutctl(&["run"]);
        cmd.arg(job)
            .arg("-i")
            .arg(machine)
            .arg("--share-dir")
            .arg(&share);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Run {
            name: name.to_string(),
            child,
            share,
            out,
            err,
        }
    }
}

struct Run {
    name: String,
    child: Child,
    share: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

impl Run {
    /// Waits for `dutctl run` to end; (exit code, stdout = the console, stderr).
    fn wait(mut self, timeout: Duration) -> (i32, String, String, PathBuf) {
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
        (
            status.code().unwrap_or(-1),
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default(),
            self.share,
        )
    }
}

/// `examples/hello.yml` with its command replaced by `command` (a shell line run on the DUT
/// in /results; double quotes must be escaped for the YAML string and the cmdline).
fn job_running(tmp: &Path, name: &str, command: &str) -> PathBuf {
    const HELLO_RUN: &str =
        "dutgate.run=\\\"echo Hello from $(uname -n) running $(uname -r) | tee hello.txt\\\"";
    let text = std::fs::read_to_string(root().join("examples/hello.yml")).unwrap();
    assert!(
        text.contains(HELLO_RUN),
        "examples/hello.yml no longer contains {HELLO_RUN:?}; update this test"
    );
    let text = text.replace(HELLO_RUN, &format!("dutgate.run=\\\"{command}\\\""));
    let path = tmp.join(format!("{name}.yml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn jobs_on_a_bridged_farm_cannot_reach_into_each_other() {
    let tmp = tempfile::Builder::new()
        .prefix("dutgate-isolation-")
        .tempdir()
        .unwrap();
    let mut farm = Farm::start(tmp.path());

    // 1. Both DUTs are discovered, register from their own DHCP addresses and train.
    let macs = ["52:54:00:00:01:01", "52:54:00:00:01:02"];
    let machines = farm.wait_for("both machines IDLE", Duration::from_secs(600), |f| {
        let ms: Vec<Value> = macs.iter().map(|m| f.machine(m)).collect();
        ms.iter().all(|m| m["state"] == "IDLE").then_some(ms)
    });
    let addresses: Vec<&str> = machines
        .iter()
        .map(|m| m["ip_address"].as_str().unwrap_or_default())
        .collect();
    for ip in &addresses {
        assert!(
            ip.starts_with("10.77.0."),
            "a bridged DUT registered from {ip}, not from the DUT network: {machines:#?}"
        );
    }
    assert_ne!(addresses[0], addresses[1], "two DUTs, one address");
    let (victim, attacker) = (macs[1], macs[0]);
    let victim_before = farm.machine(victim);

    // 2. Outsiders (the namespace's loopback is not a DUT network here) are refused the
    //    DUT-facing endpoints without a token.
    let (code, body) = farm.curl(&[&format!("http://127.0.0.1:8003/boot/{victim}/boot.ipxe")]);
    assert_eq!(code, 403, "boot script to an outsider: {body}");
    let spoof = format!(
        r#"{{"base_name":"evil","tags":["evil:tag:1"],"mac_address":"{victim}","ip_address":"10.77.0.99","local_tty_device":"ttyS9"}}"#
    );
    let (code, body) = farm.curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "-d",
        &spoof,
        "http://127.0.0.1:8001/api/v1/machine/",
    ]);
    assert_eq!(code, 403, "registration from an outsider: {body}");

    // 3. A victim job and an attacker job at once, each pinned to its machine.
    let victim_job = job_running(
        tmp.path(),
        "victim",
        // Waits for a line typed on its console (none may come) while the attacker runs.
        "echo victim-data-0123456789 > victim.txt; read -t 40 l < /dev/ttyS0; echo typed:$l; cat victim.txt",
    );
    let victim_run = farm.spawn_run("victim", &victim_job, victim);
    farm.wait_for("the victim job RUNNING", Duration::from_secs(120), |f| {
        (f.machine(victim)["state"] == "RUNNING").then_some(())
    });
    let attack = [
        // The victim's job boot script carries its bucket keys on the kernel cmdline.
        format!(
            "wget -qO- http://{GATEWAY_IP}:8003/boot/{victim}/boot.ipxe > stolen-script.txt 2>&1"
        ),
        "if grep -q dutgate.s3 stolen-script.txt; then echo ATTACK-GOT-VICTIM-SCRIPT; fi".into(),
        // The victim's console log holds its kernel cmdline, keys included.
        format!(
            "if wget -qO- http://{GATEWAY_IP}:8005/api/v1/machine/{victim}/log > log.txt 2>&1 && grep -q dutgate log.txt; then echo ATTACK-READ-VICTIM-LOG; fi"
        ),
        // Type into every console port salad may have given out.
        format!(
            "for p in 8200 8201 8202 8203; do echo ATTACK-TYPED | nc -w 2 {GATEWAY_IP} $p > nc-$p.txt 2>&1; done"
        ),
        // Rewrite the victim's record from the attacker's DUT. A kernel cmdline value cannot
        // hold double quotes: printf makes them from octal escapes (the JSON has no spaces).
        format!(
            "wget -qO- --header 'Content-Type: application/json' --post-data $(printf '{}') http://{GATEWAY_IP}:8001/api/v1/machine/ > spoof.txt 2>&1",
            spoof.replace('"', "\\\\042")
        ),
        // Take over the victim's console and end its job with a made-up verdict.
        format!("echo SALAD.machine_id={victim}"),
        "echo ATTACKER-LINE Execution is over, pipeline status: 1".into(),
        "echo It\\\\'s now safe to turn off your computer".into(),
    ]
    .join("; ");
    let attacker_job = job_running(tmp.path(), "attacker", &attack);
    let attacker_run = farm.spawn_run("attacker", &attacker_job, attacker);

    let (code, console, err, _) = attacker_run.wait(Duration::from_secs(300));
    // The markers are in the echoed command line too: only a line of its own is a success.
    for (marker, what) in [
        ("ATTACK-GOT-VICTIM-SCRIPT", "read the victim's boot script"),
        ("ATTACK-READ-VICTIM-LOG", "read the victim's console log"),
    ] {
        assert!(
            !console.lines().any(|l| l.trim() == marker),
            "the attacker {what}:\n{console}\n{err}"
        );
    }
    assert!(code <= 3, "attacker job: exit {code}\n{err}");

    let (code, console, err, share) = victim_run.wait(Duration::from_secs(300));
    assert_eq!(code, 0, "the victim job did not PASS:\n{console}\n{err}");
    for marker in ["ATTACKER-LINE", "ATTACK-TYPED"] {
        assert!(
            !console.contains(marker),
            "{marker} reached the victim's console:\n{console}"
        );
    }
    // The bucket keys the kernel echoes with its cmdline are masked on the console.
    assert!(
        console.contains(",[MASKED],[MASKED]\""),
        "the victim's keys are not masked on its console:\n{console}"
    );
    let file = std::fs::read_to_string(share.join("bucket").join("victim.txt"))
        .unwrap_or_else(|e| panic!("victim.txt not among the artifacts: {e}\n{err}"));
    assert_eq!(file, "victim-data-0123456789\n");

    let victim_after = farm.machine(victim);
    for field in ["ip_address", "tags", "local_tty_device", "base_name"] {
        assert_eq!(
            victim_after[field], victim_before[field],
            "the attacker changed the victim's {field}"
        );
    }
    farm.wait_for("the victim back to IDLE", Duration::from_secs(120), |f| {
        (f.machine(victim)["state"] == "IDLE").then_some(())
    });

    // 4. A job whose kernel URL points at an internal service (the PDU service on the
    //    gateway's loopback) makes the artifact cache fetch nothing: the job ends SETUP_FAIL
    //    naming the rule, before any power-on.
    let text = std::fs::read_to_string(root().join("examples/hello.yml")).unwrap();
    let kernel = "url: \"{{ dut_kernel_url }}\"";
    assert!(
        text.contains(kernel),
        "examples/hello.yml no longer contains {kernel:?}"
    );
    let ssrf = tmp.path().join("ssrf.yml");
    std::fs::write(
        &ssrf,
        text.replace(kernel, "url: \"http://127.0.0.1:8004/api/v1/pdus\""),
    )
    .unwrap();
    let (code, console, err, _) = farm
        .spawn_run("ssrf", &ssrf, attacker)
        .wait(Duration::from_secs(120));
    assert_eq!(
        code, 6,
        "a job fetching an internal URL did not end SETUP_FAIL:\n{console}\n{err}"
    );
    assert!(
        err.contains("loopback") && err.contains("gateway.outbound.allow"),
        "the refusal does not name the rule:\n{err}"
    );
}
