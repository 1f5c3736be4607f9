//! `dutgate dut-image`: assembles the DUT environment from Debian packages: the kernel of
//! `linux-image-amd64`, its virtio network modules, `busybox-static`, the static
//! `machine-registration` and `dutgate-dut` agents, and the init in `gateway-image/dut/`.
//! The result (`vmlinuz`, `initramfs.cpio`, `image.json`) is what the virtual farm boots by
//! default. `cargo xtask dut-image` builds the agents and calls this.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use dutgate_boot::testing::initramfs::Initramfs;

const INIT: &str = include_str!("../../../gateway-image/dut/init");
const CMDLINE_AWK: &str = include_str!("../../../gateway-image/dut/cmdline.awk");
const UDHCPC_SCRIPT: &str = include_str!("../../../gateway-image/dut/udhcpc.script");
/// Kernel modules the DUT needs for its network (the Debian kernel builds them as modules).
const WANTED_MODULES: [&str; 2] = ["virtio_pci", "virtio_net"];

#[derive(Args, Debug)]
pub struct DutImageArgs {
    /// Where to write the image (default: `<state dir>/dut-image`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Kernel image (default: the newest /boot/vmlinuz-*).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Static busybox (Debian package busybox-static).
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// The static machine-registration agent.
    #[arg(long)]
    registration_agent: PathBuf,
    /// The static dutgate-dut agent (job bucket sync).
    #[arg(long)]
    dut_agent: PathBuf,
}

#[derive(Debug, serde::Serialize)]
struct ImageInfo {
    kernel: PathBuf,
    initramfs: PathBuf,
    kernel_release: String,
    modules: Vec<String>,
}

pub fn run(args: &DutImageArgs, state_dir: &Path) -> anyhow::Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| state_dir.join("dut-image"));
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None => newest_kernel()?,
    };
    let release = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .map(str::to_string)
        .with_context(|| {
            format!(
                "{}: expected a /boot/vmlinuz-<release> file",
                kernel.display()
            )
        })?;
    let modules_dir = PathBuf::from("/lib/modules").join(&release);
    let busybox = std::fs::read(&args.busybox).with_context(|| {
        format!(
            "{}: not found; install the Debian package busybox-static",
            args.busybox.display()
        )
    })?;
    let mut fs = Initramfs::new();
    for d in [
        "sbin",
        "usr",
        "usr/bin",
        "run",
        "results",
        "etc/dutgate",
        "lib",
        "lib/modules",
    ] {
        fs.dir(d);
    }
    fs.file("bin/busybox", 0o755, busybox);
    fs.symlink("bin/sh", "busybox");
    fs.file(
        "bin/machine-registration",
        0o755,
        read_agent(&args.registration_agent)?,
    );
    fs.file("bin/dutgate-dut", 0o755, read_agent(&args.dut_agent)?);
    fs.file(
        "etc/dutgate/cmdline.awk",
        0o644,
        CMDLINE_AWK.as_bytes().to_vec(),
    );
    fs.file(
        "etc/dutgate/udhcpc.script",
        0o755,
        UDHCPC_SCRIPT.as_bytes().to_vec(),
    );
    fs.file("etc/hosts", 0o644, b"127.0.0.1 localhost\n".to_vec());
    fs.init(INIT);

    let order = module_load_order(&modules_dir, &WANTED_MODULES)?;
    let mut names = Vec::new();
    for rel in &order {
        let name = Path::new(rel)
            .file_name()
            .and_then(|n| n.to_str())
            .context("module path without a file name")?
            .to_string();
        let data = std::fs::read(modules_dir.join(rel))
            .with_context(|| format!("reading module {rel} (package linux-image-amd64)"))?;
        fs.file(&format!("lib/modules/{name}"), 0o644, data);
        names.push(name);
    }
    let mut order_file = names.join("\n");
    order_file.push('\n');
    fs.file("etc/dutgate/modules.order", 0o644, order_file.into_bytes());

    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let kernel_out = out.join("vmlinuz");
    let initramfs_out = out.join("initramfs.cpio");
    // Write next to the target and rename, so a running farm never boots half a file.
    let tmp = out.join(".vmlinuz.tmp");
    std::fs::copy(&kernel, &tmp)
        .with_context(|| format!("copying {} (package linux-image-amd64)", kernel.display()))?;
    std::fs::rename(&tmp, &kernel_out)?;
    let tmp = out.join(".initramfs.tmp");
    fs.write(&tmp)?;
    std::fs::rename(&tmp, &initramfs_out)?;
    let info = ImageInfo {
        kernel: kernel_out,
        initramfs: initramfs_out,
        kernel_release: release,
        modules: names,
    };
    std::fs::write(out.join("image.json"), serde_json::to_vec_pretty(&info)?)?;
    println!(
        "dutgate: DUT image in {} (kernel {}, initramfs {} KiB)",
        out.display(),
        info.kernel_release,
        std::fs::metadata(&info.initramfs)?.len() / 1024
    );
    Ok(())
}

fn read_agent(path: &Path) -> anyhow::Result<Vec<u8>> {
    let data = std::fs::read(path).with_context(|| format!("reading agent {}", path.display()))?;
    // A dynamically linked agent would fail inside the initramfs with a confusing "not found".
    if data
        .windows(b"/lib64/ld-linux".len())
        .any(|w| w == b"/lib64/ld-linux")
    {
        bail!(
            "{} is dynamically linked; build it with RUSTFLAGS=\"-C target-feature=+crt-static\" (cargo xtask dut-image does)",
            path.display()
        );
    }
    Ok(data)
}

fn newest_kernel() -> anyhow::Result<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .context("reading /boot")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    kernels
        .pop()
        .context("no /boot/vmlinuz-*: install the Debian package linux-image-amd64")
}

/// Modules to insmod, dependencies first, from `modules.dep` (`path: dep dep …`).
fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dep_file = modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&dep_file)
        .with_context(|| format!("reading {} (package linux-image-amd64)", dep_file.display()))?;
    let mut deps: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_name: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let name = module_name(path);
        by_name.insert(name, path.to_string());
        deps.insert(
            path.to_string(),
            rest.split_whitespace().map(String::from).collect(),
        );
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for w in wanted {
        let path = by_name
            .get(*w)
            .with_context(|| format!("module {w} not in {}", dep_file.display()))?;
        visit(path, &deps, &mut seen, &mut order);
    }
    Ok(order)
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let base = file.split(".ko").next().unwrap_or(file);
    base.replace('-', "_")
}

fn visit(
    path: &str,
    deps: &HashMap<String, Vec<String>>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !seen.insert(path.to_string()) {
        return;
    }
    // modules.dep lists every dependency, direct or not, so loading them in reverse (deepest
    // last in the list first) plus the recursion gives a valid order.
    if let Some(ds) = deps.get(path) {
        for d in ds.iter().rev() {
            visit(d, deps, seen, order);
        }
    }
    order.push(path.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/a/net.ko: kernel/a/fo.ko kernel/v/virtio.ko\nkernel/a/fo.ko:\nkernel/v/virtio.ko:\nkernel/v/virtio_pci.ko: kernel/v/virtio.ko\n",
        )
        .unwrap();
        let order = module_load_order(dir.path(), &["virtio_pci", "net"]).unwrap();
        assert_eq!(
            order,
            vec![
                "kernel/v/virtio.ko",
                "kernel/v/virtio_pci.ko",
                "kernel/a/fo.ko",
                "kernel/a/net.ko"
            ]
        );
        assert!(module_load_order(dir.path(), &["nope"]).is_err());
    }
}
