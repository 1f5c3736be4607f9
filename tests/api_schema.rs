//! The answers of a scenario checked against the OpenAPI documents the services serve (each
//! derived from its handlers): every answer must belong to a documented operation of the
//! service it came from, with its status documented (or the `default` error answer), and a
//! JSON answer must validate against the documented schema. Failures are collected, with the
//! request line, and reported at the end with a count per route and the operations the
//! scenario never asked.
//!
//! A scenario loads the documents ([`ApiSchema::load`]) once its gateway is up and
//! [`activate`]s the checker: from then on [`crate::raw_http::exchange`] hands it every answer
//! from a registered port ([`observe`]).

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{Value, json};

use crate::raw_http::{RawRequest, RawResponse, exchange};

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// One documented operation.
#[derive(Debug, Clone)]
struct Operation {
    method: String,
    template: String,
    /// The template's segments (`{x}` is a parameter).
    segments: Vec<String>,
    responses: Value,
}

impl Operation {
    fn literal_segments(&self) -> usize {
        self.segments.iter().filter(|s| !is_param(s)).count()
    }

    /// Whether `path` (without its query) is an instance of this template: each `{x}` stands
    /// for one non-empty segment, the last one for the rest of the path too.
    fn matches(&self, path: &[&str]) -> bool {
        let n = self.segments.len();
        if path.len() < n {
            return false;
        }
        for (i, seg) in self.segments.iter().enumerate() {
            if is_param(seg) {
                if path[i].is_empty() {
                    return false;
                }
                if i + 1 == n {
                    return true;
                }
            } else if seg != path[i] {
                return false;
            }
        }
        path.len() == n
    }
}

fn is_param(segment: &str) -> bool {
    segment.starts_with('{') && segment.ends_with('}')
}

/// One service's document and its operations.
#[derive(Debug)]
struct Service {
    name: String,
    doc: Value,
    operations: Vec<Operation>,
}

impl Service {
    fn new(name: &str, doc: Value) -> Self {
        let mut operations = Vec::new();
        for (template, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in METHODS {
                if let Some(op) = item.get(method) {
                    operations.push(Operation {
                        method: method.to_uppercase(),
                        template: template.clone(),
                        segments: template.split('/').map(str::to_string).collect(),
                        responses: op["responses"].clone(),
                    });
                }
            }
        }
        Self {
            name: name.to_string(),
            doc,
            operations,
        }
    }

    /// The operation `method path` belongs to: the matching template with the most literal
    /// segments. A trailing slash is tried without it too (an alias).
    fn operation(&self, method: &str, path: &str) -> Option<&Operation> {
        let find = |path: &str| {
            let segments: Vec<&str> = path.split('/').collect();
            self.operations
                .iter()
                .filter(|op| op.method == method && op.matches(&segments))
                .max_by_key(|op| (op.literal_segments(), op.segments.len()))
        };
        let exact = find(path);
        let alias = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .and_then(find);
        match (exact, alias) {
            (Some(e), Some(a)) if a.literal_segments() > e.literal_segments() => Some(a),
            (e, a) => e.or(a),
        }
    }

