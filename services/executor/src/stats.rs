//! Queue figures: the `executor_queued_jobs{target}` gauges, and the exact queue-wait
//! statistics of `GET /api/v1/stats/queue-wait` (`dutctl stats`, docs/dutctl.md).
//!
//! A job's queue wait is from its submission to its dispatch; a job that never left the queue
//! waited until it ended there (cancelled, deadline passed) or, still queued, until the end of
//! the period asked about. Percentiles are nearest-rank over the jobs (purpose `job`, training
//! excluded) submitted in the period: the p-th percentile of n sorted waits is the
//! ⌈p·n/100⌉-th smallest, always one of the measured waits, computed from the job records in
//! the store (milliseconds), never estimated from histogram buckets.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Extension, State};
use axum::http::Uri;
use dutgate_core::ApiError;
use dutgate_core::auth::Identity;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::config::JobVisibility;
use crate::model::Timestamp;
use crate::store::Store;

/// How often the queue gauges are refreshed.
const GAUGE_PERIOD: Duration = Duration::from_secs(15);
/// The target kinds of `executor_queued_jobs{target}`: a fixed list, so the label is bounded.
pub const TARGET_KINDS: [&str; 3] = ["machine", "tags", "any"];
/// The longest period statistics are computed over.
const MAX_PERIOD_MS: i64 = 400 * 86_400_000;
/// The thresholds of the "waited longer than" shares.
const OVER_15_MIN_MS: i64 = 15 * 60_000;
const OVER_1_H_MS: i64 = 3_600_000;

/// Sets `executor_queued_jobs{target}` every [`GAUGE_PERIOD`] until `shutdown`.
pub async fn export_queue_gauges(store: Store, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.queued_by_target_kind().await {
            Ok(counts) => {
                for kind in TARGET_KINDS {
                    let n = counts
                        .iter()
                        .find(|(k, _)| k == kind)
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!("executor_queued_jobs", "target" => kind).set(n as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot count the queued jobs"),
        }
    }
}

/// The answer of `GET /api/v1/stats/queue-wait`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueWaitStats {
    /// The period: jobs submitted in `[from, to)`.
    pub from: Timestamp,
    pub to: Timestamp,
    /// Only this owner's jobs (a user under `executor.job_visibility: owner`); unset: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Jobs counted.
    pub jobs: usize,
    /// Of those, still queued at `to` (their wait so far is counted).
    pub still_queued: usize,
    /// Of those, ended without leaving the queue (cancelled, deadline).
    pub ended_in_queue: usize,
    /// Nearest-rank percentiles of the waits in seconds; unset with no jobs.
    pub p50_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
    /// Jobs that waited longer than 15 minutes, and their share of `jobs` (0 with no jobs).
    pub over_15_min: usize,
    pub over_15_min_share: f64,
    /// Jobs that waited longer than an hour, and their share.
    pub over_1_h: usize,
    pub over_1_h_share: f64,
}

/// The nearest-rank `p`-th percentile (0 < p ≤ 100) of `sorted` (ascending).
pub fn nearest_rank(sorted: &[i64], p: u32) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as u64;
    let rank = (u64::from(p) * n).div_ceil(100).clamp(1, n);
    sorted.get(rank as usize - 1).copied()
}

