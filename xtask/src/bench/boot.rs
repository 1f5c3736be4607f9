//! `cargo xtask bench boot`: `dutgate boot` against Debian's nginx (its own instance, own
//! prefix and port), in the same run, on the same machine:
//!
//! - boot scripts: `GET /boot/<mac>/boot.ipxe` (a per-MAC config kept in memory, its script
//!   kept once rendered) against nginx serving the same script as a static file;
//!   requests/s, p50/p99 latency with 16 concurrent kept-alive clients, and each server's CPU
//!   time per request;
//! - cached artifact throughput: a 100 MB file that dutgate's cache fetched once from nginx,
//!   against nginx serving that file itself (sendfile); MB/s with 4 concurrent clients.
//!
//! The service runs from the boot crate's `boot_server` example (the same `run` as
//! `dutgate boot`, without linking the other services); load comes from its `boot_load`
//! example (tokio + reqwest). The two servers are
//! measured alternately, `runs` times each (default 3, `-- <runs>`), and the medians are
//! reported. `--quick`: 10 MB file, 1 s per measurement, 1 run (checks the harness only).

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::{append_table, stats};

const MAC: &str = "52:54:00:b0:07:01";
const USER_TOKEN: &str = "bench-user-token";
/// Boot configs are written by the gateway's services and admins only.
const ADMIN_TOKEN: &str = "bench-admin-token";

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
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 request on 127.0.0.1:port; returns (status, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let status = String::from_utf8_lossy(&out[..split])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    Ok((status, out[split + 4..].to_vec()))
}

