//! HTTP routes: iPXE scripts and artifacts for DUTs, boot configs for job processes.
//!
//! Who may do what (docs/security.md): DUT-facing routes answer the DUT networks, the
//! service role and admins, and the holder of a machine's current lease (`X-Lease-Id`: the
//! job process reads its machine's job script and that script's artifacts before power-on).
//! Boot configs are read with any token; setting or clearing the config of machine M needs
//! the service role or M's current lease (users cannot, any more). Changes and refused
//! attempts go to the audit log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use axum::Router;
use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dutgate_core::audit::{Actor, AuditLog};
use dutgate_core::auth::{Auth, Identity, Role, require_user};
use dutgate_core::config::GatewayConfig;
use dutgate_core::lease::{self, LeaseCheck, Target};
use dutgate_core::{ApiError, ApiJson, MachineId, Secret, ServiceName};
use serde::Deserialize;
use utoipa::openapi::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::cache::{ArtifactCache, ArtifactRef, CacheError, CacheStats};
use crate::config::Config;
use crate::ipxe::{self, BootScript};
use crate::model::{BootConfig, StoredBootConfig};
use crate::store::{Deleted, Store};

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Every stored config, read by the script endpoint without a database round trip. Only
    /// this service writes its table, and every write holds `write_lock` across the database
    /// write and the map update, so the map always equals the table.
    pub configs: Arc<RwLock<HashMap<MachineId, Arc<Prepared>>>>,
    /// `boot.default`, prepared once at start.
    pub default: Option<Arc<Prepared>>,
    pub write_lock: Arc<tokio::sync::Mutex<()>>,
    pub cache: ArtifactCache,
    pub config: Arc<Config>,
    pub gateway: Arc<GatewayConfig>,
    /// Decides whether a peer is the machine whose job script it asks for.
    pub peers: crate::peer::PeerCheck,
    /// Checks the leases job processes present (with mars).
    pub leases: LeaseCheck,
    pub audit: AuditLog,
    pub auth: Auth,
}

/// A boot config with what its scripts need worked out once, when it is stored, instead of on
/// every request: the cache's name for each artifact, and the last script rendered from it.
pub struct Prepared {
    pub config: BootConfig,
    /// How scripts name each artifact, kernel first; or why the config cannot be served (an
    /// artifact the cache does not accept any more, e.g. a stored config after the file roots
    /// changed).
    refs: Result<Vec<ArtifactRef>, String>,
    /// The last script rendered from this config, by (MAC, base URL, platform). A job's config
    /// is for one MAC and a farm's DUTs reach the gateway by one host name, so a DUT that boots
    /// again (or retries) gets the same bytes without rendering. The default config is shared
    /// by many MACs: there the entry only helps a DUT that asks twice in a row.
    last: Mutex<Option<(RenderKey, Bytes)>>,
}

#[derive(Debug, PartialEq, Eq)]
struct RenderKey {
    mac: MachineId,
    base: String,
    platform: Option<String>,
}

impl Prepared {
    /// Registers the config's artifacts with the cache (idempotent: the cache keeps every
    /// source it has seen).
    pub fn new(config: BootConfig, cache: &ArtifactCache) -> Self {
        let refs = config
            .artifacts()
            .into_iter()
            .map(|(field, url, sha)| {
                cache
                    .register(url, sha)
                    .map_err(|e| format!("{field}: {e}"))
            })
            .collect();
        Self {
            config,
            refs,
            last: Mutex::new(None),
        }
    }

    /// The error `new` met, if any (for logs at start).
    pub fn error(&self) -> Option<&str> {
        self.refs.as_ref().err().map(String::as_str)
    }
}

/// What the document says of the service as a whole (each route says the rest).
const DESCRIPTION: &str = "iPXE boot scripts and cached boot artifacts for the DUTs; boot \
    configs for job processes. DUT routes (`/boot/…`, `/boot.ipxe`, `/artifacts/…`, \
    `/dut-image/…`) answer a peer on the DUT networks, a service or admin token, or the holder \
    of a machine's current lease (`X-Lease-Id`, checked with mars; not `/dut-image/…`); others, \
    user tokens included, get 403. Boot configs are read and changed by the service role, \
    admins and the machine's lease holder; changes and refused attempts go to the audit log. \
    See docs/boot.md.";

