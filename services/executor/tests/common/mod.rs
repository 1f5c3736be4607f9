//! A whole gateway in the test process: the real mars, pdu (dummy driver), boot and salad
//! services on ephemeral ports, the executor, real job processes (`dutgate-job`), and
//! simulated DUTs.
//!
//! A simulated DUT plays a machine: it watches its dummy PDU port; when the port goes ON it
//! "boots": reads its boot config (what iPXE would fetch), dials salad's netconsole ingest,
//! announces `SALAD.machine_id=<mac>` like the kernel cmdline echo does, and prints the
//! console its command line asks for (`sim=<script>`). When the port goes OFF it stops at
//! once, mid-line if need be.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::auth::Auth;
use dutgate_core::config::GatewayConfig;
use dutgate_core::db::Db;
use dutgate_core::{MachineId, PowerState, Secret, ServiceContext, ServiceName};
use dutgate_executor::model::{Event, EventList, Job, JobState, Submitted};
use dutgate_executor::{Config as ExecConfig, Executor};
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{MachinePatch, MachineState, Registration};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "admin-token";
pub const USER: &str = "user-token";
pub const KERNEL: &[u8] = b"not really a kernel";

pub fn mac(n: u8) -> MachineId {
    MachineId::from_bytes([0x52, 0x54, 0x00, 0xee, 0x00, n])
}

pub struct Options {
    pub machines: u8,
    /// Tags of machine `n` (besides `sim:any:yes`).
    pub tags: fn(u8) -> Vec<String>,
    pub lease_ttl: u64,
    pub cancel_grace: f64,
    /// Runs the embedded S3 endpoint in-process and gives the executor job buckets.
    pub s3: bool,
    /// Extra executor template variables.
    pub template_vars: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            machines: 4,
            tags: |_| Vec::new(),
            lease_ttl: 3,
            cancel_grace: 3.0,
            s3: false,
            template_vars: Vec::new(),
        }
    }
}

pub struct Executorish {
    pub shutdown: CancellationToken,
    /// The executor runs on its own runtime, so that "killing" it drops every one of its
    /// tasks at once (like kill -9) while the job processes it started keep running.
    pub runtime: Option<tokio::runtime::Runtime>,
}

pub struct Farm {
    pub tmp: tempfile::TempDir,
    pub gw: Arc<GatewayConfig>,
    pub exec_cfg: ExecConfig,
    pub exec_listener_port: u16,
    pub executor: Option<Executorish>,
    pub url: String,
    pub http: reqwest::Client,
    pub mars: MarsClient,
    pub mars_handle: dutgate_mars::machines::Mars,
    pub device: String,
    pub machines: Vec<MachineId>,
    shutdown: CancellationToken,
    sims: Vec<JoinHandle<()>>,
    pdu: Option<dutgate_pdu::Running>,
    salad: Option<dutgate_salad::SaladHandle>,
    /// The embedded S3 endpoint (`Options::s3`).
    pub s3: Option<S3>,
}

