//! Every service serves its OpenAPI document at `GET /api/v1/openapi.json` (no token), and the
//! document lists exactly the routes the service's source declares: an endpoint added without
//! documentation, or documented but removed, fails here. Each documented GET route without
//! path parameters is then asked on the running service and must exist (no 404).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

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

fn services_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The service's source files, without its test harness (`src/testing/`, feature `testing`:
/// fake artifact servers and the like, which are not the service's routes) and without
/// pdudaemon's API (the pdu service serves it on a listener of its own, in pdudaemon's shape,
/// documented in docs/pdu.md rather than in the service's OpenAPI document).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        // pdudaemon's API (docs/pdu.md) and the executor's dashboard pages (docs/dashboard.md)
        // are not part of the REST API.
        if p.file_stem()
            .is_some_and(|n| n == "testing" || n == "pdudaemon" || n == "ui")
        {
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
    // Dropped first: stops `dutgate up` before its state dir goes.
    _gateway: common::Gateway,
    _state: tempfile::TempDir,
    ports: Vec<u16>,
    admin_token: String,
    user_token: String,
}

fn start_all() -> Up {
    let state = tempfile::tempdir().unwrap();
    let gateway = common::Gateway::start(
        &state.path().join("state"),
        &common::SERVICES,
        Duration::from_secs(60),
    );
    let ports = gateway.ports.clone();
    let token = |name: &str| {
        let path = state.path().join("state").join("tokens").join(name);
        let started = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(&path)
                && !t.trim().is_empty()
            {
                return t.trim().to_string();
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "dutgate up wrote no {name} token"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let admin_token = token("admin");
    let user_token = token("user");
    Up {
        _gateway: gateway,
        _state: state,
        ports,
        admin_token,
        user_token,
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

/// `$ref` → the value it points at (only local refs are used in the documents).
fn deref<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    let mut v = v;
    for _ in 0..8 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                v = doc
                    .pointer(r.trim_start_matches('#'))
                    .unwrap_or_else(|| panic!("dangling $ref {r}"));
            }
            None => break,
        }
    }
    v
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => true,
    }
}

/// The ways `v` does not match `schema`: the JSON Schema keywords the documents use (`type`,
/// `required`, `properties`, `additionalProperties`, `items`, `enum`, `const`, `oneOf`
/// (as any-of), `allOf`, `$ref`).
fn schema_errors(doc: &Value, schema: &Value, v: &Value, at: &str) -> Vec<String> {
    errors_in(doc, schema, v, at, true)
}

/// The property names a schema describes, its `allOf` members' included.
fn known_properties<'a>(doc: &'a Value, schema: &'a Value, out: &mut BTreeSet<&'a str>) {
    let schema = deref(doc, schema);
    for k in schema["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        out.insert(k.as_str());
    }
    for s in schema["allOf"].as_array().into_iter().flatten() {
        known_properties(doc, s, out);
    }
}

/// `strict`: a property the schema (with its `allOf` members) does not describe is an error;
/// off inside `allOf` members, which each describe part of the object.
fn errors_in(doc: &Value, schema: &Value, v: &Value, at: &str, strict: bool) -> Vec<String> {
    let schema = deref(doc, schema);
    let mut errs = Vec::new();
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() && !types.iter().any(|t| type_matches(t, v)) {
        return vec![format!("{at}: {v} is not {types:?}")];
    }
    if let Some(values) = schema["enum"].as_array()
        && !values.contains(v)
    {
        errs.push(format!("{at}: {v} is not one of {values:?}"));
    }
    if let Some(c) = schema.get("const")
        && c != v
    {
        errs.push(format!("{at}: {v} is not {c}"));
    }
    if let Some(all) = schema["allOf"].as_array() {
        for s in all {
            errs.extend(errors_in(doc, s, v, at, false));
        }
    }
    if let Some(any) = schema["oneOf"].as_array()
        && !any.iter().any(|s| schema_errors(doc, s, v, at).is_empty())
    {
        errs.push(format!("{at}: {v} matches none of oneOf"));
    }
    if let Some(obj) = v.as_object() {
        for k in schema["required"].as_array().into_iter().flatten() {
            if let Some(k) = k.as_str()
                && !obj.contains_key(k)
            {
                errs.push(format!("{at}: missing required {k:?}"));
            }
        }
        let props = schema["properties"].as_object();
        let mut known = BTreeSet::new();
        known_properties(doc, schema, &mut known);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => errs.extend(schema_errors(doc, s, val, &format!("{at}.{k}"))),
                None => match schema.get("additionalProperties") {
                    Some(s @ Value::Object(_)) => {
                        errs.extend(schema_errors(doc, s, val, &format!("{at}.{k}")))
                    }
                    // Objects the documents describe field by field must not grow silently.
                    _ if strict && !known.is_empty() && !known.contains(k.as_str()) => {
                        errs.push(format!("{at}: undocumented property {k:?}"))
                    }
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, val) in arr.iter().enumerate() {
            errs.extend(schema_errors(doc, items, val, &format!("{at}[{i}]")));
        }
    }
    errs
}

