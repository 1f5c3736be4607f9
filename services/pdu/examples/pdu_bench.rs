//! The measurements behind `cargo xtask bench pdu` (run it through xtask, which builds this in
//! release mode and writes the table). One net-snmp `snmpd` agent plays a 24-outlet APC rack
//! PDU (pass_persist, the same script as the tests); on it, in one run:
//!
//! 1. reading the state of all 24 ports: one GETBULK walk of the status table vs 24 GETs,
//!    both through dutgate's SNMP driver and one long-lived session;
//! 2. switching all 24 ports on, then off (48 commands): dutgate's REST API (PATCH, each
//!    answer carrying the read-back state) vs pdudaemon's HTTP API driving the same agent
//!    through its `localcmdline` driver and `snmpset` (its SNMP driver is fixed to UDP 161),
//!    which cannot read anything back.
//!
//! Output: `ROW<TAB>figure<TAB>value` lines for xtask. Arguments: `[--quick]`.

#[path = "../../../pdu-drivers/snmp/tests/common/mod.rs"]
mod snmp_agent;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::Secret;
use dutgate_core::auth::Auth;
use dutgate_core::db::Db;
use dutgate_pdu::Switch;
use dutgate_pdu::store::{MIGRATIONS, Store};
use dutgate_pdu_driver::PduDriver;

const PORTS: usize = 24;
const CONTROL: &str = "1.3.6.1.4.1.318.1.1.12.3.3.1.1.4";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn p99(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * 0.99).round() as usize]
}

fn row(figure: &str, value: String) {
    println!("ROW\t{figure}\t{value}");
}

fn snmp_driver(port: u16) -> Box<dyn PduDriver> {
    let cfg = serde_json::json!({"host": "127.0.0.1", "port": port, "community": "private", "max_repetitions": 32});
    dutgate_pdu::drivers::registry()
        .build("apc_rpdu2", yaml_serde::to_value(cfg).expect("yaml"))
        .expect("driver")
}

