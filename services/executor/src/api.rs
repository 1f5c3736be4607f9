//! The executor's REST routes (docs/jobs.md §4).

use std::net::SocketAddr;
use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, Extension, FromRequest, Multipart, Path, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::from_fn_with_state;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use dutgate_core::ErrorBody;
use dutgate_core::audit::{Actor, AuditLog};
use dutgate_core::auth::{Auth, Identity, Role, require_user};
use dutgate_core::config::GatewayConfig;
use dutgate_core::{ApiError, JobStatus, MachineId, ServiceName};
use dutgate_jobspec::{JobErrorKind, JobErrors, JobSpec, MAX_JOB_BYTES};
use futures::SinkExt;
use futures::channel::mpsc;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::{Config, JobVisibility};
use crate::model::{
    Artifact, ArtifactList, EventList, Job, JobList, JobState, Purpose, Submitted, TargetView,
    Timestamp,
};
use crate::scheduler::{Scheduler, TargetError};
use crate::store::{JobRow, ListFilter, NewJob, Store, StoreError};
use crate::supervisor::{CancelError, Supervisor};

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub sched: Scheduler,
    pub sup: Supervisor,
    pub cfg: Arc<Config>,
    pub gw: Arc<GatewayConfig>,
    pub auth: Auth,
    pub audit: AuditLog,
    /// The dashboard's sessions ([`crate::ui`]).
    pub ui: crate::ui::UiShared,
}

/// Submissions and ci-tron's DUT list: a token, or none from a trusted client network.
fn submitters() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(submit))
        .routes(routes!(crate::citron::duts::list))
        .routes(routes!(crate::citron::duts::show))
}

/// The job routes that need the user or the admin token.
fn jobs() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(show))
        .routes(routes!(events))
        .routes(routes!(console))
        .routes(routes!(artifacts))
        .routes(routes!(artifact))
        .routes(routes!(cancel))
        .routes(routes!(crate::stats::queue_wait))
}

/// The console WebSocket: a token, or the dashboard's session cookie.
fn console_socket() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(console_ws))
}

fn audit() -> OpenApiRouter<dutgate_core::audit::AuditState> {
    OpenApiRouter::new().routes(routes!(dutgate_core::audit::list))
}

/// The executor's OpenAPI document, as `GET /api/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = submitters().into_openapi();
    doc.merge(jobs().into_openapi());
    doc.merge(console_socket().into_openapi());
    doc.merge(crate::tokens::api().into_openapi());
    doc.merge(audit().into_openapi());
    doc.merge(<crate::citron::DoubleSlash as utoipa::OpenApi>::openapi());
    dutgate_core::openapi::document(
        doc,
        "dutgate executor",
        "The executor queues jobs, leases machines from mars and runs one job process per job \
         (docs/jobs.md): job submission, state, events, console and artifacts. Every route \
         under `/api/v1/jobs` needs the user or the admin token; `?purpose=training` \
         submissions need the admin token. Submissions and the DUT list (`/api/v1/duts`, \
         `/api/v1/dut/{name}`) are also accepted without any `Authorization` header from \
         `executor.trusted_client_networks` (ci-tron's `executorctl` sends none); such a job's \
         owner is `network:<cidr>`.",
    )
}

pub fn router(state: AppState) -> Router {
    let limit = state.cfg.max_upload_bytes;
    let (submitters, _) = submitters().split_for_parts();
    let submitters = submitters
        .layer(DefaultBodyLimit::max(limit))
        .layer(from_fn_with_state(
            state.clone(),
            crate::citron::token_or_trusted_network,
        ))
        .with_state(state.clone());
    let (jobs, _) = jobs().split_for_parts();
    let (console_socket, _) = console_socket().split_for_parts();
    let (tokens, _) = crate::tokens::api().split_for_parts();
    let (audit, _) = audit().split_for_parts();
    let app = jobs
        .layer(DefaultBodyLimit::max(limit))
        .layer(from_fn_with_state(state.auth.clone(), require_user))
        .with_state(state.clone())
        .merge(submitters)
        // The console WebSocket also takes the dashboard's session cookie (Origin-checked).
        .merge(
            console_socket
                .layer(from_fn_with_state(
                    (state.auth.clone(), state.ui.sessions.clone()),
                    crate::ui::session::token_or_cookie,
                ))
                .with_state(state.clone()),
        )
        .merge(crate::ui::router(state.clone()))
        .merge(tokens.with_state(crate::tokens::TokenState {
            auth: state.auth.clone(),
            audit: state.audit.clone(),
        }))
        .merge(audit.with_state((state.audit, state.auth)))
        .merge(dutgate_core::openapi::router(&openapi()));
    crate::citron::with_double_slash(app)
}

/// What a caller wants to do with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Show, list, events, console output: everyone or owners only (`job_visibility`).
    Read,
    /// Cancel, type into the console, download artifacts: the owner and admins only.
    Control,
}

/// Whether `who` may `access` job `row`; the refusal names the rule, not the owner (with
/// `job_visibility: owner` the owner's name is not theirs to know).
fn authorize_job(
    s: &AppState,
    who: &Identity,
    row: &JobRow,
    access: Access,
) -> Result<(), ApiError> {
    if who.is_admin() {
        return Ok(());
    }
    let own = row.owner == who.name;
    match access {
        Access::Read if s.cfg.job_visibility == JobVisibility::All || own => Ok(()),
        Access::Read => Err(ApiError::forbidden(format!(
            "job {} belongs to another user and executor.job_visibility is `owner`",
            row.id
        ))),
        // Training jobs belong to the trainer (a service): only it and admins stop them.
        Access::Control if row.purpose == Purpose::Training => {
            if who.role == Role::Service {
                Ok(())
            } else {
                Err(ApiError::forbidden(format!(
                    "job {} is a training job: only an admin may do this",
                    row.id
                )))
            }
        }
        Access::Control if own => Ok(()),
        Access::Control => Err(ApiError::forbidden(format!(
            "job {} belongs to another user: only its owner or an admin may do this",
            row.id
        ))),
    }
}

