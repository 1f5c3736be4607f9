//! One virtual DUT powered on for real: the QEMU process appears and its serial console
//! (SeaBIOS and iPXE text) arrives on a local TCP listener standing in for salad's
//! netconsole; powering off kills it; a second driver instance adopts a running VM.

use std::time::{Duration, Instant};

use dutgate_pdu_driver::{PduDriver, PowerState, Switch};
use tokio::io::AsyncReadExt;

fn build(v: serde_json::Value) -> Box<dyn PduDriver> {
    dutgate_pdu_virtual::build(yaml_serde::to_value(v).unwrap()).unwrap()
}

fn qemu_pids(mac: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system-x86_64") && cmd.contains(mac) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn power_on_boots_a_vm_whose_console_reaches_the_netconsole() {
    dutgate_core::testing::require_program("qemu-system-x86_64", "qemu-system-x86");
    assert!(
        std::path::Path::new("/usr/lib/ipxe/qemu/efi-virtio.rom").exists(),
        "this test needs the iPXE ROMs of Debian package `ipxe-qemu`"
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let netconsole = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "pdu_id": 0xee, "ports": 2, "netconsole": netconsole.to_string(),
        "boot_port": 1, "memory_mb": 128, "run_dir": dir.path(),
    });
    let mut pdu = build(cfg.clone());
    let mac = dutgate_pdu_virtual::mac_of(0xee, 2);
    assert_eq!(pdu.get("2").await.unwrap(), PowerState::Off);

    pdu.set("2", Switch::On).await.unwrap();
    assert_eq!(pdu.get("2").await.unwrap(), PowerState::On);
    let pids = qemu_pids(&mac);
    assert_eq!(pids.len(), 1, "one QEMU with MAC {mac}");
    let cmdline =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap())
            .replace('\0', " ");
    assert!(
        cmdline.contains("-accel tcg") && cmdline.contains("boot/${mac}/boot.ipxe"),
        "{cmdline}"
    );

    // The VM dials the netconsole; SeaBIOS/iPXE output arrives on it.
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
        .await
        .expect("QEMU connects to the netconsole")
        .unwrap();
    let mut seen = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(60)
        && !String::from_utf8_lossy(&seen).contains("iPXE")
    {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("iPXE"), "serial bytes from the VM: {text:?}");

    // A second driver (a restarted service) adopts the running VM and can switch it off.
    let mut again = build(cfg);
    assert_eq!(again.get("2").await.unwrap(), PowerState::On);
    again.set("2", Switch::Off).await.unwrap();
    assert_eq!(again.get("2").await.unwrap(), PowerState::Off);
    assert!(qemu_pids(&mac).is_empty(), "QEMU is gone");
    assert_eq!(
        pdu.get("2").await.unwrap(),
        PowerState::Off,
        "the first instance sees it off too"
    );

    // Shutting the PDU down stops the VMs it started.
    pdu.set("1", Switch::On).await.unwrap();
    let mac1 = dutgate_pdu_virtual::mac_of(0xee, 1);
    assert_eq!(qemu_pids(&mac1).len(), 1);
    pdu.shutdown().await;
    assert!(qemu_pids(&mac1).is_empty());
}
