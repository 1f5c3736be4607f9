//! The machine events committed lately, for the event stream (`GET /api/v1/events`) to answer
//! a follower from memory instead of reading the events back from the table: that read sat
//! on every dispatch's path (a machine freed → the executor hears of it → the next job).
//!
//! The window is indexed by seq. Each slot is an event, a seq known to be absent for good, or
//! unknown. A follower is answered from memory only when every seq after its cursor up to the
//! newest one this process announced is known; otherwise the table is read, and what the read
//! shows fills the window in.
//!
//! Why a seq missing from a table read is absent for good: events commit in seq order (every
//! writer draws its seqs under the event-order lock and holds it until its commit, see
//! `row_write::commit_in_seq_order`; SQLite has one writer). So when seq 105 is visible, 104
//! is visible too or will never be (its transaction rolled back). Such holes are rare
//! (PostgreSQL sequences are not rolled back); events of another process writing the same
//! database are never announced here and are learnt from the table the same way.

use std::collections::VecDeque;

use crate::model::MachineEvent;

/// Seqs kept in the window.
pub(crate) const RECENT_EVENTS: usize = 4096;

enum Slot {
    Unknown,
    Event(MachineEvent),
    Absent,
}

#[derive(Default)]
pub(crate) struct RecentEvents {
    /// The seq of `slots[0]`.
    first: i64,
    slots: VecDeque<Slot>,
}

impl RecentEvents {
    /// An event committed by this process (announced in any order).
    pub(crate) fn push(&mut self, e: MachineEvent) {
        let seq = e.seq;
        if let Some(slot) = self.slot_for(seq) {
            *slot = Slot::Event(e);
        }
    }

    /// What a table read of the events after `after` returned (seq order): these events, and
    /// no other seq up to the last of them.
    pub(crate) fn learn(&mut self, after: i64, events: &[MachineEvent]) {
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        let mut present = events.iter().map(|e| e.seq).peekable();
        for e in events {
            self.push(e.clone());
        }
        // Only inside the window (pushing may have moved it).
        let Some(end) = self.end() else {
            return;
        };
        for seq in after.saturating_add(1).max(self.first)..=last.min(end) {
            while present.next_if(|&p| p < seq).is_some() {}
            if present.peek() != Some(&seq)
                && let Some(slot) = self.slot_at(seq)
                && matches!(slot, Slot::Unknown)
            {
                *slot = Slot::Absent;
            }
        }
    }

    /// Every event after `after` up to `latest` (at most `limit`), if all of them are known.
    pub(crate) fn after(&self, after: i64, latest: i64, limit: usize) -> Option<Vec<MachineEvent>> {
        if self.slots.is_empty() || after < self.first.saturating_sub(1) {
            return None;
        }
        let mut out = Vec::new();
        // `after` is a follower's cursor, any i64: no arithmetic that could overflow.
        for seq in after.saturating_add(1)..=latest {
            if out.len() >= limit {
                break;
            }
            let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
            match self.slots.get(i)? {
                Slot::Unknown => return None,
                Slot::Event(e) => out.push(e.clone()),
                Slot::Absent => {}
            }
        }
        Some(out)
    }

    /// The newest seq of the window.
    fn end(&self) -> Option<i64> {
        let len = i64::try_from(self.slots.len()).ok()?;
        self.first.checked_add(len)?.checked_sub(1)
    }

