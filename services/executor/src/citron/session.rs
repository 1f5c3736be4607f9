//! One ci-tron client following its job over the console protocol ([`super::wire`]), on the
//! upgraded submission connection or on the connection the executor made back to the client.
//!
//! - To the client: the job's events as control messages ([`super::events`]), its console log
//!   as `job_io`, then `session_end` with the status and, when the job had a bucket, a
//!   read-only key to its files ([`super::bucket`]).
//! - From the client: keystrokes (`job_io`), written to the DUT through salad's console port
//!   while the job runs, as the WebSocket console does. The session's client submitted the
//!   job, so it is the job's owner and may type.
//! - A client that goes away (EOF, a write that fails or stalls) before the end cancels its
//!   job: nobody would see the result.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dutgate_core::ServiceName;
use dutgate_core::audit::Actor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::events::{ConsoleTail, Narrator};
use super::wire::{Frame, IO_CHUNK, Incoming, Severity, WireError, read_frame, tag};
use crate::api::AppState;
use crate::model::JobState;

/// A client that does not take a write for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// After `session_end` the client mirrors the job's bucket, then closes: wait that long at
/// most for it to close before dropping the connection.
const CLOSE_WAIT: Duration = Duration::from_secs(11 * 60);

/// Who is at the other end.
#[derive(Clone)]
pub struct Client {
    pub peer: SocketAddr,
    /// The host the client reached the executor at (its `Host` header, without the port):
    /// it reaches the gateway's S3 endpoint there too, where the gateway's public host may
    /// be a DUT-side address (QEMU user networking's 10.0.2.2). `None`: the public host.
    pub host: Option<String>,
    /// The submitter, for the audit log of a cancellation.
    pub actor: Actor,
}

/// Runs the session until the end frame is sent (or the client is gone).
pub async fn run<IO>(s: AppState, id: i64, io: IO, client: Client)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (rd, mut wr) = tokio::io::split(io);
    let gone = CancellationToken::new();
    let input = tokio::spawn(keystrokes(s.clone(), id, rd, gone.clone()));
    match stream(&s, id, &mut wr, &client, &gone).await {
        Ok(()) => {
            let _ = tokio::time::timeout(WRITE_TIMEOUT, wr.shutdown()).await;
            // The client closes once it has mirrored the bucket.
            let _ = tokio::time::timeout(CLOSE_WAIT, gone.cancelled()).await;
        }
        Err(why) => client_gone(&s, id, &client, &why).await,
    }
    input.abort();
}

/// Streams until `session_end` is written. `Err`: why the client is gone.
async fn stream<W: AsyncWrite + Unpin>(
    s: &AppState,
    id: i64,
    wr: &mut W,
    client: &Client,
    gone: &CancellationToken,
) -> Result<(), String> {
    let row = s.store.require(id).await.map_err(|e| e.to_string())?;
    let narrator = Narrator::new(super::validated_spec(s, &row.job_yaml), row.submitted_at);
    let mut tail = ConsoleTail::default();
    let mut out = Vec::new();
    push(
        &mut out,
        narrator.say_at(
            row.submitted_at,
            &format!(
                "job {id} submitted by {} ({})",
                row.owner,
                crate::api::job_url(&s.gw, id)
            ),
            tag::NO_TAG,
            Severity::Info,
            serde_json::json!({"job_id": id}),
        ),
    );
    let console = s.sup.job_dir(id).join("console.log");
    let (mut offset, mut after) = (0u64, 0i64);
    let mut progress = None;
    loop {
        // The state first: once finished, the log and the events read below are complete.
        let finished =
            matches!(s.store.get(id).await, Ok(Some(r)) if r.state == JobState::Finished);
        offset = read_console(&console, offset, &mut tail, &mut out).await;
        let events = s.store.events(id, after).await.map_err(|e| e.to_string())?;
        for e in &events {
            after = e.seq;
            for f in narrator.frames(e, &tail) {
                push(&mut out, f);
            }
        }
        send(wr, &mut out).await?;
        if finished {
            break;
        }
        tokio::select! {
            _ = crate::api::wait_change(s, id, &mut progress) => {}
            _ = gone.cancelled() => return Err("the client closed the connection".into()),
        }
    }
    let row = s.store.require(id).await.map_err(|e| e.to_string())?;
    let status = row.status.unwrap_or(dutgate_core::JobStatus::Unknown);
    let job_bucket = match super::bucket::publish(s, id, client.peer.ip(), client.host.as_deref())
        .await
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(job_id = id, error = %e, "the job's files cannot be offered to its client");
            push(
                &mut out,
                narrator.say(
                    &format!(
                        "the job's files cannot be mirrored: {e}; they are the job's artifacts ({}/artifacts)",
                        crate::api::job_url(&s.gw, id)
                    ),
                    tag::NO_TAG,
                    Severity::Warn,
                    serde_json::json!({}),
                ),
            );
            None
        }
    };
    push(&mut out, Frame::SessionEnd { status, job_bucket });
    send(wr, &mut out).await
}

