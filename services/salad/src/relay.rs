//! The relay of one machine: its TCP console servers and the fan-out of DUT output.
//!
//! - DUT output ([`Machine::output`]) goes to every connected client, to the scrollback and
//!   to the console log. It never waits: each client has a bounded queue (in bytes); a client
//!   whose queue would overflow, or whose socket accepts nothing for `client_write_timeout`,
//!   is disconnected with a log line. So a stalled client can delay neither the serial read
//!   nor the other clients, nor any other machine.
//! - What a client on the main port (`tcp_port`) sends goes to the console stream bound to
//!   the machine; with none, it is dropped. At most one stream is bound to a machine, and only
//!   that stream's bytes reach the machine's sinks ([`Machine::output`] checks the sender).
//! - Output first goes through the machine's [`Masker`]: no sink ever sees a live job secret.
//! - Raw TCP clients are accepted only from the console client networks ([`ClientFilter`]);
//!   WebSocket clients ([`Machine::channel_client`]) are authenticated by the REST API.
//! - The log port (`tcp_port_logs`) is read-only: it first replays the scrollback, then follows
//!   live. The main port never replays (a job must not see the previous job's output).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use dutgate_core::MachineId;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::console_log::ConsoleLog;
use crate::secrets::{Masker, SecretsError};

/// Refusals kept per machine (oldest dropped first).
pub const MAX_REFUSALS: usize = 100;

/// A console stream that announced a machine and was not bound to it (design §10), as the
/// affected machine's job reads it (`GET /api/v1/machine/{id}/refusals`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Refusal {
    /// Per machine, increasing: read on with `after=<seq>`.
    pub seq: u64,
    /// RFC 3339, UTC.
    pub at: String,
    /// `serial` or `netconsole`.
    pub kind: String,
    /// Device path or `netconsole <peer>`.
    pub stream: String,
    /// The netconsole's peer address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The machine the stream announced.
    pub claimed: MachineId,
    /// The machine the stream is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_to: Option<MachineId>,
    pub reason: String,
}

/// Who may connect to the raw console ports: the console client networks, never a DUT
/// network, except the gateway itself.
#[derive(Debug, Clone)]
pub struct ClientFilter {
    pub networks: Vec<ipnet::IpNet>,
    pub auth: dutgate_core::auth::Auth,
}

impl ClientFilter {
    /// `Err` says why `peer`, connected to `local`, is refused.
    pub fn check(&self, peer: IpAddr, local: IpAddr) -> Result<(), &'static str> {
        let peer = peer.to_canonical();
        // A connection whose source is the address it dialled comes from this host: TCP's
        // handshake cannot complete for a forged source that is the gateway's own address.
        // With QEMU user networking the DUTs share it (they are NATed to 127.0.0.1), which is
        // why that setup cannot keep DUTs off the console ports (docs/salad.md).
        if peer == local.to_canonical() {
            return Ok(());
        }
        if self.auth.is_dut_address(peer) {
            return Err("peer is on a DUT network");
        }
        if self.networks.iter().any(|n| n.contains(&peer)) {
            Ok(())
        } else {
            Err("peer is not on a console client network (salad.console_client_networks)")
        }
    }
}

/// Identifies one console stream (a serial port or a netconsole connection) for input routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// Limits that apply to each client.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub queue_bytes: usize,
    pub write_timeout: Duration,
    pub scrollback_bytes: usize,
}

