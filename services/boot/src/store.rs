//! The boot service's table: one boot config per machine. Nothing else touches it.

use dutgate_core::MachineId;
use dutgate_core::db::{Db, DbError, Migrations};
use sqlx::Row;
use sqlx::migrate::Migrator;

use crate::model::{BootConfig, StoredBootConfig};

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE,
    postgres: &POSTGRES,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("stored boot config of {mac} is unreadable: {source}")]
    Corrupt {
        mac: String,
        #[source]
        source: serde_json::Error,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(DbError::Query(e))
    }
}

/// Result of a conditional delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    Yes,
    /// Nothing was stored for the machine.
    Absent,
    /// Another job's config is stored; it was kept.
    OtherJob(Option<String>),
}

#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

fn decode(row: &sqlx::any::AnyRow) -> Result<StoredBootConfig, StoreError> {
    let mac: String = row.try_get("mac")?;
    let text: String = row.try_get("config")?;
    let updated_at: i64 = row.try_get("updated_at")?;
    let config: BootConfig = serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
        mac: mac.clone(),
        source,
    })?;
    let mac = MachineId::parse(&mac).map_err(|e| StoreError::Corrupt {
        mac: mac.clone(),
        source: serde::de::Error::custom(e),
    })?;
    Ok(StoredBootConfig {
        mac,
        config,
        updated_at,
    })
}

impl Store {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Sets (or replaces) the boot config of `mac`.
    pub async fn put(
        &self,
        mac: MachineId,
        config: &BootConfig,
        now_ms: i64,
    ) -> Result<StoredBootConfig, StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        let text = serde_json::to_string(config).map_err(|source| StoreError::Corrupt {
            mac: mac.to_string(),
            source,
        })?;
        sqlx::query(
            "INSERT INTO boot_configs (mac, config, job_id, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (mac) DO UPDATE SET config = excluded.config, job_id = excluded.job_id, \
             updated_at = excluded.updated_at",
        )
        .bind(mac.to_string())
        .bind(text)
        .bind(config.job_id.clone())
        .bind(now_ms)
        .execute(self.db.pool())
        .await?;
        Ok(StoredBootConfig {
            mac,
            config: config.clone(),
            updated_at: now_ms,
        })
    }

    pub async fn get(&self, mac: MachineId) -> Result<Option<StoredBootConfig>, StoreError> {
        let row = sqlx::query("SELECT mac, config, updated_at FROM boot_configs WHERE mac = $1")
            .bind(mac.to_string())
            .fetch_optional(self.db.pool())
            .await?;
        row.as_ref().map(decode).transpose()
    }

    pub async fn list(&self) -> Result<Vec<StoredBootConfig>, StoreError> {
        let rows = sqlx::query("SELECT mac, config, updated_at FROM boot_configs ORDER BY mac")
            .fetch_all(self.db.pool())
            .await?;
        rows.iter().map(decode).collect()
    }

    /// Deletes the config of `mac`; with `job_id`, only if it belongs to that job.
    pub async fn delete(
        &self,
        mac: MachineId,
        job_id: Option<&str>,
    ) -> Result<Deleted, StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        let affected = match job_id {
            Some(job) => sqlx::query("DELETE FROM boot_configs WHERE mac = $1 AND job_id = $2")
                .bind(mac.to_string())
                .bind(job.to_string())
                .execute(self.db.pool())
                .await?
                .rows_affected(),
            None => sqlx::query("DELETE FROM boot_configs WHERE mac = $1")
                .bind(mac.to_string())
                .execute(self.db.pool())
                .await?
                .rows_affected(),
        };
        if affected > 0 {
            return Ok(Deleted::Yes);
        }
        match self.get(mac).await? {
            None => Ok(Deleted::Absent),
            Some(other) => Ok(Deleted::OtherJob(other.config.job_id)),
        }
    }
}
