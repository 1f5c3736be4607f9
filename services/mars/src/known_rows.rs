//! The newest machine rows this process has seen, so that a state change can be decided
//! without reading its row first.
//!
//! Every state change reads the row, decides, and writes the result only if the row's
//! `version` is still the one it read (optimistic concurrency, see [`crate::row_write`]). On
//! PostgreSQL the read is a round trip of its own on the lease path. A row this process wrote
//! or read last is, nearly always, still the row in the database: deciding on it and letting
//! the version check catch the rare exception saves the read.
//!
//! What keeps it right: every write of a machine row moves its version, so a decision taken
//! on an outdated row is never written (the write finds another version and the change is
//! decided again on a fresh read). A *refusal* writes nothing and so is never checked: the
//! store decides again on a fresh read before it refuses (see `Store::apply_many`).

use std::collections::HashMap;
use std::sync::Mutex;

use dutgate_core::MachineId;

use crate::store::MachineRow;

#[derive(Debug, Default)]
pub(crate) struct KnownRows {
    rows: Mutex<HashMap<MachineId, MachineRow>>,
}

impl KnownRows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MachineId, MachineRow>> {
        // Each change under the lock is one insert or remove: a panic elsewhere cannot leave
        // the map half changed.
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: MachineId) -> Option<MachineRow> {
        self.lock().get(&id).cloned()
    }

    /// A row as read or written: kept unless a newer version is known already (a read that
    /// started before a write may return after it).
    pub fn learn(&self, row: &MachineRow) {
        let mut rows = self.lock();
        match rows.get(&row.id) {
            Some(known) if known.version > row.version => {}
            _ => {
                rows.insert(row.id, row.clone());
            }
        }
    }

    /// The row changed behind this process's back: read it next time.
    pub fn forget(&self, id: MachineId) {
        self.lock().remove(&id);
    }
}
