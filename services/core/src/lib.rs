//! dutgate-core: what every dutgate service shares.
//!
//! - [`types`]: `MachineId`, `Tag`, `PowerState`, `JobStatus` (pinned exit codes).
//! - [`config`]: the YAML config with env overrides and embedded defaults.
//! - [`http`]: the axum bootstrap (`/healthz`, `/metrics`, shutdown, socket activation).
//! - [`auth`]: admin/user tokens and the DUT-network check.
//! - [`db`]: SQLite/PostgreSQL storage with per-service migrations.
//! - [`client`]: the HTTP client base every service's typed client builds on.
//! - [`openapi`]: the OpenAPI document each service derives from its handlers.
//! - [`outbound`]: where fetches made on someone else's behalf may go.
//!
//! Invariant: this crate knows no service's business; services depend on it, never the reverse.

pub mod audit;
pub mod auth;
pub mod client;
pub mod config;
pub mod db;
pub mod error;
pub mod http;
pub mod lease;
pub mod openapi;
pub mod outbound;
pub mod secret;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod testing;
pub mod types;

pub use error::{ApiError, ApiJson, ErrorBody};
pub use secret::Secret;
pub use service::{ServiceContext, ServiceError, ServiceName};
pub use types::{JobStatus, MachineId, PowerState, Tag};
