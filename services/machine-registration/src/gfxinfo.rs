//! ci-tron's GPU tag vocabulary, as its `gfxinfo` package (`valve-gfx-ci-gfxinfo` 0.1.4 on
//! PyPI) derives it from PCI ids, plus the older names valve-infra's registration used.
//!
//! Farms that moved from valve-infra or ci-tron have jobs asking for `amdgpu:codename:NAVI21`,
//! `amdgpu:gfxversion:gfx10`, `intelgpu:gen:12`, `nvidia:architecture:Ada`…: the agent emits
//! those next to dutgate's own `gpu:<vendor>:<family>` tags so that such jobs find a machine.
//!
//! The rules (which tag, which spelling) follow gfxinfo 0.1.4; the id tables
//! (`gpu_ids.rs`) are generated from the data files that package bundles, by
//! `gen-gpu-ids.py` (which says how to refresh them). `tests/gfxinfo.rs` runs that gfxinfo
//! on the same ids and sysfs trees and compares. Differences, on purpose:
//! - where gfxinfo would print a `None` value (`amdgpu:architecture:None`), no tag;
//! - GPUs gfxinfo finds without a PCI id (DRM or device-tree only: Vivante, Mali…) and
//!   pre-GCN Radeons (its `radeon:*` tags) get no ci-tron tags.

use std::collections::BTreeSet;

use crate::gpu_ids;

/// The PCI identity gfxinfo matches on (it ignores the subsystem ids when reading sysfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
}

/// A GPU found in gfxinfo's tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpu {
    Amd {
        device: u16,
        /// The revision of the table row that matched (0 when only the device's
        /// any-revision row did), as gfxinfo prints it in `amdgpu:pciid`.
        revision: u8,
        asic: &'static str,
        apu: bool,
    },
    Intel {
        device: u16,
        /// pciids.h's `INTEL_<section>_IDS` name, e.g. `ADLS`, `TGL_GT2`.
        section: &'static str,
    },
    Nvidia {
        device: u16,
    },
    Virtio,
}

const AMD: u16 = 0x1002;
const INTEL: u16 = 0x8086;
const NVIDIA: u16 = 0x10de;
const VIRTIO: u16 = 0x1af4;
const VIRTIO_GPU: u16 = 0x1050;

/// Looks `id` up the way gfxinfo does: the exact (device, revision) row, else the
/// device's revision-0 row; Intel, NVIDIA and virtio rows are all revision 0.
pub fn lookup(id: PciId) -> Option<Gpu> {
    match id.vendor {
        AMD => {
            let find = |rev: u8| {
                gpu_ids::AMD
                    .binary_search_by(|&(d, r, _, _)| (d, r).cmp(&(id.device, rev)))
                    .ok()
                    .map(|i| gpu_ids::AMD[i])
            };
            let (device, revision, asic, apu) = find(id.revision).or_else(|| find(0))?;
            Some(Gpu::Amd {
                device,
                revision,
                asic: gpu_ids::AMD_ASICS.get(usize::from(asic))?,
                apu,
            })
        }
        INTEL => {
            let i = gpu_ids::INTEL
                .binary_search_by(|&(d, _)| d.cmp(&id.device))
                .ok()?;
            let section = gpu_ids::INTEL_SECTIONS.get(usize::from(gpu_ids::INTEL[i].1))?;
            Some(Gpu::Intel {
                device: id.device,
                section,
            })
        }
        NVIDIA => gpu_ids::NVIDIA
            .binary_search(&id.device)
            .ok()
            .map(|_| Gpu::Nvidia { device: id.device }),
        VIRTIO if id.device == VIRTIO_GPU => Some(Gpu::Virtio),
        _ => None,
    }
}

/// gfxinfo's `pciid` field: Python's `hex()` of the matched row's ids.
fn pciid(vendor: u16, device: u16, revision: u8) -> String {
    format!("{vendor:#x}:{device:#x}:{revision:#x}")
}

