//! The machine state machine: one enum of states ([`MachineState`]), one enum of triggers
//! ([`Trigger`]) and one pure function deciding every transition. The store persists each
//! applied transition with time, actor and reason; nothing else changes a machine's state.

use crate::model::{MachineState, ReleaseOutcome};

/// Something that happens to a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// A PDU port became known (discovery or admin): training can start.
    Configure,
    /// The PDU port was removed: mars can no longer power the machine.
    Unconfigure,
    /// Training reached the qualifying number of passing boots.
    TrainingPassed,
    /// Training did not qualify: it will be retried after a back-off.
    TrainingFailed,
    /// A verification boot is due (mars start-up).
    QuickCheck,
    QuickCheckPassed,
    QuickCheckFailed,
    /// A re-registration reported different hardware.
    HardwareChanged,
    /// A user job leased the machine.
    LeaseAcquired,
    /// The job gave the machine back.
    LeaseReleased(ReleaseOutcome),
    /// The job stopped heartbeating: its process is gone.
    LeaseExpired,
    /// Too many failures in a row.
    Quarantine,
    /// A quarantined machine is tried again (scheduled retry or admin).
    Retrain,
    Retire,
    /// Admin puts a machine back in service; the target depends on its record.
    Activate {
        configured: bool,
        trained: bool,
    },
}

impl Trigger {
    /// The event `kind` persisted with the transition.
    pub fn kind(self) -> &'static str {
        match self {
            Trigger::Configure => "configured",
            Trigger::Unconfigure => "unconfigured",
            Trigger::TrainingPassed => "training_passed",
            Trigger::TrainingFailed => "training_failed",
            Trigger::QuickCheck => "quick_check",
            Trigger::QuickCheckPassed => "quick_check_passed",
            Trigger::QuickCheckFailed => "quick_check_failed",
            Trigger::HardwareChanged => "hardware_changed",
            Trigger::LeaseAcquired => "lease_acquired",
            Trigger::LeaseReleased(_) => "lease_released",
            Trigger::LeaseExpired => "lease_expired",
            Trigger::Quarantine => "quarantined",
            Trigger::Retrain => "retrain",
            Trigger::Retire => "retired",
            Trigger::Activate { .. } => "activated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{trigger} is not allowed in state {from}")]
pub struct InvalidTransition {
    pub from: MachineState,
    pub trigger: &'static str,
}

