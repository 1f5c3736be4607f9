//! `cargo xtask fuzz [--target NAME] --time N`: runs every cargo-fuzz target of the workspace
//! (each `services/*/fuzz` and `pdu-drivers/*/fuzz` crate) for N seconds, on nightly.
//! Installs cargo-fuzz first when it is missing.
//!
//! Each target keeps its growing corpus in `<fuzz>/corpus/<target>` (not committed) and also
//! reads the committed seeds in `<fuzz>/seeds/<target>`. A crash stops the run and leaves the
//! input in `<fuzz>/artifacts/<target>/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A fuzz target: its cargo-fuzz crate directory and its name.
struct Target {
    dir: PathBuf,
    name: String,
}

pub fn run(target: Option<String>, secs: u64) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let mut targets = discover(&root)?;
    if let Some(wanted) = &target {
        targets.retain(|t| {
            t.name == *wanted || format!("{}/{}", crate_name(&t.dir), t.name) == *wanted
        });
        if targets.is_empty() {
            bail!("no fuzz target named {wanted:?} (see `fuzz_targets/*.rs` in the fuzz crates)");
        }
    }
    if targets.is_empty() {
        bail!("no cargo-fuzz crate found under services/*/fuzz or pdu-drivers/*/fuzz");
    }
    ensure_cargo_fuzz()?;
    for t in &targets {
        println!("xtask fuzz: {}/{} for {secs} s", crate_name(&t.dir), t.name);
        let corpus = t.dir.join("corpus").join(&t.name);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&t.dir)
            .args(["+nightly", "fuzz", "run", &t.name])
            .arg(&corpus);
        let seeds = t.dir.join("seeds").join(&t.name);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--").args([
            format!("-max_total_time={secs}"),
            // One input taking seconds is a hang worth reporting, not a slow machine.
            "-timeout=10".to_string(),
            "-rss_limit_mb=2048".to_string(),
        ]);
        let status = cmd
            .status()
            .with_context(|| format!("cannot run cargo fuzz in {}", t.dir.display()))?;
        if !status.success() {
            bail!(
                "fuzz target {} failed ({status}); the crashing input is in {}",
                t.name,
                t.dir.join("artifacts").join(&t.name).display()
            );
        }
    }
    Ok(())
}

fn crate_name(dir: &Path) -> String {
    dir.parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every `fuzz_targets/*.rs` of every cargo-fuzz crate, sorted.
fn discover(root: &Path) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    for group in ["services", "pdu-drivers"] {
        let Ok(crates) = std::fs::read_dir(root.join(group)) else {
            continue;
        };
        for entry in crates.flatten() {
            let dir = entry.path().join("fuzz");
            let manifest = dir.join("Cargo.toml");
            let Ok(text) = std::fs::read_to_string(&manifest) else {
                continue;
            };
            if !text.contains("cargo-fuzz = true") {
                continue;
            }
            let targets_dir = dir.join("fuzz_targets");
            let entries = std::fs::read_dir(&targets_dir)
                .with_context(|| format!("cannot list {}", targets_dir.display()))?;
            for f in entries.flatten() {
                let path = f.path();
                if path.extension().is_some_and(|e| e == "rs")
                    && let Some(stem) = path.file_stem()
                {
                    out.push(Target {
                        dir: dir.clone(),
                        name: stem.to_string_lossy().into_owned(),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.dir, &a.name).cmp(&(&b.dir, &b.name)));
    Ok(out)
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    println!("xtask fuzz: installing cargo-fuzz");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed ({status})");
    }
    Ok(())
}
