//! The processes the tests kill and look at.

use std::time::{Duration, Instant};

/// Whether `pid` is a live process (not gone, not a zombie waiting to be reaped).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// `kill -9 <pid>`.
pub fn sigkill(pid: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is one this test started
    // (directly or through its executor).
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGKILL) },
        0,
        "kill -9 {pid}"
    );
}

/// Waits (bounded) until process `pid` is gone (or a zombie waiting to be reaped).
pub async fn wait_gone(pid: i32, within: Duration, what: &str) {
    let end = Instant::now() + within;
    while alive(pid) {
        assert!(
            Instant::now() < end,
            "{what} (process {pid}) still runs after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
