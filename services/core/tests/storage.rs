//! The storage layer runs the same queries on SQLite and PostgreSQL.

use dutgate_core::db::testing::databases;
use dutgate_core::db::{Backend, Migrations};
use sqlx::Row;
use sqlx::migrate::Migrator;

static SQLITE: Migrator = sqlx::migrate!("./tests/migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./tests/migrations/postgres");
const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE,
    postgres: &POSTGRES,
};

#[tokio::test]
async fn same_queries_on_every_backend() {
    let dbs = databases("coretest", MIGRATIONS).await;
    if std::env::var(dutgate_core::db::testing::POSTGRES_ENV).is_ok() {
        assert!(dbs.iter().any(|d| d.backend() == Backend::Postgres));
    }
    for db in dbs {
        db.ping().await.unwrap();
        sqlx::query("INSERT INTO kv (key, value) VALUES ($1, $2)")
            .bind("a")
            .bind("1")
            .execute(db.pool())
            .await
            .unwrap();
        // A conditional update: the building block of leases and state transitions.
        let updated = sqlx::query(
            "UPDATE kv SET value = $1, version = version + 1 WHERE key = $2 AND version = $3",
        )
        .bind("2")
        .bind("a")
        .bind(0i64)
        .execute(db.pool())
        .await
        .unwrap()
        .rows_affected();
        assert_eq!(updated, 1, "{:?}", db.backend());
        let stale = sqlx::query(
            "UPDATE kv SET value = $1, version = version + 1 WHERE key = $2 AND version = $3",
        )
        .bind("3")
        .bind("a")
        .bind(0i64)
        .execute(db.pool())
        .await
        .unwrap()
        .rows_affected();
        assert_eq!(stale, 0);
        let row = sqlx::query("SELECT value, version FROM kv WHERE key = $1")
            .bind("a")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(row.get::<String, _>("value"), "2");
        assert_eq!(row.get::<i64, _>("version"), 1);
        // Duplicate keys are refused, not silently replaced.
        assert!(
            sqlx::query("INSERT INTO kv (key, value) VALUES ($1, $2)")
                .bind("a")
                .bind("x")
                .execute(db.pool())
                .await
                .is_err()
        );
        db.cleanup().await;
    }
}

#[tokio::test]
async fn reopening_keeps_data_and_migrations_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    {
        let db = dutgate_core::db::Db::open_sqlite(&path, MIGRATIONS)
            .await
            .unwrap();
        sqlx::query("INSERT INTO kv (key, value) VALUES ($1, $2)")
            .bind("k")
            .bind("v")
            .execute(db.pool())
            .await
            .unwrap();
        db.close().await;
    }
    let db = dutgate_core::db::Db::open_sqlite(&path, MIGRATIONS)
        .await
        .unwrap();
    let row = sqlx::query("SELECT value FROM kv WHERE key = $1")
        .bind("k")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(row.get::<String, _>("value"), "v");
}

/// A service's SQLite database in `dir` (these properties are SQLite's alone).
async fn sqlite(dir: &tempfile::TempDir) -> dutgate_core::db::Db {
    dutgate_core::db::Db::open_sqlite(&dir.path().join("service.db"), MIGRATIONS)
        .await
        .unwrap()
}

/// Writers of one process take turns on SQLite: 64 concurrent transactions, each reading a
/// counter and writing it back plus one, all commit and none is lost (without the turn, a
/// deferred transaction that read first fails with SQLITE_BUSY when it tries to write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writers_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir).await;
    sqlx::query("INSERT INTO kv (key, value) VALUES ('n', '0')")
        .execute(db.pool())
        .await
        .unwrap();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let db = db.clone();
        set.spawn(async move {
            let _turn = db.write_turn().await;
            let mut tx = db.pool().begin().await?;
            let row = sqlx::query("SELECT value FROM kv WHERE key = 'n'")
                .fetch_one(&mut *tx)
                .await?;
            let n: i64 = row.try_get::<String, _>(0)?.parse().unwrap_or(-1000);
            sqlx::query("UPDATE kv SET value = $1 WHERE key = 'n'")
                .bind((n + 1).to_string())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<(), sqlx::Error>(())
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
    }
    let n: String = sqlx::query("SELECT value FROM kv WHERE key = 'n'")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(n, "64");
    db.close().await;
}

/// A service's SQLite file is checkpointed in the background: pages written to the WAL reach
/// the database file well before SQLite's own checkpoint (at 1,000 WAL pages) would copy them.
#[tokio::test]
async fn sqlite_wal_is_checkpointed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir).await;
    let path = db.target().to_string();
    // Let the checkpointer copy the migrations first, then measure what the inserts add.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let before = std::fs::metadata(&path).unwrap().len();
    let blob = "x".repeat(3000);
    for i in 0..100 {
        let _turn = db.write_turn().await;
        sqlx::query("INSERT INTO kv (key, value) VALUES ($1, $2)")
            .bind(format!("k{i}"))
            .bind(&blob)
            .execute(db.pool())
            .await
            .unwrap();
    }
    // ~100 pages in the WAL, far below the 1,000 at which SQLite would copy them itself.
    let mut grown = 0;
    for _ in 0..50 {
        grown = std::fs::metadata(&path)
            .unwrap()
            .len()
            .saturating_sub(before);
        if grown >= 100 * 3000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        grown >= 100 * 3000,
        "the database file grew by {grown} bytes in 2.5 s: the WAL was not checkpointed"
    );
    db.close().await;
}