impl Gpu {
    /// The tags gfxinfo 0.1.4 gives this GPU.
    pub fn tags(&self) -> BTreeSet<String> {
        let mut t = BTreeSet::new();
        match self {
            Gpu::Amd {
                device,
                revision,
                asic,
                apu,
            } => {
                let codename = amd_codename(asic);
                let arch = amd_architecture(codename);
                t.insert(format!("amdgpu:pciid:{}", pciid(AMD, *device, *revision)));
                t.insert(format!("amdgpu:codename:{codename}"));
                if let Some(a) = arch {
                    t.insert(format!("amdgpu:architecture:{a}"));
                }
                if let Some(g) = arch.and_then(amd_gfx_version) {
                    t.insert(format!("amdgpu:generation:{g}"));
                }
                t.insert(format!(
                    "amdgpu:{}",
                    if *apu { "integrated" } else { "discrete" }
                ));
                if let Some(f) = amd_family(codename) {
                    t.insert(format!("amdgpu:family:{f}"));
                }
            }
            Gpu::Intel { device, section } => {
                let id = pciid(INTEL, *device, 0);
                let d = IntelName::decode(section);
                match (intel_architecture(&d.short), intel_gen(&d.short)) {
                    (Some(arch), Some(gen_)) => {
                        t.insert(format!("intelgpu:pciid:{id}"));
                        t.insert(format!("intelgpu:codename:{}", d.codename()));
                        t.insert(format!("intelgpu:architecture:{arch}"));
                        t.insert(format!("intelgpu:gen:{gen_}"));
                        let discrete = ["DG1", "DG2", "ATS", "CRI"].contains(&d.short.as_str());
                        t.insert(format!(
                            "intelgpu:{}",
                            if discrete { "discrete" } else { "integrated" }
                        ));
                        if let Some(gt) = d.gt.filter(|g| *g != 0) {
                            t.insert(format!("intelgpu:GT:{gt}"));
                        }
                    }
                    _ => {
                        t.insert(format!("intelgpu:pciid:{id}"));
                        t.insert(format!("intelgpu:raw_codename:{section}"));
                    }
                }
            }
            Gpu::Nvidia { device } => {
                let codename = nvidia_codename(*device);
                t.insert(format!("nvidia:pciid:{}", pciid(NVIDIA, *device, 0)));
                if let Some(c) = codename {
                    t.insert(format!("nvidia:codename:{c}"));
                }
                if let Some(a) = codename.and_then(nvidia_architecture) {
                    t.insert(format!("nvidia:architecture:{a}"));
                }
                let integrated = codename.is_some_and(|c| {
                    c.starts_with("MCP")
                        || ["NV0A", "NV1A", "NV1F", "GK20A", "GM20B", "GA10B"].contains(&c)
                });
                t.insert(format!(
                    "nvidia:{}",
                    if integrated { "integrated" } else { "discrete" }
                ));
            }
            Gpu::Virtio => {
                t.insert(format!("virtio:pciid:{}", pciid(VIRTIO, VIRTIO_GPU, 0)));
                t.insert("virtio:family:VIRTIO".to_string());
                t.insert("virtio:codename:VIRTIO".to_string());
            }
        }
        t
    }

    /// The names valve-infra's registration used before gfxinfo renamed them (jobs of
    /// farms that came from valve-infra still ask for them): `amdgpu:gfxversion:gfx<N>`
    /// and `amdgpu:APU`.
    pub fn older_tags(&self) -> BTreeSet<String> {
        let mut t = BTreeSet::new();
        if let Gpu::Amd { asic, apu, .. } = self {
            if let Some(g) = amd_architecture(amd_codename(asic)).and_then(amd_gfx_version) {
                t.insert(format!("amdgpu:gfxversion:gfx{g}"));
            }
            if *apu {
                t.insert("amdgpu:APU".to_string());
            }
        }
        t
    }
}

