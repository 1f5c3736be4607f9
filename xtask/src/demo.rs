//! `cargo xtask demo`: the virtual farm from a fresh clone. Installs what is missing, builds
//! the DUT environment and the binaries, starts `dutgate up --virtual-duts 1` in a fresh state
//! dir, waits for the QEMU DUT to be registered, trained and `IDLE`, runs
//! `examples/hello.yml` with `dutctl run`, prints the result and the artifacts, and stops the
//! gateway. Uses the default ports (8000–8005, 8100, 9000): nothing else may hold them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::{dut_image, packages};

/// What a virtual farm needs on the host (also the overhead benchmark's).
pub const PACKAGES: [&str; 4] = [
    "qemu-system-x86",
    "ipxe-qemu",
    "linux-image-amd64",
    "busybox-static",
];

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// State dir of the demo gateway (default: a new directory under /tmp). Reusing one keeps
    /// its trained machine, so a second run skips registration and training.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Longest wait for the virtual DUT to become IDLE (seconds).
    #[arg(long, default_value_t = 900)]
    pub idle_timeout: u64,
    /// Leave the gateway running after the job (stop it with Ctrl-C).
    #[arg(long)]
    pub keep_running: bool,
}

/// Stops the gateway when the farm is dropped, however its user ends.
struct Gateway {
    child: Child,
    who: &'static str,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SIGTERM (not Child::kill's SIGKILL) lets `dutgate up` stop its services, and their
        // VMs, in order.
        let pid = self.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                println!("{}: gateway stopped", self.who);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `dutgate up --virtual-duts N` (stopped when dropped) and the `dutctl` to drive it.
pub struct VirtualFarm {
    gateway: Gateway,
    pub state: PathBuf,
    pub dutctl: PathBuf,
    pub log_path: PathBuf,
}

impl VirtualFarm {
    /// `dutctl --state-dir <state> <args…>`.
    pub fn dutctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.dutctl);
        c.arg("--state-dir").arg(&self.state).args(args);
        c
    }

    /// Polls `dutctl machines list` until a machine is IDLE, printing the list at every
    /// change; returns its id.
    pub fn wait_idle(&mut self, timeout: u64) -> anyhow::Result<String> {
        let who = self.gateway.who;
        let start = Instant::now();
        let mut last = String::new();
        println!(
            "{who}: waiting for the virtual DUT to register and train (a few minutes under TCG)"
        );
        while start.elapsed() < Duration::from_secs(timeout) {
            if let Ok(Some(status)) = self.gateway.child.try_wait() {
                bail!(
                    "dutgate up exited ({status}); see {}",
                    self.log_path.display()
                );
            }
            std::thread::sleep(Duration::from_secs(2));
            let out = match self
                .dutctl(&["machines", "list"])
                .stderr(Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
                _ => continue,
            };
            if out != last {
                println!("[{:>6.1}s] machines:", start.elapsed().as_secs_f64());
                for line in out.lines() {
                    println!("    {line}");
                }
                last = out.clone();
            }
            // Columns: NAME ID STATE …; the header names them.
            for line in out.lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.get(2) == Some(&"IDLE")
                    && let Some(id) = cols.get(1)
                {
                    return Ok((*id).to_string());
                }
            }
        }
        bail!(
            "no machine became IDLE within {timeout} s; see {}",
            self.log_path.display()
        )
    }

    /// Blocks until `dutgate up` exits (`--keep-running`: Ctrl-C).
    fn wait_exit(&mut self) {
        let _ = self.gateway.child.wait();
    }
}

