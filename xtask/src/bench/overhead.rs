//! `cargo xtask bench overhead`: what the gateway adds between `dutctl run` and the DUT's
//! first console byte, on the virtual farm.
//!
//! Starts `dutgate up --virtual-duts 1` on ephemeral ports (the demo's farm,
//! [`crate::demo::start_farm`]), waits for the QEMU DUT to be trained and IDLE, then alternates:
//!
//! - **through the gateway**: `dutctl run examples/hello.yml`, timing (from the spawn of
//!   `dutctl`, on one monotonic clock) the arrival of the `phase running` event on dutctl's
//!   stderr (the power cycle is done: the VM process runs) and of the first byte on its stdout
//!   (the console, which salad relays from the line that binds the stream to the machine:
//!   the kernel's echo of its command line with `SALAD.machine_id=`);
//! - **the VM alone**: the very QEMU command line the virtual PDU ran for that job (read from
//!   `/proc`), with only two changes: iPXE's `bootfile` points at a plain HTTP server of this
//!   benchmark serving a script with the same kernel and initramfs, and the serial chardev
//!   connects to a plain socket of this benchmark instead of salad. Timed from the spawn of
//!   QEMU to the first byte of the same console line.
//!
//! The gateway's share of a run is its `dutctl run` → first byte minus the VM-alone time of
//! the run next to it; it includes the configured power-off delay of the power cycle, which
//! is also shown subtracted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::{append_table, stats};
use crate::demo;

/// The `-name` the virtual PDU gives the VM of its port 1 (pdu_id 1).
const VM_NAME: &str = "dutgate-vpdu-1-1";