fn wait_ready(what: &str, port: u16, path: &str, proc: &mut Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if http(port, "GET", path, "", "").is_ok_and(|(s, _)| s == 200) {
            return Ok(());
        }
        if let Some(st) = proc.child.try_wait()? {
            bail!("{} exited early: {st}", proc.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not answer {path} on port {port} within 60 s")
}

fn nginx(lab: &Path, www: &Path) -> anyhow::Result<(Proc, u16)> {
    let dir = lab.join("nginx");
    std::fs::create_dir_all(dir.join("logs"))?;
    let error_log = dir.join("logs/error.log");
    // nginx cannot listen on port 0: candidate ports, another one when it reports the port
    // taken (nginx logs "Address already in use" and exits).
    let spawn = |ports: &[u16]| {
        let port = ports[0];
        // Tuned as a farm admin would for static files: sendfile, keep-alive, one worker per
        // core.
        let conf = format!(
            "daemon off;\nworker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 1000000;\n\
               default_type application/octet-stream;\n\
               client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;\n\
               uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;\n\
               server {{ listen 127.0.0.1:{port}; root {www}; location / {{ }} }}\n}}\n",
            dir = dir.display(),
            www = www.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        // A fresh error log per attempt: an earlier attempt's "in use" must not count.
        File::create(&error_log)?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(&error_log);
        Proc::spawn(cmd, "nginx", &dir.join("stdout.log"))
    };
    let (mut p, ports) = super::ports::start_on_candidates(
        "nginx",
        1,
        &error_log,
        Duration::from_secs(60),
        spawn,
        |p: &mut Proc| &mut p.child,
    )?;
    wait_ready("nginx", ports[0], "/script.ipxe", &mut p)?;
    Ok((p, ports[0]))
}

fn dutgate_boot(exe: &Path, lab: &Path, nginx_port: u16) -> anyhow::Result<(Proc, u16)> {
    let dir = lab.join("dutgate");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("boot.log");
    // The service renders its own URLs from its configured port, so it is told one: a
    // candidate, and another when it reports the port taken.
    let spawn = |ports: &[u16]| {
        // The artifacts come from the benchmark's nginx on loopback, which outbound fetches
        // may reach only when allowed by name; the load generator asks for the DUT's script
        // from loopback, as the virtual farm's DUTs do.
        let cfg = format!(
            "gateway:\n  state_dir: {state}\n  bind_address: 127.0.0.1\n  ports:\n    boot: {port}\n  log:\n    level: warn\n  \
               auth:\n    user_token: {USER_TOKEN}\n    admin_token: {ADMIN_TOKEN}\n  \
               outbound:\n    allow: [\"127.0.0.1:{nginx_port}\"]\n\
             boot:\n  unverified_peer_networks: [127.0.0.0/8]\n  cache:\n    ttl_seconds: 86400\n",
            state = dir.join("state").display(),
            port = ports[0],
        );
        let cfg_path = dir.join("gateway.yml");
        std::fs::write(&cfg_path, cfg)?;
        let mut cmd = Command::new(exe);
        cmd.arg(&cfg_path);
        Proc::spawn(cmd, "dutgate boot", &log)
    };
    let (mut p, ports) = super::ports::start_on_candidates(
        "dutgate boot",
        1,
        &log,
        Duration::from_secs(60),
        spawn,
        |p: &mut Proc| &mut p.child,
    )?;
    let port = ports[0];
    wait_ready("dutgate boot", port, "/healthz", &mut p)?;
    let body = format!(
        "{{\"kernel\": {{\"url\": \"http://127.0.0.1:{nginx_port}/artifact.bin\", \
          \"cmdline\": \"console=ttyS0,115200 SALAD.machine_id={MAC} b2c.container=\\\"-ti docker://registry/x:y ./run.sh\\\" a;b\"}}, \
          \"initramfs\": [{{\"url\": \"http://127.0.0.1:{nginx_port}/initrd.img\"}}], \"job_id\": \"bench\"}}"
    );
    let (status, resp) = http(
        port,
        "PUT",
        &format!("/api/v1/boot/{MAC}"),
        &format!("Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: application/json\r\n"),
        &body,
    )?;
    if status != 200 {
        bail!(
            "PUT boot config: {status} {}",
            String::from_utf8_lossy(&resp)
        );
    }
    Ok((p, port))
}

fn build(args: &BenchArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = super::cargo_build(
        args,
        &["--example", "boot_server", "--example", "boot_load"],
    )?
    .join("examples");
    Ok((dir.join("boot_server"), dir.join("boot_load")))
}

#[derive(Debug, Clone, Copy, Default)]
struct Load {
    requests: f64,
    bytes: f64,
    /// CPU seconds the server (all its processes) spent during the load.
    cpu_s: f64,
    rps: f64,
    mb_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: f64,
}

fn json_number(text: &str, key: &str) -> f64 {
    text.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|rest| {
            rest.split([',', '}'])
                .next()
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN)
}

fn load(
    tool: &Path,
    url: &str,
    concurrency: usize,
    seconds: f64,
    expect: usize,
) -> anyhow::Result<Load> {
    let out = Command::new(tool)
        .args([
            url,
            &concurrency.to_string(),
            &seconds.to_string(),
            &expect.to_string(),
        ])
        .output()
        .context("running boot_load")?;
    if !out.status.success() {
        bail!("boot_load: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let l = Load {
        rps: json_number(&text, "rps"),
        mb_per_s: json_number(&text, "mb_per_s"),
        p50_ms: json_number(&text, "p50_ms"),
        p99_ms: json_number(&text, "p99_ms"),
        errors: json_number(&text, "errors"),
        requests: json_number(&text, "requests"),
        bytes: json_number(&text, "bytes"),
        cpu_s: f64::NAN,
    };
    if l.errors != 0.0 {
        bail!("{url}: {} failed requests", l.errors);
    }
    Ok(l)
}

/// User + system CPU seconds of `pid` and of its children (nginx's workers), from /proc.
fn tree_cpu_seconds(pid: u32) -> f64 {
    let read = |p: &str| -> Option<(u32, f64)> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid = f.get(1)?.parse().ok()?;
        let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        // USER_HZ is 100 on every Linux architecture we run on.
        Some((ppid, ticks / 100.0))
    };
    let own = read(&pid.to_string()).map(|(_, c)| c).unwrap_or(0.0);
    let children: f64 = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
                .filter_map(|n| read(&n))
                .filter(|(ppid, _)| *ppid == pid)
                .map(|(_, c)| c)
                .sum()
        })
        .unwrap_or(0.0);
    own + children
}

/// `load`, also measuring the server's CPU time.
fn load_with_cpu(
    server: u32,
    tool: &Path,
    url: &str,
    concurrency: usize,
    seconds: f64,
    expect: usize,
) -> anyhow::Result<Load> {
    let before = tree_cpu_seconds(server);
    let mut l = load(tool, url, concurrency, seconds, expect)?;
    l.cpu_s = tree_cpu_seconds(server) - before;
    Ok(l)
}

fn median(v: &[f64]) -> f64 {
    stats(v).map(|s| s.median).unwrap_or(f64::NAN)
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if Command::new("sh")
        .args(["-c", "command -v nginx || test -x /usr/sbin/nginx"])
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        bail!("the boot benchmark needs `nginx` (apt-get install nginx)");
    }
    let runs: usize = match args.extra.first() {
        Some(r) => r.parse().context("-- <runs> must be a number")?,
        None if args.quick => 1,
        None => 3,
    };
    let (exe, tool) = build(args)?;
    let lab = std::env::temp_dir().join(format!("dutgate-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&lab)?;
    let result = run_in(args, &lab, &exe, &tool, runs);
    let _ = std::fs::remove_dir_all(&lab);
    result
}

fn run_in(
    args: &BenchArgs,
    lab: &Path,
    exe: &Path,
    tool: &Path,
    runs: usize,
) -> anyhow::Result<()> {
    let size: usize = if args.quick { 10_000_000 } else { 100_000_000 };
    let seconds = if args.quick { 1.0 } else { 5.0 };
    let load_avg = super::report::load_average();
    let (script_clients, file_clients) = (16usize, 4usize);
    let www = lab.join("www");
    std::fs::create_dir_all(&www)?;
    // Deterministic pseudo-random content (not compressible, not all zeros).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = Vec::with_capacity(size + 8);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    std::fs::write(www.join("artifact.bin"), &data)?;
    std::fs::write(www.join("initrd.img"), &data[..1_000_000])?;
    drop(data);
    std::fs::write(www.join("script.ipxe"), "#!ipxe\n")?;
    let (nginx_proc, nport) = nginx(lab, &www)?;
    let (boot_proc, bport) = dutgate_boot(exe, lab, nport)?;
    let (nginx_pid, boot_pid) = (nginx_proc.child.id(), boot_proc.child.id());
    // nginx serves the very script dutgate renders, as a static file.
    let script_path = format!("/boot/{MAC}/boot.ipxe?platform=pcbios&buildarch=i386");
    let (status, script) = http(bport, "GET", &script_path, "", "")?;
    if status != 200 {
        bail!("script: {status}");
    }
    std::fs::write(www.join("script.ipxe"), &script)?;
    let text = String::from_utf8_lossy(&script).to_string();
    let artifact_path = text
        .lines()
        .find_map(|l| l.strip_prefix("kernel "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| {
            u.split_once(&format!("127.0.0.1:{bport}"))
                .map(|(_, p)| p.to_string())
        })
        .context("no cached kernel URL in the script")?;
    // Warm the cache (one upstream fetch from nginx) and time it.
    let t0 = Instant::now();
    let (status, body) = http(bport, "GET", &artifact_path, "", "")?;
    let cold_s = t0.elapsed().as_secs_f64();
    if status != 200 || body.len() != size {
        bail!("cache warm-up: status {status}, {} bytes", body.len());
    }

    let d_script = format!("http://127.0.0.1:{bport}{script_path}");
    let n_script = format!("http://127.0.0.1:{nport}/script.ipxe");
    let d_file = format!("http://127.0.0.1:{bport}{artifact_path}");
    let n_file = format!("http://127.0.0.1:{nport}/artifact.bin");
    let (mut ds, mut ns, mut df, mut nf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs {
        let dutgate_first = r % 2 == 0;
        for first in [true, false] {
            if first == dutgate_first {
                println!("  run {r}: dutgate");
                ds.push(load_with_cpu(
                    boot_pid,
                    tool,
                    &d_script,
                    script_clients,
                    seconds,
                    script.len(),
                )?);
                df.push(load_with_cpu(
                    boot_pid,
                    tool,
                    &d_file,
                    file_clients,
                    seconds,
                    size,
                )?);
            } else {
                println!("  run {r}: nginx");
                ns.push(load_with_cpu(
                    nginx_pid,
                    tool,
                    &n_script,
                    script_clients,
                    seconds,
                    script.len(),
                )?);
                nf.push(load_with_cpu(
                    nginx_pid,
                    tool,
                    &n_file,
                    file_clients,
                    seconds,
                    size,
                )?);
            }
        }
    }
    let m = |v: &[Load], f: fn(&Load) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let row = |what: &str, d: f64, n: f64, digits: usize| {
        vec![
            what.to_string(),
            format!("{d:.digits$}"),
            format!("{n:.digits$}"),
            format!("{:.2}", d / n),
        ]
    };
    let rows = vec![
        row(
            &format!("boot script requests/s ({script_clients} clients)"),
            m(&ds, |l| l.rps),
            m(&ns, |l| l.rps),
            0,
        ),
        row(
            "boot script latency p50 (ms)",
            m(&ds, |l| l.p50_ms),
            m(&ns, |l| l.p50_ms),
            2,
        ),
        row(
            "boot script latency p99 (ms)",
            m(&ds, |l| l.p99_ms),
            m(&ns, |l| l.p99_ms),
            2,
        ),
        row(
            "server CPU per boot script request (µs, user + system)",
            m(&ds, |l| l.cpu_s * 1e6 / l.requests.max(1.0)),
            m(&ns, |l| l.cpu_s * 1e6 / l.requests.max(1.0)),
            1,
        ),
        row(
            &format!(
                "cached {} MB artifact, MB/s ({file_clients} clients)",
                size / 1_000_000
            ),
            m(&df, |l| l.mb_per_s),
            m(&nf, |l| l.mb_per_s),
            0,
        ),
        row(
            "server CPU per MB of artifact served (ms, user + system)",
            m(&df, |l| l.cpu_s * 1e9 / l.bytes.max(1.0)),
            m(&nf, |l| l.cpu_s * 1e9 / l.bytes.max(1.0)),
            3,
        ),
    ];
    if args.write {
        let profile = if args.quick { "debug" } else { "release" };
        append_table(
            &args.root,
            "Boot: scripts and cached artifacts, dutgate boot vs nginx",
            if args.quick {
                "cargo xtask bench boot --quick"
            } else {
                "cargo xtask bench boot"
            },
            &[
                "measure",
                "dutgate boot",
                "nginx (Debian)",
                "ratio dutgate/nginx",
            ],
            &rows,
            &format!(
                "{runs} alternating run(s) of {seconds} s per measure, medians; dutgate {profile} build. \
                 dutgate serves the script from the boot config it keeps in memory (written \
                 through to SQLite), rendered once per (MAC, host, platform) and kept with the \
                 config; nginx serves the same bytes as a static file. A DUT \
                 asks for one script per boot, so either rate is far beyond a farm's needs; the \
                 artifact rows are what a simultaneous boot of many DUTs costs. The artifact was fetched from nginx into dutgate's \
                 cache once before measuring (cold fetch of {} MB: {cold_s:.2} s); nginx serves it \
                 with sendfile. Load generator: `boot_load` (tokio + reqwest, kept-alive \
                 connections) on the same 2-core machine as both servers, so requests/s also \
                 depends on how much CPU the generator and other work leave; the CPU row is \
                 each server's own cost (nginx: master + workers). Load average at the start: {load_avg}.",
                size / 1_000_000
            ),
        )?;
    } else {
        for r in &rows {
            println!("  {}", r.join(" | "));
        }
    }
    Ok(())
}
