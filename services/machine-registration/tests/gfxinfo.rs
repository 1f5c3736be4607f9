//! The agent's ci-tron tags against ci-tron's own `gfxinfo` (`valve-gfx-ci-gfxinfo` from
//! PyPI, in a venv under target/), on the same inputs:
//! - sysfs trees of a few machines (AMD Navi21 card, AMD APUs, Intel iGPU, NVIDIA card next
//!   to an Intel iGPU, virtio-gpu): gfxinfo's own sysfs reader is pointed at the tree, the
//!   agent's `probe --root` reads the same tree;
//! - every PCI id of gfxinfo's bundled tables and of the agent's, looked up on both sides.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use dutgate_core::testing::run_ok;
use machine_registration::gfxinfo::{self, PciId};
use machine_registration::gpu_ids;

/// The gfxinfo release the agent's rules and tables follow (see gen-gpu-ids.py).
const GFXINFO: &str = "valve-gfx-ci-gfxinfo==0.1.4";
const AGENT: &str = env!("CARGO_BIN_EXE_machine-registration");

/// `python` of `target/test-venv-gfxinfo`, with gfxinfo installed from PyPI on first use.
fn python() -> PathBuf {
    dutgate_core::testing::pypi_venv("test-venv-gfxinfo", GFXINFO).join("python")
}

/// Drives gfxinfo. `sysfs ROOT`: its own `find_gpus` with `/sys/bus/pci/devices` read under
/// ROOT. `ids FILE`: each `vendor:device:revision` of FILE plus every row of its AMD, Intel,
/// NVIDIA and virtio tables, looked up as its sysfs scan would (first table that matches).
/// Never downloads a newer table: the agent follows the bundled ones.
const DRIVER: &str = r#"
import json, pathlib, sys
import valve_gfx_ci.gfxinfo as g
from valve_gfx_ci.gfxinfo import PCIDevice

def describe(gpu):
    s = gpu.structured_tags
    return {"type": s["type"], "tags": sorted(gpu.tags),
            "gfxversion": s.get("gfxversion"), "apu": s.get("APU")}

mode, arg = sys.argv[1], sys.argv[2]
if mode == "sysfs":
    root = pathlib.Path(arg)
    g.Path = lambda p: root / p.lstrip("/")
    gpus = g.find_gpus(allow_db_updates=False) or []
    print(json.dumps([describe(x) for x in gpus]))
else:
    ids = set()
    for line in open(arg).read().split():
        v, d, r = (int(x, 16) for x in line.split(":"))
        ids.add((v, d, r))
    for db in g.SUPPORTED_GPU_DBS[:4]:
        for k in db.devices:
            if k.subsys_vendor_id == 0 and k.subsys_product_id == 0:
                ids.add((k.vendor_id, k.product_id, k.revision))
    out = {}
    for v, d, r in sorted(ids):
        dev = PCIDevice(vendor_id=v, product_id=d, revision=r, bus_addr="0000:01:00.0")
        found = None
        for db in g.SUPPORTED_GPU_DBS:
            if gpu := db.from_pciid(dev):
                found = describe(gpu)
                break
        out[f"{v:04x}:{d:04x}:{r:02x}"] = found
    print(json.dumps(out))
"#;

