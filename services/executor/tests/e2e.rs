//! End to end: real services, real job processes, simulated DUTs (docs/jobs.md).

mod common;

use std::time::Duration;

use common::*;
use dutgate_core::{JobStatus, PowerState};
use dutgate_executor::model::JobState;
use dutgate_mars::model::MachineState;

const T: Duration = Duration::from_secs(60);

fn by_id(n: u16) -> String {
    format!("  id: \"{}\"", mac(n))
}

fn kinds(events: &[dutgate_executor::model::Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{}: {}", e.kind, e.message))
        .collect()
}

/// Acceptance 1: every status arises from the matching DUT behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statuses_from_simulated_behaviour() {
    let farm = Farm::start(Options {
        machines: 7,
        ..options()
    })
    .await;
    let hang_timeouts = "  console_activity: {seconds: 1, retries: 0}";
    let complete = job_yaml(&by_id(4), "fail", "fail", "", "")
        .replace("  job_success: {regex: \"^RESULT: PASS$\"}\n", "");
    let setup_fail =
        job_yaml(&by_id(6), "pass", "pass", "", "").replace("/vmlinuz\"", "/no-such-kernel\"");
    let cases = vec![
        (
            1u16,
            job_yaml(&by_id(1), "pass", "pass", "", ""),
            JobStatus::Pass,
        ),
        (
            2,
            job_yaml(&by_id(2), "warn", "warn", "", ""),
            JobStatus::Warn,
        ),
        (
            3,
            job_yaml(&by_id(3), "fail", "fail", "", ""),
            JobStatus::Fail,
        ),
        (4, complete, JobStatus::Complete),
        (
            5,
            job_yaml(&by_id(5), "hang", "hang", hang_timeouts, ""),
            JobStatus::Incomplete,
        ),
        (6, setup_fail, JobStatus::SetupFail),
        (
            7,
            job_yaml(&by_id(7), "unfit", "unfit", "", ""),
            JobStatus::Incomplete,
        ),
    ];
    let mut ids = Vec::new();
    for (n, yaml, want) in &cases {
        ids.push((*n, farm.submit(yaml, "").await, *want));
    }
    for (n, id, want) in &ids {
        let job = farm.wait_finished(*id, T).await;
        let events = farm.events(*id).await;
        assert_eq!(
            job.status,
            Some(*want),
            "machine {n}: {job:#?}\n{:#?}",
            kinds(&events)
        );
        assert_eq!(job.exit_code, Some(want.exit_code()));
        assert_eq!(job.machine_id, Some(mac(*n)));
        // Every job ends with teardown and its final event; the DUT is off.
        assert_eq!(
            events.last().unwrap().kind,
            "finished",
            "machine {n}: {:#?}",
            events
                .iter()
                .map(|e| (e.seq, e.kind.as_str(), e.message.as_str()))
                .collect::<Vec<_>>()
        );
        assert!(
            events
                .iter()
                .any(|e| e.kind == "phase" && e.data["phase"] == "teardown")
        );
        assert_eq!(farm.power(*n), PowerState::Off, "machine {n} left powered");
        let console = farm.console(*id).await;
        match want {
            JobStatus::Pass => {
                assert!(
                    console.contains("RESULT: PASS\r\nSESSION END"),
                    "{console:?}"
                );
                assert!(events.iter().any(|e| e.data["pattern"] == "job_success"));
            }
            JobStatus::Warn => assert!(console.contains("WARNING: flaky fan")),
            JobStatus::SetupFail => {
                assert!(
                    job.reason.as_deref().unwrap().contains("no-such-kernel"),
                    "{job:#?}"
                );
                // Refused before power-on: the DUT never booted.
                assert!(!events.iter().any(|e| e.data["phase"] == "power"));
                assert!(console.is_empty(), "{console:?}");
            }
            JobStatus::Incomplete if *n == 5 => {
                assert!(
                    job.reason.as_deref().unwrap().contains("console_activity"),
                    "{job:#?}"
                );
            }
            _ => {}
        }
    }
    // Machines are given back: IDLE, except the one that declared itself unfit.
    for n in 1..=6 {
        farm.wait_machine(mac(n), MachineState::Idle, T).await;
    }
    farm.wait_machine(mac(7), MachineState::Training, T).await;
    assert!(farm.mars.leases().await.unwrap().is_empty());

    // Artifacts: the console log and the events.
    let list: serde_json::Value = farm
        .get(&format!("/api/v1/jobs/{}/artifacts", ids[0].1))
        .await
        .json()
        .await
        .unwrap();
    let paths: Vec<&str> = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap())
        .collect();
    assert!(
        paths.contains(&"console.log") && paths.contains(&"events.json"),
        "{paths:?}"
    );
    let log = farm
        .http
        .get(format!(
            "{}/api/v1/jobs/{}/artifacts/console.log",
            farm.url, ids[0].1
        ))
        .bearer_auth(USER)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.contains("SESSION END"));
    let escape = farm
        .http
        .get(format!(
            "{}/api/v1/jobs/{}/artifacts/..%2F..%2Fexecutor.db",
            farm.url, ids[0].1
        ))
        .bearer_auth(USER)
        .send()
        .await
        .unwrap();
    assert_eq!(escape.status(), 404);
    farm.stop().await;
}

