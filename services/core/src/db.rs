//! Storage: SQLite by default (one file per service under the state dir, WAL, busy timeout),
//! PostgreSQL when `database_url` is `postgres://…` (one schema per service).
//!
//! Both go through sqlx's `Any` driver so that a service writes its queries once (use `$1`
//! placeholders: SQLite accepts them too) and the same test code runs on both backends. Each
//! service ships one migration directory per backend because the DDL dialects differ.

use std::path::PathBuf;
use std::sync::Arc;
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
    /// The process's SQLite writers queue here (see [`WriteGate`]).
    gate: Arc<WriteGate>,
}

/// SQLite admits one writer at a time, and a writer that finds the lock taken sleeps in
/// SQLite's busy handler — 1, 2, 5, 10, 15, 20, 25 … ms — and may lose the race again when it
/// wakes: under a few hundred writes a second that turns a 0.1 ms commit into a 30 ms one now
/// and then. A process's writers therefore queue here, in arrival order, and each starts the
/// moment the one before it commits. Writers of other processes (job processes on the same
/// file) still meet the busy handler; they write rarely.
#[derive(Debug, Default)]
struct WriteGate {
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// A writer's turn on SQLite: held from `BEGIN` to `COMMIT`; dropping it lets the next writer
/// in. Never take a second turn while holding one (the gate is not reentrant).
#[derive(Debug)]
pub struct WriteTurn {
    _writer: tokio::sync::OwnedMutexGuard<()>,
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
            // No ping before each use: it is a round trip to the server in front of every
            // statement (the pool pings each connection when it is given back anyway, and
            // closes it if the ping fails). A connection that broke while idle (the server
            // restarted) fails its next statement once and is then replaced.
            PoolSize::Service => AnyPoolOptions::new()
                .max_connections(service_max)
                .test_before_acquire(false)
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
        // A service writes all the time and checkpoints mostly in the background (see
        // `spawn_checkpointer`); a worker (a job process) writes now and then.
        let background_checkpoints =
            size == PoolSize::Service && tokio::runtime::Handle::try_current().is_ok();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let opts: AnyConnectOptions = url.parse().map_err(|source| DbError::Open {
            target: target.clone(),
            source,
        })?;
        let pool = size
            .options(8)
            .after_connect(move |conn, _meta| {
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
        if background_checkpoints {
            spawn_checkpointer(pool.clone(), target.clone());
        }
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
            gate: Arc::default(),
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
            gate: Arc::default(),
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

    /// A writer's turn: on SQLite, wait for it and hold it until the transaction (or single
    /// write) has committed; PostgreSQL needs none (`None`).
    pub async fn write_turn(&self) -> Option<WriteTurn> {
        match self.backend {
            Backend::Sqlite => Some(WriteTurn {
                _writer: self.gate.writer.clone().lock_owned().await,
            }),
            Backend::Postgres => None,
        }
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

/// How often the background checkpointer copies the WAL back into a service's database.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// Copies the WAL back into the database every [`CHECKPOINT_INTERVAL`] with a PASSIVE
/// checkpoint, which runs beside writers instead of in front of them.
///
/// Left alone, SQLite checkpoints inside the commit that takes the WAL past 1,000 pages:
/// 10–30 ms on a gateway's disk, during which every writer queued on the [`WriteGate`] waits.
/// Checkpointing a little every 100 ms leaves that inline checkpoint little or nothing to
/// copy. It stays enabled all the same: it is what starts the WAL over (a log that is never
/// restarted grows, and every read and checkpoint gets slower). Measured with
/// `cargo xtask bench scheduler`: dispatch p99 at half the gateway's ceiling 42 ms with
/// SQLite's checkpoints alone, 70 ms with background ones alone, 25 ms with both.
/// Stops when the pool is closed.
fn spawn_checkpointer(pool: AnyPool, target: String) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            let started = std::time::Instant::now();
            match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                Ok(_) => {
                    warned = false;
                    metrics::histogram!("db_checkpoint_seconds")
                        .record(started.elapsed().as_secs_f64());
                }
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(database = %target, error = %e, "WAL checkpoint failed; retrying");
                }
                Err(_) => {}
            }
        }
    });
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
