//! The measuring program of `cargo xtask bench mars`: the lease path the executor's scheduler
//! uses, over HTTP against an in-process mars, on SQLite and (when reachable) PostgreSQL.
//!
//! Prints `ROW\t<figure>\t<value>` lines for the xtask to tabulate.
//! Figures: acquire latency and release latency (p50/p99, one client), acquire+release cycles
//! per second with 8 concurrent clients on distinct machines, contended acquire (8 clients on
//! one machine: exactly one wins per round), and the delay from a release to the "machine
//! freed" event reaching a long-polling client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dutgate_core::auth::Auth;
use dutgate_core::db::Db;
use dutgate_core::{MachineId, Secret};
use dutgate_mars::client::MarsClient;
use dutgate_mars::machines::Mars;
use dutgate_mars::model::{LeasePurpose, MachinePatch, Registration, ReleaseOutcome};
use dutgate_mars::power::MemoryPower;
use dutgate_mars::state::Trigger;
use dutgate_mars::store::{Cause, MIGRATIONS, Store};
use tokio_util::sync::CancellationToken;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

fn row(figure: &str, value: String) {
    println!("ROW\t{figure}\t{value}");
}

async fn serve(db: Db) -> (MarsClient, Mars, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let mars = Mars::new(
        Store::new(db, "bench"),
        dutgate_mars::Config::default(),
        Arc::new(MemoryPower::default()),
    );
    let auth = Auth::new(
        Some(Secret::new("adm")),
        None,
        dutgate_core::config::default_dut_networks(),
    );
    let shutdown = CancellationToken::new();
    let app = dutgate_core::http::with_common_routes(
        "mars",
        dutgate_mars::start(mars.clone(), auth, shutdown.clone()).expect("start"),
        None,
    );
    let token = shutdown.clone();
    tokio::spawn(async move {
        let _ = dutgate_core::http::serve(listener, app, token, Duration::from_millis(100)).await;
    });
    (
        MarsClient::new(url, Some(Secret::new("adm"))),
        mars,
        shutdown,
    )
}

async fn idle_machines(c: &MarsClient, mars: &Mars, n: usize) -> Vec<MachineId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = MachineId::from_bytes([0x52, 0x54, 0, 0, (i >> 8) as u8, i as u8]);
        c.register(&Registration {
            base_name: "sim".into(),
            tags: vec!["sim:dut:1".parse().expect("tag")],
            mac_address: id,
            ip_address: "10.0.2.15".parse().expect("ip"),
            local_tty_device: Some("ttyS0".into()),
        })
        .await
        .expect("register");
        c.patch(
            id,
            &MachinePatch {
                pdu: Some(Some("sim".into())),
                pdu_port_id: Some(Some(i.to_string())),
                ..Default::default()
            },
        )
        .await
        .expect("patch");
        mars.store
            .trigger(
                id,
                Trigger::TrainingPassed,
                &Cause::new("bench", "trained"),
                &|_| {},
            )
            .await
            .expect("trained");
        ids.push(id);
    }
    ids
}