/// Whether `who` may cancel job `row` and type into its console (the dashboard shows the
/// controls only then; the handlers decide either way).
pub(crate) fn may_control(s: &AppState, who: &Identity, row: &JobRow) -> bool {
    authorize_job(s, who, row, Access::Control).is_ok()
}

/// Loads job `id` and checks `who` may `access` it; refusals go to the audit log.
async fn job_for(
    s: &AppState,
    who: &Identity,
    peer: SocketAddr,
    id: i64,
    access: Access,
    action: &str,
) -> Result<JobRow, ApiError> {
    let row = s.store.require(id).await.map_err(store_err)?;
    if let Err(e) = authorize_job(s, who, &row, access) {
        tracing::warn!(job_id = id, actor = %who.name, source = %peer, action, reason = %e.body.error, "job access refused");
        if access == Access::Control {
            s.audit
                .record(
                    &Actor::known(who, peer),
                    action,
                    &format!("job/{id}"),
                    &format!("refused: {}", e.body.error),
                )
                .await;
        }
        return Err(e);
    }
    Ok(row)
}

fn store_err(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(id) => ApiError::not_found(format!("no job {id}")),
        other => ApiError::internal(other),
    }
}

fn parse_id(s: &str) -> Result<i64, ApiError> {
    s.parse::<i64>()
        .ok()
        .filter(|i| *i > 0)
        .ok_or_else(|| ApiError::bad_request(format!("invalid job id {s:?}")).with_field("id"))
}

fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    let Some(q) = uri.query() else {
        return Vec::new();
    };
    reqwest::Url::parse(&format!("http://q/?{q}"))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn param<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn parse_bool(v: &str, field: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ApiError::bad_request(format!("{field} must be true or false")).with_field(field)),
    }
}

// ---- submission -------------------------------------------------------------------------

/// valve-infra's `metadata` form part; other keys (ci-tron's `environ`, `job_cookie`,
/// `minio.credentials`) are ignored. Its values win over the query parameters.
// `callback` is for [`crate::citron::connect_back_target`].
#[derive(Debug, Default, Deserialize, ToSchema)]
struct Metadata {
    /// The submitter's own id (a string or a number).
    #[serde(default)]
    job_id: Option<serde_json::Value>,
    /// Replaces the job's `target`.
    #[serde(default)]
    target: Option<MetadataTarget>,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    wait: Option<bool>,
    #[serde(default)]
    callback: Option<crate::citron::Callback>,
    #[serde(default)]
    minio: Option<crate::citron::Minio>,
    /// Refused (400): send the `job` part.
    #[serde(default)]
    job_desc_url: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
struct MetadataTarget {
    /// A machine id (MAC).
    #[serde(default)]
    id: Option<String>,
    #[serde(default, deserialize_with = "crate::citron::null_as_empty")]
    #[schema(value_type = Option<Vec<String>>)]
    tags: Vec<String>,
}

/// valve-infra's `multipart/form-data` submission.
#[allow(dead_code)] // only a schema: [`read_submission`] reads the parts
#[derive(ToSchema)]
struct SubmitForm {
    /// The job description (YAML).
    job: String,
    metadata: Option<Metadata>,
    /// A .tar.gz unpacked into the job bucket before the job starts.
    #[schema(value_type = Option<String>, format = Binary)]
    job_bucket_initial_state_tarball_file: Option<Vec<u8>>,
}

struct Submission {
    yaml: String,
    metadata: Metadata,
    tarball: Option<Bytes>,
}

fn rejection(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::payload_too_large(format!("the request body is too large: {text}"))
    } else {
        ApiError::new(status, text)
    }
}

async fn read_submission(state: &AppState, req: Request) -> Result<Submission, ApiError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| rejection(e.status(), e.body_text()))?;
        return Ok(Submission {
            yaml: job_text(body)?,
            metadata: Metadata::default(),
            tarball: None,
        });
    }
    let mut mp = Multipart::from_request(req, state)
        .await
        .map_err(|e| rejection(e.status(), e.body_text()))?;
    let mut yaml = None;
    let mut metadata = Metadata::default();
    let mut tarball = None;
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| rejection(e.status(), e.body_text()))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let data = field
            .bytes()
            .await
            .map_err(|e| rejection(e.status(), e.body_text()))?;
        match name.as_str() {
            "metadata" => {
                metadata = serde_json::from_slice(&data).map_err(|e| {
                    ApiError::bad_request(format!("metadata: {e}")).with_field("metadata")
                })?;
            }
            "job" => yaml = Some(job_text(data)?),
            "job_bucket_initial_state_tarball_file" => tarball = Some(data),
            // ci-tron's client sends attached artifacts (`executorctl -f NAME:PATH`) as parts
            // named after them.
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown form part {other:?}: expected metadata, job, \
                     job_bucket_initial_state_tarball_file; attached artifacts \
                     (executorctl -f) are not supported: put the file in the job's share \
                     directory (executorctl -s) instead"
                ))
                .with_field(other));
            }
        }
    }
    if yaml.is_none() && metadata.job_desc_url.is_some() {
        return Err(ApiError::bad_request(
            "jobs given by URL (metadata.job_desc_url) are not supported: send the job \
             description as the `job` part",
        )
        .with_field("metadata.job_desc_url"));
    }
    let yaml =
        yaml.ok_or_else(|| ApiError::bad_request("the form has no `job` part").with_field("job"))?;
    Ok(Submission {
        yaml,
        metadata,
        tarball,
    })
}

