//! `cargo xtask bench jobspec`: render + parse of a typical job (the criterion bench of
//! `services/jobspec/benches/parse.rs`), next to the same job through valve-infra's Python
//! stack (Jinja2 render + PyYAML `safe_load`; valve-infra then also runs a marshmallow schema,
//! so the peer figure is a lower bound of its cost).

use std::process::Command;

use anyhow::{Context, bail};

use super::BenchArgs;
use super::report::append_table;

const JOB: &str = "services/jobspec/benches/typical-job.yml";

/// The peer: times render + load of the job file the same way valve-infra does it (the
/// variables mirror `TemplateVars::placeholders()`). Prints the median in nanoseconds, and
/// the YAML loader used.
const PEER: &str = r#"
import sys, time, statistics
import jinja2, yaml
text = open(sys.argv[1]).read()
rounds = int(sys.argv[2])
vars = dict(machine_id="52:54:00:00:00:01", machine_tags=[], local_tty_device="ttyUSB0",
            ready_for_service=True, minio_url="http://gateway:9000", s3_url="http://gateway:9000",
            job_bucket="job-525400000001-1", job_bucket_access_key="job-525400000001-1-dut",
            job_bucket_secret_key="placeholder-secret", registry="gateway:8002", gateway="gateway")
env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
def once():
    rendered = env.from_string(text).render(**vars)
    return yaml.safe_load(rendered)
assert once()["deployment"]["start"]["kernel"]["url"] == "http://gateway:9000/boot/default_kernel"
samples = []
for _ in range(rounds):
    t = time.perf_counter_ns()
    once()
    samples.append(time.perf_counter_ns() - t)
print(int(statistics.median(samples)))
"#;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    // Other builds on a shared machine skew micro-benchmarks: say how busy it was.
    let load = super::report::load_average();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut bench = Command::new(cargo);
    bench.current_dir(&args.root);
    if args.quick {
        // The smoke run: the same criterion program, built like the test suite's (debug,
        // workspace features, nothing new to compile after `cargo test --workspace`), told to
        // measure briefly.
        bench
            .args(["test", "--workspace", "--bench", "parse", "--", "--bench"])
            .args(["--warm-up-time", "0.1", "--measurement-time", "0.3"])
            .args(["--sample-size", "10"]);
    } else {
        bench.args(["bench", "-p", "dutgate-jobspec", "--bench", "parse", "--"]);
    }
    bench.args(["--output-format", "bencher"]);
    let out = bench.output().context("running the criterion benchmark")?;
    if !out.status.success() {
        bail!(
            "the criterion benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ours = |name: &str| -> anyhow::Result<f64> {
        bencher_ns(&stdout, name).with_context(|| format!("no `{name}` line in:\n{stdout}"))
    };
    let render_parse = ours("job/parse_and_render_typical")?;
    let parse_only = ours("job/parse_normalised_no_template")?;
    let console = ours("console/feed_2000_lines_in_4k_chunks")?;

    let rounds = if args.quick { "50" } else { "2000" };
    let peer = Command::new("python3")
        .current_dir(&args.root)
        .args(["-c", PEER, JOB, rounds])
        .output();
    let peer_ns = match peer {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse::<f64>()
            .context("the Python peer printed no number")?,
        Ok(o) => bail!(
            "the Python peer (Jinja2 + PyYAML) failed: {} (apt-get install python3-jinja2 python3-yaml)",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next_back()
                .unwrap_or("")
        ),
        Err(e) => bail!("cannot run python3 for the peer: {e} (apt-get install python3)"),
    };
    let us = |ns: f64| format!("{:.1} µs", ns / 1000.0);
    let console_bytes = console_log_bytes();
    let rows = vec![
        vec![
            "render + parse + validate the typical job".into(),
            us(render_parse),
            format!("{} (render + safe_load only)", us(peer_ns)),
        ],
        vec![
            "parse + validate the normalised job (no template)".into(),
            us(parse_only),
            "–".into(),
        ],
        vec![
            "console pattern engine, 2000 lines".into(),
            format!(
                "{} ({:.0} MB/s)",
                us(console),
                console_bytes as f64 / (console / 1e9) / 1e6
            ),
            "–".into(),
        ],
    ];
    println!("{rows:#?}");
    if args.write && !args.quick {
        append_table(
            &args.root,
            "Job description: render, parse, validate",
            "cargo xtask bench jobspec",
            &[
                "step",
                "dutgate (criterion median)",
                "valve-infra stack (Python)",
            ],
            &rows,
            &format!(
                "Job: `{JOB}` (valve-infra's documented test job). Goal: < 1 ms for render + parse. \
                 The Python column renders with Jinja2 and loads with PyYAML's `safe_load`, median of \
                 {rounds} rounds; valve-infra additionally validates with marshmallow. Load \
                 average when the run started: {load}."
            ),
        )?;
    }
    Ok(())
}

/// Bytes of the console log the criterion bench feeds (same formula as the bench).
fn console_log_bytes() -> usize {
    (0..2000)
        .map(|i| {
            format!("[{i:>5}.000000] Test dEQP-VK.api.smoke.triangle {i}: Pass: {i}\r\n").len()
        })
        .sum()
}

/// `test <name> ... bench:   123,456 ns/iter (+/- 7)` → 123456.
fn bencher_ns(output: &str, name: &str) -> Option<f64> {
    output.lines().find_map(|l| {
        let rest = l.strip_prefix("test ")?.strip_prefix(name)?;
        let after = rest.split("bench:").nth(1)?;
        let num: String = after
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
            .filter(|c| *c != ',')
            .collect();
        num.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bencher_lines() {
        let out = "test job/parse_and_render_typical ... bench:       95,123 ns/iter (+/- 1,200)\n";
        assert_eq!(
            bencher_ns(out, "job/parse_and_render_typical"),
            Some(95123.0)
        );
        assert_eq!(bencher_ns(out, "job/other"), None);
    }
}