    fn slot_at(&mut self, seq: i64) -> Option<&mut Slot> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.slots.get_mut(i)
    }

    /// The slot of `seq`, growing the window to it; `None` when `seq` is older than the window.
    fn slot_for(&mut self, seq: i64) -> Option<&mut Slot> {
        let end = self.first.saturating_add(self.slots.len() as i64);
        if self.slots.is_empty() || seq >= end.saturating_add(RECENT_EVENTS as i64) {
            // Nothing kept would stay in the window: start it here.
            self.slots.clear();
            self.first = seq;
        } else if seq < self.first {
            return None;
        }
        while self.first.saturating_add(self.slots.len() as i64) <= seq {
            self.slots.push_back(Slot::Unknown);
        }
        while self.slots.len() > RECENT_EVENTS {
            self.slots.pop_front();
            self.first += 1;
        }
        self.slot_at(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MachineState, Timestamp};
    use dutgate_core::MachineId;

    fn event(seq: i64) -> MachineEvent {
        MachineEvent {
            seq,
            machine_id: MachineId::from_bytes([2, 0, 0, 0, 0, 1]),
            at: Timestamp(seq),
            from_state: MachineState::Idle,
            to_state: MachineState::Idle,
            kind: "lease_released".into(),
            actor: "test".into(),
            reason: String::new(),
            job_id: None,
        }
    }

    fn seqs(v: Option<Vec<MachineEvent>>) -> Option<Vec<i64>> {
        v.map(|v| v.iter().map(|e| e.seq).collect())
    }

    #[test]
    fn answers_only_when_complete() {
        let mut r = RecentEvents::default();
        assert_eq!(seqs(r.after(0, 0, 10)), None, "empty: read the table");
        for s in 10..=14 {
            r.push(event(s));
        }
        assert_eq!(seqs(r.after(11, 14, 10)), Some(vec![12, 13, 14]));
        assert_eq!(seqs(r.after(9, 14, 2)), Some(vec![10, 11]));
        assert_eq!(seqs(r.after(14, 14, 10)), Some(vec![]));
        // Cursors from the query string may be anything.
        assert_eq!(seqs(r.after(i64::MAX, 14, 10)), Some(vec![]));
        assert_eq!(seqs(r.after(i64::MIN, 14, 10)), None);
        assert_eq!(seqs(r.after(-1, 14, 10)), None);
        assert_eq!(seqs(r.after(8, 14, 10)), None, "seq 9 is not here");
        assert_eq!(
            seqs(r.after(11, 15, 10)),
            None,
            "seq 15 was announced, not pushed"
        );
        // A seq never pushed: nothing across it is answered until a table read shows it.
        r.push(event(16));
        assert_eq!(seqs(r.after(14, 16, 10)), None);
        assert_eq!(seqs(r.after(15, 16, 10)), Some(vec![16]));
    }

    #[test]
    fn out_of_order_announcements_and_holes_learnt_from_the_table() {
        let mut r = RecentEvents::default();
        r.push(event(1));
        // 3 is announced before 2 (two writers finishing their commits in the other order).
        r.push(event(3));
        assert_eq!(seqs(r.after(0, 3, 10)), None);
        r.push(event(2));
        assert_eq!(seqs(r.after(0, 3, 10)), Some(vec![1, 2, 3]));
        // 4 was drawn and rolled back; 5 and 6 are another process's, 7 this one's.
        r.push(event(7));
        assert_eq!(seqs(r.after(3, 7, 10)), None);
        r.learn(3, &[event(5), event(6), event(7)]);
        assert_eq!(seqs(r.after(3, 7, 10)), Some(vec![5, 6, 7]));
        assert_eq!(seqs(r.after(2, 7, 2)), Some(vec![3, 5]));
        // A table read learns nothing past its last event, nor before the cursor.
        r.learn(7, &[]);
        r.push(event(9));
        assert_eq!(seqs(r.after(7, 9, 10)), None, "8 is still unknown");
        r.learn(7, &[event(8), event(9)]);
        assert_eq!(seqs(r.after(0, 9, 100)), Some(vec![1, 2, 3, 5, 6, 7, 8, 9]));
        // Cursors far outside the window, and a read reaching back before it.
        r.learn(i64::MIN, &[event(1)]);
        r.learn(i64::MAX - 1, &[]);
        assert_eq!(seqs(r.after(i64::MAX, 9, 10)), Some(vec![]));
        assert_eq!(seqs(r.after(i64::MIN, 9, 10)), None);
    }

    #[test]
    fn the_window_slides_and_restarts_after_a_jump() {
        let mut r = RecentEvents::default();
        for s in 1..=RECENT_EVENTS as i64 + 10 {
            r.push(event(s));
        }
        assert_eq!(r.slots.len(), RECENT_EVENTS);
        assert_eq!(seqs(r.after(5, 20, 100)), None, "slid out");
        let last = RECENT_EVENTS as i64 + 10;
        assert_eq!(
            seqs(r.after(last - 2, last, 10)),
            Some(vec![last - 1, last])
        );
        // A seq far ahead: the window starts again there.
        r.push(event(last + 100_000));
        assert_eq!(r.slots.len(), 1);
        assert_eq!(
            seqs(r.after(last + 99_999, last + 100_000, 10)),
            Some(vec![last + 100_000])
        );
        // An event older than the window is dropped.
        r.push(event(3));
        assert_eq!(r.slots.len(), 1);
    }
}
