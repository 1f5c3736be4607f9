//! The web dashboard under `/ui/` (docs/dashboard.md): the farm grouped by PDU, the queue,
//! jobs with their live console, and admin actions with a confirmation step.
//!
//! - Pages are rendered on the server ([`pages`], maud); `dashboard.js` polls each page's
//!   `…/live` fragment twice a second and swaps it in, and runs the console in xterm.js over
//!   the executor's console WebSocket.
//! - Who sees and does what is decided where it is today: job reads and cancels go through
//!   the REST handlers of [`crate::api`] (job ownership, `job_visibility`); machine and PDU
//!   data come from mars and pdu over their REST APIs, and admin actions are forwarded there
//!   with the signed-in user's own token, so those services decide. No database is shared.
//! - Sign-in and CSRF: [`session`]. Assets (xterm.js, the page script and style) are
//!   embedded in the binary ([`assets`]).

pub mod assets;
mod pages;
pub mod session;

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Extension, Form, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dutgate_core::client::{ApiClient, ClientError};
use dutgate_core::{ApiError, MachineId, PowerState, ServiceName};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{
    ActivateRequest, DiscoverRequest, FailedStage, Machine, MachineState, RetireRequest,
};
use dutgate_pdu::client::PduClient;
use dutgate_pdu_driver::Switch;
use serde::Deserialize;

use crate::api::AppState;
use crate::model::{Artifact, Event, Job, JobState};
pub use session::{Sessions, UiCaller};

/// What the dashboard keeps between requests: the sessions, and one HTTP client for mars
/// and pdu (each request attaches the caller's own token).
#[derive(Clone)]
pub struct UiShared {
    pub sessions: Sessions,
    http: reqwest::Client,
}

/// Time budget of one call to mars or pdu for a page (a page must render in well under a
/// second; a slow peer shows as an error line instead).
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for UiShared {
    fn default() -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(PEER_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            sessions: Sessions::default(),
            http,
        }
    }
}

pub fn router(state: AppState) -> Router {
    let signed_in = Router::new()
        .route("/ui/farm", get(farm))
        .route("/ui/farm/live", get(farm_live))
        .route("/ui/queue", get(queue))
        .route("/ui/queue/live", get(queue_live))
        .route("/ui/jobs", get(jobs))
        .route("/ui/jobs/live", get(jobs_live))
        .route("/ui/jobs/{id}", get(job))
        .route("/ui/jobs/{id}/live", get(job_live))
        .route("/ui/jobs/{id}/artifacts/{*path}", get(artifact))
        .route("/ui/confirm", get(confirm))
        .route("/ui/action", post(action))
        .route("/ui/logout", post(logout))
        .layer(from_fn_with_state(state.clone(), require_session))
        .with_state(state.clone());
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/farm") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/farm") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/assets/{name}", get(assets::serve))
        .with_state(state)
        .merge(signed_in)
}

/// Every signed-in page: the session cookie, re-checked against the token store; a POST
/// also passes the cross-site check and carries the session's CSRF token (checked by the
/// handler, which reads the form).
async fn require_session(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(caller) = s.ui.sessions.caller(&s.auth, req.headers()) else {
        let live = req.uri().path().ends_with("/live");
        if live || req.method() != axum::http::Method::GET {
            return ApiError::unauthorized("the dashboard session has ended: sign in again")
                .into_response();
        }
        return Redirect::to("/ui/login").into_response();
    };
    if req.method() == axum::http::Method::POST
        && let Err(e) = session::same_origin(req.headers())
    {
        tracing::warn!(actor = %caller.who.name, reason = %e, "dashboard request refused");
        return page_error(StatusCode::FORBIDDEN, &caller, &e);
    }
    req.extensions_mut().insert(caller);
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(pages::CSP),
    );
    resp
}

fn page_error(status: StatusCode, caller: &UiCaller, message: &str) -> Response {
    (
        status,
        Html(pages::error_page(caller, status, message).into_string()),
    )
        .into_response()
}

fn api_error_page(caller: &UiCaller, e: ApiError) -> Response {
    page_error(e.status, caller, &e.body.error)
}

