//! The hub: every machine salad knows (with its console ports) and every open console stream.
//!
//! Machines come from the store at start-up, from `GET /api/v1/machine/{id}` and from
//! `SALAD.machine_id=` lines. Ports are allocated here, once per machine, from the configured
//! range and persisted, so a machine keeps its ports across restarts. Their number is bounded
//! (`max_consoles`), and so is the number of those created for machines mars does not know
//! (`max_unregistered_consoles`): a DUT printing made-up ids cannot exhaust the range.
//!
//! The hub also holds what binding decisions need ([`crate::binding`]): the boots announced
//! by lease holders (`expect`) and the mars client.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dutgate_core::MachineId;
use dutgate_mars::client::MarsClient;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::console_log::{ConsoleLog, LogError};
use crate::relay::{ClientFilter, ClientLimits, Machine, StreamId, serve_port};
use crate::store::{MachinePorts, Store, StoreError};

/// How long salad waits for mars before it refuses what it wanted to check.
pub const MARS_TIMEOUT: Duration = Duration::from_secs(5);
/// Unregistered consoles are swept (mars asked again) at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Most announced boots remembered at once.
const MAX_EXPECTATIONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(
        "no free console port left in {first}-{last}; delete unused machines or widen salad.console_ports"
    )]
    RangeExhausted { first: u16, last: u16 },
    #[error("salad is shutting down")]
    ShuttingDown,
    #[error("salad already serves {0} consoles (salad.max_consoles); delete unused machines")]
    Full(usize),
    #[error(
        "salad already serves {0} consoles of machines mars does not know (salad.max_unregistered_consoles)"
    )]
    UnregisteredFull(usize),
}

/// Who may reach the consoles and how salad checks: the raw ports' client filter, and the
/// mars client for machine states and leases.
pub struct Access {
    pub filter: ClientFilter,
    pub mars: MarsClient,
}

/// What mars says about a machine.
#[derive(Debug, Clone)]
pub enum MarsView {
    Unknown,
    Known(Box<dutgate_mars::model::Machine>),
}

/// Sent to a stream's task by the admin binding endpoint.
#[derive(Clone)]
pub enum StreamCommand {
    Bind(Arc<Machine>),
    Unbind,
}

/// What `/api/v1/ports` shows about one open console stream.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamStatus {
    /// Identifies the stream for `PUT /api/v1/ports/{stream}/machine` while it is open.
    pub id: u64,
    /// `serial` or `netconsole`.
    #[schema(examples("serial", "netconsole"))]
    pub kind: String,
    /// Device path (serial) or peer address (netconsole).
    pub name: String,
    /// The stable path a serial adapter is remembered by (by-path link when there is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The machine the stream is bound to; `null` while unbound.
    pub machine: Option<MachineId>,
    /// RFC 3339, UTC.
    pub opened_at: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Announcements of this stream that were refused (docs/salad.md, "Binding rules").
    #[serde(default)]
    pub refused: u64,
}

/// Live counters of one stream, shared between its task and the hub.
pub struct StreamEntry {
    pub id: StreamId,
    pub kind: &'static str,
    pub name: String,
    pub key: Option<String>,
    pub opened_at: String,
    pub machine: Mutex<Option<MachineId>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub refused: AtomicU64,
    commands: mpsc::Sender<StreamCommand>,
}

impl StreamEntry {
    pub fn set_machine(&self, m: Option<MachineId>) {
        *self.machine.lock().unwrap_or_else(|p| p.into_inner()) = m;
    }

