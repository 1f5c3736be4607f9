//! `dummy`: a PDU that lives in memory.
//!
//! Config: `{ports: N | [label, …], device: <name>?, initial: ON|OFF, latency_ms, faults}`.
//! A `device` name makes the device shared within the process (tests inspect it through
//! [`device`], and its state survives the driver being rebuilt, like real hardware).
//!
//! Faults (also settable at run time with [`DummyDevice::set_faults`]):
//! - `hang_ports`: get/set on these ports never answer (the caller's timeout must fire);
//! - `wrong_readback`: `set` is accepted but the port keeps its state;
//! - `flip_on_after_ms: {port: ms}`: a port switched off turns itself back on after `ms`;
//! - `fail_first: N`: the next N operations fail with a transient error (retries);
//! - `unreachable`: every operation fails as if the device were unplugged.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dutgate_pdu_driver::{
    ConfigError, DriverError, DriverFactory, PduDriver, PortInfo, PortList, PowerState, Switch,
    parse_config, port_list,
};
use serde::{Deserialize, Serialize};

pub const NAME: &str = "dummy";

pub fn factories() -> Vec<DriverFactory> {
    vec![DriverFactory {
        name: NAME,
        summary: "in-memory ports with injectable faults (tests, demos, benchmarks)",
        build,
    }]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub ports: PortList,
    /// Share the device within the process under this name.
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default = "default_initial")]
    pub initial: Switch,
    /// How long every operation takes.
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub faults: Faults,
}

fn default_initial() -> Switch {
    Switch::Off
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    pub hang_ports: Vec<String>,
    pub wrong_readback: Vec<String>,
    pub flip_on_after_ms: BTreeMap<String, u64>,
    pub fail_first: u32,
    pub unreachable: bool,
}

pub fn build(config: yaml_serde::Value) -> Result<Box<dyn PduDriver>, ConfigError> {
    let cfg: Config = parse_config(config)?;
    let ports = port_list(&cfg.ports, 1);
    if ports.is_empty() {
        return Err(ConfigError::field("ports", "a PDU needs at least one port"));
    }
    let device = match &cfg.device {
        Some(name) => {
            let mut all = registry();
            all.entry(name.clone())
                .or_insert_with(|| DummyDevice::new(&ports, cfg.initial, cfg.faults.clone()))
                .clone()
        }
        None => DummyDevice::new(&ports, cfg.initial, cfg.faults.clone()),
    };
    Ok(Box::new(DummyDriver {
        device,
        ports,
        latency: Duration::from_millis(cfg.latency_ms),
    }))
}

fn registry() -> MutexGuard<'static, HashMap<String, Arc<DummyDevice>>> {
    static DEVICES: OnceLock<Mutex<HashMap<String, Arc<DummyDevice>>>> = OnceLock::new();
    DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The shared device named `name`, if a driver created it.
pub fn device(name: &str) -> Option<Arc<DummyDevice>> {
    registry().get(name).cloned()
}

/// Forgets a shared device (the next driver with that name starts afresh).
pub fn forget(name: &str) {
    registry().remove(name);
}

/// The in-memory device. Every operation is counted, and overlapping operations are
/// detected (a real cheap PDU would garble them).
#[derive(Debug)]
pub struct DummyDevice {
    inner: Mutex<Inner>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

#[derive(Debug)]
struct Inner {
    states: BTreeMap<String, PowerState>,
    /// When a port set to Off will switch itself back on (fault `flip_on_after_ms`).
    flip_at: HashMap<String, Instant>,
    faults: Faults,
    fail_budget: u32,
    stats: Stats,
}

/// Counters a test can assert on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub gets: u64,
    pub sets: u64,
    /// Every accepted `set`, in order: (port, state).
    pub set_log: Vec<(String, Switch)>,
}

impl DummyDevice {
    fn new(ports: &[PortInfo], initial: Switch, faults: Faults) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                states: ports
                    .iter()
                    .map(|p| (p.id.clone(), initial.as_state()))
                    .collect(),
                flip_at: HashMap::new(),
                fail_budget: faults.fail_first,
                faults,
                stats: Stats::default(),
            }),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_faults(&self, faults: Faults) {
        let mut inner = self.lock();
        inner.fail_budget = faults.fail_first;
        inner.faults = faults;
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    /// The most operations that were ever running at the same time (1 if access was
    /// serialised).
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// The state as the device itself knows it (not through the driver).
    pub fn state(&self, port: &str) -> Option<PowerState> {
        let mut inner = self.lock();
        inner.settle(port);
        inner.states.get(port).copied()
    }

    /// Changes a port behind the driver's back (someone pressed the outlet button).
    pub fn force(&self, port: &str, state: PowerState) {
        let mut inner = self.lock();
        inner.flip_at.remove(port);
        inner.states.insert(port.to_string(), state);
    }
}

impl Inner {
    /// Applies a pending self-power-on.
    fn settle(&mut self, port: &str) {
        if let Some(at) = self.flip_at.get(port)
            && Instant::now() >= *at
        {
            self.flip_at.remove(port);
            self.states.insert(port.to_string(), PowerState::On);
        }
    }

    /// Common fault checks before an operation on `port`.
    fn check(&mut self, port: Option<&str>) -> Result<bool, DriverError> {
        if self.faults.unreachable {
            return Err(DriverError::unreachable(
                "dummy",
                "device unplugged (fault)",
            ));
        }
        if self.fail_budget > 0 {
            self.fail_budget -= 1;
            return Err(DriverError::unreachable(
                "dummy",
                "transient failure (fault fail_first)",
            ));
        }
        if let Some(p) = port {
            if !self.states.contains_key(p) {
                return Err(DriverError::no_such_port(p));
            }
            return Ok(self.faults.hang_ports.iter().any(|h| h == p));
        }
        Ok(false)
    }
}

