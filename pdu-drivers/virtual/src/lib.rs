//! `virtual`: each port is a QEMU VM DUT (design.md §12).
//!
//! ON starts `qemu-system-x86_64 -accel tcg` with a virtio NIC whose iPXE ROM (Debian
//! `ipxe-qemu`) netboots from the boot service through QEMU user networking (`bootfile=`,
//! the gateway is 10.0.2.2 from inside), MAC `52:54:00:00:<pdu>:<n>` (hex), and the serial
//! console connected to salad's netconsole port (`-chardev socket`, reconnecting) or written
//! to a file. OFF kills the process; the state is whether the process is alive.
//!
//! SeaBIOS's serial console (`etc/sercon-port`) is on by default, so SeaBIOS and iPXE
//! messages reach the console too: a VM that fails to netboot says why on its console.
//!
//! Two ways to reach the gateway, for two kinds of farm:
//! - QEMU user networking (the default): every VM is alone on its own 10.0.2.0/24 and reaches
//!   the gateway from 127.0.0.1. Nothing to set up, so the demo uses it.
//! - `bridge: NAME`: the NIC is a tap device on a Linux bridge of the DUT network, where a
//!   real DHCP server (dnsmasq) gives the address and the boot file, as on a real farm. Every
//!   VM then has an address of its own, which the address rules of the gateway (docs/security.md)
//!   need to mean anything. The tap joins the bridge through a one-line `ip link` script that
//!   QEMU runs (`<run_dir>/qemu-ifup`).
//!
//! With `pty_console: true` the serial console is a pty instead of a netconsole: the driver
//! links it at `<run_dir>/tty-<port>` after each power-on and removes the link at power-off,
//! so salad opens it like a USB serial adapter that is plugged in while the machine is on.
//!
//! Each VM's pid is kept in `<run_dir>/port-<n>.pid`; a driver that finds a live QEMU with
//! the port's MAC there (after a service restart) adopts it instead of reporting OFF. TCG
//! only: KVM must not be used just because /dev/kvm exists (see the lab notes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dutgate_pdu_driver::{
    ConfigError, DriverError, DriverFactory, PduDriver, PortInfo, PortList, PowerState, Switch,
    parse_config, port_list,
};
use serde::Deserialize;

pub const NAME: &str = "virtual";

pub fn factories() -> Vec<DriverFactory> {
    vec![DriverFactory {
        name: NAME,
        summary: "each port is a QEMU VM that netboots with iPXE (test and demo farm)",
        build,
    }]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The `<pdu>` byte of the VMs' MAC addresses (0–255), unique per virtual PDU.
    pub pdu_id: u8,
    pub ports: PortList,
    /// Port of the boot service as seen from the gateway (10.0.2.2 from inside a VM).
    #[serde(default = "default_boot_port")]
    pub boot_port: u16,
    /// iPXE boot URL; `${mac}` etc. are expanded by iPXE. Default:
    /// `http://10.0.2.2:<boot_port>/boot/${mac}/boot.ipxe?platform=${platform}&buildarch=${buildarch}`.
    #[serde(default)]
    pub boot_url: Option<String>,
    /// `host:port` of salad's netconsole ingest; `null` writes the console to
    /// `<run_dir>/port-<n>.console` instead.
    #[serde(default = "default_netconsole")]
    pub netconsole: Option<String>,
    /// Route SeaBIOS and iPXE text to the serial console.
    #[serde(default = "default_true")]
    pub bios_console: bool,
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_qemu")]
    pub qemu: String,
    /// Pid files, QEMU logs, file consoles. Default `/tmp/dutgate-virtual-pdu-<pdu_id>`.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    /// Appended to every QEMU command line.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Leave the VMs running when the PDU is removed or the service stops (like real
    /// outlets). Default: stop them with the service.
    #[serde(default)]
    pub keep_running: bool,
    /// Put the NIC on this Linux bridge (a tap device) instead of QEMU user networking; the
    /// DUT network's DHCP server then gives the address and the boot file (`boot_url` is not
    /// used). Needs CAP_NET_ADMIN and `ip` (iproute2).
    #[serde(default)]
    pub bridge: Option<String>,
    /// The serial console as a pty linked at `<run_dir>/tty-<port>` while the VM runs (for
    /// salad's `serial_ports`), instead of `netconsole`.
    #[serde(default)]
    pub pty_console: bool,
}

