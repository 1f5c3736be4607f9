//! A tiny initramfs for QEMU DUTs: busybox (Debian `busybox-static`) plus an `/init` script,
//! written as an uncompressed `newc` cpio archive (the kernel takes it as is). Device nodes
//! are archive entries, so building one needs no root.
//!
//! ```no_run
//! use dutgate_boot::testing::initramfs::{Initramfs, report_init};
//! let mut fs = Initramfs::with_busybox(std::path::Path::new("/bin/busybox")).unwrap();
//! fs.init(&report_init("DUT_BOOTED"));
//! fs.write(std::path::Path::new("/tmp/initrd.cpio")).unwrap();
//! ```

use std::io;
use std::path::Path;

/// Where Debian's `busybox-static` installs busybox.
pub const DEBIAN_BUSYBOX: &str = "/bin/busybox";

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    mode: u32,
    data: Vec<u8>,
    rdev: (u32, u32),
}

#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Initramfs {
    /// The skeleton every init needs: `/dev/console` (the kernel opens it for init's stdio),
    /// and mount points for proc and sys.
    pub fn new() -> Self {
        let mut fs = Self::default();
        for d in ["bin", "dev", "proc", "sys", "tmp", "etc"] {
            fs.dir(d);
        }
        fs.char_device("dev/console", 5, 1);
        fs.char_device("dev/null", 1, 3);
        fs
    }

    /// The skeleton plus `/bin/busybox` (copied from `busybox`) and `/bin/sh`.
    pub fn with_busybox(busybox: &Path) -> io::Result<Self> {
        let mut fs = Self::new();
        fs.file("bin/busybox", 0o755, std::fs::read(busybox)?);
        fs.symlink("bin/sh", "busybox");
        Ok(fs)
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.push(path, S_IFDIR | 0o755, Vec::new(), (0, 0))
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> &mut Self {
        self.push(path, S_IFREG | (mode & 0o7777), data, (0, 0))
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.push(path, S_IFLNK | 0o777, target.as_bytes().to_vec(), (0, 0))
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        self.push(path, S_IFCHR | 0o600, Vec::new(), (major, minor))
    }

    /// Sets `/init`.
    pub fn init(&mut self, script: &str) -> &mut Self {
        self.file("init", 0o755, script.as_bytes().to_vec())
    }

    fn push(&mut self, path: &str, mode: u32, data: Vec<u8>, rdev: (u32, u32)) -> &mut Self {
        let name = path.trim_start_matches('/').to_string();
        self.entries.retain(|e| e.name != name);
        self.entries.push(Entry {
            name,
            mode,
            data,
            rdev,
        });
        self
    }

    /// The archive in `newc` format.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            write_entry(&mut out, i as u32 + 1, e);
        }
        write_entry(
            &mut out,
            0,
            &Entry {
                name: "TRAILER!!!".into(),
                mode: 0,
                data: Vec::new(),
                rdev: (0, 0),
            },
        );
        out
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.to_cpio())
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn write_entry(out: &mut Vec<u8>, ino: u32, e: &Entry) {
    let nlink = if e.mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
    let fields = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        e.data.len() as u32,
        0, // devmajor
        0, // devminor
        e.rdev.0,
        e.rdev.1,
        e.name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(e.name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(&e.data);
    pad4(out);
}

/// An `/init` that prints `marker`, then `CMDLINE=<cmdline>` and `CMDLINE_HEX=<hex bytes of
/// /proc/cmdline>` (exact even for non-ASCII bytes on any console), then powers off.
pub fn report_init(marker: &str) -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         echo\n\
         echo \"{marker}\"\n\
         echo \"CMDLINE=$(/bin/busybox cat /proc/cmdline)\"\n\
         echo \"CMDLINE_HEX=$(/bin/busybox od -An -v -tx1 /proc/cmdline | /bin/busybox tr -d ' \\n')\"\n\
         echo \"DUT_DONE\"\n\
         /bin/busybox sync\n\
         /bin/busybox poweroff -f\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut fs = Initramfs::default();
        fs.file("init", 0o755, b"hi".to_vec());
        let cpio = fs.to_cpio();
        assert_eq!(&cpio[..6], b"070701");
        // Header (110) + "init\0" (5) padded to 116, then data padded to 4.
        assert_eq!(&cpio[110..115], b"init\0");
        assert_eq!(&cpio[116..118], b"hi");
        assert_eq!(cpio.len() % 4, 0);
        let text = String::from_utf8_lossy(&cpio);
        assert!(text.contains("TRAILER!!!"));
        // mode field of the first entry
        assert_eq!(&cpio[14..22], b"000081ed");
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let mut fs = Initramfs::new();
        fs.init("a").init("b");
        assert_eq!(fs.entries.iter().filter(|e| e.name == "init").count(), 1);
    }
}
