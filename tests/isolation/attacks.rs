//! What the two jobs' DUTs run. The victim keeps a known file in its bucket and checks it
//! again once the attack is over; the attacker, given the bucket keys of its own job (and,
//! as if they had leaked, the victim's), sends the gateway requests forged byte for byte by
//! the test, each of which must be refused. The DUTs fetch their scripts from the test's
//! fixture server and post every answer back to it; both run busybox only.

use std::net::IpAddr;

use dutgate_e2e::raw_http::RawRequest;
use time::OffsetDateTime;

use super::cases::{Case, Expect};
use super::{BOOT, GATEWAY_IP, MARS, PDU, S3, SALAD};

/// The file the victim keeps in its bucket, and its bytes.
pub const VICTIM_TEXT: (&str, &[u8]) = ("victim.txt", b"victim-data-0123456789\n");
/// Every byte value, in order: nothing may alter a single one.
pub const VICTIM_BINARY: &str = "all-bytes.bin";

pub fn victim_binary() -> Vec<u8> {
    (0..=255u8).collect()
}

/// An S3 endpoint, bucket and key pair, as a job's `dutgate.s3=` kernel parameter gives them
/// to its DUT.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    /// `addr:port`.
    pub host: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

impl BucketSpec {
    /// From a DUT's /proc/cmdline.
    pub fn from_cmdline(cmdline: &str) -> Option<Self> {
        let value = cmdline.split("dutgate.s3=").nth(1)?;
        let value = value.strip_prefix('"').unwrap_or(value);
        let value = value.split(['"', ' ', '\n']).next()?;
        let [url, bucket, access_key, secret_key] = value.split(',').collect::<Vec<_>>()[..] else {
            return None;
        };
        Some(Self {
            host: url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            bucket: bucket.to_string(),
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
        })
    }

    fn sign(&self, request: RawRequest) -> RawRequest {
        self.sign_at(request, OffsetDateTime::now_utc())
    }

    fn sign_at(&self, request: RawRequest, now: OffsetDateTime) -> RawRequest {
        request.signed(&self.host, &self.access_key, &self.secret_key, now)
    }
}

/// The victim's command: fetch its script from the fixture and run it.
pub fn victim_command(fixture: &str) -> String {
    format!("wget -qO /tmp/victim.sh {fixture}/victim.sh && sh /tmp/victim.sh")
}

/// The attacker's command: tell the fixture its cmdline (its own bucket keys), run what
/// comes back.
pub fn attacker_command(fixture: &str) -> String {
    format!(
        "cat /proc/cmdline > /tmp/cmdline; wget -qO /tmp/attack.sh --post-file /tmp/cmdline {fixture}/attack && sh /tmp/attack.sh"
    )
}

/// The victim's script: its files go to its bucket at once (so that they are there during
/// the attack), then it waits until the attack is over, reads whatever was typed on its
/// console (its standard input), and compares its bucket with its own copies.
pub fn victim_script(fixture: &str) -> String {
    let (text_name, text) = VICTIM_TEXT;
    let text = String::from_utf8_lossy(text);
    format!(
        r#"F={fixture}
S3=$(awk -v KEY=dutgate.s3 -f /etc/dutgate/cmdline.awk /proc/cmdline)
printf '{text}' > {text_name}
i=0; while [ $i -lt 256 ]; do printf "\\$(printf %o $i)"; i=$((i+1)); done > {VICTIM_BINARY}
dutgate-dut s3 push /results "$S3" || echo VICTIM-PUSH-FAILED
cat /proc/cmdline > /tmp/cmdline
wget -qO /dev/null --post-file /tmp/cmdline $F/victim-ready
n=0; until wget -qO /dev/null $F/attack-over; do n=$((n+1)); [ $n -ge 300 ] && break; sleep 1; done
echo "victim: attack over at $(date +%T)"
read -t 1 line; echo "typed:$line"
mkdir -p /tmp/again
echo "victim: checking the bucket at $(date +%T)"
if dutgate-dut s3 pull /tmp/again "$S3" && cmp {text_name} /tmp/again/{text_name} && cmp {VICTIM_BINARY} /tmp/again/{VICTIM_BINARY} && [ "$(ls /tmp/again | wc -l)" = 2 ]; then echo VICTIM-BUCKET-INTACT; fi
"#,
        text = text.replace('\n', "\\n")
    )
}

