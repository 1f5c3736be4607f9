//! Support for tests that use real peers (socat, snmpd, mosquitto, QEMU, …).
//!
//! A test whose peer is missing fails with a message naming the Debian package; it never
//! skips. `cargo xtask test` installs every package listed in `xtask/test-packages.txt`.

use std::path::PathBuf;

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
