//! `cargo xtask deb`: the Debian package a farm admin installs on a gateway (docs/install.md).
//!
//! Contents: `dutgate` and `dutctl` (/usr/bin), the static DUT agents that `dutgate dut-image`
//! puts into the DUT image (/usr/lib/dutgate), the systemd units (/lib/systemd/system), the
//! commented real-farm config (/etc/dutgate/gateway.yml, a conffile), the maintainer scripts
//! of `gateway-image/debian/`, and the docs with the dnsmasq, nftables and iPXE examples and
//! the first job (/usr/share/doc/dutgate). Built with `dpkg-deb --build --root-owner-group`, so no fakeroot.
//!
//! `--profile dev` packages the test suite's debug binaries (no second full build in CI);
//! `--no-build` packages whatever `target/` holds.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

const PACKAGE: &str = "dutgate";
/// The static DUT agents are built for this target (glibc, `+crt-static`), as by
/// `cargo xtask dut-image`, so that both share one build.
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
const AGENTS: [&str; 2] = ["machine-registration", "dutgate-dut"];
const BINARIES: [&str; 2] = ["dutgate", "dutctl"];
const MAINTAINER_SCRIPTS: [&str; 3] = ["postinst", "prerm", "postrm"];
/// Where the maintainer scripts list the units they enable and purge.
const UNITS_PLACEHOLDER: &str = "#UNITS#";
const CONFIG: &str = "etc/dutgate/gateway.yml";

#[derive(Args, Debug)]
pub struct DebArgs {
    /// Cargo profile of `dutgate` and `dutctl`: `release`, or `dev` to package the debug
    /// binaries the test suite builds anyway (the DUT agents are always release builds).
    #[arg(long, default_value = "release")]
    pub profile: String,
    /// Directory the package is written to (relative to the workspace root).
    #[arg(long, default_value = "target/deb")]
    pub out: PathBuf,
    /// Package the binaries already in `target/` instead of running `cargo build`.
    #[arg(long)]
    pub no_build: bool,
}

pub fn run(args: &DebArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let out = root.join(&args.out);
    let started = Instant::now();
    if !args.no_build {
        build(&root, &args.profile)?;
    }
    let deb = package(&root, &args.profile, &out)?;
    let size = fs::metadata(&deb)?.len();
    println!(
        "xtask: built in {:.0?}, {:.1} MiB",
        started.elapsed(),
        size as f64 / (1024.0 * 1024.0)
    );
    println!("{}", deb.display());
    Ok(())
}

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn run_checked(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn build(root: &Path, profile: &str) -> anyhow::Result<()> {
    println!("xtask: cargo build --profile {profile} -p dutgate -p dutctl");
    let mut cmd = cargo(root);
    cmd.args(["build", "--profile", profile]);
    for b in BINARIES {
        cmd.args(["-p", b]);
    }
    run_checked(&mut cmd, "building dutgate and dutctl")?;
    println!("xtask: building the static DUT agents");
    let mut cmd = cargo(root);
    cmd.args(["build", "--release", "--target", AGENT_TARGET])
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    for a in AGENTS {
        cmd.args(["-p", a]);
    }
    run_checked(&mut cmd, "building the static DUT agents")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Cargo names the output directory of the `dev` profile `debug`.
fn profile_dir(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

/// Lays out the package tree under `<out>/root` and builds `<out>/<name>.deb` from it.
fn package(root: &Path, profile: &str, out: &Path) -> anyhow::Result<PathBuf> {
    if std::env::consts::ARCH != "x86_64" {
        bail!("the package is amd64 only (its DUT agents are built for {AGENT_TARGET})");
    }
    let version = env!("CARGO_PKG_VERSION");
    let tree = out.join("root");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    let target = target_dir(root);
    let bins = target.join(profile_dir(profile));
    let agents = target.join(AGENT_TARGET).join("release");
    for b in BINARIES {
        install(&bins.join(b), &tree.join("usr/bin").join(b), 0o755)?;
    }
    for a in AGENTS {
        install(
            &agents.join(a),
            &tree.join("usr/lib/dutgate").join(a),
            0o755,
        )?;
    }
    let units = unit_names(root)?;
    for u in &units {
        install(
            &root.join("gateway-image/systemd").join(u),
            &tree.join("lib/systemd/system").join(u),
            0o644,
        )?;
    }
    install(
        &root.join("gateway-image/gateway.yml"),
        &tree.join(CONFIG),
        0o644,
    )?;
    let doc = tree.join("usr/share/doc").join(PACKAGE);
    for entry in fs::read_dir(root.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            let name = path.file_name().context("a docs file without a name")?;
            install(&path, &doc.join(name), 0o644)?;
        }
    }
    for example in [
        "gateway-image/examples/dnsmasq-dut-network.conf",
        "gateway-image/examples/nftables-dut-network.nft",
        "ipxe/boot.ipxe",
        "examples/hello.yml",
    ] {
        let src = root.join(example);
        let name = src.file_name().context("an example without a name")?;
        install(&src, &doc.join("examples").join(name), 0o644)?;
    }

    let control_dir = tree.join("DEBIAN");
    fs::create_dir_all(&control_dir)?;
    let unit_list = units.join(" ");
    for script in MAINTAINER_SCRIPTS {
        let path = root.join("gateway-image/debian").join(script);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        write(
            &control_dir.join(script),
            &text.replace(UNITS_PLACEHOLDER, &unit_list),
            0o755,
        )?;
    }
    write(
        &control_dir.join("conffiles"),
        &format!("/{CONFIG}\n"),
        0o644,
    )?;
    let binaries: Vec<PathBuf> = BINARIES.iter().map(|b| bins.join(b)).collect();
    write(
        &control_dir.join("control"),
        &control(version, &depends(&binaries)?, finish_tree(&tree)?),
        0o644,
    )?;

    let deb = out.join(format!("{PACKAGE}_{version}_amd64.deb"));
    // xz for what is shipped. The test suite's debug package (190 MB of binaries) only needs
    // to be quick to build and unpack: zstd -1 takes 5 s for both where gzip -1 takes 12 s.
    let compression: &[&str] = if profile_dir(profile) == "debug" {
        &["-Zzstd", "-z1"]
    } else {
        &["-Zxz"]
    };
    run_checked(
        Command::new("dpkg-deb")
            .arg("--root-owner-group")
            .args(compression)
            .arg("--build")
            .arg(&tree)
            .arg(&deb)
            .stdout(std::process::Stdio::null()),
        "dpkg-deb --build (Debian package dpkg)",
    )?;
    Ok(deb)
}

/// The unit files of `gateway-image/systemd`, sorted (the target first: it names the farm).
fn unit_names(root: &Path) -> anyhow::Result<Vec<String>> {
    let dir = root.join("gateway-image/systemd");
    let mut units = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().to_string();
        if name.ends_with(".service") || name.ends_with(".target") {
            units.push(name);
        }
    }
    units.sort_by_key(|u| (!u.ends_with(".target"), u.clone()));
    Ok(units)
}

fn control(version: &str, depends: &str, installed_size: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: dutgate maintainers <dutgate@localhost>\n\
         Installed-Size: {installed_size}\n\
         Depends: {depends}\n\
         Recommends: linux-image-amd64, dnsmasq, ipxe, nftables\n\
         Section: admin\n\
         Priority: optional\n\
         Description: CI farm gateway that time-shares test machines between jobs\n \
         dutgate runs a bare-metal CI farm from one gateway: a job queue and scheduler,\n \
         a machine registry that trains new machines, network boot (iPXE), PDU control,\n \
         serial consoles over TCP, an OCI pull-through cache and S3 storage for jobs.\n \
         One systemd unit per service, all under dutgate.target.\n"
    )
}

