//! `machine-registration`: the DUT-side agent of mars (design.md §3).
//!
//! - `probe`: prints the hardware tags (no network, no serial).
//! - `register`: probes, finds the serial port that reaches salad (SALAD.ping/pong on every
//!   candidate port in parallel), announces `SALAD.machine_id=<mac>` there, POSTs the record to
//!   mars and prints `MaRS: Registration complete` (or `MaRS: Registration failed: <reason>`)
//!   on the console and on that port.
//! - `check`: compares a fresh probe with mars's record, prints each mismatch, exits 1 on any.
//!
//! Blocking std code only: it runs in a minimal initramfs, as a static binary.

pub mod http;
pub mod net;
pub mod probe;
pub mod serial;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Kernel cmdline key naming mars's URL (`dutgate.mars_url=http://10.42.0.1:8001`).
pub const CMDLINE_MARS_URL: &str = "dutgate.mars_url=";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Register,
    Check,
    Probe,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub action: Action,
    pub mars_url: Option<String>,
    pub interface: Option<String>,
    /// Ports to try instead of `/dev/ttyS*`, `/dev/ttyUSB*`, `/dev/ttyACM*`, `/dev/hvc*`.
    pub ttys: Vec<PathBuf>,
    pub no_tty: bool,
    pub serial_timeout: Duration,
    pub http_timeout: Duration,
    pub base_name: Option<String>,
    pub json: bool,
    /// Root of `/sys` and `/proc` (tests).
    pub root: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            action: Action::Probe,
            mars_url: None,
            interface: None,
            ttys: Vec::new(),
            no_tty: false,
            serial_timeout: Duration::from_secs(3),
            http_timeout: Duration::from_secs(15),
            base_name: None,
            json: false,
            root: PathBuf::from("/"),
        }
    }
}

pub const USAGE: &str = "usage: machine-registration <register|check|probe> [options]

  --mars-url URL      mars base URL, e.g. http://10.42.0.1:8001 (also $MARS_URL or the
                      kernel cmdline key dutgate.mars_url=); an IP address or /etc/hosts name
  --interface NAME    boot NIC (default: the default route's interface)
  --tty PATH          serial port to try (repeatable; replaces the /dev/ttyS*, ttyUSB*,
                      ttyACM*, hvc* scan)
  --no-tty            skip the serial port discovery
  --serial-timeout S  seconds to wait for SALAD.pong (default 3)
  --base-name NAME    override the probed base name
  --json              probe: print the registration body as JSON
";

/// Parses the command line (without the program name).
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    let action = it.next().ok_or("missing action")?;
    o.action = match action.as_str() {
        "register" => Action::Register,
        "check" => Action::Check,
        "probe" => Action::Probe,
        other => return Err(format!("unknown action {other:?}")),
    };
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--mars-url" | "-m" => o.mars_url = Some(val(a)?),
            "--interface" => o.interface = Some(val(a)?),
            "--tty" => o.ttys.push(PathBuf::from(val(a)?)),
            "--no-tty" => o.no_tty = true,
            "--serial-timeout" => {
                let v: f64 = val(a)?
                    .parse()
                    .map_err(|_| "--serial-timeout: not a number")?;
                if !(0.0..=600.0).contains(&v) {
                    return Err("--serial-timeout: 0 to 600 seconds".into());
                }
                o.serial_timeout = Duration::from_secs_f64(v);
            }
            "--base-name" => o.base_name = Some(val(a)?),
            "--json" => o.json = true,
            "--root" => o.root = PathBuf::from(val(a)?),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok(o)
}

/// `--mars-url`, else `$MARS_URL`, else `dutgate.mars_url=` on the kernel cmdline.
pub fn mars_url(o: &Options) -> Option<String> {
    o.mars_url
        .clone()
        .or_else(|| std::env::var("MARS_URL").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            let cmdline = std::fs::read_to_string(o.root.join("proc/cmdline")).ok()?;
            cmdline
                .split_whitespace()
                .find_map(|w| w.strip_prefix(CMDLINE_MARS_URL))
                .map(|s| s.trim_matches('"').to_string())
        })
}

/// The body of `POST /api/v1/machine/` (valve-infra's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub base_name: String,
    pub tags: Vec<String>,
    pub mac_address: String,
    pub ip_address: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_tty_device: Option<String>,
}

/// What the agent knows about this machine before talking to anyone.
#[derive(Debug, Clone)]
pub struct Local {
    pub interface: String,
    pub mac: String,
    pub ip: IpAddr,
    pub base_name: String,
    pub tags: BTreeSet<String>,
}

