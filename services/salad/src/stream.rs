//! One console stream (a serial port or a netconsole connection) from open to close.
//!
//! The read loop is the hot path: read a chunk, let the [`LineScanner`] look for the
//! association markers, hand the chunk to the bound machine's relay (which never waits).
//! Writes to the stream (client input, `SALAD.pong`) run on their own task so that a slow
//! UART never holds up reading. Whether an announcement binds the stream is decided on a task
//! of its own ([`binding::decide`] may ask mars); meanwhile the output from the announcing
//! line on is kept (bounded) and goes to the machine if the binding is granted.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dutgate_core::MachineId;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::association::{Event, LineScanner};
use crate::binding::{self, Claim};
use crate::hub::{Hub, StreamCommand, StreamEntry};
use crate::relay::{Machine, Output, Refusal, StreamId};

pub const PONG: &[u8] = b"SALAD.pong\n";
/// Chunks of client input waiting for the stream's writer.
const INPUT_QUEUE: usize = 64;
const READ_BUF: usize = 16 * 1024;
/// Output kept while a binding is being decided; beyond it, bytes are dropped.
const PENDING_MAX: usize = 64 * 1024;
/// After a refused binding, the stream's announcements are not decided again for this long:
/// a DUT repeating one cannot make salad ask mars in a loop.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Refusal log lines per stream: a burst, then one per interval (the rest are counted).
const LOG_BURST: u32 = 5;
const LOG_INTERVAL: Duration = Duration::from_secs(10);

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
    /// The netconsole's peer address (`None` for a serial port).
    pub peer: Option<IpAddr>,
    /// The gateway's address the netconsole connected to.
    pub local: Option<IpAddr>,
}

/// Why a stream ended.
#[derive(Debug)]
pub enum End {
    Eof,
    ReadError(std::io::Error),
    WriteError(std::io::Error),
    Shutdown,
}

/// A binding being decided.
struct Deciding {
    machine: MachineId,
    task: JoinHandle<Result<Arc<Machine>, String>>,
    pending: Vec<(OffsetDateTime, Bytes)>,
    pending_len: usize,
    dropped: usize,
}

/// Rate limit of one stream's refusal log lines.
struct LogBudget {
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

impl LogBudget {
    fn new() -> Self {
        Self {
            tokens: LOG_BURST,
            refilled: Instant::now(),
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now.
    fn take(&mut self) -> Option<u64> {
        let refill = (self.refilled.elapsed().as_secs_f64() / LOG_INTERVAL.as_secs_f64()) as u32;
        if refill > 0 {
            self.tokens = (self.tokens + refill).min(LOG_BURST);
            self.refilled = Instant::now();
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The state of one stream's task.
struct Driver {
    hub: Arc<Hub>,
    spec: StreamSpec,
    id: StreamId,
    entry: Arc<StreamEntry>,
    in_tx: mpsc::Sender<Bytes>,
    bound: Option<Arc<Machine>>,
    deciding: Option<Deciding>,
    retry_at: Option<Instant>,
    /// When held-back output (a possible secret's start) must be sent on.
    flush_at: Option<tokio::time::Instant>,
    /// `salad.secret_hold_ms`.
    hold: Duration,
    log: LogBudget,
}

/// Relays `io` until it closes (`Ok(0)` counts as a disconnect: that is how an unplugged USB
/// adapter shows up), it fails, or `cancel` fires.
pub async fn drive<S>(hub: Arc<Hub>, io: S, spec: StreamSpec, cancel: CancellationToken) -> End
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (id, entry, mut commands) = hub.add_stream(spec.kind, spec.name.clone(), spec.key.clone());
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

    let hold = hub.config.secret_hold();
    let initial = spec.initial;
    let mut d = Driver {
        hub,
        spec,
        id,
        entry,
        in_tx,
        bound: None,
        deciding: None,
        retry_at: None,
        flush_at: None,
        hold,
        log: LogBudget::new(),
    };
    if let Some(m) = initial {
        d.bind_remembered(m).await;
    }

    let mut scanner = LineScanner::new();
    let mut events = Vec::new();
    let mut buf = vec![0u8; READ_BUF];
    let end = loop {
        let flush_at = d.flush_at;
        tokio::select! {
            _ = stop.cancelled() => break End::Shutdown,
            Some(cmd) = commands.recv() => d.command(cmd),
            r = async { d.deciding.as_mut().map(|x| &mut x.task).expect("guarded").await },
                if d.deciding.is_some() => d.decided(r),
            _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)),
                if flush_at.is_some() => {
                d.flush_at = None;
                if let Some(m) = &d.bound {
                    m.flush_held(d.id, OffsetDateTime::now_utc());
                }
            }
            r = rd.read(&mut buf) => {
                let n = match r {
                    Ok(0) => break End::Eof,
                    Ok(n) => n,
                    Err(e) => break End::ReadError(e),
                };
                metrics.bytes_in.increment(n as u64);
                d.entry.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                let chunk = Bytes::copy_from_slice(&buf[..n]);
                events.clear();
                scanner.scan(&chunk, &mut events);
                d.chunk(chunk, &mut events);
            }
        }
    };
    stop.cancel();
    let end = match writer.await {
        Ok(Some(e)) if !matches!(end, End::ReadError(_)) => End::WriteError(e),
        _ => end,
    };
    d.close().await;
    end
}

impl Driver {
    fn now_claim(&self) -> Claim {
        Claim {
            stream: self.id,
            peer: self.spec.peer,
            local: self.spec.local,
            input: self.in_tx.clone(),
            key: self.spec.key.clone(),
        }
    }

    fn set_bound(&mut self, m: Option<Arc<Machine>>) {
        self.entry.set_machine(m.as_ref().map(|m| m.id));
        self.bound = m;
        self.flush_at = None;
    }

    /// A serial adapter reopened: bind it to the machine it was last bound to, unless another
    /// stream holds that machine now.
    async fn bind_remembered(&mut self, machine: MachineId) {
        let relay = match self.hub.get_or_create(machine).await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(console = %self.spec.name, %machine, error = %e, "cannot create the machine's console server; stream stays unbound");
                return;
            }
        };
        if relay.try_attach_input(self.id, self.in_tx.clone()) {
            tracing::info!(console = %self.spec.name, %machine, tcp_port = relay.tcp_port, "console bound to the machine remembered for this adapter");
            self.set_bound(Some(relay));
        } else {
            self.refuse(
                machine,
                "another console stream is bound to the machine remembered for this adapter",
            );
        }
    }

