//! pdudaemon's API on the pdu service, against real peers: an SNMP PDU served by net-snmp
//! `snmpd`, a real mars that records which outlets are machines', labgrid (from PyPI, in a
//! venv under target/) driving its `PDUDaemonDriver` over the HTTP listener, and the TCP
//! listener spoken as LAVA's `pduclient` speaks it (one write, no newline, one read).
//!
//! Every switch is checked on the device (the agent's own outlet record and its log of SETs)
//! and through dutgate's read-back (the REST API), which is current as soon as pdudaemon's
//! answer arrives.

mod common;
#[path = "../../../pdu-drivers/snmp/tests/common/mod.rs"]
mod snmp_agent;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dutgate_core::audit::{AuditEntry, AuditLog};
use dutgate_core::auth::Auth;
use dutgate_core::config::GatewayConfig;
use dutgate_core::testing::run_ok;
use dutgate_core::{MachineId, PowerState, Secret};
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::{MachinePatch, Registration};
use dutgate_mars::power::HttpPower;
use dutgate_pdu::PduClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "pdudaemon-admin";
const SERVICE: &str = "pdudaemon-service";
const MODEL: &str = "apc_rpdu2";
const LABGRID: &str = "labgrid==26.0.1";
/// The outlet mars records as a machine's.
const MACHINE_PORT: usize = 5;
/// A port reserved in the config.
const RESERVED_PORT: usize = 8;
const T: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// `python3` of `target/labgrid-venv`, with labgrid installed from PyPI on first use (a venv
/// is not relocatable: it is built in place, and counts as done once its marker is written).
fn labgrid_python() -> PathBuf {
    let venv = target_dir().join("labgrid-venv");
    let marker = venv.join(format!(".installed-{LABGRID}"));
    let python = venv.join("bin").join("python3");
    std::fs::create_dir_all(target_dir()).expect("the target dir");
    // Other test processes may build it at the same time.
    let lock =
        std::fs::File::create(target_dir().join("labgrid-venv.lock")).expect("the venv lock file");
    lock.lock().expect("locking the venv");
    if marker.exists() && python.exists() {
        return python;
    }
    dutgate_core::testing::require_program("python3", "python3-venv");
    let _ = std::fs::remove_dir_all(&venv);
    run_ok(
        std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv),
        "python3 -m venv (Debian package python3-venv)",
    );
    run_ok(
        std::process::Command::new(venv.join("bin").join("pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            LABGRID,
        ]),
        &format!("pip install {LABGRID} (from PyPI)"),
    );
    std::fs::write(&marker, "").expect("the venv marker");
    python
}

/// A labgrid target with one `PDUDaemonPort` and its `PDUDaemonDriver`, built in code; reads
/// one driver method per line (`on`, `off`, `cycle`) and prints `done <step>` or
/// `error <step> <exception>` once the driver returns.
const LABGRID_SCRIPT: &str = r#"
import sys
from labgrid import Target
from labgrid.resource import PDUDaemonPort
from labgrid.driver import PDUDaemonDriver

host, pdu, index, delay = sys.argv[1:5]
target = Target("lab-device")
PDUDaemonPort(target, name=None, host=host, pdu=pdu, index=int(index))
driver = PDUDaemonDriver(target, name=None, delay=float(delay))
target.activate(driver)
print("ready", flush=True)
for line in sys.stdin:
    step = line.strip()
    try:
        getattr(driver, step)()
        print("done", step, flush=True)
    except Exception as e:
        print("error", step, type(e).__name__, str(e).replace("\n", " "), flush=True)
"#;