pub fn local(o: &Options) -> Result<Local, String> {
    let p = probe::probe(&o.root);
    let interface = o
        .interface
        .clone()
        .or_else(|| net::default_interface(&o.root))
        .ok_or("cannot find the boot NIC: no default route and no interface up")?;
    let mac = net::mac_of(&o.root, &interface)
        .ok_or_else(|| format!("cannot read the MAC address of {interface}"))?;
    let ip = net::ip_of(&interface).ok_or_else(|| format!("{interface} has no IP address"))?;
    Ok(Local {
        interface,
        mac,
        ip,
        base_name: o.base_name.clone().unwrap_or(p.base_name),
        tags: p.tags,
    })
}

fn ports(o: &Options) -> Vec<PathBuf> {
    if o.ttys.is_empty() {
        serial::candidates(Path::new("/dev"))
    } else {
        o.ttys.clone()
    }
}

fn say(tty: Option<&mut File>, line: &str) {
    println!("{line}");
    if let Some(f) = tty {
        // Start on a fresh line: the console may be mid-line.
        let _ = serial::write_all(
            f,
            format!("\n{line}\n").as_bytes(),
            Instant::now() + Duration::from_secs(2),
        );
    }
}

/// `register`: returns the process exit code.
pub fn register(o: &Options) -> i32 {
    let mut tty: Option<(PathBuf, File)> = None;
    let result = (|| -> Result<(), String> {
        let me = local(o)?;
        let url = mars_url(o)
            .ok_or("no mars URL: pass --mars-url, set MARS_URL or boot with dutgate.mars_url=")?;
        let endpoint = http::Endpoint::parse(&url).map_err(|e| e.to_string())?;
        if !o.no_tty {
            match serial::find_salad(&ports(o), o.serial_timeout) {
                Ok((path, mut f)) => {
                    let announce = format!("SALAD.machine_id={}\n", me.mac);
                    serial::write_all(
                        &mut f,
                        announce.as_bytes(),
                        Instant::now() + Duration::from_secs(2),
                    )
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                    eprintln!("salad answered on {}", path.display());
                    tty = Some((path, f));
                }
                Err(e) => eprintln!("warning: {e}; registering without a console"),
            }
        }
        let body = Registration {
            base_name: me.base_name.clone(),
            tags: me.tags.iter().cloned().collect(),
            mac_address: me.mac.clone(),
            ip_address: me.ip,
            local_tty_device: tty.as_ref().map(|(p, _)| serial::device_name(p)),
        };
        let json = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        let r = endpoint
            .request("POST", "/api/v1/machine/", Some(&json), o.http_timeout)
            .map_err(|e| e.to_string())?;
        if !(200..300).contains(&r.status) {
            return Err(format!("mars answered {}: {}", r.status, r.error_message()));
        }
        Ok(())
    })();
    let file = tty.as_mut().map(|(_, f)| f);
    match result {
        Ok(()) => {
            say(file, "MaRS: Registration complete");
            0
        }
        Err(e) => {
            say(file, &format!("MaRS: Registration failed: {e}"));
            1
        }
    }
}

