//! `dutgate up` and `dutgate config check`, driven as a user would: through the binary.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{Gateway, SERVICES, children_of, dutgate, healthz, listening_ports, up_command};

/// Processes whose command line mentions `needle` (our unique state dir).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{name}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                found.push(format!("{name}: {cmd}"));
            }
        }
    }
    found
}

#[test]
fn up_starts_every_service_and_sigterm_stops_all_within_5s() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Start-up time is not what this test is about (the stop is): a debug build starting
    // beside the other tests of this file on two busy cores may need more than a few seconds.
    let mut gw = Gateway::start(&state, &SERVICES, Duration::from_secs(60));
    // Tokens exist with mode 0600; endpoints are published for dutctl.
    for t in ["admin", "user"] {
        let meta = std::fs::metadata(state.join("tokens").join(t)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let endpoints = std::fs::read_to_string(state.join("endpoints.json")).unwrap();
    assert!(endpoints.contains(&gw.ports[0].to_string()));

    let needle = state.to_string_lossy().to_string();
    assert_eq!(processes_mentioning(&needle).len(), 1 + SERVICES.len());

    let stop = Instant::now();
    gw.terminate();
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "up exited with {status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_mentioning(&needle).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        stop.elapsed() < Duration::from_secs(5),
        "stopping took {:?}",
        stop.elapsed()
    );
    assert_eq!(
        processes_mentioning(&needle),
        Vec::<String>::new(),
        "orphans left"
    );
    let out = std::fs::read_to_string(&gw.stdout).unwrap();
    for svc in SERVICES {
        assert!(out.contains(svc), "no line for {svc} in:\n{out}");
    }
    assert!(out.contains("ready"));
}

/// The salad child of `up` other than `not`, and the port its REST API answers on.
fn salad_child(up: u32, not: Option<u32>) -> Option<(u32, u16)> {
    children_of(up)
        .into_iter()
        .filter(|pid| Some(*pid) != not)
        .find_map(|pid| {
            let port = listening_ports(pid)
                .into_iter()
                .find(|p| healthz(*p).is_some_and(|body| body.contains("salad")))?;
            Some((pid, port))
        })
}

#[test]
fn a_crashed_service_is_restarted() {
    let state = tempfile::tempdir().unwrap();
    // Port 0: salad binds a port of the kernel's choice, again on each restart, and the test
    // reads it from /proc, so no other process can take it in between. (`up` reports salad
    // NOT READY on port 0 after its ready budget; supervision is what is tested here.)
    let mut child = up_command(state.path(), &["salad"], &[0])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = child.id();
    let wait_up = |not: Option<u32>, limit: Duration| {
        let t = Instant::now();
        loop {
            if let Some(found) = salad_child(up, not) {
                return found;
            }
            assert!(t.elapsed() < limit, "salad not (back) up after {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (victim, _) = wait_up(None, Duration::from_secs(30));
    unsafe_free_kill(victim, "KILL");
    // Back-off is 1 s for a first crash; the rest is slack for a loaded machine (and for
    // `up`, which supervises only after its 5 s ready budget for the port-0 salad).
    let (restarted, _) = wait_up(Some(victim), Duration::from_secs(20));
    assert_ne!(restarted, victim);
    unsafe_free_kill(child.id(), "TERM");
    assert!(child.wait().unwrap().success());
}

fn unsafe_free_kill(pid: u32, sig: &str) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn unknown_key_and_bad_value_exit_2_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "gateway:\n  farm_name: lab\n  colour: blue\n",
            "colour",
            ":3:",
        ),
        ("gateway:\n  ports:\n    pdu: high\n", "pdu", ":3:"),
        ("salad:\n  nonsense_key: 1\n", "nonsense_key", ":2:"),
        ("gatewy:\n  farm_name: lab\n", "gatewy", ":1:"),
    ];
    for (i, (text, key, line)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("bad{i}.yml"), text);
        for args in [vec!["config", "check"], vec!["up"]] {
            let state = dir.path().join(format!("state{i}"));
            let out = dutgate()
                .arg("--config")
                .arg(&path)
                .arg("--state-dir")
                .arg(&state)
                .args(&args)
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?} on {text:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
            assert!(err.contains(key), "{err} should name {key}");
            assert!(err.contains(line), "{err} should name line {line}");
            // Nothing started, nothing written.
            assert!(!state.exists(), "{args:?} created the state dir");
        }
    }
}

#[test]
fn bad_env_override_exits_2_naming_the_variable() {
    let out = dutgate()
        .args(["config", "check"])
        .env("DUTGATE_GATEWAY__PORTS__SALAD", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DUTGATE_GATEWAY__PORTS__SALAD"));
}

#[test]
fn config_check_prints_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "ok.yml",
        "gateway:\n  farm_name: lab\n  database_url: postgres://dut:pw@db/farm\n  auth:\n    admin_token: sup3rsecret\n    dut_networks: [10.42.0.0/16]\n",
    );
    let out = dutgate()
        .arg("--config")
        .arg(&path)
        .args(["config", "check"])
        .env("DUTGATE_GATEWAY__PORTS__BOOT", "18003")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("farm_name: lab"));
    assert!(text.contains("boot: 18003"));
    assert!(!text.contains("sup3rsecret"));
    assert!(!text.contains(":pw@"));
    for section in SERVICES {
        assert!(
            text.contains(&format!("\n{section}:")),
            "section {section} missing:\n{text}"
        );
    }
}
