//! Hardware enumeration from `/sys` and `/proc` into tags of the form `<family>:<key>:<value>`.
//!
//! Everything reads from a root directory (normally `/`) so that tests can probe a fake tree.
//! Values are sanitised to what mars accepts (no whitespace or control characters, ≤ 128
//! bytes). A missing file is not an error: an initramfs may lack parts of `/sys`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::gfxinfo;

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub base_name: String,
    pub tags: BTreeSet<String>,
}

/// Known GPU families by PCI vendor:device (a small table; unknown devices still get a
/// `gpu:<vendor>:pci-<device>` tag).
const GPU_FAMILIES: &[(&str, &str, &str)] = &[
    ("1002", "73bf", "navi21"),
    ("1002", "73df", "navi22"),
    ("1002", "73ff", "navi23"),
    ("1002", "744c", "navi31"),
    ("1002", "7480", "navi33"),
    ("1002", "731f", "navi10"),
    ("1002", "7340", "navi14"),
    ("1002", "1636", "renoir"),
    ("1002", "1638", "cezanne"),
    ("1002", "15d8", "picasso"),
    ("1002", "15dd", "raven"),
    ("1002", "1681", "rembrandt"),
    ("1002", "164e", "raphael"),
    ("1002", "15bf", "phoenix"),
    ("1002", "67df", "polaris10"),
    ("1002", "699f", "polaris12"),
    ("1002", "163f", "vangogh"),
    ("8086", "3e9b", "coffeelake"),
    ("8086", "3e92", "coffeelake"),
    ("8086", "5917", "kabylake"),
    ("8086", "9a49", "tigerlake"),
    ("8086", "4680", "alderlake"),
    ("8086", "46a6", "alderlake"),
    ("8086", "a7a0", "raptorlake"),
    ("8086", "56a0", "dg2"),
    ("1af4", "1050", "virtio"),
    ("1234", "1111", "bochs"),
    ("1b36", "0100", "qxl"),
    ("15ad", "0405", "vmware"),
];

fn vendor_name(vendor: &str) -> Option<&'static str> {
    Some(match vendor {
        "1002" => "amd",
        "10de" => "nvidia",
        "8086" => "intel",
        "1af4" => "virtio",
        "1234" => "qemu",
        "1b36" => "redhat",
        "15ad" => "vmware",
        "13b5" => "arm",
        _ => return None,
    })
}

/// Virtio PCI device ids (legacy and modern) → device kind.
fn virtio_kind(device: &str) -> Option<&'static str> {
    Some(match device {
        "1000" | "1041" => "net",
        "1001" | "1042" => "block",
        "1002" | "1045" => "balloon",
        "1003" | "1043" => "console",
        "1004" | "1048" => "scsi",
        "1005" | "1044" => "rng",
        "1009" | "1049" => "9p",
        "1050" => "gpu",
        "1052" => "input",
        "1053" => "vsock",
        _ => return None,
    })
}

