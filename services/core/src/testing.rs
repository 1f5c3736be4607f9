//! Support for tests that use real peers (socat, snmpd, mosquitto, QEMU, …).
//!
//! A peer that must be told its port in advance (`dutgate up`, whose services find each
//! other by their configured ports) counts as started once [`listens_on_every_port`] says so:
//! the ports are read from /proc for that process and its children, never merely probed.
//!
//! A test whose peer is missing fails with a message naming the Debian package; it never
//! skips. `cargo xtask test` installs every package listed in `xtask/test-packages.txt`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Returns the path of `program`, or panics naming the Debian `package` that provides it.
pub fn require_program(program: &str, package: &str) -> PathBuf {
    find_program(program).unwrap_or_else(|| {
        panic!(
            "this test needs `{program}` (Debian package `{package}`), which is not installed; \
             `cargo xtask test` installs it, or run `apt-get install {package}`"
        )
    })
}

/// Looks `program` up in `PATH` (and the sbin directories, where daemons live on Debian).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Pids of the processes whose parent is `parent` (read from /proc).
pub fn children_of(parent: u32) -> Vec<u32> {
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

/// TCP ports process `pid` listens on, sorted, read from /proc: proof that a port belongs
/// to that very process, not to another one answering on the same number (another test's
/// gateway, a leftover peer).
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

/// Whether process `pid` or one of its children listens on every one of `ports`: the test
/// that a peer started on told ports is up (a `dutgate up` listens through its children,
/// one per service).
pub fn listens_on_every_port(pid: u32, ports: &[u16]) -> bool {
    let held: HashSet<u16> = std::iter::once(pid)
        .chain(children_of(pid))
        .flat_map(listening_ports)
        .collect();
    ports.iter().all(|p| held.contains(p))
}

/// Runs `cmd` to its end; panics with its output unless it succeeds (a build step, a setup
/// command of a test), naming it `what`.
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The workspace's target directory (`CARGO_TARGET_DIR`, or `target/` beside the workspace
/// manifest), where tests keep what they download once (Python venvs, PyPI files).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target")
                .canonicalize()
                .unwrap_or_else(|_| PathBuf::from("target"))
        })
}

/// Holds an exclusive lock on `target/<name>.lock` while alive: test processes that build
/// the same thing under target/ at the same time (cargo runs test binaries in parallel)
/// take turns.
fn lock_target(name: &str) -> std::fs::File {
    let dir = target_dir();
    std::fs::create_dir_all(&dir).expect("the target dir");
    let lock = std::fs::File::create(dir.join(format!("{name}.lock"))).expect("a lock file");
    lock.lock().expect("locking under target/");
    lock
}

/// A Python venv `target/<name>` with `requirement` (e.g.
/// `valve-gfx-ci-executor-client==0.2.1`) installed from PyPI, built on first use and kept:
/// returns its `bin` directory. A venv is not relocatable, so it is built in place, and
/// counts as done once its marker is written. Panics naming the Debian package when
/// python3's venv module is missing.
pub fn pypi_venv(name: &str, requirement: &str) -> PathBuf {
    let _lock = lock_target(name);
    let venv = target_dir().join(name);
    let marker = venv.join(format!(".installed-{requirement}"));
    let bin = venv.join("bin");
    if marker.exists() && bin.join("python3").exists() {
        return bin;
    }
    let _ = std::fs::remove_dir_all(&venv);
    match Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "python3 -m venv failed: install the Debian package python3-venv\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("python3 is missing ({e}): install the Debian package python3-venv"),
    }
    run_ok(
        Command::new(bin.join("pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            requirement,
        ]),
        &format!("pip install {requirement} (from PyPI)"),
    );
    std::fs::write(&marker, "").expect("the venv marker");
    bin
}

/// Which distribution of a PyPI release [`pypi_files`] unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PypiDist {
    /// The source archive (`.tar.gz`): the project's tree as released.
    Sdist,
    /// The wheel (`.whl`): what `pip install` installs.
    Wheel,
}

/// The files of `requirement`'s release on PyPI (`pip download --no-deps`, nothing
/// installed or built), unpacked under `target/pypi/` on first use and kept: returns the
/// directory they are in. Panics naming the Debian package when python3 or tar is missing.
pub fn pypi_files(requirement: &str, dist: PypiDist) -> PathBuf {
    let name = format!("pypi-{requirement}-{dist:?}").to_lowercase();
    let _lock = lock_target(&name);
    let dir = target_dir().join("pypi").join(&name);
    let unpacked = dir.join("files");
    let marker = dir.join(".unpacked");
    if marker.exists() {
        return unpacked;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&unpacked).expect("the download dir");
    require_program("python3", "python3-venv");
    let only = match dist {
        PypiDist::Sdist => ["--no-binary", ":all:"],
        PypiDist::Wheel => ["--only-binary", ":all:"],
    };
    // A venv's pip: the system's may refuse to run outside one (PEP 668).
    let pip = pypi_venv("pypi-download-venv", "pip").join("pip");
    run_ok(
        Command::new(pip)
            .args([
                "download",
                "--quiet",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(only)
            .arg("-d")
            .arg(&dir)
            .arg(requirement),
        &format!("pip download {requirement} (from PyPI)"),
    );
    let file = std::fs::read_dir(&dir)
        .expect("the download dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("pip downloaded nothing for {requirement}"));
    match dist {
        PypiDist::Sdist => {
            require_program("tar", "tar");
            run_ok(
                Command::new("tar")
                    .arg("-xzf")
                    .arg(&file)
                    .arg("-C")
                    .arg(&unpacked),
                "unpacking the sdist",
            )
        }
        PypiDist::Wheel => run_ok(
            Command::new("python3")
                .args(["-m", "zipfile", "-e"])
                .arg(&file)
                .arg(&unpacked),
            "unpacking the wheel",
        ),
    };
    std::fs::write(&marker, "").expect("the download marker");
    unpacked
}

/// Stops a peer the way its service manager would: SIGTERM (so that it stops what it
/// started, e.g. `dutgate up` its VMs), then SIGKILL if it is still running after `grace`.
/// Waits for it either way, so no zombie is left.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_listener_of_this_process_is_found_and_a_closed_one_is_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = std::process::id();
        assert!(listening_ports(me).contains(&port));
        assert!(listens_on_every_port(me, &[port]));
        drop(l);
        assert!(!listening_ports(me).contains(&port));
        assert!(!listens_on_every_port(me, &[port]));
    }

    #[test]
    fn a_failed_command_panics_with_its_output() {
        let out = run_ok(Command::new("sh").args(["-c", "echo fine"]), "echo");
        assert_eq!(out.stdout, b"fine\n");
        let failed = std::panic::catch_unwind(|| {
            run_ok(
                Command::new("sh").args(["-c", "echo broken >&2; exit 3"]),
                "a failing step",
            )
        });
        let message = failed
            .err()
            .and_then(|p| p.downcast::<String>().ok())
            .map(|m| *m)
            .unwrap_or_default();
        assert!(
            message.contains("a failing step failed") && message.contains("broken"),
            "{message}"
        );
    }

    #[test]
    fn a_stopped_child_is_reaped() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let started = Instant::now();
        stop_child(&mut child, Duration::from_secs(10));
        assert!(child.try_wait().unwrap().is_some());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGTERM was not enough"
        );
        // A second stop of a reaped child does nothing.
        stop_child(&mut child, Duration::from_secs(10));
    }

    #[test]
    fn a_child_is_found_under_its_parent() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let found = children_of(std::process::id()).contains(&child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found);
    }
}
