//! Rendering a job as a Jinja2 template (minijinja), and mapping positions in the rendered text
//! back to the text the user wrote.
//!
//! Undefined variables are errors (valve-infra silently rendered them as `""`, which turned a
//! misspelt `{{ minio_ur }}` into a broken URL at boot time). The renderer runs with a fuel
//! budget and a cap on the output size, because the template is user input.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;
use std::sync::LazyLock;

use dutgate_core::Secret;
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};

use crate::error::{JobError, JobErrorKind, Location};

/// Largest job text accepted, before and after rendering.
pub const MAX_JOB_BYTES: usize = 1024 * 1024;
/// Template instructions one render may execute: far above what any job needs (a job with a
/// loop over a few hundred items uses a few thousand), low enough to stop a runaway loop fast.
const FUEL: u64 = 2_000_000;

/// valve-infra's registry variables, each the gateway's registry (`registry`):
/// `fdo_proxy_registry` (its pull-through cache of freedesktop.org's registry),
/// `local_registry` (its registry for locally pushed images) and `pull_thru_registry` (the
/// older name of the pull-through cache).
pub const VALVE_INFRA_REGISTRIES: [&str; 3] =
    ["fdo_proxy_registry", "local_registry", "pull_thru_registry"];

/// The machine a job is rendered for (mars' record of it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineVars {
    /// The machine id (its boot NIC's MAC), as `machine_id` and `machine.id`.
    pub id: String,
    pub base_name: String,
    pub full_name: String,
    /// Probed and manual tags, as `machine_tags` and `machine.tags`.
    pub tags: Vec<String>,
    pub ip_address: Option<String>,
    /// e.g. `ttyUSB0`, as `local_tty_device` and `machine.local_tty_device`.
    pub local_tty_device: Option<String>,
    pub ready_for_service: bool,
}

/// The job bucket and the DUT-scoped credentials that open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobBucketVars {
    pub name: String,
    pub access_key: String,
    pub secret_key: Secret,
}

/// Variables a job template is rendered with (design.md §8). A variable whose value is not
/// known (e.g. no machine yet) is left undefined, so a job that uses it fails to render with an
/// error naming it instead of silently getting an empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateVars {
    /// `machine_id`, `machine_tags`, `local_tty_device`, `ready_for_service`, `machine{…}`.
    pub machine: Option<MachineVars>,
    /// The S3 endpoint DUTs reach, as `s3_url` and its valve-infra name `minio_url`.
    pub s3_url: Option<String>,
    /// `job_bucket`, `job_bucket_access_key`, `job_bucket_secret_key`.
    pub job_bucket: Option<JobBucketVars>,
    /// The registry pull-through cache, `host:port`, as `registry` and valve-infra's names
    /// for it ([`VALVE_INFRA_REGISTRIES`]).
    pub registry: Option<String>,
    /// The gateway's host name as DUTs see it, as `gateway`.
    pub gateway: Option<String>,
    /// Configured extras (and `dutctl job validate --var k=v`). They are set last, so they can
    /// also override a standard variable.
    pub extra: BTreeMap<String, String>,
}

impl TemplateVars {
    /// Plausible values for every standard variable, for checking a job without a gateway
    /// (`dutctl job validate`): a job is then only rejected for variables nobody provides.
    pub fn placeholders() -> Self {
        Self {
            machine: Some(MachineVars {
                id: "52:54:00:00:00:01".into(),
                base_name: "dut".into(),
                full_name: "farm-dut-1".into(),
                tags: Vec::new(),
                ip_address: Some("10.42.0.10".into()),
                local_tty_device: Some("ttyUSB0".into()),
                ready_for_service: true,
            }),
            s3_url: Some("http://gateway:9000".into()),
            job_bucket: Some(JobBucketVars {
                name: "job-525400000001-1".into(),
                access_key: "job-525400000001-1-dut".into(),
                secret_key: Secret::new("placeholder-secret"),
            }),
            registry: Some("gateway:8002".into()),
            gateway: Some("gateway".into()),
            extra: BTreeMap::new(),
        }
    }

