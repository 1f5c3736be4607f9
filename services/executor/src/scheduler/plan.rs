//! The pure planner of a scheduler round: which queued job goes to which free machine
//! (priority, then FIFO; tags and purpose), and whether a target can ever match. No I/O.

use std::collections::HashSet;

use dutgate_core::{MachineId, Tag};
use dutgate_mars::model::{Machine, MachineState};

use crate::model::Purpose;
use crate::store::QueuedJob;

/// Why a target can never match.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown machine {0}")]
    UnknownMachine(MachineId),
    #[error("machine {id} does not have the tags {missing:?}")]
    MissingTags { id: MachineId, missing: Vec<String> },
    #[error("no machine has all the tags {0:?}")]
    NoMachineWithTags(Vec<String>),
    #[error("mars cannot be reached: {0}")]
    Mars(String),
}

fn fits(m: &Machine, purpose: Purpose) -> bool {
    match purpose {
        Purpose::Job => m.state == MachineState::Idle && m.lease.is_none(),
        Purpose::Training => {
            matches!(m.state, MachineState::Training | MachineState::QuickCheck)
                && m.lease.is_none()
        }
    }
}

fn has_tags(m: &Machine, tags: &[String]) -> bool {
    tags.iter()
        .all(|t| m.all_tags().any(|mt: &Tag| mt.as_str() == t))
}

pub(super) fn matches(m: &Machine, job: &QueuedJob) -> bool {
    fits(m, job.purpose)
        && job.target_id.is_none_or(|id| id == m.id)
        && has_tags(m, &job.target_tags)
}

/// Plans a round in priority order: each job takes the first free machine it fits. The plan
/// alone decides who gets which machine; mars then grants (or refuses) the leases. Pure: no
/// I/O, so that the rules of who goes first are tested on their own.
pub(super) fn plan_round(queued: &[QueuedJob], free: &[Machine]) -> Vec<(QueuedJob, MachineId)> {
    let mut taken: HashSet<MachineId> = HashSet::new();
    // Targets that found no free machine: later jobs with the same target cannot either (the
    // free set only shrinks), so they are skipped without a scan.
    let mut hopeless: HashSet<(Purpose, Option<MachineId>, &[String])> = HashSet::new();
    let mut plan = Vec::new();
    for job in queued {
        if taken.len() == free.len() {
            break;
        }
        let key = (job.purpose, job.target_id, job.target_tags.as_slice());
        if hopeless.contains(&key) {
            continue;
        }
        match free
            .iter()
            .find(|m| !taken.contains(&m.id) && matches(m, job))
        {
            Some(m) => {
                taken.insert(m.id);
                plan.push((job.clone(), m.id));
            }
            None => {
                hopeless.insert(key);
            }
        }
    }
    plan
}

/// Why a target can never match, judged on `machines`.
pub(super) fn target_verdict(
    machines: &[Machine],
    id: Option<MachineId>,
    tags: &[String],
) -> Result<(), TargetError> {
    match id {
        Some(id) => {
            let m = machines
                .iter()
                .find(|m| m.id == id)
                .ok_or(TargetError::UnknownMachine(id))?;
            let missing: Vec<String> = tags
                .iter()
                .filter(|t| !has_tags(m, std::slice::from_ref(t)))
                .cloned()
                .collect();
            if !missing.is_empty() {
                return Err(TargetError::MissingTags { id, missing });
            }
            Ok(())
        }
        None => {
            if machines
                .iter()
                .any(|m| m.state != MachineState::Retired && has_tags(m, tags))
            {
                Ok(())
            } else {
                Err(TargetError::NoMachineWithTags(tags.to_vec()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dutgate_mars::model::Timestamp;

    fn machine(n: u8, state: MachineState, tags: &[&str]) -> Machine {
        let id = MachineId::from_bytes([2, 0, 0, 0, 0, n]);
        Machine {
            id,
            mac_address: id,
            base_name: "m".into(),
            full_name: format!("farm-m-{n}"),
            tags: tags.iter().map(|t| t.parse().unwrap()).collect(),
            manual_tags: vec![],
            ip_address: None,
            local_tty_device: None,
            pdu: None,
            pdu_port_id: None,
            pdu_off_delay: 0.0,
            state,
            comment: None,
            first_seen: Timestamp(0),
            last_seen: Timestamp(0),
            consecutive_infra_failures: 0,
            lease: None,
            training: Default::default(),
            ready_for_service: true,
            is_retired: false,
        }
    }

    fn job(id: i64, tags: &[&str]) -> QueuedJob {
        QueuedJob {
            id,
            priority: 0,
            purpose: Purpose::Job,
            target_id: None,
            target_tags: tags.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn plan_follows_queue_order_and_tags() {
        let free = vec![
            machine(1, MachineState::Idle, &["gpu:vendor:a"]),
            machine(2, MachineState::Idle, &["gpu:vendor:b"]),
            machine(3, MachineState::Training, &["gpu:vendor:a"]),
        ];
        // Queue order is the store's (priority, FIFO); the plan keeps it.
        let queued = vec![
            job(10, &["gpu:vendor:a"]),
            job(11, &["gpu:vendor:a"]),
            job(12, &["gpu:vendor:b"]),
            job(13, &[]),
        ];
        let plan: Vec<(i64, u8)> = plan_round(&queued, &free)
            .into_iter()
            .map(|(j, m)| (j.id, m.bytes()[5]))
            .collect();
        // 11 finds no free "a" machine (3 is training, not for users' jobs); 13 finds none
        // left.
        assert_eq!(plan, vec![(10, 1), (12, 2)]);
    }

    #[test]
    fn training_jobs_take_training_machines_by_id() {
        let free = vec![
            machine(1, MachineState::Idle, &[]),
            machine(3, MachineState::QuickCheck, &[]),
        ];
        let mut t = job(20, &[]);
        t.purpose = Purpose::Training;
        t.target_id = Some(MachineId::from_bytes([2, 0, 0, 0, 0, 3]));
        let mut wrong = t.clone();
        wrong.id = 21;
        wrong.target_id = Some(MachineId::from_bytes([2, 0, 0, 0, 0, 1]));
        let plan: Vec<i64> = plan_round(&[wrong, t], &free)
            .into_iter()
            .map(|(j, _)| j.id)
            .collect();
        assert_eq!(plan, vec![20], "an IDLE machine is not a training machine");
    }
}
