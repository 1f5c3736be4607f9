//! The embedded S3 endpoint, `dutgate s3`: s3s in front of the filesystem backend under the
//! state dir ([`backend`]), with a gate that refuses what s3s should never see ([`gate`]:
//! SigV2, form POSTs), our credential store ([`keystore`]), access rules ([`access`], with
//! the key rules of [`paths`]) and the key administration route ([`admin`]). `/healthz` and `/metrics` answer like every other
//! service (which reserves the bucket names `healthz` and `metrics`).

pub mod access;
pub mod admin;
pub mod backend;
pub mod gate;
pub mod keystore;
pub mod paths;
pub mod reader;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::error_handling::HandleError;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use dutgate_core::config::GatewayConfig;
use dutgate_core::{ServiceContext, ServiceError};
use http::StatusCode;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Backend, Config};
use crate::error::StorageError;
use crate::keys;

pub use keystore::{Identity, KeyStore};

/// The router of the embedded endpoint, plus its key store (tests inspect it).
pub struct Embedded {
    pub router: Router,
    pub keys: KeyStore,
}

/// Builds the embedded endpoint from the config: data under `s3.data_dir`
/// (default `<state_dir>/s3/data`), keys under `<state_dir>/s3`.
pub async fn build(gateway: &GatewayConfig, config: &Config) -> Result<Embedded, StorageError> {
    let gateway = gateway.clone();
    let config = config.clone();
    tokio::task::spawn_blocking(move || build_blocking(&gateway, &config))
        .await
        .map_err(|e| StorageError::Config(format!("starting the embedded S3 endpoint: {e}")))?
}

fn build_blocking(gateway: &GatewayConfig, config: &Config) -> Result<Embedded, StorageError> {
    // Job files and keys are the DUTs' and submitters' data: not for other local users.
    let dir = Config::state_dir(gateway);
    std::fs::create_dir_all(&dir).map_err(|e| StorageError::io(&dir, e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| StorageError::io(&dir, e))?;
    }
    let admin = keys::admin_keys_blocking(gateway, config)?;
    let keys = KeyStore::open(&Config::state_dir(gateway), admin)?;
    let data_dir = config.data_dir(gateway);
    let data_dir_for_health = data_dir.clone();
    let backend = backend::Backend::open(data_dir.clone())?;
    let s3 = {
        let mut b = S3ServiceBuilder::new(backend);
        b.set_auth(access::Auth(keys.clone()));
        b.set_access(access::Access {
            keys: keys.clone(),
            networks: dutgate_core::auth::Auth::new(None, None, gateway.auth.dut_networks.clone()),
        });
        b.set_route(admin::AdminRoute {
            keys: keys.clone(),
            data_dir,
        });
        b.build()
    };
    let s3 = HandleError::new(s3, |err: s3s::HttpError| async move {
        tracing::error!(error = ?err, "S3 request failed");
        (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
    });
    // The gate runs before s3s parses or verifies anything (SigV2, form POSTs).
    let s3 = Router::new()
        .fallback_service(s3)
        .layer(middleware::from_fn(gate::gate));
    Ok(Embedded {
        router: with_shared_routes(s3, Some(data_dir_health(data_dir_for_health))),
        keys,
    })
}

/// Healthy while the data directory is there (a removed or unmounted disk is not).
fn data_dir_health(dir: std::path::PathBuf) -> dutgate_core::http::HealthCheck {
    std::sync::Arc::new(move || {
        let dir = dir.clone();
        Box::pin(async move {
            match tokio::fs::metadata(&dir).await {
                Ok(m) if m.is_dir() => Ok(()),
                Ok(_) => Err(format!("{} is not a directory", dir.display())),
                Err(e) => Err(format!("{}: {e}", dir.display())),
            }
        })
    })
}

/// `/healthz` and `/metrics` from the core bootstrap, everything else to `s3`.
fn with_shared_routes(s3: Router, health: Option<dutgate_core::http::HealthCheck>) -> Router {
    let common = dutgate_core::http::with_common_routes("s3", Router::new(), health);
    // `route_service` refuses a `Router`; its service form is accepted.
    Router::new()
        .route_service(
            "/healthz",
            common.clone().into_service::<axum::body::Body>(),
        )
        .route_service("/metrics", common.into_service::<axum::body::Body>())
        .merge(dutgate_core::openapi::router(&openapi()))
        .fallback_service(s3)
        .layer(middleware::from_fn(record_request))
}

/// The OpenAPI document served at `/api/v1/openapi.json`: the key administration route and
/// the shared routes; the S3 API itself is referenced, not re-specified.
pub fn openapi() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
    let mut doc = dutgate_core::openapi::document(
        admin::api().into_openapi(),
        "dutgate s3 (embedded object store)",
        "Every path not listed here is an S3 request (Amazon S3 REST API, path-style, SigV4 \
         only: https://docs.aws.amazon.com/AmazonS3/latest/API/) with S3 XML errors. The \
         admin key pair may do everything; a job key pair only its own bucket, from the DUT \
         networks. `sigv4`: signed with the admin key pair. With `s3.backend: external` \
         anything but `/healthz` and this document is 503. See docs/storage.md.",
    );
    let sigv4 = SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("Authorization")));
    if let Some(c) = doc.components.as_mut() {
        c.security_schemes.insert("sigv4".into(), sigv4.into());
    }
    doc
}

