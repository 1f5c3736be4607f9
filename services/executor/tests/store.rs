//! The queue store on SQLite, and on PostgreSQL when `DUTGATE_TEST_POSTGRES_URL` is set:
//! dispatch order, the conditional dispatch record, events, one finish (state and event in
//! one transaction).

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
        owner: "user".into(),
    }
}

#[tokio::test]
async fn queue_order_dispatch_events_and_finish() {
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
        let d = |lease: &str| Dispatch {
            id: high,
            machine: m,
            lease_id: lease.into(),
        };
        assert_eq!(
            store
                .record_dispatches(&[d("lease-1")], "exec-a", 1)
                .await
                .unwrap(),
            vec![true]
        );
        // Already dispatched: a second record (another executor's lease) loses.
        let other = Store::new(db.db.clone());
        assert_eq!(
            other
                .record_dispatches(&[d("lease-2")], "exec-b", 1)
                .await
                .unwrap(),
            vec![false]
        );
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
async fn dispatch_records_only_jobs_still_queued() {
    for db in databases("executor", MIGRATIONS).await {
        let store = Store::new(db.db.clone());
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(store.insert(&job(0, &[])).await.unwrap());
        }
        let m = |n: u8| MachineId::from_bytes([0x52, 0x54, 0, 0, 0, n]);
        let d = |id: i64, n: u8| Dispatch {
            id,
            machine: m(n),
            lease_id: format!("lease-{n}"),
        };
        // Cancelled between the plan and the record: the record loses, the job stays
        // finished; ids[1]'s lease was refused: not recorded, it stays queued.
        store
            .finish(ids[2], JobStatus::Incomplete, "cancelled")
            .await
            .unwrap()
            .unwrap();
        let done = store
            .record_dispatches(&[d(ids[0], 1), d(ids[2], 3)], "exec-a", 7)
            .await
            .unwrap();
        assert_eq!(done, vec![true, false]);
        let row = store.require(ids[0]).await.unwrap();
        assert_eq!(
            (row.state, row.machine_id, row.lease_id.as_deref()),
            (JobState::Dispatched, Some(m(1)), Some("lease-1"))
        );
        let ev = store.events(ids[0], 0).await.unwrap();
        assert_eq!(ev.last().unwrap().kind, "dispatched");
        assert_eq!(ev.last().unwrap().data["round"], 7);
        assert_eq!(ev.last().unwrap().data["executor"], "exec-a");
        assert_eq!(store.require(ids[1]).await.unwrap().state, JobState::Queued);
        let row = store.require(ids[2]).await.unwrap();
        assert_eq!(
            (row.state, row.machine_id, row.lease_id),
            (JobState::Finished, None, None)
        );
        if db.backend() == Backend::Postgres {
            // A job another transaction holds (an executor recording it, a client cancelling
            // it) is skipped, not waited for: its lease goes back.
            let mut holder = db.pool().begin().await.unwrap();
            sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(ids[3])
                .fetch_all(&mut *holder)
                .await
                .unwrap();
            let done = store
                .record_dispatches(&[d(ids[1], 2), d(ids[3], 4)], "exec-b", 8)
                .await
                .unwrap();
            assert_eq!(done, vec![true, false]);
            holder.rollback().await.unwrap();
            assert_eq!(store.require(ids[3]).await.unwrap().state, JobState::Queued);
        }
        // A job already dispatched is not recorded twice.
        let done = store
            .record_dispatches(&[d(ids[0], 5)], "exec-b", 9)
            .await
            .unwrap();
        assert_eq!(done, vec![false]);
        let row = store.require(ids[0]).await.unwrap();
        assert_eq!(
            (row.machine_id, row.executor.as_deref()),
            (Some(m(1)), Some("exec-a"))
        );
        db.cleanup().await;
    }
}

/// A cancel or an expired deadline that read the job as queued must not finish it once an
/// executor has recorded its dispatch: it holds a lease, and ending it needs its teardown.
#[tokio::test]
async fn finish_queued_leaves_a_dispatched_job_alone() {
    for db in databases("executor", MIGRATIONS).await {
        let store = Store::new(db.db.clone());
        let queued = store.insert(&job(0, &[])).await.unwrap();
        let dispatched = store.insert(&job(0, &[])).await.unwrap();
        let d = Dispatch {
            id: dispatched,
            machine: MachineId::from_bytes([0x52, 0x54, 0, 0, 0, 9]),
            lease_id: "lease-9".into(),
        };
        store.record_dispatches(&[d], "exec-a", 1).await.unwrap();
        let row = store
            .finish_queued(dispatched, JobStatus::Incomplete, "cancelled")
            .await
            .unwrap();
        assert!(row.is_none(), "a dispatched job was finished: {row:?}");
        let row = store.require(dispatched).await.unwrap();
        assert_eq!(row.state, JobState::Dispatched);
        let row = store
            .finish_queued(queued, JobStatus::Incomplete, "cancelled")
            .await
            .unwrap()
            .expect("a queued job is finished");
        assert_eq!(row.state, JobState::Finished);
    }
}

/// A job's end and its `finished` event are one transaction: when the event cannot be
/// written, the job is not finished either (a reader never sees a finished job without its
/// `finished` event, nor the reverse).
#[tokio::test]
async fn finish_and_its_event_are_one_transaction() {
    for db in databases("executor", MIGRATIONS).await {
        let store = Store::new(db.db.clone());
        let id = store.insert(&job(0, &[])).await.unwrap();
        // A fault in the event write: the database refuses `finished` events.
        match db.backend() {
            Backend::Sqlite => {
                sqlx::query(
                    "CREATE TRIGGER refuse_finished BEFORE INSERT ON job_events \
                     WHEN NEW.kind = 'finished' BEGIN SELECT RAISE(ABORT, 'refused'); END",
                )
                .execute(db.pool())
                .await
                .unwrap();
            }
            Backend::Postgres => {
                sqlx::query(
                    "ALTER TABLE job_events ADD CONSTRAINT refuse_finished \
                     CHECK (kind <> 'finished')",
                )
                .execute(db.pool())
                .await
                .unwrap();
            }
        }
        assert!(
            store
                .finish(id, JobStatus::Incomplete, "cancelled")
                .await
                .is_err()
        );
        let row = store.require(id).await.unwrap();
        assert_eq!((row.state, row.status), (JobState::Queued, None));
        // The fault gone, the end is written with its event.
        match db.backend() {
            Backend::Sqlite => sqlx::query("DROP TRIGGER refuse_finished"),
            Backend::Postgres => {
                sqlx::query("ALTER TABLE job_events DROP CONSTRAINT refuse_finished")
            }
        }
        .execute(db.pool())
        .await
        .unwrap();
        store
            .finish(id, JobStatus::Incomplete, "cancelled")
            .await
            .unwrap()
            .unwrap();
        let events = store.events(id, 0).await.unwrap();
        assert_eq!(events.last().unwrap().kind, "finished");
        assert_eq!(store.require(id).await.unwrap().state, JobState::Finished);
        db.cleanup().await;
    }
}
