//! What the long-lived executor does when a job ends (docs/notifications.md, docs/metrics.md):
//! count it by status with its queue wait and duration, and deliver its webhooks.
//!
//! Jobs end in two processes: the executor stores the statuses it decides itself
//! (cancellations, deadlines, dead job processes), the job process (`dutgate job <id>`) stores
//! the others and has no `/metrics`. Both reach [`Ended`] here, in the executor: the first
//! through the store's finish hook ([`crate::store::Store::with_finish_hook`]), the second
//! when the supervisor sees the process gone with its job finished.
//!
//! Webhooks: the global ones of `executor.webhooks` (admins' config: `job_end`, and
//! `machine_state` for mars' machine events, [`MachineFollower`]) and a job's own, given
//! at submission (`webhook=<url>` query parameters and an `X-Dutgate-Webhook-Secret` header,
//! kept in `<job dir>/webhooks.json`, mode
//! 0600, which the artifact routes never serve). Each delivery is a POST of a JSON body,
//! signed `X-Dutgate-Signature: sha256=<hex HMAC-SHA256 of the body>` with the webhook's
//! secret, sent through the outbound policy ([`dutgate_core::outbound`]), retried with
//! exponential back-off for at most [`MAX_ATTEMPTS`] attempts of [`ATTEMPT_TIMEOUT`] each.
//! Deliveries run on their own tasks: a job never waits for them. The queue is in memory:
//! deliveries still pending when the executor stops are lost (documented).

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::audit::{Actor, AuditLog};
use dutgate_core::config::GatewayConfig;
use dutgate_core::outbound::{OutboundPolicy, SendError};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::model::Timestamp;
use crate::store::JobRow;

/// Most attempts of one delivery (the first one included).
pub const MAX_ATTEMPTS: u32 = 6;
/// Bound of one attempt: connection, request and answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before the second attempt; doubled before each next one (1, 2, 4, 8, 16 s).
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Most webhooks a job may name at submission.
pub const MAX_JOB_WEBHOOKS: usize = 4;
/// Most deliveries in flight at once (the others wait their turn).
const CONCURRENT_DELIVERIES: usize = 16;
/// Answers are read up to this size, then dropped (nobody looks at them).
const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "X-Dutgate-Signature";
/// The submission header with the secret of the job's own webhooks.
pub const SECRET_HEADER: &str = "X-Dutgate-Webhook-Secret";
/// The file, in a job's directory, with the webhooks given at its submission.
pub const JOB_WEBHOOKS_FILE: &str = "webhooks.json";

/// What a global webhook is sent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookEvent {
    /// A job reached its final status.
    JobEnd,
    /// A machine changed state (mars' events: leases, training, retire/activate, …). For
    /// admins' global webhooks only; with several executors sharing a queue, each one sends
    /// them.
    MachineState,
}

impl WebhookEvent {
    fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::JobEnd => "job_end",
            WebhookEvent::MachineState => "machine_state",
        }
    }
}

/// One entry of `executor.webhooks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where deliveries are POSTed (`http` or `https`; internal addresses only when
    /// `gateway.outbound.allow` lists them).
    pub url: String,
    /// File holding the HMAC secret (trailing whitespace ignored). Unset: deliveries are not
    /// signed.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// What it is sent for; default `[job_end]`.
    #[serde(default = "default_events")]
    pub events: Vec<WebhookEvent>,
}

fn default_events() -> Vec<WebhookEvent> {
    vec![WebhookEvent::JobEnd]
}

/// The webhooks a job was submitted with, as kept in its directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobWebhooks {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// Why a job's webhooks cannot be kept.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(#[from] dutgate_core::outbound::Refusal),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks a job's webhooks: at most [`MAX_JOB_WEBHOOKS`], each an http(s) URL the outbound
/// policy lets through now (it is checked again at every delivery).
pub async fn check_job_webhooks(
    policy: &OutboundPolicy,
    urls: &[String],
) -> Result<(), WebhookError> {
    if urls.len() > MAX_JOB_WEBHOOKS {
        return Err(WebhookError::Invalid(format!(
            "at most {MAX_JOB_WEBHOOKS} webhooks per job, got {}",
            urls.len()
        )));
    }
    for u in urls {
        let url = reqwest::Url::parse(u)
            .map_err(|e| WebhookError::Invalid(format!("webhook {u:?} is not a URL: {e}")))?;
        policy
            .check_url_resolved(&url, Duration::from_secs(2))
            .await?;
    }
    Ok(())
}

