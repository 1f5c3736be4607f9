//! Typed client of the mars REST API, for the executor (leases, machine list, "machine
//! freed" events), `dutctl machines …` and tests.
//!
//! Every call has a timeout (the core [`ApiClient`]'s 30 s, or the long-poll budget plus a
//! margin for [`MarsClient::events`]). Errors are [`ClientError`]s; the statuses callers
//! branch on are documented per method.
//!
//! The executor's scheduler needs no polling loop with sleeps:
//!
//! ```no_run
//! # async fn f(mars: dutgate_mars::client::MarsClient) -> Result<(), dutgate_core::client::ClientError> {
//! use std::time::Duration;
//! let mut cursor = mars.events_cursor().await?;          // "now": skip history
//! loop {
//!     let batch = mars.events(cursor, Duration::from_secs(30)).await?; // returns at once when something happened
//!     cursor = batch.next;
//!     if batch.events.iter().any(|e| e.frees_machine()) {
//!         // try to dispatch queued jobs onto the freed machines
//!     }
//! }
//! # }
//! ```

use std::time::Duration;

use dutgate_core::client::{ApiClient, ClientError};
use dutgate_core::config::GatewayConfig;
use dutgate_core::{MachineId, Secret, ServiceName};
use reqwest::{Method, StatusCode};

use crate::model::{
    ActivateRequest, DiscoverRequest, DiscoveryStatus, EventBatch, Lease, LeaseBatchRequest,
    LeaseBatchResponse, LeaseList, LeasePurpose, LeaseRefusal, LeaseRequest, Machine,
    MachineEvents, MachineList, MachinePatch, Registration, ReleaseOutcome, ReleaseRequest,
    RetireRequest, TrainingReport,
};

/// Longest long-poll the server accepts; longer requests are clamped to it.
pub const MAX_EVENTS_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct MarsClient {
    api: ApiClient,
}

impl MarsClient {
    /// `base` like `http://127.0.0.1:8001`; `token`: the admin token for admin routes, a
    /// service token for lease routes (read routes accept any valid token).
    pub fn new(base: impl Into<String>, token: Option<Secret>) -> Self {
        Self {
            api: ApiClient::new(base, token),
        }
    }

    /// A client over `api`, e.g. one whose requests present a lease (`X-Lease-Id`) instead of
    /// a token: what a job process uses for its own lease's heartbeat and release.
    pub fn from_api(api: ApiClient) -> Self {
        Self { api }
    }

    /// The client another service of the same gateway uses: internal URL, the service
    /// credential ([`dutgate_core::auth::service_token`]): leases and reads, no administration.
    pub fn for_gateway(gw: &GatewayConfig) -> Self {
        Self::new(
            gw.internal_url(ServiceName::Mars),
            dutgate_core::auth::service_token(gw),
        )
    }

    pub fn api(&self) -> &ApiClient {
        &self.api
    }

    // ---- machines ------------------------------------------------------------------------

    /// All machines, with state, tags and lease.
    pub async fn machines(&self) -> Result<Vec<Machine>, ClientError> {
        let list: MachineList = self.api.get("/api/v1/machines").await?;
        Ok(list.machines)
    }

    /// One machine; 404 when unknown.
    pub async fn machine(&self, id: MachineId) -> Result<Machine, ClientError> {
        self.api.get(&format!("/api/v1/machine/{id}")).await
    }

    /// Registration (what `machine-registration register` sends). Creates or updates.
    pub async fn register(&self, body: &Registration) -> Result<Machine, ClientError> {
        self.api.post("/api/v1/machine", body).await
    }

    /// Admin: change PDU, off delay, manual tags, comment. 409 when the change is not allowed
    /// in the machine's state (e.g. removing the PDU of a `RUNNING` machine).
    pub async fn patch(&self, id: MachineId, patch: &MachinePatch) -> Result<Machine, ClientError> {
        self.api
            .patch(&format!("/api/v1/machine/{id}"), patch)
            .await
    }

    /// Admin: take a machine out of service (cancels training; `cancel_job` also cancels the
    /// running job, else it finishes and the machine stays `RETIRED`).
    pub async fn retire(&self, id: MachineId, req: &RetireRequest) -> Result<Machine, ClientError> {
        self.api
            .post(&format!("/api/v1/machine/{id}/retire"), req)
            .await
    }

    /// Admin: back into service through a quick check (trained before) or training.
    pub async fn activate(
        &self,
        id: MachineId,
        req: &ActivateRequest,
    ) -> Result<Machine, ClientError> {
        self.api
            .post(&format!("/api/v1/machine/{id}/activate"), req)
            .await
    }

    /// The machine's persisted state changes, oldest first (at most `limit`, newest kept).
    pub async fn machine_events(
        &self,
        id: MachineId,
        limit: Option<u32>,
    ) -> Result<MachineEvents, ClientError> {
        let path = match limit {
            Some(n) => format!("/api/v1/machine/{id}/events?limit={n}"),
            None => format!("/api/v1/machine/{id}/events"),
        };
        self.api.get(&path).await
    }

    /// Training runs with their per-loop reports, most recent first.
    pub async fn training(&self, id: MachineId) -> Result<TrainingReport, ClientError> {
        self.api
            .get(&format!("/api/v1/machine/{id}/training"))
            .await
    }

    // ---- discovery -----------------------------------------------------------------------

    /// Admin: power `pdu`/`port_id` and bind the next unknown machine that registers to it.
    /// 409 when a discovery already runs or the port is assigned/on; 422 when the PDU refuses.
    pub async fn discover(&self, req: &DiscoverRequest) -> Result<DiscoveryStatus, ClientError> {
        self.api.post("/api/v1/machine/discover", req).await
    }