/// One run through the gateway; seconds since the spawn of `dutctl run`.
struct GatewayRun {
    power_on: f64,
    first_byte: f64,
    off_delay: f64,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let runs = if args.quick { 1 } else { 5 };
    let load_before = loadavg();
    let state = std::env::temp_dir().join(format!("dutgate-bench-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    let config = state.join("gateway.yml");
    // The services find each other through their configured ports: the gateway starts on
    // candidate ports, and again on others when one turns out taken.
    let mut started = None;
    for _attempt in 0..10 {
        let ports = write_config(&config)?;
        let farm = demo::start_farm(&args.root, &state, 1, Some(&config), "bench overhead")?;
        if super::ports::gateway_listens(&state, &ports, &farm.log_path, Duration::from_secs(120))?
        {
            started = Some(farm);
            break;
        }
    }
    let mut farm = started.context("the gateway found a taken port on every attempt")?;
    let machine = farm.wait_idle(900)?;
    println!("bench overhead: {machine} is IDLE; {runs} run(s) of examples/hello.yml");

    let image = state.join("dut-image");
    let kernel = Arc::new(std::fs::read(image.join("vmlinuz")).context("reading vmlinuz")?);
    let initramfs =
        Arc::new(std::fs::read(image.join("initramfs.cpio")).context("reading initramfs.cpio")?);
    let job = args.root.join("examples").join("hello.yml");

    let mut gateway_runs = Vec::new();
    let mut alone = Vec::new();
    let mut first_serial = Vec::new();
    let mut qemu_argv: Option<Vec<String>> = None;
    for i in 0..runs {
        let share = state.join(format!("run-{i}"));
        let (g, argv) = gateway_run(&farm, &job, &share)?;
        println!(
            "run {i}: dutctl run → power-on {:.2} s, → first console byte {:.2} s",
            g.power_on, g.first_byte
        );
        gateway_runs.push(g);
        if qemu_argv.is_none() {
            qemu_argv = argv;
        }
        let Some(argv) = &qemu_argv else {
            bail!("the VM of port 1 ({VM_NAME}) was never seen in /proc during the job");
        };
        let (serial, marker) = vm_alone(argv, &machine, &kernel, &initramfs)?;
        println!(
            "run {i}: VM alone: first serial byte {serial:.2} s, first console line {marker:.2} s"
        );
        first_serial.push(serial);
        alone.push(marker);
    }
    drop(farm);
    let load_after = loadavg();

    let col = |v: &[f64]| -> Vec<String> {
        match stats(v) {
            Some(s) => vec![
                format!("{:.2}", s.median),
                format!("{:.2}", s.min),
                format!("{:.2}", s.max),
                s.n.to_string(),
            ],
            None => vec!["–".into(); 4],
        }
    };
    let submit_power: Vec<f64> = gateway_runs.iter().map(|g| g.power_on).collect();
    let power_byte: Vec<f64> = gateway_runs
        .iter()
        .map(|g| g.first_byte - g.power_on)
        .collect();
    let total: Vec<f64> = gateway_runs.iter().map(|g| g.first_byte).collect();
    let share: Vec<f64> = total.iter().zip(&alone).map(|(t, a)| t - a).collect();
    let share_no_off: Vec<f64> = gateway_runs
        .iter()
        .zip(&alone)
        .map(|(g, a)| g.first_byte - a - g.off_delay)
        .collect();
    let off = gateway_runs.first().map(|g| g.off_delay).unwrap_or(0.0);
    let mut rows = Vec::new();
    for (name, v) in [
        (
            format!("`dutctl run` → power-on (incl. {off:.1} s off delay)"),
            &submit_power,
        ),
        ("power-on → first console byte".to_string(), &power_byte),
        ("`dutctl run` → first console byte".to_string(), &total),
        (
            "VM alone: QEMU start → first serial byte (SeaBIOS)".to_string(),
            &first_serial,
        ),
        (
            "VM alone: QEMU start → same first console byte".to_string(),
            &alone,
        ),
        (
            "**gateway overhead** (total − VM alone)".to_string(),
            &share,
        ),
        (
            format!("gateway overhead without the {off:.1} s off delay"),
            &share_no_off,
        ),
    ] {
        let mut row = vec![name];
        row.extend(col(v));
        rows.push(row);
    }
    let command = if args.quick {
        "cargo xtask bench overhead --quick"
    } else {
        "cargo xtask bench overhead"
    };
    let notes = format!(
        "Seconds. One QEMU DUT under TCG (`dutgate up --virtual-duts 1`, debug build), \
         `examples/hello.yml`. Through the gateway: times since the spawn of `dutctl run` at \
         which dutctl showed the `phase running` event (power cycle done) and the first console \
         byte (the kernel's line with `SALAD.machine_id=`, from which salad relays the stream). \
         VM alone: the same QEMU command line read from /proc, iPXE fetching the same kernel and \
         initramfs from a plain HTTP server and the serial console going to a plain socket, \
         timed from the spawn of QEMU to the first byte of the same line; run alternately with \
         the gateway runs. The overhead is per pair of runs. Load average (1 min) {load_before} \
         before, {load_after} after{}.",
        if args.quick {
            "; a single run (`--quick`): a smoke test, not a figure"
        } else {
            ""
        }
    );
    if args.write {
        append_table(
            &args.root,
            "Gateway overhead: `dutctl run` to the DUT's first console byte",
            command,
            &["figure", "median", "min", "max", "runs"],
            &rows,
            &notes,
        )?;
    } else {
        for r in &rows {
            println!("{}", r.join(" | "));
        }
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

/// A config putting every service on a candidate port; returns the ports (salad's netconsole
/// last).
fn write_config(path: &Path) -> anyhow::Result<Vec<u16>> {
    let p = super::ports::candidates(8)?;
    std::fs::write(
        path,
        format!(
            "gateway:\n  bind_address: 127.0.0.1\n  ports: {{executor: {}, mars: {}, registry: {}, \
             boot: {}, pdu: {}, salad: {}, s3: {}}}\nsalad:\n  netconsole_port: {}\n",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(p)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// `dutctl run job` timed from its spawn; also the QEMU command line of the job's VM.
fn gateway_run(
    farm: &demo::VirtualFarm,
    job: &Path,
    share: &Path,
) -> anyhow::Result<(GatewayRun, Option<Vec<String>>)> {
    let start = Instant::now();
    let mut child = farm
        .dutctl(&["run"])
        .arg(job)
        .arg("--share-dir")
        .arg(share)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting dutctl run")?;
    let mut stdout = child.stdout.take().context("dutctl stdout")?;
    let stderr = child.stderr.take().context("dutctl stderr")?;
    let out_thread = std::thread::spawn(move || {
        let mut first = None;
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            first.get_or_insert_with(|| start.elapsed().as_secs_f64());
        }
        first
    });
    let err_thread = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            lines.push((start.elapsed().as_secs_f64(), line));
        }
        lines
    });
    let mut argv = None;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if argv.is_none() {
            argv = find_vm_argv();
        }
        if start.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            bail!("dutctl run did not end within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let first_byte = out_thread.join().ok().flatten();
    let lines = err_thread.join().unwrap_or_default();
    if status.code() != Some(0) {
        let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
        bail!("dutctl run ended with {status}:\n{}", text.join("\n"));
    }
    let power_on = lines
        .iter()
        .find(|(_, l)| l.contains("] phase running"))
        .map(|(t, _)| *t)
        .context("dutctl showed no `phase running` event")?;
    // `[    0.3s] phase power: power cycle (off 2.0 s)`
    let off_delay = lines
        .iter()
        .find_map(|(_, l)| l.split_once("power cycle (off ").map(|(_, r)| r))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let first_byte = first_byte.context("dutctl printed no console byte")?;
    Ok((
        GatewayRun {
            power_on,
            first_byte,
            off_delay,
        },
        argv,
    ))
}

/// The argv (without the program) of the running QEMU named [`VM_NAME`], if any.
fn find_vm_argv() -> Option<Vec<String>> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        if !name
            .to_str()
            .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_vm = args.first().is_some_and(|p| p.contains("qemu-system"))
            && args.windows(2).any(|w| w[0] == "-name" && w[1] == VM_NAME);
        if is_vm {
            return Some(args);
        }
    }
    None
}

fn answer(
    mut conn: TcpStream,
    script: &[u8],
    kernel: &[u8],
    initramfs: &[u8],
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    // Skip the headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let body: Option<&[u8]> = match path {
        "/boot.ipxe" => Some(script),
        "/vmlinuz" => Some(kernel),
        "/initramfs.cpio" => Some(initramfs),
        _ => None,
    };
    match body {
        Some(b) => {
            write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )?;
            conn.write_all(b)?;
        }
        None => conn.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")?,
    }
    conn.flush()
}

