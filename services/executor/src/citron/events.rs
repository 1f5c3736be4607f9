//! A job's events as ci-tron control messages: which `ControlMessageTag` each phase gets,
//! and the console line a matched pattern came from (ci-tron's client counts the patterns
//! and prints the first line of each at the end).
//!
//! | event | tag |
//! |---|---|
//! | phase `setup` | 100 `JOB_INFRA_SETUP_START` |
//! | phase `console` (the setup is done) | 101 `JOB_INFRA_SETUP_COMPLETE` |
//! | `finished` with `SETUP_FAIL` | 102 `JOB_INFRA_SETUP_ERROR`, then 106 |
//! | phase `power` | 200 `PDU_PORT_POWER_CYCLING_START` |
//! | phase `running` (power cycled) | 201 `PDU_PORT_POWER_CYCLING_COMPLETE` |
//! | `console_activity` (first output of a boot) | 300 `DUT_POWER_SEQUENCE_DETECTED` |
//! | `timeout` | 400 `TIMEOUT_HIT` |
//! | `pattern` | 401 `DUT_CONSOLE_PATTERN_MATCHED` (`metadata: {patterns, line}`) |
//! | phase `teardown` | 105 `JOB_INFRA_TEARDOWN_START` |
//! | `finished` | 106 `JOB_INFRA_TEARDOWN_COMPLETE` |
//! | anything else | 0 `NO_TAG` |
//!
//! ci-tron's 301 (`DUT_FIRMWARE_BOOT_COMPLETE`) has no event here: the gateway does not see
//! the firmware hand over to the kernel.

use std::collections::VecDeque;

use dutgate_core::JobStatus;
use dutgate_jobspec::JobSpec;
use serde_json::{Value, json};

use super::wire::{Frame, Severity, tag};
use crate::model::{Event, kind, phase};

/// Console lines kept to find the line a pattern matched on.
const TAIL_LINES: usize = 256;
/// Longest line kept (a DUT printing without newlines must not grow memory).
const MAX_LINE: usize = 4096;

/// The last lines of the console, as the session streamed them.
#[derive(Default)]
pub struct ConsoleTail {
    lines: VecDeque<Vec<u8>>,
    partial: Vec<u8>,
}

impl ConsoleTail {
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                if self.lines.len() == TAIL_LINES {
                    self.lines.pop_front();
                }
                self.lines.push_back(line);
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
    }

    /// The most recent line (the unfinished one included) that `matches`.
    fn last_matching(&self, matches: impl Fn(&[u8]) -> bool) -> Option<String> {
        std::iter::once(&self.partial)
            .chain(self.lines.iter().rev())
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .find(|l| matches(l))
            .map(|l| String::from_utf8_lossy(l).into_owned())
    }
}

/// Turns events into control messages for one session.
pub struct Narrator {
    spec: Option<JobSpec>,
    /// The job's submission (ms since the epoch): messages are timed from there, as
    /// ci-tron's are from the job's start.
    origin_ms: i64,
}

impl Narrator {
    /// `spec`: the job as validated at submission (its console patterns); `origin_ms`: when
    /// it was submitted.
    pub fn new(spec: Option<JobSpec>, origin_ms: i64) -> Self {
        Self { spec, origin_ms }
    }

    /// ci-tron's `+<seconds>s: <message>`, for something happening now.
    pub fn say(&self, msg: &str, tag: u16, severity: Severity, metadata: Value) -> Frame {
        self.say_at(crate::store::now_ms(), msg, tag, severity, metadata)
    }

    /// The same for something that happened at `at_ms` (ms since the epoch).
    pub fn say_at(
        &self,
        at_ms: i64,
        msg: &str,
        tag: u16,
        severity: Severity,
        metadata: Value,
    ) -> Frame {
        let seconds = (at_ms - self.origin_ms).max(0) as f64 / 1000.0;
        Frame::Ctrl {
            msg: format!("+{seconds:.3}s: {}", msg.trim_end()),
            severity,
            tag,
            metadata,
        }
    }

