//! Simulated DUTs for hundreds of machines.
//!
//! Like the harness' simulated DUTs (`dutgate_executor::testing::sim`) they watch their dummy
//! PDU port, and when it goes ON they read their boot config, dial salad's netconsole ingest,
//! announce `SALAD.machine_id=<mac>` and print a console; OFF stops them at once. Unlike them,
//! one task polls every port (a cheap state read per port every 5 ms) and wakes only the DUTs
//! whose power changed, so 300 idle DUTs cost next to nothing. State polling needs an off
//! delay longer than the poll period (the farm's is hundreds of milliseconds).
//!
//! The console of a job: `lines` lines of about 80 bytes, `line_ms` apart, then the verdict
//! and the session end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dutgate_core::{MachineId, PowerState, Secret};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct Script {
    pub lines: u32,
    pub line_ms: u64,
}

/// Counters of the simulated DUTs.
#[derive(Default)]
pub struct DutStats {
    /// Boots (power-ons that reached the console).
    pub boots: AtomicU64,
    /// Console bytes written to salad.
    pub bytes: AtomicU64,
    /// Boots that found no boot config or could not reach salad.
    pub failed_boots: AtomicU64,
}

/// Starts one DUT per `(port, machine)` of the dummy device and the poller. Runs until
/// `stop`.
pub fn start(
    device: String,
    duts: Vec<(String, MachineId)>,
    boot_url: String,
    netconsole: SocketAddr,
    script: Arc<Script>,
    stats: Arc<DutStats>,
    stop: CancellationToken,
) {
    let mut senders = Vec::with_capacity(duts.len());
    for (port, id) in duts {
        let (tx, rx) = watch::channel(false);
        senders.push((port, tx));
        tokio::spawn(dut(
            id,
            rx,
            boot_url.clone(),
            netconsole,
            script.clone(),
            stats.clone(),
            stop.clone(),
        ));
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(d) = dutgate_pdu_dummy::device(&device) else {
                continue;
            };
            for (port, tx) in &senders {
                let on = d.state(port) == Some(PowerState::On);
                if *tx.borrow() != on {
                    let _ = tx.send(on);
                }
            }
        }
    });
}

/// One DUT: boots on power, prints its console, stops on power loss.
async fn dut(
    id: MachineId,
    mut power: watch::Receiver<bool>,
    boot_url: String,
    netconsole: SocketAddr,
    script: Arc<Script>,
    stats: Arc<DutStats>,
    stop: CancellationToken,
) {
    let boot = dutgate_boot::client::BootClient::new(boot_url, Some(Secret::new(super::ADMIN)));
    loop {
        // Off: wait for power.
        tokio::select! {
            _ = stop.cancelled() => return,
            r = power.wait_for(|on| *on) => if r.is_err() { return },
        }
        let session = async {
            // "Firmware": what would the machine boot?
            let cmdline = match boot.get(id).await {
                Ok(Some(c)) => c.config.kernel.cmdline,
                _ => String::new(),
            };
            if !cmdline.split_whitespace().any(|w| w == "sim=farm") {
                stats.failed_boots.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let Ok(mut conn) = TcpStream::connect(netconsole).await else {
                stats.failed_boots.fetch_add(1, Ordering::Relaxed);
                return;
            };
            stats.boots.fetch_add(1, Ordering::Relaxed);
            let hello = format!("SALAD.machine_id={id}\n");
            if conn.write_all(hello.as_bytes()).await.is_err() {
                return;
            }
            stats.bytes.fetch_add(hello.len() as u64, Ordering::Relaxed);
            for i in 1..=script.lines {
                tokio::time::sleep(Duration::from_millis(script.line_ms)).await;
                let line = format!(
                    "[{:>8.3}] farm: test {i:03} of {:03} on {id} ........................ ok\r\n",
                    f64::from(i) * script.line_ms as f64 / 1000.0,
                    script.lines
                );
                if conn.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                stats.bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
            }
            let end = "RESULT: PASS\r\nSESSION END\r\n";
            if conn.write_all(end.as_bytes()).await.is_ok() {
                stats.bytes.fetch_add(end.len() as u64, Ordering::Relaxed);
            }
            // Stay on (silently, connected) until powered off.
            std::future::pending::<()>().await;
        };
        // Power loss ends the session at once, mid-line if need be.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = session => {}
            r = power.wait_for(|on| !*on) => if r.is_err() { return },
        }
        // A session that ended on its own (no config) waits for the power to go.
        tokio::select! {
            _ = stop.cancelled() => return,
            r = power.wait_for(|on| !*on) => if r.is_err() { return },
        }
    }
}
