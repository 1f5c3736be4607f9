//! Leases and the events stream, on every backend (SQLite, and PostgreSQL when
//! `DUTGATE_TEST_POSTGRES_URL` is set), through the real HTTP API and typed client.

mod common;

use std::time::Duration;

use common::*;
use dutgate_core::db::testing::databases;
use dutgate_mars::client::{is_conflict, is_gone};
use dutgate_mars::model::{LeasePurpose, LeaseRequest, MachineState, ReleaseOutcome};
use dutgate_mars::store::MIGRATIONS;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_lease_attempts_exactly_one_wins() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let id = idle_machine(&t, 1).await;
        for round in 0..3 {
            let mut tasks = Vec::new();
            for i in 0..16 {
                let c = t.admin.clone();
                tasks.push(tokio::spawn(async move {
                    c.acquire(
                        id,
                        &format!("job-{round}-{i}"),
                        "test",
                        LeasePurpose::Job,
                        None,
                    )
                    .await
                }));
            }
            let mut won = Vec::new();
            for task in tasks {
                match task.await.unwrap() {
                    Ok(l) => won.push(l),
                    Err(e) => assert!(is_conflict(&e), "{backend:?}: {e}"),
                }
            }
            assert_eq!(won.len(), 1, "{backend:?} round {round}: {won:?}");
            let m = t.admin.machine(id).await.unwrap();
            assert_eq!(m.state, MachineState::Running);
            assert_eq!(m.lease.as_ref().unwrap().id, won[0].id);
            let m = t
                .admin
                .release(&won[0].id, ReleaseOutcome::Ok, None)
                .await
                .unwrap();
            assert_eq!(m.state, MachineState::Idle);
            assert!(m.lease.is_none());
        }
        // Users cannot lease a machine in training; the trainer's jobs can, once.
        let m2 = t.anon.register(&registration(2)).await.unwrap().id;
        t.admin
            .patch(
                m2,
                &dutgate_mars::model::MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some("2".into())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            t.admin.machine(m2).await.unwrap().state,
            MachineState::Training
        );
        let e = t
            .admin
            .acquire(m2, "user-job", "test", LeasePurpose::Job, None)
            .await
            .unwrap_err();
        assert!(is_conflict(&e), "{e}");
        let mut tasks = Vec::new();
        for i in 0..8 {
            let c = t.admin.clone();
            tasks.push(tokio::spawn(async move {
                c.acquire(
                    m2,
                    &format!("train-{i}"),
                    "trainer",
                    LeasePurpose::Training,
                    None,
                )
                .await
            }));
        }
        let mut wins = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => wins += 1,
                Err(e) => assert!(is_conflict(&e), "{e}"),
            }
        }
        assert_eq!(wins, 1, "{backend:?}");
        assert_eq!(
            t.admin.machine(m2).await.unwrap().state,
            MachineState::Training
        );
        t.stop().await;
    }
}