/// DeviceInfo.cpp's ASIC name → the codename gfxinfo prints (its `AMDGPU.codename`; the
/// sources it cites: techpowerup, the kernel's amdgpu ASIC tables).
fn amd_codename(asic: &str) -> &str {
    match asic {
        "TAHITI_XT" | "TAHITI_PRO" => "TAHITI",
        "CAPEVERDE_XT" | "CAPEVERDE_PRO" => "VERDE",
        "SPECTRE_LITE" | "SPECTRE" | "SPECTRE_SL" | "SPOOKY" => "KAVERI",
        "KALINDI" => "KABINI",
        "PITCAIRN_XT" | "PITCAIRN_PRO" => "PITCAIRN",
        "ICELAND" => "TOPAZ",
        "CARRIZO_EMB" => "CARRIZO",
        "VEGAM1" | "VEGAM2" => "VEGAM",
        "ELLESMERE" => "POLARIS10",
        "BAFFIN" => "POLARIS11",
        "GFX8_0_4" => "POLARIS12",
        "GFX9_0_0" => "VEGA10",
        "GFX9_0_2" => "RAVEN",
        "GFX9_0_4" => "VEGA12",
        "GFX9_0_6" => "VEGA20",
        "GFX9_0_A" => "ALDEBARAN",
        "GFX9_0_C" => "RENOIR",
        "GFX9_4_2" => "AQUAVANJARAM",
        "GFX10_1_0" | "GFX10_1_0_XL" => "NAVI10",
        "GFX10_1_1" => "NAVI12",
        "GFX10_1_2" | "GFX10_1_2_X" | "GFX10_1_2_XT" => "NAVI14",
        "GFX10_3_0" | "GFX10_3_0_XT" | "GFX10_3_0_XTX" => "NAVI21",
        "GFX10_3_1" => "NAVI22",
        "GFX10_3_2" | "GFX10_3_2_XT" => "NAVI23",
        "GFX10_3_3" => "VANGOGH",
        "GFX10_3_4" => "NAVI24",
        "GFX10_3_5" => "REMBRANDT",
        "GFX10_3_6" => "RAPHAEL",
        "GFX11_0_0" | "GFX11_0_0_XT" | "GFX11_0_0_GRE" | "GFX11_0_0_M" => "NAVI31",
        "GFX11_0_1" | "GFX11_0_1_XT" => "NAVI32",
        "GFX11_0_2" | "GFX11_0_2_XT" => "NAVI33",
        "GFX11_0_3" | "GFX11_0_3A" => "PHOENIX1",
        "GFX11_0_3B" => "PHOENIX2",
        "GFX11_5_0" => "STRIXPOINT1",
        "GFX11_5_1" => "STRIXHALO",
        "GFX11_5_2" | "GFX11_5_3" | "GFX11_5_3A" => "KRAKANPOINT",
        "GFX12_0_0" | "GFX12_0_0_XT" => "NAVI44",
        "GFX12_0_1" | "GFX12_0_1_XT" | "GFX12_0_1_GRE" => "NAVI48",
        other => other,
    }
}

/// Mesa's `amd_family.h` family, for the chips gfxinfo names one.
fn amd_family(codename: &str) -> Option<&'static str> {
    Some(match codename {
        "TAHITI" | "PITCAIRN" | "VERDE" | "OLAND" | "HAINAN" => "SI",
        "BONAIRE" | "KAVERI" | "KABINI" | "HAWAII" => "CIK",
        "TONGA" | "TOPAZ" | "CARRIZO" | "FIJI" | "STONEY" | "POLARIS10" | "POLARIS11"
        | "POLARIS12" | "VEGAM" => "VI",
        "VEGA10" | "VEGA12" | "VEGA20" | "ARCTURUS" | "RAVEN" | "RENOIR" => "AI",
        _ => return None,
    })
}

fn amd_architecture(codename: &str) -> Option<&'static str> {
    Some(match codename {
        "TAHITI" | "PITCAIRN" | "VERDE" | "OLAND" | "HAINAN" => "GCN1",
        "KAVERI" | "BONAIRE" | "HAWAII" | "KABINI" | "MULLINS" => "GCN2",
        "TOPAZ" | "TONGA" | "FIJI" | "CARRIZO" | "STONEY" => "GCN3",
        "POLARIS10" | "POLARIS11" | "POLARIS12" | "VEGAM" => "GCN4",
        "VEGA10" | "VEGA12" | "RAVEN" => "GCN5",
        "VEGA20" | "RENOIR" => "GCN5.1",
        "ARCTURUS" => "CDNA",
        "ALDEBARAN" => "CDNA2",
        "AQUAVANJARAM" => "CDNA3",
        "NAVI10" | "NAVI12" | "NAVI14" | "CYAN_SKILLFISH" => "RDNA1",
        "NAVI21" | "NAVI22" | "NAVI23" | "NAVI24" | "VANGOGH" | "REMBRANDT" | "RAPHAEL" => "RDNA2",
        "NAVI31" | "NAVI32" | "NAVI33" | "PHOENIX1" | "PHOENIX2" | "STRIXPOINT1" | "STRIXHALO"
        | "KRAKANPOINT" => "RDNA3",
        "NAVI44" | "NAVI48" => "RDNA4",
        _ => return None,
    })
}

fn amd_gfx_version(architecture: &str) -> Option<u8> {
    Some(match architecture {
        "GCN1" => 6,
        "GCN2" => 7,
        "GCN3" | "GCN4" => 8,
        "GCN5" | "GCN5.1" | "CDNA" | "CDNA2" | "CDNA3" => 9,
        "RDNA1" | "RDNA2" => 10,
        "RDNA3" => 11,
        "RDNA4" => 12,
        _ => return None,
    })
}

