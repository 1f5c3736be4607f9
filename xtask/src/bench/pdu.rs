//! `cargo xtask bench pdu`: SNMP PDU state reads (one walk vs per-port GETs) and switching
//! work (dutgate's REST API with read-back vs pdudaemon driving the same agent), in one run
//! against one net-snmp agent playing a 24-outlet APC rack PDU.
//!
//! The measuring program is `services/pdu/examples/pdu_bench.rs` (it reuses the SNMP test
//! agent and runs the pdu service in-process); this module builds it in release mode, runs
//! it and writes its rows to docs/benchmarks.md. Peers: Debian packages snmpd, snmp,
//! pdudaemon.

use super::BenchArgs;
use super::report::append_table;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let rows = super::run_example_rows(args, "dutgate-pdu", "pdu_bench")?;
    if args.write && !args.quick {
        append_table(
            &args.root,
            "PDU: SNMP state reads and switching (dutgate vs pdudaemon)",
            "cargo xtask bench pdu",
            &["figure", "value"],
            &rows,
            "One net-snmp 5.9 `snmpd` with a pass_persist APC rPDU (24 outlets) on 127.0.0.1; \
             reads: 200 alternating iterations through dutgate's SNMP driver on one v2c session; \
             switching: 3 alternating rounds of 48 commands. dutgate answers each PATCH with the \
             state read back from the agent; pdudaemon (Debian 0.0.8, `localcmdline` + `snmpset`, \
             because its SNMP driver only talks to UDP 161) only writes and cannot read back. \
             Every command was checked to have reached the agent.",
        )?;
    }
    Ok(())
}
