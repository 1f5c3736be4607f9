//! `cargo xtask bench s3`: the embedded S3 endpoint (`dutgate s3`) against moto's S3 server,
//! driven by the same boto3 client (path-style, from `target/test-venv`), runs alternating.
//!
//! Per run, on a fresh bucket: one big object put and got back (8 MiB), 100 small (1 KiB)
//! puts, a ListObjectsV2 of everything, and deleting it all. Reported: median seconds per
//! step, and the server's CPU seconds and resident memory after all runs.
//!
//! `--quick`: 1 MiB, 10 small objects, one run, debug build (checks the harness only).
//! `-- <runs>`: number of runs (default 5).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::{append_table, stats};

const DRIVER: &str = r#"
import json, sys, time
import boto3
from botocore.config import Config
ep, ak, sk, bucket = sys.argv[1:5]
big_mib, small_n = int(sys.argv[5]), int(sys.argv[6])
s3 = boto3.client("s3", endpoint_url=ep, aws_access_key_id=ak, aws_secret_access_key=sk,
    region_name="us-east-1", config=Config(s3={"addressing_style": "path"},
    retries={"max_attempts": 1}, request_checksum_calculation="when_required",
    response_checksum_validation="when_required"))
out = {}
def timed(name, f):
    t = time.perf_counter(); r = f(); out[name] = time.perf_counter() - t; return r
s3.create_bucket(Bucket=bucket)
big = bytes(range(256)) * (big_mib * 4096)
timed("put_big", lambda: s3.put_object(Bucket=bucket, Key="big.bin", Body=big))
got = timed("get_big", lambda: s3.get_object(Bucket=bucket, Key="big.bin")["Body"].read())
assert got == big, "big object differs"
small = b"x" * 1024
def puts():
    for i in range(small_n):
        s3.put_object(Bucket=bucket, Key=f"small/{i:05}", Body=small)
timed("small_puts", puts)
def listing():
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        n += len(page.get("Contents", []))
    return n
n = timed("list", listing)
assert n == small_n + 1, f"listed {n}"
def delete_all():
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=o["Key"])
    s3.delete_bucket(Bucket=bucket)
timed("delete_all", delete_all)
print(json.dumps(out))
"#;

const STEPS: [(&str, &str); 5] = [
    ("put_big", "big put s"),
    ("get_big", "big get s"),
    ("small_puts", "small puts s"),
    ("list", "list s"),
    ("delete_all", "delete all s"),
];

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn cpu_seconds(&self) -> f64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) else {
            return f64::NAN;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return f64::NAN;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    fn rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }
}

fn build(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    Ok(super::cargo_build(args, &["--bin", "dutgate"])?.join("dutgate"))
}

fn start_dutgate(exe: &Path, lab: &Path) -> anyhow::Result<(Server, String, String)> {
    // A private copy: the shared target/ may be rebuilt while the benchmark runs.
    let copy = lab.join("dutgate");
    std::fs::copy(exe, &copy).with_context(|| format!("copying {}", exe.display()))?;
    let state = lab.join("state");
    let log = lab.join("s3.log");
    // The service is told its port (it signs and hands out URLs with it): a candidate, and
    // another when it reports the port taken.
    let spawn = |ports: &[u16]| -> anyhow::Result<Server> {
        let child = Command::new(&copy)
            .arg("--state-dir")
            .arg(&state)
            .arg("s3")
            .env("DUTGATE_CONFIG", "/dev/null")
            .env("DUTGATE_GATEWAY__BIND_ADDRESS", "127.0.0.1")
            .env("DUTGATE_GATEWAY__PORTS__S3", ports[0].to_string())
            .env("DUTGATE_GATEWAY__LOG__LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting dutgate s3")?;
        Ok(Server {
            child,
            url: format!("http://127.0.0.1:{}", ports[0]),
        })
    };
    let (server, _) = super::ports::start_on_candidates(
        "dutgate s3",
        1,
        &log,
        Duration::from_secs(30),
        spawn,
        |s: &mut Server| &mut s.child,
    )?;
    let keys: serde_like::Keys = serde_like::read_keys(&state.join("s3/admin-keys.json"))?;
    Ok((server, keys.access_key, keys.secret_key))
}

/// The key file is two string fields of a flat JSON object; read them without a JSON crate.
mod serde_like {
    use anyhow::Context;

    pub struct Keys {
        pub access_key: String,
        pub secret_key: String,
    }

    fn field(text: &str, name: &str) -> Option<String> {
        let after = text.split_once(&format!("\"{name}\""))?.1;
        let after = after.split_once(':')?.1;
        let start = after.find('"')? + 1;
        let end = after[start..].find('"')? + start;
        Some(after[start..end].to_string())
    }

    pub fn read_keys(path: &std::path::Path) -> anyhow::Result<Keys> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Keys {
            access_key: field(&text, "access_key").context("no access_key")?,
            secret_key: field(&text, "secret_key").context("no secret_key")?,
        })
    }
}

