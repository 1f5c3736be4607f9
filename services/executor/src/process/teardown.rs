//! Teardown: always runs, whatever happened — power off, boot config cleared, bucket files
//! kept, credentials revoked, lease released. Each step is attempted even when an earlier one
//! failed, and each is an event.

use std::path::Path;
use std::time::Duration;

use dutgate_boot::client::BootClient;
use dutgate_core::{JobStatus, MachineId};
use dutgate_jobspec::{DEFAULT_INFRA_TEARDOWN, JobSpec, TemplateVars};
use dutgate_mars::model::{Machine, ReleaseOutcome};
use dutgate_pdu::PduClient;
use dutgate_pdu_driver::Switch;
use dutgate_salad::client::SaladClient;
use serde_json::json;

use super::session::{Outcome, SessionState};
use super::{JobContext, Reporter};
use crate::model::{kind, phase};
use crate::storage::JobStorage;

/// The final status, its reason, and how the machine is given back (`None`: not released,
/// the lease is gone or must expire).
pub(crate) fn classify(outcome: &Outcome) -> (JobStatus, String, Option<ReleaseOutcome>) {
    match outcome {
        Outcome::Ended { status, unfit } => {
            if *unfit {
                (
                    *status,
                    "the machine reported itself unfit for service".into(),
                    Some(ReleaseOutcome::MachineUnfit),
                )
            } else {
                (*status, "session ended".into(), Some(ReleaseOutcome::Ok))
            }
        }
        Outcome::Aborted {
            status,
            reason,
            machine_fault,
        } => (
            *status,
            reason.clone(),
            Some(if *machine_fault {
                ReleaseOutcome::InfrastructureFailure
            } else {
                ReleaseOutcome::Ok
            }),
        ),
        Outcome::SetupFailed { reason, infra } => (
            JobStatus::SetupFail,
            reason.clone(),
            Some(if *infra {
                ReleaseOutcome::InfrastructureFailure
            } else {
                ReleaseOutcome::Ok
            }),
        ),
        Outcome::Cancelled => (
            JobStatus::Incomplete,
            "cancelled".into(),
            Some(ReleaseOutcome::Ok),
        ),
        Outcome::LeaseLost => (
            JobStatus::Incomplete,
            "lease lost (no heartbeat reached mars in time)".into(),
            None,
        ),
    }
}

/// The least time a teardown gets, whatever the job asks (`timeouts.infra_teardown`): enough
/// for the power-off (two attempts, each read back by the pdu service), the boot config and
/// the lease release. A shorter limit would cut those off and leave the DUT powered, the
/// lease held until it expires and the DUT's credentials valid.
pub const INFRA_TEARDOWN_FLOOR: Duration = Duration::from_secs(30);

/// How long job `job_yaml`'s teardown may take: its `timeouts.infra_teardown` (default
/// [`DEFAULT_INFRA_TEARDOWN`]), at least [`INFRA_TEARDOWN_FLOOR`].
pub(crate) fn teardown_limit(job_yaml: &str) -> Duration {
    JobSpec::parse_and_render(job_yaml, &TemplateVars::placeholders())
        .ok()
        .and_then(|s| s.timeouts.infra_teardown.duration)
        .unwrap_or(DEFAULT_INFRA_TEARDOWN)
        .max(INFRA_TEARDOWN_FLOOR)
}

pub(crate) async fn run(
    job: &JobContext,
    outcome: &Outcome,
    state: &SessionState,
) -> (JobStatus, String) {
    let (status, reason, release) = classify(outcome);
    let r = &job.reporter;
    r.phase(
        phase::TEARDOWN,
        format!("tearing down ({status}: {reason})"),
    )
    .await;
    let limit = teardown_limit(&job.row.job_yaml);
    let steps = async {
        let machine = match &state.machine {
            Some(m) => Some(m.clone()),
            None => job.peers.mars.machine(job.machine).await.ok(),
        };
        // With the lease gone the machine may already serve someone else: do not touch it.
        if release.is_some() {
            power_off(&job.peers.pdu, machine.as_ref(), job.machine, r).await;
        }
        clear_boot(&job.peers.boot, job.machine, job.row.id, r).await;
        if let (Some(storage), Some(bucket)) = (&job.storage, &state.bucket) {
            keep_bucket(storage.as_ref(), &bucket.bucket, &job.dir, r).await;
        }
        if let Some(after) = state.console_refusals_after {
            record_console_refusals(&job.peers.salad, job.machine, after, r).await;
        }
        // The keys are revoked; their masking goes with the lease (never the next job's).
        if release.is_some() && state.bucket.is_some() {
            let step = "clear_console_secrets";
            match job.peers.salad.clear_secrets(job.machine).await {
                Ok(()) => step_ok(r, step, "console masking of the job's keys cleared").await,
                Err(e) => step_err(r, step, &e.to_string()).await,
            }
        }
        if let Some(outcome) = release {
            let step = "release_lease";
            match job
                .peers
                .mars
                .release(&job.lease, outcome, Some(&reason))
                .await
            {
                Ok(m) => {
                    step_ok(
                        r,
                        step,
                        &format!(
                            "lease released ({}): machine is {}",
                            outcome.as_str(),
                            m.state
                        ),
                    )
                    .await
                }
                Err(e) => step_err(r, step, &e.to_string()).await,
            }
        }
    };
    if tokio::time::timeout(limit, steps).await.is_err() {
        r.event(
            kind::TEARDOWN,
            format!(
                "timeout infra_teardown expired after {:.1} s",
                limit.as_secs_f64()
            ),
            json!({"step": "infra_teardown", "ok": false}),
        )
        .await;
    }
    (status, reason)
}

