//! `cargo xtask bench footprint`: how long `dutgate up` takes until every service answers
//! `/healthz`, how long SIGTERM takes to stop everything, and each service's idle RSS.
//! There is no peer for this one: the figures are the gateway's own floor.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::{append_table, stats};

const SERVICES: [&str; 7] = ["executor", "mars", "registry", "boot", "pdu", "salad", "s3"];

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let exe = super::cargo_build(args, &["--bin", "dutgate"])?.join("dutgate");
    // `cargo xtask bench footprint -- N` runs N times instead of 5.
    let runs = match args.extra.first() {
        Some(n) => n
            .parse()
            .context("the extra argument is the number of runs")?,
        None if args.quick => 1,
        None => 5,
    };
    let mut start_ms = Vec::new();
    let mut stop_ms = Vec::new();
    let mut rss_kib: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..runs {
        let r = one_run(&exe)?;
        start_ms.push(r.start.as_secs_f64() * 1000.0);
        stop_ms.push(r.stop.as_secs_f64() * 1000.0);
        for (svc, kib) in r.rss {
            rss_kib.entry(svc).or_default().push(kib as f64);
        }
    }
    let fmt = |v: &[f64]| {
        stats(v)
            .map(|s| {
                format!(
                    "{:.0} / {:.0} / {:.0} (p99 {:.0}, n={})",
                    s.min, s.median, s.max, s.p99, s.n
                )
            })
            .unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![
        vec![
            "`dutgate up` until all /healthz answer (ms)".into(),
            fmt(&start_ms),
        ],
        vec![
            "SIGTERM until every process is gone (ms)".into(),
            fmt(&stop_ms),
        ],
    ];
    let mut total = vec![0.0; runs];
    for (svc, v) in &rss_kib {
        rows.push(vec![
            format!("idle RSS of `{svc}` (MiB)"),
            fmt(&v.iter().map(|k| k / 1024.0).collect::<Vec<_>>()),
        ]);
        for (i, k) in v.iter().enumerate() {
            if let Some(t) = total.get_mut(i) {
                *t += k / 1024.0;
            }
        }
    }
    rows.push(vec!["idle RSS, all services (MiB)".into(), fmt(&total)]);
    println!("{rows:#?}");
    if args.write && !args.quick {
        append_table(
            &args.root,
            "Gateway footprint",
            "cargo xtask bench footprint",
            &["figure", "min / median / max"],
            &rows,
            &format!(
                "{runs} runs of a release build with the embedded defaults (SQLite, empty state dir)."
            ),
        )?;
    }
    Ok(())
}

struct RunResult {
    start: Duration,
    stop: Duration,
    rss: Vec<(String, u64)>,
}

/// `dutgate up`, killed (with its services, which follow their parent) when dropped.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn one_run(exe: &std::path::Path) -> anyhow::Result<RunResult> {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let state = std::env::temp_dir().join(format!("dutgate-bench-{}-{run}", std::process::id()));
    let log = std::env::temp_dir().join(format!("dutgate-bench-{}-{run}.log", std::process::id()));
    // The services find each other through their configured ports, so `up` is told them:
    // candidates (the last one for salad's netconsole), and others when one is taken. The
    // start is timed from the spawn that succeeded.
    let mut t0 = Instant::now();
    let spawn = |ports: &[u16]| -> anyhow::Result<Up> {
        let mut cmd = Command::new(exe);
        cmd.arg("--state-dir").arg(&state).arg("up");
        for (svc, p) in SERVICES.iter().zip(ports) {
            cmd.env(
                format!("DUTGATE_GATEWAY__PORTS__{}", svc.to_uppercase()),
                p.to_string(),
            );
        }
        let out = std::fs::File::create(&log)?;
        cmd.env(
            "DUTGATE_SALAD__NETCONSOLE_PORT",
            ports[SERVICES.len()].to_string(),
        )
        .env("DUTGATE_GATEWAY__BIND_ADDRESS", "127.0.0.1")
        .stdout(Stdio::null())
        .stderr(out);
        t0 = Instant::now();
        Ok(Up(cmd.spawn().context("starting dutgate up")?))
    };
    let (mut up, ports) = super::ports::start_on_candidates(
        "dutgate up",
        SERVICES.len() + 1,
        &log,
        Duration::from_secs(20),
        spawn,
        |u: &mut Up| &mut u.0,
    )?;
    for p in &ports[..SERVICES.len()] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !healthy(*p) {
            if Instant::now() > deadline {
                bail!("service on port {p} never became healthy");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let start = t0.elapsed();
    // Part of the measurement, not a wait for a condition: "idle" RSS is read one second
    // after the last service answered, the same in every run.
    std::thread::sleep(Duration::from_secs(1));
    let child = &mut up.0;
    let rss = children_rss(child.id());
    let t1 = Instant::now();
    // SAFETY-free: signal through the kill command to avoid a libc dependency here.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    child.wait()?;
    let stop = t1.elapsed();
    let _ = std::fs::remove_dir_all(&state);
    let _ = std::fs::remove_file(&log);
    Ok(RunResult { start, stop, rss })
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if n >= 12 && &buf[9..12] == b"200")
}

/// (service, VmRSS KiB) of every direct child of `parent`, named by its last argument.
fn children_rss(parent: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("PPid:") != Some(u64::from(parent)) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let name = cmdline
            .split(|b| *b == 0)
            .rfind(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).to_string())
            .unwrap_or_default();
        if let Some(kib) = field("VmRSS:") {
            out.push((name, kib));
        }
    }
    out.sort();
    out
}