/// The DUT-facing routes (checked by [`dut_network_service_or_lease`]).
fn dut_api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(script_by_path))
        .routes(routes!(script_by_query))
        .routes(routes!(artifact))
}

/// The DUT image (checked by [`crate::dut_image::dut_network_or_service`]).
fn image_api() -> OpenApiRouter<std::path::PathBuf> {
    OpenApiRouter::new().routes(routes!(crate::dut_image::serve))
}

/// Reads with any token ([`require_user`]; the list checks the role itself).
fn reads_api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_configs))
        .routes(routes!(cache_stats))
}

/// A machine's boot config carries its job's bucket keys on the kernel command line: it is
/// read and changed only by the service role, admins and the machine's lease holder, whom
/// the handlers check themselves (a token or the machine's lease).
fn machine_api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_config, put_config, delete_config))
}

fn audit_api() -> OpenApiRouter<dutgate_core::audit::AuditState> {
    OpenApiRouter::new().routes(routes!(dutgate_core::audit::list))
}

fn complete(doc: OpenApi) -> OpenApi {
    dutgate_core::openapi::document(doc, "dutgate boot", DESCRIPTION)
}

/// The service's OpenAPI document: the one [`router`] serves.
pub fn openapi() -> OpenApi {
    let mut doc = dut_api().into_openapi();
    doc.merge(image_api().into_openapi());
    doc.merge(reads_api().into_openapi());
    doc.merge(machine_api().into_openapi());
    doc.merge(audit_api().into_openapi());
    complete(doc)
}

pub fn router(state: AppState) -> Router {
    let auth = state.auth.clone();
    let dut = dut_api()
        .layer(from_fn_with_state(
            auth.clone(),
            dut_network_service_or_lease,
        ))
        .with_state(state.clone());
    let image = image_api()
        .layer(from_fn_with_state(
            auth.clone(),
            crate::dut_image::dut_network_or_service,
        ))
        .with_state(crate::dut_image::dir(&state.config, &state.gateway));
    let reads = reads_api()
        .layer(from_fn_with_state(auth.clone(), require_user))
        .with_state(state.clone());
    let per_machine = machine_api().with_state(state.clone());
    let audit = audit_api().with_state((state.audit, auth));
    let (router, doc) = dut
        .merge(image)
        .merge(reads)
        .merge(per_machine)
        .merge(audit)
        .split_for_parts();
    router.merge(dutgate_core::openapi::router(&complete(doc)))
}

/// Who is asking a DUT-facing route.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: Option<std::net::IpAddr>,
    /// The service role or an admin: any script, any artifact.
    pub privileged: bool,
    /// The lease the request presents (a job process): what it opens is checked with mars
    /// by the route, for the machine the route names.
    pub lease: Option<Secret>,
}

/// Middleware of the DUT-facing routes: the peer must be on a DUT network, or the request
/// must carry a service or admin token (the gateway's actors, debugging from elsewhere), or a
/// lease (`X-Lease-Id`, checked by the route against the machine it names). A user token is
/// not enough: boot scripts and artifacts are what DUTs read, and a user is not a DUT.
async fn dut_network_service_or_lease(
    State(auth): State<Auth>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let privileged = req.headers().contains_key(header::AUTHORIZATION)
        && auth.check(req.headers(), Role::Service).is_ok();
    let lease = match lease::presented(req.headers()) {
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => return ApiError::from(e).into_response(),
        None => None,
    };
    if privileged || lease.is_some() || peer.is_some_and(|ip| auth.is_dut_address(ip)) {
        req.extensions_mut().insert(Caller {
            peer,
            privileged,
            lease,
        });
        next.run(req).await
    } else {
        tracing::warn!(peer = ?peer, path = %req.uri().path(), "DUT-facing route refused: not from a DUT network, no service token and no lease");
        ApiError::forbidden(
            "this endpoint is only reachable from the DUT networks (gateway.auth.dut_networks), \
             with a service or admin token, or with the machine's lease (X-Lease-Id)",
        )
        .into_response()
    }
}

