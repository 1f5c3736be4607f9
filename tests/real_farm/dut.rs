//! The DUTs of the farm in a box: QEMU machines booting through their firmware, each with a
//! serial adapter (a pty pair salad opens) and a power outlet (an outlet of the SNMP PDU whose
//! state starts and stops the VM).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A pty pair standing for a USB serial adapter: the slave end (what salad opens) is linked at
/// `link`, the master end is the DUT's side of the cable, bridged to the VM's serial port
/// (QEMU's chardev connects to `socket`). The adapter stays plugged in while the VM is off,
/// as a real one does; `unplug` removes it, `plug` brings a new pty back at the same link.
pub struct SerialAdapter {
    pub link: PathBuf,
    pub socket: PathBuf,
    shared: Arc<Shared>,
    /// The group the device belongs to (udev gives serial adapters `dialout`, mode 0660).
    gid: u32,
}

#[derive(Default)]
struct Shared {
    /// The pty's master end and the test's own open slave end (held so that the pty lives
    /// while salad has it closed); `None` while unplugged.
    pty: Mutex<Option<(File, File)>>,
    /// The VM's serial port while it runs.
    vm: Mutex<Option<UnixStream>>,
    done: AtomicBool,
}

fn last_error(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A new pty pair in raw mode: (master, slave, slave path).
fn open_pty() -> std::io::Result<(File, File, PathBuf)> {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a fd this function owns; the
    // buffer outlives the call and its length is passed.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK);
        if master < 0 {
            return Err(last_error("posix_openpt"));
        }
        let master = File::from_raw_fd(master);
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(last_error("grantpt/unlockpt"));
        }
        let mut name = [0 as libc::c_char; 128];
        if libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0 {
            return Err(last_error("ptsname_r"));
        }
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .into_owned();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)?;
        // Raw from the start: a cooked pty would echo the DUT's output back to the DUT
        // until salad sets its own mode.
        let mut tio: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut tio) != 0 {
            return Err(last_error("tcgetattr"));
        }
        libc::cfmakeraw(&mut tio);
        if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio) != 0 {
            return Err(last_error("tcsetattr"));
        }
        Ok((master, slave, PathBuf::from(path)))
    }
}

