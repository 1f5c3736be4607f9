//! One console stream (a serial port or a netconsole connection) from open to close.
//!
//! The read loop is the hot path: read a chunk, let the [`LineScanner`] look for the
//! association markers, hand the chunk to the bound machine's relay (which never waits).
//! Writes to the stream (client input, `SALAD.pong`) run on their own task so that a slow
//! UART never holds up reading.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use dutgate_core::MachineId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::association::{Event, LineScanner};
use crate::hub::{Hub, StreamEntry};
use crate::relay::{Machine, StreamId};

pub const PONG: &[u8] = b"SALAD.pong\n";
/// Chunks of client input waiting for the stream's writer.
const INPUT_QUEUE: usize = 64;
const READ_BUF: usize = 16 * 1024;

/// Per-stream metrics; `port` is the device path, or `netconsole` for all TCP consoles.
pub struct PortMetrics {
    pub bytes_in: metrics::Counter,
    pub bytes_out: metrics::Counter,
}

impl PortMetrics {
    pub fn new(port: &str) -> Self {
        Self {
            bytes_in: metrics::counter!("salad_port_bytes_in_total", "port" => port.to_string()),
            bytes_out: metrics::counter!("salad_port_bytes_out_total", "port" => port.to_string()),
        }
    }
}

/// How the stream is described in logs and whether its binding is remembered by path.
pub struct StreamSpec {
    pub kind: &'static str,
    pub name: String,
    /// Stable adapter path to remember the machine by (serial ports only).
    pub key: Option<String>,
    /// Machine to bind to right away (remembered from a previous binding of `key`).
    pub initial: Option<MachineId>,
    pub metrics_port: String,
}

/// Why a stream ended.
#[derive(Debug)]
pub enum End {
    Eof,
    ReadError(std::io::Error),
    WriteError(std::io::Error),
    Shutdown,
}

struct Binding {
    machine: Arc<Machine>,
}

/// Relays `io` until it closes (`Ok(0)` counts as a disconnect: that is how an unplugged USB
/// adapter shows up), it fails, or `cancel` fires.
pub async fn drive<S>(hub: Arc<Hub>, io: S, spec: StreamSpec, cancel: CancellationToken) -> End
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (id, entry) = hub.add_stream(spec.kind, spec.name.clone(), spec.key.clone());
    let metrics = PortMetrics::new(&spec.metrics_port);
    let (mut rd, mut wr) = tokio::io::split(io);
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(INPUT_QUEUE);
    let stop = cancel.child_token();

    // Writer: client input and pongs, in order, at the stream's pace.
    let writer_stop = stop.clone();
    let writer_entry = entry.clone();
    let bytes_out = metrics.bytes_out.clone();
    let writer = tokio::spawn(async move {
        loop {
            let chunk = tokio::select! {
                _ = writer_stop.cancelled() => return None,
                c = in_rx.recv() => match c { Some(c) => c, None => return None },
            };
            let written = tokio::select! {
                _ = writer_stop.cancelled() => return None,
                r = wr.write_all(&chunk) => r,
            };
            if let Err(e) = written {
                writer_stop.cancel();
                return Some(e);
            }
            let _ = wr.flush().await;
            bytes_out.increment(chunk.len() as u64);
            writer_entry
                .bytes_out
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });

    let mut bound: Option<Binding> = None;
    if let Some(m) = spec.initial {
        rebind(&hub, &spec, id, &entry, &in_tx, &mut bound, m, false).await;
    }

    let mut scanner = LineScanner::new();
    let mut events = Vec::new();
    let mut buf = vec![0u8; READ_BUF];
    let end = loop {
        let n = tokio::select! {
            _ = stop.cancelled() => break End::Shutdown,
            r = rd.read(&mut buf) => match r {
                Ok(0) => break End::Eof,
                Ok(n) => n,
                Err(e) => break End::ReadError(e),
            },
        };
        let at = time::OffsetDateTime::now_utc();
        metrics.bytes_in.increment(n as u64);
        entry.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        events.clear();
        scanner.scan(&chunk, &mut events);
        let mut from = 0;
        for ev in events.drain(..) {
            match ev {
                Event::Ping => {
                    if in_tx.try_send(Bytes::from_static(PONG)).is_err() {
                        tracing::warn!(console = %spec.name, "input queue full; SALAD.pong not sent");
                    }
                }
                Event::BadMachineId(v) => {
                    tracing::warn!(console = %spec.name, value = %v, "ignoring SALAD.machine_id with an invalid machine id");
                }
                Event::Bind {
                    machine,
                    line_start,
                } => {
                    if bound.as_ref().is_some_and(|b| {
                        b.machine.id == machine && !b.machine.cancel.is_cancelled()
                    }) {
                        continue;
                    }
                    // Output before the announcing line still belongs to the old machine.
                    if let Some(b) = &bound
                        && line_start > from
                    {
                        b.machine.output(at, chunk.slice(from..line_start));
                    }
                    from = from.max(line_start);
                    rebind(&hub, &spec, id, &entry, &in_tx, &mut bound, machine, true).await;
                }
            }
        }
        if bound
            .as_ref()
            .is_some_and(|b| b.machine.cancel.is_cancelled())
        {
            // The machine was deleted: its output goes nowhere until the next announcement.
            bound = None;
            entry.set_machine(None);
        }
        if let Some(b) = &bound {
            b.machine.output(at, chunk.slice(from..));
        }
    };
    stop.cancel();
    let end = match writer.await {
        Ok(Some(e)) if !matches!(end, End::ReadError(_)) => End::WriteError(e),
        _ => end,
    };
    if let Some(b) = &bound {
        b.machine.detach_input(id);
    }
    hub.remove_stream(id);
    end
}

#[allow(clippy::too_many_arguments)]
async fn rebind(
    hub: &Arc<Hub>,
    spec: &StreamSpec,
    id: StreamId,
    entry: &StreamEntry,
    in_tx: &mpsc::Sender<Bytes>,
    bound: &mut Option<Binding>,
    machine: MachineId,
    announced: bool,
) {
    let relay = match hub.get_or_create(machine).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(console = %spec.name, %machine, error = %e, "cannot create the machine's console server; stream stays unbound");
            return;
        }
    };
    match bound.take() {
        Some(old) => {
            old.machine.detach_input(id);
            tracing::warn!(console = %spec.name, from = %old.machine.id, to = %machine, "console re-bound to another machine");
        }
        None if announced => {
            tracing::info!(console = %spec.name, %machine, tcp_port = relay.tcp_port, "console bound to machine");
        }
        None => {
            tracing::info!(console = %spec.name, %machine, tcp_port = relay.tcp_port, "console bound to the machine remembered for this adapter");
        }
    }
    relay.attach_input(id, in_tx.clone());
    entry.set_machine(Some(machine));
    *bound = Some(Binding { machine: relay });
    if announced && let Some(key) = spec.key.clone() {
        // Remembered off the read path: a slow database must not stall the console.
        let store = hub.store.clone();
        hub.tasks.spawn(async move {
            if let Err(e) = store.bind_path(&key, machine).await {
                tracing::error!(path = %key, %machine, error = %e, "cannot remember the adapter's machine");
            }
        });
    }
}