struct Labgrid {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Labgrid {
    async fn start(dir: &Path, host: SocketAddr, pdu: &str, index: usize) -> Self {
        let python = tokio::task::spawn_blocking(labgrid_python).await.unwrap();
        let script = dir.join("labgrid_power.py");
        std::fs::write(&script, LABGRID_SCRIPT).unwrap();
        let mut child = tokio::process::Command::new(python)
            .arg(&script)
            .args([&host.to_string(), pdu, &index.to_string(), "1.0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 of the labgrid venv");
        let stdin = child.stdin.take().unwrap();
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut lg = Self {
            child,
            stdin,
            lines,
        };
        assert_eq!(lg.line().await, "ready");
        lg
    }

    async fn line(&mut self) -> String {
        match tokio::time::timeout(T, self.lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            other => panic!("the labgrid script said nothing more: {other:?}"),
        }
    }

    /// Runs one driver method; `Ok` when it returned, `Err(exception)` when it raised.
    async fn step(&mut self, step: &str) -> Result<(), String> {
        self.stdin
            .write_all(format!("{step}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        let l = self.line().await;
        if l == format!("done {step}") {
            Ok(())
        } else {
            assert!(l.starts_with(&format!("error {step} ")), "{l}");
            Err(l)
        }
    }

    async fn stop(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(T, self.child.wait()).await;
    }
}

/// One request as LAVA's `pduclient` sends it: connect, one write of the line without a
/// newline, read the answer (from `source`, to try a peer outside the allowed networks).
async fn pduclient(addr: SocketAddr, source: Ipv4Addr, line: &str) -> String {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    let mut s = tokio::time::timeout(T, sock.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    s.write_all(line.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    answer
}

/// `(status, body)` of `GET http://{addr}{path}` from `source`.
async fn http_get(addr: SocketAddr, source: Ipv4Addr, path: &str) -> (u16, String) {
    let http = reqwest::Client::builder()
        .local_address(IpAddr::V4(source))
        .timeout(T)
        .build()
        .unwrap();
    let resp = http
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

const LOCAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// Loopback as well, but outside `pdudaemon.networks` (127.0.0.1/32).
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

struct Lab {
    agent: snmp_agent::Agent,
    pdu: dutgate_pdu::Running,
    stop_mars: CancellationToken,
    dir: tempfile::TempDir,
}

impl Lab {
    fn http(&self) -> SocketAddr {
        self.pdu.pdudaemon.http.expect("the HTTP listener")
    }

    fn tcp(&self) -> SocketAddr {
        self.pdu.pdudaemon.tcp.expect("the TCP listener")
    }

    fn rest(&self) -> PduClient {
        PduClient::new(self.pdu.url(), Some(Secret::new(ADMIN)))
    }

    async fn state(&self, port: usize) -> PowerState {
        self.rest()
            .port("lab", &port.to_string())
            .await
            .unwrap()
            .state
    }

    fn outlet(&self, port: usize) -> bool {
        self.agent.outlet(MODEL, port)
    }

    /// The SETs the agent applied to `port`, as `"<port> <1|2>"` (1: on, 2: off).
    fn sets(&self, port: usize) -> Vec<String> {
        let prefix = format!("{port} ");
        self.agent
            .set_log(MODEL)
            .into_iter()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }

    /// The SETs applied to every port but the machine's (mars may switch that one).
    fn lab_sets(&self) -> Vec<String> {
        let machine = format!("{MACHINE_PORT} ");
        self.agent
            .set_log(MODEL)
            .into_iter()
            .filter(|l| !l.starts_with(&machine))
            .collect()
    }

    async fn audit(&self) -> Vec<AuditEntry> {
        let v: serde_json::Value = self.rest().api().get("/api/v1/audit").await.unwrap();
        serde_json::from_value(v["entries"].clone()).unwrap()
    }
}

async fn start() -> Lab {
    let agent = tokio::task::spawn_blocking(|| snmp_agent::Agent::start(8))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mars_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pdu_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut gw = GatewayConfig {
        state_dir: dir.path().to_path_buf(),
        internal_host: "127.0.0.1".into(),
        ..Default::default()
    };
    gw.ports.mars = mars_listener.local_addr().unwrap().port();
    gw.ports.pdu = pdu_listener.local_addr().unwrap().port();
    gw.auth.admin_token = Some(Secret::new(ADMIN));
    gw.auth.dut_networks = Vec::new();
    std::fs::create_dir_all(gw.tokens_dir()).unwrap();
    std::fs::write(gw.tokens_dir().join("service"), SERVICE).unwrap();
    let auth = Auth::from_gateway(&gw);

    // mars first: the pdu service asks it about every pdudaemon request.
    let mars_db = dutgate_core::db::Db::open_sqlite(
        &dir.path().join("mars.db"),
        dutgate_mars::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let mut mars_config = dutgate_mars::Config::default();
    mars_config.training.enabled = false;
    let mars = Mars::new(
        dutgate_mars::store::Store::new(mars_db, "farm"),
        mars_config,
        std::sync::Arc::new(HttpPower::for_gateway(&gw, None)),
    );
    let stop_mars = CancellationToken::new();
    let router = dutgate_mars::start_with_audit(
        mars,
        auth.clone(),
        Some(AuditLog::new(&gw.state_dir, "mars")),
        stop_mars.clone(),
    )
    .unwrap();
    let app = dutgate_core::http::with_common_routes("mars", router, None);
    let token = stop_mars.clone();
    tokio::spawn(async move {
        let _ =
            dutgate_core::http::serve(mars_listener, app, token, Duration::from_millis(100)).await;
    });

    let pdu_db = dutgate_core::db::Db::open_sqlite(
        &dir.path().join("pdu.db"),
        dutgate_pdu::store::MIGRATIONS,
    )
    .await
    .unwrap();
    let config = dutgate_pdu::Config {
        pdus: common::pdus(&format!(
            "lab: {{driver: {MODEL}, config: {{host: 127.0.0.1, port: {}, community: private}}, \
             reserved: ['{RESERVED_PORT}']}}",
            agent.port
        )),
        pdudaemon: yaml_serde::from_str(
            "{http_listen: '127.0.0.1:0', tcp_listen: '127.0.0.1:0', \
             networks: [127.0.0.1/32], max_delay_seconds: 10}",
        )
        .unwrap(),
        ..common::fast_config()
    };
    let pdu = dutgate_pdu::start_on_gateway(
        pdu_listener,
        dutgate_pdu::store::Store::new(pdu_db),
        config,
        &gw,
        auth,
    )
    .await
    .unwrap();
    let lab = Lab {
        agent,
        pdu,
        stop_mars,
        dir,
    };

    // A dutgate machine on one outlet, as an admin records it.
    let mars = MarsClient::new(
        gw.internal_url(dutgate_core::ServiceName::Mars),
        Some(Secret::new(ADMIN)),
    );
    let id = mars
        .register(&Registration {
            base_name: "virtio".into(),
            tags: vec!["virtio:family:VIRTIO".parse().unwrap()],
            mac_address: MachineId::from_bytes([0x52, 0x54, 0x00, 0x00, 0x0d, 0x05]),
            ip_address: "10.0.2.15".parse().unwrap(),
            local_tty_device: Some("ttyS0".into()),
        })
        .await
        .unwrap()
        .id;
    mars.patch(
        id,
        &MachinePatch {
            pdu: Some(Some("lab".into())),
            pdu_port_id: Some(Some(MACHINE_PORT.to_string())),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    common::eventually(T, "the first poll of the PDU", || async {
        lab.state(1).await != PowerState::Unknown
    })
    .await;
    lab
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdudaemon_clients_switch_free_outlets_with_read_back() {
    let lab = start().await;
    assert!(!lab.outlet(3));

    // (a) labgrid's PDUDaemonDriver over the HTTP listener: on, off, cycle of port 3; each
    // answer comes once dutgate reads the state back.
    let mut lg = Labgrid::start(lab.dir.path(), lab.http(), "lab", 3).await;
    lg.step("on").await.unwrap();
    assert_eq!(lab.state(3).await, PowerState::On);
    assert!(lab.outlet(3));
    lg.step("off").await.unwrap();
    assert_eq!(lab.state(3).await, PowerState::Off);
    assert!(!lab.outlet(3));
    let before = std::time::Instant::now();
    lg.step("cycle").await.unwrap();
    assert!(
        before.elapsed() >= Duration::from_secs(1),
        "the driver's 1 s delay is the off time"
    );
    assert_eq!(lab.state(3).await, PowerState::On);
    assert!(lab.outlet(3));
    assert_eq!(lab.sets(3), ["3 1", "3 2", "3 2", "3 1"]);
    let history = lab.rest().history("lab", "3", 20).await.unwrap();
    let states: Vec<PowerState> = history.iter().map(|h| h.state).collect();
    assert_eq!(states.last(), Some(&PowerState::On), "{history:?}");
    assert!(states.contains(&PowerState::Off), "{history:?}");

    // (c) A dutgate machine's outlet is refused, and left alone.
    let sets = lab.lab_sets();
    let mut lg5 = Labgrid::start(lab.dir.path(), lab.http(), "lab", MACHINE_PORT).await;
    let e = lg5.step("on").await.unwrap_err();
    assert!(e.contains("500"), "{e}");
    lg5.stop().await;
    assert_eq!(
        http_get(
            lab.http(),
            LOCAL,
            &format!("/power/control/reboot?hostname=lab&port={MACHINE_PORT}&delay=0")
        )
        .await,
        (500, "Invalid request\n".into())
    );
    assert_eq!(
        pduclient(lab.tcp(), LOCAL, &format!("lab {MACHINE_PORT} on")).await,
        "nack\n"
    );
    // So is a reserved port.
    assert_eq!(
        pduclient(lab.tcp(), LOCAL, &format!("lab {RESERVED_PORT} on")).await,
        "nack\n"
    );
    assert_eq!(lab.lab_sets(), sets, "nothing was switched");
    assert!(!lab.outlet(MACHINE_PORT));
    assert!(!lab.outlet(RESERVED_PORT));

    // (b) The TCP listener as LAVA's pduclient speaks it; `04` is port 4 as in pdudaemon.
    assert_eq!(pduclient(lab.tcp(), LOCAL, "lab 04 on").await, "ack\n");
    assert_eq!(lab.state(4).await, PowerState::On);
    assert!(lab.outlet(4));
    assert_eq!(pduclient(lab.tcp(), LOCAL, "lab 4 reboot 0").await, "ack\n");
    assert_eq!(pduclient(lab.tcp(), LOCAL, "lab 4 off").await, "ack\n");
    assert_eq!(lab.state(4).await, PowerState::Off);
    assert!(!lab.outlet(4));
    assert_eq!(lab.sets(4), ["4 1", "4 2", "4 1", "4 2"]);

    // (d) A peer outside pdudaemon.networks is refused on both listeners.
    let sets = lab.lab_sets();
    assert_eq!(pduclient(lab.tcp(), OUTSIDER, "lab 2 on").await, "nack\n");
    assert_eq!(
        http_get(
            lab.http(),
            OUTSIDER,
            "/power/control/on?hostname=lab&port=2"
        )
        .await,
        (403, "Invalid request\n".into())
    );
    assert_eq!(lab.lab_sets(), sets);
    assert!(!lab.outlet(2));

    // (e) Unknown PDUs and ports, malformed requests: pdudaemon's answers.
    for path in [
        "/power/control/on?hostname=nope&port=1",
        "/power/control/on?hostname=lab&port=99",
        "/power/control/on?hostname=lab",
        "/power/control/on?port=1",
        "/power/control/reboot?hostname=lab&port=2&delay=x",
        "/power/control/reboot?hostname=lab&port=2&delay=11",
        "/power/control/on?alias=lab-2",
    ] {
        assert_eq!(
            http_get(lab.http(), LOCAL, path).await,
            (500, "Invalid request\n".into()),
            "{path}"
        );
    }
    assert_eq!(
        http_get(
            lab.http(),
            LOCAL,
            "/power/control/toggle?hostname=lab&port=2"
        )
        .await
        .0,
        404
    );
    for (line, answer) in [
        ("nope 1 on", "nack\n"),
        ("lab 99 on", "nack\n"),
        ("lab 2 toggle", "nack\n"),
        ("lab 2 reboot 11", "nack\n"),
        ("lab 2", "Unexpected data"),
        ("lab 2 on 1 1", "Unexpected data"),
        (
            "lab two on",
            "invalid literal for int() with base 10: 'two'",
        ),
    ] {
        assert_eq!(pduclient(lab.tcp(), LOCAL, line).await, answer, "{line}");
    }
    assert_eq!(lab.lab_sets(), sets, "nothing was switched");

    // Every switch and refusal is audited with the peer.
    let audit = lab.audit().await;
    let has = |actor: &str, action: &str, target: &str, outcome: &str| {
        audit.iter().any(|e| {
            e.actor == actor
                && e.action == action
                && e.target == target
                && e.outcome.starts_with(outcome)
        })
    };
    let me = "pdudaemon@127.0.0.1";
    assert!(
        has(me, "pdu.switch", "pdu/lab/port/3", "ok: on"),
        "{audit:#?}"
    );
    assert!(
        has(me, "pdu.switch", "pdu/lab/port/3", "ok: off"),
        "{audit:#?}"
    );
    assert!(
        has(me, "pdu.cycle", "pdu/lab/port/3", "ok: reboot, off 1 s"),
        "{audit:#?}"
    );
    assert!(
        has(me, "pdu.switch", "pdu/lab/port/4", "ok: on"),
        "{audit:#?}"
    );
    let machine_outlet = format!("pdu/lab/port/{MACHINE_PORT}");
    assert!(
        has(
            me,
            "pdu.switch",
            &machine_outlet,
            "refused: PDU \"lab\" port \"5\" is a dutgate machine's outlet"
        ),
        "{audit:#?}"
    );
    assert!(
        has(me, "pdu.cycle", &machine_outlet, "refused: "),
        "{audit:#?}"
    );
    assert!(
        has(
            me,
            "pdu.switch",
            &format!("pdu/lab/port/{RESERVED_PORT}"),
            "refused: "
        ),
        "{audit:#?}"
    );
    assert!(
        has(me, "pdu.switch", "pdu/nope/port/1", "refused: no PDU named"),
        "{audit:#?}"
    );
    let outsider = "pdudaemon@127.0.0.2";
    assert!(
        has(
            outsider,
            "pdu.pdudaemon",
            "pdudaemon/tcp",
            "refused: peer 127.0.0.2"
        ),
        "{audit:#?}"
    );
    assert!(
        has(
            outsider,
            "pdu.pdudaemon",
            "pdudaemon/http",
            "refused: peer 127.0.0.2"
        ),
        "{audit:#?}"
    );

    lg.stop().await;
    lab.stop_mars.cancel();
    lab.pdu.stop().await;
}

/// Unset listeners listen nowhere; a listener with no networks to answer, or answering a DUT
/// network, is a config error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_off_while_unset_and_need_networks() {
    let (db, _dir) = common::sqlite().await;
    let config = dutgate_pdu::Config {
        pdus: common::pdus("rack: {driver: dummy, config: {ports: 2, device: pdudaemon-off}}"),
        ..common::fast_config()
    };
    let r = common::start(&db, config.clone()).await;
    assert_eq!(r.pdudaemon, dutgate_pdu::pdudaemon::Bound::default());
    r.stop().await;

    let mut bad = config;
    bad.pdudaemon.tcp_listen = Some("127.0.0.1:0".parse().unwrap());
    let auth = Auth::new(Some(Secret::new(ADMIN)), None, vec![]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = dutgate_pdu::start_on(
        listener,
        dutgate_pdu::store::Store::new(db.clone()),
        bad.clone(),
        auth.clone(),
    )
    .await
    .err()
    .expect("no networks: refused");
    assert!(
        e.to_string().contains("pdu.pdudaemon.networks is empty"),
        "{e}"
    );

    let state = tempfile::tempdir().unwrap();
    let mut gw = GatewayConfig {
        state_dir: state.path().to_path_buf(),
        ..Default::default()
    };
    gw.auth.dut_networks = vec!["127.0.0.0/8".parse().unwrap()];
    bad.pdudaemon.networks = vec!["127.0.0.1/32".parse().unwrap()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = dutgate_pdu::start_on_gateway(
        listener,
        dutgate_pdu::store::Store::new(db.clone()),
        bad,
        &gw,
        auth,
    )
    .await
    .err()
    .expect("a DUT network: refused");
    assert!(
        e.to_string()
            .contains("overlaps the DUT network 127.0.0.0/8"),
        "{e}"
    );
}
