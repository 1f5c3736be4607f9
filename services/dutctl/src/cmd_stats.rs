//! `dutctl stats`: queue-wait figures of a period (`GET /api/v1/stats/queue-wait`), computed
//! exactly from the job records by the executor: nearest-rank p50/p90/p99 and the share of
//! jobs that waited longer than 15 minutes and than an hour.

use std::time::Duration;

use clap::Args;
use dutgate_core::ServiceName;
use dutgate_executor::stats::QueueWaitStats;
use reqwest::Method;

use crate::gateway::Gateway;
use crate::output::{Format, print};

/// Time budget of the answer (the executor reads every job of the period).
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct StatsArgs {
    /// The period up to now: 90m, 24h, 7d, 2w. Default: the last 24 hours.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    since: Option<String>,
    /// Start of the period, RFC 3339 (2026-12-01T00:00:00Z).
    #[arg(long)]
    from: Option<String>,
    /// End of the period, RFC 3339; default now. Needs --from.
    #[arg(long, requires = "from")]
    to: Option<String>,
}

/// `1h 02m 03s`-style, to the second (figures below a second keep their milliseconds).
fn human(seconds: Option<f64>) -> String {
    let Some(s) = seconds else {
        return "-".into();
    };
    if s < 60.0 {
        return format!("{s:.3} s");
    }
    let total = s.round() as u64;
    let (h, m, sec) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else {
        format!("{m}m {sec:02}s")
    }
}

fn text(s: &QueueWaitStats) -> String {
    let mut out = format!("period        {} → {}\n", s.from, s.to);
    if let Some(owner) = &s.owner {
        out.push_str(&format!("jobs of       {owner}\n"));
    }
    out.push_str(&format!(
        "jobs          {} ({} still queued, {} ended in the queue)\n",
        s.jobs, s.still_queued, s.ended_in_queue
    ));
    out.push_str(&format!("wait p50      {}\n", human(s.p50_seconds)));
    out.push_str(&format!("wait p90      {}\n", human(s.p90_seconds)));
    out.push_str(&format!("wait p99      {}\n", human(s.p99_seconds)));
    out.push_str(&format!("wait max      {}\n", human(s.max_seconds)));
    out.push_str(&format!(
        "> 15 min      {} ({:.1} %)\n",
        s.over_15_min,
        s.over_15_min_share * 100.0
    ));
    out.push_str(&format!(
        "> 1 h         {} ({:.1} %)\n",
        s.over_1_h,
        s.over_1_h_share * 100.0
    ));
    out
}

pub async fn run(args: StatsArgs, gw: &Gateway, format: Format) -> anyhow::Result<()> {
    let mut url = reqwest::Url::parse("http://executor/api/v1/stats/queue-wait")?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = &args.since {
            q.append_pair("since", s);
        }
        if let Some(f) = &args.from {
            q.append_pair("from", f);
        }
        if let Some(t) = &args.to {
            q.append_pair("to", t);
        }
    }
    let path = match url.query() {
        Some(q) if !q.is_empty() => format!("{}?{q}", url.path()),
        _ => url.path().to_string(),
    };
    let client = gw.client(ServiceName::Executor);
    let rb = client.request(Method::GET, &path).timeout(TIMEOUT);
    let stats: QueueWaitStats = client.send(rb, &path).await?;
    print(format, &stats, text);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_read_as_durations() {
        assert_eq!(human(None), "-");
        assert_eq!(human(Some(0.25)), "0.250 s");
        assert_eq!(human(Some(660.0)), "11m 00s");
        assert_eq!(human(Some(10_800.0)), "3h 00m 00s");
    }
}
