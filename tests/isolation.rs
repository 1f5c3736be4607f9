//! Isolation between jobs, played against a real gateway whose DUTs have addresses of their
//! own (docs/security.md, "Attacks refused, and the tests that play them").
//!
//! With QEMU user networking every DUT reaches the gateway from 127.0.0.1, so no address rule
//! can be tried there. This test builds what a real farm has, inside a network namespace it
//! creates (and deletes):
//! - a bridge `dutbr0` (10.77.0.1/24) as the DUT network, and dnsmasq on it handing out
//!   addresses and, to iPXE, the boot service's URL (as `gateway-image/examples/dnsmasq-dut-network.conf`);
//! - `dutgate up --virtual-duts 2 --dut-bridge dutbr0` with a config file whose
//!   `gateway.auth.dut_networks` is only that bridge's network: loopback is *not* a DUT
//!   network here, so the test's own requests to 127.0.0.1 are an outsider's, and its
//!   requests to 10.77.0.1 come from the DUT network;
//! - two QEMU DUTs whose NICs are tap devices on the bridge and whose serial consoles are ptys
//!   salad opens as serial adapters;
//! - the test's fixture server on 10.77.0.1 (DUTs fetch their scripts from it and post what
//!   they got back); `gateway.outbound.allow` lets the artifact cache reach it, as an admin
//!   would allow a lab mirror.
//!
//! The scenario, on one gateway start:
//! 1. Both machines are discovered, register with their own DHCP addresses, train and become
//!    IDLE. The admin creates two user tokens, alice and bob (`dutctl tokens create`).
//! 2. A victim job (alice's) puts a text file and a file of every byte value in its bucket,
//!    then waits. An attacker job (bob's) on the other DUT learns its own bucket keys (and,
//!    as if they had leaked, the victim's) and sends the gateway requests the test forges
//!    byte for byte:
//!    the victim's boot script and console log, its lease-bound console routes, its machine
//!    record, its power, and its bucket through `..` paths (plain, percent-encoded, double
//!    encoded), `DeleteObjects` keys, copy sources, another bucket's name, the leaked keys,
//!    SigV2, a stale signature, no signature, malformed XML. It types into every console
//!    port and prints the victim's `SALAD.machine_id` and end lines. Meanwhile the test
//!    plays every DUT- and user-facing route unauthenticated, from loopback and with bad
//!    input, and sets boot configs whose kernels are internal addresses. As bob (his token,
//!    from loopback and from the DUT network) it asks to cancel alice's job, download its
//!    files and write the boot configs of both machines, each refused (403, a JSON reason);
//!    it opens the console WebSocket of alice's job as bob and types, and gets the refusal
//!    frame (`{"error", "status": 403}`); then as alice, whose line comes back as the DUT's
//!    tty echoes it. The executor's audit log names bob for the refused cancel and console
//!    input.
//! 3. Every request gets its refusal (status and reason); the victim job PASSes with a
//!    console free of the attacker's lines, of bob's keystrokes and with its keys masked; the
//!    one line it reads from its console after the attack is alice's; its bucket, checked by
//!    the victim itself after the attack and by the test after the job, holds its two files
//!    byte for byte and nothing else; its machine record is unchanged.
//! 4. Two jobs whose kernel URLs reach an internal service of the gateway (the PDU service
//!    on loopback: directly, and through a redirect from an allowed server) end SETUP_FAIL
//!    naming the outbound rule.
//! 5. A tour asks every documented route the scenario has not asked yet. From the moment
//!    the machines are IDLE, every answer the test gets is checked against the seven
//!    services' OpenAPI documents (`dutgate_e2e::api_schema`): a documented operation, a
//!    documented status, a JSON body valid for its schema; at the end a table of the answers
//!    per route is printed, and no documented operation may be left unasked.
//! 6. The gateway's log has a line naming the source address for every refusal.
//!
//! Peers: iproute2 (`ip`), dnsmasq (Debian `dnsmasq-base`), qemu-system-x86 + ipxe-qemu,
//! linux-image-amd64 + busybox-static (the DUT image). Needs root (network namespaces).