pub(crate) async fn step_ok(r: &Reporter, step: &str, message: &str) {
    r.event(
        kind::TEARDOWN,
        message.to_string(),
        json!({"step": step, "ok": true}),
    )
    .await;
}

pub(crate) async fn step_err(r: &Reporter, step: &str, error: &str) {
    tracing::error!(job_id = r.id, step, error, "teardown step failed");
    r.event(
        kind::TEARDOWN,
        format!("{step} failed: {error}"),
        json!({"step": step, "ok": false, "error": error}),
    )
    .await;
}

/// Powers the machine's port off (read back by the pdu service).
pub(crate) async fn power_off(
    pdu: &PduClient,
    machine: Option<&Machine>,
    id: MachineId,
    r: &Reporter,
) {
    let step = "power_off";
    let Some((p, port)) = machine.and_then(|m| Some((m.pdu.clone()?, m.pdu_port_id.clone()?)))
    else {
        step_err(r, step, &format!("machine {id} has no PDU port")).await;
        return;
    };
    // Two attempts: a transient PDU error must not leave a DUT running.
    let mut last = String::new();
    for _ in 0..2 {
        match pdu.set(&p, &port, Switch::Off).await {
            Ok(_) => {
                step_ok(r, step, &format!("{p} port {port} powered off")).await;
                return;
            }
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    step_err(r, step, &last).await;
}

/// Records, as events of the job, the console streams salad refused for its machine since
/// the job attached (refusal `seq` after `after`).
async fn record_console_refusals(
    salad: &SaladClient,
    machine: MachineId,
    after: u64,
    r: &Reporter,
) {
    let list = match salad.refusals(machine, after).await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(job_id = r.id, machine_id = %machine, error = %e, "cannot read salad's console refusals");
            return;
        }
    };
    for refusal in list.refusals {
        r.event(
            kind::CONSOLE_REFUSED,
            format!(
                "salad refused console stream {} announcing {}: {}",
                refusal.stream, refusal.claimed, refusal.reason
            ),
            json!({
                "stream": refusal.stream,
                "kind": refusal.kind,
                "source": refusal.source,
                "claimed": refusal.claimed.to_string(),
                "bound_to": refusal.bound_to.map(|m| m.to_string()),
                "reason": refusal.reason,
                "at": refusal.at,
            }),
        )
        .await;
    }
}

/// Clears the boot config this job set (never the next job's).
pub(crate) async fn clear_boot(boot: &BootClient, machine: MachineId, job_id: i64, r: &Reporter) {
    let step = "clear_boot_config";
    match boot.delete(machine, Some(&job_id.to_string())).await {
        Ok(()) => step_ok(r, step, "boot config cleared").await,
        // 409: the config is no longer this job's (already replaced): nothing to clear.
        Err(e) if e.status() == Some(reqwest::StatusCode::CONFLICT) => {
            step_ok(r, step, "boot config already replaced").await
        }
        Err(e) => step_err(r, step, &e.to_string()).await,
    }
}

/// Revokes the DUT's credentials (always first: the DUT must not write while its files are
/// collected, nor after the job), brings the bucket's files back as artifacts, then deletes
/// the bucket: from then on the artifacts' retention (`artifacts_retention_days`) applies.
/// A bucket whose files could not be collected is kept, so nothing is lost.
pub(crate) async fn keep_bucket(storage: &dyn JobStorage, bucket: &str, dir: &Path, r: &Reporter) {
    match storage.revoke(bucket).await {
        Ok(()) => step_ok(r, "revoke_credentials", "DUT credentials revoked").await,
        Err(e) => step_err(r, "revoke_credentials", &e.to_string()).await,
    }
    let dest = dir.join("artifacts").join("bucket");
    let collected = match storage.collect(bucket, &dest).await {
        Ok(files) => {
            step_ok(
                r,
                "collect_bucket",
                &format!("{} file(s) kept from bucket {bucket}", files.len()),
            )
            .await;
            true
        }
        Err(e) => {
            step_err(r, "collect_bucket", &e.to_string()).await;
            false
        }
    };
    if collected {
        match storage.delete(bucket).await {
            Ok(()) => step_ok(r, "delete_bucket", &format!("bucket {bucket} deleted")).await,
            Err(e) => step_err(r, "delete_bucket", &e.to_string()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(teardown: &str) -> String {
        format!(
            "version: 1\ntimeouts:\n{teardown}\ndeployment:\n  start:\n    kernel:\n      \
             url: \"http://a/k\"\n"
        )
    }

    #[test]
    fn infra_teardown_has_a_floor() {
        assert_eq!(
            teardown_limit(&yaml("  infra_teardown: {seconds: 0}")),
            INFRA_TEARDOWN_FLOOR
        );
        assert_eq!(
            teardown_limit(&yaml("  infra_teardown: {seconds: 5}")),
            INFRA_TEARDOWN_FLOOR
        );
        assert_eq!(
            teardown_limit(&yaml("  infra_teardown: {minutes: 2}")),
            Duration::from_secs(120)
        );
        assert_eq!(
            teardown_limit(&yaml("  overall: {minutes: 5}")),
            DEFAULT_INFRA_TEARDOWN
        );
    }
}
