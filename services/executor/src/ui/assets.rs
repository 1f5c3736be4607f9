//! The dashboard's static files, embedded in the binary: it serves them with no other file
//! and works offline. `ui/assets/` holds third-party files copied from npm by
//! `cargo xtask ui-assets` (from `ui/package-lock.json`); `ui/static/` the dashboard's own.

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// `(name, content type, bytes)`.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "xterm.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/assets/xterm.js"),
    ),
    (
        "xterm.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/assets/xterm.css"),
    ),
    (
        "xterm.LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../ui/assets/xterm.LICENSE"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../ui/static/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_bytes!("../../ui/static/dashboard.css"),
    ),
];

/// `GET /ui/assets/{name}` (anyone: nothing in them is secret).
pub async fn serve(Path(name): Path<String>) -> Response {
    let Some((_, ctype, bytes)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    let mut resp = (*bytes).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    // The files change only with the binary; an hour keeps page loads cheap.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}
