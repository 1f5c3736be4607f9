//! `cargo xtask dut-image`: builds the static DUT-side agents (`machine-registration`,
//! `dutgate-dut`) and assembles the DUT environment with `dutgate dut-image`.
//!
//! The agents run inside an initramfs with no libraries, so they are linked statically
//! (`+crt-static` on the glibc target: the musl target is not part of the toolchain here).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Args;

use crate::packages;

const TARGET: &str = "x86_64-unknown-linux-gnu";
const PACKAGES: [&str; 2] = ["linux-image-amd64", "busybox-static"];

#[derive(Args, Debug)]
pub struct DutImageArgs {
    /// State dir of the gateway that will boot the image (the image goes to `<dir>/dut-image`).
    #[arg(long, default_value = "dutgate-state")]
    pub state_dir: PathBuf,
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the agents and the image; returns the image directory.
pub fn build(root: &Path, state_dir: &Path) -> anyhow::Result<PathBuf> {
    packages::install_packages(&PACKAGES.map(String::from))?;
    println!("xtask: building the static DUT agents");
    let status = cargo()
        .args([
            "build",
            "--release",
            "-p",
            "machine-registration",
            "-p",
            "dutgate-dut",
            "--target",
            TARGET,
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the static agents failed ({status})");
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin_dir = target_dir.join(TARGET).join("release");
    let status = cargo()
        .args(["run", "--quiet", "-p", "dutgate", "--"])
        .arg("--state-dir")
        .arg(state_dir)
        .arg("dut-image")
        .arg("--registration-agent")
        .arg(bin_dir.join("machine-registration"))
        .arg("--dut-agent")
        .arg(bin_dir.join("dutgate-dut"))
        // The image must not depend on a config file that happens to be on this machine.
        .env("DUTGATE_CONFIG", "/dev/null")
        .current_dir(root)
        .status()
        .context("running dutgate dut-image")?;
    if !status.success() {
        bail!("dutgate dut-image failed ({status})");
    }
    Ok(state_dir.join("dut-image"))
}

pub fn run(args: &DutImageArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let state = if args.state_dir.is_absolute() {
        args.state_dir.clone()
    } else {
        std::env::current_dir()?.join(&args.state_dir)
    };
    build(&root, &state)?;
    Ok(())
}
