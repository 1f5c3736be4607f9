//! `dutctl` started as `mcli` (a symlink): the one MinIO client command ci-tron's
//! `executorctl -s DIR` runs once a job is over,
//!
//! ```text
//! mcli [--no-color] mirror [--overwrite] [--remove] ALIAS/BUCKET[/PREFIX] DIR
//! ```
//!
//! with the endpoint and keys of `ALIAS` in `MC_HOST_<ALIAS>` (`http://KEY:SECRET@host:port`),
//! as MinIO's `mc` reads them. Every object under the prefix is downloaded to `DIR/<key below
//! the prefix>`; `--overwrite` replaces existing files (without it they are kept);
//! `--remove` deletes the files of `DIR` that have no object. Errors are one line on stderr,
//! exit code 1. Anything else `mc` does is refused with a usage error (exit code 2).

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use dutgate_storage::S3Client;
use dutgate_storage::sigv4::Signer;

/// The name `executorctl` runs.
pub const NAME: &str = "mcli";

/// A control request (list) must answer within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A download fails when no byte moves for this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// When this process was started as `mcli`, runs it and returns its exit code.
pub fn run_if_invoked() -> Option<ExitCode> {
    let mut args = std::env::args_os();
    let argv0 = args.next()?;
    if Path::new(&argv0).file_name()? != NAME {
        return None;
    }
    let args: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    let mirror = match Mirror::parse(&args) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            eprintln!(
                "usage: {NAME} [--no-color] mirror [--overwrite] [--remove] ALIAS/BUCKET[/PREFIX] DIR"
            );
            return Some(ExitCode::from(2));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{NAME}: cannot start the async runtime: {e}");
            return Some(ExitCode::FAILURE);
        }
    };
    let env = |k: &str| std::env::var(k).ok();
    Some(match runtime.block_on(mirror.run(&env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{NAME}: {e:#}");
            ExitCode::FAILURE
        }
    })
}

/// `mirror`'s arguments.
#[derive(Debug, PartialEq, Eq)]
struct Mirror {
    alias: String,
    bucket: String,
    prefix: String,
    dir: PathBuf,
    overwrite: bool,
    remove: bool,
}

impl Mirror {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut args = args.iter().map(String::as_str).peekable();
        while args.next_if(|a| *a == "--no-color").is_some() {}
        match args.next() {
            Some("mirror") => {}
            Some(other) => bail!("only `mirror` is supported, not {other:?}"),
            None => bail!("no command"),
        }
        let (mut overwrite, mut remove) = (false, false);
        let mut positional = Vec::new();
        for a in args {
            match a {
                "--overwrite" => overwrite = true,
                "--remove" => remove = true,
                "--no-color" => {}
                flag if flag.starts_with('-') => bail!("mirror: unsupported option {flag:?}"),
                p => positional.push(p),
            }
        }
        let [source, dir] = positional[..] else {
            bail!("mirror takes a source ALIAS/BUCKET[/PREFIX] and a target directory");
        };
        let mut parts = source.splitn(3, '/');
        let (Some(alias), Some(bucket)) = (parts.next(), parts.next()) else {
            bail!("mirror: the source {source:?} is not ALIAS/BUCKET[/PREFIX]");
        };
        if alias.is_empty() || bucket.is_empty() {
            bail!("mirror: the source {source:?} is not ALIAS/BUCKET[/PREFIX]");
        }
        let prefix = parts.next().unwrap_or("").trim_matches('/');
        Ok(Self {
            alias: alias.to_string(),
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            dir: PathBuf::from(dir),
            overwrite,
            remove,
        })
    }

    async fn run(&self, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        let var = format!("MC_HOST_{}", self.alias);
        let host = env(&var)
            .with_context(|| format!("{var} is not set: the alias {:?} is unknown", self.alias))?;
        let host = Host::parse(&host).with_context(|| var.clone())?;
        let client = S3Client::new(
            &host.endpoint,
            Signer::new(&host.access_key, &host.secret_key, "us-east-1"),
            REQUEST_TIMEOUT,
            IDLE_TIMEOUT,
        )?;
        tokio::fs::create_dir_all(&self.dir)
            .await
            .with_context(|| format!("{}", self.dir.display()))?;
        let mut kept = BTreeSet::new();
        let (mut copied, mut skipped) = (0u64, 0u64);
        for o in client.list(&self.bucket).await? {
            let Some(rel) = o.key.strip_prefix(&self.prefix) else {
                continue;
            };
            // Directory markers hold no data.
            if rel.is_empty() || rel.ends_with('/') {
                continue;
            }
            let rel = inside(rel).with_context(|| format!("object {:?}", o.key))?;
            let path = self.dir.join(&rel);
            kept.insert(rel);
            if !self.overwrite && tokio::fs::try_exists(&path).await.unwrap_or(false) {
                skipped += 1;
                continue;
            }
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .with_context(|| format!("{}", parent.display()))?;
            }
            let n = client
                .get(&self.bucket, &o.key)
                .await?
                .write_to(&path)
                .await?;
            println!(
                "`{}/{}/{}` -> `{}` ({n} bytes)",
                self.alias,
                self.bucket,
                o.key,
                path.display()
            );
            copied += 1;
        }
        let removed = if self.remove {
            let dir = self.dir.clone();
            tokio::task::spawn_blocking(move || remove_others(&dir, &kept)).await??
        } else {
            0
        };
        println!("{copied} object(s) copied, {skipped} kept, {removed} local file(s) removed");
        Ok(())
    }
}

