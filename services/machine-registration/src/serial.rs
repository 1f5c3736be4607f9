//! Finding the serial port that reaches salad: every candidate tty is opened in its own
//! thread (raw mode, 115200 8N1 through libc termios), gets `\nSALAD.ping\n`, and the first
//! one that answers a line containing `SALAD.pong` within the timeout wins.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PING_INTERVAL: Duration = Duration::from_secs(1);

/// Name prefixes under `/dev` of the ports that may be wired to the gateway.
pub const CANDIDATE_PREFIXES: &[&str] = &["ttyS", "ttyUSB", "ttyACM", "hvc"];

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no serial port answered SALAD.ping within {0:?} (tried: {1})")]
    NoAnswer(Duration, String),
}

/// `/dev/ttyS*`, `/dev/ttyUSB*`, `/dev/ttyACM*`, `/dev/hvc*`, sorted.
pub fn candidates(dev: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dev)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    CANDIDATE_PREFIXES.iter().any(|p| {
                        n.strip_prefix(p).is_some_and(|rest| {
                            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                        })
                    })
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A tty the agent put in raw mode to talk with salad. Its previous settings come back when
/// it is dropped: the port is usually the DUT's console, and what runs after the agent (the
/// job's own programs, the shutdown messages) must be written as before, `\n` as `\r\n`
/// (valve-infra's patterns end in `\r$`).
pub struct RawTty {
    file: File,
    saved: libc::termios,
}

impl std::fmt::Debug for RawTty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTty").field("file", &self.file).finish()
    }
}

impl std::ops::Deref for RawTty {
    type Target = File;
    fn deref(&self) -> &File {
        &self.file
    }
}

impl std::ops::DerefMut for RawTty {
    fn deref_mut(&mut self) -> &mut File {
        &mut self.file
    }
}

impl Drop for RawTty {
    fn drop(&mut self) {
        // SAFETY: the descriptor is still open (owned by `self.file`); `saved` was filled by
        // tcgetattr on it. TCSANOW: never wait for output to drain on a stuck port.
        unsafe {
            libc::tcsetattr(self.file.as_raw_fd(), libc::TCSANOW, &self.saved);
        }
    }
}

/// Opens `path` and puts it in raw mode at 115200 baud. Non-blocking: reads go through
/// `poll` with a deadline, so a dead port can never hang the agent.
pub fn open_raw(path: &Path) -> Result<RawTty, SerialError> {
    let err = |source| SerialError::Io {
        path: path.display().to_string(),
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(err)?;
    let fd = f.as_raw_fd();
    // SAFETY: `fd` is a valid open descriptor owned by `f`; `tio` is a plain C struct fully
    // written by tcgetattr before use.
    unsafe {
        let mut tio: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut tio) != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let saved = tio;
        libc::cfmakeraw(&mut tio);
        tio.c_cflag |= libc::CLOCAL | libc::CREAD;
        // 115200 baud. Set in the flags rather than with cfset[io]speed: the libc crate links
        // those by versioned symbol, which a static (crt-static) glibc link cannot resolve.
        tio.c_cflag = (tio.c_cflag & !libc::CBAUD) | libc::B115200;
        tio.c_ispeed = libc::B115200;
        tio.c_ospeed = libc::B115200;
        tio.c_cc[libc::VMIN] = 0;
        tio.c_cc[libc::VTIME] = 0;
        if libc::tcsetattr(fd, libc::TCSANOW, &tio) != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // Drop whatever was queued before we asked.
        libc::tcflush(fd, libc::TCIFLUSH);
        Ok(RawTty { file: f, saved })
    }
}

/// Waits until `f` is readable or `deadline` passes.
fn wait_readable(f: &File, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = left.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    r > 0 && pfd.revents & libc::POLLIN != 0
}