/// The embedded S3 endpoint of a [`Farm`].
pub struct S3 {
    pub url: String,
    pub storage: dutgate_storage::JobStorage,
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn port(l: &TcpListener) -> u16 {
    l.local_addr().unwrap().port()
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

impl Farm {
    pub async fn start(opts: Options) -> Farm {
        let tmp = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let (l_mars, l_pdu, l_boot, l_salad, l_net, l_exec, l_art) = (
            bind().await,
            bind().await,
            bind().await,
            bind().await,
            bind().await,
            bind().await,
            bind().await,
        );
        let mut gw = GatewayConfig {
            state_dir: tmp.path().to_path_buf(),
            bind_address: "127.0.0.1".parse().unwrap(),
            internal_host: "127.0.0.1".into(),
            public_host: "127.0.0.1".into(),
            shutdown_grace_seconds: 0.5,
            ..Default::default()
        };
        gw.ports.mars = port(&l_mars);
        gw.ports.pdu = port(&l_pdu);
        gw.ports.boot = port(&l_boot);
        gw.ports.salad = port(&l_salad);
        gw.ports.executor = port(&l_exec);
        gw.auth.admin_token = Some(Secret::new(ADMIN));
        gw.auth.user_token = Some(Secret::new(USER));
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
                let embedded = dutgate_storage::server::build(&gw, &s3_cfg).await.unwrap();
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
                        .unwrap(),
                })
            }
            None => None,
        };
        let auth = Auth::new(
            Some(Secret::new(ADMIN)),
            Some(Secret::new(USER)),
            dutgate_core::config::default_dut_networks(),
        );
        let art_port = port(&l_art);
        tokio::spawn(artifact_server(l_art, shutdown.clone()));

        // pdu: one dummy PDU whose device the simulated DUTs watch.
        let device = format!("exec-test-{}-{:x}", std::process::id(), rand_u32());
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
                config: json!({"ports": 64, "device": device, "initial": "OFF"}),
                reserved: vec![],
                labels: BTreeMap::new(),
                poll_interval_seconds: None,
            },
        );
        let pdu_db = Db::open_sqlite(&tmp.path().join("pdu.db"), dutgate_pdu::store::MIGRATIONS)
            .await
            .unwrap();
        let pdu = dutgate_pdu::start_on(
            l_pdu,
            dutgate_pdu::store::Store::new(pdu_db),
            pdu_cfg,
            auth.clone(),
        )
        .await
        .unwrap();

        // mars, with the real pdu behind it and no trainer (machines are admitted below).
        let mars_db = Db::open_sqlite(&tmp.path().join("mars.db"), dutgate_mars::store::MIGRATIONS)
            .await
            .unwrap();
        let mut mars_cfg = dutgate_mars::Config {
            lease_ttl_seconds: opts.lease_ttl,
            ..Default::default()
        };
        mars_cfg.training.enabled = false;
        let power = Arc::new(dutgate_mars::power::HttpPower::for_gateway(&gw, None));
        let mars_handle = dutgate_mars::machines::Mars::new(
            dutgate_mars::store::Store::new(mars_db, "farm"),
            mars_cfg,
            power,
        );
        let router =
            dutgate_mars::start(mars_handle.clone(), auth.clone(), shutdown.clone()).unwrap();
        let app = dutgate_core::http::with_common_routes("mars", router, None);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = dutgate_core::http::serve(l_mars, app, stop, Duration::from_millis(200)).await;
        });

        // boot
        let boot_ctx = ServiceContext::new(ServiceName::Boot, (*gw).clone(), shutdown.clone());
        let boot = dutgate_boot::BootService::open(&boot_ctx, dutgate_boot::Config::default())
            .await
            .unwrap();
        tokio::spawn(boot.serve(l_boot, shutdown.clone()));

        // salad: netconsole ingest only, console ports in a random range (never the defaults).
        let base = 20_000 + (rand_u32() % 2000) as u16 * 16;
        let salad_cfg = dutgate_salad::Config {
            serial_ports: vec![],
            console_ports: dutgate_salad::config::PortRange {
                first: base,
                last: base + 15,
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
        .unwrap();
        let netconsole = salad.netconsole_addr.unwrap();

        let mars = MarsClient::new(
            format!("http://127.0.0.1:{}", gw.ports.mars),
            Some(Secret::new(ADMIN)),
        );
        let anon = MarsClient::new(format!("http://127.0.0.1:{}", gw.ports.mars), None);
        let mut machines = Vec::new();
        let mut sims = Vec::new();
        for n in 1..=opts.machines {
            let id = mac(n);
            let mut tags: Vec<String> = vec!["sim:any:yes".into()];
            tags.extend((opts.tags)(n));
            anon.register(&Registration {
                base_name: "sim".into(),
                tags: tags.iter().map(|t| t.parse().unwrap()).collect(),
                mac_address: id,
                ip_address: format!("10.0.2.{}", 10 + n).parse().unwrap(),
                local_tty_device: Some("ttyS0".into()),
            })
            .await
            .unwrap();
            mars.patch(
                id,
                &MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some(n.to_string())),
                    pdu_off_delay: Some(0.0),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            mars_handle
                .store
                .trigger(
                    id,
                    dutgate_mars::state::Trigger::TrainingPassed,
                    &dutgate_mars::store::Cause::new("test", "admitted by the test harness"),
                    &|r| r.trained_at = Some(dutgate_mars::model::Timestamp::now()),
                )
                .await
                .unwrap();
            machines.push(id);
            sims.push(tokio::spawn(sim_dut(
                device.clone(),
                n.to_string(),
                id,
                gw.ports.boot,
                netconsole,
            )));
        }

        let exec_cfg = ExecConfig {
            job_command: Some(vec![env!("CARGO_BIN_EXE_dutgate-job").into()]),
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
                .map(|_| dutgate_executor::storage::ObjectStore(s3_cfg.clone())),
            ..Default::default()
        };
        let exec_port = port(&l_exec);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let mut farm = Farm {
            tmp,
            gw,
            exec_cfg,
            exec_listener_port: exec_port,
            executor: None,
            url: format!("http://127.0.0.1:{exec_port}"),
            http,
            mars,
            mars_handle,
            device,
            machines,
            shutdown,
            sims,
            pdu: Some(pdu),
            salad: Some(salad),
            s3,
        };
        farm.start_executor(Some(l_exec)).await;
        farm
    }

    /// Starts (or restarts) the executor on its own runtime.
    pub async fn start_executor(&mut self, listener: Option<TcpListener>) {
        let std_listener = match listener {
            Some(l) => l.into_std().unwrap(),
            None => std::net::TcpListener::bind(("127.0.0.1", self.exec_listener_port)).unwrap(),
        };
        let gw = self.gw.clone();
        let cfg = self.exec_cfg.clone();
        let shutdown = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let stop = shutdown.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            std_listener.set_nonblocking(true).unwrap();
            let listener = TcpListener::from_std(std_listener).unwrap();
            let db = Db::open_for_service("executor", &gw, dutgate_executor::store::MIGRATIONS)
                .await
                .unwrap();
            let auth = Auth::new(
                Some(Secret::new(ADMIN)),
                Some(Secret::new(USER)),
                dutgate_core::config::default_dut_networks(),
            );
            let exec = Executor::start(
                gw,
                cfg,
                dutgate_executor::store::Store::new(db),
                auth,
                stop.clone(),
            )
            .await
            .unwrap();
            let app = dutgate_core::http::with_common_routes("executor", exec.router(), None);
            let _ = ready_tx.send(());
            let _ =
                dutgate_core::http::serve(listener, app, stop, Duration::from_millis(200)).await;
        });
        ready_rx.await.unwrap();
        self.executor = Some(Executorish {
            shutdown,
            runtime: Some(runtime),
        });
    }

    /// Drops the executor and every task it had, at once (its job processes keep running).
    pub fn kill_executor(&mut self) {
        if let Some(mut e) = self.executor.take() {
            e.shutdown.cancel();
            if let Some(rt) = e.runtime.take() {
                rt.shutdown_background();
            }
        }
    }

    pub async fn stop(mut self) {
        self.kill_executor();
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
        dutgate_pdu_dummy::forget(&self.device);
    }

    pub fn power(&self, n: u8) -> PowerState {
        dutgate_pdu_dummy::device(&self.device)
            .and_then(|d| d.state(&n.to_string()))
            .unwrap_or(PowerState::Unknown)
    }

    // ---- API helpers ----------------------------------------------------------------------

    pub async fn submit_raw(&self, yaml: &str, query: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/v1/jobs{query}", self.url))
            .bearer_auth(USER)
            .header("content-type", "application/x-yaml")
            .body(yaml.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn submit(&self, yaml: &str, query: &str) -> i64 {
        let r = self.submit_raw(yaml, query).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 201, "submission refused: {text}");
        serde_json::from_str::<Submitted>(&text).unwrap().id
    }

    pub async fn job(&self, id: i64) -> Job {
        self.http
            .get(format!("{}/api/v1/jobs/{id}", self.url))
            .bearer_auth(USER)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn events(&self, id: i64) -> Vec<Event> {
        self.http
            .get(format!("{}/api/v1/jobs/{id}/events", self.url))
            .bearer_auth(USER)
            .send()
            .await
            .unwrap()
            .json::<EventList>()
            .await
            .unwrap()
            .events
    }

    pub async fn console(&self, id: i64) -> String {
        let r = self
            .http
            .get(format!(
                "{}/api/v1/jobs/{id}/console?follow=false",
                self.url
            ))
            .bearer_auth(USER)
            .send()
            .await
            .unwrap();
        String::from_utf8_lossy(&r.bytes().await.unwrap()).into_owned()
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

    /// The pid of the job's process (from its `process_started` event).
    pub async fn job_pid(&self, id: i64) -> i32 {
        self.events(id)
            .await
            .iter()
            .rev()
            .find(|e| e.kind == "process_started")
            .and_then(|e| e.data["pid"].as_i64())
            .unwrap() as i32
    }

    pub async fn wait_machine(&self, id: MachineId, state: MachineState, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = self.mars.machine(id).await.unwrap();
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

pub fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// A job for the simulated DUTs: `script` for the first boot, `cont` for later ones.
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

/// The console each `sim=` script prints.
fn script_lines(script: &str) -> (Vec<(&'static str, u64)>, bool) {
    // (line, delay before it in ms), and whether the DUT then stays on silently.
    match script {
        "pass" => (
            vec![
                ("booting", 20),
                ("running tests", 20),
                ("RESULT: PASS", 20),
                ("SESSION END", 20),
            ],
            true,
        ),
        "warn" => (
            vec![
                ("booting", 20),
                ("WARNING: flaky fan", 20),
                ("RESULT: PASS", 20),
                ("SESSION END", 20),
            ],
            true,
        ),
        "fail" => (
            vec![("booting", 20), ("RESULT: FAIL", 20), ("SESSION END", 20)],
            true,
        ),
        // Output, then silence: no session_end.
        "hang" => (vec![("booting", 20), ("running tests", 20)], true),
        "silent" => (vec![], true),
        "reboot" => (vec![("booting", 20), ("REBOOT ME", 20)], true),
        // Prints the prompt; the echo and the end come from `sim_dut` once a line arrives.
        "echo" => (vec![("booting", 20), ("READY_FOR_INPUT", 20)], true),
        // The rest (bucket reads and writes, the end) comes from `bucket_session`.
        "bucket" => (vec![("booting", 20)], true),
        "unfit" => (vec![("booting", 20), ("MCE: Hardware Error", 20)], true),
        "watchdog" => (
            vec![
                ("booting", 20),
                ("wd start", 20),
                ("wd reset", 700),
                ("wd reset", 700),
                ("wd stop", 700),
                ("wd start", 20),
            ],
            true,
        ),
        "block" => (
            vec![("booting", 20), ("RESULT: PASS", 1000), ("SESSION END", 20)],
            true,
        ),
        "slow" => (
            vec![
                ("booting", 20),
                ("tick", 400),
                ("tick", 400),
                ("tick", 400),
                ("tick", 400),
                ("tick", 400),
                ("tick", 400),
                ("tick", 400),
                ("tick", 400),
                ("RESULT: PASS", 400),
                ("SESSION END", 20),
            ],
            true,
        ),
        _ => (vec![("unknown sim script", 0)], true),
    }
}

/// One simulated DUT on port `port` of the dummy PDU `device`.
async fn sim_dut(
    device: String,
    port: String,
    id: MachineId,
    boot_port: u16,
    netconsole: std::net::SocketAddr,
) {
    let boot = dutgate_boot::client::BootClient::new(
        format!("http://127.0.0.1:{boot_port}"),
        Some(Secret::new(ADMIN)),
    );
    // The PDU may switch a port off and on again within a few milliseconds (off delay 0):
    // a DUT notices every OFF in the device's switch log, not only the state it polls.
    let mut seen_sets = 0usize;
    let mut powered_off = move |device: &str, port: &str| -> bool {
        let Some(d) = dutgate_pdu_dummy::device(device) else {
            return true;
        };
        let log = d.stats().set_log;
        let new = &log[seen_sets.min(log.len())..];
        seen_sets = log.len();
        new.iter()
            .any(|(p, s)| p == port && *s == dutgate_pdu_driver::Switch::Off)
            || d.state(port) != Some(PowerState::On)
    };
    loop {
        // Power off: wait for power.
        while powered_off(&device, &port) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // "Firmware": what would the machine boot?
        let cmdline = match boot.get(id).await {
            Ok(Some(c)) => c.config.kernel.cmdline,
            _ => String::new(),
        };
        let script = cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("sim=").map(str::to_string))
            .unwrap_or_default();
        if script == "silent" {
            // A machine that never gets to print anything (dead serial, firmware hang).
            while !powered_off(&device, &port) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            continue;
        }
        let mut conn = match TcpStream::connect(netconsole).await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = conn
            .write_all(format!("SALAD.machine_id={id}\n").as_bytes())
            .await;
        let (lines, _) = script_lines(&script);
        let mut powered = true;
        for (line, delay) in lines {
            let end = tokio::time::Instant::now() + Duration::from_millis(delay);
            while tokio::time::Instant::now() < end {
                if powered_off(&device, &port) {
                    powered = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !powered {
                break;
            }
            if conn
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
        if script == "bucket" && powered {
            let mut out = bucket_session(&cmdline).await;
            out.push_str("RESULT: PASS\r\nSESSION END\r\n");
            let _ = conn.write_all(out.as_bytes()).await;
        }
        if script == "echo" && powered {
            // Read one line from the console (typed by a client through salad) and answer.
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline && !powered_off(&device, &port) {
                match tokio::time::timeout(Duration::from_millis(20), conn.read(&mut byte)).await {
                    Ok(Ok(1)) if byte[0] == b'\n' => break,
                    Ok(Ok(1)) => line.push(byte[0]),
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
            let answer = format!(
                "ECHO:{}\r\nRESULT: PASS\r\nSESSION END\r\n",
                String::from_utf8_lossy(&line).trim_end_matches('\r')
            );
            let _ = conn.write_all(answer.as_bytes()).await;
        }
        // Stay on (silently) until powered off.
        while powered && !powered_off(&device, &port) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(conn);
    }
}

/// Job bucket credentials the simulated DUTs were given, in the order they booted (bucket,
/// access key, secret key): the tests check that they stop working after the job.
pub static BUCKET_KEYS: std::sync::Mutex<Vec<(String, String, String)>> =
    std::sync::Mutex::new(Vec::new());

/// A DUT client for the S3 endpoint with the given keys.
pub fn s3_client(url: &str, access_key: &str, secret_key: &str) -> dutgate_storage::S3Client {
    dutgate_storage::S3Client::new(
        url,
        dutgate_sigv4::Signer::new(access_key, secret_key, "us-east-1"),
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .unwrap()
}

/// The object's contents, or the S3 status of the refusal.
pub async fn s3_read(
    c: &dutgate_storage::S3Client,
    bucket: &str,
    key: &str,
) -> Result<String, u16> {
    use futures::StreamExt;
    match c.get(bucket, key).await {
        Ok(body) => {
            let mut data = Vec::new();
            let mut s = std::pin::pin!(body.into_stream());
            while let Some(chunk) = s.next().await {
                data.extend_from_slice(&chunk.unwrap());
            }
            Ok(String::from_utf8_lossy(&data).into_owned())
        }
        Err(dutgate_storage::StorageError::Server { status, .. }) => Err(status),
        Err(e) => panic!("S3 GET {bucket}/{key}: {e}"),
    }
}

/// What a DUT does with its job bucket (`sim=bucket`): with the keys from its command line
/// (`s3= bucket= ak= sk= other=`, rendered from the job's template variables) it reads the
/// initial state, writes a result file and tries another job's bucket. Returns the console.
async fn bucket_session(cmdline: &str) -> String {
    let arg = |k: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k).map(str::to_string))
            .unwrap_or_default()
    };
    let (url, bucket, ak, sk, other) = (
        arg("s3="),
        arg("bucket="),
        arg("ak="),
        arg("sk="),
        arg("other="),
    );
    BUCKET_KEYS
        .lock()
        .unwrap()
        .push((bucket.clone(), ak.clone(), sk.clone()));
    let c = s3_client(&url, &ak, &sk);
    let mut out = String::new();
    match s3_read(&c, &bucket, "input/hello.txt").await {
        Ok(text) => out.push_str(&format!("INITIAL: {text}\r\n")),
        Err(status) => out.push_str(&format!("INITIAL: refused {status}\r\n")),
    }
    match c
        .put_bytes(
            &bucket,
            "results/out.txt",
            bytes::Bytes::from_static(b"written by the DUT"),
        )
        .await
    {
        Ok(()) => out.push_str("WROTE: results/out.txt\r\n"),
        Err(e) => out.push_str(&format!("WRITE FAILED: {e}\r\n")),
    }
    match s3_read(&c, &other, "secret.txt").await {
        Ok(text) => out.push_str(&format!("OTHER: read {text}\r\n")),
        Err(status) => out.push_str(&format!("OTHER: refused {status}\r\n")),
    }
    out
}
