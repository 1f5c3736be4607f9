//! A PDU as the service holds it: its actor's queue, its state cache, per-port locks, and
//! the power operations built on top (switch with read-back, verified power cycle).
//!
//! Ordering: every operation on a port holds that port's lock (a FIFO `tokio::sync::Mutex`)
//! from start to end, so commands on one port apply in arrival order and a cycle is never
//! interleaved with a switch of the same port. Device access itself is serialised by the
//! actor; operations on different ports of one PDU interleave there, one exchange at a time.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dutgate_pdu_driver::{DriverError, PduDriver, PowerState, Switch};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::actor::{Actor, Answer, Cache, Call, PortEntry, Request, Tuning, lock};
use crate::store::{HistoryEntry, PortSetting, Store, now_ms};

/// Where a PDU was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Config,
    Api,
}

/// A port as the API shows it (design.md §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortView {
    pub id: String,
    pub label: Option<String>,
    pub state: PowerState,
    /// Unix ms of the last observed state change.
    pub last_change: Option<i64>,
    /// Unix ms of the last successful read of this port.
    pub last_polled: Option<i64>,
    pub reserved: bool,
    /// The port's power draw in watts, where the driver reads it.
    pub power_w: Option<f64>,
    /// Why the last switch or cycle of this port failed; cleared by the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl From<&PortEntry> for PortView {
    fn from(p: &PortEntry) -> Self {
        Self {
            id: p.id.clone(),
            label: p.label.clone(),
            state: p.state,
            last_change: p.last_change,
            last_polled: p.last_polled,
            reserved: p.reserved,
            power_w: p.power_w,
            last_error: p.last_error.clone(),
        }
    }
}

/// Why a power operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("no port {port:?} on PDU {pdu}")]
    NoSuchPort { pdu: String, port: String },
    #[error("port {port} of PDU {pdu} is reserved; unreserve it first")]
    Reserved { pdu: String, port: String },
    #[error("PDU {pdu} has not listed its ports yet: {reason}")]
    NotReady { pdu: String, reason: String },
    #[error("PDU {pdu} port {port}: {source}")]
    Driver {
        pdu: String,
        port: String,
        #[source]
        source: DriverError,
    },
    #[error(
        "PDU {pdu} port {port} was switched {wanted} but reads back {got} after {:.1} s",
        after.as_secs_f64()
    )]
    ReadBack {
        pdu: String,
        port: String,
        wanted: Switch,
        got: PowerState,
        after: Duration,
    },
    #[error(
        "power cycle of PDU {pdu} port {port} failed: the port was seen ON {:.1} s into the {:.1} s off delay",
        after.as_secs_f64(), off.as_secs_f64()
    )]
    CameBackOn {
        pdu: String,
        port: String,
        after: Duration,
        off: Duration,
    },
    #[error(
        "power cycle of PDU {pdu} port {port} failed: could not verify OFF {:.1} s into the off delay: {reason}",
        after.as_secs_f64()
    )]
    Unverified {
        pdu: String,
        port: String,
        after: Duration,
        reason: String,
    },
    #[error("PDU {0} is being removed")]
    Stopped(String),
    #[error("storage: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What a switch or a cycle answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OpResult {
    #[serde(flatten)]
    pub port: PortView,
    /// Order in which operations on this PDU took effect (per process, increasing).
    pub op_seq: u64,
}

/// A successful power cycle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CycleReport {
    #[serde(flatten)]
    pub port: PortView,
    pub op_seq: u64,
    pub off_seconds: f64,
    /// How many reads confirmed OFF during the off delay.
    pub off_checks: u32,
}

/// An admin change of one port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortPatch {
    #[serde(default)]
    pub state: Option<Switch>,
    /// A label to show instead of the device's (empty string: back to the device's).
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub reserved: Option<bool>,
}

pub struct Pdu {
    pub name: String,
    pub driver: String,
    pub source: Source,
    /// The driver config as given (secrets are masked when shown).
    pub config: serde_json::Value,
    tx: mpsc::Sender<Request>,
    pub cache: Arc<Mutex<Cache>>,
    port_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    seq: AtomicU64,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    store: Store,
    tuning: Arc<Tuning>,
}