/// Acceptance 2: a silent DUT hits `first_console_activity`, is power-cycled into `continue`
/// `retries` times, then the job ends INCOMPLETE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_dut_retries_then_incomplete() {
    let farm = Farm::start(Options {
        machines: 3,
        ..options()
    })
    .await;
    let silent = farm
        .submit(
            &job_yaml(
                &by_id(1),
                "silent",
                "silent",
                "  first_console_activity: {seconds: 1, retries: 2}",
                "",
            ),
            "",
        )
        .await;
    // A reboot request spends a boot_cycle retry and boots `continue`.
    let reboot = farm
        .submit(
            &job_yaml(
                &by_id(2),
                "reboot",
                "pass",
                "  boot_cycle: {minutes: 1, retries: 1}",
                "",
            ),
            "",
        )
        .await;
    // Watchdog: start, two resets and a stop keep it alive past its 1 s budget; the next
    // start is never reset: it expires, once per boot (1 retry).
    let wd_timeouts = "  watchdogs:\n    wd: {seconds: 1, retries: 1}";
    let wd_patterns = "  watchdogs:\n    wd: {start: {regex: \"^wd start$\"}, reset: {regex: \"^wd reset$\"}, stop: {regex: \"^wd stop$\"}}";
    let watchdog = farm
        .submit(
            &job_yaml(&by_id(3), "watchdog", "watchdog", wd_timeouts, wd_patterns),
            "",
        )
        .await;

    let job = farm.wait_finished(silent, T).await;
    let events = farm.events(silent).await;
    assert_eq!(
        job.status,
        Some(JobStatus::Incomplete),
        "{:#?}",
        kinds(&events)
    );
    assert!(
        job.reason
            .as_deref()
            .unwrap()
            .contains("first_console_activity")
    );
    assert_eq!(job.boots, 3);
    let boots: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "boot")
        .map(|e| e.data["deployment"].as_str().unwrap())
        .collect();
    assert_eq!(boots, ["start", "continue", "continue"]);
    let timeouts: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "timeout")
        .map(|e| e.data["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        timeouts,
        ["retry", "retry", "abort"],
        "{:#?}",
        kinds(&events)
    );
    assert_eq!(events.iter().filter(|e| e.kind == "retry").count(), 2);
    assert_eq!(farm.power(1), PowerState::Off);
    // The boot config of the retries is the `continue` one, and it is cleared at the end.
    assert!(
        events
            .iter()
            .any(|e| e.data["step"] == "clear_boot_config" && e.data["ok"] == true)
    );

    let job = farm.wait_finished(reboot, T).await;
    let events = farm.events(reboot).await;
    assert_eq!(
        job.status,
        Some(JobStatus::Pass),
        "{job:#?} {:#?}",
        kinds(&events)
    );
    assert_eq!(job.boots, 2);
    assert!(events.iter().any(|e| e.data["pattern"] == "session_reboot"));

    let job = farm.wait_finished(watchdog, T).await;
    let events = farm.events(watchdog).await;
    assert_eq!(
        job.status,
        Some(JobStatus::Incomplete),
        "{:#?}",
        kinds(&events)
    );
    assert!(
        job.reason.as_deref().unwrap().contains("watchdog:wd"),
        "{job:#?}"
    );
    let first_boot: Vec<&str> = events
        .iter()
        .skip_while(|e| e.kind != "boot")
        .skip(1)
        .take_while(|e| e.kind != "boot")
        .filter(|e| e.kind == "watchdog")
        .map(|e| e.data["action"].as_str().unwrap())
        .collect();
    assert_eq!(first_boot, ["start", "reset", "reset", "stop", "start"]);
    let wd_timeouts: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "timeout")
        .map(|e| e.data["timeout"].as_str().unwrap())
        .collect();
    assert_eq!(wd_timeouts, ["watchdog:wd", "watchdog:wd"]);
    assert_eq!(job.boots, 2);
    farm.stop().await;
}

