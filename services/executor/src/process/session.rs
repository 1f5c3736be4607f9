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
    /// salad's refusal cursor for the machine when the job attached: refusals after it
    /// happened during this job (teardown records them as events).
    pub console_refusals_after: Option<u64>,
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
    match job.peers.salad.refusals(job.machine, 0).await {
        Ok(list) => state.console_refusals_after = Some(list.next),
        Err(e) => {
            tracing::warn!(job_id = job.row.id, machine_id = %job.machine, error = %e, "cannot read salad's console refusals")
        }
    }
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
        // salad binds a console that announces this machine only while a boot of it is
        // expected (design.md §10): announce this one right before the power-on.
        if let Err(e) = job.peers.salad.expect(job.machine).await {
            tracing::warn!(job_id = job.row.id, machine_id = %job.machine, error = %e, "cannot announce the boot to salad");
            r.event(
                kind::PHASE,
                format!("salad did not take the boot announcement: {e}"),
                json!({"phase": phase::POWER, "salad_expect": false}),
            )
            .await;
        }
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

/// Bucket, machine variables, render — within `infra_setup`, with its retries.
async fn setup(job: &JobContext, state: &mut SessionState) -> Result<JobSpec, Outcome> {
    // The limit is only known after rendering; render first with placeholders for it (the
    // submission was validated the same way, so this cannot fail on a valid job).
    let timeout = JobSpec::parse_and_render(&job.row.job_yaml, &placeholder_vars(job))
        .ok()
        .map(|s| s.timeouts.infra_setup)
        .unwrap_or(Timeout::INFINITE);
    // The job rides along with the state so that each attempt's future may borrow both.
    let mut ctx = (job, state);
    with_infra_retries(
        timeout,
        &mut ctx,
        |ctx| {
            let job: &JobContext = ctx.0;
            Box::pin(setup_steps(job, &mut *ctx.1))
        },
        |attempt, reason| {
            Box::pin(async move {
                job.reporter
                    .event(
                        kind::TIMEOUT,
                        format!(
                            "infra_setup failed ({reason}); retry {attempt} of {} in {} s",
                            timeout.retries,
                            retry_pause(attempt).as_secs()
                        ),
                        json!({"timeout": "infra_setup", "retried": attempt,
                               "retries": timeout.retries, "action": "retry",
                               "reason": reason}),
                    )
                    .await;
            })
        },
    )
    .await
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Runs `step` within `timeout`; an expiry or an infrastructure failure (`SetupFailed` with
/// `infra`) is retried `timeout.retries` times, 2 s, 4 s, … up to 10 s apart, `on_retry`
/// reporting each before its pause. Anything else (success, a failure of the job itself) is
/// final. The steps must be idempotent: a retry starts them again on the same `state`.
async fn with_infra_retries<'j, S, T>(
    timeout: Timeout,
    state: &mut S,
    mut step: impl for<'s> FnMut(&'s mut S) -> BoxFuture<'s, Result<T, Outcome>>,
    mut on_retry: impl FnMut(u32, String) -> BoxFuture<'j, ()>,
) -> Result<T, Outcome> {
    let mut attempt = 0u32;
    loop {
        let work = step(state);
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
        on_retry(attempt, reason).await;
        // Back off a little: what failed is a service of the gateway, which may be restarting.
        tokio::time::sleep(retry_pause(attempt)).await;
    }
}