// The scenario's parts, in `isolation/` (the test keeps the name docs/security.md cites).
#[path = "isolation/attacks.rs"]
mod attacks;
#[path = "isolation/cases.rs"]
mod cases;
#[path = "isolation/people.rs"]
mod people;
#[path = "isolation/routes.rs"]
mod routes;
#[path = "isolation/tour.rs"]
mod tour;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dutgate_core::testing::require_program;
use dutgate_e2e::api_schema::{self, ApiSchema};
use dutgate_e2e::farm::{self, Daemon, Farm, hello_variant, job_running};
use dutgate_e2e::fixture::{Fixture, Reply, Request};
use dutgate_e2e::netns::Netns;
use dutgate_e2e::raw_http::{RawResponse, exchange};
use serde_json::Value;

use attacks::{BucketSpec, VICTIM_BINARY, VICTIM_TEXT};
use cases::{Case, names_address};

const BRIDGE: &str = "dutbr0";
const GATEWAY_IP: &str = "10.77.0.1";
const DUT_NETWORK: &str = "10.77.0.0/24";
// A fresh namespace has no listener at all: the services take their default ports.
const EXECUTOR: u16 = 8000;
const MARS: u16 = 8001;
const REGISTRY: u16 = 8002;
const BOOT: u16 = 8003;
const PDU: u16 = 8004;
const SALAD: u16 = 8005;
const S3: u16 = 9000;
/// The virtual PDU's MACs are 52:54:00:00:<pdu>:<port>.
const ATTACKER_MAC: &str = "52:54:00:00:01:01";
const VICTIM_MAC: &str = "52:54:00:00:01:02";

/// The bridged farm; dropped in field order, so the gateway stops its VMs before the
/// namespace goes.
struct BridgedFarm {
    farm: Farm,
    _dnsmasq: Daemon,
    fixture: Fixture,
    ns: Netns,
}

impl BridgedFarm {
    fn start(tmp: &Path, plot: Arc<Plot>) -> Self {
        for (program, package) in [
            ("ip", "iproute2"),
            ("dnsmasq", "dnsmasq-base"),
            ("qemu-system-x86_64", "qemu-system-x86"),
        ] {
            require_program(program, package);
        }
        let built = farm::build(tmp);
        let ns = Netns::create("dgiso");
        for args in [
            vec!["link", "add", BRIDGE, "type", "bridge"],
            vec!["addr", "add", "10.77.0.1/24", "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ] {
            ns.ip(&args);
        }
        let listener = ns
            .bind(SocketAddr::new(routes::dut_network(), 0))
            .expect("the fixture server cannot listen on the bridge");
        let fixture = Fixture::serve(listener, Arc::new(move |req: &Request| plot.answer(req)))
            .expect("the fixture server does not start");

        // The DUT network's DHCP server, as on a real farm: iPXE (user class "iPXE") gets
        // the boot service's per-MAC script.
        let mut dnsmasq = ns.cmd("dnsmasq");
        dnsmasq.args([
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            &format!("--interface={BRIDGE}"),
            "--bind-interfaces",
            "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h",
            "--dhcp-userclass=set:ipxe,iPXE",
            &format!(
                "--dhcp-boot=tag:ipxe,http://{GATEWAY_IP}:{BOOT}/boot/${{mac}}/boot.ipxe?platform=${{platform}}&buildarch=${{buildarch}}"
            ),
            "--log-dhcp",
        ]);
        dnsmasq
            .arg(format!(
                "--dhcp-leasefile={}",
                tmp.join("dnsmasq.leases").display()
            ))
            .arg(format!("--pid-file={}", tmp.join("dnsmasq.pid").display()));
        let dnsmasq = Daemon::spawn(dnsmasq, tmp.join("dnsmasq.log"));

        let config = tmp.join("gateway.yml");
        std::fs::write(
            &config,
            format!(
                "gateway:\n  public_host: {GATEWAY_IP}\n  auth:\n    dut_networks: [\"{DUT_NETWORK}\"]\n  outbound:\n    allow: [\"{}\"]\n",
                fixture.addr
            ),
        )
        .unwrap();
        let mut up = ns.cmd(built.bin.join("dutgate"));
        up.arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&built.state)
            .args(["up", "--virtual-duts", "2", "--dut-bridge", BRIDGE])
            // One check boot per machine: training is the virtual farm test's subject, and
            // each boot costs time this test spends on attacks.
            .args(["--training-loops", "1", "--training-qualifying", "1"]);
        let gateway = Daemon::spawn(up, tmp.join("gateway.log"));
        BridgedFarm {
            farm: Farm {
                gateway,
                tmp: tmp.to_path_buf(),
                state: built.state,
                bin: built.bin,
                netns: Some(ns.name.clone()),
            },
            _dnsmasq: dnsmasq,
            fixture,
            ns,
        }
    }