fn job_text(body: Bytes) -> Result<String, ApiError> {
    if body.len() > MAX_JOB_BYTES {
        return Err(ApiError::payload_too_large(format!(
            "a job is at most {MAX_JOB_BYTES} bytes long"
        )));
    }
    String::from_utf8(body.to_vec())
        .map_err(|e| ApiError::bad_request(format!("the job is not UTF-8: {e}")).with_field("job"))
}

/// Maps job-description errors: syntax (YAML, template) → 400; schema → 422.
fn job_errors(errors: &JobErrors) -> ApiError {
    let Some(first) = errors.first() else {
        return ApiError::bad_request("invalid job");
    };
    let mut e = match first.kind {
        JobErrorKind::TooLarge => ApiError::payload_too_large(errors.to_string()),
        JobErrorKind::Yaml | JobErrorKind::Template => ApiError::bad_request(errors.to_string()),
        _ => ApiError::unprocessable(errors.to_string()),
    };
    e = e.with_field(first.field());
    if let Some(loc) = first.location {
        e = e.at(loc.line, loc.column);
    }
    e
}

/// Submit a job.
///
/// The body is the job description (YAML, at most 1 MiB), raw (any content type but
/// multipart) or as valve-infra's `multipart/form-data` form. It is validated with
/// placeholder machine variables (as `dutctl job validate` does) and its target checked
/// against mars before it is queued: 400/422 name the field (and line, column) at fault, 409
/// answers `wait=false` when every matching machine is busy, 503 an unreachable mars.
///
/// ci-tron's `executorctl` (docs/migrating.md): with `Connection: Upgrade` and `Upgrade:
/// ci-tron-console` the job is queued, then the answer is `101` and the connection carries
/// ci-tron's console protocol (4-byte big-endian length + JSON `{msg_type, date, payload}`
/// frames: control messages, the console as `job_io`, keystrokes to the DUT, then
/// `session_end` `{status, joules_consumed, job_bucket?}`, `job_bucket` a read-only key to the
/// job's files for 10 minutes). A client that closes the connection before `session_end`
/// cancels its job. Without the upgrade but with `metadata.callback.port`, the answer is `200`
/// and the executor connects back to the submitting address on that port (403 unless it is
/// in `executor.trusted_client_networks` or passes the outbound policy). Jobs given by URL,
/// attached artifacts and MinIO groups are refused (400/422).
#[utoipa::path(post, path = "/api/v1/jobs", tag = "executor", security(("bearer" = []), ()),
    params(
        ("purpose" = Option<Purpose>, Query, description = "`training` (the trainer's jobs) needs the admin token and a target machine; default `job`."),
        ("priority" = Option<i64>, Query, description = "Higher runs first; default 0."),
        ("wait" = Option<bool>, Query, description = "`false`: answer 409 instead of queueing when every matching machine is busy (true/false/1/0/yes/no; default true)."),
        ("job_id" = Option<String>, Query, description = "The submitter's own id for the job (`external_id`)."),
        ("target_id" = Option<MachineId>, Query, description = "Run on this machine (overrides the job's `target.id`)."),
        ("webhook" = Option<Vec<String>>, Query, explode, description = "Repeatable (at most 4): URLs the job's end is POSTed to (docs/notifications.md), under the outbound policy (422 naming `webhook` otherwise)."),
        ("X-Dutgate-Webhook-Secret" = Option<String>, Header, description = "HMAC secret signing the job's own webhook deliveries (`X-Dutgate-Signature`); needs `webhook`."),
    ),
    request_body(content(
        (String = "application/yaml"), (String = "application/x-yaml"), (String = "text/yaml"),
        (String = "text/plain"), (SubmitForm = "multipart/form-data"))),
    responses(
        (status = 101, description = "Queued; the connection switched to ci-tron's console protocol.",
            headers(("Ci_tron_version" = String, description = "`1`"))),
        (status = 200, description = "Queued; the executor connects back to `metadata.callback.port`.", body = crate::citron::ConnectBackAnswer),
        (status = 201, description = "Queued.", body = Submitted,
            headers(("Location" = String, description = "`/api/v1/jobs/{id}`"))),
    ))]
