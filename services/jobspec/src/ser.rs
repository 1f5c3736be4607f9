//! Writing a normalised job back out (YAML for `dutctl job validate`, JSON for job records).
//!
//! The output is itself a valid v1 job that parses back to an equal `JobSpec`: defaults are
//! written out, durations are split into days/hours/minutes/seconds/milliseconds, an infinite
//! timeout has no duration fields, and `continue` is written complete.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Serialize, Serializer};
use time::format_description::well_known::Rfc3339;

use crate::spec::{
    ConsolePatterns, Deployment, DeploymentState, JobSpec, Pattern, Target, Timeout, Timeouts,
};

#[derive(Serialize)]
struct OutJob<'a> {
    version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: Option<String>,
    target: OutTarget,
    timeouts: OutTimeouts,
    console_patterns: OutPatterns<'a>,
    deployment: &'a Deployment,
}

#[derive(Serialize)]
struct OutTarget {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    tags: Vec<String>,
}

#[derive(Serialize)]
struct OutTimeouts {
    overall: OutTimeout,
    infra_setup: OutTimeout,
    infra_teardown: OutTimeout,
    boot_cycle: OutTimeout,
    console_activity: OutTimeout,
    first_console_activity: OutTimeout,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    watchdogs: BTreeMap<String, OutTimeout>,
}

#[derive(Serialize, Default)]
struct OutTimeout {
    #[serde(skip_serializing_if = "Option::is_none")]
    days: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hours: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    minutes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    milliseconds: Option<Number>,
    retries: u32,
}

/// Whole milliseconds print as integers; only sub-millisecond durations need a fraction.
#[derive(Serialize)]
#[serde(untagged)]
enum Number {
    Int(u64),
    Float(f64),
}

#[derive(Serialize)]
struct OutPatterns<'a> {
    session_end: &'a Pattern,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_reboot: Option<&'a Pattern>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_success: Option<&'a Pattern>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_warn: Option<&'a Pattern>,
    #[serde(skip_serializing_if = "Option::is_none")]
    machine_unfit_for_service: Option<&'a Pattern>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    watchdogs: BTreeMap<&'a str, OutWatchdog<'a>>,
}

#[derive(Serialize)]
struct OutWatchdog<'a> {
    start: &'a Pattern,
    reset: &'a Pattern,
    stop: &'a Pattern,
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            regex: &'a str,
        }
        Out {
            regex: self.as_str(),
        }
        .serialize(serializer)
    }
}

impl Serialize for Deployment {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            start: &'a DeploymentState,
            r#continue: &'a DeploymentState,
        }
        Out {
            start: &self.start,
            r#continue: &self.r#continue,
        }
        .serialize(serializer)
    }
}

impl Serialize for DeploymentState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Kernel<'a> {
            url: &'a str,
            cmdline: &'a str,
        }
        #[derive(Serialize)]
        struct Initramfs<'a> {
            url: &'a str,
        }
        #[derive(Serialize)]
        struct Out<'a> {
            kernel: Kernel<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            initramfs: Option<Initramfs<'a>>,
        }
        Out {
            kernel: Kernel {
                url: &self.kernel.url,
                cmdline: &self.kernel.cmdline,
            },
            initramfs: self.initramfs.as_ref().map(|i| Initramfs { url: &i.url }),
        }
        .serialize(serializer)
    }
}

fn out_timeout(t: &Timeout) -> OutTimeout {
    let Some(d) = t.duration else {
        return OutTimeout {
            retries: t.retries,
            ..OutTimeout::default()
        };
    };
    let secs = d.as_secs();
    let nonzero = |v: u64| (v != 0).then_some(v);
    let sub_nanos = d.subsec_nanos();
    let milliseconds = if sub_nanos == 0 {
        None
    } else if sub_nanos % 1_000_000 == 0 {
        Some(Number::Int(u64::from(sub_nanos / 1_000_000)))
    } else {
        Some(Number::Float(f64::from(sub_nanos) / 1e6))
    };
    let mut out = OutTimeout {
        days: nonzero(secs / 86_400),
        hours: nonzero(secs % 86_400 / 3_600),
        minutes: nonzero(secs % 3_600 / 60),
        seconds: nonzero(secs % 60),
        milliseconds,
        retries: t.retries,
    };
    if d == Duration::ZERO {
        // A zero duration still needs a duration field, or it would read back as infinite.
        out.seconds = Some(0);
    }
    out
}

fn out_timeouts(t: &Timeouts) -> OutTimeouts {
    OutTimeouts {
        overall: out_timeout(&t.overall),
        infra_setup: out_timeout(&t.infra_setup),
        infra_teardown: out_timeout(&t.infra_teardown),
        boot_cycle: out_timeout(&t.boot_cycle),
        console_activity: out_timeout(&t.console_activity),
        first_console_activity: out_timeout(&t.first_console_activity),
        watchdogs: t
            .watchdogs
            .iter()
            .map(|(k, v)| (k.clone(), out_timeout(v)))
            .collect(),
    }
}

fn out_patterns(p: &ConsolePatterns) -> OutPatterns<'_> {
    OutPatterns {
        session_end: &p.session_end,
        session_reboot: p.session_reboot.as_ref(),
        job_success: p.job_success.as_ref(),
        job_warn: p.job_warn.as_ref(),
        machine_unfit_for_service: p.machine_unfit_for_service.as_ref(),
        watchdogs: p
            .watchdogs
            .iter()
            .map(|(k, w)| {
                (
                    k.as_str(),
                    OutWatchdog {
                        start: &w.start,
                        reset: &w.reset,
                        stop: &w.stop,
                    },
                )
            })
            .collect(),
    }
}

fn out_target(t: &Target) -> OutTarget {
    OutTarget {
        id: t.id.map(|id| id.to_string()),
        tags: t.tags.iter().map(|t| t.to_string()).collect(),
    }
}

impl Serialize for JobSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let deadline = match self.deadline {
            Some(d) => Some(d.format(&Rfc3339).map_err(serde::ser::Error::custom)?),
            None => None,
        };
        OutJob {
            version: self.version,
            deadline,
            target: out_target(&self.target),
            timeouts: out_timeouts(&self.timeouts),
            console_patterns: out_patterns(&self.console_patterns),
            deployment: &self.deployment,
        }
        .serialize(serializer)
    }
}

impl JobSpec {
    /// The normalised job as YAML; it parses back to an equal `JobSpec`.
    pub fn to_yaml(&self) -> Result<String, yaml_serde::Error> {
        yaml_serde::to_string(self)
    }
}