// Acceptance 3 (executor and job process deaths) is `tests/process_deaths.rs`: there the
// executor is a separate process, killed with SIGKILL.

/// Cancellation: a queued job ends at once; a running one is torn down (powered off, lease
/// released) and ends INCOMPLETE, reason `cancelled`; a finished one is 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancellation() {
    let farm = Farm::start(Options {
        machines: 1,
        ..options()
    })
    .await;
    let running = farm
        .submit(&job_yaml(&by_id(1), "slow", "slow", "", ""), "")
        .await;
    let queued = farm
        .submit(&job_yaml(&by_id(1), "pass", "pass", "", ""), "")
        .await;
    let deadline = tokio::time::Instant::now() + T;
    while farm.job(running).await.phase.as_deref() != Some("running") {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(farm.job(queued).await.state, JobState::Queued);
    // A queued job whose deadline passes ends INCOMPLETE then, though nothing else happens
    // in the queue meanwhile.
    let at = time::OffsetDateTime::now_utc() + Duration::from_millis(1500);
    let at = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let expiring = farm
        .submit(
            &format!(
                "deadline: \"{at}\"\n{}",
                job_yaml(&by_id(1), "pass", "pass", "", "")
            ),
            "",
        )
        .await;
    let t = std::time::Instant::now();
    let job = farm.wait_finished(expiring, T).await;
    assert_eq!(
        (job.status, job.reason.as_deref()),
        (
            Some(JobStatus::Incomplete),
            Some("deadline expired while queued")
        )
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1000) && t.elapsed() < Duration::from_secs(6),
        "expired after {:?}, not at its deadline",
        t.elapsed()
    );
    assert!(farm.job(running).await.status.is_none());
    let cancel = |id: i64| {
        farm.http
            .post(format!("{}/api/v1/jobs/{id}/cancel", farm.url))
            .bearer_auth(USER)
            .send()
    };
    assert_eq!(cancel(queued).await.unwrap().status(), 202);
    let q = farm.job(queued).await;
    assert_eq!(
        (q.state, q.status),
        (JobState::Finished, Some(JobStatus::Incomplete))
    );
    assert_eq!(q.reason.as_deref(), Some("cancelled"));
    assert_eq!(cancel(running).await.unwrap().status(), 202);
    let job = farm.wait_finished(running, T).await;
    assert_eq!(job.status, Some(JobStatus::Incomplete));
    assert_eq!(job.reason.as_deref(), Some("cancelled"));
    assert_eq!(farm.power(1), PowerState::Off);
    farm.wait_machine(mac(1), MachineState::Idle, T).await;
    assert_eq!(cancel(running).await.unwrap().status(), 409);
    farm.stop().await;
}

