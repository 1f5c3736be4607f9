//! `cargo xtask bench salad`: salad against ser2net on the same kind of pty, in the same run.
//!
//! Each relay gets its own socat pty pair (salad opens its ports exclusively). Measured per
//! relay: latency of 16-byte messages pty→TCP client and TCP client→pty (p50/p99, one
//! message in flight), throughput of a flood each way (every byte checked), and CPU seconds
//! the relay process spent per MB moved. ser2net runs twice on its pair: default `chardelay`
//! and `chardelay: false`. A last row measures one salad machine's latency while another
//! machine floods a client that stopped reading.
//!
//! Runs alternate the order of the relays. `-- <runs>` overrides the number of runs (3).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::{Stats, append_table, stats};

const MACHINE_A: &str = "52:54:00:be:0c:01";
const MACHINE_B: &str = "52:54:00:be:0c:02";
const MSG: usize = 16;

/// Child pids to kill if the benchmark gets stuck (a blocking pty read has no timeout).
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static PHASE: Mutex<String> = Mutex::new(String::new());

fn phase(p: &str) {
    *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = p.to_string();
    println!("  {p}");
}

struct Params {
    msgs: usize,
    warmup: usize,
    flood: usize,
    runs: usize,
}

/// A child process killed (and reaped) on drop.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn spawn(mut cmd: Command, name: &str, log: &Path) -> anyhow::Result<Proc> {
        let out = File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Reaped: its pid may be reused, so the watchdog must not kill it any more.
        let pid = self.child.id();
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
    }
}

fn require(program: &str, package: &str) -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .any(|d: PathBuf| d.join(program).is_file())
        })
        .unwrap_or(false);
    if !found {
        bail!("this benchmark needs `{program}`: apt-get install {package}");
    }
    Ok(())
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A socat pty pair; returns (process, DUT end, adapter end).
fn pty_pair(lab: &Path, name: &str) -> anyhow::Result<(Proc, PathBuf, PathBuf)> {
    let dut = lab.join(name);
    let adapter = lab.join(format!("{name}-adapter"));
    let mut cmd = Command::new("socat");
    cmd.arg("-d")
        .arg("-d")
        .arg(format!("pty,raw,echo=0,link={}", dut.display()))
        .arg(format!("pty,raw,echo=0,link={}", adapter.display()));
    let p = Proc::spawn(cmd, "socat", &lab.join(format!("{name}.socat.log")))?;
    wait_until("socat links", Duration::from_secs(5), || {
        dut.exists() && adapter.exists()
    })?;
    Ok((p, dut, adapter))
}

fn open_pty(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// A minimal HTTP/1.0 GET (xtask stays free of an HTTP client stack).
fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    http(port, "GET", path, "")
}

/// One HTTP/1.0 request to salad with the benchmark's admin token and a JSON body (may be
/// empty); (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The benchmark's own salad takes this admin token (nothing else listens with it).
const ADMIN_TOKEN: &str = "bench-admin-token";

