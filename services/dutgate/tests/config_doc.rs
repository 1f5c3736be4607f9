//! docs/configuration.md documents every key of the effective default config.

use std::process::Command;

fn leaf_keys(prefix: &str, v: &yaml_serde::Value, out: &mut Vec<String>) {
    match v {
        yaml_serde::Value::Mapping(m) if !m.is_empty() => {
            for (k, x) in m {
                let k = k.as_str().unwrap_or_default();
                let p = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(&p, x, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn every_config_key_is_documented() {
    let out = Command::new(env!("CARGO_BIN_EXE_dutgate"))
        .args(["config", "check"])
        .env("DUTGATE_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let tree: yaml_serde::Value = yaml_serde::from_str(&text).unwrap();
    let mut keys = Vec::new();
    leaf_keys("", &tree, &mut keys);
    assert!(keys.len() > 50, "suspiciously few keys: {keys:?}");
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/configuration.md"
    ))
    .unwrap();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document: {missing:?}"
    );
}
