//! The queue store on SQLite, and on PostgreSQL when `DUTGATE_TEST_POSTGRES_URL` is set:
//! dispatch order, claims (`FOR UPDATE SKIP LOCKED` on PostgreSQL), events, one finish.

use dutgate_core::db::Backend;
use dutgate_core::db::testing::databases;
use dutgate_core::{JobStatus, MachineId};
use dutgate_executor::model::{JobState, Purpose};
use dutgate_executor::store::{Dispatch, MIGRATIONS, NewJob, Store};

fn job(priority: i64, tags: &[&str]) -> NewJob {
    NewJob {
        external_id: None,
        priority,
        purpose: Purpose::Job,
        job_yaml: "version: 1\n".into(),
        target_id: None,
        target_tags: tags.iter().map(|t| t.to_string()).collect(),
        deadline_ms: None,
        has_tarball: false,
    }
}

#[tokio::test]
async fn queue_order_claims_events_and_finish() {
    for db in databases("executor", MIGRATIONS).await {
        let store = Store::new(db.db.clone());
        let low = store.insert(&job(0, &["a:b:c"])).await.unwrap();
        let high = store.insert(&job(5, &[])).await.unwrap();
        let low2 = store.insert(&job(0, &[])).await.unwrap();
        let order: Vec<i64> = store
            .queued(10)
            .await
            .unwrap()
            .iter()
            .map(|q| q.id)
            .collect();
        assert_eq!(order, vec![high, low, low2], "priority, then FIFO");

        let m = MachineId::parse("52:54:00:00:00:01").unwrap();
        let claim = store.claim(high).await.unwrap().unwrap();
        if db.backend() == Backend::Postgres {
            // A second executor skips the locked row instead of waiting for it.
            let other = Store::new(db.db.clone());
            assert!(other.claim(high).await.unwrap().is_none());
        }
        assert!(
            store
                .complete_dispatch(claim, m, "lease-1", "exec-a")
                .await
                .unwrap()
        );
        // Already dispatched: no second claim succeeds.
        match store.claim(high).await.unwrap() {
            None => {}
            Some(c) => assert!(
                !store
                    .complete_dispatch(c, m, "lease-2", "exec-b")
                    .await
                    .unwrap()
            ),
        }
        let row = store.require(high).await.unwrap();
        assert_eq!(
            (row.state, row.machine_id, row.lease_id.as_deref()),
            (JobState::Dispatched, Some(m), Some("lease-1"))
        );
        assert_eq!(store.active_of("exec-a").await.unwrap().len(), 1);

        // Concurrent event writers get distinct, gapless sequence numbers.
        let mut tasks = Vec::new();
        for i in 0..20 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.add_event(high, "phase", &format!("e{i}"), serde_json::json!({}))
                    .await
                    .unwrap()
            }));
        }
        let mut seqs: Vec<i64> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        seqs.sort();
        let events = store.events(high, 0).await.unwrap();
        assert_eq!(events.len(), 22, "submitted + dispatched + 20");
        assert_eq!(seqs, (3..=22).collect::<Vec<_>>());

        // The first finish wins; a second is refused.
        assert!(
            store
                .finish(high, JobStatus::Pass, "session ended")
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .finish(high, JobStatus::Incomplete, "late")
                .await
                .unwrap()
                .is_none()
        );
        let row = store.require(high).await.unwrap();
        assert_eq!(
            (row.status, row.reason.as_deref()),
            (Some(JobStatus::Pass), Some("session ended"))
        );

        // Cancelling a queued job finishes it; deadlines expire queued jobs only.
        assert!(
            store
                .finish(low2, JobStatus::Incomplete, "cancelled")
                .await
                .unwrap()
                .is_some()
        );
        let mut d = job(0, &[]);
        d.deadline_ms = Some(1);
        let expired = store.insert(&d).await.unwrap();
        assert_eq!(store.expired_queued(1000).await.unwrap(), vec![expired]);
        assert_eq!(store.next_deadline().await.unwrap(), Some(1));
        let order: Vec<i64> = store
            .queued(10)
            .await
            .unwrap()
            .iter()
            .map(|q| q.id)
            .collect();
        assert_eq!(order, vec![low, expired]);
        db.cleanup().await;
    }
}

#[tokio::test]
async fn batch_claim_and_commit() {
    for db in databases("executor", MIGRATIONS).await {
        let store = Store::new(db.db.clone());
        let ids: Vec<i64> = {
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(store.insert(&job(0, &[])).await.unwrap());
            }
            v
        };
        let m = |n: u8| MachineId::from_bytes([0x52, 0x54, 0, 0, 0, n]);
        let d = |id: i64, n: u8| Dispatch {
            id,
            machine: m(n),
            lease_id: format!("lease-{n}"),
        };

        let mut batch = store.claim_many(&ids[..3]).await.unwrap();
        batch.round = 7;
        assert_eq!(batch.ids, ids[..3].to_vec());
        if db.backend() == Backend::Postgres {
            // Another executor skips the locked rows and gets only the free one.
            let other = Store::new(db.db.clone());
            let theirs = other.claim_many(&ids).await.unwrap();
            assert_eq!(theirs.ids, vec![ids[3]]);
            // Dropped: rolled back, the job stays queued.
            drop(theirs);
        } else {
            // SQLite: a cancellation between claim and commit wins (PostgreSQL's cancel
            // waits for the row lock instead).
            store
                .finish(ids[2], JobStatus::Incomplete, "cancelled")
                .await
                .unwrap()
                .unwrap();
        }
        // ids[1]'s lease was refused: not in the items, it stays queued.
        let done = store
            .complete_many(batch, &[d(ids[0], 1), d(ids[2], 3)], "exec-a")
            .await
            .unwrap();
        let cancelled = db.backend() == Backend::Sqlite;
        assert_eq!(done, vec![true, !cancelled]);
        let row = store.require(ids[0]).await.unwrap();
        assert_eq!(
            (row.state, row.machine_id, row.lease_id.as_deref()),
            (JobState::Dispatched, Some(m(1)), Some("lease-1"))
        );
        let ev = store.events(ids[0], 0).await.unwrap();
        assert_eq!(ev.last().unwrap().kind, "dispatched");
        assert_eq!(ev.last().unwrap().data["round"], 7);
        assert_eq!(store.require(ids[1]).await.unwrap().state, JobState::Queued);
        let expect = if cancelled {
            JobState::Finished
        } else {
            JobState::Dispatched
        };
        assert_eq!(store.require(ids[2]).await.unwrap().state, expect);
        let queued: Vec<i64> = store
            .queued(10)
            .await
            .unwrap()
            .iter()
            .map(|q| q.id)
            .collect();
        assert_eq!(queued, vec![ids[1], ids[3]]);

        // A job already dispatched is not claimed again (PostgreSQL) or not committed twice
        // (SQLite).
        let again = store.claim_many(&[ids[0], ids[1]]).await.unwrap();
        let done = store
            .complete_many(again, &[d(ids[0], 5), d(ids[1], 2)], "exec-b")
            .await
            .unwrap();
        assert_eq!(done, vec![false, true]);
        let row = store.require(ids[0]).await.unwrap();
        assert_eq!(
            (row.machine_id, row.executor.as_deref()),
            (Some(m(1)), Some("exec-a"))
        );
        db.cleanup().await;
    }
}
