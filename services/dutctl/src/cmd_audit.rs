//! `dutctl audit`: every service's audit log (`GET /api/v1/audit`, admins only), merged by
//! time.
//!
//! Each service keeps its own log, so this asks them all at once. A service that answers 404
//! has no audit log (yet): it is skipped with a note. Any other failure is a note too when
//! other services answered (the exit code is then 1: the merge is incomplete), and the error
//! when none did.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use dutgate_core::ServiceName;
use dutgate_core::audit::{AuditEntry, AuditList};
use dutgate_core::client::ClientError;
use reqwest::{Method, StatusCode};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::gateway::Gateway;
use crate::output::{Format, print};

/// The services that keep an audit log.
const AUDITED: [ServiceName; 5] = [
    ServiceName::Executor,
    ServiceName::Mars,
    ServiceName::Pdu,
    ServiceName::Boot,
    ServiceName::Salad,
];

/// Time budget of each service's answer (a log is read whole by the service).
const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Args)]
pub struct AuditArgs {
    /// Only entries at or after this time: RFC 3339 (2026-12-07T14:00:00Z) or an age
    /// (90s, 30m, 1h, 2d).
    #[arg(long)]
    since: Option<String>,
    /// Only this service's log (repeatable): executor, mars, pdu, boot, salad.
    #[arg(long = "service", value_name = "NAME", value_parser = audited_service)]
    services: Vec<ServiceName>,
    /// At most this many entries, the newest (1-100000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    limit: u32,
}

fn audited_service(s: &str) -> Result<ServiceName, String> {
    s.parse::<ServiceName>()
        .ok()
        .filter(|n| AUDITED.contains(n))
        .ok_or_else(|| format!("{s:?} keeps no audit log: use executor, mars, pdu, boot or salad"))
}

/// `--since`: an RFC 3339 time, or an age (`<n>s|m|h|d`) before `now`.
pub fn parse_since(s: &str, now: OffsetDateTime) -> anyhow::Result<OffsetDateTime> {
    let age = s.char_indices().last().and_then(|(i, unit)| {
        let seconds = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        s[..i].parse::<u32>().ok().map(|n| i64::from(n) * seconds)
    });
    if let Some(seconds) = age {
        return now
            .checked_sub(time::Duration::seconds(seconds))
            .with_context(|| format!("--since {s:?}: too long ago"));
    }
    OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
        anyhow::anyhow!(
            "--since {s:?}: give an RFC 3339 time (2026-12-07T14:00:00Z) or an age (30m, 1h, 2d)"
        )
    })
}

/// `2026-12-07T14:58:02Z`: to the second, in UTC.
fn short_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn table(entries: &[AuditEntry]) -> String {
    let mut s = format!(
        "{:<20}  {:<8}  {:<16}  {:<7}  {:<21}  {:<14}  {:<24}  OUTCOME\n",
        "TIME", "SERVICE", "ACTOR", "ROLE", "SOURCE", "ACTION", "TARGET"
    );
    for e in entries {
        s.push_str(&format!(
            "{:<20}  {:<8}  {:<16}  {:<7}  {:<21}  {:<14}  {:<24}  {}\n",
            short_time(e.at),
            e.service,
            e.actor,
            e.role.map_or("-", |r| r.as_str()),
            e.source,
            e.action,
            e.target,
            e.outcome
        ));
    }
    s
}

/// Merges the services' entries (each oldest first) by time, keeping the newest `limit`.
/// The sort is stable: entries of one instant keep their service's order.
fn merge(lists: Vec<Vec<AuditEntry>>, limit: usize) -> Vec<AuditEntry> {
    let mut all: Vec<AuditEntry> = lists.into_iter().flatten().collect();
    all.sort_by_key(|e| e.at);
    let skip = all.len().saturating_sub(limit);
    all.split_off(skip)
}