fn json_number(body: &str, key: &str) -> Option<u64> {
    let at = body.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = body[at..]
        .chars()
        .skip_while(|c| c.is_whitespace())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Connects a client and makes sure the relay delivers to it: the DUT repeats a marker
/// until the client sees it, then whatever is left in flight is drained.
fn connect_synced(port: u16, dut: &mut File) -> anyhow::Result<TcpStream> {
    let mut client = None;
    wait_until("the relay's TCP port", Duration::from_secs(10), || {
        client = TcpStream::connect(("127.0.0.1", port)).ok();
        client.is_some()
    })?;
    let mut client = client.context("connect")?;
    client.set_nodelay(true)?;
    client.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.windows(6).any(|w| w == b"SYNC!\n") {
        if Instant::now() > deadline {
            bail!("the relay on port {port} never delivered DUT output");
        }
        dut.write_all(b"SYNC!\n")?;
        if let Ok(n) = client.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
    }
    client.set_read_timeout(Some(Duration::from_millis(300)))?;
    while let Ok(n) = client.read(&mut buf) {
        if n == 0 {
            bail!("the relay closed the connection");
        }
    }
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    Ok(client)
}

fn message(i: usize) -> [u8; MSG] {
    let mut m = [0u8; MSG];
    let s = format!("{i:015}\n");
    m.copy_from_slice(s.as_bytes());
    m
}

/// Round trips of 16-byte messages; microseconds per message.
fn latency(src: &mut dyn Write, dst: &mut dyn Read, p: &Params) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(p.msgs);
    let mut buf = [0u8; MSG];
    for i in 0..p.warmup + p.msgs {
        let m = message(i);
        let t0 = Instant::now();
        src.write_all(&m)?;
        dst.read_exact(&mut buf)?;
        let dt = t0.elapsed();
        if buf != m {
            bail!(
                "message {i} arrived corrupted: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        if i >= p.warmup {
            out.push(dt.as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// CPU seconds (user + system) `pid` has used so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on every Linux architecture we run on.
    Ok(ticks / 100.0)
}

/// Floods `data` from `src` to `dst`; returns (MB/s, intact).
fn flood<W, R>(mut src: W, dst: &mut R, data: &[u8]) -> anyhow::Result<(f64, bool)>
where
    W: Write + Send + 'static,
    R: Read,
{
    let owned = data.to_vec();
    let t0 = Instant::now();
    let writer = thread::spawn(move || -> std::io::Result<()> {
        for chunk in owned.chunks(64 * 1024) {
            src.write_all(chunk)?;
        }
        src.flush()
    });
    let mut got = 0usize;
    let mut intact = true;
    let mut buf = vec![0u8; 256 * 1024];
    while got < data.len() {
        let n = dst.read(&mut buf)?;
        if n == 0 {
            bail!("stream closed after {got} of {} bytes", data.len());
        }
        let end = (got + n).min(data.len());
        if buf[..end - got] != data[got..end] {
            intact = false;
        }
        got += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("flood writer panicked"))??;
    Ok((data.len() as f64 / 1e6 / secs, intact && got == data.len()))
}

#[derive(Default)]
struct Figures {
    to_tcp_us: Vec<f64>,
    to_pty_us: Vec<f64>,
    to_tcp_mbs: Vec<f64>,
    to_pty_mbs: Vec<f64>,
    cpu_per_mb: Vec<f64>,
    intact: bool,
    runs: usize,
}

impl Figures {
    fn new() -> Self {
        Figures {
            intact: true,
            ..Default::default()
        }
    }
}

/// Runs every measurement over an established pair of ends.
fn measure(
    fig: &mut Figures,
    dut: &mut File,
    client: &mut TcpStream,
    relay_pid: Option<u32>,
    p: &Params,
    data: &[u8],
) -> anyhow::Result<()> {
    phase("latency pty -> TCP");
    fig.to_tcp_us.extend(latency(dut, client, p)?);
    phase("latency TCP -> pty");
    fig.to_pty_us.extend(latency(client, dut, p)?);
    let cpu0 = relay_pid.map(cpu_seconds).transpose()?;
    phase("flood pty -> TCP");
    let (mbs, ok) = flood(dut.try_clone()?, client, data)?;
    fig.to_tcp_mbs.push(mbs);
    fig.intact &= ok;
    phase("flood TCP -> pty");
    let (mbs, ok) = flood(client.try_clone()?, dut, data)?;
    fig.to_pty_mbs.push(mbs);
    fig.intact &= ok;
    if let (Some(pid), Some(c0)) = (relay_pid, cpu0) {
        let used = cpu_seconds(pid)? - c0;
        fig.cpu_per_mb.push(used / (2.0 * data.len() as f64 / 1e6));
    }
    fig.runs += 1;
    Ok(())
}

fn dutgate_exe(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    Ok(super::cargo_build(args, &["--bin", "dutgate"])?.join("dutgate"))
}

struct SaladRun {
    _proc: Proc,
    pid: u32,
    http: u16,
}

fn start_salad(exe: &Path, lab: &Path, adapters: &[&Path]) -> anyhow::Result<SaladRun> {
    // Console ports: a free-looking range below the ephemeral ports (salad skips taken ones).
    let first = 20_000 + (std::process::id() % 500) as u16 * 20;
    let ports: Vec<String> = adapters
        .iter()
        .map(|a| format!("    - path: {}\n", a.display()))
        .collect();
    let log = lab.join("salad.log");
    // The REST port is a candidate, and another when salad reports it taken.
    let spawn = |http: &[u16]| {
        // Every client of the benchmark is on loopback: the one DUT network a config lists.
        let cfg = format!(
            "gateway:\n  state_dir: {state}\n  bind_address: 127.0.0.1\n  ports:\n    salad: {http}\n  log:\n    level: warn\n  auth:\n    dut_networks: [127.0.0.0/8]\n    admin_token: {ADMIN_TOKEN}\n\
             salad:\n  serial_ports:\n{ports}  netconsole_port: 0\n  rescan_interval_ms: 200\n  console_ports:\n    first: {first}\n    last: {last}\n",
            state = lab.join("state").display(),
            http = http[0],
            ports = ports.concat(),
            last = first + 19,
        );
        let cfg_path = lab.join("gateway.yml");
        std::fs::write(&cfg_path, cfg)?;
        let mut cmd = Command::new(exe);
        cmd.arg("--config").arg(&cfg_path).arg("salad");
        Proc::spawn(cmd, "dutgate salad", &log)
    };
    let (mut proc, http) = super::ports::start_on_candidates(
        "dutgate salad",
        1,
        &log,
        Duration::from_secs(20),
        spawn,
        |p: &mut Proc| &mut p.child,
    )?;
    let http = http[0];
    let pid = proc.pid();
    wait_until("salad /healthz", Duration::from_secs(20), || {
        http_get(http, "/healthz").is_ok_and(|(s, _)| s == 200)
    })?;
    proc.check_alive()?;
    Ok(SaladRun {
        _proc: proc,
        pid,
        http,
    })
}

/// Binds the adapter to `machine` as an admin does (salad binds an announcement only for a
/// machine mars expects, and this benchmark runs no mars) and returns the machine's console
/// port.
fn bind_machine(salad: &SaladRun, adapter: &Path, machine: &str) -> anyhow::Result<u16> {
    let adapter = adapter.display().to_string();
    let mut stream = None;
    wait_until("salad to open the adapter", Duration::from_secs(10), || {
        stream = http_get(salad.http, "/api/v1/ports")
            .ok()
            .and_then(|(_, b)| stream_id(&b, &adapter));
        stream.is_some()
    })?;
    let stream = stream.context("no stream id")?;
    let (status, body) = http(
        salad.http,
        "PUT",
        &format!("/api/v1/ports/{stream}/machine"),
        &format!("{{\"machine\":\"{machine}\"}}"),
    )?;
    if status != 204 {
        bail!("binding {adapter} to {machine}: HTTP {status}: {body}");
    }
    let bound = format!("\"machine\":\"{machine}\"");
    wait_until("the adapter to be bound", Duration::from_secs(10), || {
        http_get(salad.http, "/api/v1/ports").is_ok_and(|(_, b)| b.contains(&bound))
    })?;
    let (_, body) = http_get(salad.http, &format!("/api/v1/machine/{machine}"))?;
    json_number(&body, "tcp_port")
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("no tcp_port in {body}"))
}

/// The `id` of the stream named `name` in a `GET /api/v1/ports` body.
fn stream_id(body: &str, name: &str) -> Option<u64> {
    let ports: serde_json::Value = serde_json::from_str(body).ok()?;
    ports["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name || p["key"] == name)?["id"]
        .as_u64()
}

fn run_salad(
    exe: &Path,
    lab: &Path,
    p: &Params,
    data: &[u8],
    fig: &mut Figures,
    iso: &mut Figures,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(lab.join("state"));
    let (_sa, dut_a, adapter_a) = pty_pair(lab, "salad-a")?;
    let (_sb, dut_b, adapter_b) = pty_pair(lab, "salad-b")?;
    let salad = start_salad(exe, lab, &[&adapter_a, &adapter_b])?;
    let mut dut = open_pty(&dut_a)?;
    let port_a = bind_machine(&salad, &adapter_a, MACHINE_A)?;
    let mut client = connect_synced(port_a, &mut dut)?;
    measure(fig, &mut dut, &mut client, Some(salad.pid), p, data)?;
    drop(client);

    // Isolation: machine A floods a client that never reads; machine B's latency meanwhile.
    phase("latency of machine B while machine A floods a stalled client");
    let mut dut_b_file = open_pty(&dut_b)?;
    let port_b = bind_machine(&salad, &adapter_b, MACHINE_B)?;
    let mut client_b = connect_synced(port_b, &mut dut_b_file)?;
    let stalled = connect_synced(port_a, &mut dut)?;
    let mut flood_src = dut.try_clone()?;
    let big = data.to_vec();
    // 32 MB in all, whatever the flood size: well past salad's per-client queue (4 MiB) and
    // the kernel's socket buffers, so that the stalled client must be dropped.
    let repeats = ((32 << 20) / data.len().max(1)).max(2);
    let flooder = thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..repeats {
            for chunk in big.chunks(64 * 1024) {
                flood_src.write_all(chunk)?;
            }
        }
        Ok(())
    });
    let lat = latency(&mut dut_b_file, &mut client_b, p)?;
    iso.to_tcp_us.extend(lat);
    flooder
        .join()
        .map_err(|_| anyhow::anyhow!("flooder panicked"))??;
    // The stalled client must have been dropped: after what was in flight, it reads EOF.
    let mut s = stalled;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut sink = vec![0u8; 256 * 1024];
    let mut drained = 0usize;
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => drained += n,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                {
                    bail!("the stalled client was not disconnected");
                }
                break;
            }
        }
    }
    iso.intact &= drained < repeats * data.len();
    iso.runs += 1;
    Ok(())
}

