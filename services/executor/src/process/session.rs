//! The session: setup, then boots until the session ends or a budget runs out.
//!
//! Timers (docs/jobs.md §3) are plain deadlines recomputed after every console chunk: the
//! watcher sleeps until the earliest one, so an idle job costs nothing and an expiry is acted
//! on at once.

use std::collections::BTreeMap;
use std::time::Duration;

use dutgate_boot::model::{Artifact, BootConfig, Kernel};
use dutgate_core::JobStatus;
use dutgate_jobspec::{
    BootKind, ConsoleEvent, JobBucketVars, JobSpec, MachineVars, PatternEngine, TemplateVars,
    Timeout, WatchdogAction,
};
use dutgate_mars::model::Machine;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::console::{self, Console};
use super::{JobContext, Reporter};
use crate::model::{kind, phase};
use crate::storage::BucketAccess;

/// How the session ended; teardown turns it into a status.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// `session_end` (or `machine_unfit_for_service`) matched; the status comes from the
    /// console.
    Ended {
        status: JobStatus,
        unfit: bool,
    },
    /// A budget ran out (timeouts, reboots); the status comes from the console (INCOMPLETE,
    /// as `session_end` was not seen).
    Aborted {
        status: JobStatus,
        reason: String,
        /// The machine showed no sign of life: count it against the machine.
        machine_fault: bool,
    },
    /// The job could not be set up. `infra`: the gateway or the machine failed (not the job).
    SetupFailed {
        reason: String,
        infra: bool,
    },
    Cancelled,
    LeaseLost,
}

/// What teardown needs from the session besides the outcome.
#[derive(Default)]
pub(crate) struct SessionState {
    pub machine: Option<Machine>,
    pub bucket: Option<BucketAccess>,
}

pub(crate) async fn run(
    job: &JobContext,
    cancel: &CancellationToken,
    lease_lost: &CancellationToken,
    state: &mut SessionState,
) -> Outcome {
    // Cancelled between dispatch and start: nothing to run.
    if job.row.cancel_requested {
        return Outcome::Cancelled;
    }
    tokio::select! {
        o = session(job, state) => o,
        _ = cancel.cancelled() => Outcome::Cancelled,
        _ = lease_lost.cancelled() => Outcome::LeaseLost,
    }
}

fn setup_fail(reason: impl Into<String>, infra: bool) -> Outcome {
    Outcome::SetupFailed {
        reason: reason.into(),
        infra,
    }
}