async fn submit(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(req.uri());
    let webhook_secret = match req.headers().get(crate::webhooks::SECRET_HEADER) {
        Some(v) => Some(v.to_str().map(str::to_string).map_err(|_| {
            ApiError::bad_request("the webhook secret must be visible ASCII")
                .with_field(crate::webhooks::SECRET_HEADER)
        })?),
        None => None,
    };
    let console = crate::citron::take_upgrade(&mut req);
    let client_host = crate::citron::client_host(req.headers());
    let sub = read_submission(&s, req).await?;
    if sub
        .metadata
        .minio
        .as_ref()
        .is_some_and(|m| !m.groups.is_empty())
    {
        return Err(ApiError::unprocessable(
            "MinIO groups (executorctl -g) are not supported: a job's bucket opens with its own \
             keys only",
        )
        .with_field("metadata.minio.groups"));
    }
    let connect_back = match (&console, &sub.metadata.callback) {
        (None, Some(cb)) => crate::citron::connect_back_target(&s, peer, cb)?,
        _ => None,
    };

    let purpose: Purpose = match param(&pairs, "purpose") {
        Some(p) => p
            .parse()
            .map_err(|e: String| ApiError::bad_request(e).with_field("purpose"))?,
        None => Purpose::Job,
    };
    if purpose == Purpose::Training && !who.role.allows(Role::Service) {
        let e = ApiError::forbidden(format!(
            "training jobs are submitted by the trainer or an admin; token {:?} is a {} token",
            who.name, who.role
        ));
        s.audit
            .record(
                &Actor::known(&who, peer),
                "job.submit",
                "training",
                &format!("refused: {}", e.body.error),
            )
            .await;
        return Err(e);
    }
    let priority = match (sub.metadata.priority, param(&pairs, "priority")) {
        (Some(p), _) => p,
        (None, Some(p)) => p.parse().map_err(|_| {
            ApiError::bad_request("priority must be an integer").with_field("priority")
        })?,
        (None, None) => 0,
    };
    let wait = match (sub.metadata.wait, param(&pairs, "wait")) {
        (Some(w), _) => w,
        (None, Some(w)) => parse_bool(w, "wait")?,
        (None, None) => true,
    };
    let external_id = match &sub.metadata.job_id {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => param(&pairs, "job_id").map(str::to_string),
    };

    // Validate as `dutctl job validate` does: placeholder machine variables plus the
    // configured extras. The real render happens per machine in the job process.
    let vars = crate::citron::validation_vars(&s);
    let spec = JobSpec::parse_and_render(&sub.yaml, &vars).map_err(|e| job_errors(&e))?;

    let (target_id, target_tags) = match &sub.metadata.target {
        Some(t) => {
            let id = match t.id.as_deref().filter(|s| !s.is_empty()) {
                Some(s) => Some(MachineId::parse(s).map_err(|e| {
                    ApiError::unprocessable(e.to_string()).with_field("metadata.target.id")
                })?),
                None => None,
            };
            (id, t.tags.clone())
        }
        None => {
            if spec.target.id.is_some()
                && param(&pairs, "target_id").is_none()
                && crate::citron::target_id_is_templated(&s, &sub.yaml, &spec)
            {
                return Err(ApiError::unprocessable(
                    "target.id comes from the machine variables ({{ machine_id }}): name the \
                     machine with metadata.target.id (executorctl -i) or ?target_id=",
                )
                .with_field("target.id"));
            }
            (
                spec.target.id,
                spec.target
                    .tags
                    .iter()
                    .map(|t| t.as_str().to_string())
                    .collect(),
            )
        }
    };
    // `?target_id=` (what the typed client and the trainer use) names the machine.
    let target_id = match param(&pairs, "target_id") {
        Some(v) => Some(
            MachineId::parse(v)
                .map_err(|e| ApiError::bad_request(e.to_string()).with_field("target_id"))?,
        ),
        None => target_id,
    };
    if purpose == Purpose::Training && target_id.is_none() {
        return Err(
            ApiError::unprocessable("training jobs name their machine").with_field("target.id")
        );
    }
    let deadline_ms = spec
        .deadline
        .map(|d| (d.unix_timestamp_nanos() / 1_000_000) as i64);
    if let Some(d) = deadline_ms
        && d <= crate::store::now_ms()
    {
        return Err(
            ApiError::unprocessable("the deadline has already passed").with_field("deadline")
        );
    }
    match s.sched.check_target(target_id, &target_tags).await {
        Ok(()) => {}
        Err(TargetError::Mars(e)) => {
            return Err(ApiError::unavailable(format!(
                "cannot check the target, mars is unreachable: {e}"
            )));
        }
        Err(e) => {
            let field = if target_id.is_some() {
                "target.id"
            } else {
                "target.tags"
            };
            return Err(
                ApiError::unprocessable(format!("the target can never match: {e}"))
                    .with_field(field),
            );
        }
    }
    if !wait {
        match s.sched.any_free(purpose, target_id, &target_tags).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(ApiError::conflict(
                    "every machine matching the target is busy (wait=false)",
                ));
            }
            Err(e) => return Err(ApiError::unavailable(e.to_string())),
        }
    }

    let hooks = job_webhooks(&s, &who, peer, &pairs, webhook_secret).await?;

    // The tarball is on disk before the job is persisted, so the job never refers to a
    // file that is not there.
    let jobs_dir = crate::process::executor_state_dir(&s.gw).join("jobs");
    let staged = match &sub.tarball {
        Some(t) => {
            std::fs::create_dir_all(&jobs_dir).map_err(ApiError::internal)?;
            let path = jobs_dir.join(format!(
                "upload-{}-{:x}.tar.gz",
                std::process::id(),
                rand_u64()
            ));
            let mut f = tokio::fs::File::create(&path)
                .await
                .map_err(ApiError::internal)?;
            f.write_all(t).await.map_err(ApiError::internal)?;
            f.sync_all().await.map_err(ApiError::internal)?;
            Some(path)
        }
        None => None,
    };
    let new = NewJob {
        external_id,
        priority,
        purpose,
        job_yaml: sub.yaml,
        target_id,
        target_tags,
        deadline_ms,
        has_tarball: staged.is_some(),
        owner: who.name.clone(),
    };
    let id = match s.store.insert(&new).await {
        Ok(id) => id,
        Err(e) => {
            if let Some(p) = &staged {
                let _ = std::fs::remove_file(p);
            }
            return Err(store_err(e));
        }
    };
    if let Some(hooks) = &hooks
        && let Err(e) = crate::webhooks::save_job_webhooks(&s.sup.job_dir(id), hooks)
    {
        let _ = s
            .store
            .finish(
                id,
                JobStatus::SetupFail,
                &format!("cannot keep the webhooks: {e}"),
            )
            .await;
        return Err(ApiError::internal(e));
    }
    if let Some(p) = staged {
        let dir = s.sup.job_dir(id);
        let moved = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::rename(&p, dir.join("initial.tar.gz")));
        if let Err(e) = moved {
            let _ = s
                .store
                .finish(
                    id,
                    JobStatus::SetupFail,
                    &format!("cannot keep the tarball: {e}"),
                )
                .await;
            return Err(ApiError::internal(e));
        }
    }
    metrics::counter!("executor_jobs_submitted_total").increment(1);
    tracing::info!(job_id = id, priority, owner = %who.name, "job submitted");
    s.audit
        .record(
            &Actor::known(&who, peer),
            "job.submit",
            &format!("job/{id}"),
            "ok",
        )
        .await;
    if let Some(d) = deadline_ms {
        s.sched.note_deadline(d);
    }
    s.sched.wake();
    let client = crate::citron::Client {
        peer,
        host: client_host,
        actor: Actor::known(&who, peer),
    };
    if let Some(upgrade) = console {
        return Ok(crate::citron::switch_protocols(s, id, upgrade, client));
    }
    if let Some(addr) = connect_back {
        crate::citron::connect_back(s.clone(), id, addr, client);
        return Ok(crate::citron::connect_back_answer(&s, id));
    }
    let url = job_url(&s.gw, id);
    let mut resp = (
        StatusCode::CREATED,
        axum::Json(Submitted {
            id,
            url: url.clone(),
            state: JobState::Queued,
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/jobs/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// The job's own webhooks (`webhook=<url>`, repeatable; the `X-Dutgate-Webhook-Secret`
/// header signs them: a header, so that the secret is in no URL or request log), checked
/// against the outbound policy now; a refused one is audited.
async fn job_webhooks(
    s: &AppState,
    who: &Identity,
    peer: SocketAddr,
    pairs: &[(String, String)],
    secret: Option<String>,
) -> Result<Option<crate::webhooks::JobWebhooks>, ApiError> {
    let urls: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "webhook")
        .map(|(_, v)| v.clone())
        .collect();
    if urls.is_empty() {
        if secret.is_some() {
            return Err(ApiError::bad_request(
                "a webhook secret needs a webhook (the webhook parameter)",
            )
            .with_field(crate::webhooks::SECRET_HEADER));
        }
        return Ok(None);
    }
    let policy = dutgate_core::outbound::OutboundPolicy::from_gateway(&s.gw);
    match crate::webhooks::check_job_webhooks(&policy, &urls).await {
        Ok(()) => Ok(Some(crate::webhooks::JobWebhooks { urls, secret })),
        Err(crate::webhooks::WebhookError::Refused(r)) => {
            tracing::warn!(actor = %who.name, source = %peer, error = %r, "job webhook refused");
            s.audit
                .record(
                    &Actor::known(who, peer),
                    "job.submit",
                    "webhook",
                    &format!("refused: {r}"),
                )
                .await;
            Err(ApiError::unprocessable(r.to_string()).with_field("webhook"))
        }
        Err(e) => Err(ApiError::bad_request(e.to_string()).with_field("webhook")),
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

pub fn job_url(gw: &GatewayConfig, id: i64) -> String {
    format!("{}/api/v1/jobs/{id}", gw.public_url(ServiceName::Executor))
}

fn view(s: &AppState, row: JobRow, with_job: bool) -> Job {
    let console_bytes = std::fs::metadata(s.sup.job_dir(row.id).join("console.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    Job {
        id: row.id,
        external_id: row.external_id,
        url: job_url(&s.gw, row.id),
        state: row.state,
        phase: row.phase,
        status: row.status,
        exit_code: row.status.map(|st| st.exit_code()),
        reason: row.reason,
        priority: row.priority,
        purpose: row.purpose,
        target: TargetView {
            id: row.target_id,
            tags: row.target_tags,
        },
        deadline: row.deadline_ms.map(Timestamp),
        machine_id: row.machine_id,
        submitted_at: Timestamp(row.submitted_at),
        dispatched_at: row.dispatched_at.map(Timestamp),
        started_at: row.started_at.map(Timestamp),
        finished_at: row.finished_at.map(Timestamp),
        boots: row.boots,
        console_bytes,
        owner: row.owner,
        job: with_job.then_some(row.job_yaml),
    }
}

// ---- list and show ----------------------------------------------------------------------

/// List jobs, newest first, without their job description.
///
/// Unknown query parameters are refused (400). Page with `before` = the smallest `id` of the
/// previous page. With `executor.job_visibility: owner` a user sees their own jobs only.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "executor", security(("bearer" = [])),
    operation_id = "list_jobs",
    params(
        ("state" = Option<JobState>, Query),
        ("status" = Option<JobStatus>, Query),
        ("machine_id" = Option<MachineId>, Query),
        ("tag" = Option<Vec<String>>, Query, explode, description = "Repeatable: jobs whose target has every tag."),
        ("owner" = Option<String>, Query, description = "Jobs of this token name."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "Default 100."),
        ("before" = Option<i64>, Query, minimum = 1, description = "Only jobs with a smaller id (the next page)."),
    ),
    responses((status = 200, description = "The jobs.", body = JobList)))]
pub(crate) async fn list(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    uri: Uri,
) -> Result<axum::Json<JobList>, ApiError> {
    let pairs = query_pairs(&uri);
    let mut f = ListFilter {
        limit: 100,
        ..Default::default()
    };
    // With `job_visibility: owner`, a user's list holds their own jobs only.
    if s.cfg.job_visibility == JobVisibility::Owner && !who.is_admin() {
        f.owner = Some(who.name.clone());
    }
    for (k, v) in &pairs {
        match k.as_str() {
            "state" => {
                f.state = Some(
                    v.parse()
                        .map_err(|e: String| ApiError::bad_request(e).with_field("state"))?,
                )
            }
            "status" => {
                f.status = Some(
                    v.parse::<JobStatus>()
                        .map_err(|e| ApiError::bad_request(e.to_string()).with_field("status"))?,
                )
            }
            "machine_id" => {
                f.machine_id =
                    Some(MachineId::parse(v).map_err(|e| {
                        ApiError::bad_request(e.to_string()).with_field("machine_id")
                    })?)
            }
            "tag" => f.tags.push(v.clone()),
            "limit" => {
                f.limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=1000).contains(l))
                    .ok_or_else(|| {
                        ApiError::bad_request("limit must be between 1 and 1000")
                            .with_field("limit")
                    })?
            }
            "before" => f.before = Some(parse_id(v)?),
            "owner" => {
                if f.owner.as_ref().is_some_and(|o| o != v) {
                    return Err(ApiError::forbidden(
                        "executor.job_visibility is `owner`: only your own jobs are listed",
                    )
                    .with_field("owner"));
                }
                f.owner = Some(v.clone());
            }
            other => {
                return Err(
                    ApiError::bad_request(format!("unknown query parameter {other:?}"))
                        .with_field(other),
                );
            }
        }
    }
    let rows = s.store.list(&f).await.map_err(store_err)?;
    Ok(axum::Json(JobList {
        jobs: rows.into_iter().map(|r| view(&s, r, false)).collect(),
    }))
}

/// One job, with its job description.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "executor", security(("bearer" = [])),
    params(("id" = i64, Path, description = "The job's id.")),
    responses((status = 200, description = "The job.", body = Job)))]
