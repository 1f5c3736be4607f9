//! A whole gateway in a test process (feature `testing`): the real mars, pdu (dummy driver),
//! boot and salad services (and optionally the embedded S3 endpoint) on ephemeral ports,
//! executors — in this process or as child processes — real job processes, and simulated
//! DUTs ([`sim`]).
//!
//! [`Farm::start`] builds it from [`Options`]: how many machines and their tags, how many
//! executors, where they keep their queue (SQLite in the farm's state dir, or PostgreSQL), and
//! whether they run in this process or as processes ([`ExecutorMode`]). Machines are admitted
//! (`IDLE`) without training.
//!
//! Executors as processes run the same service entry as `dutgate executor`
//! ([`crate::run`]), configured by a config file with `gateway`, `executor` (and `s3`)
//! sections. A test binary with its own `main` can be that process itself: it calls
//! [`executor_process_main`] first, and uses [`ExecutorMode::this_binary`].
//!
//! mars runs on its own runtime in this process: [`Farm::kill_mars`] ends all of it at once,
//! [`Farm::start_mars`] starts it again over the same database and on the same socket.
//!
//! No process outlives the farm: dropping it (or [`Farm::stop`]) kills its executor processes
//! and every job process still writing into its state dir.
//!
//! [`dispatch`] drives the dispatch protocol one step at a time instead (no farm): for tests
//! that choose the order of events themselves.

pub mod dispatch;
pub mod sim;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_core::config::GatewayConfig;
use dutgate_core::db::Db;
use dutgate_core::{MachineId, PowerState, Secret, ServiceContext, ServiceName};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{MachinePatch, MachineState, Registration};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use sim::{BUCKET_KEYS, s3_client, s3_read, script_lines};

use crate::model::{Event, EventList, Job, JobState, Submitted};
use crate::{Config as ExecConfig, Executor};

pub const ADMIN: &str = "admin-token";
pub const USER: &str = "user-token";
/// What the farm's artifact server serves as `/vmlinuz`.
pub const KERNEL: &[u8] = b"not really a kernel";
/// The argument that makes a test binary the executor process ([`executor_process_main`]).
pub const EXECUTOR_PROCESS_ARG: &str = "executor-process";

/// Machine `n` (1-based) of a farm.
pub fn mac(n: u16) -> MachineId {
    let [hi, lo] = n.to_be_bytes();
    MachineId::from_bytes([0x52, 0x54, 0x00, 0xee, hi, lo])
}

/// How a farm runs its executors.
#[derive(Debug, Clone, Default)]
pub enum ExecutorMode {
    /// Each on its own runtime in this process: "killing" one drops its runtime and every
    /// task at once, while the job processes it started keep running.
    #[default]
    InProcess,
    /// Each as a child process: the program and leading arguments, started with
    /// `DUTGATE_CONFIG=<farm config file>` (e.g. `dutgate executor`, or
    /// [`ExecutorMode::this_binary`]).
    Process(Vec<OsString>),
}

impl ExecutorMode {
    /// This test binary as the executor process: `<current exe> executor-process`; its `main`
    /// must call [`executor_process_main`] first.
    pub fn this_binary() -> Self {
        let exe = std::env::current_exe().expect("the test binary's path");
        Self::Process(vec![exe.into(), EXECUTOR_PROCESS_ARG.into()])
    }
}

pub struct Options {
    /// Simulated machines, `1..=machines` ([`mac`]), all on one dummy PDU.
    pub machines: u16,
    /// Tags of machine `n` (besides `sim:any:yes`).
    pub tags: fn(u16) -> Vec<String>,
    /// mars' lease TTL (seconds).
    pub lease_ttl: u64,
    /// How long leases that lapsed while mars was away get when it starts (seconds).
    pub lease_grace: u64,
    pub cancel_grace: f64,
    /// Runs the embedded S3 endpoint in-process and gives the executors job buckets.
    pub s3: bool,
    /// Extra executor template variables.
    pub template_vars: Vec<(String, String)>,
    /// The job process command (`<cmd…> <id>`). Unset: the executor's default, its own
    /// binary with `job` (for an in-process executor: the test binary, which must then
    /// answer `job <id>` with [`crate::job_main`]).
    pub job_command: Option<Vec<PathBuf>>,
    /// Executors, named `farm-exec-0`, `farm-exec-1`, …, each on its own port, all on the
    /// same queue. [`Farm::url`] is the first one's.
    pub executors: usize,
    pub executor_mode: ExecutorMode,
    /// The executors' database (`postgres://…`: schema `executor`, shared with whatever else
    /// uses it). Unset: SQLite in the farm's state dir.
    pub database_url: Option<String>,
    /// The machines' PDU off delay (seconds) in a power cycle.
    pub off_delay: f64,
    /// The tokens as `dutgate up` keeps them: in `<state>/tokens/{admin,user}`, not in the
    /// executors' config (the services check them all the same).
    pub tokens_in_files: bool,
    /// Starts a [`sim`] DUT per machine. Off: the caller simulates the DUTs itself (on
    /// [`Farm::device`], booting from the boot service and talking to [`Farm::netconsole`]).
    pub sims: bool,
    /// `executor.webhooks` of the executors.
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// More `gateway.outbound.allow` rules (a test's webhook receiver on loopback).
    pub outbound_allow: Vec<dutgate_core::outbound::AllowRule>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            machines: 4,
            tags: |_| Vec::new(),
            lease_ttl: 3,
            lease_grace: 60,
            cancel_grace: 3.0,
            s3: false,
            template_vars: Vec::new(),
            job_command: None,
            executors: 1,
            executor_mode: ExecutorMode::InProcess,
            database_url: None,
            off_delay: 0.0,
            tokens_in_files: false,
            sims: true,
            webhooks: Vec::new(),
            outbound_allow: Vec::new(),
        }
    }
}

