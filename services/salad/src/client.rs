//! Typed client of salad's REST API, for the executor and `dutctl`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dutgate_salad::client::SaladClientError> {
//! use dutgate_salad::client::SaladClient;
//! let salad = SaladClient::new("http://127.0.0.1:8005", None);
//! let id = "52:54:00:12:34:56".parse().unwrap();
//! let console = salad.machine(id).await?;          // creates the server if needed
//! let sock = salad.connect(id, "127.0.0.1").await?; // a TcpStream to tcp_port
//! # Ok(()) }
//! ```
//!
//! A job process that holds a machine's lease (and no admin token) presents the lease id:
//!
//! ```no_run
//! # async fn demo(lease_id: &str) -> Result<(), dutgate_salad::client::SaladClientError> {
//! use dutgate_salad::client::SaladClient;
//! let id = "52:54:00:12:34:56".parse().unwrap();
//! let salad = SaladClient::new("http://127.0.0.1:8005", None).with_lease(lease_id);
//! salad.set_secrets(id, &["AKIA0123456789".into()]).await?; // masked on every console sink
//! salad.expect(id).await?;                                    // then power the machine on
//! let refused = salad.refusals(id, 0).await?;                 // streams that claimed it
//! # Ok(()) }
//! ```

use std::time::Duration;

use dutgate_core::client::{ApiClient, ClientError};
use dutgate_core::{MachineId, Secret};
use reqwest::Method;
use tokio::net::TcpStream;

use crate::api::{BindBody, LEASE_HEADER, LOG_END_HEADER, LOG_START_HEADER, SecretsBody};
pub use crate::api::{MachineConsole, MachineList, PortList, RefusalList};
pub use crate::console_log::{LogSlice, Since};
pub use crate::relay::Refusal;

/// How long connecting to a console port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SaladClientError {
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error("console of {machine} at {addr}: {source}")]
    Connect {
        machine: MachineId,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("console of {machine} at {addr}: no answer within {CONNECT_TIMEOUT:?}")]
    ConnectTimeout { machine: MachineId, addr: String },
}

#[derive(Debug, Clone)]
pub struct SaladClient {
    api: ApiClient,
    /// Presented as `X-Lease-Id` on every request (see [`SaladClient::with_lease`]).
    lease: Option<Secret>,
}

fn since_param(since: &Since) -> String {
    match since {
        Since::Offset(o) => o.to_string(),
        // UTC, so the value needs no escaping in a query string (no `+`).
        Since::Time(t) => t
            .to_offset(time::UtcOffset::UTC)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    }
}

impl SaladClient {
    /// `base` is salad's URL (e.g. `gateway.internal_url(ServiceName::Salad)`); the token is
    /// only needed for [`delete_machine`](Self::delete_machine).
    pub fn new(base: impl Into<String>, token: Option<Secret>) -> Self {
        Self {
            api: ApiClient::new(base, token),
            lease: None,
        }
    }

    pub fn from_api(api: ApiClient) -> Self {
        Self { api, lease: None }
    }

