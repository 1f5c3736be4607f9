//! The hub: every machine salad knows (with its console ports) and every open console stream.
//!
//! Machines come from the store at start-up, from `GET /api/v1/machine/{id}` and from
//! `SALAD.machine_id=` lines. Ports are allocated here, once per machine, from the configured
//! range and persisted, so a machine keeps its ports across restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dutgate_core::MachineId;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::console_log::{ConsoleLog, LogError};
use crate::relay::{ClientLimits, Machine, StreamId, serve_port};
use crate::store::{MachinePorts, Store, StoreError};

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
}

/// What `/api/v1/ports` shows about one open console stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamStatus {
    /// `serial` or `netconsole`.
    pub kind: String,
    /// Device path (serial) or peer address (netconsole).
    pub name: String,
    /// The stable path a serial adapter is remembered by (by-path link when there is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub machine: Option<MachineId>,
    pub opened_at: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Live counters of one stream, shared between its task and the hub.
pub struct StreamEntry {
    pub kind: &'static str,
    pub name: String,
    pub key: Option<String>,
    pub opened_at: String,
    pub machine: Mutex<Option<MachineId>>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl StreamEntry {
    pub fn set_machine(&self, m: Option<MachineId>) {
        *self.machine.lock().unwrap_or_else(|p| p.into_inner()) = m;
    }

    fn status(&self) -> StreamStatus {
        StreamStatus {
            kind: self.kind.to_string(),
            name: self.name.clone(),
            key: self.key.clone(),
            machine: *self.machine.lock().unwrap_or_else(|p| p.into_inner()),
            opened_at: self.opened_at.clone(),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
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
}

impl Hub {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        bind_ip: IpAddr,
        log_root: PathBuf,
        tasks: TaskTracker,
        shutdown: CancellationToken,
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
        }
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
        self.tasks.spawn(serve_port(
            machine.clone(),
            main,
            self.bind_ip,
            row.tcp_port,
            false,
            self.tasks.clone(),
        ));
        self.tasks.spawn(serve_port(
            machine.clone(),
            logs,
            self.bind_ip,
            row.tcp_port_logs,
            true,
            self.tasks.clone(),
        ));
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
        }
        let existed = self.store.delete_machine(id).await?;
        Ok(existed || removed.is_some())
    }

    /// Registers a new console stream; the returned entry is updated by the stream's task.
    pub fn add_stream(
        &self,
        kind: &'static str,
        name: String,
        key: Option<String>,
    ) -> (StreamId, Arc<StreamEntry>) {
        let id = StreamId(self.next_stream.fetch_add(1, Ordering::Relaxed));
        let entry = Arc::new(StreamEntry {
            kind,
            name,
            key,
            opened_at: crate::console_log::stamp(time::OffsetDateTime::now_utc())
                .trim_end()
                .to_string(),
            machine: Mutex::new(None),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        });
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry.clone());
        (id, entry)
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
