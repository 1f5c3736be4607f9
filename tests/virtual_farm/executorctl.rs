//! ci-tron's own client against the virtual farm's QEMU DUTs: `executorctl`
//! (`valve-gfx-ci-executor-client` 0.2.1 from PyPI, in the venv the executor's tests keep
//! under target/) submits without a token from the trusted loopback network, its connection
//! is upgraded to ci-tron's console protocol and it exits with the job's status.
//!
//! With both machines IDLE, at once: a PASS and a FAIL job by tag (the console streams, the
//! control messages print, exit codes 0 and 3), and ci-tron's own `interactive.yml.j2` (from
//! `valve-gfx-ci-executor-server` 0.0.3 on PyPI, its `target.id: machine_id` named with
//! `-i`) with the DUT image substituted for boot2container, `-s DIR` giving the DUT a file
//! and getting back the file the DUT wrote (through `dutctl` started as `mcli`), and ci-tron's
//! `bootloop.yml.j2` (a check boot) with `dutgate.action=check` added, and its
//! `cache_reset.yml.j2` with a command in place of the cache reset. Then
//! `executorctl duts` lists both machines. While these keep both machines busy, a job
//! submitted with `-w` queues, runs once a machine is free and ends INCOMPLETE (its command
//! stays silent past its `console_activity` timeout): exit code 4. About 2–3 minutes on 2 cores
//! once the venv exists.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::testing::{PypiDist, pypi_files, pypi_venv};
use dutgate_e2e::farm::{Farm, HELLO_RUN, hello_variant};

