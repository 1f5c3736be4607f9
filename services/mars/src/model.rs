//! The wire types of mars: what its REST API answers and accepts. Shared by the server
//! ([`crate::api`]) and the typed client ([`crate::client`]), so both always agree.
//!
//! Field names follow valve-infra's MaRS where it had the field (`base_name`, `full_name`,
//! `tags`, `ip_address`, `local_tty_device`, `pdu`, `pdu_port_id`, `pdu_off_delay`,
//! `mac_address`, `ready_for_service`, `is_retired`); additions are additive.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use dutgate_core::{JobStatus, MachineId, Tag};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// A point in time: unix milliseconds inside, RFC 3339 (UTC) on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ToSchema)]
#[schema(value_type = String, format = DateTime)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self(ms)
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn plus_ms(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            }) {
            Some(s) => f.write_str(&s),
            None => write!(f, "{}ms", self.0),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
            .map_err(serde::de::Error::custom)?;
        Ok(Self((t.unix_timestamp_nanos() / 1_000_000) as i64))
    }
}

/// Where a machine is in its life (design.md §3).
// The one place transitions are decided is [`crate::state::transition`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MachineState {
    /// Registered, but no PDU port is known: mars cannot power it.
    WaitForConfig,
    /// Sergeant Hartman is (or will be, after a back-off) boot-looping it.
    Training,
    /// One verification boot (after a gateway restart, an activation or a dead job).
    QuickCheck,
    /// Fit for service, free: the executor may lease it for a job.
    Idle,
    /// Held by a job lease.
    Running,
    /// Taken out of service by an admin.
    Retired,
    /// Repeated failures: no jobs, retrained only after a long back-off or by an admin.
    Quarantined,
}

impl MachineState {
    pub const ALL: [MachineState; 7] = [
        MachineState::WaitForConfig,
        MachineState::Training,
        MachineState::QuickCheck,
        MachineState::Idle,
        MachineState::Running,
        MachineState::Retired,
        MachineState::Quarantined,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::WaitForConfig => "WAIT_FOR_CONFIG",
            MachineState::Training => "TRAINING",
            MachineState::QuickCheck => "QUICK_CHECK",
            MachineState::Idle => "IDLE",
            MachineState::Running => "RUNNING",
            MachineState::Retired => "RETIRED",
            MachineState::Quarantined => "QUARANTINED",
        }
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MachineState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let up = s.trim().to_ascii_uppercase();
        MachineState::ALL
            .into_iter()
            .find(|st| st.as_str() == up)
            .ok_or_else(|| format!("unknown machine state {s:?}"))
    }
}

/// Who a lease is for. Users' jobs lease `IDLE` machines (which become `RUNNING`); the
/// trainer's jobs lease `TRAINING`/`QUICK_CHECK` machines (whose state does not change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LeasePurpose {
    #[default]
    Job,
    Training,
}

impl LeasePurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            LeasePurpose::Job => "job",
            LeasePurpose::Training => "training",
        }
    }
}

impl FromStr for LeasePurpose {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "job" => Ok(LeasePurpose::Job),
            "training" => Ok(LeasePurpose::Training),
            _ => Err(format!("unknown lease purpose {s:?}")),
        }
    }
}

/// A machine held by a job. Only one lease per machine exists at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    /// Opaque id; the holder presents it to heartbeat and release.
    pub id: String,
    pub machine_id: MachineId,
    pub job_id: String,
    /// Who holds it (e.g. `executor@gateway1/pid`), for humans reading `dutctl machines show`.
    pub holder: String,
    pub purpose: LeasePurpose,
    pub acquired_at: Timestamp,
    /// Without a heartbeat before this instant the lease expires: the machine is freed and an
    /// infrastructure failure is recorded.
    pub expires_at: Timestamp,
    /// The TTL each heartbeat extends the lease by.
    pub ttl_seconds: u64,
}

/// `POST /api/v1/leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub machine_id: MachineId,
    pub job_id: String,
    pub holder: String,
    #[serde(default)]
    pub purpose: LeasePurpose,
    /// Defaults to the service's `lease_ttl_seconds`; bounded to 1..=3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// The lease's id, chosen by the requester (32 lowercase hex digits, [`LEASE_ID_LEN`], from
    /// a good random source): the executor records the dispatch under it while the lease is
    /// being taken, instead of after. Default: mars picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
}

/// How many lowercase hex digits a lease id has (128 random bits).
pub const LEASE_ID_LEN: usize = 32;

/// A new random lease id.
pub fn new_lease_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Whether `id` has the form of a lease id.
pub fn is_lease_id(id: &str) -> bool {
    id.len() == LEASE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `POST /api/v1/leases/batch`: many lease requests, granted or refused each on its own, in
/// one mars transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseBatchRequest {
    /// At most [`MAX_LEASE_BATCH`].
    pub leases: Vec<LeaseRequest>,
}

/// Most requests in one [`LeaseBatchRequest`].
pub const MAX_LEASE_BATCH: usize = 1000;

