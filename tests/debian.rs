//! The Debian package of the gateway as the tests see it (`cargo xtask deb`): built or named
//! by `DUTGATE_TEST_DEB`, unpacked with `dpkg-deb -x`/`-e`, its systemd units read key by key
//! and scored by `systemd-analyze security --offline`.
//!
//! Shared by `services/dutgate/tests/install.rs` (which includes this file by path) and
//! `tests/real_farm.rs`: it uses nothing but std and `dutgate_core`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use dutgate_core::ServiceName;

/// The packaged config, as the units name it.
pub const CONFIG: &str = "/etc/dutgate/gateway.yml";
/// The state dir, as the units name it.
pub const STATE: &str = "/var/lib/dutgate";
/// Where the units are, relative to the package root.
pub const UNIT_DIR: &str = "lib/systemd/system";

/// The workspace root (the directory holding `Cargo.lock`), whichever crate includes this.
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .map(PathBuf::from)
        .unwrap_or(manifest)
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd`; a program that cannot start fails the test naming the Debian package.
pub fn output(cmd: &mut Command, package: &str) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (Debian package {package})");
    })
}

/// [`output`], and fails the test with its output unless it succeeded.
pub fn run_ok(cmd: &mut Command, package: &str) -> Output {
    let out = output(cmd, package);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// A package unpacked for a test.
pub struct Package {
    pub deb: PathBuf,
    /// `dpkg-deb -x` of it.
    pub root: PathBuf,
    /// `dpkg-deb -e` of it (control, conffiles, maintainer scripts).
    pub control: PathBuf,
}

/// The package under test: `DUTGATE_TEST_DEB` when set, else built from the debug binaries
/// into `out` (`cargo xtask deb --profile dev`: the test suite builds them anyway).
pub fn deb_under_test(out: &Path) -> PathBuf {
    match std::env::var_os("DUTGATE_TEST_DEB") {
        Some(deb) => PathBuf::from(deb),
        None => build_package(out),
    }
}

/// `cargo xtask deb --profile dev --out <out>`; the package's path.
pub fn build_package(out: &Path) -> PathBuf {
    let started = Instant::now();
    let built = run_ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root())
            .args([
                "run",
                "--quiet",
                "-p",
                "xtask",
                "--",
                "deb",
                "--profile",
                "dev",
            ])
            .arg("--out")
            .arg(out),
        "cargo",
    );
    // The last line of `cargo xtask deb` is the package's path.
    let stdout = text(&built.stdout);
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        deb.is_file(),
        "cargo xtask deb printed no package:\n{stdout}"
    );
    println!(
        "cargo xtask deb --profile dev: {} in {:.1?}",
        deb.display(),
        started.elapsed()
    );
    deb
}

/// `dpkg-deb -x` and `-e` of `deb` into `<work>/root` and `<work>/control` (emptied first).
pub fn unpack(deb: &Path, work: &Path) -> Package {
    let root = work.join("root");
    let control = work.join("control");
    for dir in [&root, &control] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
    run_ok(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root),
        "dpkg",
    );
    run_ok(
        Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control),
        "dpkg",
    );
    Package {
        deb: deb.to_path_buf(),
        root,
        control,
    }
}

/// The unit of every service, `dutgate-<service>.service`.
pub fn service_units() -> Vec<String> {
    ServiceName::ALL
        .iter()
        .map(|s| format!("dutgate-{}.service", s.as_str()))
        .collect()
}

/// `[Service]` (and every other section's) `key=value` lines of a unit file of the package
/// unpacked at `root`, in order.
pub fn unit_keys(root: &Path, unit: &str) -> Vec<(String, String)> {
    let path = root.join(UNIT_DIR).join(unit);
    let body = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The value of the last `key=` line (what systemd uses for a single-valued key).
pub fn unit_value(keys: &[(String, String)], key: &str) -> Option<String> {
    keys.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

/// The overall exposure level `systemd-analyze security --offline=yes` gives `unit_file`.
pub fn exposure(unit_file: &Path) -> f64 {
    let out = run_ok(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(unit_file),
        "systemd",
    );
    let report = text(&out.stdout);
    report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for "))
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level for {}:\n{report}", unit_file.display()))
}