pub(crate) async fn show(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Result<axum::Json<Job>, ApiError> {
    let id = parse_id(&id)?;
    let row = job_for(&s, &who, peer, id, Access::Read, "job.show").await?;
    Ok(axum::Json(view(&s, row, true)))
}

// ---- events -----------------------------------------------------------------------------

/// Waits until the job may have changed: its process's progress moved, or a short while
/// passed (jobs still queued, or followed by another executor, have no progress channel).
pub(crate) async fn wait_change(
    s: &AppState,
    id: i64,
    seen: &mut Option<tokio::sync::watch::Receiver<crate::control::Progress>>,
) {
    if seen.is_none() {
        *seen = s.sup.progress(id);
    }
    match seen {
        Some(rx) => {
            let changed = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
            if matches!(changed, Ok(Err(_))) {
                *seen = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        None => tokio::time::sleep(Duration::from_millis(250)).await,
    }
}

/// The job's events (JSON), or a live stream of them (SSE).
///
/// With `Accept: text/event-stream` the answer is a Server-Sent Events stream: one SSE event
/// per job event (`id:` = `seq`, `event:` = `kind`, `data:` = the event as JSON), a keep-alive
/// comment every 15 s; the stream ends after the `finished` event. Reconnect with
/// `Last-Event-ID` (or `?after=`) to resume. Otherwise the stored events are answered at once.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", tag = "executor", security(("bearer" = [])),
    params(("id" = i64, Path, description = "The job's id."),
        ("after" = Option<i64>, Query, description = "Only events with a larger `seq` (default 0: all)."),
        ("Last-Event-ID" = Option<i64>, Header, description = "As `after`, when `after` is absent.")),
    responses((status = 200, description = "The events.",
        content((EventList = "application/json"), (String = "text/event-stream")))))]
async fn events(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    job_for(&s, &who, peer, id, Access::Read, "job.events").await?;
    let pairs = query_pairs(&uri);
    let after = match param(&pairs, "after")
        .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
    {
        Some(a) => a
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request("after must be an integer").with_field("after"))?,
        None => 0,
    };
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !sse {
        let events = s.store.events(id, after).await.map_err(store_err)?;
        return Ok(axum::Json(EventList { events }).into_response());
    }
    let (mut tx, rx) = mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
    tokio::spawn(async move {
        let mut after = after;
        let mut progress = None;
        loop {
            let evs = match s.store.events(id, after).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(job_id = id, error = %e, "event stream: store error");
                    return;
                }
            };
            for e in evs {
                after = e.seq;
                let last = e.kind == crate::model::kind::FINISHED;
                let msg = SseEvent::default()
                    .id(e.seq.to_string())
                    .event(e.kind.clone())
                    .data(serde_json::to_string(&e).unwrap_or_default());
                if tx.send(Ok(msg)).await.is_err() || last {
                    return;
                }
            }
            wait_change(&s, id, &mut progress).await;
        }
    });
    Ok(Sse::new(rx)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

// ---- console ----------------------------------------------------------------------------

struct ConsoleQuery {
    offset: u64,
    follow: bool,
}

fn console_query(uri: &Uri) -> Result<ConsoleQuery, ApiError> {
    let pairs = query_pairs(uri);
    let offset = match param(&pairs, "offset") {
        Some(o) => o.parse::<u64>().map_err(|_| {
            ApiError::bad_request("offset must be a byte count").with_field("offset")
        })?,
        None => 0,
    };
    let follow = match param(&pairs, "follow") {
        Some(f) => parse_bool(f, "follow")?,
        None => true,
    };
    Ok(ConsoleQuery { offset, follow })
}

/// Streams the console log from `offset` into `out` until the job is finished and every byte
/// was sent (or, without `follow`, until the end of what is stored).
async fn pump_console<F, Fut>(s: &AppState, id: i64, mut offset: u64, follow: bool, mut out: F)
where
    F: FnMut(Bytes) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let path = s.sup.job_dir(id).join("console.log");
    let mut progress = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Read the job's state before the file: if it is finished now, the file is complete.
        let finished =
            matches!(s.store.get(id).await, Ok(Some(r)) if r.state == JobState::Finished);
        if let Ok(mut f) = tokio::fs::File::open(&path).await
            && f.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
        {
            loop {
                match f.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        offset += n as u64;
                        if !out(Bytes::copy_from_slice(&buf[..n])).await {
                            return;
                        }
                    }
                }
            }
        }
        if finished || !follow {
            return;
        }
        wait_change(s, id, &mut progress).await;
    }
}