/// A running executor of the farm.
enum Running {
    InProcess {
        shutdown: CancellationToken,
        runtime: tokio::runtime::Runtime,
    },
    Process(std::process::Child),
}

/// One of the farm's executors.
pub struct ExecutorSlot {
    pub name: String,
    pub port: u16,
    pub url: String,
    /// The executor's socket, bound once by the farm (port 0) and kept for the farm's life:
    /// every start of the executor gets a copy (in process), or inherits it as fd 3 with
    /// `LISTEN_FDS=1` (as a process, the way systemd hands sockets over). The port is never
    /// released and picked up again, so nothing else can take it in between.
    listener: std::net::TcpListener,
    running: Option<Running>,
}

impl ExecutorSlot {
    /// The pid of the executor process (process mode, while running).
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Some(Running::Process(c)) => Some(c.id()),
            _ => None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Kills the executor like `kill -9`: a process gets SIGKILL (and is reaped); an
    /// in-process one loses its runtime and every task at once. Its job processes keep
    /// running.
    fn kill(&mut self) {
        match self.running.take() {
            Some(Running::InProcess { shutdown, runtime }) => {
                shutdown.cancel();
                runtime.shutdown_background();
            }
            Some(Running::Process(mut child)) => {
                if let Ok(pid) = i32::try_from(child.id()) {
                    // SAFETY: kill(2) on our own child's process group (it leads it).
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                }
                let _ = child.wait();
            }
            None => {}
        }
    }
}

/// The farm's mars, on its own runtime in this process: killing it drops every task of it at
/// once — its sweeper, its event streams, its connections — as `kill -9` would; its database
/// and its socket stay for the next start.
struct MarsSlot {
    /// Bound once by the farm (port 0) and kept for the farm's life, as systemd keeps a
    /// socket-activated service's: while mars is down, connections wait in the backlog until
    /// the next mars accepts them (or their client gives up); the port is never free for
    /// another process to take.
    listener: std::net::TcpListener,
    db: PathBuf,
    config: dutgate_mars::Config,
    running: Option<(CancellationToken, tokio::runtime::Runtime)>,
}

impl MarsSlot {
    fn kill(&mut self) {
        if let Some((shutdown, runtime)) = self.running.take() {
            shutdown.cancel();
            runtime.shutdown_background();
        }
    }
}

pub struct Farm {
    pub tmp: tempfile::TempDir,
    pub gw: Arc<GatewayConfig>,
    /// The executors' gateway config (the farm's, with [`Options::database_url`]).
    pub exec_gw: Arc<GatewayConfig>,
    /// The executors' config (each gets its own `name`).
    pub exec_cfg: ExecConfig,
    pub executor_mode: ExecutorMode,
    pub executors: Vec<ExecutorSlot>,
    /// The first executor's URL.
    pub url: String,
    pub mars_url: String,
    pub http: reqwest::Client,
    pub mars: MarsClient,
    /// mars' store as the test's own handle (its own connections to mars' database), for
    /// writes no API offers, such as admitting a machine without training. Not the running
    /// mars: its sweeper and event streams are in [`Farm::start_mars`]'s.
    pub mars_handle: dutgate_mars::machines::Mars,
    mars_slot: MarsSlot,
    /// The dummy PDU device the simulated DUTs watch.
    pub device: String,
    pub machines: Vec<MachineId>,
    shutdown: CancellationToken,
    sims: Vec<JoinHandle<()>>,
    pdu: Option<dutgate_pdu::Running>,
    salad: Option<dutgate_salad::SaladHandle>,
    /// The embedded S3 endpoint (`Options::s3`).
    pub s3: Option<S3>,
    /// salad's netconsole ingest, which the simulated DUTs dial.
    pub netconsole: std::net::SocketAddr,
}