/// The attacker's script: each forged request is fetched from the fixture, sent to the
/// gateway with `nc` and its answer posted back; then the console attacks (typing into
/// every console port, announcing the victim's id, printing the victim's end lines). Its
/// job ends (its own end line) once the test's own requests, which use its keys, are done.
///
/// `nc` shuts its sending side down when its input ends, and the gateway's HTTP server
/// drops a half-closed connection before it answered; so the input is held open until the
/// answer is in (at most 10 s).
pub fn attacker_script(fixture: &str, cases: &[(String, Case)], victim_mac: &str) -> String {
    let names: Vec<String> = cases
        .iter()
        .map(|(name, c)| format!("{name}:{}", c.port))
        .collect();
    format!(
        r#"F={fixture}
G={GATEWAY_IP}
for a in {names}; do
  n=${{a%:*}}; p=${{a##*:}}
  wget -qO /tmp/q-$n $F/q/$n || continue
  {{ cat /tmp/q-$n; i=0; while [ ! -s /tmp/r-$n ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; sleep 0.3; }} | nc $G $p > /tmp/r-$n
  wget -qO /dev/null --post-file /tmp/r-$n $F/r/$n
done
for p in 8200 8201 8202 8203; do echo ATTACK-TYPED | nc -w 2 $G $p > /tmp/nc-$p 2>&1; done
echo SALAD.machine_id={victim_mac}
echo ATTACKER-LINE Execution is over, pipeline status: 1
wget -qO /dev/null --post-data over $F/attack-over
n=0; until wget -qO /dev/null $F/test-done; do n=$((n+1)); [ $n -ge 300 ] && break; sleep 1; done
echo "It's now safe to turn off your computer"
"#,
        names = names.join(" ")
    )
}

/// The requests the attacker's DUT sends, by name, with what each must get back.
pub fn attacker_cases(
    attacker_ip: IpAddr,
    victim_mac: &str,
    own: &BucketSpec,
    victim: &BucketSpec,
) -> Vec<(String, Case)> {
    let o = own.bucket.as_str();
    let v = victim.bucket.as_str();
    let (vt, _) = VICTIM_TEXT;
    let victim_secrets = [
        "dutgate.s3",
        victim.access_key.as_str(),
        victim.secret_key.as_str(),
        v,
    ];
    // Each S3 refusal is logged with the operation, the reason and the source.
    let s3_refused = |op: &str, says: &str| {
        Expect::s3(403, "AccessDenied", &[says]).logged(&[
            "S3 request refused",
            &format!("op=\"{op}\""),
            says,
        ])
    };
    let path_refused = |op: &str| s3_refused(op, "keys must stay inside their bucket");
    let other_bucket = format!("job keys open bucket {o} only");
    let console_refused = |status: u16, machine: &str, says: &str| {
        Expect::json(status, &[says]).logged(&[
            "console request refused",
            &format!("machine={machine}"),
            &format!("status={status}"),
        ])
    };
    let default_script = || {
        Expect::text(200, &["boots the default config"])
            .lacking(&victim_secrets)
            .logged(&[
                "job boot script asked by a peer that is not the machine",
                victim_mac,
            ])
    };
    let an_hour_ago = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let spoof = format!(
        r#"{{"base_name":"evil","tags":["evil:tag:1"],"mac_address":"{victim_mac}","ip_address":"{attacker_ip}","local_tty_device":"ttyS9"}}"#
    );
    let websocket = |r: RawRequest| {
        r.header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
    };
    let list: Vec<(&str, u16, RawRequest, Expect)> = vec![
        // The victim's job boot script carries its bucket keys on the kernel cmdline: the
        // attacker gets the default script.
        (
            "boot-script",
            BOOT,
            RawRequest::get(&format!("/boot/{victim_mac}/boot.ipxe")),
            default_script(),
        ),
        (
            "boot-script-by-query",
            BOOT,
            RawRequest::get("/boot.ipxe").query("mac", victim_mac),
            default_script(),
        ),
        // The victim's console log holds its kernel cmdline.
        (
            "console-log",
            SALAD,
            RawRequest::get(&format!("/api/v1/machine/{victim_mac}/log")),
            console_refused(401, victim_mac, "Authorization"),
        ),
        (
            "console-log-made-up-lease",
            SALAD,
            RawRequest::get(&format!("/api/v1/machine/{victim_mac}/log"))
                .header("x-lease-id", "00000000-0000-0000-0000-000000000000"),
            console_refused(403, victim_mac, "X-Lease-Id is not the current lease"),
        ),
        // Unmask the victim's keys on its console, announce a boot of it (to bind a console
        // of one's own), type into it.
        (
            "console-secrets-delete",
            SALAD,
            RawRequest::new("DELETE", &format!("/api/v1/machine/{victim_mac}/secrets")),
            console_refused(401, victim_mac, "Authorization"),
        ),
        (
            "console-expect",
            SALAD,
            RawRequest::new("PUT", &format!("/api/v1/machine/{victim_mac}/expect")),
            console_refused(401, victim_mac, "Authorization"),
        ),
        (
            "console-websocket",
            SALAD,
            websocket(RawRequest::get(&format!(
                "/api/v1/machine/{victim_mac}/console"
            ))),
            console_refused(401, victim_mac, "Authorization"),
        ),
        (
            "console-port-allocation",
            SALAD,
            RawRequest::get("/api/v1/machine/52:54:00:66:66:66"),
            console_refused(401, "52:54:00:66:66:66", "Authorization"),
        ),
        // Rewrite the victim's record: its address, tags and console.
        (
            "registration-spoof",
            MARS,
            RawRequest::new("POST", "/api/v1/machine/").json(spoof),
            Expect::json(403, &["changes only from its recorded address"])
                .logged(&["registration refused", victim_mac]),
        ),
        (
            "machine-patch",
            MARS,
            RawRequest::new("PATCH", &format!("/api/v1/machine/{victim_mac}"))
                .json(r#"{"tags":["evil:tag:1"]}"#),
            Expect::json(401, &["Authorization"]).logged(&["refused", victim_mac]),
        ),
        // Power the victim off.
        (
            "pdu-cycle",
            PDU,
            RawRequest::new("POST", "/api/v1/pdus/virtual/ports/2/cycle"),
            Expect::json(401, &["Authorization"]).logged(&["refused", "virtual"]),
        ),
        // The DUT's own bucket works: the refusals below are the access rules speaking,
        // not a broken channel.
        (
            "s3-own-put",
            S3,
            own.sign(RawRequest::new("PUT", &format!("/{o}/mine")).body(b"attacker's own".to_vec())),
            Expect::text(200, &[]),
        ),
        (
            "s3-dotdot-get",
            S3,
            own.sign(RawRequest::get(&format!("/{o}/../{v}/{vt}"))),
            path_refused("GetObject"),
        ),
        (
            "s3-encoded-get",
            S3,
            own.sign(RawRequest::get(&format!("/{o}/%2E%2E%2F{v}%2F{vt}"))),
            path_refused("GetObject"),
        ),
        (
            "s3-overwrite",
            S3,
            own.sign(
                RawRequest::new("PUT", &format!("/{o}/%2e%2e/{v}/{vt}"))
                    .body(b"overwritten".to_vec()),
            ),
            path_refused("PutObject"),
        ),
        (
            "s3-double-encoded-delete",
            S3,
            own.sign(RawRequest::new(
                "DELETE",
                &format!("/{o}/%252e%252e%252f{v}%252f{vt}"),
            )),
            path_refused("DeleteObject"),
        ),
        (
            "s3-delete-objects",
            S3,
            own.sign(
                RawRequest::new("POST", &format!("/{o}"))
                    .query("delete", "")
                    .header("content-type", "application/xml")
                    .body(format!(
                        "<Delete><Object><Key>mine</Key></Object><Object><Key>../{v}/{vt}</Key></Object><Object><Key>../{v}/{VICTIM_BINARY}</Key></Object></Delete>"
                    )),
            ),
            path_refused("DeleteObjects"),
        ),
        (
            "s3-copy-from-victim",
            S3,
            own.sign(
                RawRequest::new("PUT", &format!("/{o}/stolen"))
                    .header("x-amz-copy-source", &format!("{v}/{vt}")),
            ),
            s3_refused("CopyObject", &other_bucket),
        ),
        (
            "s3-copy-through-dotdot",
            S3,
            own.sign(
                RawRequest::new("PUT", &format!("/{o}/stolen"))
                    .header("x-amz-copy-source", &format!("{o}/../{v}/{vt}")),
            ),
            path_refused("CopyObject"),
        ),
        (
            "s3-other-bucket",
            S3,
            own.sign(RawRequest::get(&format!("/{v}/{vt}"))),
            s3_refused("GetObject", &other_bucket),
        ),
        (
            "s3-list-prefix",
            S3,
            own.sign(
                RawRequest::get(&format!("/{o}"))
                    .query("list-type", "2")
                    .query("prefix", &format!("../{v}/")),
            ),
            path_refused("ListObjectsV2"),
        ),
        // The victim's keys, had they leaked, are bound to the victim's address.
        (
            "s3-stolen-keys",
            S3,
            victim.sign(RawRequest::get(&format!("/{v}/{vt}"))),
            s3_refused("GetObject", "is accepted from"),
        ),
        (
            "s3-sigv2",
            S3,
            RawRequest::get(&format!("/{v}/{vt}")).header(
                "authorization",
                &format!("AWS {}:c2lnbmF0dXJlcGxheWVkYmFjaw==", own.access_key),
            ),
            Expect::s3(400, "InvalidRequest", &["Signature Version 2 is not accepted"])
                .logged(&["S3 request refused", "Signature Version 2 is not accepted"]),
        ),
        (
            "s3-stale-signature",
            S3,
            own.sign_at(RawRequest::get(&format!("/{o}/mine")), an_hour_ago),
            Expect::s3(403, "RequestTimeTooSkewed", &["more than 15 minutes"])
                .logged(&["S3 request refused", "more than 15 minutes"]),
        ),
        (
            "s3-anonymous",
            S3,
            RawRequest::get(&format!("/{v}/{vt}")),
            s3_refused("GetObject", "a signature is required"),
        ),
        (
            "s3-malformed-delete-objects",
            S3,
            own.sign(
                RawRequest::new("POST", &format!("/{o}"))
                    .query("delete", "")
                    .header("content-type", "application/xml")
                    .body("<Delete><Object><Key>mine".to_string()),
            ),
            Expect::s3(400, "MalformedXML", &[]).logged_refusal(),
        ),
        (
            "s3-own-get",
            S3,
            own.sign(RawRequest::get(&format!("/{o}/mine"))),
            Expect::text(200, &["attacker's own"]),
        ),
    ];
    list.into_iter()
        .map(|(name, port, request, expect)| {
            (
                name.to_string(),
                Case {
                    what: format!("attacker DUT: {name}"),
                    port,
                    request,
                    from: attacker_ip,
                    expect,
                },
            )
        })
        .collect()
}