/// Writes all of `data` to a non-blocking tty, waiting for room until `deadline`.
pub fn write_all(f: &mut File, mut data: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !data.is_empty() {
        match f.write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Pings one port (again every second); `Some(file)` when salad answered before `deadline`.
pub fn ping(path: &Path, deadline: Instant) -> Option<RawTty> {
    let mut f = open_raw(path).ok()?;
    write_all(&mut f, b"\nSALAD.ping\n", deadline).ok()?;
    let mut line: Vec<u8> = Vec::new();
    let mut buf = [0u8; 256];
    // Ping again every second: the first one may be lost (the gateway end reopened, a USB
    // adapter still settling), and salad answers every ping.
    let mut next_ping = Instant::now() + PING_INTERVAL;
    while Instant::now() < deadline {
        if Instant::now() >= next_ping {
            write_all(&mut f, b"\nSALAD.ping\n", deadline).ok()?;
            next_ping = Instant::now() + PING_INTERVAL;
        }
        if !wait_readable(&f, next_ping.min(deadline)) {
            continue;
        }
        match f.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                for &b in &buf[..n] {
                    if b == b'\n' {
                        // Tolerate garbage before the answer (line noise, a half-printed
                        // kernel message) and a trailing \r.
                        if line.windows(10).any(|w| w == b"SALAD.pong") {
                            return Some(f);
                        }
                        line.clear();
                    } else if line.len() < 4096 {
                        line.push(b);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    None
}

/// Pings all `ports` in parallel; the first to answer wins. The losers' threads end at the
/// deadline by themselves.
pub fn find_salad(ports: &[PathBuf], timeout: Duration) -> Result<(PathBuf, RawTty), SerialError> {
    let deadline = Instant::now() + timeout;
    let (tx, rx) = mpsc::channel();
    for p in ports {
        let tx = tx.clone();
        let p = p.clone();
        std::thread::spawn(move || {
            if let Some(f) = ping(&p, deadline) {
                let _ = tx.send((p, f));
            }
        });
    }
    drop(tx);
    // Returns early when every thread gave up (all senders dropped).
    rx.recv_timeout(timeout + Duration::from_millis(200))
        .map_err(|_| {
            let tried: Vec<String> = ports.iter().map(|p| p.display().to_string()).collect();
            SerialError::NoAnswer(
                timeout,
                if tried.is_empty() {
                    "no candidate ports".to_string()
                } else {
                    tried.join(", ")
                },
            )
        })
}

/// The name mars stores for a port: the real device under `/dev`, without `/dev/` (a
/// symlink such as `/dev/serial/by-id/…` is resolved).
pub fn device_name(path: &Path) -> String {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let s = real.display().to_string();
    s.strip_prefix("/dev/").map(str::to_string).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output flags of the tty at `path`.
    fn oflag(path: &Path) -> libc::tcflag_t {
        let f = File::open(path).unwrap();
        // SAFETY: a valid descriptor and a C struct filled by tcgetattr.
        unsafe {
            let mut tio: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(f.as_raw_fd(), &mut tio), 0);
            tio.c_oflag
        }
    }

    #[test]
    fn a_raw_tty_gets_its_settings_back_when_dropped() {
        // A pty stands in for the DUT's console port.
        // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a descriptor this test owns.
        let (master, slave) = unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(m >= 0);
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
            let name = std::ffi::CStr::from_ptr(name.as_ptr())
                .to_string_lossy()
                .into_owned();
            (m, PathBuf::from(name))
        };
        let cooked = oflag(&slave);
        assert_ne!(cooked & libc::OPOST, 0, "a new pty translates its output");
        let raw = open_raw(&slave).unwrap();
        assert_eq!(
            oflag(&slave) & libc::OPOST,
            0,
            "raw while the agent talks to salad"
        );
        drop(raw);
        assert_eq!(oflag(&slave), cooked, "the console's own settings are back");
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(master) };
    }

    #[test]
    fn candidate_names() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "ttyS0", "ttyS12", "ttyUSB0", "ttyACM1", "hvc0", "tty0", "ttyS", "ttySx", "null",
        ] {
            std::fs::write(dir.path().join(n), "").unwrap();
        }
        let names: Vec<String> = candidates(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["hvc0", "ttyACM1", "ttyS0", "ttyS12", "ttyUSB0"]);
    }

    #[test]
    fn nothing_to_ping_fails_fast_with_a_reason() {
        let e = find_salad(&[], Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("no candidate ports"), "{e}");
    }
}