pub struct PduSetup {
    pub name: String,
    pub driver_name: String,
    pub source: Source,
    pub config: serde_json::Value,
    pub driver: Box<dyn PduDriver>,
    pub reserved: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub poll_interval: Option<Duration>,
}

impl Pdu {
    /// Starts the PDU's actor. Admin port settings come from the store.
    pub async fn start(
        setup: PduSetup,
        store: Store,
        tuning: Arc<Tuning>,
        parent: &CancellationToken,
    ) -> Result<Arc<Self>, crate::store::StoreError> {
        let settings = store.port_settings(&setup.name).await?;
        let cache = Cache {
            overrides: settings
                .into_iter()
                .map(|(id, s)| (id, (s.label, s.reserved)))
                .collect(),
            spec_labels: setup.labels,
            spec_reserved: setup.reserved,
            ..Default::default()
        };
        let cache = Arc::new(Mutex::new(cache));
        let (tx, rx) = mpsc::channel(256);
        let stop = parent.child_token();
        let actor = Actor {
            pdu: setup.name.clone(),
            driver: setup.driver,
            cache: cache.clone(),
            store: store.clone(),
            poll_interval: setup.poll_interval.unwrap_or(tuning.poll_interval),
            tuning: tuning.clone(),
            rx,
            stop: stop.clone(),
            measures_power: None,
        };
        let task = tokio::spawn(actor.run());
        Ok(Arc::new(Self {
            name: setup.name,
            driver: setup.driver_name,
            source: setup.source,
            config: setup.config,
            tx,
            cache,
            port_locks: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            stop,
            task: Mutex::new(Some(task)),
            store,
            tuning,
        }))
    }

