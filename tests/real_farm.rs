//! The farm in a box: `docs/install.md` followed command by command, with nothing virtual in
//! the gateway's path.
//!
//! - The package (`cargo xtask deb --profile dev`, or `DUTGATE_TEST_DEB=<file.deb>`) unpacked
//!   with `dpkg-deb -x` into a temporary root; what its postinst does (state dir 0700,
//!   `tokens bootstrap`, `dut-image` from the packaged agents) run as the service user; every
//!   unit's `ExecStart` (paths moved into the root) run as the service user with the unit's
//!   groups and `UMask=`. The service user is a numeric uid the host does not use (the host's
//!   user database is not touched), in `dialout`.
//! - The packaged `/etc/dutgate/gateway.yml`, changed only in the state dir path, the serial
//!   adapters' glob (into the root), the training loops (2 of 2), the PDU off delay (1 s) and
//!   the PDU of section 9 (`pdu.pdus`, pointing at the test's SNMP agent). The ports are the
//!   documented defaults: the gateway runs in a network namespace of its own.
//! - The DUT network of section 2: a bridge `dut0` with 10.42.0.1/24 in that namespace; dnsmasq
//!   from the packaged `dnsmasq-dut-network.conf` (only `tftp-root` moved, and the static
//!   leases section 3 asks for) serving DHCP and TFTP with Debian `ipxe`'s binaries.
//! - Two QEMU DUTs whose NICs are taps on `dut0`, booting through their firmware (no
//!   `-kernel`): SeaBIOS with QEMU's iPXE NIC ROM, and OVMF with no NIC ROM doing UEFI PXE
//!   (DHCP, TFTP of `ipxe.efi`, iPXE, the boot service). Each one's serial port is bridged to
//!   a pty pair (a USB serial adapter: root:dialout 0660, linked at `<root>/dev/ttyUSB-farm<n>`)
//!   that salad opens from its glob. Power: net-snmp `snmpd` playing an APC rack PDU
//!   (`pdu-drivers/snmp/tests/pdu_agent.py`), driven by the `apc_rpdu2` driver; the test
//!   applies each outlet's state to its VM (on: the VM starts, off: it is gone).
//! - `dutctl machines discover` brings each DUT from unknown through registration and 2
//!   check boots to `IDLE`; a runner token (`dutctl tokens create … --role runner`) submits
//!   `examples/hello.yml`, which PASSes with `hello.txt` in its bucket and its console log;
//!   a serial adapter unplugged and plugged back keeps its machine's console port, and the
//!   client connected to that port sees the DUT's next line.
//!
//! Printed: each phase's time, `dpkg-deb -x` → first job PASS (the "dpkg -i → first job"
//! figure), and each unit's `systemd-analyze security --offline` exposure.
//!
//! QEMU runs with TCG (`-accel tcg`): /dev/kvm exists on these machines but cannot run a stock
//! kernel (/work/shared/lab-notes.md); `DUTGATE_TEST_ACCEL=kvm` uses KVM where it works.
//!
//! Time on 2 cores (TCG), measured 2026-12-07: 263 s from `dpkg-deb -x` to the first job's
//! PASS on a quiet machine (discovery of both DUTs 77 s, training 150 s, the job 33 s), 353 s
//! while other builds shared the cores; `cargo xtask deb --profile dev` before it takes 36 s
//! when the debug binaries are up to date (`DUTGATE_TEST_DEB` skips it).
//!
//! Peers (Debian packages): dpkg, util-linux (setpriv), iproute2, dnsmasq-base, ipxe, ovmf,
//! ipxe-qemu, qemu-system-x86, snmpd, snmp, python3, systemd (systemd-analyze),
//! linux-image-amd64 and busybox-static (the DUT image). Needs root (network namespace, taps).

#[path = "real_farm/dut.rs"]
mod dut;
#[path = "../pdu-drivers/snmp/tests/common/mod.rs"]
mod snmp_agent;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::testing::require_program;
use dutgate_e2e::debian::{self, CONFIG, STATE, UNIT_DIR};
use dutgate_e2e::farm::Daemon;
use dutgate_e2e::netns::{self, Netns};
use dutgate_e2e::raw_http::{RawRequest, exchange};
use serde_json::Value;