fn retry_pause(attempt: u32) -> Duration {
    Duration::from_secs(u64::from(attempt.min(5)) * 2)
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
        // The keys travel on the kernel cmdline: bound to the machine's address, a DUT that
        // reads them anyway (an echoed console, a stolen script) cannot use them.
        let source = machine
            .ip_address
            .filter(|_| job.cfg.job_keys_from_machine_address);
        let access = storage
            .create(job.row.id, job.machine, source)
            .await
            .map_err(|e| setup_fail(format!("job bucket: {e}"), true))?;
        r.event(
            kind::PHASE,
            format!("job bucket {} created", access.bucket),
            json!({"phase": phase::SETUP, "bucket": access.bucket}),
        )
        .await;
        // The keys are on the kernel cmdline, which the kernel echoes on the console: salad
        // masks them in every console sink from before the first power-on.
        job.peers
            .salad
            .set_secrets(
                job.machine,
                &[
                    access.access_key.clone(),
                    access.secret_key.expose().to_string(),
                ],
            )
            .await
            .map_err(|e| setup_fail(format!("masking the job's keys on the console: {e}"), true))?;
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

/// How long one boot artifact may take to come through the boot service's cache (a kernel
/// or an initrd fetched from afar on a slow link).
const ARTIFACT_TIMEOUT: Duration = Duration::from_secs(600);

/// Fetches every artifact of the boot script once through the boot service's cache, so a
/// missing kernel is a SETUP_FAIL before power-on, not a silent DUT after it. The job process
/// reads them as the holder of the machine's lease (its client presents it), naming the
/// machine on artifact requests, which boot checks the lease against.
async fn prefetch(job: &JobContext) -> Result<(), Outcome> {
    let url = format!("{}/boot/{}/boot.ipxe", job.peers.boot_url, job.machine);
    let rb = job.peers.http.get(&url).timeout(Duration::from_secs(30));
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
        let mut url = reqwest::Url::parse(art)
            .map_err(|e| setup_fail(format!("boot artifact {art}: {e}"), true))?;
        url.query_pairs_mut()
            .append_pair("machine", &job.machine.to_string());
        match job
            .peers
            .http
            .get(url)
            .timeout(ARTIFACT_TIMEOUT)
            .send()
            .await
        {
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

#[cfg(test)]
mod infra_retry_tests {
    use super::*;

    fn infra(reason: &str) -> Outcome {
        setup_fail(reason, true)
    }

    fn reason_of(o: &Outcome) -> Option<(&str, bool)> {
        match o {
            Outcome::SetupFailed { reason, infra } => Some((reason.as_str(), *infra)),
            _ => None,
        }
    }

    /// Runs `with_infra_retries` over a scripted sequence of attempt results; returns the
    /// result, the attempts made and the retries reported.
    async fn run(
        timeout: Timeout,
        script: Vec<Result<u32, Outcome>>,
        attempt_takes: Duration,
    ) -> (Result<u32, Outcome>, usize, Vec<(u32, String)>) {
        let mut script = script.into_iter();
        let mut attempts = 0usize;
        let reported = std::sync::Mutex::new(Vec::new());
        let result = with_infra_retries(
            timeout,
            &mut attempts,
            |n| {
                *n += 1;
                let next = script.next().unwrap_or(Ok(0));
                Box::pin(async move {
                    tokio::time::sleep(attempt_takes).await;
                    next
                })
            },
            |attempt, reason| {
                reported.lock().unwrap().push((attempt, reason));
                Box::pin(async {})
            },
        )
        .await;
        (result, attempts, reported.into_inner().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn infrastructure_failures_are_retried_until_success() {
        let t = Timeout::new(Duration::from_secs(60), 3);
        let (result, attempts, reported) = run(
            t,
            vec![
                Err(infra("mars: connection refused")),
                Err(infra("s3: 503")),
                Ok(7),
            ],
            Duration::ZERO,
        )
        .await;
        assert_eq!(result.ok(), Some(7));
        assert_eq!(attempts, 3);
        assert_eq!(
            reported,
            vec![
                (1, "mars: connection refused".to_string()),
                (2, "s3: 503".to_string())
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_run_out_and_the_last_failure_stands() {
        let t = Timeout::new(Duration::from_secs(60), 1);
        let (result, attempts, reported) = run(
            t,
            vec![Err(infra("first")), Err(infra("second")), Ok(1)],
            Duration::ZERO,
        )
        .await;
        let err = result.err().unwrap();
        assert_eq!(reason_of(&err), Some(("second", true)));
        assert_eq!(attempts, 2);
        assert_eq!(reported.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_of_the_job_itself_is_not_retried() {
        let t = Timeout::new(Duration::from_secs(60), 5);
        let (result, attempts, reported) = run(
            t,
            vec![Err(setup_fail("the job does not render", false)), Ok(1)],
            Duration::ZERO,
        )
        .await;
        assert_eq!(
            reason_of(&result.err().unwrap()),
            Some(("the job does not render", false))
        );
        assert_eq!(attempts, 1);
        assert!(reported.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_infra_setup_is_retried_then_fails() {
        // Every attempt takes 10 s against a 3 s limit.
        let t = Timeout::new(Duration::from_secs(3), 2);
        let started = tokio::time::Instant::now();
        let (result, attempts, reported) =
            run(t, vec![Ok(1), Ok(2), Ok(3)], Duration::from_secs(10)).await;
        let err = result.err().unwrap();
        let (reason, infra) = reason_of(&err).unwrap();
        assert!(
            reason.contains("infra_setup expired after 3.0 s"),
            "{reason}"
        );
        assert!(infra);
        assert_eq!(attempts, 3);
        assert_eq!(reported.len(), 2);
        // 3 attempts of 3 s, pauses of 2 s and 4 s.
        assert_eq!(started.elapsed(), Duration::from_secs(3 * 3 + 2 + 4));
    }

    #[tokio::test(start_paused = true)]
    async fn no_retries_means_one_attempt() {
        let (result, attempts, _) = run(
            Timeout::INFINITE,
            vec![Err(infra("down")), Ok(1)],
            Duration::ZERO,
        )
        .await;
        assert!(result.is_err());
        assert_eq!(attempts, 1);
    }
}
