//! `dutgate up --virtual-duts N`: a farm of QEMU DUTs on top of whatever config is loaded.
//!
//! The overlay is handed to every child as `DUTGATE_<SECTION>__<KEY>` environment overrides
//! (the same mechanism an operator uses), so the children load exactly the operator's config
//! plus these keys, and no second config file with copied secrets is written:
//! - `gateway.public_host` = 10.0.2.2: QEMU user networking shows the host there;
//! - `pdu.pdus.virtual`: the `virtual` driver with N ports, netbooting from this boot service
//!   and sending the console to salad's netconsole port;
//! - `boot.file_roots` + `boot.default`: the DUT image (`dutgate dut-image`) with
//!   `dutgate.action=register`, served in place by the boot service;
//! - `executor.template_vars.dut_kernel_url`/`dut_initramfs_url`: the same image for jobs and
//!   the trainer's templates (`gateway-image/jobs/*.j2`). Jobs only accept http(s) URLs, so
//!   `dutgate up` serves the two files on a loopback port of its own ([`ImageServer`]); the
//!   boot service fetches them from there into its cache like any other artifact;
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

/// The DUT image's files this farm serves over HTTP.
const IMAGE_FILES: [&str; 2] = ["vmlinuz", "initramfs.cpio"];

/// Serves `vmlinuz` and `initramfs.cpio` of the DUT image read-only on 127.0.0.1 (an
/// ephemeral port) for the boot service's artifact cache. Stops when dropped.
pub struct ImageServer {
    pub base_url: String,
    task: tokio::task::JoinHandle<()>,
}

impl ImageServer {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;

        async fn file(
            State(dir): State<PathBuf>,
            UrlPath(name): UrlPath<String>,
        ) -> axum::response::Response {
            // Only the two image files: no other name ever reaches the file system.
            if !IMAGE_FILES.contains(&name.as_str()) {
                return (StatusCode::NOT_FOUND, "not a DUT image file").into_response();
            }
            match tokio::fs::read(dir.join(&name)).await {
                Ok(bytes) => {
                    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
                }
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot read the DUT image");
                    (StatusCode::NOT_FOUND, e.to_string()).into_response()
                }
            }
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the DUT image server")?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route("/dut-image/{name}", axum::routing::get(file))
            .with_state(dir.to_path_buf());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("dutgate: DUT image server stopped: {e}");
            }
        });
        Ok(Self {
            base_url: format!("http://{addr}/dut-image"),
            task,
        })
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

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

/// The environment overrides that turn `config` into a virtual farm. `image_url` is the
/// [`ImageServer`]'s base URL.
pub fn overrides(
    args: &VirtualFarmArgs,
    config: &FileConfig,
    image_url: &str,
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
    let kernel = image.join("vmlinuz");
    let initramfs = image.join("initramfs.cpio");
    let kernel_url = file_url(&kernel)?;
    let initramfs_url = file_url(&initramfs)?;
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
        "dut_kernel_url": format!("{image_url}/vmlinuz"),
        "dut_initramfs_url": format!("{image_url}/initramfs.cpio"),
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
    // The boot cache fetches the jobs' kernels from the image server on loopback: exactly
    // that address and port joins the outbound allow list, nothing else on loopback.
    let mut allow = gw.outbound.allow.clone();
    allow.push(dutgate_core::outbound::AllowRule::exact(image_server_addr(
        image_url,
    )?));
    overrides.push(env("GATEWAY__OUTBOUND__ALLOW", v(json!(allow))));
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
        env("BOOT__FILE_ROOTS", v(json!([image]))),
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

/// The socket address of the [`ImageServer`] from its base URL (`http://127.0.0.1:P/…`).
fn image_server_addr(image_url: &str) -> anyhow::Result<std::net::SocketAddr> {
    let url = reqwest::Url::parse(image_url)
        .with_context(|| format!("image server URL {image_url:?}"))?;
    let host: std::net::IpAddr = url
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse().ok())
        .with_context(|| format!("image server URL {image_url}: the host must be an IP address"))?;
    let port = url
        .port_or_known_default()
        .with_context(|| format!("image server URL {image_url}: no port"))?;
    Ok(std::net::SocketAddr::new(host, port))
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

fn file_url(p: &Path) -> anyhow::Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", p.display()))?;
    if s.contains(|c: char| c.is_whitespace() || c == '%' || c == '#' || c == '?') {
        bail!("{s}: the DUT image path must not contain spaces, '%', '#' or '?'");
    }
    Ok(format!("file://{s}"))
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
    /// The image server serves the two files and nothing else.
    #[tokio::test]
    async fn image_server_serves_only_the_image() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"kernel bytes").unwrap();
        std::fs::write(dir.path().join("secret"), b"no").unwrap();
        let srv = ImageServer::start(dir.path()).await.unwrap();
        let http = reqwest::Client::new();
        let r = http
            .get(format!("{}/vmlinuz", srv.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().as_ref(), b"kernel bytes");
        for bad in ["secret", "initramfs.cpio", "..%2Fsecret"] {
            let r = http
                .get(format!("{}/{bad}", srv.base_url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404, "{bad}");
        }
    }

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
        let env = overrides(&args(3, dir.path()), &base, "http://127.0.0.1:1/dut-image").unwrap();
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
        assert!(default.kernel.url.starts_with("file:///"));
        assert!(default.kernel.cmdline.contains("dutgate.action=register"));
        assert_eq!(c.boot.file_roots, vec![dir.path().to_path_buf()]);
        assert_eq!(
            c.executor.template_vars["dut_kernel_url"],
            "http://127.0.0.1:1/dut-image/vmlinuz"
        );
        // Exactly the image server is allowed; everything else on loopback stays refused.
        assert_eq!(
            c.gateway.outbound.allow,
            vec!["127.0.0.1:1".parse().unwrap()]
        );
        let policy = dutgate_core::outbound::OutboundPolicy::from_gateway(&c.gateway);
        let ok = |u: &str| policy.check_url(&reqwest::Url::parse(u).unwrap()).is_ok();
        assert!(ok("http://127.0.0.1:1/dut-image/vmlinuz"));
        assert!(!ok("http://127.0.0.1:8004/api/v1/pdus"));
        assert!(!ok("http://127.0.0.2:1/dut-image/vmlinuz"));
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
        let e = overrides(&a, &FileConfig::default(), "x").unwrap_err();
        assert!(e.to_string().contains("gateway.public_host"), "{e}");
        let mut base = FileConfig::default();
        base.gateway.public_host = "10.77.0.1".into();
        let env = overrides(&a, &base, "http://127.0.0.1:1/dut-image").unwrap();
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
    }

    #[test]
    fn missing_image_and_bad_training_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = overrides(&args(1, dir.path()), &FileConfig::default(), "x").unwrap_err();
        assert!(e.to_string().contains("cargo xtask dut-image"), "{e}");
        let mut a = args(1, dir.path());
        a.training_qualifying = 3;
        assert!(overrides(&a, &FileConfig::default(), "x").is_err());
    }
}