fn run_ser2net(
    lab: &Path,
    p: &Params,
    data: &[u8],
    default: &mut Figures,
    nodelay: &mut Figures,
) -> anyhow::Result<()> {
    let (_s, dut_path, adapter) = pty_pair(lab, "ser2net")?;
    let mut dut = open_pty(&dut_path)?;
    // One ser2net per configuration, each on port 0: ser2net does not say which port it got,
    // so it is read from /proc. Stopping each one before the next also closes the device.
    for (name, options, fig) in [
        ("default", "", default),
        ("nodelay", "    chardelay: false\n", nodelay),
    ] {
        let cfg = format!(
            "%YAML 1.1\n---\n\
             connection: &{name}\n  accepter: tcp,127.0.0.1,0\n  enable: on\n  options:\n    kickolduser: true\n{options}  connector: serialdev,{dev},115200n81,local\n",
            dev = adapter.display()
        );
        let cfg_path = lab.join(format!("ser2net-{name}.yaml"));
        std::fs::write(&cfg_path, cfg)?;
        let mut cmd = Command::new("ser2net");
        cmd.arg("-n")
            .arg("-u")
            .arg("-c")
            .arg(&cfg_path)
            .arg("-P")
            .arg(lab.join(format!("ser2net-{name}.pid")));
        let mut proc = Proc::spawn(cmd, "ser2net", &lab.join(format!("ser2net-{name}.log")))?;
        let pid = proc.pid();
        let port =
            super::ports::bound_port(&mut proc.child, "ser2net", Duration::from_secs(10), |_| {
                true
            })?;
        let mut client = connect_synced(port, &mut dut)?;
        measure(fig, &mut dut, &mut client, Some(pid), p, data)?;
        drop(client);
        drop(proc);
    }
    Ok(())
}

