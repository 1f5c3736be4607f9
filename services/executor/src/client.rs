//! Typed client of the executor's REST API (docs/jobs.md §4), for `dutctl`, tests and mars'
//! trainer: [`ExecutorClient`] implements mars' [`JobRunner`], so Sergeant Hartman's boots go
//! through the queue like any job (as training jobs, which the service role submits).

use dutgate_core::http::encode_component;
use std::time::Duration;

use dutgate_core::client::{ApiClient, ClientError};
use dutgate_core::config::GatewayConfig;
use dutgate_core::{JobStatus, MachineId, Secret, ServiceName};
use dutgate_mars::model::FailedStage;
use dutgate_mars::training::{JobOutcome, JobRunner, RunnerError};
use futures::future::BoxFuture;
use reqwest::Method;

use crate::model::{EventList, Job, JobList, JobState, Purpose, Submitted};

/// Options of a submission (query parameters of `POST /api/v1/jobs`).
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    pub priority: i64,
    /// `false`: 409 at once when no matching machine is free.
    pub wait: bool,
    pub purpose: Purpose,
    /// Replaces the job's `target.id`.
    pub target_id: Option<MachineId>,
    /// Client-side label (`external_id`).
    pub job_id: Option<String>,
}

impl SubmitOptions {
    pub fn new() -> Self {
        Self {
            wait: true,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExecutorClient {
    api: ApiClient,
    /// Pause between two looks at a job being waited for.
    pub poll: Duration,
}

impl ExecutorClient {
    pub fn new(base: impl Into<String>, token: Option<Secret>) -> Self {
        Self {
            api: ApiClient::new(base, token),
            poll: Duration::from_millis(500),
        }
    }

    /// The client another service of the gateway uses: internal URL, the service credential
    /// ([`dutgate_core::auth::service_token`]), which may submit and stop training jobs.
    pub fn for_gateway(gw: &GatewayConfig) -> Self {
        Self::new(
            gw.internal_url(ServiceName::Executor),
            dutgate_core::auth::service_token(gw),
        )
    }

    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    /// Submits a job description (YAML body).
    pub async fn submit(&self, yaml: &str, opts: &SubmitOptions) -> Result<Submitted, ClientError> {
        let mut q = vec![
            format!("priority={}", opts.priority),
            format!("wait={}", opts.wait),
            format!("purpose={}", opts.purpose.as_str()),
        ];
        if let Some(id) = opts.target_id {
            q.push(format!("target_id={}", encode_component(&id.to_string())));
        }
        if let Some(j) = &opts.job_id {
            q.push(format!("job_id={}", encode_component(j)));
        }
        let path = format!("/api/v1/jobs?{}", q.join("&"));
        let rb = self
            .api
            .request(Method::POST, &path)
            .header(reqwest::header::CONTENT_TYPE, "application/x-yaml")
            .body(yaml.to_string());
        self.api.send(rb, &path).await
    }

    pub async fn job(&self, id: i64) -> Result<Job, ClientError> {
        self.api.get(&format!("/api/v1/jobs/{id}")).await
    }

    /// The newest jobs (at most `limit`), optionally in one state.
    pub async fn jobs(&self, state: Option<JobState>, limit: u32) -> Result<Vec<Job>, ClientError> {
        let path = match state {
            Some(s) => format!("/api/v1/jobs?state={s}&limit={limit}"),
            None => format!("/api/v1/jobs?limit={limit}"),
        };
        Ok(self.api.get::<JobList>(&path).await?.jobs)
    }

    pub async fn events(&self, id: i64, after: i64) -> Result<EventList, ClientError> {
        self.api
            .get(&format!("/api/v1/jobs/{id}/events?after={after}"))
            .await
    }

    pub async fn cancel(&self, id: i64) -> Result<Job, ClientError> {
        self.api
            .post(&format!("/api/v1/jobs/{id}/cancel"), &())
            .await
    }

    /// Waits until the job is finished.
    pub async fn wait(&self, id: i64) -> Result<Job, ClientError> {
        loop {
            let job = self.job(id).await?;
            if job.state == JobState::Finished {
                return Ok(job);
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// Which stage of a training boot failed, from how the job ended.
pub fn failed_stage(job: &Job) -> Option<FailedStage> {
    let status = job.status?;
    if matches!(
        status,
        JobStatus::Pass | JobStatus::Warn | JobStatus::Complete
    ) {
        return None;
    }
    let reason = job.reason.as_deref().unwrap_or_default();
    Some(if reason.contains("power cycle") {
        FailedStage::Power
    } else if reason.contains("first_console_activity") {
        FailedStage::Console
    } else if status == JobStatus::Fail {
        FailedStage::Identity
    } else {
        FailedStage::Infrastructure
    })
}

fn runner_err(e: impl std::fmt::Display) -> RunnerError {
    RunnerError(e.to_string())
}

impl JobRunner for ExecutorClient {
    fn submit(&self, machine: MachineId, job: &str) -> BoxFuture<'_, Result<String, RunnerError>> {
        let job = job.to_string();
        Box::pin(async move {
            let opts = SubmitOptions {
                priority: 100,
                wait: true,
                purpose: Purpose::Training,
                target_id: Some(machine),
                job_id: None,
            };
            self.submit(&job, &opts)
                .await
                .map(|s| s.id.to_string())
                .map_err(runner_err)
        })
    }

    fn wait(&self, job_id: &str) -> BoxFuture<'_, Result<JobOutcome, RunnerError>> {
        let job_id = job_id.to_string();
        Box::pin(async move {
            let id: i64 = job_id.parse().map_err(runner_err)?;
            let job = ExecutorClient::wait(self, id).await.map_err(runner_err)?;
            Ok(JobOutcome {
                status: job.status.unwrap_or(JobStatus::Unknown),
                failed_stage: failed_stage(&job),
                console_log_url: Some(format!("{}/artifacts/console.log", job.url)),
                detail: job.reason.clone(),
            })
        })
    }

    fn cancel(&self, job_id: &str) -> BoxFuture<'_, Result<(), RunnerError>> {
        let job_id = job_id.to_string();
        Box::pin(async move {
            let id: i64 = job_id.parse().map_err(runner_err)?;
            match ExecutorClient::cancel(self, id).await {
                Ok(_) => Ok(()),
                // Already finished: nothing to cancel.
                Err(e) if e.status() == Some(reqwest::StatusCode::CONFLICT) => Ok(()),
                Err(e) => Err(runner_err(e)),
            }
        })
    }
}
