//! The Debian package of the gateway (`cargo xtask deb`), as a farm admin installs it
//! (docs/install.md):
//!
//! - its files, modes, owners, conffiles and control fields (`dpkg-deb -c`, `-e`, `-f`);
//! - its `/etc/dutgate/gateway.yml` passes the packaged `dutgate config check`;
//! - its systemd units pass `systemd-analyze verify` in the unpacked package root and score at
//!   most 4.0 in `systemd-analyze security --offline=yes` (each score is printed);
//! - the real dpkg in a copy-on-write view of this machine (an overlay of `/` in a mount and
//!   network namespace of its own: the host is never changed):
//!   1. `dpkg -i` in a chroot of the view, with no systemd running: the `dutgate` system user
//!      in `dialout`, the 0700 state dir, the bootstrap tokens (0600, never in dpkg's output),
//!      the DUT image, the enabled units;
//!   2. every unit's `ExecStart` run as its `User=`/`Group=`/`SupplementaryGroups=` with its
//!      `UMask=`, as on machines without systemd: `dutctl status` reports every service healthy
//!      and the boot service serves the DUT image at `/dut-image/vmlinuz`;
//!   3. the view booted with systemd as PID 1 (`systemd-nspawn --boot`): the enabled units
//!      start with every hardening key in force (checked: user, capabilities, no new
//!      privileges, seccomp, read-only system with a writable state dir, hidden /root), and
//!      are healthy; `dpkg -i` again (the upgrade path) restarts them and keeps tokens and
//!      state; `dpkg -r` stops them and keeps the state;
//!   4. `dpkg -P` in the chroot deletes the state;
//! - the Containerfile copies only paths that exist and builds only workspace binaries.
//!
//! The package is built from the debug binaries (`cargo xtask deb --profile dev`: the test
//! suite builds them anyway), or `DUTGATE_TEST_DEB=<file.deb>` names one to check (e.g. the
//! release package). Needs root (overlayfs, namespaces, chroot) and the Debian packages
//! systemd (systemd-analyze), systemd-container (systemd-nspawn), dpkg, adduser,
//! init-system-helpers, util-linux, iproute2, curl, busybox-static and linux-image-amd64 (the
//! DUT image). Time on 2 cores once the debug binaries are built: 50 s, of which 36 s for
//! `cargo xtask deb --profile dev` (cargo's up-to-date checks, relinking, zstd) and 12 s for the
//! dpkg round trip with the services run twice (as ExecStart lines, then under systemd).
//! With `DUTGATE_TEST_DEB` (no packaging): 20 s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use dutgate_core::ServiceName;

// Building, unpacking and reading the package, shared with tests/real_farm.rs.
#[allow(dead_code)]
#[path = "../../../tests/debian.rs"]
mod debian;

use debian::{
    CONFIG, Package, STATE, UNIT_DIR, output, run_ok, service_units, text, unit_value,
    workspace_root,
};

const MAX_EXPOSURE: f64 = 4.0;

/// The package under test, unpacked once for every test of this file.
fn package() -> &'static Package {
    static PACKAGE: OnceLock<Package> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        let work = debian::target_dir().join("install-test");
        let deb = debian::deb_under_test(&work.join("deb"));
        debian::unpack(&deb, &work)
    })
}

/// `[Service]` (and every other section's) `key=value` lines of a unit file, in order.
fn unit_keys(unit: &str) -> Vec<(String, String)> {
    debian::unit_keys(&package().root, unit)
}

