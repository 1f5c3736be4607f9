//! Acceptance 1 and 4: a real iPXE (QEMU + ipxe-qemu, TCG, user-mode networking whose
//! bootfile points at the boot service) boots a kernel and initramfs through the artifact
//! cache, for the default config and for a per-MAC config, and the command line reaches the
//! kernel's /proc/cmdline byte for byte.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dutgate_boot::testing::initramfs::{DEBIAN_BUSYBOX, Initramfs, report_init};
use dutgate_boot::testing::{TestBoot, gateway};
use dutgate_boot::{Artifact, BootConfig, Config, Kernel};
use dutgate_core::MachineId;
use dutgate_core::testing::require_program;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Under TCG one boot takes ~12 s on an idle machine; leave room for a loaded CI runner.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn kernel_path() -> PathBuf {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    kernels.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
    });
    kernels.sort();
    kernels.pop().unwrap_or_else(|| {
        panic!("no /boot/vmlinuz-*: this test needs the Debian package `linux-image-amd64`")
    })
}

fn require_peers() -> PathBuf {
    let qemu = require_program("qemu-system-x86_64", "qemu-system-x86");
    assert!(
        Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists(),
        "this test needs iPXE ROMs for QEMU (Debian package `ipxe-qemu`)"
    );
    require_program("busybox", "busybox-static");
    qemu
}

fn initrd(dir: &Path, marker: &str) -> PathBuf {
    let mut fs = Initramfs::with_busybox(Path::new(DEBIAN_BUSYBOX))
        .unwrap_or_else(|e| panic!("{DEBIAN_BUSYBOX}: {e} (Debian package `busybox-static`)"));
    fs.init(&report_init(marker));
    let path = dir.join(format!("{marker}.cpio"));
    fs.write(&path).unwrap();
    path
}

struct Boot {
    console: String,
    cmdline_hex: Option<String>,
}

/// The DHCP bootfile URL QEMU's user-mode network hands out for the boot service on `port`.
fn direct_bootfile(port: u16) -> String {
    format!(
        "http://10.0.2.2:{port}/boot/${{mac}}/boot.ipxe?platform=${{platform}}&buildarch=${{buildarch}}"
    )
}

