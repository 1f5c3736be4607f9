//! Test and benchmark support: seeded OCI image layouts, and the real peers (Debian's
//! `docker-registry` and `skopeo`) started and driven the same way by the crate's tests and by
//! `cargo xtask bench registry`.
//!
//! Images are written as an OCI layout (`oci-layout`, `index.json`, `blobs/sha256/…`) so that
//! `skopeo copy oci:<dir>:<tag> docker://…` pushes them to an upstream. Layers are real tar
//! archives of one file of seeded random bytes, either plain or gzip-wrapped (stored deflate
//! blocks: valid gzip without spending time compressing incompressible data).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::reference::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub seed: u64,
    /// Size of the random file in each layer.
    pub layers: Vec<usize>,
    pub gzip: bool,
    pub architecture: String,
}

impl ImageSpec {
    pub fn new(seed: u64, layers: Vec<usize>, gzip: bool) -> Self {
        Self {
            seed,
            layers,
            gzip,
            architecture: "amd64".into(),
        }
    }
}

/// What was written: the digest `index.json` points at for the tag, and every blob.
#[derive(Debug, Clone)]
pub struct WrittenImage {
    pub top_digest: Digest,
    pub top_media_type: &'static str,
    /// Layer and config blobs (not manifests), digest and size.
    pub blobs: Vec<(Digest, u64)>,
}

impl WrittenImage {
    pub fn blob_bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, s)| s).sum()
    }
}

/// splitmix64: tiny, seedable, fast enough in debug builds.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A ustar archive holding one regular file.
fn tar_one_file(name: &str, content: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], off: usize, s: &[u8]| h[off..off + s.len()].copy_from_slice(s);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{:011o}\0", content.len()).as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        ");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    let padded = content.len().div_ceil(512) * 512;
    let mut out = Vec::with_capacity(512 + padded + 1024);
    out.extend_from_slice(&h);
    out.extend_from_slice(content);
    out.resize(512 + padded + 1024, 0);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// gzip with stored (uncompressed) deflate blocks.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 65535 * 5 + 32);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    let mut chunks = data.chunks(65535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(c) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn put_blob(dir: &Path, bytes: &[u8]) -> io::Result<(Digest, u64)> {
    let d = Digest::of(bytes);
    let path = dir.join("blobs").join("sha256").join(d.hex());
    std::fs::write(path, bytes)?;
    Ok((d, bytes.len() as u64))
}

fn descriptor(media_type: &str, d: &Digest, size: u64) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": d.to_string(), "size": size})
}

/// A blob's digest and size.
type Blob = (Digest, u64);

/// Writes one image manifest (and its blobs); returns the manifest and the other blobs.
fn write_image(dir: &Path, spec: &ImageSpec) -> io::Result<(Digest, u64, Vec<Blob>)> {
    let mut rng = Rng(spec.seed);
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut blobs = Vec::new();
    for (i, &size) in spec.layers.iter().enumerate() {
        let mut content = vec![0u8; size];
        rng.fill(&mut content);
        let tar = tar_one_file(&format!("layer{i}.bin"), &content);
        diff_ids.push(Digest::of(&tar).to_string());
        let (blob, media_type) = if spec.gzip {
            (gzip_stored(&tar), LAYER_TAR_GZIP)
        } else {
            (tar, LAYER_TAR)
        };
        let (d, s) = put_blob(dir, &blob)?;
        layers.push(descriptor(media_type, &d, s));
        blobs.push((d, s));
    }
    let config = serde_json::json!({
        "architecture": spec.architecture,
        "os": "linux",
        "config": {"Labels": {"dutgate.test.seed": spec.seed.to_string()}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = put_blob(dir, &serde_json::to_vec(&config).map_err(io::Error::other)?)?;
    blobs.push((cd.clone(), cs));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &cd, cs),
        "layers": layers,
    });
    let (md, ms) = put_blob(
        dir,
        &serde_json::to_vec(&manifest).map_err(io::Error::other)?,
    )?;
    Ok((md, ms, blobs))
}

fn write_index_json(
    dir: &Path,
    media_type: &str,
    d: &Digest,
    size: u64,
    tag: &str,
) -> io::Result<()> {
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut desc = descriptor(media_type, d, size);
    desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).map_err(io::Error::other)?,
    )
}

/// Writes an OCI layout at `dir` holding one image tagged `tag`. Blocking.
pub fn write_image_layout(dir: &Path, tag: &str, spec: &ImageSpec) -> io::Result<WrittenImage> {
    std::fs::create_dir_all(dir.join("blobs").join("sha256"))?;
    let (md, ms, blobs) = write_image(dir, spec)?;
    write_index_json(dir, OCI_MANIFEST, &md, ms, tag)?;
    Ok(WrittenImage {
        top_digest: md,
        top_media_type: OCI_MANIFEST,
        blobs,
    })
}