#[test]
fn package_holds_the_gateway_with_root_owned_files_and_one_conffile() {
    let pkg = package();
    let listing = text(&run_ok(Command::new("dpkg-deb").arg("-c").arg(&pkg.deb), "dpkg").stdout);
    // `-rwxr-xr-x root/root 1234 2024-01-01 00:00 ./usr/bin/dutgate`
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 6, "unexpected dpkg-deb -c line: {line}");
        assert_eq!(fields[1], "root/root", "not root-owned: {line}");
        let path = fields[5].trim_start_matches('.').to_string();
        if !fields[0].starts_with('d') {
            files.insert(path, fields[0].to_string());
        }
    }
    let mut wanted: BTreeMap<String, &str> = BTreeMap::new();
    for bin in [
        "/usr/bin/dutgate",
        "/usr/bin/dutctl",
        "/usr/lib/dutgate/machine-registration",
        "/usr/lib/dutgate/dutgate-dut",
    ] {
        wanted.insert(bin.into(), "-rwxr-xr-x");
    }
    wanted.insert(CONFIG.into(), "-rw-r--r--");
    wanted.insert(format!("/{UNIT_DIR}/dutgate.target"), "-rw-r--r--");
    for unit in service_units() {
        wanted.insert(format!("/{UNIT_DIR}/{unit}"), "-rw-r--r--");
    }
    for doc in [
        "install.md",
        "configuration.md",
        "security.md",
        "examples/dnsmasq-dut-network.conf",
        "examples/nftables-dut-network.nft",
        "examples/boot.ipxe",
        "examples/hello.yml",
    ] {
        wanted.insert(format!("/usr/share/doc/dutgate/{doc}"), "-rw-r--r--");
    }
    for (path, mode) in &wanted {
        assert_eq!(
            files.get(path).map(String::as_str),
            Some(*mode),
            "{path} in the package with mode {mode}"
        );
    }
    let unexpected: Vec<&String> = files
        .keys()
        .filter(|p| !wanted.contains_key(*p))
        .filter(|p| !(p.starts_with("/usr/share/doc/dutgate/") && p.ends_with(".md")))
        .collect();
    assert!(unexpected.is_empty(), "unexpected files: {unexpected:?}");
    println!(
        "package {}: {} files, {:.1} MiB",
        pkg.deb.display(),
        files.len(),
        std::fs::metadata(&pkg.deb).unwrap().len() as f64 / 1048576.0
    );

    let conffiles = std::fs::read_to_string(pkg.control.join("conffiles")).unwrap();
    assert_eq!(conffiles, format!("{CONFIG}\n"));
    let field = |name: &str| {
        text(
            &run_ok(
                Command::new("dpkg-deb").arg("-f").arg(&pkg.deb).arg(name),
                "dpkg",
            )
            .stdout,
        )
        .trim()
        .to_string()
    };
    assert_eq!(field("Package"), "dutgate");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Architecture"), "amd64");
    let depends = field("Depends");
    for dep in [
        "libc6 (>= 2.",
        "adduser",
        "busybox-static",
        "init-system-helpers",
    ] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }

    let units: BTreeSet<String> = std::iter::once("dutgate.target".to_string())
        .chain(service_units())
        .collect();
    for script in ["postinst", "prerm", "postrm"] {
        let path = pkg.control.join(script);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o755, "{script} mode");
        run_ok(Command::new("sh").arg("-n").arg(&path), "dash");
        let body = std::fs::read_to_string(&path).unwrap();
        assert!(
            !body.contains("#UNITS#"),
            "{script}: unit list not filled in"
        );
        if let Some(line) = body.lines().find(|l| l.starts_with("UNITS=")) {
            let listed: BTreeSet<String> = line
                .trim_start_matches("UNITS=")
                .trim_matches('"')
                .split_whitespace()
                .map(String::from)
                .collect();
            assert_eq!(listed, units, "{script}: the units it enables or purges");
        }
    }
}

#[test]
fn packaged_config_passes_config_check_and_names_the_dut_network() {
    let pkg = package();
    let config = pkg.root.join(CONFIG.trim_start_matches('/'));
    let out = run_ok(
        Command::new(pkg.root.join("usr/bin/dutgate"))
            .env_clear()
            .arg("--config")
            .arg(&config)
            .args(["config", "check"]),
        "dutgate",
    );
    let effective = text(&out.stdout);
    assert!(
        effective.contains("dut_networks:\n    - 10.42.0.0/24"),
        "gateway.auth.dut_networks of the packaged config:\n{effective}"
    );
    assert!(effective.contains(&format!("state_dir: {STATE}")));
    // Registration, training and users' jobs boot the DUT image from the boot service's
    // stable URLs; no other server is named.
    for var in [
        "url: http://10.42.0.1:8003/dut-image/vmlinuz",
        "- url: http://10.42.0.1:8003/dut-image/initramfs.cpio",
        "dut_kernel_url: http://10.42.0.1:8003/dut-image/vmlinuz",
        "dut_initramfs_url: http://10.42.0.1:8003/dut-image/initramfs.cpio",
    ] {
        assert!(effective.contains(var), "{var} in:\n{effective}");
    }
    assert!(!effective.contains(":8080"), "{effective}");
}

