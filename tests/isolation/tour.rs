//! A tour of every documented route of the seven services, played at the end of the scenario
//! (its jobs are over, both machines IDLE) so that each documented operation is asked at
//! least once and its answer checked against its service's OpenAPI document: list and show
//! routes, a token created and revoked, a lease acquired, renewed and released, a PDU added,
//! switched and removed, a boot config put, read and deleted for a made-up MAC, a machine
//! registered, changed, retired and activated, two jobs submitted and cancelled, a bucket's
//! key pairs issued and revoked. Each call must get the status it is played for.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dutgate_e2e::raw_http::{RawRequest, RawResponse};
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::cases::{Case, Expect};
use super::routes::{dut_network, outsider};
use super::{BOOT, EXECUTOR, GATEWAY_IP, MARS, PDU, REGISTRY, S3, SALAD};

/// A MAC no DUT has: the tour's boot config, registration and console record.
const TOUR_MAC: &str = "52:54:00:77:77:02";

/// What the tour needs to know of the scenario.
pub struct Scenario<'a> {
    pub admin: &'a str,
    /// The gateway's `service` token.
    pub service: &'a str,
    /// An IDLE machine the tour leases (and whose console it opens).
    pub machine: &'a str,
    /// A finished job (alice's).
    pub job: i64,
    /// The description of a job the tour submits and cancels.
    pub job_yaml: &'a str,
    /// An upstream the outbound policy allows (the fixture server).
    pub upstream: &'a str,
    /// The embedded S3 endpoint's admin key pair.
    pub s3_keys: (&'a str, &'a str),
}

struct Tour<'a> {
    ask: &'a dyn Fn(&Case) -> Option<RawResponse>,
    failures: Vec<String>,
}

impl Tour<'_> {
    /// Plays `request` on `port` from `from`; a status outside `want` (any, when empty) is a
    /// failure. The answer's JSON, or `Null`.
    fn call(
        &mut self,
        what: &str,
        port: u16,
        from: IpAddr,
        request: RawRequest,
        want: &[u16],
    ) -> Value {
        let case = Case {
            what: format!("tour: {what}"),
            port,
            request,
            from,
            expect: Expect::text(want.first().copied().unwrap_or(0), &[]),
        };
        let Some(r) = (self.ask)(&case) else {
            self.failures.push(format!(
                "{} ({}): no answer",
                case.what,
                case.request.line()
            ));
            return Value::Null;
        };
        if !want.is_empty() && !want.contains(&r.status) {
            self.failures.push(format!(
                "{} ({}): status {} instead of {want:?}: {}",
                case.what,
                case.request.line(),
                r.status,
                r.body
            ));
        }
        serde_json::from_str(&r.body).unwrap_or(Value::Null)
    }
}

fn get(path: &str, token: &str) -> RawRequest {
    RawRequest::get(path).bearer(token)
}

fn send(method: &str, path: &str, token: &str, body: Option<Value>) -> RawRequest {
    let r = RawRequest::new(method, path).bearer(token);
    match body {
        Some(b) => r.json(b.to_string()),
        None => r,
    }
}

fn websocket(r: RawRequest) -> RawRequest {
    r.header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
}