fn default_boot_port() -> u16 {
    8003
}
fn default_netconsole() -> Option<String> {
    Some("127.0.0.1:8100".into())
}
fn default_true() -> bool {
    true
}
fn default_memory() -> u32 {
    512
}
fn default_cpus() -> u32 {
    1
}
fn default_qemu() -> String {
    "qemu-system-x86_64".into()
}

pub fn build(config: yaml_serde::Value) -> Result<Box<dyn PduDriver>, ConfigError> {
    let cfg: Config = parse_config(config)?;
    let ports = port_list(&cfg.ports, 1);
    if ports.is_empty() || ports.len() > 255 {
        return Err(ConfigError::field("ports", "between 1 and 255 ports"));
    }
    if let Some(nc) = &cfg.netconsole {
        let ok = nc
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(ConfigError::field(
                "netconsole",
                "expected host:port, e.g. 127.0.0.1:8100",
            ));
        }
    }
    if let Some(u) = &cfg.boot_url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        return Err(ConfigError::field(
            "boot_url",
            "an http:// URL iPXE can fetch",
        ));
    }
    if let Some(b) = &cfg.bridge
        && !is_interface_name(b)
    {
        return Err(ConfigError::field(
            "bridge",
            "a network interface name: 1-15 of A-Z a-z 0-9 . _ -",
        ));
    }
    if cfg.memory_mb < 64 {
        return Err(ConfigError::field("memory_mb", "at least 64"));
    }
    if cfg.cpus == 0 {
        return Err(ConfigError::field("cpus", "at least 1"));
    }
    let run_dir = cfg.run_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("dutgate-virtual-pdu-{}", cfg.pdu_id))
    });
    Ok(Box::new(VirtualPdu {
        cfg,
        ports,
        run_dir,
        vms: BTreeMap::new(),
    }))
}

/// Whether `name` is a Linux interface name. It is written into the tap script QEMU runs, so
/// nothing but these characters may reach it.
fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// How long QEMU may take to say which pty it opened.
const PTY_WAIT: Duration = Duration::from_secs(5);

/// The pty QEMU's log names for the console (`char device redirected to /dev/pts/3 (label
/// con)`).
fn console_pty(log: &str) -> Option<&str> {
    log.lines().find_map(|l| {
        let rest = l.split("char device redirected to ").nth(1)?;
        let (path, label) = rest.split_once(' ')?;
        (label.starts_with("(label con)") && path.starts_with("/dev/pts/")).then_some(path)
    })
}

/// The MAC address of port `n` of virtual PDU `pdu`.
pub fn mac_of(pdu: u8, n: u8) -> String {
    format!("52:54:00:00:{pdu:02x}:{n:02x}")
}

enum Vm {
    /// Started by this driver.
    Child(tokio::process::Child),
    /// Found running from an earlier service process (pid file).
    Adopted(i32),
}

pub struct VirtualPdu {
    cfg: Config,
    ports: Vec<PortInfo>,
    run_dir: PathBuf,
    vms: BTreeMap<String, Vm>,
}