    pub async fn discovery(&self) -> Result<DiscoveryStatus, ClientError> {
        self.api.get("/api/v1/machine/discover").await
    }

    /// Admin: stop the discovery and power its port off.
    pub async fn stop_discovery(&self) -> Result<DiscoveryStatus, ClientError> {
        self.api.delete("/api/v1/machine/discover").await
    }

    // ---- leases (executor: service role; heartbeat and release: also the lease's holder) --

    /// Atomically leases `machine_id` for `job_id`.
    ///
    /// - `purpose = Job`: only an `IDLE` machine; it becomes `RUNNING`.
    /// - `purpose = Training`: only a `TRAINING`/`QUICK_CHECK` machine; its state is unchanged.
    ///
    /// Errors: 409 when the machine is not in such a state or already leased (another
    /// dispatcher won), 404 when unknown. Of concurrent attempts exactly one succeeds.
    pub async fn acquire(
        &self,
        machine_id: MachineId,
        job_id: &str,
        holder: &str,
        purpose: LeasePurpose,
        ttl: Option<Duration>,
    ) -> Result<Lease, ClientError> {
        let req = LeaseRequest {
            machine_id,
            job_id: job_id.to_string(),
            holder: holder.to_string(),
            purpose,
            ttl_seconds: ttl.map(|t| t.as_secs().max(1)),
            lease_id: None,
        };
        self.api.post("/api/v1/leases", &req).await
    }

    /// Many leases in one request and one mars transaction (`POST /api/v1/leases/batch`):
    /// one result per request, in order, each granted or refused exactly as
    /// [`MarsClient::acquire`] would be (a refusal carries the status `acquire` would have
    /// got: 409 busy or leased, 404 unknown). `Err` when the whole batch failed: then none of
    /// its leases was taken.
    pub async fn acquire_many(
        &self,
        reqs: &[LeaseRequest],
    ) -> Result<Vec<Result<Lease, LeaseRefusal>>, ClientError> {
        let body = LeaseBatchRequest {
            leases: reqs.to_vec(),
        };
        let resp: LeaseBatchResponse = self.api.post("/api/v1/leases/batch", &body).await?;
        if resp.results.len() != reqs.len() {
            return Err(ClientError::Decode {
                url: "/api/v1/leases/batch".into(),
                message: format!(
                    "{} results for {} lease requests",
                    resp.results.len(),
                    reqs.len()
                ),
            });
        }
        Ok(resp
            .results
            .into_iter()
            .map(|r| match (r.lease, r.error) {
                (Some(l), _) => Ok(l),
                (None, Some(e)) => Err(e),
                (None, None) => Err(LeaseRefusal {
                    status: 502,
                    error: "mars answered neither a lease nor an error".into(),
                }),
            })
            .collect())
    }

    /// Extends the lease by its TTL. 410 Gone when it already expired (or was released): the
    /// holder must stop using the machine.
    pub async fn heartbeat(&self, lease_id: &str) -> Result<Lease, ClientError> {
        self.api
            .post(&format!("/api/v1/leases/{lease_id}/heartbeat"), &())
            .await
    }

    /// Gives the machine back. `Ok` → `IDLE`; `InfrastructureFailure` → `IDLE` (or
    /// `QUARANTINED` after repeated ones); `MachineUnfit` → `TRAINING`. A retired machine stays
    /// `RETIRED`. 410 when the lease is gone.
    pub async fn release(
        &self,
        lease_id: &str,
        outcome: ReleaseOutcome,
        reason: Option<&str>,
    ) -> Result<Machine, ClientError> {
        let req = ReleaseRequest {
            outcome,
            reason: reason.map(str::to_string),
        };
        self.api
            .post(&format!("/api/v1/leases/{lease_id}/release"), &req)
            .await
    }

    /// Active leases.
    pub async fn leases(&self) -> Result<Vec<Lease>, ClientError> {
        let list: LeaseList = self.api.get("/api/v1/leases").await?;
        Ok(list.leases)
    }

    // ---- events --------------------------------------------------------------------------

    /// Long-poll: machine events with `seq > after`, oldest first. Answers as soon as one
    /// exists, or with an empty batch after `wait` (clamped to [`MAX_EVENTS_WAIT`]).
    /// Use [`crate::model::MachineEvent::frees_machine`] to spot machines that became `IDLE`.
    pub async fn events(&self, after: i64, wait: Duration) -> Result<EventBatch, ClientError> {
        let wait = wait.min(MAX_EVENTS_WAIT);
        let path = format!(
            "/api/v1/events?after={after}&timeout={}",
            wait.as_secs_f64()
        );
        let rb = self
            .api
            .request(Method::GET, &path)
            .timeout(wait + Duration::from_secs(10));
        self.api.send(rb, &path).await
    }

    /// The current end of the event stream, to start following from "now".
    pub async fn events_cursor(&self) -> Result<i64, ClientError> {
        let batch: EventBatch = self.api.get("/api/v1/events?latest=true").await?;
        Ok(batch.next)
    }
}

/// True when `err` is the 409 of a lost lease race or a busy machine.
pub fn is_conflict(err: &ClientError) -> bool {
    err.status() == Some(StatusCode::CONFLICT)
}

/// True when `err` says the lease is gone (expired or released).
pub fn is_gone(err: &ClientError) -> bool {
    err.status() == Some(StatusCode::GONE)
}