/// Keeps a job's webhooks in its directory, readable by the executor's user only.
pub fn save_job_webhooks(job_dir: &Path, hooks: &JobWebhooks) -> Result<(), WebhookError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = job_dir.join(JOB_WEBHOOKS_FILE);
    let io = |source| WebhookError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(job_dir).map_err(io)?;
    let bytes = serde_json::to_vec(hooks).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    f.write_all(&bytes).map_err(io)
}

async fn load_job_webhooks(job_dir: &Path) -> Option<JobWebhooks> {
    let bytes = tokio::fs::read(job_dir.join(JOB_WEBHOOKS_FILE))
        .await
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether `header` is the signature of `body` under `secret` (compared in constant time).
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// The body of a `job_end` delivery.
pub fn job_end_body(gw: &GatewayConfig, row: &JobRow) -> serde_json::Value {
    serde_json::json!({
        "event": "job_end",
        "job": {
            "id": row.id,
            "external_id": row.external_id,
            "status": row.status,
            "exit_code": row.status.map(|s| s.exit_code()),
            "reason": row.reason,
            "owner": row.owner,
            "machine_id": row.machine_id,
            "target": {"id": row.target_id, "tags": row.target_tags},
            "submitted_at": Timestamp(row.submitted_at),
            "dispatched_at": row.dispatched_at.map(Timestamp),
            "started_at": row.started_at.map(Timestamp),
            "finished_at": row.finished_at.map(Timestamp),
            "url": crate::api::job_url(gw, row.id),
        },
    })
}

/// Who a delivery is for: decides how a refusal is reported.
#[derive(Debug, Clone)]
enum Origin {
    /// `executor.webhooks[index]`.
    Global(usize),
    /// Given at job `id`'s submission by `owner`.
    Job { owner: String },
}

#[derive(Debug, Clone)]
struct Delivery {
    event: WebhookEvent,
    /// The job's id (`job_end`) or mars' event sequence number (`machine_state`), for logs.
    job_id: i64,
    url: String,
    secret: Option<Vec<u8>>,
    body: Arc<Vec<u8>>,
    origin: Origin,
}

/// How a delivery ended, for `executor_webhook_deliveries_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Failed,
    Refused,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }
}

/// Records a job's end once (however many paths tell of it) and sends its webhooks.
pub struct Ended {
    gw: Arc<GatewayConfig>,
    globals: Vec<(WebhookConfig, Option<Vec<u8>>)>,
    state_dir: PathBuf,
    sender: Sender,
    seen: HashSet<i64>,
    seen_order: VecDeque<i64>,
}

/// Jobs remembered as counted already: far more than can end between two tellings of one.
const SEEN_CAPACITY: usize = 4096;