struct DummyDriver {
    device: Arc<DummyDevice>,
    ports: Vec<PortInfo>,
    latency: Duration,
}

/// Marks an operation as running for the overlap detector.
struct InFlight<'a>(&'a DummyDevice);

impl<'a> InFlight<'a> {
    fn enter(d: &'a DummyDevice) -> Self {
        let now = d.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        d.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(d)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DummyDriver {
    async fn pause(&self, hang: bool) {
        if hang {
            // Long enough for any caller's timeout to fire first.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

#[async_trait]
impl PduDriver for DummyDriver {
    fn driver_name(&self) -> &'static str {
        NAME
    }

    async fn ports(&mut self) -> Result<Vec<PortInfo>, DriverError> {
        let _f = InFlight::enter(&self.device);
        self.device.lock().check(None)?;
        self.pause(false).await;
        Ok(self.ports.clone())
    }

    async fn get(&mut self, port: &str) -> Result<PowerState, DriverError> {
        let _f = InFlight::enter(&self.device);
        let hang = self.device.lock().check(Some(port))?;
        self.pause(hang).await;
        let mut inner = self.device.lock();
        inner.stats.gets += 1;
        inner.settle(port);
        Ok(inner
            .states
            .get(port)
            .copied()
            .unwrap_or(PowerState::Unknown))
    }

    async fn get_all(&mut self) -> Result<Vec<(String, PowerState)>, DriverError> {
        let _f = InFlight::enter(&self.device);
        self.device.lock().check(None)?;
        self.pause(false).await;
        let mut inner = self.device.lock();
        inner.stats.gets += 1;
        let ids: Vec<String> = inner.states.keys().cloned().collect();
        Ok(ids
            .into_iter()
            .map(|id| {
                inner.settle(&id);
                let hang = inner.faults.hang_ports.contains(&id);
                let s = if hang {
                    PowerState::Unknown
                } else {
                    inner
                        .states
                        .get(&id)
                        .copied()
                        .unwrap_or(PowerState::Unknown)
                };
                (id, s)
            })
            .collect())
    }

    async fn set(&mut self, port: &str, state: Switch) -> Result<(), DriverError> {
        let _f = InFlight::enter(&self.device);
        let hang = self.device.lock().check(Some(port))?;
        self.pause(hang).await;
        let mut inner = self.device.lock();
        inner.stats.sets += 1;
        inner.stats.set_log.push((port.to_string(), state));
        if inner.faults.wrong_readback.iter().any(|p| p == port) {
            return Ok(());
        }
        inner.flip_at.remove(port);
        inner.states.insert(port.to_string(), state.as_state());
        if state == Switch::Off
            && let Some(ms) = inner.faults.flip_on_after_ms.get(port).copied()
        {
            inner
                .flip_at
                .insert(port.to_string(), Instant::now() + Duration::from_millis(ms));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> yaml_serde::Value {
        yaml_serde::from_str(text).unwrap()
    }

    #[tokio::test]
    async fn switches_and_reads_back() {
        let mut d = build(cfg("ports: [a, b, c]")).unwrap();
        let ports = d.ports().await.unwrap();
        assert_eq!(ports[2], PortInfo::new("3", Some("c".into())));
        assert_eq!(d.get("1").await.unwrap(), PowerState::Off);
        d.set("1", Switch::On).await.unwrap();
        assert_eq!(d.get("1").await.unwrap(), PowerState::On);
        assert_eq!(
            d.get("4").await.unwrap_err(),
            DriverError::no_such_port("4")
        );
        let all = d.get_all().await.unwrap();
        assert_eq!(all[0], ("1".to_string(), PowerState::On));
    }

    #[tokio::test]
    async fn faults() {
        let mut d = build(cfg(
            "{ports: 3, device: faults-test, faults: {wrong_readback: ['2'], flip_on_after_ms: {'3': 50}, fail_first: 1}}",
        ))
        .unwrap();
        assert!(d.get("1").await.unwrap_err().is_transient());
        d.set("2", Switch::On).await.unwrap();
        assert_eq!(d.get("2").await.unwrap(), PowerState::Off);
        d.set("3", Switch::On).await.unwrap();
        d.set("3", Switch::Off).await.unwrap();
        assert_eq!(d.get("3").await.unwrap(), PowerState::Off);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(d.get("3").await.unwrap(), PowerState::On);
        let dev = device("faults-test").unwrap();
        assert_eq!(dev.stats().sets, 3);
        assert_eq!(dev.max_in_flight(), 1);
        dev.set_faults(Faults {
            hang_ports: vec!["1".into()],
            ..Default::default()
        });
        let r = tokio::time::timeout(Duration::from_millis(50), d.get("1")).await;
        assert!(r.is_err(), "a hanging port must not answer");
        forget("faults-test");
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = build(cfg("{ports: 0}")).err().unwrap();
        assert_eq!(e.field.as_deref(), Some("ports"));
        let e = build(cfg("{ports: 2, initial: MAYBE}")).err().unwrap();
        assert_eq!(e.field.as_deref(), Some("initial"));
        let e = build(cfg("{ports: 2, faults: {hang: [1]}}")).err().unwrap();
        assert_eq!(e.field.as_deref(), Some("faults.hang"));
    }
}