/// `?a=b&c=d`, decoded leniently (`application/x-www-form-urlencoded`: `+` is a space, `%XX`
/// a byte, invalid UTF-8 replaced): a DUT's query string never makes the request fail. Split
/// by hand rather than through a URL parser, which costs more than the rest of the request.
fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    let Some(q) = uri.query() else {
        return Vec::new();
    };
    let decode =
        |s: &str| dutgate_core::http::decode_component(&s.replace('+', " ")).unwrap_or_default();
    q.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

#[cfg(test)]
fn query_param(uri: &Uri, key: &str) -> Option<String> {
    query_pairs(uri)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// `platform`/`buildarch` as iPXE reports them (`pcbios`, `efi`, `i386`, `x86_64`, …);
/// anything else is dropped rather than logged or reflected.
fn ipxe_word(v: Option<String>) -> Option<String> {
    v.filter(|s| {
        !s.is_empty()
            && s.len() <= 32
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

/// What a DUT asked for, decoded leniently from the request URI (either URL form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptRequest {
    /// The MAC as written (not yet validated).
    pub raw_mac: String,
    /// `platform` and `buildarch` when they are plain words, else `None`.
    pub platform: Option<String>,
    pub buildarch: Option<String>,
}

/// Decodes `/boot/{mac}/boot.ipxe?…` or `/boot.ipxe?mac=…&…`; never fails.
pub fn parse_script_request(uri: &Uri) -> ScriptRequest {
    let pairs = query_pairs(uri);
    let param = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let raw_mac = match uri
        .path()
        .strip_prefix("/boot/")
        .and_then(|p| p.strip_suffix("/boot.ipxe"))
    {
        Some(raw) => dutgate_core::http::decode_component(raw).unwrap_or_default(),
        None => param("mac").unwrap_or_default(),
    };
    ScriptRequest {
        raw_mac,
        platform: ipxe_word(param("platform")),
        buildarch: ipxe_word(param("buildarch")),
    }
}

/// The iPXE script of a machine (its DUT, its lease holder, a service or admin).
///
/// A machine's job script (it carries the job's credentials) is served only to a peer whose
/// address is that machine's (recorded in mars, or its neighbour entry), to the holder of its
/// lease, or to a service or admin; anyone else gets the default script, and a lease that
/// does not hold the machine gets 403. Otherwise always 200: a malformed MAC, a missing
/// config or a render error answer a script that prints the reason and asks again after
/// `boot.retry_delay_seconds`.
#[utoipa::path(get, path = "/boot/{mac}/boot.ipxe", tag = "boot",
    params(("mac" = String, Path, description = "The booting NIC's MAC (iPXE's `${netX/mac}`)."),
        ("platform" = Option<String>, Query, description = "iPXE's `${platform}` (pcbios, efi, …)."),
        ("buildarch" = Option<String>, Query, description = "iPXE's `${buildarch}` (i386, x86_64, …).")),
    responses((status = 200, description = "An iPXE script (`Cache-Control: no-store`).", body = String, content_type = "text/plain")))]
async fn script_by_path(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    script(&app, caller, parse_script_request(&uri), &headers).await
}

/// The iPXE script of a machine, its MAC in the query: as `/boot/{mac}/boot.ipxe`.
///
/// Without `mac` the script asks again with `${netX/mac}`.
#[utoipa::path(get, path = "/boot.ipxe", tag = "boot",
    params(("mac" = Option<String>, Query, description = "The booting NIC's MAC."),
        ("platform" = Option<String>, Query, description = "iPXE's `${platform}` (pcbios, efi, …)."),
        ("buildarch" = Option<String>, Query, description = "iPXE's `${buildarch}` (i386, x86_64, …).")),
    responses((status = 200, description = "An iPXE script (`Cache-Control: no-store`).", body = String, content_type = "text/plain")))]
async fn script_by_query(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    script(&app, caller, parse_script_request(&uri), &headers).await
}