/// Makes `s` usable inside a tag: whitespace runs become `_`, control characters go.
pub fn sanitise(s: &str) -> String {
    let mut out = String::new();
    let mut last_us = false;
    for c in s.trim().chars() {
        if c.is_whitespace() {
            if !last_us {
                out.push('_');
                last_us = true;
            }
        } else if !c.is_control() {
            out.push(c);
            last_us = false;
        }
    }
    // Keep the whole tag under mars's 128-byte limit, on a char boundary.
    let mut end = out.len().min(96);
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn hex_id(p: &Path) -> Option<String> {
    let s = read_trim(p)?;
    let s = s.strip_prefix("0x").unwrap_or(&s).to_ascii_lowercase();
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s)
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Probes the machine rooted at `root` (normally `/`).
pub fn probe(root: &Path) -> Probe {
    let mut tags = BTreeSet::new();
    let mut gpu_family: Option<String> = None;
    let mut has_virtio = false;

    for dev in sorted_entries(&root.join("sys/bus/pci/devices")) {
        let (Some(vendor), Some(device)) =
            (hex_id(&dev.join("vendor")), hex_id(&dev.join("device")))
        else {
            continue;
        };
        let vendor = vendor.trim_start_matches("0000").to_string();
        tags.insert(format!("pci:{vendor}:{device}"));
        // ci-tron's vocabulary: gfxinfo looks every PCI device up (whatever its class) and
        // skips those without a readable revision.
        if let (Ok(v), Ok(d), Some(r)) = (
            u16::from_str_radix(&vendor, 16),
            u16::from_str_radix(&device, 16),
            hex_id(&dev.join("revision")).and_then(|r| u8::from_str_radix(&r, 16).ok()),
        ) && let Some(gpu) = gfxinfo::lookup(gfxinfo::PciId {
            vendor: v,
            device: d,
            revision: r,
        }) {
            tags.extend(gpu.tags());
            tags.extend(gpu.older_tags());
        }
        let class = hex_id(&dev.join("class")).unwrap_or_default();
        if vendor == "1af4" {
            has_virtio = true;
            tags.insert("virtio:family:VIRTIO".to_string());
            if let Some(kind) = virtio_kind(&device) {
                tags.insert(format!("virtio:device:{kind}"));
            }
        }
        // PCI class 0x03xxxx: display controllers.
        if class.len() == 6 && class.starts_with("03") {
            let vname = vendor_name(&vendor)
                .map(str::to_string)
                .unwrap_or(vendor.clone());
            match GPU_FAMILIES
                .iter()
                .find(|(v, d, _)| *v == vendor && *d == device)
            {
                Some((_, _, family)) => {
                    tags.insert(format!("gpu:{vname}:{family}"));
                    gpu_family.get_or_insert_with(|| family.to_string());
                }
                None => {
                    tags.insert(format!("gpu:{vname}:pci-{device}"));
                }
            }
        }
    }

    if let Ok(cpuinfo) = fs::read_to_string(root.join("proc/cpuinfo")) {
        let mut processors = 0;
        let mut model = None;
        for line in cpuinfo.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            match k.trim() {
                "processor" => processors += 1,
                // x86 "model name"; some arm kernels print "Hardware" or "CPU part" only.
                "model name" | "Model" if model.is_none() => model = Some(v.trim().to_string()),
                _ => {}
            }
        }
        if let Some(m) = model.filter(|m| !m.is_empty()) {
            tags.insert(format!("cpu:model:{}", sanitise(&m)));
        }
        if processors > 0 {
            tags.insert(format!("cpu:cores:{processors}"));
        }
    }
    tags.insert(format!("cpu:arch:{}", std::env::consts::ARCH));

    if let Ok(meminfo) = fs::read_to_string(root.join("proc/meminfo"))
        && let Some(kb) = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        // MemTotal is below the installed size (firmware and kernel reservations): round to
        // the nearest GiB so the tag is stable across boots and kernels.
        let gib = ((kb as f64) / (1024.0 * 1024.0)).round().max(1.0) as u64;
        tags.insert(format!("mem:size:{gib}"));
    }

    for dev in sorted_entries(&root.join("sys/block")) {
        let Some(name) = dev.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if ["loop", "ram", "zram", "dm-", "sr", "md", "nbd", "fd"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let Some(sectors) = read_trim(&dev.join("size")).and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if sectors == 0 {
            continue;
        }
        // `size` counts 512-byte sectors whatever the device's block size.
        let gib = ((sectors as f64 * 512.0) / (1u64 << 30) as f64)
            .round()
            .max(1.0) as u64;
        let model = read_trim(&dev.join("device/model"))
            .map(|m| sanitise(&m))
            .filter(|m| !m.is_empty());
        // No model (virtio, mmc): name the kind of disk, not its enumeration order.
        let key = model.unwrap_or_else(|| {
            let kind = if name.starts_with("vd") {
                "virtio"
            } else if name.starts_with("nvme") {
                "nvme"
            } else if name.starts_with("mmcblk") {
                "mmc"
            } else if name.starts_with("sd") {
                "scsi"
            } else {
                "disk"
            };
            kind.to_string()
        });
        tags.insert(format!("disk:{key}:{gib}"));
    }

    let base_name = match gpu_family {
        Some(f) => f,
        None if has_virtio => "virtio".to_string(),
        None => std::env::consts::ARCH.replace('_', "-"),
    };
    Probe { base_name, tags }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    #[test]
    fn probes_a_fake_tree() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(r, "sys/bus/pci/devices/0000:00:01.0/vendor", "0x1002\n");
        write(r, "sys/bus/pci/devices/0000:00:01.0/device", "0x73bf\n");
        write(r, "sys/bus/pci/devices/0000:00:01.0/class", "0x030000\n");
        write(r, "sys/bus/pci/devices/0000:00:01.0/revision", "0xc1\n");
        write(r, "sys/bus/pci/devices/0000:00:02.0/vendor", "0x1af4\n");
        write(r, "sys/bus/pci/devices/0000:00:02.0/device", "0x1041\n");
        write(r, "sys/bus/pci/devices/0000:00:02.0/class", "0x020000\n");
        write(
            r,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: AMD Ryzen 9  5950X 16-Core Processor\nprocessor\t: 1\nmodel name\t: AMD Ryzen 9  5950X 16-Core Processor\n",
        );
        write(
            r,
            "proc/meminfo",
            "MemTotal:       32779412 kB\nMemFree: 1 kB\n",
        );
        write(r, "sys/block/nvme0n1/size", "1953525168\n");
        write(
            r,
            "sys/block/nvme0n1/device/model",
            "Samsung SSD 980 PRO 1TB   \n",
        );
        write(r, "sys/block/vda/size", "41943040\n");
        write(r, "sys/block/loop0/size", "100\n");
        let p = probe(r);
        assert_eq!(p.base_name, "navi21");
        let want = [
            "pci:1002:73bf",
            "pci:1af4:1041",
            "gpu:amd:navi21",
            "amdgpu:codename:NAVI21",
            "amdgpu:generation:10",
            "amdgpu:discrete",
            "amdgpu:gfxversion:gfx10",
            "virtio:family:VIRTIO",
            "virtio:device:net",
            "cpu:model:AMD_Ryzen_9_5950X_16-Core_Processor",
            "cpu:cores:2",
            "mem:size:31",
            "disk:Samsung_SSD_980_PRO_1TB:932",
            "disk:virtio:20",
        ];
        for w in want {
            assert!(p.tags.contains(w), "missing {w} in {:?}", p.tags);
        }
        assert!(!p.tags.iter().any(|t| t.contains("loop")));
        for t in &p.tags {
            assert!(t.len() <= 128 && !t.contains(char::is_whitespace), "{t}");
        }
    }

    #[test]
    fn empty_tree_still_names_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe(dir.path());
        assert!(!p.base_name.is_empty());
        assert!(p.tags.iter().any(|t| t.starts_with("cpu:arch:")));
    }

    #[test]
    fn sanitise_keeps_tags_valid() {
        assert_eq!(sanitise("  a \t b\u{7}c "), "a_bc");
        assert!(sanitise(&"é".repeat(200)).len() <= 96);
    }
}
