//! The head of the queue, kept in memory between scheduler rounds.
//!
//! Every round needs the first jobs of the queue in priority order. Reading them from the
//! database in every round costs a round trip and the decoding of dozens of rows on the
//! dispatch path. Instead the store records, after each commit, every change of the queue's
//! membership it makes ([`QueueLog`]: a job queued, a job that left the queue), and the
//! scheduler keeps the head it last read ([`QueueHead`]) and brings it up to date from that
//! log. The database is read again only when the head cannot answer: when it holds too few
//! jobs, when the log no longer reaches back to it, when a dispatch found a planned job gone
//! (another executor sharing the queue took it), or after [`QUEUE_HEAD_MAX_AGE`] (jobs that
//! other executors on the same PostgreSQL queued or took are in no log of this process).
//!
//! A read and the changes committed while it ran may come in either order; the changes
//! recorded since just before the read are applied to what it returned. Applying a change
//! twice does nothing more than once (a job is added only if absent, removed only if present),
//! so a change the read already saw does no harm.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::QueuedJob;

/// The longest a head is used without reading the queue again.
pub const QUEUE_HEAD_MAX_AGE: Duration = Duration::from_secs(2);
/// Changes the log keeps; a head further behind is read again.
const LOG_CAPACITY: usize = 16_384;

/// One change of the queue's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueChange {
    /// The job is queued (submitted, or back in the queue).
    Queued(QueuedJob),
    /// The job left the queue (dispatched, cancelled, expired).
    Left(i64),
}

/// The store's record of queue changes, numbered from 1 in the order they were recorded.
#[derive(Debug, Default)]
pub struct QueueLog {
    inner: Mutex<LogInner>,
}

#[derive(Debug, Default)]
struct LogInner {
    /// The number of the newest change (0: none yet).
    last: u64,
    /// The newest changes; the last one is number `last`.
    changes: VecDeque<QueueChange>,
}

impl QueueLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        // Each change under the lock is one push (and maybe one pop): a panic elsewhere
        // cannot leave it half done.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a change (after its commit).
    pub fn record(&self, change: QueueChange) {
        let mut log = self.lock();
        log.last += 1;
        log.changes.push_back(change);
        if log.changes.len() > LOG_CAPACITY {
            log.changes.pop_front();
        }
    }

    /// The number of the newest change.
    pub fn last(&self) -> u64 {
        self.lock().last
    }

    /// The changes after number `after`, and the number of the newest; `None` when the log no
    /// longer holds all of them.
    pub fn since(&self, after: u64) -> Option<(Vec<QueueChange>, u64)> {
        let log = self.lock();
        let missing = log.last.checked_sub(after)?;
        let missing = usize::try_from(missing).ok()?;
        if missing > log.changes.len() {
            return None;
        }
        let skip = log.changes.len() - missing;
        Some((log.changes.iter().skip(skip).cloned().collect(), log.last))
    }
}

/// Queue order: higher priority first, then older (lower id) first.
fn queue_order(a: &QueuedJob, b: &QueuedJob) -> std::cmp::Ordering {
    b.priority.cmp(&a.priority).then(a.id.cmp(&b.id))
}

/// The first jobs of the queue, in queue order, as of log change `seen`.
#[derive(Debug, Default)]
pub struct QueueHead {
    jobs: Vec<QueuedJob>,
    /// `jobs` is the whole queue (the read found fewer jobs than it asked for).
    whole: bool,
    /// The log change the head is up to date with.
    seen: u64,
    /// When the queue was last read; `None`: never, or the head was dropped.
    read_at: Option<Instant>,
}

impl QueueHead {
    /// The first `limit` jobs, and whether no other job is queued, if the head can tell.
    pub fn current(&mut self, log: &QueueLog, limit: usize) -> Option<(Vec<QueuedJob>, bool)> {
        let read_at = self.read_at?;
        if read_at.elapsed() >= QUEUE_HEAD_MAX_AGE {
            return None;
        }
        let Some((changes, last)) = log.since(self.seen) else {
            self.invalidate();
            return None;
        };
        self.apply(changes, last);
        if !self.whole && self.jobs.len() < limit {
            return None;
        }
        Some(self.first(limit))
    }

    /// Takes a read of the first `limit` jobs of the queue, started when the log's newest
    /// change was `mark`, and returns what [`QueueHead::current`] would.
    pub fn fill(
        &mut self,
        read: Vec<QueuedJob>,
        limit: usize,
        mark: u64,
        log: &QueueLog,
        read_at: Instant,
    ) -> (Vec<QueuedJob>, bool) {
        self.whole = read.len() < limit;
        self.jobs = read;
        self.seen = mark;
        self.read_at = Some(read_at);
        match log.since(mark) {
            Some((changes, last)) => self.apply(changes, last),
            // Too much changed during the read: use it this once, read again next time.
            None => self.read_at = None,
        }
        self.first(limit)
    }