use dut::{Dut, Firmware, Lab, Mains, SerialAdapter};

const BRIDGE: &str = "dut0";
const GATEWAY_IP: &str = "10.42.0.1";
const EXECUTOR: u16 = 8000;
const SALAD: u16 = 8005;
/// The DUTs: name, MAC, firmware, PDU outlet, static lease.
const DUTS: [(&str, &str, Firmware, usize, &str); 2] = [
    (
        "bios",
        "52:54:00:42:00:01",
        Firmware::SeaBios,
        1,
        "10.42.0.11",
    ),
    ("uefi", "52:54:00:42:00:02", Firmware::Uefi, 2, "10.42.0.12"),
];

/// Phase timings, printed as they end and again at the end.
struct Clock {
    start: Instant,
    last: Instant,
    rows: Vec<(String, Duration)>,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            last: now,
            rows: Vec::new(),
        }
    }

    fn phase(&mut self, name: &str) {
        let took = self.last.elapsed();
        self.last = Instant::now();
        println!(
            "[phase] {name}: {:.1} s (test time {:.1} s)",
            took.as_secs_f64(),
            self.start.elapsed().as_secs_f64()
        );
        self.rows.push((name.to_string(), took));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A uid and gid no user or group of the host has: the service user `dutgate` of the box.
fn free_id() -> u32 {
    (61000..62000)
        .find(|&id| {
            // SAFETY: getpwuid/getgrgid return pointers into static storage, only compared
            // with null here; the test does not call them from other threads meanwhile.
            unsafe { libc::getpwuid(id).is_null() && libc::getgrgid(id).is_null() }
        })
        .expect("a free uid in 61000..62000")
}

fn group_id(name: &str) -> u32 {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string; the result points into static storage and is read at once.
    let gr = unsafe { libc::getgrnam(cname.as_ptr()) };
    assert!(!gr.is_null(), "no group {name} on this machine");
    // SAFETY: non-null, from getgrnam just above.
    unsafe { (*gr).gr_gid }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// The gateway unpacked into a temporary root, run in the namespace as the service user.
struct Gateway {
    root: PathBuf,
    config: PathBuf,
    state: PathBuf,
    netns: String,
    uid: u32,
    dialout: u32,
}

impl Gateway {
    /// A path of the installed system, inside the root.
    fn path(&self, installed: &str) -> PathBuf {
        self.root.join(installed.trim_start_matches('/'))
    }

    /// `program args…` in the namespace as the service user (`runuser -u dutgate --` of the
    /// docs), with the groups and umask given.
    fn as_dutgate(&self, groups: &[u32], umask: &str, program: &Path) -> Command {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, "setpriv"])
            .arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.uid))
            .arg(format!("--groups={}", groups.join(",")))
            .args(["--", "sh", "-c", "umask \"$0\" && exec \"$@\""])
            .arg(umask)
            .arg(program)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &self.state)
            .env("LANG", "C.UTF-8");
        c
    }

    /// `dutgate --config … --state-dir … <args>` as the service user (what postinst runs).
    fn dutgate(&self, args: &[&str]) -> Output {
        let mut c = self.as_dutgate(
            &[self.uid, self.dialout],
            "0077",
            &self.path("/usr/bin/dutgate"),
        );
        c.arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args);
        debian::output(&mut c, "util-linux")
    }

    /// `runuser -u dutgate -- dutctl --state-dir /var/lib/dutgate <args>`.
    fn dutctl(&self, args: &[&str]) -> Output {
        let mut c = self.as_dutgate(&[self.uid], "0077", &self.path("/usr/bin/dutctl"));
        c.arg("--state-dir").arg(&self.state).args(args);
        debian::output(&mut c, "util-linux")
    }

    fn dutctl_ok(&self, args: &[&str]) -> String {
        let out = self.dutctl(args);
        assert!(out.status.success(), "dutctl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn machines(&self) -> Vec<Value> {
        let out = self.dutctl(&["-o", "json", "machines", "list"]);
        match serde_json::from_slice(&out.stdout) {
            Ok(Value::Array(v)) => v,
            _ => Vec::new(),
        }
    }

    /// Starts a unit's `ExecStart` as systemd would, without systemd: the unit's `User=`
    /// (the box's service uid), `Group=` and `SupplementaryGroups=`, `UMask=`, a clean
    /// environment; the installed paths moved into the root.
    fn start_unit(&self, unit: &str, log: PathBuf) -> Daemon {
        let keys = debian::unit_keys(&self.root, unit);
        let value =
            |k: &str| debian::unit_value(&keys, k).unwrap_or_else(|| panic!("{unit}: no {k}="));
        assert_eq!(value("User"), "dutgate", "{unit}");
        let mut groups = vec![self.uid];
        if let Some(extra) = debian::unit_value(&keys, "SupplementaryGroups") {
            assert_eq!(extra, "dialout", "{unit}");
            groups.push(self.dialout);
        }
        let exec = value("ExecStart");
        let mut words = exec.split_whitespace().map(|w| match w {
            CONFIG => self.config.display().to_string(),
            STATE => self.state.display().to_string(),
            w if w.starts_with('/') => self.path(w).display().to_string(),
            w => w.to_string(),
        });
        let program = PathBuf::from(words.next().expect("ExecStart names a program"));
        let mut c = self.as_dutgate(&groups, &value("UMask"), &program);
        c.args(words);
        Daemon::spawn(c, log)
    }
}

