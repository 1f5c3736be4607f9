//! Parse + render of a typical job (goal: well under 1 ms), and pattern-engine throughput.
//! `cargo bench -p dutgate-jobspec`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use dutgate_jobspec::{JobSpec, PatternEngine, TemplateVars};

/// A typical CI job: valve-infra's documented test job (templated cmdline, every pattern, a
/// watchdog, a `continue` deployment).
const TYPICAL: &str = r#"version: 1
target:
  tags: ["amdgpu:codename:RENOIR"]
timeouts:
  first_console_activity: {minutes: 2, retries: 3}
  console_activity:       {minutes: 10, retries: 1}
  boot_cycle:             {hours: 1, retries: 2}
  overall:                {hours: 2}
  watchdogs:
    deqp: {minutes: 5, retries: 1}
console_patterns:
  session_end:    {regex: "^.*It's now safe to turn off your computer\r$"}
  session_reboot: {regex: "GPU hang detected!"}
  job_success:    {regex: "^.*Execution is over, pipeline status: 0\r$"}
  job_warn:       {regex: "^The configured console is not connected to SALAD$"}
  machine_unfit_for_service: {regex: "MCE: Hardware Error"}
  watchdogs:
    deqp: {start: {regex: "deqp-runner starting"}, reset: {regex: "Pass: \\d+"}, stop: {regex: "deqp-runner done"}}
deployment:
  start:
    kernel:
      url: "{{ minio_url }}/boot/default_kernel"
      cmdline:
        - SALAD.machine_id={{ machine_id }} console={{ local_tty_device }},115200 earlyprintk=vga,keep loglevel=6
        - b2c.ntp_peer=ci-gateway b2c.pipefail b2c.cache_device=auto b2c.poweroff_delay=15
        - b2c.minio="job,{{ minio_url }},{{ job_bucket_access_key }},{{ job_bucket_secret_key }}"
        - b2c.volume="job,mirror=job/{{ job_bucket }},pull_on=pipeline_start,push_on=changes,overwrite,preserve,remove"
        - b2c.container="-ti --tls-verify=false -v job:/results docker://{{ registry }}/mesa/mesa/test:1234 ./run.sh"
    initramfs:
      url: "{{ minio_url }}/boot/default_boot2container.cpio.xz"
  continue:
    kernel:
      cmdline:
        - SALAD.machine_id={{ machine_id }} console={{ local_tty_device }},115200 loglevel=6
        - b2c.container="-ti docker://{{ registry }}/mesa/mesa/test:1234 ./run.sh --resume"
"#;

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
