//! The console-pattern engine: a pure, synchronous state machine. The executor feeds it the
//! console bytes as they arrive and acts on the events it returns; it does no I/O and keeps no
//! clock (timeouts are the executor's).
//!
//! Semantics, from valve-infra's `ConsoleState` (see docs/job-format.md):
//! - the console is cut into lines at `\n`; a pattern is searched in each line without its
//!   `\n`. A line ending in `\r` is tried as is (so valve-infra's `…\r$` patterns match) and
//!   without the `\r` (so `…$` patterns match on `\r\n` consoles too);
//! - a line longer than [`MAX_LINE`] is cut there, so a console that never sends `\n` cannot
//!   grow memory; the cut depends only on the bytes, never on how they were chunked;
//! - activity starts at the first `\n` of a boot: garbage at power-on is not activity;
//! - matches are sticky for the whole job, except `session_reboot`, cleared at every boot;
//! - watchdogs: `start` arms a stopped watchdog, then `reset` re-arms it and `stop` stops it;
//!   all are stopped at every boot; a watchdog without a `timeouts.watchdogs` entry of the same
//!   name is ignored;
//! - every matching line produces its event, in the order session_end, session_reboot,
//!   job_success, job_warn, machine_unfit_for_service, then watchdogs by name.

use dutgate_core::JobStatus;

use crate::spec::{ConsolePatterns, JobSpec, Pattern, Timeouts, WatchdogPatterns};

/// Lines are cut after this many bytes without a `\n`.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchdogAction {
    Start,
    Reset,
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConsoleEvent {
    /// The first complete console line of this boot (stops `first_console_activity`, starts
    /// `console_activity`).
    FirstActivity,
    SessionEnd,
    SessionReboot,
    JobSuccess,
    JobWarn,
    /// The machine is unfit: the session ends and the machine goes back to training.
    MachineUnfit,
    Watchdog {
        name: String,
        action: WatchdogAction,
    },
}

#[derive(Debug, Clone)]
struct Watchdog {
    name: String,
    patterns: WatchdogPatterns,
    running: bool,
}

#[derive(Debug, Clone)]
pub struct PatternEngine {
    session_end: Pattern,
    session_reboot: Option<Pattern>,
    job_success: Option<Pattern>,
    job_warn: Option<Pattern>,
    machine_unfit: Option<Pattern>,
    watchdogs: Vec<Watchdog>,
    line: Vec<u8>,
    active: bool,
    seen_session_end: bool,
    seen_reboot: bool,
    seen_success: bool,
    seen_warn: bool,
    seen_unfit: bool,
}

impl PatternEngine {
    /// An engine for `patterns`; watchdogs are kept only when `timeouts` has one of that name.
    pub fn new(patterns: &ConsolePatterns, timeouts: &Timeouts) -> Self {
        let watchdogs = patterns
            .watchdogs
            .iter()
            .filter(|(name, _)| timeouts.watchdogs.contains_key(*name))
            .map(|(name, p)| Watchdog {
                name: name.clone(),
                patterns: p.clone(),
                running: false,
            })
            .collect();
        Self {
            session_end: patterns.session_end.clone(),
            session_reboot: patterns.session_reboot.clone(),
            job_success: patterns.job_success.clone(),
            job_warn: patterns.job_warn.clone(),
            machine_unfit: patterns.machine_unfit_for_service.clone(),
            watchdogs,
            line: Vec::new(),
            active: false,
            seen_session_end: false,
            seen_reboot: false,
            seen_success: false,
            seen_warn: false,
            seen_unfit: false,
        }
    }

    pub fn for_job(job: &JobSpec) -> Self {
        Self::new(&job.console_patterns, &job.timeouts)
    }

    /// Starts a new boot: clears `session_reboot`, stops the watchdogs, forgets the partial
    /// line of the previous boot and waits again for first activity.
    pub fn new_boot(&mut self) {
        self.seen_reboot = false;
        self.active = false;
        self.line.clear();
        for w in &mut self.watchdogs {
            w.running = false;
        }
    }