    fn command(&mut self, cmd: StreamCommand) {
        match cmd {
            StreamCommand::Bind(m) => {
                if let Some(old) = self.bound.take()
                    && old.id != m.id
                {
                    old.flush_held(self.id, OffsetDateTime::now_utc());
                    old.detach_input(self.id);
                }
                if let Some(previous) = m.force_attach_input(self.id, self.in_tx.clone()) {
                    self.hub.unbind_stream(previous);
                }
                tracing::warn!(console = %self.spec.name, machine = %m.id, "console bound to the machine by an admin");
                self.remember(m.id);
                self.set_bound(Some(m));
            }
            StreamCommand::Unbind => {
                if let Some(old) = self.bound.take() {
                    old.flush_held(self.id, OffsetDateTime::now_utc());
                    old.detach_input(self.id);
                    tracing::warn!(console = %self.spec.name, machine = %old.id, "console unbound from the machine by an admin");
                }
                self.set_bound(None);
            }
        }
    }

    fn decided(&mut self, r: Result<Result<Arc<Machine>, String>, tokio::task::JoinError>) {
        let Some(d) = self.deciding.take() else {
            return;
        };
        let r = r.unwrap_or_else(|e| Err(format!("the binding decision failed: {e}")));
        match r {
            Ok(m) if self.bound.is_none() => {
                tracing::info!(console = %self.spec.name, machine = %m.id, tcp_port = m.tcp_port, "console bound to machine");
                self.set_bound(Some(m.clone()));
                if d.dropped > 0 {
                    tracing::warn!(console = %self.spec.name, machine = %m.id, bytes = d.dropped, "output dropped while the binding was decided");
                }
                for (at, chunk) in d.pending {
                    self.output(at, &chunk);
                }
            }
            Ok(m) => {
                // An admin bound the stream meanwhile: that decision wins (and may be this
                // very machine, whose binding then stays).
                if self.bound.as_ref().is_none_or(|b| b.id != m.id) {
                    m.detach_input(self.id);
                }
            }
            Err(reason) => {
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                self.refuse(d.machine, &reason);
            }
        }
    }

    /// Remembers the adapter's machine, off the read path (a slow database must not stall
    /// the console).
    fn remember(&self, machine: MachineId) {
        let Some(key) = self.spec.key.clone() else {
            return;
        };
        let store = self.hub.store.clone();
        self.hub.tasks.spawn(async move {
            if let Err(e) = store.bind_path(&key, machine).await {
                tracing::error!(path = %key, %machine, error = %e, "cannot remember the adapter's machine");
            }
        });
    }

