//! What the `dutgate` binary's tests share: a clean command and `dutgate up` on free ports.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `dutgate --state-dir <state> up` with every service on a free port of 127.0.0.1; the ports
/// in the order of [`SERVICES`]. Output is left to the caller.
pub fn up_on_free_ports(state: &Path) -> (Command, Vec<u16>) {
    let mut cmd = dutgate();
    cmd.arg("--state-dir").arg(state).arg("up");
    let ports: Vec<u16> = SERVICES.iter().map(|_| free_port()).collect();
    for (svc, p) in SERVICES.iter().zip(&ports) {
        cmd.env(
            format!("DUTGATE_GATEWAY__PORTS__{}", svc.to_uppercase()),
            p.to_string(),
        );
    }
    cmd.env("DUTGATE_GATEWAY__BIND_ADDRESS", "127.0.0.1");
    (cmd, ports)
}
