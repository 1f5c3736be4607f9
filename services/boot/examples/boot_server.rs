//! Runs the boot service exactly as `dutgate boot` does (same `run`), from a YAML file with
//! the `gateway` and `boot` sections, without linking the other services. Used by
//! `cargo xtask bench boot` so the benchmark only needs this crate to build.
//!
//! Usage: `boot_server <config.yml>`

use dutgate_core::config::GatewayConfig;
use dutgate_core::{ServiceContext, ServiceName};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct File {
    gateway: GatewayConfig,
    boot: dutgate_boot::Config,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: boot_server <config.yml>");
        return std::process::ExitCode::from(2);
    };
    let file: File = match std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| yaml_serde::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{path}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    dutgate_core::telemetry::init_tracing(&file.gateway.log);
    let shutdown = dutgate_core::shutdown::on_signal();
    let ctx = ServiceContext::new(ServiceName::Boot, file.gateway, shutdown);
    match dutgate_boot::run(ctx, file.boot).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
