//! `cargo xtask test`: packages, then fmt, clippy, the whole test suite, and the smoke
//! variant of every benchmark (`bench all --quick --no-write`: it checks that each harness
//! still runs dutgate and its peer and parses their results, not their speed).

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::{packages, workspace_root};

pub const POSTGRES_ENV: &str = "DUTGATE_TEST_POSTGRES_URL";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1/test";

#[derive(Args, Debug)]
pub struct TestArgs {
    /// Also run the storage tests against PostgreSQL (`DUTGATE_TEST_POSTGRES_URL`, default
    /// postgres://postgres@127.0.0.1/test); installs and starts PostgreSQL when it is not running.
    #[arg(long)]
    postgres: bool,
    /// Do not install missing system packages.
    #[arg(long)]
    no_install: bool,
    /// Skip fmt and clippy (for quick local iterations).
    #[arg(long)]
    no_lint: bool,
    /// Skip the benchmarks' smoke run (`bench all --quick --no-write`).
    #[arg(long)]
    no_bench: bool,
    /// Extra arguments for `cargo test` (e.g. `-p dutgate-salad`).
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> anyhow::Result<()> {
    let root = workspace_root();
    let started = Instant::now();
    if !args.no_install {
        packages::install(&root)?;
    }
    let mut envs: Vec<(String, String)> = Vec::new();
    if args.postgres {
        let url = std::env::var(POSTGRES_ENV).unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_string());
        ensure_postgres(&url, args.no_install)?;
        envs.push((POSTGRES_ENV.to_string(), url.clone()));
        envs.push(("DUTGATE_BENCH_POSTGRES_URL".to_string(), url));
    }
    if !args.no_lint {
        step(
            "cargo fmt --check",
            &root,
            &["fmt", "--all", "--", "--check"],
            &envs,
        )?;
        step(
            "cargo clippy",
            &root,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &envs,
        )?;
    }
    let mut test_args: Vec<&str> = vec!["test", "--workspace"];
    test_args.extend(args.cargo_args.iter().map(String::as_str));
    step("cargo test", &root, &test_args, &envs)?;
    if !args.no_bench {
        bench_smoke(&root, &envs)?;
    }
    println!("xtask: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}

fn step(
    name: &str,
    root: &std::path::Path,
    args: &[&str],
    envs: &[(String, String)],
) -> anyhow::Result<()> {
    println!("xtask: {name}");
    let t = Instant::now();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .status()
        .with_context(|| format!("running {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    println!("xtask: {name} ok in {:.0?}", t.elapsed());
    Ok(())
}

/// Every registered benchmark's quick variant, without touching docs/benchmarks.md. Runs this
/// same xtask binary so that the benchmarks see the test environment (PostgreSQL URL).
fn bench_smoke(root: &std::path::Path, envs: &[(String, String)]) -> anyhow::Result<()> {
    let name = "bench all --quick --no-write";
    println!("xtask: {name}");
    let t = Instant::now();
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let status = Command::new(exe)
        .args(["bench", "all", "--quick", "--no-write"])
        .current_dir(root)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .status()
        .with_context(|| format!("running {name}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    println!("xtask: {name} ok in {:.0?}", t.elapsed());
    Ok(())
}

/// Host and port of a postgres:// URL, defaulting like libpq.
fn postgres_addr(url: &str) -> Option<SocketAddr> {
    let rest = url.split_once("://")?.1;
    let hostport = rest.split(['/', '?']).next()?;
    let hostport = hostport
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(hostport);
    let with_port = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5432")
    };
    with_port.to_socket_addrs().ok()?.next()
}

fn reachable(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
}

fn ensure_postgres(url: &str, no_install: bool) -> anyhow::Result<()> {
    let addr = postgres_addr(url).with_context(|| format!("cannot parse {POSTGRES_ENV}={url}"))?;
    if reachable(addr) {
        return Ok(());
    }
    if no_install {
        bail!("PostgreSQL does not answer at {addr} (package `postgresql`)");
    }
    println!("xtask: PostgreSQL does not answer at {addr}; installing and starting it");
    packages::install_packages(&["postgresql".to_string()])?;
    // Debian's cluster tools; no systemd needed.
    let versions = std::fs::read_dir("/etc/postgresql")
        .context("no /etc/postgresql after installing postgresql")?;
    for v in versions.flatten() {
        let version = v.file_name().to_string_lossy().to_string();
        let _ = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &version, "main", "start"])
            .status();
    }
    // Trust local TCP connections for the test database, as the CI machines are set up.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if reachable(addr) {
            let _ = Command::new("su")
                .args(["postgres", "-c", "psql -tc \"SELECT 1 FROM pg_database WHERE datname='test'\" | grep -q 1 || createdb test"])
                .status();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("PostgreSQL still does not answer at {addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgres_urls() {
        assert_eq!(
            postgres_addr("postgres://postgres@127.0.0.1/test")
                .unwrap()
                .port(),
            5432
        );
        assert_eq!(
            postgres_addr("postgres://u:p@127.0.0.1:6543/x")
                .unwrap()
                .port(),
            6543
        );
        assert!(postgres_addr("nonsense").is_none());
    }
}