/// Installs what a virtual farm needs, builds the DUT image (`<state>/dut-image`) and the
/// binaries, copies `dutgate`/`dutctl` to `<state>/bin` and starts `dutgate up --virtual-duts
/// <duts>` from there: with `config` as its config file, or with the embedded defaults (default
/// ports) when `None`. `who` prefixes the progress lines.
pub fn start_farm(
    root: &Path,
    state: &Path,
    duts: u8,
    config: Option<&Path>,
    who: &'static str,
) -> anyhow::Result<VirtualFarm> {
    packages::install_packages(&PACKAGES.map(String::from))?;
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    println!("{who}: state dir {}", state.display());

    dut_image::build(root, state)?;
    println!("{who}: building dutgate and dutctl");
    let status = cargo()
        .args(["build", "-p", "dutgate", "-p", "dutctl"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building dutgate and dutctl failed ({status})");
    }
    // Run copies: the executor starts `dutgate job` from its own executable, which a rebuild
    // of target/ while the farm runs would otherwise pull from under it.
    let built = target_dir(root).join("debug");
    let bin = state.join("bin");
    std::fs::create_dir_all(&bin)?;
    for name in ["dutgate", "dutctl"] {
        std::fs::copy(built.join(name), bin.join(name))
            .with_context(|| format!("copying {name} to {}", bin.display()))?;
    }
    let dutgate = bin.join("dutgate");

    let log_path = state.join("gateway.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    println!(
        "{who}: starting `dutgate up --virtual-duts {duts}` (service logs: {})",
        log_path.display()
    );
    let mut cmd = Command::new(&dutgate);
    match config {
        Some(c) => {
            cmd.arg("--config").arg(c);
        }
        // Embedded defaults only: a gateway.yml of this machine must not change the farm.
        None => {
            cmd.env("DUTGATE_CONFIG", "/dev/null");
        }
    }
    let child = cmd
        .arg("--state-dir")
        .arg(state)
        .args(["up", "--virtual-duts", &duts.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", dutgate.display()))?;
    Ok(VirtualFarm {
        gateway: Gateway { child, who },
        state: state.to_path_buf(),
        dutctl: bin.join("dutctl"),
        log_path,
    })
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let state = match &args.state_dir {
        Some(d) if d.is_absolute() => d.clone(),
        Some(d) => std::env::current_dir()?.join(d),
        None => std::env::temp_dir().join(format!("dutgate-demo-{}", std::process::id())),
    };
    let mut farm = start_farm(&root, &state, 1, None, "demo")?;
    let machine = farm.wait_idle(args.idle_timeout)?;
    println!("demo: machine {machine} is IDLE; running examples/hello.yml");

    let share = state.join("hello-results");
    let job = root.join("examples").join("hello.yml");
    let status = farm
        .dutctl(&["run"])
        .arg(&job)
        .arg("--share-dir")
        .arg(&share)
        .status()
        .context("running dutctl run")?;
    let verdict = match status.code() {
        Some(0) => "PASS",
        Some(1) => "WARN",
        Some(2) => "COMPLETE",
        Some(3) => "FAIL",
        Some(4) => "INCOMPLETE",
        Some(5) => "UNKNOWN",
        Some(6) => "SETUP_FAIL",
        _ => "an error of dutctl",
    };
    println!("demo: examples/hello.yml ended with {verdict}");
    println!("demo: artifacts in {}:", share.display());
    for f in list_files(&share) {
        let size = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        println!("  {} ({size} bytes)", f.display());
        if f.file_name().is_some_and(|n| n == "hello.txt") {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            println!("    {}", text.trim_end());
        }
    }
    println!(
        "demo: the DUT's console: `nc 127.0.0.1 $(curl -s http://127.0.0.1:8005/api/v1/machine/{machine} \
         | grep -o '\"tcp_port\":[0-9]*' | cut -d: -f2)` (the read-only replay: `tcp_port_logs`)"
    );
    if let Some(port) = salad_port(&machine) {
        println!("demo: that is `nc 127.0.0.1 {port}` right now");
    }
    if args.keep_running {
        println!(
            "demo: the gateway keeps running (state dir {}); Ctrl-C stops it",
            state.display()
        );
        farm.wait_exit();
    }
    let log_path = farm.log_path.clone();
    drop(farm);
    if status.code() != Some(0) {
        bail!(
            "the example job did not pass ({verdict}); see {}",
            log_path.display()
        );
    }
    Ok(())
}

fn salad_port(machine: &str) -> Option<u16> {
    let out = Command::new("curl")
        .args(["-s", "-m", "5"])
        .arg(format!("http://127.0.0.1:8005/api/v1/machine/{machine}"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rest = text.split("\"tcp_port\":").nth(1)?;
    rest.chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .ok()
}

fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(list_files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}
