//! The job process's local control socket (`jobs/<id>/control.sock`): how an executor — the
//! one that started the process, or a new one after a restart — follows a running job.
//!
//! The process writes one JSON [`Progress`] line whenever its console log grows or it stores
//! an event; the socket closes when the process exits. Live console and event streams of the
//! API wake up on these lines instead of polling the file and the database.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What changed in a running job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes in the job's console log.
    pub console_bytes: u64,
    /// Last stored event.
    pub event_seq: i64,
    /// The final status is stored.
    pub finished: bool,
}

pub fn socket_path(job_dir: &Path) -> PathBuf {
    job_dir.join("control.sock")
}

/// Serves `progress` on the socket until `stop`.
pub async fn serve(
    path: PathBuf,
    progress: watch::Receiver<Progress>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    loop {
        let (sock, _) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = listener.accept() => r?,
        };
        let mut rx = progress.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut sock = sock;
            loop {
                let p = *rx.borrow_and_update();
                let mut line = serde_json::to_vec(&p).unwrap_or_default();
                line.push(b'\n');
                // A follower that does not read is dropped, never waited for.
                match tokio::time::timeout(Duration::from_secs(5), sock.write_all(&line)).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
            }
        });
    }
}

/// Follows a job process: forwards its progress lines into `tx` until the socket closes
/// (the process exited). Errors when the socket cannot be reached.
pub async fn follow(path: &Path, tx: &watch::Sender<Progress>) -> std::io::Result<()> {
    let sock = tokio::time::timeout(Duration::from_secs(2), UnixStream::connect(path))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let mut lines = BufReader::new(sock).lines();
    while let Some(line) = lines.next_line().await? {
        if let Ok(p) = serde_json::from_str::<Progress>(&line) {
            tx.send_replace(p);
        }
    }
    Ok(())
}
