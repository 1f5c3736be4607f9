//! The virtual farm end to end: `dutgate up --virtual-duts 2 --no-discover` on ports below
//! the ephemeral range (started again on others if one turns out taken), two QEMU DUTs (TCG) netbooting the DUT image with iPXE from the
//! boot service, their consoles in salad through its netconsole port, powered by the `virtual`
//! PDU.
//!
//! 1. Port 1 is discovered (`dutctl machines discover virtual 1 --wait`); port 2 is only
//!    switched on (`dutctl pdus set virtual 2 on`): its VM registers by itself, waits for
//!    configuration, and is bound with `dutctl machines set`. Both train and become IDLE.
//! 2. `examples/hello.yml` targeted by a tag both machines registered PASSes and returns the
//!    file the DUT wrote (through the job bucket); at the same time a job whose command fails
//!    ends FAIL; the machine's read-only salad port replays the boot.
//! 3. Both machines are busy (hello.yml on the first, a job that sleeps 20 s more on the
//!    second, submitted with `--url`/`--token`); a tagged job queues behind them; the first
//!    machine is retired; the executor is killed (SIGKILL) mid-job and restarted by `dutgate
//!    up`: both running jobs still PASS, the retired machine, free first, takes nothing more
//!    and the queued job runs on the second machine. `nc` on the retired machine's console
//!    port (the quickstart's command) showed its boot live.
//! 4. A job whose kernel writes nothing to the watched console (`console=tty0`, no
//!    `SALAD.machine_id`) is power-cycled once by `first_console_activity` (`retries: 1`) and
//!    ends INCOMPLETE with an empty console.
//!
//! Peers: qemu-system-x86 + ipxe-qemu (the VMs), linux-image-amd64 + busybox-static (the DUT
//! image, built by `cargo xtask dut-image`), netcat-openbsd and curl (the quickstart's `nc`
//! line). Runs for about 5–6 minutes on 2 cores.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dutgate_core::testing::{children_of, listens_on_every_port, require_program};
use dutgate_e2e::farm::{self, Daemon, Farm, HELLO_RUN, hello_variant, root};
use dutgate_e2e::raw_http::{RawRequest, exchange};
use serde_json::Value;

#[path = "virtual_farm/dashboard.rs"]
mod dashboard;
#[path = "virtual_farm/executorctl.rs"]
mod executorctl;

/// A tag the DUT image's registration agent reports for every QEMU DUT (virtio NIC).
const COMMON_TAG: &str = "virtio:family:VIRTIO";