async fn session(job: &JobContext, state: &mut SessionState) -> Outcome {
    let r = &job.reporter;
    let started = Instant::now();
    r.phase(phase::SETUP, "setting up the job").await;

    // The raw job, rendered once for its timeouts (infra_setup bounds the setup itself).
    let spec = match setup(job, state).await {
        Ok(spec) => spec,
        Err(o) => return o,
    };
    let mut engine = PatternEngine::for_job(&spec);
    r.phase(phase::CONSOLE, "attaching to the console").await;
    let mut console = match console::attach(
        job.peers.salad.clone(),
        job.machine,
        job.peers.console_host.clone(),
        job.dir.join("console.log"),
        job.reporter.progress.clone(),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return setup_fail(e, true),
    };
    let Some(machine) = state.machine.clone() else {
        return setup_fail("machine record missing", true);
    };
    let (Some(pdu), Some(port)) = (machine.pdu.clone(), machine.pdu_port_id.clone()) else {
        return setup_fail(format!("machine {} has no PDU port", machine.id), true);
    };
    let off = Duration::try_from_secs_f64(machine.pdu_off_delay.max(0.0)).unwrap_or_default();
    let overall_end = spec.timeouts.overall.duration.map(|d| started + d);
    let mut retried: BTreeMap<String, u32> = BTreeMap::new();

    for boot_index in 0u32.. {
        let (boot_kind, deployment) = spec.deployment_for(boot_index);
        let kind_name = match boot_kind {
            BootKind::Start => "start",
            BootKind::Continue => "continue",
        };
        if let Err(e) = job
            .reporter
            .store
            .set_boots(job.row.id, i64::from(boot_index) + 1)
            .await
        {
            tracing::warn!(job_id = job.row.id, error = %e, "cannot store the boot count");
        }
        r.event(
            kind::BOOT,
            format!("boot {} ({kind_name} deployment)", boot_index + 1),
            json!({"index": boot_index, "deployment": kind_name}),
        )
        .await;
        r.phase(phase::BOOT_CONFIG, "setting the boot config").await;
        let config = BootConfig {
            kernel: Kernel {
                url: deployment.kernel.url.clone(),
                cmdline: deployment.kernel.cmdline.clone(),
                sha256: None,
            },
            initramfs: deployment
                .initramfs
                .iter()
                .map(|i| Artifact {
                    url: i.url.clone(),
                    sha256: None,
                })
                .collect(),
            job_id: Some(job.row.id.to_string()),
        };
        if let Err(e) = job.peers.boot.put(job.machine, &config).await {
            let infra = e.status().is_none_or(|s| s.is_server_error());
            return setup_fail(format!("boot config: {e}"), infra);
        }
        if let Err(o) = prefetch(job).await {
            return o;
        }

        // Bytes still in flight from the previous boot belong to it, not to this one.
        while console.rx.try_recv().is_ok() {}
        engine.new_boot();
        r.phase(
            phase::POWER,
            format!("power cycle (off {:.1} s)", off.as_secs_f64()),
        )
        .await;
        if let Err(e) = job.peers.pdu.cycle(&pdu, &port, Some(off)).await {
            return setup_fail(format!("power cycle of {pdu} port {port}: {e}"), true);
        }
        r.phase(phase::RUNNING, "watching the console").await;
        let result = watch(
            job,
            &spec,
            &mut engine,
            &mut console,
            boot_index,
            overall_end,
        )
        .await;
        let expired = match result {
            Watch::Ended => {
                let unfit = engine.machine_unfit();
                return Outcome::Ended {
                    status: engine.status(),
                    unfit,
                };
            }
            Watch::Reboot => "session_reboot".to_string(),
            Watch::Expired(name) => name,
        };
        // A reboot request spends a boot_cycle retry; a timer spends its own.
        let (budget_name, timeout) = if expired == "session_reboot" {
            ("boot_cycle".to_string(), spec.timeouts.boot_cycle)
        } else {
            let t = timeout_of(&spec, &expired);
            (expired.clone(), t)
        };
        let count = retried.entry(budget_name.clone()).or_insert(0);
        *count += 1;
        let allowed = if budget_name == "overall" {
            0
        } else {
            timeout.retries
        };
        let retry = *count <= allowed;
        if expired != "session_reboot" {
            r.event(
                kind::TIMEOUT,
                format!(
                    "timeout {expired} expired ({} of {allowed} retries used): {}",
                    (*count).min(allowed),
                    if retry { "retrying" } else { "aborting" }
                ),
                json!({"timeout": expired, "retried": *count, "retries": allowed,
                       "action": if retry { "retry" } else { "abort" }}),
            )
            .await;
        }
        if !retry {
            return Outcome::Aborted {
                status: engine.status(),
                reason: if expired == "session_reboot" {
                    format!("reboot requested with no boot_cycle retries left ({allowed} used)")
                } else {
                    format!("timeout {expired} expired (retries exhausted: {allowed} of {allowed})")
                },
                machine_fault: expired == "first_console_activity",
            };
        }
        r.event(
            kind::RETRY,
            format!("power cycling into the continue deployment ({expired})"),
            json!({"reason": expired, "boot": boot_index + 2}),
        )
        .await;
    }
    Outcome::Aborted {
        status: JobStatus::Incomplete,
        reason: "too many boots".into(),
        machine_fault: false,
    }
}

fn timeout_of(spec: &JobSpec, name: &str) -> Timeout {
    let t = &spec.timeouts;
    match name {
        "overall" => t.overall,
        "boot_cycle" => t.boot_cycle,
        "console_activity" => t.console_activity,
        "first_console_activity" => t.first_console_activity,
        other => other
            .strip_prefix("watchdog:")
            .and_then(|w| t.watchdogs.get(w).copied())
            .unwrap_or(Timeout::INFINITE),
    }
}

/// Bucket, machine variables, render — within `infra_setup`. An infrastructure failure or an
/// expired `infra_setup` is retried `infra_setup.retries` times (the steps are idempotent: the
/// bucket and its keys are kept across attempts); a job that cannot render is not.
async fn setup(job: &JobContext, state: &mut SessionState) -> Result<JobSpec, Outcome> {
    // The limit is only known after rendering; render first with placeholders for it (the
    // submission was validated the same way, so this cannot fail on a valid job).
    let timeout = JobSpec::parse_and_render(&job.row.job_yaml, &placeholder_vars(job))
        .ok()
        .map(|s| s.timeouts.infra_setup)
        .unwrap_or(Timeout::INFINITE);
    let mut attempt = 0u32;
    loop {
        let work = setup_steps(job, state);
        let result = match timeout.duration {
            Some(d) => match tokio::time::timeout(d, work).await {
                Ok(r) => r,
                Err(_) => Err(setup_fail(
                    format!("timeout infra_setup expired after {:.1} s", d.as_secs_f64()),
                    true,
                )),
            },
            None => work.await,
        };
        let reason = match &result {
            Err(Outcome::SetupFailed {
                reason,
                infra: true,
            }) if attempt < timeout.retries => reason.clone(),
            _ => return result,
        };
        attempt += 1;
        // Back off a little: what failed is a service of the gateway, which may be restarting.
        let pause = Duration::from_secs(u64::from(attempt.min(5)) * 2);
        job.reporter
            .event(
                kind::TIMEOUT,
                format!(
                    "infra_setup failed ({reason}); retry {attempt} of {} in {} s",
                    timeout.retries,
                    pause.as_secs()
                ),
                json!({"timeout": "infra_setup", "retried": attempt, "retries": timeout.retries,
                       "action": "retry", "reason": reason}),
            )
            .await;
        tokio::time::sleep(pause).await;
    }
}