    fn status(&self) -> StreamStatus {
        StreamStatus {
            id: self.id.0,
            kind: self.kind.to_string(),
            name: self.name.clone(),
            key: self.key.clone(),
            machine: *self.machine.lock().unwrap_or_else(|p| p.into_inner()),
            opened_at: self.opened_at.clone(),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

pub struct Hub {
    pub config: Arc<Config>,
    pub store: Store,
    bind_ip: IpAddr,
    log_root: PathBuf,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    machines: RwLock<HashMap<MachineId, Arc<Machine>>>,
    /// Serialises port allocation (the store's unique constraints catch other gateways).
    alloc: tokio::sync::Mutex<()>,
    streams: Mutex<BTreeMap<StreamId, Arc<StreamEntry>>>,
    next_stream: AtomicU64,
    filter: Arc<ClientFilter>,
    pub mars: MarsClient,
    /// Boots announced by an admin or a lease holder: machine → until when.
    expected: Mutex<HashMap<MachineId, Instant>>,
    /// Console servers created for machines mars did not know.
    unregistered: Mutex<BTreeSet<MachineId>>,
    last_sweep: Mutex<Option<Instant>>,
}

impl Hub {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        bind_ip: IpAddr,
        log_root: PathBuf,
        tasks: TaskTracker,
        shutdown: CancellationToken,
        access: Access,
    ) -> Self {
        Self {
            config,
            store,
            bind_ip,
            log_root,
            tasks,
            shutdown,
            machines: RwLock::new(HashMap::new()),
            alloc: tokio::sync::Mutex::new(()),
            streams: Mutex::new(BTreeMap::new()),
            next_stream: AtomicU64::new(1),
            filter: Arc::new(access.filter),
            mars: access.mars,
            expected: Mutex::new(HashMap::new()),
            unregistered: Mutex::new(BTreeSet::new()),
            last_sweep: Mutex::new(None),
        }
    }

    pub fn filter(&self) -> &ClientFilter {
        &self.filter
    }

    /// Asks mars about `id` (bounded by [`MARS_TIMEOUT`]); `Err` says why it cannot tell.
    pub async fn mars_machine(&self, id: MachineId) -> Result<MarsView, String> {
        match tokio::time::timeout(MARS_TIMEOUT, self.mars.machine(id)).await {
            Err(_) => Err(format!("mars did not answer within {MARS_TIMEOUT:?}")),
            Ok(Ok(m)) => Ok(MarsView::Known(Box::new(m))),
            Ok(Err(e)) if e.status() == Some(reqwest::StatusCode::NOT_FOUND) => {
                Ok(MarsView::Unknown)
            }
            Ok(Err(e)) => Err(format!("cannot ask mars: {e}")),
        }
    }

    /// Lets an unbound stream bind to `id` for `expect_window_seconds` (the holder of its
    /// lease is about to power it on).
    pub fn expect(&self, id: MachineId) {
        let now = Instant::now();
        let mut map = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, until| *until > now);
        if map.len() >= MAX_EXPECTATIONS && !map.contains_key(&id) {
            // Only admins and lease holders get here; dropping the oldest keeps it bounded.
            if let Some(oldest) = map.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        }
        map.insert(id, now + self.config.expect_window());
    }

    pub fn is_expected(&self, id: MachineId) -> bool {
        self.expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|until| *until > Instant::now())
    }

    /// A stream bound to `id`: the announced boot has spoken.
    pub fn clear_expectation(&self, id: MachineId) {
        self.expected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    fn unregistered_count(&self) -> usize {
        self.unregistered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The console server of a machine mars does not know, created within
    /// `max_unregistered_consoles`. When that is full, consoles whose stream is gone are
    /// checked with mars again: those mars now knows count no more, those it still does
    /// not know are deleted.
    pub async fn get_or_create_unregistered(
        &self,
        id: MachineId,
    ) -> Result<Arc<Machine>, HubError> {
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        let max = self.config.max_unregistered_consoles;
        if self.unregistered_count() >= max {
            self.sweep_unregistered().await?;
        }
        if self.unregistered_count() >= max {
            return Err(HubError::UnregisteredFull(max));
        }
        let m = self.get_or_create(id).await?;
        self.unregistered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        Ok(m)
    }

    async fn sweep_unregistered(&self) -> Result<(), HubError> {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < SWEEP_INTERVAL) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let ids: Vec<MachineId> = self
            .unregistered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        for id in ids {
            if self.get(id).is_some_and(|m| m.has_console()) {
                continue;
            }
            match self.mars_machine(id).await {
                Ok(MarsView::Known(_)) => {
                    self.unregistered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id);
                }
                Ok(MarsView::Unknown) => {
                    tracing::info!(machine = %id, "deleting the console of a machine mars never registered");
                    self.delete(id).await?;
                }
                Err(e) => {
                    tracing::warn!(machine = %id, error = %e, "cannot check an unregistered console with mars");
                }
            }
        }
        Ok(())
    }