/// Acceptance 6: malformed jobs are refused with the field and the line, oversized bodies
/// with 413, impossible targets with 422, a busy target with `wait=false` with 409; nothing
/// refused is queued. Also: the valve-infra multipart form.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submission_errors_and_forms() {
    let farm = Farm::start(Options {
        machines: 1,
        tags: |_| vec!["gpu:vendor:a".into()],
        ..options()
    })
    .await;
    let good = job_yaml("  tags: [\"gpu:vendor:a\"]", "pass", "pass", "", "");
    let check = |status: u16, body: serde_json::Value, field: &str, line: Option<u64>| {
        assert_eq!(body["field"], field, "{body}");
        if let Some(l) = line {
            assert_eq!(body["line"], l, "{body}");
        }
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{status} {body}"
        );
    };
    let cases: Vec<(String, u16, &str, Option<u64>)> = vec![
        // YAML syntax error on line 3.
        (
            good.replacen("timeouts:\n", "timeouts:\n  overall: [oops\n", 1),
            400,
            "",
            None,
        ),
        // A misspelt key, line 4.
        (
            good.replacen("  overall:", "  overal:", 1),
            422,
            "timeouts.overal",
            Some(5),
        ),
        // `overall` cannot be retried.
        (
            good.replacen("{minutes: 2}", "{minutes: 2, retries: 1}", 1),
            422,
            "timeouts.overall.retries",
            Some(5),
        ),
        // A bad regex.
        (
            good.replacen("^SESSION END$", "(", 1),
            422,
            "console_patterns.session_end.regex",
            None,
        ),
        // An undefined template variable.
        (
            good.replacen("{{ artifacts }}/vmlinuz", "{{ nope }}/vmlinuz", 1),
            400,
            "",
            None,
        ),
        // Targets that can never match.
        (
            good.replacen(
                "  tags: [\"gpu:vendor:a\"]",
                "  id: \"02:00:00:00:00:99\"",
                1,
            ),
            422,
            "target.id",
            None,
        ),
        (
            good.replacen("gpu:vendor:a", "gpu:vendor:zz", 1),
            422,
            "target.tags",
            None,
        ),
    ];
    for (yaml, status, field, line) in cases {
        let r = farm.submit_raw(&yaml, "").await;
        assert_eq!(r.status(), status, "{yaml}");
        let body: serde_json::Value = r.json().await.unwrap();
        if field.is_empty() {
            assert!(body["error"].as_str().is_some(), "{body}");
            if status == 400 && body["line"].is_null() {
                assert!(
                    body["error"].as_str().unwrap().contains("nope")
                        || body["error"].as_str().unwrap().contains("line"),
                    "{body}"
                );
            }
        } else {
            check(status, body, field, line);
        }
    }
    // The YAML syntax error names its line.
    let r = farm
        .submit_raw(
            &good.replacen("timeouts:\n", "timeouts:\n  overall: [oops\n", 1),
            "",
        )
        .await;
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["line"].as_u64().is_some(), "{body}");

    // Oversized: a job over 1 MiB, and a body over the upload limit.
    let big = format!("{good}# {}\n", "x".repeat(1_100_000));
    assert_eq!(farm.submit_raw(&big, "").await.status(), 413);
    let huge = vec![b'#'; 300 * 1024 * 1024];
    let r = farm
        .http
        .post(format!("{}/api/v1/jobs", farm.url))
        .bearer_auth(USER)
        .body(huge)
        .send()
        .await;
    assert!(r.map(|r| r.status() == 413).unwrap_or(true));
    // No token, wrong token.
    let r = farm
        .http
        .post(format!("{}/api/v1/jobs", farm.url))
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Nothing was queued.
    let list: serde_json::Value = farm.get("/api/v1/jobs").await.json().await.unwrap();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 0, "{list}");

    // wait=false: accepted while the machine is free, 409 while it is busy.
    let slow = job_yaml("  tags: [\"gpu:vendor:a\"]", "slow", "slow", "", "");
    let first = farm.submit(&slow, "?wait=false").await;
    let deadline = tokio::time::Instant::now() + T;
    while farm.job(first).await.state != JobState::Running {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(farm.submit_raw(&good, "?wait=false").await.status(), 409);

    // valve-infra's multipart form; the metadata target replaces the job's.
    let form = reqwest::multipart::Form::new()
        .part(
            "metadata",
            reqwest::multipart::Part::text(
                serde_json::json!({"version": 1, "job_id": "ci-123", "target": {"id": mac(1).to_string()},
                                   "minio": {}})
                .to_string(),
            )
            .mime_str("application/json")
            .unwrap(),
        )
        .part("job", reqwest::multipart::Part::text(good.replacen("gpu:vendor:a", "sim:any:yes", 1)))
        .part(
            "job_bucket_initial_state_tarball_file",
            reqwest::multipart::Part::bytes(vec![0x1f, 0x8b, 0, 0]),
        );
    let r = farm
        .http
        .post(format!("{}/api/v1/jobs", farm.url))
        .bearer_auth(USER)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let sub: serde_json::Value = r.json().await.unwrap();
    let id = sub["id"].as_i64().unwrap();
    let job = farm.wait_finished(id, T).await;
    assert_eq!(job.external_id.as_deref(), Some("ci-123"));
    assert_eq!(job.target.id, Some(mac(1)));
    assert_eq!(job.status, Some(JobStatus::Pass));
    farm.stop().await;
}