    /// Follows a `$ref` into this document.
    fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        for _ in 0..8 {
            let Some(pointer) = v.get("$ref").and_then(Value::as_str) else {
                break;
            };
            match pointer.strip_prefix('#').and_then(|p| self.doc.pointer(p)) {
                Some(target) => v = target,
                None => break,
            }
        }
        v
    }

    /// What is wrong with `answer` to `op`, if anything.
    fn check(
        &self,
        op: &Operation,
        status: u16,
        content_type: Option<&str>,
        body: &str,
    ) -> Result<(), String> {
        let responses = &op.responses;
        let range = format!("{}XX", status / 100);
        let Some(response) = responses
            .get(status.to_string())
            .or_else(|| responses.get(&range))
            .or_else(|| responses.get("default"))
        else {
            return Err(format!(
                "status {status} is not documented (and no default)"
            ));
        };
        let response = self.resolve(response);
        // A HEAD answer has the headers of a GET and no body.
        let Some(media) = content_type
            .map(media_type)
            .filter(|m| is_json(m) && op.method != "HEAD")
        else {
            return Ok(());
        };
        let content = response["content"].as_object();
        let documented = content.and_then(|c| {
            c.get(&media).or_else(|| {
                c.iter()
                    .find(|(k, _)| is_json(&media_type(k)))
                    .map(|(_, v)| v)
            })
        });
        let Some(documented) = documented else {
            return Err(format!(
                "a JSON answer ({media}) where the documented {status} answer has {:?}",
                content
                    .map(|c| c.keys().collect::<Vec<_>>())
                    .unwrap_or_default()
            ));
        };
        let Some(schema) = documented.get("schema") else {
            return Ok(());
        };
        let instance: Value = serde_json::from_str(body)
            .map_err(|e| format!("the {media} answer is not JSON ({e}): {}", clip(body)))?;
        let root = json!({"allOf": [schema], "components": self.doc["components"]});
        let validator = jsonschema::validator_for(&root)
            .map_err(|e| format!("the documented schema does not compile: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| format!("at {:?}: {e}", e.instance_path().to_string()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the answer does not validate: {}; answer: {}",
                errors.join("; "),
                clip(body)
            ))
        }
    }
}

/// `application/json; charset=utf-8` → `application/json`.
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn is_json(media: &str) -> bool {
    media == "application/json" || media.ends_with("+json")
}

fn clip(s: &str) -> String {
    let mut end = s.len().min(400);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    if end < s.len() {
        format!("{}…", &s[..end])
    } else {
        s.to_string()
    }
}

/// (service, method, template, status) → how many answers.
type Counts = BTreeMap<(String, String, String, u16), usize>;

/// The documents of a gateway's services and what the answers checked so far made of them.
#[derive(Debug, Default)]
pub struct ApiSchema {
    services: Vec<Service>,
    /// Port → index into `services`.
    ports: BTreeMap<u16, usize>,
    /// Service → the path prefix its document covers, when it speaks another protocol
    /// beside it (the S3 API of the `s3` service: S3's own, not in the document).
    scopes: BTreeMap<String, String>,
    counts: Mutex<Counts>,
    failures: Mutex<Vec<String>>,
}

impl ApiSchema {
    /// The documents, as (service name, the port it answers on, its OpenAPI document).
    pub fn new(documents: Vec<(String, u16, Value)>) -> Self {
        let mut schema = Self::default();
        for (name, port, doc) in documents {
            schema.ports.insert(port, schema.services.len());
            schema.services.push(Service::new(&name, doc));
        }
        schema
    }

    /// Answers of `service` to paths outside `prefix` are not checked.
    pub fn documented_only_under(mut self, service: &str, prefix: &str) -> Self {
        self.scopes.insert(service.to_string(), prefix.to_string());
        self
    }

    /// Each service's live `/api/v1/openapi.json`: (service name, its address), connected
    /// with `connect` (a scenario in a network namespace connects from inside it).
    pub fn load(
        services: &[(&str, SocketAddr)],
        connect: impl Fn(SocketAddr) -> io::Result<TcpStream>,
    ) -> Result<Self, String> {
        let mut documents = Vec::new();
        for (name, addr) in services {
            let fail = |e: String| format!("{name}: GET {addr}/api/v1/openapi.json: {e}");
            let stream = connect(*addr).map_err(|e| fail(e.to_string()))?;
            let r = exchange(
                stream,
                &RawRequest::get("/api/v1/openapi.json").to_bytes(&addr.to_string()),
                Duration::from_secs(20),
            )
            .map_err(|e| fail(e.to_string()))?;
            if r.status != 200 {
                return Err(fail(format!("status {}: {}", r.status, clip(&r.body))));
            }
            let doc: Value =
                serde_json::from_str(&r.body).map_err(|e| fail(format!("not JSON: {e}")))?;
            documents.push((name.to_string(), addr.port(), doc));
        }
        Ok(Self::new(documents))
    }

    /// The service answering on `port`, if registered.
    pub fn service_on(&self, port: u16) -> Option<&str> {
        self.ports
            .get(&port)
            .map(|&i| self.services[i].name.as_str())
    }