/// The embedded S3 endpoint of a [`Farm`].
pub struct S3 {
    pub url: String,
    pub storage: dutgate_storage::JobStorage,
    pub config: dutgate_storage::Config,
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("an ephemeral port on 127.0.0.1")
}

fn port(l: &TcpListener) -> u16 {
    l.local_addr().expect("a bound listener's address").port()
}

/// Serves test boot artifacts: `/vmlinuz` and `/initrd`; anything else is 404.
async fn artifact_server(l: TcpListener, stop: CancellationToken) {
    let app = axum::Router::new()
        .route("/vmlinuz", axum::routing::get(|| async { KERNEL }))
        .route("/initrd", axum::routing::get(|| async { &b"initrd"[..] }));
    let _ = axum::serve(l, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
}

fn test_auth() -> Auth {
    Auth::new(
        Some(Secret::new(ADMIN)),
        Some(Secret::new(USER)),
        dutgate_core::config::default_dut_networks(),
    )
}

/// The config file of executor processes: the sections of the gateway config file that
/// `dutgate executor` reads.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct ProcessConfig {
    gateway: GatewayConfig,
    executor: ExecConfig,
    #[serde(skip_serializing_if = "Option::is_none")]
    s3: Option<dutgate_storage::Config>,
}

impl Farm {
    /// Starts the services, registers and admits the machines, starts their simulated DUTs
    /// and the executors. Panics when any of it fails.
    pub async fn start(opts: Options) -> Farm {
        let tmp = tempfile::tempdir().expect("a temporary state dir");
        let shutdown = CancellationToken::new();
        let (l_mars, l_pdu, l_boot, l_salad, l_net, l_art) = (
            bind().await,
            bind().await,
            bind().await,
            bind().await,
            bind().await,
            bind().await,
        );
        let mut l_execs = Vec::new();
        for _ in 0..opts.executors.max(1) {
            l_execs.push(bind().await);
        }
        let mut gw = GatewayConfig {
            state_dir: tmp.path().to_path_buf(),
            bind_address: "127.0.0.1".parse().expect("an IP address"),
            internal_host: "127.0.0.1".into(),
            public_host: "127.0.0.1".into(),
            shutdown_grace_seconds: 0.5,
            ..Default::default()
        };
        gw.ports.mars = port(&l_mars);
        gw.ports.pdu = port(&l_pdu);
        gw.ports.boot = port(&l_boot);
        gw.ports.salad = port(&l_salad);
        gw.ports.executor = port(&l_execs[0]);
        gw.auth.admin_token = Some(Secret::new(ADMIN));
        gw.auth.user_token = Some(Secret::new(USER));
        // The jobs' boot artifacts come from the farm's artifact server on loopback, which the
        // outbound policy refuses unless allowed.
        gw.outbound.allow.push(
            format!("127.0.0.1:{}", port(&l_art))
                .parse()
                .expect("an outbound allow rule"),
        );
        gw.outbound
            .allow
            .extend(opts.outbound_allow.iter().cloned());
        let l_s3 = if opts.s3 {
            let l = bind().await;
            gw.ports.s3 = port(&l);
            Some(l)
        } else {
            None
        };
        let gw = Arc::new(gw);
        let s3_cfg = dutgate_storage::Config {
            request_timeout_seconds: 10.0,
            ..Default::default()
        };
        let s3 = match l_s3 {
            Some(l) => {
                let port = port(&l);
                let embedded = dutgate_storage::server::build(&gw, &s3_cfg)
                    .await
                    .expect("the embedded S3 endpoint");
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    let _ = dutgate_storage::server::serve(
                        l,
                        embedded.router,
                        stop,
                        Duration::from_millis(200),
                    )
                    .await;
                });
                Some(S3 {
                    url: format!("http://127.0.0.1:{port}"),
                    storage: dutgate_storage::JobStorage::new(&gw, &s3_cfg)
                        .await
                        .expect("job storage on the embedded S3 endpoint"),
                    config: s3_cfg.clone(),
                })
            }
            None => None,
        };
        let auth = test_auth();
        let art_port = port(&l_art);
        tokio::spawn(artifact_server(l_art, shutdown.clone()));

        // pdu: one dummy PDU whose device the simulated DUTs watch.
        let device = format!("farm-{}-{:x}", std::process::id(), rand_u32());
        let mut pdu_cfg = dutgate_pdu::Config {
            poll_interval_seconds: 0.2,
            settle_timeout_seconds: 2.0,
            readback_interval_ms: 10,
            verify_interval_ms: 10,
            default_off_seconds: 0.0,
            ..Default::default()
        };
        pdu_cfg.pdus.insert(
            "pdu1".into(),
            dutgate_pdu::PduSpec {
                driver: "dummy".into(),
                config: json!({"ports": opts.machines.max(8), "device": device, "initial": "OFF"}),
                reserved: vec![],
                labels: BTreeMap::new(),
                poll_interval_seconds: None,
            },
        );
        let pdu_db = Db::open_sqlite(&tmp.path().join("pdu.db"), dutgate_pdu::store::MIGRATIONS)
            .await
            .expect("pdu database");
        let pdu = dutgate_pdu::start_on_gateway(
            l_pdu,
            dutgate_pdu::store::Store::new(pdu_db),
            pdu_cfg,
            &gw,
            auth.clone(),
        )
        .await
        .expect("pdu service");

        // mars, with the real pdu behind it and no trainer (machines are admitted below).
        let mars_db_path = tmp.path().join("mars.db");
        let mut mars_cfg = dutgate_mars::Config {
            lease_ttl_seconds: opts.lease_ttl,
            lease_grace_seconds: opts.lease_grace,
            ..Default::default()
        };
        mars_cfg.training.enabled = false;
        let mars_db = Db::open_sqlite(&mars_db_path, dutgate_mars::store::MIGRATIONS)
            .await
            .expect("mars database");
        let mars_handle = dutgate_mars::machines::Mars::new(
            dutgate_mars::store::Store::new(mars_db, "farm"),
            mars_cfg.clone(),
            Arc::new(dutgate_mars::power::HttpPower::for_gateway(&gw, None)),
        );
        let mut mars_slot = MarsSlot {
            listener: l_mars.into_std().expect("a std listener"),
            db: mars_db_path,
            config: mars_cfg,
            running: None,
        };
        mars_slot.running = Some(start_mars_in_process(&mars_slot, gw.clone()).await);

        // boot
        let boot_ctx = ServiceContext::new(ServiceName::Boot, (*gw).clone(), shutdown.clone());
        let boot = dutgate_boot::BootService::open(&boot_ctx, dutgate_boot::Config::default())
            .await
            .expect("boot service");
        tokio::spawn(boot.serve(l_boot, shutdown.clone()));

        // salad: netconsole ingest only, console ports in a random range (never the defaults).
        // Two ports per machine (console and logs), and a few spare.
        let range = opts.machines.saturating_mul(2).max(16).saturating_add(8);
        let slots = 40_000 / range;
        let base = 20_000 + (rand_u32() % u32::from(slots)) as u16 * range;
        let salad_cfg = dutgate_salad::Config {
            serial_ports: vec![],
            console_ports: dutgate_salad::config::PortRange {
                first: base,
                last: base + range - 1,
            },
            ..Default::default()
        };
        let salad_ctx = ServiceContext::new(ServiceName::Salad, (*gw).clone(), shutdown.clone());
        let salad = dutgate_salad::start(
            salad_ctx,
            salad_cfg,
            dutgate_salad::Listeners {
                http: l_salad,
                netconsole: Some(l_net),
            },
        )
        .await
        .expect("salad service");
        let netconsole = salad.netconsole_addr.expect("salad's netconsole ingest");

        let mars_url = format!("http://127.0.0.1:{}", gw.ports.mars);
        let mars = MarsClient::new(&mars_url, Some(Secret::new(ADMIN)));
        let anon = MarsClient::new(&mars_url, None);
        let mut machines = Vec::new();
        let mut sims = Vec::new();
        for n in 1..=opts.machines {
            let id = mac(n);
            let mut tags: Vec<String> = vec!["sim:any:yes".into()];
            tags.extend((opts.tags)(n));
            anon.register(&Registration {
                base_name: "sim".into(),
                tags: tags
                    .iter()
                    .map(|t| t.parse().expect("a valid machine tag"))
                    .collect(),
                mac_address: id,
                ip_address: format!("10.2.{}.{}", n / 250, 1 + n % 250)
                    .parse()
                    .expect("an IP address"),
                local_tty_device: Some("ttyS0".into()),
            })
            .await
            .expect("machine registration");
            mars.patch(
                id,
                &MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some(n.to_string())),
                    pdu_off_delay: Some(opts.off_delay),
                    ..Default::default()
                },
            )
            .await
            .expect("machine PDU port");
            mars_handle
                .store
                .trigger(
                    id,
                    dutgate_mars::state::Trigger::TrainingPassed,
                    &dutgate_mars::store::Cause::new("test", "admitted by the test harness"),
                    &|r| r.trained_at = Some(dutgate_mars::model::Timestamp::now()),
                )
                .await
                .expect("machine admission");
            machines.push(id);
            if opts.sims {
                sims.push(tokio::spawn(sim::sim_dut(
                    device.clone(),
                    n.to_string(),
                    id,
                    gw.ports.boot,
                    netconsole,
                )));
            }
        }

        let exec_cfg = ExecConfig {
            job_command: opts.job_command.clone(),
            cancel_grace_seconds: opts.cancel_grace,
            template_vars: [(
                "artifacts".to_string(),
                format!("http://127.0.0.1:{art_port}"),
            )]
            .into_iter()
            .chain(opts.template_vars.iter().cloned())
            .collect(),
            object_store: s3
                .as_ref()
                .map(|_| crate::storage::ObjectStore(s3_cfg.clone())),
            // Simulated DUTs are processes on the gateway: they reach S3 from 127.0.0.1, not
            // from the addresses their machines registered.
            job_keys_from_machine_address: false,
            webhooks: opts.webhooks.clone(),
            ..Default::default()
        };
        let mut exec_gw = (*gw).clone();
        if opts.tokens_in_files {
            let dir = exec_gw.tokens_dir();
            std::fs::create_dir_all(&dir).expect("the tokens dir");
            std::fs::write(dir.join("admin"), format!("{ADMIN}\n")).expect("the admin token file");
            std::fs::write(dir.join("user"), format!("{USER}\n")).expect("the user token file");
            exec_gw.auth.admin_token = None;
            exec_gw.auth.user_token = None;
        }
        if let Some(url) = &opts.database_url {
            exec_gw.database_url =
                Some(serde_json::from_value(json!(url)).expect("a database URL for the executors"));
        }
        let executors: Vec<ExecutorSlot> = l_execs
            .into_iter()
            .enumerate()
            .map(|(i, l)| ExecutorSlot {
                name: format!("farm-exec-{i}"),
                port: port(&l),
                url: format!("http://127.0.0.1:{}", port(&l)),
                listener: l.into_std().expect("a std listener"),
                running: None,
            })
            .collect();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("an HTTP client");
        let mut farm = Farm {
            tmp,
            url: executors[0].url.clone(),
            gw,
            exec_gw: Arc::new(exec_gw),
            exec_cfg,
            executor_mode: opts.executor_mode,
            executors,
            mars_url,
            http,
            mars,
            mars_handle,
            mars_slot,
            device,
            machines,
            shutdown,
            sims,
            pdu: Some(pdu),
            salad: Some(salad),
            s3,
            netconsole,
        };
        for i in 0..farm.executors.len() {
            farm.start_executor(i).await;
        }
        farm
    }

    /// Starts (or restarts) executor `i` on its port; returns once it answers.
    pub async fn start_executor(&mut self, i: usize) {
        assert!(
            !self.executors[i].is_running(),
            "executor {i} is already running"
        );
        let mut cfg = self.exec_cfg.clone();
        cfg.name = Some(self.executors[i].name.clone());
        let mut gw = (*self.exec_gw).clone();
        gw.ports.executor = self.executors[i].port;
        let running = match self.executor_mode.clone() {
            ExecutorMode::InProcess => {
                let listener = self.executors[i]
                    .listener
                    .try_clone()
                    .expect("a copy of the executor's socket");
                start_in_process(Arc::new(gw), cfg, listener).await
            }
            ExecutorMode::Process(command) => {
                self.spawn_executor_process(i, &command, gw, cfg).await
            }
        };
        self.executors[i].running = Some(running);
    }

    async fn spawn_executor_process(
        &self,
        i: usize,
        command: &[OsString],
        gw: GatewayConfig,
        cfg: ExecConfig,
    ) -> Running {
        let (program, args) = command
            .split_first()
            .expect("ExecutorMode::Process needs a program");
        let s3 = cfg.object_store.as_ref().map(|o| o.0.clone());
        let mut doc = serde_json::to_value(ProcessConfig {
            gateway: gw.clone(),
            executor: cfg,
            s3,
        })
        .expect("the executor config as JSON");
        // Secrets serialize masked: write the real ones (none when they are in files).
        if gw.auth.admin_token.is_some() {
            doc["gateway"]["auth"]["admin_token"] = json!(ADMIN);
        }
        if gw.auth.user_token.is_some() {
            doc["gateway"]["auth"]["user_token"] = json!(USER);
        }
        if let Some(url) = &gw.database_url {
            doc["gateway"]["database_url"] = json!(url.expose());
        }
        let slot = &self.executors[i];
        let path = self.tmp.path().join(format!("{}.yml", slot.name));
        std::fs::write(&path, serde_json::to_vec_pretty(&doc).expect("JSON"))
            .expect("the executor's config file");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join(format!("{}.log", slot.name)))
            .expect("the executor's log file");
        let mut cmd = std::process::Command::new(program);
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = slot.listener.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls are made: dup2(2) and
        // fcntl(2) on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                // The executor's socket as fd 3, inherited across the exec (no CLOEXEC).
                if fd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.args(args)
            .env("DUTGATE_CONFIG", &path)
            // systemd's socket activation (`dutgate_core::http::listener`): no LISTEN_PID,
            // so the process takes fd 3 whatever its pid.
            .env("LISTEN_FDS", "1")
            .env_remove("LISTEN_PID")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("the log file again"))
            .stderr(log)
            // Its own group, so that it is killed with everything it did not detach.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting the executor process {program:?}: {e}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let health = format!("{}/healthz", slot.url);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(self.tmp.path().join(format!("{}.log", slot.name)))
                        .unwrap_or_default();
                panic!("the executor process exited at start ({status}):\n{log}");
            }
            if let Ok(r) = self
                .http
                .get(&health)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                && r.status().is_success()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                if let Ok(pid) = i32::try_from(child.id()) {
                    // SAFETY: kill(2) on our own child's group.
                    unsafe {
                        libc::kill(-pid, libc::SIGKILL);
                    }
                }
                let _ = child.wait();
                panic!("the executor process did not answer on {health} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Running::Process(child)
    }

    /// Kills mars like `kill -9` (see [`MarsSlot`]): every task of it ends at once; its
    /// database stays, and its port stays bound.
    pub fn kill_mars(&mut self) {
        self.mars_slot.kill();
    }

    /// Starts mars again, over the same database and on the same port; returns once it
    /// serves.
    pub async fn start_mars(&mut self) {
        assert!(self.mars_slot.running.is_none(), "mars is already running");
        let running = start_mars_in_process(&self.mars_slot, self.gw.clone()).await;
        self.mars_slot.running = Some(running);
    }

    /// Kills executor `i` like `kill -9` (see [`ExecutorSlot`]); its job processes keep
    /// running.
    pub fn kill_executor(&mut self, i: usize) {
        self.executors[i].kill();
    }

    /// Waits until executor `i`'s process has exited (killed by the test, say) and forgets it;
    /// returns how it ended. `None` for an executor that is not a running process.
    pub fn reap_executor(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        match self.executors[i].running.take() {
            Some(Running::Process(mut child)) => child.wait().ok(),
            other => {
                self.executors[i].running = other;
                None
            }
        }
    }

    /// Stops everything: executors (killed), services, simulated DUTs, stray job processes.
    pub async fn stop(mut self) {
        for e in &mut self.executors {
            e.kill();
        }
        self.mars_slot.kill();
        self.shutdown.cancel();
        for s in &self.sims {
            s.abort();
        }
        if let Some(p) = self.pdu.take() {
            p.stop().await;
        }
        if let Some(s) = self.salad.take() {
            let _ = s.stop().await;
        }
        // Drop does the rest.
    }

    pub fn power(&self, n: u16) -> PowerState {
        dutgate_pdu_dummy::device(&self.device)
            .and_then(|d| d.state(&n.to_string()))
            .unwrap_or(PowerState::Unknown)
    }

    /// A client of the first executor with the admin token.
    pub fn client(&self) -> crate::client::ExecutorClient {
        crate::client::ExecutorClient::new(&self.url, Some(Secret::new(ADMIN)))
    }

    // ---- API helpers (first executor, user token) ------------------------------------------

    pub async fn submit_raw(&self, yaml: &str, query: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/v1/jobs{query}", self.url))
            .bearer_auth(USER)
            .header("content-type", "application/x-yaml")
            .body(yaml.to_string())
            .send()
            .await
            .expect("POST /api/v1/jobs")
    }

    pub async fn submit(&self, yaml: &str, query: &str) -> i64 {
        let r = self.submit_raw(yaml, query).await;
        let status = r.status();
        let text = r.text().await.expect("the submission's answer");
        assert_eq!(status, 201, "submission refused: {text}");
        serde_json::from_str::<Submitted>(&text)
            .expect("a submission answer")
            .id
    }

    pub async fn job(&self, id: i64) -> Job {
        self.job_at(&self.url, id).await
    }

    /// Job `id` as the executor at `url` reports it.
    pub async fn job_at(&self, url: &str, id: i64) -> Job {
        self.http
            .get(format!("{url}/api/v1/jobs/{id}"))
            .bearer_auth(USER)
            .send()
            .await
            .expect("GET /api/v1/jobs/<id>")
            .json()
            .await
            .expect("a job")
    }

    /// `GET <executor><path>` with the user token.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(USER)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn events(&self, id: i64) -> Vec<Event> {
        self.get(&format!("/api/v1/jobs/{id}/events"))
            .await
            .json::<EventList>()
            .await
            .expect("an event list")
            .events
    }

    pub async fn console(&self, id: i64) -> String {
        let r = self
            .get(&format!("/api/v1/jobs/{id}/console?follow=false"))
            .await;
        String::from_utf8_lossy(&r.bytes().await.expect("the console log")).into_owned()
    }

    /// Waits (bounded) until job `id` is finished.
    pub async fn wait_finished(&self, id: i64, within: Duration) -> Job {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let j = self.job(id).await;
            if j.state == JobState::Finished {
                return j;
            }
            if tokio::time::Instant::now() > deadline {
                let evs = self.events(id).await;
                let msgs: Vec<String> = evs
                    .iter()
                    .map(|e| format!("{} {}", e.kind, e.message))
                    .collect();
                panic!("job {id} not finished after {within:?}: {j:#?}\nevents: {msgs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until job `id` is in phase `phase` (e.g. `running`).
    pub async fn wait_phase(&self, id: i64, phase: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let j = self.job(id).await;
            if j.phase.as_deref() == Some(phase) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} not in phase {phase} after {within:?}: {j:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The pid of the job's process (from its `process_started` event).
    pub async fn job_pid(&self, id: i64) -> i32 {
        self.events(id)
            .await
            .iter()
            .rev()
            .find(|e| e.kind == "process_started")
            .and_then(|e| e.data["pid"].as_i64())
            .and_then(|p| i32::try_from(p).ok())
            .unwrap_or_else(|| panic!("job {id} has no process_started event"))
    }

    pub async fn wait_machine(&self, id: MachineId, state: MachineState, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = self.mars.machine(id).await.expect("GET machine");
            if m.state == state {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "machine {id} is {} after {within:?}, expected {state}",
                    m.state
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        for e in &mut self.executors {
            e.kill();
        }
        self.mars_slot.kill();
        self.shutdown.cancel();
        for s in &self.sims {
            s.abort();
        }
        kill_processes_writing_under(self.tmp.path());
        dutgate_pdu_dummy::forget(&self.device);
    }
}

/// Kills (SIGKILL, with their process groups) the processes whose stdout is a file under
/// `dir`: the job processes (and executor processes) of a farm.
pub fn kill_processes_writing_under(dir: &Path) {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid <= 1 || pid as u32 == me {
            continue;
        }
        let Ok(out) = std::fs::read_link(format!("/proc/{pid}/fd/1")) else {
            continue;
        };
        if out.starts_with(dir) {
            // SAFETY: kill(2) has no memory-safety preconditions; the job processes lead
            // their own groups.
            unsafe {
                if libc::getpgid(pid) == pid {
                    libc::kill(-pid, libc::SIGKILL);
                }
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Starts mars on its own runtime in this process, on `slot`'s socket and database; returns
/// once it serves.
async fn start_mars_in_process(
    slot: &MarsSlot,
    gw: Arc<GatewayConfig>,
) -> (CancellationToken, tokio::runtime::Runtime) {
    let shutdown = CancellationToken::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("mars' runtime");
    let listener = slot.listener.try_clone().expect("a copy of mars' socket");
    let (db, config, stop) = (slot.db.clone(), slot.config.clone(), shutdown.clone());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    runtime.spawn(async move {
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let listener = TcpListener::from_std(listener).expect("a tokio listener");
        let db = Db::open_sqlite(&db, dutgate_mars::store::MIGRATIONS)
            .await
            .expect("mars database");
        let mars = dutgate_mars::machines::Mars::new(
            dutgate_mars::store::Store::new(db, "farm"),
            config,
            Arc::new(dutgate_mars::power::HttpPower::for_gateway(&gw, None)),
        );
        let router = dutgate_mars::start(mars, test_auth(), stop.clone()).expect("mars service");
        let app = dutgate_core::http::with_common_routes("mars", router, None);
        let _ = ready_tx.send(());
        let _ = dutgate_core::http::serve(listener, app, stop, Duration::from_millis(200)).await;
    });
    ready_rx.await.expect("mars started");
    (shutdown, runtime)
}

/// Starts an executor on its own runtime in this process; returns once it serves.
async fn start_in_process(
    gw: Arc<GatewayConfig>,
    cfg: ExecConfig,
    listener: std::net::TcpListener,
) -> Running {
    let shutdown = CancellationToken::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("the executor's runtime");
    let stop = shutdown.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    runtime.spawn(async move {
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let listener = TcpListener::from_std(listener).expect("a tokio listener");
        let db = Db::open_for_service("executor", &gw, crate::store::MIGRATIONS)
            .await
            .expect("the executor's database");
        let exec = Executor::start(
            gw,
            cfg,
            crate::store::Store::new(db),
            test_auth(),
            stop.clone(),
        )
        .await
        .expect("the executor starts");
        let app = dutgate_core::http::with_common_routes("executor", exec.router(), None);
        let _ = ready_tx.send(());
        let _ = dutgate_core::http::serve(listener, app, stop, Duration::from_millis(200)).await;
    });
    ready_rx.await.expect("the executor started");
    Running::InProcess { shutdown, runtime }
}

/// For a test binary with its own `main`: when started as `<binary> executor-process`
/// ([`ExecutorMode::this_binary`]), runs the executor as `dutgate executor` does — the
/// config file named by `DUTGATE_CONFIG` (sections `gateway`, `executor`, `s3`) with
/// `DUTGATE_<SECTION>__<KEY>` overrides, until SIGTERM/SIGINT — and returns its exit code.
/// Otherwise returns `None` at once.
pub fn executor_process_main() -> Option<ExitCode> {
    if std::env::args().nth(1).as_deref() != Some(EXECUTOR_PROCESS_ARG) {
        return None;
    }
    Some(match run_executor_process() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("executor process: {e}");
            ExitCode::FAILURE
        }
    })
}

/// For a test binary with its own `main`: when started as `<binary> job <id>` (the job
/// process an executor in [`ExecutorMode::this_binary`] starts), runs the job as `dutgate job`
/// does and returns its exit code. Otherwise returns `None` at once.
pub fn job_process_main() -> Option<ExitCode> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("job") {
        return None;
    }
    let Some(id) = args.next() else {
        eprintln!("job process: usage: <binary> job <id>");
        return Some(ExitCode::from(2));
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("job process: {e}");
            return Some(ExitCode::FAILURE);
        }
    };
    let code = runtime.block_on(crate::job_main(&id));
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    Some(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

fn run_executor_process() -> Result<(), String> {
    let path = std::env::var_os("DUTGATE_CONFIG").ok_or("DUTGATE_CONFIG is not set")?;
    let source = dutgate_core::config::ConfigSource::locate(Some(Path::new(&path)))
        .map_err(|e| e.to_string())?;
    let config: ProcessConfig = source
        .load(dutgate_core::config::process_env())
        .map_err(|e| e.to_string())?;
    dutgate_core::telemetry::init_tracing(&config.gateway.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let shutdown = dutgate_core::shutdown::on_signal();
        let ctx = ServiceContext::new(ServiceName::Executor, config.gateway, shutdown);
        let mut executor = config.executor;
        executor.object_store = config.s3.map(crate::storage::ObjectStore);
        crate::run(ctx, executor).await.map_err(|e| e.to_string())
    })
}

pub fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// A job for the simulated DUTs: `target` (YAML lines under `target:`), `script` for the
/// first boot, `cont` for later ones, extra `timeouts` and `console_patterns` lines.
pub fn job_yaml(
    target: &str,
    script: &str,
    cont: &str,
    timeouts: &str,
    extra_patterns: &str,
) -> String {
    format!(
        r#"version: 1
target:
{target}
timeouts:
  overall: {{minutes: 2}}
{timeouts}
console_patterns:
  session_end: {{regex: "^SESSION END$"}}
  job_success: {{regex: "^RESULT: PASS$"}}
  job_warn: {{regex: "^WARNING: "}}
  session_reboot: {{regex: "^REBOOT ME$"}}
  machine_unfit_for_service: {{regex: "^MCE: "}}
{extra_patterns}
deployment:
  start:
    kernel:
      url: "{{{{ artifacts }}}}/vmlinuz"
      cmdline: ["SALAD.machine_id={{{{ machine_id }}}}", "sim={script}"]
    initramfs:
      url: "{{{{ artifacts }}}}/initrd"
  continue:
    kernel:
      cmdline: ["SALAD.machine_id={{{{ machine_id }}}}", "sim={cont}"]
"#
    )
}