const CLIENT: &str = "valve-gfx-ci-executor-client==0.2.1";
const SERVER: &str = "valve-gfx-ci-executor-server==0.0.3";
/// A QEMU job's boot, run and power-off, with room for three queued on two machines.
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// One `executorctl` in the background, its stdout and stderr in `<tmp>/<name>.ectl`.
struct Ectl {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Ectl {
    fn spawn(farm: &Farm, path: &std::ffi::OsStr, name: &str, args: &[&str]) -> Ectl {
        let log = farm.tmp.join(format!("{name}.ectl"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(executorctl())
            .args(args)
            .env("PATH", path)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("executorctl does not start: {e}"));
        Ectl {
            name: name.to_string(),
            child,
            log,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for its exit (bounded); panics with its output unless it exited with `code`.
    fn wait_for_code(mut self, code: i32) -> String {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < JOB_TIMEOUT,
                "executorctl ({}) still running after {JOB_TIMEOUT:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let out = self.output();
        assert_eq!(
            status.code(),
            Some(code),
            "executorctl ({}) exited {status}, not {code}:\n{out}",
            self.name
        );
        out
    }
}

impl Drop for Ectl {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn executorctl() -> PathBuf {
    pypi_venv("executorctl-venv", CLIENT).join("executorctl")
}

/// A job template of `valve-gfx-ci-executor-server` 0.0.3 as released, with `edits` (each
/// `from` must occur), written to `<tmp>/<name>.yml`.
fn citron_template(tmp: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let path = pypi_files(SERVER, PypiDist::Sdist).join(format!(
        "valve_gfx_ci_executor_server-0.0.3/src/valve_gfx_ci/executor/server/job_templates/\
         {name}.yml.j2"
    ));
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (is it still in {SERVER}?)", path.display()));
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "{SERVER}'s {name}.yml.j2 no longer contains {from:?}: update this test"
        );
        text = text.replace(from, to);
    }
    let out = tmp.join(format!("{name}.yml"));
    std::fs::write(&out, text).unwrap();
    out
}

/// ci-tron's `bootloop.yml.j2` as released (a check boot of the machine-registration
/// container) on the DUT image: its kernel is the executor's default (`dut_kernel_url`), and
/// the DUT image's equivalent of that container, `dutgate.action=check`, is added.
fn bootloop_on_the_dut_image(tmp: &Path) -> PathBuf {
    citron_template(
        tmp,
        "bootloop",
        &[(
            "        - loglevel=6 nomodeset\n",
            "        - loglevel=6 nomodeset\n        - dutgate.action=check \
             dutgate.mars_url=http://{{ gateway }}:{{ mars_port }}\n",
        )],
    )
}

/// ci-tron's `cache_reset.yml.j2` as released (`target.id: machine_id`, named with `-i`) on
/// the DUT image: its kernel and initramfs become the DUT image's, and a command stands in
/// for boot2container's cache reset, which the DUT image has no cache for.
fn cache_reset_on_the_dut_image(tmp: &Path) -> PathBuf {
    citron_template(
        tmp,
        "cache_reset",
        &[
            (
                "{{ minio_url }}/boot/default_kernel",
                "{{ dut_kernel_url }}",
            ),
            (
                "{{ minio_url }}/boot/default_boot2container.cpio.xz",
                "{{ dut_initramfs_url }}",
            ),
            (
                "SALAD.machine_id={{ machine_id }}\n",
                "SALAD.machine_id={{ machine_id }}\n        - dutgate.run=\"echo no cache to reset\"\n",
            ),
        ],
    )
}

/// ci-tron's `interactive.yml.j2` as released, booting the DUT image instead of
/// boot2container (`{{ minio_url }}/boot/default_kernel` and its initramfs become
/// `{{ dut_kernel_url }}`/`{{ dut_initramfs_url }}`, which the executor defines), with the
/// DUT image's equivalent of its container added: pull the job's bucket, run `command`,
/// push the bucket back. Its b2c options stay; the DUT image ignores them.
fn interactive_on_the_dut_image(tmp: &Path, command: &str) -> PathBuf {
    let run = format!(
        "SALAD.machine_id={{{{ machine_id }}}}\n        - dutgate.s3=\"{{{{ minio_url }}}},\
         {{{{ job_bucket }}}},{{{{ job_bucket_access_key }}}},\
         {{{{ job_bucket_secret_key }}}}\" dutgate.run=\"{command}\"\n"
    );
    citron_template(
        tmp,
        "interactive",
        &[
            (
                "{{ minio_url }}/boot/default_kernel",
                "{{ dut_kernel_url }}",
            ),
            (
                "{{ minio_url }}/boot/default_boot2container.cpio.xz",
                "{{ dut_initramfs_url }}",
            ),
            ("SALAD.machine_id={{ machine_id }}\n", &run),
        ],
    )
}

/// The step; both machines (`machines`, with `tag`) are IDLE.
pub fn executorctl_drives_qemu_duts(
    farm: &mut Farm,
    executor_port: u16,
    machines: [&str; 2],
    tag: &str,
) {
    let t0 = Instant::now();
    let bin = executorctl();
    assert!(bin.exists(), "{}", bin.display());
    // `mcli` on PATH: executorctl mirrors the job's bucket with it for `-s`.
    let path_dir = farm.tmp.join("ectl-bin");
    std::fs::create_dir_all(&path_dir).unwrap();
    let _ = std::fs::remove_file(path_dir.join("mcli"));
    std::os::unix::fs::symlink(farm.bin.join("dutctl"), path_dir.join("mcli")).unwrap();
    let mut path = path_dir.into_os_string();
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    // executorctl joins `-e` and `/api/v1/…`.
    let url = format!("http://127.0.0.1:{executor_port}/");

    let pass = hello_variant(
        &farm.tmp,
        "ectl-pass",
        // The kernel echoes its cmdline: only the DUT's shell makes `console-42` of it.
        &[(HELLO_RUN, "dutgate.run=\\\"echo console-$((6*7))\\\"")],
    );
    let fail = hello_variant(
        &farm.tmp,
        "ectl-fail",
        &[(HELLO_RUN, "dutgate.run=\\\"echo about to fail; exit 7\\\"")],
    );
    let share = farm.tmp.join("ectl-share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("input.txt"), "from the CI\n").unwrap();
    let interactive = interactive_on_the_dut_image(
        &farm.tmp,
        "cat input.txt > from-dut.txt && echo written on $(uname -n) >> from-dut.txt",
    );
    let (pass, fail, interactive) = (
        pass.to_string_lossy().into_owned(),
        fail.to_string_lossy().into_owned(),
        interactive.to_string_lossy().into_owned(),
    );
    let bootloop = bootloop_on_the_dut_image(&farm.tmp)
        .to_string_lossy()
        .into_owned();
    let share_arg = share.to_string_lossy().into_owned();
    let pass_run = Ectl::spawn(farm, &path, "pass", &["-e", &url, "run", "-t", tag, &pass]);
    let fail_run = Ectl::spawn(farm, &path, "fail", &["-e", &url, "run", "-t", tag, &fail]);
    let interactive_run = Ectl::spawn(
        farm,
        &path,
        "interactive",
        &[
            "-e",
            &url,
            "run",
            "-i",
            machines[1],
            "-s",
            &share_arg,
            &interactive,
        ],
    );

    let cache_reset = cache_reset_on_the_dut_image(&farm.tmp)
        .to_string_lossy()
        .into_owned();
    let cache_reset_run = Ectl::spawn(
        farm,
        &path,
        "cache_reset",
        &["-e", &url, "run", "-i", machines[0], &cache_reset],
    );
    let bootloop_run = Ectl::spawn(
        farm,
        &path,
        "bootloop",
        &["-e", &url, "run", "-i", machines[0], &bootloop],
    );
    // Both machines busy (five jobs for two), `-w`: the job queues (the server cannot see
    // `-w`) and runs once a machine is free. Its command stays silent past its
    // `console_activity` timeout (no retry): INCOMPLETE, executorctl's exit code 4.
    farm.wait_for("both machines RUNNING", Duration::from_secs(120), |f| {
        let m = f.machines();
        (m.len() == 2 && m.iter().all(|m| m["state"] == "RUNNING")).then_some(())
    });
    let hang = hello_variant(
        &farm.tmp,
        "ectl-hang",
        &[
            (HELLO_RUN, "dutgate.run=\\\"echo going quiet; sleep 240\\\""),
            (
                "  overall:\n    minutes: 5",
                "  overall:\n    minutes: 5\n  console_activity:\n    seconds: 20\n    retries: 0",
            ),
        ],
    );
    let hang = hang.to_string_lossy().into_owned();
    let hang_run = Ectl::spawn(
        farm,
        &path,
        "hang",
        &["-e", &url, "run", "-w", "-t", tag, &hang],
    );

    let out = pass_run.wait_for_code(0);
    for text in [
        "The http connection got upgraded to the ci-tron console protocol",
        "s: setting up the job",
        "console-42",
        "Execution is over, pipeline status: 0",
        // executorctl's summary: each pattern, its count and the first line it matched.
        "job_success(1): Execution is over, pipeline status: 0",
    ] {
        assert!(out.contains(text), "{text:?} in the PASS run:\n{out}");
    }
    let out = fail_run.wait_for_code(3);
    assert!(out.contains("about to fail"), "{out}");
    assert!(out.contains("status: JobStatus.FAIL"), "{out}");
    let out = interactive_run.wait_for_code(0);
    let written = std::fs::read_to_string(share.join("from-dut.txt")).unwrap_or_default();
    assert!(
        written.starts_with("from the CI\nwritten on "),
        "the file the DUT wrote, mirrored into -s {share_arg}: {written:?}\n{out}"
    );
    let out = bootloop_run.wait_for_code(0);
    assert!(out.contains("MaRS: check passed"), "{out}");
    assert!(out.contains("status: JobStatus.PASS"), "{out}");
    let out = cache_reset_run.wait_for_code(0);
    assert!(out.contains("no cache to reset"), "{out}");
    let out = hang_run.wait_for_code(4);
    assert!(out.contains("going quiet"), "{out}");
    assert!(out.contains("timeout console_activity expired"), "{out}");
    eprintln!(
        "[executorctl] PASS, FAIL, interactive.yml.j2 (-i, -s), bootloop.yml.j2, cache_reset.yml.j2 (-i) and INCOMPLETE (-w) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // `executorctl duts` lists both machines by their full names.
    let listed = Ectl::spawn(farm, &path, "duts", &["-e", &url, "duts"]).wait_for_code(0);
    for m in farm.machines() {
        let name = m["full_name"].as_str().unwrap_or_default();
        assert!(
            !name.is_empty() && listed.contains(name),
            "{name} in:\n{listed}"
        );
    }
    // The jobs' teardowns end with the machines IDLE again, for the scenario's next steps.
    farm.wait_for("both machines IDLE again", Duration::from_secs(60), |f| {
        let m = f.machines();
        (m.len() == 2 && m.iter().all(|m| m["state"] == "IDLE")).then_some(())
    });
    eprintln!(
        "[executorctl] step done in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
