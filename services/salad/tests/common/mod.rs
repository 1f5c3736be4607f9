//! Test support: salad in-process on ephemeral ports with a real mars beside it (salad asks
//! mars whether a machine may speak and who holds its lease), socat pty pairs as serial
//! adapters, and console clients that check what they receive.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use dutgate_core::config::GatewayConfig;
use dutgate_core::{MachineId, Secret, ServiceContext, ServiceName};
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::Registration;
use dutgate_salad::client::{MachineConsole, SaladClient};
use dutgate_salad::config::{PortRange, SerialPortSpec};
use dutgate_salad::{Config, Listeners, SaladHandle};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "test-admin-token";
pub const USER: &str = "test-user-token";
pub const WAIT: Duration = Duration::from_secs(20);

/// A console port range of its own for each salad a test process starts, so that parallel
/// tests (and a restarted salad) do not meet each other's ports.
pub fn port_range(size: u16) -> PortRange {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    static BASE: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    // Below the Linux ephemeral range (32768+), where outgoing connections take ports.
    let base = *BASE.get_or_init(|| (rand::random::<u16>() % 40) * 500);
    let slot = NEXT.fetch_add(1, Ordering::Relaxed);
    let first = 10_000 + (base + slot * 500) % 20_000;
    PortRange {
        first,
        last: first + size - 1,
    }
}

/// A real mars (SQLite, in-memory PDU ports) on 127.0.0.1:0.
pub struct TestMars {
    pub url: String,
    pub admin: MarsClient,
    /// No token, from loopback (a DUT network for this mars): what a DUT uses to register.
    pub anon: MarsClient,
    pub mars: Mars,
    shutdown: CancellationToken,
}

impl TestMars {
    pub async fn start(dir: &Path) -> TestMars {
        std::fs::create_dir_all(dir).unwrap();
        let db = dutgate_core::db::Db::open_sqlite(
            &dir.join("mars.db"),
            dutgate_mars::store::MIGRATIONS,
        )
        .await
        .expect("mars database");
        let store = dutgate_mars::store::Store::new(db, "farm");
        let mut config = dutgate_mars::Config::default();
        config.training.enabled = false;
        let mars = Mars::new(
            store,
            config,
            Arc::new(dutgate_mars::power::MemoryPower::default()),
        );
        let auth = dutgate_core::auth::Auth::new(
            Some(Secret::new(ADMIN)),
            Some(Secret::new(USER)),
            dutgate_core::config::default_dut_networks(),
        );
        let shutdown = CancellationToken::new();
        let router = dutgate_mars::start(mars.clone(), auth, shutdown.clone()).unwrap();
        let app = dutgate_core::http::with_common_routes("mars", router, None);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ =
                dutgate_core::http::serve(listener, app, stop, Duration::from_millis(200)).await;
        });
        TestMars {
            admin: MarsClient::new(&url, Some(Secret::new(ADMIN))),
            anon: MarsClient::new(&url, None),
            url,
            mars,
            shutdown,
        }
    }

    /// Registers machine `id` at `ip`: it is then `WAIT_FOR_CONFIG` (its registration boot).
    pub async fn register(&self, id: MachineId, ip: &str) {
        self.anon
            .register(&Registration {
                base_name: "virtio".into(),
                tags: vec!["virtio:family:VIRTIO".parse().unwrap()],
                mac_address: id,
                ip_address: ip.parse().unwrap(),
                local_tty_device: Some("ttyS0".into()),
            })
            .await
            .expect("registration");
    }

    /// Registers `id`, trains it (through the state machine, as the trainer would) and leases
    /// it for a job: it is `RUNNING`. Returns the lease id.
    pub async fn running(&self, id: MachineId, ip: &str) -> String {
        use dutgate_mars::model::{LeasePurpose, MachinePatch};
        use dutgate_mars::state::Trigger;
        use dutgate_mars::store::Cause;
        self.register(id, ip).await;
        self.admin
            .patch(
                id,
                &MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some(id.to_string())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        self.mars
            .store
            .trigger(
                id,
                Trigger::TrainingPassed,
                &Cause::new("test", "trained"),
                &|r| r.trained_at = Some(dutgate_mars::model::Timestamp::now()),
            )
            .await
            .unwrap();
        self.admin
            .acquire(id, "job-1", "test", LeasePurpose::Job, None)
            .await
            .expect("lease")
            .id
    }
}

