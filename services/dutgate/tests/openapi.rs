//! Every service serves its OpenAPI document at `GET /api/v1/openapi.json` (no token), and the
//! document lists exactly the routes the service's source declares: an endpoint added without
//! documentation, or documented but removed, fails here. Each documented GET route without
//! path parameters is then asked on the running service and must exist (no 404).

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// (name in `dutgate up`, source directory under services/).
const SERVICES: [(&str, &str); 7] = [
    ("executor", "executor"),
    ("mars", "mars"),
    ("registry", "registry"),
    ("boot", "boot"),
    ("pdu", "pdu"),
    ("salad", "salad"),
    ("s3", "storage"),
];

/// Routes every service gets from `dutgate_core::http`.
const SHARED: [&str; 3] = ["/healthz", "/metrics", "/api/v1/openapi.json"];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn services_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The service's source files, without its test harness (`src/testing/`, feature `testing`:
/// fake artifact servers and the like, which are not the service's routes).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.file_stem().is_some_and(|n| n == "testing") {
            continue;
        }
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file's text without its `#[cfg(test)]` module (by convention the end of the file).
fn non_test_source(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

const METHODS: [&str; 8] = [
    "get", "post", "put", "patch", "delete", "head", "options", "any",
];

/// The text of a call's arguments: from just after its `(` to the matching `)`.
fn call_args(after_paren: &str) -> &str {
    let mut depth = 1usize;
    for (i, c) in after_paren.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return &after_paren[..i];
                }
            }
            _ => {}
        }
    }
    after_paren
}

/// The HTTP methods an axum method router expression names (`get(a).post(b)`,
/// `axum::routing::delete(c)`, `any(d)`), lower case.
fn methods_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for m in METHODS {
        let call = format!("{m}(");
        let mut from = 0;
        while let Some(i) = expr[from..].find(&call) {
            let at = from + i;
            let before = expr[..at].chars().next_back();
            if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                found.insert(m.to_string());
            }
            from = at + call.len();
        }
    }
    found
}

/// The routes declared by `.route("path", methods)` / `.route_service("path", service)`:
/// (path as written, methods; a `route_service` counts as `any`).
fn route_literals(text: &str) -> Vec<(String, BTreeSet<String>)> {
    let mut found = Vec::new();
    for call in [".route(", ".route_service("] {
        let mut rest = text;
        while let Some(i) = rest.find(call) {
            rest = &rest[i + call.len()..];
            let args = call_args(rest);
            let arg = args.trim_start();
            if let Some(lit) = arg.strip_prefix('"')
                && let Some(end) = lit.find('"')
            {
                let methods = if call == ".route(" {
                    methods_in(&lit[end + 1..])
                } else {
                    BTreeSet::from(["any".to_string()])
                };
                found.push((lit[..end].to_string(), methods));
            }
        }
    }
    found
}

/// axum's `{*rest}` is OpenAPI's `{rest}`.
fn normalize(path: &str) -> String {
    path.replace("{*", "{")
}

type Routes = BTreeMap<String, BTreeSet<String>>;

/// The routes a service's source declares, with their methods, plus the shared ones.
fn source_routes(dir: &str) -> Routes {
    let src = services_dir().join(dir).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut routes: Routes = SHARED
        .iter()
        .map(|s| (s.to_string(), BTreeSet::from(["get".to_string()])))
        .collect();
    for f in &files {
        for (path, methods) in route_literals(&non_test_source(f)) {
            routes.entry(normalize(&path)).or_default().extend(methods);
        }
    }
    if dir == "storage" {
        // The key administration is an s3s route matched on `/{ADMIN_PREFIX}/…`; its
        // methods are the `Method::…` arms of its `call`.
        let jobs = std::fs::read_to_string(src.join("jobs.rs")).unwrap();
        let prefix = jobs
            .split("pub const ADMIN_PREFIX: &str = \"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("ADMIN_PREFIX in storage/src/jobs.rs");
        let admin = non_test_source(&src.join("server/admin.rs"));
        let call = admin
            .split("async fn call(")
            .nth(1)
            .expect("AdminRoute::call in storage/src/server/admin.rs");
        let methods: BTreeSet<String> = METHODS
            .iter()
            .filter(|m| call.contains(&format!("Method::{}", m.to_uppercase())))
            .map(|m| m.to_string())
            .collect();
        let mut rest = admin.as_str();
        let needle = "format!(\"/{ADMIN_PREFIX}";
        while let Some(i) = rest.find(needle) {
            rest = &rest[i + needle.len()..];
            let tail = rest.split('"').next().unwrap();
            routes.insert(format!("/{prefix}{tail}"), methods.clone());
        }
    }
    routes
}

/// The documented operations of each path (path items behind `$ref` resolved).
fn documented_routes(doc: &Value) -> Routes {
    let mut routes = Routes::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        let item = resolve(doc, item);
        let methods = item
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.as_str())
            .filter(|k| METHODS.contains(k))
            .map(str::to_string)
            .collect();
        routes.insert(path.clone(), methods);
    }
    routes
}

fn resolve<'a>(doc: &'a Value, item: &'a Value) -> &'a Value {
    match item.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap_or_default();
            &doc["components"]["pathItems"][name]
        }
        None => item,
    }
}