/// An Intel pciids.h section name split the way gfxinfo splits it: `ADLS` → `ADL` + `S`,
/// `TGL_GT2` → `TGL` + GT 2, `DG2_G10_D` → `DG2` + `G10`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IntelName {
    short: String,
    variant: Option<String>,
    gt: Option<u8>,
}

impl IntelName {
    /// The pattern is `<short>[_<variant>][_GT<digit>]`, each part taken at its first
    /// match, the rest of the name ignored; variants are tried in this order.
    fn decode(raw: &str) -> IntelName {
        let short_len = raw.find('_').unwrap_or(raw.len());
        if short_len == 0 {
            return IntelName {
                short: raw.to_string(),
                variant: None,
                gt: None,
            };
        }
        let mut short = raw[..short_len].to_string();
        let mut rest = &raw[short_len..];
        let mut variant = rest.strip_prefix('_').and_then(intel_variant).map(|v| {
            rest = &rest[1 + v.len()..];
            v.to_string()
        });
        let gt = rest
            .strip_prefix("_GT")
            .and_then(|s| s.chars().next())
            .and_then(|c| c.to_digit(10))
            .and_then(|d| u8::try_from(d).ok());
        // `ADLP`, `RPLS`, `NVLS`: the power class is glued to the platform.
        if short != "ATS"
            && let Some(last) = short.chars().last().filter(|c| "PSNU".contains(*c))
        {
            short.pop();
            variant = Some(last.to_string());
        }
        let short = match short.as_str() {
            "PINEVIEW" => "PNV".to_string(),
            "IRONLAKE" => "ILK".to_string(),
            _ => short,
        };
        IntelName { short, variant, gt }
    }

    /// `ADL-S`, `TGL-GT2`, `DG2-G10`.
    fn codename(&self) -> String {
        let mut c = self.short.clone();
        if let Some(v) = &self.variant {
            c = format!("{c}-{v}");
        }
        if let Some(gt) = self.gt.filter(|g| *g != 0) {
            c = format!("{c}-GT{gt}");
        }
        c
    }
}

/// The variant at the start of `s` (after `_`), first of D, M<digits>, ULX, ULT, U, S, H,
/// G<digits>, XT that matches.
fn intel_variant(s: &str) -> Option<&str> {
    let digits = |from: usize| s[from..].bytes().take_while(u8::is_ascii_digit).count();
    if s.starts_with('D') {
        return Some(&s[..1]);
    }
    if s.starts_with('M') {
        return Some(&s[..1 + digits(1)]);
    }
    for v in ["ULX", "ULT", "U", "S", "H"] {
        if s.starts_with(v) {
            return Some(&s[..v.len()]);
        }
    }
    if s.starts_with('G') && digits(1) > 0 {
        return Some(&s[..1 + digits(1)]);
    }
    s.starts_with("XT").then(|| &s[..2])
}

/// gfxinfo's Intel architecture (the SoC's name, upper case without spaces).
fn intel_architecture(short: &str) -> Option<&'static str> {
    Some(match short {
        "I810" => "WHITNEY",
        "I815" => "SOLANO",
        "I830" => "ALMADOR",
        "I835" => "I835",
        "I845G" => "BROOKDALE",
        "I85X" => "MONTARA",
        "I865G" => "SPRINGDALE",
        "I915G" => "GRANTSDALE",
        "I915GM" => "ALVISO",
        "I945G" => "LAKEPORT",
        "I945GM" => "CALISTOGA",
        "I965G" => "BROADWATER",
        "G33" => "BEARLAKE",
        "I965GM" => "CRESTLINE",
        "GM45" => "CANTIGA",
        "G45" => "EAGLELAKE",
        "PNV" => "PINEVIEW",
        "ILK" => "IRONLAKE",
        "SNB" => "SANDYBRIDGE",
        "IVB" => "IVYBRIDGE",
        "HSW" => "HASWELL",
        "VLV" => "VALLEYVIEW",
        "BDW" => "BROADWELL",
        "CHV" => "CHERRYVIEW",
        "SKL" => "SKYLAKE",
        "BXT" => "BROXTON",
        "KBL" => "KABYLAKE",
        "AML" => "AMBERLAKE",
        "CML" => "COMETLAKE",
        "CFL" => "COFFEELAKE",
        "GLK" => "GEMINILAKE",
        "WHL" => "WHISKYLAKE",
        "CNL" => "CANNONLAKE",
        "ICL" => "ICELAKE",
        "EHL" => "ELKHARTLAKE",
        "JSL" => "JASPERLAKE",
        "TGL" => "TIGERLAKE",
        "RKL" => "ROCKETLAKE",
        "DG1" => "DG1",
        "ADL" => "ALDERLAKE",
        "RPL" => "RAPTORLAKE",
        "DG2" => "ALCHEMIST",
        "ATS" => "ARCTICSOUND",
        "ARL" => "ARROWLAKE",
        "MTL" => "METEORLAKE",
        "PVC" => "PONTEVECCHIO",
        "LNL" => "LUNARLAKE",
        "BMG" => "BATTLEMAGE",
        "PTL" => "PANTHERLAKE",
        "WCL" => "WILDCATLAKE",
        "NVL" => "NOVALAKE",
        "CRI" => "CRESCENTISLAND",
        _ => return None,
    })
}