/// The job's console log from a byte offset, optionally followed live.
///
/// With `follow=true` (default) the answer stays open and streams new bytes until the job is
/// finished and every byte was sent; with `follow=false` it ends at the end of what is
/// stored. Resume with `offset` = the offset it started at plus the bytes received. 416: the
/// job is finished and `offset` is past the end of its console log.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/console", tag = "executor", security(("bearer" = [])),
    params(("id" = i64, Path, description = "The job's id."),
        ("offset" = Option<u64>, Query, description = "The first byte to send (default 0)."),
        ("follow" = Option<bool>, Query, description = "Follow the job live (default true).")),
    responses((status = 200, description = "The console bytes.", body = String,
        content_type = "application/octet-stream",
        headers(("X-Console-Offset" = u64, description = "The offset of the first byte of the body.")))))]
async fn console(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let row = job_for(&s, &who, peer, id, Access::Read, "job.console").await?;
    let q = console_query(&uri)?;
    let len = std::fs::metadata(s.sup.job_dir(id).join("console.log"))
        .map(|m| m.len())
        .unwrap_or(0);
    if row.state == JobState::Finished && q.offset > len {
        return Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!(
                "offset {} is past the end of the console log ({len} bytes)",
                q.offset
            ),
        )
        .with_field("offset"));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        pump_console(&s, id, q.offset, q.follow, |b| {
            let mut tx = tx.clone();
            async move { tx.send(Ok(b)).await.is_ok() }
        })
        .await;
    });
    let mut resp = Response::new(Body::from_stream(rx));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&q.offset.to_string()) {
        h.insert("x-console-offset", v);
    }
    Ok(resp)
}