#[test]
fn units_pass_systemd_analyze_verify_and_score_at_most_4() {
    let pkg = package();
    let unit_dir = pkg.root.join(UNIT_DIR);
    let present: BTreeSet<String> = std::fs::read_dir(&unit_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut expected: BTreeSet<String> = service_units().into_iter().collect();
    expected.insert("dutgate.target".into());
    // No socket units: the port of every service comes from the config only.
    assert_eq!(present, expected, "the package's units");

    let services = service_units();
    for (unit, name) in services.iter().zip(ServiceName::ALL) {
        let keys = unit_keys(unit);
        let value = |k: &str| unit_value(&keys, k).unwrap_or_default();
        assert_eq!(
            value("ExecStart"),
            format!(
                "/usr/bin/dutgate --config {CONFIG} --state-dir {STATE} {}",
                name.as_str()
            ),
            "{unit}"
        );
        assert_eq!(value("User"), "dutgate", "{unit}");
        assert_eq!(value("Group"), "dutgate", "{unit}");
        assert_eq!(value("StateDirectory"), "dutgate", "{unit}");
        assert_eq!(value("StateDirectoryMode"), "0700", "{unit}");
        assert_eq!(value("Type"), "notify", "{unit}");
        assert_eq!(value("WantedBy"), "dutgate.target", "{unit}");
        assert_eq!(value("PartOf"), "dutgate.target", "{unit}");
        for (k, v) in &keys {
            let digits = v.split(|c: char| !c.is_ascii_digit());
            assert!(
                !digits
                    .into_iter()
                    .any(|d| d.len() == 4 && d.starts_with(['8', '9'])),
                "{unit}: {k}={v} looks like a port number; ports come from the config"
            );
        }
        let devices: Vec<String> = keys
            .iter()
            .filter(|(k, _)| k == "DeviceAllow")
            .map(|(_, v)| v.clone())
            .collect();
        if matches!(name, ServiceName::Salad | ServiceName::Pdu) {
            // Serial consoles and serial PDUs: the adapters, hot-plugged, group dialout.
            assert!(devices.iter().any(|d| d == "char-ttyUSB rw"), "{unit}");
            assert!(devices.iter().any(|d| d == "char-ttyACM rw"), "{unit}");
            assert_eq!(value("SupplementaryGroups"), "dialout", "{unit}");
            assert_eq!(value("PrivateDevices"), "", "{unit} needs the host's /dev");
        } else {
            assert!(devices.is_empty(), "{unit}: {devices:?}");
            assert_eq!(value("PrivateDevices"), "yes", "{unit}");
        }
    }
    let executor = unit_keys("dutgate-executor.service");
    assert_eq!(
        unit_value(&executor, "KillMode").as_deref(),
        Some("process"),
        "job processes outlive an executor restart"
    );
    let target = unit_keys("dutgate.target");
    assert_eq!(
        unit_value(&target, "WantedBy").as_deref(),
        Some("multi-user.target")
    );

    // `verify --root` resolves ExecStart= in the package root, and needs the system's own
    // units (sysinit.target, network-online.target, …) there too.
    let system_units = pkg.root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&system_units).unwrap();
    let host_units = Path::new("/lib/systemd/system");
    for entry in std::fs::read_dir(host_units)
        .unwrap_or_else(|e| panic!("{}: {e} (Debian package systemd)", host_units.display()))
    {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("dutgate") {
            continue;
        }
        let to = system_units.join(&name);
        if !to.exists() && entry.path().is_file() {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    let mut units: Vec<String> = vec!["dutgate.target".into()];
    units.extend(services.iter().cloned());
    let out = output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", pkg.root.display()))
            .args(&units)
            .current_dir(&unit_dir),
        "systemd",
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );
    println!("systemd-analyze verify: {} units OK", units.len());

    let mut too_exposed = Vec::new();
    for unit in &services {
        let score = debian::exposure(&unit_dir.join(unit));
        println!("systemd-analyze security --offline=yes {unit}: exposure {score:.1}");
        if score > MAX_EXPOSURE {
            too_exposed.push(format!("{unit}: {score:.1}"));
        }
    }
    assert!(
        too_exposed.is_empty(),
        "exposure above {MAX_EXPOSURE}: {too_exposed:?}"
    );
}

/// A copy-on-write view of this machine: `/` under an overlay whose upper layer is a
/// directory of the test, mounted in a mount and network namespace held by a `sleep`, so
/// that dpkg, adduser and the services change nothing of the host and bind the default
/// ports without meeting other tests.
struct Overlay {
    dir: tempfile::TempDir,
    holder: Child,
    merged: PathBuf,
}

/// What a chroot into the view needs: /proc, /dev and /sys, and an empty /run (no
/// /run/systemd/system: the maintainer scripts see no running systemd) and /tmp.
fn chroot_mounts(merged: &Path) -> String {
    let m = merged.display();
    format!(
        "mount -t proc proc {m}/proc && mount --rbind /dev {m}/dev && \
         mount -t sysfs sysfs {m}/sys && mount -t tmpfs tmpfs {m}/run && \
         mount -t tmpfs tmpfs {m}/tmp"
    )
}

/// systemd-nspawn mounts its own and refuses a populated /dev.
fn chroot_unmounts(merged: &Path) -> String {
    let m = merged.display();
    format!("umount -R {m}/proc {m}/dev {m}/sys {m}/run {m}/tmp")
}

impl Overlay {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (upper, work, merged) = (
            dir.path().join("upper"),
            dir.path().join("work"),
            dir.path().join("merged"),
        );
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let ready = dir.path().join("ready");
        let m = merged.display();
        let script = format!(
            "set -e
             mount -t overlay overlay -o lowerdir=/,upperdir={},workdir={} {m}
             {}
             ip link set lo up
             : > {}
             exec sleep 100000",
            upper.display(),
            work.display(),
            chroot_mounts(&merged),
            ready.display()
        );
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--net", "sh", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run unshare: {e} (Debian package util-linux)"));
        let mut overlay = Overlay {
            dir,
            holder,
            merged,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if let Ok(Some(status)) = overlay.holder.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = overlay.holder.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!(
                    "the overlay of / could not be set up ({status}; this test needs root, \
                     overlayfs and iproute2):\n{err}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "the overlay was not ready in 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        overlay
    }

    /// A host path of the upper layer (what the view changed), e.g. `/var/lib/dutgate`.
    fn upper(&self, path: &str) -> PathBuf {
        self.dir
            .path()
            .join("upper")
            .join(path.trim_start_matches('/'))
    }

    /// A shell command in the view's mount namespace, outside the chroot.
    fn mounts(&self, script: &str) {
        run_ok(
            Command::new("nsenter")
                .arg(format!("--target={}", self.holder.id()))
                .args(["--mount", "--", "sh", "-c", script]),
            "util-linux",
        );
    }

    /// A command inside the view (its namespaces, chrooted).
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.holder.id()))
            .args(["--mount", "--net", "--", "chroot"])
            .arg(&self.merged)
            .arg(program)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8");
        cmd
    }

    fn sh(&self, script: &str) -> Output {
        output(self.command("sh").args(["-c", script]), "util-linux")
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the view: {script}\nfailed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `stat -c '%a %U:%G'` of a path in the view.
    fn mode_owner(&self, path: &str) -> String {
        self.sh_ok(&format!("stat -c '%a %U:%G' {path}"))
            .trim()
            .to_string()
    }

    /// Starts a unit's `ExecStart` the way systemd would: as `User=`, `Group=` plus
    /// `SupplementaryGroups=`, with `UMask=`, in a clean environment.
    fn start_unit(&self, unit: &str, log: &Path) -> Child {
        let keys = unit_keys(unit);
        let value = |k: &str| unit_value(&keys, k).unwrap_or_else(|| panic!("{unit}: no {k}="));
        let mut groups = vec![value("Group")];
        groups.extend(unit_value(&keys, "SupplementaryGroups"));
        let exec = value("ExecStart");
        let log_file = std::fs::File::create(log).unwrap();
        self.command("setpriv")
            .arg(format!("--reuid={}", value("User")))
            .arg(format!("--regid={}", value("Group")))
            .arg(format!("--groups={}", groups.join(",")))
            .args(["--", "sh", "-c", "umask \"$0\" && exec \"$@\""])
            .arg(value("UMask"))
            .args(exec.split_whitespace())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {unit}: {e} (Debian package util-linux)"))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // The mounts go with the namespace, once its last process is gone.
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// The overlay's view booted by `systemd-nspawn --boot`: systemd as PID 1 starts the enabled
/// units, as on a gateway (the host's policy-rc.d, which forbids starting services, is removed
/// from the view first). Powered off when dropped.
struct Container {
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    init: u32,
}

impl Container {
    fn boot(overlay: &Overlay, logs: &Path) -> Self {
        overlay.sh_ok("rm -f /usr/sbin/policy-rc.d");
        overlay.mounts(&chroot_unmounts(&overlay.merged));
        let log = std::fs::File::create(logs.join("nspawn.log")).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", overlay.holder.id()))
            .args(["--mount", "--", "systemd-nspawn", "--directory"])
            .arg(&overlay.merged)
            .args([
                "--boot",
                "--private-network",
                "--register=no",
                "--console=pipe",
            ]);
        // Without a systemd on the host there is no scope to create: use the caller's cgroup.
        if !Path::new("/run/systemd/system").exists() {
            cmd.arg("--keep-unit");
        }
        // Booted into dutgate.target, which pulls the enabled units (and not the other
        // services this machine happens to have installed).
        cmd.arg("systemd.unit=dutgate.target");
        let mut nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run systemd-nspawn: {e} (Debian package systemd-container)")
            });
        let children = format!("/proc/{0}/task/{0}/children", nspawn.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        let init = loop {
            let first = std::fs::read_to_string(&children)
                .ok()
                .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()));
            if let Some(pid) = first {
                break pid;
            }
            if let Ok(Some(status)) = nspawn.try_wait() {
                let said = std::fs::read_to_string(logs.join("nspawn.log")).unwrap_or_default();
                panic!(
                    "systemd-nspawn exited ({status}) (Debian package systemd-container):\n{said}"
                );
            }
            assert!(
                Instant::now() < deadline,
                "systemd-nspawn started no init in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Container { nspawn, init }
    }

    /// A shell command in the container (every namespace of its PID 1).
    fn sh(&self, script: &str) -> Output {
        output(
            Command::new("nsenter")
                .arg(format!("--target={}", self.init))
                .args(["--all", "--", "sh", "-c", script])
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("LANG", "C.UTF-8"),
            "util-linux",
        )
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container: {script}\nfailed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Waits until every unit is active and `dutctl status` says every service is healthy;
    /// returns each unit's main PID (in the container). Fails on a unit that failed.
    fn wait_healthy(&self, tokens: &[(String, Vec<u8>)]) -> BTreeMap<String, u32> {
        let units = service_units();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let states = text(
                &self
                    .sh(&format!("systemctl is-active {}", units.join(" ")))
                    .stdout,
            );
            let failed = states.lines().any(|s| s.trim() == "failed");
            let active = states.lines().filter(|s| s.trim() == "active").count() == units.len();
            let status = self.sh(&format!(
                "runuser -u dutgate -- dutctl --state-dir {STATE} status 2>&1"
            ));
            if active && status.status.success() {
                let mut pids = BTreeMap::new();
                for unit in &units {
                    let pid = self.sh_ok(&format!("systemctl show -p MainPID --value {unit}"));
                    pids.insert(unit.clone(), pid.trim().parse().unwrap());
                }
                return pids;
            }
            if failed || Instant::now() > deadline {
                let journal = text(
                    &self
                        .sh("systemctl status --no-pager --lines=20 'dutgate*' 2>&1")
                        .stdout,
                );
                assert_no_token(&journal, tokens, "the journal");
                panic!(
                    "the units did not come up under systemd:\n{states}\n{}\n{journal}",
                    text(&status.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// What systemd applied to each service's main process: its user, no capabilities, no
    /// new privileges, a seccomp filter; and a read-only system with a writable state dir in
    /// its mount namespace.
    fn check_sandboxes(&self, main_pids: &BTreeMap<String, u32>, (uid, gid): (u32, u32)) {
        for (unit, pid) in main_pids {
            let status = self.sh_ok(&format!("cat /proc/{pid}/status"));
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}:")))
                    .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
                    .unwrap_or_else(|| panic!("{unit}: no {name} in /proc/{pid}/status"))
            };
            assert_eq!(field("Uid"), uid.to_string(), "{unit} runs as dutgate");
            assert_eq!(field("CapEff"), "0000000000000000", "{unit}: capabilities");
            assert_eq!(field("CapBnd"), "0000000000000000", "{unit}: bounding set");
            assert_eq!(field("NoNewPrivs"), "1", "{unit}: NoNewPrivileges");
            assert_eq!(field("Seccomp"), "2", "{unit}: SystemCallFilter");
            // Its mount namespace, entered as its user.
            let probe = format!(
                "nsenter --target={pid} --mount --setuid={uid} --setgid={gid} sh -c \
                 'touch {STATE}/.probe && rm {STATE}/.probe && ! touch /usr/lib/dutgate/.probe 2>/dev/null && ! ls /root >/dev/null 2>&1'"
            );
            let out = self.sh(&probe);
            assert!(
                out.status.success(),
                "{unit}: the state dir must be writable, /usr read-only and /root hidden:\n{}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.sh("systemctl poweroff --no-block");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.nspawn.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        // Killing its init ends every process of the container's PID namespace: killing
        // systemd-nspawn alone would leave them running.
        // SAFETY: kill(2) on the container's init, which lives as long as systemd-nspawn, a
        // child of ours not yet waited for.
        unsafe {
            libc::kill(self.init as i32, libc::SIGKILL);
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// Sends SIGTERM to the services and waits for them (SIGKILL after 10 s).
fn stop(children: &mut [(String, Child)]) {
    for (_, c) in children.iter() {
        // SAFETY: kill(2) on the pid of a child of ours that has not been waited for.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (_, c) in children.iter_mut() {
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn tokens(overlay: &Overlay) -> Vec<(String, Vec<u8>)> {
    ["admin", "user", "service"]
        .iter()
        .map(|name| {
            let path = overlay.upper(&format!("{STATE}/tokens/{name}"));
            let token = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name.to_string(), token)
        })
        .collect()
}

/// Fails when `said` contains any of the tokens (without printing them).
fn assert_no_token(said: &str, tokens: &[(String, Vec<u8>)], what: &str) {
    for (name, token) in tokens {
        let token = text(token).trim().to_string();
        assert!(
            token.len() >= 16,
            "tokens/{name} is too short to be a token"
        );
        assert!(!said.contains(&token), "{what} shows the {name} token");
    }
}

#[test]
fn dpkg_install_runs_the_units_and_an_upgrade_keeps_the_state() {
    let pkg = package();
    for (package, path) in [
        ("linux-image-amd64", "/lib/modules"),
        ("busybox-static", "/bin/busybox"),
        ("init-system-helpers", "/usr/bin/deb-systemd-helper"),
        ("adduser", "/usr/sbin/adduser"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: install the Debian package {package}"
        );
    }
    let started = Instant::now();
    let overlay = Overlay::new();
    // Into the view through its upper layer: CARGO_TARGET_DIR may be on another file system.
    let deb_upper = overlay.upper("/root/dutgate.deb");
    std::fs::create_dir_all(deb_upper.parent().unwrap()).unwrap();
    std::fs::copy(&pkg.deb, &deb_upper).unwrap();
    overlay.sh_ok("! getent passwd dutgate && ! test -e /var/lib/dutgate");

    let t = Instant::now();
    let install = overlay.sh("dpkg -i /root/dutgate.deb 2>&1");
    let said = text(&install.stdout);
    assert!(install.status.success(), "dpkg -i failed:\n{said}");
    println!("dpkg -i: {:.1?}\n{said}", t.elapsed());
    let first_tokens = tokens(&overlay);
    assert_no_token(&said, &first_tokens, "dpkg -i's output");

    // What postinst did.
    let passwd = overlay.sh_ok("getent passwd dutgate");
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    let gid: u32 = fields[3].parse().unwrap();
    assert!(uid < 1000, "dutgate is a system user: {passwd}");
    assert_eq!(fields[5], STATE, "{passwd}");
    assert!(fields[6].ends_with("nologin"), "{passwd}");
    let groups = overlay.sh_ok("id -nG dutgate");
    assert!(
        groups.split_whitespace().any(|g| g == "dialout"),
        "dutgate in dialout: {groups}"
    );
    assert_eq!(overlay.mode_owner(STATE), "700 dutgate:dutgate");
    assert_eq!(
        overlay.mode_owner(&format!("{STATE}/tokens")),
        "700 dutgate:dutgate"
    );
    for name in ["admin", "user", "service"] {
        assert_eq!(
            overlay.mode_owner(&format!("{STATE}/tokens/{name}")),
            "600 dutgate:dutgate",
            "tokens/{name}"
        );
    }
    assert_eq!(overlay.mode_owner(CONFIG), "640 root:dutgate");
    for file in ["vmlinuz", "initramfs.cpio", "image.json"] {
        assert!(
            overlay
                .upper(&format!("{STATE}/dut-image/{file}"))
                .is_file(),
            "postinst built the DUT image: {file}"
        );
    }
    let mut enabled =
        vec!["/etc/systemd/system/multi-user.target.wants/dutgate.target".to_string()];
    enabled.extend(
        service_units()
            .iter()
            .map(|u| format!("/etc/systemd/system/dutgate.target.wants/{u}")),
    );
    for link in &enabled {
        overlay.sh_ok(&format!("test -L {link}"));
    }

    // Every unit's ExecStart as its user: a running gateway.
    let t = Instant::now();
    let logs = tempfile::tempdir().unwrap();
    let mut services: Vec<(String, Child)> = service_units()
        .into_iter()
        .map(|unit| {
            let child = overlay.start_unit(&unit, &logs.path().join(format!("{unit}.log")));
            (unit, child)
        })
        .collect();
    let status_cmd = format!("runuser -u dutgate -- dutctl --state-dir {STATE} status 2>&1");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let out = overlay.sh(&status_cmd);
        if out.status.success() {
            break text(&out.stdout);
        }
        let exited: Vec<String> = services
            .iter_mut()
            .filter_map(|(unit, c)| {
                c.try_wait().ok().flatten().map(|s| {
                    let log = std::fs::read_to_string(logs.path().join(format!("{unit}.log")))
                        .unwrap_or_default();
                    format!("{unit} exited ({s}):\n{log}")
                })
            })
            .collect();
        if !exited.is_empty() || Instant::now() > deadline {
            stop(&mut services);
            panic!(
                "the gateway did not come up:\n{}\n{}",
                text(&out.stdout),
                exited.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("dutctl status after {:.1?}:\n{status}", t.elapsed());
    // The DUT image postinst built, served by the boot service itself. The view's network
    // has no DUT network: the service token stands in for a DUT, and without it loopback is
    // refused like any peer off the DUT network.
    let image_url = "http://127.0.0.1:8003/dut-image/vmlinuz";
    let served = overlay.sh_ok(&format!(
        "curl -s -o /dev/null -w '%{{http_code}} %{{size_download}}' \
         -H \"Authorization: Bearer $(cat {STATE}/tokens/service)\" {image_url}"
    ));
    let size = overlay.sh_ok(&format!("stat -c %s {STATE}/dut-image/vmlinuz"));
    assert_eq!(served, format!("200 {}", size.trim()), "GET {image_url}");
    let refused = overlay.sh_ok(&format!(
        "curl -s -o /dev/null -w '%{{http_code}}' {image_url}"
    ));
    assert_eq!(refused, "403", "GET {image_url} without a token");
    // State the upgrade must keep: a named token in the store the services share.
    overlay.sh_ok(&format!(
        "runuser -u dutgate -- dutgate --config {CONFIG} tokens create alice --role user >/dev/null 2>&1"
    ));
    let t = Instant::now();
    stop(&mut services);
    println!("services stopped in {:.1?}", t.elapsed());
    for (unit, _) in &services {
        let log = std::fs::read_to_string(logs.path().join(format!("{unit}.log"))).unwrap();
        assert_no_token(&log, &first_tokens, &format!("{unit}'s log"));
    }

    // The same view booted with systemd as PID 1: the units as systemd runs them, with every
    // hardening key in force.
    let t = Instant::now();
    let container = Container::boot(&overlay, logs.path());
    let main_pids = container.wait_healthy(&first_tokens);
    println!(
        "systemd-nspawn --boot: every unit active and dutctl status healthy after {:.1?}",
        t.elapsed()
    );
    let t = Instant::now();
    container.check_sandboxes(&main_pids, (uid, gid));
    println!("sandboxes checked in {:.1?}", t.elapsed());

    // The upgrade path of the maintainer scripts (prerm upgrade, postinst configure <old>)
    // under a running systemd: postinst restarts every unit.
    let t = Instant::now();
    let upgrade = container.sh("dpkg -i /root/dutgate.deb 2>&1");
    let said = text(&upgrade.stdout);
    assert!(
        upgrade.status.success(),
        "dpkg -i over the installed package:\n{said}"
    );
    assert_no_token(&said, &first_tokens, "the upgrade's output");
    let restarted = container.wait_healthy(&first_tokens);
    for (unit, pid) in &restarted {
        assert_ne!(main_pids.get(unit), Some(pid), "{unit} was not restarted");
    }
    println!("dpkg -i (upgrade, units restarted): {:.1?}", t.elapsed());
    assert!(
        tokens(&overlay) == first_tokens,
        "the upgrade changed the bootstrap tokens"
    );
    let listed = container.sh_ok(&format!(
        "runuser -u dutgate -- dutgate --config {CONFIG} tokens list"
    ));
    assert!(
        listed.contains("alice"),
        "named tokens after the upgrade:\n{listed}"
    );
    assert_eq!(
        container
            .sh_ok(&format!("stat -c '%a %U:%G' {STATE}"))
            .trim(),
        "700 dutgate:dutgate"
    );

    // Removal stops the units and keeps the state and the config.
    let removed = container.sh("dpkg -r dutgate 2>&1");
    assert!(
        removed.status.success(),
        "dpkg -r:\n{}",
        text(&removed.stdout)
    );
    for unit in service_units() {
        let state = text(&container.sh(&format!("systemctl is-active {unit}")).stdout);
        assert_eq!(state.trim(), "inactive", "{unit} after dpkg -r");
    }
    container.sh_ok(&format!(
        "! test -e /usr/bin/dutgate && test -f {STATE}/tokens/admin && test -f {CONFIG}"
    ));
    let t = Instant::now();
    drop(container);
    println!("container powered off in {:.1?}", t.elapsed());
    overlay.mounts(&chroot_mounts(&overlay.merged));

    let purged = overlay.sh("dpkg -P dutgate 2>&1");
    assert!(
        purged.status.success(),
        "dpkg -P:\n{}",
        text(&purged.stdout)
    );
    overlay.sh_ok(&format!("! test -e {STATE} && ! test -e /etc/dutgate"));
    for link in &enabled {
        overlay.sh_ok(&format!("! test -e {link}"));
    }
    println!(
        "install, run, upgrade, remove, purge: {:.1?}",
        started.elapsed()
    );
}

/// The build stage's `cargo build` commands: (target triple or "", package) pairs.
fn containerfile_builds(instructions: &[(String, String)]) -> BTreeSet<(String, String)> {
    let mut built = BTreeSet::new();
    for (op, args) in instructions {
        if op != "RUN" {
            continue;
        }
        for command in args.split("&&") {
            let words: Vec<&str> = command.split_whitespace().collect();
            let Some(at) = words.windows(2).position(|w| w == ["cargo", "build"]) else {
                continue;
            };
            let words = &words[at..];
            assert!(
                words.contains(&"--release"),
                "not a release build: {command}"
            );
            let target = words
                .windows(2)
                .find(|w| w[0] == "--target")
                .map(|w| w[1].to_string())
                .unwrap_or_default();
            for w in words.windows(2).filter(|w| w[0] == "-p") {
                built.insert((target.clone(), w[1].to_string()));
            }
        }
    }
    built
}

/// `(INSTRUCTION, arguments)` of a Containerfile, continuation lines joined.
fn containerfile_instructions(body: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in body.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (op, args) = l.trim().split_once(' ').unwrap_or((l.trim(), ""));
            (op.to_uppercase(), args.trim().to_string())
        })
        .collect()
}

#[test]
fn containerfile_copies_existing_paths_and_builds_workspace_binaries() {
    let root = workspace_root();
    let body = std::fs::read_to_string(root.join("gateway-image/Containerfile")).unwrap();
    let instructions = containerfile_instructions(&body);

    // Workspace packages and their binaries, from cargo itself.
    let metadata = run_ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&root)
            .args([
                "metadata",
                "--no-deps",
                "--format-version",
                "1",
                "--offline",
            ]),
        "cargo",
    );
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let mut bins_of: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in metadata["packages"].as_array().unwrap() {
        let bins = p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        bins_of.insert(p["name"].as_str().unwrap().to_string(), bins);
    }

    let built = containerfile_builds(&instructions);
    assert!(!built.is_empty(), "the Containerfile builds nothing");
    let mut binaries: BTreeSet<String> = BTreeSet::new();
    for (target, package) in &built {
        let bins = bins_of
            .get(package)
            .unwrap_or_else(|| panic!("cargo build -p {package}: not a workspace package"));
        for b in bins {
            let dir = if target.is_empty() {
                "/src/target/release".to_string()
            } else {
                format!("/src/target/{target}/release")
            };
            binaries.insert(format!("{dir}/{b}"));
        }
    }
    // The DUT agents are static, for the DUT image.
    for agent in ["machine-registration", "dutgate-dut"] {
        assert!(
            built.contains(&("x86_64-unknown-linux-gnu".to_string(), agent.to_string())),
            "the Containerfile builds the static {agent}"
        );
    }
    assert!(
        body.contains("+crt-static"),
        "the agents are linked statically"
    );

    let workdir = instructions
        .iter()
        .find(|(op, _)| op == "WORKDIR")
        .map(|(_, a)| a.as_str());
    assert_eq!(workdir, Some("/src"), "the build stage's WORKDIR");
    let mut destinations: Vec<String> = Vec::new();
    for (op, args) in instructions.iter().filter(|(op, _)| op == "COPY") {
        let mut words: Vec<&str> = args.split_whitespace().collect();
        let from = words
            .first()
            .and_then(|w| w.strip_prefix("--from="))
            .map(String::from);
        words.retain(|w| !w.starts_with("--"));
        let (dest, sources) = words.split_last().expect("COPY without arguments");
        for src in sources {
            match &from {
                Some(stage) => {
                    assert_eq!(stage, "build", "{op} {args}");
                    assert!(
                        binaries.contains(*src),
                        "COPY --from=build {src}: not built by the build stage ({binaries:?})"
                    );
                    let name = src.rsplit('/').next().unwrap();
                    destinations.push(if dest.ends_with('/') {
                        format!("{dest}{name}")
                    } else {
                        dest.to_string()
                    });
                }
                None => {
                    assert!(
                        root.join(src).exists(),
                        "COPY {src}: no such path in the workspace"
                    );
                    destinations.push(dest.to_string());
                }
            }
        }
    }
    // Paths of the gateway named by RUN, ENTRYPOINT and CMD are ones a COPY put there.
    for (op, args) in &instructions {
        if !matches!(op.as_str(), "RUN" | "ENTRYPOINT" | "CMD") {
            continue;
        }
        for word in args.split(|c: char| c.is_whitespace() || matches!(c, '"' | ',' | '[' | ']')) {
            let ours = [
                "/usr/bin/dutgate",
                "/usr/bin/dutctl",
                "/usr/lib/dutgate/",
                "/etc/dutgate/",
            ]
            .iter()
            .any(|p| word.starts_with(p));
            if ours && word != "/etc/dutgate" {
                assert!(
                    destinations.iter().any(|d| d == word),
                    "{op} names {word}, which no COPY provides ({destinations:?})"
                );
            }
        }
    }
    assert!(
        destinations.iter().any(|d| d == CONFIG),
        "the image carries {CONFIG}"
    );
}
