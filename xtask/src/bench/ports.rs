//! Starting benchmark peers without a port race. A peer that can bind port 0 does, and the
//! port it got is read from /proc ([`bound_port`]): nothing else can take it in between.
//! A peer that must be told its port in advance (`dutgate up`, whose services find each
//! other by their configured ports) starts on candidate ports and again on others when
//! one turns out taken ([`start_on_candidates`], or [`gateway_listens`] for a gateway
//! started elsewhere).

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::bail;

/// TCP ports process `pid` listens on, read from /proc: this also proves a port is held by
/// that very process rather than by another one answering the same protocol.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_str()?;
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            // `sl local_address rem_address st … inode`: local "0100007F:1F90", st 0A = LISTEN.
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                ports.extend(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Pids of the processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// The port `child`, told to bind port 0, listens on and for which `accept` holds (e.g. it
/// answers `/healthz`; a peer with several listeners has one that does). Fails when the
/// peer exits first or nothing qualifies within `within`.
pub fn bound_port(
    child: &mut Child,
    what: &str,
    within: Duration,
    mut accept: impl FnMut(u16) -> bool,
) -> anyhow::Result<u16> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(port) = listening_ports(child.id()).into_iter().find(|p| accept(*p)) {
            return Ok(port);
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited early: {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} listened on no usable port within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` distinct port numbers nobody held a moment ago: only candidates, since another
/// process may take one before the peer binds it.
pub fn candidates(n: usize) -> anyhow::Result<Vec<u16>> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    Ok(ports)
}

/// Starts a peer that must be told its `n` ports: `spawn(ports)` starts it (its output in
/// `log`) and `child` reaches its process. When the log says a port is taken, the peer is
/// dropped (which must stop it) and started again on other candidates. Done once the
/// process or one of its children listens on every port: a peer of someone else answering
/// on the same number is never taken for this one.
pub fn start_on_candidates<P>(
    what: &str,
    n: usize,
    log: &Path,
    within: Duration,
    mut spawn: impl FnMut(&[u16]) -> anyhow::Result<P>,
    child: impl Fn(&mut P) -> &mut Child,
) -> anyhow::Result<(P, Vec<u16>)> {
    let deadline = Instant::now() + within;
    for _attempt in 0..10 {
        let ports = candidates(n)?;
        let mut peer = spawn(&ports)?;
        loop {
            let c = child(&mut peer);
            let pid = c.id();
            let held: Vec<u16> = std::iter::once(pid)
                .chain(children_of(pid))
                .flat_map(listening_ports)
                .collect();
            if ports.iter().all(|p| held.contains(p)) {
                return Ok((peer, ports));
            }
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let taken =
                text.contains("Address already in use") || text.contains("is not available");
            if taken {
                break;
            }
            if let Some(status) = c.try_wait()? {
                bail!("{what} exited early: {status}; see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} did not listen on {ports:?} within {within:?}; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    bail!(
        "{what} found a taken port on every attempt; see {}",
        log.display()
    )
}

/// Pids of the processes whose arguments include every one of `args`.
fn processes_with_args(args: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.iter().all(|a| argv.contains(&a.as_bytes())) {
            out.push(pid);
        }
    }
    out
}

/// Waits until the `dutgate --state-dir <state> up` started by someone else listens,
/// through its children, on every one of `ports`: `Ok(true)`. `Ok(false)` when its `log`
/// says a port is taken (the caller stops it and starts again on other ports).
pub fn gateway_listens(
    state: &Path,
    ports: &[u16],
    log: &Path,
    within: Duration,
) -> anyhow::Result<bool> {
    let state = state.to_string_lossy();
    let deadline = Instant::now() + within;
    loop {
        let held: Vec<u16> = processes_with_args(&[&state, "up"])
            .into_iter()
            .flat_map(children_of)
            .flat_map(listening_ports)
            .collect();
        if ports.iter().all(|p| held.contains(p)) {
            return Ok(true);
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("Address already in use") || text.contains("is not available") {
            return Ok(false);
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway did not listen on {ports:?} within {within:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Stops the child when the test ends, passed or not.
    struct Killed(Child);

    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_listener_of_this_process_is_found_and_a_closed_one_is_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listening_ports(std::process::id()).contains(&port));
        drop(l);
        assert!(!listening_ports(std::process::id()).contains(&port));
    }

    /// The first start is handed a port this test holds: the peer reports it taken, and the
    /// helper starts it again on another port, which it then proves the peer listens on.
    #[test]
    fn a_taken_port_is_retried_on_another() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("xtask-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("peer.log");
        let mut attempts = Vec::new();
        let spawn = |ports: &[u16]| -> anyhow::Result<Killed> {
            let port = if attempts.is_empty() { taken } else { ports[0] };
            attempts.push(port);
            let child = Command::new("python3")
                .args(["-m", "http.server", "--bind", "127.0.0.1"])
                .arg(port.to_string())
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()?;
            Ok(Killed(child))
        };
        let started = start_on_candidates(
            "python3 -m http.server",
            1,
            &log,
            Duration::from_secs(30),
            spawn,
            |k: &mut Killed| &mut k.0,
        );
        let (mut peer, _) = started.unwrap();
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        assert_eq!(attempts[0], taken);
        assert!(listening_ports(peer.0.id()).contains(&attempts[1]));
        assert!(peer.0.try_wait().unwrap().is_none());
        drop(peer);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