    /// Plays `case` from the test: connects from the case's source address.
    fn ask(&self, case: &Case) -> Option<RawResponse> {
        let addr = SocketAddr::new(case.from, case.port);
        let stream = self.ns.connect(addr, Duration::from_secs(5)).ok()?;
        let host = format!("{GATEWAY_IP}:{}", case.port);
        // A WebSocket stays open: what came back within a moment is its answer.
        let upgrade = case.request.headers.iter().any(|(k, _)| k == "upgrade");
        let within = Duration::from_secs(if upgrade { 3 } else { 20 });
        exchange(stream, &case.request.to_bytes(&host), within).ok()
    }

    /// The seven services' OpenAPI documents; from now on every answer the test gets is
    /// checked against them (`raw_http::exchange`).
    fn check_answers(&self) -> Arc<ApiSchema> {
        let services: Vec<(&str, SocketAddr)> = [
            ("executor", EXECUTOR),
            ("mars", MARS),
            ("registry", REGISTRY),
            ("boot", BOOT),
            ("pdu", PDU),
            ("salad", SALAD),
            ("s3", S3),
        ]
        .into_iter()
        .map(|(name, port)| (name, SocketAddr::new(routes::outsider(), port)))
        .collect();
        let schema = ApiSchema::load(&services, |addr| {
            self.ns.connect(addr, Duration::from_secs(5))
        })
        .unwrap_or_else(|e| panic!("the OpenAPI documents: {e}"))
        // The S3 API is S3's own; the document covers the key administration.
        .documented_only_under("s3", "/dutgate-admin/");
        let schema = Arc::new(schema);
        api_schema::activate(schema.clone());
        schema
    }
}

/// What the fixture server knows of the scenario, filled in as it unfolds.
#[derive(Default)]
struct Plot {
    fixture: OnceLock<String>,
    attacker_ip: OnceLock<IpAddr>,
    /// Posted by the victim's DUT once its files are in its bucket.
    victim: OnceLock<BucketSpec>,
    /// Posted by the attacker's DUT when it asks for its script.
    attacker: OnceLock<BucketSpec>,
    /// The attacker's requests, forged once both key pairs are known.
    attacks: Mutex<Vec<(String, Case)>>,
    /// What the attacker's DUT got back, by attack.
    answers: Mutex<BTreeMap<String, Vec<u8>>>,
    attacker_done: AtomicBool,
    /// The test's own requests are done (the victim's bucket must still be there for them).
    test_done: AtomicBool,
}

impl Plot {
    fn answer(&self, req: &Request) -> Reply {
        let fixture = self.fixture.get().cloned().unwrap_or_default();
        let path = req.path();
        match req.method.as_str() {
            "GET" if path == "/victim.sh" => Reply::ok(attacks::victim_script(&fixture)),
            "POST" if path == "/victim-ready" => {
                if let Some(spec) = BucketSpec::from_cmdline(&String::from_utf8_lossy(&req.body)) {
                    let _ = self.victim.set(spec);
                }
                Reply::ok("")
            }
            "POST" if path == "/attack" => self.forge(&fixture, &req.body),
            "GET" if path.starts_with("/q/") => {
                let name = &path[3..];
                let attacks = self.attacks.lock().unwrap_or_else(|p| p.into_inner());
                match attacks.iter().find(|(n, _)| n == name) {
                    Some((_, case)) => Reply::ok(
                        case.request
                            .to_bytes(&format!("{GATEWAY_IP}:{}", case.port)),
                    ),
                    None => Reply::status(404, "no such attack"),
                }
            }
            "POST" if path.starts_with("/r/") => {
                self.answers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(path[3..].to_string(), req.body.clone());
                Reply::ok("")
            }
            "POST" if path == "/attack-over" => {
                self.attacker_done.store(true, Ordering::SeqCst);
                Reply::ok("")
            }
            "GET" if path == "/test-done" => {
                if self.test_done.load(Ordering::SeqCst) {
                    Reply::ok("done")
                } else {
                    Reply::status(404, "not yet")
                }
            }
            "GET" if path == "/attack-over" => {
                if self.attacker_done.load(Ordering::SeqCst)
                    && self.test_done.load(Ordering::SeqCst)
                {
                    Reply::ok("over")
                } else {
                    Reply::status(404, "not yet")
                }
            }
            // An upstream that looks allowed and sends the cache to the PDU service.
            "GET" if path.starts_with("/redirect/") => {
                Reply::redirect(&format!("http://127.0.0.1:{PDU}/api/v1/pdus"))
            }
            _ => Reply::status(404, "not here"),
        }
    }