    fn limits(&self) -> ClientLimits {
        ClientLimits {
            queue_bytes: self.config.client_queue_bytes,
            write_timeout: self.config.client_write_timeout(),
            scrollback_bytes: self.config.scrollback_kib * 1024,
        }
    }

    /// Directory of a machine's console log.
    pub fn log_dir(&self, id: MachineId) -> PathBuf {
        self.log_root.join(id.to_string().replace(':', "-"))
    }

    pub fn get(&self, id: MachineId) -> Option<Arc<Machine>> {
        self.machines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// Every machine, ordered by id.
    pub fn all(&self) -> Vec<Arc<Machine>> {
        let mut v: Vec<_> = self
            .machines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|m| m.id);
        v
    }

    /// Starts the servers of every machine in the store (their ports are kept).
    pub async fn load(&self) -> Result<usize, HubError> {
        let rows = self.store.machines().await?;
        let n = rows.len();
        for row in rows {
            if !self.config.console_ports.contains(row.tcp_port)
                || !self.config.console_ports.contains(row.tcp_port_logs)
            {
                tracing::warn!(
                    machine = %row.id, tcp_port = row.tcp_port, tcp_port_logs = row.tcp_port_logs,
                    "machine keeps its ports from outside the configured salad.console_ports range"
                );
            }
            self.install(row, None, None).await?;
        }
        Ok(n)
    }

    async fn install(
        &self,
        row: MachinePorts,
        main: Option<TcpListener>,
        logs: Option<TcpListener>,
    ) -> Result<Arc<Machine>, HubError> {
        let log = ConsoleLog::open(
            self.log_dir(row.id),
            self.config.console_log.clone(),
            &row.id.to_string(),
            &self.tasks,
        )
        .await?;
        let machine = Arc::new(Machine::new(
            row.id,
            row.tcp_port,
            row.tcp_port_logs,
            self.limits(),
            log,
            self.shutdown.child_token(),
        ));
        self.tasks.spawn(machine.servers.track_future(serve_port(
            machine.clone(),
            main,
            self.bind_ip,
            row.tcp_port,
            false,
            self.filter.clone(),
            self.tasks.clone(),
        )));
        self.tasks.spawn(machine.servers.track_future(serve_port(
            machine.clone(),
            logs,
            self.bind_ip,
            row.tcp_port_logs,
            true,
            self.filter.clone(),
            self.tasks.clone(),
        )));
        self.machines
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(row.id, machine.clone());
        Ok(machine)
    }

