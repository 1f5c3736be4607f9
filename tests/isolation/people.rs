//! People on the bridged farm: the victim job is alice's, the attacker job bob's, each
//! submitted with a named user token an admin created. While alice's job runs, bob asks the
//! gateway to cancel it, hand him its files, write boot configs and take its console; each
//! is refused (403, a JSON reason) and audited with his name. Alice, its owner, types into
//! the same console and her keystrokes reach the DUT.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dutgate_e2e::farm::Farm;
use dutgate_e2e::netns::Netns;
use dutgate_e2e::raw_http::{RawRequest, exchange};
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

use super::cases::{Case, Expect};
use super::routes::{dut_network, outsider};
use super::{BOOT, EXECUTOR, GATEWAY_IP};

/// What bob's keystrokes must be answered with (the executor names the rule, not the owner).
pub const CONSOLE_REFUSAL: &str = "only its owner or an admin types into its console";

/// A named user token, created by the admin (`dutctl` takes the state dir's admin token).
pub fn create_user(farm: &Farm, name: &str) -> String {
    let out = farm.dutctl_ok(&["tokens", "create", name, "--role", "user", "-o", "json"]);
    let created: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("dutctl tokens create {name}: not JSON ({e}): {out}"));
    assert_eq!(
        (created["name"].as_str(), created["role"].as_str()),
        (Some(name), Some("user")),
        "dutctl tokens create {name}: {created:#}"
    );
    created["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("dutctl tokens create {name}: no token: {created:#}"))
        .to_string()
}

/// What bob asks of alice's job `job` (on `victim_mac`) and of boot configs, from a user's
/// workstation (loopback is not a DUT network on this farm) and from the DUT network.
pub fn bob_cases(bob: &str, job: i64, victim_mac: &str, own_mac: &str) -> Vec<Case> {
    let not_his = |action: &str| {
        Expect::json(403, &["another user", "only its owner or an admin"]).logged(&[
            "job access refused",
            "actor=bob",
            action,
        ])
    };
    let boot_config = r#"{"kernel":{"url":"http://example.org/vmlinuz","cmdline":"quiet"}}"#;
    let cancel = || RawRequest::new("POST", &format!("/api/v1/jobs/{job}/cancel")).bearer(bob);
    let list: Vec<(&str, u16, IpAddr, RawRequest, Expect)> = vec![
        (
            "bob cancels alice's job",
            EXECUTOR,
            outsider(),
            cancel(),
            not_his("job.cancel"),
        ),
        (
            "bob cancels alice's job from the DUT network",
            EXECUTOR,
            dut_network(),
            cancel(),
            not_his("job.cancel"),
        ),
        (
            "bob downloads a file of alice's job",
            EXECUTOR,
            outsider(),
            RawRequest::get(&format!("/api/v1/jobs/{job}/artifacts/results/victim.txt"))
                .bearer(bob),
            not_his("job.artifact"),
        ),
        // Listing the names, and the console log, are reading: with the default
        // `executor.job_visibility: all` every token may (docs/security.md); the files are
        // the owner's.
        (
            "bob lists the files of alice's job",
            EXECUTOR,
            outsider(),
            RawRequest::get(&format!("/api/v1/jobs/{job}/artifacts")).bearer(bob),
            Expect::text(200, &["console.log"]),
        ),
        // No user writes a boot config: neither for alice's machine nor for his own job's.
        (
            "bob writes the boot config of alice's machine",
            BOOT,
            outsider(),
            RawRequest::new("PUT", &format!("/api/v1/boot/{victim_mac}"))
                .bearer(bob)
                .json(boot_config),
            Expect::json(403, &["lease"]).logged_refusal(),
        ),
        (
            "bob writes the boot config of his own job's machine",
            BOOT,
            dut_network(),
            RawRequest::new("PUT", &format!("/api/v1/boot/{own_mac}"))
                .bearer(bob)
                .json(boot_config),
            Expect::json(403, &["lease"]).logged_refusal(),
        ),
    ];
    list.into_iter()
        .map(|(what, port, from, request, expect)| Case {
            what: what.to_string(),
            port,
            request,
            from,
            expect,
        })
        .collect()
}

/// A client of a job's console WebSocket (`/api/v1/jobs/{id}/console/ws`), connected from
/// inside the farm's namespace.
pub struct Console {
    ws: WebSocket<TcpStream>,
    /// Every console byte received so far.
    pub output: Vec<u8>,
    /// Every text frame received so far (a refusal, the job's end).
    pub texts: Vec<Value>,
    closed: bool,
}

impl Console {
    pub fn open(ns: &Netns, from: IpAddr, job: i64, token: &str) -> Result<Self, String> {
        let addr = SocketAddr::new(from, EXECUTOR);
        let stream = ns
            .connect(addr, Duration::from_secs(5))
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let timeout = Some(Duration::from_secs(10));
        stream
            .set_read_timeout(timeout)
            .and_then(|()| stream.set_write_timeout(timeout))
            .map_err(|e| e.to_string())?;
        let mut req = format!("ws://{GATEWAY_IP}:{EXECUTOR}/api/v1/jobs/{job}/console/ws")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let bearer = format!("Bearer {token}")
            .parse()
            .map_err(|e| format!("the token is no header value: {e}"))?;
        req.headers_mut().insert("authorization", bearer);
        let (ws, _) = tungstenite::client(req, stream)
            .map_err(|e| format!("WebSocket handshake of job {job}'s console: {e}"))?;
        // Short reads from here on: waits poll the frames against their own deadline.
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            ws,
            output: Vec::new(),
            texts: Vec::new(),
            closed: false,
        })
    }

    /// Keystrokes, as `dutctl`'s interactive console sends them.
    pub fn type_in(&mut self, keys: &str) -> Result<(), String> {
        self.ws
            .send(Message::binary(keys.as_bytes().to_vec()))
            .map_err(|e| format!("typing {keys:?}: {e}"))
    }

    /// Reads frames until `done` holds (true), the session ends or `timeout` passes (false).
    pub fn wait_until(&mut self, timeout: Duration, done: impl Fn(&Console) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if self.closed || Instant::now() > deadline {
                return false;
            }
            match self.ws.read() {
                Ok(Message::Binary(b)) => self.output.extend_from_slice(&b),
                Ok(Message::Text(t)) => self
                    .texts
                    .push(serde_json::from_str(t.as_str()).unwrap_or(Value::String(t.to_string()))),
                Ok(Message::Close(_)) => self.closed = true,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => self.closed = true,
            }
        }
        true
    }

    /// The refusal frames: `{"error": …, "status": 403}`.
    pub fn refusals(&self) -> Vec<&Value> {
        self.texts
            .iter()
            .filter(|t| t.get("error").is_some())
            .collect()
    }

    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