/// Network-boots a QEMU VM with `mac` whose firmware is given `bootfile`; returns its console.
async fn boot(qemu: &Path, bootfile: &str, mac: &str) -> Boot {
    let mut child = tokio::process::Command::new(qemu)
        .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-nodefaults"])
        .args(["-display", "none", "-no-reboot", "-boot", "order=n"])
        .arg("-netdev")
        .arg(format!("user,id=n0,bootfile={bootfile}"))
        .arg("-device")
        .arg(format!("virtio-net-pci,netdev=n0,mac={mac}"))
        .args(["-serial", "stdio", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start qemu");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut console = String::new();
    let mut cmdline_hex = None;
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            let line = line.trim_end_matches('\r').to_string();
            if let Some(hex) = line.strip_prefix("CMDLINE_HEX=") {
                cmdline_hex = Some(hex.to_string());
            }
            console.push_str(&line);
            console.push('\n');
            if line == "DUT_DONE" {
                break;
            }
        }
    };
    let finished = tokio::time::timeout(BOOT_TIMEOUT, read).await.is_ok();
    let _ = child.kill().await;
    assert!(
        finished,
        "VM did not finish within {BOOT_TIMEOUT:?}; console:\n{console}"
    );
    Boot {
        console,
        cmdline_hex,
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_script_and_default_config_boot_through_the_cache() {
    let qemu = require_peers();
    let dir = tempfile::tempdir().unwrap();
    let initrd = initrd(dir.path(), "DUT_BOOTED_DEFAULT");
    let kernel = kernel_path();
    let cmdline = "console=ttyS0 quiet panic=-1 dutgate.config=default";
    let config = Config {
        default: Some(BootConfig {
            kernel: Kernel {
                url: format!("file://{}", kernel.display()),
                cmdline: cmdline.into(),
                sha256: None,
            },
            initramfs: vec![Artifact {
                url: format!("file://{}", initrd.display()),
                sha256: None,
            }],
            job_id: None,
        }),
        file_roots: vec!["/boot".into(), dir.path().to_path_buf()],
        ..Config::default()
    };
    let svc = TestBoot::start(gateway(&dir.path().join("state")), config).await;
    // This boot goes through the chain script of ipxe/ (what a DUT's embedded iPXE runs),
    // with the boot service's port in place of 8003.
    let chain =
        include_str!("../../../ipxe/boot.ipxe").replace(":8003", &format!(":{}", svc.addr.port()));
    assert_ne!(chain, include_str!("../../../ipxe/boot.ipxe"));
    let scripts = common::Upstream::start(vec![("/chain.ipxe".into(), chain.into())]).await;
    let bootfile = format!("http://10.0.2.2:{}/chain.ipxe", scripts.addr.port());
    let out = boot(&qemu, &bootfile, "52:54:00:12:34:56").await;
    assert_eq!(scripts.gets("/chain.ipxe"), 1);
    assert!(
        out.console.contains("DUT_BOOTED_DEFAULT"),
        "marker missing:\n{}",
        out.console
    );
    assert_eq!(
        out.cmdline_hex.as_deref(),
        Some(hex_of(format!("{cmdline}\n").as_bytes()).as_str()),
        "console:\n{}",
        out.console
    );
    // Served in place: nothing was copied into the cache.
    assert_eq!(svc.cache.stats().blobs, 0);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_mac_config_with_special_cmdline_arrives_byte_for_byte() {
    let qemu = require_peers();
    let dir = tempfile::tempdir().unwrap();
    let initrd = initrd(dir.path(), "DUT_BOOTED_JOB");
    let kernel = std::fs::read(kernel_path()).unwrap();
    let initrd_bytes = std::fs::read(&initrd).unwrap();
    let upstream = common::Upstream::start(vec![
        ("/k/vmlinuz".into(), kernel.into()),
        ("/i/initrd.cpio".into(), initrd_bytes.clone().into()),
    ])
    .await;
    // QEMU user networking shows the DUT as 127.0.0.1, which no machine record can hold:
    // the virtual farm's exemption, as `dutgate up --virtual-duts` sets it.
    let config = Config {
        unverified_peer_networks: vec!["127.0.0.0/8".parse().unwrap()],
        ..Config::default()
    };
    let svc = TestBoot::start(upstream.allowed(gateway(&dir.path().join("state"))), config).await;
    // `;`, both quotes, `$` forms iPXE can carry, the lone separators, a leading `#`, a
    // trailing backslash, runs of whitespace and non-ASCII.
    let cmdline = "console=ttyS0 quiet panic=-1 dg.semi=a;b ; dg.dq=\"x y\" dg.sq='it''s' \
                   dg.var=$HOME dg.open=${ dg.close=} dg.mix=}${ dg.utf8=h\u{e9}llo\u{2192}\u{540d}\u{524d} \
                   #notacomment dg.bs=a\\b || &&  two  spaces\ttab end\\";
    let mac = MachineId::parse("52:54:00:ab:cd:ef").unwrap();
    let sha = common::sha256_hex(&initrd_bytes);
    common::writer(&svc)
        .put(
            mac,
            &BootConfig {
                kernel: Kernel {
                    url: format!("{}/k/vmlinuz", upstream.url()),
                    cmdline: cmdline.into(),
                    sha256: None,
                },
                initramfs: vec![Artifact {
                    url: format!("{}/i/initrd.cpio", upstream.url()),
                    sha256: Some(sha),
                }],
                job_id: Some("job-4".into()),
            },
        )
        .await
        .unwrap();
    let out = boot(&qemu, &direct_bootfile(svc.addr.port()), &mac.to_string()).await;
    assert!(
        out.console.contains("DUT_BOOTED_JOB"),
        "marker missing:\n{}",
        out.console
    );
    assert_eq!(
        out.cmdline_hex.as_deref(),
        Some(hex_of(format!("{cmdline}\n").as_bytes()).as_str()),
        "console:\n{}",
        out.console
    );
    assert_eq!(upstream.gets("/k/vmlinuz"), 1);
    assert_eq!(upstream.gets("/i/initrd.cpio"), 1);
    let stats = svc.cache.stats();
    assert_eq!(stats.blobs, 2, "{stats:?}");
    svc.stop().await;
}