/// gfxinfo's "gen" (graphics IP generation; 20 and 30 for Xe2 and Xe3).
fn intel_gen(short: &str) -> Option<u8> {
    Some(match short {
        "I810" | "I815" => 1,
        "I830" | "I835" | "I845G" | "I85X" | "I865G" => 2,
        "I915G" | "I915GM" | "I945G" | "I945GM" | "G33" | "PNV" => 3,
        "I965G" | "I965GM" | "GM45" | "G45" => 4,
        "ILK" => 5,
        "SNB" => 6,
        "IVB" | "HSW" | "VLV" => 7,
        "BDW" | "CHV" => 8,
        "SKL" | "BXT" | "KBL" | "AML" | "CML" | "CFL" | "GLK" | "WHL" => 9,
        "CNL" => 10,
        "ICL" | "EHL" | "JSL" => 11,
        "TGL" | "RKL" | "DG1" | "ADL" | "RPL" | "DG2" | "ATS" | "ARL" | "MTL" | "PVC" => 12,
        "LNL" | "BMG" => 20,
        "PTL" | "WCL" | "NVL" | "CRI" => 30,
        _ => return None,
    })
}

/// NVIDIA device id ranges → chip codename, first match wins (gfxinfo's `NvidiaGPU.codename`,
/// itself from techpowerup's GPU database; some ranges overlap on purpose).
const NVIDIA_CODENAMES: &[(u16, u16, &str)] = &[
    (0x0020, 0x0020, "NV04"),
    (0x0028, 0x0028, "NV05"),
    (0x0029, 0x0029, "NV05"),
    (0x002c, 0x002c, "NV05"),
    (0x002d, 0x002d, "NV05"),
    (0x00a0, 0x00a0, "NV0A"),
    (0x0100, 0x0100, "NV10"),
    (0x0101, 0x0101, "NV10"),
    (0x0103, 0x0103, "NV10"),
    (0x0110, 0x0110, "NV11"),
    (0x0111, 0x0111, "NV11"),
    (0x0112, 0x0112, "NV11"),
    (0x0113, 0x0113, "NV11"),
    (0x0150, 0x0150, "NV15"),
    (0x0151, 0x0151, "NV15"),
    (0x0152, 0x0152, "NV15"),
    (0x0153, 0x0153, "NV15"),
    (0x0170, 0x017d, "NV17"),
    (0x0181, 0x018c, "NV18"),
    (0x01a0, 0x01a0, "NV1A"),
    (0x01f0, 0x01f0, "NV1F"),
    (0x0200, 0x0200, "NV20"),
    (0x0201, 0x0201, "NV20"),
    (0x0202, 0x0202, "NV20"),
    (0x0203, 0x0203, "NV20"),
    (0x0250, 0x025b, "NV25"),
    (0x0280, 0x028c, "NV28"),
    (0x00fa, 0x00fa, "NV39"),
    (0x00fb, 0x00fb, "NV35"),
    (0x00fc, 0x00fc, "NV37"),
    (0x00fd, 0x00fd, "NV34"),
    (0x00fe, 0x00fe, "NV38"),
    (0x0301, 0x0301, "NV30"),
    (0x0302, 0x0302, "NV30"),
    (0x0308, 0x0308, "NV30"),
    (0x0309, 0x0309, "NV30"),
    (0x0311, 0x0311, "NV31"),
    (0x0312, 0x0312, "NV31"),
    (0x0314, 0x0314, "NV31"),
    (0x031a, 0x031a, "NV31"),
    (0x031b, 0x031b, "NV31"),
    (0x031c, 0x031c, "NV31"),
    (0x0320, 0x032d, "NV32"),
    (0x0330, 0x0330, "NV33"),
    (0x0331, 0x0331, "NV33"),
    (0x0332, 0x0332, "NV33"),
    (0x0333, 0x0333, "NV33"),
    (0x0334, 0x0334, "NV33"),
    (0x0338, 0x0338, "NV33"),
    (0x033f, 0x033f, "NV33"),
    (0x0341, 0x034e, "NV36"),
    (0x0040, 0x004e, "NV40"),
    (0x00f6, 0x00f6, "NV41"),
    (0x0218, 0x0218, "NV41"),
    (0x00c0, 0x00ce, "NV41"),
    (0x00f1, 0x00f1, "NV43"),
    (0x00f2, 0x00f2, "NV43"),
    (0x00f3, 0x00f3, "NV43"),
    (0x00f4, 0x00f4, "NV43"),
    (0x0140, 0x014f, "NV43"),
    (0x0221, 0x0221, "NV44"),
    (0x0222, 0x0222, "NV44"),
    (0x0160, 0x016a, "NV44"),
    (0x00f8, 0x00f8, "NV45"),
    (0x00f9, 0x00f9, "NV45"),
    (0x0211, 0x0211, "NV48"),
    (0x0212, 0x0212, "NV48"),
    (0x0215, 0x0215, "NV48"),
    (0x0218, 0x0218, "NV48"),
    (0x00f5, 0x00f5, "G70"),
    (0x0090, 0x009d, "G70"),
    (0x02e3, 0x02e3, "G71"),
    (0x02e4, 0x02e4, "G71"),
    (0x0290, 0x029f, "G71"),
    (0x01d0, 0x01df, "G72"),
    (0x02e0, 0x02e0, "G73"),
    (0x02e1, 0x02e1, "G73"),
    (0x02e2, 0x02e2, "G73"),
    (0x038b, 0x039e, "G73"),
    (0x0240, 0x0247, "MCP51"),
    (0x03d0, 0x03d0, "MCP61"),
    (0x03d1, 0x03d1, "MCP61"),
    (0x03d2, 0x03d2, "MCP61"),
    (0x03d5, 0x03d5, "MCP61"),
    (0x03d6, 0x03d6, "MCP68"),
    (0x053a, 0x053a, "MCP68"),
    (0x053b, 0x053b, "MCP68"),
    (0x053e, 0x053e, "MCP68"),
    (0x0531, 0x0531, "MCP67"),
    (0x0533, 0x0533, "MCP67"),
    (0x07e0, 0x07e5, "MCP73"),
    (0x0191, 0x019e, "G80"),
    (0x0400, 0x040f, "G84"),
    (0x0420, 0x042f, "G86"),
    (0x0410, 0x0410, "G92"),
    (0x0600, 0x061f, "G92"),
    (0x0621, 0x063a, "G94"),
    (0x0640, 0x065c, "G96"),
    (0x06e0, 0x06ff, "G98"),
    (0x0844, 0x0844, "MCP77"),
    (0x0845, 0x0845, "MCP77"),
    (0x0840, 0x0840, "MCP78"),
    (0x0846, 0x084f, "MCP78"),
    (0x0860, 0x087f, "MCP79"),
    (0x08a0, 0x08a5, "MCP89"),
    (0x05e0, 0x05ff, "GT200"),
    (0x0ca0, 0x0cbc, "GT215"),
    (0x0a20, 0x0a3c, "GT216"),
    (0x0a60, 0x0a7c, "GT218"),
    (0x10c0, 0x10d8, "GT218"),
    (0x06c0, 0x06df, "GF100"),
    (0x0e22, 0x0e3b, "GF104"),
    (0x0dd8, 0x0dd8, "GF106"),
    (0x0dda, 0x0dda, "GF106"),
    (0x0f00, 0x0f00, "GF108"),
    (0x0f01, 0x0f01, "GF108"),
    (0x0f02, 0x0f02, "GF108"),
    (0x0dc0, 0x0dd6, "GF108"),
    (0x0de0, 0x0dfc, "GF108"),
    (0x1080, 0x109b, "GF110"),
    (0x1200, 0x1213, "GF114"),
    (0x1241, 0x1251, "GF116"),
    (0x1140, 0x1140, "GF117"),
    (0x0f03, 0x0f03, "GF119"),
    (0x1040, 0x107d, "GF119"),
    (0x1180, 0x11bf, "GK104"),
    (0x11c0, 0x11fc, "GK106"),
    (0x0fc6, 0x0fff, "GK107"),
    (0x103a, 0x103a, "GK110"),
    (0x103c, 0x103c, "GK110"),
    (0x1001, 0x102a, "GK110"),
    (0x0fc9, 0x0fc9, "GK208"),
    (0x12b9, 0x12b9, "GK208"),
    (0x12ba, 0x12ba, "GK208"),
    (0x1280, 0x129a, "GK208"),
    (0x102d, 0x102d, "GK210"),
    (0x1340, 0x137d, "GM108"),
    (0x1380, 0x13bc, "GM107"),
    (0x1617, 0x1617, "GM204"),
    (0x1618, 0x1618, "GM204"),
    (0x1619, 0x1619, "GM204"),
    (0x161a, 0x161a, "GM204"),
    (0x1667, 0x1667, "GM204"),
    (0x13c0, 0x13fb, "GM204"),
    (0x1401, 0x1436, "GM206"),
    (0x174d, 0x174d, "GM108"),
    (0x174e, 0x174e, "GM108"),
    (0x179c, 0x179c, "GM108"),
    (0x17c2, 0x17c2, "GM200"),
    (0x17c8, 0x17c8, "GM200"),
    (0x17f0, 0x17f0, "GM200"),
    (0x17f1, 0x17f1, "GM200"),
    (0x17fd, 0x17fd, "GM200"),
    (0x15f0, 0x15f9, "GP100"),
    (0x1b00, 0x1b38, "GP102"),
    (0x1b80, 0x1be1, "GP104"),
    (0x1c02, 0x1c60, "GP106"),
    (0x1c02, 0x1c60, "GP107"),
    (0x1c61, 0x1c8f, "GP107"),
    (0x1c90, 0x1cfb, "GP107"),
    (0x1d01, 0x1d52, "GP108"),
    (0x1d81, 0x1df6, "GV100"),
    (0x1d81, 0x1e78, "TU102"),
    (0x1e81, 0x1ef5, "TU104"),
    (0x1f02, 0x1f76, "TU106"),
    (0x1f82, 0x1ff9, "TU117"),
    (0x20b0, 0x20fd, "GA100"),
    (0x2182, 0x21d1, "TU116"),
    (0x2203, 0x2238, "GA102"),
    (0x230e, 0x230e, "GH20"),
    (0x2329, 0x2329, "GH20"),
    (0x232c, 0x232c, "GH20"),
    (0x2321, 0x233b, "GH100"),
    (0x2342, 0x2348, "GH200"),
    (0x2482, 0x24fa, "GA104"),
    (0x2414, 0x2414, "GA103"),
    (0x2420, 0x2420, "GA103"),
    (0x2438, 0x2438, "GA103"),
    (0x2460, 0x2460, "GA103"),
    (0x2503, 0x2584, "GA106"),
    (0x25a0, 0x25fb, "GA107"),
    (0x2684, 0x26ba, "AD102"),
    (0x2702, 0x2770, "AD103"),
    (0x2782, 0x27fb, "AD104"),
    (0x2803, 0x2882, "AD106"),
    (0x28a0, 0x28f8, "AD107"),
    (0x2901, 0x2901, "GB100"),
    (0x2941, 0x2941, "GB200"),
    (0x29bb, 0x29bb, "P2021"),
    (0x2b85, 0x2bb9, "GB202"),
    (0x2c02, 0x2c79, "GB203"),
    (0x2e12, 0x2e12, "GB20A"),
    (0x2f04, 0x2f58, "GB205"),
    (0x2d04, 0x2df9, "GB206"),
    (0x3182, 0x3182, "B300"),
    (0x31c2, 0x31c2, "GB300"),
];