impl SerialAdapter {
    /// Plugs an adapter in at `link`; the VM's serial chardev connects to `socket`.
    pub fn new(link: PathBuf, socket: PathBuf, gid: u32) -> Self {
        let listener =
            UnixListener::bind(&socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
        let shared = Arc::new(Shared::default());
        let adapter = SerialAdapter {
            link,
            socket,
            shared: shared.clone(),
            gid,
        };
        adapter.plug();
        // The DUT's output: from the VM to the pty (salad reads it on the slave end).
        let from_vm = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if from_vm.done.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                *from_vm.vm.lock().unwrap_or_else(|p| p.into_inner()) = conn.try_clone().ok();
                let mut buf = [0u8; 4096];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => from_vm.to_pty(&buf[..n]),
                    }
                }
            }
        });
        // What salad writes to the DUT: from the pty to the VM.
        let to_vm = shared;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !to_vm.done.load(Ordering::SeqCst) {
                let read = {
                    let mut pty = to_vm.pty.lock().unwrap_or_else(|p| p.into_inner());
                    match pty.as_mut() {
                        Some((master, _)) => {
                            let mut pfd = libc::pollfd {
                                fd: master.as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            };
                            // SAFETY: one pollfd, valid for the call.
                            unsafe { libc::poll(&mut pfd, 1, 20) };
                            master.read(&mut buf).ok()
                        }
                        None => None,
                    }
                };
                match read {
                    Some(n) if n > 0 => {
                        if let Some(vm) =
                            to_vm.vm.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                        {
                            let _ = vm.write_all(&buf[..n]);
                        }
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        adapter
    }

    /// A new pty linked at `link`, owned by root:dialout, mode 0660 (what udev does).
    pub fn plug(&self) {
        let (master, slave, path) = open_pty().expect("a pty for the serial adapter");
        // SAFETY: fchown/fchmod on an open fd of ours.
        unsafe {
            assert_eq!(
                libc::fchown(slave.as_raw_fd(), 0, self.gid),
                0,
                "fchown pty"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
        *self.shared.pty.lock().unwrap_or_else(|p| p.into_inner()) = Some((master, slave));
        let tmp = self.link.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&path, &tmp).unwrap();
        std::fs::rename(&tmp, &self.link).unwrap();
    }

    /// Pulls the adapter out: the link goes and the pty is closed (salad's reads fail).
    pub fn unplug(&self) {
        let _ = std::fs::remove_file(&self.link);
        *self.shared.pty.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Bytes as if the DUT had printed them (the VM may be off).
    pub fn dut_says(&self, bytes: &[u8]) {
        self.shared.to_pty(bytes);
    }
}

impl Shared {
    /// Into the pty's master end; dropped when the pty's buffer is full or it is unplugged,
    /// as a UART's bytes are lost when nobody reads them.
    fn to_pty(&self, mut bytes: &[u8]) {
        let mut pty = self.pty.lock().unwrap_or_else(|p| p.into_inner());
        let Some((master, _)) = pty.as_mut() else {
            return;
        };
        let mut tries = 0;
        while !bytes.is_empty() && tries < 50 {
            match master.write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(_) => return,
            }
        }
    }
}

impl Drop for SerialAdapter {
    fn drop(&mut self) {
        self.shared.done.store(true, Ordering::SeqCst);
        self.unplug();
        // Wakes the accept loop so that it sees `done`.
        let _ = UnixStream::connect(&self.socket);
    }
}

/// How a DUT boots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Firmware {
    /// SeaBIOS and the NIC's option ROM (QEMU's iPXE, Debian `ipxe-qemu`).
    SeaBios,
    /// OVMF (Debian `ovmf`) with no NIC option ROM: UEFI PXE, then Debian's `ipxe.efi`.
    Uefi,
}

/// Where the DUTs run: the farm's network namespace (their taps join its bridge `dut0`), the
/// QEMU accelerator, and the directory of their files.
pub struct Lab {
    pub netns: String,
    pub accel: String,
    pub dir: PathBuf,
}

/// A QEMU DUT: how to start it, and the running process while its outlet is on.
pub struct Dut {
    pub name: String,
    pub mac: String,
    pub firmware: Firmware,
    pub outlet: usize,
    /// Where its serial adapter's bridge listens (`SerialAdapter::socket`).
    pub console_socket: PathBuf,
    /// `<lab dir>/<name>`: its NVRAM, its tap script, a QEMU log per power-on.
    pub dir: PathBuf,
    netns: String,
    accel: String,
    vm: Option<Child>,
    boots: u32,
}

impl Dut {
    pub fn new(
        lab: &Lab,
        name: &str,
        mac: &str,
        firmware: Firmware,
        outlet: usize,
        adapter: &SerialAdapter,
    ) -> Self {
        let dir = lab.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // QEMU runs this with the tap device's name: the NIC's cable into the DUT switch.
        let ifup = dir.join("qemu-ifup");
        std::fs::write(&ifup, "#!/bin/sh\nexec ip link set \"$1\" master dut0 up\n").unwrap();
        std::fs::set_permissions(&ifup, std::fs::Permissions::from_mode(0o755)).unwrap();
        match firmware {
            // SeaBIOS's serial console on COM1: the BIOS and iPXE ROM say what they do.
            Firmware::SeaBios => {
                std::fs::write(dir.join("sercon-port"), 0x3f8u64.to_le_bytes()).unwrap()
            }
            // The machine's NVRAM, kept across power cycles.
            Firmware::Uefi => {
                std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", dir.join("OVMF_VARS.fd"))
                    .unwrap_or_else(|e| panic!("OVMF_VARS_4M.fd: {e} (Debian package ovmf)"));
            }
        }
        Dut {
            name: name.to_string(),
            mac: mac.to_string(),
            firmware,
            outlet,
            console_socket: adapter.socket.clone(),
            dir,
            netns: lab.netns.clone(),
            accel: lab.accel.clone(),
            vm: None,
            boots: 0,
        }
    }

    fn qemu_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-name",
            &self.name,
            "-accel",
            &self.accel,
            "-m",
            "512",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-netdev",
            &format!(
                "tap,id=n0,script={},downscript=no",
                self.dir.join("qemu-ifup").display()
            ),
            "-chardev",
            &format!("socket,id=con,path={}", self.console_socket.display()),
            "-serial",
            "chardev:con",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match self.firmware {
            Firmware::SeaBios => args.extend([
                "-device".into(),
                format!("virtio-net-pci,netdev=n0,mac={},bootindex=1", self.mac),
                "-fw_cfg".into(),
                format!(
                    "name=etc/sercon-port,file={}",
                    self.dir.join("sercon-port").display()
                ),
            ]),
            Firmware::Uefi => args.extend([
                "-drive".into(),
                "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
                    .into(),
                "-drive".into(),
                format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    self.dir.join("OVMF_VARS.fd").display()
                ),
                "-device".into(),
                format!(
                    "virtio-net-pci,netdev=n0,mac={},romfile=,bootindex=1",
                    self.mac
                ),
            ]),
        }
        args
    }

    /// Power applied: the machine starts (it is set to power on after AC loss).
    pub fn power_on(&mut self) {
        self.power_off();
        self.boots += 1;
        let log = File::create(self.dir.join(format!("qemu-{}.log", self.boots))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, "qemu-system-x86_64"])
            .args(self.qemu_args())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("qemu-system-x86_64: {e} (Debian package qemu-system-x86)"));
        self.vm = Some(child);
    }

    /// Power removed: the VM is gone at once.
    pub fn power_off(&mut self) {
        if let Some(mut c) = self.vm.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dut {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// The mains: watches the PDU's outlets (the SNMP agent's record of them) and applies each
/// change to its DUT, every 100 ms, until dropped.
pub struct Mains {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Dut>>>,
}

impl Mains {
    pub fn start(duts: Vec<Dut>, outlet: impl Fn(usize) -> Option<bool> + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut duts = duts;
            let mut last: Vec<bool> = vec![false; duts.len()];
            while !stopping.load(Ordering::SeqCst) {
                for (i, dut) in duts.iter_mut().enumerate() {
                    let Some(on) = outlet(dut.outlet) else {
                        continue;
                    };
                    if on != last[i] {
                        if on {
                            println!("[mains] outlet {} ON: {} powers on", dut.outlet, dut.name);
                            dut.power_on();
                        } else {
                            println!(
                                "[mains] outlet {} OFF: {} loses power",
                                dut.outlet, dut.name
                            );
                            dut.power_off();
                        }
                        last[i] = on;
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            duts
        });
        Mains {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching; the DUTs (still powered as they were) come back.
    pub fn stop(mut self) -> Vec<Dut> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Mains {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
