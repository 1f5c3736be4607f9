//! Acceptance: jobs written in the valve-infra v1 style parse, and the normalised result is
//! what valve-infra would have run, field by field.

use std::time::Duration;

use dutgate_core::{JobStatus, MachineId, Tag};
use dutgate_jobspec::{
    BootKind, ConsoleEvent, DEFAULT_INFRA_TEARDOWN, DEFAULT_OVERALL, DEFAULT_SESSION_END,
    JobBucketVars, JobSpec, MachineVars, PatternEngine, TemplateVars, Timeout,
};

fn vars() -> TemplateVars {
    let mut v = TemplateVars {
        machine: Some(MachineVars {
            id: "52:54:00:11:22:33".into(),
            base_name: "renoir".into(),
            full_name: "farm-renoir-1".into(),
            tags: vec!["amdgpu:codename:RENOIR".into()],
            ip_address: Some("10.42.0.17".into()),
            local_tty_device: Some("ttyUSB3".into()),
            ready_for_service: true,
        }),
        s3_url: Some("http://10.42.0.1:9000".into()),
        job_bucket: Some(JobBucketVars {
            name: "job-525400112233-7".into(),
            access_key: "job-525400112233-7-dut".into(),
            secret_key: dutgate_core::Secret::new("s3cr3t"),
        }),
        registry: Some("10.42.0.1:8002".into()),
        gateway: Some("ci-gateway".into()),
        extra: Default::default(),
    };
    v.set("fdo_proxy_registry", "ci-gateway:8002");
    v
}

fn mins(m: u64) -> Duration {
    Duration::from_secs(m * 60)
}

/// valve-infra's `job_templates/register.yml.j2`, as Sergeant Hartman submits it.
const REGISTER: &str = r#"version: 1
target:
  id: {{ machine_id }}
timeouts:
  overall:
    minutes: 5
console_patterns:
  session_end:
    regex: >-
      ^MaRS: Registration .*$
  job_success:
    regex: >-
      ^MaRS: Registration complete$
deployment:
  start:
    kernel:
      url: "{{ minio_url }}/boot/default_kernel"
      cmdline: b2c.container="-ti --tls-verify=false docker://{{ fdo_proxy_registry }}/mupuf/valve-infra/machine_registration:latest register" b2c.ntp_peer="ci-gateway" b2c.cache_device=auto loglevel=6
    initramfs:
      url: "{{ minio_url }}/boot/default_boot2container.cpio.xz"
"#;

#[test]
fn registration_job() {
    let job = JobSpec::parse_and_render(REGISTER, &vars()).unwrap();
    assert_eq!(job.version, 1);
    assert_eq!(job.deadline, None);
    assert_eq!(
        job.target.id,
        Some(MachineId::parse("52:54:00:11:22:33").unwrap())
    );
    assert!(job.target.tags.is_empty());
    assert_eq!(job.timeouts.overall, Timeout::new(mins(5), 0));
    assert_eq!(
        job.timeouts.infra_teardown,
        Timeout::new(DEFAULT_INFRA_TEARDOWN, 0)
    );
    assert_eq!(job.timeouts.boot_cycle, Timeout::INFINITE);
    assert_eq!(job.timeouts.first_console_activity, Timeout::INFINITE);
    let p = &job.console_patterns;
    assert_eq!(p.session_end.as_str(), "^MaRS: Registration .*$");
    assert_eq!(
        p.job_success.as_ref().map(|p| p.as_str()),
        Some("^MaRS: Registration complete$")
    );
    assert!(p.session_reboot.is_none() && p.job_warn.is_none());
    let (kind, start) = job.deployment_for(0);
    assert_eq!(kind, BootKind::Start);
    assert_eq!(
        start.kernel.url,
        "http://10.42.0.1:9000/boot/default_kernel"
    );
    assert_eq!(
        start.kernel.cmdline,
        "b2c.container=\"-ti --tls-verify=false docker://ci-gateway:8002/mupuf/valve-infra/machine_registration:latest register\" b2c.ntp_peer=\"ci-gateway\" b2c.cache_device=auto loglevel=6"
    );
    assert_eq!(
        start.initramfs.as_ref().unwrap().url,
        "http://10.42.0.1:9000/boot/default_boot2container.cpio.xz"
    );
    // No `continue`: every later boot is the start deployment.
    let (kind, cont) = job.deployment_for(3);
    assert_eq!(kind, BootKind::Continue);
    assert_eq!(cont, start);

    let mut engine = PatternEngine::for_job(&job);
    engine.feed(b"MaRS: Registration complete\n");
    assert!(engine.session_ended());
    assert_eq!(engine.status(), JobStatus::Pass);
    let mut engine = PatternEngine::for_job(&job);
    engine.feed(b"MaRS: Registration failed\n");
    assert_eq!(engine.status(), JobStatus::Fail);
}

/// valve-infra's `job_templates/bootloop.yml.j2` (training boot loop), list cmdline.
const BOOTLOOP: &str = r#"version: 1
target:
  id: "{{ machine_id }}"
timeouts:
  first_console_activity:
    minutes: 2
  overall:
    minutes: 3
