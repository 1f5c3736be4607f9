//! Storage: SQLite by default (one file per service under the state dir, WAL, busy timeout),
//! PostgreSQL when `database_url` is `postgres://…` (one schema per service).
//!
//! Both go through sqlx's `Any` driver so that a service writes its queries once (use `$1`
//! placeholders: SQLite accepts them too) and the same test code runs on both backends. Each
//! service ships one migration directory per backend because the DDL dialects differ.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, AssertSqlSafe, Executor};

use crate::config::GatewayConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A service's two migration sets, from `sqlx::migrate!("./migrations/sqlite")` and
/// `sqlx::migrate!("./migrations/postgres")`.
#[derive(Clone, Copy)]
pub struct Migrations {
    pub sqlite: &'static Migrator,
    pub postgres: &'static Migrator,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open database {target}: {source}")]
    Open {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating {target}: {source}")]
    Migrate {
        target: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("unsupported database URL {0:?}: use postgres://… or leave it unset for SQLite")]
    UnsupportedUrl(String),
    #[error("cannot create {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// PostgreSQL schema (or SQLite file) this service owns, for messages.
    target: String,
}

fn schema_name(service: &str) -> String {
    let clean: String = service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("dutgate_{clean}")
}

/// How many connections a process keeps to its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSize {
    /// A service: up to 8 (SQLite) or 16 (PostgreSQL) connections, kept open.
    Service,
    /// A short-lived worker that writes now and then (a job process): at most two connections,
    /// closed after 10 s idle, so hundreds of them do not exhaust PostgreSQL's
    /// `max_connections`; a writer waits up to 30 s for one.
    Worker,
}

impl PoolSize {
    fn options(self, service_max: u32) -> AnyPoolOptions {
        match self {
            PoolSize::Service => AnyPoolOptions::new()
                .max_connections(service_max)
                .acquire_timeout(Duration::from_secs(10)),
            PoolSize::Worker => AnyPoolOptions::new()
                .max_connections(2)
                .min_connections(0)
                .idle_timeout(Duration::from_secs(10))
                .acquire_timeout(Duration::from_secs(30)),
        }
    }
}

impl Db {
    /// Opens (and migrates) the store of `service` as the gateway config says.
    pub async fn open_for_service(
        service: &str,
        gw: &GatewayConfig,
        migrations: Migrations,
    ) -> Result<Self, DbError> {
        Self::open_for_service_sized(service, gw, migrations, PoolSize::Service).await
    }

    /// [`Db::open_for_service`] with a pool of `size`.
    pub async fn open_for_service_sized(
        service: &str,
        gw: &GatewayConfig,
        migrations: Migrations,
        size: PoolSize,
    ) -> Result<Self, DbError> {
        match &gw.database_url {
            Some(url) => {
                Self::open_postgres_sized(url.expose(), &schema_name(service), migrations, size)
                    .await
            }
            None => {
                std::fs::create_dir_all(&gw.state_dir).map_err(|source| DbError::StateDir {
                    path: gw.state_dir.clone(),
                    source,
                })?;
                Self::open_sqlite_sized(
                    &gw.state_dir.join(format!("{service}.db")),
                    migrations,
                    size,
                )
                .await
            }
        }
    }

    pub async fn open_sqlite(
        path: &std::path::Path,
        migrations: Migrations,
    ) -> Result<Self, DbError> {
        Self::open_sqlite_sized(path, migrations, PoolSize::Service).await
    }

