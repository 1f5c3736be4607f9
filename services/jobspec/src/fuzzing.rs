//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the in-suite random-input tests,
//! so CI exercises exactly what the fuzzer runs. Both must never panic, whatever the bytes.

use std::sync::LazyLock;

use crate::{JobSpec, PatternEngine, TemplateVars};

/// Renders and parses arbitrary bytes as a job; a parsed job must also survive its own
/// normalised YAML round trip.
pub fn parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars = TemplateVars::placeholders();
    match JobSpec::parse_and_render(text, &vars) {
        Ok(job) => {
            let yaml = match job.to_yaml() {
                Ok(y) => y,
                Err(e) => panic!("a parsed job must serialise: {e}"),
            };
            match JobSpec::parse(&yaml) {
                Ok(again) => assert_eq!(again, job, "round trip changed the job:\n{yaml}"),
                Err(e) => panic!("normalised job does not parse back: {e}\n{yaml}"),
            }
        }
        Err(errors) => {
            assert!(
                !errors.is_empty(),
                "an error result carries at least one error"
            );
            for e in &errors {
                let _ = e.to_string();
            }
        }
    }
}

/// Drives the pattern engine with arbitrary bytes: the first bytes choose chunk boundaries,
/// the rest is the console stream. Chunked feeding must give the same events as one feed.
pub fn patterns(data: &[u8]) {
    // Parsed once: building the job (YAML, regex compilation) would otherwise dominate a run.
    static JOB: LazyLock<JobSpec> = LazyLock::new(example_job);
    let (cuts, stream) = data.split_at(data.len().min(8));
    let job = &*JOB;
    let mut whole = PatternEngine::for_job(job);
    let mut expected = whole.feed(stream);
    expected.extend(whole.finish());

    let mut chunked = PatternEngine::for_job(job);
    let mut got = Vec::new();
    let mut rest = stream;
    for &c in cuts
        .iter()
        .cycle()
        .take(if cuts.is_empty() { 0 } else { 4096 })
    {
        if rest.is_empty() {
            break;
        }
        let n = (usize::from(c) % rest.len()).max(1);
        got.extend(chunked.feed(&rest[..n]));
        rest = &rest[n..];
    }
    got.extend(chunked.feed(rest));
    got.extend(chunked.finish());
    assert_eq!(got, expected);
    assert_eq!(chunked.status(), whole.status());
}

/// A job with every kind of pattern, shared by the fuzz target and the tests.
pub fn example_job() -> JobSpec {
    const JOB: &str = r#"
timeouts:
  watchdogs:
    wd: {minutes: 1}
console_patterns:
  session_end: {regex: "^.*safe to turn off\r$"}
  session_reboot: {regex: "REBOOT"}
  job_success: {regex: "status: 0"}
  job_warn: {regex: "^WARN"}
  machine_unfit_for_service: {regex: "MCE"}
  watchdogs:
    wd: {start: {regex: "start"}, reset: {regex: "tick"}, stop: {regex: "stop"}}
deployment:
  start:
    kernel: {url: "http://gateway/kernel"}
"#;
    match JobSpec::parse(JOB) {
        Ok(job) => job,
        Err(e) => panic!("the example job is valid: {e}"),
    }
}