struct Client {
    id: u64,
    read_only: bool,
    peer: SocketAddr,
    /// Shared with the client's tasks: the fan-out writes directly when nothing is queued.
    /// `None` for a WebSocket client, which is always fed through its queue.
    sock: Option<Arc<TcpStream>>,
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Scrollback {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Scrollback {
    fn push(&mut self, chunk: &Bytes, cap: usize) {
        if cap == 0 {
            return;
        }
        let chunk = if chunk.len() > cap {
            chunk.slice(chunk.len() - cap..)
        } else {
            chunk.clone()
        };
        self.len += chunk.len();
        self.chunks.push_back(chunk);
        while self.len > cap {
            let excess = self.len - cap;
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if front.len() <= excess {
                self.len -= front.len();
                self.chunks.pop_front();
            } else {
                *front = front.slice(excess..);
                self.len -= excess;
            }
        }
    }
}

struct Inner {
    clients: Vec<Client>,
    scrollback: Scrollback,
    /// The stream bound to this machine: its output is the machine's, client input goes to it.
    input: Option<(StreamId, mpsc::Sender<Bytes>)>,
    masker: Masker,
    refusals: VecDeque<Refusal>,
    next_refusal: u64,
}

impl Inner {
    fn is_bound_to(&self, stream: StreamId) -> bool {
        matches!(&self.input, Some((s, _)) if *s == stream)
    }
}

/// What [`Machine::output`] did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Relayed; `holding` says bytes are held back (maybe a secret's start): call
    /// [`Machine::flush_held`] when the stream stays idle for the hold time.
    Relayed { holding: bool },
    /// The sender is not (any more) the stream bound to this machine: nothing was relayed.
    NotBound,
}

struct MachineMetrics {
    bytes_from_dut: metrics::Counter,
    bytes_to_dut: metrics::Counter,
    input_dropped: metrics::Counter,
    drops: metrics::Counter,
    clients: metrics::Gauge,
    log_clients: metrics::Gauge,
}

impl MachineMetrics {
    fn new(id: MachineId) -> Self {
        let m = id.to_string();
        Self {
            bytes_from_dut: metrics::counter!("salad_machine_bytes_from_dut_total", "machine" => m.clone()),
            bytes_to_dut: metrics::counter!("salad_machine_bytes_to_dut_total", "machine" => m.clone()),
            input_dropped: metrics::counter!("salad_machine_input_dropped_bytes_total", "machine" => m.clone()),
            drops: metrics::counter!("salad_machine_client_drops_total", "machine" => m.clone()),
            clients: metrics::gauge!("salad_machine_clients", "machine" => m.clone(), "port" => "main"),
            log_clients: metrics::gauge!("salad_machine_clients", "machine" => m, "port" => "logs"),
        }
    }
}

/// One machine's console: its ports, clients, scrollback and log.
pub struct Machine {
    pub id: MachineId,
    pub tcp_port: u16,
    pub tcp_port_logs: u16,
    limits: ClientLimits,
    log: ConsoleLog,
    inner: Mutex<Inner>,
    next_client: AtomicU64,
    metrics: MachineMetrics,
    /// Cancelled when the machine is deleted or salad stops: ends its servers and clients.
    pub cancel: CancellationToken,
    /// Its two port servers (a deletion waits for them, and so for their ports to close).
    pub servers: TaskTracker,
}

impl Machine {
    pub fn new(
        id: MachineId,
        tcp_port: u16,
        tcp_port_logs: u16,
        limits: ClientLimits,
        log: ConsoleLog,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            id,
            tcp_port,
            tcp_port_logs,
            limits,
            log,
            inner: Mutex::new(Inner {
                clients: Vec::new(),
                scrollback: Scrollback::default(),
                input: None,
                masker: Masker::new(),
                refusals: VecDeque::new(),
                next_refusal: 1,
            }),
            next_client: AtomicU64::new(1),
            metrics: MachineMetrics::new(id),
            cancel,
            servers: TaskTracker::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the client list half-updated in a way
        // that matters more than losing the whole console, so keep going with the data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when a client is connected to the main (read-write) port.
    pub fn has_client(&self) -> bool {
        self.lock().clients.iter().any(|c| !c.read_only)
    }

    pub fn log(&self) -> &ConsoleLog {
        &self.log
    }

    /// A client that accepts nothing for this long is dropped.
    pub fn write_timeout(&self) -> Duration {
        self.limits.write_timeout
    }

    /// Output of stream `from`: masked, then to every client, the scrollback and the log.
    /// Never waits. Relayed only if `from` is the stream bound to this machine.
    pub fn output(&self, from: StreamId, at: OffsetDateTime, chunk: &[u8]) -> Output {
        let mut inner = self.lock();
        if !inner.is_bound_to(from) {
            return Output::NotBound;
        }
        let masked = inner.masker.push(chunk);
        let holding = inner.masker.held() > 0;
        self.relay(inner, at, Bytes::from(masked));
        Output::Relayed { holding }
    }

    /// Sends on what the masker held back (the stream `from` went idle).
    pub fn flush_held(&self, from: StreamId, at: OffsetDateTime) {
        let mut inner = self.lock();
        if !inner.is_bound_to(from) {
            return;
        }
        let held = inner.masker.flush();
        self.relay(inner, at, Bytes::from(held));
    }

    /// Replaces the machine's secrets (empty: none).
    pub fn set_secrets(&self, secrets: &[String]) -> Result<(), SecretsError> {
        self.lock().masker.set(secrets)
    }

    fn relay(&self, mut inner: MutexGuard<'_, Inner>, at: OffsetDateTime, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        self.metrics.bytes_from_dut.increment(chunk.len() as u64);
        self.log.append(at, chunk.clone());
        let mut dropped = Vec::new();
        {
            let cap = self.limits.scrollback_bytes;
            inner.scrollback.push(&chunk, cap);
            inner.clients.retain(|c| {
                let queued = c.queued.load(Ordering::Acquire);
                let mut rest = chunk.clone();
                if queued == 0
                    && let Some(sock) = &c.sock
                {
                    // Nothing queued means nothing in flight either (the writer counts a chunk
                    // down only once written), so writing here keeps the order and saves the
                    // hop through the writer task: this is the latency path.
                    match sock.try_write(&chunk) {
                        Ok(n) if n == chunk.len() => return true,
                        Ok(n) => rest = chunk.slice(n..),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            c.cancel.cancel();
                            return false;
                        }
                    }
                } else if queued + chunk.len() > self.limits.queue_bytes {
                    dropped.push((c.id, c.peer, c.read_only, queued, c.cancel.clone()));
                    return false;
                }
                c.queued.fetch_add(rest.len(), Ordering::AcqRel);
                // A closed channel means the client's writer already ended; it removes itself.
                c.tx.send(rest).is_ok()
            });
            self.update_gauges(&inner);
        }
        drop(inner);
        for (id, peer, read_only, queued, cancel) in dropped {
            cancel.cancel();
            self.metrics.drops.increment(1);
            tracing::warn!(
                machine = %self.id, client = id, %peer, read_only, queued_bytes = queued,
                "console client cannot keep up with the DUT output; disconnected"
            );
        }
    }

