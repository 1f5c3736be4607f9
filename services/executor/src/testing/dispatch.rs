//! The dispatch protocol one step at a time, for tests that choose the order of events
//! themselves (`tests/interleavings.rs`): a scheduler round when the test says so (not when
//! the scheduler's loop is woken), and the scheduler's copy of mars' machines reloaded when the
//! test says mars' events arrived (not when its event follower gets them).
//!
//! Everything else such a test needs is public already: [`crate::supervisor::Supervisor`]
//! with an [`crate::supervisor::InlineRunner`] (the point where the test takes over a
//! dispatched job), its `reattach_all` (an executor's start-up recovery), `cancel` and
//! `lease_expired` (what the event follower calls).

use crate::scheduler::{Next, Scheduler, TargetError};

/// What a round asks of the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundOutcome {
    /// Nothing to do until something changes.
    Wait,
    /// Plan again at once (a lease was refused, or a job's record lost).
    Again,
}

/// Runs one round of `sched`: deadlines, plan, lease, record, give back, launch.
pub async fn round(sched: &Scheduler) -> Result<RoundOutcome, String> {
    Ok(match sched.round().await? {
        Next::Wait => RoundOutcome::Wait,
        Next::Again => RoundOutcome::Again,
    })
}

/// A tag no machine carries (tags are `a:b:c`, and this one is never registered).
const UNMATCHED_TAG: &str = "dutgate-testing:reload:never";

/// Reloads `sched`'s copy of mars' machines from mars, as its event follower does when it
/// (re)connects to mars' event stream.
///
/// [`Scheduler::check_target`] asks mars for the whole list when its copy has no machine with
/// the wanted tags; a tag no machine carries makes it do exactly that.
pub async fn reload_machines(sched: &Scheduler) -> Result<(), String> {
    match sched.check_target(None, &[UNMATCHED_TAG.to_string()]).await {
        Err(TargetError::Mars(e)) => Err(e),
        _ => Ok(()),
    }
}