/// The one place that decides where a machine goes.
pub fn transition(from: MachineState, trigger: Trigger) -> Result<MachineState, InvalidTransition> {
    use MachineState::*;
    let to = match (from, trigger) {
        (WaitForConfig, Trigger::Configure) => Training,

        (Training | QuickCheck | Idle | Quarantined, Trigger::Unconfigure) => WaitForConfig,

        (Training, Trigger::TrainingPassed) => Idle,
        (Training, Trigger::TrainingFailed) => Training,

        (Idle, Trigger::QuickCheck) => QuickCheck,
        (QuickCheck, Trigger::QuickCheckPassed) => Idle,
        (QuickCheck, Trigger::QuickCheckFailed) => Training,

        (Idle | QuickCheck, Trigger::HardwareChanged) => Training,

        (Idle, Trigger::LeaseAcquired) => Running,
        (Running, Trigger::LeaseReleased(ReleaseOutcome::Ok))
        | (Running, Trigger::LeaseReleased(ReleaseOutcome::InfrastructureFailure)) => Idle,
        (Running, Trigger::LeaseReleased(ReleaseOutcome::MachineUnfit)) => Training,
        // The job process died: nobody knows what it left behind, so verify before reuse.
        (Running, Trigger::LeaseExpired) => QuickCheck,
        // A job that was let finish on a retired machine ends without un-retiring it.
        (Retired, Trigger::LeaseReleased(_) | Trigger::LeaseExpired) => Retired,

        (Training | QuickCheck | Idle | Running, Trigger::Quarantine) => Quarantined,
        (Quarantined, Trigger::Retrain) => Training,

        (WaitForConfig | Training | QuickCheck | Idle | Running | Quarantined, Trigger::Retire) => {
            Retired
        }

        (
            Retired | Quarantined,
            Trigger::Activate {
                configured,
                trained,
            },
        ) => {
            if !configured {
                WaitForConfig
            } else if trained && from == Retired {
                QuickCheck
            } else {
                Training
            }
        }

        _ => {
            return Err(InvalidTransition {
                from,
                trigger: trigger.kind(),
            });
        }
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineState::*;

    fn all_triggers() -> Vec<Trigger> {
        let mut v = vec![
            Trigger::Configure,
            Trigger::Unconfigure,
            Trigger::TrainingPassed,
            Trigger::TrainingFailed,
            Trigger::QuickCheck,
            Trigger::QuickCheckPassed,
            Trigger::QuickCheckFailed,
            Trigger::HardwareChanged,
            Trigger::LeaseAcquired,
            Trigger::LeaseReleased(ReleaseOutcome::Ok),
            Trigger::LeaseReleased(ReleaseOutcome::InfrastructureFailure),
            Trigger::LeaseReleased(ReleaseOutcome::MachineUnfit),
            Trigger::LeaseExpired,
            Trigger::Quarantine,
            Trigger::Retrain,
            Trigger::Retire,
        ];
        for configured in [false, true] {
            for trained in [false, true] {
                v.push(Trigger::Activate {
                    configured,
                    trained,
                });
            }
        }
        v
    }

    /// Every allowed transition, written out. Anything not in this table must be rejected.
    fn allowed() -> Vec<(MachineState, Trigger, MachineState)> {
        use ReleaseOutcome as R;
        let act = |configured, trained| Trigger::Activate {
            configured,
            trained,
        };
        vec![
            (WaitForConfig, Trigger::Configure, Training),
            (Training, Trigger::Unconfigure, WaitForConfig),
            (QuickCheck, Trigger::Unconfigure, WaitForConfig),
            (Idle, Trigger::Unconfigure, WaitForConfig),
            (Quarantined, Trigger::Unconfigure, WaitForConfig),
            (Training, Trigger::TrainingPassed, Idle),
            (Training, Trigger::TrainingFailed, Training),
            (Idle, Trigger::QuickCheck, QuickCheck),
            (QuickCheck, Trigger::QuickCheckPassed, Idle),
            (QuickCheck, Trigger::QuickCheckFailed, Training),
            (Idle, Trigger::HardwareChanged, Training),
            (QuickCheck, Trigger::HardwareChanged, Training),
            (Idle, Trigger::LeaseAcquired, Running),
            (Running, Trigger::LeaseReleased(R::Ok), Idle),
            (
                Running,
                Trigger::LeaseReleased(R::InfrastructureFailure),
                Idle,
            ),
            (Running, Trigger::LeaseReleased(R::MachineUnfit), Training),
            (Running, Trigger::LeaseExpired, QuickCheck),
            (Retired, Trigger::LeaseReleased(R::Ok), Retired),
            (
                Retired,
                Trigger::LeaseReleased(R::InfrastructureFailure),
                Retired,
            ),
            (Retired, Trigger::LeaseReleased(R::MachineUnfit), Retired),
            (Retired, Trigger::LeaseExpired, Retired),
            (Training, Trigger::Quarantine, Quarantined),
            (QuickCheck, Trigger::Quarantine, Quarantined),
            (Idle, Trigger::Quarantine, Quarantined),
            (Running, Trigger::Quarantine, Quarantined),
            (Quarantined, Trigger::Retrain, Training),
            (WaitForConfig, Trigger::Retire, Retired),
            (Training, Trigger::Retire, Retired),
            (QuickCheck, Trigger::Retire, Retired),
            (Idle, Trigger::Retire, Retired),
            (Running, Trigger::Retire, Retired),
            (Quarantined, Trigger::Retire, Retired),
            (Retired, act(false, false), WaitForConfig),
            (Retired, act(false, true), WaitForConfig),
            (Retired, act(true, false), Training),
            (Retired, act(true, true), QuickCheck),
            (Quarantined, act(false, false), WaitForConfig),
            (Quarantined, act(false, true), WaitForConfig),
            (Quarantined, act(true, false), Training),
            (Quarantined, act(true, true), Training),
        ]
    }

    #[test]
    fn every_allowed_transition_works_and_every_other_is_rejected() {
        let table = allowed();
        let mut checked = 0;
        for from in MachineState::ALL {
            for trigger in all_triggers() {
                let expected = table
                    .iter()
                    .find(|(f, t, _)| *f == from && *t == trigger)
                    .map(|(_, _, to)| *to);
                let got = transition(from, trigger);
                match expected {
                    Some(to) => assert_eq!(got, Ok(to), "{from} + {trigger:?}"),
                    None => {
                        let err = got.expect_err(&format!("{from} + {trigger:?} was accepted"));
                        assert_eq!(err.from, from);
                        assert_eq!(err.trigger, trigger.kind());
                    }
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 7 * all_triggers().len());
        // The table has no duplicate rows (a duplicate would hide a typo).
        for (i, a) in table.iter().enumerate() {
            for b in &table[i + 1..] {
                assert!(!(a.0 == b.0 && a.1 == b.1), "duplicate row {a:?}");
            }
        }
    }

    proptest::proptest! {
        /// Random walks through the machine's life: a retired machine only leaves RETIRED by
        /// activation, a machine without a PDU port never trains, and only a lease makes a
        /// machine RUNNING.
        #[test]
        fn random_lives_keep_the_invariants(picks in proptest::collection::vec(0usize..64, 0..200)) {
            let triggers = all_triggers();
            let mut state = WaitForConfig;
            let mut configured = false;
            for p in picks {
                let mut t = triggers[p % triggers.len()];
                // Activation knows whether the machine has a port.
                if let Trigger::Activate { trained, .. } = t {
                    t = Trigger::Activate { configured, trained };
                }
                let Ok(next) = transition(state, t) else { continue };
                match t {
                    Trigger::Configure => configured = true,
                    Trigger::Unconfigure => configured = false,
                    _ => {}
                }
                if state == Retired && next != Retired {
                    let activated = matches!(t, Trigger::Activate { .. });
                    proptest::prop_assert!(activated, "left RETIRED by {:?}", t);
                }
                if next == Running {
                    proptest::prop_assert_eq!((state, t), (Idle, Trigger::LeaseAcquired));
                }
                if matches!(next, Training | QuickCheck | Idle) {
                    proptest::prop_assert!(configured, "{:?} without a PDU port", next);
                }
                state = next;
            }
        }
    }

    #[test]
    fn only_the_lease_path_reaches_running() {
        for from in MachineState::ALL {
            for trigger in all_triggers() {
                if transition(from, trigger) == Ok(Running) {
                    assert_eq!((from, trigger), (Idle, Trigger::LeaseAcquired));
                }
            }
        }
    }
}