/// The statistics of jobs given as `(submitted_at, dispatched_at, finished_at)` (ms), over
/// the period `[from, to)`.
pub fn compute(
    times: &[(i64, Option<i64>, Option<i64>)],
    from: i64,
    to: i64,
    owner: Option<String>,
) -> QueueWaitStats {
    let mut waits = Vec::with_capacity(times.len());
    let (mut still_queued, mut ended_in_queue) = (0, 0);
    for &(submitted, dispatched, finished) in times {
        let left = match (dispatched, finished) {
            (Some(d), _) if d <= to => d,
            (None, Some(f)) if f <= to => {
                ended_in_queue += 1;
                f
            }
            _ => {
                still_queued += 1;
                to
            }
        };
        waits.push((left - submitted).max(0));
    }
    waits.sort_unstable();
    let n = waits.len();
    let secs = |ms: Option<i64>| ms.map(|v| v as f64 / 1000.0);
    let share = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
    let over_15_min = waits.iter().filter(|w| **w > OVER_15_MIN_MS).count();
    let over_1_h = waits.iter().filter(|w| **w > OVER_1_H_MS).count();
    QueueWaitStats {
        from: Timestamp(from),
        to: Timestamp(to),
        owner,
        jobs: n,
        still_queued,
        ended_in_queue,
        p50_seconds: secs(nearest_rank(&waits, 50)),
        p90_seconds: secs(nearest_rank(&waits, 90)),
        p99_seconds: secs(nearest_rank(&waits, 99)),
        max_seconds: secs(waits.last().copied()),
        over_15_min,
        over_15_min_share: share(over_15_min),
        over_1_h,
        over_1_h_share: share(over_1_h),
    }
}

/// `90s`, `15m`, `24h`, `7d` (or a plain number of seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return None,
    };
    n.checked_mul(mult).map(Duration::from_secs)
}

fn parse_time(v: &str, field: &str) -> Result<i64, ApiError> {
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            ApiError::bad_request(format!("{field} must be an RFC 3339 time: {e}"))
                .with_field(field)
        })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// The period of a request: `since=<duration>` (until now), or `from`/`to` (RFC 3339; `to`
/// defaults to now); default the last 24 hours.
pub fn period(pairs: &[(String, String)], now: i64) -> Result<(i64, i64), ApiError> {
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let since = get("since");
    let (from, to) = (get("from"), get("to"));
    if since.is_some() && (from.is_some() || to.is_some()) {
        return Err(
            ApiError::bad_request("give either since or from/to, not both").with_field("since"),
        );
    }
    let (from, to) = match (since, from) {
        (Some(s), _) => {
            let d = parse_duration(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "since must be a duration such as 90m, 24h or 7d, not {s:?}"
                ))
                .with_field("since")
            })?;
            (now.saturating_sub(d.as_millis() as i64), now)
        }
        (None, Some(f)) => (
            parse_time(f, "from")?,
            match to {
                Some(t) => parse_time(t, "to")?,
                None => now,
            },
        ),
        (None, None) if to.is_some() => {
            return Err(ApiError::bad_request("to needs from").with_field("from"));
        }
        (None, None) => (now - 86_400_000, now),
    };
    if to <= from {
        return Err(
            ApiError::bad_request("the period is empty: to must be after from").with_field("to"),
        );
    }
    if to - from > MAX_PERIOD_MS {
        return Err(
            ApiError::bad_request("the period may not be longer than 400 days").with_field("from"),
        );
    }
    Ok((from, to))
}

/// Queue-wait percentiles of a period.
///
/// Exact figures from the job records (purpose `job`) submitted in the period: nearest-rank
/// p50/p90/p99 of the waits from submission to dispatch (a job that never left the queue:
/// to its end there, or to the period's end), and how many waited longer than 15 minutes
/// and than an hour. Users and admins; under `executor.job_visibility: owner` a user's
/// figures cover their own jobs only (`owner` says so). `since`, or `from`/`to`; default
/// the last 24 hours; at most 400 days.
#[utoipa::path(get, path = "/api/v1/stats/queue-wait", tag = "executor", security(("bearer" = [])),
    params(
        ("since" = Option<String>, Query, description = "A duration up to now: `<n>s|m|h|d|w`, e.g. `24h`."),
        ("from" = Option<String>, Query, format = DateTime, description = "Start of the period (RFC 3339)."),
        ("to" = Option<String>, Query, format = DateTime, description = "End of the period; default now; needs `from`."),
    ),
    responses((status = 200, description = "The figures.", body = QueueWaitStats)))]
