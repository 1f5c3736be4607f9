//! The dispatch protocol against a real mars (served on 127.0.0.1) and the real store.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dutgate_core::MachineId;
use dutgate_mars::client::MarsClient;
use dutgate_mars::model::{LeasePurpose, ReleaseOutcome};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::model::{JobState, Purpose, kind};
use crate::store::{Dispatch, Store};
use crate::supervisor::Supervisor;

/// A real mars (SQLite, in-memory PDU) served on 127.0.0.1, and a scheduler on it whose
/// machine cache is not fed by the event stream (`follow_mars` does not run), with an
/// inline runner that records the launches.
struct Rig {
    _dir: tempfile::TempDir,
    mars: dutgate_mars::machines::Mars,
    client: MarsClient,
    sched: Scheduler,
    sup: Supervisor,
    store: Store,
    gw: Arc<dutgate_core::config::GatewayConfig>,
    launched: Arc<std::sync::Mutex<Vec<(i64, MachineId)>>>,
    shutdown: CancellationToken,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let db = dutgate_core::db::Db::open_sqlite(
        &dir.path().join("executor.db"),
        crate::store::MIGRATIONS,
    )
    .await
    .unwrap();
    rig_on(dir, db).await
}

/// [`rig`] with the executor's queue in `db`.
async fn rig_on(dir: tempfile::TempDir, db: dutgate_core::db::Db) -> Rig {
    use dutgate_core::Secret;
    use dutgate_core::db::Db;
    let mars_db = Db::open_sqlite(&dir.path().join("mars.db"), dutgate_mars::store::MIGRATIONS)
        .await
        .unwrap();
    let mut cfg = dutgate_mars::Config::default();
    cfg.training.enabled = false;
    let mars = dutgate_mars::machines::Mars::new(
        dutgate_mars::store::Store::new(mars_db, "farm"),
        cfg,
        Arc::new(dutgate_mars::power::MemoryPower::default()),
    );
    let auth = dutgate_core::auth::Auth::new(
        Some(Secret::new("admin")),
        None,
        dutgate_core::config::default_dut_networks(),
    );
    let shutdown = CancellationToken::new();
    let router = dutgate_mars::start(mars.clone(), auth, shutdown.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(dutgate_core::http::serve(
        listener,
        dutgate_core::http::with_common_routes("mars", router, None),
        shutdown.clone(),
        Duration::from_millis(100),
    ));
    let client = MarsClient::new(&url, Some(Secret::new("admin")));
    let store = Store::new(db);
    let mut gw = dutgate_core::config::GatewayConfig {
        state_dir: dir.path().to_path_buf(),
        internal_host: "127.0.0.1".into(),
        ..Default::default()
    };
    // The supervisor's own mars client (start-up checks) talks to this mars, with the admin
    // token an executor has (mars shows a machine's lease to its admin).
    gw.auth.admin_token = Some(Secret::new("admin"));
    gw.ports.mars = url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap();
    let gw = Arc::new(gw);
    let launched: Arc<std::sync::Mutex<Vec<(i64, MachineId)>>> = Default::default();
    let l2 = launched.clone();
    let inline: crate::supervisor::InlineRunner = Arc::new(move |id, m, _lease| {
        l2.lock().unwrap().push((id, m));
        Box::pin(async {})
    });
    let sup = Supervisor::new(
        store.clone(),
        gw.clone(),
        crate::Config::default(),
        None,
        Arc::new(Notify::new()),
        Some(inline),
    );
    let sched = Scheduler::new(
        store.clone(),
        client.clone(),
        sup.clone(),
        None,
        Arc::new(Notify::new()),
    );
    Rig {
        _dir: dir,
        mars,
        client,
        sched,
        sup,
        store,
        gw,
        launched,
        shutdown,
    }
}

/// Registers machine `n` with `tags` and, when `idle`, configures and admits it.
async fn register(rig: &Rig, n: u8, tags: &[&str], idle: bool) -> MachineId {
    let id = MachineId::from_bytes([0x52, 0x54, 0, 0, 0, n]);
    rig.client
        .register(&dutgate_mars::model::Registration {
            base_name: "m".into(),
            tags: tags.iter().map(|t| t.parse().unwrap()).collect(),
            mac_address: id,
            ip_address: "10.0.2.15".parse().unwrap(),
            local_tty_device: None,
        })
        .await
        .unwrap();
    if idle {
        rig.client
            .patch(
                id,
                &dutgate_mars::model::MachinePatch {
                    pdu: Some(Some("pdu".into())),
                    pdu_port_id: Some(Some(n.to_string())),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        rig.mars
            .store
            .trigger(
                id,
                dutgate_mars::state::Trigger::TrainingPassed,
                &dutgate_mars::store::Cause::new("test", "admitted"),
                &|_| {},
            )
            .await
            .unwrap();
    }
    id
}

fn new_job(priority: i64, tags: &[&str]) -> crate::store::NewJob {
    crate::store::NewJob {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_target_asks_mars_about_machines_the_cache_has_not_seen() {
    let rig = rig().await;
    let sched = &rig.sched;
    // Loads the cache: no machine yet.
    assert!(matches!(
        sched.check_target(None, &["a:b:c".into()]).await,
        Err(TargetError::NoMachineWithTags(_))
    ));
    // Registered after the cache was loaded (a machine's first training is submitted
    // right after its registration): known by id and by tags all the same.
    let fresh = register(&rig, 1, &["a:b:c"], false).await;
    sched.check_target(Some(fresh), &[]).await.unwrap();
    sched
        .check_target(Some(fresh), &["a:b:c".into()])
        .await
        .unwrap();
    let other = register(&rig, 2, &["x:y:z"], false).await;
    sched.check_target(None, &["x:y:z".into()]).await.unwrap();
    sched.check_target(Some(other), &[]).await.unwrap();
    // What mars does not know either is still refused.
    let unknown = MachineId::from_bytes([0x52, 0x54, 0, 0, 0, 99]);
    assert!(matches!(
        sched.check_target(Some(unknown), &[]).await,
        Err(TargetError::UnknownMachine(id)) if id == unknown
    ));
    assert!(matches!(
        sched.check_target(Some(fresh), &["x:y:z".into()]).await,
        Err(TargetError::MissingTags { .. })
    ));
    assert!(matches!(
        sched.check_target(None, &["q:q:q".into()]).await,
        Err(TargetError::NoMachineWithTags(_))
    ));
    rig.shutdown.cancel();
}

/// Runs rounds until one has nothing left to do at once.
async fn settle(sched: &Scheduler) {
    for _ in 0..20 {
        if sched.round().await.unwrap() == Next::Wait {
            return;
        }
    }
    panic!("the scheduler keeps asking for another round");
}

fn event_kinds(events: &[crate::model::Event]) -> Vec<String> {
    events.iter().map(|e| e.kind.clone()).collect()
}

/// A refused lease (the machine cache was wrong: another holder took the machine) leaves
/// its job queued and unrecorded — never shown dispatched — and the round is planned again
/// with the other machines; the foreign lease is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_lease_leaves_its_job_queued_and_unrecorded() {
    let rig = rig().await;
    let mut ms = Vec::new();
    for n in 1..=4 {
        ms.push(register(&rig, n, &["a:b:c"], true).await);
    }
    // Load the cache, then take the first machine behind its back.
    assert!(rig.sched.any_free(Purpose::Job, None, &[]).await.unwrap());
    let foreign = rig
        .client
        .acquire(
            ms[0],
            "elsewhere",
            "another-executor",
            LeasePurpose::Job,
            None,
        )
        .await
        .unwrap();
    let low1 = rig.store.insert(&new_job(0, &["a:b:c"])).await.unwrap();
    let high = rig.store.insert(&new_job(5, &["a:b:c"])).await.unwrap();
    let low2 = rig.store.insert(&new_job(0, &[])).await.unwrap();
    let low3 = rig.store.insert(&new_job(0, &[])).await.unwrap();
    // The first round plans high → ms[0] (refused), low1 → ms[1], low2 → ms[2], low3 →
    // ms[3], and asks for another; that one has no free machine left.
    assert_eq!(rig.sched.round().await.unwrap(), Next::Again);
    assert_eq!(rig.sched.round().await.unwrap(), Next::Wait);
    let launched = rig.launched.lock().unwrap().clone();
    assert_eq!(
        launched.iter().map(|l| l.0).collect::<HashSet<_>>(),
        HashSet::from([low1, low2, low3])
    );
    let machines: HashSet<MachineId> = launched.iter().map(|l| l.1).collect();
    assert_eq!(machines.len(), 3, "one job per machine: {launched:?}");
    assert!(!machines.contains(&ms[0]));
    let row = rig.store.require(high).await.unwrap();
    assert_eq!(row.state, JobState::Queued);
    assert_eq!((row.machine_id, row.lease_id), (None, None));
    let events = rig.store.events(high, 0).await.unwrap();
    assert_eq!(event_kinds(&events), vec![kind::SUBMITTED]);
    let m0 = rig.client.machine(ms[0]).await.unwrap();
    assert_eq!(m0.lease.map(|l| l.id), Some(foreign.id.clone()));
    // The machine comes back (the cache learns it as the event stream would tell it): the
    // queued job takes it.
    rig.client
        .release(&foreign.id, ReleaseOutcome::Ok, None)
        .await
        .unwrap();
    rig.sched.load_machines().await.unwrap();
    settle(&rig.sched).await;
    let row = rig.store.require(high).await.unwrap();
    assert_eq!(
        (row.state, row.machine_id),
        (JobState::Dispatched, Some(ms[0]))
    );
    let all = rig.launched.lock().unwrap().clone();
    assert_eq!(all.len(), 4);
    for (id, m) in &all {
        let row = rig.store.require(*id).await.unwrap();
        assert_eq!(row.machine_id, Some(*m));
        let lease = rig.client.machine(*m).await.unwrap().lease.unwrap();
        assert_eq!(lease.job_id, id.to_string());
        assert_eq!(row.lease_id, Some(lease.id));
    }
    rig.shutdown.cancel();
}

/// A job cancelled while its lease is being refused (the round and the cancellation run at
/// once) ends cancelled without ever naming the machine, and nothing of it touches the
/// machine another job holds: no dispatch, no teardown, the other lease intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_a_refused_lease_never_touches_the_other_jobs_machine() {
    let rig = rig().await;
    let m = register(&rig, 1, &[], true).await;
    assert!(rig.sched.any_free(Purpose::Job, None, &[]).await.unwrap());
    let theirs = rig
        .client
        .acquire(m, "other-job", "another-executor", LeasePurpose::Job, None)
        .await
        .unwrap();
    for _ in 0..20 {
        // The cache believes the machine free again for every try.
        rig.sched.load_machines().await.unwrap();
        if let Some(map) = rig.sched.inner.machines.write().await.as_mut() {
            map.values_mut().for_each(|x| x.lease = None);
        }
        let id = rig.store.insert(&new_job(0, &[])).await.unwrap();
        let (round, cancelled) = tokio::join!(rig.sched.round(), rig.sup.cancel(id));
        round.unwrap();
        let row = cancelled.unwrap();
        assert_eq!(row.state, JobState::Finished);
        let row = rig.store.require(id).await.unwrap();
        assert_eq!(
            (row.machine_id, row.lease_id.as_deref()),
            (None, None),
            "{row:?}"
        );
        let events = rig.store.events(id, 0).await.unwrap();
        assert_eq!(
            event_kinds(&events),
            vec![kind::SUBMITTED, kind::FINISHED],
            "{events:?}"
        );
    }
    let held = rig.client.machine(m).await.unwrap().lease.unwrap();
    assert_eq!(held.id, theirs.id);
    assert!(rig.launched.lock().unwrap().is_empty());
    rig.shutdown.cancel();
}

/// The dispatch is recorded only after mars granted its lease. An executor that stopped
/// between the record and the launch for longer than the lease's TTL finds the lease gone at
/// start-up: the job ends (it never ran) without touching the machine; one whose lease mars
/// still holds is launched, its lease renewed first (nobody heartbeat it meanwhile, and the
/// new process heartbeats only a third of a TTL after it starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_whose_lease_is_gone_at_start_up_ends_without_touching_the_machine() {
    let rig = rig().await;
    let m = register(&rig, 1, &["a:b:c"], true).await;
    let record = |id: i64, lease_id: String| {
        let store = rig.store.clone();
        let name = rig.sup.name().to_string();
        async move {
            store
                .record_dispatches(
                    &[Dispatch {
                        id,
                        machine: m,
                        lease_id,
                    }],
                    &name,
                    1,
                )
                .await
                .unwrap()
        }
    };
    let gone = rig.store.insert(&new_job(0, &[])).await.unwrap();
    let lease = rig
        .client
        .acquire(m, &gone.to_string(), "test", LeasePurpose::Job, None)
        .await
        .unwrap();
    assert_eq!(record(gone, lease.id.clone()).await, vec![true]);
    rig.client
        .release(&lease.id, ReleaseOutcome::Ok, None)
        .await
        .unwrap();
    // Someone else holds the machine now.
    let theirs = rig
        .client
        .acquire(m, "other-job", "another-executor", LeasePurpose::Job, None)
        .await
        .unwrap();
    rig.sup.reattach_all().await.unwrap();
    let row = rig.store.require(gone).await.unwrap();
    assert_eq!(row.state, JobState::Finished);
    let events = rig.store.events(gone, 0).await.unwrap();
    assert!(
        !events.iter().any(|e| e.kind == kind::TEARDOWN
            || e.data.get("action").and_then(|a| a.as_str()) == Some("teardown")),
        "{events:?}"
    );
    assert!(rig.launched.lock().unwrap().is_empty());
    assert_eq!(
        rig.client.machine(m).await.unwrap().lease.map(|l| l.id),
        Some(theirs.id.clone())
    );
    rig.client
        .release(&theirs.id, ReleaseOutcome::Ok, None)
        .await
        .unwrap();
    // Held by mars: launched.
    let held = rig.store.insert(&new_job(0, &[])).await.unwrap();
    let granted = rig
        .client
        .acquire(m, &held.to_string(), "test", LeasePurpose::Job, None)
        .await
        .unwrap();
    assert_eq!(record(held, granted.id.clone()).await, vec![true]);
    rig.sup.reattach_all().await.unwrap();
    let renewed = rig.client.machine(m).await.unwrap().lease.unwrap();
    assert_eq!(renewed.id, granted.id);
    assert!(
        renewed.expires_at.millis() > granted.expires_at.millis(),
        "the lease was not renewed: {granted:?} → {renewed:?}"
    );
    assert_eq!(
        rig.store.require(held).await.unwrap().state,
        JobState::Dispatched,
        "{:?}",
        rig.store.events(held, 0).await.unwrap()
    );
    assert_eq!(rig.launched.lock().unwrap().clone(), vec![(held, m)]);
    rig.shutdown.cancel();
}

/// PostgreSQL: a job another executor is dispatching (it holds the row) is not recorded
/// here; the lease taken for it is given back at once, and the machine goes to the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_for_a_job_another_executor_holds_is_given_back() {
    for test_db in dutgate_core::db::testing::databases("executor", crate::store::MIGRATIONS).await
    {
        if test_db.backend() != dutgate_core::db::Backend::Postgres {
            continue;
        }
        let pool = test_db.pool().clone();
        let rig = rig_on(tempfile::tempdir().unwrap(), test_db.db.clone()).await;
        let m = register(&rig, 1, &["a:b:c"], true).await;
        assert!(rig.sched.any_free(Purpose::Job, None, &[]).await.unwrap());
        let held = rig.store.insert(&new_job(0, &["a:b:c"])).await.unwrap();
        // Another executor is dispatching `held`: it holds its row lock.
        let mut other = pool.begin().await.unwrap();
        sqlx::query("SELECT id FROM jobs WHERE id = $1 FOR UPDATE")
            .bind(held)
            .fetch_all(&mut *other)
            .await
            .unwrap();
        let from = rig.client.events_cursor().await.unwrap();
        assert_eq!(rig.sched.round().await.unwrap(), Next::Again);
        assert!(rig.launched.lock().unwrap().is_empty());
        let batch = rig.client.events(from, Duration::ZERO).await.unwrap();
        let kinds: Vec<&str> = batch.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, vec!["lease_acquired", "lease_released"], "{batch:?}");
        assert!(rig.client.machine(m).await.unwrap().lease.is_none());
        let row = rig.store.require(held).await.unwrap();
        assert_eq!((row.state, row.lease_id), (JobState::Queued, None));
        // The other executor lets go: the job is dispatched.
        other.rollback().await.unwrap();
        rig.sched.load_machines().await.unwrap();
        settle(&rig.sched).await;
        let row = rig.store.require(held).await.unwrap();
        assert_eq!(row.state, JobState::Dispatched);
        assert_eq!(rig.launched.lock().unwrap().clone(), vec![(held, m)]);
        rig.shutdown.cancel();
        test_db.cleanup().await;
    }
}