fn run_baseline(lab: &Path, p: &Params, data: &[u8], fig: &mut Figures) -> anyhow::Result<()> {
    let (_s, a, b) = pty_pair(lab, "baseline")?;
    let mut a = open_pty(&a)?;
    let mut b = open_pty(&b)?;
    phase("baseline latency A -> B");
    fig.to_tcp_us.extend(latency(&mut a, &mut b, p)?);
    phase("baseline latency B -> A");
    fig.to_pty_us.extend(latency(&mut b, &mut a, p)?);
    phase("baseline flood");
    let (mbs, ok) = flood(a.try_clone()?, &mut b, data)?;
    fig.to_tcp_mbs.push(mbs);
    fig.intact &= ok;
    let (mbs, ok) = flood(b.try_clone()?, &mut a, data)?;
    fig.to_pty_mbs.push(mbs);
    fig.intact &= ok;
    fig.runs += 1;
    Ok(())
}

/// Kills the relays and exits if the benchmark is still running after `limit`; disarmed when
/// the returned guard is dropped (so `bench all` goes on past this benchmark).
fn watchdog(limit: Duration) -> std::sync::mpsc::Sender<()> {
    let (disarm, disarmed) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        if !matches!(
            disarmed.recv_timeout(limit),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        ) {
            return;
        }
        let phase = PHASE.lock().map(|p| p.clone()).unwrap_or_default();
        eprintln!("bench salad: stuck in phase {phase:?} after {limit:?}; giving up");
        for pid in CHILDREN.lock().map(|c| c.clone()).unwrap_or_default() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        std::process::exit(1);
    });
    disarm
}

fn lat(v: &[f64]) -> String {
    match stats(v) {
        Some(Stats { median, p99, .. }) => format!("{median:.0} / {p99:.0}"),
        None => "-".into(),
    }
}

fn med(v: &[f64], digits: usize) -> String {
    match stats(v) {
        Some(s) if s.n > 1 => format!(
            "{:.*} ({:.*}–{:.*})",
            digits, s.median, digits, s.min, digits, s.max
        ),
        Some(s) => format!("{:.*}", digits, s.median),
        None => "-".into(),
    }
}

