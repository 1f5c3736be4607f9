//! `dutgate up --virtual-duts N`: a farm of QEMU DUTs on top of whatever config is loaded.
//!
//! The overlay is handed to every child as `DUTGATE_<SECTION>__<KEY>` environment overrides
//! (the same mechanism an operator uses), so the children load exactly the operator's config
//! plus these keys, and no second config file with copied secrets is written:
//! - `gateway.public_host` = 10.0.2.2: QEMU user networking shows the host there;
//! - `pdu.pdus.virtual`: the `virtual` driver with N ports, netbooting from this boot service
//!   and sending the console to salad's netconsole port;
//! - `boot.dut_image_dir` + `boot.default`: the DUT image (`dutgate dut-image`) with
//!   `dutgate.action=register`, at the boot service's stable URLs
//!   (`http://<guest host>:<boot port>/dut-image/…`, served from the directory in place);
//! - `executor.template_vars.dut_kernel_url`/`dut_initramfs_url`: the same URLs for jobs and
//!   the trainer's templates (`gateway-image/jobs/*.j2`), exactly as on a real farm;
//! - short off delay and short training.
//!
//! After the services are up, every port without a machine is discovered in turn (mars
//! binds the machine that registers while its port is powered), so machines register, train
//! and become `IDLE` with nobody touching them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use dutgate_core::ServiceName;
use serde_json::json;

use crate::config::FileConfig;

/// Name of the virtual PDU in the overlay.
pub const PDU_NAME: &str = "virtual";
/// The host as QEMU user networking shows it to the guest.
pub const GUEST_HOST: &str = "10.0.2.2";

#[derive(Args, Debug, Clone)]
pub struct VirtualFarmArgs {
    /// Add a virtual PDU whose N ports are QEMU DUTs, and train them (0: no virtual farm).
    #[arg(long, default_value_t = 0)]
    pub virtual_duts: u8,
    /// DUT image directory (`vmlinuz`, `initramfs.cpio`). Default: `<state dir>/dut-image`.
    #[arg(long)]
    pub dut_image: Option<PathBuf>,
    /// Check boots per training run of a virtual DUT.
    #[arg(long, default_value_t = 2)]
    pub training_loops: u32,
    /// Passing check boots a virtual DUT needs to become IDLE.
    #[arg(long, default_value_t = 2)]
    pub training_qualifying: u32,
    /// Off delay of the virtual DUTs' power cycles (seconds).
    #[arg(long, default_value_t = 2.0)]
    pub off_delay: f64,
    /// Memory of each VM (MiB).
    #[arg(long, default_value_t = 512)]
    pub dut_memory_mb: u32,
    /// Do not discover the ports: machines appear only when something powers them.
    #[arg(long)]
    pub no_discover: bool,
    /// Put the DUTs' NICs on this Linux bridge instead of QEMU user networking, with their
    /// consoles on ptys that salad opens as serial adapters: every DUT then has an address of
    /// its own, as on a real farm. The bridge, its address (`gateway.public_host`) and a DHCP
    /// server handing out `http://<public_host>:<boot port>/boot/${mac}/boot.ipxe` to iPXE
    /// are the operator's (docs/quickstart.md, "Bridged virtual farm").
    #[arg(long, value_name = "BRIDGE")]
    pub dut_bridge: Option<String>,
}

impl VirtualFarmArgs {
    pub fn enabled(&self) -> bool {
        self.virtual_duts > 0
    }

    pub fn image_dir(&self, state_dir: &Path) -> PathBuf {
        self.dut_image
            .clone()
            .unwrap_or_else(|| state_dir.join("dut-image"))
    }
}

/// The DUT image's files the DUTs boot.
const IMAGE_FILES: [&str; 2] = dutgate_boot::dut_image::FILES;

/// Checks that the DUT image exists and returns its (absolute) directory.
pub fn image_dir(args: &VirtualFarmArgs, config: &FileConfig) -> anyhow::Result<PathBuf> {
    let image = absolute(&args.image_dir(&config.gateway.state_dir));
    for name in IMAGE_FILES {
        let f = image.join(name);
        if !f.is_file() {
            bail!(
                "{} is missing: build the DUT environment first with `cargo xtask dut-image` \
                 (or `dutgate dut-image --out {}`)",
                f.display(),
                image.display()
            );
        }
    }
    Ok(image)
}

