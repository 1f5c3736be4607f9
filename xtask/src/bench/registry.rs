//! `cargo xtask bench registry`: the dutgate registry against Debian's `docker-registry` in proxy
//! mode (CNCF distribution 2.8), both in front of the same upstream `docker-registry`, in the
//! same run.
//!
//! The image: a seeded OCI layout of 4 gzip layers (25 MB of random data each) plus a config
//! (5 blobs, ~100 MB), written by the registry crate's `oci_layout` example and pushed to the
//! upstream with skopeo. For each number of concurrent clients N (1, 10, 20) and each proxy,
//! in alternating order, on fresh proxy storage:
//! - cold: N `skopeo copy docker://proxy/lab/big:v1 dir:…` at once; wall time until the last
//!   one finishes; upstream blob GETs and blob bytes from the upstream's access log;
//! - warm: the same N pulls again; wall time, aggregate MB/s, upstream requests.
//!
//! `--quick`: a 4 MB image and N = 1, 2 (checks the harness only). `-- <runs>` repeats every
//! measurement (default 1) and reports the median. `DUTGATE_BENCH_BIN_DIR=<dir>` uses
//! `<dir>/dutgate` and `<dir>/examples/oci_layout` instead of building them.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::{append_table, stats};

const REPO: &str = "lab/big";

/// A child process killed (and reaped) on drop.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn spawn(mut cmd: Command, name: &str, log: &Path) -> anyhow::Result<Proc> {
        let out = File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// CPU seconds (user + system) the process has used so far.
    fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) else {
            return 0.0;
        };
        // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return 0.0;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Linux reports in USER_HZ, which is 100 on every mainstream configuration.
        (ticks(11) + ticks(12)) / 100.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status code of `GET path` on 127.0.0.1:port (HTTP/1.0, short timeouts).
fn http_status(port: u16, path: &str) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")
}

fn wait_ready(what: &str, port: u16, path: &str, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_status(port, path).is_ok_and(|s| s == 200) {
            return Ok(());
        }
        proc.check_alive()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not answer {path} on port {port} within 30 s")
}

fn docker_registry(dir: &Path, proxy_of: Option<u16>) -> anyhow::Result<(Proc, u16)> {
    std::fs::create_dir_all(dir)?;
    let proxy = proxy_of
        .map(|p| format!("proxy:\n  remoteurl: http://127.0.0.1:{p}\n"))
        .unwrap_or_default();
    // Port 0: the registry binds a port of the kernel's choice, read back from /proc.
    let cfg = format!(
        "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
         storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n  \
         cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: 127.0.0.1:0\n  secret: bench\n{proxy}",
        data = dir.join("data").display()
    );
    let cfg_path = dir.join("config.yml");
    std::fs::write(&cfg_path, cfg)?;
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(&cfg_path);
    let mut p = Proc::spawn(cmd, "docker-registry", &dir.join("registry.log"))?;
    let port = super::ports::bound_port(
        &mut p.child,
        "docker-registry",
        Duration::from_secs(30),
        |_| true,
    )?;
    wait_ready("docker-registry", port, "/v2/", &mut p)?;
    Ok((p, port))
}

fn dutgate_registry(exe: &Path, dir: &Path, upstream: u16) -> anyhow::Result<(Proc, u16)> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("registry.log");
    // The service is told its port (it is part of the URLs it hands out): a candidate, and
    // another when it reports the port taken.
    let spawn = |ports: &[u16]| {
        // Every client of the benchmark is on loopback: the one DUT network a config lists.
        let cfg = format!(
            "gateway:\n  state_dir: {state}\n  bind_address: 127.0.0.1\n  ports:\n    registry: {port}\n  log:\n    level: warn\n  auth:\n    dut_networks: [127.0.0.0/8]\n\
             registry:\n  upstreams:\n    - prefix: \"up/\"\n      url: \"http://127.0.0.1:{upstream}\"\n  default_upstream: \"up/\"\n",
            state = dir.join("state").display(),
            port = ports[0],
        );
        let cfg_path = dir.join("gateway.yml");
        std::fs::write(&cfg_path, cfg)?;
        let mut cmd = Command::new(exe);
        cmd.arg("--config").arg(&cfg_path).arg("registry");
        Proc::spawn(cmd, "dutgate registry", &log)
    };
    let (mut p, ports) = super::ports::start_on_candidates(
        "dutgate registry",
        1,
        &log,
        Duration::from_secs(60),
        spawn,
        |p: &mut Proc| &mut p.child,
    )?;
    wait_ready("dutgate registry", ports[0], "/healthz", &mut p)?;
    Ok((p, ports[0]))
}

