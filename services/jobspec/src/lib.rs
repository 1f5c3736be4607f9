//! dutgate-jobspec: the job description, valve-infra/ci-tron v1 compatible.
//!
//! A job goes through three steps, all pure and synchronous (no I/O anywhere in this crate):
//! 1. **render**: the text is a Jinja2 template, rendered with [`TemplateVars`] (minijinja,
//!    undefined variables are errors);
//! 2. **parse and validate** into a normalised [`JobSpec`]: defaults applied, durations as
//!    `Option<Duration>` (None = infinite), regexes compiled as bytes regexes, `continue`
//!    completed from `start`. Every problem is reported as a [`JobError`] naming the field
//!    path and the line/column in the submitted text, all of them at once;
//! 3. **run**: the executor feeds the console to a [`PatternEngine`] and acts on the
//!    [`ConsoleEvent`]s; the engine derives the job status.
//!
//! ```
//! use dutgate_jobspec::{JobSpec, PatternEngine, TemplateVars};
//! let job = JobSpec::parse_and_render(
//!     "deployment:\n  start:\n    kernel: {url: 'http://gw/k', cmdline: [a, b]}\n",
//!     &TemplateVars::default(),
//! ).unwrap();
//! assert_eq!(job.deployment_for(1).1.kernel.cmdline, "a b");
//! let mut engine = PatternEngine::for_job(&job);
//! engine.feed(b"[   12.345678] reboot: Power Down\r\n");
//! assert_eq!(engine.status().as_str(), "COMPLETE");
//! ```
//!
//! The format is documented field by field in `docs/job-format.md`.

mod error;
#[doc(hidden)]
pub mod fuzzing;
mod patterns;
mod ser;
mod spec;
mod template;
mod yaml;

pub use error::{JobError, JobErrorKind, JobErrors, Location};
pub use patterns::{ConsoleEvent, MAX_LINE, PatternEngine, WatchdogAction, derive_status};
pub use spec::{
    BootKind, ConsolePatterns, DEFAULT_INFRA_TEARDOWN, DEFAULT_INITRAMFS_VAR, DEFAULT_KERNEL_VAR,
    DEFAULT_OVERALL, DEFAULT_SESSION_END, Deployment, DeploymentState, Initramfs, JobSpec, Kernel,
    MAX_WATCHDOGS, Pattern, Target, Timeout, Timeouts, WatchdogPatterns, render,
};
pub use template::{
    JobBucketVars, MAX_JOB_BYTES, MachineVars, TemplateVars, VALVE_INFRA_REGISTRIES,
};