impl Ended {
    /// Reads the global webhooks' secrets (a missing or unreadable one is a startup error).
    pub fn new(
        gw: Arc<GatewayConfig>,
        globals: &[WebhookConfig],
        audit: AuditLog,
    ) -> Result<Self, String> {
        let state_dir = crate::process::executor_state_dir(&gw);
        let mut loaded = Vec::new();
        for (i, w) in globals.iter().enumerate() {
            reqwest::Url::parse(&w.url)
                .map_err(|e| format!("executor.webhooks[{i}].url {:?}: {e}", w.url))?;
            let secret = match &w.secret_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| {
                            format!("executor.webhooks[{i}].secret_file {}: {e}", p.display())
                        })?
                        .trim_end()
                        .as_bytes()
                        .to_vec(),
                ),
                None => None,
            };
            loaded.push((w.clone(), secret));
        }
        let policy = OutboundPolicy::from_gateway(&gw);
        let client = policy
            .client(Duration::from_secs(5), Some(ATTEMPT_TIMEOUT))
            .map_err(|e| format!("webhook HTTP client: {e}"))?;
        Ok(Self {
            gw,
            globals: loaded,
            state_dir,
            sender: Sender {
                policy,
                client,
                audit,
                slots: Arc::new(Semaphore::new(CONCURRENT_DELIVERIES)),
            },
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
        })
    }

    /// The follower of mars' machine events, when a global webhook wants them.
    pub fn machine_follower(
        &self,
        mars: dutgate_mars::client::MarsClient,
    ) -> Option<MachineFollower> {
        let hooks: Vec<_> = self
            .globals
            .iter()
            .enumerate()
            .filter(|(_, (w, _))| w.events.contains(&WebhookEvent::MachineState))
            .map(|(i, (w, secret))| (i, w.url.clone(), secret.clone()))
            .collect();
        (!hooks.is_empty()).then(|| MachineFollower {
            mars,
            hooks,
            sender: self.sender.clone(),
        })
    }

    /// Takes ended jobs from `rx` until `shutdown`.
    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<JobRow>,
        shutdown: CancellationToken,
    ) {
        loop {
            let row = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
            };
            self.ended(&row).await;
        }
    }

    async fn ended(&mut self, row: &JobRow) {
        if !self.seen.insert(row.id) {
            return;
        }
        self.seen_order.push_back(row.id);
        if self.seen_order.len() > SEEN_CAPACITY
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        crate::telemetry::job_ended(row);
        self.send_all(row).await;
    }

    async fn send_all(&self, row: &JobRow) {
        let mut deliveries = Vec::new();
        let body = Arc::new(serde_json::to_vec(&job_end_body(&self.gw, row)).unwrap_or_default());
        for (i, (w, secret)) in self.globals.iter().enumerate() {
            if w.events.contains(&WebhookEvent::JobEnd) {
                deliveries.push(Delivery {
                    event: WebhookEvent::JobEnd,
                    job_id: row.id,
                    url: w.url.clone(),
                    secret: secret.clone(),
                    body: body.clone(),
                    origin: Origin::Global(i),
                });
            }
        }
        let job_dir = crate::process::job_dir(&self.state_dir, row.id);
        if let Some(hooks) = load_job_webhooks(&job_dir).await {
            for url in hooks.urls {
                deliveries.push(Delivery {
                    event: WebhookEvent::JobEnd,
                    job_id: row.id,
                    url,
                    secret: hooks.secret.as_ref().map(|s| s.as_bytes().to_vec()),
                    body: body.clone(),
                    origin: Origin::Job {
                        owner: row.owner.clone(),
                    },
                });
            }
        }
        for d in deliveries {
            tokio::spawn(self.sender.clone().deliver(d));
        }
    }
}

/// Sends `machine_state` deliveries for mars' machine events (long-polling
/// `GET /api/v1/events` from the newest one on: changes while the executor was down are not
/// sent).
pub struct MachineFollower {
    mars: dutgate_mars::client::MarsClient,
    /// `(index in executor.webhooks, url, secret)`.
    hooks: Vec<(usize, String, Option<Vec<u8>>)>,
    sender: Sender,
}

impl MachineFollower {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut cursor = None;
        loop {
            let after = match cursor {
                Some(c) => c,
                None => {
                    let c = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        c = self.mars.events_cursor() => c,
                    };
                    match c {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "machine events for webhooks unavailable; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            }
                        }
                    }
                }
            };
            cursor = Some(after);
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return,
                b = self.mars.events(after, Duration::from_secs(30)) => b,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "machine events for webhooks failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            cursor = Some(batch.next);
            for ev in batch.events {
                let body = Arc::new(
                    serde_json::to_vec(&serde_json::json!({
                        "event": "machine_state",
                        "machine": ev,
                    }))
                    .unwrap_or_default(),
                );
                for (i, url, secret) in &self.hooks {
                    tokio::spawn(self.sender.clone().deliver(Delivery {
                        event: WebhookEvent::MachineState,
                        job_id: ev.seq,
                        url: url.clone(),
                        secret: secret.clone(),
                        body: body.clone(),
                        origin: Origin::Global(*i),
                    }));
                }
            }
        }
    }
}

