//! `dutctl pdus …`: the pdu service's PDUs and ports (list, ports, set, cycle).

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use dutgate_core::ServiceName;
use dutgate_pdu::client::PduClient;
use dutgate_pdu::{PortPatch, PortView, Switch};

use crate::gateway::Gateway;
use crate::output::{Format, print};

#[derive(Subcommand)]
pub enum PdusCommand {
    /// All PDUs with their driver and poll status.
    List,
    /// The ports of one PDU with their (polled) state.
    Ports { pdu: String },
    /// Switch a port (answers the read-back state), and/or change its label or reservation.
    Set {
        pdu: String,
        port: String,
        /// on or off.
        state: Option<OnOff>,
        /// Reserve (true) or free (false) the port; reserved ports refuse switching.
        #[arg(long)]
        reserved: Option<bool>,
        /// Label shown instead of the device's ('' restores the device's).
        #[arg(long)]
        label: Option<String>,
    },
    /// Power-cycle a port: off, verified off for the delay, on, verified on.
    Cycle {
        pdu: String,
        port: String,
        /// Seconds of verified OFF (default: the service's `default_off_seconds`).
        #[arg(long)]
        off_seconds: Option<f64>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

fn client(gw: &Gateway) -> PduClient {
    PduClient::new(gw.url(ServiceName::Pdu), gw.token().cloned())
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// "12s ago" from a unix-ms timestamp.
fn ago(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(ms);
    let s = (now - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn ports_text(ports: &[PortView]) -> String {
    let mut rows = vec![vec![
        "PORT".into(),
        "LABEL".into(),
        "STATE".into(),
        "RESERVED".into(),
        "POWER".into(),
        "CHANGED".into(),
        "POLLED".into(),
        "LAST ERROR".into(),
    ]];
    for p in ports {
        rows.push(vec![
            p.id.clone(),
            p.label.clone().unwrap_or_else(|| "-".into()),
            p.state.to_string(),
            if p.reserved {
                "yes".into()
            } else {
                "no".into()
            },
            p.power_w
                .map(|w| format!("{w:.1} W"))
                .unwrap_or_else(|| "-".into()),
            ago(p.last_change),
            ago(p.last_polled),
            p.last_error.clone().unwrap_or_default(),
        ]);
    }
    table(&rows)
}

pub async fn run(cmd: PdusCommand, gw: &Gateway, format: Format) -> anyhow::Result<()> {
    let c = client(gw);
    match cmd {
        PdusCommand::List => {
            let pdus = c.pdus().await.context("listing PDUs")?;
            print(format, &pdus, |pdus| {
                let mut rows = vec![vec![
                    "NAME".into(),
                    "DRIVER".into(),
                    "FROM".into(),
                    "PORTS".into(),
                    "POLLED".into(),
                    "ERROR".into(),
                ]];
                for p in pdus {
                    rows.push(vec![
                        p.name.clone(),
                        p.driver.clone(),
                        format!("{:?}", p.source).to_lowercase(),
                        p.port_count.to_string(),
                        ago(p.last_polled),
                        p.error.clone().unwrap_or_default(),
                    ]);
                }
                table(&rows)
            });
        }
        PdusCommand::Ports { pdu } => {
            let ports = c
                .ports(&pdu)
                .await
                .with_context(|| format!("ports of {pdu}"))?;
            print(format, &ports, |p| ports_text(p));
        }
        PdusCommand::Set {
            pdu,
            port,
            state,
            reserved,
            label,
        } => {
            if state.is_none() && reserved.is_none() && label.is_none() {
                bail!("nothing to change: give on|off, --reserved or --label");
            }
            let patch = PortPatch {
                state: state.map(|s| match s {
                    OnOff::On => Switch::On,
                    OnOff::Off => Switch::Off,
                }),
                label,
                reserved,
            };
            let res = c
                .patch(&pdu, &port, &patch)
                .await
                .with_context(|| format!("{pdu} port {port}"))?;
            print(format, &res, |r| {
                format!(
                    "{pdu} port {port}: {}{}\n",
                    r.port.state,
                    if r.port.reserved { " (reserved)" } else { "" }
                )
            });
        }
        PdusCommand::Cycle {
            pdu,
            port,
            off_seconds,
        } => {
            let off = off_seconds
                .map(|s| {
                    Duration::try_from_secs_f64(s)
                        .context("--off-seconds must be a positive number")
                })
                .transpose()?;
            let rep = c
                .cycle(&pdu, &port, off)
                .await
                .with_context(|| format!("power cycle of {pdu} port {port}"))?;
            print(format, &rep, |r| {
                format!(
                    "{pdu} port {port}: cycled, OFF verified {} times over {:.1} s, now {}\n",
                    r.off_checks, r.off_seconds, r.port.state
                )
            });
        }
    }
    Ok(())
}