/// Kills the QEMU of a VM-alone run however the run ends.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One VM-alone boot: `argv` with its bootfile and serial socket replaced. Returns the seconds
/// from the spawn of QEMU to its first serial byte and to the first byte of the line holding
/// `SALAD.machine_id=`.
fn vm_alone(
    argv: &[String],
    machine: &str,
    kernel: &Arc<Vec<u8>>,
    initramfs: &Arc<Vec<u8>>,
) -> anyhow::Result<(f64, f64)> {
    let script = format!(
        "#!ipxe\nkernel http://10.0.2.2:{{port}}/vmlinuz SALAD.machine_id={machine} \
         console=ttyS0,115200 dutgate.run=true loglevel=6\ninitrd --name initrd0 \
         http://10.0.2.2:{{port}}/initramfs.cpio\nboot\n"
    );
    let http_port = serve_boot_with_port(script, kernel.clone(), initramfs.clone())?;
    let console = TcpListener::bind("127.0.0.1:0").context("binding the console socket")?;
    let console_port = console.local_addr()?.port();

    let mut args: Vec<String> = argv[1..].to_vec();
    let mut replaced = 0;
    for a in &mut args {
        if a.starts_with("user,") && a.contains("bootfile=") {
            *a = format!("user,id=n0,bootfile=http://10.0.2.2:{http_port}/boot.ipxe");
            replaced += 1;
        } else if a.starts_with("socket,id=con,") {
            *a = format!("socket,id=con,host=127.0.0.1,port={console_port},reconnect=2");
            replaced += 1;
        }
    }
    if replaced != 2 {
        bail!("unexpected QEMU command line of the virtual PDU: {argv:?}");
    }
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let vm = Vm(Command::new(&argv[0])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?);
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = console.accept() else {
            return;
        };
        let mut first = None;
        let mut line_start = None;
        let mut line = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            let now = start.elapsed().as_secs_f64();
            first.get_or_insert(now);
            for &b in &buf[..n] {
                line_start.get_or_insert(now);
                if b == b'\n' {
                    if String::from_utf8_lossy(&line).contains("SALAD.machine_id=") {
                        let _ = tx.send((first.unwrap_or(now), line_start.unwrap_or(now)));
                        return;
                    }
                    line.clear();
                    line_start = None;
                } else {
                    line.push(b);
                }
            }
        }
    });
    let got = rx
        .recv_timeout(Duration::from_secs(180))
        .context("the VM alone printed no SALAD.machine_id= line within 3 minutes")?;
    drop(vm);
    Ok(got)
}

/// Serves `boot.ipxe` (`script`, in which `{port}` becomes the server's port), `vmlinuz` and
/// `initramfs.cpio` over HTTP/1.0 on 127.0.0.1 (an ephemeral port) from a background thread;
/// returns the port.
fn serve_boot_with_port(
    script: String,
    kernel: Arc<Vec<u8>>,
    initramfs: Arc<Vec<u8>>,
) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the HTTP server")?;
    let port = listener.local_addr()?.port();
    let script = Arc::new(script.replace("{port}", &port.to_string()).into_bytes());
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let (script, kernel, initramfs) = (script.clone(), kernel.clone(), initramfs.clone());
            std::thread::spawn(move || {
                let _ = answer(conn, &script, &kernel, &initramfs);
            });
        }
    });
    Ok(port)
}
