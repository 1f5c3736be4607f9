//! `dutgate dut-image`: assembles the DUT environment from Debian packages: the kernel of
//! `linux-image-amd64`, its network modules (virtio for the virtual farm, the common wired
//! PCI and USB NICs of real DUTs, with the firmware they name when it is installed),
//! `busybox-static`, the static `machine-registration` and `dutgate-dut` agents, and the init
//! in `gateway-image/dut/`. The result (`vmlinuz`, `initramfs.cpio`, `image.json`) is what the
//! boot service serves at `/dut-image/…` for registration, training and jobs.
//! `cargo xtask dut-image` builds the agents and calls this; the Debian package installs them
//! in `/usr/lib/dutgate`, where this command finds them by default.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use dutgate_boot::testing::initramfs::Initramfs;

const INIT: &str = include_str!("../../../gateway-image/dut/init");
const CMDLINE_AWK: &str = include_str!("../../../gateway-image/dut/cmdline.awk");
const UDHCPC_SCRIPT: &str = include_str!("../../../gateway-image/dut/udhcpc.script");
/// Kernel modules the DUT needs for its network, which Debian's `linux-image-amd64` builds
/// as modules (its serial drivers, 8250 and 8250_pci, and `af_packet` for DHCP are built
/// in). Their dependencies (`libphy`, `usbcore`, `usbnet`, …) come from `modules.dep`.
const WANTED_MODULES: [&str; 17] = [
    // QEMU (the virtual farm).
    "virtio_pci",
    "virtio_net",
    // Intel: 82540 (QEMU's default too), PCIe desktops and laptops, servers, 2.5G.
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    // Realtek, Broadcom and Aquantia onboard NICs.
    "r8169",
    "tg3",
    "bnx2",
    "atlantic",
    // USB host controllers, then USB NICs (Realtek, ASIX, CDC Ethernet docks and dongles).
    "xhci_pci",
    "ehci_pci",
    "r8152",
    "ax88179_178a",
    "cdc_ether",
    "usbnet",
];
/// Where the Debian package installs the static agents (xtask/src/deb.rs).
const PACKAGED_AGENTS: &str = "/usr/lib/dutgate";
/// Where the kernel looks for firmware (it loads it from the initramfs itself).
const FIRMWARE_DIR: &str = "/lib/firmware";

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
    /// The static machine-registration agent (default: the packaged
    /// /usr/lib/dutgate/machine-registration, when installed).
    #[arg(long)]
    registration_agent: Option<PathBuf>,
    /// The static dutgate-dut agent, job bucket sync (default: the packaged
    /// /usr/lib/dutgate/dutgate-dut, when installed).
    #[arg(long)]
    dut_agent: Option<PathBuf>,
}

/// `--<flag>` if given, else the packaged agent when it exists.
fn agent_path(given: Option<&Path>, name: &str, flag: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let packaged = Path::new(PACKAGED_AGENTS).join(name);
    if packaged.is_file() {
        return Ok(packaged);
    }
    bail!(
        "--{flag} not given and {} is not installed: install the dutgate Debian package, or \
         build the static agent with `cargo xtask dut-image`",
        packaged.display()
    )
}

#[derive(Debug, serde::Serialize)]
struct ImageInfo {
    kernel: PathBuf,
    initramfs: PathBuf,
    kernel_release: String,
    modules: Vec<String>,
    /// Firmware files the modules name that were installed and put in the image.
    firmware: Vec<String>,
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
    let registration_agent = agent_path(
        args.registration_agent.as_deref(),
        "machine-registration",
        "registration-agent",
    )?;
    let dut_agent = agent_path(args.dut_agent.as_deref(), "dutgate-dut", "dut-agent")?;
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
        read_agent(&registration_agent)?,
    );
    fs.file("bin/dutgate-dut", 0o755, read_agent(&dut_agent)?);
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
    let mut firmware = BTreeSet::new();
    for rel in &order {
        let name = Path::new(rel)
            .file_name()
            .and_then(|n| n.to_str())
            .context("module path without a file name")?
            .to_string();
        if !name.ends_with(".ko") {
            // busybox insmod hands the file to the kernel as it is.
            bail!(
                "{rel}: compressed kernel modules are not supported (busybox insmod loads them \
                 as they are); use a kernel whose modules are plain .ko files"
            );
        }
        let data = std::fs::read(modules_dir.join(rel))
            .with_context(|| format!("reading module {rel} (package linux-image-amd64)"))?;
        firmware.extend(module_firmware(&data));
        fs.file(&format!("lib/modules/{name}"), 0o644, data);
        names.push(name);
    }
    let firmware = add_firmware(&mut fs, Path::new(FIRMWARE_DIR), &firmware)?;
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
        firmware,
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

/// The firmware files a module names (`firmware=` entries of its `.modinfo` section: NUL
/// separated strings, found by scanning the file).
fn module_firmware(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"firmware=";
    module
        .split(|b| *b == 0)
        .filter_map(|s| s.strip_prefix(KEY))
        .filter_map(|s| std::str::from_utf8(s).ok())
        // A relative path below /lib/firmware; anything else is not a firmware name.
        .filter(|s| {
            !s.is_empty() && !s.starts_with('/') && !s.split('/').any(|c| c == ".." || c.is_empty())
        })
        .map(str::to_string)
        .collect()
}