/// The packaged config with the box's changes, each checked to apply.
fn box_config(packaged: &str, state: &Path, dev: &Path, snmp_port: u16) -> String {
    let edits = [
        (
            "  state_dir: /var/lib/dutgate\n".to_string(),
            format!("  state_dir: {}\n", state.display()),
        ),
        (
            "  pdu_off_delay: 30\n".into(),
            "  pdu_off_delay: 1\n".into(),
        ),
        ("    boot_loops: 20\n".into(), "    boot_loops: 2\n".into()),
        ("    qualifying: 19\n".into(), "    qualifying: 2\n".into()),
        (
            "  pdus: {}\n".into(),
            format!(
                "  pdus:\n    rack1:\n      driver: apc_rpdu2\n      config: {{host: 127.0.0.1, port: {snmp_port}, community: private}}\n      reserved: [\"24\"]\n"
            ),
        ),
        (
            "    - path: /dev/ttyUSB*\n    - path: /dev/ttyACM*\n".into(),
            format!("    - path: {}/ttyUSB-farm*\n", dev.display()),
        ),
    ];
    let mut text = packaged.to_string();
    for (from, to) in edits {
        assert!(
            text.contains(&from),
            "the packaged gateway.yml no longer contains {from:?}; update this test"
        );
        text = text.replacen(&from, &to, 1);
    }
    text
}

/// The packaged dnsmasq example with the TFTP root moved and one static lease per DUT.
fn box_dnsmasq(example: &str, tftp: &Path) -> String {
    let from = "tftp-root=/srv/tftp\n";
    assert!(
        example.contains(from),
        "dnsmasq-dut-network.conf no longer contains {from:?}; update this test"
    );
    let mut conf = example.replacen(from, &format!("tftp-root={}\n", tftp.display()), 1);
    for (name, mac, _, _, ip) in DUTS {
        conf.push_str(&format!("dhcp-host={mac},{ip},{name}\n"));
    }
    conf
}

/// `GET http://127.0.0.1:8005<path>` from the gateway, with the admin token (`Null` unless
/// it answers 200 with JSON).
fn salad_get(gw: &Gateway, admin: &str, path: &str) -> Value {
    let addr = SocketAddr::from(([127, 0, 0, 1], SALAD));
    let request = RawRequest::get(path)
        .bearer(admin)
        .to_bytes(&addr.to_string());
    netns::connect_in(&gw.netns, addr, Duration::from_secs(5))
        .and_then(|stream| exchange(stream, &request, Duration::from_secs(5)))
        .ok()
        .filter(|r| r.status == 200)
        .and_then(|r| serde_json::from_str(&r.body).ok())
        .unwrap_or(Value::Null)
}