/// Two executors on one queue (SQLite, and PostgreSQL when configured) dispatch at the same
/// time from the same mars, without a central dispatcher: every job is dispatched at most
/// once, every machine holds at most one job, and each recorded dispatch is under the lease
/// mars holds for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_executors_share_the_queue() {
    for test_db in dutgate_core::db::testing::databases("executor", crate::store::MIGRATIONS).await
    {
        let rig = rig_on(tempfile::tempdir().unwrap(), test_db.db.clone()).await;
        let mut ms = Vec::new();
        for n in 1..=6 {
            ms.push(register(&rig, n, &[], true).await);
        }
        let (other, other_launched) = second_scheduler(&rig, "exec-b");
        let mut jobs = Vec::new();
        for _ in 0..10 {
            jobs.push(rig.store.insert(&new_job(0, &[])).await.unwrap());
        }
        for _ in 0..3 {
            rig.sched.load_machines().await.unwrap();
            other.load_machines().await.unwrap();
            let (a, b) = tokio::join!(settle(&rig.sched), settle(&other));
            let ((), ()) = (a, b);
        }
        let mut launched = rig.launched.lock().unwrap().clone();
        launched.extend(other_launched.lock().unwrap().iter().copied());
        let ids: HashSet<i64> = launched.iter().map(|l| l.0).collect();
        let machines: HashSet<MachineId> = launched.iter().map(|l| l.1).collect();
        assert_eq!(
            (launched.len(), ids.len(), machines.len()),
            (6, 6, 6),
            "{launched:?}"
        );
        for (id, m) in &launched {
            let row = rig.store.require(*id).await.unwrap();
            assert_eq!(row.state, JobState::Dispatched);
            let lease = rig.client.machine(*m).await.unwrap().lease.unwrap();
            assert_eq!(row.lease_id, Some(lease.id));
            assert_eq!(lease.job_id, id.to_string());
        }
        assert_eq!(rig.store.queued(100).await.unwrap().len(), 4);
        rig.shutdown.cancel();
        test_db.cleanup().await;
    }
}

