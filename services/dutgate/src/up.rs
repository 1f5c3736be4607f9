//! `dutgate up`: the one-command start. Every service runs as its own child process (a crash
//! or an upgrade of one leaves the others alone); crashed children are restarted with
//! back-off; Ctrl-C/SIGTERM stops them all within 5 s.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use dutgate_core::ServiceName;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::config::Loaded;
use crate::virtual_farm::{self, VirtualFarmArgs};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Start only these services (comma-separated), e.g. `--only salad,pdu`.
    #[arg(long, value_delimiter = ',')]
    only: Vec<ServiceName>,
    #[command(flatten)]
    virtual_farm: VirtualFarmArgs,
}

impl UpArgs {
    pub fn virtual_farm_enabled(&self) -> bool {
        self.virtual_farm.enabled()
    }
}

/// Total time children get to stop after SIGTERM before they are killed.
const STOP_BUDGET: Duration = Duration::from_millis(4000);
/// How long a service may take to answer `/healthz` after start.
const READY_BUDGET: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A child that ran this long is considered healthy again: its back-off resets.
const STABLE_AFTER: Duration = Duration::from_secs(60);

struct Supervised {
    name: ServiceName,
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
}

pub async fn run(args: UpArgs, loaded: Loaded, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let gw = &loaded.config.gateway;
    let names: Vec<ServiceName> = if args.only.is_empty() {
        ServiceName::ALL.to_vec()
    } else {
        args.only.clone()
    };
    std::fs::create_dir_all(&gw.state_dir)
        .with_context(|| format!("creating state dir {}", gw.state_dir.display()))?;
    crate::tokens::bootstrap(&gw.tokens_dir())?;
    for name in &names {
        let addr = SocketAddr::new(gw.bind_address, gw.port_of(*name));
        // Fail early and clearly instead of letting a child crash-loop on a taken port.
        TcpListener::bind(addr)
            .with_context(|| format!("port {} for {name} is not available", addr.port()))?;
    }
    let exe = std::env::current_exe().context("locating the dutgate binary")?;
    let overlay = if args.virtual_farm.enabled() {
        let env = virtual_farm::overrides(&args.virtual_farm, &loaded.config)?;
        println!(
            "dutgate: virtual farm of {} QEMU DUT(s); config overlay:",
            args.virtual_farm.virtual_duts
        );
        for (k, v) in &env {
            println!("  {k}={v}");
        }
        env
    } else {
        Vec::new()
    };
    let shutdown = dutgate_core::shutdown::on_signal();

    println!("dutgate: state dir {}", gw.state_dir.display());
    let mut children = Vec::new();
    for name in &names {
        let child = spawn(&exe, *name, config_path.as_deref(), &gw.state_dir, &overlay)?;
        children.push(Supervised {
            name: *name,
            child: Some(child),
            started: Instant::now(),
            backoff: Duration::from_secs(1),
            restart_at: None,
        });
    }

    let endpoints: BTreeMap<String, String> = names
        .iter()
        .map(|n| (n.as_str().to_string(), gw.internal_url(*n)))
        .collect();
    let endpoints_file = gw.state_dir.join("endpoints.json");
    std::fs::write(&endpoints_file, serde_json::to_vec_pretty(&endpoints)?)
        .with_context(|| format!("writing {}", endpoints_file.display()))?;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    let deadline = Instant::now() + READY_BUDGET;
    for name in &names {
        let url = gw.internal_url(*name);
        let ready = wait_healthy(&http, &url, deadline).await;
        let state = if ready {
            "ready"
        } else {
            "NOT READY (see its log lines)"
        };
        println!("  {:<9} {url:<24} {state}", name.as_str());
    }
    println!(
        "dutgate: admin token in {}, user token in {}; Ctrl-C stops everything",
        gw.tokens_dir().join("admin").display(),
        gw.tokens_dir().join("user").display()
    );
    let discovery = (args.virtual_farm.enabled()
        && !args.virtual_farm.no_discover
        && names.contains(&ServiceName::Mars))
    .then(|| {
        tokio::spawn(virtual_farm::discover_all(
            args.virtual_farm.clone(),
            loaded.config.clone(),
        ))
    });

    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        for s in &mut children {
            if let Some(child) = s.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    s.child = None;
                    if s.started.elapsed() > STABLE_AFTER {
                        s.backoff = Duration::from_secs(1);
                    }
                    eprintln!(
                        "dutgate: {} exited ({status}); restarting in {:?}",
                        s.name, s.backoff
                    );
                    s.restart_at = Some(Instant::now() + s.backoff);
                    s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
                }
            } else if s.restart_at.is_some_and(|t| Instant::now() >= t) {
                s.restart_at = None;
                match spawn(
                    &exe,
                    s.name,
                    config_path.as_deref(),
                    &gw.state_dir,
                    &overlay,
                ) {
                    Ok(child) => {
                        s.child = Some(child);
                        s.started = Instant::now();
                    }
                    Err(e) => {
                        eprintln!("dutgate: cannot restart {}: {e:#}", s.name);
                        s.restart_at = Some(Instant::now() + s.backoff);
                    }
                }
            }
        }
    }

    if let Some(d) = discovery {
        d.abort();
    }
    stop_all(&mut children).await;
    let _ = std::fs::remove_file(&endpoints_file);
    println!("dutgate: all services stopped");
    Ok(())
}

fn spawn(
    exe: &Path,
    name: ServiceName,
    config: Option<&Path>,
    state_dir: &Path,
    env: &[(String, String)],
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("--state-dir")
        .arg(state_dir)
        .arg(name.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: a terminal's Ctrl-C reaches only the supervisor, which then
        // stops the children in order instead of racing them.
        .process_group(0)
        .kill_on_drop(true);
    // If the supervisor dies without cleaning up (SIGKILL), the kernel stops the children.
    // SAFETY: prctl with PR_SET_PDEATHSIG is async-signal-safe and touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} {name}", exe.display()))?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(prefix_lines(name, out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(prefix_lines(name, err));
    }
    Ok(child)
}

async fn prefix_lines<R: AsyncRead + Unpin>(name: ServiceName, reader: R) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        eprintln!("{:>9} | {line}", name.as_str());
    }
}

async fn wait_healthy(http: &reqwest::Client, url: &str, deadline: Instant) -> bool {
    let health = format!("{url}/healthz");
    while Instant::now() < deadline {
        if let Ok(r) = http.get(&health).send().await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn stop_all(children: &mut [Supervised]) {
    for s in children.iter() {
        if let Some(pid) = s.child.as_ref().and_then(|c| c.id()) {
            // SAFETY: plain kill(2) on a pid we own.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + STOP_BUDGET;
    for s in children.iter_mut() {
        let Some(child) = s.child.as_mut() else {
            continue;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("dutgate: {} did not stop in time; killing it", s.name);
                let _ = child.kill().await;
            }
        }
        s.child = None;
    }
}