/// Bob takes alice's console and types; then alice does. Bob must get the refusal frame
/// (once) and no keystroke of his may reach the DUT; alice's keystrokes must come back as
/// the DUT's tty echoes them.
pub fn console_sessions(ns: &Netns, job: i64, alice: &str, bob: &str) -> Vec<String> {
    let mut failures = Vec::new();
    match Console::open(ns, outsider(), job, bob) {
        Err(e) => failures.push(format!("bob's console session: {e}")),
        Ok(mut s) => {
            let refused = |c: &Console| !c.refusals().is_empty();
            if let Err(e) = s.type_in("BOB-TYPED\n") {
                failures.push(format!("bob's console session: {e}"));
            } else if !s.wait_until(Duration::from_secs(30), refused) {
                failures.push(format!(
                    "bob typed into alice's console and got no refusal frame; text frames: {:?}",
                    s.texts
                ));
            } else {
                let refusals = s.refusals();
                let r = refusals[0];
                if r["status"] != 403
                    || !r["error"]
                        .as_str()
                        .is_some_and(|e| e.contains(CONSOLE_REFUSAL))
                {
                    failures.push(format!("bob's console refusal: {r}"));
                }
                if s.texts.len() != 1 {
                    failures.push(format!(
                        "bob's session: one text frame (the refusal) expected: {:?}",
                        s.texts
                    ));
                }
            }
            s.close();
        }
    }
    match Console::open(ns, dut_network(), job, alice) {
        Err(e) => failures.push(format!("alice's console session: {e}")),
        Ok(mut s) => {
            // The DUT's console tty echoes what it receives; the victim reads the line once
            // the attack is over.
            let echoed = |c: &Console| c.output_text().contains("ALICE-TYPED");
            if let Err(e) = s.type_in("ALICE-TYPED\n") {
                failures.push(format!("alice's console session: {e}"));
            } else if !s.wait_until(Duration::from_secs(60), echoed) {
                failures.push(format!(
                    "alice typed into her job's console and the DUT never echoed it; text frames: {:?}; output tail: {:?}",
                    s.texts,
                    tail(&s.output_text(), 600)
                ));
            }
            if !s.refusals().is_empty() {
                failures.push(format!(
                    "alice's keystrokes into her own job were refused: {:?}",
                    s.texts
                ));
            }
            s.close();
        }
    }
    failures
}

fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

/// The executor's audit log (as the admin reads it) must name bob for the refused cancel and
/// the refused console input of job `job`, and hold no cancel of it that went through.
pub fn audit_failures(ns: &Netns, admin: &str, job: i64) -> Vec<String> {
    let addr = SocketAddr::new(outsider(), EXECUTOR);
    let answer = ns
        .connect(addr, Duration::from_secs(5))
        .map_err(|e| e.to_string())
        .and_then(|stream| {
            let req = RawRequest::get("/api/v1/audit").bearer(admin);
            exchange(
                stream,
                &req.to_bytes(&format!("{GATEWAY_IP}:{EXECUTOR}")),
                Duration::from_secs(20),
            )
            .map_err(|e| e.to_string())
        });
    let audit: Value = match answer {
        Ok(r) if r.status == 200 => match serde_json::from_str(&r.body) {
            Ok(v) => v,
            Err(e) => return vec![format!("executor audit log: not JSON ({e}): {}", r.body)],
        },
        Ok(r) => return vec![format!("executor audit log: {} {}", r.status, r.body)],
        Err(e) => return vec![format!("executor audit log: {e}")],
    };
    let entries = audit["entries"].as_array().cloned().unwrap_or_default();
    let target = format!("job/{job}");
    let has = |actor: &str, action: &str, outcome: &str| {
        entries.iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["target"] == target.as_str()
                && e["outcome"]
                    .as_str()
                    .is_some_and(|o| o.starts_with(outcome))
        })
    };
    let mut failures = Vec::new();
    for (actor, action, outcome, must) in [
        ("bob", "job.cancel", "refused", true),
        ("bob", "job.console.input", "refused", true),
        ("bob", "job.cancel", "ok", false),
        ("alice", "job.console.input", "refused", false),
    ] {
        if has(actor, action, outcome) != must {
            failures.push(format!(
                "executor audit log: {} entry {actor} {action} {target} {outcome}: {entries:#?}",
                if must { "no" } else { "an" }
            ));
        }
    }
    failures
}
