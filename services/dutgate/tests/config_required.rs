//! A config file must name the DUT networks; the embedded defaults and `--virtual-duts` keep
//! their loopback default.

use std::path::Path;
use std::process::{Command, Output};

fn dutgate(config: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dutgate"));
    c.env_remove("DUTGATE_CONFIG")
        .env_remove("DUTGATE_GATEWAY__AUTH__DUT_NETWORKS");
    if let Some(p) = config {
        c.arg("--config").arg(p);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_config_file_without_dut_networks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yml");
    std::fs::write(&file, "gateway:\n  farm_name: lab\n").unwrap();
    let o = dutgate(Some(&file), &["config", "check"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("gateway.auth.dut_networks is not set") && err.contains("gateway.yml"),
        "{err}"
    );
    // A service started with it refuses too, before anything else.
    let state = dir.path().join("state");
    let o = dutgate(
        Some(&file),
        &["--state-dir", state.to_str().unwrap(), "boot"],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("gateway.auth.dut_networks"));

    // Named in the file, or in the environment: accepted.
    std::fs::write(
        &file,
        "gateway:\n  farm_name: lab\n  auth:\n    dut_networks: [10.77.0.0/24]\n",
    )
    .unwrap();
    let o = dutgate(Some(&file), &["config", "check"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("10.77.0.0/24"));
    std::fs::write(&file, "gateway:\n  farm_name: lab\n").unwrap();
    let o = dutgate(
        Some(&file),
        &["config", "check"],
        &[("DUTGATE_GATEWAY__AUTH__DUT_NETWORKS", "[10.78.0.0/24]")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn embedded_defaults_and_the_virtual_farm_keep_the_loopback_default() {
    // No file at all (the default path does not exist in the test environment).
    if !Path::new(dutgate_core::config::DEFAULT_CONFIG_PATH).exists() {
        let o = dutgate(None, &["config", "check"], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("127.0.0.0/8"));
    }
    // `--virtual-duts` with a file that does not name them goes past the config check: here
    // it stops at the missing DUT image, not at the config.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.yml");
    std::fs::write(
        &file,
        "gateway:\n  bind_address: 127.0.0.1\n  ports: {executor: 0, mars: 0, registry: 0, boot: 0, pdu: 0, salad: 0, s3: 0}\n",
    )
    .unwrap();
    let state = dir.path().join("state");
    let image = dir.path().join("no-image");
    let o = dutgate(
        Some(&file),
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "up",
            "--virtual-duts",
            "1",
            "--dut-image",
            image.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(!err.contains("dut_networks"), "{err}");
    assert!(err.contains("cargo xtask dut-image"), "{err}");
}
