//! The normalised job description (valve-infra/ci-tron v1) and how it is read from the YAML
//! tree: defaults applied, durations summed, regexes compiled, `continue` resolved against
//! `start`. Reading never stops at the first problem: every field is checked and every error is
//! collected, each with its field path and position.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use dutgate_core::{MachineId, Tag};
use regex::bytes::{Regex, RegexBuilder};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{JobError, JobErrorKind, JobErrors, Location};
use crate::template::{self, MAX_JOB_BYTES, SourceMap, TemplateVars};
use crate::yaml::{self, Node, Value};

/// valve-infra's default end-of-session pattern: the kernel's power-down message.
pub const DEFAULT_SESSION_END: &str = r"^\[[\d \.]{12}\] reboot: Power Down$";
/// Default `overall` budget.
pub const DEFAULT_OVERALL: Duration = Duration::from_secs(6 * 3600);
/// Default `infra_teardown` budget.
pub const DEFAULT_INFRA_TEARDOWN: Duration = Duration::from_secs(10 * 60);
/// Watchdogs a job may define: each costs three regexes per console line, and a job has a
/// handful at most.
pub const MAX_WATCHDOGS: usize = 64;
/// Compiled size limit of one console pattern: console regexes are small; this only stops a
/// pathological pattern from eating memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// valve-infra's literal placeholder for the machine a job runs on (`target: {id:
/// machine_id}`), rendered as `{{ machine_id }}` is.
const MACHINE_ID_PLACEHOLDER: &str = "machine_id";

/// The variable holding the kernel a deployment without `kernel.url` boots.
pub const DEFAULT_KERNEL_VAR: &str = "dut_kernel_url";
/// The variable holding the initramfs booted with that default kernel.
pub const DEFAULT_INITRAMFS_VAR: &str = "dut_initramfs_url";

/// A job description, validated and normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Always 1 (the only format version).
    pub version: u32,
    /// Queued jobs expire at this instant; `None` means never.
    pub deadline: Option<OffsetDateTime>,
    pub target: Target,
    pub timeouts: Timeouts,
    pub console_patterns: ConsolePatterns,
    pub deployment: Deployment,
}

/// Which machine may run the job: the one with `id`, and/or any machine whose tags include all
/// of `tags`. No id and no tags means any machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub id: Option<MachineId>,
    pub tags: Vec<Tag>,
}

/// A time budget. `duration: None` is infinite. When it expires and `retries` are left, the
/// executor power-cycles the machine into the `continue` deployment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeout {
    pub duration: Option<Duration>,
    pub retries: u32,
}

impl Timeout {
    pub const INFINITE: Timeout = Timeout {
        duration: None,
        retries: 0,
    };

    pub const fn new(duration: Duration, retries: u32) -> Self {
        Self {
            duration: Some(duration),
            retries,
        }
    }

    pub fn is_infinite(&self) -> bool {
        self.duration.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole job (default 6 h; never retried).
    pub overall: Timeout,
    /// Preparing the job before the first boot (default infinite).
    pub infra_setup: Timeout,
    /// Power-off, artifact collection and release after the session (default 10 min; never
    /// retried).
    pub infra_teardown: Timeout,
    /// One boot, from power-on to `session_end` (default infinite).
    pub boot_cycle: Timeout,
    /// Silence on the console once it has spoken (default infinite).
    pub console_activity: Timeout,
    /// Silence from power-on to the first console line (default infinite).
    pub first_console_activity: Timeout,
    /// Named watchdogs, armed by `console_patterns.watchdogs.<name>`.
    pub watchdogs: BTreeMap<String, Timeout>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            overall: Timeout::new(DEFAULT_OVERALL, 0),
            infra_setup: Timeout::INFINITE,
            infra_teardown: Timeout::new(DEFAULT_INFRA_TEARDOWN, 0),
            boot_cycle: Timeout::INFINITE,
            console_activity: Timeout::INFINITE,
            first_console_activity: Timeout::INFINITE,
            watchdogs: BTreeMap::new(),
        }
    }
}

/// A console pattern: a regex searched in every console line, as bytes.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