console_patterns:
  session_end:
    regex: "^.*It's now safe to turn off your computer\r$"
  job_success:
    regex: "^.*Execution is over, pipeline status: 0\r$"
  job_warn:
    regex: "^The configured console is not connected to SALAD$"
deployment:
  start:
    kernel:
      url: "{{ minio_url }}/boot/default_kernel"
      cmdline:
        - b2c.container="-ti --tls-verify=false docker://{{ fdo_proxy_registry }}/mupuf/valve-infra/machine_registration:latest check"
        - b2c.ntp_peer="ci-gateway" b2c.pipefail b2c.cache_device=auto b2c.poweroff_delay=15
        - console={{ local_tty_device }},115200 earlyprintk=vga,keep SALAD.machine_id={{ machine_id }}
        - loglevel=6
    initramfs:
      url: "{{ minio_url }}/boot/default_boot2container.cpio.xz"
"#;

#[test]
fn boot_loop_job() {
    let job = JobSpec::parse_and_render(BOOTLOOP, &vars()).unwrap();
    assert_eq!(
        job.timeouts.first_console_activity,
        Timeout::new(mins(2), 0)
    );
    assert_eq!(job.timeouts.overall, Timeout::new(mins(3), 0));
    assert_eq!(job.timeouts.console_activity, Timeout::INFINITE);
    assert_eq!(
        job.deployment.start.kernel.cmdline,
        "b2c.container=\"-ti --tls-verify=false docker://ci-gateway:8002/mupuf/valve-infra/machine_registration:latest check\" \
         b2c.ntp_peer=\"ci-gateway\" b2c.pipefail b2c.cache_device=auto b2c.poweroff_delay=15 \
         console=ttyUSB3,115200 earlyprintk=vga,keep SALAD.machine_id=52:54:00:11:22:33 loglevel=6"
    );

    // The check container could not ping SALAD: a WARN, which training does not count as PASS.
    let mut engine = PatternEngine::for_job(&job);
    let events = engine.feed(
        b"The configured console is not connected to SALAD\r\n\
          + Execution is over, pipeline status: 0\r\n\
          [  30.1] It's now safe to turn off your computer\r\n",
    );
    assert_eq!(
        events,
        vec![
            ConsoleEvent::FirstActivity,
            ConsoleEvent::JobWarn,
            ConsoleEvent::JobSuccess,
            ConsoleEvent::SessionEnd
        ]
    );
    assert_eq!(engine.status(), JobStatus::Warn);
}

/// The realistic test job of valve-infra's documentation: tags, watchdogs, every pattern, a
/// `continue` that overrides only the cmdline.
const TEST_JOB: &str = r#"version: 1
deadline: 2026-11-23 08:00:00
target:
  tags: ["amdgpu:codename:RENOIR"]
timeouts:
  first_console_activity: {minutes: 2, retries: 3}   # no output after power-on → reboot, 3 times max
  console_activity:       {minutes: 10, retries: 1}  # hung → reboot with the "continue" deployment
  boot_cycle:             {hours: 1, retries: 2}     # also budget for session_reboot requests
  overall:                {hours: 2}                 # retries must be 0
  infra_setup:            {minutes: 1.5, seconds: 30, milliseconds: 250}
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
        - b2c.minio="job,{{ minio_url }},{{ job_bucket_access_key }},{{ job_bucket_secret_key }}"
        - b2c.volume="job,mirror=job/{{ job_bucket }},pull_on=pipeline_start,push_on=changes,overwrite,preserve,remove"
        - b2c.container="-ti --tls-verify=false -v job:/results docker://{{ registry }}/mesa/mesa/test:1234 ./run.sh"
    initramfs:
      url: "{{ minio_url }}/boot/default_boot2container.cpio.xz"
  continue:
    kernel:
      cmdline: b2c.container="-ti docker://{{ registry }}/mesa/mesa/test:1234 ./run.sh --resume" console={{ local_tty_device }},115200
"#;

