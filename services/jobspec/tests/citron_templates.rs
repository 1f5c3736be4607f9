//! ci-tron's own job templates, as released on PyPI (`valve-gfx-ci-executor-server` 0.0.3,
//! its source archive, downloaded by the test into target/ and never committed), render and
//! validate with the variables the executor gives every job: valve-infra's registry names
//! (`fdo_proxy_registry`, …) are the gateway's registry, the literal `target.id: machine_id`
//! and `"{{ machine_id }}"` are the machine the job is rendered for, and a deployment
//! without a kernel boots the gateway's default (the DUT image, `dut_kernel_url`), as
//! valve-infra booted its boot2container.
//!
//! valve-infra's copies of these templates differ only in image names and in `bootloop` and
//! `register` naming the default kernel by URL (docs/migrating.md): both shapes are here.
//! The same release's wheel carries a newer ci-tron job format (`storage`, `imagestore`,
//! categorised cmdlines, `registry.to_local_proxy()`), which is not supported: see
//! docs/migrating.md.

use std::path::PathBuf;

use dutgate_core::testing::{PypiDist, pypi_files};
use dutgate_jobspec::{DEFAULT_INITRAMFS_VAR, DEFAULT_KERNEL_VAR, JobSpec, TemplateVars};

const SERVER: &str = "valve-gfx-ci-executor-server==0.0.3";
const KERNEL: &str = "http://gateway:8080/dut-image/vmlinuz";
const INITRAMFS: &str = "http://gateway:8080/dut-image/initramfs.cpio";

fn templates() -> PathBuf {
    pypi_files(SERVER, PypiDist::Sdist)
        .join("valve_gfx_ci_executor_server-0.0.3/src/valve_gfx_ci/executor/server")
}

/// What the executor renders a job with (placeholder machine and bucket, as at submission)
/// plus the DUT image variables `dutgate` configures by default.
fn vars() -> TemplateVars {
    let mut v = TemplateVars::placeholders();
    v.set(DEFAULT_KERNEL_VAR, KERNEL);
    v.set(DEFAULT_INITRAMFS_VAR, INITRAMFS);
    v
}

fn render(name: &str) -> JobSpec {
    let path = templates().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (is it still in {SERVER}?)", path.display()));
    JobSpec::parse_and_render(&text, &vars())
        .unwrap_or_else(|e| panic!("{name} does not render and validate: {e}"))
}

#[test]
fn ci_tron_job_templates_render_and_validate() {
    let machine = vars().machine.unwrap().id;
    let registry = vars().registry.unwrap();
    for name in [
        "bootloop.yml.j2",
        "cache_reset.yml.j2",
        "interactive.yml.j2",
        "register.yml.j2",
    ] {
        let job = render(&format!("job_templates/{name}"));
        // `id: machine_id` (cache_reset, interactive) and `id: "{{ machine_id }}"` alike.
        assert_eq!(
            job.target.id.map(|m| m.to_string()),
            Some(machine.clone()),
            "{name}"
        );
        let cmdline = &job.deployment.start.kernel.cmdline;
        if name != "cache_reset.yml.j2" {
            assert!(
                cmdline.contains(&format!(
                    "docker://{registry}/gfx-ci/ci-tron/machine-registration:latest"
                )),
                "{name}: fdo_proxy_registry is not the gateway's registry: {cmdline}"
            );
        }
        let kernel = &job.deployment.start.kernel.url;
        let initramfs = job.deployment.start.initramfs.as_ref().map(|i| &i.url);
        match name {
            // No kernel named: the gateway's default boot.
            "bootloop.yml.j2" | "register.yml.j2" => {
                assert_eq!(kernel, KERNEL, "{name}");
                assert_eq!(initramfs.map(String::as_str), Some(INITRAMFS), "{name}");
            }
            // valve-infra's default boot by URL, in the job's bucket endpoint.
            _ => {
                assert_eq!(kernel, "http://gateway:9000/boot/default_kernel", "{name}");
                assert_eq!(
                    initramfs.map(String::as_str),
                    Some("http://gateway:9000/boot/default_boot2container.cpio.xz"),
                    "{name}"
                );
            }
        }
    }
    // interactive.yml.j2 shares the job bucket with the DUT, by the job's own keys.
    let interactive = render("job_templates/interactive.yml.j2");
    assert!(
        interactive
            .deployment
            .start
            .kernel
            .cmdline
            .contains("b2c.volume=\"job,mirror=gateway/job-525400000001-1,"),
        "{}",
        interactive.deployment.start.kernel.cmdline
    );
}

/// The executor's test job, with the two variables its tests pass by hand (`extra`,
/// `ntp_peer`; not standard ones) and its `pull_thru_registry` from the defaults.
#[test]
fn ci_tron_sample_job_renders_and_validates() {
    let path = templates().join("tests/sample_job.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut v = vars();
    v.set("extra", "x").set("ntp_peer", "10.42.0.1");
    let job = JobSpec::parse_and_render(&text, &v)
        .unwrap_or_else(|e| panic!("sample_job.yml does not render and validate: {e}"));
    assert!(
        job.deployment
            .start
            .kernel
            .cmdline
            .contains("docker://gateway:8002/infra/machine-registration:latest check"),
        "{}",
        job.deployment.start.kernel.cmdline
    );
    assert_eq!(
        job.deployment.r#continue.kernel.url,
        "http://gateway:9000/test-kernel"
    );
}

/// Without a machine (a job parsed as is), the literal `machine_id` names none: an error on
/// `target.id`, never a made-up machine.
#[test]
fn a_literal_machine_id_without_a_machine_is_an_error_on_target_id() {
    let text = "target:\n  id: machine_id\ndeployment:\n  start:\n    kernel: {url: http://k}\n";
    let errors = JobSpec::parse(text).unwrap_err();
    assert_eq!(errors.first().unwrap().field(), "target.id", "{errors}");
    let no_machine = TemplateVars {
        machine: None,
        ..vars()
    };
    let errors = JobSpec::parse_and_render(text, &no_machine).unwrap_err();
    assert_eq!(errors.first().unwrap().field(), "target.id", "{errors}");
    // With one, it is that machine.
    let job = JobSpec::parse_and_render(text, &vars()).unwrap();
    assert_eq!(job.target.id.unwrap().to_string(), "52:54:00:00:00:01");
}

/// A deployment without a kernel and no default boot configured is still an error.
#[test]
fn no_kernel_and_no_default_boot_is_an_error() {
    let text = "target: {tags: []}\ndeployment:\n  start:\n    kernel: {cmdline: [a]}\n";
    let errors = JobSpec::parse_and_render(text, &TemplateVars::placeholders()).unwrap_err();
    assert_eq!(
        errors.first().unwrap().field(),
        "deployment.start.kernel.url",
        "{errors}"
    );
    let job = JobSpec::parse_and_render(text, &vars()).unwrap();
    assert_eq!(job.deployment.start.kernel.url, KERNEL);
    assert_eq!(job.deployment.r#continue.kernel.url, KERNEL);
    assert_eq!(job.deployment.r#continue.initramfs.unwrap().url, INITRAMFS);
}