    /// The machine's relay, created (ports allocated, persisted, servers started) if new.
    pub async fn get_or_create(&self, id: MachineId) -> Result<Arc<Machine>, HubError> {
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        if self.shutdown.is_cancelled() {
            return Err(HubError::ShuttingDown);
        }
        let _guard = self.alloc.lock().await;
        if let Some(m) = self.get(id) {
            return Ok(m);
        }
        let count = self
            .machines
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        if count >= self.config.max_consoles {
            return Err(HubError::Full(self.config.max_consoles));
        }
        let range = self.config.console_ports;
        // A few rounds: another gateway sharing the database may take ports under our feet.
        for _ in 0..5 {
            let mut used: BTreeSet<u16> = self.store.used_ports().await?;
            for m in self.all() {
                used.insert(m.tcp_port);
                used.insert(m.tcp_port_logs);
            }
            let mut bound = Vec::with_capacity(2);
            for port in range.first..=range.last {
                if used.contains(&port) {
                    continue;
                }
                // Taking the socket now both proves the port is free and keeps it.
                match TcpListener::bind((self.bind_ip, port)).await {
                    Ok(l) => bound.push((port, l)),
                    Err(e) => {
                        tracing::debug!(port, error = %e, "console port busy, skipping");
                        continue;
                    }
                }
                if bound.len() == 2 {
                    break;
                }
            }
            if bound.len() < 2 {
                return Err(HubError::RangeExhausted {
                    first: range.first,
                    last: range.last,
                });
            }
            let (logs_port, logs) = bound.pop().ok_or(HubError::ShuttingDown)?;
            let (main_port, main) = bound.pop().ok_or(HubError::ShuttingDown)?;
            let row = MachinePorts {
                id,
                tcp_port: main_port,
                tcp_port_logs: logs_port,
            };
            match self.store.insert_machine(row).await {
                Ok(()) => {
                    tracing::info!(machine = %id, tcp_port = main_port, tcp_port_logs = logs_port, "console server created");
                    return self.install(row, Some(main), Some(logs)).await;
                }
                Err(StoreError::PortTaken) => continue,
                Err(StoreError::Exists(_)) => {
                    // Another gateway created it in the shared database: use its ports.
                    drop((main, logs));
                    let rows = self.store.machines().await?;
                    if let Some(row) = rows.into_iter().find(|r| r.id == id) {
                        return self.install(row, None, None).await;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(HubError::RangeExhausted {
            first: range.first,
            last: range.last,
        })
    }

    /// Stops a machine's servers, disconnects its clients and forgets its ports.
    pub async fn delete(&self, id: MachineId) -> Result<bool, HubError> {
        let _guard = self.alloc.lock().await;
        let removed = self
            .machines
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(m) = &removed {
            m.cancel.cancel();
            // Its listeners are closed when this returns: the ports can be handed out again.
            m.servers.close();
            if tokio::time::timeout(Duration::from_secs(5), m.servers.wait())
                .await
                .is_err()
            {
                tracing::warn!(machine = %id, "the machine's console servers did not stop within 5 s");
            }
        }
        self.unregistered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let existed = self.store.delete_machine(id).await?;
        Ok(existed || removed.is_some())
    }

    /// Registers a new console stream; the returned entry is updated by the stream's task.
    pub fn add_stream(
        &self,
        kind: &'static str,
        name: String,
        key: Option<String>,
    ) -> (StreamId, Arc<StreamEntry>, mpsc::Receiver<StreamCommand>) {
        let id = StreamId(self.next_stream.fetch_add(1, Ordering::Relaxed));
        let (commands, rx) = mpsc::channel(4);
        let entry = Arc::new(StreamEntry {
            id,
            commands,
            kind,
            name,
            key,
            opened_at: crate::console_log::stamp(time::OffsetDateTime::now_utc())
                .trim_end()
                .to_string(),
            machine: Mutex::new(None),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry.clone());
        (id, entry, rx)
    }

    fn stream(&self, id: StreamId) -> Option<Arc<StreamEntry>> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    /// An admin binds stream `id` to `machine` (creating its console server) or unbinds it
    /// (`None`). `Ok(false)`: no such open stream.
    pub async fn admin_bind(
        &self,
        id: StreamId,
        machine: Option<MachineId>,
    ) -> Result<bool, HubError> {
        let Some(entry) = self.stream(id) else {
            return Ok(false);
        };
        let cmd = match machine {
            Some(m) => StreamCommand::Bind(self.get_or_create(m).await?),
            None => StreamCommand::Unbind,
        };
        Ok(entry.commands.send(cmd).await.is_ok())
    }

    /// Tells stream `id` it lost its machine to an admin's binding.
    pub fn unbind_stream(&self, id: StreamId) {
        if let Some(entry) = self.stream(id) {
            // A full queue means commands are pending: the stream also notices at its next
            // output, which the machine no longer accepts from it.
            let _ = entry.commands.try_send(StreamCommand::Unbind);
        }
    }

    pub fn remove_stream(&self, id: StreamId) {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    pub fn streams(&self) -> Vec<StreamStatus> {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.status())
            .collect()
    }
}