fn script_response(text: impl Into<Bytes>) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        text.into(),
    )
        .into_response()
}

impl AppState {
    /// Base URL for links in scripts: configured, else the host the DUT used, else the
    /// gateway's public host.
    fn base_url(&self, headers: &HeaderMap) -> String {
        if let Some(u) = &self.config.public_url {
            return u.trim_end_matches('/').to_string();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.len() <= 255
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            });
        match host {
            Some(h) => format!("http://{h}"),
            None => self.gateway.public_url(ServiceName::Boot),
        }
    }

    fn artifact_url(&self, base: &str, r: ArtifactRef) -> String {
        match r {
            ArtifactRef::Direct(url) => url,
            ArtifactRef::Cached { id, name } => format!("{base}/artifacts/{id}/{name}"),
        }
    }
}

async fn script(
    app: &AppState,
    caller: Caller,
    req: ScriptRequest,
    headers: &HeaderMap,
) -> Response {
    let base = app.base_url(headers);
    let ScriptRequest {
        raw_mac,
        platform,
        buildarch,
    } = req;
    let raw_mac = raw_mac.as_str();
    let delay = app.config.retry_delay_seconds;
    let asked_for = |mac: &str| {
        format!("{base}/boot/{mac}/boot.ipxe?platform=${{platform}}&buildarch=${{buildarch}}")
    };
    let mac = match MachineId::parse(raw_mac) {
        Ok(m) => m,
        Err(_) => {
            tracing::warn!(requested = %ipxe::sanitize_echo(raw_mac), platform, buildarch, "boot script asked for a malformed MAC");
            metrics::counter!("boot_scripts_total", "config" => "invalid_mac").increment(1);
            // Ask again with the NIC's own MAC: fixes a bootfile URL that lacks `${mac}`.
            return script_response(ipxe::render_retry_script(
                &format!("{raw_mac:?} is not a MAC address; asking again with this NIC's MAC"),
                &asked_for("${netX/mac}"),
                delay,
            ));
        }
    };
    // Only needed when the script is rendered (not when the kept one is served).
    let retry = || asked_for(&mac.to_string());
    let stored = app
        .configs
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&mac)
        .cloned();
    // The holder of the machine's lease (its job process) is judged by its lease alone: a
    // lease that does not hold is refused, never answered with the default script.
    if !caller.privileged
        && let Some(l) = &caller.lease
        && let Err(e) = app.leases.check(mac, l).await
    {
        tracing::warn!(machine_id = %mac, peer = ?caller.peer, reason = %e, "job boot script refused to a lease that does not hold the machine");
        return ApiError::from(e).into_response();
    }
    // A stored (job) config carries the job's credentials: only the machine itself, the
    // holder of its lease, services and admins get it; anyone else asking for this MAC gets
    // the default script.
    let stored = match stored {
        Some(p) if caller.privileged || caller.lease.is_some() => Some(p),
        Some(p) => match caller.peer {
            Some(peer) => match app.peers.matches(mac, peer).await {
                Ok(how) => {
                    tracing::debug!(machine_id = %mac, peer = %peer, by = how.as_str(), "peer is the machine");
                    Some(p)
                }
                Err(why) => {
                    tracing::warn!(
                        machine_id = %mac,
                        job_id = p.config.job_id.as_deref().unwrap_or(""),
                        peer = %peer,
                        reason = %why,
                        "job boot script asked by a peer that is not the machine; serving the default script"
                    );
                    metrics::counter!("boot_scripts_refused_total").increment(1);
                    None
                }
            },
            None => None,
        },
        None => None,
    };
    let (prepared, origin) = match stored {
        Some(p) => (Some(p), "job"),
        None => (app.default.clone(), "default"),
    };
    let Some(prepared) = prepared else {
        tracing::info!(machine_id = %mac, platform, buildarch, "boot script asked; no boot config and no default");
        metrics::counter!("boot_scripts_total", "config" => "none").increment(1);
        return script_response(ipxe::render_retry_script(
            &format!("no boot config for {mac} and no default boot config"),
            &retry(),
            delay,
        ));
    };
    let config = &prepared.config;
    match render_for(app, &base, mac, &prepared, platform.as_deref(), retry) {
        Ok(text) => {
            tracing::info!(
                machine_id = %mac,
                job_id = config.job_id.as_deref().unwrap_or(""),
                platform = platform.as_deref().unwrap_or(""),
                buildarch = buildarch.as_deref().unwrap_or(""),
                config = origin,
                "boot script served"
            );
            metrics::counter!("boot_scripts_total", "config" => origin).increment(1);
            script_response(text)
        }
        Err(msg) => {
            tracing::error!(machine_id = %mac, error = %msg, config = origin, "cannot render boot script");
            metrics::counter!("boot_scripts_total", "config" => "error").increment(1);
            script_response(ipxe::render_retry_script(&msg, &retry(), delay))
        }
    }
}