    /// Checks one answer of `service` to `method path_and_query`; a failure is recorded,
    /// not raised.
    pub fn check(
        &self,
        service: &str,
        method: &str,
        path_and_query: &str,
        status: u16,
        content_type: Option<&str>,
        body: &str,
    ) {
        let line = format!("{service}: {method} {path_and_query} -> {status}");
        let Some(svc) = self.services.iter().find(|s| s.name == service) else {
            return self.fail(format!("{line}: no document for service {service}"));
        };
        let path = path_and_query.split('?').next().unwrap_or("");
        let shared = ["/healthz", "/metrics", "/api/v1/openapi.json"];
        if let Some(prefix) = self.scopes.get(service)
            && !path.starts_with(prefix.as_str())
            && !shared.contains(&path)
        {
            return;
        }
        let Some(op) = svc.operation(method, path) else {
            return self.fail(format!("{line}: no such documented route"));
        };
        *lock(&self.counts)
            .entry((
                service.to_string(),
                op.method.clone(),
                op.template.clone(),
                status,
            ))
            .or_default() += 1;
        if let Err(e) = svc.check(op, status, content_type, body) {
            self.fail(format!("{line} ({}): {e}", op.template));
        }
    }

    /// Checks `response` to `request` (the bytes sent) on `port`, when a service answers there.
    pub fn observe(&self, port: u16, request: &[u8], response: &RawResponse) {
        let Some(service) = self.service_on(port) else {
            return;
        };
        let head = request.split(|&b| b == b'\r').next().unwrap_or_default();
        let head = String::from_utf8_lossy(head);
        let mut words = head.split(' ');
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        self.check(
            service,
            method,
            target,
            response.status,
            response.header("content-type"),
            &response.body,
        );
    }

    fn fail(&self, failure: String) {
        lock(&self.failures).push(failure);
    }

    pub fn failures(&self) -> Vec<String> {
        lock(&self.failures).clone()
    }

    /// The documented operations no answer came from: `service METHOD template`.
    pub fn never_hit(&self) -> Vec<String> {
        let counts = lock(&self.counts);
        let mut out = Vec::new();
        for svc in &self.services {
            for op in &svc.operations {
                let hit = counts
                    .keys()
                    .any(|(s, m, t, _)| *s == svc.name && *m == op.method && *t == op.template);
                if !hit {
                    out.push(format!("{} {} {}", svc.name, op.method, op.template));
                }
            }
        }
        out
    }

    /// A table of the answers per route (statuses with their counts), then the operations
    /// never asked, then the failures.
    pub fn report(&self) -> String {
        let mut rows: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
        for ((svc, method, template, status), n) in lock(&self.counts).iter() {
            rows.entry((svc.clone(), template.clone(), method.clone()))
                .or_default()
                .push(format!("{status}×{n}"));
        }
        let mut out = String::from("answers checked against the OpenAPI documents:\n");
        for ((svc, template, method), statuses) in &rows {
            out.push_str(&format!(
                "  {svc:<9} {method:<7} {template:<48} {}\n",
                statuses.join(" ")
            ));
        }
        let never = self.never_hit();
        out.push_str(&format!(
            "documented operations never asked: {}\n",
            never.len()
        ));
        for op in &never {
            out.push_str(&format!("  {op}\n"));
        }
        let failures = self.failures();
        out.push_str(&format!("failures: {}\n", failures.len()));
        for f in &failures {
            out.push_str(&format!("  {f}\n"));
        }
        out
    }

