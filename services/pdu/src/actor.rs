//! One actor per PDU: the only task that ever talks to the device.
//!
//! Cheap PDUs (telnet, serial, SNMP agents on small micro-controllers) misbehave when two
//! requests overlap, so every device exchange of a PDU goes through this task's queue, one
//! at a time. The actor also polls the device on a timer and keeps the state cache that
//! `GET` requests read, so that reading ports never touches the device.
//!
//! Every driver call gets a time budget and transient failures are retried with exponential
//! back-off; what the actor learns about a port goes into the cache, the per-port history
//! (on changes only) and the metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dutgate_pdu_driver::{DriverError, PduDriver, PortInfo, PowerState, Switch};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::{HistoryEntry, Store, now_ms};

/// Timing knobs shared by every PDU (from the service config).
#[derive(Debug, Clone)]
pub struct Tuning {
    pub poll_interval: Duration,
    pub op_timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub settle_timeout: Duration,
    pub readback_interval: Duration,
    pub verify_interval: Duration,
    pub history_per_port: u32,
}

/// What the service knows about one port.
#[derive(Debug, Clone)]
pub struct PortEntry {
    pub id: String,
    pub device_label: Option<String>,
    pub label: Option<String>,
    pub reserved: bool,
    pub state: PowerState,
    pub last_change: Option<i64>,
    pub last_polled: Option<i64>,
    pub power_w: Option<f64>,
    /// Why the last switch or cycle of this port failed; cleared by the next success.
    pub last_error: Option<String>,
}

/// The polled state of a PDU, read by the API without touching the device.
#[derive(Debug, Default)]
pub struct Cache {
    pub ports: Vec<PortEntry>,
    /// Whether the device has ever listed its ports.
    pub listed: bool,
    pub last_polled: Option<i64>,
    pub last_error: Option<String>,
    /// Labels and reservations from the PDU's spec and the store, applied when ports appear.
    pub overrides: BTreeMap<String, (Option<String>, Option<bool>)>,
    pub spec_labels: BTreeMap<String, String>,
    pub spec_reserved: Vec<String>,
}

impl Cache {
    pub fn port(&self, id: &str) -> Option<&PortEntry> {
        self.ports.iter().find(|p| p.id == id)
    }

    pub fn port_mut(&mut self, id: &str) -> Option<&mut PortEntry> {
        self.ports.iter_mut().find(|p| p.id == id)
    }

    fn effective(&self, id: &str, device_label: Option<&String>) -> (Option<String>, bool) {
        let (label, reserved) = self.overrides.get(id).cloned().unwrap_or_default();
        let label = label
            .or_else(|| self.spec_labels.get(id).cloned())
            .or_else(|| device_label.cloned());
        let reserved = reserved.unwrap_or_else(|| self.spec_reserved.iter().any(|r| r == id));
        (label, reserved)
    }

    /// Replaces the port list, keeping what is known about ports that stay.
    fn set_ports(&mut self, ports: Vec<PortInfo>) {
        let mut old: BTreeMap<String, PortEntry> =
            self.ports.drain(..).map(|p| (p.id.clone(), p)).collect();
        let mut new = Vec::with_capacity(ports.len());
        for p in ports {
            let (label, reserved) = self.effective(&p.id, p.label.as_ref());
            let entry = match old.remove(&p.id) {
                Some(mut e) => {
                    e.device_label = p.label;
                    e.label = label;
                    e.reserved = reserved;
                    e
                }
                None => PortEntry {
                    id: p.id,
                    device_label: p.label,
                    label,
                    reserved,
                    state: PowerState::Unknown,
                    last_change: None,
                    last_polled: None,
                    power_w: None,
                    last_error: None,
                },
            };
            new.push(entry);
        }
        self.ports = new;
        self.listed = true;
    }

    /// Re-applies overrides after an admin change.
    pub fn refresh_overrides(&mut self, id: &str) {
        let device_label = self.port(id).and_then(|p| p.device_label.clone());
        let (label, reserved) = self.effective(id, device_label.as_ref());
        if let Some(p) = self.port_mut(id) {
            p.label = label;
            p.reserved = reserved;
        }
    }
}