    /// Presents `lease_id` (the machine's current lease, as mars granted it) on every request:
    /// what the holder of a lease may do without the admin token (expect, secrets, console,
    /// reads). A bearer token, when the client has one, is checked instead.
    pub fn with_lease(mut self, lease_id: &str) -> Self {
        self.lease = Some(Secret::new(lease_id));
        self
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.api.request(method, path);
        match &self.lease {
            Some(l) => rb.header(LEASE_HEADER, l.expose()),
            None => rb,
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&dyn erased::Body>,
    ) -> Result<T, SaladClientError> {
        let mut rb = self.request(method, path);
        if let Some(b) = body {
            rb = b.attach(rb);
        }
        Ok(self.api.send(rb, path).await?)
    }

    /// A boot of the machine is about to start (call it right before powering the machine
    /// on): for `salad.expect_window_seconds`, a console stream that is not bound yet may
    /// bind to it by announcing it (docs/salad.md). Admin token or the machine's lease.
    pub async fn expect(&self, id: MachineId) -> Result<(), SaladClientError> {
        let _: serde_json::Value = self
            .call(Method::PUT, &format!("/api/v1/machine/{id}/expect"), None)
            .await?;
        Ok(())
    }

    /// Replaces the secrets masked in the machine's console output (its current job's). Admin
    /// token or the machine's lease.
    pub async fn set_secrets(
        &self,
        id: MachineId,
        secrets: &[String],
    ) -> Result<(), SaladClientError> {
        let body = SecretsBody {
            secrets: secrets.to_vec(),
        };
        let _: serde_json::Value = self
            .call(
                Method::PUT,
                &format!("/api/v1/machine/{id}/secrets"),
                Some(&body),
            )
            .await?;
        Ok(())
    }

    /// Forgets the machine's secrets (the job ended).
    pub async fn clear_secrets(&self, id: MachineId) -> Result<(), SaladClientError> {
        let _: serde_json::Value = self
            .call(
                Method::DELETE,
                &format!("/api/v1/machine/{id}/secrets"),
                None,
            )
            .await?;
        Ok(())
    }

    /// Console streams that announced the machine and were refused, with `seq > after`;
    /// continue with `after = list.next`.
    pub async fn refusals(
        &self,
        id: MachineId,
        after: u64,
    ) -> Result<RefusalList, SaladClientError> {
        self.call(
            Method::GET,
            &format!("/api/v1/machine/{id}/refusals?after={after}"),
            None,
        )
        .await
    }

    /// Admin: binds the open console stream `stream` (its `id` in [`ports`](Self::ports)) to
    /// `machine`, or unbinds it (`None`).
    pub async fn bind_stream(
        &self,
        stream: u64,
        machine: Option<MachineId>,
    ) -> Result<(), SaladClientError> {
        let body = BindBody { machine };
        let _: serde_json::Value = self
            .call(
                Method::PUT,
                &format!("/api/v1/ports/{stream}/machine"),
                Some(&body),
            )
            .await?;
        Ok(())
    }

    /// The URL of the machine's console WebSocket (`ws://…/api/v1/machine/{id}/console`);
    /// connect with the admin token or the machine's lease in [`LEASE_HEADER`].
    pub fn console_url(&self, id: MachineId) -> String {
        let url = self.api.url(&format!("/api/v1/machine/{id}/console"));
        match url.strip_prefix("https://") {
            Some(rest) => format!("wss://{rest}"),
            None => url.replacen("http://", "ws://", 1),
        }
    }

    /// Every machine salad has a console server for.
    pub async fn machines(&self) -> Result<MachineList, SaladClientError> {
        Ok(self.api.get("/api/v1/machine").await?)
    }

    /// The machine's console ports; salad creates the server if the machine is new (which
    /// needs a token or the machine's lease).
    pub async fn machine(&self, id: MachineId) -> Result<MachineConsole, SaladClientError> {
        self.call(Method::GET, &format!("/api/v1/machine/{id}"), None)
            .await
    }

    /// Frees the machine's ports (admin token).
    pub async fn delete_machine(&self, id: MachineId) -> Result<(), SaladClientError> {
        let _: serde_json::Value = self.api.delete(&format!("/api/v1/machine/{id}")).await?;
        Ok(())
    }

    /// The open console streams.
    pub async fn ports(&self) -> Result<PortList, SaladClientError> {
        Ok(self.api.get("/api/v1/ports").await?)
    }

    /// Reads the machine's console log from `since`, at most `limit` bytes (salad's default
    /// when `None`). Continue with `Since::Offset(slice.end)`.
    pub async fn log(
        &self,
        id: MachineId,
        since: &Since,
        limit: Option<usize>,
    ) -> Result<LogSlice, SaladClientError> {
        let path = format!("/api/v1/machine/{id}/log");
        let url = self.api.url(&path);
        let mut query = format!("?since={}", since_param(since));
        if let Some(l) = limit {
            query.push_str(&format!("&limit={l}"));
        }
        let resp = self
            .request(Method::GET, &format!("{path}{query}"))
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            // Let the shared decoder turn the JSON error body into a ClientError.
            let status = resp.status();
            let body = resp.bytes().await.unwrap_or_default();
            let body = serde_json::from_slice(&body).unwrap_or_else(|_| dutgate_core::ErrorBody {
                error: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
                field: None,
                line: None,
                column: None,
            });
            return Err(ClientError::Api { url, status, body }.into());
        }
        let header = |name: &str| -> Result<u64, SaladClientError> {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    ClientError::Decode {
                        url: url.clone(),
                        message: format!("missing or bad {name} header"),
                    }
                    .into()
                })
        };
        let start = header(LOG_START_HEADER)?;
        let end = header(LOG_END_HEADER)?;
        let data = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?
            .to_vec();
        Ok(LogSlice { start, end, data })
    }

    /// Connects to the machine's read-write console on `host` (the gateway's address as seen
    /// from the caller), creating the server if needed.
    pub async fn connect(&self, id: MachineId, host: &str) -> Result<TcpStream, SaladClientError> {
        let console = self.machine(id).await?;
        connect_port(id, host, console.tcp_port).await
    }
}

/// Request bodies of [`SaladClient::call`], without making it generic over each.
mod erased {
    pub trait Body: Sync {
        fn attach(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder;
    }

    impl<T: serde::Serialize + Sync> Body for T {
        fn attach(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
            rb.json(self)
        }
    }
}

async fn connect_port(
    machine: MachineId,
    host: &str,
    port: u16,
) -> Result<TcpStream, SaladClientError> {
    let addr = format!("{host}:{port}");
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(SaladClientError::Connect {
            machine,
            addr,
            source,
        }),
        Err(_) => Err(SaladClientError::ConnectTimeout { machine, addr }),
    }
}
