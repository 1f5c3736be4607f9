//! Every DUT-facing and user-facing route the isolation rules touch, asked by the test
//! itself from the gateway's namespace: without a token, from a network that is not a DUT
//! network (loopback is an outsider in this farm's config), and with bad input (malformed
//! JSON, made-up ids, oversized bodies). Each gets a 4xx with its reason.
//!
//! A request to 127.0.0.1 comes from 127.0.0.1 (an outsider); one to the bridge's address
//! comes from that address, which is on the DUT network.

use std::net::IpAddr;

use dutgate_e2e::raw_http::RawRequest;
use time::OffsetDateTime;

use super::attacks::{BucketSpec, VICTIM_TEXT};
use super::cases::{Case, Expect};
use super::{BOOT, GATEWAY_IP, MARS, S3, SALAD};

/// A MAC no machine has.
const MADE_UP_MAC: &str = "52:54:00:77:77:01";

pub fn outsider() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}

pub fn dut_network() -> IpAddr {
    GATEWAY_IP.parse().unwrap_or(outsider())
}

/// A body past every service's limit (the largest is axum's 2 MiB default).
fn oversized() -> Vec<u8> {
    let mut body = b"{\"secrets\":[\"".to_vec();
    body.resize(3 * 1024 * 1024, b'a');
    body.extend_from_slice(b"\"]}");
    body
}

