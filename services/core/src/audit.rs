//! The audit log: every state-changing call a service handles (and every refused one), with
//! who, from where, when and the outcome.
//!
//! Each service keeps its own file, `<state_dir>/<service>/audit.jsonl`: one JSON object per
//! line, appended with `O_APPEND` (a line is written by one `write`, so concurrent writers of
//! one service never interleave within a line). `GET /api/v1/audit` (admin) serves it, and
//! `dutctl audit` merges the services' answers by time. Entries never hold a secret: actions
//! name tokens and jobs, never token values.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::auth::{Auth, Identity, Role};
use crate::error::ApiError;

/// One audited call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditEntry {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub at: OffsetDateTime,
    pub service: String,
    /// The token's name; `anonymous` when the call had none, `invalid` for an unknown token.
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The caller's address.
    pub source: String,
    /// What was asked, e.g. `job.cancel`, `token.create`, `pdu.switch`.
    pub action: String,
    /// What it was asked of, e.g. `job/12`, `token/alice`, `machine/52:54:00:00:00:01`.
    pub target: String,
    /// `ok`, or `refused: <reason>` / `failed: <reason>`.
    pub outcome: String,
}

/// The caller of an audited request, known or not.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub role: Option<Role>,
    pub source: String,
}

impl Actor {
    pub fn known(id: &Identity, source: impl ToString) -> Self {
        Self {
            name: id.name.clone(),
            role: Some(id.role),
            source: source.to_string(),
        }
    }

    /// Whoever the headers say, for refused calls (the token is never recorded).
    pub fn from_headers(auth: &Auth, headers: &HeaderMap, source: impl ToString) -> Self {
        let (name, role) = match auth.identify(headers) {
            Ok(id) => (id.name, Some(id.role)),
            Err(_) if headers.contains_key(axum::http::header::AUTHORIZATION) => {
                ("invalid".to_string(), None)
            }
            Err(_) => ("anonymous".to_string(), None),
        };
        Self {
            name,
            role,
            source: source.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    service: String,
    path: PathBuf,
    /// Serialises this process's appends (file creation included).
    lock: Mutex<()>,
}

impl AuditLog {
    /// The log of `service` under the gateway's state dir.
    pub fn new(state_dir: &Path, service: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                service: service.to_string(),
                path: state_dir.join(service).join("audit.jsonl"),
                lock: Mutex::new(()),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Appends one entry. A failure to write is logged, never fails the call it records.
    pub async fn record(&self, actor: &Actor, action: &str, target: &str, outcome: &str) {
        let entry = AuditEntry {
            at: OffsetDateTime::now_utc(),
            service: self.inner.service.clone(),
            actor: actor.name.clone(),
            role: actor.role,
            source: actor.source.clone(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
        };
        tracing::info!(
            actor = %entry.actor, source = %entry.source, action, target, outcome, "audit"
        );
        let Ok(mut line) = serde_json::to_vec(&entry) else {
            return;
        };
        line.push(b'\n');
        let _turn = self.inner.lock.lock().await;
        let r = async {
            if let Some(dir) = self.inner.path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&self.inner.path)
                .await?;
            f.write_all(&line).await
        }
        .await;
        if let Err(e) = r {
            tracing::error!(path = %self.inner.path.display(), error = %e, "cannot append to the audit log");
        }
    }

    /// Entries at or after `since`, oldest first, at most `limit` (the newest ones).
    pub async fn read(
        &self,
        since: Option<OffsetDateTime>,
        limit: usize,
    ) -> std::io::Result<Vec<AuditEntry>> {
        let f = match tokio::fs::File::open(&self.inner.path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut lines = tokio::io::BufReader::new(f).lines();
        let mut out = std::collections::VecDeque::new();
        while let Some(line) = lines.next_line().await? {
            // A line cut by a crash mid-write is skipped, not an error for the whole log.
            let Ok(e) = serde_json::from_str::<AuditEntry>(&line) else {
                continue;
            };
            if since.is_some_and(|s| e.at < s) {
                continue;
            }
            out.push_back(e);
            if out.len() > limit {
                out.pop_front();
            }
        }
        Ok(out.into())
    }
}

/// Records in `log`, or only traces when a service runs without one (started without a state
/// dir, as in tests of other parts).
pub async fn record_or_trace(
    log: Option<&AuditLog>,
    actor: &Actor,
    action: &str,
    target: &str,
    outcome: &str,
) {
    match log {
        Some(log) => log.record(actor, action, target, outcome).await,
        None => tracing::info!(
            actor = %actor.name, source = %actor.source, action, target, outcome,
            "audit (no audit log)"
        ),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only entries at or after this RFC 3339 time.
    pub since: Option<String>,
    /// At most this many entries (1 to 100000, default 1000).
    #[param(minimum = 1, maximum = 100_000)]
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
}

/// What [`list`] needs: each service routes `GET /api/v1/audit` to it with this state.
pub type AuditState = (AuditLog, Auth);

/// The audit log (admin only), oldest first.
///
/// Every audited call of this service: who (token name and role, or `anonymous` /
/// `invalid`), from where, what, on what, and the outcome.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "The entries, oldest first.", body = AuditList)))]
pub async fn list(
    State((log, auth)): State<AuditState>,
    headers: HeaderMap,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<AuditList>, ApiError> {
    auth.check(&headers, Role::Admin)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let since = match q.since.as_deref() {
        Some(s) => Some(
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(
                |e| {
                    ApiError::bad_request(format!("since: not an RFC 3339 time: {e}"))
                        .with_field("since")
                },
            )?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(1000);
    if !(1..=100_000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be 1 to 100000").with_field("limit"));
    }
    let entries = log.read(since, limit).await.map_err(ApiError::internal)?;
    Ok(axum::Json(AuditList { entries }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn append_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(dir.path(), "executor");
        let actor = Actor {
            name: "alice".into(),
            role: Some(Role::User),
            source: "10.0.0.1:5000".into(),
        };
        log.record(&actor, "job.cancel", "job/1", "ok").await;
        let mid = OffsetDateTime::now_utc();
        log.record(&actor, "job.cancel", "job/2", "refused: not yours")
            .await;
        let all = log.read(None, 10).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].outcome, "refused: not yours");
        assert_eq!(log.read(Some(mid), 10).await.unwrap().len(), 1);
        assert_eq!(log.read(None, 1).await.unwrap()[0].target, "job/2");
        // A torn last line (a crash mid-write) is skipped.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"at\":").unwrap();
        assert_eq!(log.read(None, 10).await.unwrap().len(), 2);
    }
}