/// A request's mark, set by the refusals that log themselves with their reason (the gate,
/// [`access::deny`]); [`record_request`] logs the other error answers.
#[derive(Clone, Debug, Default)]
pub(crate) struct RefusalLogged(Arc<AtomicBool>);

impl RefusalLogged {
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

async fn record_request(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = dutgate_core::http::method_label(req.method()).to_string();
    let peer = access::peer_of(req.extensions());
    let logged = RefusalLogged::default();
    req.extensions_mut().insert(logged.clone());
    let response = next.run(req).await;
    let status = response.status();
    // s3s' own refusals (an unknown access key, a signature that does not match, a
    // malformed body) name neither the source nor the reason: every refusal is logged
    // with its source (docs/security.md, rule 8). A missing object is an answer, not a
    // refusal.
    if status.is_client_error() && !logged.is_set() {
        let peer = peer.map_or_else(|| "-".to_string(), |p| p.to_string());
        if status == StatusCode::NOT_FOUND {
            tracing::info!(%peer, %method, status = status.as_u16(), "S3 request answered not found");
        } else {
            tracing::warn!(%peer, %method, status = status.as_u16(), "S3 request refused by the S3 layer (signature, key or request body)");
        }
    }
    let labels = [
        ("method", method),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("s3_requests_total", &labels).increment(1);
    metrics::histogram!("s3_request_duration_seconds", &labels[..1])
        .record(start.elapsed().as_secs_f64());
    response
}

/// What `dutgate s3` serves when the gateway uses an external S3: only `/healthz` and a
/// clear error for anything else, so `dutgate up` has nothing to restart.
fn disabled_router(url: Option<String>) -> Router {
    let message = format!(
        "the embedded S3 endpoint is disabled: this gateway uses the external S3 at {}",
        url.unwrap_or_else(|| "(s3.url unset)".into())
    );
    let fallback = move || {
        let message = message.clone();
        async move { dutgate_core::ApiError::unavailable(message) }
    };
    with_shared_routes(Router::new().fallback(fallback), None)
}

/// Serves `router` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), ServiceError> {
    dutgate_core::http::serve(listener, router, shutdown, grace).await?;
    Ok(())
}

/// `dutgate s3`.
pub async fn run(ctx: ServiceContext, config: Config) -> Result<(), ServiceError> {
    crate::telemetry::describe();
    let gw = &ctx.gateway;
    let router = match config.backend {
        Backend::Embedded => {
            let embedded = build(gw, &config)
                .await
                .map_err(|e| ServiceError::Startup(e.to_string()))?;
            tracing::info!(
                data_dir = %config.data_dir(gw).display(),
                admin_keys = %keys::admin_keys_path(gw).display(),
                "embedded S3 endpoint ready"
            );
            embedded.router
        }
        Backend::External => {
            tracing::info!(url = ?config.url, "external S3 in use; the embedded endpoint is disabled");
            disabled_router(config.url.clone())
        }
    };
    let addr = SocketAddr::new(gw.bind_address, gw.ports.s3);
    let listener = dutgate_core::http::listener(addr).await?;
    let grace = Duration::from_secs_f64(gw.shutdown_grace_seconds.max(0.0));
    serve(listener, router, ctx.shutdown.clone(), grace).await
}