    fn chunk(&mut self, chunk: Bytes, events: &mut Vec<Event>) {
        let at = OffsetDateTime::now_utc();
        let mut from = 0;
        for ev in events.drain(..) {
            match ev {
                Event::Ping => {
                    if self.in_tx.try_send(Bytes::from_static(PONG)).is_err() {
                        tracing::warn!(console = %self.spec.name, "input queue full; SALAD.pong not sent");
                    }
                }
                Event::BadMachineId(len) => {
                    if self.log.take().is_some() {
                        tracing::warn!(console = %self.spec.name, value_bytes = len, "ignoring SALAD.machine_id with an invalid machine id");
                    }
                }
                Event::Bind {
                    machine,
                    line_start,
                } => {
                    if let Some(b) = &self.bound {
                        if b.id != machine {
                            self.refuse(
                                machine,
                                "the stream is bound to another machine; only an admin re-binds a stream",
                            );
                        }
                        continue;
                    }
                    if self.deciding.is_some() || self.retry_at.is_some_and(|t| Instant::now() < t)
                    {
                        continue;
                    }
                    // Output before the announcing line belongs to no machine.
                    from = from.max(line_start);
                    let hub = self.hub.clone();
                    let claim = self.now_claim();
                    let task =
                        tokio::spawn(async move { binding::decide(&hub, &claim, machine).await });
                    self.deciding = Some(Deciding {
                        machine,
                        task,
                        pending: Vec::new(),
                        pending_len: 0,
                        dropped: 0,
                    });
                }
            }
        }
        let rest = chunk.slice(from..);
        if rest.is_empty() {
            return;
        }
        if self.bound.is_some() {
            self.output(at, &rest);
        } else if let Some(d) = &mut self.deciding {
            if d.pending_len + rest.len() <= PENDING_MAX {
                d.pending_len += rest.len();
                d.pending.push((at, rest));
            } else {
                d.dropped += rest.len();
            }
        }
    }

    /// To the bound machine; returns whether bytes are held back. A machine that no longer
    /// takes this stream's output (an admin bound another stream) unbinds it.
    fn output(&mut self, at: OffsetDateTime, chunk: &[u8]) -> bool {
        let Some(m) = &self.bound else {
            return false;
        };
        if m.cancel.is_cancelled() {
            // The machine was deleted: its output goes nowhere until the next binding.
            self.set_bound(None);
            return false;
        }
        match m.output(self.id, at, chunk) {
            Output::Relayed { holding } => {
                if holding {
                    // Idle timeout: pushed back by every chunk that still ends in a
                    // possible secret's start.
                    self.flush_at = Some(tokio::time::Instant::now() + self.hold);
                }
                holding
            }
            Output::NotBound => {
                tracing::warn!(console = %self.spec.name, machine = %m.id, "console no longer bound to the machine");
                self.set_bound(None);
                false
            }
        }
    }

    fn refuse(&mut self, claimed: MachineId, reason: &str) {
        metrics::counter!("salad_bindings_refused_total", "kind" => self.spec.kind).increment(1);
        self.entry.refused.fetch_add(1, Ordering::Relaxed);
        let bound_to = self.bound.as_ref().map(|m| m.id);
        if let Some(suppressed) = self.log.take() {
            tracing::warn!(
                console = %self.spec.name,
                kind = self.spec.kind,
                source = ?self.spec.peer,
                claimed = %claimed,
                bound_to = ?bound_to,
                suppressed,
                reason,
                "console binding refused"
            );
        }
        let refusal = Refusal {
            seq: 0,
            at: crate::console_log::stamp(OffsetDateTime::now_utc())
                .trim_end()
                .to_string(),
            kind: self.spec.kind.to_string(),
            stream: self.spec.name.clone(),
            source: self.spec.peer.map(|p| p.to_string()),
            claimed,
            bound_to,
            reason: reason.to_string(),
        };
        // Recorded only on machines that have a console server: made-up ids allocate nothing.
        if let Some(m) = self.hub.get(claimed) {
            m.record_refusal(refusal.clone());
        }
        if let Some(m) = &self.bound
            && m.id != claimed
        {
            m.record_refusal(refusal);
        }
    }

    /// The stream ended: nothing of it may stay bound.
    async fn close(mut self) {
        if let Some(d) = self.deciding.take() {
            // The decision may bind the stream at its very end: wait for it to undo that.
            let machine = d.machine;
            match tokio::time::timeout(Duration::from_secs(15), d.task).await {
                Ok(Ok(Ok(m))) => m.detach_input(self.id),
                Ok(_) => {}
                Err(_) => {
                    if let Some(m) = self.hub.get(machine) {
                        m.detach_input(self.id);
                    }
                }
            }
        }
        if let Some(b) = self.bound.take() {
            b.flush_held(self.id, OffsetDateTime::now_utc());
            b.detach_input(self.id);
        }
        self.hub.remove_stream(self.id);
    }
}
