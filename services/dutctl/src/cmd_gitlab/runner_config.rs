//! `dutctl gitlab runner-config`: GitLab Runner's `config.toml` with one `[[runners]]` entry per
//! exposed machine (`limit = 1`, custom executor = this driver) plus one gateway runner.
//!
//! Tokens follow GitLab's runner-creation workflow: a runner (its description and tags) is
//! created in GitLab, which shows its authentication token (`glrt-…`); that token goes into the
//! token file given here. A machine without a token is left out and named on stderr with the
//! description and tags to create its runner with.
//!
//! Re-running is safe: entries are matched by machine id, keys the runner itself added (`id`,
//! `token_obtained_at`, …) and runners not managed by dutgate are kept, the output is
//! deterministic, and the file is only rewritten when its content changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use dutgate_core::ServiceName;
use dutgate_mars::model::{Machine, MachineState};
use serde::Deserialize;
use toml::{Table, Value};

use crate::gateway::Gateway;

#[derive(Args, Debug, Clone)]
pub struct RunnerConfigArgs {
    /// The GitLab instance, e.g. https://gitlab.example.com.
    #[arg(long = "gitlab-url")]
    gitlab_url: String,
    /// Runner authentication tokens (TOML): `gateway = "glrt-…"` and a `[machines]` table of
    /// `"<full name or MAC>" = "glrt-…"`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The config.toml to write (created or updated in place).
    #[arg(long = "config", default_value = "/etc/gitlab-runner/config.toml")]
    config_file: PathBuf,
    /// The dutctl the runners call (default: this one).
    #[arg(long)]
    dutctl: Option<PathBuf>,
    /// Scratch directory the driver uses (passed to every stage).
    #[arg(long)]
    scratch_dir: Option<PathBuf>,
    /// Gateway state dir the driver reads its endpoints and token from (default: the one this
    /// command uses, if any).
    #[arg(long)]
    driver_state_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    gateway: Option<String>,
    #[serde(default)]
    machines: BTreeMap<String, String>,
}

/// Machines that get a runner: those that can be `IDLE` (in service, trained), not retired,
/// quarantined or unconfigured.
pub fn exposed(m: &Machine) -> bool {
    matches!(
        m.state,
        MachineState::Idle | MachineState::Running | MachineState::QuickCheck
    )
}

/// `--machine <id>` in a runner's `config_args`: the machine a managed entry drives, or
/// `gateway` for the gateway runner; `None` for runners dutgate does not manage.
fn managed_key(runner: &Table) -> Option<String> {
    let args = runner
        .get("custom")?
        .as_table()?
        .get("config_args")?
        .as_array()?;
    let args: Vec<&str> = args.iter().filter_map(Value::as_str).collect();
    let pos = args.windows(2).position(|w| w == ["gitlab", "config"])?;
    let rest = &args[pos + 2..];
    if rest.contains(&"--gateway-only") {
        return Some("gateway".into());
    }
    rest.windows(2)
        .find(|w| w[0] == "--machine")
        .map(|w| w[1].to_string())
}

struct Spec {
    key: String,
    limit: i64,
    name: String,
    token: Option<String>,
    env: Vec<String>,
    driver_args: Vec<String>,
}

/// A machine left out for want of a token: its full name and tags.
pub type Missing = (String, Vec<String>);

pub struct Plan<'a> {
    pub gitlab_url: &'a str,
    pub dutctl: String,
    pub global_args: Vec<String>,
}