    /// Drops the head: the next round reads the queue.
    pub fn invalidate(&mut self) {
        self.read_at = None;
        self.jobs.clear();
    }

    fn first(&self, limit: usize) -> (Vec<QueuedJob>, bool) {
        let n = self.jobs.len().min(limit);
        (
            self.jobs[..n].to_vec(),
            self.whole && self.jobs.len() <= limit,
        )
    }

    fn apply(&mut self, changes: Vec<QueueChange>, last: u64) {
        for change in changes {
            match change {
                QueueChange::Left(id) => self.jobs.retain(|j| j.id != id),
                QueueChange::Queued(job) => {
                    if self.jobs.iter().any(|j| j.id == job.id) {
                        continue;
                    }
                    let at = self
                        .jobs
                        .partition_point(|j| queue_order(j, &job) == std::cmp::Ordering::Less);
                    // Past the end of a partial head: not among the first jobs, which is all
                    // the head holds.
                    if at == self.jobs.len() && !self.whole {
                        continue;
                    }
                    self.jobs.insert(at, job);
                }
            }
        }
        self.seen = last;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Purpose;

    fn job(id: i64, priority: i64) -> QueuedJob {
        QueuedJob {
            id,
            priority,
            purpose: Purpose::Job,
            target_id: None,
            target_tags: vec![],
        }
    }

    fn ids(jobs: &[QueuedJob]) -> Vec<i64> {
        jobs.iter().map(|j| j.id).collect()
    }

    #[test]
    fn changes_during_a_read_are_applied_to_it_once() {
        let log = QueueLog::default();
        let mut head = QueueHead::default();
        assert_eq!(head.current(&log, 10), None, "nothing read yet");
        let mark = log.last();
        // Job 3 was queued before the read looked, job 1 dispatched after it looked: both
        // recorded after `mark`.
        log.record(QueueChange::Queued(job(3, 0)));
        log.record(QueueChange::Left(1));
        let (jobs, whole) = head.fill(
            vec![job(1, 0), job(2, 0), job(3, 0)],
            10,
            mark,
            &log,
            Instant::now(),
        );
        assert_eq!(ids(&jobs), vec![2, 3]);
        assert!(whole);
        // Nothing new: the head answers without a read.
        let (jobs, whole) = head.current(&log, 10).expect("head");
        assert_eq!(ids(&jobs), vec![2, 3]);
        assert!(whole);
        log.record(QueueChange::Queued(job(4, 5)));
        log.record(QueueChange::Left(2));
        let (jobs, _) = head.current(&log, 10).expect("head");
        assert_eq!(ids(&jobs), vec![4, 3], "priority first");
    }

    #[test]
    fn a_partial_head_holds_only_the_first_jobs() {
        let log = QueueLog::default();
        let mut head = QueueHead::default();
        let (jobs, whole) = head.fill(
            vec![job(1, 5), job(2, 0)],
            2,
            log.last(),
            &log,
            Instant::now(),
        );
        assert_eq!(ids(&jobs), vec![1, 2]);
        assert!(!whole, "a full read may have left jobs behind");
        // Behind the last job held: not known to be among the first.
        log.record(QueueChange::Queued(job(9, 0)));
        // Ahead of it: it is.
        log.record(QueueChange::Queued(job(8, 1)));
        let (jobs, whole) = head.current(&log, 2).expect("head");
        assert_eq!(ids(&jobs), vec![1, 8]);
        assert!(!whole);
        log.record(QueueChange::Left(1));
        log.record(QueueChange::Left(8));
        // One job held, two asked for, more may be queued: read again.
        assert_eq!(head.current(&log, 2), None);
    }

    #[test]
    fn the_head_is_read_again_when_the_log_moved_past_it() {
        let log = QueueLog::default();
        let mut head = QueueHead::default();
        head.fill(vec![job(1, 0)], 10, log.last(), &log, Instant::now());
        for id in 0..(LOG_CAPACITY as i64 + 1) {
            log.record(QueueChange::Left(100 + id));
        }
        assert_eq!(head.current(&log, 10), None);
        // Old and dropped heads are not used either.
        head.fill(
            vec![job(1, 0)],
            10,
            log.last(),
            &log,
            Instant::now() - QUEUE_HEAD_MAX_AGE,
        );
        assert_eq!(head.current(&log, 10), None);
        head.fill(vec![job(1, 0)], 10, log.last(), &log, Instant::now());
        head.invalidate();
        assert_eq!(head.current(&log, 10), None);
    }
}