/// The script for `mac` from `prepared`: the one rendered last when MAC, base URL and platform
/// are the same (the text depends on nothing else), else rendered now and kept.
fn render_for(
    app: &AppState,
    base: &str,
    mac: MachineId,
    prepared: &Prepared,
    platform: Option<&str>,
    retry: impl FnOnce() -> String,
) -> Result<Bytes, String> {
    let last = || prepared.last.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((key, text)) = last().as_ref()
        && key.mac == mac
        && key.base == base
        && key.platform.as_deref() == platform
    {
        return Ok(text.clone());
    }
    let refs = prepared.refs.as_ref().map_err(String::clone)?;
    let mut urls: Vec<String> = refs
        .iter()
        .map(|r| app.artifact_url(base, r.clone()))
        .collect();
    if urls.is_empty() {
        return Err("the boot config names no kernel".into());
    }
    let kernel_url = urls.remove(0);
    let config = &prepared.config;
    let banner = match &config.job_id {
        Some(job) => format!("{mac} boots for job {job}"),
        None => format!("{mac} boots the default config"),
    };
    let text = Bytes::from(
        ipxe::render_boot_script(&BootScript {
            banner: &banner,
            platform,
            kernel_url: &kernel_url,
            initrd_urls: &urls,
            cmdline: &config.kernel.cmdline,
            retry_url: &retry(),
            retry_delay_seconds: app.config.retry_delay_seconds,
        })
        .map_err(|e| e.to_string())?,
    );
    let key = RenderKey {
        mac,
        base: base.to_string(),
        platform: platform.map(str::to_string),
    };
    *last() = Some((key, text.clone()));
    Ok(text)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ArtifactQuery {
    /// The machine whose lease the request presents (lease holders only).
    machine: Option<String>,
}

impl AppState {
    /// Whether the boot config stored for `mac` names cached artifact `id`.
    fn names_artifact(&self, mac: MachineId, id: &str) -> bool {
        let configs = self.configs.read().unwrap_or_else(|p| p.into_inner());
        configs.get(&mac).is_some_and(|p| {
            p.refs.as_ref().is_ok_and(|refs| {
                refs.iter()
                    .any(|r| matches!(r, ArtifactRef::Cached { id: c, .. } if c == id))
            })
        })
    }
}

/// A caller that is neither on a DUT network nor privileged presents a lease: it may read
/// the artifacts its machine's boot config names, the machine named by `?machine=`.
async fn lease_may_read(
    app: &AppState,
    caller: &Caller,
    query: &ArtifactQuery,
    id: &str,
) -> Result<(), ApiError> {
    let on_dut_network = caller.peer.is_some_and(|ip| app.auth.is_dut_address(ip));
    if caller.privileged || on_dut_network {
        return Ok(());
    }
    let Some(l) = &caller.lease else {
        return Err(ApiError::forbidden(
            "this artifact needs the machine's lease",
        ));
    };
    let Some(raw) = query.machine.as_deref() else {
        return Err(
            ApiError::bad_request("a lease holder names its machine: ?machine=<MAC>")
                .with_field("machine"),
        );
    };
    let mac = MachineId::parse(raw)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field("machine"))?;
    app.leases.check(mac, l).await?;
    if app.names_artifact(mac, id) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "the boot config of {mac} does not name artifact {id:?}"
        )))
    }
}