    /// Stops the actor and waits for it (the driver's `shutdown` runs there).
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }

    pub fn ports(&self) -> Vec<PortView> {
        lock(&self.cache).ports.iter().map(PortView::from).collect()
    }

    pub fn port(&self, id: &str) -> Result<PortView, PowerError> {
        let c = lock(&self.cache);
        match c.port(id) {
            Some(p) => Ok(p.into()),
            None => Err(self.missing(&c, id)),
        }
    }

    fn missing(&self, c: &Cache, id: &str) -> PowerError {
        if c.listed {
            PowerError::NoSuchPort {
                pdu: self.name.clone(),
                port: id.to_string(),
            }
        } else {
            PowerError::NotReady {
                pdu: self.name.clone(),
                reason: c
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "first poll still running".into()),
            }
        }
    }

    pub fn summary(&self) -> (usize, Option<i64>, Option<String>) {
        let c = lock(&self.cache);
        (c.ports.len(), c.last_polled, c.last_error.clone())
    }

    async fn request(&self, call: Call, cause: &'static str) -> Result<Answer, PowerError> {
        let port = match &call {
            Call::Get(p) | Call::Set(p, _) | Call::Power(p) => p.clone(),
            _ => String::new(),
        };
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { call, cause, reply })
            .await
            .map_err(|_| PowerError::Stopped(self.name.clone()))?;
        let answer = rx
            .await
            .map_err(|_| PowerError::Stopped(self.name.clone()))?;
        answer.map_err(|source| PowerError::Driver {
            pdu: self.name.clone(),
            port,
            source,
        })
    }

    /// Reads one port from the device (through the actor).
    pub async fn read(&self, port: &str, cause: &'static str) -> Result<PowerState, PowerError> {
        match self.request(Call::Get(port.to_string()), cause).await? {
            Answer::State(s) => Ok(s),
            other => Err(self.unexpected(port, other)),
        }
    }

    /// Asks the actor to list ports again and poll now; waits until it did.
    pub async fn refresh(&self) -> Result<(), PowerError> {
        self.request(Call::Ports, "poll").await?;
        self.request(Call::GetAll, "poll").await?;
        Ok(())
    }

    fn unexpected(&self, port: &str, a: Answer) -> PowerError {
        PowerError::Driver {
            pdu: self.name.clone(),
            port: port.to_string(),
            source: DriverError::Local(format!("internal: unexpected answer {a:?}")),
        }
    }

    fn port_lock(&self, port: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.port_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(port.to_string())
            .or_default()
            .clone()
    }

    fn check_switchable(&self, port: &str) -> Result<(), PowerError> {
        let view = self.port(port)?;
        if view.reserved {
            return Err(PowerError::Reserved {
                pdu: self.name.clone(),
                port: port.to_string(),
            });
        }
        Ok(())
    }

    /// Switches a port and waits until the device reads back the wanted state.
    async fn switch_verified(
        &self,
        port: &str,
        want: Switch,
        cause: &'static str,
    ) -> Result<(), PowerError> {
        self.request(Call::Set(port.to_string(), want), cause)
            .await?;
        let start = Instant::now();
        loop {
            let got = self.read(port, cause).await;
            let last = match got {
                Ok(s) if s == want.as_state() => return Ok(()),
                Ok(s) => s,
                Err(PowerError::Driver { source, .. }) if source.is_transient() => {
                    PowerState::Unknown
                }
                Err(e) => return Err(e),
            };
            if start.elapsed() >= self.tuning.settle_timeout {
                return Err(PowerError::ReadBack {
                    pdu: self.name.clone(),
                    port: port.to_string(),
                    wanted: want,
                    got: last,
                    after: start.elapsed(),
                });
            }
            tokio::time::sleep(self.tuning.readback_interval).await;
        }
    }

    async fn history(&self, port: &str, state: PowerState, event: &str, detail: Option<String>) {
        let entry = HistoryEntry {
            at: now_ms(),
            state,
            event: event.to_string(),
            detail,
        };
        if let Err(e) = self
            .store
            .record(&self.name, port, &entry, self.tuning.history_per_port)
            .await
        {
            tracing::error!(pdu = %self.name, port, error = %e, "cannot record port history");
        }
    }

    fn note_error(&self, port: &str, e: Option<&PowerError>) {
        if let Some(p) = lock(&self.cache).port_mut(port) {
            p.last_error = e.map(|e| e.to_string());
        }
    }

    /// Makes sure the device listed its ports (right after start the first poll may still
    /// be running, or the device was unreachable until now).
    async fn ensure_listed(&self) -> Result<(), PowerError> {
        if lock(&self.cache).listed {
            return Ok(());
        }
        match self.request(Call::Ports, "poll").await {
            Ok(_) => Ok(()),
            Err(e) => Err(PowerError::NotReady {
                pdu: self.name.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Switches a port; returns the read-back state.
    pub async fn switch(&self, port: &str, want: Switch) -> Result<OpResult, PowerError> {
        let l = self.port_lock(port);
        let _guard = l.lock().await;
        self.switch_locked(port, want).await
    }

    /// [`Pdu::switch`] for a caller that holds the port's lock.
    async fn switch_locked(&self, port: &str, want: Switch) -> Result<OpResult, PowerError> {
        self.ensure_listed().await?;
        self.check_switchable(port)?;
        let op_seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let started = std::time::Instant::now();
        let switched = self.switch_verified(port, want, "set").await;
        let action = match want {
            Switch::On => "on",
            Switch::Off => "off",
        };
        metrics::histogram!("pdu_switch_duration_seconds", "pdu" => self.name.clone(), "action" => action, "result" => if switched.is_ok() { "ok" } else { "error" })
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = switched {
            tracing::warn!(pdu = %self.name, port, error = %e, "switching failed");
            self.note_error(port, Some(&e));
            return Err(e);
        }
        self.note_error(port, None);
        tracing::info!(pdu = %self.name, port, state = %want, op_seq, "port switched");
        Ok(OpResult {
            port: self.port(port)?,
            op_seq,
        })
    }

    /// Applies an admin change: reservation and label first, then the state.
    pub async fn patch(&self, port: &str, patch: PortPatch) -> Result<OpResult, PowerError> {
        let l = self.port_lock(port);
        let _guard = l.lock().await;
        self.ensure_listed().await?;
        self.port(port)?;
        if patch.reserved.is_some() || patch.label.is_some() {
            let mut setting = {
                let c = lock(&self.cache);
                let (label, reserved) = c.overrides.get(port).cloned().unwrap_or_default();
                PortSetting { label, reserved }
            };
            if let Some(r) = patch.reserved {
                setting.reserved = Some(r);
            }
            if let Some(label) = &patch.label {
                setting.label = (!label.is_empty()).then(|| label.clone());
            }
            self.store
                .put_port_setting(&self.name, port, &setting)
                .await?;
            let mut c = lock(&self.cache);
            c.overrides
                .insert(port.to_string(), (setting.label, setting.reserved));
            c.refresh_overrides(port);
        }
        match patch.state {
            Some(want) => self.switch_locked(port, want).await,
            None => Ok(OpResult {
                port: self.port(port)?,
                op_seq: self.seq.load(Ordering::SeqCst),
            }),
        }
    }

    /// Off → read back Off → keep verifying Off for `off` → On → read back On.
    pub async fn cycle(&self, port: &str, off: Duration) -> Result<CycleReport, PowerError> {
        let l = self.port_lock(port);
        let _guard = l.lock().await;
        self.ensure_listed().await?;
        self.check_switchable(port)?;
        let op_seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        tracing::info!(pdu = %self.name, port, off_seconds = off.as_secs_f64(), op_seq, "power cycle");
        let started = std::time::Instant::now();
        let cycled = self.cycle_steps(port, off).await;
        metrics::histogram!("pdu_switch_duration_seconds", "pdu" => self.name.clone(), "action" => "cycle", "result" => if cycled.is_ok() { "ok" } else { "error" })
            .record(started.elapsed().as_secs_f64());
        match cycled {
            Ok(off_checks) => {
                self.note_error(port, None);
                metrics::counter!("pdu_cycles_total", "pdu" => self.name.clone(), "result" => "ok")
                    .increment(1);
                self.history(
                    port,
                    PowerState::On,
                    "cycle",
                    Some(format!(
                        "off {:.1} s, {off_checks} OFF checks",
                        off.as_secs_f64()
                    )),
                )
                .await;
                Ok(CycleReport {
                    port: self.port(port)?,
                    op_seq,
                    off_seconds: off.as_secs_f64(),
                    off_checks,
                })
            }
            Err(e) => {
                let result = match &e {
                    PowerError::CameBackOn { .. } => "came_back_on",
                    PowerError::ReadBack { .. } => "read_back",
                    PowerError::Unverified { .. } => "unverified",
                    _ => "error",
                };
                metrics::counter!("pdu_cycles_total", "pdu" => self.name.clone(), "result" => result)
                    .increment(1);
                tracing::error!(pdu = %self.name, port, error = %e, "power cycle failed");
                let state = self
                    .port(port)
                    .map(|p| p.state)
                    .unwrap_or(PowerState::Unknown);
                self.history(port, state, "cycle_failed", Some(e.to_string()))
                    .await;
                if matches!(e, PowerError::CameBackOn { .. }) {
                    // Leave the machine in the safe state the caller asked for at the start.
                    if let Err(e2) = self.switch_verified(port, Switch::Off, "cycle").await {
                        tracing::error!(pdu = %self.name, port, error = %e2, "cannot switch the port back off");
                    }
                }
                self.note_error(port, Some(&e));
                Err(e)
            }
        }
    }

    async fn cycle_steps(&self, port: &str, off: Duration) -> Result<u32, PowerError> {
        self.switch_verified(port, Switch::Off, "cycle").await?;
        let start = Instant::now();
        let mut checks = 0;
        loop {
            let elapsed = start.elapsed();
            if elapsed >= off {
                break;
            }
            let wait = self.tuning.verify_interval.min(off - elapsed);
            tokio::time::sleep(wait).await;
            let after = start.elapsed();
            match self.read(port, "cycle").await {
                Ok(PowerState::Off) => checks += 1,
                Ok(PowerState::On) => {
                    return Err(PowerError::CameBackOn {
                        pdu: self.name.clone(),
                        port: port.to_string(),
                        after,
                        off,
                    });
                }
                Ok(PowerState::Unknown) => {
                    return Err(PowerError::Unverified {
                        pdu: self.name.clone(),
                        port: port.to_string(),
                        after,
                        reason: "the port reads UNKNOWN".into(),
                    });
                }
                Err(e) => {
                    return Err(PowerError::Unverified {
                        pdu: self.name.clone(),
                        port: port.to_string(),
                        after,
                        reason: e.to_string(),
                    });
                }
            }
        }
        self.switch_verified(port, Switch::On, "cycle").await?;
        Ok(checks)
    }

    pub async fn port_history(
        &self,
        port: &str,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, PowerError> {
        self.port(port)?;
        Ok(self.store.history(&self.name, port, limit).await?)
    }
}
