//! Simulated DUTs.
//!
//! A simulated DUT plays a machine: it watches its dummy PDU port; when the port goes ON it
//! "boots": reads its boot config (what iPXE would fetch), dials salad's netconsole ingest,
//! announces `SALAD.machine_id=<mac>` like the kernel cmdline echo does, and prints the
//! console its command line asks for (`sim=<script>`). When the port goes OFF it stops at
//! once, mid-line if need be.

use std::time::Duration;

use dutgate_core::{MachineId, PowerState, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ADMIN;

const LONG_TICKS: [&str; 20] = [
    "tick 1", "tick 2", "tick 3", "tick 4", "tick 5", "tick 6", "tick 7", "tick 8", "tick 9",
    "tick 10", "tick 11", "tick 12", "tick 13", "tick 14", "tick 15", "tick 16", "tick 17",
    "tick 18", "tick 19", "tick 20",
];

/// The console each `sim=` script prints: (line, delay before it in ms).
///
/// - `pass`, `warn`, `fail`: a verdict, then `SESSION END`.
/// - `hang`: output, then silence (no session end); `silent`: nothing at all.
/// - `reboot`: asks for a reboot (`REBOOT ME`); `unfit`: a machine check (`MCE: `).
/// - `echo`: prints `READY_FOR_INPUT`, answers the first line typed with `ECHO:<line>`.
/// - `bucket`: reads and writes its job bucket (keys from its command line).
/// - `watchdog`: a watchdog that is started, reset, stopped and started again.
/// - `block`: the verdict 1 s after boot; `slow`: `tick 1` … `tick 8`, 400 ms apart, then
///   PASS (about 4 s); `long`: the same with `tick 1` … `tick 20` (about 8 s).
pub fn script_lines(script: &str) -> Vec<(&'static str, u64)> {
    match script {
        "pass" => vec![
            ("booting", 20),
            ("running tests", 20),
            ("RESULT: PASS", 20),
            ("SESSION END", 20),
        ],
        "warn" => vec![
            ("booting", 20),
            ("WARNING: flaky fan", 20),
            ("RESULT: PASS", 20),
            ("SESSION END", 20),
        ],
        "fail" => vec![
            ("booting", 20),
            ("running tests", 20),
            ("RESULT: FAIL", 20),
            ("SESSION END", 20),
        ],
        "hang" => vec![("booting", 20), ("running tests", 20)],
        "silent" => vec![],
        "reboot" => vec![("booting", 20), ("REBOOT ME", 20)],
        "echo" => vec![("booting", 20), ("READY_FOR_INPUT", 20)],
        "bucket" => vec![("booting", 20)],
        "unfit" => vec![("booting", 20), ("MCE: Hardware Error", 20)],
        "watchdog" => vec![
            ("booting", 20),
            ("wd start", 20),
            ("wd reset", 700),
            ("wd reset", 700),
            ("wd stop", 700),
            ("wd start", 20),
        ],
        "block" => vec![("booting", 20), ("RESULT: PASS", 1000), ("SESSION END", 20)],
        "slow" => vec![
            ("booting", 20),
            ("tick 1", 400),
            ("tick 2", 400),
            ("tick 3", 400),
            ("tick 4", 400),
            ("tick 5", 400),
            ("tick 6", 400),
            ("tick 7", 400),
            ("tick 8", 400),
            ("RESULT: PASS", 400),
            ("SESSION END", 20),
        ],
        "long" => {
            let mut lines = vec![("booting", 20)];
            lines.extend(LONG_TICKS.iter().map(|t| (*t, 400)));
            lines.extend([("RESULT: PASS", 400), ("SESSION END", 20)]);
            lines
        }
        _ => vec![("unknown sim script", 0)],
    }
}

/// One simulated DUT on port `port` of the dummy PDU `device`. Runs until aborted.
pub(crate) async fn sim_dut(
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
        let mut powered = true;
        for (line, delay) in script_lines(&script) {
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
    .expect("an S3 client for the test endpoint")
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
                match chunk {
                    Ok(c) => data.extend_from_slice(&c),
                    Err(e) => panic!("S3 GET {bucket}/{key}: body: {e}"),
                }
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
    BUCKET_KEYS.lock().unwrap_or_else(|p| p.into_inner()).push((
        bucket.clone(),
        ak.clone(),
        sk.clone(),
    ));
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