/// A kernel or initramfs that boot scripts name, from the cache (DUT, lease holder, service).
///
/// `id` identifies the cached source, `name` is cosmetic. A miss downloads from the upstream
/// once however many DUTs ask. Supports `Range`/`If-Range` and `If-None-Match`. A lease
/// holder names its machine in `machine` and reads the artifacts that machine's config names.
#[utoipa::path(get, path = "/artifacts/{id}/{name}", tag = "boot",
    params(("id" = String, Path, description = "The cached source."),
        ("name" = String, Path, description = "The file name (cosmetic)."), ArtifactQuery),
    responses((status = 200, description = "The file (`ETag`, `X-Dutgate-Cache`).", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range.", content_type = "application/octet-stream"),
        (status = 304, description = "Not modified."), (status = 416, description = "The range is not satisfiable.")))]
async fn artifact(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, _name)): Path<(String, String)>,
    Query(query): Query<ArtifactQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = lease_may_read(&app, &caller, &query, &id).await {
        tracing::warn!(artifact = %id, peer = ?caller.peer, reason = %e.body.error, "artifact refused");
        return e.into_response();
    }
    match app.cache.open_artifact(&id).await {
        Ok(served) => crate::cache::serve::respond(served, &headers).await,
        Err(CacheError::NotFound) => ApiError::not_found(format!(
            "no artifact {id:?}: boot scripts name the artifacts"
        ))
        .into_response(),
        Err(e @ CacheError::FileOutsideRoots(_)) => {
            ApiError::forbidden(e.to_string()).into_response()
        }
        Err(e @ (CacheError::File { .. } | CacheError::FileChecksum { .. })) => {
            tracing::warn!(artifact = %id, error = %e, "cannot serve file artifact");
            ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()).into_response()
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}

fn parse_mac(raw: &str) -> Result<MachineId, ApiError> {
    MachineId::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()).with_field("mac"))
}

fn now_ms() -> i64 {
    crate::cache::now_ms() as i64
}

/// Who may read or change machine `mac`'s boot config: the service role (or admin) or the
/// machine's current lease. A refusal is logged and audited.
async fn writer(
    app: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
    mac: MachineId,
    action: &str,
) -> Result<Actor, ApiError> {
    match lease::authorize(
        &app.auth,
        &app.leases,
        headers,
        Role::Service,
        Target::Machine(mac),
    )
    .await
    {
        Ok(caller) => Ok(caller.actor(peer)),
        Err(e) => {
            tracing::warn!(machine_id = %mac, source = %peer, reason = %e.body.error, action, "boot config access refused");
            let actor = lease::refused_actor(&app.auth, headers, peer);
            app.audit
                .record(
                    &actor,
                    action,
                    &format!("machine/{mac}"),
                    &format!("refused: {}", e.body.error),
                )
                .await;
            Err(e)
        }
    }
}

/// Sets what a machine boots next (service role, admin, or the machine's lease).
///
/// 422 names the field: a command line too long or not representable in iPXE, too many
/// initramfs images, a bad sha256 or `job_id`, or an artifact URL the cache refuses (a
/// `file://` outside the roots, an address the outbound policy refuses).
#[utoipa::path(put, path = "/api/v1/boot/{mac}", tag = "boot",
    params(("mac" = String, Path, description = "`aa:bb:cc:dd:ee:ff`, `aa-bb-…` or 12 hex digits.")),
    request_body = BootConfig,
    responses((status = 200, description = "Stored.", body = StoredBootConfig)))]
async fn put_config(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(mac): Path<String>,
    body: Result<ApiJson<BootConfig>, ApiError>,
) -> Result<ApiJson<StoredBootConfig>, ApiError> {
    let mac = parse_mac(&mac)?;
    let actor = writer(&app, &headers, peer, mac, "boot.config.set").await?;
    let r = set_config(&app, mac, body).await;
    let outcome = match &r {
        Ok(s) => format!("ok: job {}", s.config.job_id.as_deref().unwrap_or("<none>")),
        Err(e) => format!("failed: {}", e.body.error),
    };
    app.audit
        .record(
            &actor,
            "boot.config.set",
            &format!("machine/{mac}"),
            &outcome,
        )
        .await;
    r.map(ApiJson)
}

