//! The DUT image (`dutgate dut-image`: `vmlinuz`, `initramfs.cpio`) at stable URLs of this
//! service, `<public URL>/dut-image/<file>`: what the registration default, the trainer's
//! jobs and users' jobs boot, with no other server on the gateway.
//!
//! Only the fixed file names are ever looked up, so no request path reaches the file system.
//! The routes answer the DUT networks and the gateway's service and admin tokens (checks),
//! like boot scripts; the image holds no secret (kernel, busybox, the two agents).

use std::path::{Path, PathBuf};
use std::time::Instant;

use axum::extract::{ConnectInfo, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dutgate_core::auth::{Auth, Role};
use dutgate_core::config::GatewayConfig;
use dutgate_core::{ApiError, ServiceName};

use crate::cache::serve::{FileAnswer, FileBody, file_response};
use crate::config::Config;

/// The files of the image a DUT may fetch (`image.json`, the build record, stays private).
pub const FILES: [&str; 2] = ["vmlinuz", "initramfs.cpio"];
/// The route prefix, below the service's base URL (the route in `api` spells it out).
pub const PATH: &str = "/dut-image";
/// The command that builds the image, named in answers about a missing one.
pub const BUILD_COMMAND: &str = "dutgate dut-image";

/// Where the image lives: `boot.dut_image_dir`, else `<state_dir>/dut-image`.
pub fn dir(config: &Config, gateway: &GatewayConfig) -> PathBuf {
    config
        .dut_image_dir
        .clone()
        .unwrap_or_else(|| gateway.state_dir.join("dut-image"))
}

/// The base URL DUTs reach this service at: `boot.public_url`, else
/// `http://<gateway.public_host>:<ports.boot>`.
pub fn public_base(config: &Config, gateway: &GatewayConfig) -> String {
    match &config.public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => gateway.public_url(ServiceName::Boot),
    }
}

/// The stable URL of one image file (`file` is one of [`FILES`]), e.g.
/// `http://10.42.0.1:8003/dut-image/vmlinuz`.
pub fn url(config: &Config, gateway: &GatewayConfig, file: &str) -> String {
    format!("{}{PATH}/{file}", public_base(config, gateway))
}

/// Middleware of the image routes: a peer on a DUT network, or a service or admin token.
pub async fn dut_network_or_service(
    State(auth): State<Auth>,
    req: Request,
    next: Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let privileged = req.headers().contains_key(header::AUTHORIZATION)
        && auth.check(req.headers(), Role::Service).is_ok();
    if privileged || peer.is_some_and(|ip| auth.is_dut_address(ip)) {
        return next.run(req).await;
    }
    tracing::warn!(peer = ?peer, path = %req.uri().path(), "DUT image refused: not from a DUT network and no service token");
    metrics::counter!("boot_dut_image_requests_total", "result" => "refused").increment(1);
    ApiError::forbidden(
        "the DUT image is only served to the DUT networks (gateway.auth.dut_networks) \
         and to service or admin tokens",
    )
    .into_response()
}

/// The DUT image built by `dutgate dut-image` (DUT networks, service or admin tokens).
///
/// Stable URLs of the files in `boot.dut_image_dir` (default `<state_dir>/dut-image`), which
/// the registration default, the trainer's jobs and users' jobs boot. Supports
/// `Range`/`If-Range`, `If-None-Match` and `If-Modified-Since`; 404 names `dutgate dut-image`
/// when the image is not built.
#[utoipa::path(get, path = "/dut-image/{file}", tag = "boot", operation_id = "dut_image",
    params(("file" = String, Path, description = "`vmlinuz` or `initramfs.cpio`.")),
    responses((status = 200, description = "The file (`ETag`, `Last-Modified`).", content_type = "application/octet-stream"),
        (status = 206, description = "The requested range.", content_type = "application/octet-stream"),
        (status = 304, description = "Not modified."), (status = 416, description = "The range is not satisfiable.")))]