/// The answer to a [`LeaseBatchRequest`]: one result per request, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseBatchResponse {
    pub results: Vec<LeaseResult>,
}

/// One request's result: the lease, or the status and message `POST /api/v1/leases` would
/// have answered (409 machine busy or leased, 404 unknown machine, 400 invalid request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<LeaseRefusal>,
}

/// Why one lease of a batch was not granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseRefusal {
    /// The HTTP status `POST /api/v1/leases` would have answered (404, 409, 400, 503).
    pub status: u16,
    pub error: String,
}

/// How a job ended, from the machine's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// The job ran (whatever the test's verdict): the machine goes back to `IDLE`.
    Ok,
    /// The gateway failed the job (no power, no netboot, no console…). The machine goes back to
    /// `IDLE`; after `quarantine_after_infra_failures` in a row it is `QUARANTINED`.
    InfrastructureFailure,
    /// `machine_unfit_for_service` matched: the machine goes back to `TRAINING`.
    MachineUnfit,
}

impl ReleaseOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseOutcome::Ok => "ok",
            ReleaseOutcome::InfrastructureFailure => "infrastructure_failure",
            ReleaseOutcome::MachineUnfit => "machine_unfit",
        }
    }
}

/// `POST /api/v1/leases/{id}/release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub outcome: ReleaseOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One persisted state change (or lease change) of a machine, with who did it and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineEvent {
    /// Increasing sequence number over all machines; the cursor of `GET /api/v1/events`.
    pub seq: i64,
    pub machine_id: MachineId,
    pub at: Timestamp,
    pub from_state: MachineState,
    pub to_state: MachineState,
    /// What happened (`registered`, `lease_acquired`, `lease_expired`, `retired`, …).
    pub kind: String,
    /// Who: `admin`, `registration`, `trainer`, `executor:<holder>`, `mars` (timers).
    pub actor: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

impl MachineEvent {
    /// True when this event made a machine available to jobs: the scheduler's cue to dispatch.
    pub fn frees_machine(&self) -> bool {
        self.to_state == MachineState::Idle
            && (self.from_state != MachineState::Idle || self.kind == "lease_released")
    }
}

/// `GET /api/v1/events?after=N&timeout=S`: events with `seq > after`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventBatch {
    pub events: Vec<MachineEvent>,
    /// Pass this as `after` on the next call (equals `after` when nothing happened).
    pub next: i64,
}

/// valve-infra's in-machine training summary (`GET /api/v1/machines` shows it per machine).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct TrainingSummary {
    pub is_active: bool,
    pub is_registered: bool,
    pub boot_loop_counts: u32,
    pub qualifying_rate: u32,
    pub current_loop_count: u32,
    pub statuses: Vec<JobStatus>,
    /// Failed training attempts in a row (reset by a pass).
    pub consecutive_failures: u32,
    /// No new attempt before this instant (back-off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<Timestamp>,
    /// Last time the machine passed training (None: never trained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_at: Option<Timestamp>,
}

/// A machine record (design.md §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Machine {
    pub id: MachineId,
    /// valve-infra name of the id.
    pub mac_address: MachineId,
    pub base_name: String,
    /// `<farm>-<base_name>-<n>`: assigned once, never renumbered.
    pub full_name: String,
    /// Probed by `machine-registration`.
    pub tags: Vec<Tag>,
    /// Set by admins; matched like probed tags.
    pub manual_tags: Vec<Tag>,
    #[schema(value_type = Option<String>, required = true)]
    pub ip_address: Option<IpAddr>,
    /// Without `/dev/`, e.g. `ttyUSB0`.
    #[schema(required = true)]
    pub local_tty_device: Option<String>,
    #[schema(required = true)]
    pub pdu: Option<String>,
    #[schema(required = true)]
    pub pdu_port_id: Option<String>,
    /// Seconds the port is kept off during a power cycle.
    pub pdu_off_delay: f64,
    pub state: MachineState,
    #[schema(required = true)]
    pub comment: Option<String>,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
    /// Infrastructure failures in a row (reset by a good job).
    pub consecutive_infra_failures: u32,
    #[schema(required = true)]
    pub lease: Option<Lease>,
    pub training: TrainingSummary,
    /// valve-infra: `state == IDLE || state == RUNNING`.
    pub ready_for_service: bool,
    /// valve-infra: `state == RETIRED`.
    pub is_retired: bool,
}

impl Machine {
    /// Probed and manual tags together: what job targets are matched against.
    pub fn all_tags(&self) -> impl Iterator<Item = &Tag> {
        self.tags.iter().chain(self.manual_tags.iter())
    }

    /// True when every tag of `wanted` is one of the machine's tags.
    pub fn has_tags(&self, wanted: &[Tag]) -> bool {
        wanted.iter().all(|w| self.all_tags().any(|t| t == w))
    }
}

/// `GET /api/v1/machines`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MachineList {
    pub machines: Vec<Machine>,
}

/// `POST /api/v1/machine/`: what `machine-registration register` sends (valve-infra body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub base_name: String,
    pub tags: Vec<Tag>,
    pub mac_address: MachineId,
    #[schema(value_type = String)]
    pub ip_address: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_tty_device: Option<String>,
}

