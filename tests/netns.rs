//! A network namespace of the test: the place where a farm can have a DUT network of its
//! own (a bridge, DHCP, taps) without touching the host's. Needs root.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::farm::run_ok;

/// A network namespace, deleted (with every process still in it) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A fresh namespace `<prefix><pid>` with its loopback up.
    pub fn create(prefix: &str) -> Self {
        let name = format!("{prefix}{}", std::process::id());
        // One left by a killed run of the same pid would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(
            Command::new("ip").args(["netns", "add", &name]),
            "ip netns add (this test needs root)",
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip <args…>` inside the namespace; panics unless it succeeds.
    pub fn ip(&self, args: &[&str]) {
        run_ok(
            Command::new("ip").args(["-n", &self.name]).args(args),
            &format!("ip {}", args.join(" ")),
        );
    }

    /// `program` run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn inside<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        inside(&self.name, f)
    }

    /// Runs `f` inside the namespace: the sockets it creates and the processes it starts
    /// live there.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        self.inside(|| Ok(f()))
    }

    /// A listening socket inside the namespace (port 0: the kernel picks a free one).
    pub fn bind(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.inside(|| TcpListener::bind(addr))
    }

    /// A connection made from inside the namespace: its source address is the namespace's
    /// address on the route to `addr` (127.0.0.1 for loopback, the bridge's for the DUT
    /// network).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        connect_in(&self.name, addr, timeout)
    }

    fn pids(&self) -> Vec<String> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Runs `f` on a thread that has entered the namespace `name`: the sockets `f` creates live
/// there for good, whichever thread uses them later.
fn inside<T: Send>(name: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(format!("/run/netns/{name}"))?;
            // SAFETY: setns only changes the network namespace of this thread, which
            // ends when `f` returns; the fd is open for the duration of the call.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

/// [`Netns::connect`] in the namespace `name` (one this test does not own).
pub fn connect_in(name: &str, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    inside(name, || TcpStream::connect_timeout(&addr, timeout))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            let _ = Command::new("kill").arg("-KILL").args(&pids).status();
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