impl Drop for TestMars {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct Salad {
    pub handle: Option<SaladHandle>,
    pub state: PathBuf,
    pub config: Config,
    /// Admin token.
    pub client: SaladClient,
    pub mars: Arc<TestMars>,
    shutdown: CancellationToken,
}

pub fn test_config(adapters_glob: &str, range: PortRange) -> Config {
    Config {
        serial_ports: vec![SerialPortSpec::pattern(adapters_glob)],
        rescan_interval_ms: 100,
        console_ports: range,
        max_consoles: 100,
        max_unregistered_consoles: 100,
        ..Config::default()
    }
}

impl Salad {
    /// Salad with a mars of its own; loopback is a DUT network (the embedded default).
    pub async fn start(state: &Path, config: Config) -> Salad {
        let mars = Arc::new(TestMars::start(&state.join("mars")).await);
        Salad::start_with(
            state,
            config,
            mars,
            dutgate_core::config::default_dut_networks(),
        )
        .await
    }

    /// Salad using `mars`, with `dut_networks` as `gateway.auth.dut_networks`.
    pub async fn start_with(
        state: &Path,
        mut config: Config,
        mars: Arc<TestMars>,
        dut_networks: Vec<ipnet::IpNet>,
    ) -> Salad {
        config.mars_url = Some(mars.url.clone());
        let gateway = GatewayConfig {
            state_dir: state.to_path_buf(),
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            auth: dutgate_core::config::AuthConfig {
                admin_token: Some(Secret::new(ADMIN)),
                user_token: Some(Secret::new(USER)),
                dut_networks,
            },
            ..GatewayConfig::default()
        };
        let shutdown = CancellationToken::new();
        let ctx = ServiceContext::new(ServiceName::Salad, gateway, shutdown.clone());
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let netconsole = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = dutgate_salad::start(
            ctx,
            config.clone(),
            Listeners {
                http,
                netconsole: Some(netconsole),
            },
        )
        .await
        .expect("salad starts");
        let client = SaladClient::new(
            format!("http://{}", handle.http_addr),
            Some(Secret::new(ADMIN)),
        );
        Salad {
            handle: Some(handle),
            state: state.to_path_buf(),
            config,
            client,
            mars,
            shutdown,
        }
    }

    /// A client with `token` (`None`: anonymous).
    pub fn client_with(&self, token: Option<&str>) -> SaladClient {
        SaladClient::new(
            format!("http://{}", self.handle().http_addr),
            token.map(Secret::new),
        )
    }

    pub fn handle(&self) -> &SaladHandle {
        self.handle.as_ref().expect("salad running")
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().await.expect("salad stops cleanly");
        }
    }

    /// Waits until the REST list shows `id`, returns its console.
    pub async fn wait_machine(&self, id: MachineId) -> MachineConsole {
        wait_for(&format!("machine {id} in the REST list"), || async {
            self.client
                .machines()
                .await
                .ok()
                .and_then(|l| l.machines.get(&id).cloned())
        })
        .await
    }

    /// Waits until salad has the serial port `path` open (bound to `machine`, if given).
    pub async fn wait_port(&self, path: &Path, machine: Option<MachineId>) {
        let name = path.to_str().unwrap().to_string();
        wait_for(&format!("serial port {name} open"), || async {
            let ports = self.client.ports().await.ok()?;
            ports
                .ports
                .iter()
                .find(|p| p.name == name && (machine.is_none() || p.machine == machine))
                .map(|_| ())
        })
        .await
    }

    pub async fn wait_port_closed(&self, path: &Path) {
        let name = path.to_str().unwrap().to_string();
        wait_for(&format!("serial port {name} closed"), || async {
            let ports = self.client.ports().await.ok()?;
            (!ports.ports.iter().any(|p| p.name == name)).then_some(())
        })
        .await
    }

    pub async fn connect(&self, port: u16) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }
}