    /// Feeds console bytes; returns the events of every line they complete.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        while !bytes.is_empty() {
            let room = MAX_LINE - self.line.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.line.extend_from_slice(&window[..i]);
                    bytes = &bytes[i + 1..];
                    self.end_line(&mut events);
                }
                None => {
                    self.line.extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.line.len() >= MAX_LINE {
                        self.end_line(&mut events);
                    }
                }
            }
        }
        events
    }

    /// The console closed: the partial last line, if any, is a line too.
    pub fn finish(&mut self) -> Vec<ConsoleEvent> {
        let mut events = Vec::new();
        if !self.line.is_empty() {
            self.end_line(&mut events);
        }
        events
    }

    fn end_line(&mut self, events: &mut Vec<ConsoleEvent>) {
        let line = std::mem::take(&mut self.line);
        if !self.active {
            self.active = true;
            events.push(ConsoleEvent::FirstActivity);
        }
        let stripped = line.strip_suffix(b"\r");
        let hit = |p: &Pattern| {
            p.regex().is_match(&line) || stripped.is_some_and(|s| p.regex().is_match(s))
        };
        let opt = |p: &Option<Pattern>| p.as_ref().is_some_and(hit);
        if hit(&self.session_end) {
            self.seen_session_end = true;
            events.push(ConsoleEvent::SessionEnd);
        }
        if opt(&self.session_reboot) {
            self.seen_reboot = true;
            events.push(ConsoleEvent::SessionReboot);
        }
        if opt(&self.job_success) {
            self.seen_success = true;
            events.push(ConsoleEvent::JobSuccess);
        }
        if opt(&self.job_warn) {
            self.seen_warn = true;
            events.push(ConsoleEvent::JobWarn);
        }
        if opt(&self.machine_unfit) {
            self.seen_unfit = true;
            events.push(ConsoleEvent::MachineUnfit);
        }
        for w in &mut self.watchdogs {
            let action = if !w.running {
                hit(&w.patterns.start).then_some(WatchdogAction::Start)
            } else if hit(&w.patterns.stop) {
                Some(WatchdogAction::Stop)
            } else {
                hit(&w.patterns.reset).then_some(WatchdogAction::Reset)
            };
            if let Some(action) = action {
                w.running = action != WatchdogAction::Stop;
                events.push(ConsoleEvent::Watchdog {
                    name: w.name.clone(),
                    action,
                });
            }
        }
        // Reuse the allocation for the next line.
        self.line = line;
        self.line.clear();
    }

    /// Whether the session is over: `session_end` seen, or the machine declared itself unfit.
    pub fn session_ended(&self) -> bool {
        self.seen_session_end || self.seen_unfit
    }

    /// Whether this boot asked for a power cycle (`session_reboot`).
    pub fn reboot_requested(&self) -> bool {
        self.seen_reboot
    }

    pub fn machine_unfit(&self) -> bool {
        self.seen_unfit
    }

    /// Whether the console has produced a complete line during this boot.
    pub fn has_activity(&self) -> bool {
        self.active
    }

    pub fn watchdog_running(&self, name: &str) -> bool {
        self.watchdogs.iter().any(|w| w.name == name && w.running)
    }

    /// The job status the console supports (valve-infra's `ConsoleState.job_status`):
    /// no `session_end` → INCOMPLETE; with a `job_success` pattern → PASS, WARN (success and
    /// warn seen) or FAIL; without one → COMPLETE.
    pub fn status(&self) -> JobStatus {
        derive_status(
            self.seen_session_end,
            self.job_success.is_some(),
            self.seen_success,
            self.seen_warn,
        )
    }
}

