//! The per-job process on its own: the same as `dutgate job <id>`, for deployments and tests
//! that start job processes without the multi-call binary (`executor.job_command`).

fn main() -> std::process::ExitCode {
    let Some(id) = std::env::args().nth(1) else {
        eprintln!("usage: dutgate-job <job id>  (the setup is read from stdin)");
        return std::process::ExitCode::from(2);
    };
    dutgate_core::telemetry::init_tracing(&dutgate_core::config::LogConfig::default());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dutgate-job: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(dutgate_executor::job_main(&id));
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