/// Checks an answer against the document: its status is documented for the operation and a
/// JSON body matches the documented schema.
async fn check_answer(
    doc: &Value,
    template: &str,
    method: &str,
    r: reqwest::Response,
) -> Result<Value, String> {
    let status = r.status().as_u16().to_string();
    let is_json = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let body = r.bytes().await.map_err(|e| e.to_string())?;
    let item = resolve(doc, &doc["paths"][template]);
    let op = &item[method];
    let Some(resp) = op["responses"].get(&status) else {
        return Err(format!(
            "{} {template} answered {status}, not documented: {}",
            method.to_uppercase(),
            String::from_utf8_lossy(&body)
        ));
    };
    if !is_json {
        return Ok(Value::Null);
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let resp = deref(doc, resp);
    if let Some(schema) = resp["content"]["application/json"].get("schema") {
        let errs = schema_errors(doc, schema, &v, "$");
        if !errs.is_empty() {
            return Err(format!(
                "{} {template} ({status}): {}",
                method.to_uppercase(),
                errs.join("; ")
            ));
        }
    }
    Ok(v)
}

#[test]
fn the_schema_check_finds_wrong_answers() {
    let doc: Value = serde_json::json!({"components": {"schemas": {
        "Thing": {"type": "object", "required": ["id", "state"], "properties": {
            "id": {"type": "integer"},
            "state": {"type": "string", "enum": ["ON", "OFF"]},
            "note": {"type": ["string", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}}
        }}
    }}});
    let schema = serde_json::json!({"$ref": "#/components/schemas/Thing"});
    let more = serde_json::json!({"allOf": [schema, {"type": "object", "required": ["seq"],
        "properties": {"seq": {"type": "integer"}}}]});
    let with_seq = serde_json::json!({"id": 1, "state": "ON", "seq": 3});
    assert_eq!(
        schema_errors(&doc, &more, &with_seq, "$"),
        Vec::<String>::new()
    );
    assert_eq!(
        schema_errors(
            &doc,
            &more,
            &serde_json::json!({"id": 1, "state": "ON", "x": 1}),
            "$"
        )
        .len(),
        2,
        "missing seq and undocumented x"
    );
    let ok = serde_json::json!({"id": 1, "state": "ON", "note": null, "tags": ["a"]});
    assert_eq!(schema_errors(&doc, &schema, &ok, "$"), Vec::<String>::new());
    for bad in [
        serde_json::json!({"id": 1}),
        serde_json::json!({"id": "1", "state": "ON"}),
        serde_json::json!({"id": 1, "state": "DIM"}),
        serde_json::json!({"id": 1, "state": "ON", "tags": [1]}),
        serde_json::json!({"id": 1, "state": "ON", "colour": "red"}),
    ] {
        assert!(
            !schema_errors(&doc, &schema, &bad, "$").is_empty(),
            "{bad} passed"
        );
    }
}

const MAC: &str = "52:54:00:aa:bb:01";
const JOB: &str =
    "version: 1\ndeployment:\n  start:\n    kernel:\n      url: http://127.0.0.1:9/k\n";

/// A request that gives a service something to show, and the status it must get.
struct Step {
    svc: &'static str,
    method: &'static str,
    path: String,
    /// The document's path for it.
    template: &'static str,
    /// JSON, or the text of a YAML body.
    body: Option<Value>,
    admin: bool,
    expect: u16,
}

fn step(
    svc: &'static str,
    method: &'static str,
    path: impl Into<String>,
    template: &'static str,
    body: Option<Value>,
    admin: bool,
    expect: u16,
) -> Step {
    Step {
        svc,
        method,
        path: path.into(),
        template,
        body,
        admin,
        expect,
    }
}

fn populate() -> Vec<Step> {
    use serde_json::json;
    let pdu = json!({"name": "rack", "driver": "dummy", "config": {"ports": 2}});
    let machine = json!({"base_name": "qemu", "tags": ["cpu:arch:x86_64"], "mac_address": MAC,
                         "ip_address": "10.0.2.15"});
    let boot = json!({"kernel": {"url": "http://upstream.example/k", "cmdline": ["console=ttyS0"]},
                      "initramfs": {"url": "http://upstream.example/i"}, "job_id": "1"});
    let m = |p: &str| format!("/api/v1/machine/{MAC}{p}");
    vec![
        step(
            "pdu",
            "post",
            "/api/v1/pdus",
            "/api/v1/pdus",
            Some(pdu),
            true,
            201,
        ),
        step(
            "pdu",
            "get",
            "/api/v1/pdus/rack",
            "/api/v1/pdus/{name}",
            None,
            false,
            200,
        ),
        step(
            "pdu",
            "patch",
            "/api/v1/pdus/rack/ports/1",
            "/api/v1/pdus/{name}/ports/{id}",
            Some(json!({"state": "ON"})),
            true,
            200,
        ),
        step(
            "pdu",
            "get",
            "/api/v1/pdus/rack/ports/1/history",
            "/api/v1/pdus/{name}/ports/{id}/history",
            None,
            false,
            200,
        ),
        step(
            "mars",
            "post",
            "/api/v1/machine",
            "/api/v1/machine",
            Some(machine),
            false,
            201,
        ),
        step(
            "mars",
            "get",
            m(""),
            "/api/v1/machine/{id}",
            None,
            false,
            200,
        ),
        step(
            "mars",
            "get",
            m("/events"),
            "/api/v1/machine/{id}/events",
            None,
            false,
            200,
        ),
        step(
            "mars",
            "get",
            m("/training"),
            "/api/v1/machine/{id}/training",
            None,
            false,
            200,
        ),
        step(
            "mars",
            "get",
            "/api/v1/events?after=0&timeout=0",
            "/api/v1/events",
            None,
            false,
            200,
        ),
        step(
            "salad",
            "get",
            m(""),
            "/api/v1/machine/{id}",
            None,
            false,
            200,
        ),
        step(
            "boot",
            "put",
            format!("/api/v1/boot/{MAC}"),
            "/api/v1/boot/{mac}",
            Some(boot),
            true,
            200,
        ),
        step(
            "boot",
            "get",
            format!("/api/v1/boot/{MAC}"),
            "/api/v1/boot/{mac}",
            None,
            true,
            200,
        ),
        step(
            "executor",
            "post",
            format!("/api/v1/jobs?target_id={MAC}"),
            "/api/v1/jobs",
            Some(Value::String(JOB.into())),
            false,
            201,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/1",
            "/api/v1/jobs/{id}",
            None,
            false,
            200,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/1/events",
            "/api/v1/jobs/{id}/events",
            None,
            false,
            200,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/1/artifacts",
            "/api/v1/jobs/{id}/artifacts",
            None,
            false,
            200,
        ),
        step(
            "executor",
            "post",
            "/api/v1/jobs/1/cancel",
            "/api/v1/jobs/{id}/cancel",
            None,
            false,
            202,
        ),
        // Twice: the second one is the documented 409.
        step(
            "executor",
            "post",
            "/api/v1/jobs/1/cancel",
            "/api/v1/jobs/{id}/cancel",
            None,
            false,
            409,
        ),
        // Not a WebSocket upgrade.
        step(
            "executor",
            "get",
            "/api/v1/jobs/1/console/ws",
            "/api/v1/jobs/{id}/console/ws",
            None,
            false,
            400,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/1/console?follow=false",
            "/api/v1/jobs/{id}/console",
            None,
            false,
            200,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/1/console?offset=999999",
            "/api/v1/jobs/{id}/console",
            None,
            false,
            416,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/1/artifacts/events.json",
            "/api/v1/jobs/{id}/artifacts/{path}",
            None,
            false,
            200,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/1/artifacts/nope.txt",
            "/api/v1/jobs/{id}/artifacts/{path}",
            None,
            false,
            404,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs?state=FINISHED&limit=5",
            "/api/v1/jobs",
            None,
            false,
            200,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs?colour=red",
            "/api/v1/jobs",
            None,
            false,
            400,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/0",
            "/api/v1/jobs/{id}",
            None,
            false,
            400,
        ),
        step(
            "executor",
            "get",
            "/api/v1/jobs/99",
            "/api/v1/jobs/{id}",
            None,
            false,
            404,
        ),
        step(
            "mars",
            "patch",
            m(""),
            "/api/v1/machine/{id}",
            Some(json!({"comment": "x"})),
            true,
            200,
        ),
        step(
            "mars",
            "patch",
            m(""),
            "/api/v1/machine/{id}",
            Some(json!({"comment": "x"})),
            false,
            403,
        ),
        step(
            "mars",
            "post",
            m("/retire"),
            "/api/v1/machine/{id}/retire",
            None,
            true,
            200,
        ),
        step(
            "mars",
            "post",
            m("/retire"),
            "/api/v1/machine/{id}/retire",
            None,
            true,
            409,
        ),
        step(
            "mars",
            "post",
            m("/activate"),
            "/api/v1/machine/{id}/activate",
            Some(json!({"reason": "back"})),
            true,
            200,
        ),
        step(
            "mars",
            "get",
            m("/training/loop/0"),
            "/api/v1/machine/{id}/training/loop/{n}",
            None,
            false,
            404,
        ),
        step(
            "mars",
            "get",
            "/api/v1/machine/nope",
            "/api/v1/machine/{id}",
            None,
            false,
            400,
        ),
        step(
            "mars",
            "get",
            "/api/v1/machines?colour=red",
            "/api/v1/machines",
            None,
            false,
            400,
        ),
        step(
            "mars",
            "post",
            "/api/v1/leases",
            "/api/v1/leases",
            Some(json!({"machine_id": MAC, "job_id": "1", "holder": "t"})),
            true,
            409,
        ),
        step(
            "mars",
            "post",
            "/api/v1/leases/batch",
            "/api/v1/leases/batch",
            Some(json!({"leases": [{"machine_id": MAC, "job_id": "1", "holder": "t"}]})),
            true,
            200,
        ),
        step(
            "mars",
            "post",
            "/api/v1/leases/nope/heartbeat",
            "/api/v1/leases/{lease}/heartbeat",
            None,
            true,
            410,
        ),
        step(
            "mars",
            "post",
            "/api/v1/leases/nope/release",
            "/api/v1/leases/{lease}/release",
            Some(json!({"outcome": "ok"})),
            true,
            410,
        ),
        step(
            "mars",
            "post",
            "/api/v1/machine/discover",
            "/api/v1/machine/discover",
            Some(json!({"pdu": "rack", "port_id": "2", "timeout": 30})),
            true,
            201,
        ),
        step(
            "mars",
            "get",
            "/api/v1/machine/discover",
            "/api/v1/machine/discover",
            None,
            false,
            200,
        ),
        step(
            "mars",
            "delete",
            "/api/v1/machine/discover",
            "/api/v1/machine/discover",
            None,
            true,
            200,
        ),
        step(
            "pdu",
            "post",
            "/api/v1/pdus/rack/ports/2/cycle",
            "/api/v1/pdus/{name}/ports/{id}/cycle",
            Some(json!({"off_seconds": 0})),
            true,
            200,
        ),
        step(
            "pdu",
            "post",
            "/api/v1/pdus/rack/refresh",
            "/api/v1/pdus/{name}/refresh",
            None,
            true,
            200,
        ),
        step(
            "pdu",
            "get",
            "/api/v1/pdus/rack/ports",
            "/api/v1/pdus/{name}/ports",
            None,
            false,
            200,
        ),
        step(
            "pdu",
            "get",
            "/api/v1/pdus/rack/ports/9",
            "/api/v1/pdus/{name}/ports/{id}",
            None,
            false,
            404,
        ),
        step(
            "pdu",
            "post",
            "/api/v1/pdus",
            "/api/v1/pdus",
            Some(json!({"name": "rack", "driver": "dummy", "config": {"ports": 2}})),
            true,
            409,
        ),
        step(
            "pdu",
            "delete",
            "/api/v1/pdus/rack",
            "/api/v1/pdus/{name}",
            None,
            false,
            403,
        ),
        step(
            "pdu",
            "delete",
            "/api/v1/pdus/rack",
            "/api/v1/pdus/{name}",
            None,
            true,
            204,
        ),
        step(
            "salad",
            "get",
            m("/log?since=0"),
            "/api/v1/machine/{id}/log",
            None,
            false,
            200,
        ),
        step(
            "salad",
            "get",
            m("/log?limit=0"),
            "/api/v1/machine/{id}/log",
            None,
            false,
            400,
        ),
        step(
            "salad",
            "delete",
            m(""),
            "/api/v1/machine/{id}",
            None,
            true,
            204,
        ),
        step(
            "salad",
            "delete",
            m(""),
            "/api/v1/machine/{id}",
            None,
            true,
            404,
        ),
        step(
            "boot",
            "get",
            format!("/boot/{MAC}/boot.ipxe?platform=efi"),
            "/boot/{mac}/boot.ipxe",
            None,
            false,
            200,
        ),
        step(
            "boot",
            "delete",
            format!("/api/v1/boot/{MAC}?job_id=2"),
            "/api/v1/boot/{mac}",
            None,
            true,
            409,
        ),
        step(
            "boot",
            "delete",
            format!("/api/v1/boot/{MAC}?job_id=1"),
            "/api/v1/boot/{mac}",
            None,
            true,
            204,
        ),
        step(
            "boot",
            "get",
            format!("/api/v1/boot/{MAC}"),
            "/api/v1/boot/{mac}",
            None,
            true,
            404,
        ),
        // A user reads no boot config: they carry the jobs' keys.
        step(
            "boot",
            "get",
            format!("/api/v1/boot/{MAC}"),
            "/api/v1/boot/{mac}",
            None,
            false,
            403,
        ),
        step(
            "boot",
            "put",
            format!("/api/v1/boot/{MAC}"),
            "/api/v1/boot/{mac}",
            Some(json!({"kernel": {"url": "http://x/k", "sha256": "zz"}})),
            true,
            422,
        ),
        step(
            "boot",
            "get",
            "/artifacts/nope/vmlinuz",
            "/artifacts/{id}/{name}",
            None,
            false,
            404,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_an_openapi_document_matching_its_routes() {
    let up = start_all();
    let http = client();
    let mut failures = Vec::new();
    let mut docs = BTreeMap::new();
    let base = |svc: &str| {
        let i = SERVICES.iter().position(|(s, _)| *s == svc).unwrap();
        format!("http://127.0.0.1:{}", up.ports[i])
    };

    // (1) The documents: no token, JSON, OpenAPI 3.x, exactly the source's routes.
    for ((svc, dir), port) in SERVICES.iter().zip(&up.ports) {
        wait_healthy(&http, *port, svc).await;
        let r = http
            .get(format!("{}/api/v1/openapi.json", base(svc)))
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
        assert!(doc["paths"].is_object(), "{svc}: no paths object");
        let problems = mismatches(&source_routes(dir), &documented_routes(&doc));
        if !problems.is_empty() {
            failures.push(format!(
                "{svc} (services/{dir}/openapi.yaml): {}",
                problems.join("; ")
            ));
        }
        docs.insert(*svc, doc);
    }

    // (2) Objects on every service, through documented operations; answers as documented.
    for st in populate() {
        let token = if st.admin {
            &up.admin_token
        } else {
            &up.user_token
        };
        let url = format!("{}{}", base(st.svc), st.path);
        let mut req = http
            .request(st.method.to_uppercase().parse().unwrap(), &url)
            .bearer_auth(token);
        req = match st.body {
            Some(Value::String(text)) => req.body(text),
            Some(json) => req.json(&json),
            None => req,
        };
        let r = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let what = format!("{}: {} {}", st.svc, st.method.to_uppercase(), st.path);
        if r.status().as_u16() != st.expect {
            let got = r.status();
            let body = r.text().await.unwrap_or_default();
            failures.push(format!(
                "{what} answered {got}, expected {}: {body}",
                st.expect
            ));
            continue;
        }
        if let Err(e) = check_answer(&docs[st.svc], st.template, st.method, r).await {
            failures.push(format!("{}: {e}", st.svc));
        }
    }

    // The SSE form of the events of the (finished) job: every event, ending with `finished`.
    let r = http
        .get(format!("{}/api/v1/jobs/1/events", base("executor")))
        .bearer_auth(&up.user_token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let documented =
        docs["executor"]["paths"]["/api/v1/jobs/{id}/events"]["get"]["responses"]["200"]["content"]
            .get("text/event-stream")
            .is_some();
    let sse = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    let text = r.text().await.unwrap_or_default();
    if !(documented && sse && text.contains("event: submitted") && text.contains("event: finished"))
    {
        failures.push(format!(
            "executor: the SSE event stream is not as documented (documented: {documented}, \
             text/event-stream: {sse}): {text}"
        ));
    }

    // (3) Each documented GET without path parameters exists on the running service, and
    // answers as documented.
    for (svc, doc) in &docs {
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            if path.contains('{') {
                continue;
            }
            let Some(get) = resolve(doc, item).get("get") else {
                continue;
            };
            // A long-poll is asked not to wait.
            let waits = get["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| deref(doc, p)["name"] == "timeout"));
            let url = if waits {
                format!("{}{path}?timeout=0", base(svc))
            } else {
                format!("{}{path}", base(svc))
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
                continue;
            }
            if let Err(e) = check_answer(doc, path, "get", r).await {
                failures.push(format!("{svc}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
