//! The executor service.

pub mod config;
pub mod control;
pub mod model;
pub mod process;
pub mod storage;
pub mod store;

use dutgate_core::{ServiceContext, ServiceError};

pub use config::Config;

pub async fn run(ctx: ServiceContext, _config: Config) -> Result<(), ServiceError> {
    ctx.serve_http(axum::Router::new(), None).await
}