/// `libc6 (>= <newest GLIBC_ symbol version the binaries need>)` and the other shared
/// libraries they link, read from the binaries themselves so that a build on a newer
/// system does not claim to run on an older one.
fn depends(binaries: &[PathBuf]) -> anyhow::Result<String> {
    let mut glibc = (2u32, 2u32);
    let mut gcc_s = false;
    for path in binaries {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        gcc_s |= contains(&data, b"libgcc_s.so.1");
        for v in glibc_versions(&data) {
            glibc = glibc.max(v);
        }
    }
    let mut deps = vec![format!("libc6 (>= {}.{})", glibc.0, glibc.1)];
    if gcc_s {
        deps.push("libgcc-s1".into());
    }
    // adduser and runuser (util-linux) for postinst, busybox-static for the DUT image,
    // deb-systemd-helper for the units.
    deps.extend(
        ["adduser", "busybox-static", "init-system-helpers"]
            .iter()
            .map(|s| s.to_string()),
    );
    Ok(deps.join(", "))
}

fn contains(data: &[u8], needle: &[u8]) -> bool {
    data.windows(needle.len()).any(|w| w == needle)
}

/// Every `GLIBC_<major>.<minor>` version string in an ELF file (its version needs).
fn glibc_versions(data: &[u8]) -> Vec<(u32, u32)> {
    const TAG: &[u8] = b"GLIBC_";
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(pos) = data[i..].windows(TAG.len()).position(|w| w == TAG) {
        let start = i + pos + TAG.len();
        let end = data[start..]
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'.'))
            .map_or(data.len(), |n| start + n);
        let text = String::from_utf8_lossy(&data[start..end]);
        let mut parts = text.split('.').map(|p| p.parse::<u32>());
        if let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) {
            found.push((major, minor));
        }
        i = end.max(start);
    }
    found
}

/// Sets every directory of the tree to 0755 (whatever the umask made them) and returns the
/// size of its files in KiB (the control file's `Installed-Size`).
fn finish_tree(tree: &Path) -> anyhow::Result<u64> {
    fn walk(dir: &Path, total: &mut u64) -> std::io::Result<()> {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                walk(&entry.path(), total)?;
            } else {
                *total += meta.len().div_ceil(1024);
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(tree, &mut total)?;
    Ok(total)
}

fn install(src: &Path, dst: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = dst.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(src, dst).with_context(|| {
        format!(
            "copying {} (build it first, or drop --no-build)",
            src.display()
        )
    })?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_glibc_version_wins() {
        let data = b"\0GLIBC_2.2.5\0GLIBC_2.34\0xGLIBC_2.17\0GLIBC_PRIVATE\0GLIBC_";
        let mut v = glibc_versions(data);
        v.sort();
        assert_eq!(v, vec![(2, 2), (2, 17), (2, 34)]);
    }

    #[test]
    fn the_dev_profile_lives_in_debug() {
        assert_eq!(profile_dir("dev"), "debug");
        assert_eq!(profile_dir("release"), "release");
    }
}