/// The environment overrides that turn `config` into a virtual farm.
pub fn overrides(
    args: &VirtualFarmArgs,
    config: &FileConfig,
) -> anyhow::Result<Vec<(String, String)>> {
    let gw = &config.gateway;
    if args.training_qualifying > args.training_loops {
        bail!(
            "--training-qualifying {} is more than --training-loops {}",
            args.training_qualifying,
            args.training_loops
        );
    }
    if args.dut_bridge.is_none() && config.salad.netconsole_port == 0 {
        bail!("the virtual farm needs salad's netconsole listener (salad.netconsole_port is 0)");
    }
    // Bridged, the DUTs reach the gateway at its address on the bridge; with QEMU user
    // networking at the address QEMU shows the host as.
    let guest_host = match &args.dut_bridge {
        None => GUEST_HOST.to_string(),
        Some(bridge) => {
            let loopback = gw
                .public_host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
            if loopback || gw.public_host == "localhost" {
                bail!(
                    "--dut-bridge {bridge} needs gateway.public_host set to the gateway's \
                     address on the bridge (it is {})",
                    gw.public_host
                );
            }
            gw.public_host.clone()
        }
    };
    let run_dir = gw.state_dir.join("virtual-pdu");
    let image = image_dir(args, config)?;
    // The URLs the DUTs use, as the boot service derives them with the overlay applied.
    let guest_gateway = dutgate_core::config::GatewayConfig {
        public_host: guest_host.clone(),
        ..gw.clone()
    };
    let image_url = |file: &str| dutgate_boot::dut_image::url(&config.boot, &guest_gateway, file);
    let kernel_url = image_url("vmlinuz");
    let initramfs_url = image_url("initramfs.cpio");
    let mars_url = format!("http://{guest_host}:{}", gw.ports.mars);
    let mut pdu_config = json!({
        "pdu_id": 1,
        "ports": args.virtual_duts,
        "boot_port": gw.ports.boot,
        "netconsole": format!("127.0.0.1:{}", config.salad.netconsole_port),
        "memory_mb": args.dut_memory_mb,
        "run_dir": run_dir,
    });
    if let Some(bridge) = &args.dut_bridge {
        pdu_config["bridge"] = json!(bridge);
        pdu_config["pty_console"] = json!(true);
        pdu_config["netconsole"] = serde_json::Value::Null;
    }
    let pdu = json!({ "driver": "virtual", "config": pdu_config });
    let boot_default = json!({
        "kernel": {
            "url": kernel_url,
            "cmdline": format!("dutgate.action=register dutgate.mars_url={mars_url} loglevel=6"),
        },
        "initramfs": [{ "url": initramfs_url }],
    });
    let template_vars = json!({
        "dut_kernel_url": kernel_url,
        "dut_initramfs_url": initramfs_url,
        // The trainer's templates default to mars on 8001.
        "mars_port": gw.ports.mars.to_string(),
    });
    let v = |value: serde_json::Value| value.to_string();
    let mut overrides = Vec::new();
    if args.dut_bridge.is_some() {
        // The VMs' console ptys, linked while each VM runs (see the `virtual` driver).
        let ttys = run_dir.join("tty-*");
        overrides.push(env(
            "SALAD__SERIAL_PORTS",
            v(json!([{ "path": ttys.to_string_lossy() }])),
        ));
    }
    // Passed on explicitly so that the children, which load the same config file without
    // `--virtual-duts`, see the DUT networks as set (the file may omit them).
    overrides.push(env(
        "GATEWAY__AUTH__DUT_NETWORKS",
        v(json!(gw.auth.dut_networks)),
    ));
    if args.dut_bridge.is_none() {
        // QEMU user networking shows every virtual DUT as 127.0.0.1: no address tells them
        // apart, so the boot service serves job scripts to loopback peers unchecked.
        let mut unverified = config.boot.unverified_peer_networks.clone();
        let loopback = "127.0.0.0/8".parse().context("loopback network")?;
        if !unverified.contains(&loopback) {
            unverified.push(loopback);
        }
        overrides.push(env("BOOT__UNVERIFIED_PEER_NETWORKS", v(json!(unverified))));
        // For the same reason a job's bucket keys cannot be bound to its machine's address
        // (10.0.2.15 inside every VM, 127.0.0.1 as the gateway sees it).
        overrides.push(env(
            "EXECUTOR__JOB_KEYS_FROM_MACHINE_ADDRESS",
            "false".to_string(),
        ));
    }
    overrides.extend([
        env("GATEWAY__PUBLIC_HOST", guest_host),
        env("PDU__PDUS__VIRTUAL", v(pdu)),
        env("BOOT__DUT_IMAGE_DIR", v(json!(image))),
        env("BOOT__DEFAULT", v(boot_default)),
        env("EXECUTOR__TEMPLATE_VARS", v(template_vars)),
        env("MARS__PDU_OFF_DELAY", args.off_delay.to_string()),
        env(
            "MARS__TRAINING__BOOT_LOOPS",
            args.training_loops.to_string(),
        ),
        env(
            "MARS__TRAINING__QUALIFYING",
            args.training_qualifying.to_string(),
        ),
        // A failed virtual training is retried soon: nothing about a VM gets better by waiting.
        env("MARS__TRAINING__RETRY_DELAY_SECONDS", "10".to_string()),
        // The first run of a just-registered machine can race the executor learning of it;
        // that must not count towards quarantine as 1 of 3.
        env(
            "MARS__TRAINING__QUARANTINE_AFTER_FAILED_TRAININGS",
            "5".to_string(),
        ),
    ]);
    Ok(overrides)
}

