//! The executor's wire types (what its REST API answers) and the job state machine.
//!
//! States and transitions are one enum and one function ([`transition`]): the store applies
//! every state change through it, so an impossible change (finishing a job twice, dispatching a
//! finished job) is refused in one place.

use std::fmt;
use std::str::FromStr;

use dutgate_core::{JobStatus, MachineId};
pub use dutgate_mars::model::Timestamp;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a job is in its life (docs/jobs.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Persisted, waiting for a machine.
    Queued,
    /// A machine is leased; the job process is being started.
    Dispatched,
    /// The job process runs.
    Running,
    /// Over, with a status and a reason.
    Finished,
}

impl JobState {
    pub const ALL: [JobState; 4] = [
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Finished,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Dispatched => "DISPATCHED",
            JobState::Running => "RUNNING",
            JobState::Finished => "FINISHED",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let up = s.trim().to_ascii_uppercase();
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == up)
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// What moves a job from one state to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// mars granted it a machine's lease (recorded only after the grant: a job never goes
    /// back to the queue).
    Dispatch,
    /// Its process started.
    Start,
    /// It ended (status decided), including cancellation and deadline expiry in the queue.
    Finish,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{trigger:?} is not allowed for a {from} job")]
pub struct InvalidTransition {
    pub from: JobState,
    pub trigger: Trigger,
}

/// The one place that decides where a job goes.
pub fn transition(from: JobState, trigger: Trigger) -> Result<JobState, InvalidTransition> {
    use JobState::*;
    match (from, trigger) {
        (Queued, Trigger::Dispatch) => Ok(Dispatched),
        // A re-attached executor may restart the process of a dispatched job.
        (Dispatched | Running, Trigger::Start) => Ok(Running),
        (Queued | Dispatched | Running, Trigger::Finish) => Ok(Finished),
        _ => Err(InvalidTransition { from, trigger }),
    }
}

/// Who a job is for: users' jobs lease `IDLE` machines; the trainer's lease machines in
/// `TRAINING`/`QUICK_CHECK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    #[default]
    Job,
    Training,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Job => "job",
            Purpose::Training => "training",
        }
    }
}

impl FromStr for Purpose {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "job" => Ok(Purpose::Job),
            "training" => Ok(Purpose::Training),
            _ => Err(format!("unknown purpose {s:?}: expected job or training")),
        }
    }
}

/// The machine a job wants.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct TargetView {
    pub id: Option<MachineId>,
    pub tags: Vec<String>,
}

/// A job as the API shows it (docs/jobs.md §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    pub id: i64,
    pub external_id: Option<String>,
    pub url: String,
    pub state: JobState,
    /// While running: setup, boot_config, console, power, running, teardown.
    pub phase: Option<String>,
    pub status: Option<JobStatus>,
    pub exit_code: Option<i32>,
    pub reason: Option<String>,
    pub priority: i64,
    pub purpose: Purpose,
    pub target: TargetView,
    pub deadline: Option<Timestamp>,
    pub machine_id: Option<MachineId>,
    pub submitted_at: Timestamp,
    pub dispatched_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub boots: i64,
    /// Size of the console log so far.
    pub console_bytes: u64,
    /// Name of the token that submitted the job.
    #[serde(default)]
    pub owner: String,
    /// The job description (only in `GET /api/v1/jobs/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

/// `GET /api/v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// `201` answer of `POST /api/v1/jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Submitted {
    pub id: i64,
    pub url: String,
    pub state: JobState,
}

/// One stored event of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub seq: i64,
    pub at: Timestamp,
    /// Stable, clients branch on it (`submitted`, `phase`, …, `finished`).
    pub kind: String,
    pub message: String,
    /// Kind-specific details (any JSON).
    pub data: serde_json::Value,
}

/// `GET /api/v1/jobs/{id}/events` without SSE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventList {
    pub events: Vec<Event>,
}

/// One artifact of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Artifact {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ArtifactList {
    pub artifacts: Vec<Artifact>,
}

/// Event kinds (docs/jobs.md §4); stable, clients branch on them.
pub mod kind {
    pub const SUBMITTED: &str = "submitted";
    pub const DISPATCHED: &str = "dispatched";
    pub const PROCESS_STARTED: &str = "process_started";
    pub const PHASE: &str = "phase";
    pub const BOOT: &str = "boot";
    pub const CONSOLE_ACTIVITY: &str = "console_activity";
    pub const PATTERN: &str = "pattern";
    pub const WATCHDOG: &str = "watchdog";
    pub const TIMEOUT: &str = "timeout";
    pub const RETRY: &str = "retry";
    pub const CANCEL_REQUESTED: &str = "cancel_requested";
    /// salad refused a console stream that announced this job's machine (a DUT printing
    /// another machine's id, a second stream, a netconsole from another address).
    pub const CONSOLE_REFUSED: &str = "console_refused";
    pub const TEARDOWN: &str = "teardown";
    pub const EXECUTOR: &str = "executor";
    pub const FINISHED: &str = "finished";
}

/// Phases of a running job (the `phase` field and `phase` events).
pub mod phase {
    pub const SETUP: &str = "setup";
    pub const BOOT_CONFIG: &str = "boot_config";
    pub const CONSOLE: &str = "console";
    pub const POWER: &str = "power";
    pub const RUNNING: &str = "running";
    pub const TEARDOWN: &str = "teardown";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_table() {
        use JobState::*;
        let triggers = [Trigger::Dispatch, Trigger::Start, Trigger::Finish];
        let expected: &[(JobState, Trigger, Option<JobState>)] = &[
            (Queued, Trigger::Dispatch, Some(Dispatched)),
            (Queued, Trigger::Start, None),
            (Queued, Trigger::Finish, Some(Finished)),
            (Dispatched, Trigger::Dispatch, None),
            (Dispatched, Trigger::Start, Some(Running)),
            (Dispatched, Trigger::Finish, Some(Finished)),
            (Running, Trigger::Dispatch, None),
            (Running, Trigger::Start, Some(Running)),
            (Running, Trigger::Finish, Some(Finished)),
            (Finished, Trigger::Dispatch, None),
            (Finished, Trigger::Start, None),
            (Finished, Trigger::Finish, None),
        ];
        assert_eq!(expected.len(), JobState::ALL.len() * triggers.len());
        for (from, trig, to) in expected {
            assert_eq!(transition(*from, *trig).ok(), *to, "{from} {trig:?}");
        }
    }

    #[test]
    fn state_names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