#[derive(Clone)]
struct Sender {
    policy: OutboundPolicy,
    client: reqwest::Client,
    audit: AuditLog,
    slots: Arc<Semaphore>,
}

impl Sender {
    async fn deliver(self, d: Delivery) {
        let Ok(_slot) = self.slots.clone().acquire_owned().await else {
            return;
        };
        let outcome = self.attempts(&d).await;
        metrics::counter!("executor_webhook_deliveries_total", "outcome" => outcome.as_str())
            .increment(1);
    }

    async fn attempts(&self, d: &Delivery) -> Outcome {
        let shown = reqwest::Url::parse(&d.url)
            .map(|u| dutgate_core::outbound::redact(&u))
            .unwrap_or_else(|_| "<invalid URL>".into());
        let mut wait = FIRST_RETRY;
        for attempt in 1..=MAX_ATTEMPTS {
            let mut req = self
                .client
                .post(&d.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Dutgate-Event", d.event.as_str())
                .body(d.body.to_vec());
            if let Some(secret) = &d.secret {
                req = req.header(SIGNATURE_HEADER, signature(secret, &d.body));
            }
            // The client's own timeout bounds the request; this one bounds reading the answer.
            let result = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
                let resp = self.policy.send(req).await?;
                let status = resp.status();
                dutgate_core::outbound::read_capped(resp, MAX_ANSWER_BYTES).await?;
                Ok::<_, SendError>(status)
            })
            .await;
            let failure = match result {
                Ok(Ok(status)) if status.is_success() => {
                    tracing::info!(job_id = d.job_id, url = %shown, attempt, "webhook delivered");
                    return Outcome::Delivered;
                }
                Ok(Ok(status)) => format!("answered {status}"),
                Ok(Err(SendError::Refused(r))) => {
                    self.refused(d, &shown, &r.to_string()).await;
                    return Outcome::Refused;
                }
                Ok(Err(SendError::Http(e))) => e.to_string(),
                Err(_) => format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
            };
            tracing::warn!(job_id = d.job_id, url = %shown, attempt, error = %failure, "webhook delivery failed");
            if attempt < MAX_ATTEMPTS {
                metrics::counter!("executor_webhook_retries_total").increment(1);
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
        }
        tracing::error!(job_id = d.job_id, url = %shown, attempts = MAX_ATTEMPTS, "webhook never delivered");
        Outcome::Failed
    }

    /// A destination the outbound policy refuses: logged (by the policy) and audited, never
    /// tried again.
    async fn refused(&self, d: &Delivery, shown: &str, why: &str) {
        let target = match d.event {
            WebhookEvent::JobEnd => format!("job/{}", d.job_id),
            WebhookEvent::MachineState => format!("machine_event/{}", d.job_id),
        };
        let (actor, origin) = match &d.origin {
            Origin::Global(i) => ("executor".to_string(), format!("executor.webhooks[{i}]")),
            Origin::Job { owner } => (owner.clone(), "the job's submission".to_string()),
        };
        tracing::warn!(job_id = d.job_id, url = %shown, origin, error = %why, "webhook destination refused");
        let actor = Actor {
            name: actor,
            role: None,
            source: "executor".into(),
        };
        self.audit
            .record(
                &actor,
                "webhook.deliver",
                &target,
                &format!("refused: {why}"),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature is the one a receiver computes with a standard HMAC: known vector
    /// (RFC 4231 test case 2).
    #[test]
    fn signature_is_hmac_sha256_hex() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify(
            b"Jefe",
            b"what do ya want for nothing?",
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        ));
        assert!(!verify(b"Jefe", b"what do ya want?", "sha256=00"));
        assert!(!verify(b"Jefe", b"x", "md5=00"));
    }
}
