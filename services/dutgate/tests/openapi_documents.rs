//! Every service serves its OpenAPI document at `GET /api/v1/openapi.json` (no token), derived
//! from its handlers; each is a valid OpenAPI 3.1 document for `openapi-spec-validator` (from
//! PyPI, in a venv under target/). Each documented GET route without path parameters is then
//! asked on the running service (admin token): it exists (no 404) and its answer is as
//! documented (`dutgate_e2e::api_schema`, the check the e2e scenarios run on every answer).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dutgate_e2e::api_schema::ApiSchema;
use dutgate_e2e::raw_http::{RawRequest, exchange};
use serde_json::Value;

mod common;

/// The validator release the documents are checked with.
const VALIDATOR: &str = "openapi-spec-validator==0.9.0";

/// `openapi-spec-validator` of `target/openapi-spec-validator-venv`, installed on first use.
fn validator() -> PathBuf {
    dutgate_core::testing::pypi_venv("openapi-spec-validator-venv", VALIDATOR)
        .join("openapi-spec-validator")
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
}

/// A token `dutgate up` wrote into the state dir.
fn token(state: &std::path::Path, name: &str) -> String {
    let path = state.join("tokens").join(name);
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
}

#[test]
fn every_service_serves_a_valid_openapi_document_its_answers_follow() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let gateway = common::Gateway::start(&state, &common::SERVICES, Duration::from_secs(60));
    let admin = token(&state, "admin");
    let addrs: Vec<(&str, SocketAddr)> = common::SERVICES
        .iter()
        .zip(&gateway.ports)
        .map(|(svc, port)| (*svc, SocketAddr::from(([127, 0, 0, 1], *port))))
        .collect();
    let schema = ApiSchema::load(&addrs, connect).unwrap_or_else(|e| panic!("{e}"));

    // (1) Valid OpenAPI documents, as a maintained validator reads them.
    let mut files = Vec::new();
    for (svc, addr) in &addrs {
        let r = exchange(
            connect(*addr).unwrap(),
            &RawRequest::get("/api/v1/openapi.json").to_bytes(&addr.to_string()),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.header("content-type"), Some("application/json"), "{svc}");
        let doc: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(doc["openapi"], "3.1.0", "{svc}");
        let file = tmp.path().join(format!("{svc}.json"));
        std::fs::write(&file, &r.body).unwrap();
        files.push(file);
    }
    let out = Command::new(validator())
        .args(["--schema", "3.1", "--validation-errors", "all"])
        .args(&files)
        .output()
        .expect("running openapi-spec-validator");
    assert!(
        out.status.success(),
        "openapi-spec-validator:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // (2) Each documented GET without path parameters exists and answers as documented.
    let mut missing = Vec::new();
    for ((svc, addr), file) in addrs.iter().zip(&files) {
        let doc: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            let Some(get) = item.get("get").filter(|_| !path.contains('{')) else {
                continue;
            };
            let mut req = RawRequest::get(path).bearer(&admin);
            // A long-poll is asked not to wait.
            if get["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == "timeout"))
            {
                req = req.query("timeout", "0");
            }
            let bytes = req.to_bytes(&addr.to_string());
            let r = exchange(connect(*addr).unwrap(), &bytes, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{svc}: GET {path}: {e}"));
            if r.status == 404 {
                missing.push(format!("{svc}: GET {path} answered 404: {}", r.body));
            }
            schema.observe(addr.port(), &bytes, &r);
        }
    }
    missing.extend(schema.failures());
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