/// The open serial stream of salad whose name or key is `link` (or its file name).
fn serial_stream(gw: &Gateway, admin: &str, link: &Path) -> Option<Value> {
    let file_name = link.file_name()?.to_string_lossy().into_owned();
    let names = |p: &Value, field: &str| {
        p[field]
            .as_str()
            .is_some_and(|n| n == file_name || Path::new(n) == link)
    };
    salad_get(gw, admin, "/api/v1/ports")["ports"]
        .as_array()?
        .iter()
        .find(|p| p["kind"] == "serial" && (names(p, "name") || names(p, "key")))
        .cloned()
}

/// Polls `f` every 250 ms until it gives a value; fails after `timeout` with `context()`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "no {what} after {timeout:?}:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn farm_in_a_box_installed_as_documented() {
    let mut clock = Clock::new();
    for (program, package) in [
        ("dpkg-deb", "dpkg"),
        ("setpriv", "util-linux"),
        ("ip", "iproute2"),
        ("dnsmasq", "dnsmasq-base"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("snmpd", "snmpd"),
        ("snmpget", "snmp"),
        ("python3", "python3"),
        ("systemd-analyze", "systemd"),
    ] {
        require_program(program, package);
    }
    for (path, package) in [
        ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
        ("/usr/lib/ipxe/ipxe.efi", "ipxe"),
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
        ("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf"),
        ("/usr/lib/ipxe/qemu/efi-virtio.rom", "ipxe-qemu"),
        ("/bin/busybox", "busybox-static"),
        ("/lib/modules", "linux-image-amd64"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: install the Debian package {package}"
        );
    }
    let accel = std::env::var("DUTGATE_TEST_ACCEL").unwrap_or_else(|_| "tcg".into());

    // 1. The package.
    let deb = debian::deb_under_test(&debian::target_dir().join("real-farm-test/deb"));
    clock.phase("package (cargo xtask deb --profile dev)");

    let tmp = tempfile::Builder::new()
        .prefix("dutgate-real-farm")
        .tempdir()
        .unwrap();
    // dnsmasq (as nobody) reads the TFTP root and the service user runs the root's binaries.
    chmod(tmp.path(), 0o755);
    let installed = Instant::now();
    let pkg = debian::unpack(&deb, tmp.path());
    let uid = free_id();
    let dialout = group_id("dialout");
    let ns = Netns::create("dgfarm");
    let gw = Gateway {
        config: pkg.root.join(CONFIG.trim_start_matches('/')),
        state: pkg.root.join(STATE.trim_start_matches('/')),
        root: pkg.root.clone(),
        netns: ns.name.clone(),
        uid,
        dialout,
    };
    clock.phase("dpkg-deb -x");

    // What postinst does: the state dir 0700 for dutgate, the config root:dutgate 0640 (its
    // box edits come first, see below), the bootstrap tokens, the DUT image.
    std::fs::create_dir_all(&gw.state).unwrap();
    chown(&gw.state, uid, uid);
    chmod(&gw.state, 0o700);
    let dev = tmp.path().join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    chmod(&dev, 0o755);
    // The PDU of section 9: the APC agent on the gateway's loopback (outside the DUT
    // network, as the docs ask).
    let agent = ns
        .run_inside(|| snmp_agent::Agent::start(24))
        .expect("snmpd in the namespace");
    let packaged = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        box_config(&packaged, &gw.state, &dev, agent.port),
    )
    .unwrap();
    chown(&gw.config, 0, uid);
    chmod(&gw.config, 0o640);
    let out = gw.dutgate(&["tokens", "bootstrap"]);
    assert!(out.status.success(), "tokens bootstrap: {}", text(&out));
    let registration = gw.path("/usr/lib/dutgate/machine-registration");
    let dut_agent = gw.path("/usr/lib/dutgate/dutgate-dut");
    let out = gw.dutgate(&[
        "dut-image",
        "--registration-agent",
        &registration.display().to_string(),
        "--dut-agent",
        &dut_agent.display().to_string(),
    ]);
    assert!(out.status.success(), "dut-image: {}", text(&out));
    let admin = std::fs::read_to_string(gw.state.join("tokens/admin"))
        .unwrap()
        .trim()
        .to_string();
    let check = gw.dutgate(&["config", "check"]);
    assert!(check.status.success(), "config check: {}", text(&check));
    clock.phase("postinst: state dir, tokens bootstrap, dut-image; config check");

    // 2. The DUT network, 3. dnsmasq with the packaged example and Debian's iPXE binaries.
    for args in [
        vec!["link", "add", BRIDGE, "type", "bridge"],
        vec!["addr", "add", &format!("{GATEWAY_IP}/24"), "dev", BRIDGE],
        vec!["link", "set", BRIDGE, "up"],
    ] {
        ns.ip(&args);
    }
    let tftp = tmp.path().join("srv/tftp");
    std::fs::create_dir_all(&tftp).unwrap();
    for file in ["undionly.kpxe", "ipxe.efi"] {
        std::fs::copy(Path::new("/usr/lib/ipxe").join(file), tftp.join(file)).unwrap();
    }
    let example = gw.path("/usr/share/doc/dutgate/examples/dnsmasq-dut-network.conf");
    let example =
        std::fs::read_to_string(&example).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let dnsmasq_conf = tmp.path().join("dnsmasq.d/dutgate.conf");
    std::fs::create_dir_all(dnsmasq_conf.parent().unwrap()).unwrap();
    std::fs::write(&dnsmasq_conf, box_dnsmasq(&example, &tftp)).unwrap();
    let conf_arg = format!("--conf-file={}", dnsmasq_conf.display());
    debian::run_ok(
        ns.cmd("dnsmasq").args(["--test", &conf_arg]),
        "dnsmasq-base",
    );
    let mut dnsmasq = ns.cmd("dnsmasq");
    dnsmasq
        .args(["--keep-in-foreground", "--log-facility=-", &conf_arg])
        .arg(format!(
            "--dhcp-leasefile={}",
            tmp.path().join("dnsmasq.leases").display()
        ))
        .arg(format!(
            "--pid-file={}",
            tmp.path().join("dnsmasq.pid").display()
        ));
    let dnsmasq = Daemon::spawn(dnsmasq, tmp.path().join("dnsmasq.log"));
    clock.phase("DUT network: bridge dut0, dnsmasq");

    // 6. The services: each unit's ExecStart.
    let units = debian::service_units();
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let services: Vec<(String, Daemon)> = units
        .iter()
        .map(|unit| {
            let daemon = gw.start_unit(unit, logs.join(format!("{unit}.log")));
            (unit.clone(), daemon)
        })
        .collect();
    let service_logs = || {
        services
            .iter()
            .map(|(u, d)| format!("--- {u}:\n{}", d.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let status = wait_for(
        "dutctl status healthy",
        Duration::from_secs(60),
        service_logs,
        || {
            let out = gw.dutctl(&["status"]);
            out.status.success().then(|| text(&out))
        },
    );
    println!("dutctl status:\n{status}");
    clock.phase("services started, dutctl status healthy");

    // 9. The PDU.
    let ports = gw.dutctl_ok(&["pdus", "ports", "rack1"]);
    println!("dutctl pdus ports rack1:\n{ports}");

    // 10. Serial adapters, and the DUTs cabled to them, the DUT network and the PDU.
    let lab = Lab {
        netns: ns.name.clone(),
        accel: accel.clone(),
        dir: tmp.path().to_path_buf(),
    };
    let mut adapters = Vec::new();
    let mut duts = Vec::new();
    for (i, (name, mac, firmware, outlet, _)) in DUTS.iter().enumerate() {
        let adapter = SerialAdapter::new(
            dev.join(format!("ttyUSB-farm{i}")),
            tmp.path().join(format!("{name}.console.sock")),
            dialout,
        );
        duts.push(Dut::new(&lab, name, mac, *firmware, *outlet, &adapter));
        adapters.push(adapter);
    }
    let outlets = agent.dir.path().join("state/apc_rpdu2.json");
    let mains = Mains::start(duts, move |n| {
        let text = std::fs::read_to_string(&outlets).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v[n.to_string()].as_bool()
    });
    // salad opens both adapters from its glob.
    for adapter in &adapters {
        wait_for(
            "salad opening the serial adapter",
            Duration::from_secs(10),
            service_logs,
            || serial_stream(&gw, &admin, &adapter.link),
        );
    }
    clock.phase("serial adapters opened by salad");

    // 12. Discovery and training.
    let context = || {
        let mut s = format!("machines: {:#?}\n", gw.machines());
        for (name, ..) in DUTS {
            let dir = tmp.path().join(name);
            let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
            logs.sort();
            if let Some(last) = logs.last() {
                s.push_str(&format!("--- {}:\n{}\n", last.display(), tail(last, 20)));
            }
        }
        s.push_str(&format!("--- dnsmasq:\n{}\n", dnsmasq.log_tail(30)));
        s.push_str(&service_logs());
        s
    };
    let mut ids = Vec::new();
    for (name, mac, _, outlet, _) in DUTS {
        let t = Instant::now();
        let out = gw.dutctl(&[
            "machines",
            "discover",
            "rack1",
            &outlet.to_string(),
            "--wait",
        ]);
        assert!(
            out.status.success(),
            "discover {name}: {}\n{}",
            text(&out),
            context()
        );
        println!(
            "dutctl machines discover rack1 {outlet} --wait ({name}, {:.1} s):\n{}",
            t.elapsed().as_secs_f64(),
            text(&out)
        );
        let id = wait_for("the machine", Duration::from_secs(10), context, || {
            gw.machines()
                .into_iter()
                .find(|m| m["mac_address"] == mac || m["id"] == mac)
                .and_then(|m| m["id"].as_str().map(String::from))
        });
        ids.push(id);
    }
    clock.phase("discovery: both DUTs registered");
    let mut seen = std::collections::BTreeMap::new();
    wait_for(
        "both machines IDLE",
        Duration::from_secs(420),
        context,
        || {
            let machines = gw.machines();
            for m in &machines {
                let id = m["id"].as_str().unwrap_or_default().to_string();
                let state = m["state"].as_str().unwrap_or_default().to_string();
                if seen.get(&id) != Some(&state) {
                    println!("[machines] {id}: {state}");
                    seen.insert(id, state);
                }
            }
            ids.iter()
                .all(|id| {
                    machines
                        .iter()
                        .any(|m| m["id"] == id.as_str() && m["state"] == "IDLE")
                })
                .then_some(())
        },
    );
    clock.phase("training: both DUTs IDLE (2 of 2 check boots)");
    // Each DUT registered from its static lease, on its serial port; the UEFI one went
    // through UEFI PXE (TFTP of ipxe.efi), the BIOS one straight from its NIC's iPXE.
    let machines = gw.machines();
    for ((name, _, firmware, _, ip), id) in DUTS.iter().zip(&ids) {
        let m = machines
            .iter()
            .find(|m| m["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{name} ({id}) is not in {machines:#?}"));
        assert_eq!(m["ip_address"], *ip, "{name}'s address: {m:#}");
        assert_eq!(m["local_tty_device"], "ttyS0", "{name}'s console: {m:#}");
        let tftp = format!("sent {} to {ip}", tftp.join("ipxe.efi").display());
        assert_eq!(
            dnsmasq.output().contains(&tftp),
            *firmware == Firmware::Uefi,
            "{name}: `{tftp}` in dnsmasq's log:\n{}",
            dnsmasq.log_tail(40)
        );
    }

    // 7. A runner's token, 13. the first job, submitted from outside the state dir.
    let runner = gw.dutctl_ok(&["tokens", "create", "box-runner", "--role", "runner"]);
    let runner = runner.trim().to_string();
    assert!(runner.len() >= 16, "dutctl tokens create printed no token");
    let hello = gw.path("/usr/share/doc/dutgate/examples/hello.yml");
    let share = tmp.path().join("job1");
    let t = Instant::now();
    let run = debian::output(
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(gw.path("/usr/bin/dutctl"))
            .arg("--url")
            .arg(format!("http://127.0.0.1:{EXECUTOR}"))
            .arg("run")
            .arg(&hello)
            .arg("--share-dir")
            .arg(&share)
            .env("DUTGATE_TOKEN", &runner)
            .env("HOME", tmp.path())
            .stdin(Stdio::null()),
        "iproute2",
    );
    let said = text(&run);
    assert!(!said.contains(&runner), "dutctl run printed the token");
    assert!(
        run.status.success(),
        "the first job did not PASS ({}):\n{said}\n{}",
        run.status,
        context()
    );
    let to_first_job = installed.elapsed();
    println!(
        "dutctl run hello.yml ({:.1} s):\n{said}",
        t.elapsed().as_secs_f64()
    );
    let bucket_file = std::fs::read_to_string(share.join("bucket/hello.txt"))
        .unwrap_or_else(|e| panic!("{}/bucket/hello.txt: {e}", share.display()));
    assert!(
        bucket_file.starts_with("Hello from"),
        "hello.txt: {bucket_file}"
    );
    let console = std::fs::read_to_string(share.join("console.log")).unwrap_or_default();
    assert!(
        console.contains("Hello from"),
        "the job's console.log:\n{console}"
    );
    clock.phase("first job PASS (runner token)");
    println!(
        "dpkg-deb -x -> first job PASS: {:.1} s (the \"dpkg -i -> first job\" figure)",
        to_first_job.as_secs_f64()
    );

    // Unplugging an adapter and plugging it back keeps its machine's console port.
    let adapter = &adapters[0];
    let stream = serial_stream(&gw, &admin, &adapter.link).expect("the bios adapter is open");
    let machine = stream["machine"]
        .as_str()
        .unwrap_or_else(|| panic!("the bios adapter is bound to no machine: {stream}"))
        .to_string();
    assert_eq!(machine, ids[0], "the bios adapter's machine");
    let port_of =
        |id: &str| salad_get(&gw, &admin, &format!("/api/v1/machine/{id}"))["tcp_port"].as_u64();
    let tcp_port = port_of(&machine).expect("the machine's console port") as u16;
    let mut client = ns
        .connect(
            SocketAddr::from(([127, 0, 0, 1], tcp_port)),
            Duration::from_secs(5),
        )
        .expect("a client on the console port");
    adapter.unplug();
    wait_for(
        "salad closing the unplugged adapter",
        Duration::from_secs(10),
        service_logs,
        || {
            serial_stream(&gw, &admin, &adapter.link)
                .is_none()
                .then_some(())
        },
    );
    adapter.plug();
    let reopened = wait_for(
        "salad reopening the replugged adapter",
        Duration::from_secs(10),
        service_logs,
        || serial_stream(&gw, &admin, &adapter.link).filter(|s| s["machine"] == machine.as_str()),
    );
    println!("replugged: {reopened}");
    assert_eq!(
        port_of(&machine),
        Some(u64::from(tcp_port)),
        "console port after replug"
    );
    let line = "console continues after the replug";
    adapter.dut_says(format!("{line}\r\n").as_bytes());
    seen_on(&mut client, line);
    clock.phase("serial adapter unplugged and replugged: same console port");

    // The units' exposure, as systemd-analyze rates them.
    for unit in &units {
        let score = debian::exposure(&gw.root.join(UNIT_DIR).join(unit));
        println!("systemd-analyze security --offline=yes {unit}: exposure {score:.1}");
    }
    clock.phase("systemd-analyze security");

    let mains_duts = mains.stop();
    drop(mains_duts);
    drop(services);
    drop(dnsmasq);
    println!("--- timings");
    for (name, took) in &clock.rows {
        println!("{:>7.1} s  {name}", took.as_secs_f64());
    }
    println!(
        "dpkg-deb -x -> first job PASS: {:.1} s; whole test: {:.1} s",
        to_first_job.as_secs_f64(),
        clock.start.elapsed().as_secs_f64()
    );
}

/// Reads `client` until `line` comes by (10 s at most).
fn seen_on(client: &mut TcpStream, line: &str) {
    client
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(10) {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if String::from_utf8_lossy(&got).contains(line) {
            return;
        }
    }
    panic!(
        "the console port's client did not see {line:?}; it got:\n{}",
        String::from_utf8_lossy(&got)
    );
}
