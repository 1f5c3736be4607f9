//! `dutctl status`: is every service of the gateway up?

use std::time::Duration;

use dutgate_core::ServiceName;
use serde::Serialize;

use crate::gateway::Gateway;
use crate::output::{Format, print};

#[derive(Debug, Serialize)]
struct ServiceStatus {
    service: ServiceName,
    url: String,
    healthy: bool,
    detail: String,
}

pub async fn run(gw: &Gateway, format: Format) -> anyhow::Result<bool> {
    let mut out = Vec::new();
    for svc in ServiceName::ALL {
        let url = gw.url(svc).to_string();
        let request = gw
            .client(svc)
            .request(reqwest::Method::GET, "/healthz")
            .timeout(Duration::from_secs(3));
        let (healthy, detail) = match request.send().await {
            Ok(r) if r.status().is_success() => (true, "ok".to_string()),
            Ok(r) => {
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                (false, format!("{status}: {}", body.trim()))
            }
            Err(e) => (false, format!("unreachable: {e}")),
        };
        out.push(ServiceStatus {
            service: svc,
            url,
            healthy,
            detail,
        });
    }
    let all = out.iter().all(|s| s.healthy);
    if format == Format::Text && gw.token().is_none() {
        eprintln!("dutctl: {}", gw.token_source());
    }
    print(format, &out, |rows| {
        rows.iter()
            .map(|s| format!("{:<9} {:<28} {}\n", s.service.as_str(), s.url, s.detail))
            .collect()
    });
    Ok(all)
}