fn gfxinfo_json(mode: &str, arg: &Path) -> serde_json::Value {
    let out = run_ok(
        Command::new(python())
            .arg("-c")
            .arg(DRIVER)
            .arg(mode)
            .arg(arg),
        &format!("gfxinfo ({GFXINFO}) {mode}"),
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "gfxinfo printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What the agent should emit for one gfxinfo GPU: its tags, without the `None` values
/// gfxinfo prints for fields it does not know, plus valve-infra's older names.
/// `None` for GPUs the agent gives no ci-tron tags (pre-GCN Radeons).
fn expected(gpu: &serde_json::Value) -> Option<BTreeSet<String>> {
    let kind = gpu["type"].as_str().expect("a gfxinfo type");
    if !["amdgpu", "intelgpu", "nvidia", "virtio"].contains(&kind) {
        return None;
    }
    let mut tags: BTreeSet<String> = gpu["tags"]
        .as_array()
        .expect("gfxinfo tags")
        .iter()
        .map(|t| t.as_str().expect("a tag").to_string())
        .filter(|t| !t.ends_with(":None"))
        .collect();
    if kind == "amdgpu" {
        if let Some(v) = gpu["gfxversion"].as_str().filter(|v| *v != "gfxNone") {
            tags.insert(format!("amdgpu:gfxversion:{v}"));
        }
        if gpu["apu"].as_bool() == Some(true) {
            tags.insert("amdgpu:APU".to_string());
        }
    }
    Some(tags)
}

struct Device {
    vendor: u16,
    device: u16,
    revision: u8,
    class: u32,
}

const fn dev(vendor: u16, device: u16, revision: u8, class: u32) -> Device {
    Device {
        vendor,
        device,
        revision,
        class,
    }
}

/// A `/sys/bus/pci/devices` tree as the kernel writes it.
fn write_tree(root: &Path, devices: &[Device]) {
    for (slot, d) in devices.iter().enumerate() {
        let dir = root.join(format!("sys/bus/pci/devices/0000:{slot:02x}:00.0"));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, value) in [
            ("vendor", format!("0x{:04x}", d.vendor)),
            ("device", format!("0x{:04x}", d.device)),
            ("revision", format!("0x{:02x}", d.revision)),
            ("class", format!("0x{:06x}", d.class)),
            ("subsystem_vendor", "0x1462".to_string()),
            ("subsystem_device", "0x3980".to_string()),
        ] {
            std::fs::write(dir.join(file), format!("{value}\n")).unwrap();
        }
    }
}

fn agent_tags(root: &Path) -> BTreeSet<String> {
    let out = run_ok(
        Command::new(AGENT)
            .args(["probe", "--json", "--root"])
            .arg(root),
        "machine-registration probe",
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe --json");
    v["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| t.as_str().expect("a tag").to_string())
        .collect()
}

/// The tags only the ci-tron vocabulary has (dutgate's own also start with `virtio:`).
fn ci_tron(t: &str) -> bool {
    [
        "amdgpu:",
        "intelgpu:",
        "nvidia:",
        "virtio:pciid:",
        "virtio:codename:",
    ]
    .iter()
    .any(|p| t.starts_with(p))
}

#[test]
fn machines_get_the_tags_gfxinfo_gives_them() {
    const VGA: u32 = 0x030000;
    let machines: &[(&str, &[Device], &[&str])] = &[
        (
            "navi21 card",
            &[
                dev(0x1002, 0x73bf, 0xc1, VGA),
                dev(0x1002, 0xab28, 0x00, 0x040300), // its HDMI audio function
                dev(0x1af4, 0x1041, 0x01, 0x020000),
            ],
            &[
                "amdgpu:codename:NAVI21",
                "amdgpu:generation:10",
                "amdgpu:discrete",
                "amdgpu:gfxversion:gfx10",
                "gpu:amd:navi21",
            ],
        ),
        (
            "renoir APU",
            &[
                dev(0x1022, 0x1630, 0x00, 0x060000),
                dev(0x1002, 0x1636, 0xc6, VGA),
            ],
            &[
                "amdgpu:codename:RENOIR",
                "amdgpu:integrated",
                "amdgpu:APU",
                "amdgpu:family:AI",
                "gpu:amd:renoir",
            ],
        ),
        (
            "steam deck APU",
            &[dev(0x1002, 0x163f, 0xae, VGA)],
            &[
                "amdgpu:codename:VANGOGH",
                "amdgpu:integrated",
                "gpu:amd:vangogh",
            ],
        ),
        (
            "tiger lake iGPU",
            &[
                dev(0x8086, 0x9a49, 0x01, VGA),
                dev(0x8086, 0xa0ed, 0x20, 0x0c0330),
            ],
            &[
                "intelgpu:codename:TGL-GT2",
                "intelgpu:gen:12",
                "intelgpu:integrated",
                "intelgpu:GT:2",
                "gpu:intel:tigerlake",
            ],
        ),
        (
            "ada card next to an alder lake iGPU",
            &[
                dev(0x8086, 0x4680, 0x0c, VGA),
                dev(0x10de, 0x2684, 0xa1, VGA),
                dev(0x10de, 0x22ba, 0xa1, 0x040300),
            ],
            &[
                "nvidia:codename:AD102",
                "nvidia:architecture:Ada",
                "nvidia:discrete",
                "intelgpu:codename:ADL-S",
                "intelgpu:integrated",
            ],
        ),
        (
            "virtio-gpu",
            &[dev(0x1af4, 0x1050, 0x01, VGA)],
            &[
                "virtio:codename:VIRTIO",
                "virtio:family:VIRTIO",
                "gpu:virtio:virtio",
            ],
        ),
    ];
    for (name, devices, must) in machines {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path(), devices);
        let gpus = gfxinfo_json("sysfs", dir.path());
        let gpus = gpus.as_array().expect("a list of GPUs");
        assert!(!gpus.is_empty(), "{name}: gfxinfo found no GPU");
        let mut want = BTreeSet::new();
        let mut theirs = BTreeSet::new();
        for gpu in gpus {
            want.extend(expected(gpu).unwrap_or_else(|| panic!("{name}: {gpu}")));
            theirs.extend(
                gpu["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap().to_string()),
            );
        }
        let ours = agent_tags(dir.path());
        let ours_ci: BTreeSet<String> = ours.iter().filter(|t| ci_tron(t)).cloned().collect();
        let want_ci: BTreeSet<String> = want.iter().filter(|t| ci_tron(t)).cloned().collect();
        assert_eq!(
            ours_ci, want_ci,
            "{name}: agent {ours:?}, gfxinfo {theirs:?}"
        );
        for t in &want {
            assert!(ours.contains(t), "{name}: no {t} in {ours:?}");
        }
        for t in *must {
            assert!(ours.contains(*t), "{name}: no {t} in {ours:?}");
        }
        for t in &ours {
            dutgate_core::Tag::parse(t).unwrap();
        }
    }
}

#[test]
fn every_table_row_matches_gfxinfo() {
    // The agent's rows, each also with a revision no row has (the any-revision fallback).
    let mut ids = BTreeSet::new();
    for &(d, r, _, _) in gpu_ids::AMD {
        ids.insert((0x1002u16, d, r));
        ids.insert((0x1002, d, 0xff));
    }
    for &(d, _) in gpu_ids::INTEL {
        ids.insert((0x8086, d, 0x04));
    }
    for &d in gpu_ids::NVIDIA {
        ids.insert((0x10de, d, 0xa1));
    }
    ids.insert((0x1af4, 0x1050, 0x01));
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("ids");
    let text: Vec<String> = ids
        .iter()
        .map(|(v, d, r)| format!("{v:04x}:{d:04x}:{r:02x}"))
        .collect();
    std::fs::write(&list, text.join("\n")).unwrap();

    let theirs = gfxinfo_json("ids", &list);
    let theirs = theirs.as_object().expect("an object of ids");
    assert!(
        theirs.len() >= ids.len(),
        "{} < {}",
        theirs.len(),
        ids.len()
    );
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    let mut diffs = Vec::new();
    for (key, gpu) in theirs {
        let parts: Vec<_> = key
            .split(':')
            .map(|x| u16::from_str_radix(x, 16).unwrap())
            .collect();
        let id = PciId {
            vendor: parts[0],
            device: parts[1],
            revision: u8::try_from(parts[2]).unwrap(),
        };
        let ours = gfxinfo::lookup(id).map(|g| {
            let mut t = g.tags();
            t.extend(g.older_tags());
            t
        });
        let want = if gpu.is_null() {
            None
        } else {
            *per_kind
                .entry(gpu["type"].as_str().unwrap().to_string())
                .or_default() += 1;
            expected(gpu)
        };
        if ours != want {
            diffs.push(format!("{key}: agent {ours:?}, gfxinfo {want:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} of {} ids differ:\n{}",
        diffs.len(),
        theirs.len(),
        diffs[..diffs.len().min(40)].join("\n")
    );
    // Every table took part (a gfxinfo that loaded no table would compare nothing).
    for (kind, at_least) in [("amdgpu", 1000), ("intelgpu", 400), ("nvidia", 1000)] {
        let n = per_kind.get(kind).copied().unwrap_or(0);
        assert!(n >= at_least, "only {n} {kind} ids compared: {per_kind:?}");
    }
    eprintln!("compared {} ids with {GFXINFO}: {per_kind:?}", theirs.len());
}