pub async fn serve(
    State(dir): State<PathBuf>,
    UrlPath(file): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let Some(name) = FILES.iter().find(|f| **f == file) else {
        metrics::counter!("boot_dut_image_requests_total", "result" => "unknown_file").increment(1);
        return ApiError::not_found(format!(
            "the DUT image has no file {:?}: it has {}",
            crate::ipxe::sanitize_echo(&file),
            FILES.join(" and ")
        ))
        .with_field("file")
        .into_response();
    };
    let response = match open(&dir, name).await {
        Ok((f, size, modified)) => {
            let etag = etag(size, modified);
            file_response(
                FileAnswer {
                    body: FileBody::Open(f, dir.join(name)),
                    size,
                    etag: &etag,
                    last_modified: modified,
                    cache_status: None,
                },
                &headers,
            )
            .await
        }
        Err(OpenError::Missing(path)) => {
            tracing::warn!(file = name, path = %path.display(), "DUT image asked for but not built");
            metrics::counter!("boot_dut_image_requests_total", "result" => "missing").increment(1);
            return ApiError::not_found(format!(
                "the DUT image is not built ({} is missing): run `{BUILD_COMMAND}` on the gateway",
                path.display()
            ))
            .into_response();
        }
        Err(OpenError::Io(path, e)) => {
            tracing::error!(file = name, path = %path.display(), error = %e, "cannot open the DUT image");
            metrics::counter!("boot_dut_image_requests_total", "result" => "error").increment(1);
            return ApiError::internal(format!("{}: {e}", path.display())).into_response();
        }
    };
    let status = response.status();
    tracing::info!(
        file = name,
        status = status.as_u16(),
        range = headers.contains_key(header::RANGE),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "DUT image file served"
    );
    let result = match status {
        StatusCode::OK => "ok",
        StatusCode::PARTIAL_CONTENT => "partial",
        StatusCode::NOT_MODIFIED => "not_modified",
        _ => "other",
    };
    metrics::counter!("boot_dut_image_requests_total", "result" => result).increment(1);
    response
}

enum OpenError {
    Missing(PathBuf),
    Io(PathBuf, std::io::Error),
}

/// Opens `dir/name` and reads its size and modification time from the open file, so that a
/// rebuild (`dutgate dut-image` renames new files into place) cannot mix two versions.
async fn open(
    dir: &Path,
    name: &str,
) -> Result<(tokio::fs::File, u64, Option<std::time::SystemTime>), OpenError> {
    let path = dir.join(name);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(OpenError::Missing(path));
        }
        Err(e) => return Err(OpenError::Io(path, e)),
    };
    let meta = file
        .metadata()
        .await
        .map_err(|e| OpenError::Io(path.clone(), e))?;
    if !meta.is_file() {
        return Err(OpenError::Io(
            path,
            std::io::Error::other("not a regular file"),
        ));
    }
    Ok((file, meta.len(), meta.modified().ok()))
}

/// Same form as the cache's ETag of `file://` artifacts: size and modification time.
fn etag(size: u64, modified: Option<std::time::SystemTime>) -> String {
    let mtime = modified
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("\"f-{size:x}-{mtime:x}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_the_public_url() {
        let mut gw = GatewayConfig {
            public_host: "10.42.0.1".into(),
            ..GatewayConfig::default()
        };
        gw.ports.boot = 8003;
        let mut c = Config::default();
        assert_eq!(
            url(&c, &gw, "vmlinuz"),
            "http://10.42.0.1:8003/dut-image/vmlinuz"
        );
        c.public_url = Some("http://gw.lan:80/".into());
        assert_eq!(
            url(&c, &gw, "initramfs.cpio"),
            "http://gw.lan:80/dut-image/initramfs.cpio"
        );
        assert_eq!(
            dir(&c, &gw),
            GatewayConfig::default().state_dir.join("dut-image")
        );
    }
}
