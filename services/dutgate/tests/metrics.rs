//! Every service's `/metrics` on a real gateway (`dutgate up`): one `dutgate_` namespace,
//! `dutgate_build_info`, an exposition Prometheus' own checker accepts (`promtool check
//! metrics`, Debian package `prometheus`: HELP text, names, types), every family in
//! docs/metrics.md with the type it has there, and bounded labels. Cheap traffic first (a
//! 404, a refused request) so that more than the start-up metrics are checked.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, SERVICES};
use dutgate_core::testing::require_program;

/// A plain HTTP/1.1 GET on 127.0.0.1: the status and the body.
fn get(port: u16, path: &str) -> (u16, String) {
    request(port, "GET", path)
}

/// A plain HTTP/1.1 request without a body on 127.0.0.1: the status and the body.
fn request(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to port {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"));
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_problems(text: &str) -> Option<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool does not start");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (!out.status.success() || !said.trim().is_empty()).then_some(said)
}

/// Per service: requests that count in its own metrics without a DUT, and the series it must
/// then export, each as the start of a sample line (a family name, or one with its labels).
const TRAFFIC: [(&str, &[&str], &[&str]); 7] = [
    // The scheduler runs a round as it starts.
    (
        "executor",
        &[],
        &[
            "dutgate_db_checkpoint_seconds",
            "dutgate_executor_dispatch_step_seconds_count{step=\"round\"}",
        ],
    ),
    // Written by the first lease sweep, right after start.
    (
        "mars",
        &[],
        &[
            "dutgate_db_checkpoint_seconds",
            "dutgate_mars_machines{state=\"IDLE\"} 0",
        ],
    ),
    // Written when the blob cache is opened.
    ("registry", &[], &["dutgate_registry_cache_bytes 0"]),
    (
        "boot",
        // 127.0.0.1 is on the default DUT networks: a malformed MAC is answered with a retry
        // script and counted.
        &["/boot/not-a-mac/boot.ipxe"],
        &[
            "dutgate_db_checkpoint_seconds",
            "dutgate_boot_scripts_total{config=\"invalid_mac\"} 1",
            "dutgate_boot_artifact_cache_size_bytes 0",
            "dutgate_boot_artifact_cache_blobs 0",
        ],
    ),
    ("pdu", &[], &["dutgate_db_checkpoint_seconds"]),
    ("salad", &[], &["dutgate_db_checkpoint_seconds"]),
    (
        "s3",
        // Unsigned: refused as anonymous (twice: `/api/v1/no-such-route` is an S3 path too).
        &["/no-such-bucket/some/key"],
        &[
            "dutgate_s3_requests_total{method=\"GET\",status=\"403\"} 2",
            "dutgate_s3_request_duration_seconds_count{method=\"GET\"}",
            "dutgate_s3_denied_total{reason=\"anonymous\"} 2",
        ],
    ),
];

/// Series every service exports once it answered a request.
fn shared(svc: &str) -> Vec<String> {
    let mut out = vec![
        format!(
            "dutgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        format!(
            "dutgate_http_request_duration_seconds_bucket{{service=\"{svc}\",method=\"GET\",route=\""
        ),
    ];
    // s3 hands every path but its own few to S3: there a made-up route is an object key.
    if svc != "s3" {
        out.push(format!(
            "dutgate_http_requests_total{{service=\"{svc}\",method=\"GET\",route=\"unmatched\",status=\"404\"}} 1"
        ));
    }
    out
}

/// docs/metrics.md's table: exported name → type, from its rows "| `dutgate_…` | type | …".
fn documented() -> HashMap<String, String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/metrics.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = HashMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, name, kind, ..] = cells[..]
            && let Some(name) = name
                .strip_prefix('`')
                .and_then(|n| n.strip_suffix('`'))
                .filter(|n| n.starts_with("dutgate_"))
            && ["counter", "gauge", "histogram"].contains(&kind)
        {
            out.insert(name.to_string(), kind.to_string());
        }
    }
    assert!(out.len() > 50, "{path} lists only {} metrics", out.len());
    out
}

/// `# TYPE` lines: family → type.
fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

