//! `JobStatus` and its pinned `dutctl` exit codes (design.md §8). Never renumber these: CI
//! pipelines branch on them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// The test said it passed (`job_success` matched).
    Pass,
    /// The test passed with warnings (`job_warn` matched).
    Warn,
    /// The session ended, and the job defines no success pattern.
    Complete,
    /// The test's own verdict: the session ended without `job_success`.
    Fail,
    /// Infrastructure outcome: the session never ended properly (timeouts, cancellation, …).
    Incomplete,
    /// The status could not be determined.
    Unknown,
    /// Infrastructure outcome: the job could not be set up (bad artifact, no power, …).
    SetupFail,
}

impl JobStatus {
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Pass,
        JobStatus::Warn,
        JobStatus::Complete,
        JobStatus::Fail,
        JobStatus::Incomplete,
        JobStatus::Unknown,
        JobStatus::SetupFail,
    ];

    /// The process exit code `dutctl run` ends with.
    pub const fn exit_code(self) -> i32 {
        match self {
            JobStatus::Pass => 0,
            JobStatus::Warn => 1,
            JobStatus::Complete => 2,
            JobStatus::Fail => 3,
            JobStatus::Incomplete => 4,
            JobStatus::Unknown => 5,
            JobStatus::SetupFail => 6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pass => "PASS",
            JobStatus::Warn => "WARN",
            JobStatus::Complete => "COMPLETE",
            JobStatus::Fail => "FAIL",
            JobStatus::Incomplete => "INCOMPLETE",
            JobStatus::Unknown => "UNKNOWN",
            JobStatus::SetupFail => "SETUP_FAIL",
        }
    }

    /// Infrastructure outcomes are reported as such (GitLab retries them), never as test failures.
    pub const fn is_infrastructure_failure(self) -> bool {
        matches!(
            self,
            JobStatus::Incomplete | JobStatus::SetupFail | JobStatus::Unknown
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job status {0:?}")]
pub struct InvalidJobStatus(pub String);

impl FromStr for JobStatus {
    type Err = InvalidJobStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| InvalidJobStatus(s.chars().take(32).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_pinned() {
        let codes: Vec<i32> = JobStatus::ALL.iter().map(|s| s.exit_code()).collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4, 5, 6]);
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
