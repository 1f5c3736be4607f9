//! What the `dutgate` binary's tests share: a clean command and `dutgate up` started without
//! a port race.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::testing::{listens_on_every_port, stop_child};
// Every test binary includes this module; only some use these (`up.rs`).
#[allow(unused_imports)]
pub use dutgate_core::testing::{children_of, listening_ports};

/// Every service `dutgate up` starts, by its name in the `gateway.ports` section.
pub const SERVICES: [&str; 7] = ["executor", "mars", "registry", "boot", "pdu", "salad", "s3"];

/// The binary under test, with no machine-wide config and none of the caller's overrides.
pub fn dutgate() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dutgate"));
    c.env("DUTGATE_CONFIG", "/dev/null").env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("DUTGATE_") && k.contains("__") {
            c.env_remove(k);
        }
    }
    c
}

/// A port number nobody held a moment ago. Only a candidate: another process may take it
/// before the service binds it, which [`Gateway::start`] detects and retries.
fn candidate_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `dutgate up --only <services>` on `ports` (in the order of `services`).
pub fn up_command(state: &Path, services: &[&str], ports: &[u16]) -> Command {
    let mut cmd = dutgate();
    cmd.arg("--state-dir").arg(state).arg("up");
    if services.len() < SERVICES.len() {
        cmd.arg("--only").arg(services.join(","));
    }
    for (svc, p) in services.iter().zip(ports) {
        cmd.env(
            format!("DUTGATE_GATEWAY__PORTS__{}", svc.to_uppercase()),
            p.to_string(),
        );
    }
    // salad's netconsole listener has a fixed default port that tests running side by side
    // would fight over; none of these tests uses it.
    cmd.env("DUTGATE_SALAD__NETCONSOLE_PORT", "0");
    cmd.env("DUTGATE_GATEWAY__BIND_ADDRESS", "127.0.0.1");
    cmd
}

/// `GET /healthz` on 127.0.0.1:`port`: the response when it is a 200.
pub fn healthz(port: u16) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// A running `dutgate up`, stopped with SIGTERM (and waited for) on drop.
pub struct Gateway {
    pub child: Child,
    /// Ports in the order of the services it was started with.
    pub ports: Vec<u16>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Gateway {
    /// Starts `dutgate --state-dir <state> up --only <services>` on 127.0.0.1 and waits until
    /// every service answers /healthz on its own port. The services find each other through
    /// their configured ports, so they cannot bind port 0: candidate ports are chosen here,
    /// and when one turns out taken (`up` refuses it at start, or a service fails to bind it)
    /// the gateway is stopped and started again on other candidates. A port counts only once
    /// a child of this very `up` listens on it, so another gateway answering on the same
    /// number is never taken for this one. Output goes to files under `state`'s parent.
    pub fn start(state: &Path, services: &[&str], within: Duration) -> Gateway {
        let logs = state.parent().unwrap_or(state);
        let stdout = logs.join("up.stdout");
        let stderr = logs.join("up.stderr");
        let deadline = Instant::now() + within;
        for _attempt in 0..10 {
            let mut ports: Vec<u16> = Vec::new();
            while ports.len() < services.len() {
                let p = candidate_port();
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
            let child = up_command(state, services, &ports)
                .stdout(std::fs::File::create(&stdout).unwrap())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .unwrap();
            let mut gw = Gateway {
                child,
                ports,
                stdout: stdout.clone(),
                stderr: stderr.clone(),
            };
            loop {
                let err = std::fs::read_to_string(&stderr).unwrap_or_default();
                if let Ok(Some(status)) = gw.child.try_wait() {
                    assert!(
                        err.contains("is not available"),
                        "dutgate up exited ({status}):\n{err}"
                    );
                    break;
                }
                if err.contains("Address already in use") {
                    // Dropping stops it; the next attempt starts afresh.
                    break;
                }
                if gw.owns_every_port() && gw.every_service_answers(services) {
                    return gw;
                }
                assert!(
                    Instant::now() < deadline,
                    "dutgate up not ready within {within:?}:\n{err}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("dutgate up found a taken port on every attempt");
    }

    fn owns_every_port(&self) -> bool {
        listens_on_every_port(self.child.id(), &self.ports)
    }

    fn every_service_answers(&self, services: &[&str]) -> bool {
        services
            .iter()
            .zip(&self.ports)
            .all(|(svc, p)| healthz(*p).is_some_and(|body| body.contains(svc)))
    }

    /// Sends `dutgate up` SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }
}
