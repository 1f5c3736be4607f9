//! The pdu service's tables: PDUs added over REST, admin port settings (labels, reserved),
//! and the per-port history. Nothing else touches them.

use std::collections::BTreeMap;

use dutgate_core::PowerState;
use dutgate_core::db::{Db, DbError, Migrations};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::migrate::Migrator;

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
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("a PDU named {0:?} already exists")]
    Exists(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Db(DbError::Query(e))
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A PDU as persisted (same shape as a config entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPdu {
    pub name: String,
    pub driver: String,
    pub config: serde_json::Value,
    pub reserved: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub poll_interval_seconds: Option<f64>,
}

/// Admin overrides of one port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSetting {
    pub label: Option<String>,
    pub reserved: Option<bool>,
}

/// One history row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// Unix ms.
    pub at: i64,
    pub state: PowerState,
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
}

impl Store {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    pub async fn pdus(&self) -> Result<Vec<StoredPdu>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, driver, config, reserved, labels, poll_interval_seconds FROM pdus ORDER BY name",
        )
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|r| {
                let name: String = r.try_get("name")?;
                let corrupt = |what: &str, e: serde_json::Error| {
                    StoreError::Corrupt(format!("pdu {name}: {what}: {e}"))
                };
                let config: String = r.try_get("config")?;
                let reserved: String = r.try_get("reserved")?;
                let labels: String = r.try_get("labels")?;
                Ok(StoredPdu {
                    driver: r.try_get("driver")?,
                    config: serde_json::from_str(&config).map_err(|e| corrupt("config", e))?,
                    reserved: serde_json::from_str(&reserved)
                        .map_err(|e| corrupt("reserved", e))?,
                    labels: serde_json::from_str(&labels).map_err(|e| corrupt("labels", e))?,
                    poll_interval_seconds: r.try_get("poll_interval_seconds")?,
                    name,
                })
            })
            .collect()
    }

    pub async fn insert_pdu(&self, pdu: &StoredPdu) -> Result<(), StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "INSERT INTO pdus (name, driver, config, reserved, labels, poll_interval_seconds, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(pdu.name.clone())
        .bind(pdu.driver.clone())
        .bind(json(&pdu.config))
        .bind(json(&pdu.reserved))
        .bind(json(&pdu.labels))
        .bind(pdu.poll_interval_seconds)
        .bind(now_ms())
        .execute(self.db.pool())
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Exists(pdu.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes a REST-added PDU with its port settings and history. Returns whether it existed.
    pub async fn delete_pdu(&self, name: &str) -> Result<bool, StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        let mut tx = self.db.pool().begin().await?;
        let n = sqlx::query("DELETE FROM pdus WHERE name = $1")
            .bind(name.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("DELETE FROM port_settings WHERE pdu = $1")
            .bind(name.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM port_history WHERE pdu = $1")
            .bind(name.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    pub async fn port_settings(
        &self,
        pdu: &str,
    ) -> Result<BTreeMap<String, PortSetting>, StoreError> {
        let rows = sqlx::query("SELECT port_id, label, reserved FROM port_settings WHERE pdu = $1")
            .bind(pdu.to_string())
            .fetch_all(self.db.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let reserved: Option<i64> = r.try_get("reserved")?;
                Ok((
                    r.try_get("port_id")?,
                    PortSetting {
                        label: r.try_get("label")?,
                        reserved: reserved.map(|v| v != 0),
                    },
                ))
            })
            .collect()
    }

    /// Stores a port's admin settings (the whole row: callers merge first).
    pub async fn put_port_setting(
        &self,
        pdu: &str,
        port: &str,
        setting: &PortSetting,
    ) -> Result<(), StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        sqlx::query(
            "INSERT INTO port_settings (pdu, port_id, label, reserved, updated_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (pdu, port_id) DO UPDATE SET label = excluded.label, reserved = excluded.reserved, \
             updated_at = excluded.updated_at",
        )
        .bind(pdu.to_string())
        .bind(port.to_string())
        .bind(setting.label.clone())
        .bind(setting.reserved.map(i64::from))
        .bind(now_ms())
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// Appends a history row and keeps only the newest `keep` rows of that port.
    pub async fn record(
        &self,
        pdu: &str,
        port: &str,
        entry: &HistoryEntry,
        keep: u32,
    ) -> Result<(), StoreError> {
        // One writer at a time on SQLite (see `Db::write_turn`).
        let _turn = self.db.write_turn().await;
        sqlx::query(
            "INSERT INTO port_history (pdu, port_id, at, state, event, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(pdu.to_string())
        .bind(port.to_string())
        .bind(entry.at)
        .bind(entry.state.as_str().to_string())
        .bind(entry.event.clone())
        .bind(entry.detail.clone())
        .execute(self.db.pool())
        .await?;
        sqlx::query(
            "DELETE FROM port_history WHERE pdu = $1 AND port_id = $2 AND id <= \
             (SELECT id FROM port_history WHERE pdu = $1 AND port_id = $2 ORDER BY id DESC LIMIT 1 OFFSET $3)",
        )
        .bind(pdu.to_string())
        .bind(port.to_string())
        .bind(i64::from(keep.max(1)))
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    /// The newest `limit` rows of a port, oldest first.
    pub async fn history(
        &self,
        pdu: &str,
        port: &str,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, state, event, detail FROM port_history WHERE pdu = $1 AND port_id = $2 \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(pdu.to_string())
        .bind(port.to_string())
        .bind(i64::from(limit))
        .fetch_all(self.db.pool())
        .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(HistoryEntry {
                    at: r.try_get("at")?,
                    state: state
                        .parse()
                        .map_err(|e: dutgate_core::types::InvalidPowerState| {
                            StoreError::Corrupt(e.to_string())
                        })?,
                    event: r.try_get("event")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.reverse();
        Ok(out)
    }
}

fn json<T: Serialize>(v: &T) -> String {
    // Maps with string keys and plain values cannot fail to serialise.
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dutgate_core::db::testing::databases;

    #[tokio::test]
    async fn pdus_settings_and_history_on_every_backend() {
        for db in databases("pdu", MIGRATIONS).await {
            let store = Store::new(db.db.clone());
            let pdu = StoredPdu {
                name: "rack1".into(),
                driver: "dummy".into(),
                config: serde_json::json!({"ports": 4}),
                reserved: vec!["4".into()],
                labels: [("1".to_string(), "web".to_string())].into(),
                poll_interval_seconds: Some(2.5),
            };
            store.insert_pdu(&pdu).await.unwrap();
            assert!(matches!(
                store.insert_pdu(&pdu).await,
                Err(StoreError::Exists(_))
            ));
            assert_eq!(store.pdus().await.unwrap(), vec![pdu.clone()]);

            let s = PortSetting {
                label: Some("db".into()),
                reserved: Some(true),
            };
            store.put_port_setting("rack1", "2", &s).await.unwrap();
            let s2 = PortSetting {
                label: None,
                reserved: Some(false),
            };
            store.put_port_setting("rack1", "2", &s2).await.unwrap();
            assert_eq!(store.port_settings("rack1").await.unwrap()["2"], s2);

            for i in 0..7 {
                let e = HistoryEntry {
                    at: i,
                    state: if i % 2 == 0 {
                        PowerState::On
                    } else {
                        PowerState::Off
                    },
                    event: "observed".into(),
                    detail: (i == 6).then(|| "last".to_string()),
                };
                store.record("rack1", "1", &e, 5).await.unwrap();
            }
            let h = store.history("rack1", "1", 100).await.unwrap();
            assert_eq!(
                h.iter().map(|e| e.at).collect::<Vec<_>>(),
                vec![2, 3, 4, 5, 6]
            );
            assert_eq!(h[4].detail.as_deref(), Some("last"));
            assert_eq!(store.history("rack1", "1", 2).await.unwrap().len(), 2);

            assert!(store.delete_pdu("rack1").await.unwrap());
            assert!(!store.delete_pdu("rack1").await.unwrap());
            assert!(store.pdus().await.unwrap().is_empty());
            assert!(store.history("rack1", "1", 10).await.unwrap().is_empty());
            assert!(store.port_settings("rack1").await.unwrap().is_empty());
            db.cleanup().await;
        }
    }
}
