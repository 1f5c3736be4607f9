//! salad's own tables: the console ports of each machine (stable across restarts) and which
//! machine each serial adapter path was last bound to. Nothing else touches them.

use std::collections::BTreeSet;

use dutgate_core::MachineId;
use dutgate_core::db::{Db, DbError, Migrations};
use sqlx::Row;
use sqlx::migrate::Migrator;

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// The migrations `ServiceContext::open_db` runs for salad.
pub const MIGRATIONS: Migrations = Migrations {
    sqlite: &SQLITE,
    postgres: &POSTGRES,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    /// A port of the new row is already taken (another gateway sharing the database, or a
    /// concurrent allocation): pick other ports.
    #[error("console port already taken")]
    PortTaken,
    #[error("machine {0} already has console ports")]
    Exists(MachineId),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(DbError::Query(e))
    }
}

/// A machine's console ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachinePorts {
    pub id: MachineId,
    pub tcp_port: u16,
    pub tcp_port_logs: u16,
}

#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn port(v: i64) -> Result<u16, StoreError> {
    u16::try_from(v).map_err(|_| StoreError::Corrupt(format!("port {v} out of range")))
}

impl Store {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub async fn machines(&self) -> Result<Vec<MachinePorts>, StoreError> {
        let rows = sqlx::query("SELECT id, tcp_port, tcp_port_logs FROM machines ORDER BY id")
            .fetch_all(self.db.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get("id")?;
                Ok(MachinePorts {
                    id: MachineId::parse(&id).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    tcp_port: port(r.try_get("tcp_port")?)?,
                    tcp_port_logs: port(r.try_get("tcp_port_logs")?)?,
                })
            })
            .collect()
    }

    /// Every port some machine holds (this gateway's or another's sharing the database).
    pub async fn used_ports(&self) -> Result<BTreeSet<u16>, StoreError> {
        let mut out = BTreeSet::new();
        for m in self.machines().await? {
            out.insert(m.tcp_port);
            out.insert(m.tcp_port_logs);
        }
        Ok(out)
    }

    /// Records a new machine's ports. Fails with [`StoreError::PortTaken`] or
    /// [`StoreError::Exists`] instead of replacing anything.
    pub async fn insert_machine(&self, m: MachinePorts) -> Result<(), StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        let exists = sqlx::query("SELECT 1 FROM machines WHERE id = $1")
            .bind(m.id.to_string())
            .fetch_optional(self.db.pool())
            .await?;
        if exists.is_some() {
            return Err(StoreError::Exists(m.id));
        }
        // The UNIQUE constraints hold per column; a port must not appear in either column.
        let taken = sqlx::query(
            "SELECT 1 FROM machines WHERE tcp_port IN ($1, $2) OR tcp_port_logs IN ($1, $2)",
        )
        .bind(i64::from(m.tcp_port))
        .bind(i64::from(m.tcp_port_logs))
        .fetch_optional(self.db.pool())
        .await?;
        if taken.is_some() || m.tcp_port == m.tcp_port_logs {
            return Err(StoreError::PortTaken);
        }
        let r = sqlx::query(
            "INSERT INTO machines (id, tcp_port, tcp_port_logs, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(m.id.to_string())
        .bind(i64::from(m.tcp_port))
        .bind(i64::from(m.tcp_port_logs))
        .bind(now_ms())
        .execute(self.db.pool())
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                // Either the id raced in or a port is taken; tell which.
                let again = sqlx::query("SELECT 1 FROM machines WHERE id = $1")
                    .bind(m.id.to_string())
                    .fetch_optional(self.db.pool())
                    .await?;
                Err(if again.is_some() {
                    StoreError::Exists(m.id)
                } else {
                    StoreError::PortTaken
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Forgets a machine's ports and every adapter path bound to it. Returns whether it existed.
    pub async fn delete_machine(&self, id: MachineId) -> Result<bool, StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        sqlx::query("DELETE FROM serial_paths WHERE machine_id = $1")
            .bind(id.to_string())
            .execute(self.db.pool())
            .await?;
        let n = sqlx::query("DELETE FROM machines WHERE id = $1")
            .bind(id.to_string())
            .execute(self.db.pool())
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    /// Remembers that the adapter at `path` leads to `machine`.
    pub async fn bind_path(&self, path: &str, machine: MachineId) -> Result<(), StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        sqlx::query(
            "INSERT INTO serial_paths (path, machine_id, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (path) DO UPDATE SET machine_id = excluded.machine_id, updated_at = excluded.updated_at",
        )
        .bind(path)
        .bind(machine.to_string())
        .bind(now_ms())
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// The machine the adapter at `path` was last bound to.
    pub async fn path_machine(&self, path: &str) -> Result<Option<MachineId>, StoreError> {
        let row = sqlx::query("SELECT machine_id FROM serial_paths WHERE path = $1")
            .bind(path)
            .fetch_optional(self.db.pool())
            .await?;
        match row {
            None => Ok(None),
            Some(r) => {
                let id: String = r.try_get("machine_id")?;
                MachineId::parse(&id)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dutgate_core::db::testing::databases;

    fn mid(s: &str) -> MachineId {
        MachineId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn machines_and_paths_on_every_backend() {
        for db in databases("salad", MIGRATIONS).await {
            let store = Store::new(db.db.clone());
            let a = MachinePorts {
                id: mid("52:54:00:00:00:01"),
                tcp_port: 8200,
                tcp_port_logs: 8201,
            };
            store.insert_machine(a).await.unwrap();
            assert!(matches!(
                store.insert_machine(a).await,
                Err(StoreError::Exists(_))
            ));
            let clash = MachinePorts {
                id: mid("52:54:00:00:00:02"),
                tcp_port: 8201,
                tcp_port_logs: 8202,
            };
            assert!(matches!(
                store.insert_machine(clash).await,
                Err(StoreError::PortTaken)
            ));
            let b = MachinePorts {
                id: mid("52:54:00:00:00:02"),
                tcp_port: 8202,
                tcp_port_logs: 8203,
            };
            store.insert_machine(b).await.unwrap();
            assert_eq!(store.machines().await.unwrap(), vec![a, b]);
            assert_eq!(
                store
                    .used_ports()
                    .await
                    .unwrap()
                    .into_iter()
                    .collect::<Vec<_>>(),
                vec![8200, 8201, 8202, 8203]
            );

            assert_eq!(store.path_machine("/dev/ttyUSB0").await.unwrap(), None);
            store.bind_path("/dev/ttyUSB0", a.id).await.unwrap();
            store.bind_path("/dev/ttyUSB0", b.id).await.unwrap();
            assert_eq!(
                store.path_machine("/dev/ttyUSB0").await.unwrap(),
                Some(b.id)
            );

            assert!(store.delete_machine(b.id).await.unwrap());
            assert!(!store.delete_machine(b.id).await.unwrap());
            assert_eq!(store.path_machine("/dev/ttyUSB0").await.unwrap(), None);
            assert_eq!(store.machines().await.unwrap(), vec![a]);
            db.cleanup().await;
        }
    }
}