/// The live streams: SSE events until `finished`, the console followed live and resumed from
/// an offset without loss or duplication.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_event_and_console_streams() {
    use futures::StreamExt;
    let farm = Farm::start(Options {
        machines: 1,
        ..options()
    })
    .await;
    let id = farm
        .submit(&job_yaml(&by_id(1), "slow", "slow", "", ""), "")
        .await;
    let sse = farm
        .http
        .get(format!("{}/api/v1/jobs/{id}/events", farm.url))
        .bearer_auth(USER)
        .header("accept", "text/event-stream")
        .send();
    let console = farm
        .http
        .get(format!("{}/api/v1/jobs/{id}/console", farm.url))
        .bearer_auth(USER)
        .send();
    let (sse, console) = tokio::join!(sse, console);
    let sse = sse.unwrap();
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let console = console.unwrap();
    assert_eq!(console.headers()["x-console-offset"], "0");
    let (sse_text, live) = tokio::join!(sse.text(), async {
        let mut body = Vec::new();
        let mut s = console.bytes_stream();
        while let Some(chunk) = s.next().await {
            body.extend_from_slice(&chunk.unwrap());
        }
        body
    });
    let sse_text = sse_text.unwrap();
    let ids: Vec<i64> = sse_text
        .lines()
        .filter_map(|l| l.strip_prefix("id: ").map(|v| v.parse().unwrap()))
        .collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    let last_event = sse_text
        .lines()
        .rfind(|l| l.starts_with("event: "))
        .unwrap();
    assert_eq!(last_event, "event: finished");
    let stored = farm.console(id).await;
    assert_eq!(String::from_utf8_lossy(&live), stored);
    assert!(stored.contains("SESSION END"));
    // Resume from an offset.
    let tail = farm
        .get(&format!("/api/v1/jobs/{id}/console?offset=10"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(&tail[..], &stored.as_bytes()[10..]);
    let past = farm
        .http
        .get(format!(
            "{}/api/v1/jobs/{id}/console?offset=999999",
            farm.url
        ))
        .bearer_auth(USER)
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);
    // Resuming the event stream after an id.
    let rest: serde_json::Value = farm
        .http
        .get(format!(
            "{}/api/v1/jobs/{id}/events?after={}",
            farm.url,
            ids[ids.len() - 2]
        ))
        .bearer_auth(USER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["events"].as_array().unwrap().len(), 1);
    farm.stop().await;
}