fn strs(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

impl Plan<'_> {
    fn entry(&self, existing: Option<&Table>, spec: &Spec) -> Option<Table> {
        let mut t = existing.cloned().unwrap_or_default();
        let token = spec.token.clone().or_else(|| {
            existing
                .and_then(|e| e.get("token"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })?;
        t.insert("name".into(), Value::String(spec.name.clone()));
        t.insert("url".into(), Value::String(self.gitlab_url.to_string()));
        t.insert("token".into(), Value::String(token));
        t.insert("executor".into(), Value::String("custom".into()));
        t.insert("limit".into(), Value::Integer(spec.limit));
        t.insert("environment".into(), strs(&spec.env));
        let mut custom = t
            .get("custom")
            .and_then(Value::as_table)
            .cloned()
            .unwrap_or_default();
        for stage in ["config", "prepare", "run", "cleanup"] {
            let mut args = self.global_args.clone();
            args.extend(["gitlab".to_string(), stage.to_string()]);
            args.extend(spec.driver_args.iter().cloned());
            custom.insert(format!("{stage}_exec"), Value::String(self.dutctl.clone()));
            custom.insert(format!("{stage}_args"), strs(&args));
        }
        t.insert("custom".into(), Value::Table(custom));
        Some(t)
    }
}

/// The new config.toml text from the old one and the machines; also the machines left out for
/// want of a token (full name, tags).
pub fn render(
    old: &str,
    plan: &Plan<'_>,
    machines: &[Machine],
    tokens: &TokenFileView,
    driver_args: &[String],
) -> anyhow::Result<(String, Vec<Missing>)> {
    let mut doc: Table = if old.trim().is_empty() {
        Table::new()
    } else {
        toml::from_str(old).context("the existing config.toml does not parse")?
    };
    let old_runners: Vec<Table> = match doc.remove("runners") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| match v {
                Value::Table(t) => Some(t),
                _ => None,
            })
            .collect(),
        Some(_) => bail!("the existing config.toml has a `runners` key that is not a list"),
    };
    let mut managed: BTreeMap<String, Table> = BTreeMap::new();
    let mut foreign = Vec::new();
    for r in old_runners {
        match managed_key(&r) {
            Some(k) => {
                managed.insert(k, r);
            }
            None => foreign.push(r),
        }
    }
    let extra_args = driver_args.to_vec();
    let mut sorted: Vec<&Machine> = machines.iter().filter(|m| exposed(m)).collect();
    sorted.sort_by(|a, b| a.full_name.cmp(&b.full_name).then(a.id.cmp(&b.id)));
    let mut specs = vec![Spec {
        key: "gateway".into(),
        // Its jobs only wait on the gateway: as many at once as there are machines.
        limit: (sorted.len() as i64).max(1),
        name: "dutgate-gateway".into(),
        token: tokens.gateway.clone(),
        env: vec![],
        driver_args: [vec!["--gateway-only".to_string()], extra_args.clone()].concat(),
    }];
    for m in sorted {
        let mut tags: Vec<String> = m.all_tags().map(|t| t.to_string()).collect();
        tags.sort();
        tags.dedup();
        let id = m.id.to_string();
        specs.push(Spec {
            key: id.clone(),
            limit: 1,
            name: m.full_name.clone(),
            token: tokens
                .machines
                .get(&m.full_name)
                .or_else(|| tokens.machines.get(&id))
                .cloned(),
            env: vec![
                format!("DUTGATE_MACHINE_ID={id}"),
                format!("DUTGATE_MACHINE_TAGS={}", tags.join(",")),
            ],
            driver_args: [vec!["--machine".to_string(), id], extra_args.clone()].concat(),
        });
    }
    let mut runners: Vec<Value> = foreign.into_iter().map(Value::Table).collect();
    let mut missing = Vec::new();
    for spec in &specs {
        match plan.entry(managed.get(&spec.key), spec) {
            Some(t) => runners.push(Value::Table(t)),
            None => {
                let tags = spec
                    .env
                    .iter()
                    .find_map(|e| e.strip_prefix("DUTGATE_MACHINE_TAGS="))
                    .map(|t| {
                        t.split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default();
                missing.push((spec.name.clone(), tags));
            }
        }
    }
    let n = runners.len() as i64;
    let concurrent = doc
        .get("concurrent")
        .and_then(Value::as_integer)
        .unwrap_or(0)
        .max(n)
        .max(1);
    doc.insert("concurrent".into(), Value::Integer(concurrent));
    doc.insert("runners".into(), Value::Array(runners));
    Ok((toml::to_string(&doc)?, missing))
}

/// The token file's content.
pub struct TokenFileView {
    pub gateway: Option<String>,
    pub machines: BTreeMap<String, String>,
}

fn read_tokens(path: Option<&Path>) -> anyhow::Result<TokenFileView> {
    let Some(p) = path else {
        return Ok(TokenFileView {
            gateway: None,
            machines: BTreeMap::new(),
        });
    };
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let t: TokenFile =
        toml::from_str(&text).with_context(|| format!("{} does not parse", p.display()))?;
    Ok(TokenFileView {
        gateway: t.gateway,
        machines: t.machines,
    })
}

pub async fn run(args: &RunnerConfigArgs, gw: &Gateway) -> anyhow::Result<()> {
    let tokens = read_tokens(args.token_file.as_deref())?;
    let mars = super::mars_client(gw);
    let machines = mars.machines().await.context("listing machines")?;
    let dutctl = match &args.dutctl {
        Some(p) => p.display().to_string(),
        None => std::env::current_exe()
            .context("cannot find this dutctl")?
            .display()
            .to_string(),
    };
    let mut global_args = vec![
        "--url".to_string(),
        gw.url(ServiceName::Executor).to_string(),
    ];
    let state_dir = args
        .driver_state_dir
        .clone()
        .or_else(|| super::env("DUTGATE_STATE_DIR").map(PathBuf::from));
    let mut driver_args = args
        .scratch_dir
        .as_ref()
        .map(|s| vec!["--scratch-dir".to_string(), s.display().to_string()])
        .unwrap_or_default();
    if let Some(d) = state_dir {
        global_args.extend(["--state-dir".to_string(), d.display().to_string()]);
        // The build script is the project's code: it gets the user token, never the admin one.
        let user = d.join("tokens").join("user");
        driver_args.extend(["--job-token-file".to_string(), user.display().to_string()]);
    }
    let plan = Plan {
        gitlab_url: &args.gitlab_url,
        dutctl,
        global_args,
    };
    let old = match std::fs::read_to_string(&args.config_file) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", args.config_file.display()));
        }
    };
    let (text, missing) = render(&old, &plan, &machines, &tokens, &driver_args)?;
    for (name, tags) in &missing {
        eprintln!(
            "dutctl: no runner token for {name}: create a runner in GitLab with description \
             {name:?} and tags [{}], put its token in the token file, run again",
            tags.join(", ")
        );
    }
    if text == old {
        eprintln!("{}: unchanged", args.config_file.display());
        return Ok(());
    }
    write_atomically(&args.config_file, &text)?;
    eprintln!("{}: written", args.config_file.display());
    Ok(())
}

/// Writes through a temporary file and a rename (gitlab-runner reloads the file when it
/// changes and must never read half of it); mode 0600, since it holds tokens.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
