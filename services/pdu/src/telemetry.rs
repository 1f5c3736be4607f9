//! HELP texts and units of the pdu service's metrics (docs/metrics.md lists them with their
//! labels). Exported as `dutgate_<name>`: the recorder adds the namespace
//! (`dutgate_core::telemetry`).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

/// Describes the pdu service's metrics to the process' recorder, installing it first: a
/// description given before the recorder exists goes nowhere.
pub fn describe() {
    let _ = dutgate_core::telemetry::metrics_handle();
    describe_gauge!(
        "pdu_reachable",
        "1 when the last poll of the PDU answered, 0 when it failed."
    );
    describe_gauge!(
        "pdu_port_state",
        "Last known state of the PDU port: 1 on, 0 off, -1 unknown (the PDU did not answer)."
    );
    // Watts have no `metrics::Unit`; the name says it.
    describe_gauge!(
        "pdu_port_power_watts",
        "Power drawn at the PDU port in watts, for PDUs that measure it."
    );
    describe_counter!(
        "pdu_operations_total",
        Unit::Count,
        "Exchanges with a PDU's device, each retry counted, by operation."
    );
    describe_histogram!(
        "pdu_operation_duration_seconds",
        Unit::Seconds,
        "Time of one exchange with a PDU's device, by operation."
    );
    describe_counter!(
        "pdu_operation_failures_total",
        Unit::Count,
        "Failed exchanges with a PDU's device, by operation and kind of failure."
    );
    describe_counter!(
        "pdu_cycles_total",
        Unit::Count,
        "Power cycles of a PDU port, by result."
    );
    describe_histogram!(
        "pdu_switch_duration_seconds",
        Unit::Seconds,
        "Time of a whole switch of a PDU port as a client sees it, from the request to the state read back (a cycle includes its off delay), by PDU, action (on, off, cycle) and result (ok, error)."
    );
}
