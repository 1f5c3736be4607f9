//! `dutctl machines …`: mars's machines (list, show, retire, activate, set, discover,
//! training reports, events). Machines are named by MAC address or full name.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dutgate_core::{MachineId, ServiceName, Tag};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{
    ActivateRequest, DiscoverRequest, Machine, MachinePatch, MachineState, RetireRequest,
    TrainingReport,
};

use crate::gateway::Gateway;
use crate::output::{Format, print};

#[derive(Subcommand)]
pub enum MachinesCommand {
    /// All machines with their state.
    List {
        /// Only machines in this state (e.g. IDLE, TRAINING).
        #[arg(long)]
        state: Option<String>,
        /// Only machines with this tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// One machine's record.
    Show { machine: String },
    /// Take a machine out of service (stops training; powers it off).
    Retire {
        machine: String,
        /// Also cancel the running job (default: let it finish).
        #[arg(long)]
        cancel_job: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Put a machine back in service (quick check if trained before, else training).
    Activate {
        machine: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Change admin fields: PDU port, off delay, manual tags, comment.
    Set(SetArgs),
    /// Bind the next unknown machine that registers to a PDU port (powers the port on).
    /// Without arguments: show the discovery in progress.
    Discover(DiscoverArgs),
    /// Training runs and per-boot reports.
    Training {
        machine: String,
        /// Show this loop of the latest run (0 = registration boot).
        #[arg(long = "loop")]
        loop_n: Option<u32>,
    },
    /// State changes with who and why.
    Events {
        machine: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Args)]
pub struct SetArgs {
    machine: String,
    #[arg(long)]
    pdu: Option<String>,
    #[arg(long)]
    port: Option<String>,
    /// Remove the PDU port (the machine goes to WAIT_FOR_CONFIG).
    #[arg(long, conflicts_with_all = ["pdu", "port"])]
    no_pdu: bool,
    /// Seconds the port stays off during a power cycle.
    #[arg(long)]
    off_delay: Option<f64>,
    /// Manual tags (replaces them; repeatable; `--tag ''` clears).
    #[arg(long = "tag")]
    tags: Option<Vec<String>>,
    #[arg(long)]
    comment: Option<String>,
}

#[derive(Args)]
pub struct DiscoverArgs {
    pdu: Option<String>,
    port: Option<String>,
    /// Seconds to wait for a registration (default: the service's, 150).
    #[arg(long)]
    timeout: Option<f64>,
    /// Stop the discovery in progress and power its port off.
    #[arg(long, conflicts_with_all = ["pdu", "port"])]
    stop: bool,
    /// After starting, wait until a machine is bound (or the discovery ends).
    #[arg(long)]
    wait: bool,
}

fn client(gw: &Gateway) -> MarsClient {
    MarsClient::new(gw.url(ServiceName::Mars), gw.token().cloned())
}

/// A MAC address, or a full name looked up in the list.
pub(crate) async fn resolve(mars: &MarsClient, name: &str) -> anyhow::Result<MachineId> {
    if let Ok(id) = MachineId::parse(name) {
        return Ok(id);
    }
    let all = mars.machines().await.context("listing machines")?;
    all.iter()
        .find(|m| m.full_name == name)
        .map(|m| m.id)
        .with_context(|| format!("no machine with id or full name {name:?}"))
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

fn machine_text(m: &Machine) -> String {
    let mut s = String::new();
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(s, "{} ({})", m.full_name, m.id);
    let _ = writeln!(s, "  state:        {}", m.state);
    let _ = writeln!(s, "  base name:    {}", m.base_name);
    let _ = writeln!(
        s,
        "  ip address:   {}",
        m.ip_address.map(|i| i.to_string()).unwrap_or("-".into())
    );
    let _ = writeln!(s, "  console:      {}", opt(&m.local_tty_device));
    let _ = writeln!(
        s,
        "  pdu port:     {} {} (off delay {} s)",
        opt(&m.pdu),
        opt(&m.pdu_port_id),
        m.pdu_off_delay
    );
    if let Some(l) = &m.lease {
        let _ = writeln!(
            s,
            "  lease:        job {} by {} ({}), expires {}",
            l.job_id,
            l.holder,
            l.purpose.as_str(),
            l.expires_at
        );
    }
    let _ = writeln!(s, "  first seen:   {}", m.first_seen);
    let _ = writeln!(s, "  last seen:    {}", m.last_seen);
    let t = &m.training;
    let _ = writeln!(
        s,
        "  training:     {}{} loops {}/{} (need {}), failed runs in a row {}{}",
        if t.is_active { "active, " } else { "" },
        t.trained_at
            .map(|x| format!("trained {x},"))
            .unwrap_or_else(|| "never trained,".into()),
        t.statuses
            .iter()
            .filter(|s| **s == dutgate_core::JobStatus::Pass)
            .count(),
        t.current_loop_count,
        t.qualifying_rate,
        t.consecutive_failures,
        t.next_attempt_at
            .map(|x| format!(", next attempt {x}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "  infra failures in a row: {}",
        m.consecutive_infra_failures
    );
    if let Some(c) = &m.comment {
        let _ = writeln!(s, "  comment:      {c}");
    }
    let _ = writeln!(s, "  tags:");
    for t in &m.tags {
        let _ = writeln!(s, "    {t}");
    }
    for t in &m.manual_tags {
        let _ = writeln!(s, "    {t} (manual)");
    }
    s
}

fn training_text(r: &TrainingReport) -> String {
    let mut s = format!("{} is {}\n", r.machine_id, r.state);
    if r.runs.is_empty() {
        s.push_str("no training runs yet\n");
    }
    for run in &r.runs {
        let _ = writeln!(
            s,
            "\nrun {} ({}) started {}: {} — {}/{} passed, {} needed{}",
            run.id,
            run.kind.as_str(),
            run.started_at,
            run.outcome.as_str(),
            run.passes,
            run.boot_loops,
            run.qualifying,
            run.reason
                .as_ref()
                .map(|r| format!("\n  {r}"))
                .unwrap_or_default()
        );
        let mut rows = vec![vec![
            "LOOP".into(),
            "JOB".into(),
            "STATUS".into(),
            "SECONDS".into(),
            "FAILED STAGE".into(),
            "CONSOLE LOG".into(),
        ]];
        for l in &run.loops {
            rows.push(vec![
                if l.job_kind == "registration" {
                    "reg".into()
                } else {
                    l.n.to_string()
                },
                l.job_id.clone().unwrap_or("-".into()),
                l.status.to_string(),
                format!("{:.1}", l.duration_ms as f64 / 1000.0),
                l.failed_stage
                    .map(|x| x.as_str().to_string())
                    .unwrap_or("-".into()),
                l.console_log_url.clone().unwrap_or("-".into()),
            ]);
        }
        s.push_str(&table(&rows));
    }
    s
}

pub async fn run(cmd: MachinesCommand, gw: &Gateway, format: Format) -> anyhow::Result<()> {
    let mars = client(gw);
    match cmd {
        MachinesCommand::List { state, tags } => {
            let state: Option<MachineState> = state
                .map(|s| s.parse().map_err(anyhow::Error::msg))
                .transpose()?;
            let tags: Vec<Tag> = tags
                .iter()
                .map(|t| Tag::parse(t))
                .collect::<Result<_, _>>()?;
            let all: Vec<Machine> = mars
                .machines()
                .await?
                .into_iter()
                .filter(|m| state.is_none_or(|s| m.state == s) && m.has_tags(&tags))
                .collect();
            print(format, &all, |all| {
                let mut rows = vec![vec![
                    "NAME".into(),
                    "ID".into(),
                    "STATE".into(),
                    "PDU PORT".into(),
                    "CONSOLE".into(),
                    "JOB".into(),
                ]];
                for m in all {
                    rows.push(vec![
                        m.full_name.clone(),
                        m.id.to_string(),
                        m.state.to_string(),
                        match (&m.pdu, &m.pdu_port_id) {
                            (Some(p), Some(port)) => format!("{p}/{port}"),
                            _ => "-".into(),
                        },
                        m.local_tty_device.clone().unwrap_or("-".into()),
                        m.lease
                            .as_ref()
                            .map(|l| l.job_id.clone())
                            .unwrap_or("-".into()),
                    ]);
                }
                table(&rows)
            });
        }
        MachinesCommand::Show { machine } => {
            let id = resolve(&mars, &machine).await?;
            let m = mars.machine(id).await?;
            print(format, &m, machine_text);
        }
        MachinesCommand::Retire {
            machine,
            cancel_job,
            reason,
        } => {
            let id = resolve(&mars, &machine).await?;
            let m = mars
                .retire(id, &RetireRequest { cancel_job, reason })
                .await?;
            print(format, &m, |m| format!("{} is {}\n", m.full_name, m.state));
        }
        MachinesCommand::Activate { machine, reason } => {
            let id = resolve(&mars, &machine).await?;
            let m = mars.activate(id, &ActivateRequest { reason }).await?;
            print(format, &m, |m| format!("{} is {}\n", m.full_name, m.state));
        }
        MachinesCommand::Set(a) => {
            let id = resolve(&mars, &a.machine).await?;
            let mut patch = MachinePatch {
                pdu_off_delay: a.off_delay,
                comment: a.comment.map(|c| (!c.is_empty()).then_some(c)),
                ..Default::default()
            };
            if a.no_pdu {
                patch.pdu = Some(None);
                patch.pdu_port_id = Some(None);
            } else {
                patch.pdu = a.pdu.map(Some);
                patch.pdu_port_id = a.port.map(Some);
            }
            if let Some(tags) = a.tags {
                patch.manual_tags = Some(
                    tags.iter()
                        .filter(|t| !t.is_empty())
                        .map(|t| Tag::parse(t))
                        .collect::<Result<_, _>>()?,
                );
            }
            let m = mars.patch(id, &patch).await?;
            print(format, &m, machine_text);
        }
        MachinesCommand::Discover(a) => discover(&mars, a, format).await?,
        MachinesCommand::Training { machine, loop_n } => {
            let id = resolve(&mars, &machine).await?;
            let report = mars.training(id).await?;
            match loop_n {
                Some(n) => {
                    let l = report
                        .runs
                        .first()
                        .and_then(|r| r.loops.iter().find(|l| l.n == n))
                        .with_context(|| format!("no loop {n} in the latest run of {id}"))?;
                    print(format, l, |l| {
                        format!(
                            "loop {} ({}): {} in {:.1} s, failed stage {}, job {}\nconsole log: {}\n{}",
                            l.n,
                            l.job_kind,
                            l.status,
                            l.duration_ms as f64 / 1000.0,
                            l.failed_stage.map(|s| s.as_str()).unwrap_or("-"),
                            l.job_id.as_deref().unwrap_or("-"),
                            l.console_log_url.as_deref().unwrap_or("-"),
                            l.detail.clone().map(|d| d + "\n").unwrap_or_default()
                        )
                    });
                }
                None => print(format, &report, training_text),
            }
        }
        MachinesCommand::Events { machine, limit } => {
            let id = resolve(&mars, &machine).await?;
            let ev = mars.machine_events(id, Some(limit)).await?;
            print(format, &ev, |ev| {
                let mut rows = vec![vec![
                    "TIME".into(),
                    "CHANGE".into(),
                    "WHAT".into(),
                    "WHO".into(),
                    "WHY".into(),
                ]];
                for e in &ev.events {
                    rows.push(vec![
                        e.at.to_string(),
                        if e.from_state == e.to_state {
                            e.to_state.to_string()
                        } else {
                            format!("{} → {}", e.from_state, e.to_state)
                        },
                        e.kind.clone(),
                        e.actor.clone(),
                        e.reason.clone(),
                    ]);
                }
                table(&rows)
            });
        }
    }
    Ok(())
}

async fn discover(mars: &MarsClient, a: DiscoverArgs, format: Format) -> anyhow::Result<()> {
    let status = if a.stop {
        mars.stop_discovery().await?
    } else {
        match (a.pdu, a.port) {
            (Some(pdu), Some(port_id)) => {
                let cursor = mars.events_cursor().await?;
                let waiting = format!(
                    "waiting for a machine to boot and register on PDU {pdu} port {port_id}"
                );
                let st = mars
                    .discover(&DiscoverRequest {
                        pdu,
                        port_id,
                        timeout: a.timeout,
                    })
                    .await?;
                if a.wait {
                    let progress = crate::progress::Progress::new();
                    progress.spin(&waiting);
                    let bound = wait_for_binding(mars, cursor, format).await;
                    progress.done();
                    return bound;
                }
                st
            }
            (None, None) => mars.discovery().await?,
            _ => bail!("give both the PDU name and the port id"),
        }
    };
    print(format, &status, |s| match &s.discovery {
        Some(d) => format!(
            "discovery on PDU {} port {} until {}\n",
            d.pdu, d.port_id, d.expires_at
        ),
        None => "no discovery in progress\n".into(),
    });
    Ok(())
}

/// How long a discovery that ended may still show its machine's binding in mars' events.
const BINDING_GRACE: Duration = Duration::from_secs(5);

/// Follows mars's events until a machine is bound by the discovery, or it ends unbound.
async fn wait_for_binding(
    mars: &MarsClient,
    mut cursor: i64,
    format: Format,
) -> anyhow::Result<()> {
    loop {
        let batch = mars.events(cursor, Duration::from_secs(10)).await?;
        cursor = batch.next;
        if let Some(e) = batch
            .events
            .iter()
            .find(|e| e.kind == "configured" && e.actor == "registration")
        {
            let m = mars.machine(e.machine_id).await?;
            print(format, &m, machine_text);
            return Ok(());
        }
        if mars.discovery().await?.discovery.is_none() {
            // Consumed or expired. mars ends a discovery when a registration claims it and
            // binds the machine in the writes that follow (`registered`, then `configured`):
            // follow the events a little longer before calling it expired.
            let deadline = tokio::time::Instant::now() + BINDING_GRACE;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let last = mars.events(cursor, left).await?;
                cursor = last.next;
                if let Some(e) = last
                    .events
                    .iter()
                    .find(|e| e.kind == "configured" && e.actor == "registration")
                {
                    let m = mars.machine(e.machine_id).await?;
                    print(format, &m, machine_text);
                    return Ok(());
                }
                if left.is_zero() {
                    bail!("the discovery ended without a machine registering");
                }
            }
        }
    }
}