    /// Sets (or overrides) one extra variable.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.extra.insert(name.into(), value.into());
        self
    }

    fn context(&self) -> BTreeMap<String, Value> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        if let Some(m) = &self.machine {
            let tty = m.local_tty_device.clone().map(Value::from);
            ctx.insert("machine_id".into(), Value::from(m.id.clone()));
            ctx.insert("machine_tags".into(), Value::from(m.tags.clone()));
            ctx.insert("ready_for_service".into(), Value::from(m.ready_for_service));
            if let Some(tty) = &tty {
                ctx.insert("local_tty_device".into(), tty.clone());
            }
            let mut machine: BTreeMap<&str, Value> = BTreeMap::new();
            machine.insert("id", Value::from(m.id.clone()));
            machine.insert("base_name", Value::from(m.base_name.clone()));
            machine.insert("full_name", Value::from(m.full_name.clone()));
            machine.insert("tags", Value::from(m.tags.clone()));
            machine.insert("ready_for_service", Value::from(m.ready_for_service));
            if let Some(ip) = &m.ip_address {
                machine.insert("ip_address", Value::from(ip.clone()));
            }
            if let Some(tty) = tty {
                machine.insert("local_tty_device", tty);
            }
            ctx.insert("machine".into(), Value::from(machine));
        }
        if let Some(url) = &self.s3_url {
            ctx.insert("s3_url".into(), Value::from(url.clone()));
            ctx.insert("minio_url".into(), Value::from(url.clone()));
        }
        if let Some(b) = &self.job_bucket {
            ctx.insert("job_bucket".into(), Value::from(b.name.clone()));
            ctx.insert(
                "job_bucket_access_key".into(),
                Value::from(b.access_key.clone()),
            );
            ctx.insert(
                "job_bucket_secret_key".into(),
                Value::from(b.secret_key.expose().to_string()),
            );
        }
        if let Some(r) = &self.registry {
            ctx.insert("registry".into(), Value::from(r.clone()));
            // valve-infra's names for its registries (its gateway's `EXECUTOR_JOB__*`): one
            // registry serves them all here. Configured extras of the same name win.
            for alias in VALVE_INFRA_REGISTRIES {
                ctx.insert(alias.into(), Value::from(r.clone()));
            }
        }
        if let Some(g) = &self.gateway {
            ctx.insert("gateway".into(), Value::from(g.clone()));
        }
        for (k, v) in &self.extra {
            ctx.insert(k.clone(), Value::from(v.clone()));
        }
        ctx
    }
}

static ENV: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // A job without template syntax must render to itself, final newline included.
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(FUEL));
    // Keeps the source spans that let errors name the failing expression.
    env.set_debug(true);
    env
});

/// True when the text has no Jinja2 syntax at all, so rendering would give it back unchanged.
pub(crate) fn is_plain(text: &str) -> bool {
    !(text.contains("{{") || text.contains("{%") || text.contains("{#"))
}

/// A `Write` that refuses to grow past [`MAX_JOB_BYTES`].
struct Capped(Vec<u8>);