    /// Records a refused binding for the machine's job to read (bounded).
    pub fn record_refusal(&self, mut r: Refusal) {
        let mut inner = self.lock();
        r.seq = inner.next_refusal;
        inner.next_refusal += 1;
        if inner.refusals.len() == MAX_REFUSALS {
            inner.refusals.pop_front();
        }
        inner.refusals.push_back(r);
    }

    /// Refusals with `seq > after`, oldest first.
    pub fn refusals(&self, after: u64) -> Vec<Refusal> {
        self.lock()
            .refusals
            .iter()
            .filter(|r| r.seq > after)
            .cloned()
            .collect()
    }

    fn update_gauges(&self, inner: &Inner) {
        let rw = inner.clients.iter().filter(|c| !c.read_only).count();
        self.metrics.clients.set(rw as f64);
        self.metrics
            .log_clients
            .set((inner.clients.len() - rw) as f64);
    }

    /// Binds `stream` to this machine if no stream is bound (`false`: another one is).
    pub fn try_attach_input(&self, stream: StreamId, tx: mpsc::Sender<Bytes>) -> bool {
        let mut inner = self.lock();
        match &inner.input {
            Some((s, _)) if *s != stream => false,
            _ => {
                inner.input = Some((stream, tx));
                true
            }
        }
    }

    /// Binds `stream` to this machine whatever was bound (an admin's decision); returns the
    /// stream that was bound before, if another.
    pub fn force_attach_input(
        &self,
        stream: StreamId,
        tx: mpsc::Sender<Bytes>,
    ) -> Option<StreamId> {
        let mut inner = self.lock();
        let old = inner.input.replace((stream, tx)).map(|(s, _)| s);
        old.filter(|s| *s != stream)
    }

    /// Stops routing input to `stream` (if it is still the one input goes to).
    pub fn detach_input(&self, stream: StreamId) {
        let mut inner = self.lock();
        if inner.input.as_ref().is_some_and(|(s, _)| *s == stream) {
            inner.input = None;
        }
    }

    /// True when a console stream is bound to this machine.
    pub fn has_console(&self) -> bool {
        self.lock().input.is_some()
    }

