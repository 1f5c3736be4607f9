//! The Grafana dashboard (`gateway-image/grafana/dutgate.json`) is built on what the services
//! export: every panel's PromQL expression, written out as a recording rule, passes
//! `promtool check rules` (Debian package `prometheus`; Grafana itself is in no registry
//! here), and every `dutgate_` metric it names is one a service describes (the describe
//! lists of `services/*/src/telemetry.rs`, which `metrics.rs` checks against the live
//! `/metrics` and docs/metrics.md). No gateway: it takes well under a second.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use dutgate_core::testing::require_program;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `expr` of every panel (rows' nested panels included), with the panel's title.
fn expressions(v: &serde_json::Value, title: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            let title = m
                .get("title")
                .and_then(|t| t.as_str())
                .unwrap_or(title)
                .to_string();
            if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                out.push((title.clone(), e.to_string()));
            }
            for child in m.values() {
                expressions(child, &title, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|c| expressions(c, title, out)),
        _ => {}
    }
}

/// As Grafana would before sending the query: its interval variables become a range.
fn as_prometheus_sees_it(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

/// Names of the metrics described in `describe_*!(` calls under `dir`, with their type.
fn described(dir: &Path, out: &mut Vec<(String, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            described(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for kind in ["counter", "gauge", "histogram"] {
            let marker = format!("describe_{kind}!(");
            for (at, _) in text.match_indices(&marker) {
                let rest = text[at + marker.len()..].trim_start();
                if let Some(rest) = rest.strip_prefix('"')
                    && let Some(end) = rest.find('"')
                {
                    out.push((format!("dutgate_{}", &rest[..end]), kind.to_string()));
                }
            }
        }
    }
}

/// The `dutgate_…` names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("dutgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_panel_expression_is_a_valid_rule_on_exported_metrics() {
    require_program("promtool", "prometheus");
    let path = root().join("gateway-image/grafana/dutgate.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let dash: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut exprs = Vec::new();
    expressions(&dash["panels"], "", &mut exprs);
    assert!(exprs.len() >= 15, "only {} panel expressions", exprs.len());

    let mut exported = Vec::new();
    for top in ["services", "pdu-drivers"] {
        for krate in std::fs::read_dir(root().join(top)).unwrap().flatten() {
            described(&krate.path().join("src"), &mut exported);
        }
    }
    let mut failures = Vec::new();
    for (title, expr) in &exprs {
        for name in metric_names(expr) {
            let known = exported.iter().any(|(n, kind)| {
                *n == name
                    || (kind == "histogram"
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(n.as_str())))
            });
            if !known {
                failures.push(format!("panel {title:?}: {name} is exported by no service"));
            }
        }
    }

    // One recording rule per expression, as Prometheus would load them.
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| {
            serde_json::json!({"record": format!("dutgate:grafana_panel_{i}"), "expr": as_prometheus_sees_it(e)})
        })
        .collect();
    let doc = serde_json::json!({"groups": [{"name": "grafana", "rules": rules}]});
    let mut file = tempfile::Builder::new().suffix(".yml").tempfile().unwrap();
    // JSON is YAML: promtool reads it as its rules format.
    file.write_all(serde_json::to_string_pretty(&doc).unwrap().as_bytes())
        .unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(file.path())
        .output()
        .expect("promtool does not start");
    if !out.status.success() {
        failures.push(format!(
            "promtool check rules:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
