//! HELP texts and units of mars' metrics (docs/metrics.md lists them with their labels).
//! Exported as `dutgate_<name>`: the recorder adds the namespace (`dutgate_core::telemetry`).

use metrics::{Unit, describe_counter, describe_gauge};

/// Describes mars' metrics to the process' recorder, installing it first: a description
/// given before the recorder exists goes nowhere.
pub fn describe() {
    let _ = dutgate_core::telemetry::metrics_handle();
    describe_counter!(
        "mars_registrations_total",
        Unit::Count,
        "Machine registrations accepted: kind=new for a machine mars did not know, update for one it knew."
    );
    describe_counter!(
        "mars_registrations_refused_total",
        Unit::Count,
        "Machine registrations refused (answered 403 or 429)."
    );
    describe_counter!(
        "mars_discoveries_total",
        Unit::Count,
        "Port discoveries by what happened: started, bound to a registering machine, stopped by an admin, expired."
    );
    describe_counter!(
        "mars_leases_acquired_total",
        Unit::Count,
        "Machine leases granted, by purpose (job or training)."
    );
    describe_counter!(
        "mars_leases_released_total",
        Unit::Count,
        "Machine leases given back by their holder, by the outcome it reported."
    );
    describe_counter!(
        "mars_leases_expired_total",
        Unit::Count,
        "Machine leases that expired without a heartbeat from their holder; the machine was powered off."
    );
    describe_gauge!(
        "mars_machines",
        Unit::Count,
        "Machines in each state, counted about every 15 s."
    );
    describe_gauge!(
        "mars_lease_utilisation",
        "Share (0 to 1) of the machines in service (IDLE or RUNNING) that a job lease holds (RUNNING), computed about every 15 s."
    );
    describe_counter!(
        "mars_training_runs_total",
        Unit::Count,
        "Training and quick-check runs that ended, by kind and outcome."
    );
    describe_counter!(
        "mars_transitions_total",
        Unit::Count,
        "Machine state changes, by the state entered."
    );
}
