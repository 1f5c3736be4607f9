//! A local upstream HTTP server for the cache tests: serves byte blobs by path, counts what
//! it is asked, answers conditional requests, and can hold, truncate or stop on demand.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// How a resource is sent.
#[derive(Clone)]
pub enum Mode {
    Normal,
    /// Send `first` bytes, then wait until the gate opens, then the rest.
    Hold {
        first: usize,
        gate: watch::Receiver<bool>,
    },
    /// Announce the full length but send only `send` bytes, then drop the connection.
    Truncate {
        send: usize,
    },
    /// Answer 500.
    Fail,
    /// Answer 302 to this location.
    Redirect(String),
    /// Send the body without a Content-Length (chunked).
    Chunked,
}

#[derive(Clone)]
struct Resource {
    data: Bytes,
    etag: String,
    mode: Mode,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct Counts {
    /// GETs answered with a body (200).
    pub gets: u64,
    /// Conditional GETs answered 304.
    pub not_modified: u64,
    /// Requests that carried If-None-Match or If-Modified-Since.
    pub conditional: u64,
}

#[derive(Clone, Default)]
struct Shared {
    /// Set by `stop`: a request on a connection that outlives the listener gets a 503.
    down: Arc<std::sync::atomic::AtomicBool>,
    resources: Arc<Mutex<HashMap<String, Resource>>>,
    counts: Arc<Mutex<HashMap<String, Counts>>>,
}

pub struct Upstream {
    pub addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

impl Upstream {
    pub async fn start(resources: Vec<(String, Bytes)>) -> Self {
        let shared = Shared::default();
        for (path, data) in resources {
            shared.resources.lock().unwrap().insert(
                path,
                Resource {
                    etag: format!("\"{}\"", &sha256_hex(&data)[..16]),
                    data,
                    mode: Mode::Normal,
                },
            );
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Self { addr, shared, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `gw` with exactly this server added to `gateway.outbound.allow` (it is on loopback,
    /// which the outbound policy refuses otherwise).
    pub fn allowed(
        &self,
        mut gw: dutgate_core::config::GatewayConfig,
    ) -> dutgate_core::config::GatewayConfig {
        gw.outbound
            .allow
            .push(dutgate_core::outbound::AllowRule::exact(self.addr));
        gw
    }

    pub fn set_mode(&self, path: &str, mode: Mode) {
        if let Some(r) = self.shared.resources.lock().unwrap().get_mut(path) {
            r.mode = mode;
        }
    }

    pub fn set_data(&self, path: &str, data: Bytes) {
        self.shared.resources.lock().unwrap().insert(
            path.to_string(),
            Resource {
                etag: format!("\"{}\"", &sha256_hex(&data)[..16]),
                data,
                mode: Mode::Normal,
            },
        );
    }

    pub fn counts(&self, path: &str) -> Counts {
        self.shared
            .counts
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or_default()
    }

    pub fn gets(&self, path: &str) -> u64 {
        self.counts(path).gets
    }

    /// Stops listening: later requests are refused (or answered 503 on a kept-alive
    /// connection that is still open).
    pub fn stop(&self) {
        self.shared
            .down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.cancel();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(
    axum::extract::State(shared): axum::extract::State<Shared>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if shared.down.load(std::sync::atomic::Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let path = uri.path().to_string();
    let Some(res) = shared.resources.lock().unwrap().get(&path).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let conditional = headers.contains_key(header::IF_NONE_MATCH)
        || headers.contains_key(header::IF_MODIFIED_SINCE);
    let mut counts = shared.counts.lock().unwrap();
    let c = counts.entry(path).or_default();
    if conditional {
        c.conditional += 1;
    }
    if matches!(res.mode, Mode::Fail) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    if let Mode::Redirect(to) = &res.mode {
        c.gets += 1;
        return (StatusCode::FOUND, [(header::LOCATION, to.clone())]).into_response();
    }
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == res.etag.as_bytes())
    {
        c.not_modified += 1;
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, res.etag)]).into_response();
    }
    c.gets += 1;
    drop(counts);
    let len = res.data.len();
    let data = res.data.clone();
    let body = match res.mode {
        Mode::Normal | Mode::Fail | Mode::Redirect(_) => Body::from(data),
        Mode::Chunked => {
            let chunks: Vec<Result<Bytes, std::io::Error>> = data
                .chunks(64 * 1024)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect();
            return (
                StatusCode::OK,
                [(header::ETAG, res.etag)],
                Body::from_stream(futures::stream::iter(chunks)),
            )
                .into_response();
        }
        Mode::Hold { first, gate } => {
            let head = data.slice(..first.min(len));
            let tail = data.slice(first.min(len)..);
            let stream = futures::stream::unfold(0u8, move |step| {
                let head = head.clone();
                let tail = tail.clone();
                let mut gate = gate.clone();
                async move {
                    match step {
                        0 => Some((Ok::<Bytes, std::io::Error>(head), 1)),
                        1 => {
                            while !*gate.borrow_and_update() {
                                if gate.changed().await.is_err() {
                                    break;
                                }
                            }
                            Some((Ok(tail), 2))
                        }
                        _ => None,
                    }
                }
            });
            Body::from_stream(stream)
        }
        Mode::Truncate { send } => {
            let part = data.slice(..send.min(len));
            let stream = futures::stream::iter(vec![
                Ok::<Bytes, std::io::Error>(part),
                Err(std::io::Error::other("cut on purpose")),
            ]);
            Body::from_stream(stream)
        }
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_LENGTH, len.to_string()),
            (header::ETAG, res.etag),
        ],
        body,
    )
        .into_response()
}

/// A client that may set and clear boot configs: users may not, any more (the admin token
/// here; job processes present their machine's lease, the gateway's actors the service role).
pub fn writer(svc: &dutgate_boot::testing::TestBoot) -> dutgate_boot::client::BootClient {
    dutgate_boot::client::BootClient::new(
        svc.url(),
        Some(dutgate_core::Secret::new(
            dutgate_boot::testing::ADMIN_TOKEN,
        )),
    )
}