impl Drop for Salad {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `f` until it returns `Some`, failing the test after [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A socat pty pair: `dut` is the DUT's end, `adapter` the end salad opens.
pub struct PtyPair {
    child: Option<Child>,
    pub dut: PathBuf,
    pub adapter: PathBuf,
}

impl PtyPair {
    pub async fn new(dut: PathBuf, adapter: PathBuf) -> PtyPair {
        let socat = dutgate_core::testing::require_program("socat", "socat");
        let child = Command::new(socat)
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", dut.display()))
            .arg(format!("pty,raw,echo=0,link={}", adapter.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("socat starts");
        let pair = PtyPair {
            child: Some(child),
            dut,
            adapter,
        };
        wait_for("socat's pty links", || async {
            (pair.dut.exists() && pair.adapter.exists()).then_some(())
        })
        .await;
        pair
    }

    /// The adapter's two ends in `dir`, named after `name`; salad's glob is `dir/*-adapter`.
    pub async fn in_dir(dir: &Path, name: &str) -> PtyPair {
        PtyPair::new(dir.join(name), dir.join(format!("{name}-adapter"))).await
    }

    /// Opens the DUT's end.
    pub fn open_dut(&self) -> SerialStream {
        tokio_serial::new(self.dut.to_str().unwrap(), 115_200)
            .open_native_async()
            .expect("DUT end of the pty opens")
    }

    /// Unplugs the adapter: socat ends (SIGTERM, so it removes its links) and both ptys close.
    pub async fn unplug(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
                unsafe {
                    libc::kill(pid as i32, libc::SIGTERM);
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            let _ = child.kill().await;
        }
        wait_for("socat's links removed", || async {
            (!self.dut.exists() && !self.adapter.exists()).then_some(())
        })
        .await;
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        if let Some(child) = &self.child
            && let Some(pid) = child.id()
        {
            // SAFETY: as in `unplug`; SIGTERM lets socat remove its links.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }
}

/// Reads from `r` until `needle` has been seen; returns everything read.
pub async fn read_until<R: AsyncRead + Unpin>(r: &mut R, needle: &[u8], what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let fut = async {
        loop {
            if got.windows(needle.len()).any(|w| w == needle) {
                return;
            }
            let n = r.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "{what}: stream ended before {:?} (got {:?})",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, fut).await.unwrap_or_else(|_| {
        panic!(
            "{what}: no {:?} within {WAIT:?}",
            String::from_utf8_lossy(needle)
        )
    });
    got
}

pub fn machine(n: u32) -> MachineId {
    let b = n.to_be_bytes();
    MachineId::from_bytes([0x52, 0x54, 0x00, b[1], b[2], b[3]])
}

/// A deterministic payload that a reader can check byte by byte.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64*: cheap, and every byte value occurs (no accidental markers needed).
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub const SYNC: &[u8] = b"\n--SYNC--\n";
pub const BEGIN: &[u8] = b"\n--BEGIN--\n";

/// Client side of a checked transfer: waits for SYNC (then reports being connected), then
/// collects `len` bytes after BEGIN. Returns the SHA-256 of what came after BEGIN.
pub async fn checked_reader(
    mut sock: TcpStream,
    len: usize,
    synced: tokio::sync::oneshot::Sender<()>,
) -> [u8; 32] {
    let mut got = read_until(&mut sock, SYNC, "client sync").await;
    let _ = synced.send(());
    let mut buf = vec![0u8; 64 * 1024];
    let fut = async {
        loop {
            if let Some(pos) = got.windows(BEGIN.len()).position(|w| w == BEGIN) {
                let start = pos + BEGIN.len();
                if got.len() >= start + len {
                    return sha256(&got[start..start + len]);
                }
            }
            let n = sock.read(&mut buf).await.expect("client read");
            assert!(n > 0, "client: console closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .expect("client received the whole payload")
}

/// DUT side of a checked transfer: repeats SYNC until every client reported, then sends
/// BEGIN and the payload.
pub async fn checked_writer<W: tokio::io::AsyncWrite + Unpin>(
    dut: &mut W,
    mut synced: Vec<tokio::sync::oneshot::Receiver<()>>,
    data: &[u8],
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        dut.write_all(SYNC).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        synced.retain_mut(|rx| rx.try_recv().is_err());
        if synced.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients never saw the sync marker"
        );
    }
    dut.write_all(BEGIN).await.unwrap();
    for chunk in data.chunks(16 * 1024) {
        dut.write_all(chunk).await.unwrap();
    }
    dut.flush().await.unwrap();
}

/// Spawns `nc 127.0.0.1 <port>` with piped stdin/stdout.
pub fn netcat(port: u16) -> Child {
    let nc = dutgate_core::testing::require_program("nc", "netcat-openbsd");
    Command::new(nc)
        .arg("127.0.0.1")
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nc starts")
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Writes `line` to `dut` every 30 ms until `client` has received it (the main console port
/// does not replay, so a client that just connected may miss the first ones).
pub async fn say_until_heard<W, R>(dut: &mut W, line: &[u8], client: &mut R, what: &str)
where
    W: tokio::io::AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let talk = async {
        loop {
            dut.write_all(line).await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    };
    tokio::select! {
        _ = talk => {}
        _ = read_until(client, line, what) => {}
    }
}