/// Writes an OCI layout at `dir` whose tag names an image index over `specs` (one platform
/// each, by their `architecture`). Blocking.
pub fn write_index_layout(dir: &Path, tag: &str, specs: &[ImageSpec]) -> io::Result<WrittenImage> {
    std::fs::create_dir_all(dir.join("blobs").join("sha256"))?;
    let mut manifests = Vec::new();
    let mut all = Vec::new();
    for spec in specs {
        let (md, ms, blobs) = write_image(dir, spec)?;
        let mut desc = descriptor(OCI_MANIFEST, &md, ms);
        desc["platform"] = serde_json::json!({"architecture": spec.architecture, "os": "linux"});
        manifests.push(desc);
        all.extend(blobs);
    }
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let (id, is) = put_blob(dir, &serde_json::to_vec(&index).map_err(io::Error::other)?)?;
    write_index_json(dir, OCI_INDEX, &id, is, tag)?;
    Ok(WrittenImage {
        top_digest: id,
        top_media_type: OCI_INDEX,
        blobs: all,
    })
}

/// The port of the first `listening on 127.0.0.1:<port>` line of a distribution log: the
/// registry prints the address it actually bound, so it can be told to bind port 0.
fn listening_port(log: &str) -> Option<u16> {
    log.lines().find_map(|l| {
        let rest = l.split("listening on 127.0.0.1:").nth(1)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

/// Debian's `docker-registry` (CNCF distribution 2.8) running as a child process.
pub struct DockerRegistry {
    child: Option<tokio::process::Child>,
    pub port: u16,
    pub log: PathBuf,
}

impl DockerRegistry {
    /// Starts a registry storing under `dir`; with `proxy_of`, in pull-through proxy mode.
    pub async fn start(dir: &Path, proxy_of: Option<&str>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let data = dir.join("data");
        let proxy = proxy_of
            .map(|u| format!("proxy:\n  remoteurl: {u}\n"))
            .unwrap_or_default();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
             cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: 127.0.0.1:0\n  secret: dutgate-test\n{proxy}",
            data.display()
        );
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("registry.log");
        // The log is appended to across restarts in one dir: only this start's lines count.
        let skip = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = tokio::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()?;
        let mut reg = Self {
            child: Some(child),
            port: 0,
            log,
        };
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if reg.port == 0 {
                let text = tokio::fs::read_to_string(&reg.log).await?;
                reg.port = listening_port(text.get(skip..).unwrap_or("")).unwrap_or(0);
            }
            if let Some(Ok(Some(status))) = reg.child.as_mut().map(|c| c.try_wait()) {
                return Err(io::Error::other(format!(
                    "docker-registry exited ({status}); see {}",
                    reg.log.display()
                )));
            }
            if reg.port != 0 {
                let r = http
                    .get(format!("{}/v2/", reg.url()))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status().is_success()) {
                    return Ok(reg);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(io::Error::other(format!(
            "docker-registry did not answer within 10 s; see {}",
            reg.log.display()
        )))
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Blob GETs for `repo` in the access log (distribution logs one line per request).
    pub fn blob_gets(&self, repo: &str) -> io::Result<usize> {
        let needle = format!("\"GET /v2/{repo}/blobs/sha256:");
        let text = std::fs::read_to_string(&self.log)?;
        Ok(text.lines().filter(|l| l.contains(&needle)).count())
    }

    /// Bytes of blob bodies sent for `repo`, from the access log's size column.
    pub fn blob_bytes_sent(&self, repo: &str) -> io::Result<u64> {
        let needle = format!("\"GET /v2/{repo}/blobs/sha256:");
        let text = std::fs::read_to_string(&self.log)?;
        Ok(text
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| {
                // `… "GET /v2/… HTTP/1.1" 200 12345 "referer" "agent"`
                let after = l.split("HTTP/1.1\" ").nth(1)?;
                after.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .sum())
    }

    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }
}

/// Runs `skopeo` with a time limit; a hang is an error, not a stuck test.
pub async fn skopeo(args: &[&str], limit: Duration) -> io::Result<std::process::Output> {
    let child = tokio::process::Command::new("skopeo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("skopeo {args:?} still running after {limit:?}"),
        )),
    }
}

/// Every regular file under `dir`, relative path → bytes' digest (to compare pulled images).
pub fn tree_digests(dir: &Path) -> io::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .map_err(io::Error::other)?
                    .display()
                    .to_string();
                out.insert(rel, Digest::of(&std::fs::read(&p)?).to_string());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_port_is_read_from_the_registry_log() {
        let log = "time=\"…\" level=info msg=\"redis not configured\"\n\
                   time=\"…\" level=info msg=\"listening on 127.0.0.1:45041\" go.version=go1.19.8\n";
        assert_eq!(listening_port(log), Some(45041));
        assert_eq!(listening_port("level=info msg=\"starting\"\n"), None);
    }

    #[test]
    fn gzip_and_tar_are_well_formed() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let tar = tar_one_file("a.bin", b"hello");
        assert_eq!(tar.len(), 512 * 4);
        assert_eq!(&tar[257..262], b"ustar");
        let gz = gzip_stored(&tar);
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        assert_eq!(gz.len(), 10 + 5 + tar.len() + 8);
        assert_eq!(gzip_stored(&[]).len(), 10 + 5 + 8);
    }

    #[test]
    fn layouts_are_deterministic() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let spec = ImageSpec::new(7, vec![1000, 2000], true);
        let wa = write_image_layout(a.path(), "t", &spec).unwrap();
        let wb = write_image_layout(b.path(), "t", &spec).unwrap();
        assert_eq!(wa.top_digest, wb.top_digest);
        assert_eq!(wa.blobs.len(), 3);
        let other =
            write_image_layout(b.path(), "u", &ImageSpec::new(8, vec![1000], false)).unwrap();
        assert_ne!(other.top_digest, wa.top_digest);
    }
}
