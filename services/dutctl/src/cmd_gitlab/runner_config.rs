//! `dutctl gitlab runner-config`: GitLab Runner's `config.toml` with one `[[runners]]` entry per
//! exposed machine (`limit = 1`, custom executor = this driver) plus one gateway runner.
//!
//! Tokens follow GitLab's runner-creation workflow: a runner (its description and tags) is
//! created in GitLab, which shows its authentication token (`glrt-…`); that token goes into the
//! token file given here. A machine without a token is left out and named on stderr with the
//! description and tags to create its runner with.
//!
//! The build scripts of GitLab jobs are the projects' code: they get a dutgate token of role
//! `runner`, read by the driver from `--job-token-file` at each job, so the config names the
//! file and never holds the token. The driver itself works from that token alone (machine
//! look-ups, cancelling the jobs it owns): the config gives the driver the gateway's URL and
//! no state dir, so GitLab Runner needs to read its config, the job token file and the scratch
//! dir, never the gateway's state dir. The file must be the owner's alone and, when the
//! gateway's state dir is at hand (`--state-dir`), hold a runner token, not an admin's.
//!
//! The file is edited, not regenerated (`toml_edit`): the admin's comments, the order of keys
//! and tables, and runners not managed by dutgate stay byte for byte; a managed entry (matched
//! by machine id) is updated in place, keys the runner itself added (`id`,
//! `token_obtained_at`, …) are kept, new entries are appended, and the file is only rewritten
//! when its content changes, so a second run changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use dutgate_core::auth::{Role, TokenStore};
use dutgate_core::{Secret, ServiceName};
use dutgate_executor::client::ExecutorClient;
use dutgate_mars::model::{Machine, MachineState};
use serde::Deserialize;
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, TableLike, Value};

use crate::gateway::Gateway;

/// Where the messages suggest keeping the job token (beside GitLab Runner's own config).
const SUGGESTED_JOB_TOKEN_FILE: &str = "/etc/gitlab-runner/dutgate-job-token";

/// The mode bits that let someone else than the owner read or change a file.
const NOT_OWNER_ONLY: u32 = 0o077;

#[derive(Args, Debug, Clone)]
pub struct RunnerConfigArgs {
    /// The GitLab instance, e.g. https://gitlab.example.com.
    #[arg(long = "gitlab-url")]
    gitlab_url: String,
    /// Runner authentication tokens (TOML): `gateway = "glrt-…"` and a `[machines]` table of
    /// `"<full name or MAC>" = "glrt-…"`.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// File holding the dutgate token the jobs' build scripts get (`DUTGATE_TOKEN`): a token
    /// of role runner (`dutctl tokens create gitlab-ci --role runner`), mode 0600. Required.
    #[arg(long, value_name = "PATH")]
    job_token_file: Option<PathBuf>,
    /// The config.toml to write (created or updated in place).
    #[arg(long = "config", default_value = "/etc/gitlab-runner/config.toml")]
    config_file: PathBuf,
    /// The dutctl the runners call (default: this one).
    #[arg(long)]
    dutctl: Option<PathBuf>,
    /// Scratch directory the driver uses (passed to every stage).
    #[arg(long)]
    scratch_dir: Option<PathBuf>,
    /// Gateway state dir where the job token's role is checked (default: the global
    /// --state-dir/DUTGATE_STATE_DIR). The driver reads nothing there.
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
        .as_table_like()?
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

/// One runner dutgate manages: the gateway runner or a machine's.
struct Spec {
    key: String,
    limit: i64,
    name: String,
    /// The tags to create its runner in GitLab with (for the message when it has no token).
    tags: Vec<String>,
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
    Value::Array(v.iter().map(String::as_str).collect::<Array>())
}

/// Whether two values are the same TOML data, however each is written.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x.value() == y.value(),
        (Value::Integer(x), Value::Integer(y)) => x.value() == y.value(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, b)| same(a, b))
        }
        _ => false,
    }
}

