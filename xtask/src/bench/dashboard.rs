//! `cargo xtask bench dashboard`: the dashboard's farm page of 200 simulated machines (dummy
//! PDU, no QEMU) loaded 5 times in Debian's chromium (median must be under 1 s), and a
//! machine retired through mars' API must show in the open page within 1 s.
//!
//! The measuring program is the executor's example `dashboard_bench`
//! (`services/executor/ui/bench_main.rs`, `testing` feature) driving
//! `services/executor/ui/browser/bench.mjs`; it fails when either limit is missed. `--quick`:
//! 20 machines, 2 loads, limits not enforced, nothing written.

use super::BenchArgs;
use super::report::append_table;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let rows = super::run_example_rows(args, "dutgate-executor", "dashboard_bench")?;
    if args.write && !args.quick {
        append_table(
            &args.root,
            "Dashboard: farm page of 200 simulated machines in chromium",
            "cargo xtask bench dashboard",
            &["figure", "value"],
            &rows,
            "The page is rendered by the executor from mars' machine list and the pdu service's \
             ports on every load; `dashboard.js` refreshes its live fragment every 500 ms. \
             Limits (the benchmark fails beyond them): median load < 1 s, a state change \
             visible < 1 s.",
        )?;
    }
    Ok(())
}