    /// Fails naming every documented operation never asked and every failure.
    pub fn assert_complete(&self) {
        let (never, failures) = (self.never_hit(), self.failures());
        let mut problems = Vec::new();
        if !never.is_empty() {
            problems.push(format!(
                "{} documented operations never asked:\n  {}",
                never.len(),
                never.join("\n  ")
            ));
        }
        if !failures.is_empty() {
            problems.push(format!(
                "{} answers not as documented:\n  {}",
                failures.len(),
                failures.join("\n  ")
            ));
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The checker [`observe`] hands answers to, once a scenario activated one.
static ACTIVE: RwLock<Option<Arc<ApiSchema>>> = RwLock::new(None);

/// From now on, answers from `schema`'s ports go to it.
pub fn activate(schema: Arc<ApiSchema>) {
    *ACTIVE.write().unwrap_or_else(|p| p.into_inner()) = Some(schema);
}

/// Answers are no longer checked.
pub fn deactivate() {
    *ACTIVE.write().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Hands an answer from `port` to the active checker, if any.
pub fn observe(port: u16, request: &[u8], response: &RawResponse) {
    let active = ACTIVE.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(schema) = active {
        schema.observe(port, request, response);
    }
}

// ---- for a service crate's own tests ------------------------------------------------------

/// A service's document lists exactly `expected` (`"GET /api/v1/…"`, in any order), every
/// operation with a success answer (2xx or a WebSocket's 101), the shared `default` answer and
/// an operation id of its own.
pub fn assert_operations(doc: &Value, expected: &[&str]) {
    let mut found = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let line = format!("{} {path}", method.to_uppercase());
            let codes: Vec<&String> = op["responses"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
                .collect();
            assert!(
                codes.iter().any(|c| c.starts_with('2') || *c == "101"),
                "{line}: no success answer in {codes:?}"
            );
            assert!(
                codes.iter().any(|c| *c == "default"),
                "{line}: no default answer"
            );
            let id = op["operationId"].as_str().unwrap_or_default().to_string();
            assert!(
                ids.insert(id.clone()),
                "{line}: operation id {id:?} used twice"
            );
            found.push(line);
        }
    }
    let mut expected: Vec<String> = expected.iter().map(|e| e.to_string()).collect();
    found.sort();
    expected.sort();
    assert_eq!(found, expected, "documented operations");
}

/// What is wrong with `body`, answered `status` to `method path` (a path or its template),
/// under `doc`: nothing when empty.
pub fn answer_errors(
    doc: &Value,
    method: &str,
    path: &str,
    status: u16,
    body: &Value,
) -> Vec<String> {
    let schema = ApiSchema::new(vec![("service".into(), 0, doc.clone())]);
    let method = method.to_uppercase();
    let body = body.to_string();
    schema.check(
        "service",
        &method,
        path,
        status,
        Some("application/json"),
        &body,
    );
    schema.failures()
}

/// `body`, answered `status` to `method path`, is valid under `doc`.
pub fn assert_answer(doc: &Value, method: &str, path: &str, status: u16, body: &Value) {
    let errors = answer_errors(doc, method, path, status, body);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// `body` is valid under the document's schema `components.schemas.<name>`.
pub fn assert_component(doc: &Value, name: &str, body: &Value) {
    let root =
        json!({"$ref": format!("#/components/schemas/{name}"), "components": doc["components"]});
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"));
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{name}: {}; in {body}",
        errors.join("; ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> Value {
        json!({
            "openapi": "3.1.0",
            "paths": {
                "/api/v1/machine/{id}": {"get": {"responses": {
                    "200": {"description": "x", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Machine"}}}},
                    "default": {"$ref": "#/components/responses/Error"}}}},
                "/api/v1/machine/discover": {"get": {"responses": {
                    "200": {"description": "x", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
                "/v2/{rest}": {"get": {"responses": {"200": {"description": "x"}}}},
                "/api/v1/jobs/{id}/artifacts/{path}": {"get": {"responses": {"200": {"description": "x"}}}}
            },
            "components": {
                "schemas": {
                    "Machine": {"type": "object", "required": ["id", "tags"], "properties": {
                        "id": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}},
                    "ErrorBody": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
                },
                "responses": {"Error": {"description": "e", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}}
            }
        })
    }

    fn schema() -> ApiSchema {
        ApiSchema::new(vec![("mars".into(), 8001, document())])
    }

    #[test]
    fn templates_match_segment_by_segment_and_literals_win() {
        let s = schema();
        let svc = &s.services[0];
        let template = |m: &str, p: &str| svc.operation(m, p).map(|o| o.template.clone());
        assert_eq!(
            template("GET", "/api/v1/machine/discover").as_deref(),
            Some("/api/v1/machine/discover")
        );
        assert_eq!(
            template("GET", "/api/v1/machine/52:54:00:00:00:01").as_deref(),
            Some("/api/v1/machine/{id}")
        );
        assert_eq!(template("GET", "/api/v1/machines/a"), None);
        assert_eq!(template("GET", "/api/v1/machine/"), None);
        assert_eq!(template("POST", "/api/v1/machine/x"), None);
        assert_eq!(
            template("GET", "/v2/library/alpine/manifests/3").as_deref(),
            Some("/v2/{rest}")
        );
        assert_eq!(
            template("GET", "/api/v1/jobs/7/artifacts/results/a.txt").as_deref(),
            Some("/api/v1/jobs/{id}/artifacts/{path}")
        );
        assert_eq!(
            template("GET", "/api/v1/machine/discover/").as_deref(),
            Some("/api/v1/machine/discover")
        );
    }

    #[test]
    fn answers_are_counted_and_checked() {
        let s = schema();
        let json = Some("application/json");
        s.check(
            "mars",
            "GET",
            "/api/v1/machine/m1?x=1",
            200,
            json,
            r#"{"id":"m1","tags":[]}"#,
        );
        s.check(
            "mars",
            "GET",
            "/api/v1/machine/m1",
            404,
            json,
            r#"{"error":"no"}"#,
        );
        s.check(
            "mars",
            "GET",
            "/api/v1/machine/discover",
            200,
            Some("text/plain"),
            "ok",
        );
        assert!(s.failures().is_empty(), "{:?}", s.failures());
        // A wrong field type, with its instance path; an error body that is not ErrorBody.
        s.check(
            "mars",
            "GET",
            "/api/v1/machine/m1",
            200,
            json,
            r#"{"id":"m1","tags":[1]}"#,
        );
        s.check(
            "mars",
            "GET",
            "/api/v1/machine/m1",
            404,
            json,
            r#"{"errors":[]}"#,
        );
        // No such route; a JSON answer where text is documented; status without default.
        s.check("mars", "GET", "/nope", 404, json, "{}");
        s.check("mars", "GET", "/api/v1/machine/discover", 200, json, "{}");
        s.check("mars", "GET", "/v2/x", 404, None, "");
        let failures = s.failures();
        assert_eq!(failures.len(), 5, "{failures:#?}");
        assert!(failures[0].contains("\"/tags/0\""), "{}", failures[0]);
        assert!(failures[1].contains("error"), "{}", failures[1]);
        assert!(failures[2].contains("no such documented route"));
        assert!(failures[3].contains("JSON answer"));
        assert!(failures[4].contains("not documented"));
        assert_eq!(
            s.never_hit(),
            vec!["mars GET /api/v1/jobs/{id}/artifacts/{path}".to_string()]
        );
        let report = s.report();
        assert!(report.contains("200×2 404×2"), "{report}");
        assert!(std::panic::catch_unwind(|| s.assert_complete()).is_err());
    }

    #[test]
    fn another_protocol_beside_the_document_is_not_checked() {
        let s = schema().documented_only_under("mars", "/api/");
        s.check(
            "mars",
            "GET",
            "/bucket/key",
            403,
            Some("application/xml"),
            "<Error/>",
        );
        s.check("mars", "GET", "/api/v2", 404, None, "");
        assert_eq!(s.failures().len(), 1, "{:?}", s.failures());
    }

    #[test]
    fn exchanged_answers_reach_the_active_checker() {
        let s = Arc::new(schema());
        let req = RawRequest::get("/api/v1/machine/m1").to_bytes("h");
        let answer = RawResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: r#"{"id":"m1","tags":["a"]}"#.into(),
        };
        s.observe(8001, &req, &answer);
        // Not a port of the gateway: not checked.
        s.observe(9999, &req, &answer);
        assert!(s.failures().is_empty(), "{:?}", s.failures());
        assert_eq!(lock(&s.counts).values().sum::<usize>(), 1);
    }
}