fn placeholder_vars(job: &JobContext) -> TemplateVars {
    let mut vars = TemplateVars::placeholders();
    for (k, v) in &job.cfg.template_vars {
        vars.set(k.clone(), v.clone());
    }
    vars
}

async fn setup_steps(job: &JobContext, state: &mut SessionState) -> Result<JobSpec, Outcome> {
    let r = &job.reporter;
    let machine = job
        .peers
        .mars
        .machine(job.machine)
        .await
        .map_err(|e| setup_fail(format!("machine record: {e}"), true))?;
    state.machine = Some(machine.clone());
    if let Some(storage) = job.storage.as_ref().filter(|_| state.bucket.is_none()) {
        let access = storage
            .create(job.row.id, job.machine)
            .await
            .map_err(|e| setup_fail(format!("job bucket: {e}"), true))?;
        r.event(
            kind::PHASE,
            format!("job bucket {} created", access.bucket),
            json!({"phase": phase::SETUP, "bucket": access.bucket}),
        )
        .await;
        state.bucket = Some(access.clone());
        let tarball = job.dir.join("initial.tar.gz");
        if job.row.has_tarball && tarball.exists() {
            storage
                .upload_tarball(&access.bucket, &tarball)
                .await
                .map_err(|e| setup_fail(format!("initial tarball: {e}"), false))?;
            let _ = std::fs::remove_file(&tarball);
        }
    }
    if job.storage.is_none() && job.row.has_tarball {
        r.event(
            kind::PHASE,
            "no object storage is configured for jobs: the initial tarball is not used",
            json!({"phase": phase::SETUP}),
        )
        .await;
    }
    let mut vars = TemplateVars {
        machine: Some(MachineVars {
            id: machine.id.to_string(),
            base_name: machine.base_name.clone(),
            full_name: machine.full_name.clone(),
            tags: machine.all_tags().map(|t| t.to_string()).collect(),
            ip_address: machine.ip_address.map(|ip| ip.to_string()),
            local_tty_device: machine.local_tty_device.clone(),
            ready_for_service: machine.ready_for_service,
        }),
        s3_url: state.bucket.as_ref().map(|b| b.s3_url.clone()),
        job_bucket: state.bucket.as_ref().map(|b| JobBucketVars {
            name: b.bucket.clone(),
            access_key: b.access_key.clone(),
            secret_key: b.secret_key.clone(),
        }),
        registry: Some(job.cfg.registry(&job.gw)),
        gateway: Some(job.gw.public_host.clone()),
        extra: BTreeMap::new(),
    };
    for (k, v) in &job.cfg.template_vars {
        vars.set(k.clone(), v.clone());
    }
    JobSpec::parse_and_render(&job.row.job_yaml, &vars).map_err(|e| {
        setup_fail(
            format!("the job does not render for machine {}: {e}", machine.id),
            false,
        )
    })
}

/// Fetches every artifact of the boot script once through the boot service's cache, so a
/// missing kernel is a SETUP_FAIL before power-on, not a silent DUT after it.
async fn prefetch(job: &JobContext) -> Result<(), Outcome> {
    let url = format!("{}/boot/{}/boot.ipxe", job.peers.boot_url, job.machine);
    let mut rb = job.peers.http.get(&url).timeout(Duration::from_secs(30));
    if let Some(t) = &job.peers.user_token {
        rb = rb.bearer_auth(t.expose());
    }
    let script = match rb.send().await {
        Ok(resp) if resp.status().is_success() => resp.text().await.unwrap_or_default(),
        Ok(resp) => {
            return Err(setup_fail(
                format!("boot script {url}: {}", resp.status()),
                true,
            ));
        }
        Err(e) => return Err(setup_fail(format!("boot script {url}: {e}"), true)),
    };
    for art in script
        .split_whitespace()
        .filter(|w| w.starts_with("http") && w.contains("/artifacts/"))
    {
        let mut rb = job.peers.http.get(art);
        if let Some(t) = &job.peers.user_token {
            rb = rb.bearer_auth(t.expose());
        }
        match rb.send().await {
            Ok(mut resp) if resp.status().is_success() => {
                // Read to the end: the cache then holds the whole file.
                loop {
                    match resp.chunk().await {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            return Err(setup_fail(format!("boot artifact {art}: {e}"), true));
                        }
                    }
                }
            }
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                let detail = serde_json::from_str::<dutgate_core::ErrorBody>(&body)
                    .map(|b| b.error)
                    .unwrap_or_else(|_| status.to_string());
                return Err(setup_fail(format!("boot artifact {art}: {detail}"), false));
            }
            Err(e) => return Err(setup_fail(format!("boot artifact {art}: {e}"), true)),
        }
    }
    Ok(())
}