#[test]
fn test_job_with_watchdogs_and_continue() {
    let job = JobSpec::parse_and_render(TEST_JOB, &vars()).unwrap();
    assert_eq!(
        job.deadline.map(|d| d.unix_timestamp()),
        Some(1_795_420_800) // 2026-11-23T08:00:00Z
    );
    assert_eq!(job.target.id, None);
    assert_eq!(
        job.target.tags,
        vec![Tag::parse("amdgpu:codename:RENOIR").unwrap()]
    );
    let t = &job.timeouts;
    assert_eq!(t.first_console_activity, Timeout::new(mins(2), 3));
    assert_eq!(t.console_activity, Timeout::new(mins(10), 1));
    assert_eq!(t.boot_cycle, Timeout::new(mins(60), 2));
    assert_eq!(t.overall, Timeout::new(mins(120), 0));
    assert_eq!(
        t.infra_setup,
        Timeout::new(Duration::from_millis(120_250), 0)
    );
    assert_eq!(t.infra_teardown, Timeout::new(DEFAULT_INFRA_TEARDOWN, 0));
    assert_eq!(t.watchdogs.len(), 1);
    assert_eq!(t.watchdogs["deqp"], Timeout::new(mins(5), 1));

    let p = &job.console_patterns;
    assert_eq!(
        p.session_reboot.as_ref().unwrap().as_str(),
        "GPU hang detected!"
    );
    assert_eq!(
        p.machine_unfit_for_service.as_ref().unwrap().as_str(),
        "MCE: Hardware Error"
    );
    let wd = &p.watchdogs["deqp"];
    assert_eq!(wd.start.as_str(), "deqp-runner starting");
    assert_eq!(wd.reset.as_str(), r"Pass: \d+");
    assert_eq!(wd.stop.as_str(), "deqp-runner done");

    let start = &job.deployment.start;
    assert_eq!(
        start.kernel.url,
        "http://10.42.0.1:9000/boot/default_kernel"
    );
    assert_eq!(
        start.kernel.cmdline,
        "SALAD.machine_id=52:54:00:11:22:33 console=ttyUSB3,115200 earlyprintk=vga,keep loglevel=6 \
         b2c.minio=\"job,http://10.42.0.1:9000,job-525400112233-7-dut,s3cr3t\" \
         b2c.volume=\"job,mirror=job/job-525400112233-7,pull_on=pipeline_start,push_on=changes,overwrite,preserve,remove\" \
         b2c.container=\"-ti --tls-verify=false -v job:/results docker://10.42.0.1:8002/mesa/mesa/test:1234 ./run.sh\""
    );
    // `continue` overrides only the cmdline: kernel url and initramfs come from `start`.
    let (_, cont) = job.deployment_for(1);
    assert_eq!(cont.kernel.url, start.kernel.url);
    assert_eq!(cont.initramfs, start.initramfs);
    assert_eq!(
        cont.kernel.cmdline,
        "b2c.container=\"-ti docker://10.42.0.1:8002/mesa/mesa/test:1234 ./run.sh --resume\" console=ttyUSB3,115200"
    );

    // A boot that hangs the GPU, then a second boot that passes under the watchdog.
    let mut e = PatternEngine::for_job(&job);
    e.feed(b"GPU hang detected!\r\n");
    assert!(e.reboot_requested() && !e.session_ended());
    e.new_boot();
    let ev = e.feed(b"deqp-runner starting\r\nPass: 10\r\ndeqp-runner done\r\n");
    assert_eq!(ev.len(), 4, "{ev:?}");
    e.feed(
        b"+ Execution is over, pipeline status: 0\r\nIt's now safe to turn off your computer\r\n",
    );
    assert_eq!(e.status(), JobStatus::Pass);
}

#[test]
fn minimal_job_gets_every_default() {
    let job = JobSpec::parse_and_render(
        "deployment:\n  start:\n    kernel:\n      url: http://gw/k\n",
        &TemplateVars::default(),
    )
    .unwrap();
    assert_eq!(job.version, 1);
    assert_eq!(job.target.id, None);
    assert!(job.target.tags.is_empty());
    assert_eq!(job.timeouts.overall, Timeout::new(DEFAULT_OVERALL, 0));
    assert_eq!(
        job.timeouts.infra_teardown,
        Timeout::new(DEFAULT_INFRA_TEARDOWN, 0)
    );
    for t in [
        job.timeouts.infra_setup,
        job.timeouts.boot_cycle,
        job.timeouts.console_activity,
        job.timeouts.first_console_activity,
    ] {
        assert_eq!(t, Timeout::INFINITE);
    }
    assert_eq!(
        job.console_patterns.session_end.as_str(),
        DEFAULT_SESSION_END
    );
    assert_eq!(job.deployment.start.kernel.cmdline, "");
    assert_eq!(job.deployment.start.initramfs, None);
}

#[test]
fn a_timeout_without_duration_is_infinite_and_merge_keys_work() {
    let job = JobSpec::parse(
        "timeouts:\n  overall: {}\n  boot_cycle: &b {retries: 4}\n  console_activity:\n    <<: *b\n    seconds: 30\n\
         deployment: {start: {kernel: {url: 'https://gw/k'}}}\n",
    )
    .unwrap();
    assert_eq!(job.timeouts.overall, Timeout::INFINITE);
    assert_eq!(
        job.timeouts.boot_cycle,
        Timeout {
            duration: None,
            retries: 4
        }
    );
    assert_eq!(
        job.timeouts.console_activity,
        Timeout::new(Duration::from_secs(30), 4)
    );
}

#[test]
fn normalised_yaml_round_trips() {
    for text in [REGISTER, BOOTLOOP, TEST_JOB] {
        let job = JobSpec::parse_and_render(text, &vars()).unwrap();
        let yaml = job.to_yaml().unwrap();
        let again = JobSpec::parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(again, job, "{yaml}");
    }
    let yaml = JobSpec::parse_and_render(TEST_JOB, &vars())
        .unwrap()
        .to_yaml()
        .unwrap();
    assert!(
        yaml.contains("infra_setup:\n    minutes: 2\n    milliseconds: 250\n"),
        "{yaml}"
    );
    assert!(yaml.contains("deadline: 2026-11-23T08:00:00Z"), "{yaml}");
}
