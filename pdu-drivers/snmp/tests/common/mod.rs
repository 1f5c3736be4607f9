//! A real SNMP agent for tests and benchmarks: net-snmp `snmpd` on an ephemeral UDP port,
//! with `pdu_agent.py` (pass_persist) playing the outlet tables of every supported model.
//! Also how the tests that include this module start any peer without a port race: the
//! peer binds port 0 and [`bound_port`] reads the port it got.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::UdpSocket;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODELS: [&str; 4] = [
    "apc_masterswitch",
    "apc_rpdu2",
    "cyberpower_pdu41004",
    "cyberpower_pdu15swhviec12atnet",
];

pub const ROOTS: [&str; 4] = [
    ".1.3.6.1.4.1.318.1.1.4",
    ".1.3.6.1.4.1.318.1.1.12",
    ".1.3.6.1.4.1.3808.1.1.3",
    ".1.3.6.1.4.1.3808.1.1.5",
];

/// Outlet-name table of each model (same order as `MODELS`).
pub const NAME_OIDS: [&str; 4] = [
    ".1.3.6.1.4.1.318.1.1.4.4.2.1.4",
    ".1.3.6.1.4.1.318.1.1.12.3.3.1.1.2",
    ".1.3.6.1.4.1.3808.1.1.3.3.3.1.1.2",
    ".1.3.6.1.4.1.3808.1.1.5.6.3.1.2",
];

pub const V3_USER: &str = "labuser";
pub const V3_AUTH: &str = "labauthpass";
pub const V3_PRIV: &str = "labprivpass";

pub struct Agent {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pass_persist script; this module is also included by other crates' tests, so look
/// it up from the workspace root rather than from the including crate.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join("pdu-drivers/snmp/tests/pdu_agent.py"))
        .find(|p| p.is_file())
        .expect("pdu-drivers/snmp/tests/pdu_agent.py in the workspace")
}

/// Local ports of the sockets process `pid` has bound (TCP: listening ones), read from
/// /proc. Peers such as snmpd and pdudaemon bind port 0 when told to but do not say which
/// port they got; this reads it, and proves the port belongs to that very process.
pub fn bound_ports(pid: u32, udp: bool) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let proto = if udp { "udp" } else { "tcp" };
    let mut ports = Vec::new();
    for table in [proto.to_string(), format!("{proto}6")] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            // `sl local_address rem_address st … inode`: local "0100007F:1F90", st 0A = LISTEN.
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && (udp || f[3] == "0A") && inodes.contains(f[9]) {
                let port = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The one port `child`, told to bind port 0, got: polls [`bound_ports`] until the peer has
/// bound it; panics with `log()` when it exits first or takes longer than `within`.
pub fn bound_port(
    child: &mut Child,
    what: &str,
    udp: bool,
    within: Duration,
    log: impl Fn() -> String,
) -> u16 {
    let start = Instant::now();
    loop {
        match bound_ports(child.id(), udp).as_slice() {
            [port] => return *port,
            [] => {}
            many => panic!("{what} bound several ports {many:?}; log:\n{}", log()),
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before binding a port; log:\n{}",
                log()
            );
        }
        assert!(
            start.elapsed() < within,
            "{what} bound no port within {within:?}; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A UDP port of 127.0.0.1 where nothing answers (a request gets ICMP port-unreachable),
/// reserved for as long as the returned socket lives. The socket is connected to the discard
/// port, so the kernel hands it no datagram from anyone else; no other process can bind the
/// port meanwhile, unlike a port that was merely free a moment ago.
pub fn unreachable_udp_port() -> (UdpSocket, u16) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    s.connect("127.0.0.1:9").expect("connect the UDP socket");
    let port = s.local_addr().expect("local address").port();
    (s, port)
}

impl Agent {
    /// Starts snmpd with every model, `ports` outlets each; waits until it answers.
    pub fn start(ports: usize) -> Agent {
        let snmpd = dutgate_core::testing::require_program("snmpd", "snmpd");
        dutgate_core::testing::require_program("python3", "python3");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let persist = dir.path().join("persist");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&persist).unwrap();
        let mut conf = format!(
            "agentAddress udp:127.0.0.1:0\n\
             rocommunity public 127.0.0.1\n\
             rwcommunity private 127.0.0.1\n\
             createUser {V3_USER} SHA \"{V3_AUTH}\" AES \"{V3_PRIV}\"\n\
             rwuser {V3_USER} priv\n\
             sysName pdu-test-agent\n"
        );
        for (model, root) in MODELS.iter().zip(ROOTS) {
            conf.push_str(&format!(
                "pass_persist {root} /usr/bin/python3 {} {} {model} {ports}\n",
                script().display(),
                state.display()
            ));
        }
        let conf_path = dir.path().join("snmpd.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let log = std::fs::File::create(dir.path().join("snmpd.log")).unwrap();
        let child = Command::new(snmpd)
            .args(["-f", "-C", "-I", "-smux", "-Lo", "-c"])
            .arg(&conf_path)
            .env("SNMP_PERSISTENT_DIR", &persist)
            .env("MIBS", "")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start snmpd");
        // Built before the port is known so that a failed start still stops snmpd.
        let mut agent = Agent {
            child,
            port: 0,
            dir,
        };
        let log_path = agent.dir.path().join("snmpd.log");
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        agent.port = bound_port(
            &mut agent.child,
            "snmpd",
            true,
            Duration::from_secs(20),
            log,
        );
        agent.wait_ready();
        agent
    }

    /// Waits until every model's pass_persist handler answers. snmpd starts each handler
    /// on its first request and answers "no such name" if the handler is slow to start, so
    /// the first walk of a test must not be the one that starts it.
    fn wait_ready(&self) {
        let snmpget = dutgate_core::testing::require_program("snmpget", "snmp");
        let start = Instant::now();
        let oids: Vec<String> = NAME_OIDS.iter().map(|o| format!("{o}.1")).collect();
        while start.elapsed() < Duration::from_secs(20) {
            let out = Command::new(&snmpget)
                .args(["-v2c", "-c", "public", "-r", "0", "-t", "1", "-On"])
                .arg(format!("127.0.0.1:{}", self.port))
                .args(&oids)
                .env("MIBS", "")
                .output();
            if let Ok(out) = out {
                let text = String::from_utf8_lossy(&out.stdout);
                if text.matches("STRING").count() == oids.len() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "snmpd did not answer for every model within 20 s; log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("snmpd.log")).unwrap_or_default()
    }

    /// The agent's own record of outlet `n` of `model` (true = on).
    pub fn outlet(&self, model: &str, n: usize) -> bool {
        let path = self.dir.path().join("state").join(format!("{model}.json"));
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v[n.to_string()].as_bool().unwrap()
    }

    /// Makes GETs of outlet `n` (any model) take `ms` before the agent answers.
    pub fn slow(&self, n: usize, ms: u64) {
        std::fs::write(
            self.dir.path().join("state").join("slow"),
            format!("{n} {ms}\n"),
        )
        .unwrap();
    }

    /// Every SET the agent applied to `model`, as "<outlet> <value>" lines.
    pub fn set_log(&self, model: &str) -> Vec<String> {
        let path = self.dir.path().join("state").join(format!("{model}.log"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}