impl Pattern {
    /// Compiles a pattern with the semantics of valve-infra's `re.compile(regex.encode())`:
    /// classes like `\d` and `.` work on bytes (ASCII), so console garbage never stops a match.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let regex = RegexBuilder::new(source)
            .unicode(false)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()?;
        Ok(Self {
            source: source.to_string(),
            regex,
        })
    }

    /// The regex as written in the job.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn regex(&self) -> &Regex {
        &self.regex
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pattern").field(&self.source).finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WatchdogPatterns {
    pub start: Pattern,
    pub reset: Pattern,
    pub stop: Pattern,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsolePatterns {
    pub session_end: Pattern,
    pub session_reboot: Option<Pattern>,
    pub job_success: Option<Pattern>,
    pub job_warn: Option<Pattern>,
    pub machine_unfit_for_service: Option<Pattern>,
    pub watchdogs: BTreeMap<String, WatchdogPatterns>,
}

impl Default for ConsolePatterns {
    fn default() -> Self {
        Self {
            session_end: default_session_end(),
            session_reboot: None,
            job_success: None,
            job_warn: None,
            machine_unfit_for_service: None,
            watchdogs: BTreeMap::new(),
        }
    }
}

fn default_session_end() -> Pattern {
    // A constant, valid pattern: compiling it cannot fail.
    #[allow(clippy::expect_used)]
    Pattern::new(DEFAULT_SESSION_END).expect("the default session_end pattern compiles")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    pub url: String,
    /// The kernel command line; a list in the job is joined with spaces.
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initramfs {
    pub url: String,
}

/// What to boot: a kernel, its command line and an optional initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentState {
    pub kernel: Kernel,
    pub initramfs: Option<Initramfs>,
}

/// The first boot's deployment and the one every later boot uses; `continue` has already been
/// completed field by field from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    pub start: DeploymentState,
    pub r#continue: DeploymentState,
}

/// How a boot starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    /// The first boot of the job.
    Start,
    /// Any later boot (after `session_reboot` or an expired timeout with retries left).
    Continue,
}

impl JobSpec {
    /// Renders `text` as a Jinja2 template with `vars`, then parses and validates the result.
    /// Error positions are in `text` as submitted.
    pub fn parse_and_render(text: &str, vars: &TemplateVars) -> Result<JobSpec, JobErrors> {
        check_size(text)?;
        let rendered = template::render(text, vars).map_err(JobErrors::single)?;
        let defaults = Defaults {
            machine_id: vars.machine.as_ref().map(|m| m.id.clone()),
            kernel_url: vars.extra.get(DEFAULT_KERNEL_VAR).cloned(),
            initramfs_url: vars.extra.get(DEFAULT_INITRAMFS_VAR).cloned(),
        };
        match parse_rendered(&rendered, defaults) {
            Ok(spec) => Ok(spec),
            Err(mut errors) if rendered.as_ref() != text => {
                let map = SourceMap::new(text, &rendered);
                for e in &mut errors.0 {
                    e.location = e.location.map(|l| map.map(l));
                }
                Err(errors)
            }
            Err(errors) => Err(errors),
        }
    }

    /// Parses an already rendered job (no template processing).
    pub fn parse(text: &str) -> Result<JobSpec, JobErrors> {
        check_size(text)?;
        parse_rendered(text, Defaults::default())
    }

