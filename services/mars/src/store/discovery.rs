//! The discovery in progress (at most one: the row with id 1).

use sqlx::Row;

use super::write::is_unique_violation;
use super::{Store, StoreError};
use crate::model::{Discovery, Timestamp};

impl Store {
    pub async fn discovery(&self) -> Result<Option<Discovery>, StoreError> {
        let row = sqlx::query(
            "SELECT pdu, port_id, started_at, expires_at, timeout FROM discovery WHERE id = 1",
        )
        .fetch_optional(self.db.pool())
        .await?;
        row.map(|r| -> Result<Discovery, StoreError> {
            Ok(Discovery {
                pdu: r.try_get("pdu")?,
                port_id: r.try_get("port_id")?,
                started_at: Timestamp(r.try_get("started_at")?),
                expires_at: Timestamp(r.try_get("expires_at")?),
                timeout: r.try_get("timeout")?,
            })
        })
        .transpose()
    }

    /// Starts a discovery; false when one is already recorded.
    pub async fn insert_discovery(&self, d: &Discovery) -> Result<bool, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "INSERT INTO discovery (id, pdu, port_id, started_at, expires_at, timeout) \
             VALUES (1, $1, $2, $3, $4, $5)",
        )
        .bind(&d.pdu)
        .bind(&d.port_id)
        .bind(d.started_at.millis())
        .bind(d.expires_at.millis())
        .bind(d.timeout)
        .execute(self.db.pool())
        .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the discovery if it is still `d` (same port and start); true when removed.
    /// Claiming a discovery for a registration and stopping it both go through here, so only
    /// one of them can win.
    pub async fn remove_discovery(&self, d: &Discovery) -> Result<bool, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "DELETE FROM discovery WHERE id = 1 AND pdu = $1 AND port_id = $2 AND started_at = $3",
        )
        .bind(&d.pdu)
        .bind(&d.port_id)
        .bind(d.started_at.millis())
        .execute(self.db.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }
}
