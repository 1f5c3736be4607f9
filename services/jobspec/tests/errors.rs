//! Acceptance: every class of malformed job gives an error naming the field and its line and
//! column in the submitted text (never a panic), several at once where possible.

use dutgate_jobspec::{JobError, JobErrorKind, JobErrors, JobSpec, Location, TemplateVars};

const DEPLOY: &str = "deployment:\n  start:\n    kernel:\n      url: http://gw/k\n";

fn errors(text: &str) -> JobErrors {
    JobSpec::parse_and_render(text, &TemplateVars::placeholders())
        .expect_err("the job must be rejected")
}

fn only(text: &str) -> JobError {
    let e = errors(text);
    assert_eq!(e.len(), 1, "expected one error, got:\n{e}");
    e.0.into_iter().next().unwrap()
}

fn at(line: usize, column: usize) -> Option<Location> {
    Some(Location { line, column })
}

#[test]
fn bad_yaml() {
    let e = only("version: 1\ntarget: {tags: [a, b}\n");
    assert_eq!(e.kind, JobErrorKind::Yaml);
    assert_eq!(e.field(), "(job)");
    assert_eq!(e.location.map(|l| l.line), Some(2), "{e}");
    assert!(e.message.starts_with("invalid YAML"), "{e}");
}

#[test]
fn unknown_field() {
    let e = only(&format!("{DEPLOY}tiemouts:\n  overall: {{hours: 1}}\n"));
    assert_eq!(e.kind, JobErrorKind::UnknownField);
    assert_eq!(e.path, "tiemouts");
    assert_eq!(e.location, at(5, 1));
    assert!(e.message.contains("did you mean `timeouts`"), "{e}");

    let e = only(&format!(
        "{DEPLOY}timeouts:\n  overall: {{hours: 1, minuts: 2}}\n"
    ));
    assert_eq!(e.path, "timeouts.overall.minuts");
    assert_eq!(e.location, at(6, 23));

    let e = only(&format!("{DEPLOY}    dtb: [{{url: http://gw/dtb}}]\n"));
    assert_eq!(e.path, "deployment.start.dtb");
    assert!(e.message.contains("ci-tron extension"), "{e}");
}

#[test]
fn bad_regex() {
    let e = only(&format!(
        "{DEPLOY}console_patterns:\n  job_success:\n    regex: \"status: (0\"\n"
    ));
    assert_eq!(e.kind, JobErrorKind::InvalidValue);
    assert_eq!(e.path, "console_patterns.job_success.regex");
    assert_eq!(e.location, at(7, 12));
    assert!(e.message.contains("unclosed group"), "{e}");
}

#[test]
fn bad_duration_type() {
    let e = only(&format!(
        "{DEPLOY}timeouts:\n  boot_cycle: {{minutes: soon}}\n"
    ));
    assert_eq!(e.kind, JobErrorKind::InvalidType);
    assert_eq!(e.path, "timeouts.boot_cycle.minutes");
    assert_eq!(e.location, at(6, 25));
    assert!(e.message.contains("expected a number, found `soon`"), "{e}");

    let e = only(&format!(
        "{DEPLOY}timeouts:\n  boot_cycle: {{retries: \"2\"}}\n"
    ));
    assert_eq!(e.path, "timeouts.boot_cycle.retries");
    assert!(e.message.contains("expected an integer"), "{e}");

    let e = only(&format!("{DEPLOY}timeouts:\n  boot_cycle: 30\n"));
    assert_eq!(e.path, "timeouts.boot_cycle");
    assert_eq!(e.location, at(6, 15));
}

#[test]
fn retries_on_overall_and_teardown() {
    let e = errors(&format!(
        "{DEPLOY}timeouts:\n  overall: {{hours: 1, retries: 1}}\n  infra_teardown:\n    minutes: 5\n    retries: 2\n"
    ));
    let got: Vec<(&str, Option<Location>)> =
        e.iter().map(|e| (e.path.as_str(), e.location)).collect();
    assert_eq!(
        got,
        vec![
            ("timeouts.overall.retries", at(6, 32)),
            ("timeouts.infra_teardown.retries", at(9, 14)),
        ]
    );
}

