//! Runs one service in this process: the `dutgate <service>` subcommands.

use dutgate_core::{ServiceContext, ServiceError, ServiceName};

use crate::config::FileConfig;

pub async fn run(name: ServiceName, config: FileConfig) -> Result<(), ServiceError> {
    let shutdown = dutgate_core::shutdown::on_signal();
    let ctx = ServiceContext::new(name, config.gateway.clone(), shutdown);
    tracing::info!(service = %name, "starting");
    match name {
        ServiceName::Executor => {
            let mut executor = config.executor;
            executor.object_store = Some(dutgate_executor::storage::ObjectStore(config.s3));
            dutgate_executor::run(ctx, executor).await
        }
        ServiceName::Mars => {
            // Sergeant Hartman's boots go through the executor's queue like any job, as
            // training jobs: the service credential may submit and stop those.
            let runner = dutgate_executor::client::ExecutorClient::for_gateway(&config.gateway);
            dutgate_mars::run_with_runner(ctx, config.mars, Some(std::sync::Arc::new(runner))).await
        }
        ServiceName::Registry => dutgate_registry::run(ctx, config.registry).await,
        ServiceName::Boot => dutgate_boot::run(ctx, config.boot).await,
        ServiceName::Pdu => dutgate_pdu::run(ctx, config.pdu).await,
        ServiceName::Salad => dutgate_salad::run(ctx, config.salad).await,
        ServiceName::S3 => dutgate_storage::run(ctx, config.s3).await,
    }
}

/// `dutgate job <id>`: the per-job process the executor starts.
pub async fn job(id: &str) -> i32 {
    dutgate_executor::job_main(id).await
}