/// `MC_HOST_<alias>`: `http[s]://KEY:SECRET@host[:port][/]`.
#[derive(Debug, PartialEq, Eq)]
struct Host {
    endpoint: String,
    access_key: String,
    secret_key: String,
}

impl Host {
    fn parse(value: &str) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(value)
            .map_err(|e| anyhow::anyhow!("not a URL (http://KEY:SECRET@host:port): {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            bail!("the scheme must be http or https, not {}", url.scheme());
        }
        let decode = |s: &str| {
            dutgate_core::http::decode_component(s)
                .ok_or_else(|| anyhow::anyhow!("bad percent-encoding in the keys"))
        };
        let access_key = decode(url.username())?;
        let secret_key = decode(url.password().unwrap_or(""))?;
        if access_key.is_empty() || secret_key.is_empty() {
            bail!("the URL carries no KEY:SECRET");
        }
        let host = url.host_str().context("the URL has no host")?;
        let endpoint = match url.port() {
            Some(p) => format!("{}://{host}:{p}", url.scheme()),
            None => format!("{}://{host}", url.scheme()),
        };
        Ok(Self {
            endpoint,
            access_key,
            secret_key,
        })
    }
}

/// An object key as a relative path that stays inside the target directory.
fn inside(key: &str) -> anyhow::Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(key).components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => bail!("the key would leave the target directory"),
        }
    }
    if out.as_os_str().is_empty() {
        bail!("the key names no file");
    }
    Ok(out)
}

/// Deletes the files under `dir` whose path (relative to `dir`) is not in `kept`. Links are
/// removed as files, never followed. Blocking.
fn remove_others(dir: &Path, kept: &BTreeSet<PathBuf>) -> anyhow::Result<u64> {
    let mut removed = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let entry = entry.with_context(|| format!("{}", d.display()))?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                pending.push(path);
                continue;
            }
            let rel = path.strip_prefix(dir).unwrap_or(&path).to_path_buf();
            if !kept.contains(&rel) {
                std::fs::remove_file(&path).with_context(|| format!("{}", path.display()))?;
                println!("removed `{}`", path.display());
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn executorctls_command_line() {
        let m = Mirror::parse(&args(
            "--no-color mirror --overwrite --remove client/job-4-client /tmp/share",
        ))
        .unwrap();
        assert_eq!(
            m,
            Mirror {
                alias: "client".into(),
                bucket: "job-4-client".into(),
                prefix: String::new(),
                dir: "/tmp/share".into(),
                overwrite: true,
                remove: true,
            }
        );
        assert_eq!(
            Mirror::parse(&args("mirror a/b/c/ d")).unwrap().prefix,
            "c/"
        );
        assert!(Mirror::parse(&args("cp a/b d")).is_err());
        assert!(Mirror::parse(&args("mirror --watch a/b d")).is_err());
        assert!(Mirror::parse(&args("mirror a d")).is_err());
        assert!(Mirror::parse(&args("mirror a/b")).is_err());
    }

    #[test]
    fn mc_host() {
        let h = Host::parse("http://DGRDKEY:s%2Fcret@127.0.0.1:9000/").unwrap();
        assert_eq!(
            h,
            Host {
                endpoint: "http://127.0.0.1:9000".into(),
                access_key: "DGRDKEY".into(),
                secret_key: "s/cret".into(),
            }
        );
        assert!(Host::parse("http://127.0.0.1:9000").is_err());
        assert!(Host::parse("ftp://a:b@h").is_err());
    }

    #[test]
    fn keys_stay_inside() {
        assert_eq!(inside("a/b.txt").unwrap(), PathBuf::from("a/b.txt"));
        assert!(inside("../x").is_err());
        assert!(inside("/etc/x").is_err());
        assert!(inside("").is_err());
    }

    #[test]
    fn remove_keeps_what_the_bucket_has() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("keep.txt"), "k").unwrap();
        std::fs::write(dir.path().join("sub/gone.txt"), "g").unwrap();
        let kept = BTreeSet::from([PathBuf::from("keep.txt")]);
        assert_eq!(remove_others(dir.path(), &kept).unwrap(), 1);
        assert!(dir.path().join("keep.txt").exists());
        assert!(!dir.path().join("sub/gone.txt").exists());
    }
}