    /// The control messages for one event.
    pub fn frames(&self, e: &Event, tail: &ConsoleTail) -> Vec<Frame> {
        let info = |t: u16| vec![self.say_at(e.at.0, &e.message, t, Severity::Info, json!({}))];
        match e.kind.as_str() {
            kind::PHASE if is_phase_change(e) => {
                match e.data.get("phase").and_then(Value::as_str) {
                    Some(phase::SETUP) => info(tag::JOB_INFRA_SETUP_START),
                    Some(phase::CONSOLE) => vec![self.say_at(
                        e.at.0,
                        &format!("setup complete; {}", e.message),
                        tag::JOB_INFRA_SETUP_COMPLETE,
                        Severity::Info,
                        json!({}),
                    )],
                    Some(phase::POWER) => info(tag::PDU_PORT_POWER_CYCLING_START),
                    Some(phase::RUNNING) => info(tag::PDU_PORT_POWER_CYCLING_COMPLETE),
                    Some(phase::TEARDOWN) => info(tag::JOB_INFRA_TEARDOWN_START),
                    _ => info(tag::NO_TAG),
                }
            }
            kind::CONSOLE_ACTIVITY => info(tag::DUT_POWER_SEQUENCE_DETECTED),
            kind::TIMEOUT => vec![self.say_at(
                e.at.0,
                &e.message,
                tag::TIMEOUT_HIT,
                Severity::Warn,
                json!({"timeout": e.data.get("timeout").cloned().unwrap_or(Value::Null)}),
            )],
            kind::PATTERN => {
                let name = e
                    .data
                    .get("pattern")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown");
                let line = e
                    .data
                    .get("line")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| self.matched_line(name, tail))
                    .unwrap_or_default();
                vec![self.say_at(
                    e.at.0,
                    &e.message,
                    tag::DUT_CONSOLE_PATTERN_MATCHED,
                    Severity::Info,
                    json!({"patterns": [name], "line": line}),
                )]
            }
            kind::TEARDOWN if e.data.get("ok") == Some(&Value::Bool(false)) => {
                vec![self.say_at(e.at.0, &e.message, tag::NO_TAG, Severity::Error, json!({}))]
            }
            kind::FINISHED => {
                let status = e
                    .data
                    .get("status")
                    .and_then(|s| serde_json::from_value::<JobStatus>(s.clone()).ok());
                if status == Some(JobStatus::SetupFail) {
                    return vec![
                        self.say_at(
                            e.at.0,
                            &e.message,
                            tag::JOB_INFRA_SETUP_ERROR,
                            Severity::Error,
                            json!({}),
                        ),
                        self.say_at(
                            e.at.0,
                            "teardown complete",
                            tag::JOB_INFRA_TEARDOWN_COMPLETE,
                            Severity::Info,
                            json!({}),
                        ),
                    ];
                }
                info(tag::JOB_INFRA_TEARDOWN_COMPLETE)
            }
            _ => info(tag::NO_TAG),
        }
    }

    /// The console line pattern `name` matched, from the session's console tail.
    fn matched_line(&self, name: &str, tail: &ConsoleTail) -> Option<String> {
        let p = &self.spec.as_ref()?.console_patterns;
        let pattern = match name {
            "session_end" => Some(&p.session_end),
            "session_reboot" => p.session_reboot.as_ref(),
            "job_success" => p.job_success.as_ref(),
            "job_warn" => p.job_warn.as_ref(),
            "machine_unfit_for_service" => p.machine_unfit_for_service.as_ref(),
            _ => None,
        }?;
        tail.last_matching(|l| pattern.regex().is_match(l))
    }
}

/// A phase event proper (`Reporter::phase`: `{"phase"}` alone); the other events of a phase
/// (the bucket created, salad's answer, ...) carry details besides.
fn is_phase_change(e: &Event) -> bool {
    e.data.as_object().is_some_and(|o| o.len() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dutgate_mars::model::Timestamp;

    fn event(kind: &str, message: &str, data: Value) -> Event {
        Event {
            seq: 1,
            at: Timestamp::now(),
            kind: kind.into(),
            message: message.into(),
            data,
        }
    }

    fn tags(frames: &[Frame]) -> Vec<u16> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Ctrl { tag, .. } => *tag,
                _ => u16::MAX,
            })
            .collect()
    }

    #[test]
    fn phases_get_ci_trons_tags() {
        let n = Narrator::new(None, 0);
        let t = ConsoleTail::default();
        let cases = [
            (
                event(kind::PHASE, "setting up the job", json!({"phase": "setup"})),
                vec![100],
            ),
            (
                event(
                    kind::PHASE,
                    "job bucket job-1 created",
                    json!({"phase": "setup", "bucket": "job-1"}),
                ),
                vec![0],
            ),
            (
                event(kind::PHASE, "attaching", json!({"phase": "console"})),
                vec![101],
            ),
            (
                event(kind::PHASE, "power cycle", json!({"phase": "power"})),
                vec![200],
            ),
            (
                event(kind::PHASE, "watching", json!({"phase": "running"})),
                vec![201],
            ),
            (
                event(kind::CONSOLE_ACTIVITY, "first console activity", json!({})),
                vec![300],
            ),
            (
                event(kind::TIMEOUT, "timeout", json!({"timeout": "overall"})),
                vec![400],
            ),
            (
                event(kind::PHASE, "tearing down", json!({"phase": "teardown"})),
                vec![105],
            ),
            (
                event(kind::FINISHED, "PASS: ok", json!({"status": "PASS"})),
                vec![106],
            ),
            (
                event(
                    kind::FINISHED,
                    "SETUP_FAIL: no",
                    json!({"status": "SETUP_FAIL"}),
                ),
                vec![102, 106],
            ),
            (event(kind::RETRY, "again", json!({})), vec![0]),
        ];
        for (e, want) in cases {
            assert_eq!(tags(&n.frames(&e, &t)), want, "{e:?}");
        }
    }

    #[test]
    fn a_pattern_names_its_line() {
        let yaml = "version: 1\ntarget: {tags: []}\nconsole_patterns:\n  session_end: {regex: \"^SESSION END$\"}\n  job_success: {regex: \"^RESULT: PASS$\"}\ndeployment:\n  start:\n    kernel: {url: \"http://x/k\"}\n";
        let spec = JobSpec::parse_and_render(yaml, &dutgate_jobspec::TemplateVars::placeholders())
            .unwrap();
        let n = Narrator::new(Some(spec), 0);
        let mut t = ConsoleTail::default();
        t.feed(b"booting\r\nRESULT: PASS\r\nmore\r\n");
        let f = n.frames(
            &event(
                kind::PATTERN,
                "console pattern job_success matched",
                json!({"pattern": "job_success"}),
            ),
            &t,
        );
        let Frame::Ctrl { tag, metadata, .. } = &f[0] else {
            panic!("{f:?}")
        };
        assert_eq!(*tag, 401);
        assert_eq!(
            metadata,
            &json!({"patterns": ["job_success"], "line": "RESULT: PASS"})
        );
        // Unknown line: an empty one, never a missing one (the client strips it).
        let f = n.frames(
            &event(kind::PATTERN, "m", json!({"pattern": "session_reboot"})),
            &t,
        );
        let Frame::Ctrl { metadata, .. } = &f[0] else {
            panic!("{f:?}")
        };
        assert_eq!(metadata["line"], "");
    }
}
