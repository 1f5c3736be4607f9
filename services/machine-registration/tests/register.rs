//! Acceptance: `machine-registration register` and `check` against a running mars (in this
//! process, on 127.0.0.1:0) over a socat pty pair whose other end this test drives, playing
//! salad (answers `SALAD.pong`, reads the `SALAD.machine_id=` and result lines).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dutgate_core::auth::Auth;
use dutgate_core::db::testing::databases;
use dutgate_core::{MachineId, Secret};
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::Registration;
use dutgate_mars::power::MemoryPower;
use dutgate_mars::store::{MIGRATIONS, Store};
use tokio_util::sync::CancellationToken;

const AGENT: &str = env!("CARGO_BIN_EXE_machine-registration");

struct Socat {
    child: Child,
    dut: PathBuf,
    gateway: PathBuf,
}

impl Drop for Socat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pty pair: `dut` is the DUT's serial port, `gateway` the adapter salad would own.
fn pty_pair(dir: &Path, name: &str) -> Socat {
    let socat = dutgate_core::testing::require_program("socat", "socat");
    let dut = dir.join(format!("{name}-dut"));
    let gateway = dir.join(format!("{name}-gw"));
    let child = Command::new(socat)
        .arg(format!("pty,raw,echo=0,link={}", dut.display()))
        .arg(format!("pty,raw,echo=0,link={}", gateway.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(dut.exists() && gateway.exists()) {
        assert!(Instant::now() < deadline, "socat did not create the ptys");
        std::thread::sleep(Duration::from_millis(10));
    }
    Socat {
        child,
        dut,
        gateway,
    }
}

/// Plays salad on `port` until `stop`: answers pings, records every line it reads.
/// Returns once the port is open, with the thread playing it.
fn play_salad(
    port: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let player = std::thread::spawn(move || {
        let mut f = machine_registration::serial::open_raw(&port).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 512];
        let mut line = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            match f.read(&mut buf) {
                Ok(n) if n > 0 => {
                    for &b in &buf[..n] {
                        if b != b'\n' {
                            line.push(b);
                            continue;
                        }
                        let l = String::from_utf8_lossy(&line)
                            .trim_end_matches('\r')
                            .to_string();
                        line.clear();
                        if l.contains("SALAD.ping") {
                            machine_registration::serial::write_all(
                                &mut f,
                                b"SALAD.pong\n",
                                Instant::now() + Duration::from_secs(2),
                            )
                            .unwrap();
                        }
                        if !l.is_empty() {
                            lines.lock().unwrap().push(l);
                        }
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    player
}

async fn run_agent(args: Vec<String>) -> (i32, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(AGENT).args(&args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    })
    .await
    .unwrap()
}

fn wait_for_line(lines: &Arc<Mutex<Vec<String>>>, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if lines.lock().unwrap().iter().any(|l| l.contains(want)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "salad never read {want:?}; it read {:?}",
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_and_check_over_a_pty_pair() {
    // mars, on an ephemeral port.
    let db = databases("mars", MIGRATIONS).await.remove(0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mars = Mars::new(
        Store::new(db.db.clone(), "farm"),
        dutgate_mars::Config::default(),
        Arc::new(MemoryPower::default()),
    );
    let auth = Auth::new(
        Some(Secret::new("adm")),
        None,
        dutgate_core::config::default_dut_networks(),
    );
    let shutdown = CancellationToken::new();
    let router = dutgate_mars::start(mars, auth, shutdown.clone()).unwrap();
    let app = dutgate_core::http::with_common_routes("mars", router, None);
    let token = shutdown.clone();
    let server = tokio::spawn(async move {
        let _ = dutgate_core::http::serve(listener, app, token, Duration::from_millis(100)).await;
    });
    let client = MarsClient::new(&url, Some(Secret::new("adm")));

    let dir = tempfile::tempdir().unwrap();
    // A port nobody answers on, and the one wired to "salad": both are tried in parallel.
    let silent = pty_pair(dir.path(), "silent");
    let wired = pty_pair(dir.path(), "wired");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let player = play_salad(wired.gateway.clone(), lines.clone(), stop.clone());

    let base = vec![
        "--mars-url".to_string(),
        url.clone(),
        "--tty".into(),
        silent.dut.display().to_string(),
        "--tty".into(),
        wired.dut.display().to_string(),
        "--serial-timeout".into(),
        "5".into(),
    ];
    let mut args = vec!["register".to_string()];
    args.extend(base.clone());
    let (code, out) = run_agent(args).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("MaRS: Registration complete"), "{out}");

    // The handshake and the result line went over the wired port.
    let machines = client.machines().await.unwrap();
    assert_eq!(machines.len(), 1, "{machines:?}");
    let m = &machines[0];
    wait_for_line(&lines, &format!("SALAD.machine_id={}", m.id));
    wait_for_line(&lines, "MaRS: Registration complete");
    let pts = std::fs::canonicalize(&wired.dut).unwrap();
    assert_eq!(
        m.local_tty_device.as_deref(),
        pts.to_str().unwrap().strip_prefix("/dev/")
    );
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert!(
        m.tags
            .iter()
            .any(|t| t.as_str() == format!("cpu:cores:{cores}")),
        "{:?}",
        m.tags
    );
    assert!(m.tags.iter().any(|t| t.as_str().starts_with("mem:size:")));

    // check: the record matches → exit 0, and the machine id is announced on the console.
    let mut args = vec!["check".to_string()];
    args.extend(base.clone());
    let (code, out) = run_agent(args.clone()).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("MaRS: check passed"), "{out}");

    // The stored record differs (as if the hardware had changed): each mismatch is printed,
    // exit 1.
    let id: MachineId = m.id;
    let mut changed = Registration {
        base_name: m.base_name.clone(),
        tags: m.tags.clone(),
        mac_address: id,
        ip_address: "10.0.2.200".parse().unwrap(),
        local_tty_device: m.local_tty_device.clone(),
    };
    changed.tags.push("gpu:amd:navi21".parse().unwrap());
    client.register(&changed).await.unwrap();
    let (code, out) = run_agent(args).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("Mismatch for 'ip_address'"), "{out}");
    assert!(
        out.contains("Mismatch for 'tags'") && out.contains("gpu:amd:navi21"),
        "{out}"
    );

    // Nobody answers and mars is gone: a clear failure line, exit 1.
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("mars stops within 10 s")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !player.is_finished() {
        assert!(Instant::now() < deadline, "the salad player did not stop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (code, out) = run_agent(vec![
        "register".into(),
        "--mars-url".into(),
        url.clone(),
        "--tty".into(),
        silent.dut.display().to_string(),
        "--serial-timeout".into(),
        "0.5".into(),
    ])
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no serial port answered"), "{out}");
    assert!(out.contains("MaRS: Registration failed: "), "{out}");
    drop((silent, wired));
    db.cleanup().await;
}

#[tokio::test]
async fn probe_prints_sensible_tags() {
    let (code, out) = run_agent(vec!["probe".into(), "--json".into()]).await;
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let tags: Vec<String> = v["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    for prefix in ["cpu:cores:", "cpu:model:", "cpu:arch:", "mem:size:"] {
        assert!(
            tags.iter().any(|t| t.starts_with(prefix)),
            "no {prefix}: {tags:?}"
        );
    }
    if Path::new("/sys/bus/pci/devices").exists() {
        assert!(tags.iter().any(|t| t.starts_with("pci:")), "{tags:?}");
    }
    // Every tag is acceptable to mars.
    for t in &tags {
        dutgate_core::Tag::parse(t).unwrap();
    }
    assert!(!v["base_name"].as_str().unwrap().is_empty());
}