    /// The attacker's script, once the victim's keys are known (the victim posts them when
    /// its files are in its bucket).
    fn forge(&self, fixture: &str, cmdline: &[u8]) -> Reply {
        let Some(own) = BucketSpec::from_cmdline(&String::from_utf8_lossy(cmdline)) else {
            return Reply::status(400, "no dutgate.s3 on this cmdline");
        };
        let Some(attacker_ip) = self.attacker_ip.get().copied() else {
            return Reply::status(409, "the attacker's address is not known yet");
        };
        let deadline = Instant::now() + Duration::from_secs(240);
        let victim = loop {
            if let Some(v) = self.victim.get() {
                break v.clone();
            }
            if Instant::now() > deadline {
                return Reply::status(504, "the victim never said its files are in its bucket");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let cases = attacks::attacker_cases(attacker_ip, VICTIM_MAC, &own, &victim);
        let script = attacks::attacker_script(fixture, &cases, VICTIM_MAC);
        *self.attacks.lock().unwrap_or_else(|p| p.into_inner()) = cases;
        let _ = self.attacker.set(own);
        Reply::ok(script)
    }
}

/// Whether `console` has `marker` on a line of its own (a marker inside an echoed command
/// line does not count).
fn has_line(console: &str, marker: &str) -> bool {
    console.lines().any(|l| l.trim() == marker)
}

/// `(name, bytes)` of every file under `dir`.
fn files_in(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A log line the gateway must have written for a refusal that is not an HTTP answer.
fn missing_line(
    log: &str,
    what: &str,
    fragments: &[&str],
    source: Option<IpAddr>,
) -> Option<String> {
    let found = log.lines().any(|l| {
        source.is_none_or(|ip| names_address(l, ip)) && fragments.iter().all(|f| l.contains(f))
    });
    (!found).then(|| format!("{what}: no log line with {fragments:?} naming {source:?}"))
}

/// Waits until both machines are IDLE again (their jobs' teardown done).
fn both_idle(farm: &mut Farm, what: &str) {
    farm.wait_for(what, Duration::from_secs(120), |f| {
        [ATTACKER_MAC, VICTIM_MAC]
            .iter()
            .all(|m| f.machine(m)["state"] == "IDLE")
            .then_some(())
    });
}
#[test]
fn jobs_on_a_bridged_farm_cannot_reach_into_each_other() {
    let t0 = Instant::now();
    let say = |what: &str| eprintln!("[{:>5.1}s] {what}", t0.elapsed().as_secs_f64());
    // Kept when the test fails (state dir, service logs, dutctl outputs); removed at the end.
    let tmp = tempfile::Builder::new()
        .prefix("dutgate-isolation-")
        .tempdir()
        .unwrap()
        .keep();
    let plot = Arc::new(Plot::default());
    let mut bridged = BridgedFarm::start(&tmp, plot.clone());
    let fixture_url = bridged.fixture.url();
    let _ = plot.fixture.set(fixture_url.clone());
    say("binaries and DUT image built, gateway started");
    let farm = &mut bridged.farm;

    // 1. Both DUTs are discovered, register from their own DHCP addresses and train.
    let machines = farm.wait_for("both machines IDLE", Duration::from_secs(600), |f| {
        let ms: Vec<Value> = [ATTACKER_MAC, VICTIM_MAC]
            .iter()
            .map(|m| f.machine(m))
            .collect();
        ms.iter().all(|m| m["state"] == "IDLE").then_some(ms)
    });
    let addresses: Vec<IpAddr> = machines
        .iter()
        .map(|m| {
            m["ip_address"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("a machine without an address: {m:#}"))
        })
        .collect();
    for ip in &addresses {
        assert!(
            ip.to_string().starts_with("10.77.0."),
            "a bridged DUT registered from {ip}, not from the DUT network: {machines:#?}"
        );
    }
    assert_ne!(addresses[0], addresses[1], "two DUTs, one address");
    let attacker_ip = addresses[0];
    let _ = plot.attacker_ip.set(attacker_ip);
    let api = bridged.check_answers();
    let farm = &mut bridged.farm;
    let victim_before = farm.machine(VICTIM_MAC);
    // Two people: the admin names them; alice's job is the victim, bob's the attacker.
    let (alice, bob) = (
        people::create_user(farm, "alice"),
        people::create_user(farm, "bob"),
    );
    let state = farm.state.to_string_lossy().into_owned();
    let as_user = |token: &str| {
        [
            "--state-dir".to_string(),
            state.clone(),
            "--token".into(),
            token.to_string(),
        ]
    };
    let (as_alice, as_bob) = (as_user(&alice), as_user(&bob));
    let (as_alice, as_bob): (Vec<&str>, Vec<&str>) = (
        as_alice.iter().map(String::as_str).collect(),
        as_bob.iter().map(String::as_str).collect(),
    );
    say("both machines IDLE, alice and bob have tokens");

    // 2. The victim job (alice's), then the attacker job (bob's), each pinned to its machine.
    let victim_job = job_running(&farm.tmp, "victim", &attacks::victim_command(&fixture_url));
    let victim_run = farm.spawn_run("victim", &victim_job, &as_alice, &["-i", VICTIM_MAC]);
    farm.wait_for("the victim job RUNNING", Duration::from_secs(120), |f| {
        (f.machine(VICTIM_MAC)["state"] == "RUNNING").then_some(())
    });
    let attacker_job = job_running(
        &farm.tmp,
        "attacker",
        &attacks::attacker_command(&fixture_url),
    );
    let attacker_run = farm.spawn_run("attacker", &attacker_job, &as_bob, &["-i", ATTACKER_MAC]);
    let own = farm.wait_for(
        "the attacker's DUT asking for its attack",
        Duration::from_secs(300),
        |_| plot.attacker.get().cloned(),
    );
    let victim_bucket = plot
        .victim
        .get()
        .map(|v| v.bucket.clone())
        .expect("the attack was forged before the victim's bucket was known");
    say("the attacker's DUT is attacking");

    let victim_id = victim_run
        .job_id()
        .expect("the victim job runs but dutctl recorded no job id");
    for (run, owner) in [(&victim_run, "alice"), (&attacker_run, "bob")] {
        let record = run.job_id().and_then(|id| farm.job(id)).map(|(job, _)| job);
        assert!(
            record.as_ref().is_some_and(|j| j["owner"] == owner),
            "{}'s job is not recorded as {owner}'s: {record:#?}",
            run.name
        );
    }

    // While it does, the test plays every route itself: unauthenticated, from loopback and
    // with bad input; and boot configs whose kernels are internal. Bob, with his own token,
    // asks for alice's job: cancel it, hand over its files, write boot configs.
    let admin = farm.admin_token();
    let mut own_cases = routes::route_cases(VICTIM_MAC, &bob, &admin, &own, &victim_bucket);
    own_cases.extend(routes::outbound_cases(&admin));
    own_cases.extend(people::bob_cases(&bob, victim_id, VICTIM_MAC, ATTACKER_MAC));
    let mut failures: Vec<String> = own_cases
        .iter()
        .filter_map(|c| c.check(bridged.ask(c).as_ref()).err())
        .collect();
    // Bob takes alice's console and types: refused. Alice types: her line reaches the DUT
    // (the victim reads it once the attack is over).
    failures.extend(people::console_sessions(
        &bridged.ns,
        victim_id,
        &alice,
        &bob,
    ));
    failures.extend(people::audit_failures(&bridged.ns, &admin, victim_id));
    plot.test_done.store(true, Ordering::SeqCst);
    say(&format!(
        "{} requests and two console sessions of the test played",
        own_cases.len()
    ));
    let farm = &mut bridged.farm;

    // 3. Every attack was refused; the victim is intact.
    let attacker = attacker_run.wait(Duration::from_secs(300));
    assert!(
        attacker.code <= 3,
        "attacker job: exit {}\n{}",
        attacker.code,
        attacker.stderr
    );
    let attacks = plot
        .attacks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let answers = plot
        .answers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (name, case) in &attacks {
        let answer = answers.get(name).and_then(|b| RawResponse::parse(b));
        if let Err(e) = case.check(answer.as_ref()) {
            failures.push(e);
        }
    }
    assert!(
        !attacks.is_empty() && answers.len() == attacks.len(),
        "the attacker's DUT answered {} of {} attacks:\n{}",
        answers.len(),
        attacks.len(),
        attacker.stdout
    );
    assert!(
        !files_in(&attacker.share.join("bucket")).contains_key("stolen"),
        "a copy from the victim's bucket reached the attacker's"
    );
    say("attacker job over");

    let victim = victim_run.wait(Duration::from_secs(300));
    assert_eq!(
        victim.code, 0,
        "the victim job did not PASS:\n{}\n{}",
        victim.stdout, victim.stderr
    );
    for marker in ["ATTACKER-LINE", "ATTACK-TYPED", "BOB-TYPED"] {
        assert!(
            !victim.stdout.contains(marker),
            "{marker} reached the victim's console:\n{}",
            victim.stdout
        );
    }
    // Alice's line, and nothing else, reached the victim's console input.
    assert!(
        has_line(&victim.stdout, "typed:ALICE-TYPED"),
        "the victim did not read alice's line (and only it) from its console:\n{}",
        victim.stdout
    );
    assert!(
        has_line(&victim.stdout, "VICTIM-BUCKET-INTACT"),
        "the victim found its bucket changed after the attack:\n{}",
        victim.stdout
    );
    // The bucket keys the kernel echoes with its cmdline are masked on the console.
    assert!(
        victim.stdout.contains(",[MASKED],[MASKED]\""),
        "the victim's keys are not masked on its console:\n{}",
        victim.stdout
    );
    let (text_name, text) = VICTIM_TEXT;
    let expected: BTreeMap<String, Vec<u8>> = [
        (text_name.to_string(), text.to_vec()),
        (VICTIM_BINARY.to_string(), attacks::victim_binary()),
    ]
    .into();
    assert_eq!(
        files_in(&victim.share.join("bucket")),
        expected,
        "the victim's bucket is not byte for byte what it wrote"
    );
    let victim_after = farm.machine(VICTIM_MAC);
    for field in ["ip_address", "tags", "local_tty_device", "base_name"] {
        assert_eq!(
            victim_after[field], victim_before[field],
            "the attacker changed the victim's {field}"
        );
    }
    say("victim job PASSed, its bucket and record intact");

    // 4. Jobs whose kernel is an internal service of the gateway end SETUP_FAIL before any
    //    power-on, naming the rule: directly, and through a redirect from an allowed server.
    both_idle(farm, "both machines back to IDLE");
    let kernel = "url: \"{{ dut_kernel_url }}\"";
    let direct = hello_variant(
        &farm.tmp,
        "ssrf-loopback",
        &[(
            kernel,
            &format!("url: \"http://127.0.0.1:{PDU}/api/v1/pdus\""),
        )],
    );
    let redirected = hello_variant(
        &farm.tmp,
        "ssrf-redirect",
        &[(kernel, &format!("url: \"{fixture_url}/redirect/vmlinuz\""))],
    );
    let direct = farm.spawn_run("ssrf-loopback", &direct, &[], &["-i", ATTACKER_MAC]);
    let redirected = farm.spawn_run("ssrf-redirect", &redirected, &[], &["-i", VICTIM_MAC]);
    for (run, what) in [(direct, "directly"), (redirected, "through a redirect")] {
        let done = run.wait(Duration::from_secs(120));
        assert_eq!(
            done.code, 6,
            "a job fetching an internal URL {what} did not end SETUP_FAIL:\n{}\n{}",
            done.stdout, done.stderr
        );
        assert!(
            done.stderr.contains("loopback") && done.stderr.contains("gateway.outbound.allow"),
            "the refusal ({what}) does not name the rule:\n{}",
            done.stderr
        );
    }
    assert!(
        bridged
            .fixture
            .seen()
            .iter()
            .any(|(_, line)| line.starts_with("GET /redirect/")),
        "the artifact cache never asked the allowed upstream: {:?}",
        bridged.fixture.seen()
    );
    say("internal kernel URLs refused");

    // 5. A tour of the routes the scenario has not asked yet: every documented operation
    //    of every service answers as its document says.
    let farm = &mut bridged.farm;
    both_idle(farm, "both machines IDLE for the tour");
    let read = |path: &str| std::fs::read_to_string(farm.state.join(path)).unwrap_or_default();
    let service = read("tokens/service").trim().to_string();
    let s3_keys: Value = serde_json::from_str(&read("s3/admin-keys.json")).unwrap_or_default();
    let job_yaml = std::fs::read_to_string(hello_variant(&farm.tmp, "tour", &[])).unwrap();
    let scenario = tour::Scenario {
        admin: &admin,
        service: &service,
        machine: ATTACKER_MAC,
        job: victim_id,
        job_yaml: &job_yaml,
        upstream: &fixture_url,
        s3_keys: (
            s3_keys["access_key"].as_str().unwrap_or_default(),
            s3_keys["secret_key"].as_str().unwrap_or_default(),
        ),
    };
    failures.extend(tour::play(&|c| bridged.ask(c), &scenario));
    api_schema::deactivate();
    eprint!("{}", api.report());
    say("route tour played");

    // 6. Every refusal is in the gateway's log with its source.
    let log = bridged.farm.gateway.output();
    let all: Vec<&Case> = own_cases
        .iter()
        .chain(attacks.iter().map(|(_, c)| c))
        .collect();
    failures.extend(cases::missing_log_lines(&all, &log).into_iter().map(|c| {
        format!(
            "{} ({} from {}): no log line with {:?} naming the source",
            c.what,
            c.request.line(),
            c.from,
            c.expect.log
        )
    }));
    failures.extend(
        [
            missing_line(
                &log,
                "attacker typing into console ports",
                &[
                    "console client refused",
                    "reason=\"peer is on a DUT network\"",
                ],
                Some(attacker_ip),
            ),
            missing_line(
                &log,
                "attacker announcing the victim's id",
                &["console binding refused", &format!("claimed={VICTIM_MAC}")],
                None,
            ),
            missing_line(
                &log,
                "bob typing into alice's console",
                &[
                    "executor | ",
                    "console input refused",
                    &format!("job_id={victim_id}"),
                    "actor=bob",
                ],
                Some(routes::outsider()),
            ),
        ]
        .into_iter()
        .flatten(),
    );
    assert!(
        failures.is_empty(),
        "{} of {} checks failed:\n{}\n(files kept in {})",
        failures.len(),
        // The three log lines above, the console sessions and the audit log.
        own_cases.len() + attacks.len() + 3 + 2,
        failures.join("\n"),
        tmp.display()
    );
    api.assert_complete();
    say("done");
    drop(bridged);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn bucket_specs_are_read_from_a_cmdline() {
    let spec = BucketSpec::from_cmdline(
        "quiet dutgate.s3=\"http://10.77.0.1:9000/,job-7,AKID,secret\" dutgate.run=\"x\"\n",
    )
    .unwrap();
    assert_eq!(
        (spec.host.as_str(), spec.bucket.as_str()),
        ("10.77.0.1:9000", "job-7")
    );
    assert_eq!(
        (spec.access_key.as_str(), spec.secret_key.as_str()),
        ("AKID", "secret")
    );
    assert!(BucketSpec::from_cmdline("quiet").is_none());
    assert!(BucketSpec::from_cmdline("dutgate.s3=http://h:1,b,k").is_none());
}
