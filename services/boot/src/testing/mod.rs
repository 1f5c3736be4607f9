//! Test support other crates may use too: the boot service in-process on an ephemeral port,
//! and a tiny initramfs builder for QEMU DUTs.

pub mod initramfs;

use std::net::SocketAddr;
use std::path::Path;

use dutgate_core::config::GatewayConfig;
use dutgate_core::{Secret, ServiceContext, ServiceName};
use tokio_util::sync::CancellationToken;

use crate::cache::ArtifactCache;
use crate::client::BootClient;
use crate::{BootService, Config};

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const USER_TOKEN: &str = "test-user-token";

/// A gateway config for tests: state under `state_dir`, known tokens, loopback DUT network.
pub fn gateway(state_dir: &Path) -> GatewayConfig {
    let mut gw = GatewayConfig {
        state_dir: state_dir.to_path_buf(),
        ..GatewayConfig::default()
    };
    gw.auth.admin_token = Some(Secret::new(ADMIN_TOKEN));
    gw.auth.user_token = Some(Secret::new(USER_TOKEN));
    gw
}

/// A running in-process boot service. Stops when dropped.
pub struct TestBoot {
    pub addr: SocketAddr,
    pub cache: ArtifactCache,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestBoot {
    /// Opens the service with `gateway` and `config` and serves it on 127.0.0.1:0.
    pub async fn start(gateway: GatewayConfig, config: Config) -> Self {
        let shutdown = CancellationToken::new();
        let ctx = ServiceContext::new(ServiceName::Boot, gateway, shutdown.clone());
        let service = BootService::open(&ctx, config)
            .await
            .unwrap_or_else(|e| panic!("boot service did not open: {e}"));
        let cache = service.cache().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = service.serve(listener, stop).await {
                tracing::error!(error = %e, "test boot service ended");
            }
        });
        Self {
            addr,
            cache,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client with the user token.
    pub fn client(&self) -> BootClient {
        BootClient::new(self.url(), Some(Secret::new(USER_TOKEN)))
    }

    /// Stops serving and waits until the index is written.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestBoot {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