enum Watch {
    Ended,
    Reboot,
    /// Name of the timer (`watchdog:<name>` for watchdogs).
    Expired(String),
}

async fn watch(
    job: &JobContext,
    spec: &JobSpec,
    engine: &mut PatternEngine,
    console: &mut Console,
    boot_index: u32,
    overall_end: Option<Instant>,
) -> Watch {
    let boot_started = Instant::now();
    let r: &Reporter = &job.reporter;
    let t = &spec.timeouts;
    let mut last_activity = boot_started;
    let mut watchdogs: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        // The earliest deadline and whose it is.
        let mut next: Option<(Instant, String)> = None;
        let mut consider = |at: Option<Instant>, name: &str| {
            if let Some(at) = at
                && next.as_ref().is_none_or(|(n, _)| at < *n)
            {
                next = Some((at, name.to_string()));
            }
        };
        consider(overall_end, "overall");
        consider(
            t.boot_cycle.duration.map(|d| boot_started + d),
            "boot_cycle",
        );
        if engine.has_activity() {
            consider(
                t.console_activity.duration.map(|d| last_activity + d),
                "console_activity",
            );
        } else {
            consider(
                t.first_console_activity.duration.map(|d| boot_started + d),
                "first_console_activity",
            );
        }
        for (name, armed) in &watchdogs {
            let d = t.watchdogs.get(name).and_then(|w| w.duration);
            consider(d.map(|d| *armed + d), &format!("watchdog:{name}"));
        }
        let sleep = async {
            match &next {
                Some((at, _)) => tokio::time::sleep_until(*at).await,
                None => std::future::pending().await,
            }
        };
        let chunk = tokio::select! {
            c = console.rx.recv() => c,
            _ = sleep => {
                let name = next.map(|(_, n)| n).unwrap_or_default();
                return Watch::Expired(name);
            }
        };
        let Some(chunk) = chunk else {
            // The console reader stopped (it only does when the job drops it): end the boot.
            return Watch::Expired("console".into());
        };
        let now = Instant::now();
        if engine.has_activity() {
            last_activity = now;
        }
        let mut reboot = false;
        for ev in engine.feed(&chunk) {
            match ev {
                ConsoleEvent::FirstActivity => {
                    last_activity = now;
                    r.event(
                        kind::CONSOLE_ACTIVITY,
                        "first console activity",
                        json!({"boot": boot_index}),
                    )
                    .await;
                }
                ConsoleEvent::SessionEnd => pattern(r, "session_end").await,
                ConsoleEvent::SessionReboot => {
                    pattern(r, "session_reboot").await;
                    reboot = true;
                }
                ConsoleEvent::JobSuccess => pattern(r, "job_success").await,
                ConsoleEvent::JobWarn => pattern(r, "job_warn").await,
                ConsoleEvent::MachineUnfit => pattern(r, "machine_unfit_for_service").await,
                ConsoleEvent::Watchdog { name, action } => {
                    let a = match action {
                        WatchdogAction::Start => "start",
                        WatchdogAction::Reset => "reset",
                        WatchdogAction::Stop => "stop",
                    };
                    match action {
                        WatchdogAction::Start | WatchdogAction::Reset => {
                            watchdogs.insert(name.clone(), now);
                        }
                        WatchdogAction::Stop => {
                            watchdogs.remove(&name);
                        }
                    }
                    r.event(
                        kind::WATCHDOG,
                        format!("watchdog {name}: {a}"),
                        json!({"name": name, "action": a}),
                    )
                    .await;
                }
            }
        }
        if engine.session_ended() {
            return Watch::Ended;
        }
        if reboot {
            return Watch::Reboot;
        }
    }
}

async fn pattern(r: &Reporter, name: &str) {
    r.event(
        kind::PATTERN,
        format!("console pattern {name} matched"),
        json!({"pattern": name}),
    )
    .await;
}
