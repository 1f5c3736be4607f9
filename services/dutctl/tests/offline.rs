//! dutctl commands that need no gateway, through the real binary: `job validate` (exit 0 and
//! the normalised job, or exit 65 (EX_DATAERR) and one positioned error per line on stderr),
//! usage errors (64), `completion` and `man`.

use std::process::Command;

fn dutctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dutctl"))
        .args(args)
        .env_remove("DUTGATE_URL")
        .env_remove("DUTGATE_TOKEN")
        .output()
        .expect("dutctl runs")
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn valid_job_prints_normalised_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "job.yml",
        "deployment:\n  start:\n    kernel:\n      url: \"{{ minio_url }}/k\"\n      cmdline: [a, \"b={{ extra }}\"]\n  continue:\n    kernel: {cmdline: c}\n",
    );
    let out = dutctl(&["job", "validate", &file, "--var", "extra=42"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.contains("url: http://gateway:9000/k"), "{yaml}");
    assert!(yaml.contains("cmdline: a b=42"), "{yaml}");
    assert!(yaml.contains("overall:\n    hours: 6\n"), "{yaml}");
    assert!(
        yaml.contains("continue:\n    kernel:\n      url: http://gateway:9000/k\n      cmdline: c"),
        "{yaml}"
    );

    let out = dutctl(&["-o", "json", "job", "validate", &file, "--var", "extra=42"]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["deployment"]["start"]["kernel"]["cmdline"], "a b=42");
}

#[test]
fn invalid_job_lists_every_error_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "bad.yml",
        "target: {}\ntimeouts:\n  overall: {hours: 2, retries: 1}\ndeployment:\n  continue: {}\n",
    );
    let out = dutctl(&["job", "validate", &file]);
    assert_eq!(out.status.code(), Some(65));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines,
        vec![
            format!(
                "{file}:1:9: target: a target needs `id` or `tags` (`tags: []` means any machine)"
            ),
            format!(
                "{file}:3:32: timeouts.overall.retries: `overall` cannot have retries (it bounds the retries of the others)"
            ),
            format!("{file}:5:3: deployment.start: missing required field"),
        ]
    );

    // An undefined variable is an error unless provided; placeholders can be turned off.
    let file = write(
        &dir,
        "tmpl.yml",
        "deployment: {start: {kernel: {url: \"{{ minio_url }}/k\"}}}\n",
    );
    assert_eq!(dutctl(&["job", "validate", &file]).status.code(), Some(0));
    let out = dutctl(&["job", "validate", &file, "--no-placeholders"]);
    assert_eq!(out.status.code(), Some(65));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("undefined template variable `minio_url`")
    );
}

/// A bad command line exits 64 (EX_USAGE) with clap's message, never a job status code (2 is
/// `run`'s COMPLETE); help and version exit 0.
#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    for args in [
        &["run", "--no-such-flag", "job.yml"][..],
        &["no-such-command"][..],
        &["job", "validate"][..],
    ] {
        let out = dutctl(args);
        assert_eq!(out.status.code(), Some(64), "dutctl {args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error:"), "dutctl {args:?}: {stderr}");
    }
    for args in [&["--help"][..], &["--version"][..], &["run", "--help"][..]] {
        let out = dutctl(args);
        assert_eq!(out.status.code(), Some(0), "dutctl {args:?}");
        assert!(!out.stdout.is_empty(), "dutctl {args:?} printed nothing");
    }
}

/// Completions for three shells and the man page, generated from the command line itself;
/// bash and the roff formatter accept what is generated.
#[test]
fn completions_and_man_page_generate() {
    for shell in ["bash", "zsh", "fish"] {
        let out = dutctl(&["completion", shell]);
        assert_eq!(out.status.code(), Some(0), "completion {shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["run", "machines", "tokens", "audit", "share-dir"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    dutgate_core::testing::require_program("bash", "bash");
    let dir = tempfile::tempdir().unwrap();
    let bash = dir.path().join("dutctl.bash");
    std::fs::write(&bash, dutctl(&["completion", "bash"]).stdout).unwrap();
    let check = Command::new("bash").arg("-n").arg(&bash).output().unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let man = dutctl(&["man"]);
    assert_eq!(man.status.code(), Some(0));
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.contains(".TH dutctl 1"), "{page}");
    assert!(
        page.contains("tokens") && page.contains("completion"),
        "{page}"
    );
    // groff (Debian `groff-base`, which `man` needs) renders it without a warning, its input
    // decoded as man does (`-k`: preconv, the page has UTF-8 dashes).
    dutgate_core::testing::require_program("groff", "groff-base");
    let page_file = dir.path().join("dutctl.1");
    std::fs::write(&page_file, &man.stdout).unwrap();
    let rendered = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .arg(&page_file)
        .output()
        .unwrap();
    assert!(
        rendered.status.success() && rendered.stderr.is_empty(),
        "groff: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
}
