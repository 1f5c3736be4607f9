//! The job's console: one TCP connection to the machine's salad console port for the whole
//! job (reconnected if salad restarts). Every byte is appended to `console.log` first — the
//! log is the job's record and what clients stream — then handed to the watcher.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dutgate_core::MachineId;
use dutgate_salad::client::SaladClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::control::Progress;

/// A running console attachment.
pub(crate) struct Console {
    pub rx: mpsc::UnboundedReceiver<Bytes>,
    stop: CancellationToken,
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Connects to the machine's console (the first connection must succeed: a job cannot run
/// without its console) and starts the reader.
pub(crate) async fn attach(
    salad: SaladClient,
    machine: MachineId,
    host: String,
    log: PathBuf,
    progress: Arc<watch::Sender<Progress>>,
) -> Result<Console, String> {
    let first = salad
        .connect(machine, &host)
        .await
        .map_err(|e| format!("console: {e}"))?;
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .await
        .map_err(|e| format!("console log {}: {e}", log.display()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    tokio::spawn(reader(
        salad,
        machine,
        host,
        first,
        file,
        tx,
        progress,
        stop.clone(),
    ));
    Ok(Console { rx, stop })
}

#[allow(clippy::too_many_arguments)]
async fn reader(
    salad: SaladClient,
    machine: MachineId,
    host: String,
    first: tokio::net::TcpStream,
    mut file: tokio::fs::File,
    tx: mpsc::UnboundedSender<Bytes>,
    progress: Arc<watch::Sender<Progress>>,
    stop: CancellationToken,
) {
    let mut sock = Some(first);
    let mut backoff = Duration::from_millis(100);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut s = match sock.take() {
            Some(s) => s,
            None => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                match salad.connect(machine, &host).await {
                    Ok(s) => {
                        tracing::info!(machine_id = %machine, "console reconnected");
                        s
                    }
                    Err(e) => {
                        tracing::warn!(machine_id = %machine, error = %e, "console reconnect failed");
                        continue;
                    }
                }
            }
        };
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = file.flush().await;
                    return;
                }
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
            };
            backoff = Duration::from_millis(100);
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            if let Err(e) = file.write_all(&chunk).await {
                tracing::error!(machine_id = %machine, error = %e, "cannot write the console log");
            }
            let _ = file.flush().await;
            progress.send_modify(|p| p.console_bytes += n as u64);
            let _ = tx.send(chunk);
        }
        tracing::warn!(machine_id = %machine, "console connection closed; reconnecting");
        let _ = s.shutdown().await;
    }
}