async fn set_config(
    app: &AppState,
    mac: MachineId,
    body: Result<ApiJson<BootConfig>, ApiError>,
) -> Result<StoredBootConfig, ApiError> {
    let ApiJson(config) = body?;
    config.validate()?;
    for (field, url, sha) in config.artifacts() {
        let refused = |e: CacheError| {
            if matches!(e, CacheError::Refused(_)) {
                tracing::warn!(machine_id = %mac, job_id = config.job_id.as_deref().unwrap_or(""), field, error = %e, "boot config refused by the outbound policy");
            }
            ApiError::unprocessable(e.to_string()).with_field(field.to_string())
        };
        app.cache.register(url, sha).map_err(&refused)?;
        app.cache.check_upstream(url).await.map_err(&refused)?;
    }
    let prepared = Arc::new(Prepared::new(config.clone(), &app.cache));
    let stored = {
        let _writer = app.write_lock.lock().await;
        let stored = app
            .store
            .put(mac, &config, now_ms())
            .await
            .map_err(ApiError::internal)?;
        app.configs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mac, prepared);
        stored
    };
    tracing::info!(
        machine_id = %mac,
        job_id = config.job_id.as_deref().unwrap_or(""),
        kernel = %config.kernel.url,
        "boot config set"
    );
    Ok(stored)
}

/// A machine's boot config (service role, admin, or the machine's lease).
///
/// It carries the job's keys. 404 when the machine has none (it boots the default config).
#[utoipa::path(get, path = "/api/v1/boot/{mac}", tag = "boot",
    params(("mac" = String, Path, description = "`aa:bb:cc:dd:ee:ff`, `aa-bb-…` or 12 hex digits.")),
    responses((status = 200, description = "The config.", body = StoredBootConfig)))]
async fn get_config(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(mac): Path<String>,
) -> Result<ApiJson<StoredBootConfig>, ApiError> {
    let mac = parse_mac(&mac)?;
    writer(&app, &headers, peer, mac, "boot.config.read").await?;
    match app.store.get(mac).await.map_err(ApiError::internal)? {
        Some(s) => Ok(ApiJson(s)),
        None => Err(ApiError::not_found(format!(
            "no boot config for {mac}: it boots the default config"
        ))),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeleteQuery {
    /// Only if the config belongs to this job (a late teardown cannot clear the next job's).
    job_id: Option<String>,
}

/// Clears a machine's boot config (service role, admin, or the machine's lease).
///
/// The machine boots the default config again. 409 when the config belongs to another job
/// than `job_id` (it is kept).
#[utoipa::path(delete, path = "/api/v1/boot/{mac}", tag = "boot",
    params(("mac" = String, Path, description = "`aa:bb:cc:dd:ee:ff`, `aa-bb-…` or 12 hex digits."), DeleteQuery),
    responses((status = 204, description = "Cleared, or there was none.")))]
async fn delete_config(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(mac): Path<String>,
    q: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let mac = parse_mac(&mac)?;
    let actor = writer(&app, &headers, peer, mac, "boot.config.clear").await?;
    let r = clear_config(&app, mac, q).await;
    let outcome = match &r {
        Ok(Deleted::Yes) => "ok".to_string(),
        Ok(_) => "ok: nothing to clear".to_string(),
        Err(e) => format!("failed: {}", e.body.error),
    };
    app.audit
        .record(
            &actor,
            "boot.config.clear",
            &format!("machine/{mac}"),
            &outcome,
        )
        .await;
    r.map(|_| StatusCode::NO_CONTENT)
}