#[test]
fn missing_deployment_start() {
    let e = only("version: 1\ndeployment:\n  continue:\n    kernel: {cmdline: x}\n");
    assert_eq!(e.kind, JobErrorKind::MissingField);
    assert_eq!(e.path, "deployment.start");
    assert_eq!(e.location, at(3, 3));

    let e = only("version: 1\n");
    assert_eq!(e.path, "deployment");
    let e = only("deployment:\n  start:\n    kernel: {cmdline: x}\n");
    assert_eq!(e.path, "deployment.start.kernel.url");
    assert_eq!(e.location, at(3, 13));
}

#[test]
fn undefined_template_variable() {
    let e =
        only("version: 1\ndeployment:\n  start:\n    kernel:\n      url: \"{{ minio_ur }}/k\"\n");
    assert_eq!(e.kind, JobErrorKind::Template);
    assert!(e.message.contains("`minio_ur`"), "{e}");
    assert_eq!(e.location, at(5, 16));
}

#[test]
fn target_without_id_or_tags() {
    let e = only(&format!("target: {{}}\n{DEPLOY}"));
    assert_eq!(e.kind, JobErrorKind::MissingField);
    assert_eq!(e.path, "target");
    assert_eq!(e.location, at(1, 9));

    let e = only(&format!("{DEPLOY}target:\n  id: not-a-mac\n"));
    assert_eq!(e.path, "target.id");
    assert_eq!(e.location, at(6, 7));
    let e = only(&format!("{DEPLOY}target:\n  tags: [ok, \"has space\"]\n"));
    assert_eq!(e.path, "target.tags[1]");
}

#[test]
fn several_errors_at_once_in_text_order() {
    let e = errors(
        "version: 2\ntarget: {tags: x}\ntimeouts:\n  overall: {retries: 1}\n  boot_cycle: {seconds: -1}\n\
         console_patterns:\n  watchdogs:\n    wd: {start: {regex: a}}\ndeployment:\n  start:\n    kernel: {url: ftp://x, cmdline: [a, [b]]}\n",
    );
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "version",
            "target.tags",
            "timeouts.overall.retries",
            "timeouts.boot_cycle.seconds",
            "console_patterns.watchdogs.wd.reset",
            "console_patterns.watchdogs.wd.stop",
            "deployment.start.kernel.url",
            "deployment.start.kernel.cmdline[1]",
        ],
        "{e}"
    );
    // Display: one per line, `line:column: path: message`.
    let text = e.to_string();
    assert_eq!(text.lines().count(), 8);
    assert!(
        text.lines().next().unwrap().starts_with("1:10: version: "),
        "{text}"
    );
}

#[test]
fn positions_point_into_the_submitted_template() {
    // The expansion of `{{ job_bucket }}` shifts everything after it in the rendered text; the
    // error must still point at the submitted text.
    let e = only(
        "{% set unused = 1 %}\n{% if true %}\ndeployment:\n  start:\n    kernel: {url: \"{{ s3_url }}/{{ job_bucket }}\", cmdline: {a: b}}\n{% endif %}\n",
    );
    assert_eq!(e.path, "deployment.start.kernel.cmdline");
    assert_eq!(e.location, at(5, 61), "{e}");
}

#[test]
fn duplicate_keys_and_bad_keys() {
    let e = only(&format!("{DEPLOY}version: 1\nversion: 1\n"));
    assert_eq!(e.path, "version");
    assert_eq!(e.location, at(6, 1));
    assert!(e.message.contains("duplicate"), "{e}");
}

#[test]
fn not_a_mapping_and_empty() {
    assert_eq!(only("").kind, JobErrorKind::MissingField);
    assert_eq!(only("- a\n- b\n").kind, JobErrorKind::InvalidType);
    assert_eq!(only("just text").kind, JobErrorKind::InvalidType);
}

#[test]
fn oversized_job() {
    let text = "#".repeat(dutgate_jobspec::MAX_JOB_BYTES + 1);
    assert_eq!(only(&text).kind, JobErrorKind::TooLarge);
}

#[test]
fn too_many_watchdogs() {
    let mut text = format!("{DEPLOY}timeouts:\n  watchdogs:\n");
    for i in 0..=dutgate_jobspec::MAX_WATCHDOGS {
        text.push_str(&format!("    w{i}: {{seconds: 1}}\n"));
    }
    let e = only(&text);
    assert_eq!(e.path, "timeouts.watchdogs");
    assert!(e.message.contains("at most"), "{e}");
}
