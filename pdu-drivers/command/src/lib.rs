//! `command`: the escape hatch for anything without a driver. The admin gives shell commands
//! for on, off and status; `{port}` in them is replaced by the port id (shell-quoted), which
//! is also in the environment as `PDU_PORT`.
//!
//! `status` prints the port's state on stdout: `on`/`off` (also `1`/`0`, `true`/`false`,
//! any case; configurable). Anything else reads `UNKNOWN`. A non-zero exit status is an
//! error carrying the end of stderr. `status_all`, if given, prints `<port> <state>` lines
//! for every port at once. Commands run under `/bin/sh -c` with a timeout; on timeout the
//! process is killed.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use dutgate_pdu_driver::{
    ConfigError, DriverError, DriverFactory, PduDriver, PortInfo, PortList, PowerState, Switch,
    parse_config, port_list,
};
use serde::Deserialize;

pub const NAME: &str = "command";

pub fn factories() -> Vec<DriverFactory> {
    vec![DriverFactory {
        name: NAME,
        summary: "admin-given shell commands for on, off and status",
        build,
    }]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub ports: PortList,
    pub on: String,
    pub off: String,
    pub status: String,
    #[serde(default)]
    pub status_all: Option<String>,
    #[serde(default = "default_on")]
    pub status_on: Vec<String>,
    #[serde(default = "default_off")]
    pub status_off: Vec<String>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Extra environment for every command.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_on() -> Vec<String> {
    vec!["on".into(), "1".into(), "true".into()]
}
fn default_off() -> Vec<String> {
    vec!["off".into(), "0".into(), "false".into()]
}
fn default_timeout_ms() -> u64 {
    10_000
}

pub fn build(config: yaml_serde::Value) -> Result<Box<dyn PduDriver>, ConfigError> {
    let cfg: Config = parse_config(config)?;
    let ports = port_list(&cfg.ports, 1);
    if ports.is_empty() {
        return Err(ConfigError::field("ports", "a PDU needs at least one port"));
    }
    for (field, cmd) in [("on", &cfg.on), ("off", &cfg.off), ("status", &cfg.status)] {
        if cmd.trim().is_empty() {
            return Err(ConfigError::field(field, "must not be empty"));
        }
    }
    if cfg.timeout_ms == 0 {
        return Err(ConfigError::field("timeout_ms", "must be more than 0"));
    }
    let lower = |v: &[String]| {
        v.iter()
            .map(|s| s.trim().to_lowercase())
            .collect::<Vec<_>>()
    };
    let (on, off) = (lower(&cfg.status_on), lower(&cfg.status_off));
    if let Some(v) = on.iter().find(|v| off.contains(v)) {
        return Err(ConfigError::field(
            "status_off",
            format!("{v:?} cannot mean both ON and OFF"),
        ));
    }
    Ok(Box::new(CommandPdu {
        timeout: Duration::from_millis(cfg.timeout_ms),
        status_on: on,
        status_off: off,
        cfg,
        ports,
    }))
}

pub struct CommandPdu {
    cfg: Config,
    ports: Vec<PortInfo>,
    timeout: Duration,
    status_on: Vec<String>,
    status_off: Vec<String>,
}

/// Single-quotes a value for `sh`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl CommandPdu {
    fn check_port(&self, port: &str) -> Result<(), DriverError> {
        if self.ports.iter().any(|p| p.id == port) {
            Ok(())
        } else {
            Err(DriverError::no_such_port(port))
        }
    }

    fn parse(&self, out: &str) -> PowerState {
        let v = out.trim().to_lowercase();
        if self.status_on.contains(&v) {
            PowerState::On
        } else if self.status_off.contains(&v) {
            PowerState::Off
        } else {
            PowerState::Unknown
        }
    }

    /// Runs one command; returns stdout. Killed when the timeout fires.
    async fn run(
        &self,
        what: &str,
        template: &str,
        port: Option<&str>,
    ) -> Result<String, DriverError> {
        let script = match port {
            Some(p) => template.replace("{port}", &shell_quote(p)),
            None => template.to_string(),
        };
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&script)
            .envs(&self.cfg.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so that a timeout kills what the shell started too.
            .process_group(0)
            .kill_on_drop(true);
        if let Some(p) = port {
            cmd.env("PDU_PORT", p);
        }
        let target = format!("`{what}` command");
        let child = cmd
            .spawn()
            .map_err(|e| DriverError::Local(format!("cannot run /bin/sh for {target}: {e}")))?;
        let pgid = child.id();
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(|e| DriverError::Local(format!("{target}: {e}")))?,
            Err(_) => {
                if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: kill(2) on the process group we created; no memory involved.
                    unsafe {
                        libc::kill(-pgid, libc::SIGKILL);
                    }
                }
                return Err(DriverError::timeout(target, self.timeout));
            }
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .trim()
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(DriverError::refused(
                target,
                format!("{}: {}", out.status, tail),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[async_trait]
impl PduDriver for CommandPdu {
    fn driver_name(&self) -> &'static str {
        NAME
    }

    async fn ports(&mut self) -> Result<Vec<PortInfo>, DriverError> {
        Ok(self.ports.clone())
    }

    async fn get(&mut self, port: &str) -> Result<PowerState, DriverError> {
        self.check_port(port)?;
        let out = self.run("status", &self.cfg.status, Some(port)).await?;
        Ok(self.parse(&out))
    }

    async fn get_all(&mut self) -> Result<Vec<(String, PowerState)>, DriverError> {
        let Some(all) = self.cfg.status_all.clone() else {
            let mut out = Vec::with_capacity(self.ports.len());
            for p in self.ports.clone() {
                let s = self.get(&p.id).await?;
                out.push((p.id, s));
            }
            return Ok(out);
        };
        let text = self.run("status_all", &all, None).await?;
        let seen: BTreeMap<&str, PowerState> = text
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?, self.parse(it.next().unwrap_or(""))))
            })
            .collect();
        Ok(self
            .ports
            .iter()
            .map(|p| {
                (
                    p.id.clone(),
                    seen.get(p.id.as_str())
                        .copied()
                        .unwrap_or(PowerState::Unknown),
                )
            })
            .collect())
    }

    async fn set(&mut self, port: &str, state: Switch) -> Result<(), DriverError> {
        self.check_port(port)?;
        let (what, template) = match state {
            Switch::On => ("on", self.cfg.on.clone()),
            Switch::Off => ("off", self.cfg.off.clone()),
        };
        self.run(what, &template, Some(port)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("3"), "'3'");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