/// Sets `key` to `want` in place: an equal value stays as written; a different one takes the
/// old one's decor (spacing, a comment after it); a new key goes last in its table.
fn set(t: &mut dyn TableLike, key: &str, want: Value) {
    if let Some(Item::Value(v)) = t.get_mut(key) {
        if !same(v, &want) {
            let decor = v.decor().clone();
            *v = want;
            *v.decor_mut() = decor;
        }
        return;
    }
    t.insert(key, Item::Value(want));
}

impl Plan<'_> {
    /// Writes `spec` into a runner's table, touching only the keys dutgate owns.
    fn update(&self, t: &mut Table, spec: &Spec, token: &str) {
        set(t, "name", Value::from(spec.name.as_str()));
        set(t, "url", Value::from(self.gitlab_url));
        set(t, "token", Value::from(token));
        set(t, "executor", Value::from("custom"));
        set(t, "limit", Value::from(spec.limit));
        set(t, "environment", strs(&spec.env));
        let custom = t
            .entry("custom")
            .or_insert_with(|| Item::Table(Table::new()));
        if !custom.is_table_like() {
            *custom = Item::Table(Table::new());
        }
        let Some(custom) = custom.as_table_like_mut() else {
            return;
        };
        for stage in ["config", "prepare", "run", "cleanup"] {
            let mut args = self.global_args.clone();
            args.extend(["gitlab".to_string(), stage.to_string()]);
            args.extend(spec.driver_args.iter().cloned());
            set(
                custom,
                &format!("{stage}_exec"),
                Value::from(self.dutctl.as_str()),
            );
            set(custom, &format!("{stage}_args"), strs(&args));
        }
    }
}

/// The runners dutgate manages: the gateway runner, then the exposed machines by full name.
fn specs(machines: &[Machine], tokens: &TokenFileView, driver_args: &[String]) -> Vec<Spec> {
    let mut sorted: Vec<&Machine> = machines.iter().filter(|m| exposed(m)).collect();
    sorted.sort_by(|a, b| a.full_name.cmp(&b.full_name).then(a.id.cmp(&b.id)));
    let mut specs = vec![Spec {
        key: "gateway".into(),
        // Its jobs only wait on the gateway: as many at once as there are machines.
        limit: i64::try_from(sorted.len()).unwrap_or(i64::MAX).max(1),
        name: "dutgate-gateway".into(),
        tags: vec!["dutgate-gateway".into()],
        token: tokens.gateway.clone(),
        env: vec![],
        driver_args: [vec!["--gateway-only".to_string()], driver_args.to_vec()].concat(),
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
            tags: [vec!["dutgate".to_string()], tags.clone()].concat(),
            token: tokens
                .machines
                .get(&m.full_name)
                .or_else(|| tokens.machines.get(&id))
                .cloned(),
            env: vec![
                format!("DUTGATE_MACHINE_ID={id}"),
                format!("DUTGATE_MACHINE_TAGS={}", tags.join(",")),
            ],
            driver_args: [vec!["--machine".to_string(), id], driver_args.to_vec()].concat(),
        });
    }
    specs
}