fn env(key: &str, value: String) -> (String, String) {
    (format!("{}{key}", dutgate_core::config::ENV_PREFIX), value)
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// Discovers every port of the virtual PDU that has no machine yet, one after the other
/// (mars runs one discovery at a time). Progress goes to stdout.
pub async fn discover_all(args: VirtualFarmArgs, config: FileConfig) {
    let gw = &config.gateway;
    // Starting a discovery is administration (it binds a PDU port to whatever registers
    // next): the admin token, not the service credential the gateway's actors use.
    let admin = config
        .gateway
        .auth
        .admin_token
        .clone()
        .or_else(|| dutgate_core::auth::read_token(&gw.tokens_dir().join("admin")));
    let Some(admin) = admin else {
        eprintln!("dutgate: virtual farm: no admin token; ports are not discovered");
        return;
    };
    let mars = gw.internal_url(ServiceName::Mars);
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dutgate: virtual farm: {e}");
            return;
        }
    };
    // The discovery timeout covers a power-on, an iPXE netboot and the registration under
    // TCG (~15 s measured) with a wide margin for a loaded machine.
    let timeout = 300.0;
    for port in 1..=u32::from(args.virtual_duts) {
        let port_id = port.to_string();
        match port_has_machine(&http, &mars, admin.expose(), &port_id).await {
            Ok(true) => {
                println!("dutgate: virtual farm: port {port_id} already has a machine");
                continue;
            }
            Ok(false) => {}
            Err(e) => {
                eprintln!("dutgate: virtual farm: cannot list machines: {e:#}");
                return;
            }
        }
        let started = Instant::now();
        let r = http
            .post(format!("{mars}/api/v1/machine/discover"))
            .bearer_auth(admin.expose())
            .json(&json!({"pdu": PDU_NAME, "port_id": port_id, "timeout": timeout}))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                println!("dutgate: virtual farm: discovering port {port_id} (powering it on)");
            }
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                eprintln!(
                    "dutgate: virtual farm: discovery of port {port_id} refused: {status} {body}"
                );
                continue;
            }
            Err(e) => {
                eprintln!("dutgate: virtual farm: discovery of port {port_id}: {e}");
                continue;
            }
        }
        // Wait until the discovery is consumed (a machine registered) or expired.
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let active = http
                .get(format!("{mars}/api/v1/machine/discover"))
                .bearer_auth(admin.expose())
                .send()
                .await;
            let active = match active {
                Ok(r) => r.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            };
            match active {
                Some(v) if v.get("discovery").is_some_and(|d| d.is_null()) => break,
                _ if started.elapsed() > Duration::from_secs_f64(timeout + 10.0) => break,
                _ => {}
            }
        }
        match port_has_machine(&http, &mars, admin.expose(), &port_id).await {
            Ok(true) => println!(
                "dutgate: virtual farm: port {port_id} registered after {:.1} s; training it",
                started.elapsed().as_secs_f64()
            ),
            _ => eprintln!("dutgate: virtual farm: nothing registered on port {port_id}"),
        }
    }
}

