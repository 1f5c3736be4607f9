//! A mars served on 127.0.0.1:0 over a test database, with in-memory PDU ports.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_core::db::testing::TestDb;
use dutgate_core::{MachineId, Secret};
use dutgate_mars::Config;
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::{MachineState, Registration};
use dutgate_mars::power::MemoryPower;
use dutgate_mars::store::Store;
use dutgate_mars::training::JobRunner;
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "admin-token";
pub const USER: &str = "user-token";

pub struct TestMars {
    pub url: String,
    /// Admin client.
    pub admin: MarsClient,
    /// No token: what a DUT uses.
    pub anon: MarsClient,
    pub user: MarsClient,
    pub mars: Mars,
    pub power: Arc<MemoryPower>,
    pub shutdown: CancellationToken,
    pub db: TestDb,
}

pub struct Options {
    pub config: Config,
    pub runner: Option<Arc<dyn JobRunner>>,
    /// false: 127.0.0.1 is not a DUT network (registration needs a token).
    pub loopback_is_dut: bool,
    /// The PDU ports mars switches; unset: fresh ones.
    pub power: Option<Arc<MemoryPower>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config: Config::default(),
            runner: None,
            loopback_is_dut: true,
            power: None,
        }
    }
}

pub async fn start(db: TestDb, opts: Options) -> TestMars {
    start_with_runner_factory(db, opts, |_| None).await
}

/// `factory` gets the URL of the server (so a fake executor can lease through the real API)
/// and returns the runner the trainer uses.
pub async fn start_with_runner_factory(
    db: TestDb,
    mut opts: Options,
    factory: impl FnOnce(&str) -> Option<Arc<dyn JobRunner>>,
) -> TestMars {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    if let Some(r) = factory(&url) {
        opts.runner = Some(r);
    }
    let store = Store::new(db.db.clone(), "farm");
    let power = opts.power.clone().unwrap_or_default();
    let mut mars = Mars::new(store, opts.config, power.clone());
    mars.runner = opts.runner;
    let nets = if opts.loopback_is_dut {
        dutgate_core::config::default_dut_networks()
    } else {
        Vec::new()
    };
    let auth = Auth::new(Some(Secret::new(ADMIN)), Some(Secret::new(USER)), nets);
    let shutdown = CancellationToken::new();
    let router = dutgate_mars::start(mars.clone(), auth, shutdown.clone()).unwrap();
    let app = dutgate_core::http::with_common_routes("mars", router, None);
    let token = shutdown.clone();
    tokio::spawn(async move {
        let _ = dutgate_core::http::serve(listener, app, token, Duration::from_millis(200)).await;
    });
    TestMars {
        admin: MarsClient::new(&url, Some(Secret::new(ADMIN))),
        anon: MarsClient::new(&url, None),
        user: MarsClient::new(&url, Some(Secret::new(USER))),
        url,
        mars,
        power,
        shutdown,
        db,
    }
}

impl TestMars {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.db.cleanup().await;
    }

    /// Waits (bounded) until the machine is in `state`.
    pub async fn wait_state(&self, id: MachineId, state: MachineState, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = self.admin.machine(id).await.unwrap();
            if m.state == state {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let ev = self.admin.machine_events(id, None).await.unwrap();
                panic!(
                    "machine {id} is {} after {within:?}, expected {state}; events: {:#?}",
                    m.state, ev.events
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn mac(n: u8) -> MachineId {
    MachineId::from_bytes([0x52, 0x54, 0x00, 0x00, 0x00, n])
}

pub fn registration(n: u8) -> Registration {
    Registration {
        base_name: "virtio".into(),
        tags: vec![
            "virtio:family:VIRTIO".parse().unwrap(),
            format!("cpu:cores:{n}").parse().unwrap(),
        ],
        mac_address: mac(n),
        ip_address: format!("10.0.2.{}", 10 + n).parse().unwrap(),
        local_tty_device: Some("ttyS0".into()),
    }
}

/// Registers machine `n`, gives it a PDU port and marks it trained and IDLE (through the
/// state machine, as the trainer would).
pub async fn idle_machine(t: &TestMars, n: u8) -> MachineId {
    use dutgate_mars::model::MachinePatch;
    use dutgate_mars::state::Trigger;
    use dutgate_mars::store::Cause;
    let id = t.anon.register(&registration(n)).await.unwrap().id;
    t.admin
        .patch(
            id,
            &MachinePatch {
                pdu: Some(Some("pdu1".into())),
                pdu_port_id: Some(Some(n.to_string())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    t.mars
        .store
        .trigger(
            id,
            Trigger::TrainingPassed,
            &Cause::new("test", "trained"),
            &|r| r.trained_at = Some(dutgate_mars::model::Timestamp::now()),
        )
        .await
        .unwrap();
    id
}