impl io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.len() + buf.len() > MAX_JOB_BYTES {
            return Err(io::Error::other("rendered job too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Renders the job text. Errors carry positions in `text` itself.
pub(crate) fn render<'a>(text: &'a str, vars: &TemplateVars) -> Result<Cow<'a, str>, JobError> {
    if is_plain(text) {
        return Ok(Cow::Borrowed(text));
    }
    let tmpl = ENV
        .template_from_str(text)
        .map_err(|e| template_error(text, &e, vars))?;
    let mut out = Capped(Vec::with_capacity(text.len() + text.len() / 4));
    tmpl.render_captured_to(vars.context(), &mut out)
        .map_err(|e| template_error(text, &e, vars))?;
    // minijinja writes whole UTF-8 strings; a lossy conversion is only a guard.
    match String::from_utf8(out.0) {
        Ok(s) => Ok(Cow::Owned(s)),
        Err(e) => Ok(Cow::Owned(
            String::from_utf8_lossy(e.as_bytes()).into_owned(),
        )),
    }
}

fn template_error(source: &str, err: &minijinja::Error, vars: &TemplateVars) -> JobError {
    let range = err
        .range()
        .filter(|r| r.start <= r.end && r.end <= source.len())
        .filter(|r| source.is_char_boundary(r.start) && source.is_char_boundary(r.end));
    let location = match (&range, err.line()) {
        (Some(r), _) => Some(location_of_offset(source, r.start)),
        (None, Some(line)) => Some(Location { line, column: 1 }),
        (None, None) => None,
    };
    let expr = range.as_ref().map(|r| source[r.clone()].trim());
    let message = match err.kind() {
        ErrorKind::UndefinedError => {
            let known = vars.context();
            let missing: Vec<String> = ENV
                .template_from_str(source)
                .map(|t| t.undeclared_variables(false))
                .unwrap_or_default()
                .into_iter()
                .filter(|v| !known.contains_key(v))
                .collect();
            match expr {
                Some(expr) => {
                    let mut m = format!("undefined template variable in `{}`", short(expr));
                    let named: Vec<&String> =
                        missing.iter().filter(|v| mentions(expr, v)).collect();
                    if !named.is_empty() {
                        m = format!(
                            "undefined template variable `{}`",
                            named
                                .iter()
                                .map(|s| s.as_str())
                                .collect::<Vec<_>>()
                                .join("`, `")
                        );
                    }
                    m
                }
                None => format!("undefined template variable ({})", describe(err)),
            }
        }
        ErrorKind::OutOfFuel => {
            "the template does too much work (runaway loop?); jobs are limited".to_string()
        }
        ErrorKind::WriteFailure => {
            format!("the rendered job is larger than {MAX_JOB_BYTES} bytes")
        }
        _ => format!("template error: {}", describe(err)),
    };
    let kind = if matches!(err.kind(), ErrorKind::WriteFailure) {
        JobErrorKind::TooLarge
    } else {
        JobErrorKind::Template
    };
    JobError::new(kind, "", message, location)
}

/// The error's own words, without minijinja's "(in <string>:N)" suffix: we give the position.
fn describe(err: &minijinja::Error) -> String {
    match err.detail() {
        Some(d) => format!("{}: {d}", err.kind()),
        None => err.kind().to_string(),
    }
}

fn short(s: &str) -> Cow<'_, str> {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("{}…", s.chars().take(MAX).collect::<String>()))
    }
}

/// Whether `expr` uses the identifier `name` (not merely a longer name containing it).
fn mentions(expr: &str, name: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    expr.match_indices(name).any(|(i, _)| {
        let before = expr[..i].chars().next_back();
        let after = expr[i + name.len()..].chars().next();
        !before.is_some_and(|c| ident(c) || c == '.') && !after.is_some_and(ident)
    })
}

pub(crate) fn location_of_offset(text: &str, offset: usize) -> Location {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line,
        column: before[line_start..].chars().count() + 1,
    }
}

/// Maps positions in the rendered text back to the submitted template. Built only when there
/// are errors to report, so its cost does not matter on the happy path.
///
/// Lines are aligned with a longest-common-subsequence over whole lines: lines without
/// template syntax come out of the renderer unchanged and anchor the alignment; a rendered line
/// between two anchors comes from a template line between them. Within such a line, columns
/// in the common prefix (or suffix) map one to one; a column inside the expanded part maps to
/// the start of the expression that produced it.
pub(crate) struct SourceMap<'a> {
    source: Vec<&'a str>,
    rendered: Vec<&'a str>,
    /// For each rendered line, the index of its source line.
    line_of: Vec<usize>,
}

fn similarity(a: &str, b: &str) -> usize {
    let prefix = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    let suffix = a
        .chars()
        .rev()
        .zip(b.chars().rev())
        .take_while(|(x, y)| x == y)
        .count();
    prefix + suffix
}

/// Beyond this many line pairs the alignment falls back to "same line number".
const MAX_ALIGN_CELLS: usize = 4_000_000;

impl<'a> SourceMap<'a> {
    pub fn new(source: &'a str, rendered: &'a str) -> Self {
        let source: Vec<&str> = source.split('\n').collect();
        let rendered: Vec<&str> = rendered.split('\n').collect();
        let (n, m) = (rendered.len(), source.len());
        let last = m.saturating_sub(1);
        let line_of = if source == rendered || n.saturating_mul(m) > MAX_ALIGN_CELLS {
            (0..n).map(|r| r.min(last)).collect()
        } else {
            Self::align(&rendered, &source)
        };
        Self {
            source,
            rendered,
            line_of,
        }
    }