    /// The stream bound to this machine.
    pub fn console_stream(&self) -> Option<StreamId> {
        self.lock().input.as_ref().map(|(s, _)| *s)
    }

    /// Client input to the bound stream; `false` when none is bound or it went away.
    pub async fn send_input(&self, data: Bytes) -> bool {
        let n = data.len() as u64;
        match self.input_sender() {
            Some(tx) if tx.send(data).await.is_ok() => {
                self.metrics.bytes_to_dut.increment(n);
                true
            }
            _ => {
                self.metrics.input_dropped.increment(n);
                false
            }
        }
    }

    /// A read-write client fed through a queue (the per-machine console WebSocket): it gets
    /// the output from now on (no replay) with the same limits as a TCP client. Dropping
    /// the returned client unregisters it.
    pub fn channel_client(self: &Arc<Self>, peer: SocketAddr) -> ChannelClient {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let cancel = self.cancel.child_token();
        {
            let mut inner = self.lock();
            inner.clients.push(Client {
                id,
                read_only: false,
                peer,
                sock: None,
                tx,
                queued: queued.clone(),
                cancel: cancel.clone(),
            });
            self.update_gauges(&inner);
        }
        tracing::info!(machine = %self.id, client = id, %peer, "console WebSocket client connected");
        ChannelClient {
            machine: self.clone(),
            id,
            rx,
            queued,
            cancel,
        }
    }

    fn input_sender(&self) -> Option<mpsc::Sender<Bytes>> {
        self.lock().input.as_ref().map(|(_, tx)| tx.clone())
    }

    fn remove_client(&self, id: u64) {
        let mut inner = self.lock();
        inner.clients.retain(|c| c.id != id);
        self.update_gauges(&inner);
    }

    /// Serves one accepted TCP client until it leaves, is dropped, or the machine goes away.
    pub fn serve_client(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        read_only: bool,
        tasks: &TaskTracker,
    ) {
        // Console traffic is interactive: never wait to coalesce small writes.
        let _ = stream.set_nodelay(true);
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let cancel = self.cancel.child_token();
        let sock = Arc::new(stream);
        {
            let mut inner = self.lock();
            if read_only {
                // The replay is queued under the same lock as the registration: no byte is
                // missed or doubled between the scrollback and the live stream.
                for chunk in &inner.scrollback.chunks {
                    queued.fetch_add(chunk.len(), Ordering::AcqRel);
                    let _ = tx.send(chunk.clone());
                }
            }
            inner.clients.push(Client {
                id,
                read_only,
                peer,
                sock: Some(sock.clone()),
                tx,
                queued: queued.clone(),
                cancel: cancel.clone(),
            });
            self.update_gauges(&inner);
        }
        tracing::info!(machine = %self.id, client = id, %peer, read_only, "console client connected");
        let me = self.clone();
        let c = cancel.clone();
        let write_sock = sock.clone();
        tasks.spawn(async move {
            me.client_writer(id, peer, &write_sock, rx, queued, c).await;
            // Dropping the last reference to the socket closes it.
            me.remove_client(id);
        });
        let me = self.clone();
        tasks.spawn(async move {
            me.client_reader(id, &sock, read_only, &cancel).await;
            // The client left (or must go): end its writer too.
            cancel.cancel();
            tracing::info!(machine = %me.id, client = id, %peer, "console client disconnected");
        });
    }