async fn clear_config(
    app: &AppState,
    mac: MachineId,
    q: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Deleted, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let _writer = app.write_lock.lock().await;
    let deleted = app
        .store
        .delete(mac, q.job_id.as_deref())
        .await
        .map_err(ApiError::internal)?;
    if deleted == Deleted::Yes {
        app.configs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&mac);
    }
    match deleted {
        Deleted::Yes => {
            tracing::info!(machine_id = %mac, job_id = q.job_id.as_deref().unwrap_or(""), "boot config cleared");
            Ok(Deleted::Yes)
        }
        Deleted::Absent => Ok(Deleted::Absent),
        Deleted::OtherJob(other) => Err(ApiError::conflict(format!(
            "the boot config of {mac} belongs to job {}; kept",
            other.as_deref().unwrap_or("<none>")
        ))),
    }
}

/// Every stored boot config (service role or admin: they carry the jobs' keys).
#[utoipa::path(get, path = "/api/v1/boot", tag = "boot",
    responses((status = 200, description = "The configs.", body = Vec<StoredBootConfig>)))]
async fn list_configs(
    State(app): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Result<ApiJson<Vec<StoredBootConfig>>, ApiError> {
    if !who.role.allows(Role::Service) {
        let why = format!(
            "the boot configs carry the jobs' keys: listing them needs the service or admin \
             role; token \"{}\" is a {} token (a job's lease reads its own machine's config \
             at /api/v1/boot/{{mac}})",
            who.name, who.role
        );
        tracing::warn!(source = %peer, token = %who.name, "boot config list refused");
        app.audit
            .record(
                &Actor::known(&who, peer),
                "boot.config.list",
                "boot",
                &format!("refused: {why}"),
            )
            .await;
        return Err(ApiError::forbidden(why));
    }
    Ok(ApiJson(app.store.list().await.map_err(ApiError::internal)?))
}

/// The artifact cache's counters since start (any token).
#[utoipa::path(get, path = "/api/v1/boot-cache", tag = "boot",
    responses((status = 200, description = "The counters.", body = CacheStats)))]
async fn cache_stats(State(app): State<AppState>) -> ApiJson<CacheStats> {
    ApiJson(app.cache.stats())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_decoding() {
        let uri: Uri = "/boot.ipxe?mac=52%3A54%3A00%3A12%3A34%3A56&platform=efi"
            .parse()
            .unwrap();
        assert_eq!(query_param(&uri, "mac").unwrap(), "52:54:00:12:34:56");
        assert_eq!(query_param(&uri, "buildarch"), None);
        let uri: Uri = "/boot.ipxe?a=1+2&&b&c=%7e=x&mac=aa%3Abb".parse().unwrap();
        assert_eq!(query_param(&uri, "a").unwrap(), "1 2");
        assert_eq!(query_param(&uri, "b").unwrap(), "");
        assert_eq!(query_param(&uri, "c").unwrap(), "~=x");
        assert_eq!(query_param(&uri, "mac").unwrap(), "aa:bb");
        assert_eq!(ipxe_word(Some("x86_64".into())).as_deref(), Some("x86_64"));
        assert_eq!(ipxe_word(Some("a b".into())), None);
        let r = parse_script_request(
            &"/boot/52-54-00-12-34-56/boot.ipxe?platform=pcbios&buildarch=i%20386"
                .parse()
                .unwrap(),
        );
        assert_eq!(r.raw_mac, "52-54-00-12-34-56");
        assert_eq!(r.platform.as_deref(), Some("pcbios"));
        assert_eq!(r.buildarch, None);
    }

    proptest::proptest! {
        #[test]
        fn request_decoding_never_panics(s in "(?s).{0,60}") {
            for candidate in [format!("/boot/{s}/boot.ipxe"), format!("/boot.ipxe?{s}"), s.clone()] {
                if let Ok(uri) = candidate.parse::<Uri>() {
                    let r = parse_script_request(&uri);
                    for w in [&r.platform, &r.buildarch].into_iter().flatten() {
                        proptest::prop_assert!(w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
                    }
                    let script = ipxe::render_retry_script(&r.raw_mac, "http://gw/r", 1);
                    proptest::prop_assert_eq!(script.lines().filter(|l| l.starts_with("echo ")).count(), 2);
                }
            }
        }
    }
}