/// Differences between the local probe and mars's record, one line each.
pub fn mismatches(me: &Local, stored: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let s = |k: &str| {
        stored
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    if s("base_name") != me.base_name {
        out.push(format!(
            "Mismatch for 'base_name': local {:?}, mars {:?}",
            me.base_name,
            s("base_name")
        ));
    }
    if s("mac_address") != me.mac {
        out.push(format!(
            "Mismatch for 'mac_address': local {}, mars {}",
            me.mac,
            s("mac_address")
        ));
    }
    if s("ip_address") != me.ip.to_string() {
        out.push(format!(
            "Mismatch for 'ip_address': local {}, mars {}",
            me.ip,
            s("ip_address")
        ));
    }
    let theirs: BTreeSet<String> = stored
        .get("tags")
        .and_then(|t| t.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if theirs != me.tags {
        let new: Vec<_> = me.tags.difference(&theirs).cloned().collect();
        let gone: Vec<_> = theirs.difference(&me.tags).cloned().collect();
        out.push(format!(
            "Mismatch for 'tags': only here {new:?}, only in mars {gone:?}"
        ));
    }
    out
}

/// `check`: returns the process exit code (1 on any difference or error).
pub fn check(o: &Options) -> i32 {
    let run = || -> Result<Vec<String>, String> {
        let me = local(o)?;
        let url = mars_url(o)
            .ok_or("no mars URL: pass --mars-url, set MARS_URL or boot with dutgate.mars_url=")?;
        let endpoint = http::Endpoint::parse(&url).map_err(|e| e.to_string())?;
        let r = endpoint
            .request(
                "GET",
                &format!("/api/v1/machine/{}", me.mac),
                None,
                o.http_timeout,
            )
            .map_err(|e| e.to_string())?;
        if r.status == 404 {
            return Ok(vec![format!(
                "Mismatch: machine {} is not registered in mars",
                me.mac
            )]);
        }
        if r.status != 200 {
            return Err(format!("mars answered {}: {}", r.status, r.error_message()));
        }
        let stored: serde_json::Value =
            serde_json::from_slice(&r.body).map_err(|e| format!("mars answered garbage: {e}"))?;
        let mut diffs = mismatches(&me, &stored);
        if !o.no_tty {
            match serial::find_salad(&ports(o), o.serial_timeout) {
                Ok((path, mut f)) => {
                    let name = serial::device_name(&path);
                    let want = stored.get("local_tty_device").and_then(|v| v.as_str());
                    if want.is_some_and(|w| w != name) {
                        diffs.push(format!(
                            "Mismatch for 'local_tty_device': local {name}, mars {}",
                            want.unwrap_or_default()
                        ));
                    }
                    say(Some(&mut f), &format!("SALAD.machine_id={}", me.mac));
                }
                // The check job's warn pattern: the console does not reach salad both ways.
                Err(_) => println!("The configured console is not connected to SALAD"),
            }
        }
        Ok(diffs)
    };
    match run() {
        Ok(d) if d.is_empty() => {
            println!("MaRS: check passed");
            0
        }
        Ok(d) => {
            for l in d {
                println!("{l}");
            }
            1
        }
        Err(e) => {
            println!("MaRS: check failed: {e}");
            1
        }
    }
}

/// `probe`: prints what `register` would send (no network, no serial).
pub fn print_probe(o: &Options) -> i32 {
    let p = probe::probe(&o.root);
    let base = o.base_name.clone().unwrap_or(p.base_name);
    let iface = o
        .interface
        .clone()
        .or_else(|| net::default_interface(&o.root));
    let mac = iface.as_deref().and_then(|i| net::mac_of(&o.root, i));
    let ip = iface.as_deref().and_then(net::ip_of);
    if o.json {
        let v = serde_json::json!({
            "base_name": base,
            "tags": p.tags,
            "mac_address": mac,
            "ip_address": ip,
            "interface": iface,
        });
        println!("{v}");
        return 0;
    }
    println!("base_name: {base}");
    println!("interface: {}", iface.as_deref().unwrap_or("-"));
    println!("mac_address: {}", mac.as_deref().unwrap_or("-"));
    println!(
        "ip_address: {}",
        ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into())
    );
    println!("tags:");
    for t in &p.tags {
        println!("  {t}");
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let a = |s: &str| parse_args(&s.split_whitespace().map(String::from).collect::<Vec<_>>());
        let o = a("register --mars-url http://1.2.3.4:8001 --tty /tmp/a --tty /tmp/b --serial-timeout 1.5").unwrap();
        assert_eq!(o.action, Action::Register);
        assert_eq!(o.ttys.len(), 2);
        assert_eq!(o.serial_timeout, Duration::from_millis(1500));
        assert!(a("explode").is_err());
        assert!(a("probe --tty").is_err());
        assert!(a("probe --serial-timeout -1").is_err());
        assert!(a("").is_err());
    }

    #[test]
    fn mars_url_from_the_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc")).unwrap();
        std::fs::write(
            dir.path().join("proc/cmdline"),
            "console=ttyS0 dutgate.mars_url=http://10.0.2.2:8001 quiet\n",
        )
        .unwrap();
        let o = Options {
            root: dir.path().to_path_buf(),
            ..Default::default()
        };
        if std::env::var("MARS_URL").is_err() {
            assert_eq!(mars_url(&o).as_deref(), Some("http://10.0.2.2:8001"));
        }
    }

    #[test]
    fn mismatch_lines() {
        let me = Local {
            interface: "eth0".into(),
            mac: "52:54:00:00:00:01".into(),
            ip: "10.0.2.15".parse().unwrap(),
            base_name: "virtio".into(),
            tags: ["a:b:c", "mem:size:4"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        let same = serde_json::json!({"base_name": "virtio", "mac_address": "52:54:00:00:00:01",
            "ip_address": "10.0.2.15", "tags": ["mem:size:4", "a:b:c"]});
        assert!(mismatches(&me, &same).is_empty());
        let other = serde_json::json!({"base_name": "virtio", "mac_address": "52:54:00:00:00:01",
            "ip_address": "10.0.2.16", "tags": ["mem:size:8", "a:b:c"]});
        let d = mismatches(&me, &other);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("Mismatch for 'ip_address'"));
        assert!(d[1].contains("mem:size:4") && d[1].contains("mem:size:8"));
    }
}