/// Port numbers nobody listened on a moment ago, below the kernel's ephemeral range: while a
/// service restarts, a client's outgoing connection could otherwise take its port as a source
/// port (even connect to itself) and keep it from listening again. Only candidates: another
/// process may take one before the gateway binds it, which [`start_gateway`] detects.
fn candidate_ports(n: usize) -> Vec<u16> {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768);
    // A start that differs between runs and attempts, so parallel runs rarely probe the same
    // ports.
    let span = u32::from(low.saturating_sub(10_000)).max(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id() ^ nanos;
    let mut port = 10_000 + (seed.wrapping_mul(7919) % span) as u16;
    let mut listeners = Vec::new();
    for _ in 0..u32::from(low) {
        if listeners.len() == n {
            break;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
        port = if port + 1 >= low { 10_000 } else { port + 1 };
    }
    assert_eq!(listeners.len(), n, "not enough free ports below {low}");
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as the gateway writes them
/// (`2026-11-22T14:40:17.123Z`).
fn rfc3339_secs(s: &str) -> f64 {
    let (date, clock) = s
        .trim_end_matches('Z')
        .split_once('T')
        .unwrap_or_else(|| panic!("not an RFC 3339 timestamp: {s}"));
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let c: Vec<f64> = clock.split(':').map(|x| x.parse().unwrap()).collect();
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days as f64 * 86_400.0 + c[0] * 3600.0 + c[1] * 60.0 + c[2]
}

/// The farm and the two ports the test speaks to directly.
struct Started {
    farm: Farm,
    executor_port: u16,
    salad_port: u16,
}

/// The pid of the `dutgate … executor` child of `dutgate up`.
fn executor_pid(farm: &Farm) -> Option<u32> {
    children_of(farm.gateway.child.id())
        .into_iter()
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline
                .split(|b| *b == 0)
                .rfind(|a| !a.is_empty())
                .is_some_and(|last| last == b"executor")
        })
}
fn start_farm(tmp: &Path) -> Started {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    require_program("nc", "netcat-openbsd");
    require_program("curl", "curl");
    assert!(
        Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists()
            || Path::new("/usr/lib/ipxe/qemu/pxe-virtio.rom").exists(),
        "the virtio iPXE ROM is missing: apt-get install ipxe-qemu"
    );
    let built = farm::build(tmp);
    let dutgate = built.bin.join("dutgate");
    let config = tmp.join("gateway.yml");
    let log = tmp.join("gateway.log");
    // The services find each other through their configured ports, so they cannot bind port
    // 0: the gateway starts on candidate ports and again on others when `up` refuses one or
    // a service reports it taken. It counts as started once its own children listen on
    // every port (another gateway answering on the same number is never taken for it).
    let deadline = Instant::now() + Duration::from_secs(120);
    for _attempt in 0..10 {
        let p = candidate_ports(8);
        // QEMU user networking NATs the DUTs to 127.0.0.1 (10.0.2.0/24 inside the guests):
        // the DUT networks an operator of this farm lists.
        std::fs::write(
            &config,
            format!(
                "gateway:\n  bind_address: 127.0.0.1\n  ports: {{executor: {}, mars: {}, registry: {}, boot: {}, pdu: {}, salad: {}, s3: {}}}\n  auth:\n    dut_networks: [127.0.0.0/8, \"::1/128\", 10.0.2.0/24]\nexecutor:\n  trusted_client_networks: [127.0.0.0/8]\nsalad:\n  netconsole_port: {}\n",
                p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
            ),
        )
        .unwrap();
        // The config the services will load is valid (what an operator checks first).
        farm::run_ok(
            Command::new(&dutgate)
                .arg("--config")
                .arg(&config)
                .arg("--state-dir")
                .arg(&built.state)
                .args(["config", "check"]),
            "dutgate config check",
        );
        let mut up = Command::new(&dutgate);
        up.arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&built.state)
            .args(["up", "--virtual-duts", "2", "--no-discover"]);
        let mut gateway = Daemon::spawn(up, log.clone());
        loop {
            let text = gateway.output();
            if let Ok(Some(status)) = gateway.child.try_wait() {
                assert!(
                    text.contains("is not available"),
                    "dutgate up exited ({status}):\n{}",
                    gateway.log_tail(80)
                );
                break;
            }
            if text.contains("Address already in use") {
                // Dropping the gateway stops it; the next attempt starts afresh.
                break;
            }
            if listens_on_every_port(gateway.child.id(), &p) {
                return Started {
                    farm: Farm {
                        gateway,
                        tmp: tmp.to_path_buf(),
                        state: built.state,
                        bin: built.bin,
                        netns: None,
                    },
                    executor_port: p[0],
                    salad_port: p[5],
                };
            }
            assert!(
                Instant::now() < deadline,
                "dutgate up did not listen on {p:?} within 120 s:\n{}",
                gateway.log_tail(80)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("dutgate up found a taken port on every attempt");
}

fn events_of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// What the machine's read-only salad port (`tcp_port_logs`) replays.
fn salad_replay(salad_port: u16, machine: &str) -> String {
    let salad: Value = {
        let s = TcpStream::connect(("127.0.0.1", salad_port)).unwrap();
        let req = RawRequest::get(&format!("/api/v1/machine/{machine}"));
        let r = exchange(s, &req.to_bytes("localhost"), Duration::from_secs(10)).unwrap();
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {} {}", r.status, r.body))
    };
    let logs_port = salad["tcp_port_logs"].as_u64().unwrap() as u16;
    let mut s = TcpStream::connect(("127.0.0.1", logs_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut replay = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        replay.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&replay).into_owned()
}

#[test]
fn virtual_farm_end_to_end() {
    let t0 = Instant::now();
    // Kept when the test fails (state dir, service logs, dutctl outputs); removed at the end.
    let tmp = tempfile::Builder::new()
        .prefix("dutgate-e2e-")
        .tempdir()
        .unwrap()
        .keep();
    let Started {
        mut farm,
        executor_port,
        salad_port,
    } = start_farm(&tmp);
    let job_timeout = Duration::from_secs(300);

    // The virtual PDU answers with its two ports, both off (nothing is discovered by itself).
    let ports = farm.wait_for("virtual PDU with 2 ports", Duration::from_secs(60), |f| {
        let v = f.json(&["pdus", "ports", "virtual"])?;
        let list = v.get("ports").cloned().unwrap_or(v);
        let list = list.as_array()?.clone();
        (list.len() == 2).then_some(list)
    });
    for p in &ports {
        assert!(
            p["state"]
                .as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("off")),
            "{p:#}"
        );
    }
    let start = Instant::now();

    // 1a. Port 1 is discovered: powered on by mars, its VM registers and is bound to it.
    let out = farm.dutctl_ok(&[
        "-o",
        "json",
        "machines",
        "discover",
        "virtual",
        "1",
        "--timeout",
        "300",
        "--wait",
    ]);
    let first: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(first["pdu"], "virtual", "{first:#}");
    assert_eq!(first["pdu_port_id"], "1", "{first:#}");
    let a = first["id"].as_str().unwrap().to_string();
    // The virtual PDU's MACs are 52:54:00:00:<pdu>:<port> (docs/quickstart.md names them).
    assert_eq!(a, "52:54:00:00:01:01");
    eprintln!(
        "[{:>5.1}s] port 1 discovered: {a}",
        t0.elapsed().as_secs_f64()
    );

    // 1b. Port 2 is only switched on: its VM netboots the default (registration) environment
    // and registers by itself, without a PDU port.
    farm.dutctl_ok(&["pdus", "set", "virtual", "2", "on"]);
    let b = farm.wait_for(
        "second machine registered by itself",
        Duration::from_secs(300),
        |f| {
            f.machines()
                .into_iter()
                .find(|m| m["id"] != a.as_str() && m["state"] == "WAIT_FOR_CONFIG")
        },
    );
    assert!(b["pdu"].is_null(), "{b:#}");
    assert!(b["pdu_port_id"].is_null(), "{b:#}");
    let b = b["id"].as_str().unwrap().to_string();
    assert_eq!(b, "52:54:00:00:01:02");
    eprintln!(
        "[{:>5.1}s] {b} registered by itself (WAIT_FOR_CONFIG)",
        t0.elapsed().as_secs_f64()
    );
    farm.dutctl_ok(&["machines", "set", &b, "--pdu", "virtual", "--port", "2"]);

    // Both train (2 loops) and go IDLE.
    farm.wait_for("two IDLE machines", Duration::from_secs(600), |f| {
        let m = f.machines();
        (m.len() == 2 && m.iter().all(|m| m["state"] == "IDLE")).then_some(())
    });
    let machines = farm.machines();
    for m in &machines {
        assert_eq!(m["pdu"], "virtual", "{m:#}");
        assert_eq!(m["local_tty_device"], "ttyS0", "{m:#}");
        let tags: Vec<&str> = m["tags"]
            .as_array()
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(tags.contains(&COMMON_TAG), "{m:#}");
    }
    assert_eq!(farm.machine(&b)["pdu_port_id"], "2");
    eprintln!(
        "[{:>5.1}s] both machines IDLE, {:.1} s after the discovery started",
        t0.elapsed().as_secs_f64(),
        start.elapsed().as_secs_f64()
    );

    dashboard::dashboard_in_a_browser(&mut farm, executor_port, [&a, &b]);
    executorctl::executorctl_drives_qemu_duts(&mut farm, executor_port, [&a, &b], COMMON_TAG);
    // 2. A tagged job PASSes with the file the DUT wrote; a failing job at the same time FAILs.
    let hello = root().join("examples").join("hello.yml");
    let failing = hello_variant(
        &tmp,
        "fail",
        &[(HELLO_RUN, "dutgate.run=\\\"echo about to fail; exit 7\\\"")],
    );
    let pass = farm.spawn_run("hello", &hello, &[], &["-t", COMMON_TAG]);
    let fail = farm.spawn_run("fail", &failing, &[], &[]);
    let pass_id = farm.wait_for("hello job id", Duration::from_secs(30), |_| pass.job_id());
    let pass = pass.wait_for_code(job_timeout, 0, "hello.yml did not PASS");
    assert!(pass.stdout.contains("Hello from"), "{}", pass.stdout);
    let console = std::fs::read_to_string(pass.share.join("console.log")).unwrap();
    assert!(
        console.contains("Execution is over, pipeline status: 0"),
        "{console}"
    );
    let written = std::fs::read_to_string(pass.share.join("bucket").join("hello.txt")).unwrap();
    assert!(written.starts_with("Hello from"), "{written}");
    let (job, _) = farm.job(pass_id).unwrap();
    assert_eq!(
        job["target"]["tags"],
        serde_json::json!([COMMON_TAG]),
        "{job:#}"
    );
    let fail = fail.wait_for_code(job_timeout, 3, "the failing job did not FAIL");
    assert!(
        fail.stdout
            .contains("Execution is over, pipeline status: 7"),
        "{}",
        fail.stdout
    );
    let ran_on = job["machine_id"].as_str().unwrap().to_string();
    let replay = salad_replay(salad_port, &ran_on);
    assert!(
        replay.contains("It's now safe to turn off your computer"),
        "{replay}"
    );
    eprintln!(
        "[{:>5.1}s] PASS and FAIL jobs done",
        t0.elapsed().as_secs_f64()
    );

    // 3. Both machines busy; a tagged job queues; machine A is retired; the executor is killed
    // mid-job. `nc` on A's console port (the quickstart's command line) watches A's boot.
    let nc_out = tmp.join("nc.out");
    let mut nc = Command::new("sh");
    nc.arg("-c").arg(format!(
        "exec nc 127.0.0.1 $(curl -s http://127.0.0.1:{salad_port}/api/v1/machine/{a} \
         | grep -o '\"tcp_port\":[0-9]*' | cut -d: -f2)"
    ));
    let nc = Daemon::spawn(nc, nc_out.clone());
    let slow = hello_variant(
        &tmp,
        "slow",
        &[(
            HELLO_RUN,
            "dutgate.run=\\\"echo Hello from $(uname -n) | tee hello.txt; sleep 20; echo slept\\\"",
        )],
    );
    let admin = farm.admin_token();
    let url = format!("http://127.0.0.1:{}", executor_port);
    let on_a = farm.spawn_run("on-a", &hello, &[], &["-i", &a]);
    let on_b = farm.spawn_run(
        "on-b",
        &slow,
        &["--url", &url, "--token", &admin],
        &["-i", &b],
    );
    farm.wait_for("both machines RUNNING", Duration::from_secs(60), |f| {
        let m = f.machines();
        (m.len() == 2 && m.iter().all(|m| m["state"] == "RUNNING")).then_some(())
    });
    let queued = farm.spawn_run("queued", &hello, &[], &["-t", COMMON_TAG]);
    let queued_id = farm.wait_for("queued job id", Duration::from_secs(30), |_| {
        queued.job_id()
    });
    let (job, _) = farm.job(queued_id).unwrap();
    assert_eq!(job["state"], "QUEUED", "{job:#}");
    farm.dutctl_ok(&["machines", "retire", &a, "--reason", "virtual farm test"]);
    assert_eq!(farm.machine(&a)["state"], "RETIRED");
    eprintln!(
        "[{:>5.1}s] job {queued_id} queued, {a} retired",
        t0.elapsed().as_secs_f64()
    );

    // Kill the executor once B's job has console output (it is mid-job).
    let on_b_id = farm.wait_for("job id on B", Duration::from_secs(30), |_| on_b.job_id());
    farm.wait_for(
        "console output of the job on B",
        Duration::from_secs(120),
        |f| {
            let (job, _) = f.job(on_b_id)?;
            (job["console_bytes"].as_u64().unwrap_or(0) > 0).then_some(())
        },
    );
    let old = executor_pid(&farm).expect("no executor child of dutgate up");
    let status = Command::new("kill")
        .args(["-KILL", &old.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let new = farm.wait_for("a restarted executor", Duration::from_secs(60), |f| {
        executor_pid(f).filter(|p| *p != old)
    });
    eprintln!(
        "[{:>5.1}s] executor {old} killed, {new} started by dutgate up",
        t0.elapsed().as_secs_f64()
    );
    farm.wait_for(
        "the restarted executor answering",
        Duration::from_secs(30),
        |f| f.job(on_b_id),
    );

    let on_a_id = on_a.job_id().unwrap();
    on_a.wait_for_code(job_timeout, 0, "the job on the retired machine");
    let on_b = on_b.wait_for_code(job_timeout, 0, "the job across the restart");
    assert!(on_b.stdout.contains("slept"), "{}", on_b.stdout);
    let written = std::fs::read_to_string(on_b.share.join("bucket").join("hello.txt")).unwrap();
    assert!(written.starts_with("Hello from"), "{written}");
    let (job_b, events_b) = farm.job(on_b_id).unwrap();
    assert_eq!(job_b["status"], "PASS", "{job_b:#}");
    assert!(
        events_of(&events_b, "executor")
            .iter()
            .any(|e| e["data"]["action"] == "attached"),
        "the restarted executor did not re-attach to job {on_b_id}: {events_b:#?}"
    );
    queued.wait_for_code(job_timeout, 0, "the queued job");
    let (job_q, _) = farm.job(queued_id).unwrap();
    assert_eq!(job_q["machine_id"], b.as_str(), "{job_q:#}");
    // A was free (and retired) well before B: the queued job waited for B. B's machine is
    // free once its teardown gave the lease back, which can be a moment before B's
    // `finished_at` is written (the job process records its end after the teardown): the
    // queued job must come after B's teardown began.
    let (job_a, _) = farm.job(on_a_id).unwrap();
    let a_free = rfc3339_secs(job_a["finished_at"].as_str().unwrap());
    let dispatched = rfc3339_secs(job_q["dispatched_at"].as_str().unwrap());
    let b_teardown = events_of(&events_b, "phase")
        .iter()
        .find(|e| e["data"]["phase"] == "teardown")
        .and_then(|e| e["at"].as_str())
        .map(rfc3339_secs)
        .unwrap_or_else(|| panic!("job {on_b_id} has no teardown phase: {events_b:#?}"));
    assert!(
        a_free < dispatched && b_teardown <= dispatched,
        "job on A finished at {a_free}, B's teardown began at {b_teardown}, queued job \
         dispatched at {dispatched}"
    );
    assert_eq!(farm.machine(&a)["state"], "RETIRED");
    drop(nc);
    let watched = std::fs::read_to_string(&nc_out).unwrap_or_default();
    assert!(
        watched.contains("dutgate-dut: DUT environment up") && watched.contains("Hello from"),
        "nc on {a}'s console port showed:\n{watched}"
    );
    eprintln!(
        "[{:>5.1}s] retired machine skipped; queued job ran on {b}",
        t0.elapsed().as_secs_f64()
    );

    // 4. A DUT whose console never reaches the gateway: the kernel and /init write to tty0
    // only and nothing binds the stream to the machine. Power-cycled once, then INCOMPLETE.
    let silent = hello_variant(
        &tmp,
        "silent",
        &[
            (
                "first_console_activity:\n    minutes: 2",
                "first_console_activity:\n    seconds: 30\n    retries: 1",
            ),
            ("        - \"SALAD.machine_id={{ machine_id }}\"\n", ""),
            ("console={{ local_tty_device }},115200", "console=tty0"),
        ],
    );
    let silent = farm.spawn_run("silent", &silent, &[], &["-i", &b]);
    let silent_id = farm.wait_for("silent job id", Duration::from_secs(30), |_| {
        silent.job_id()
    });
    silent.wait_for_code(job_timeout, 4, "the silent job");
    let (job_s, events_s) = farm.job(silent_id).unwrap();
    assert_eq!(job_s["status"], "INCOMPLETE", "{job_s:#}");
    assert_eq!(job_s["console_bytes"], 0, "{job_s:#}");
    assert!(
        job_s["reason"]
            .as_str()
            .is_some_and(|r| r.contains("first_console_activity")),
        "{job_s:#}"
    );
    let timeouts = events_of(&events_s, "timeout");
    assert_eq!(timeouts.len(), 2, "{events_s:#?}");
    assert_eq!(timeouts[0]["data"]["action"], "retry", "{events_s:#?}");
    assert_eq!(timeouts[1]["data"]["action"], "abort", "{events_s:#?}");
    assert_eq!(events_of(&events_s, "retry").len(), 1, "{events_s:#?}");
    let power_cycles = events_of(&events_s, "phase")
        .into_iter()
        .filter(|e| e["data"]["phase"] == "power")
        .count();
    assert_eq!(power_cycles, 2, "{events_s:#?}");
    assert!(
        events_of(&events_s, "console_activity").is_empty(),
        "{events_s:#?}"
    );
    eprintln!(
        "[{:>5.1}s] silent console: INCOMPLETE after one retry; whole test {:.1} s",
        t0.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop(farm);
    std::fs::remove_dir_all(&tmp).unwrap();
}
