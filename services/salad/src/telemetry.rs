//! HELP texts and units of salad's metrics (docs/metrics.md lists them with their labels).
//! Exported as `dutgate_<name>`: the recorder adds the namespace (`dutgate_core::telemetry`).

use metrics::{Unit, describe_counter, describe_gauge};

/// Describes salad's metrics to the process' recorder, installing it first: a description
/// given before the recorder exists goes nowhere.
pub fn describe() {
    let _ = dutgate_core::telemetry::metrics_handle();
    describe_gauge!(
        "salad_port_open",
        "1 while the serial adapter is open, 0 once it closed."
    );
    describe_counter!(
        "salad_port_reopens_total",
        Unit::Count,
        "Serial adapters opened again after they had gone away."
    );
    describe_counter!(
        "salad_port_bytes_in_total",
        Unit::Bytes,
        "Bytes read from a console stream: a serial adapter, or all netconsoles (port=netconsole)."
    );
    describe_counter!(
        "salad_port_bytes_out_total",
        Unit::Bytes,
        "Bytes written to a console stream: a serial adapter, or all netconsoles (port=netconsole)."
    );
    describe_counter!(
        "salad_machine_bytes_from_dut_total",
        Unit::Bytes,
        "Console output bytes of the machine relayed to its clients and log."
    );
    describe_counter!(
        "salad_machine_bytes_to_dut_total",
        Unit::Bytes,
        "Client input bytes sent to the machine's console."
    );
    describe_counter!(
        "salad_machine_input_dropped_bytes_total",
        Unit::Bytes,
        "Client input bytes dropped because no console was bound to the machine."
    );
    describe_counter!(
        "salad_machine_client_drops_total",
        Unit::Count,
        "Console clients disconnected because they could not keep up with the machine's output."
    );
    describe_gauge!(
        "salad_machine_clients",
        Unit::Count,
        "Console clients connected to the machine: port=main read-write, logs read-only."
    );
    describe_counter!(
        "salad_console_clients_refused_total",
        Unit::Count,
        "Console clients refused: on a DUT network, or not on salad.console_client_networks."
    );
    describe_counter!(
        "salad_console_log_dropped_bytes_total",
        Unit::Bytes,
        "Console bytes left out of the machine's console log because its writer fell behind."
    );
    describe_counter!(
        "salad_netconsole_connections_total",
        Unit::Count,
        "Netconsole connections accepted."
    );
    describe_counter!(
        "salad_netconsole_refused_total",
        Unit::Count,
        "Netconsole connections refused: not from a DUT network, or salad.max_netconsoles open."
    );
    describe_counter!(
        "salad_bindings_refused_total",
        Unit::Count,
        "Times a console stream was refused as a machine's console, by stream kind."
    );
}