fn p50(v: &[f64]) -> f64 {
    stats(v).map(|s| s.median).unwrap_or(f64::NAN)
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    require("socat", "socat")?;
    require("ser2net", "ser2net")?;
    let exe = dutgate_exe(args)?;
    let p = Params {
        msgs: if args.quick { 50 } else { 1000 },
        warmup: if args.quick { 5 } else { 100 },
        flood: if args.quick { 1 << 20 } else { 16 << 20 },
        runs: match args.extra.first() {
            Some(n) => n
                .parse()
                .context("the extra argument is the number of runs")?,
            None if args.quick => 1,
            None => 3,
        },
    };
    let _watchdog = watchdog(Duration::from_secs(120 + 180 * p.runs as u64));
    let lab = std::env::temp_dir().join(format!("dutgate-bench-salad-{}", std::process::id()));
    std::fs::create_dir_all(&lab)?;
    let data = payload(p.flood);
    let mut salad = Figures::new();
    let mut iso = Figures::new();
    let mut s2n_default = Figures::new();
    let mut s2n_nodelay = Figures::new();
    let mut base = Figures::new();
    let result = (|| -> anyhow::Result<()> {
        for run in 0..p.runs {
            println!("run {}/{}", run + 1, p.runs);
            if run % 2 == 0 {
                run_salad(&exe, &lab, &p, &data, &mut salad, &mut iso)?;
                run_ser2net(&lab, &p, &data, &mut s2n_default, &mut s2n_nodelay)?;
            } else {
                run_ser2net(&lab, &p, &data, &mut s2n_default, &mut s2n_nodelay)?;
                run_salad(&exe, &lab, &p, &data, &mut salad, &mut iso)?;
            }
            run_baseline(&lab, &p, &data, &mut base)?;
        }
        Ok(())
    })();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&lab);
    } else {
        eprintln!("bench salad: logs kept in {}", lab.display());
    }
    result?;

    let row = |name: &str, f: &Figures| -> Vec<String> {
        vec![
            name.to_string(),
            lat(&f.to_tcp_us),
            lat(&f.to_pty_us),
            med(&f.to_tcp_mbs, 1),
            med(&f.to_pty_mbs, 1),
            med(&f.cpu_per_mb, 3),
            if f.intact {
                "yes".into()
            } else {
                "**NO**".into()
            },
        ]
    };
    let rows = vec![
        row("salad", &salad),
        row("ser2net 4.3, default chardelay", &s2n_default),
        row("ser2net 4.3, `chardelay: false`", &s2n_nodelay),
        row("socat pty pair alone (floor)", &base),
        vec![
            "salad, machine B while machine A floods a stalled client".into(),
            lat(&iso.to_tcp_us),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            if iso.intact {
                "stalled client dropped".into()
            } else {
                "**stalled client not dropped**".into()
            },
        ],
    ];
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let notes = format!(
        "{runs} run(s), relays alternating; latency: {msgs} messages of 16 bytes, one in flight, p50 / p99 in µs \
         (pooled over runs); floods: {mb} MB each way, every byte compared; throughput and CPU: median (min–max) of runs; \
         CPU-s per MB: user+system time of the relay process over both floods. Ratios (ser2net ÷ salad, p50 pty→TCP): \
         default chardelay ×{r1:.1}, `chardelay: false` ×{r2:.1}; throughput pty→TCP salad ÷ ser2net `chardelay: false` ×{r3:.1}. \
         {profile} build of `dutgate`.",
        runs = p.runs,
        msgs = p.msgs,
        mb = p.flood >> 20,
        r1 = ratio(p50(&s2n_default.to_tcp_us), p50(&salad.to_tcp_us)),
        r2 = ratio(p50(&s2n_nodelay.to_tcp_us), p50(&salad.to_tcp_us)),
        r3 = ratio(p50(&salad.to_tcp_mbs), p50(&s2n_nodelay.to_tcp_mbs)),
        profile = if args.quick { "debug" } else { "release" },
    );
    let header = [
        "relay",
        "pty→TCP p50 / p99 (µs)",
        "TCP→pty p50 / p99 (µs)",
        "pty→TCP MB/s",
        "TCP→pty MB/s",
        "CPU-s per MB",
        "intact",
    ];
    for r in &rows {
        println!("{}", r.join(" | "));
    }
    println!("{notes}");
    if args.write && !args.quick {
        append_table(
            &args.root,
            "salad vs ser2net: serial console relay",
            "cargo xtask bench salad",
            &header,
            &rows,
            &notes,
        )?;
    }
    if !(salad.intact && s2n_default.intact && s2n_nodelay.intact && iso.intact) {
        bail!(
            "a relay lost or corrupted bytes, or a stalled client was not dropped (see the table)"
        );
    }
    Ok(())
}
