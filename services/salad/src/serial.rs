//! Serial adapters: find them (explicit paths and globs), open them (exclusively), notice
//! when they go away and come back (rescan), and hand each open port to [`stream::drive`].
//!
//! An adapter is remembered by a stable key: its `/dev/serial/by-path/…` link when it has one
//! (USB port position survives replugging and renumbering of `ttyUSBn`), else the path it was
//! found at. A port that reopens under a known key is bound at once to the machine that key
//! was last bound to; a later `SALAD.machine_id=` line still wins.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use crate::config::SerialPortSpec;
use crate::hub::Hub;
use crate::stream::{self, End, StreamSpec};

const BY_PATH_DIR: &str = "/dev/serial/by-path";

/// A device the configuration matches right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The path as configured or matched by a glob.
    pub path: String,
    /// Stable key the machine binding is remembered by.
    pub key: String,
    /// The device node it resolves to (two entries naming one device open it once).
    pub device: PathBuf,
    pub baud: u32,
}

fn is_pattern(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expands the configured entries into the devices present now. Blocking (file system).
pub fn expand(specs: &[SerialPortSpec], default_baud: u32, by_path_dir: &Path) -> Vec<Candidate> {
    let by_path: HashMap<PathBuf, String> = std::fs::read_dir(by_path_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let link = e.path();
            let dev = std::fs::canonicalize(&link).ok()?;
            Some((dev, link.to_str()?.to_string()))
        })
        .collect();
    let mut out: Vec<Candidate> = Vec::new();
    let mut devices = HashSet::new();
    for spec in specs {
        let paths: Vec<PathBuf> = if is_pattern(&spec.path) {
            match glob::glob(&spec.path) {
                Ok(paths) => {
                    let mut v: Vec<PathBuf> = paths.flatten().collect();
                    v.sort();
                    v
                }
                Err(_) => Vec::new(),
            }
        } else {
            vec![PathBuf::from(&spec.path)]
        };
        for p in paths {
            // A dangling link (adapter gone, link not yet removed) resolves to nothing.
            let Ok(device) = std::fs::canonicalize(&p) else {
                continue;
            };
            let Some(path) = p.to_str().map(str::to_string) else {
                continue;
            };
            if !devices.insert(device.clone()) {
                continue;
            }
            let key = if p.starts_with(by_path_dir) {
                path.clone()
            } else {
                by_path
                    .get(&device)
                    .cloned()
                    .unwrap_or_else(|| path.clone())
            };
            out.push(Candidate {
                path,
                key,
                device,
                baud: spec.baud.unwrap_or(default_baud),
            });
        }
    }
    out
}

#[derive(Default)]
struct OpenSet {
    devices: HashSet<PathBuf>,
    keys: HashSet<String>,
}

/// Rescans for adapters until `cancel` fires; each open port runs on its own task.
pub async fn run(hub: Arc<Hub>, cancel: CancellationToken) {
    let open = Arc::new(Mutex::new(OpenSet::default()));
    let mut seen: HashSet<String> = HashSet::new();
    let mut failing: HashMap<String, String> = HashMap::new();
    let mut tick = tokio::time::interval(hub.config.rescan_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let specs = hub.config.serial_ports.clone();
        let baud = hub.config.default_baud;
        let found =
            match tokio::task::spawn_blocking(move || expand(&specs, baud, Path::new(BY_PATH_DIR)))
                .await
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "serial rescan failed");
                    continue;
                }
            };
        let present: HashSet<&str> = found.iter().map(|c| c.path.as_str()).collect();
        failing.retain(|p, _| present.contains(p.as_str()));
        for cand in found {
            {
                let set = open.lock().unwrap_or_else(|p| p.into_inner());
                if set.devices.contains(&cand.device) || set.keys.contains(&cand.key) {
                    continue;
                }
            }
            let port = match tokio_serial::new(&cand.path, cand.baud)
                .exclusive(true)
                .open_native_async()
            {
                Ok(p) => p,
                Err(e) => {
                    let msg = e.to_string();
                    if failing.get(&cand.path) != Some(&msg) {
                        tracing::warn!(path = %cand.path, error = %msg, "cannot open serial port; will retry");
                        failing.insert(cand.path.clone(), msg);
                    }
                    continue;
                }
            };
            failing.remove(&cand.path);
            let initial = match hub.store.path_machine(&cand.key).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(path = %cand.key, error = %e, "cannot look up the adapter's machine");
                    None
                }
            };
            if !seen.insert(cand.key.clone()) {
                metrics::counter!("salad_port_reopens_total", "port" => cand.key.clone())
                    .increment(1);
            }
            metrics::gauge!("salad_port_open", "port" => cand.key.clone()).set(1.0);
            tracing::info!(path = %cand.path, key = %cand.key, baud = cand.baud, machine = ?initial, "serial port opened");
            {
                let mut set = open.lock().unwrap_or_else(|p| p.into_inner());
                set.devices.insert(cand.device.clone());
                set.keys.insert(cand.key.clone());
            }
            let spec = StreamSpec {
                kind: "serial",
                name: cand.path.clone(),
                key: Some(cand.key.clone()),
                initial,
                metrics_port: cand.key.clone(),
                peer: None,
                local: None,
            };
            let hub2 = hub.clone();
            let open2 = open.clone();
            let stop = cancel.clone();
            hub.tasks.spawn(async move {
                let end = stream::drive(hub2, port, spec, stop).await;
                match &end {
                    End::Shutdown => {}
                    End::Eof => tracing::warn!(path = %cand.path, "serial port closed (adapter unplugged?)"),
                    End::ReadError(e) | End::WriteError(e) => {
                        tracing::warn!(path = %cand.path, error = %e, "serial port failed (adapter unplugged?); closed")
                    }
                }
                metrics::gauge!("salad_port_open", "port" => cand.key.clone()).set(0.0);
                let mut set = open2.lock().unwrap_or_else(|p| p.into_inner());
                set.devices.remove(&cand.device);
                set.keys.remove(&cand.key);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_dedupe_and_by_path_keys() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        let by_path = dir.path().join("by-path");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::create_dir_all(&by_path).unwrap();
        for n in ["ttyUSB0", "ttyUSB1", "ttyACM0"] {
            std::fs::write(dev.join(n), b"").unwrap();
        }
        std::os::unix::fs::symlink(
            dev.join("ttyUSB1"),
            by_path.join("pci-0000:00:14.0-usb-0:2:1.0-port0"),
        )
        .unwrap();
        std::os::unix::fs::symlink(dev.join("gone"), dev.join("ttyUSB9")).unwrap();
        let specs = vec![
            SerialPortSpec {
                path: format!("{}/ttyUSB*", dev.display()),
                baud: Some(9600),
            },
            SerialPortSpec::pattern(&format!("{}/*", by_path.display())),
            SerialPortSpec::pattern(&format!("{}/ttyACM0", dev.display())),
            SerialPortSpec::pattern(&format!("{}/missing", dev.display())),
        ];
        let found = expand(&specs, 115_200, &by_path);
        let summary: Vec<(String, String, u32)> = found
            .iter()
            .map(|c| {
                (
                    c.path.rsplit('/').next().unwrap().to_string(),
                    c.key.rsplit('/').next().unwrap().to_string(),
                    c.baud,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("ttyUSB0".into(), "ttyUSB0".into(), 9600),
                (
                    "ttyUSB1".into(),
                    "pci-0000:00:14.0-usb-0:2:1.0-port0".into(),
                    9600
                ),
                ("ttyACM0".into(), "ttyACM0".into(), 115_200),
            ]
        );
    }
}