async fn reads(agent: &snmp_agent::Agent, iterations: usize) -> (Vec<f64>, Vec<f64>) {
    let mut d = snmp_driver(agent.port);
    let ports = d.ports().await.expect("ports");
    assert_eq!(ports.len(), PORTS);
    let (mut walk, mut gets) = (Vec::new(), Vec::new());
    // Warm the session and the agent's handler.
    d.get_all().await.expect("walk");
    for i in 0..iterations {
        // Alternate the order so that neither method always runs on a warmer agent.
        for method in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            let t = Instant::now();
            if method == 0 {
                let all = d.get_all().await.expect("walk");
                assert_eq!(all.len(), PORTS);
                walk.push(t.elapsed().as_secs_f64() * 1000.0);
            } else {
                for p in &ports {
                    d.get(&p.id).await.expect("get");
                }
                gets.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
    (walk, gets)
}

fn start_pdudaemon(dir: &std::path::Path, agent_port: u16) -> (Killed, u16) {
    let bin = dutgate_core::testing::require_program("pdudaemon", "pdudaemon");
    // Port 0: pdudaemon binds a port of the kernel's choice, read back from /proc.
    let conf = serde_json::json!({
        "daemon": {"hostname": "127.0.0.1", "port": 0, "logging_level": "INFO", "listener": "http"},
        "pdus": {"bench": {
            "driver": "localcmdline",
            "cmd_on": format!("snmpset -v2c -c private 127.0.0.1:{agent_port} {CONTROL}.%s i 1"),
            "cmd_off": format!("snmpset -v2c -c private 127.0.0.1:{agent_port} {CONTROL}.%s i 2"),
        }},
    });
    let conf_path = dir.join("pdudaemon.conf");
    std::fs::write(&conf_path, conf.to_string()).expect("write pdudaemon.conf");
    let child = Command::new(bin)
        .arg("--conf")
        .arg(&conf_path)
        .arg("--logfile")
        .arg(dir.join("pdudaemon.log"))
        .args(["--loglevel", "INFO"])
        .env("MIBS", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pdudaemon");
    let mut k = Killed(child);
    let log = || std::fs::read_to_string(dir.join("pdudaemon.log")).unwrap_or_default();
    // A listening socket accepts connections from here on: no further wait is needed.
    let port = snmp_agent::bound_port(&mut k.0, "pdudaemon", false, Duration::from_secs(30), log);
    (k, port)
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let iterations = if quick { 5 } else { 200 };
    let switch_rounds = if quick { 1 } else { 3 };
    let agent = snmp_agent::Agent::start(PORTS);
    let work = tempfile::tempdir().expect("tempdir");

    // 1. Reading all ports.
    let (mut walk, mut gets) = reads(&agent, iterations).await;
    let (wm, gm) = (median(&mut walk), median(&mut gets));
    row(
        "read all 24 ports, one GETBULK walk (ms, median / p99)",
        format!("{wm:.2} / {:.2}", p99(&mut walk)),
    );
    row(
        "read all 24 ports, 24 GETs (ms, median / p99)",
        format!("{gm:.2} / {:.2}", p99(&mut gets)),
    );
    row(
        "walk speed-up over per-port GETs",
        format!("{:.1}×", gm / wm),
    );

    // 2. Switching: dutgate REST (with read-back) vs pdudaemon (write-only).
    let db = Db::open_sqlite(&work.path().join("pdu.db"), MIGRATIONS)
        .await
        .expect("db");
    let mut config = dutgate_pdu::Config {
        poll_interval_seconds: 3600.0,
        readback_interval_ms: 10,
        ..Default::default()
    };
    config.pdus = yaml_serde::from_str(&format!(
        "rack: {{driver: apc_rpdu2, config: {{host: 127.0.0.1, port: {}, community: private}}}}",
        agent.port
    ))
    .expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let auth = Auth::new(Some(Secret::new("bench")), None, vec![]);
    let svc = dutgate_pdu::start_on(listener, Store::new(db), config, auth)
        .await
        .expect("pdu service");
    let client = dutgate_pdu::PduClient::new(svc.url(), Some(Secret::new("bench")));
    let (_pdud, pdud_port) = start_pdudaemon(work.path(), agent.port);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client");
    // Warm both paths once.
    client.set("rack", "1", Switch::Off).await.expect("warm-up");
    let url = |state: &str, n: usize| {
        format!("http://127.0.0.1:{pdud_port}/power/control/{state}?hostname=bench&port={n}")
    };
    let r = http
        .get(url("off", 1))
        .send()
        .await
        .expect("pdudaemon warm-up");
    assert!(r.status().is_success(), "pdudaemon answered {}", r.status());

    let sets_before = agent.set_log("apc_rpdu2").len();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut ours_total, mut theirs_total) = (Vec::new(), Vec::new());
    for round in 0..switch_rounds {
        for who in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let t0 = Instant::now();
            for state in [Switch::On, Switch::Off] {
                for n in 1..=PORTS {
                    let t = Instant::now();
                    if who == 0 {
                        let res = client
                            .set("rack", &n.to_string(), state)
                            .await
                            .expect("PATCH");
                        assert_eq!(res.port.state, state.as_state());
                        ours.push(t.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        let word = if state == Switch::On { "on" } else { "off" };
                        let r = http.get(url(word, n)).send().await.expect("pdudaemon");
                        assert!(r.status().is_success(), "pdudaemon answered {}", r.status());
                        theirs.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
            let total = t0.elapsed().as_secs_f64();
            if who == 0 {
                ours_total.push(total)
            } else {
                theirs_total.push(total)
            }
        }
    }
    let sets = agent.set_log("apc_rpdu2").len() - sets_before;
    assert_eq!(
        sets,
        2 * 2 * PORTS * switch_rounds,
        "every command reached the agent"
    );
    let (om, tm) = (median(&mut ours), median(&mut theirs));
    row(
        "switch 24 ports on then off, dutgate REST with read-back (s per 48 commands, median; ms per command median / p99)",
        format!(
            "{:.2} s; {om:.1} / {:.1} ms",
            median(&mut ours_total),
            p99(&mut ours)
        ),
    );
    row(
        "switch 24 ports on then off, pdudaemon HTTP + localcmdline snmpset, no read-back (same)",
        format!(
            "{:.2} s; {tm:.1} / {:.1} ms",
            median(&mut theirs_total),
            p99(&mut theirs)
        ),
    );
    row("dutgate speed-up per command", format!("{:.1}×", tm / om));
    svc.stop().await;
}