async fn measure(label: &str, db: Db, quick: bool) {
    let (c, mars, shutdown) = serve(db).await;
    let n_machines = if quick { 8 } else { 64 };
    let rounds = if quick { 20 } else { 500 };
    let ids = idle_machines(&c, &mars, n_machines).await;

    // Uncontended latency, one client.
    let (mut acq, mut rel) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let id = ids[r % ids.len()];
        let t = Instant::now();
        let l = c
            .acquire(id, &format!("j{r}"), "bench", LeasePurpose::Job, None)
            .await
            .expect("acquire");
        acq.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        c.release(&l.id, ReleaseOutcome::Ok, None)
            .await
            .expect("release");
        rel.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    row(
        &format!("{label}: acquire latency p50 / p99"),
        format!(
            "{:.2} ms / {:.2} ms",
            pct(&mut acq, 0.5),
            pct(&mut acq, 0.99)
        ),
    );
    row(
        &format!("{label}: release latency p50 / p99"),
        format!(
            "{:.2} ms / {:.2} ms",
            pct(&mut rel, 0.5),
            pct(&mut rel, 0.99)
        ),
    );

    // Throughput: 8 clients, each cycling on its own machines.
    let clients = 8.min(ids.len());
    let per = rounds / 2;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let c = c.clone();
        let mine: Vec<MachineId> = ids.iter().copied().skip(k).step_by(clients).collect();
        tasks.push(tokio::spawn(async move {
            for r in 0..per {
                let id = mine[r % mine.len()];
                let l = c
                    .acquire(id, &format!("t{k}-{r}"), "bench", LeasePurpose::Job, None)
                    .await
                    .expect("acquire");
                c.release(&l.id, ReleaseOutcome::Ok, None)
                    .await
                    .expect("release");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let cycles = (clients * per) as f64;
    row(
        &format!("{label}: acquire+release cycles/s, {clients} clients"),
        format!("{:.0}", cycles / t.elapsed().as_secs_f64()),
    );

    // Contention: 8 clients race for one machine; exactly one must win each round.
    let contended_rounds = rounds / 10;
    let mut lat = Vec::new();
    for r in 0..contended_rounds {
        let id = ids[0];
        let mut tasks = Vec::new();
        for k in 0..8 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let res = c
                    .acquire(id, &format!("c{r}-{k}"), "bench", LeasePurpose::Job, None)
                    .await;
                (res, t.elapsed().as_secs_f64() * 1000.0)
            }));
        }
        let mut winners = Vec::new();
        for task in tasks {
            let (res, ms) = task.await.expect("task");
            lat.push(ms);
            if let Ok(l) = res {
                winners.push(l);
            }
        }
        assert_eq!(winners.len(), 1, "round {r}: {} winners", winners.len());
        c.release(&winners[0].id, ReleaseOutcome::Ok, None)
            .await
            .expect("release");
    }
    row(
        &format!("{label}: contended acquire (8 racing, 1 wins) p50 / p99"),
        format!(
            "{:.2} ms / {:.2} ms",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        ),
    );

    // Release → "machine freed" event at a long-polling client.
    let mut freed = Vec::new();
    for r in 0..(rounds / 5) {
        let id = ids[r % ids.len()];
        let l = c
            .acquire(id, &format!("f{r}"), "bench", LeasePurpose::Job, None)
            .await
            .expect("acquire");
        let cursor = c.events_cursor().await.expect("cursor");
        let w = c.clone();
        let waiter = tokio::spawn(async move {
            let b = w
                .events(cursor, Duration::from_secs(10))
                .await
                .expect("events");
            (Instant::now(), b)
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        let t = Instant::now();
        c.release(&l.id, ReleaseOutcome::Ok, None)
            .await
            .expect("release");
        let (got, batch) = waiter.await.expect("waiter");
        assert!(batch.events.iter().any(|e| e.frees_machine()));
        freed.push(got.duration_since(t).as_secs_f64() * 1000.0);
    }
    row(
        &format!("{label}: release → freed event at a long-poll, p50 / p99"),
        format!(
            "{:.2} ms / {:.2} ms",
            pct(&mut freed, 0.5),
            pct(&mut freed, 0.99)
        ),
    );
    shutdown.cancel();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = tempfile::tempdir().expect("tempdir");
    let sqlite = Db::open_sqlite(&dir.path().join("mars.db"), MIGRATIONS)
        .await
        .expect("sqlite");
    measure("SQLite", sqlite, quick).await;
    // Set by `cargo xtask test --postgres`: then PostgreSQL must be measured.
    let required = std::env::var("DUTGATE_TEST_POSTGRES_URL").ok();
    let url = required
        .clone()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1/test".into());
    let schema = format!("mars_bench_{}", std::process::id());
    match Db::open_postgres(&url, &schema, MIGRATIONS).await {
        Ok(pg) => {
            measure("PostgreSQL", pg.clone(), quick).await;
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE"
            )))
            .execute(pg.pool())
            .await;
        }
        Err(e) if required.is_some() => {
            eprintln!("PostgreSQL at {url}: {e}");
            std::process::exit(1);
        }
        Err(e) => row("PostgreSQL", format!("not measured: {e}")),
    }
}