    pub async fn open_sqlite_sized(
        path: &std::path::Path,
        migrations: Migrations,
        size: PoolSize,
    ) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let target = path.display().to_string();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let opts: AnyConnectOptions = url.parse().map_err(|source| DbError::Open {
            target: target.clone(),
            source,
        })?;
        let pool = size
            .options(8)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // WAL lets readers run while a writer commits; the busy timeout turns
                    // writer contention into a short wait instead of SQLITE_BUSY errors.
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            .map_err(|source| DbError::Open {
                target: target.clone(),
                source,
            })?;
        migrations
            .sqlite
            .run(&pool)
            .await
            .map_err(|source| DbError::Migrate {
                target: target.clone(),
                source,
            })?;
        Ok(Self {
            pool,
            backend: Backend::Sqlite,
            target,
        })
    }

    pub async fn open_postgres(
        url: &str,
        schema: &str,
        migrations: Migrations,
    ) -> Result<Self, DbError> {
        Self::open_postgres_sized(url, schema, migrations, PoolSize::Service).await
    }

    pub async fn open_postgres_sized(
        url: &str,
        schema: &str,
        migrations: Migrations,
        size: PoolSize,
    ) -> Result<Self, DbError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(DbError::UnsupportedUrl(
                crate::secret::DatabaseUrl::new(url).masked(),
            ));
        }
        sqlx::any::install_default_drivers();
        let target = format!(
            "{} schema {schema}",
            crate::secret::DatabaseUrl::new(url).masked()
        );
        let open_err = |source| DbError::Open {
            target: target.clone(),
            source,
        };
        let opts: AnyConnectOptions = url.parse().map_err(open_err)?;
        // Create the schema on a throwaway pool first: the service pool pins search_path to it.
        {
            let bootstrap = AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts.clone())
                .await
                .map_err(open_err)?;
            bootstrap
                .execute(AssertSqlSafe(format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema}"
                )))
                .await
                .map_err(open_err)?;
            bootstrap.close().await;
        }
        let set_path = format!("SET search_path TO {schema}");
        let pool = size
            .options(16)
            .after_connect(move |conn, _meta| {
                let set_path = set_path.clone();
                Box::pin(async move {
                    conn.execute(AssertSqlSafe(set_path)).await?;
                    Ok(())
                })
            })
            .connect_with(opts)
            .await
            .map_err(open_err)?;
        migrations
            .postgres
            .run(&pool)
            .await
            .map_err(|source| DbError::Migrate {
                target: target.clone(),
                source,
            })?;
        Ok(Self {
            pool,
            backend: Backend::Postgres,
            target,
        })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// The cheap round trip `/healthz` uses.
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Test support: the databases a storage test must pass on. Always a fresh SQLite file;
/// PostgreSQL too when `DUTGATE_TEST_POSTGRES_URL` is set (`cargo xtask test --postgres`
/// sets it). If it is set and the server does not answer, the test fails: it never skips.
pub mod testing {
    use super::*;

    pub const POSTGRES_ENV: &str = "DUTGATE_TEST_POSTGRES_URL";

    pub struct TestDb {
        pub db: Db,
        cleanup: Cleanup,
    }

    enum Cleanup {
        File(PathBuf),
        Schema(String),
    }

    impl std::ops::Deref for TestDb {
        type Target = Db;
        fn deref(&self) -> &Db {
            &self.db
        }
    }

    impl TestDb {
        /// Removes the database (file or schema). Call at the end of the test.
        pub async fn cleanup(self) {
            match &self.cleanup {
                Cleanup::File(path) => {
                    self.db.close().await;
                    for suffix in ["", "-wal", "-shm"] {
                        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                    }
                }
                Cleanup::Schema(schema) => {
                    let _ = self
                        .db
                        .pool
                        .execute(AssertSqlSafe(format!(
                            "DROP SCHEMA IF EXISTS {schema} CASCADE"
                        )))
                        .await;
                    self.db.close().await;
                }
            }
        }
    }

    fn unique(service: &str) -> String {
        format!(
            "t_{}_{}_{:08x}",
            schema_name(service),
            std::process::id(),
            rand::random::<u32>()
        )
    }

    /// SQLite, plus PostgreSQL when configured. Panics (fails the test) on any error.
    pub async fn databases(service: &str, migrations: Migrations) -> Vec<TestDb> {
        let mut out = Vec::new();
        let path = std::env::temp_dir().join(format!("{}.db", unique(service)));
        let db = Db::open_sqlite(&path, migrations)
            .await
            .unwrap_or_else(|e| panic!("SQLite test database: {e}"));
        out.push(TestDb {
            db,
            cleanup: Cleanup::File(path),
        });
        if let Ok(url) = std::env::var(POSTGRES_ENV) {
            let schema = unique(service);
            let db = Db::open_postgres(&url, &schema, migrations)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "{POSTGRES_ENV} is set but PostgreSQL is not usable ({e}); \
                     install and start the `postgresql` package or unset the variable"
                    )
                });
            out.push(TestDb {
                db,
                cleanup: Cleanup::Schema(schema),
            });
        }
        out
    }
}