/// A device exchange the actor performs.
#[derive(Debug, Clone)]
pub enum Call {
    Ports,
    Get(String),
    GetAll,
    Set(String, Switch),
    Power(String),
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::Ports => "ports",
            Call::Get(_) => "get",
            Call::GetAll => "get_all",
            Call::Set(..) => "set",
            Call::Power(_) => "power",
        }
    }
}

#[derive(Debug)]
pub enum Answer {
    Ports(Vec<PortInfo>),
    State(PowerState),
    All(Vec<(String, PowerState)>),
    Done,
    Power(Option<f64>),
}

pub struct Request {
    pub call: Call,
    /// Why the read happens (`poll`, `set`, `cycle`): goes into the history on a change.
    pub cause: &'static str,
    pub reply: oneshot::Sender<Result<Answer, DriverError>>,
}

pub struct Actor {
    pub pdu: String,
    pub driver: Box<dyn PduDriver>,
    pub cache: Arc<Mutex<Cache>>,
    pub store: Store,
    pub tuning: Arc<Tuning>,
    pub poll_interval: Duration,
    pub rx: mpsc::Receiver<Request>,
    pub stop: CancellationToken,
    /// Whether the driver reported a power reading the last time (skip asking otherwise).
    pub measures_power: Option<bool>,
}

pub fn lock(cache: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    cache.lock().unwrap_or_else(|p| p.into_inner())
}