#[tokio::test]
async fn release_outcomes_and_quarantine() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        let id = idle_machine(&t, 1).await;
        let lease = |job: &'static str| {
            let c = t.admin.clone();
            async move {
                c.acquire(id, job, "test", LeasePurpose::Job, None)
                    .await
                    .unwrap()
            }
        };
        // Two infrastructure failures: back to IDLE each time, counted.
        for job in ["a", "b"] {
            let l = lease(job).await;
            let m = t
                .admin
                .release(
                    &l.id,
                    ReleaseOutcome::InfrastructureFailure,
                    Some("no console"),
                )
                .await
                .unwrap();
            assert_eq!(m.state, MachineState::Idle);
        }
        assert_eq!(
            t.admin
                .machine(id)
                .await
                .unwrap()
                .consecutive_infra_failures,
            2
        );
        // A good job resets the count.
        let l = lease("c").await;
        t.admin
            .release(&l.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        assert_eq!(
            t.admin
                .machine(id)
                .await
                .unwrap()
                .consecutive_infra_failures,
            0
        );
        // Three in a row: QUARANTINED.
        for (i, job) in ["d", "e", "f"].into_iter().enumerate() {
            let l = lease(job).await;
            let m = t
                .admin
                .release(&l.id, ReleaseOutcome::InfrastructureFailure, None)
                .await
                .unwrap();
            let want = if i == 2 {
                MachineState::Quarantined
            } else {
                MachineState::Idle
            };
            assert_eq!(m.state, want);
        }
        // Retrained by itself after the quarantine period (default 24 h).
        let m = t.admin.machine(id).await.unwrap();
        let retry = m
            .training
            .next_attempt_at
            .expect("a retraining is scheduled");
        let in_hours =
            (retry.millis() - dutgate_mars::model::Timestamp::now().millis()) as f64 / 3.6e6;
        assert!((23.9..=24.1).contains(&in_hours), "{in_hours}");
        let ev = t.admin.machine_events(id, None).await.unwrap().events;
        let last = ev.last().unwrap();
        assert_eq!(last.kind, "quarantined");
        assert_eq!(last.actor, "executor");
        assert_eq!(last.job_id.as_deref(), Some("f"));
        // Machine unfit → TRAINING.
        let id2 = idle_machine(&t, 2).await;
        let l = t
            .admin
            .acquire(id2, "g", "test", LeasePurpose::Job, None)
            .await
            .unwrap();
        let e = t.admin.heartbeat("nope").await.unwrap_err();
        assert!(is_gone(&e), "{e}");
        let hb = t.admin.heartbeat(&l.id).await.unwrap();
        assert!(hb.expires_at >= l.expires_at);
        let m = t
            .admin
            .release(&l.id, ReleaseOutcome::MachineUnfit, Some("MCE"))
            .await
            .unwrap();
        assert_eq!(m.state, MachineState::Training);
        let e = t
            .admin
            .release(&l.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap_err();
        assert!(is_gone(&e), "{e}");
        t.stop().await;
    }
}

#[tokio::test]
async fn expired_lease_frees_the_machine_and_records_an_infrastructure_failure() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        let id = idle_machine(&t, 1).await;
        let cursor = t.admin.events_cursor().await.unwrap();
        let l = t
            .admin
            .acquire(
                id,
                "dead-job",
                "executor@test",
                LeasePurpose::Job,
                Some(Duration::from_secs(1)),
            )
            .await
            .unwrap();
        assert_eq!(l.ttl_seconds, 1);
        // Follow the stream until the expiry shows up (no sleeps: the long-poll wakes us).
        let mut after = cursor;
        let expired = loop {
            let batch = t
                .admin
                .events(after, Duration::from_secs(10))
                .await
                .unwrap();
            assert!(
                !batch.events.is_empty(),
                "no event within the long-poll budget"
            );
            after = batch.next;
            if let Some(e) = batch.events.iter().find(|e| e.kind == "lease_expired") {
                break e.clone();
            }
        };
        assert_eq!(expired.machine_id, id);
        assert_eq!(expired.from_state, MachineState::Running);
        assert_eq!(expired.to_state, MachineState::QuickCheck);
        assert_eq!(expired.job_id.as_deref(), Some("dead-job"));
        assert!(
            expired.reason.contains("infrastructure failure"),
            "{}",
            expired.reason
        );
        let m = t.admin.machine(id).await.unwrap();
        assert!(m.lease.is_none());
        assert_eq!(m.consecutive_infra_failures, 1);
        let e = t.admin.heartbeat(&l.id).await.unwrap_err();
        assert!(is_gone(&e), "{e}");
        t.stop().await;
    }
}

