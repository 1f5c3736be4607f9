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
