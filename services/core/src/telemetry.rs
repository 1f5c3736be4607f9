//! Logging and metrics set-up, once per process.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::{Layer, PrefixLayer};
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the tracing subscriber. `RUST_LOG` wins over the configured level. Logs go to
/// stderr so that a supervisor can prefix them.
pub fn init_tracing(log: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Every metric's namespace. The code names metrics without it (`boot_scripts_total`); the
/// recorder adds it in this one place, so no metric can be exported outside it. The prefix
/// layer joins with `.`, which the Prometheus exporter writes as `_`:
/// `dutgate_boot_scripts_total`.
pub const METRICS_NAMESPACE: &str = "dutgate";

/// The process-wide Prometheus recorder; installed on first use. `None` when another recorder
/// was installed first (then `/metrics` says so instead of lying).
pub fn metrics_handle() -> Option<PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(PrefixLayer::new(METRICS_NAMESPACE).layer(recorder))
                .ok()?;
            describe();
            metrics::gauge!("build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // Without the upkeep task histograms grow without bound (the exporter's own
            // listener would run it, but we serve /metrics from our own router).
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let h = handle.clone();
                rt.spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tick.tick().await;
                        h.run_upkeep();
                    }
                });
            }
            Some(handle)
        })
        .clone()
}

/// HELP texts of the metrics every service exports (the HTTP layer, the database, the build).
/// Each service crate describes its own in its `telemetry` module; docs/metrics.md lists all.
fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(
        "http_requests_total",
        Unit::Count,
        "HTTP requests answered, by service, method, route template and status code."
    );
    metrics::describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by service, method and route template."
    );
    metrics::describe_histogram!(
        "db_checkpoint_seconds",
        Unit::Seconds,
        "Time one WAL checkpoint of the service's SQLite database took."
    );
    metrics::describe_gauge!(
        "build_info",
        "Always 1: the version label is the dutgate version this process runs."
    );
}
