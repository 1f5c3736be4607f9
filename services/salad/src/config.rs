//! The `salad` section of the gateway config, with the embedded defaults a farm starts from.

use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The `salad` section of the gateway config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Serial adapters to open: explicit device paths and/or glob patterns.
    pub serial_ports: Vec<SerialPortSpec>,
    /// Baud rate of a port whose entry names none.
    pub default_baud: u32,
    /// How often the device list is rescanned for adapters plugged in or out.
    pub rescan_interval_ms: u64,
    /// TCP port QEMU-style netconsoles dial into; `0` disables the listener.
    pub netconsole_port: u16,
    /// Range the per-machine console ports (`tcp_port` and `tcp_port_logs`) are taken from.
    pub console_ports: PortRange,
    /// Bytes of DUT output that may wait for one TCP client before that client is dropped.
    pub client_queue_bytes: usize,
    /// A client whose socket accepts nothing for this long is dropped, even with room left in
    /// its queue.
    pub client_write_timeout_ms: u64,
    /// Scrollback replayed on connect to a machine's `tcp_port_logs`.
    pub scrollback_kib: usize,
    /// Per-machine console log files.
    pub console_log: ConsoleLogConfig,
    /// Networks whose hosts may connect to the raw console ports (both of every machine).
    /// A peer on a DUT network (`gateway.auth.dut_networks`) is refused even when listed here,
    /// unless it is the gateway itself (the peer address is the address it dialled).
    pub console_client_networks: Vec<IpNet>,
    /// Most console servers (machines with ports); a new one beyond it is refused with a 409.
    pub max_consoles: usize,
    /// Most console servers created for machines mars does not know (registering DUTs, or
    /// made-up ids). When full, those whose stream is gone and that mars still does not know
    /// are deleted; if none can be, the binding is refused.
    pub max_unregistered_consoles: usize,
    /// Most netconsole connections at once; more are closed at accept.
    pub max_netconsoles: usize,
    /// How long a `PUT /api/v1/machine/{id}/expect` lets an unbound stream bind to the machine.
    pub expect_window_seconds: u64,
    /// Console output that may be the start of a job secret is held back at most this long
    /// before it is sent on as is.
    pub secret_hold_ms: u64,
    /// Base URL of mars; unset: the gateway's internal URL of `mars`.
    pub mars_url: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            serial_ports: vec![
                SerialPortSpec::pattern("/dev/ttyUSB*"),
                SerialPortSpec::pattern("/dev/ttyACM*"),
            ],
            default_baud: 115_200,
            rescan_interval_ms: 1000,
            netconsole_port: 8100,
            console_ports: PortRange {
                first: 8200,
                last: 8999,
            },
            // Queued chunks are shared by all clients of a machine, so this bounds memory per
            // machine more than per client. At UART rates the write timeout drops a stalled
            // client long before this fills; it matters for fast netconsoles and floods,
            // where a reader descheduled for a few ms must not be mistaken for a dead one.
            client_queue_bytes: 4 * 1024 * 1024,
            client_write_timeout_ms: 10_000,
            scrollback_kib: 64,
            console_log: ConsoleLogConfig::default(),
            console_client_networks: ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            max_consoles: 256,
            max_unregistered_consoles: 32,
            max_netconsoles: 256,
            expect_window_seconds: 600,
            secret_hold_ms: 100,
            mars_url: None,
        }
    }
}

impl Config {
    pub fn rescan_interval(&self) -> Duration {
        Duration::from_millis(self.rescan_interval_ms.max(50))
    }

    pub fn client_write_timeout(&self) -> Duration {
        Duration::from_millis(self.client_write_timeout_ms.max(100))
    }

    pub fn expect_window(&self) -> Duration {
        Duration::from_secs(self.expect_window_seconds)
    }

    pub fn secret_hold(&self) -> Duration {
        Duration::from_millis(self.secret_hold_ms)
    }