async fn port_has_machine(
    http: &reqwest::Client,
    mars: &str,
    token: &str,
    port_id: &str,
) -> anyhow::Result<bool> {
    let list: serde_json::Value = http
        .get(format!("{mars}/api/v1/machines"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let machines = list
        .get("machines")
        .and_then(|m| m.as_array())
        .context("no `machines` list in mars' answer")?;
    Ok(machines.iter().any(|m| {
        m.get("pdu").and_then(|v| v.as_str()) == Some(PDU_NAME)
            && m.get("pdu_port_id").and_then(|v| v.as_str()) == Some(port_id)
            && m.get("is_retired").and_then(|v| v.as_bool()) != Some(true)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(n: u8, image: &Path) -> VirtualFarmArgs {
        VirtualFarmArgs {
            virtual_duts: n,
            dut_image: Some(image.to_path_buf()),
            training_loops: 2,
            training_qualifying: 2,
            off_delay: 2.0,
            dut_memory_mb: 512,
            no_discover: false,
            dut_bridge: None,
        }
    }

    /// The overlay, applied the way children apply it, yields a config every service accepts.
    #[test]
    fn overlay_loads_as_a_valid_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.path().join("initramfs.cpio"), b"i").unwrap();
        let base = FileConfig::default();
        let env = overrides(&args(3, dir.path()), &base).unwrap();
        let source = dutgate_core::config::ConfigSource::locate(None).unwrap();
        let c: FileConfig = source.load(env).unwrap();
        assert_eq!(c.gateway.public_host, GUEST_HOST);
        assert_eq!(c.mars.training.boot_loops, 2);
        assert_eq!(c.mars.training.qualifying, 2);
        assert!((c.mars.pdu_off_delay - 2.0).abs() < 1e-9);
        let pdu = c.pdu.pdus.get(PDU_NAME).unwrap();
        assert_eq!(pdu.driver, "virtual");
        assert_eq!(pdu.config["ports"], 3);
        let default = c.boot.default.unwrap();
        let boot_port = base.gateway.ports.boot;
        assert_eq!(
            default.kernel.url,
            format!("http://{GUEST_HOST}:{boot_port}/dut-image/vmlinuz")
        );
        assert!(default.kernel.cmdline.contains("dutgate.action=register"));
        assert_eq!(c.boot.dut_image_dir.as_deref(), Some(dir.path()));
        // Jobs boot the same URLs; no server of its own, so nothing joins the allow list.
        assert_eq!(
            c.executor.template_vars["dut_kernel_url"],
            default.kernel.url
        );
        assert_eq!(
            c.executor.template_vars["dut_initramfs_url"],
            default.initramfs[0].url
        );
        assert_eq!(c.gateway.outbound.allow, base.gateway.outbound.allow);
        assert_eq!(c.gateway.auth.dut_networks, base.gateway.auth.dut_networks);
        let unverified: Vec<String> = c
            .boot
            .unverified_peer_networks
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(unverified, ["127.0.0.0/8"]);
    }

    /// Bridged: the DUTs reach the gateway at its address on the bridge, the VMs' NICs are
    /// on the bridge and their consoles are ptys salad opens as serial adapters.
    #[test]
    fn bridged_overlay_uses_the_bridge_and_ptys() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"k").unwrap();
        std::fs::write(dir.path().join("initramfs.cpio"), b"i").unwrap();
        let mut a = args(2, dir.path());
        a.dut_bridge = Some("dutbr0".into());
        let e = overrides(&a, &FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("gateway.public_host"), "{e}");
        let mut base = FileConfig::default();
        base.gateway.public_host = "10.77.0.1".into();
        let env = overrides(&a, &base).unwrap();
        let source = dutgate_core::config::ConfigSource::locate(None).unwrap();
        let c: FileConfig = source.load(env).unwrap();
        assert_eq!(c.gateway.public_host, "10.77.0.1");
        let pdu = c.pdu.pdus.get(PDU_NAME).unwrap();
        assert_eq!(pdu.config["bridge"], "dutbr0");
        assert_eq!(pdu.config["pty_console"], true);
        assert!(pdu.config["netconsole"].is_null());
        let tty_glob = c.salad.serial_ports[0].path.clone();
        assert!(tty_glob.ends_with("virtual-pdu/tty-*"), "{tty_glob}");
        let default = c.boot.default.unwrap();
        assert!(
            default
                .kernel
                .cmdline
                .contains("dutgate.mars_url=http://10.77.0.1:"),
            "{}",
            default.kernel.cmdline
        );
        // The DUTs fetch the image from the boot service at the bridge address.
        let image = format!("http://10.77.0.1:{}/dut-image/", base.gateway.ports.boot);
        assert!(
            default.kernel.url.starts_with(&image),
            "{}",
            default.kernel.url
        );
        assert!(
            c.executor.template_vars["dut_initramfs_url"].starts_with(&image),
            "{:?}",
            c.executor.template_vars
        );
    }

    #[test]
    fn missing_image_and_bad_training_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = overrides(&args(1, dir.path()), &FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("cargo xtask dut-image"), "{e}");
        let mut a = args(1, dir.path());
        a.training_qualifying = 3;
        assert!(overrides(&a, &FileConfig::default()).is_err());
    }
}
