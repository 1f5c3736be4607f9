//! Webhooks on the simulated farm (docs/notifications.md): a receiver on loopback (allowed by
//! `gateway.outbound.allow`) gets one signed delivery per finished job and per webhook, the
//! first attempt of each refused with HTTP 500 and retried; a job's own webhook is signed
//! with its own secret; destinations the outbound policy refuses are refused at submission
//! (422) or at delivery, logged and audited. The statuses the job processes stored are
//! counted by the long-lived executor (`/metrics`), and `GET /api/v1/stats/queue-wait`
//! covers the jobs. About 8 s.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use common::*;
use dutgate_core::JobStatus;
use dutgate_executor::webhooks::{
    SECRET_HEADER, SIGNATURE_HEADER, WebhookConfig, WebhookEvent, verify,
};

const T: Duration = Duration::from_secs(60);
const GLOBAL_SECRET: &str = "global webhook secret";
const JOB_SECRET: &str = "the job's own secret";

/// One request the receiver got: path, signature header, body.
type Received = Arc<Mutex<Vec<(String, Option<String>, Bytes)>>>;

/// A receiver that answers 500 to the first delivery for each (path, job) and 200 after.
async fn receiver() -> (u16, Received) {
    let got: Received = Arc::default();
    let seen: Arc<Mutex<HashMap<(String, i64), u32>>> = Arc::default();
    let (g, s) = (got.clone(), seen.clone());
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let (got, seen) = (g.clone(), s.clone());
        async move {
            let sig = headers
                .get(SIGNATURE_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let job = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["job"]["id"].as_i64())
                .unwrap_or(-1);
            got.lock()
                .unwrap()
                .push((uri.path().to_string(), sig, body));
            let mut seen = seen.lock().unwrap();
            let n = seen.entry((uri.path().to_string(), job)).or_insert(0);
            *n += 1;
            if *n == 1 {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            }
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    (port, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_deliveries_retried_and_refusals_audited() {
    let (port, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, format!("{GLOBAL_SECRET}\n")).unwrap();
    let farm = Farm::start(Options {
        machines: 2,
        webhooks: vec![
            WebhookConfig {
                url: format!("http://127.0.0.1:{port}/global"),
                secret_file: Some(secret_file),
                events: vec![WebhookEvent::JobEnd],
            },
            WebhookConfig {
                url: format!("http://127.0.0.1:{port}/machines"),
                secret_file: Some(dir.path().join("webhook.secret")),
                events: vec![WebhookEvent::MachineState],
            },
            // Loopback, but not the allowed address and port: refused at every delivery.
            WebhookConfig {
                url: format!("http://127.0.0.2:{port}/not-allowed"),
                secret_file: None,
                events: vec![WebhookEvent::JobEnd],
            },
        ],
        outbound_allow: vec![format!("127.0.0.1:{port}").parse().unwrap()],
        ..options()
    })
    .await;

    // A job's own webhook to an address the policy refuses: refused at submission.
    let r = farm
        .submit_raw(
            &job_yaml(&by_id(1), "pass", "pass", "", ""),
            "?webhook=http://127.0.0.1:9/hook",
        )
        .await;
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["field"], "webhook", "{body}");

    // The job's own webhook, with its secret in a header (never in the URL).
    let r = farm
        .http
        .post(format!(
            "{}/api/v1/jobs?webhook=http://127.0.0.1:{port}/own",
            farm.url
        ))
        .bearer_auth(USER)
        .header("content-type", "application/x-yaml")
        .header(SECRET_HEADER, JOB_SECRET)
        .body(job_yaml(&by_id(1), "pass", "pass", "", ""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let a = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let b = farm
        .submit(&job_yaml(&by_id(2), "fail", "fail", "", ""), "")
        .await;
    assert_eq!(farm.wait_finished(a, T).await.status, Some(JobStatus::Pass));
    assert_eq!(farm.wait_finished(b, T).await.status, Some(JobStatus::Fail));

    // Per (path, job): a refused attempt, then the delivery. `/global` for both jobs, `/own`
    // for job a only.
    let want = [("/global", a), ("/global", b), ("/own", a)];
    let deadline = Instant::now() + Duration::from_secs(20);
    let job_ends = |got: &[(String, Option<String>, Bytes)]| {
        got.iter()
            .filter(|(p, _, _)| p != "/machines")
            .cloned()
            .collect::<Vec<_>>()
    };
    loop {
        let n = job_ends(&got.lock().unwrap()).len();
        if n >= 2 * want.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} webhook requests: {:?}",
            got.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got_all = got.clone();
    let got = job_ends(&got.lock().unwrap());
    assert_eq!(got.len(), 2 * want.len(), "{got:?}");
    for (path, job) in want {
        let attempts: Vec<_> = got
            .iter()
            .filter(|(p, _, body)| {
                p == path
                    && serde_json::from_slice::<serde_json::Value>(body).unwrap()["job"]["id"]
                        == job
            })
            .collect();
        assert_eq!(attempts.len(), 2, "{path} job {job}: {attempts:?}");
        let secret = if path == "/own" {
            JOB_SECRET
        } else {
            GLOBAL_SECRET
        };
        for (_, sig, body) in attempts {
            let sig = sig.as_deref().expect("a signature header");
            assert!(
                verify(secret.as_bytes(), body, sig),
                "{path} job {job}: bad signature {sig}"
            );
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["event"], "job_end");
            assert_eq!(v["job"]["owner"], "user");
            assert!(
                v["job"]["url"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("/jobs/{job}"))
            );
            assert!(v["job"]["finished_at"].is_string());
        }
    }

    // Machine state changes went to the admins' `machine_state` webhook, signed: machine 1's
    // lease for job a (the first delivery was refused with 500 and retried).
    let deadline = Instant::now() + Duration::from_secs(20);
    let lease_of_a = |all: &[(String, Option<String>, Bytes)]| {
        all.iter().any(|(p, _, body)| {
            let m: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            p == "/machines"
                && m["machine"]["machine_id"].as_str() == Some(mac(1).to_string().as_str())
                && m["machine"]["job_id"].as_str() == Some(a.to_string().as_str())
        })
    };
    while !lease_of_a(&got_all.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "no machine_state delivery for job {a}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = got_all.lock().unwrap().clone();
    let machines: Vec<serde_json::Value> = all
        .iter()
        .filter(|(p, _, _)| p == "/machines")
        .map(|(_, sig, body)| {
            assert!(verify(
                GLOBAL_SECRET.as_bytes(),
                body,
                sig.as_deref().expect("a signature header")
            ));
            serde_json::from_slice(body).unwrap()
        })
        .collect();
    assert!(
        machines.iter().any(|m| m["event"] == "machine_state"
            && m["machine"]["machine_id"].as_str() == Some(mac(1).to_string().as_str())
            && m["machine"]["job_id"].as_str() == Some(a.to_string().as_str())),
        "{machines:#?}"
    );

    // The refused destinations are audited: the submission's, and each delivery's (one per
    // finished job).
    let http = reqwest::Client::new();
    refused_in_audit(&http, &farm, "job.submit", 1).await;
    refused_in_audit(&http, &farm, "webhook.deliver", 2).await;

    // The queue-wait figures of these two jobs (the refused submission queued nothing).
    let stats: serde_json::Value = farm
        .get("/api/v1/stats/queue-wait?since=1h")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stats["jobs"], 2, "{stats}");
    assert_eq!(stats["still_queued"], 0, "{stats}");
    assert!(stats["p99_seconds"].as_f64().unwrap() < 60.0, "{stats}");
    let r = farm.get("/api/v1/stats/queue-wait?since=soon").await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["field"],
        "since"
    );

    // Counted by the executor, though the job processes stored these statuses.
    let metrics = farm.get("/metrics").await.text().await.unwrap();
    for line in [
        "dutgate_executor_jobs_finished_total{status=\"PASS\"}",
        "dutgate_executor_jobs_finished_total{status=\"FAIL\"}",
        "dutgate_executor_job_duration_seconds_count{status=\"PASS\"}",
        "dutgate_executor_job_queue_wait_seconds_count{status=\"FAIL\"}",
        "dutgate_executor_webhook_deliveries_total{outcome=\"delivered\"}",
        "dutgate_executor_webhook_deliveries_total{outcome=\"refused\"}",
        "dutgate_executor_webhook_retries_total",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(line)),
            "no {line} in:\n{metrics}"
        );
    }
    farm.stop().await;
}

/// Waits until the executor's audit log holds `n` refusals of `action`.
async fn refused_in_audit(http: &reqwest::Client, farm: &Farm, action: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit: serde_json::Value = http
            .get(format!("{}/api/v1/audit?limit=1000", farm.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let count = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["action"] == action && e["outcome"].as_str().unwrap().starts_with("refused")
            })
            .count();
        if count >= n {
            assert_eq!(count, n, "{audit:#}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} refusals of {action} awaited: {audit:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