/// `PATCH /api/v1/machine/{id}`: the fields an admin may change. Absent = unchanged;
/// `null` clears the optional ones.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachinePatch {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "double_option"
    )]
    #[schema(value_type = Option<String>)]
    pub pdu: Option<Option<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "double_option"
    )]
    #[schema(value_type = Option<String>)]
    pub pdu_port_id: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pdu_off_delay: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_tags: Option<Vec<Tag>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "double_option"
    )]
    #[schema(value_type = Option<String>)]
    pub comment: Option<Option<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "double_option"
    )]
    #[schema(value_type = Option<String>)]
    pub local_tty_device: Option<Option<String>>,
}

/// `Option<Option<T>>` where a present `null` is `Some(None)` and an absent field is `None`.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, T: Serialize>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(inner) => inner.serialize(s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

/// `POST /api/v1/machine/{id}/retire`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    /// Cancel the running job instead of letting it finish (the machine is `RETIRED` either
    /// way; without the flag the job keeps its lease until it ends).
    #[serde(default)]
    pub cancel_job: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `POST /api/v1/machine/{id}/activate`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `POST /api/v1/machine/discover`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoverRequest {
    pub pdu: String,
    pub port_id: String,
    /// Seconds to wait for a registration; default 150 (valve-infra's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
}

/// The discovery in progress (`GET /api/v1/machine/discover`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Discovery {
    pub pdu: String,
    pub port_id: String,
    pub started_at: Timestamp,
    pub expires_at: Timestamp,
    pub timeout: f64,
}

/// `GET /api/v1/machine/discover`: `discovery` is null when none runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiscoveryStatus {
    #[schema(required = true)]
    pub discovery: Option<Discovery>,
}

/// Which part of a boot failed, so that a report says *why* (design.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailedStage {
    /// The PDU did not power the machine (or did not read back the state).
    Power,
    /// Powered, but it never netbooted the gateway's kernel (firmware/PXE/iPXE).
    Firmware,
    /// It booted, but the console stayed silent or did not reach salad both ways.
    Console,
    /// It booted and talked, but its hardware differs from the registered record.
    Identity,
    /// The job could not be set up or ended for a reason the runner could not attribute.
    Infrastructure,
}

impl FailedStage {
    pub fn as_str(self) -> &'static str {
        match self {
            FailedStage::Power => "power",
            FailedStage::Firmware => "firmware",
            FailedStage::Console => "console",
            FailedStage::Identity => "identity",
            FailedStage::Infrastructure => "infrastructure",
        }
    }
}

impl FromStr for FailedStage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            FailedStage::Power,
            FailedStage::Firmware,
            FailedStage::Console,
            FailedStage::Identity,
            FailedStage::Infrastructure,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| format!("unknown stage {s:?}"))
    }
}

/// Kind of a training run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Registration boot + boot loops.
    Training,
    /// One check boot.
    QuickCheck,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Training => "training",
            RunKind::QuickCheck => "quick_check",
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Running,
    Passed,
    Failed,
    Cancelled,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Running => "running",
            RunOutcome::Passed => "passed",
            RunOutcome::Failed => "failed",
            RunOutcome::Cancelled => "cancelled",
        }
    }
}

/// One boot of a training run: loop 0 is the registration boot, 1..=N the check boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoopReport {
    pub n: u32,
    /// `registration` or `check`.
    pub job_kind: String,
    #[schema(required = true)]
    pub job_id: Option<String>,
    pub status: JobStatus,
    pub started_at: Timestamp,
    pub duration_ms: i64,
    /// Set when the loop did not pass.
    #[schema(required = true)]
    pub failed_stage: Option<FailedStage>,
    /// The job's console log (an executor artifact URL).
    #[schema(required = true)]
    pub console_log_url: Option<String>,
    /// One sentence from the runner (e.g. the timeout that expired).
    #[schema(required = true)]
    pub detail: Option<String>,
}

impl LoopReport {
    pub fn passed(&self) -> bool {
        self.status == JobStatus::Pass
    }
}

/// A training or quick-check run with its loops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TrainingRun {
    pub id: i64,
    pub machine_id: MachineId,
    pub kind: RunKind,
    pub started_at: Timestamp,
    #[schema(required = true)]
    pub ended_at: Option<Timestamp>,
    pub outcome: RunOutcome,
    pub boot_loops: u32,
    pub qualifying: u32,
    pub passes: u32,
    pub failures: u32,
    #[schema(required = true)]
    pub reason: Option<String>,
    pub loops: Vec<LoopReport>,
}

/// `GET /api/v1/machine/{id}/training`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainingReport {
    pub machine_id: MachineId,
    pub state: MachineState,
    pub summary: TrainingSummary,
    /// Most recent first.
    pub runs: Vec<TrainingRun>,
}

/// `GET /api/v1/machine/{id}/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MachineEvents {
    pub events: Vec<MachineEvent>,
}

/// `GET /api/v1/leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LeaseList {
    pub leases: Vec<Lease>,
}