/// The launches an inline runner saw: (job, machine).
type Launched = Arc<std::sync::Mutex<Vec<(i64, MachineId)>>>;

/// Another executor (`name`) on `rig`'s queue and mars, with its own record of launches.
fn second_scheduler(rig: &Rig, name: &str) -> (Scheduler, Launched) {
    let launched: Launched = Default::default();
    let l2 = launched.clone();
    let inline: crate::supervisor::InlineRunner = Arc::new(move |id, m, _lease| {
        l2.lock().unwrap().push((id, m));
        Box::pin(async {})
    });
    let sup = Supervisor::new(
        rig.store.clone(),
        rig.gw.clone(),
        crate::Config {
            name: Some(name.into()),
            ..Default::default()
        },
        None,
        Arc::new(Notify::new()),
        Some(inline),
    );
    let sched = Scheduler::new(
        rig.store.clone(),
        rig.client.clone(),
        sup,
        None,
        Arc::new(Notify::new()),
    );
    (sched, launched)
}

/// The executor's teardown of a dead job whose lease expired while the machine went to
/// another holder does not power that machine off: the step is skipped, the job still ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_jobs_teardown_leaves_a_machine_another_lease_holds_alone() {
    let rig = rig().await;
    let m = register(&rig, 1, &[], true).await;
    let id = rig.store.insert(&new_job(0, &[])).await.unwrap();
    let lease = rig
        .client
        .acquire(m, &id.to_string(), "test", LeasePurpose::Job, None)
        .await
        .unwrap();
    let recorded = rig
        .store
        .record_dispatches(
            &[Dispatch {
                id,
                machine: m,
                lease_id: lease.id.clone(),
            }],
            rig.sup.name(),
            1,
        )
        .await
        .unwrap();
    assert_eq!(recorded, vec![true]);
    // The job's lease ends (expired, say) and another job takes the machine.
    rig.client
        .release(&lease.id, ReleaseOutcome::Ok, None)
        .await
        .unwrap();
    let theirs = rig
        .client
        .acquire(m, "other-job", "another-executor", LeasePurpose::Job, None)
        .await
        .unwrap();
    // mars reports the expiry; no process of the job runs here.
    rig.sup.lease_expired(id).await;
    let row = rig.store.require(id).await.unwrap();
    assert_eq!(row.state, JobState::Finished);
    let events = rig.store.events(id, 0).await.unwrap();
    let power: Vec<&crate::model::Event> = events
        .iter()
        .filter(|e| e.data.get("step").and_then(|s| s.as_str()) == Some("power_off"))
        .collect();
    assert_eq!(power.len(), 1, "{events:?}");
    assert_eq!(power[0].data["skipped"], true, "{events:?}");
    assert_eq!(
        rig.client.machine(m).await.unwrap().lease.map(|l| l.id),
        Some(theirs.id)
    );
    rig.shutdown.cancel();
}