#[test]
fn every_service_exports_one_namespace_that_promtool_accepts() {
    require_program("promtool", "prometheus");
    let docs = documented();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let gw = Gateway::start(&state, &SERVICES, Duration::from_secs(90));
    assert_eq!(SERVICES, TRAFFIC.map(|t| t.0));
    let mut failures = Vec::new();
    for ((svc, paths, expected), port) in TRAFFIC.iter().zip(&gw.ports) {
        get(*port, "/healthz");
        get(*port, "/api/v1/no-such-route");
        // A made-up method is counted as `other`, never as the caller's text.
        request(*port, "INVENTED", "/healthz");
        for path in *paths {
            let (status, body) = get(*port, path);
            assert!(status > 0, "{svc}: GET {path}: no HTTP answer: {body}");
        }
        let want: Vec<String> = shared(svc)
            .into_iter()
            .chain(expected.iter().map(|w| w.to_string()))
            .collect();
        // Some series are written by a task that runs right after start: wait for them.
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            let (status, text) = get(*port, "/metrics");
            assert_eq!(status, 200, "{svc}: /metrics answered {status}: {text}");
            let missing: Vec<&String> = want
                .iter()
                .filter(|w| !text.lines().any(|l| l.starts_with(w.as_str())))
                .collect();
            if missing.is_empty() {
                break text;
            }
            if Instant::now() > deadline {
                failures.push(format!("{svc}: no {missing:?} within 10 s:\n{text}"));
                break text;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let have = families(&text);
        for (name, kind) in &have {
            if !name.starts_with("dutgate_") {
                failures.push(format!("{svc}: {name} is outside the dutgate_ namespace"));
            }
            match docs.get(name) {
                None => failures.push(format!("{svc}: {name} is not in docs/metrics.md")),
                Some(k) if k != kind => failures.push(format!(
                    "{svc}: {name} is a {kind}, docs/metrics.md says {k}"
                )),
                Some(_) => {}
            }
        }
        // Label values are bounded: a path nobody routes is counted as `unmatched`, never as
        // the caller's text.
        for l in text
            .lines()
            .filter(|l| l.contains("no-such") || l.contains("INVENTED"))
        {
            failures.push(format!("{svc}: a series carries a requested path: {l}"));
        }
        if let Some(problems) = promtool_problems(&text) {
            failures.push(format!("{svc}: promtool check metrics:\n{problems}"));
        }
        eprintln!(
            "{svc}: {} metric families: {}",
            have.len(),
            have.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `(name, type)` of every `<marker>"name"` call in the `.rs` files under `dir`, where the
/// marker ends in `counter!(`, `gauge!(` or `histogram!(`.
fn calls(dir: &std::path::Path, prefix: &str, out: &mut Vec<(String, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            calls(&path, prefix, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for kind in ["counter", "gauge", "histogram"] {
            let marker = format!("{prefix}{kind}!(");
            for (at, _) in text.match_indices(&marker) {
                let rest = text[at + marker.len()..].trim_start();
                // Names built at run time (registry's stats, boot's cache counters) are not
                // literals: they are covered by the exported families above.
                if let Some(rest) = rest.strip_prefix('"')
                    && let Some(end) = rest.find('"')
                {
                    out.push((rest[..end].to_string(), kind.to_string()));
                }
            }
        }
    }
}

/// Without a gateway: every metric the code writes under a literal name is described with the
/// same type, and the descriptions and docs/metrics.md list the same metrics and types, also
/// those no cheap request makes appear.
#[test]
fn every_metric_in_the_code_is_described_and_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut emitted = Vec::new();
    let mut described = Vec::new();
    for top in ["services", "pdu-drivers"] {
        for krate in std::fs::read_dir(root.join(top)).unwrap().flatten() {
            let src = krate.path().join("src");
            calls(&src, "metrics::", &mut emitted);
            calls(&src, "describe_", &mut described);
        }
    }
    assert!(
        emitted.len() > 50,
        "only {} metric calls found",
        emitted.len()
    );
    let docs = documented();
    let mut failures = Vec::new();
    for (name, kind) in &emitted {
        if !described.contains(&(name.clone(), kind.clone())) {
            failures.push(format!("{kind} {name} is written but not described as one"));
        }
    }
    for (name, kind) in &described {
        match docs.get(&format!("dutgate_{name}")) {
            Some(k) if k == kind => {}
            Some(k) => failures.push(format!(
                "{name} is described as a {kind}, docs/metrics.md says {k}"
            )),
            None => failures.push(format!("dutgate_{name} is not in docs/metrics.md")),
        }
    }
    for (name, kind) in &docs {
        let short = name.trim_start_matches("dutgate_");
        if !described.iter().any(|(n, k)| n == short && k == kind) {
            failures.push(format!(
                "docs/metrics.md lists the {kind} {name}, nothing describes it"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
