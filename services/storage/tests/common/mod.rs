//! Shared test set-up: the embedded endpoint on an ephemeral port, moto's S3 server, and
//! tarball builders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::config::GatewayConfig;
use dutgate_storage::keys::{self, KeyPair};
use dutgate_storage::sigv4::Signer;
use dutgate_storage::{Config, JobBucket, JobStorage, S3Client};
use tokio_util::sync::CancellationToken;

pub struct Embedded {
    pub url: String,
    pub state: tempfile::TempDir,
    pub gateway: GatewayConfig,
    pub config: Config,
    pub storage: JobStorage,
    pub admin: KeyPair,
    pub shutdown: CancellationToken,
    pub server: tokio::task::JoinHandle<()>,
}

impl Embedded {
    pub async fn start() -> Self {
        Self::start_in(tempfile::tempdir().unwrap()).await
    }

    /// Starts on a state dir (reused to test restarts).
    pub async fn start_in(state: tempfile::TempDir) -> Self {
        Self::start_with(state, |_| {}).await
    }

    /// Starts with a gateway config adjusted by `tweak` (e.g. other DUT networks).
    pub async fn start_with(
        state: tempfile::TempDir,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut gateway = GatewayConfig {
            state_dir: state.path().to_path_buf(),
            ..Default::default()
        };
        gateway.ports.s3 = port;
        tweak(&mut gateway);
        let config = Config {
            request_timeout_seconds: 10.0,
            ..Default::default()
        };
        let embedded = dutgate_storage::server::build(&gateway, &config)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let server = tokio::spawn(async move {
            dutgate_storage::server::serve(listener, embedded.router, stop, Duration::from_secs(1))
                .await
                .unwrap();
        });
        let storage = JobStorage::new(&gateway, &config).await.unwrap();
        let admin = keys::admin_keys(&gateway, &config).await.unwrap();
        Self {
            url: format!("http://127.0.0.1:{port}"),
            state,
            gateway,
            config,
            storage,
            admin,
            shutdown,
            server,
        }
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        let _ = self.server.await;
        self.state
    }

    /// A client that signs with a job's (DUT's) keys.
    pub fn dut_client(&self, bucket: &JobBucket) -> S3Client {
        client_with(&self.url, &bucket.access_key, bucket.secret_key.expose())
    }
}

pub fn client_with(url: &str, access_key: &str, secret_key: &str) -> S3Client {
    S3Client::new(
        url,
        Signer::new(access_key, secret_key, "us-east-1"),
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .unwrap()
}

/// A gzip-compressed tarball with the given files (path, contents, mode), plus a symlink
/// pointing outside (which must never be uploaded).
pub fn tarball(files: &[(&str, &[u8], u32)], gzip: bool) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_mtime(1_600_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        builder.append_data(&mut h, path, *data).unwrap();
    }
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    builder
        .append_link(&mut link, "passwd-link", "/etc/passwd")
        .unwrap();
    let raw = builder.into_inner().unwrap();
    if !gzip {
        return raw;
    }
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

/// moto's standalone S3 server from `target/test-venv` (installed by `cargo xtask test` from
/// `services/storage/tests/requirements.txt`).
pub struct Moto {
    pub url: String,
    child: Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("DUTGATE_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-venv"));
    venv.join("bin").join(name)
}

impl Moto {
    /// Starts moto on a port it picks itself (`-p 0`: nobody else can take the port between
    /// choosing and binding it), reads the port from its start-up line, and answers once
    /// moto has served a real S3 request (ListBuckets), within 30 s.
    pub async fn start() -> Self {
        let bin = venv_bin("moto_server");
        assert!(
            bin.exists(),
            "{} is missing: run `cargo xtask test`, or `python3 -m venv target/test-venv && \
             target/test-venv/bin/pip install -r services/storage/tests/requirements.txt`",
            bin.display()
        );
        let mut child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (port_tx, port_rx) = tokio::sync::oneshot::channel::<u16>();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen_by_reader = seen.clone();
        // Werkzeug writes its start-up line and then one line per request to stderr: the
        // reader keeps draining it so that moto never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut port_tx = Some(port_tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = started_on(&line)
                    && let Some(tx) = port_tx.take()
                {
                    let _ = tx.send(port);
                }
                let mut seen = seen_by_reader.lock().unwrap();
                if seen.len() < 50 {
                    seen.push(line);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = match tokio::time::timeout_at(deadline.into(), port_rx).await {
            Ok(Ok(port)) => port,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "moto_server reported no port within 30 s; it said: {:?}",
                    seen.lock().unwrap()
                );
            }
        };
        let url = format!("http://127.0.0.1:{port}");
        let moto = Self { url, child };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        loop {
            // Any S3 answer (moto answers ListBuckets without checking signatures) means
            // the server is up, not merely that something accepted a TCP connection.
            match http.get(format!("{}/", moto.url)).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(_) | Err(_) => {}
            }
            assert!(
                Instant::now() < deadline,
                "moto_server on {} did not answer within 30 s; it said: {:?}",
                moto.url,
                seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        moto
    }
}

