//! The boot service.

use dutgate_core::{ServiceContext, ServiceError};
use serde::{Deserialize, Serialize};

/// The `boot` section of the gateway config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {}

pub async fn run(ctx: ServiceContext, _config: Config) -> Result<(), ServiceError> {
    ctx.serve_http(axum::Router::new(), None).await
}