/// Interactive console over a WebSocket.
///
/// A WebSocket upgrade; a token, or the dashboard's session cookie (Origin-checked). The
/// server sends the console from `offset` as binary messages, live until the job is finished;
/// then a text message `{"status": "<JobStatus>", "exit_code": <int>}` and a close frame.
/// Messages from the client are keystrokes: written to the machine's console through salad
/// while the job is RUNNING and the caller is its owner or an admin; otherwise dropped (the
/// first one of a read-only session is answered `{"error": …, "status": 403}`).
#[utoipa::path(get, path = "/api/v1/jobs/{id}/console/ws", tag = "executor",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The job's id."),
        ("offset" = Option<u64>, Query, description = "The first byte to send (default 0).")),
    responses(
        (status = 101, description = "Switching protocols to WebSocket."),
        (status = 400, description = "Not a WebSocket upgrade (plain text), or an invalid `id`/`offset` (JSON).",
            content((ErrorBody = "application/json"), (String = "text/plain"))),
        (status = 426, description = "The connection cannot be upgraded.", body = String, content_type = "text/plain"),
    ))]
async fn console_ws(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let row = job_for(&s, &who, peer, id, Access::Read, "job.console").await?;
    // Everyone who may read the job watches; only its owner and admins type.
    let read_only = authorize_job(&s, &who, &row, Access::Control)
        .err()
        .map(|_| console_input_refusal(&row));
    let q = console_query(&uri)?;
    let actor = Actor::known(&who, peer);
    Ok(ws.on_upgrade(move |socket| ws_session(s, id, q.offset, socket, actor, read_only)))
}

/// Why the keystrokes of a read-only console session are refused: the rule, never the owner
/// (with `job_visibility: all` a watcher may not know whose job it is).
fn console_input_refusal(row: &JobRow) -> String {
    if row.purpose == Purpose::Training {
        format!(
            "job {} is a training job: only an admin types into its console; this session is read-only",
            row.id
        )
    } else {
        format!(
            "job {} belongs to another user: only its owner or an admin types into its console; this session is read-only",
            row.id
        )
    }
}

/// `read_only`: `None` when `actor` may type (the owner or an admin); else why not. The first
/// keystroke of a read-only session is refused once: logged, audited (`job.console.input`)
/// and answered with a text frame `{"error": …, "status": 403}`; every keystroke of it is
/// dropped. The last text frame is the job's end, `{"status": …, "exit_code": …}`.
async fn ws_session(
    s: AppState,
    id: i64,
    offset: u64,
    socket: WebSocket,
    actor: Actor,
    read_only: Option<String>,
) {
    use futures::StreamExt;
    let (mut sink, mut stream) = socket.split();
    let (otx, mut orx) = mpsc::channel::<Bytes>(16);
    let s2 = s.clone();
    let output = tokio::spawn(async move {
        pump_console(&s2, id, offset, true, |b| {
            let mut otx = otx.clone();
            async move { otx.send(b).await.is_ok() }
        })
        .await;
    });
    // The refusal's reason, from the input task to the socket (the output loop owns it).
    let (refused_tx, mut refused_rx) = tokio::sync::oneshot::channel::<String>();
    // Keystrokes go to the DUT through salad's console port, like any console client.
    let input = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut conn: Option<tokio::net::TcpStream> = None;
            let mut refused_tx = Some(refused_tx);
            while let Some(Ok(msg)) = stream.next().await {
                let data: Vec<u8> = match msg {
                    Message::Binary(b) => b.to_vec(),
                    Message::Text(t) => t.as_str().as_bytes().to_vec(),
                    Message::Close(_) => return,
                    _ => continue,
                };
                if let Some(reason) = &read_only {
                    if let Some(tx) = refused_tx.take() {
                        tracing::warn!(
                            job_id = id, actor = %actor.name, peer = %actor.source, reason = %reason,
                            "console input refused: read-only session"
                        );
                        s.audit
                            .record(
                                &actor,
                                "job.console.input",
                                &format!("job/{id}"),
                                &format!("refused: {reason}"),
                            )
                            .await;
                        let _ = tx.send(reason.clone());
                    }
                    continue;
                }
                let Ok(Some(row)) = s.store.get(id).await else {
                    return;
                };
                let (JobState::Running, Some(machine)) = (row.state, row.machine_id) else {
                    continue;
                };
                if conn.is_none() {
                    let salad = dutgate_salad::client::SaladClient::new(
                        s.cfg.url_of(&s.gw, ServiceName::Salad),
                        None,
                    );
                    conn = salad
                        .connect(machine, &s.cfg.console_host(&s.gw))
                        .await
                        .ok();
                }
                if let Some(c) = conn.as_mut()
                    && c.write_all(&data).await.is_err()
                {
                    conn = None;
                }
            }
        })
    };
    let mut refusal_pending = true;
    loop {
        tokio::select! {
            b = orx.next() => {
                let Some(b) = b else { break };
                if sink.send(Message::Binary(b)).await.is_err() {
                    input.abort();
                    output.abort();
                    return;
                }
            }
            // Err: the input task ended without a refusal (a closed socket, a typist).
            reason = &mut refused_rx, if refusal_pending => {
                refusal_pending = false;
                if let Ok(reason) = reason {
                    let frame = json!({"error": reason, "status": StatusCode::FORBIDDEN.as_u16()});
                    if sink.send(Message::Text(frame.to_string().into())).await.is_err() {
                        input.abort();
                        output.abort();
                        return;
                    }
                }
            }
        }
    }
    if let Ok(Some(row)) = s.store.get(id).await
        && let Some(st) = row.status
    {
        let end = json!({"status": st, "exit_code": st.exit_code()}).to_string();
        let _ = sink.send(Message::Text(end.into())).await;
    }
    let _ = sink.send(Message::Close(None)).await;
    input.abort();
}

