//! Shared set-up of the in-process service tests.
#![allow(dead_code)]

use std::time::Duration;

use dutgate_core::Secret;
use dutgate_core::auth::Auth;
use dutgate_core::db::Db;
use dutgate_pdu::store::{MIGRATIONS, Store};
use dutgate_pdu::{Config, PduClient, Running};

pub const ADMIN: &str = "admin-token";

/// A fresh SQLite database in a temp dir (kept alive by the returned guard).
pub async fn sqlite() -> (Db, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(&dir.path().join("pdu.db"), MIGRATIONS)
        .await
        .unwrap();
    (db, dir)
}

/// Fast timings so that tests do not wait on defaults meant for real hardware.
pub fn fast_config() -> Config {
    Config {
        poll_interval_seconds: 0.2,
        operation_timeout_seconds: 2.0,
        retries: 1,
        retry_backoff_ms: 20,
        settle_timeout_seconds: 2.0,
        readback_interval_ms: 20,
        verify_interval_ms: 50,
        default_off_seconds: 0.2,
        ..Config::default()
    }
}

pub fn pdus(yaml: &str) -> std::collections::BTreeMap<String, dutgate_pdu::PduSpec> {
    yaml_serde::from_str(yaml).unwrap()
}

pub async fn start(db: &Db, config: Config) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let auth = Auth::new(Some(Secret::new(ADMIN)), None, vec![]);
    dutgate_pdu::start_on(listener, Store::new(db.clone()), config, auth)
        .await
        .unwrap()
}

pub fn admin(r: &Running) -> PduClient {
    PduClient::new(r.url(), Some(Secret::new(ADMIN)))
}

pub fn anonymous(r: &Running) -> PduClient {
    PduClient::new(r.url(), None)
}

/// Waits until `f` holds (polling), failing the test after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}