fn pid_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; its state letter is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn cmdline_has(pid: i32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

fn kill(pid: i32) {
    // SAFETY: kill(2) with a pid we started (or adopted after checking its command line).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

impl VirtualPdu {
    fn port_number(&self, port: &str) -> Result<u8, DriverError> {
        if !self.ports.iter().any(|p| p.id == port) {
            return Err(DriverError::no_such_port(port));
        }
        port.parse().map_err(|_| DriverError::no_such_port(port))
    }

    fn pid_file(&self, port: &str) -> PathBuf {
        self.run_dir.join(format!("port-{port}.pid"))
    }

    /// Where the console pty of `port` is linked while its VM runs (`pty_console`).
    pub fn tty_link(&self, port: &str) -> PathBuf {
        self.run_dir.join(format!("tty-{port}"))
    }

    fn ifup_script(&self) -> PathBuf {
        self.run_dir.join("qemu-ifup")
    }

    fn mac(&self, n: u8) -> String {
        mac_of(self.cfg.pdu_id, n)
    }

    pub fn boot_url(&self) -> String {
        self.cfg.boot_url.clone().unwrap_or_else(|| {
            format!(
                "http://10.0.2.2:{}/boot/${{mac}}/boot.ipxe?platform=${{platform}}&buildarch=${{buildarch}}",
                self.cfg.boot_port
            )
        })
    }

    /// The QEMU command line of port `n` (without the program).
    pub fn qemu_args(&self, port: &str, n: u8) -> Vec<String> {
        let mac = self.mac(n);
        // QEMU option values escape ',' by doubling it.
        let bootfile = self.boot_url().replace(',', ",,");
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("dutgate-vpdu-{}-{port}", self.cfg.pdu_id),
            "-accel".into(),
            "tcg".into(),
            "-m".into(),
            self.cfg.memory_mb.to_string(),
            "-smp".into(),
            self.cfg.cpus.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-netdev".into(),
            match &self.cfg.bridge {
                None => format!("user,id=n0,bootfile={bootfile}"),
                Some(_) => format!(
                    "tap,id=n0,script={},downscript=no",
                    self.ifup_script().display()
                ),
            },
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={mac}"),
            "-boot".into(),
            "order=n".into(),
        ];
        match &self.cfg.netconsole {
            _ if self.cfg.pty_console => {
                args.push("-chardev".into());
                args.push("pty,id=con".into());
            }
            Some(nc) => {
                let (host, p) = nc.rsplit_once(':').unwrap_or((nc.as_str(), "8100"));
                args.push("-chardev".into());
                // reconnect: the VM keeps running while salad restarts, and starts even
                // before salad listens.
                args.push(format!("socket,id=con,host={host},port={p},reconnect=2"));
            }
            None => {
                let file = self.run_dir.join(format!("port-{port}.console"));
                args.push("-chardev".into());
                args.push(format!("file,id=con,path={}", file.display()));
            }
        }
        args.push("-serial".into());
        args.push("chardev:con".into());
        if self.cfg.bios_console {
            args.push("-fw_cfg".into());
            args.push(format!(
                "name=etc/sercon-port,file={}",
                self.sercon_file().display()
            ));
        }
        args.extend(self.cfg.extra_args.iter().cloned());
        args
    }

    fn sercon_file(&self) -> PathBuf {
        self.run_dir.join("sercon-port.bin")
    }

    fn prepare_run_dir(&self) -> Result<(), DriverError> {
        let local = |what: &str, p: &Path, e: std::io::Error| {
            DriverError::Local(format!("{what} {}: {e}", p.display()))
        };
        std::fs::create_dir_all(&self.run_dir)
            .map_err(|e| local("cannot create", &self.run_dir, e))?;
        if self.cfg.bios_console {
            // SeaBIOS reads the serial console I/O port (0x3f8, COM1) as a little-endian
            // integer from this fw_cfg file.
            std::fs::write(self.sercon_file(), 0x3f8u64.to_le_bytes())
                .map_err(|e| local("cannot write", &self.sercon_file(), e))?;
        }
        if let Some(bridge) = &self.cfg.bridge {
            use std::os::unix::fs::PermissionsExt;
            // QEMU runs this with the tap device's name once it has created it.
            let script = format!("#!/bin/sh\nexec ip link set \"$1\" master {bridge} up\n");
            let path = self.ifup_script();
            std::fs::write(&path, script).map_err(|e| local("cannot write", &path, e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| local("cannot make executable", &path, e))?;
        }
        Ok(())
    }

    /// Links the console pty of the VM just started (named in its log) at `tty_link`.
    async fn link_pty(&self, port: &str, log_path: &Path) -> Result<(), DriverError> {
        let deadline = Instant::now() + PTY_WAIT;
        let pty = loop {
            let log = tokio::fs::read_to_string(log_path)
                .await
                .unwrap_or_default();
            if let Some(p) = console_pty(&log) {
                break PathBuf::from(p);
            }
            if Instant::now() > deadline {
                return Err(DriverError::Local(format!(
                    "QEMU of port {port} named no console pty in {}",
                    log_path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // A new link replaces the old one at once (rename), so salad never sees a link to a
        // pty of an earlier power-on.
        let link = self.tty_link(port);
        let tmp = self.run_dir.join(format!(".tty-{port}.new"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&pty, &tmp)
            .and_then(|()| std::fs::rename(&tmp, &link))
            .map_err(|e| DriverError::Local(format!("cannot link {}: {e}", link.display())))?;
        tracing::info!(port, pty = %pty.display(), link = %link.display(), "console pty linked");
        Ok(())
    }

    /// Whether port `port` has a live VM; adopts one from its pid file if needed.
    fn alive(&mut self, port: &str, n: u8) -> bool {
        match self.vms.get_mut(port) {
            Some(Vm::Child(c)) => match c.try_wait() {
                // A multi-threaded process killed from elsewhere shows as a zombie before
                // waitpid can reap it; a zombie is not a running VM.
                Ok(None)
                    if c.id()
                        .and_then(|p| i32::try_from(p).ok())
                        .is_none_or(pid_alive) =>
                {
                    return true;
                }
                _ => {
                    // The VM powered itself off: its pty is gone, and a link left to it could
                    // later point at another process's pty of the same number.
                    self.vms.remove(port);
                    let _ = std::fs::remove_file(self.pid_file(port));
                    let _ = std::fs::remove_file(self.tty_link(port));
                    return false;
                }
            },
            Some(Vm::Adopted(pid)) => {
                let pid = *pid;
                if pid_alive(pid) {
                    return true;
                }
                self.vms.remove(port);
                let _ = std::fs::remove_file(self.pid_file(port));
                let _ = std::fs::remove_file(self.tty_link(port));
                return false;
            }
            None => {}
        }
        let pid = std::fs::read_to_string(self.pid_file(port))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if let Some(pid) = pid
            && pid > 0
            && pid_alive(pid)
            && cmdline_has(pid, &self.mac(n))
        {
            tracing::info!(port, pid, "adopting a running virtual DUT");
            self.vms.insert(port.to_string(), Vm::Adopted(pid));
            return true;
        }
        false
    }

    async fn start(&mut self, port: &str, n: u8) -> Result<(), DriverError> {
        self.prepare_run_dir()?;
        let log_path = self.run_dir.join(format!("port-{port}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| {
            DriverError::Local(format!("cannot create {}: {e}", log_path.display()))
        })?;
        let log2 = log
            .try_clone()
            .map_err(|e| DriverError::Local(format!("{}: {e}", log_path.display())))?;
        let args = self.qemu_args(port, n);
        let mut child = tokio::process::Command::new(&self.cfg.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| {
                DriverError::Local(format!(
                    "cannot start {} (Debian packages qemu-system-x86 and ipxe-qemu): {e}",
                    self.cfg.qemu
                ))
            })?;
        // QEMU fails at once on a bad command line; give it a moment to say so.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(DriverError::Local(format!(
                "QEMU for port {port} exited at once ({status}): {}",
                log.trim().chars().take(500).collect::<String>()
            )));
        }
        if let Some(pid) = child.id() {
            let _ = std::fs::write(self.pid_file(port), pid.to_string());
            tracing::info!(port, pid, mac = %self.mac(n), "virtual DUT powered on");
        }
        self.vms.insert(port.to_string(), Vm::Child(child));
        if self.cfg.pty_console {
            self.link_pty(port, &log_path).await?;
        }
        Ok(())
    }

    async fn stop(&mut self, port: &str) -> Result<(), DriverError> {
        let Some(vm) = self.vms.remove(port) else {
            return Ok(());
        };
        match vm {
            Vm::Child(mut c) => {
                let _ = c.start_kill();
                if tokio::time::timeout(Duration::from_secs(5), c.wait())
                    .await
                    .is_err()
                {
                    return Err(DriverError::Local(format!(
                        "QEMU of port {port} did not die"
                    )));
                }
            }
            Vm::Adopted(pid) => {
                kill(pid);
                let start = Instant::now();
                while pid_alive(pid) {
                    if start.elapsed() > Duration::from_secs(5) {
                        return Err(DriverError::Local(format!(
                            "QEMU pid {pid} of port {port} did not die"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let _ = std::fs::remove_file(self.pid_file(port));
        let _ = std::fs::remove_file(self.tty_link(port));
        tracing::info!(port, "virtual DUT powered off");
        Ok(())
    }
}

#[async_trait]
impl PduDriver for VirtualPdu {
    fn driver_name(&self) -> &'static str {
        NAME
    }

    async fn ports(&mut self) -> Result<Vec<PortInfo>, DriverError> {
        Ok(self.ports.clone())
    }

    async fn get(&mut self, port: &str) -> Result<PowerState, DriverError> {
        let n = self.port_number(port)?;
        Ok(if self.alive(port, n) {
            PowerState::On
        } else {
            PowerState::Off
        })
    }

    async fn set(&mut self, port: &str, state: Switch) -> Result<(), DriverError> {
        let n = self.port_number(port)?;
        let alive = self.alive(port, n);
        match (state, alive) {
            (Switch::On, false) => self.start(port, n).await,
            (Switch::Off, true) => self.stop(port).await,
            _ => Ok(()),
        }
    }

    async fn shutdown(&mut self) {
        if self.cfg.keep_running {
            return;
        }
        let ports: Vec<String> = self.vms.keys().cloned().collect();
        for p in ports {
            if let Err(e) = self.stop(&p).await {
                tracing::warn!(port = %p, error = %e, "cannot stop virtual DUT");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_command_line() {
        assert_eq!(mac_of(1, 10), "52:54:00:00:01:0a");
        let d =
            build(yaml_serde::from_str("{pdu_id: 2, ports: 3, boot_port: 9003}").unwrap()).unwrap();
        drop(d);
        let cfg: Config =
            parse_config(yaml_serde::from_str("{pdu_id: 2, ports: 3, boot_port: 9003}").unwrap())
                .unwrap();
        let v = VirtualPdu {
            ports: port_list(&cfg.ports, 1),
            run_dir: PathBuf::from("/run/x"),
            cfg,
            vms: BTreeMap::new(),
        };
        let args = v.qemu_args("3", 3).join(" ");
        assert!(args.contains("-accel tcg"), "{args}");
        assert!(args.contains("mac=52:54:00:00:02:03"), "{args}");
        assert!(
            args.contains("bootfile=http://10.0.2.2:9003/boot/${mac}/boot.ipxe?platform=${platform}&buildarch=${buildarch}"),
            "{args}"
        );
        assert!(
            args.contains("socket,id=con,host=127.0.0.1,port=8100,reconnect=2"),
            "{args}"
        );
        assert!(!args.contains("kvm"));
    }

    #[test]
    fn bridged_with_a_pty_console() {
        let cfg: Config = parse_config(
            yaml_serde::from_str("{pdu_id: 2, ports: 3, bridge: dutbr0, pty_console: true}")
                .unwrap(),
        )
        .unwrap();
        let v = VirtualPdu {
            ports: port_list(&cfg.ports, 1),
            run_dir: PathBuf::from("/run/x"),
            cfg,
            vms: BTreeMap::new(),
        };
        let args = v.qemu_args("3", 3).join(" ");
        assert!(
            args.contains("-netdev tap,id=n0,script=/run/x/qemu-ifup,downscript=no"),
            "{args}"
        );
        assert!(args.contains("-chardev pty,id=con"), "{args}");
        assert!(!args.contains("bootfile"), "{args}");
        assert!(!args.contains("socket"), "{args}");
        assert_eq!(v.tty_link("3"), PathBuf::from("/run/x/tty-3"));
    }

    #[test]
    fn the_console_pty_is_read_from_the_log() {
        let log = "qemu: some warning\nchar device redirected to /dev/pts/17 (label con)\n";
        assert_eq!(console_pty(log), Some("/dev/pts/17"));
        assert_eq!(
            console_pty("char device redirected to /dev/pts/2 (label mon)"),
            None
        );
        assert_eq!(
            console_pty("char device redirected to /tmp/x (label con)"),
            None
        );
        assert_eq!(console_pty(""), None);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let b = |t: &str| build(yaml_serde::from_str(t).unwrap()).err().unwrap();
        assert_eq!(
            b("{pdu_id: 300, ports: 1}").field.as_deref(),
            Some("pdu_id")
        );
        assert_eq!(
            b("{pdu_id: 1, ports: 1, netconsole: nope}")
                .field
                .as_deref(),
            Some("netconsole")
        );
        assert_eq!(
            b("{pdu_id: 1, ports: 1, bridge: 'br0; reboot'}")
                .field
                .as_deref(),
            Some("bridge")
        );
        assert_eq!(
            b("{pdu_id: 1, ports: 1, boot_url: 'tftp://x'}")
                .field
                .as_deref(),
            Some("boot_url")
        );
    }
}
