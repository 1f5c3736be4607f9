//! The virtual farm end to end: `dutgate up --virtual-duts 2` on ephemeral ports, two QEMU
//! DUTs (TCG) netbooting the DUT image with iPXE from the boot service, their consoles in
//! salad through its netconsole port, powered by the `virtual` PDU. Both are discovered,
//! register, train and become IDLE with nobody touching them; `examples/hello.yml` PASSes
//! and returns its console and the file the DUT wrote (through the job bucket); a job whose command fails ends FAIL; `nc` on the machine's salad
//! port replays the boot.
//!
//! Peers: qemu-system-x86 + ipxe-qemu (the VMs), linux-image-amd64 + busybox-static (the DUT
//! image, built by `cargo xtask dut-image`). Runs for about 3–5 minutes on 2 cores.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::testing::require_program;

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

/// Ports nobody listens on right now (the listeners are closed before use).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
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

struct Farm {
    gateway: Gateway,
    state: PathBuf,
    dutctl: PathBuf,
    salad_port: u16,
}

impl Farm {
    fn dutctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.dutctl);
        c.arg("--state-dir").arg(&self.state).args(args);
        c
    }

    fn machines(&self) -> Vec<serde_json::Value> {
        let out = self
            .dutctl(&["-o", "json", "machines", "list"])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        if !out.status.success() {
            return Vec::new();
        }
        match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            Ok(serde_json::Value::Array(v)) => v,
            _ => Vec::new(),
        }
    }

    /// Runs a job file; returns dutctl's exit code and the artifacts directory.
    fn run(&self, job: &Path, share: &Path) -> (i32, String, String) {
        let out = self
            .dutctl(&["run"])
            .arg(job)
            .arg("--share-dir")
            .arg(share)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn start_farm(tmp: &Path) -> Farm {
    require_program("qemu-system-x86_64", "qemu-system-x86");
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

    let p = free_ports(8);
    let config = tmp.join("gateway.yml");
    std::fs::write(
        &config,
        format!(
            "gateway:\n  bind_address: 127.0.0.1\n  ports: {{executor: {}, mars: {}, registry: {}, boot: {}, pdu: {}, salad: {}, s3: {}}}\nsalad:\n  netconsole_port: {}\n",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
        ),
    )
    .unwrap();
    // Run copies: the executor starts `dutgate job` from its own executable, which a rebuild
    // of target/ during the test would otherwise pull from under it.
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["dutgate", "dutctl"] {
        std::fs::copy(target_dir().join("debug").join(name), bin.join(name)).unwrap();
    }
    let log = tmp.join("gateway.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin.join("dutgate"))
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .args(["up", "--virtual-duts", "2"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Farm {
        gateway: Gateway { child, log },
        state,
        dutctl: bin.join("dutctl"),
        salad_port: p[5],
    }
}

#[test]
fn virtual_farm_trains_two_duts_and_runs_jobs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut farm = start_farm(tmp.path());

    // Both ports are discovered in turn; the machines register, train (2 loops) and go IDLE.
    let start = Instant::now();
    let idle = loop {
        if let Ok(Some(status)) = farm.gateway.child.try_wait() {
            panic!("dutgate up exited ({status}):\n{}", farm.gateway.log_tail());
        }
        let machines = farm.machines();
        let idle: Vec<String> = machines
            .iter()
            .filter(|m| m["state"] == "IDLE")
            .filter_map(|m| m["id"].as_str().map(str::to_string))
            .collect();
        if idle.len() == 2 {
            break idle;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "machines not IDLE after 10 min: {machines:#?}\n{}",
            farm.gateway.log_tail()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let machines = farm.machines();
    for m in &machines {
        assert_eq!(m["pdu"], "virtual", "{m:#}");
        assert_eq!(m["local_tty_device"], "ttyS0", "{m:#}");
    }
    let mut ports: Vec<&str> = machines
        .iter()
        .filter_map(|m| m["pdu_port_id"].as_str())
        .collect();
    ports.sort();
    assert_eq!(ports, ["1", "2"]);
    eprintln!(
        "both DUTs IDLE after {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // The example job passes and returns the console it printed.
    let hello = root().join("examples").join("hello.yml");
    let share = tmp.path().join("hello");
    let (code, stdout, stderr) = farm.run(&hello, &share);
    assert_eq!(code, 0, "hello.yml did not PASS:\n{stderr}\n{stdout}");
    assert!(stdout.contains("Hello from"), "{stdout}");
    let console = std::fs::read_to_string(share.join("console.log")).unwrap();
    assert!(
        console.contains("Execution is over, pipeline status: 0"),
        "{console}"
    );
    // The file the DUT wrote came back through the job bucket.
    let written = std::fs::read_to_string(share.join("bucket").join("hello.txt")).unwrap();
    assert!(written.starts_with("Hello from"), "{written}");

    // A job whose command fails ends FAIL (dutctl exit code 3).
    let text = std::fs::read_to_string(&hello).unwrap();
    let failing = text.replace(
        "dutgate.run=\\\"echo Hello from $(uname -n) running $(uname -r) | tee hello.txt\\\"",
        "dutgate.run=\\\"echo about to fail; exit 7\\\"",
    );
    assert_ne!(
        failing, text,
        "the hello.yml command line changed; update this test"
    );
    let fail_job = tmp.path().join("fail.yml");
    std::fs::write(&fail_job, failing).unwrap();
    let (code, stdout, stderr) = farm.run(&fail_job, &tmp.path().join("fail"));
    assert_eq!(code, 3, "the failing job did not FAIL:\n{stderr}\n{stdout}");
    assert!(
        stdout.contains("Execution is over, pipeline status: 7"),
        "{stdout}"
    );

    // The machine's salad read-only port replays the boot (what `nc` shows a person).
    let salad: serde_json::Value = {
        let mut s = TcpStream::connect(("127.0.0.1", farm.salad_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /api/v1/machine/{} HTTP/1.0\r\nHost: localhost\r\n\r\n",
            idle[0]
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
    let replay = String::from_utf8_lossy(&replay);
    assert!(
        replay.contains("It's now safe to turn off your computer"),
        "{replay}"
    );
    drop(farm);
}