fn nvidia_codename(device: u16) -> Option<&'static str> {
    NVIDIA_CODENAMES
        .iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&device))
        .map(|(_, _, c)| *c)
}

/// Chip → architecture (nouveau's CodeNames page, as gfxinfo spells them).
fn nvidia_architecture(codename: &str) -> Option<&'static str> {
    Some(match codename {
        "NV04" | "NV05" | "NV0A" => "Fahrenheit",
        "NV10" | "NV11" | "NV15" | "NV17" | "NV18" | "NV1A" | "NV1F" => "Celcius",
        "NV20" | "NV25" | "NV28" | "NV2A" => "Kelvin",
        "NV30" | "NV31" | "NV32" | "NV33" | "NV34" | "NV35" | "NV36" | "NV37" | "NV38" | "NV39" => {
            "Rankine"
        }
        "NV40" | "NV41" | "NV42" | "NV43" | "NV44" | "NV45" | "NV48" | "G72" | "G70" | "G71"
        | "NV4A" | "G73" | "MCP51" | "MCP61" | "MCP67" | "MCP68" | "MCP73" => "Curie",
        "G80" | "G84" | "G86" | "G92" | "G94" | "G96" | "G98" | "GT200" | "GT215" | "GT216"
        | "GT218" | "MCP77" | "MCP78" | "MCP79" | "MCP7A" | "MCP89" => "Tesla",
        "GF100" | "GF108" | "GF106" | "GF104" | "GF110" | "GF114" | "GF116" | "GF117" | "GF119" => {
            "Fermi"
        }
        "GK104" | "GK106" | "GK107" | "GK110" | "GK208" | "GK210" | "GK20A" => "Kepler",
        "GM107" | "GM108" | "GM200" | "GM204" | "GM206" | "GM20B" => "Maxwell",
        "GP100" | "GP102" | "GP104" | "GP106" | "GP107" | "GP108" => "Pascal",
        "GV100" => "Volta",
        "TU102" | "TU104" | "TU106" | "TU116" | "TU117" => "Turing",
        "GA100" | "GA102" | "GA103" | "GA104" | "GA106" | "GA107" | "GA10B" => "Ampere",
        "GH20" | "GH100" | "GH200" => "Hopper",
        "AD102" | "AD103" | "AD104" | "AD106" | "AD107" => "Ada",
        "GB100" | "GB200" | "P2021" | "GB202" | "GB203" | "GB205" | "GB206" | "GB20A" | "B300"
        | "GB300" => "Blackwell",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intel_section_names_split_as_gfxinfo_splits_them() {
        // Expected values: gfxinfo 0.1.4's IntelGPU.codename for the same names.
        for (raw, codename) in [
            ("ADLS", "ADL-S"),
            ("RPLU", "RPL-U"),
            ("DG2_G10_D", "DG2-G10"),
            ("ATS_M150", "ATS-M150"),
            ("BDW_ULT_RSVD", "BDW-ULT"),
            ("CNL_PORT_F", "CNL"),
            ("PNV_G", "PNV"),
            ("KBL_ULT_GT2", "KBL-ULT-GT2"),
            ("AML_KBL_GT2", "AML"),
            ("CML_U_GT1", "CML-U-GT1"),
            ("SNB_D_GT1", "SNB-D-GT1"),
        ] {
            assert_eq!(IntelName::decode(raw).codename(), codename, "{raw}");
        }
        // Malformed names do not panic.
        for raw in ["", "_", "_GT", "P", "X_M", "X_G", "X_GT"] {
            let _ = IntelName::decode(raw).codename();
        }
    }

    #[test]
    fn lookups_follow_gfxinfo_fallbacks() {
        let id = |vendor, device, revision| PciId {
            vendor,
            device,
            revision,
        };
        // An AMD revision without its own row takes the device's revision-0 row.
        let navi21 = lookup(id(0x1002, 0x73bf, 0xc1)).unwrap();
        assert!(navi21.tags().contains("amdgpu:pciid:0x1002:0x73bf:0xc1"));
        let odd = lookup(id(0x1002, 0x1636, 0xfe)).unwrap();
        assert!(odd.tags().contains("amdgpu:pciid:0x1002:0x1636:0x0"));
        assert!(odd.older_tags().contains("amdgpu:gfxversion:gfx9"));
        assert!(odd.older_tags().contains("amdgpu:APU"));
        // Navi21 has no revision-0 row: an unlisted revision is unknown (gfxinfo too).
        assert_eq!(lookup(id(0x1002, 0x73bf, 0xfe)), None);
        // Not GPUs, or not in the tables.
        assert_eq!(lookup(id(0x1002, 0xab28, 0x00)), None);
        assert_eq!(lookup(id(0x1af4, 0x1041, 0x01)), None);
        assert_eq!(lookup(id(0x1234, 0x1111, 0x02)), None);
        // The tables are sorted (lookups binary-search them).
        assert!(
            gpu_ids::AMD
                .windows(2)
                .all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1))
        );
        assert!(gpu_ids::INTEL.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(gpu_ids::NVIDIA.windows(2).all(|w| w[0] < w[1]));
    }
}
