//! Installs the Debian packages listed in `xtask/test-packages.txt` when they are missing.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

pub fn listed(root: &Path) -> anyhow::Result<Vec<String>> {
    let path = root.join("xtask/test-packages.txt");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Whether a line of the list is satisfied: `pkg`, or `pkg | cmd:NAME` when the command NAME
/// on PATH does as well (npm ships inside NodeSource's `nodejs`, which conflicts with Debian's
/// `npm` package). Installing a missing line installs its package.
fn is_satisfied(line: &str) -> bool {
    line.split('|')
        .map(str::trim)
        .any(|alt| match alt.strip_prefix("cmd:") {
            Some(cmd) => on_path(cmd),
            None => is_installed(alt),
        })
}

/// The package a line installs when it is not satisfied.
fn package_of(line: &str) -> &str {
    line.split('|').next().unwrap_or(line).trim()
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(cmd).is_file()))
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn install(root: &Path) -> anyhow::Result<()> {
    install_packages(&listed(root)?)?;
    install_python(root)
}

/// pip requirement files of Python test peers (moto), installed into `target/test-venv`.
const PYTHON_REQUIREMENTS: &[&str] = &["services/storage/tests/requirements.txt"];

/// Creates `target/test-venv` and installs each requirement file into it, again only when
/// the file changed since the last install (a copy is kept next to the venv).
fn install_python(root: &Path) -> anyhow::Result<()> {
    let venv = root.join("target/test-venv");
    if !venv.join("bin/pip").exists() {
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let ok = Command::new(python)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("running python3 -m venv")?;
        if !ok.success() {
            bail!(
                "python3 -m venv {} failed (Debian package python3-venv)",
                venv.display()
            );
        }
    }
    for req in PYTHON_REQUIREMENTS {
        let wanted =
            std::fs::read_to_string(root.join(req)).with_context(|| format!("reading {req}"))?;
        let stamp = venv.join(format!(".installed-{}", req.replace('/', "_")));
        if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
            continue;
        }
        println!("xtask: pip install -r {req}");
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "-r"])
            .arg(root.join(req))
            .status()
            .context("running pip")?;
        if !ok.success() {
            bail!("pip install -r {req} failed");
        }
        std::fs::write(&stamp, wanted)?;
    }
    Ok(())
}

pub fn install_packages(packages: &[String]) -> anyhow::Result<()> {
    let missing: Vec<&String> = packages.iter().filter(|p| !is_satisfied(p)).collect();
    if missing.is_empty() {
        println!("xtask: all {} test packages are installed", packages.len());
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|s| package_of(s)).collect();
    if !Path::new("/etc/debian_version").exists() {
        bail!(
            "this is not a Debian system; install these packages (or their equivalents) by hand: {}",
            names.join(" ")
        );
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    println!("xtask: installing {}", names.join(" "));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            cmd.arg("apt-get");
        }
        let status = cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(names.iter().copied());
    apt(&args)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