    async fn client_writer(
        &self,
        id: u64,
        peer: SocketAddr,
        sock: &TcpStream,
        mut rx: mpsc::UnboundedReceiver<Bytes>,
        queued: Arc<AtomicUsize>,
        cancel: CancellationToken,
    ) {
        loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => break,
                c = rx.recv() => match c { Some(c) => c, None => break },
            };
            let n = chunk.len();
            let write = tokio::time::timeout(self.limits.write_timeout, write_all(sock, &chunk));
            let result = tokio::select! {
                _ = cancel.cancelled() => break,
                r = write => r,
            };
            queued.fetch_sub(n, Ordering::AcqRel);
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(machine = %self.id, client = id, %peer, error = %e, "console client write failed");
                    break;
                }
                Err(_) => {
                    self.metrics.drops.increment(1);
                    tracing::warn!(
                        machine = %self.id, client = id, %peer,
                        timeout_ms = self.limits.write_timeout.as_millis() as u64,
                        "console client stopped reading; disconnected"
                    );
                    break;
                }
            }
        }
        cancel.cancel();
    }

    async fn client_reader(
        &self,
        id: u64,
        sock: &TcpStream,
        read_only: bool,
        cancel: &CancellationToken,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut warned = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = sock.readable() => if r.is_err() { return },
            }
            let n = match sock.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            };
            if read_only {
                continue;
            }
            let data = Bytes::copy_from_slice(&buf[..n]);
            match self.input_sender() {
                Some(tx) => {
                    // Waiting here only slows this client down (the UART drains at its own
                    // pace); DUT output keeps flowing to everyone meanwhile.
                    let sent = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = tx.send(data) => r.is_ok(),
                    };
                    if sent {
                        self.metrics.bytes_to_dut.increment(n as u64);
                        warned = false;
                    } else {
                        self.metrics.input_dropped.increment(n as u64);
                    }
                }
                None => {
                    self.metrics.input_dropped.increment(n as u64);
                    if !warned {
                        tracing::warn!(machine = %self.id, client = id, "no console is bound to this machine; client input dropped");
                        warned = true;
                    }
                }
            }
        }
    }
}

/// A client registered by [`Machine::channel_client`].
pub struct ChannelClient {
    machine: Arc<Machine>,
    pub id: u64,
    rx: mpsc::UnboundedReceiver<Bytes>,
    queued: Arc<AtomicUsize>,
    /// Cancelled when the client is dropped for not keeping up, or the machine goes away.
    pub cancel: CancellationToken,
}

impl ChannelClient {
    /// The next output chunk; `None` once the client was dropped or the machine went away.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let chunk = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            c = self.rx.recv() => c?,
        };
        self.queued.fetch_sub(chunk.len(), Ordering::AcqRel);
        Some(chunk)
    }

    pub fn machine(&self) -> &Arc<Machine> {
        &self.machine
    }
}

impl Drop for ChannelClient {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.machine.remove_client(self.id);
        tracing::info!(machine = %self.machine.id, client = self.id, "console WebSocket client disconnected");
    }
}

/// `write_all` through a shared socket (the fan-out may write to it directly too).
async fn write_all(sock: &TcpStream, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        sock.writable().await?;
        match sock.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Accepts clients on one of a machine's ports until the machine is cancelled. `listener` is
/// the socket bound at allocation time; when there is none (the port was busy at start-up)
/// binding is retried, so the machine keeps its persisted port.
pub async fn serve_port(
    machine: Arc<Machine>,
    listener: Option<TcpListener>,
    ip: IpAddr,
    port: u16,
    read_only: bool,
    filter: Arc<ClientFilter>,
    tasks: TaskTracker,
) {
    let refused = metrics::counter!("salad_console_clients_refused_total");
    let listener = match listener {
        Some(l) => l,
        None => {
            let mut warned = false;
            loop {
                match TcpListener::bind((ip, port)).await {
                    Ok(l) => break l,
                    Err(e) => {
                        if !warned {
                            tracing::error!(machine = %machine.id, port, error = %e, "cannot listen on the machine's console port; retrying");
                            warned = true;
                        }
                    }
                }
                tokio::select! {
                    _ = machine.cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = machine.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let local = stream.local_addr().map(|a| a.ip()).unwrap_or(ip);
                match filter.check(peer.ip(), local) {
                    Ok(()) => machine.serve_client(stream, peer, read_only, &tasks),
                    Err(why) => {
                        refused.increment(1);
                        tracing::warn!(machine = %machine.id, port, %peer, reason = why, "console client refused");
                        // Dropping the socket closes it before a byte is exchanged.
                        drop(stream);
                    }
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(machine = %machine.id, port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrollback_keeps_the_last_bytes() {
        let mut s = Scrollback::default();
        for i in 0..100u8 {
            s.push(&Bytes::from(vec![i; 10]), 25);
        }
        let all: Vec<u8> = s.chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(all.len(), 25);
        assert_eq!(&all[..5], &[97; 5]);
        assert_eq!(&all[15..], &[99; 10]);
        s.push(&Bytes::from(vec![7u8; 100]), 25);
        assert_eq!(s.len, 25);
        assert_eq!(s.chunks.len(), 1);
    }
}