/// A previous run of this executor that stopped between the lease and its record left a
/// lease that no record names: the first round of the next run gives it back untouched (the
/// machine is free at once, with no infrastructure failure counted) and dispatches the job
/// again. The previous run's recorded lease, the lease of a run still stopping (its process
/// lives) and another executor's are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_a_stopped_run_never_recorded_is_given_back_at_start_up() {
    let rig = rig().await;
    let mut ms = Vec::new();
    for n in 1..=4 {
        ms.push(register(&rig, n, &[], true).await);
    }
    // No process has a pid that large (pid_max is at most 2^22).
    let previous = format!("{}/999999999", rig.sup.name());
    let stopping = format!("{}/{}", rig.sup.name(), std::os::unix::process::parent_id());
    let lease = |m: MachineId, job: String, holder: String| {
        let client = rig.client.clone();
        async move {
            client
                .acquire(m, &job, &holder, LeasePurpose::Job, None)
                .await
                .unwrap()
        }
    };
    let queued = rig.store.insert(&new_job(0, &[])).await.unwrap();
    let unrecorded = lease(ms[0], queued.to_string(), previous.clone()).await;
    let dispatched = rig.store.insert(&new_job(0, &[])).await.unwrap();
    let recorded = lease(ms[1], dispatched.to_string(), previous.clone()).await;
    assert_eq!(
        rig.store
            .record_dispatches(
                &[Dispatch {
                    id: dispatched,
                    machine: ms[1],
                    lease_id: recorded.id.clone(),
                }],
                rig.sup.name(),
                1,
            )
            .await
            .unwrap(),
        vec![true]
    );
    let later = rig.store.insert(&new_job(0, &[])).await.unwrap();
    let still_stopping = lease(ms[2], later.to_string(), stopping).await;
    let theirs = lease(
        ms[3],
        queued.to_string(),
        "another-executor/999999999".into(),
    )
    .await;

    rig.sched.load_machines().await.unwrap();
    settle(&rig.sched).await;
    assert!(rig.launched.lock().unwrap().is_empty());
    // The machine is free again (the event stream tells the cache so).
    rig.sched.load_machines().await.unwrap();
    settle(&rig.sched).await;
    assert_eq!(rig.launched.lock().unwrap().clone(), vec![(queued, ms[0])]);
    let m0 = rig.client.machine(ms[0]).await.unwrap();
    let now = m0.lease.expect("the job's new lease");
    assert_ne!(now.id, unrecorded.id);
    assert_eq!(now.job_id, queued.to_string());
    assert_eq!(m0.consecutive_infra_failures, 0);
    let row = rig.store.require(queued).await.unwrap();
    assert_eq!(
        (row.state, row.lease_id),
        (JobState::Dispatched, Some(now.id))
    );
    for (m, kept) in [(ms[1], recorded), (ms[2], still_stopping), (ms[3], theirs)] {
        let held = rig.client.machine(m).await.unwrap().lease.map(|l| l.id);
        assert_eq!(held, Some(kept.id), "machine {m}");
    }
    assert_eq!(
        rig.store.require(later).await.unwrap().state,
        JobState::Queued
    );
    rig.shutdown.cancel();
}