// ---- artifacts --------------------------------------------------------------------------

fn walk(dir: &FsPath, prefix: &str, out: &mut Vec<Artifact>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = format!("{prefix}{name}");
        match e.file_type() {
            Ok(t) if t.is_dir() => walk(&e.path(), &format!("{path}/"), out),
            Ok(t) if t.is_file() => out.push(Artifact {
                path,
                size: e.metadata().map(|m| m.len()).unwrap_or(0),
            }),
            _ => {}
        }
    }
}

async fn events_json(s: &AppState, id: i64) -> Result<Vec<u8>, ApiError> {
    let events = s.store.events(id, 0).await.map_err(store_err)?;
    serde_json::to_vec_pretty(&EventList { events }).map_err(ApiError::internal)
}

/// The job's artifacts.
///
/// `console.log` (when there is one), `events.json` (always), then every file the job
/// collected, sorted by path.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/artifacts", tag = "executor",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The job's id.")),
    responses((status = 200, description = "The artifacts.", body = ArtifactList)))]
pub(crate) async fn artifacts(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Result<axum::Json<ArtifactList>, ApiError> {
    let id = parse_id(&id)?;
    job_for(&s, &who, peer, id, Access::Read, "job.artifacts").await?;
    let dir = s.sup.job_dir(id);
    let mut list = Vec::new();
    if let Ok(m) = std::fs::metadata(dir.join("console.log")) {
        list.push(Artifact {
            path: "console.log".into(),
            size: m.len(),
        });
    }
    list.push(Artifact {
        path: "events.json".into(),
        size: events_json(&s, id).await?.len() as u64,
    });
    walk(&dir.join("artifacts"), "", &mut list);
    Ok(axum::Json(ArtifactList { artifacts: list }))
}

/// Resolves an artifact path inside the job's directory; never outside it.
fn artifact_path(dir: &FsPath, path: &str) -> Option<PathBuf> {
    if path == "console.log" {
        return Some(dir.join("console.log"));
    }
    let rel = FsPath::new(path);
    if path.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(dir.join("artifacts").join(rel))
}

/// Download one artifact.
///
/// `path` may contain `/`; `..` and absolute paths are refused (404). `console.log` and
/// `events.json` are readable as through their own routes; the files the job produced only
/// by its owner and admins.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/artifacts/{*path}", tag = "executor",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = "The job's id."),
        ("path" = String, Path, description = "The artifact's path, e.g. `console.log`.")),
    responses((status = 200, description = "The file (`events.json` is JSON).",
        content((String = "application/octet-stream"), (EventList = "application/json")))))]
pub(crate) async fn artifact(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    // The console log and the events are readable as through their own routes; the files
    // the job produced are its owner's.
    let access = if path == "events.json" || path == "console.log" {
        Access::Read
    } else {
        Access::Control
    };
    job_for(&s, &who, peer, id, access, "job.artifact.download").await?;
    if path == "events.json" {
        let body = events_json(&s, id).await?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    }
    let not_found = || ApiError::not_found(format!("job {id} has no artifact {path:?}"));
    let file = artifact_path(&s.sup.job_dir(id), &path).ok_or_else(not_found)?;
    let f = tokio::fs::File::open(&file)
        .await
        .map_err(|_| not_found())?;
    let meta = f.metadata().await.map_err(|_| not_found())?;
    if !meta.is_file() {
        return Err(not_found());
    }
    let stream = tokio_util::io::ReaderStream::new(f);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&meta.len().to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    Ok(resp)
}

// ---- cancel -----------------------------------------------------------------------------

/// Cancel a job (its owner or an admin).
///
/// A queued job finishes at once; a running job's process is told to stop and tears down.
/// 409: the job is already finished.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "executor", security(("bearer" = [])),
    params(("id" = i64, Path, description = "The job's id.")),
    responses((status = 202, description = "Cancellation accepted; the job as it is now.", body = Job)))]
pub(crate) async fn cancel(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    job_for(&s, &who, peer, id, Access::Control, "job.cancel").await?;
    let actor = Actor::known(&who, peer);
    let target = format!("job/{id}");
    match s.sup.cancel(id).await {
        Ok(row) => {
            s.audit.record(&actor, "job.cancel", &target, "ok").await;
            s.sched.wake();
            Ok((StatusCode::ACCEPTED, axum::Json(view(&s, row, false))).into_response())
        }
        Err(CancelError::Finished(_)) => {
            Err(ApiError::conflict(format!("job {id} is already finished")))
        }
        Err(CancelError::Store(e)) => Err(store_err(e)),
    }
}