// ---- sign-in ----------------------------------------------------------------------------

async fn login_page() -> Response {
    let mut resp = Html(pages::login_page(None).into_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(pages::CSP),
    );
    resp
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// Exchanges a token (a form field, never in the URL) for a session cookie.
async fn login(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    // Login CSRF (signing a victim into the attacker's session) is refused like any other
    // cross-site POST.
    if let Err(e) = session::same_origin(&headers) {
        return (
            StatusCode::FORBIDDEN,
            Html(pages::login_page(Some(&e)).into_string()),
        )
            .into_response();
    }
    let token = form.token.trim();
    match s.auth.identify_token(token) {
        Ok(who) => {
            let id = s.ui.sessions.create(token);
            tracing::info!(actor = %who.name, source = %peer, "dashboard sign-in");
            let mut resp = Redirect::to("/ui/farm").into_response();
            if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&id, &headers)) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => {
            tracing::warn!(source = %peer, reason = %e.body.error, "dashboard sign-in refused");
            (
                e.status,
                Html(pages::login_page(Some(&e.body.error)).into_string()),
            )
                .into_response()
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// The refusal of a form without the session's CSRF token; `None` when it has it.
fn csrf_refusal(caller: &UiCaller, token: &str) -> Option<Response> {
    if caller.session.csrf.matches(token) {
        None
    } else {
        tracing::warn!(actor = %caller.who.name, "dashboard request without its CSRF token refused");
        Some(page_error(
            StatusCode::FORBIDDEN,
            caller,
            "the form's CSRF token is missing or wrong: reload the page and try again",
        ))
    }
}

async fn logout(
    State(s): State<AppState>,
    Extension(caller): Extension<UiCaller>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(r) = csrf_refusal(&caller, &form.csrf) {
        return r;
    }
    if let Some(id) = session::session_id(&headers) {
        s.ui.sessions.remove(&id);
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::clear_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

// ---- peers ------------------------------------------------------------------------------

fn mars(s: &AppState, caller: &UiCaller) -> MarsClient {
    MarsClient::from_api(ApiClient::with_http(
        s.cfg.url_of(&s.gw, ServiceName::Mars),
        Some(caller.session.token.clone()),
        s.ui.http.clone(),
    ))
}

fn pdu(s: &AppState, caller: &UiCaller) -> PduClient {
    PduClient::from_api(ApiClient::with_http(
        s.cfg.url_of(&s.gw, ServiceName::Pdu),
        Some(caller.session.token.clone()),
        s.ui.http.clone(),
    ))
}

/// One sentence for a failed peer call: the service's own error when it gave one.
fn peer_error(e: &ClientError) -> String {
    match e {
        ClientError::Api { status, body, .. } => format!("{}: {}", status.as_u16(), body.error),
        other => other.to_string(),
    }
}

// ---- farm -------------------------------------------------------------------------------

/// A machine as the farm page shows it.
pub(crate) struct MachineView {
    pub m: Machine,
    pub power: Option<PowerState>,
    /// Of the current training run: (loop, status, failed stage).
    pub loops: Vec<(u32, String, Option<FailedStage>)>,
}

/// Machines of one PDU (or of none).
pub(crate) struct PduGroup {
    pub name: Option<String>,
    pub error: Option<String>,
    pub machines: Vec<MachineView>,
    /// Ports of this PDU no machine is on: `(port, power)`.
    pub free_ports: Vec<(String, PowerState)>,
}

pub(crate) struct FarmView {
    pub groups: Vec<PduGroup>,
    pub errors: Vec<String>,
}

async fn farm_view(s: &AppState, caller: &UiCaller) -> FarmView {
    let mars = mars(s, caller);
    let pdu = pdu(s, caller);
    let (machines, pdus) = tokio::join!(mars.machines(), pdu.pdus());
    let mut errors = Vec::new();
    let mut machines = machines.unwrap_or_else(|e| {
        errors.push(format!("mars: {}", peer_error(&e)));
        Vec::new()
    });
    machines.sort_by(|a, b| a.full_name.cmp(&b.full_name));
    let pdus = pdus.unwrap_or_else(|e| {
        errors.push(format!("pdu: {}", peer_error(&e)));
        Vec::new()
    });
    let ports = futures::future::join_all(pdus.iter().map(|p| pdu.ports(&p.name))).await;
    // Training loops only for machines that train now: one call each.
    let training_ids: Vec<MachineId> = machines
        .iter()
        .filter(|m| matches!(m.state, MachineState::Training | MachineState::QuickCheck))
        .map(|m| m.id)
        .collect();
    let reports = futures::future::join_all(training_ids.iter().map(|id| mars.training(*id))).await;
    let mut loops_of = std::collections::HashMap::new();
    for (id, r) in training_ids.iter().zip(reports) {
        if let Ok(r) = r
            && let Some(run) = r.runs.first()
        {
            let loops = run
                .loops
                .iter()
                .map(|l| (l.n, l.status.as_str().to_string(), l.failed_stage))
                .collect::<Vec<_>>();
            loops_of.insert(*id, loops);
        }
    }
    let mut groups: Vec<PduGroup> = Vec::new();
    for (info, ports) in pdus.iter().zip(ports) {
        let (ports, error) = match ports {
            Ok(p) => (p, info.error.clone()),
            Err(e) => (Vec::new(), Some(peer_error(&e))),
        };
        let mut views = Vec::new();
        let mut used = std::collections::HashSet::new();
        for m in machines
            .iter()
            .filter(|m| m.pdu.as_deref() == Some(info.name.as_str()))
        {
            let power = m
                .pdu_port_id
                .as_deref()
                .and_then(|id| ports.iter().find(|p| p.id == id))
                .map(|p| p.state);
            if let Some(id) = &m.pdu_port_id {
                used.insert(id.clone());
            }
            views.push(MachineView {
                loops: loops_of.remove(&m.id).unwrap_or_default(),
                m: m.clone(),
                power,
            });
        }
        let free_ports = ports
            .iter()
            .filter(|p| !used.contains(&p.id))
            .map(|p| (p.id.clone(), p.state))
            .collect();
        groups.push(PduGroup {
            name: Some(info.name.clone()),
            error,
            machines: views,
            free_ports,
        });
    }
    let known: std::collections::HashSet<&str> = pdus.iter().map(|p| p.name.as_str()).collect();
    let orphans: Vec<MachineView> = machines
        .iter()
        .filter(|m| m.pdu.as_deref().is_none_or(|p| !known.contains(p)))
        .map(|m| MachineView {
            loops: loops_of.remove(&m.id).unwrap_or_default(),
            m: m.clone(),
            power: None,
        })
        .collect();
    if !orphans.is_empty() {
        groups.push(PduGroup {
            name: None,
            error: None,
            machines: orphans,
            free_ports: Vec::new(),
        });
    }
    FarmView { groups, errors }
}

async fn farm(State(s): State<AppState>, Extension(caller): Extension<UiCaller>) -> Response {
    let view = farm_view(&s, &caller).await;
    Html(pages::farm_page(&caller, &view).into_string()).into_response()
}

async fn farm_live(State(s): State<AppState>, Extension(caller): Extension<UiCaller>) -> Response {
    let view = farm_view(&s, &caller).await;
    Html(pages::farm_live(&caller, &view).into_string()).into_response()
}

// ---- jobs -------------------------------------------------------------------------------

/// The REST job list with the caller's identity: the same filters and the same
/// `job_visibility` rule as `GET /api/v1/jobs`.
async fn list_jobs(
    s: &AppState,
    caller: &UiCaller,
    query: &[(String, String)],
) -> Result<Vec<Job>, ApiError> {
    let q: Vec<(&str, &str)> = query
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let qs = serde_urlencoded_pairs(&q);
    let uri: Uri = format!("/api/v1/jobs?{qs}")
        .parse()
        .map_err(|_| ApiError::bad_request("invalid filter"))?;
    let Json(list) = crate::api::list(State(s.clone()), Extension(caller.who.clone()), uri).await?;
    Ok(list.jobs)
}

fn serde_urlencoded_pairs(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                dutgate_core::http::encode_component(k),
                dutgate_core::http::encode_component(v)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The job list's filters, as the page's form sends them.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct JobFilter {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub machine_id: String,
    #[serde(default)]
    pub tag: String,
}

impl JobFilter {
    fn pairs(&self) -> Vec<(String, String)> {
        vec![
            ("state".into(), self.state.trim().to_uppercase()),
            ("owner".into(), self.owner.trim().to_string()),
            ("machine_id".into(), self.machine_id.trim().to_string()),
            ("tag".into(), self.tag.trim().to_string()),
        ]
    }

    fn query(&self) -> String {
        let pairs = self.pairs();
        let q: Vec<(&str, &str)> = pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        serde_urlencoded_pairs(&q)
    }
}

fn filter_of(uri: &Uri) -> JobFilter {
    uri.query()
        .and_then(|q| {
            axum::extract::Query::<JobFilter>::try_from_uri(&format!("/?{q}").parse().ok()?).ok()
        })
        .map(|q| q.0)
        .unwrap_or_default()
}

async fn jobs(
    State(s): State<AppState>,
    Extension(caller): Extension<UiCaller>,
    uri: Uri,
) -> Response {
    let f = filter_of(&uri);
    let list = list_jobs(&s, &caller, &f.pairs()).await;
    Html(pages::jobs_page(&caller, &f, &f.query(), &list).into_string()).into_response()
}

async fn jobs_live(
    State(s): State<AppState>,
    Extension(caller): Extension<UiCaller>,
    uri: Uri,
) -> Response {
    let f = filter_of(&uri);
    let list = list_jobs(&s, &caller, &f.pairs()).await;
    Html(pages::jobs_live(&caller, &list).into_string()).into_response()
}

/// A job page's data: the job, its events and artifacts, whether the caller may type.
pub(crate) struct JobView {
    pub job: Job,
    pub events: Vec<Event>,
    pub artifacts: Vec<Artifact>,
    pub writable: bool,
}

async fn job_view(
    s: &AppState,
    caller: &UiCaller,
    peer: SocketAddr,
    id: &str,
) -> Result<JobView, ApiError> {
    let who = Extension(caller.who.clone());
    let Json(job) = crate::api::show(
        State(s.clone()),
        who.clone(),
        ConnectInfo(peer),
        Path(id.to_string()),
    )
    .await?;
    let events = s.store.events(job.id, 0).await.unwrap_or_default();
    let artifacts = crate::api::artifacts(
        State(s.clone()),
        who,
        ConnectInfo(peer),
        Path(id.to_string()),
    )
    .await
    .map(|Json(l)| l.artifacts)
    .unwrap_or_default();
    let writable = match s.store.get(job.id).await {
        Ok(Some(row)) => crate::api::may_control(s, &caller.who, &row),
        _ => false,
    };
    Ok(JobView {
        job,
        events,
        artifacts,
        writable,
    })
}

async fn job(
    State(s): State<AppState>,
    Extension(caller): Extension<UiCaller>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Response {
    match job_view(&s, &caller, peer, &id).await {
        Ok(v) => Html(pages::job_page(&caller, &v).into_string()).into_response(),
        Err(e) => api_error_page(&caller, e),
    }
}

async fn job_live(
    State(s): State<AppState>,
    Extension(caller): Extension<UiCaller>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
) -> Response {
    match job_view(&s, &caller, peer, &id).await {
        Ok(v) => Html(pages::job_live(&caller, &v).into_string()).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Artifact downloads for the session (the REST route wants a bearer token); the same
/// handler, so the same rules (files a job produced: its owner and admins).
async fn artifact(
    State(s): State<AppState>,
    Extension(caller): Extension<UiCaller>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, path)): Path<(String, String)>,
) -> Response {
    match crate::api::artifact(
        State(s),
        Extension(caller.who.clone()),
        ConnectInfo(peer),
        Path((id, path)),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => api_error_page(&caller, e),
    }
}

// ---- queue ------------------------------------------------------------------------------

pub(crate) struct QueueView {
    pub jobs: Vec<Job>,
    /// Target tag sets of waiting jobs that no `IDLE` machine has.
    pub starved: Vec<Vec<String>>,
    pub errors: Vec<String>,
}

async fn queue_view(s: &AppState, caller: &UiCaller) -> QueueView {
    let mut errors = Vec::new();
    let q = vec![
        ("state".to_string(), "QUEUED".to_string()),
        ("limit".to_string(), "1000".to_string()),
    ];
    let mut jobs = list_jobs(s, caller, &q).await.unwrap_or_else(|e| {
        errors.push(e.body.error);
        Vec::new()
    });
    jobs.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.submitted_at.0.cmp(&b.submitted_at.0))
    });
    let machines = mars(s, caller).machines().await.unwrap_or_else(|e| {
        errors.push(format!("mars: {}", peer_error(&e)));
        Vec::new()
    });
    let idle: Vec<&Machine> = machines
        .iter()
        .filter(|m| m.state == MachineState::Idle)
        .collect();
    let mut starved: Vec<Vec<String>> = Vec::new();
    for j in &jobs {
        let free = idle.iter().any(|m| {
            j.target.id.is_none_or(|id| id == m.id)
                && j.target
                    .tags
                    .iter()
                    .all(|t| m.all_tags().any(|mt| mt.as_str() == t))
        });
        if !free && !starved.contains(&j.target.tags) {
            starved.push(j.target.tags.clone());
        }
    }
    QueueView {
        jobs,
        starved,
        errors,
    }
}

async fn queue(State(s): State<AppState>, Extension(caller): Extension<UiCaller>) -> Response {
    let v = queue_view(&s, &caller).await;
    Html(pages::queue_page(&caller, &v).into_string()).into_response()
}

async fn queue_live(State(s): State<AppState>, Extension(caller): Extension<UiCaller>) -> Response {
    let v = queue_view(&s, &caller).await;
    Html(pages::queue_live(&caller, &v).into_string()).into_response()
}

// ---- admin actions ----------------------------------------------------------------------

/// An action and its object, as the confirmation page and the action form carry them.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ActionForm {
    pub action: String,
    #[serde(default)]
    pub machine: String,
    #[serde(default)]
    pub pdu: String,
    #[serde(default)]
    pub port: String,
    #[serde(default)]
    pub job: String,
    #[serde(default)]
    pub csrf: String,
}

/// What an action does, in one sentence for the confirmation page; `Err` for an unknown
/// action or a missing object.
pub(crate) fn describe(a: &ActionForm) -> Result<String, ApiError> {
    let need = |v: &str, field: &str| {
        if v.trim().is_empty() {
            Err(ApiError::bad_request(format!("the action needs `{field}`")).with_field(field))
        } else {
            Ok(())
        }
    };
    Ok(match a.action.as_str() {
        "retire" => {
            need(&a.machine, "machine")?;
            format!("Retire machine {} (take it out of service)?", a.machine)
        }
        "activate" => {
            need(&a.machine, "machine")?;
            format!("Activate machine {} (back into service)?", a.machine)
        }
        "discover" => {
            need(&a.pdu, "pdu")?;
            need(&a.port, "port")?;
            format!(
                "Discover the machine on port {} of PDU {} (power it on and bind the next machine that registers)?",
                a.port, a.pdu
            )
        }
        "port-on" | "port-off" | "port-cycle" => {
            need(&a.pdu, "pdu")?;
            need(&a.port, "port")?;
            let what = &a.action["port-".len()..];
            format!("Switch port {} of PDU {}: {what}?", a.port, a.pdu)
        }
        "cancel" => {
            need(&a.job, "job")?;
            format!("Cancel job {}?", a.job)
        }
        other => {
            return Err(
                ApiError::bad_request(format!("unknown action {other:?}")).with_field("action")
            );
        }
    })
}

async fn confirm(Extension(caller): Extension<UiCaller>, uri: Uri) -> Response {
    let form = uri
        .query()
        .and_then(|q| {
            axum::extract::Query::<ActionForm>::try_from_uri(&format!("/?{q}").parse().ok()?).ok()
        })
        .map(|q| q.0)
        .unwrap_or_default();
    match describe(&form) {
        Ok(text) => Html(pages::confirm_page(&caller, &form, &text).into_string()).into_response(),
        Err(e) => api_error_page(&caller, e),
    }
}

async fn action(
    State(s): State<AppState>,
    Extension(caller): Extension<UiCaller>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(r) = csrf_refusal(&caller, &form.csrf) {
        return r;
    }
    if let Err(e) = describe(&form) {
        return api_error_page(&caller, e);
    }
    let reason = Some(format!("dashboard ({})", caller.who.name));
    let machine = || {
        MachineId::parse(form.machine.trim())
            .map_err(|e| ApiError::bad_request(e.to_string()).with_field("machine"))
    };
    let mars = mars(&s, &caller);
    let pdu = pdu(&s, &caller);
    let done: Result<(String, String), Response> = match form.action.as_str() {
        "retire" | "activate" => match machine() {
            Err(e) => Err(api_error_page(&caller, e)),
            Ok(id) => {
                let r = if form.action == "retire" {
                    mars.retire(
                        id,
                        &RetireRequest {
                            cancel_job: false,
                            reason,
                        },
                    )
                    .await
                } else {
                    mars.activate(id, &ActivateRequest { reason }).await
                };
                r.map(|m| {
                    (
                        format!("machine {} is now {}", m.id, m.state),
                        "/ui/farm".to_string(),
                    )
                })
                .map_err(|e| peer_refusal(&caller, "mars", &e))
            }
        },
        "discover" => mars
            .discover(&DiscoverRequest {
                pdu: form.pdu.trim().to_string(),
                port_id: form.port.trim().to_string(),
                timeout: None,
            })
            .await
            .map(|_| {
                (
                    format!(
                        "discovery started on port {} of PDU {}",
                        form.port, form.pdu
                    ),
                    "/ui/farm".to_string(),
                )
            })
            .map_err(|e| peer_refusal(&caller, "mars", &e)),
        "port-on" | "port-off" => {
            let want = if form.action == "port-on" {
                Switch::On
            } else {
                Switch::Off
            };
            pdu.set(form.pdu.trim(), form.port.trim(), want)
                .await
                .map(|_| {
                    (
                        format!("port {} of PDU {} switched", form.port, form.pdu),
                        "/ui/farm".to_string(),
                    )
                })
                .map_err(|e| peer_refusal(&caller, "pdu", &e))
        }
        "port-cycle" => pdu
            .cycle(form.pdu.trim(), form.port.trim(), None)
            .await
            .map(|_| {
                (
                    format!("port {} of PDU {} power-cycled", form.port, form.pdu),
                    "/ui/farm".to_string(),
                )
            })
            .map_err(|e| peer_refusal(&caller, "pdu", &e)),
        "cancel" => crate::api::cancel(
            State(s.clone()),
            Extension(caller.who.clone()),
            ConnectInfo(peer),
            Path(form.job.trim().to_string()),
        )
        .await
        .map(|_| {
            (
                format!("job {} is being cancelled", form.job.trim()),
                format!("/ui/jobs/{}", form.job.trim()),
            )
        })
        .map_err(|e| api_error_page(&caller, e)),
        _ => Err(page_error(
            StatusCode::BAD_REQUEST,
            &caller,
            "unknown action",
        )),
    };
    match done {
        Ok((message, back)) => {
            tracing::info!(actor = %caller.who.name, action = %form.action, %message, "dashboard action");
            Html(pages::done_page(&caller, &message, &back).into_string()).into_response()
        }
        Err(r) => r,
    }
}

/// The answer of a refused action: the status and sentence of the service that refused.
fn peer_refusal(caller: &UiCaller, service: &str, e: &ClientError) -> Response {
    let status = e.status().unwrap_or(StatusCode::BAD_GATEWAY);
    let msg = match e {
        ClientError::Api { body, .. } => format!("{service} refused: {}", body.error),
        other => format!("{service} is unreachable: {other}"),
    };
    page_error(status, caller, &msg)
}

/// A job's display state: its status once finished, else its state (what the page shows
/// and tests look for).
pub(crate) fn job_state_word(j: &Job) -> String {
    match (j.state, j.status) {
        (JobState::Finished, Some(st)) => st.as_str().to_string(),
        (st, _) => st.as_str().to_string(),
    }
}