/// The port of werkzeug's ` * Running on http://127.0.0.1:PORT` line.
fn started_on(line: &str) -> Option<u16> {
    let rest = line.split("Running on http://").nth(1)?;
    let port: String = rest
        .rsplit(':')
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    port.parse().ok().filter(|p| *p != 0)
}

/// An answer to [`Raw::send`]: the status and the whole body (S3 errors are short XML).
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request written byte for byte on a TCP socket, so that paths reach the
/// server exactly as an attacker sends them (an HTTP client library would normalise
/// `..` and `%2e%2e` away before sending).
pub struct Raw<'a> {
    pub method: &'a str,
    /// As sent on the request line (may hold `..`, `%2e`, …).
    pub path: &'a str,
    /// The query pairs, raw; sent encoded and sorted.
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Connect from this address (a DUT's).
    pub local: Option<std::net::IpAddr>,
}

impl<'a> Raw<'a> {
    pub fn new(method: &'a str, path: &'a str) -> Self {
        Self {
            method,
            path,
            query: Vec::new(),
            headers: Vec::new(),
            body: Vec::new(),
            local: None,
        }
    }

    pub fn query(mut self, k: &str, v: &str) -> Self {
        self.query.push((k.into(), v.into()));
        self
    }

    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_ascii_lowercase(), v.into()));
        self
    }

    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }

    pub fn from(mut self, local: std::net::IpAddr) -> Self {
        self.local = Some(local);
        self
    }

    /// Signs with SigV4 as of `now` (the path is signed as the server decodes it) and
    /// sends.
    pub async fn signed(
        mut self,
        url: &str,
        access_key: &str,
        secret_key: &str,
        now: time::OffsetDateTime,
    ) -> RawResponse {
        use dutgate_storage::sigv4::{RequestParts, sha256_hex};
        let host = url.trim_start_matches("http://").to_string();
        let decoded = dutgate_storage::server::paths::percent_decode(self.path);
        let hash = sha256_hex(&self.body);
        let signed = Signer::new(access_key, secret_key, "us-east-1").sign(
            &RequestParts {
                method: self.method,
                host: &host,
                path: &decoded,
                query: &self.query,
                headers: &self.headers,
                payload_hash: &hash,
            },
            now,
        );
        self.headers
            .push(("authorization".into(), signed.authorization));
        self.headers.push(("x-amz-date".into(), signed.amz_date));
        self.headers
            .push(("x-amz-content-sha256".into(), signed.content_sha256));
        self.send(url).await
    }

    pub async fn send(self, url: &str) -> RawResponse {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = url.trim_start_matches("http://").to_string();
        let addr: std::net::SocketAddr = host.parse().unwrap();
        let query = dutgate_storage::sigv4::canonical_query(&self.query);
        let target = if query.is_empty() {
            self.path.to_string()
        } else {
            format!("{}?{query}", self.path)
        };
        let mut head = format!(
            "{} {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\ncontent-length: {}\r\n",
            self.method,
            self.body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let io = async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            if let Some(local) = self.local {
                socket.bind(std::net::SocketAddr::new(local, 0)).unwrap();
            }
            let mut stream = socket.connect(addr).await.unwrap();
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&self.body).await.unwrap();
            let mut out = Vec::new();
            stream.read_to_end(&mut out).await.unwrap();
            out
        };
        let out = tokio::time::timeout(Duration::from_secs(10), io)
            .await
            .expect("the endpoint answered within 10 s");
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        RawResponse { status, body }
    }
}

/// Every object of a bucket with its bytes, read with the admin key, in key order.
pub async fn snapshot(storage: &JobStorage, bucket: &str) -> Vec<(String, Vec<u8>)> {
    use futures::TryStreamExt;
    let mut out = Vec::new();
    for o in storage.list(bucket).await.unwrap() {
        let chunks: Vec<bytes::Bytes> = storage
            .get(bucket, &o.key)
            .await
            .unwrap()
            .into_stream()
            .try_collect()
            .await
            .unwrap();
        out.push((o.key, chunks.concat()));
    }
    out
}