/// The status table of design.md §8, for callers that track the flags themselves.
pub fn derive_status(
    session_end: bool,
    success_defined: bool,
    success: bool,
    warn: bool,
) -> JobStatus {
    match (session_end, success_defined, success, warn) {
        (false, ..) => JobStatus::Incomplete,
        (true, true, true, true) => JobStatus::Warn,
        (true, true, true, false) => JobStatus::Pass,
        (true, true, false, _) => JobStatus::Fail,
        (true, false, ..) => JobStatus::Complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Timeout;
    use std::time::Duration;

    fn p(s: &str) -> Pattern {
        Pattern::new(s).unwrap()
    }

    fn engine(success: bool) -> PatternEngine {
        let mut patterns = ConsolePatterns {
            session_end: p(r"^.*It's now safe to turn off your computer\r$"),
            session_reboot: Some(p("GPU hang detected!")),
            job_success: success.then(|| p(r"^.*Execution is over, pipeline status: 0\r$")),
            job_warn: Some(p("^WARN$")),
            machine_unfit_for_service: Some(p("MCE: Hardware Error")),
            watchdogs: Default::default(),
        };
        patterns.watchdogs.insert(
            "deqp".into(),
            WatchdogPatterns {
                start: p("deqp-runner starting"),
                reset: p(r"Pass: \d+"),
                stop: p("deqp-runner done"),
            },
        );
        patterns.watchdogs.insert(
            "orphan".into(),
            WatchdogPatterns {
                start: p("deqp-runner starting"),
                reset: p("x"),
                stop: p("y"),
            },
        );
        let mut timeouts = Timeouts::default();
        timeouts
            .watchdogs
            .insert("deqp".into(), Timeout::new(Duration::from_secs(300), 1));
        PatternEngine::new(&patterns, &timeouts)
    }

    #[test]
    fn status_table() {
        use JobStatus::*;
        assert_eq!(derive_status(false, true, true, true), Incomplete);
        assert_eq!(derive_status(true, true, true, false), Pass);
        assert_eq!(derive_status(true, true, true, true), Warn);
        assert_eq!(derive_status(true, true, false, true), Fail);
        assert_eq!(derive_status(true, false, false, true), Complete);
    }

    #[test]
    fn a_passing_boot_with_crlf_and_garbage() {
        let mut e = engine(true);
        assert_eq!(e.feed(b"\xff\x00garbage"), vec![]);
        assert!(!e.has_activity());
        assert_eq!(e.feed(b"\r\n"), vec![ConsoleEvent::FirstActivity]);
        assert_eq!(e.status(), JobStatus::Incomplete);
        let ev = e.feed(
            b"Execution is over, pipeline status: 0\r\nIt's now safe to turn off your computer\r\n",
        );
        assert_eq!(ev, vec![ConsoleEvent::JobSuccess, ConsoleEvent::SessionEnd]);
        assert!(e.session_ended());
        assert_eq!(e.status(), JobStatus::Pass);
        e.feed(b"WARN\r\n");
        assert_eq!(e.status(), JobStatus::Warn);
    }

    #[test]
    fn default_session_end_matches_on_crlf_consoles() {
        let mut e = PatternEngine::new(&ConsolePatterns::default(), &Timeouts::default());
        let ev = e.feed(b"[   12.345678] reboot: Power Down\r\n");
        assert_eq!(
            ev,
            vec![ConsoleEvent::FirstActivity, ConsoleEvent::SessionEnd]
        );
        assert_eq!(e.status(), JobStatus::Complete);
    }

    #[test]
    fn failing_and_unfit() {
        let mut e = engine(true);
        e.feed(b"It's now safe to turn off your computer\r\n");
        assert_eq!(e.status(), JobStatus::Fail);
        let mut e = engine(false);
        let ev = e.feed(b"MCE: Hardware Error\n");
        assert!(ev.contains(&ConsoleEvent::MachineUnfit));
        assert!(e.session_ended() && e.machine_unfit());
        assert_eq!(e.status(), JobStatus::Incomplete);
    }

    #[test]
    fn reboot_is_per_boot_and_watchdogs_stop_at_boot() {
        let mut e = engine(true);
        e.feed(b"GPU hang detected!\n");
        assert!(e.reboot_requested());
        let ev = e.feed(b"deqp-runner starting\n");
        assert_eq!(
            ev,
            vec![ConsoleEvent::Watchdog {
                name: "deqp".into(),
                action: WatchdogAction::Start
            }]
        );
        // Start again while running is neither a start nor a reset.
        assert_eq!(e.feed(b"deqp-runner starting\n"), vec![]);
        assert_eq!(
            e.feed(b"Pass: 12\n"),
            vec![ConsoleEvent::Watchdog {
                name: "deqp".into(),
                action: WatchdogAction::Reset
            }]
        );
        e.new_boot();
        assert!(!e.reboot_requested() && !e.watchdog_running("deqp") && !e.has_activity());
        assert_eq!(e.feed(b"Pass: 13\n"), vec![ConsoleEvent::FirstActivity]);
        e.feed(b"deqp-runner starting\n");
        assert_eq!(
            e.feed(b"deqp-runner done\n"),
            vec![ConsoleEvent::Watchdog {
                name: "deqp".into(),
                action: WatchdogAction::Stop
            }]
        );
        assert!(!e.watchdog_running("orphan"));
    }

    #[test]
    fn long_lines_are_cut_and_partial_lines_flushed() {
        let mut e = engine(false);
        let mut long = vec![b'a'; MAX_LINE * 2 + 10];
        long.extend_from_slice(b"MCE: Hardware Error");
        let ev = e.feed(&long);
        assert_eq!(ev, vec![ConsoleEvent::FirstActivity]);
        assert_eq!(e.finish(), vec![ConsoleEvent::MachineUnfit]);
    }
}