/// Acceptance 4: 200 jobs submitted at once onto 8 DUTs with mixed tags and priorities: every
/// job ends, no machine ever runs two jobs at once (from mars' lease log and the jobs'
/// events), and priority order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_jobs_on_eight_duts() {
    let farm = Farm::start(Options {
        machines: 8,
        tags: |n| {
            let mut t = vec![format!(
                "gpu:vendor:{}",
                if n.is_multiple_of(2) { "a" } else { "b" }
            )];
            if n <= 4 {
                t.push("ram:size:big".into());
            }
            t
        },
        lease_ttl: 10,
        ..options()
    })
    .await;
    // Hold every machine so that all 200 jobs are queued before the first is dispatched:
    // the blockers run until they are cancelled.
    let mut blockers = Vec::new();
    for n in 1..=8u16 {
        blockers.push(
            farm.submit(&job_yaml(&by_id(n), "hang", "hang", "", ""), "")
                .await,
        );
    }
    // ... and wait until they hold their machines.
    for id in &blockers {
        let deadline = tokio::time::Instant::now() + T;
        while farm.job(*id).await.phase.as_deref() != Some("running") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "blocker {id} never ran"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let targets = [
        "  tags: []",
        "  tags: [\"gpu:vendor:a\"]",
        "  tags: [\"gpu:vendor:b\"]",
        "  tags: [\"ram:size:big\"]",
        "  tags: [\"gpu:vendor:a\", \"ram:size:big\"]",
    ];
    let subs = (0..200u32).map(|i| {
        let target = targets[(i * 7 % 5) as usize];
        let prio = (i * 13 % 4) as i64;
        let yaml = job_yaml(target, "pass", "pass", "", "");
        let farm = &farm;
        async move {
            (
                farm.submit(&yaml, &format!("?priority={prio}")).await,
                prio,
                target,
            )
        }
    });
    let jobs: Vec<(i64, i64, &str)> = futures::future::join_all(subs).await;
    for id in &blockers {
        let r = farm
            .http
            .post(format!("{}/api/v1/jobs/{id}/cancel", farm.url))
            .bearer_auth(USER)
            .send()
            .await
            .unwrap();
        if r.status() != 202 {
            let job = farm.job(*id).await;
            let events = farm.events(*id).await;
            panic!(
                "blocker {id} not cancellable: {job:#?} {:#?}",
                kinds(&events)
            );
        }
    }
    let mut finished = Vec::new();
    for id in blockers.iter().copied().chain(jobs.iter().map(|j| j.0)) {
        finished.push(farm.wait_finished(id, Duration::from_secs(240)).await);
    }
    for j in &finished {
        let want = if blockers.contains(&j.id) {
            JobStatus::Incomplete
        } else {
            JobStatus::Pass
        };
        assert_eq!(j.status, Some(want), "{j:#?}");
    }

    // One job at a time per machine: mars' lease log alternates acquire/release of one job.
    for n in 1..=8u16 {
        let log = farm
            .mars
            .machine_events(mac(n), Some(10_000))
            .await
            .unwrap()
            .events;
        let mut holder: Option<String> = None;
        let mut held = 0;
        for e in log.iter().filter(|e| e.kind.starts_with("lease_")) {
            match e.kind.as_str() {
                "lease_acquired" => {
                    assert!(holder.is_none(), "machine {n} leased twice: {e:?}");
                    holder = e.job_id.clone();
                    held += 1;
                }
                _ => {
                    assert_eq!(holder, e.job_id, "machine {n}: release of another job");
                    holder = None;
                }
            }
        }
        assert!(held >= 1, "machine {n} ran no job");
    }
    // ... and from the jobs' own events: power-on to power-off intervals never overlap.
    let mut spans: std::collections::BTreeMap<_, Vec<(i64, i64)>> = Default::default();
    for j in &finished {
        let ev = farm.events(j.id).await;
        let on = ev
            .iter()
            .find(|e| e.data["phase"] == "power")
            .unwrap()
            .at
            .millis();
        let off = ev
            .iter()
            .find(|e| e.data["step"] == "power_off")
            .unwrap()
            .at
            .millis();
        spans
            .entry(j.machine_id.unwrap())
            .or_default()
            .push((on, off));
    }
    for (m, mut s) in spans {
        s.sort();
        for w in s.windows(2) {
            assert!(w[1].0 >= w[0].1, "machine {m}: overlapping jobs {w:?}");
        }
    }
    // Priority: a job never went before a higher-priority (or older same-priority) job that
    // could have used the same machine.
    let view: std::collections::HashMap<i64, &dutgate_executor::model::Job> =
        finished.iter().map(|j| (j.id, j)).collect();
    let machine_tags = |n: u16| -> Vec<String> {
        let mut t = vec![
            "sim:any:yes".to_string(),
            format!("gpu:vendor:{}", if n.is_multiple_of(2) { "a" } else { "b" }),
        ];
        if n <= 4 {
            t.push("ram:size:big".into());
        }
        t
    };
    let fits = |target: &str, m: dutgate_core::MachineId| {
        let n = u16::from_be_bytes([m.bytes()[4], m.bytes()[5]]);
        let tags = machine_tags(n);
        target
            .split('"')
            .skip(1)
            .step_by(2)
            .all(|t| tags.iter().any(|mt| mt == t))
    };
    // Leases of one scheduler round are taken concurrently, so compare rounds, not instants.
    let mut round = std::collections::HashMap::new();
    for j in &finished {
        let ev = farm.events(j.id).await;
        let d = ev.iter().find(|e| e.kind == "dispatched").unwrap();
        round.insert(j.id, d.data["round"].as_u64().unwrap());
    }
    let mut violations = Vec::new();
    for (a, pa, ta) in &jobs {
        for (b, pb, _) in &jobs {
            let jb = view[b];
            let better = pa > pb || (pa == pb && a < b);
            if better && round[b] < round[a] && fits(ta, jb.machine_id.unwrap()) {
                violations.push((a, b));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "priority order broken: {violations:?}"
    );
    assert!(farm.mars.leases().await.unwrap().is_empty());
    farm.stop().await;
}

/// The interactive console: output over a WebSocket, keystrokes back to the DUT through salad,
/// and the final status as the last message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interactive_console_over_websocket() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let farm = Farm::start(Options {
        machines: 1,
        ..options()
    })
    .await;
    let id = farm
        .submit(&job_yaml(&by_id(1), "echo", "echo", "", ""), "")
        .await;
    let mut req = format!(
        "ws://127.0.0.1:{}/api/v1/jobs/{id}/console/ws",
        farm.executors[0].port
    )
    .into_client_request()
    .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {USER}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut output = Vec::new();
    let mut sent = false;
    let mut end = None;
    let deadline = tokio::time::Instant::now() + T;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, ws.next()).await {
        match msg.unwrap() {
            Message::Binary(b) => {
                output.extend_from_slice(&b);
                if !sent && String::from_utf8_lossy(&output).contains("READY_FOR_INPUT") {
                    ws.send(Message::Text("hello-ws\n".into())).await.unwrap();
                    sent = true;
                }
            }
            Message::Text(t) => end = Some(t.to_string()),
            Message::Close(_) => break,
            _ => {}
        }
    }
    let output = String::from_utf8_lossy(&output);
    assert!(output.contains("ECHO:hello-ws"), "{output:?}");
    let end: serde_json::Value = serde_json::from_str(&end.expect("no final status")).unwrap();
    assert_eq!(end["status"], "PASS");
    assert_eq!(end["exit_code"], 0);
    farm.stop().await;
}