/// What is wrong between the source's routes and the documented ones. A route the source
/// declares with `any` (or as a service) must document at least one method.
fn mismatches(declared: &Routes, documented: &Routes) -> Vec<String> {
    let mut out = Vec::new();
    for (path, methods) in declared {
        match documented.get(path) {
            None => out.push(format!("undocumented route {path}")),
            Some(doc) if methods.contains("any") => {
                if doc.is_empty() {
                    out.push(format!("{path} documents no operation"));
                }
            }
            Some(doc) if doc != methods => out.push(format!(
                "{path}: the source has {methods:?}, the document {doc:?}"
            )),
            Some(_) => {}
        }
    }
    for path in documented.keys() {
        if !declared.contains_key(path) {
            out.push(format!("documented route {path} is not in the source"));
        }
    }
    out
}

struct Up {
    child: Child,
    _state: tempfile::TempDir,
    ports: Vec<u16>,
    admin_token: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

fn start_all() -> Up {
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dutgate"));
    cmd.env("DUTGATE_CONFIG", "/dev/null")
        .env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("DUTGATE_") && k.contains("__") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--state-dir").arg(state.path()).arg("up");
    let mut ports = Vec::new();
    for (svc, _) in SERVICES {
        let p = free_port();
        ports.push(p);
        cmd.env(
            format!("DUTGATE_GATEWAY__PORTS__{}", svc.to_uppercase()),
            p.to_string(),
        );
    }
    cmd.env("DUTGATE_GATEWAY__BIND_ADDRESS", "127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().unwrap();
    let token_path = state.path().join("tokens").join("admin");
    let started = Instant::now();
    let admin_token = loop {
        if let Ok(t) = std::fs::read_to_string(&token_path)
            && !t.trim().is_empty()
        {
            break t.trim().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "dutgate up wrote no admin token"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Up {
        child,
        _state: state,
        ports,
        admin_token,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn wait_healthy(http: &reqwest::Client, port: u16, svc: &str) {
    let started = Instant::now();
    loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{svc} did not answer /healthz within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn route_literals_are_found_across_lines() {
    let src = "Router::new()\n    .route(\"/a/{id}\", get(get_a).patch(patch_a))\n    .route(\n        \"/b/{*rest}\",\n        any(y),\n    )\n    .route(\"/c\", axum::routing::delete(delete_c))\n    .route_service(\"/d\", s)\n    .route(&name)";
    let found: Vec<(String, Vec<String>)> = route_literals(src)
        .into_iter()
        .map(|(p, m)| (normalize(&p), m.into_iter().collect()))
        .collect();
    let want = |p: &str, m: &[&str]| (p.to_string(), m.iter().map(|s| s.to_string()).collect());
    assert_eq!(
        found,
        [
            want("/a/{id}", &["get", "patch"]),
            want("/b/{rest}", &["any"]),
            want("/c", &["delete"]),
            want("/d", &["any"]),
        ]
    );
}

#[test]
fn a_missing_method_or_path_is_reported() {
    let set = |m: &[&str]| m.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let declared = Routes::from([
        ("/a".to_string(), set(&["get", "post"])),
        ("/v2".to_string(), set(&["any"])),
    ]);
    let mut documented = declared.clone();
    documented.insert("/v2".into(), set(&["get"]));
    assert!(mismatches(&declared, &documented).is_empty());
    documented.insert("/a".into(), set(&["get"]));
    documented.insert("/old".into(), set(&["get"]));
    let found = mismatches(&declared, &documented);
    assert_eq!(found.len(), 2, "{found:?}");
    documented.remove("/v2");
    assert_eq!(mismatches(&declared, &documented).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_an_openapi_document_matching_its_routes() {
    let up = start_all();
    let http = client();
    let mut failures = Vec::new();
    for ((svc, dir), port) in SERVICES.iter().zip(&up.ports) {
        wait_healthy(&http, *port, svc).await;
        let base = format!("http://127.0.0.1:{port}");

        // (1) The document: no token, JSON, OpenAPI 3.x, exactly the source's routes.
        let r = http
            .get(format!("{base}/api/v1/openapi.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{svc}: GET /api/v1/openapi.json");
        assert_eq!(
            r.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{svc}"
        );
        let doc: Value = serde_json::from_slice(&r.bytes().await.unwrap())
            .unwrap_or_else(|e| panic!("{svc}: the document is not JSON: {e}"));
        let version = doc["openapi"].as_str().unwrap_or_default();
        assert!(
            version.starts_with("3."),
            "{svc}: openapi = {:?}",
            doc["openapi"]
        );
        assert!(doc["info"]["title"].is_string(), "{svc}: no info.title");
        let paths = doc["paths"]
            .as_object()
            .unwrap_or_else(|| panic!("{svc}: no paths object"));
        let problems = mismatches(&source_routes(dir), &documented_routes(&doc));
        if !problems.is_empty() {
            failures.push(format!(
                "{svc} (services/{dir}/openapi.yaml): {}",
                problems.join("; ")
            ));
        }

        // (2) Each documented GET without path parameters exists on the running service.
        for (path, item) in paths {
            if path.contains('{') {
                continue;
            }
            let item = resolve(&doc, item);
            let Some(get) = item.get("get") else {
                continue;
            };
            // A long-poll is asked not to wait.
            let waits = get["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == "timeout"));
            let url = if waits {
                format!("{base}{path}?timeout=0")
            } else {
                format!("{base}{path}")
            };
            let r = http
                .get(&url)
                .bearer_auth(&up.admin_token)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{svc}: GET {url}: {e}"));
            if r.status() == 404 {
                let body = r.text().await.unwrap_or_default();
                failures.push(format!("{svc}: GET {path} answered 404: {body}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