    fn align(rendered: &[&str], source: &[&str]) -> Vec<usize> {
        let (n, m) = (rendered.len(), source.len());
        // lcs[i][j]: LCS length of rendered[i..] and source[j..].
        let mut lcs = vec![0u32; (n + 1) * (m + 1)];
        let at = |i: usize, j: usize| i * (m + 1) + j;
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[at(i, j)] = if rendered[i] == source[j] {
                    lcs[at(i + 1, j + 1)] + 1
                } else {
                    lcs[at(i + 1, j)].max(lcs[at(i, j + 1)])
                };
            }
        }
        let mut matched: Vec<Option<usize>> = vec![None; n];
        let (mut i, mut j) = (0, 0);
        while i < n && j < m {
            if rendered[i] == source[j] {
                matched[i] = Some(j);
                i += 1;
                j += 1;
            } else if lcs[at(i + 1, j)] >= lcs[at(i, j + 1)] {
                i += 1;
            } else {
                j += 1;
            }
        }
        // Unmatched rendered lines map into the gap of source lines between their anchors.
        let mut line_of = vec![0; n];
        let mut prev_src: Option<usize> = None;
        let mut r = 0;
        while r < n {
            if let Some(s) = matched[r] {
                line_of[r] = s;
                prev_src = Some(s);
                r += 1;
                continue;
            }
            let gap_start = r;
            while r < n && matched[r].is_none() {
                r += 1;
            }
            let lo = prev_src.map_or(0, |s| s + 1);
            let hi = matched.get(r).copied().flatten().unwrap_or(m); // exclusive
            let gap: Vec<usize> = (lo..hi).collect();
            let templated: Vec<usize> = gap
                .iter()
                .copied()
                .filter(|&s| !is_plain(source[s]))
                .collect();
            let pool = if templated.is_empty() { gap } else { templated };
            // Each rendered line takes the most similar remaining template line (common
            // prefix + suffix), keeping the order; a line of block tags alone renders empty,
            // and a loop body may render several times (so a line can be taken again).
            let mut next = 0;
            for (k, slot) in line_of[gap_start..r].iter_mut().enumerate() {
                let rline = rendered[gap_start + k];
                let best = pool
                    .iter()
                    .enumerate()
                    .skip(next)
                    .max_by_key(|&(i, &s)| (similarity(rline, source[s]), std::cmp::Reverse(i)))
                    .map(|(i, _)| i);
                *slot = match best {
                    Some(i) => {
                        next = i;
                        pool[i]
                    }
                    None => lo.min(m.saturating_sub(1)),
                };
            }
        }
        line_of
    }

    /// The submitted-text position of a rendered-text position.
    pub fn map(&self, loc: Location) -> Location {
        let r = loc.line.saturating_sub(1);
        let Some(&s) = self.line_of.get(r) else {
            return Location {
                line: self.source.len().max(1),
                column: 1,
            };
        };
        let (Some(rline), Some(sline)) = (self.rendered.get(r), self.source.get(s)) else {
            return Location {
                line: s + 1,
                column: 1,
            };
        };
        let col = loc.column.saturating_sub(1);
        let rc: Vec<char> = rline.chars().collect();
        let sc: Vec<char> = sline.chars().collect();
        let prefix = rc.iter().zip(&sc).take_while(|(a, b)| a == b).count();
        let suffix = rc
            .iter()
            .rev()
            .zip(sc.iter().rev())
            .take_while(|(a, b)| a == b)
            .count()
            // The suffix may not overlap the prefix (`prefix <= min(len)` since it zips both).
            .min(rc.len().min(sc.len()) - prefix);
        let column = if rc == sc || col < prefix {
            col
        } else if col >= rc.len().saturating_sub(suffix) {
            (col + sc.len()).saturating_sub(rc.len())
        } else {
            prefix
        };
        Location {
            line: s + 1,
            column: column + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> TemplateVars {
        TemplateVars::placeholders()
    }

    #[test]
    fn plain_text_renders_to_itself() {
        let job = "version: 1\ndeployment: {}\n";
        assert!(matches!(render(job, &vars()), Ok(Cow::Borrowed(s)) if s == job));
        // With template syntax, the final newline survives too.
        let r = render("a: {{ machine_id }}\n", &vars()).unwrap();
        assert_eq!(r, "a: 52:54:00:00:00:01\n");
    }

    #[test]
    fn aliases_and_machine_dict() {
        let r = render(
            "{{ minio_url }} {{ s3_url }} {{ machine.full_name }} {{ job_bucket }}",
            &vars(),
        )
        .unwrap();
        assert_eq!(
            r,
            "http://gateway:9000 http://gateway:9000 farm-dut-1 job-525400000001-1"
        );
    }

    #[test]
    fn valve_infra_registry_names_are_the_registry_unless_configured() {
        let text = "{{ fdo_proxy_registry }} {{ local_registry }} {{ pull_thru_registry }}";
        assert_eq!(
            render(text, &vars()).unwrap(),
            "gateway:8002 gateway:8002 gateway:8002"
        );
        let mut v = vars();
        v.set("local_registry", "ci-gateway:8004");
        assert_eq!(
            render(text, &v).unwrap(),
            "gateway:8002 ci-gateway:8004 gateway:8002"
        );
        // Without a registry they are undefined, as `registry` is.
        let none = TemplateVars {
            registry: None,
            ..vars()
        };
        assert!(render(text, &none).is_err());
    }

    #[test]
    fn undefined_variable_is_named_with_its_position() {
        let e = render("a: 1\nb: \"{{ minio_urll }}/x\"\n", &vars()).unwrap_err();
        assert_eq!(e.kind, JobErrorKind::Template);
        assert!(e.message.contains("`minio_urll`"), "{}", e.message);
        assert_eq!(e.location, Some(Location { line: 2, column: 8 }));
    }

    #[test]
    fn is_defined_works_in_strict_mode() {
        let r = render(
            "{% if nope is defined %}a{% else %}b{% endif %}{% if machine_id is defined %}c{% endif %}",
            &vars(),
        )
        .unwrap();
        assert_eq!(r, "bc");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = render("a: 1\nb: {{ oops\n", &vars()).unwrap_err();
        assert_eq!(e.kind, JobErrorKind::Template);
        assert_eq!(e.location.map(|l| l.line), Some(2), "{e:?}");
    }

    #[test]
    fn runaway_loops_and_huge_output_are_stopped() {
        let e = render(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            &vars(),
        )
        .unwrap_err();
        assert!(e.message.contains("too much work"), "{}", e.message);
        let e = render(
            "{% for i in range(100000) %}{{ 'xxxxxxxxxxxxxxxxxxxx' }}{% endfor %}",
            &vars(),
        )
        .unwrap_err();
        assert_eq!(e.kind, JobErrorKind::TooLarge, "{e:?}");
    }

    #[test]
    fn source_map_follows_conditionals_and_expansions() {
        let src = "a: 1\n{% if false %}\nhidden: 1\n{% endif %}\nb: {{ x }}: tail\nc: 3\n";
        let mut v = TemplateVars::default();
        v.set("x", "long-expanded-value");
        let out = render(src, &v).unwrap();
        let map = SourceMap::new(src, &out);
        let out_lines: Vec<&str> = out.split('\n').collect();
        let c_line = out_lines.iter().position(|l| *l == "c: 3").unwrap() + 1;
        assert_eq!(
            map.map(Location {
                line: c_line,
                column: 1
            })
            .line,
            6
        );
        let b_line = out_lines.iter().position(|l| l.starts_with("b:")).unwrap() + 1;
        // Column of "tail" in the rendered line maps to its column in the template.
        let rendered_col = out_lines[b_line - 1].find("tail").unwrap() + 1;
        let m = map.map(Location {
            line: b_line,
            column: rendered_col,
        });
        assert_eq!(
            m,
            Location {
                line: 5,
                column: src.lines().nth(4).unwrap().find("tail").unwrap() + 1
            }
        );
        // Inside the expansion: the start of the expression.
        let m = map.map(Location {
            line: b_line,
            column: 6,
        });
        assert_eq!(m, Location { line: 5, column: 4 });
    }
}