/// The per-route variants. `attacker` is the attacker job's bucket (its keys are bound to
/// the attacker's DUT); `victim_bucket` the victim's. Boot configs are written with the
/// admin token, which may write them whatever else changes.
pub fn route_cases(
    victim_mac: &str,
    user: &str,
    admin: &str,
    attacker: &BucketSpec,
    victim_bucket: &str,
) -> Vec<Case> {
    let (vt, _) = VICTIM_TEXT;
    let registration = format!(
        r#"{{"base_name":"evil","tags":["evil:tag:1"],"mac_address":"{victim_mac}","ip_address":"10.77.0.99","local_tty_device":"ttyS9"}}"#
    );
    let boot_config = r#"{"kernel":{"url":"http://example.org/vmlinuz","cmdline":"quiet"}}"#;
    let dut_only = |path: &str| {
        Expect::json(403, &["DUT network"])
            .logged(&["DUT-facing route refused", &format!("path={path}")])
    };
    let console_refused = |status: u16, machine: &str, says: &str| {
        Expect::json(status, &[says]).logged(&[
            "console request refused",
            &format!("machine={machine}"),
            &format!("status={status}"),
        ])
    };
    let s3_refused =
        |says: &str| Expect::s3(403, "AccessDenied", &[says]).logged(&["S3 request refused", says]);
    let signed_get = |path: &str| {
        RawRequest::get(path).signed(
            &attacker.host,
            &attacker.access_key,
            &attacker.secret_key,
            OffsetDateTime::now_utc(),
        )
    };
    let websocket = |r: RawRequest| {
        r.header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    let script = format!("/boot/{victim_mac}/boot.ipxe");
    let list: Vec<(&str, u16, IpAddr, RawRequest, Expect)> = vec![
        // boot: scripts and artifacts answer the DUT networks only; a user is not a DUT.
        (
            "boot script, outsider",
            BOOT,
            outsider(),
            RawRequest::get(&script),
            dut_only(&script),
        ),
        (
            "boot script, outsider with the user token",
            BOOT,
            outsider(),
            RawRequest::get(&script).bearer(user),
            dut_only(&script),
        ),
        (
            "default boot script, outsider",
            BOOT,
            outsider(),
            RawRequest::get("/boot.ipxe").query("mac", victim_mac),
            dut_only("/boot.ipxe"),
        ),
        (
            "artifact, outsider",
            BOOT,
            outsider(),
            RawRequest::get("/artifacts/0123456789abcdef/vmlinuz"),
            dut_only("/artifacts/0123456789abcdef/vmlinuz"),
        ),
        (
            "artifact, made-up id",
            BOOT,
            dut_network(),
            RawRequest::get("/artifacts/0123456789abcdef/vmlinuz"),
            Expect::json(404, &["no artifact"]).logged_not_found(),
        ),
        // boot: boot configs are for tokens.
        (
            "boot config, no token",
            BOOT,
            outsider(),
            RawRequest::new("PUT", &format!("/api/v1/boot/{MADE_UP_MAC}")).json(boot_config),
            Expect::json(401, &["Authorization"]).logged_refusal(),
        ),
        (
            "boot config, malformed JSON",
            BOOT,
            outsider(),
            RawRequest::new("PUT", &format!("/api/v1/boot/{MADE_UP_MAC}"))
                .bearer(admin)
                .json(r#"{"kernel":{"url":"#),
            Expect::json(400, &["EOF"]).logged_refusal(),
        ),
        (
            "boot config, not a MAC",
            BOOT,
            outsider(),
            RawRequest::new("PUT", "/api/v1/boot/not-a-mac")
                .bearer(admin)
                .json(boot_config),
            Expect::json(400, &["not-a-mac"]).logged_refusal(),
        ),
        (
            "boot config, oversized",
            BOOT,
            outsider(),
            RawRequest::new("PUT", &format!("/api/v1/boot/{MADE_UP_MAC}"))
                .bearer(admin)
                .json(oversized()),
            Expect::json(413, &["length limit exceeded"]).logged_refusal(),
        ),
        // mars: registration from the DUT networks only (a user is not a DUT), and
        // checked.
        (
            "registration, outsider",
            MARS,
            outsider(),
            RawRequest::new("POST", "/api/v1/machine/").json(registration.clone()),
            Expect::json(403, &["DUT network"])
                .logged(&["registration refused: not from the DUT network"]),
        ),
        (
            "registration, outsider with the user token",
            MARS,
            outsider(),
            RawRequest::new("POST", "/api/v1/machine/")
                .bearer(user)
                .json(registration.clone()),
            Expect::json(403, &["DUT network"])
                .logged(&["registration refused: not from the DUT network"]),
        ),
        (
            "registration, malformed JSON",
            MARS,
            dut_network(),
            RawRequest::new("POST", "/api/v1/machine/").json(r#"{"mac_address":"#),
            Expect::json(400, &["EOF"]).logged_refusal(),
        ),
        (
            "registration, not a MAC",
            MARS,
            dut_network(),
            RawRequest::new("POST", "/api/v1/machine/")
                .json(registration.replace(victim_mac, "not-a-mac")),
            Expect::json(400, &["not-a-mac"]).logged_refusal(),
        ),
        (
            "registration, oversized",
            MARS,
            dut_network(),
            RawRequest::new("POST", "/api/v1/machine/").json(oversized()),
            Expect::json(413, &["length limit exceeded"]).logged_refusal(),
        ),
        (
            "machine list, outsider",
            MARS,
            outsider(),
            RawRequest::get("/api/v1/machines"),
            Expect::json(403, &["DUT network"]).logged_refusal(),
        ),
        // salad: console content and control need a token or the machine's lease.
        (
            "console log, no token",
            SALAD,
            outsider(),
            RawRequest::get(&format!("/api/v1/machine/{victim_mac}/log")),
            console_refused(401, victim_mac, "Authorization"),
        ),
        (
            "console log, made-up lease",
            SALAD,
            outsider(),
            RawRequest::get(&format!("/api/v1/machine/{victim_mac}/log"))
                .header("x-lease-id", "00000000-0000-0000-0000-000000000000"),
            console_refused(403, victim_mac, "X-Lease-Id is not the current lease"),
        ),
        (
            "console log, not a machine id",
            SALAD,
            outsider(),
            RawRequest::get("/api/v1/machine/not-a-mac/log").bearer(user),
            Expect::json(400, &["not-a-mac"]).logged_refusal(),
        ),
        (
            "console port allocation, no token",
            SALAD,
            outsider(),
            RawRequest::get(&format!("/api/v1/machine/{MADE_UP_MAC}")),
            console_refused(401, MADE_UP_MAC, "Authorization"),
        ),
        (
            "expect, user token",
            SALAD,
            outsider(),
            RawRequest::new("PUT", &format!("/api/v1/machine/{victim_mac}/expect")).bearer(user),
            console_refused(403, victim_mac, "lease"),
        ),
        (
            "secrets, no token",
            SALAD,
            outsider(),
            RawRequest::new("PUT", &format!("/api/v1/machine/{victim_mac}/secrets"))
                .json(r#"{"secrets":["0123456789"]}"#),
            console_refused(401, victim_mac, "Authorization"),
        ),
        (
            "secrets, malformed JSON",
            SALAD,
            outsider(),
            RawRequest::new("PUT", &format!("/api/v1/machine/{MADE_UP_MAC}/secrets"))
                .bearer(admin)
                .json(r#"{"secrets":"#),
            Expect::json(400, &["EOF"]).logged_refusal(),
        ),
        (
            "secrets, oversized",
            SALAD,
            outsider(),
            RawRequest::new("PUT", &format!("/api/v1/machine/{MADE_UP_MAC}/secrets"))
                .bearer(admin)
                .json(oversized()),
            Expect::json(413, &["length limit exceeded"]).logged_refusal(),
        ),
        (
            "console WebSocket, no token",
            SALAD,
            outsider(),
            websocket(RawRequest::get(&format!(
                "/api/v1/machine/{victim_mac}/console"
            ))),
            console_refused(401, victim_mac, "Authorization"),
        ),
        // s3: job keys from their machine only; every request signed.
        (
            "S3, anonymous",
            S3,
            dut_network(),
            RawRequest::get(&format!("/{victim_bucket}/{vt}")),
            s3_refused("a signature is required"),
        ),
        (
            "S3, a job key from the DUT network but not its machine",
            S3,
            dut_network(),
            signed_get(&format!("/{}/mine", attacker.bucket)),
            s3_refused("is accepted from"),
        ),
        (
            "S3, a job key from outside the DUT networks",
            S3,
            outsider(),
            signed_get(&format!("/{}/mine", attacker.bucket)),
            s3_refused("DUT networks only"),
        ),
        (
            "S3, a made-up key",
            S3,
            dut_network(),
            RawRequest::get(&format!("/{victim_bucket}/{vt}")).signed(
                &attacker.host,
                "DGMADEUPKEY0000000000",
                "made-up-secret",
                OffsetDateTime::now_utc(),
            ),
            Expect::s3(403, "InvalidAccessKeyId", &[]).logged_refusal(),
        ),
        (
            "S3, a forged signature",
            S3,
            dut_network(),
            RawRequest::get(&format!("/{}/mine", attacker.bucket)).signed(
                &attacker.host,
                &attacker.access_key,
                "not-the-secret",
                OffsetDateTime::now_utc(),
            ),
            Expect::s3(403, "SignatureDoesNotMatch", &[]).logged_refusal(),
        ),
        (
            "S3, a NUL in the key",
            S3,
            outsider(),
            signed_get(&format!("/{}/a%00b", attacker.bucket)),
            s3_refused("keys must stay inside their bucket"),
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

/// Boot configs whose kernel the artifact cache must not fetch, set with the admin token:
/// each is refused when it is set (as it is when a job's process sets it), naming the rule.
pub fn outbound_cases(admin: &str) -> Vec<Case> {
    let config = |url: &str| {
        format!(r#"{{"kernel":{{"url":"{url}","cmdline":"quiet"}},"job_id":"outbound-check"}}"#)
    };
    let policy =
        |says: &'static str| Expect::json(422, &[says, "gateway.outbound.allow"]).logged_refusal();
    let list: Vec<(&str, &str, Expect)> = vec![
        (
            "an address on the DUT network",
            "http://10.77.0.50:8080/vmlinuz",
            policy("10.77.0.50 is "),
        ),
        (
            "cloud metadata (link-local)",
            "http://169.254.169.254/latest/meta-data/",
            policy("link-local"),
        ),
        (
            "loopback in IPv6",
            "http://[::1]:8004/api/v1/pdus",
            policy("loopback"),
        ),
        (
            "loopback as a bare number",
            "http://2130706433:8004/api/v1/pdus",
            policy("loopback"),
        ),
        (
            "a name that resolves to loopback",
            "http://localhost:8004/api/v1/pdus",
            policy("loopback"),
        ),
        (
            "a private address",
            "http://192.168.1.1/vmlinuz",
            policy("private"),
        ),
        (
            "a non-http scheme",
            "gopher://127.0.0.1:8004/_GET",
            Expect::json(422, &["unsupported URL scheme"]).logged_refusal(),
        ),
        (
            "a local file outside the file roots",
            "file:///etc/shadow",
            Expect::json(422, &["boot.file_roots"]).logged_refusal(),
        ),
    ];
    list.into_iter()
        .map(|(what, url, expect)| Case {
            what: format!("boot config with a kernel at {what}"),
            port: BOOT,
            request: RawRequest::new("PUT", &format!("/api/v1/boot/{MADE_UP_MAC}"))
                .bearer(admin)
                .json(config(url)),
            from: outsider(),
            expect,
        })
        .collect()
}