/// The new config.toml text from the old one and the machines; also the machines left out for
/// want of a token (full name, tags).
///
/// Runners dutgate does not manage, and everything outside `[[runners]]`, are not touched. A
/// managed entry is updated in place; one whose machine is no longer exposed (or a second
/// entry for the same machine) is removed; a new one is appended after the last runner.
pub fn render(
    old: &str,
    plan: &Plan<'_>,
    machines: &[Machine],
    tokens: &TokenFileView,
    driver_args: &[String],
) -> anyhow::Result<(String, Vec<Missing>)> {
    let mut doc: DocumentMut = old
        .parse()
        .context("the existing config.toml does not parse")?;
    let specs = specs(machines, tokens, driver_args);
    if !doc.contains_key("runners") {
        doc.insert("runners", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    let Some(runners) = doc
        .get_mut("runners")
        .and_then(Item::as_array_of_tables_mut)
    else {
        bail!(
            "the existing config.toml has a `runners` key that is not a list of [[runners]] tables"
        );
    };
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut i = 0;
    while let Some(t) = runners.get_mut(i) {
        let keep = match managed_key(t) {
            None => true,
            Some(key) if placed.contains(&key) => false,
            Some(key) => match specs.iter().find(|s| s.key == key) {
                None => false,
                Some(spec) => {
                    let token = spec
                        .token
                        .clone()
                        .or_else(|| t.get("token").and_then(Item::as_str).map(str::to_string));
                    match token {
                        Some(token) => {
                            plan.update(t, spec, &token);
                            placed.insert(key);
                            true
                        }
                        None => false,
                    }
                }
            },
        };
        if keep {
            i += 1;
        } else {
            runners.remove(i);
        }
    }
    for spec in &specs {
        if let (false, Some(token)) = (placed.contains(&spec.key), &spec.token) {
            let mut t = Table::new();
            plan.update(&mut t, spec, token);
            runners.push(t);
            placed.insert(spec.key.clone());
        }
    }
    let n = i64::try_from(runners.len()).unwrap_or(i64::MAX);
    let missing = specs
        .iter()
        .filter(|s| !placed.contains(&s.key))
        .map(|s| (s.name.clone(), s.tags.clone()))
        .collect();
    let concurrent = doc
        .get("concurrent")
        .and_then(Item::as_integer)
        .unwrap_or(0)
        .max(n)
        .max(1);
    set(doc.as_table_mut(), "concurrent", Value::from(concurrent));
    Ok((doc.to_string(), missing))
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

/// The suggested way to make a job token file: created 0600, the token alone in it.
fn create_command() -> String {
    format!(
        "(umask 077; dutctl tokens create gitlab-ci --role runner > {SUGGESTED_JOB_TOKEN_FILE})"
    )
}

/// The name and role of `token` on the gateway whose state dir is `dir`, when it is one of
/// its bootstrap tokens or in its token store.
fn local_identity(dir: &Path, token: &Secret) -> anyhow::Result<Option<(String, Role)>> {
    for (name, role) in [
        ("admin", Role::Admin),
        ("user", Role::User),
        ("service", Role::Service),
    ] {
        let file = dir.join("tokens").join(name);
        if dutgate_core::auth::read_token(&file).is_some_and(|t| t.matches(token.expose())) {
            return Ok(Some((name.to_string(), role)));
        }
    }
    let info = TokenStore::in_state_dir(dir).lookup(token.expose())?;
    Ok(info.map(|i| (i.name, i.role)))
}

/// The job token file, absolute (the driver runs wherever GitLab Runner starts it), after
/// checking it: the owner's alone, one token in it, of role runner where the gateway's state
/// dir tells, and accepted by the gateway. The token is never printed.
async fn check_job_token(
    given: Option<&Path>,
    state_dir: Option<&Path>,
    gw: &Gateway,
) -> anyhow::Result<PathBuf> {
    let Some(given) = given else {
        bail!(
            "--job-token-file is required: the file with the runner token the jobs' build \
             scripts get; create it with `{}`, then run again with --job-token-file {}",
            create_command(),
            SUGGESTED_JOB_TOKEN_FILE
        );
    };
    let path = std::fs::canonicalize(given)
        .with_context(|| format!("--job-token-file {}", given.display()))?;
    let shown = path.display();
    let meta = std::fs::metadata(&path).with_context(|| format!("--job-token-file {shown}"))?;
    if !meta.is_file() {
        bail!("--job-token-file {shown}: not a file");
    }
    let mode = meta.permissions().mode();
    if mode & NOT_OWNER_ONLY != 0 {
        bail!(
            "{shown}: holds a token but is readable by others (mode {:03o}): run chmod 600 {shown}",
            mode & 0o777
        );
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {shown}"))?;
    let token = text.trim();
    if token.is_empty() {
        bail!(
            "{shown}: empty; create the token with `{}`",
            create_command()
        );
    }
    if token.starts_with('{') || token.chars().any(char::is_whitespace) {
        bail!("{shown}: not a token alone (with `-o json`, keep only the token: `jq -r .token`)");
    }
    let token = Secret::new(token);
    if let Some(dir) = state_dir {
        match local_identity(dir, &token) {
            Ok(Some((name, role))) if role != Role::Runner => bail!(
                "{shown}: token {name:?} has role {role}, but the jobs' build scripts run the \
                 projects' code and get a runner token: create one with `{}` and give that file",
                create_command()
            ),
            Ok(_) => {}
            Err(e) => eprintln!(
                "dutctl: cannot check the role of the token in {shown} ({e:#}): only its validity \
                 is checked"
            ),
        }
    }
    let exec = ExecutorClient::new(gw.url(ServiceName::Executor), Some(token));
    if let Err(e) = exec.jobs(None, 1).await {
        // The error is rebuilt as text: the gateway refused this file's token, not the one
        // dutctl was given (which the 401 message of `main` would name).
        if e.status() == Some(reqwest::StatusCode::UNAUTHORIZED) {
            bail!("{shown}: the gateway refuses this token (unknown, revoked or expired): {e}");
        }
        return Err(anyhow!(
            "{shown}: cannot check the token with the gateway: {e}"
        ));
    }
    Ok(path)
}

/// `-o json|yaml` of `runner-config` (docs/dutctl.md).
#[derive(serde::Serialize)]
struct Outcome<'a> {
    config_file: &'a Path,
    /// The file was (re)written; `false`: it already said all this.
    changed: bool,
    /// Runners left out for want of a token in the token file.
    missing: Vec<MissingRunner<'a>>,
}

#[derive(serde::Serialize)]
struct MissingRunner<'a> {
    name: &'a str,
    tags: &'a [String],
}

pub async fn run(
    args: &RunnerConfigArgs,
    gw: &Gateway,
    format: crate::output::Format,
) -> anyhow::Result<()> {
    let tokens = read_tokens(args.token_file.as_deref())?;
    let state_dir = args
        .driver_state_dir
        .clone()
        .or_else(|| gw.state_dir().map(Path::to_path_buf))
        .map(|d| std::path::absolute(&d).unwrap_or(d));
    let job_token_file =
        check_job_token(args.job_token_file.as_deref(), state_dir.as_deref(), gw).await?;
    let mars = super::mars_client(gw);
    let machines = mars.machines().await.context("listing machines")?;
    let dutctl = match &args.dutctl {
        Some(p) => p.display().to_string(),
        None => std::env::current_exe()
            .context("cannot find this dutctl")?
            .display()
            .to_string(),
    };
    let global_args = vec![
        "--url".to_string(),
        gw.url(ServiceName::Executor).to_string(),
    ];
    // No `--state-dir`: the driver needs none (with `--url` its endpoints are not read either),
    // and with one GitLab Runner would have to read the gateway's files.
    let mut driver_args = args
        .scratch_dir
        .as_ref()
        .map(|s| vec!["--scratch-dir".to_string(), s.display().to_string()])
        .unwrap_or_default();
    // The build script is the project's code: it gets the runner token of this file (read by
    // the driver at each job), never the token the driver itself uses.
    driver_args.extend([
        "--job-token-file".to_string(),
        job_token_file.display().to_string(),
    ]);
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
    let changed = text != old;
    if changed {
        write_atomically(&args.config_file, &text)?;
    }
    if format == crate::output::Format::Text {
        let what = if changed { "written" } else { "unchanged" };
        eprintln!("{}: {what}", args.config_file.display());
    } else {
        let outcome = Outcome {
            config_file: &args.config_file,
            changed,
            missing: missing
                .iter()
                .map(|(name, tags)| MissingRunner {
                    name: name.as_ref(),
                    tags: tags.as_ref(),
                })
                .collect(),
        };
        crate::output::print(format, &outcome, |_| String::new());
    }
    Ok(())
}

/// Writes through a temporary file and a rename (gitlab-runner reloads the file when it
/// changes and must never read half of it); mode 0600, since it holds tokens. The temporary
/// file is created afresh (a stale one, or a link planted in its place, is removed first), so
/// the mode holds whatever was there.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("toml.tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