#[tokio::test]
async fn events_long_poll_wakes_on_a_freed_machine() {
    for db in databases("mars", MIGRATIONS).await {
        let t = start(db, Options::default()).await;
        let id = idle_machine(&t, 1).await;
        let l = t
            .admin
            .acquire(id, "j", "test", LeasePurpose::Job, None)
            .await
            .unwrap();
        let cursor = t.admin.events_cursor().await.unwrap();
        // Nothing happens: an empty batch after the (short) wait, cursor unchanged.
        let empty = t
            .admin
            .events(cursor, Duration::from_millis(200))
            .await
            .unwrap();
        assert!(empty.events.is_empty());
        assert_eq!(empty.next, cursor);
        // Any cursor is answered, also one far past the newest event or before the first.
        for far in [i64::MAX, i64::MIN, -1] {
            let b = t.admin.events(far, Duration::ZERO).await.unwrap();
            assert_eq!(b.events.is_empty(), far == i64::MAX, "after={far}");
        }
        let c = t.admin.clone();
        let waiter = tokio::spawn(async move { c.events(cursor, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.admin
            .release(&l.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        let batch = waiter.await.unwrap().unwrap();
        assert_eq!(batch.events.len(), 1, "{:?}", batch.events);
        assert!(batch.events[0].frees_machine());
        assert_eq!(batch.next, batch.events[0].seq);
        t.stop().await;
    }
}

fn lease_req(machine: dutgate_core::MachineId, job: &str, purpose: LeasePurpose) -> LeaseRequest {
    LeaseRequest {
        machine_id: machine,
        job_id: job.into(),
        holder: "batch-test".into(),
        purpose,
        ttl_seconds: None,
        lease_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_leases_each_granted_or_refused_in_one_request() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let a = idle_machine(&t, 1).await;
        let b = idle_machine(&t, 2).await;
        // Registered, not configured: neither a job's nor a training's machine.
        let waiting = t.anon.register(&registration(3)).await.unwrap().id;
        let unknown = dutgate_core::MachineId::parse("52:54:00:00:00:99").unwrap();
        let mut bad = lease_req(b, "job-bad", LeasePurpose::Job);
        bad.holder = String::new();
        let results = t
            .admin
            .acquire_many(&[
                lease_req(a, "job-1", LeasePurpose::Job),
                lease_req(a, "job-2", LeasePurpose::Job),
                lease_req(unknown, "job-3", LeasePurpose::Job),
                lease_req(waiting, "job-4", LeasePurpose::Job),
                bad,
                lease_req(b, "job-5", LeasePurpose::Job),
            ])
            .await
            .unwrap();
        let statuses: Vec<u16> = results
            .iter()
            .map(|r| r.as_ref().map_or_else(|e| e.status, |_| 201))
            .collect();
        assert_eq!(
            statuses,
            vec![201, 409, 404, 409, 400, 201],
            "{backend:?}: {results:?}"
        );
        for (m, job, r) in [(a, "job-1", &results[0]), (b, "job-5", &results[5])] {
            let lease = r.as_ref().unwrap();
            let machine = t.admin.machine(m).await.unwrap();
            assert_eq!(machine.state, MachineState::Running);
            assert_eq!(machine.lease.as_ref(), Some(lease));
            assert_eq!(lease.job_id, job);
            // The same events as a single lease.
            let events = t.admin.machine_events(m, None).await.unwrap();
            let last = events.events.last().unwrap();
            assert_eq!(
                (last.kind.as_str(), last.job_id.as_deref()),
                ("lease_acquired", Some(job))
            );
        }
        // Batches racing for the same machines: each machine is leased exactly once.
        for r in [&results[0], &results[5]] {
            t.admin
                .release(&r.as_ref().unwrap().id, ReleaseOutcome::Ok, None)
                .await
                .unwrap();
        }
        let mut tasks = Vec::new();
        for i in 0..8 {
            let c = t.admin.clone();
            tasks.push(tokio::spawn(async move {
                c.acquire_many(&[
                    lease_req(a, &format!("race-{i}-a"), LeasePurpose::Job),
                    lease_req(b, &format!("race-{i}-b"), LeasePurpose::Job),
                ])
                .await
                .unwrap()
            }));
        }
        let mut won = Vec::new();
        for task in tasks {
            for r in task.await.unwrap() {
                match r {
                    Ok(l) => won.push(l),
                    Err(e) => assert_eq!(e.status, 409, "{backend:?}: {e:?}"),
                }
            }
        }
        let mut machines: Vec<_> = won.iter().map(|l| l.machine_id).collect();
        machines.sort();
        assert_eq!(machines, vec![a, b], "{backend:?}: {won:?}");
        for l in &won {
            let m = t.admin.machine(l.machine_id).await.unwrap();
            assert_eq!(m.lease.as_ref(), Some(l));
        }
        // Too many at once: 400, nothing taken.
        let many: Vec<LeaseRequest> = (0..=dutgate_mars::model::MAX_LEASE_BATCH)
            .map(|i| lease_req(unknown, &format!("j{i}"), LeasePurpose::Job))
            .collect();
        let e = t.admin.acquire_many(&many).await.unwrap_err();
        assert_eq!(e.status(), Some(reqwest::StatusCode::BAD_REQUEST));
        t.stop().await;
    }
}

/// A follower of `GET /api/v1/events` sees every event even while many transactions write
/// events at once: on PostgreSQL seqs come from a sequence, and without ordering the commits a
/// follower could read seq n+1 before seq n commits and move past n for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_followers_miss_nothing_under_concurrent_writes() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let mut ids = Vec::new();
        for n in 1..=12 {
            ids.push(idle_machine(&t, n).await);
        }
        let from = t.admin.events_cursor().await.unwrap();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(i64::MAX);
        let follower = {
            let c = t.admin.clone();
            tokio::spawn(async move {
                let (mut cursor, mut seen) = (from, Vec::new());
                while cursor < *stop_rx.borrow() {
                    let batch = c.events(cursor, Duration::from_millis(200)).await.unwrap();
                    seen.extend(batch.events);
                    cursor = batch.next;
                }
                seen
            })
        };
        let mut writers = Vec::new();
        for (i, id) in ids.iter().copied().enumerate() {
            let c = t.admin.clone();
            writers.push(tokio::spawn(async move {
                for round in 0..20 {
                    let lease = c
                        .acquire(
                            id,
                            &format!("job-{i}-{round}"),
                            "test",
                            LeasePurpose::Job,
                            None,
                        )
                        .await
                        .unwrap();
                    c.release(&lease.id, ReleaseOutcome::Ok, None)
                        .await
                        .unwrap();
                }
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        let end = t.admin.events_cursor().await.unwrap();
        stop_tx.send(end).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(30), follower)
            .await
            .expect("the follower reaches the end of the stream")
            .unwrap();
        let written = t.mars.store.events_after(from, 100_000).await.unwrap();
        assert_eq!(written.len(), 12 * 20 * 2, "{backend:?}");
        let seen_seqs: Vec<i64> = seen.iter().map(|e| e.seq).collect();
        let missed: Vec<i64> = written
            .iter()
            .map(|e| e.seq)
            .filter(|s| !seen_seqs.contains(s))
            .collect();
        assert!(
            missed.is_empty(),
            "{backend:?}: the follower missed {missed:?}"
        );
        // Whether answered from memory (SQLite) or from the table, the stream is the table.
        assert_eq!(seen, written, "{backend:?}");
    }
}

/// mars decides a state change on the row it last read or wrote, without reading it again;
/// the row's version catches a row changed elsewhere. Two mars on one database, each changing
/// what the other holds in memory: no lease is granted on a leased machine and none refused on
/// a free one, in single and batch requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_on_rows_changed_elsewhere_are_made_again_on_a_fresh_read() {
    use dutgate_mars::power::MemoryPower;
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let m = idle_machine(&t, 1).await;
        let other = dutgate_mars::machines::Mars::new(
            dutgate_mars::store::Store::new(t.db.db.clone(), "farm"),
            dutgate_mars::Config::default(),
            std::sync::Arc::new(MemoryPower::default()),
        );
        let job = LeasePurpose::Job;
        // `t` leases and releases: it knows the machine idle.
        let first = t.admin.acquire(m, "one", "t", job, None).await.unwrap();
        t.admin
            .release(&first.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        // The other mars leases it behind `t`'s back.
        let held = other.acquire(lease_req(m, "two", job)).await.unwrap();
        let refused = t
            .admin
            .acquire(m, "three", "t", job, None)
            .await
            .unwrap_err();
        assert!(is_conflict(&refused), "{backend:?}: {refused:?}");
        let refused = t
            .admin
            .acquire_many(&[lease_req(m, "four", job)])
            .await
            .unwrap();
        assert!(
            matches!(&refused[0], Err(e) if e.status == 409),
            "{backend:?}: {refused:?}"
        );
        // `t` now knows it leased; the other mars releases it: `t` grants the next lease.
        other
            .release(&held.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        let granted = t
            .admin
            .acquire_many(&[lease_req(m, "five", job)])
            .await
            .unwrap();
        let lease = granted[0].as_ref().unwrap();
        t.admin
            .release(&lease.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        let held = other.acquire(lease_req(m, "six", job)).await.unwrap();
        other
            .release(&held.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        let lease = t.admin.acquire(m, "seven", "t", job, None).await.unwrap();
        assert_eq!(lease.job_id, "seven");
        // One lease_acquired per lease granted, in the order granted.
        let jobs: Vec<String> = t
            .admin
            .machine_events(m, None)
            .await
            .unwrap()
            .events
            .into_iter()
            .filter(|e| e.kind == "lease_acquired")
            .filter_map(|e| e.job_id)
            .collect();
        assert_eq!(jobs, ["one", "two", "five", "six", "seven"], "{backend:?}");
        t.stop().await;
    }
}

/// A lease requester may choose the lease's id (the executor records its dispatch under it
/// while the lease is taken): granted under that id, refused with 400 naming `lease_id` when it
/// is not one, and with 409 when it is in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_id_chosen_by_the_requester_is_used_checked_and_unique() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let a = idle_machine(&t, 1).await;
        let b = idle_machine(&t, 2).await;
        let chosen = dutgate_mars::model::new_lease_id();
        let mut malformed = lease_req(b, "job-2", LeasePurpose::Job);
        malformed.lease_id = Some("NOT-HEX".into());
        let mut first = lease_req(a, "job-1", LeasePurpose::Job);
        first.lease_id = Some(chosen.clone());
        let results = t.admin.acquire_many(&[first, malformed]).await.unwrap();
        let granted = results[0].as_ref().expect("granted");
        assert_eq!(granted.id, chosen, "{backend:?}");
        let refusal = results[1].as_ref().expect_err("malformed id");
        assert_eq!(refusal.status, 400, "{backend:?}: {refusal:?}");
        assert!(
            refusal.error.contains("lease_id"),
            "{backend:?}: {refusal:?}"
        );
        assert_eq!(
            t.admin.machine(a).await.unwrap().lease.map(|l| l.id),
            Some(chosen.clone())
        );
        // The same id for another machine: refused, nothing written.
        let mut again = lease_req(b, "job-3", LeasePurpose::Job);
        again.lease_id = Some(chosen.clone());
        match t.admin.acquire_many(&[again]).await {
            Ok(r) => assert_eq!(
                r[0].as_ref().map_err(|e| e.status).err(),
                Some(409),
                "{backend:?}"
            ),
            Err(e) => assert!(is_conflict(&e), "{backend:?}: {e}"),
        }
        let mb = t.admin.machine(b).await.unwrap();
        assert_eq!(mb.state, MachineState::Idle, "{backend:?}");
        assert!(mb.lease.is_none(), "{backend:?}");
        // Released under the chosen id.
        t.admin
            .release(&chosen, ReleaseOutcome::Ok, None)
            .await
            .unwrap();
        t.stop().await;
    }
}

/// A lease that lapsed while mars was down gets a grace period from mars' start for its
/// holder to heartbeat again; a lease that expires is claimed, the machine powered off, and
/// only once the PDU reads OFF is the machine freed. While the power-off fails the lease is
/// neither freed, nor revived by a heartbeat, nor released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_after_a_restart_waits_a_grace_and_powers_off_before_freeing() {
    use dutgate_core::PowerState;
    use dutgate_mars::machines::Mars;
    use dutgate_mars::model::{MachinePatch, Timestamp};
    use dutgate_mars::power::MemoryPower;
    use dutgate_mars::state::Trigger;
    use dutgate_mars::store::{Cause, Store, new_row};
    use std::sync::Arc;
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let config = dutgate_mars::Config {
            lease_ttl_seconds: 1,
            lease_grace_seconds: 2,
            ..Default::default()
        };
        let power = Arc::new(MemoryPower::default());
        // Before the restart: a mars without its sweeper (stopped) leased an IDLE machine and
        // the job powered it on.
        let before = Mars::new(
            Store::new(db.db.clone(), "farm"),
            config.clone(),
            power.clone(),
        );
        let id = mac(1);
        let reg = registration(1);
        let row = new_row(id, "virtio", reg.tags, reg.ip_address, None, 0.0);
        before
            .store
            .insert_new(row, &Cause::new("test", "registered"))
            .await
            .unwrap();
        before
            .patch(
                id,
                MachinePatch {
                    pdu: Some(Some("pdu1".into())),
                    pdu_port_id: Some(Some("1".into())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        before
            .store
            .trigger(
                id,
                Trigger::TrainingPassed,
                &Cause::new("test", "trained"),
                &|_| {},
            )
            .await
            .unwrap();
        let lease = before
            .acquire(lease_req(id, "survivor", LeasePurpose::Job))
            .await
            .unwrap();
        power.set_state("pdu1", "1", PowerState::On);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Timestamp::now() <= lease.expires_at {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // mars starts: the lapsed lease gets its grace, the holder heartbeats in time.
        let t = start(
            db,
            Options {
                config,
                power: Some(power.clone()),
                ..Default::default()
            },
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let m = t.admin.machine(id).await.unwrap();
            assert_eq!(m.state, MachineState::Running, "{backend:?}");
            let l = m.lease.expect("the lease survives the restart");
            if l.expires_at > Timestamp::now() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: no grace"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t.admin.heartbeat(&lease.id).await.unwrap();
        assert_eq!(power.state("pdu1", "1"), PowerState::On);
        // The holder goes silent and the PDU does not answer: claimed, not freed.
        power
            .broken
            .lock()
            .unwrap()
            .insert(("pdu1".into(), "1".into()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = t.admin.machine(id).await.unwrap();
            let l = m.lease.expect("not freed while the power-off fails");
            assert_eq!(m.state, MachineState::Running, "{backend:?}");
            if l.expires_at.millis() < 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend:?}: never claimed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let e = t.admin.heartbeat(&lease.id).await.unwrap_err();
        assert!(is_gone(&e), "{backend:?}: {e}");
        let e = t
            .admin
            .release(&lease.id, ReleaseOutcome::Ok, None)
            .await
            .unwrap_err();
        assert!(is_gone(&e), "{backend:?}: {e}");
        let events = t.admin.machine_events(id, None).await.unwrap().events;
        assert!(!events.iter().any(|e| e.kind == "lease_expired"));
        assert_eq!(power.state("pdu1", "1"), PowerState::On);
        // The PDU answers again: off, then freed (to a quick check).
        power.broken.lock().unwrap().clear();
        t.wait_state(id, MachineState::QuickCheck, Duration::from_secs(10))
            .await;
        assert_eq!(power.state("pdu1", "1"), PowerState::Off, "{backend:?}");
        let m = t.admin.machine(id).await.unwrap();
        assert!(m.lease.is_none());
        assert_eq!(m.consecutive_infra_failures, 1);
        t.stop().await;
    }
}

/// A lease id is the holder's credential (salad takes it as proof of holding the machine):
/// only admins see it; DUTs and user tokens see the lease without its id.
#[tokio::test]
async fn lease_ids_are_shown_to_admins_only() {
    for db in databases("mars", MIGRATIONS).await {
        let backend = db.backend();
        let t = start(db, Options::default()).await;
        let id = idle_machine(&t, 1).await;
        let lease = t
            .admin
            .acquire(id, "job-1", "test", LeasePurpose::Job, None)
            .await
            .unwrap();
        assert!(!lease.id.is_empty());
        let shown = t.admin.machine(id).await.unwrap();
        assert_eq!(shown.lease.unwrap().id, lease.id, "{backend:?}");
        for (who, client) in [("user", &t.user), ("DUT", &t.anon)] {
            let m = client.machine(id).await.unwrap();
            let l = m.lease.expect("the lease is shown");
            assert_eq!(l.job_id, "job-1");
            assert!(l.id.is_empty(), "{backend:?}: {who} sees the lease id");
            let all = client.machines().await.unwrap();
            assert!(
                all.iter()
                    .filter_map(|m| m.lease.as_ref())
                    .all(|l| l.id.is_empty()),
                "{backend:?}: {who} sees a lease id in the list"
            );
            let leases = client.leases().await.unwrap();
            assert!(
                leases.iter().all(|l| l.id.is_empty()),
                "{backend:?}: {who} sees a lease id in the lease list"
            );
        }
    }
}
