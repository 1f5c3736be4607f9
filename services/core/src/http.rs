//! The HTTP bootstrap every service uses: `/healthz`, `/metrics`, request tracing and
//! metrics, JSON 404s, systemd socket activation and readiness, bounded graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;
use crate::telemetry::metrics_handle;

pub type HealthFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// A cheap readiness probe (e.g. a database ping) run by `/healthz`.
pub type HealthCheck = Arc<dyn Fn() -> HealthFuture + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("socket activation: {0}")]
    Activation(std::io::Error),
    #[error("server: {0}")]
    Serve(std::io::Error),
}

#[derive(Clone)]
struct HealthState {
    service: &'static str,
    check: Option<HealthCheck>,
}

/// Wraps a service's routes with the shared endpoints and layers.
pub fn with_common_routes(
    service: &'static str,
    router: Router,
    health: Option<HealthCheck>,
) -> Router {
    let health_state = HealthState {
        service,
        check: health,
    };
    router
        .route("/healthz", get(healthz).with_state(health_state))
        .route("/metrics", get(metrics_endpoint))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(service, record_request))
        .layer(TraceLayer::new_for_http())
}

async fn healthz(State(h): State<HealthState>) -> Response {
    let check = match &h.check {
        Some(c) => tokio::time::timeout(Duration::from_secs(2), c()).await,
        None => Ok(Ok(())),
    };
    match check {
        Ok(Ok(())) => (
            StatusCode::OK,
            axum::Json(json!({"status": "ok", "service": h.service})),
        )
            .into_response(),
        Ok(Err(e)) => {
            ApiError::unavailable(format!("{} unhealthy: {e}", h.service)).into_response()
        }
        Err(_) => {
            ApiError::unavailable(format!("{} health check timed out", h.service)).into_response()
        }
    }
}

async fn metrics_endpoint() -> Response {
    match metrics_handle() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => {
            ApiError::unavailable("metrics recorder not installed in this process").into_response()
        }
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn record_request(State(service): State<&'static str>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = method_label(req.method()).to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "-".to_string(), |c| c.0.to_string());
    let response = next.run(req).await;
    // Every refusal is logged with its source (docs/security.md, rule 8), also those no
    // handler sees (a missing token, a malformed or oversized body, a made-up id). The
    // route template is logged, not the path, which is the caller's text.
    let code = response.status();
    if code == StatusCode::NOT_FOUND {
        tracing::info!(service, %method, %route, status = code.as_u16(), %peer, "request answered not found");
    } else if code.is_client_error() {
        tracing::warn!(service, %method, %route, status = code.as_u16(), %peer, "request refused");
    }
    let status = code.as_u16().to_string();
    let labels = [
        ("service", service.to_string()),
        ("method", method),
        ("route", route),
        ("status", status),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels[..3])
        .record(start.elapsed().as_secs_f64());
    response
}

/// A request method as a metric label: the standard ones by name, anything else `other`, so
/// that a client making up methods cannot create series without end.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Takes the socket systemd handed over (LISTEN_FDS) or binds `addr`.
pub async fn listener(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    let mut fds = listenfd::ListenFd::from_env();
    if let Some(std_listener) = fds.take_tcp_listener(0).map_err(HttpError::Activation)? {
        std_listener
            .set_nonblocking(true)
            .map_err(HttpError::Activation)?;
        tracing::info!("using the socket handed over by systemd");
        return TcpListener::from_std(std_listener).map_err(HttpError::Activation);
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves `router` (already wrapped by [`with_common_routes`]) until `shutdown` is cancelled,
/// then lets in-flight requests finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), HttpError> {
    let local = listener.local_addr().ok();
    let _ = metrics_handle();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(addr = ?local, "listening");
    let stop = shutdown.clone();
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await });
    let deadline = async {
        shutdown.cancelled().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = server => r.map_err(HttpError::Serve),
        _ = deadline => {
            tracing::warn!("requests still running after the grace period; closing them");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn healthz_metrics_and_json_404() {
        let app = with_common_routes("test", Router::new(), None);
        let r = app
            .clone()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = app
            .clone()
            .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("/nope"));
        let r = app
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn failing_health_check_is_503() {
        let check: HealthCheck = Arc::new(|| Box::pin(async { Err("db down".to_string()) }));
        let app = with_common_routes("test", Router::new(), Some(check));
        let r = app
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}

/// RFC 3986's unreserved characters; everything else in a component is percent-encoded.
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one URL path segment or query value: the workspace's one encoder.
pub fn encode_component(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, COMPONENT).to_string()
}

/// Decodes `%XX` escapes; `None` when the result is not UTF-8. Malformed escapes are kept as
/// they are (as browsers and curl do).
pub fn decode_component(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

#[cfg(test)]
mod component_tests {
    use super::*;

    #[test]
    fn encode_and_decode_round_trip() {
        assert_eq!(encode_component("a b/c~d_e.f-g%"), "a%20b%2Fc~d_e.f-g%25");
        assert_eq!(encode_component("52:54:00"), "52%3A54%3A00");
        assert_eq!(decode_component("a%20b%2Fc%41").as_deref(), Some("a b/cA"));
        assert_eq!(decode_component("%ff"), None);
        assert_eq!(decode_component("100%").as_deref(), Some("100%"));
    }
}
