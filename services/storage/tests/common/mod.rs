//! Shared test set-up: the embedded endpoint on an ephemeral port, moto's S3 server, and
//! tarball builders.
#![allow(dead_code)]

use std::net::TcpListener as StdListener;
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
    pub fn start() -> Self {
        let bin = venv_bin("moto_server");
        assert!(
            bin.exists(),
            "{} is missing: run `cargo xtask test`, or `python3 -m venv target/test-venv && \
             target/test-venv/bin/pip install -r services/storage/tests/requirements.txt`",
            bin.display()
        );
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto_server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { url, child }
    }
}