    /// Checks what serde cannot: a config that would make salad misbehave is refused at start.
    pub fn validate(&self) -> Result<(), String> {
        let r = &self.console_ports;
        if r.first == 0 || r.first > r.last {
            return Err(format!(
                "salad.console_ports: first ({}) must be > 0 and <= last ({})",
                r.first, r.last
            ));
        }
        if r.last - r.first < 1 {
            return Err("salad.console_ports: the range needs at least two ports".into());
        }
        if self.client_queue_bytes < 4096 {
            return Err("salad.client_queue_bytes: must be at least 4096".into());
        }
        if self.scrollback_kib * 1024 + 4096 > self.client_queue_bytes {
            // The replay is queued for a log-port client at once; it must leave room for
            // live output or that client would be dropped on the next byte.
            return Err(format!(
                "salad.scrollback_kib ({}) must leave room in salad.client_queue_bytes ({})",
                self.scrollback_kib, self.client_queue_bytes
            ));
        }
        if self.default_baud == 0 {
            return Err("salad.default_baud: must be > 0".into());
        }
        for (i, p) in self.serial_ports.iter().enumerate() {
            if p.path.is_empty() {
                return Err(format!("salad.serial_ports[{i}].path: must not be empty"));
            }
            if let Err(e) = glob::Pattern::new(&p.path) {
                return Err(format!("salad.serial_ports[{i}].path: bad pattern: {e}"));
            }
            if p.baud == Some(0) {
                return Err(format!("salad.serial_ports[{i}].baud: must be > 0"));
            }
        }
        if self.max_consoles == 0 {
            return Err("salad.max_consoles: must be at least 1".into());
        }
        if self.max_unregistered_consoles > self.max_consoles {
            return Err(format!(
                "salad.max_unregistered_consoles ({}) must not exceed salad.max_consoles ({})",
                self.max_unregistered_consoles, self.max_consoles
            ));
        }
        if self.max_netconsoles == 0 {
            return Err("salad.max_netconsoles: must be at least 1".into());
        }
        if self.expect_window_seconds == 0 || self.expect_window_seconds > 86_400 {
            return Err("salad.expect_window_seconds: must be between 1 and 86400".into());
        }
        if self.secret_hold_ms == 0 || self.secret_hold_ms > 10_000 {
            return Err("salad.secret_hold_ms: must be between 1 and 10000".into());
        }
        if self.console_log.max_file_bytes < 4096 {
            return Err("salad.console_log.max_file_bytes: must be at least 4096".into());
        }
        Ok(())
    }
}

/// One entry of `serial_ports`: a device path or a glob (`/dev/serial/by-path/*`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialPortSpec {
    pub path: String,
    /// Overrides `default_baud` for the ports this entry matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baud: Option<u32>,
}

impl SerialPortSpec {
    pub fn pattern(path: &str) -> Self {
        Self {
            path: path.to_string(),
            baud: None,
        }
    }
}

/// An inclusive TCP port range.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleLogConfig {
    /// A machine's current log file is rotated once it is this big.
    pub max_file_bytes: u64,
    /// Rotated files kept per machine (the current file not counted).
    pub keep_files: usize,
}

impl Default for ConsoleLogConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 16 * 1024 * 1024,
            keep_files: 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_yaml_round_trips() {
        let c = Config::default();
        c.validate().unwrap();
        let y = yaml_serde::to_string(&c).unwrap();
        let back: Config = yaml_serde::from_str(&y).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_values_are_refused() {
        let c = Config {
            console_ports: PortRange {
                first: 9000,
                last: 8000,
            },
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("console_ports"));
        let c = Config {
            serial_ports: vec![SerialPortSpec {
                path: "/dev/tty[".into(),
                baud: None,
            }],
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("serial_ports[0]"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = yaml_serde::from_str::<Config>("serial_ports: [{path: /dev/x, bud: 9600}]")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bud"), "{e}");
    }
}
