//! Leases as rows of the machines table: the reads and the writes that are not state
//! changes (a heartbeat, a grace and an expiry claim move only `lease_expires_at`).
//!
//! An expiry is *claimed* before the machine is powered off and freed: the claim sets
//! `lease_expires_at` to the negated claim time, so the lease reads as expired to every
//! heartbeat and release from then on (see [`Store::claim_expiry`]).

use super::rows::{MACHINE_COLUMNS, row_to_machine};
use super::{MachineRow, Store, StoreError};
use crate::model::Timestamp;

impl Store {
    /// Machines whose lease expired before `now`.
    pub async fn expired_leases(&self, now: Timestamp) -> Result<Vec<MachineRow>, StoreError> {
        let sql = format!(
            "SELECT {MACHINE_COLUMNS} FROM machines WHERE lease_id IS NOT NULL AND lease_expires_at < $1"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now.millis())
            .fetch_all(self.db.pool())
            .await?;
        rows.iter().map(row_to_machine).collect()
    }

    /// Moves a lease's expiry to `expires` unless its expiry was claimed (negative): a lease
    /// past its expiry time that no sweeper claimed yet is still its holder's. No event:
    /// heartbeats are not state changes. The version moves so that a concurrent writer
    /// re-reads the row.
    pub async fn extend_lease(
        &self,
        lease_id: &str,
        expires: Timestamp,
    ) -> Result<bool, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "UPDATE machines SET lease_expires_at = $1, version = version + 1 \
             WHERE lease_id = $2 AND lease_expires_at >= 0 RETURNING id",
        )
        .bind(expires.millis())
        .bind(lease_id)
        .fetch_optional(self.db.pool())
        .await?;
        Ok(r.is_some())
    }

    /// Gives every lease that lapsed before `now` time until `until`: after mars was down or
    /// could not reach its database, holders could not heartbeat and must get the chance to.
    /// Live leases need none (their holders can heartbeat now); claimed expiries (negative)
    /// are left alone. Returns how many leases.
    pub async fn grant_grace(&self, now: Timestamp, until: Timestamp) -> Result<u64, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "UPDATE machines SET lease_expires_at = $1, version = version + 1 \
             WHERE lease_id IS NOT NULL AND lease_expires_at >= 0 AND lease_expires_at < $2",
        )
        .bind(until.millis())
        .bind(now.millis())
        .execute(self.db.pool())
        .await?;
        Ok(r.rows_affected())
    }

    /// Claims the expiry of `lease_id` whose `lease_expires_at` was read as `seen`: sets it
    /// to `claim` (negative) if it is still `seen` (compare-and-set, so of several sweepers
    /// exactly one wins). False when the lease moved meanwhile (heartbeat, release, another
    /// sweeper).
    pub async fn claim_expiry(
        &self,
        lease_id: &str,
        seen: i64,
        claim: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.db.write_turn().await;
        let r = sqlx::query(
            "UPDATE machines SET lease_expires_at = $1, version = version + 1 \
             WHERE lease_id = $2 AND lease_expires_at = $3",
        )
        .bind(claim)
        .bind(lease_id)
        .bind(seen)
        .execute(self.db.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn machine_by_lease(&self, lease_id: &str) -> Result<MachineRow, StoreError> {
        let sql = format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE lease_id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(lease_id)
            .fetch_optional(self.db.pool())
            .await?;
        match row {
            Some(r) => row_to_machine(&r),
            None => Err(StoreError::LeaseGone(lease_id.to_string())),
        }
    }
}