    /// The deployment of boot number `boot_index` (0 is the first boot).
    pub fn deployment_for(&self, boot_index: u32) -> (BootKind, &DeploymentState) {
        if boot_index == 0 {
            (BootKind::Start, &self.deployment.start)
        } else {
            (BootKind::Continue, &self.deployment.r#continue)
        }
    }
}

/// Renders `text` without parsing it (what `dutctl job validate` shows when asked).
pub fn render(text: &str, vars: &TemplateVars) -> Result<String, JobErrors> {
    check_size(text)?;
    template::render(text, vars)
        .map(|c| c.into_owned())
        .map_err(JobErrors::single)
}

fn check_size(text: &str) -> Result<(), JobErrors> {
    if text.len() > MAX_JOB_BYTES {
        return Err(JobErrors::single(JobError::new(
            JobErrorKind::TooLarge,
            "",
            format!("a job is at most {MAX_JOB_BYTES} bytes long"),
            None,
        )));
    }
    Ok(())
}

/// What a rendered job leaves to the machine and the gateway, as valve-infra's executor did.
#[derive(Debug, Default)]
struct Defaults {
    /// What valve-infra's literal `target.id: machine_id` means: the machine the job is
    /// rendered for (its own templates, e.g. `interactive.yml.j2`, are written so and
    /// submitted with `executorctl -i`). `None` when the job is parsed without a machine.
    machine_id: Option<String>,
    /// The kernel booted when `deployment.start.kernel` names none (valve-infra booted its
    /// default boot2container kernel and initramfs; here, the `dut_kernel_url` variable).
    kernel_url: Option<String>,
    /// The initramfs booted with the default kernel (`dut_initramfs_url`).
    initramfs_url: Option<String>,
}

fn parse_rendered(text: &str, defaults: Defaults) -> Result<JobSpec, JobErrors> {
    let root = yaml::parse(text).map_err(|e| {
        JobErrors::single(JobError::new(
            JobErrorKind::Yaml,
            "",
            format!("invalid YAML: {}", e.message),
            Some(e.loc),
        ))
    })?;
    let mut r = Reader {
        errors: Vec::new(),
        defaults,
    };
    let spec = r.job(&root);
    match spec {
        Some(spec) if r.errors.is_empty() => Ok(spec),
        _ => {
            let mut errors = r.errors;
            // Text order; errors without a position last.
            errors.sort_by_key(|e| {
                e.location
                    .map_or((usize::MAX, usize::MAX), |l| (l.line, l.column))
            });
            Err(JobErrors(errors))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the tree

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Fields of ci-tron's richer format that dutgate does not implement: named so the error says
/// so, rather than calling them typos.
const CI_TRON_EXTENSIONS: &[&str] = &[
    "proxy",
    "firmware_boot",
    "dtb",
    "storage",
    "fastboot",
    "dhcp",
    "data",
    "archive",
    "format",
];

struct Fields<'n> {
    loc: Location,
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Fields<'n> {
    /// The value of `name`; a null value counts as absent (`timeouts:` with nothing under it).
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .filter(|v| v.value != Value::Null)
    }
}

struct Reader {
    errors: Vec<JobError>,
    defaults: Defaults,
}

impl Reader {
    fn error(&mut self, kind: JobErrorKind, path: &str, message: impl Into<String>, loc: Location) {
        self.errors
            .push(JobError::new(kind, path, message, Some(loc)));
    }

    fn type_error(&mut self, path: &str, expected: &str, node: &Node) {
        self.error(
            JobErrorKind::InvalidType,
            path,
            format!("expected {expected}, found {}", describe(node)),
            node.loc,
        );
    }

    fn missing(&mut self, path: &str, parent: Location) {
        self.error(
            JobErrorKind::MissingField,
            path,
            "missing required field",
            parent,
        );
    }

    /// Reads a mapping whose keys must all be in `known`. `None` if it is not a mapping.
    fn mapping<'n>(&mut self, node: &'n Node, path: &str, known: &[&str]) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            self.type_error(path, "a mapping", node);
            return None;
        };
        let mut fields = Fields {
            loc: node.loc,
            entries: Vec::with_capacity(entries.len()),
        };
        for (k, v) in entries {
            let Some(key) = k.as_key() else {
                self.error(
                    JobErrorKind::InvalidType,
                    path,
                    format!("keys must be plain strings, found {}", k.kind_name()),
                    k.loc,
                );
                continue;
            };
            let field_path = join(path, key);
            if !known.contains(&key) {
                let mut msg = format!("unknown field `{key}`");
                if CI_TRON_EXTENSIONS.contains(&key) {
                    msg.push_str(" (a ci-tron extension dutgate does not support)");
                } else if let Some(s) = suggest(key, known) {
                    msg.push_str(&format!(", did you mean `{s}`?"));
                } else {
                    msg.push_str(&format!(", expected one of: {}", known.join(", ")));
                }
                self.error(JobErrorKind::UnknownField, &field_path, msg, k.loc);
                continue;
            }
            if let Some((_, first)) = fields.entries.iter().find(|(n, _)| *n == key) {
                let first = first.loc;
                self.error(
                    JobErrorKind::InvalidValue,
                    &field_path,
                    format!("duplicate field (first given at {first})"),
                    k.loc,
                );
                continue;
            }
            fields.entries.push((key, v));
        }
        Some(fields)
    }

    /// A mapping of user-chosen names (watchdogs) to values, at most [`MAX_WATCHDOGS`].
    fn named<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(String, &'n Node)> {
        let Value::Map(entries) = &node.value else {
            self.type_error(path, "a mapping of names", node);
            return Vec::new();
        };
        let mut out: Vec<(String, &Node)> = Vec::new();
        let mut seen = HashSet::new();
        for (k, v) in entries {
            match k.as_key() {
                Some(_) if out.len() >= MAX_WATCHDOGS => {
                    self.error(
                        JobErrorKind::InvalidValue,
                        path,
                        format!("at most {MAX_WATCHDOGS} watchdogs"),
                        k.loc,
                    );
                    break;
                }
                Some(name) if !name.is_empty() => {
                    if !seen.insert(name) {
                        self.error(
                            JobErrorKind::InvalidValue,
                            &join(path, name),
                            "duplicate name",
                            k.loc,
                        );
                    } else {
                        out.push((name.to_string(), v));
                    }
                }
                _ => self.error(
                    JobErrorKind::InvalidType,
                    path,
                    "names must be non-empty strings",
                    k.loc,
                ),
            }
        }
        out
    }

    fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.type_error(path, "a string", node);
                None
            }
        }
    }

    /// An integer written as one (valve-infra's strict int: `"3"` and `3.0` are refused).
    fn integer(&mut self, node: &Node, path: &str) -> Option<i64> {
        if let Value::Scalar {
            text,
            quoted: false,
        } = &node.value
        {
            let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                return match text.parse::<i64>() {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.error(
                            JobErrorKind::InvalidValue,
                            path,
                            "integer out of range",
                            node.loc,
                        );
                        None
                    }
                };
            }
        }
        self.type_error(path, "an integer", node);
        None
    }

    /// A finite number (marshmallow's Float also takes numeric strings, so do we).
    fn number(&mut self, node: &Node, path: &str) -> Option<f64> {
        if let Value::Scalar { text, .. } = &node.value {
            let t = text.trim();
            let numeric = t
                .bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
            if numeric && let Ok(v) = t.parse::<f64>() {
                if v.is_finite() {
                    return Some(v);
                }
                self.error(
                    JobErrorKind::InvalidValue,
                    path,
                    "the number must be finite",
                    node.loc,
                );
                return None;
            }
        }
        self.type_error(path, "a number", node);
        None
    }

    fn url(&mut self, node: &Node, path: &str) -> Option<String> {
        let url = self.string(node, path)?;
        let lower = url.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("http://")
            .or_else(|| lower.strip_prefix("https://"));
        match rest {
            Some(rest) if !rest.is_empty() && !url.chars().any(char::is_whitespace) => Some(url),
            _ => {
                self.error(
                    JobErrorKind::InvalidValue,
                    path,
                    format!(
                        "expected an http:// or https:// URL, found {:?}",
                        clip(&url)
                    ),
                    node.loc,
                );
                None
            }
        }
    }

    // --- the schema, top-down --------------------------------------------------------------

    fn job(&mut self, root: &Node) -> Option<JobSpec> {
        if root.value == Value::Null {
            self.error(JobErrorKind::MissingField, "", "the job is empty", root.loc);
            return None;
        }
        let f = self.mapping(
            root,
            "",
            &[
                "version",
                "deadline",
                "target",
                "timeouts",
                "console_patterns",
                "deployment",
            ],
        )?;
        let version = match f.get("version") {
            None => Some(1),
            Some(n) => match self.integer(n, "version") {
                Some(1) => Some(1),
                Some(v) => {
                    self.error(
                        JobErrorKind::InvalidValue,
                        "version",
                        format!("unsupported version {v}: this is format version 1"),
                        n.loc,
                    );
                    None
                }
                None => None,
            },
        };
        let deadline = f.get("deadline").map(|n| self.deadline(n));
        let target = f.get("target").map(|n| self.target(n));
        let timeouts = match f.get("timeouts") {
            Some(n) => self.timeouts(n),
            None => Some(Timeouts::default()),
        };
        let console_patterns = match f.get("console_patterns") {
            Some(n) => self.console_patterns(n),
            None => Some(ConsolePatterns::default()),
        };
        let deployment = match f.get("deployment") {
            Some(n) => self.deployment(n),
            None => {
                self.missing("deployment", f.loc);
                None
            }
        };
        Some(JobSpec {
            version: version?,
            deadline: deadline.unwrap_or(Some(None))?,
            target: target.unwrap_or(Some(Target::default()))?,
            timeouts: timeouts?,
            console_patterns: console_patterns?,
            deployment: deployment?,
        })
    }

    fn deadline(&mut self, node: &Node) -> Option<Option<OffsetDateTime>> {
        let text = self.string(node, "deadline")?;
        match parse_datetime(&text) {
            Some(t) => Some(Some(t)),
            None => {
                self.error(
                    JobErrorKind::InvalidValue,
                    "deadline",
                    format!(
                        "expected an ISO 8601 date and time like 2026-11-22T18:00:00Z, found {:?}",
                        clip(&text)
                    ),
                    node.loc,
                );
                None
            }
        }
    }

    fn target(&mut self, node: &Node) -> Option<Target> {
        let f = self.mapping(node, "target", &["id", "tags"])?;
        let mut ok = true;
        let id = match f.get("id") {
            None => None,
            Some(n) => match self.string(n, "target.id").map(|s| {
                match (s.as_str(), &self.defaults.machine_id) {
                    (MACHINE_ID_PLACEHOLDER, Some(id)) => MachineId::parse(id),
                    _ => MachineId::parse(&s),
                }
            }) {
                Some(Ok(id)) => Some(id),
                Some(Err(e)) => {
                    self.error(
                        JobErrorKind::InvalidValue,
                        "target.id",
                        e.to_string(),
                        n.loc,
                    );
                    ok = false;
                    None
                }
                None => {
                    ok = false;
                    None
                }
            },
        };
        let tags_node = f.get("tags");
        let mut tags = Vec::new();
        if let Some(n) = tags_node {
            match &n.value {
                Value::Seq(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let path = format!("target.tags[{i}]");
                        match self.string(item, &path).map(|s| Tag::parse(&s)) {
                            Some(Ok(t)) => tags.push(t),
                            Some(Err(e)) => {
                                self.error(
                                    JobErrorKind::InvalidValue,
                                    &path,
                                    e.to_string(),
                                    item.loc,
                                );
                                ok = false;
                            }
                            None => ok = false,
                        }
                    }
                }
                _ => {
                    self.type_error("target.tags", "a list of tags", n);
                    ok = false;
                }
            }
        }
        if f.get("id").is_none() && tags_node.is_none() {
            self.error(
                JobErrorKind::MissingField,
                "target",
                "a target needs `id` or `tags` (`tags: []` means any machine)",
                f.loc,
            );
            ok = false;
        }
        ok.then_some(Target { id, tags })
    }

    /// One timeout; also returns where `retries` was written, for the `overall` check.
    fn timeout(&mut self, node: &Node, path: &str) -> Option<(Timeout, Option<Location>)> {
        const UNITS: [(&str, f64); 5] = [
            ("days", 86_400e9),
            ("hours", 3_600e9),
            ("minutes", 60e9),
            ("seconds", 1e9),
            ("milliseconds", 1e6),
        ];
        let f = self.mapping(
            node,
            path,
            &[
                "days",
                "hours",
                "minutes",
                "seconds",
                "milliseconds",
                "retries",
            ],
        )?;
        let mut ok = true;
        let mut any = false;
        let mut nanos = 0f64;
        for (unit, scale) in UNITS {
            let Some(n) = f.get(unit) else { continue };
            any = true;
            let p = join(path, unit);
            match self.number(n, &p) {
                Some(v) if v < 0.0 => {
                    self.error(
                        JobErrorKind::InvalidValue,
                        &p,
                        "durations cannot be negative",
                        n.loc,
                    );
                    ok = false;
                }
                // Rounded per component so a duration written back by `to_yaml` reads back equal.
                Some(v) => nanos += (v * scale).round(),
                None => ok = false,
            }
        }
        let mut retries = 0u32;
        let mut retries_loc = None;
        if let Some(n) = f.get("retries") {
            let p = join(path, "retries");
            retries_loc = Some(n.loc);
            match self.integer(n, &p) {
                Some(v) => match u32::try_from(v) {
                    Ok(v) => retries = v,
                    Err(_) => {
                        self.error(
                            JobErrorKind::InvalidValue,
                            &p,
                            "retries must be between 0 and 4294967295",
                            n.loc,
                        );
                        ok = false;
                    }
                },
                None => ok = false,
            }
        }
        // `u64::MAX as f64` rounds up to 2^64, so `<` keeps the cast below in range.
        if ok && nanos >= u64::MAX as f64 {
            self.error(
                JobErrorKind::InvalidValue,
                path,
                "duration too large",
                f.loc,
            );
            ok = false;
        }
        let duration = any.then(|| Duration::from_nanos(nanos as u64));
        ok.then_some((Timeout { duration, retries }, retries_loc))
    }

    fn timeouts(&mut self, node: &Node) -> Option<Timeouts> {
        const PLAIN: [&str; 6] = [
            "overall",
            "infra_setup",
            "infra_teardown",
            "boot_cycle",
            "console_activity",
            "first_console_activity",
        ];
        let mut known = PLAIN.to_vec();
        known.push("watchdogs");
        let f = self.mapping(node, "timeouts", &known)?;
        let mut t = Timeouts::default();
        let mut ok = true;
        for name in PLAIN {
            let Some(n) = f.get(name) else { continue };
            let path = join("timeouts", name);
            let Some((timeout, retries_loc)) = self.timeout(n, &path) else {
                ok = false;
                continue;
            };
            if matches!(name, "overall" | "infra_teardown") && timeout.retries != 0 {
                self.error(
                    JobErrorKind::InvalidValue,
                    &join(&path, "retries"),
                    format!("`{name}` cannot have retries (it bounds the retries of the others)"),
                    retries_loc.unwrap_or(n.loc),
                );
                ok = false;
                continue;
            }
            let slot = match name {
                "overall" => &mut t.overall,
                "infra_setup" => &mut t.infra_setup,
                "infra_teardown" => &mut t.infra_teardown,
                "boot_cycle" => &mut t.boot_cycle,
                "console_activity" => &mut t.console_activity,
                _ => &mut t.first_console_activity,
            };
            *slot = timeout;
        }
        if let Some(n) = f.get("watchdogs") {
            for (name, v) in self.named(n, "timeouts.watchdogs") {
                match self.timeout(v, &format!("timeouts.watchdogs.{name}")) {
                    Some((timeout, _)) => {
                        t.watchdogs.insert(name, timeout);
                    }
                    None => ok = false,
                }
            }
        }
        ok.then_some(t)
    }

    fn pattern(&mut self, node: &Node, path: &str) -> Option<Pattern> {
        let f = self.mapping(node, path, &["regex"])?;
        let Some(n) = f.get("regex") else {
            self.missing(&join(path, "regex"), f.loc);
            return None;
        };
        let p = join(path, "regex");
        let source = self.string(n, &p)?;
        match Pattern::new(&source) {
            Ok(pattern) => Some(pattern),
            Err(e) => {
                self.error(
                    JobErrorKind::InvalidValue,
                    &p,
                    format!("invalid regex: {}", regex_reason(&e)),
                    n.loc,
                );
                None
            }
        }
    }

    fn console_patterns(&mut self, node: &Node) -> Option<ConsolePatterns> {
        let path = "console_patterns";
        let f = self.mapping(
            node,
            path,
            &[
                "session_end",
                "session_reboot",
                "job_success",
                "job_warn",
                "machine_unfit_for_service",
                "watchdogs",
            ],
        )?;
        let mut ok = true;
        let mut optional = |r: &mut Self, name: &str| -> Option<Pattern> {
            let n = f.get(name)?;
            let p = r.pattern(n, &join(path, name));
            ok &= p.is_some();
            p
        };
        let session_end = optional(self, "session_end");
        let session_reboot = optional(self, "session_reboot");
        let job_success = optional(self, "job_success");
        let job_warn = optional(self, "job_warn");
        let machine_unfit_for_service = optional(self, "machine_unfit_for_service");
        let mut watchdogs = BTreeMap::new();
        if let Some(n) = f.get("watchdogs") {
            for (name, v) in self.named(n, "console_patterns.watchdogs") {
                let wpath = format!("console_patterns.watchdogs.{name}");
                let Some(wf) = self.mapping(v, &wpath, &["start", "reset", "stop"]) else {
                    ok = false;
                    continue;
                };
                let part = |r: &mut Self, which: &str| -> Option<Pattern> {
                    match wf.get(which) {
                        Some(n) => r.pattern(n, &join(&wpath, which)),
                        None => {
                            r.missing(&join(&wpath, which), wf.loc);
                            None
                        }
                    }
                };
                let (start, reset, stop) =
                    (part(self, "start"), part(self, "reset"), part(self, "stop"));
                match (start, reset, stop) {
                    (Some(start), Some(reset), Some(stop)) => {
                        watchdogs.insert(name, WatchdogPatterns { start, reset, stop });
                    }
                    _ => ok = false,
                }
            }
        }
        ok.then(|| ConsolePatterns {
            session_end: session_end.unwrap_or_else(default_session_end),
            session_reboot,
            job_success,
            job_warn,
            machine_unfit_for_service,
            watchdogs,
        })
    }

    fn deployment(&mut self, node: &Node) -> Option<Deployment> {
        let f = self.mapping(node, "deployment", &["start", "continue"])?;
        let start = match f.get("start") {
            Some(n) => self.state(n, "deployment.start"),
            None => {
                self.missing("deployment.start", f.loc);
                None
            }
        };
        let cont = match f.get("continue") {
            Some(n) => self.state(n, "deployment.continue"),
            None => Some(PartialState::default()),
        };
        let (start, cont) = (start?, cont?);
        let kernel_loc = start.kernel_loc.unwrap_or(f.loc);
        // No kernel named: the gateway's default boot (valve-infra's boot2container, here
        // the `dut_kernel_url`/`dut_initramfs_url` variables), with its own initramfs unless
        // the job names one.
        let (url, initramfs) = match (start.url.clone(), self.defaults.kernel_url.clone()) {
            (Some(url), _) => (url, start.initramfs.clone()),
            (None, Some(url)) => (
                url,
                start.initramfs.clone().or_else(|| {
                    self.defaults
                        .initramfs_url
                        .clone()
                        .map(|url| Initramfs { url })
                }),
            ),
            (None, None) => {
                if start.kernel_loc.is_some() {
                    self.missing("deployment.start.kernel.url", kernel_loc);
                } else {
                    self.missing("deployment.start.kernel", start.loc);
                }
                return None;
            }
        };
        let start = DeploymentState {
            kernel: Kernel {
                url,
                cmdline: start.cmdline.clone().unwrap_or_default(),
            },
            initramfs,
        };
        let r#continue = DeploymentState {
            kernel: Kernel {
                url: cont.url.unwrap_or_else(|| start.kernel.url.clone()),
                cmdline: cont.cmdline.unwrap_or_else(|| start.kernel.cmdline.clone()),
            },
            initramfs: cont.initramfs.or_else(|| start.initramfs.clone()),
        };
        Some(Deployment { start, r#continue })
    }

    fn state(&mut self, node: &Node, path: &str) -> Option<PartialState> {
        let f = self.mapping(node, path, &["kernel", "initramfs"])?;
        let mut ok = true;
        let mut out = PartialState {
            loc: f.loc,
            ..PartialState::default()
        };
        if let Some(k) = f.get("kernel") {
            let kpath = join(path, "kernel");
            out.kernel_loc = Some(k.loc);
            match self.mapping(k, &kpath, &["url", "cmdline"]) {
                Some(kf) => {
                    if let Some(n) = kf.get("url") {
                        out.url = self.url(n, &join(&kpath, "url"));
                        ok &= out.url.is_some();
                    }
                    if let Some(n) = kf.get("cmdline") {
                        out.cmdline = self.cmdline(n, &join(&kpath, "cmdline"));
                        ok &= out.cmdline.is_some();
                    }
                }
                None => ok = false,
            }
        }
        if let Some(n) = f.get("initramfs") {
            let ipath = join(path, "initramfs");
            // ci-tron writes a list of artifacts; a list of exactly one is the same thing.
            let single = match &n.value {
                Value::Seq(items) if items.len() == 1 => Some((&items[0], format!("{ipath}[0]"))),
                Value::Seq(_) => {
                    self.error(
                        JobErrorKind::InvalidValue,
                        &ipath,
                        "exactly one initramfs can be booted",
                        n.loc,
                    );
                    None
                }
                _ => Some((n, ipath.clone())),
            };
            match single.and_then(|(n, p)| {
                let f = self.mapping(n, &p, &["url"])?;
                match f.get("url") {
                    Some(u) => self.url(u, &join(&p, "url")),
                    None => {
                        self.missing(&join(&p, "url"), f.loc);
                        None
                    }
                }
            }) {
                Some(url) => out.initramfs = Some(Initramfs { url }),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn cmdline(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, .. } => Some(text.clone()),
            Value::Seq(items) => {
                let mut parts = Vec::with_capacity(items.len());
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match self.string(item, &format!("{path}[{i}]")) {
                        Some(s) => parts.push(s),
                        None => ok = false,
                    }
                }
                ok.then(|| parts.join(" "))
            }
            _ => {
                self.type_error(path, "a string or a list of strings", node);
                None
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct PartialState {
    loc: Location,
    kernel_loc: Option<Location>,
    url: Option<String>,
    cmdline: Option<String>,
    initramfs: Option<Initramfs>,
}

fn describe(node: &Node) -> String {
    match &node.value {
        Value::Scalar { text, quoted: true } => format!("the string {:?}", clip(text)),
        Value::Scalar { text, .. } => format!("`{}`", clip(text)),
        _ => node.kind_name().to_string(),
    }
}

fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

/// The one-line reason of a regex error (its Display spans several lines with a caret).
fn regex_reason(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(s) => s
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error:"))
            .map_or_else(|| s.replace('\n', " "), |r| r.trim().to_string()),
        regex::Error::CompiledTooBig(limit) => {
            format!("the compiled pattern is larger than {limit} bytes")
        }
        other => other.to_string().replace('\n', " "),
    }
}

/// Accepts RFC 3339 and the ISO 8601 forms Python's `fromisoformat` writes: a space instead of
/// `T`, and no offset (taken as UTC).
fn parse_datetime(text: &str) -> Option<OffsetDateTime> {
    let t = text.trim();
    if let Ok(dt) = OffsetDateTime::parse(t, &Rfc3339) {
        return Some(dt);
    }
    let mut s = t.replacen(' ', "T", 1);
    let has_offset = s.ends_with(['Z', 'z'])
        || s.get(19..)
            .is_some_and(|tail| tail.contains('+') || tail.contains('-'));
    if !has_offset {
        s.push('Z');
    }
    OffsetDateTime::parse(&s, &Rfc3339).ok()
}

/// The closest known field name, if it is close enough to be the intended one.
fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(64).collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            suggest("tiemouts", &["timeouts", "target"]),
            Some("timeouts")
        );
        assert_eq!(suggest("zzz", &["timeouts", "target"]), None);
    }

    #[test]
    fn datetimes() {
        assert!(parse_datetime("2026-11-22T18:00:00Z").is_some());
        assert!(parse_datetime("2026-11-22 18:00:00").is_some());
        assert!(parse_datetime("2026-11-22T18:00:00.5+02:00").is_some());
        assert!(parse_datetime("tomorrow").is_none());
    }

    #[test]
    fn python_only_syntax_is_rejected_at_validation() {
        for p in [r"foo\Z", r"(?<=a)b", r"(a)\1"] {
            assert!(Pattern::new(p).is_err(), "{p}");
        }
    }

    #[test]
    fn regex_reason_is_one_line() {
        let e = Pattern::new("(abc").unwrap_err();
        let r = regex_reason(&e);
        assert!(!r.contains('\n') && r.contains("unclosed"), "{r}");
    }

    #[test]
    fn bytes_semantics_like_python() {
        // `.` matches any byte and a literal non-ASCII character matches its UTF-8 bytes.
        let p = Pattern::new(r"^\d+ caf. é$").unwrap();
        assert!(p.regex().is_match(b"12 caf\xff \xc3\xa9"));
        assert!(!p.regex().is_match("\u{0663} cafe é".as_bytes()));
    }
}
