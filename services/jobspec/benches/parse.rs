//! Parse + render of a typical job (goal: well under 1 ms), and pattern-engine throughput.
//! `cargo bench -p dutgate-jobspec`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dutgate_jobspec::{JobSpec, PatternEngine, TemplateVars};

/// A typical CI job: valve-infra's documented test job (templated cmdline, every pattern, a
/// watchdog, a `continue` deployment). `cargo xtask bench jobspec` times the same file with
/// valve-infra's Python stack.
const TYPICAL: &str = include_str!("typical-job.yml");

fn parse(c: &mut Criterion) {
    let vars = TemplateVars::placeholders();
    let job = JobSpec::parse_and_render(TYPICAL, &vars).expect("the typical job is valid");
    let plain = job.to_yaml().expect("a job serialises");
    let mut g = c.benchmark_group("job");
    g.bench_function("parse_and_render_typical", |b| {
        b.iter(|| JobSpec::parse_and_render(black_box(TYPICAL), &vars))
    });
    g.bench_function("parse_normalised_no_template", |b| {
        b.iter(|| JobSpec::parse(black_box(&plain)))
    });
    g.finish();
}

fn console(c: &mut Criterion) {
    let job = JobSpec::parse_and_render(TYPICAL, &TemplateVars::placeholders())
        .expect("the typical job is valid");
    let mut log = Vec::new();
    for i in 0..2000 {
        log.extend_from_slice(
            format!("[{i:>5}.000000] Test dEQP-VK.api.smoke.triangle {i}: Pass: {i}\r\n")
                .as_bytes(),
        );
    }
    let mut g = c.benchmark_group("console");
    g.throughput(Throughput::Bytes(log.len() as u64));
    g.bench_function("feed_2000_lines_in_4k_chunks", |b| {
        b.iter(|| {
            let mut e = PatternEngine::for_job(&job);
            let mut n = 0;
            for chunk in log.chunks(4096) {
                n += e.feed(black_box(chunk)).len();
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, parse, console);
criterion_main!(benches);