/// JSON strings and numbers as path segments.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Plays the tour; its failures.
pub fn play(ask: &dyn Fn(&Case) -> Option<RawResponse>, s: &Scenario) -> Vec<String> {
    let mut t = Tour {
        ask,
        failures: Vec::new(),
    };
    let (a, out, dut) = (s.admin, outsider(), dut_network());

    // Every service: health, metrics, its document.
    for port in [EXECUTOR, MARS, REGISTRY, BOOT, PDU, SALAD, S3] {
        for path in ["/healthz", "/metrics", "/api/v1/openapi.json"] {
            t.call(path, port, out, RawRequest::get(path), &[200]);
        }
    }

    // pdu: a dummy PDU of the tour's, switched, cycled and (after discovery) removed.
    t.call("PDU drivers", PDU, out, get("/api/v1/drivers", a), &[200]);
    t.call("PDUs", PDU, out, get("/api/v1/pdus", a), &[200]);
    let pdu = json!({"name": "tour", "driver": "dummy", "config": {"ports": 2}});
    t.call(
        "add a PDU",
        PDU,
        out,
        send("POST", "/api/v1/pdus", a, Some(pdu)),
        &[201],
    );
    t.call("a PDU", PDU, out, get("/api/v1/pdus/tour", a), &[200]);
    let refresh = send("POST", "/api/v1/pdus/tour/refresh", a, None);
    t.call("refresh a PDU", PDU, out, refresh, &[200]);
    let ports = t.call(
        "PDU ports",
        PDU,
        out,
        get("/api/v1/pdus/tour/ports", a),
        &[200],
    );
    let port_id = text(&ports[0]["id"]);
    let port = format!("/api/v1/pdus/tour/ports/{port_id}");
    t.call("a PDU port", PDU, out, get(&port, a), &[200]);
    let on = send("PATCH", &port, a, Some(json!({"state": "ON"})));
    t.call("switch a port", PDU, out, on, &[200]);
    let cycle = send(
        "POST",
        &format!("{port}/cycle"),
        a,
        Some(json!({"off_seconds": 0})),
    );
    t.call("cycle a port", PDU, out, cycle, &[200]);
    // Discovery powers on a port that is OFF.
    let off = send("PATCH", &port, a, Some(json!({"state": "OFF"})));
    t.call("switch a port off", PDU, out, off, &[200]);
    let history = get(&format!("{port}/history"), a);
    t.call("port history", PDU, out, history, &[200]);
    t.call("pdu audit", PDU, out, get("/api/v1/audit", a), &[200]);

    // mars: reads, a discovery started and stopped on the tour's port, a made-up machine
    // registered from the DUT network, changed, retired and activated; a lease on the IDLE
    // machine acquired, renewed and released.
    let m = |p: &str| format!("/api/v1/machine/{}{p}", s.machine);
    t.call("machines", MARS, out, get("/api/v1/machines", a), &[200]);
    t.call("a machine", MARS, out, get(&m(""), a), &[200]);
    t.call("machine events", MARS, out, get(&m("/events"), a), &[200]);
    t.call(
        "training report",
        MARS,
        out,
        get(&m("/training"), a),
        &[200],
    );
    t.call(
        "training loop",
        MARS,
        out,
        get(&m("/training/loop/1"), a),
        &[200],
    );
    let discover = "/api/v1/machine/discover";
    t.call("discovery state", MARS, out, get(discover, a), &[200]);
    let start = json!({"pdu": "tour", "port_id": port_id, "timeout": 30});
    let start = send("POST", discover, a, Some(start));
    t.call("start a discovery", MARS, out, start, &[201]);
    let stop = send("DELETE", discover, a, None);
    t.call("stop a discovery", MARS, out, stop, &[200]);
    t.call(
        "delete a PDU",
        PDU,
        out,
        send("DELETE", "/api/v1/pdus/tour", a, None),
        &[204],
    );
    let registration = json!({"base_name": "tour", "tags": ["tour:tag:1"], "mac_address": TOUR_MAC,
        "ip_address": "10.77.0.199", "local_tty_device": "ttyS7"});
    let register = RawRequest::new("POST", "/api/v1/machine").json(registration.to_string());
    t.call("register a machine", MARS, dut, register, &[200, 201]);
    let tm = |p: &str| format!("/api/v1/machine/{TOUR_MAC}{p}");
    let patch = send("PATCH", &tm(""), a, Some(json!({"comment": "tour"})));
    t.call("change a machine", MARS, out, patch, &[200]);
    let retire = send("POST", &tm("/retire"), a, Some(json!({"reason": "tour"})));
    t.call("retire a machine", MARS, out, retire, &[200]);
    let activate = send("POST", &tm("/activate"), a, Some(json!({"reason": "tour"})));
    t.call("activate a machine", MARS, out, activate, &[200]);
    t.call("leases", MARS, out, get("/api/v1/leases", a), &[200]);
    let want = json!({"machine_id": s.machine, "job_id": "tour", "holder": "tour"});
    let acquire = send("POST", "/api/v1/leases", s.service, Some(want.clone()));
    let lease = text(&t.call("acquire a lease", MARS, out, acquire, &[201])["id"]);
    let beat = send(
        "POST",
        &format!("/api/v1/leases/{lease}/heartbeat"),
        s.service,
        None,
    );
    t.call("renew a lease", MARS, out, beat, &[200]);
    // The machine is leased: the batch answers 200 with the refusal of its one request.
    let batch = send(
        "POST",
        "/api/v1/leases/batch",
        s.service,
        Some(json!({"leases": [want]})),
    );
    t.call("acquire leases in a batch", MARS, out, batch, &[200]);
    let release = send(
        "POST",
        &format!("/api/v1/leases/{lease}/release"),
        s.service,
        Some(json!({"outcome": "ok"})),
    );
    t.call("release a lease", MARS, out, release, &[200]);
    let events = get("/api/v1/events", a).query("timeout", "0");
    t.call("mars events", MARS, out, events, &[200]);
    t.call("mars audit", MARS, out, get("/api/v1/audit", a), &[200]);

    // boot: a DUT's scripts and image, a boot config of the made-up MAC.
    let script = format!("/boot/{}/boot.ipxe", s.machine);
    t.call("boot script", BOOT, dut, RawRequest::get(&script), &[200]);
    let by_query = RawRequest::get("/boot.ipxe").query("mac", s.machine);
    t.call("default boot script", BOOT, dut, by_query, &[200]);
    let image = RawRequest::get("/dut-image/vmlinuz").header("range", "bytes=0-15");
    t.call("DUT image", BOOT, dut, image, &[206]);
    t.call("boot configs", BOOT, out, get("/api/v1/boot", a), &[200]);
    let config = format!("/api/v1/boot/{TOUR_MAC}");
    let body =
        json!({"kernel": {"url": format!("{}/tour-vmlinuz", s.upstream), "cmdline": "quiet"}});
    t.call(
        "put a boot config",
        BOOT,
        out,
        send("PUT", &config, a, Some(body)),
        &[200],
    );
    t.call("a boot config", BOOT, out, get(&config, a), &[200]);
    let delete = send("DELETE", &config, a, None);
    t.call("delete a boot config", BOOT, out, delete, &[204]);
    t.call(
        "boot cache",
        BOOT,
        out,
        get("/api/v1/boot-cache", a),
        &[200],
    );
    t.call("boot audit", BOOT, out, get("/api/v1/audit", a), &[200]);

    // salad: the made-up machine's console record, its expectation and secrets; the IDLE
    // machine's log, refusals and two-way console; a stream bound where it is.
    let c = |mac: &str, p: &str| format!("/api/v1/machine/{mac}{p}");
    t.call("consoles", SALAD, out, get("/api/v1/machine", a), &[200]);
    t.call("a console", SALAD, out, get(&c(TOUR_MAC, ""), a), &[200]);
    let expect = send("PUT", &c(TOUR_MAC, "/expect"), s.service, None);
    t.call("expect a boot", SALAD, out, expect, &[204]);
    let secrets = json!({"secrets": ["tour-secret-0123"]});
    let put = send("PUT", &c(TOUR_MAC, "/secrets"), s.service, Some(secrets));
    t.call("console secrets", SALAD, out, put, &[204]);
    let delete = send("DELETE", &c(TOUR_MAC, "/secrets"), s.service, None);
    t.call("forget console secrets", SALAD, out, delete, &[204]);
    t.call(
        "console log",
        SALAD,
        out,
        get(&c(s.machine, "/log"), a),
        &[200],
    );
    let refusals = get(&c(s.machine, "/refusals"), a);
    t.call("console refusals", SALAD, out, refusals, &[200]);
    let console = websocket(get(&c(s.machine, "/console"), a));
    t.call("two-way console", SALAD, out, console, &[101]);
    // A stream exists while its DUT is on: the IDLE machine is powered on at its PDU port
    // until salad opens its console, whose stream is bound again where it is.
    let record = t.call("the machine's PDU port", MARS, out, get(&m(""), a), &[200]);
    let machine_port = format!(
        "/api/v1/pdus/{}/ports/{}",
        text(&record["pdu"]),
        text(&record["pdu_port_id"])
    );
    let on = send("PATCH", &machine_port, a, Some(json!({"state": "ON"})));
    t.call("power the machine on", PDU, out, on, &[200]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        let ports = t.call(
            "console streams",
            SALAD,
            out,
            get("/api/v1/ports", a),
            &[200],
        );
        let found = ports["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["machine"] == s.machine)
            .cloned();
        if let Some(stream) = found {
            break stream;
        }
        if Instant::now() > deadline {
            t.failures.push(format!(
                "tour: no console stream of {} within 60 s: {ports}",
                s.machine
            ));
            break Value::Null;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let bind = send(
        "PUT",
        &format!("/api/v1/ports/{}/machine", text(&stream["id"])),
        a,
        Some(json!({"machine": s.machine})),
    );
    t.call("bind a stream", SALAD, out, bind, &[204]);
    let off = send("PATCH", &machine_port, a, Some(json!({"state": "OFF"})));
    t.call("power the machine off", PDU, out, off, &[200]);
    let forget = send("DELETE", &c(TOUR_MAC, ""), a, None);
    t.call("forget a console", SALAD, out, forget, &[204]);
    t.call("salad audit", SALAD, out, get("/api/v1/audit", a), &[200]);

    // registry: its version check and a manifest nobody cached (no upstream answers here).
    t.call(
        "registry stats",
        REGISTRY,
        out,
        get("/api/v1/registry/stats", a),
        &[200],
    );
    for path in ["/v2", "/v2/"] {
        t.call(
            "registry version",
            REGISTRY,
            dut,
            RawRequest::get(path),
            &[200],
        );
        let head = RawRequest::new("HEAD", path);
        t.call("registry version (HEAD)", REGISTRY, dut, head, &[200]);
    }
    let manifest = "/v2/tour/image/manifests/latest";
    t.call("a manifest", REGISTRY, dut, RawRequest::get(manifest), &[]);
    let head = RawRequest::new("HEAD", manifest);
    t.call("a manifest (HEAD)", REGISTRY, dut, head, &[]);

    // s3: a bucket's key pairs issued, listed and revoked with the admin key pair.
    let host = format!("{GATEWAY_IP}:{S3}");
    let signed =
        |r: RawRequest| r.signed(&host, s.s3_keys.0, s.s3_keys.1, OffsetDateTime::now_utc());
    let bucket = signed(RawRequest::new("PUT", "/tour-bucket"));
    t.call("create a bucket", S3, out, bucket, &[200]);
    let keys = "/dutgate-admin/v1/keys";
    let issue = signed(RawRequest::new("POST", keys).query("bucket", "tour-bucket"));
    t.call("issue keys", S3, out, issue, &[201]);
    t.call("keys", S3, out, signed(RawRequest::get(keys)), &[200]);
    let revoke = signed(RawRequest::new("DELETE", keys).query("bucket", "tour-bucket"));
    t.call("revoke keys", S3, out, revoke, &[200]);

    // executor: the finished job's records, tokens, DUTs, two jobs submitted and cancelled
    // (one through ci-tron's `//` path).
    let j = |p: &str| format!("/api/v1/jobs/{}{p}", s.job);
    t.call(
        "jobs",
        EXECUTOR,
        out,
        get("/api/v1/jobs", a).query("limit", "5"),
        &[200],
    );
    t.call("a job", EXECUTOR, out, get(&j(""), a), &[200]);
    t.call("job events", EXECUTOR, out, get(&j("/events"), a), &[200]);
    let sse = get(&j("/events"), a).header("accept", "text/event-stream");
    t.call("job events (SSE)", EXECUTOR, out, sse, &[200]);
    t.call("job console", EXECUTOR, out, get(&j("/console"), a), &[200]);
    let ws = websocket(get(&j("/console/ws"), a));
    t.call("job console WebSocket", EXECUTOR, out, ws, &[101]);
    t.call("job files", EXECUTOR, out, get(&j("/artifacts"), a), &[200]);
    let file = get(&j("/artifacts/console.log"), a);
    t.call("a job file", EXECUTOR, out, file, &[200]);
    let duts = t.call("DUTs", EXECUTOR, out, get("/api/v1/duts", a), &[200]);
    let name = duts["duts"]
        .as_object()
        .and_then(|d| d.keys().next().cloned())
        .unwrap_or_default();
    t.call(
        "DUTs (ci-tron's //)",
        EXECUTOR,
        out,
        get("//api/v1/duts", a),
        &[200],
    );
    let dut_path = format!("/api/v1/dut/{name}");
    t.call("a DUT", EXECUTOR, out, get(&dut_path, a), &[200]);
    let wait = get("/api/v1/stats/queue-wait", a);
    t.call("queue wait", EXECUTOR, out, wait, &[200]);
    t.call("tokens", EXECUTOR, out, get("/api/v1/tokens", a), &[200]);
    let token = json!({"name": "tour", "role": "user", "expires_days": 1});
    let create = send("POST", "/api/v1/tokens", a, Some(token));
    t.call("create a token", EXECUTOR, out, create, &[201]);
    let revoke = send("DELETE", "/api/v1/tokens/tour", a, None);
    t.call("revoke a token", EXECUTOR, out, revoke, &[200]);
    for (submit, cancel) in [
        ("/api/v1/jobs", "/api/v1/jobs"),
        ("//api/v1/jobs", "//api/v1/jobs"),
    ] {
        let job = RawRequest::new("POST", submit)
            .bearer(a)
            .query("target_id", s.machine)
            .header("content-type", "application/yaml")
            .body(s.job_yaml);
        let id = text(&t.call("submit a job", EXECUTOR, out, job, &[201])["id"]);
        let cancel = send("POST", &format!("{cancel}/{id}/cancel"), a, None);
        t.call("cancel a job", EXECUTOR, out, cancel, &[202]);
    }
    t.call(
        "executor audit",
        EXECUTOR,
        out,
        get("/api/v1/audit", a),
        &[200],
    );
    t.failures
}