fn start_moto(venv: &Path) -> anyhow::Result<Server> {
    // Port 0: moto binds a port of the kernel's choice, read back from /proc.
    let child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting moto_server")?;
    let mut server = Server {
        child,
        url: String::new(),
    };
    let port = super::ports::bound_port(
        &mut server.child,
        "moto_server",
        Duration::from_secs(30),
        |_| true,
    )?;
    server.url = format!("http://127.0.0.1:{port}");
    Ok(server)
}

/// Runs the driver once; answers step → seconds.
fn drive(
    python: &Path,
    script: &Path,
    server: &Server,
    keys: (&str, &str),
    bucket: &str,
    big_mib: u32,
    small_n: u32,
) -> anyhow::Result<Vec<(String, f64)>> {
    let out = Command::new(python)
        .arg(script)
        .args([&server.url, keys.0, keys.1, bucket])
        .args([big_mib.to_string(), small_n.to_string()])
        .output()
        .context("running the boto3 driver")?;
    if !out.status.success() {
        bail!(
            "boto3 driver against {} failed: {}",
            server.url,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `{"put_big": 0.1, …}`: flat, numbers only.
    let body = text.trim().trim_start_matches('{').trim_end_matches('}');
    let mut values = Vec::new();
    for pair in body.split(',') {
        let (k, v) = pair
            .split_once(':')
            .context("driver output is not a flat object")?;
        let v: f64 = v.trim().parse().context("driver output value")?;
        values.push((k.trim().trim_matches('"').to_string(), v));
    }
    Ok(values)
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let venv = args.root.join("target/test-venv");
    let python = venv.join("bin/python");
    if !python.exists() || !venv.join("bin/moto_server").exists() {
        bail!(
            "{} has no moto: run `cargo xtask install-deps` first",
            venv.display()
        );
    }
    let runs: usize = match args.extra.first() {
        Some(n) => n.parse().context("runs must be a number")?,
        None if args.quick => 1,
        None => 5,
    };
    let (big_mib, small_n) = if args.quick { (1, 10) } else { (8, 100) };
    let exe = build(args)?;
    let lab = tempfile_dir(&args.root)?;
    let script = lab.join("driver.py");
    std::fs::write(&script, DRIVER)?;

    let (dutgate, ak, sk) = start_dutgate(&exe, &lab)?;
    let moto = start_moto(&venv)?;
    let servers: [(&str, &Server, (&str, &str)); 2] = [
        ("dutgate s3", &dutgate, (ak.as_str(), sk.as_str())),
        ("moto 5", &moto, ("AKIDMOTO", "motosecret")),
    ];
    let mut samples: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); STEPS.len()]; servers.len()];
    for run in 0..runs {
        // Alternate the order so that neither server always runs on a warmer machine.
        let order: Vec<usize> = if run % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for i in order {
            let (_, server, keys) = servers[i];
            let values = drive(
                &python,
                &script,
                server,
                keys,
                &format!("bench-{run}"),
                big_mib,
                small_n,
            )?;
            for (step, v) in values {
                if let Some(j) = STEPS.iter().position(|(s, _)| *s == step) {
                    samples[i][j].push(v);
                }
            }
        }
    }

    let mut header: Vec<&str> = vec!["server"];
    header.extend(STEPS.iter().map(|(_, h)| *h));
    header.extend(["server CPU s", "server RSS MiB"]);
    let mut rows = Vec::new();
    for (i, (name, server, _)) in servers.iter().enumerate() {
        let mut row = vec![name.to_string()];
        for s in &samples[i] {
            row.push(
                stats(s)
                    .map(|s| format!("{:.3}", s.median))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        row.push(format!("{:.2}", server.cpu_seconds()));
        row.push(format!("{:.0}", server.rss_mib()));
        rows.push(row);
    }
    let notes = format!(
        "Median of {runs} run(s), alternating order; one boto3 client (path-style, no retries) \
         per run: one {big_mib} MiB object put and got, {small_n} puts of 1 KiB, ListObjectsV2 \
         of everything, delete all. Both servers on loopback; CPU and RSS of the server process \
         after all runs."
    );
    let command = if args.quick {
        "cargo xtask bench s3 --quick"
    } else {
        "cargo xtask bench s3"
    };
    if args.write {
        append_table(
            &args.root,
            "s3: embedded endpoint vs moto",
            command,
            &header,
            &rows,
            &notes,
        )?;
    } else {
        println!("{}", header.join(" | "));
        for r in &rows {
            println!("{}", r.join(" | "));
        }
    }
    drop(moto);
    drop(dutgate);
    let _ = std::fs::remove_dir_all(&lab);
    Ok(())
}

/// A fresh directory under `target/` (xtask has no tempfile dependency).
fn tempfile_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root
        .join("target")
        .join(format!("bench-s3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