fn push(out: &mut Vec<u8>, f: Frame) {
    out.extend_from_slice(&f.encode(time::OffsetDateTime::now_utc()));
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, out: &mut Vec<u8>) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    let write = async {
        wr.write_all(out).await?;
        wr.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(Ok(())) => {
            out.clear();
            Ok(())
        }
        Ok(Err(e)) => Err(format!("writing to the client: {e}")),
        Err(_) => Err(format!(
            "the client took nothing for {} s",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

/// Appends the console bytes after `offset` as `job_io` frames; returns the new offset.
async fn read_console(
    path: &Path,
    mut offset: u64,
    tail: &mut ConsoleTail,
    out: &mut Vec<u8>,
) -> u64 {
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return offset;
    };
    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return offset;
    }
    let mut buf = vec![0u8; IO_CHUNK];
    loop {
        match f.read(&mut buf).await {
            Ok(0) | Err(_) => return offset,
            Ok(n) => {
                offset += n as u64;
                tail.feed(&buf[..n]);
                push(out, Frame::JobIo(buf[..n].to_vec()));
            }
        }
    }
}

/// The client of job `id` is gone (`why`): the job is cancelled unless it is over.
pub async fn client_gone(s: &AppState, id: i64, client: &Client, why: &str) {
    let finished = matches!(s.store.get(id).await, Ok(Some(r)) if r.state == JobState::Finished);
    tracing::warn!(job_id = id, peer = %client.peer, reason = why, finished, "ci-tron client gone");
    if finished {
        return;
    }
    let outcome = match s.sup.cancel(id).await {
        Ok(_) => {
            s.sched.wake();
            "ok"
        }
        Err(e) => {
            tracing::warn!(job_id = id, error = %e, "cancelling the job of a gone client");
            "failed"
        }
    };
    s.audit
        .record(
            &client.actor,
            "job.cancel",
            &format!("job/{id}"),
            &format!("{outcome}: the ci-tron client is gone ({why})"),
        )
        .await;
}

/// Reads the client's frames: keystrokes to the DUT. Cancels `gone` when the client closes or
/// speaks something else than the protocol.
async fn keystrokes<R: AsyncRead + Unpin>(
    s: AppState,
    id: i64,
    mut rd: R,
    gone: CancellationToken,
) {
    let mut dut: Option<tokio::net::TcpStream> = None;
    loop {
        let data = match read_frame(&mut rd).await {
            Ok(Incoming::Input(data)) => data,
            Ok(Incoming::Other(kind)) => {
                tracing::debug!(job_id = id, kind, "ci-tron client message ignored");
                continue;
            }
            Err(WireError::Closed) => break,
            Err(e) => {
                tracing::warn!(job_id = id, error = %e, "ci-tron client: protocol error");
                break;
            }
        };
        let Ok(Some(row)) = s.store.get(id).await else {
            break;
        };
        let (JobState::Running, Some(machine)) = (row.state, row.machine_id) else {
            continue;
        };
        if dut.is_none() {
            let salad = dutgate_salad::client::SaladClient::new(
                s.cfg.url_of(&s.gw, ServiceName::Salad),
                None,
            );
            dut = salad
                .connect(machine, &s.cfg.console_host(&s.gw))
                .await
                .ok();
        }
        if let Some(c) = dut.as_mut()
            && tokio::time::timeout(WRITE_TIMEOUT, c.write_all(&data))
                .await
                .map_or(true, |r| r.is_err())
        {
            dut = None;
        }
    }
    gone.cancel();
}