/// Puts the installed ones of `wanted` (relative to `dir`) into `lib/firmware/`; firmware
/// packages (firmware-realtek, firmware-bnx2, …) are optional, and a NIC whose firmware is
/// missing says so on the DUT's console. Returns what was added.
fn add_firmware(
    fs: &mut Initramfs,
    dir: &Path,
    wanted: &BTreeSet<String>,
) -> anyhow::Result<Vec<String>> {
    let mut added = Vec::new();
    // Each directory once, before its first file: the archive is unpacked in order, and
    // adding an entry again would move it behind files already inside it.
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    for name in wanted {
        let path = dir.join(name);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if dirs.insert(String::new()) {
            fs.dir("lib/firmware");
        }
        let components: Vec<&str> = name.split('/').collect();
        for depth in 1..components.len() {
            let d = components[..depth].join("/");
            if dirs.insert(d.clone()) {
                fs.dir(&format!("lib/firmware/{d}"));
            }
        }
        fs.file(&format!("lib/firmware/{name}"), 0o644, data);
        added.push(name.clone());
    }
    Ok(added)
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

    /// Every wanted module, and each of its dependencies, resolves against the kernel
    /// installed here (package linux-image-amd64), dependencies before their users.
    #[test]
    fn wanted_modules_resolve_against_the_installed_kernel() {
        let kernel = newest_kernel().expect("install the Debian package linux-image-amd64");
        let release = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .unwrap()
            .to_string();
        let dir = PathBuf::from("/lib/modules").join(&release);
        let order = module_load_order(&dir, &WANTED_MODULES).unwrap();
        let dep_text = std::fs::read_to_string(dir.join("modules.dep")).unwrap();
        let deps: HashMap<&str, Vec<&str>> = dep_text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(p, rest)| (p, rest.split_whitespace().collect()))
            .collect();
        let position = |p: &str| order.iter().position(|o| o == p);
        for w in WANTED_MODULES {
            let path = order
                .iter()
                .find(|p| module_name(p) == w)
                .unwrap_or_else(|| panic!("{w} missing from {order:?}"));
            assert!(dir.join(path).is_file(), "{path}");
        }
        for p in &order {
            for d in &deps[p.as_str()] {
                assert!(
                    position(d) < position(p) && position(d).is_some(),
                    "{d} must load before {p}"
                );
            }
        }
        // No module twice, and the ones the DUT network needs besides the NIC drivers.
        let names: BTreeSet<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(names.len(), order.len());
        for needed in ["libphy", "usbcore", "mii"] {
            assert!(names.contains(needed), "{needed} not pulled in: {names:?}");
        }
        // What Debian builds in is not asked for as a module.
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap();
        for w in WANTED_MODULES {
            assert!(
                !builtin.lines().any(|l| module_name(l) == w),
                "{w} is built in"
            );
        }
    }

    #[test]
    fn firmware_names_come_from_modinfo_and_stay_below_the_firmware_dir() {
        let module = b"\x7fELF junk\0license=GPL\0firmware=rtl_nic/rtl8168h-2.fw\0firmware=../etc/shadow\0firmware=/abs\0firmware=a//b\0firmware=bnx2/bnx2-mips-09-6.2.1b.fw\0";
        assert_eq!(
            module_firmware(module),
            vec!["rtl_nic/rtl8168h-2.fw", "bnx2/bnx2-mips-09-6.2.1b.fw"]
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("rtl_nic")).unwrap();
        std::fs::write(dir.path().join("rtl_nic/a.fw"), b"A").unwrap();
        std::fs::write(dir.path().join("rtl_nic/b.fw"), b"B").unwrap();
        let wanted: BTreeSet<String> = ["rtl_nic/a.fw", "rtl_nic/b.fw", "absent/c.fw"]
            .map(String::from)
            .into();
        let mut fs = Initramfs::new();
        let added = add_firmware(&mut fs, dir.path(), &wanted).unwrap();
        assert_eq!(added, ["rtl_nic/a.fw", "rtl_nic/b.fw"]);
        let out = dir.path().join("out.cpio");
        fs.write(&out).unwrap();
        let names = cpio_names(&std::fs::read(&out).unwrap());
        let at = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(at("lib/firmware") < at("lib/firmware/rtl_nic"));
        assert!(at("lib/firmware/rtl_nic") < at("lib/firmware/rtl_nic/a.fw"));
        assert!(at("lib/firmware/rtl_nic/a.fw") < at("lib/firmware/rtl_nic/b.fw"));
    }

    /// Entry names of a newc archive, in order.
    fn cpio_names(data: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let mut at = 0;
        let field = |at: usize, i: usize| {
            let s = std::str::from_utf8(&data[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
            usize::from_str_radix(s, 16).unwrap()
        };
        let align = |n: usize| n.div_ceil(4) * 4;
        while at + 110 <= data.len() {
            let size = field(at, 6);
            let namesize = field(at, 11);
            let name =
                String::from_utf8_lossy(&data[at + 110..at + 110 + namesize - 1]).to_string();
            if name == "TRAILER!!!" {
                break;
            }
            names.push(name);
            at = align(at + 110 + namesize);
            at = align(at + size);
        }
        names
    }
}