pub async fn queue_wait(
    State(s): State<AppState>,
    Extension(who): Extension<Identity>,
    ConnectInfo(_peer): ConnectInfo<SocketAddr>,
    uri: Uri,
) -> Result<axum::Json<QueueWaitStats>, ApiError> {
    let pairs: Vec<(String, String)> = match uri.query() {
        Some(q) => reqwest::Url::parse(&format!("http://q/?{q}"))
            .map(|u| {
                u.query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let (from, to) = period(&pairs, crate::store::now_ms())?;
    let owner =
        (s.cfg.job_visibility == JobVisibility::Owner && !who.is_admin()).then(|| who.name.clone());
    let times = s
        .store
        .queue_times(from, to, owner.as_deref())
        .await
        .map_err(ApiError::internal)?;
    Ok(axum::Json(compute(&times, from, to, owner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn nearest_rank_follows_its_definition() {
        let v: Vec<i64> = (1..=10).collect();
        assert_eq!(nearest_rank(&v, 50), Some(5));
        assert_eq!(nearest_rank(&v, 90), Some(9));
        assert_eq!(nearest_rank(&v, 99), Some(10));
        assert_eq!(nearest_rank(&[7], 50), Some(7));
        assert_eq!(nearest_rank(&[], 50), None);
        let v: Vec<i64> = (1..=200).collect();
        // ⌈0.99·200⌉ = 198.
        assert_eq!(nearest_rank(&v, 99), Some(198));
        assert_eq!(nearest_rank(&v, 50), Some(100));
    }

    /// Crafted records, computed by hand: 20 jobs submitted at 0 whose waits are 1..=20
    /// minutes (dispatched), plus one cancelled in the queue after 2 h, plus one still queued
    /// at the end of the period (3 h after its submission).
    #[test]
    fn crafted_records_give_the_hand_computed_figures() {
        let to = 10 * 60 * MIN;
        let mut times: Vec<(i64, Option<i64>, Option<i64>)> = (1..=20)
            .map(|m| (0, Some(m * MIN), Some(m * MIN + 5 * MIN)))
            .collect();
        times.push((MIN, None, Some(MIN + 120 * MIN)));
        times.push((to - 180 * MIN, None, None));
        let s = compute(&times, 0, to, None);
        assert_eq!(s.jobs, 22);
        assert_eq!(s.ended_in_queue, 1);
        assert_eq!(s.still_queued, 1);
        // Sorted waits (min): 1..=20, 120, 180. p50: rank ⌈11⌉ = 11 → 11 min;
        // p90: ⌈19.8⌉ = 20 → 20 min; p99: ⌈21.78⌉ = 22 → 180 min.
        assert_eq!(s.p50_seconds, Some(660.0));
        assert_eq!(s.p90_seconds, Some(1200.0));
        assert_eq!(s.p99_seconds, Some(10_800.0));
        assert_eq!(s.max_seconds, Some(10_800.0));
        // > 15 min: 16..=20, 120, 180 → 7 of 22; > 1 h: 2 of 22.
        assert_eq!(s.over_15_min, 7);
        assert!((s.over_15_min_share - 7.0 / 22.0).abs() < 1e-12);
        assert_eq!(s.over_1_h, 2);
        assert!((s.over_1_h_share - 2.0 / 22.0).abs() < 1e-12);
        // Exactly 15 min is not "longer than 15 min".
        let s = compute(&[(0, Some(15 * MIN), None)], 0, to, None);
        assert_eq!(s.over_15_min, 0);
        // A dispatch after the period's end counts as still waiting at its end.
        let s = compute(&[(0, Some(to + MIN), None)], 0, to, None);
        assert_eq!((s.still_queued, s.p50_seconds), (1, Some(600.0 * 60.0)));
        let empty = compute(&[], 0, to, None);
        assert_eq!(
            (empty.jobs, empty.p50_seconds, empty.over_1_h_share),
            (0, None, 0.0)
        );
    }

    #[test]
    fn periods_and_durations() {
        assert_eq!(parse_duration("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("5y"), None);
        let now = 1_000_000_000_000;
        let q = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert_eq!(
            period(&q("since", "1h"), now).unwrap(),
            (now - 3_600_000, now)
        );
        assert_eq!(period(&[], now).unwrap(), (now - 86_400_000, now));
        let r = period(
            &[
                ("from".into(), "2026-12-01T00:00:00Z".into()),
                ("to".into(), "2026-12-02T00:00:00Z".into()),
            ],
            now,
        )
        .unwrap();
        assert_eq!(r.1 - r.0, 86_400_000);
        let e = period(&q("since", "soon"), now).unwrap_err();
        assert_eq!(e.body.field.as_deref(), Some("since"));
        assert!(period(&q("from", "yesterday"), now).is_err());
    }

    /// The store's side: crafted records (timestamps set in the table) give the figures
    /// computed by hand; training jobs, jobs outside the period and other owners' jobs are
    /// left out when they should be.
    #[tokio::test]
    async fn figures_from_crafted_job_records() {
        use crate::model::Purpose;
        use crate::store::NewJob;
        let dir = tempfile::tempdir().unwrap();
        let db =
            dutgate_core::db::Db::open_sqlite(&dir.path().join("e.db"), crate::store::MIGRATIONS)
                .await
                .unwrap();
        let store = Store::new(db);
        let t0 = 1_800_000_000_000;
        // (owner, purpose, submitted, dispatched, finished), minutes after t0.
        type Row = (&'static str, Purpose, i64, Option<i64>, Option<i64>);
        let rows: [Row; 7] = [
            ("alice", Purpose::Job, 0, Some(1), Some(10)),
            ("alice", Purpose::Job, 0, Some(20), Some(30)),
            ("bob", Purpose::Job, 10, Some(80), Some(90)),
            ("bob", Purpose::Job, 10, None, Some(40)),
            ("bob", Purpose::Job, 100, None, None),
            ("trainer", Purpose::Training, 0, Some(500), None),
            // Outside the period [t0, t0 + 2 h).
            ("alice", Purpose::Job, 130, Some(131), None),
        ];
        for (owner, purpose, sub, disp, fin) in rows {
            let id = store
                .insert(&NewJob {
                    external_id: None,
                    priority: 0,
                    purpose,
                    job_yaml: String::new(),
                    target_id: None,
                    target_tags: Vec::new(),
                    deadline_ms: None,
                    has_tarball: false,
                    owner: owner.into(),
                })
                .await
                .unwrap();
            sqlx::query(
                "UPDATE jobs SET submitted_at = $1, dispatched_at = $2, finished_at = $3 WHERE id = $4",
            )
            .bind(t0 + sub * MIN)
            .bind(disp.map(|m| t0 + m * MIN))
            .bind(fin.map(|m| t0 + m * MIN))
            .bind(id)
            .execute(store.db().pool())
            .await
            .unwrap();
        }
        let to = t0 + 120 * MIN;
        let all = compute(
            &store.queue_times(t0, to, None).await.unwrap(),
            t0,
            to,
            None,
        );
        // Waits (min): 1, 20, 70, 30 (ended in the queue), 20 (still queued at `to`).
        // Sorted 1, 20, 20, 30, 70: p50 rank 3 → 20; p90 rank 5 → 70; p99 → 70.
        assert_eq!((all.jobs, all.ended_in_queue, all.still_queued), (5, 1, 1));
        assert_eq!(all.p50_seconds, Some(1200.0));
        assert_eq!(all.p90_seconds, Some(4200.0));
        assert_eq!(all.p99_seconds, Some(4200.0));
        assert_eq!((all.over_15_min, all.over_1_h), (4, 1));
        assert!((all.over_1_h_share - 0.2).abs() < 1e-12);
        let alice = compute(
            &store.queue_times(t0, to, Some("alice")).await.unwrap(),
            t0,
            to,
            Some("alice".into()),
        );
        assert_eq!((alice.jobs, alice.p50_seconds), (2, Some(60.0)));
        assert_eq!(alice.p90_seconds, Some(1200.0));
    }
}
