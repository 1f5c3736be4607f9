//! `cargo xtask bench mars`: the lease path the executor's scheduler depends on (acquire and
//! release latency, cycles/s with 8 clients, contended acquire, release → "machine freed"
//! long-poll delay), over HTTP against an in-process mars, on SQLite and PostgreSQL.
//!
//! The measuring program is `services/mars/examples/mars_bench.rs`; this module builds it in
//! release mode, runs it and writes its rows to docs/benchmarks.md. valve-infra had no leases
//! (machine state lived in one process's memory), so there is no peer to run side by side;
//! the reference is the executor's goal of a dispatch p99 under 10 ms.

use super::BenchArgs;
use super::report::append_table;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let rows = super::run_example_rows(args, "dutgate-mars", "mars_bench")?;
    if args.write && !args.quick {
        append_table(
            &args.root,
            "mars: machine leases over HTTP (SQLite and PostgreSQL)",
            "cargo xtask bench mars",
            &["figure", "value"],
            &rows,
            "In-process mars (release build) on 127.0.0.1 with 64 IDLE machines, typed client \
             (reqwest) in the same process, 2 tokio workers. Latencies are per HTTP call; a \
             cycle is acquire + release. Contended: 8 clients race for one machine per round \
             (exactly one won every round). Freed event: from the release call to the \
             long-polling client receiving the event. PostgreSQL 15 on 127.0.0.1.",
        )?;
    }
    Ok(())
}