impl Actor {
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // The tick comes before the queue so that a steady stream of requests can
                // not starve polling (it fires once per interval, so it cannot starve them).
                biased;
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => self.poll().await,
                req = self.rx.recv() => match req {
                    Some(req) => self.handle(req).await,
                    None => break,
                },
            }
        }
        self.driver.shutdown().await;
        tracing::debug!(pdu = %self.pdu, "actor stopped");
    }

    async fn handle(&mut self, req: Request) {
        let result = self.call(req.call.clone()).await;
        match (&req.call, &result) {
            (Call::Get(port), Ok(Answer::State(s))) => self.observe(port, *s, req.cause).await,
            (Call::GetAll, Ok(Answer::All(states))) => {
                lock(&self.cache).last_polled = Some(now_ms());
                for (port, s) in states {
                    self.observe(port, *s, req.cause).await;
                }
            }
            (Call::Ports, Ok(Answer::Ports(ports))) => lock(&self.cache).set_ports(ports.clone()),
            (Call::Ports, Err(e)) => lock(&self.cache).last_error = Some(e.to_string()),
            _ => {}
        }
        // The requester may have given up (client disconnected); nothing to do then.
        let _ = req.reply.send(result);
    }

    /// Lists the ports if needed, then reads every port.
    async fn poll(&mut self) {
        let listed = lock(&self.cache).listed;
        if !listed {
            match self.call(Call::Ports).await {
                Ok(Answer::Ports(ports)) => lock(&self.cache).set_ports(ports),
                Ok(_) => {}
                Err(e) => {
                    self.poll_failed(e);
                    return;
                }
            }
        }
        match self.call(Call::GetAll).await {
            Ok(Answer::All(states)) => {
                let now = now_ms();
                {
                    let mut c = lock(&self.cache);
                    c.last_polled = Some(now);
                    c.last_error = None;
                }
                metrics::gauge!("pdu_reachable", "pdu" => self.pdu.clone()).set(1.0);
                for (port, state) in states {
                    self.observe(&port, state, "poll").await;
                }
            }
            Ok(_) => {}
            Err(e) => self.poll_failed(e),
        }
        if self.measures_power != Some(false) {
            self.poll_power().await;
        }
    }

    async fn poll_power(&mut self) {
        let ids: Vec<String> = lock(&self.cache)
            .ports
            .iter()
            .map(|p| p.id.clone())
            .collect();
        for id in ids {
            match self.call(Call::Power(id.clone())).await {
                Ok(Answer::Power(w)) => {
                    if self.measures_power.is_none() {
                        self.measures_power = Some(w.is_some());
                    }
                    if let Some(p) = lock(&self.cache).port_mut(&id) {
                        p.power_w = w;
                    }
                    if let Some(w) = w {
                        metrics::gauge!("pdu_port_power_watts", "pdu" => self.pdu.clone(), "port" => id.clone())
                            .set(w);
                    } else {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    fn poll_failed(&mut self, e: DriverError) {
        tracing::warn!(pdu = %self.pdu, error = %e, "polling the PDU failed");
        metrics::gauge!("pdu_reachable", "pdu" => self.pdu.clone()).set(0.0);
        let mut c = lock(&self.cache);
        c.last_error = Some(e.to_string());
        // A PDU we cannot read has ports in an unknown state, never "off".
        for p in &mut c.ports {
            p.state = PowerState::Unknown;
        }
        for p in &c.ports {
            metrics::gauge!("pdu_port_state", "pdu" => self.pdu.clone(), "port" => p.id.clone())
                .set(-1.0);
        }
    }

    /// Records a read state: history when it changed, then cache and metric. The history row
    /// is written first so that whoever sees the new state through the API also finds the
    /// change in the port's history.
    async fn observe(&mut self, port: &str, state: PowerState, cause: &'static str) {
        let now = now_ms();
        let changed = {
            let c = lock(&self.cache);
            let Some(p) = c.port(port) else { return };
            p.state != state
        };
        if changed {
            tracing::info!(pdu = %self.pdu, port, state = %state, cause, "port state changed");
            let entry = HistoryEntry {
                at: now,
                state,
                event: cause.to_string(),
                detail: None,
            };
            if let Err(e) = self
                .store
                .record(&self.pdu, port, &entry, self.tuning.history_per_port)
                .await
            {
                tracing::error!(pdu = %self.pdu, port, error = %e, "cannot record port history");
            }
        }
        if let Some(p) = lock(&self.cache).port_mut(port) {
            p.last_polled = Some(now);
            if changed {
                p.state = state;
                p.last_change = Some(now);
            }
        }
        metrics::gauge!("pdu_port_state", "pdu" => self.pdu.clone(), "port" => port.to_string())
            .set(match state {
                PowerState::On => 1.0,
                PowerState::Off => 0.0,
                PowerState::Unknown => -1.0,
            });
    }

    /// One device exchange with its time budget, retried on transient errors.
    async fn call(&mut self, call: Call) -> Result<Answer, DriverError> {
        let op = call.name();
        let mut attempt = 0;
        loop {
            let start = Instant::now();
            let result = self.once(&call).await;
            let labels = [("pdu", self.pdu.clone()), ("op", op.to_string())];
            metrics::counter!("pdu_operations_total", &labels).increment(1);
            metrics::histogram!("pdu_operation_duration_seconds", &labels)
                .record(start.elapsed().as_secs_f64());
            match result {
                Ok(a) => return Ok(a),
                Err(e) => {
                    metrics::counter!("pdu_operation_failures_total",
                        "pdu" => self.pdu.clone(), "op" => op, "kind" => e.kind())
                    .increment(1);
                    if !e.is_transient()
                        || attempt >= self.tuning.retries
                        || self.stop.is_cancelled()
                    {
                        return Err(e);
                    }
                    let wait = self.tuning.retry_backoff * 2u32.saturating_pow(attempt);
                    tracing::debug!(pdu = %self.pdu, op, attempt, error = %e, ?wait, "retrying");
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn once(&mut self, call: &Call) -> Result<Answer, DriverError> {
        let budget = self.tuning.op_timeout;
        let d = &mut self.driver;
        let fut = async {
            Ok(match call {
                Call::Ports => Answer::Ports(d.ports().await?),
                Call::Get(p) => Answer::State(d.get(p).await?),
                Call::GetAll => Answer::All(d.get_all().await?),
                Call::Set(p, s) => {
                    d.set(p, *s).await?;
                    Answer::Done
                }
                Call::Power(p) => Answer::Power(d.power_w(p).await?),
            })
        };
        match tokio::time::timeout(budget, fut).await {
            Ok(r) => r,
            Err(_) => Err(DriverError::timeout(
                format!(
                    "{} {} on PDU {}",
                    self.driver.driver_name(),
                    call.name(),
                    self.pdu
                ),
                budget,
            )),
        }
    }
}