/// Upstream traffic for `REPO` so far, from the upstream's access log.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    blob_gets: u64,
    blob_bytes: u64,
    manifest_requests: u64,
}

fn upstream_traffic(log: &Path) -> anyhow::Result<Traffic> {
    let text = std::fs::read_to_string(log)?;
    let blob = format!("\"GET /v2/{REPO}/blobs/sha256:");
    let mut t = Traffic::default();
    for l in text.lines() {
        if l.contains(&blob) {
            t.blob_gets += 1;
            // `… "GET /v2/… HTTP/1.1" 200 12345 "referer" "agent"`
            t.blob_bytes += l
                .split("HTTP/1.1\" ")
                .nth(1)
                .and_then(|a| a.split_whitespace().nth(1))
                .and_then(|b| b.parse::<u64>().ok())
                .unwrap_or(0);
        } else if l.contains(&format!("/v2/{REPO}/manifests/"))
            && (l.contains("\"GET ") || l.contains("\"HEAD "))
        {
            t.manifest_requests += 1;
        }
    }
    Ok(t)
}

/// N concurrent `skopeo copy` from the proxy; wall time of the whole batch.
fn pull_batch(proxy_port: u16, n: usize, out: &Path) -> anyhow::Result<f64> {
    if out.exists() {
        std::fs::remove_dir_all(out)?;
    }
    std::fs::create_dir_all(out)?;
    let start = Instant::now();
    let mut children = Vec::new();
    for i in 0..n {
        let child = Command::new("skopeo")
            .args([
                "copy",
                "--src-tls-verify=false",
                &format!("docker://127.0.0.1:{proxy_port}/{REPO}:v1"),
                &format!("dir:{}", out.join(i.to_string()).display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting skopeo")?;
        children.push(child);
    }
    let mut failures = Vec::new();
    for c in children {
        let o = c.wait_with_output()?;
        if !o.status.success() {
            failures.push(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
    }
    let wall = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(out)?;
    if let Some(f) = failures.first() {
        bail!("{} of {n} pulls failed; first: {f}", failures.len());
    }
    Ok(wall)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dutgate,
    Distribution,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Dutgate => "dutgate registry",
            Kind::Distribution => "docker-registry proxy",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Measure {
    cold_s: f64,
    warm_s: f64,
    cold: Traffic,
    warm: Traffic,
    cpu_s: f64,
}

fn measure(
    kind: Kind,
    n: usize,
    exe: &Path,
    lab: &Path,
    upstream_port: u16,
    upstream_log: &Path,
    tag: &str,
) -> anyhow::Result<Measure> {
    let dir = lab.join(format!("{tag}-{}", kind.label().replace(' ', "-")));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let (proc, port) = match kind {
        Kind::Dutgate => dutgate_registry(exe, &dir, upstream_port)?,
        Kind::Distribution => docker_registry(&dir, Some(upstream_port))?,
    };
    let t0 = upstream_traffic(upstream_log)?;
    let cold_s = pull_batch(port, n, &lab.join("out"))?;
    let t1 = upstream_traffic(upstream_log)?;
    let warm_s = pull_batch(port, n, &lab.join("out"))?;
    let t2 = upstream_traffic(upstream_log)?;
    let cpu_s = proc.cpu_seconds();
    drop(proc);
    std::fs::remove_dir_all(&dir)?;
    let diff = |a: Traffic, b: Traffic| Traffic {
        blob_gets: b.blob_gets - a.blob_gets,
        blob_bytes: b.blob_bytes - a.blob_bytes,
        manifest_requests: b.manifest_requests - a.manifest_requests,
    };
    Ok(Measure {
        cold_s,
        warm_s,
        cold: diff(t0, t1),
        warm: diff(t1, t2),
        cpu_s,
    })
}

fn build(args: &BenchArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = super::cargo_build(args, &["--bin", "dutgate", "--example", "oci_layout"])?;
    Ok((dir.join("dutgate"), dir.join("examples").join("oci_layout")))
}

/// Copies a built binary into the lab: the shared `target/` may be rebuilt by someone else
/// while the benchmark runs, and a binary that vanishes mid-run ruins the measurement.
fn private_copy(exe: &Path, lab: &Path) -> anyhow::Result<PathBuf> {
    let name = exe.file_name().context("binary path without a file name")?;
    let copy = lab.join(name);
    std::fs::copy(exe, &copy).with_context(|| format!("copying {}", exe.display()))?;
    Ok(copy)
}

fn median(v: &[f64]) -> f64 {
    stats(v).map(|s| s.median).unwrap_or(f64::NAN)
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    for (prog, pkg) in [("docker-registry", "docker-registry"), ("skopeo", "skopeo")] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {prog}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            bail!("the registry benchmark needs `{prog}` (apt-get install {pkg})");
        }
    }
    let runs: usize = match args.extra.first() {
        Some(r) => r.parse().context("-- <runs> must be a number")?,
        None => 1,
    };
    let (clients, layer): (&[usize], usize) = if args.quick {
        (&[1, 2], 1_000_000)
    } else {
        (&[1, 10, 20], 25_000_000)
    };
    let (exe, layout_tool) = build(args)?;
    let lab = std::env::temp_dir().join(format!("dutgate-bench-registry-{}", std::process::id()));
    std::fs::create_dir_all(&lab)?;
    let result = private_copy(&exe, &lab).and_then(|exe| {
        let layout_tool = private_copy(&layout_tool, &lab)?;
        run_in(args, &lab, &exe, &layout_tool, clients, layer, runs)
    });
    let _ = std::fs::remove_dir_all(&lab);
    result
}

#[allow(clippy::too_many_arguments)]
fn run_in(
    args: &BenchArgs,
    lab: &Path,
    exe: &Path,
    layout_tool: &Path,
    clients: &[usize],
    layer: usize,
    runs: usize,
) -> anyhow::Result<()> {
    println!("  writing the image");
    let layout = lab.join("layout");
    let sizes = vec![layer.to_string(); 4].join(",");
    let out = Command::new(layout_tool)
        .arg(&layout)
        .args(["v1", "42", &sizes, "gzip"])
        .output()
        .context("running oci_layout")?;
    if !out.status.success() {
        bail!("oci_layout: {}", String::from_utf8_lossy(&out.stderr));
    }
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    let image_bytes: u64 = printed
        .split_whitespace()
        .nth(1)
        .and_then(|b| b.parse().ok())
        .context("oci_layout output")?;
    let (_upstream, up_port) = docker_registry(&lab.join("upstream"), None)?;
    let upstream_log = lab.join("upstream").join("registry.log");
    println!("  pushing {image_bytes} bytes to the upstream");
    let push = Command::new("skopeo")
        .args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", layout.display()),
            &format!("docker://127.0.0.1:{up_port}/{REPO}:v1"),
        ])
        .output()?;
    if !push.status.success() {
        bail!("push: {}", String::from_utf8_lossy(&push.stderr));
    }

    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for (i, &n) in clients.iter().enumerate() {
        let order = if i % 2 == 0 {
            [Kind::Dutgate, Kind::Distribution]
        } else {
            [Kind::Distribution, Kind::Dutgate]
        };
        let mut results: Vec<(Kind, Vec<Measure>)> = vec![
            (Kind::Dutgate, Vec::new()),
            (Kind::Distribution, Vec::new()),
        ];
        for r in 0..runs {
            for kind in order {
                println!("  N={n} run {r}: {}", kind.label());
                let m = measure(
                    kind,
                    n,
                    exe,
                    lab,
                    up_port,
                    &upstream_log,
                    &format!("n{n}-r{r}"),
                )?;
                println!("    {m:?}");
                if let Some((_, v)) = results.iter_mut().find(|(k, _)| *k == kind) {
                    v.push(m);
                }
            }
        }
        let mut summary = Vec::new();
        for (kind, ms) in &results {
            let cold = median(&ms.iter().map(|m| m.cold_s).collect::<Vec<_>>());
            let warm = median(&ms.iter().map(|m| m.warm_s).collect::<Vec<_>>());
            let gets = median(
                &ms.iter()
                    .map(|m| m.cold.blob_gets as f64)
                    .collect::<Vec<_>>(),
            );
            let bytes = median(
                &ms.iter()
                    .map(|m| m.cold.blob_bytes as f64)
                    .collect::<Vec<_>>(),
            );
            let manifests_cold = median(
                &ms.iter()
                    .map(|m| m.cold.manifest_requests as f64)
                    .collect::<Vec<_>>(),
            );
            let manifests_warm = median(
                &ms.iter()
                    .map(|m| m.warm.manifest_requests as f64)
                    .collect::<Vec<_>>(),
            );
            let warm_gets = median(
                &ms.iter()
                    .map(|m| m.warm.blob_gets as f64)
                    .collect::<Vec<_>>(),
            );
            let cpu = median(&ms.iter().map(|m| m.cpu_s).collect::<Vec<_>>());
            let warm_mbs = (n as f64 * image_bytes as f64 / 1e6) / warm;
            rows.push(vec![
                kind.label().to_string(),
                n.to_string(),
                format!("{cold:.2}"),
                format!("{gets:.0}"),
                format!("{:.1}", bytes / 1e6),
                format!("{:.2}×", bytes / image_bytes as f64),
                format!("{manifests_cold:.0}"),
                format!("{warm:.2}"),
                format!("{warm_mbs:.0}"),
                format!("{warm_gets:.0} / {manifests_warm:.0}"),
                format!("{cpu:.1}"),
            ]);
            summary.push((cold, bytes, warm_mbs));
        }
        let (ours, peer) = (summary[0], summary[1]);
        ratios.push(vec![
            n.to_string(),
            format!("{:.2}", ours.0 / peer.0),
            format!("{:.2}", ours.1 / peer.1),
            format!("{:.2}", ours.2 / peer.2),
        ]);
    }

    let profile = if args.quick { "debug" } else { "release" };
    let notes = format!(
        "Image: {REPO}:v1, 4 gzip layers + config = 5 blobs, {:.1} MB. Upstream: docker-registry \
         (distribution 2.8) on 127.0.0.1; both proxies start on empty storage for each N and \
         pull from that same upstream. Client: skopeo 1.9 `copy docker://… dir:…`, N at once. \
         Upstream columns come from the upstream's access log (blob GETs for the repository and \
         their body bytes; manifest GET/HEAD). \"Warm\" is the same N pulls repeated right away. \
         CPU is the proxy process's user+system time for the cold and warm phases. {runs} run(s) \
         per cell (median), order alternating per N; {profile} build of `dutgate`.",
        image_bytes as f64 / 1e6
    );
    let command = if args.quick {
        "cargo xtask bench registry --quick"
    } else {
        "cargo xtask bench registry"
    };
    if args.write {
        append_table(
            &args.root,
            "registry: cold and warm pulls vs docker-registry proxy",
            command,
            &[
                "proxy",
                "clients",
                "cold wall s",
                "upstream blob GETs",
                "upstream blob MB",
                "× image",
                "upstream manifest reqs",
                "warm wall s",
                "warm MB/s (all clients)",
                "warm upstream blob GETs / manifest reqs",
                "proxy CPU s",
            ],
            &rows,
            &notes,
        )?;
        append_table(
            &args.root,
            "registry: ratios dutgate / docker-registry proxy",
            command,
            &[
                "clients",
                "cold wall time",
                "upstream blob bytes",
                "warm throughput",
            ],
            &ratios,
            "Below 1 is better for time and bytes; above 1 is better for throughput.",
        )?;
    } else {
        for r in rows.iter().chain(ratios.iter()) {
            println!("  {}", r.join(" | "));
        }
    }
    Ok(())
}