/// Prints the merged log; `Ok(false)` when some service's log is missing from it.
pub async fn run(args: AuditArgs, gw: &Gateway, format: Format) -> anyhow::Result<bool> {
    let mut query = format!("limit={}", args.limit);
    if let Some(s) = &args.since {
        let since = parse_since(s, OffsetDateTime::now_utc())?;
        let since = since
            .to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .context("--since")?;
        // RFC 3339 in UTC has no '+'; ':' is fine in a query.
        query.push_str(&format!("&since={since}"));
    }
    let services = if args.services.is_empty() {
        AUDITED.to_vec()
    } else {
        args.services
    };
    let path = format!("/api/v1/audit?{query}");
    let answers = futures::future::join_all(services.iter().map(|&svc| {
        let client = gw.client(svc);
        let path = path.clone();
        async move {
            let rb = client.request(Method::GET, &path).timeout(TIMEOUT);
            (svc, client.send::<AuditList>(rb, &path).await)
        }
    }))
    .await;
    let mut lists = Vec::new();
    let mut failures: Vec<(ServiceName, ClientError)> = Vec::new();
    for (svc, answer) in answers {
        match answer {
            Ok(list) => lists.push(list.entries),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => {
                eprintln!(
                    "dutctl: {svc} ({}): no audit log there, skipped",
                    gw.url(svc)
                );
            }
            Err(e) => failures.push((svc, e)),
        }
    }
    if lists.is_empty() && !failures.is_empty() {
        let (svc, first) = failures.remove(0);
        for (other, e) in &failures {
            eprintln!("dutctl: cannot read the audit log of {other}: {e}");
        }
        return Err(anyhow::Error::new(first))
            .with_context(|| format!("cannot read the audit log of {svc}"));
    }
    for (svc, e) in &failures {
        eprintln!("dutctl: cannot read the audit log of {svc} (its entries are missing): {e}");
    }
    let entries = merge(lists, args.limit as usize);
    match format {
        // One JSON object per line, to pipe into jq or append to a file.
        Format::Json => {
            for e in &entries {
                match serde_json::to_string(e) {
                    Ok(line) => println!("{line}"),
                    Err(e) => bail!("cannot render JSON: {e}"),
                }
            }
        }
        _ => print(format, &entries, |e| table(e)),
    }
    Ok(failures.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &Rfc3339).unwrap()
    }

    #[test]
    fn since_takes_times_and_ages() {
        let now = at("2026-12-07T12:00:00Z");
        assert_eq!(parse_since("30m", now).unwrap(), at("2026-12-07T11:30:00Z"));
        assert_eq!(parse_since("2d", now).unwrap(), at("2026-12-05T12:00:00Z"));
        assert_eq!(parse_since("90s", now).unwrap(), at("2026-12-07T11:58:30Z"));
        assert_eq!(
            parse_since("2026-12-07T13:00:00+02:00", now).unwrap(),
            at("2026-12-07T11:00:00Z")
        );
        for bad in ["", "1w", "h", "-1h", "yesterday", "2026-12-07"] {
            let e = parse_since(bad, now).unwrap_err().to_string();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
    }

    #[test]
    fn merges_by_time_keeping_the_newest() {
        let entry = |t: &str, service: &str| AuditEntry {
            at: at(t),
            service: service.into(),
            actor: "admin".into(),
            role: None,
            source: "127.0.0.1:1".into(),
            action: "x".into(),
            target: "y".into(),
            outcome: "ok".into(),
        };
        let exec = vec![
            entry("2026-12-07T10:00:00Z", "executor"),
            entry("2026-12-07T10:00:02Z", "executor"),
        ];
        let mars = vec![entry("2026-12-07T10:00:01Z", "mars")];
        let merged = merge(vec![exec.clone(), mars.clone()], 10);
        let order: Vec<&str> = merged.iter().map(|e| e.service.as_str()).collect();
        assert_eq!(order, ["executor", "mars", "executor"]);
        let newest = merge(vec![exec, mars], 2);
        assert_eq!(newest[0].at, at("2026-12-07T10:00:01Z"));
        assert_eq!(newest.len(), 2);
    }

    #[test]
    fn only_audited_services() {
        assert_eq!(audited_service("pdu").unwrap(), ServiceName::Pdu);
        assert!(audited_service("s3").unwrap_err().contains("no audit log"));
        assert!(audited_service("nope").is_err());
    }
}
