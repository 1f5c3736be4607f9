//! Keys stay in their bucket: attacks on the embedded endpoint with job keys (and the admin
//! key), sent byte for byte over TCP so that no client library cleans them up first. After
//! each attack, every byte of the victim's bucket is compared with what was there before.

mod common;

use bytes::Bytes;
use common::{Embedded, Raw, RawResponse, snapshot};
use dutgate_storage::JobBucket;
use time::OffsetDateTime;

/// Two jobs; the victim's bucket holds a few objects, one of them nested.
async fn two_jobs(e: &Embedded) -> (JobBucket, JobBucket, Vec<(String, Vec<u8>)>) {
    let attacker = e.storage.create_job_bucket("attacker").await.unwrap();
    let victim = e.storage.create_job_bucket("victim").await.unwrap();
    let v = e.dut_client(&victim);
    for (k, body) in [
        ("x", b"victim x\n".to_vec()),
        ("secret.txt", (0..=255u8).collect::<Vec<u8>>()),
        ("dir/deep.bin", vec![0xa5; 70_000]),
    ] {
        v.put_bytes(&victim.bucket, k, Bytes::from(body))
            .await
            .unwrap();
    }
    e.dut_client(&attacker)
        .put_bytes(
            &attacker.bucket,
            "mine",
            Bytes::from_static(b"attacker's own"),
        )
        .await
        .unwrap();
    let before = snapshot(&e.storage, &victim.bucket).await;
    assert_eq!(before.len(), 3);
    (attacker, victim, before)
}

async fn send(url: &str, job: &JobBucket, raw: Raw<'_>) -> RawResponse {
    raw.signed(
        url,
        &job.access_key,
        job.secret_key.expose(),
        OffsetDateTime::now_utc(),
    )
    .await
}

fn refused(r: &RawResponse, what: &str) {
    assert_eq!(r.status, 403, "{what}: {r:?}");
    assert!(
        r.body.contains("<Code>AccessDenied</Code>"),
        "{what}: {r:?}"
    );
}

fn delete_body(keys: &[&str]) -> String {
    let mut xml = String::from("<Delete>");
    for k in keys {
        xml.push_str(&format!(
            "<Object><Key>{}</Key></Object>",
            quick_xml::escape::escape(*k)
        ));
    }
    xml.push_str("</Delete>");
    xml
}

async fn delete_objects(e: &Embedded, job: &JobBucket, keys: &[&str]) -> RawResponse {
    Raw::new("POST", &format!("/{}", job.bucket))
        .query("delete", "")
        .header("content-type", "application/xml")
        .body(delete_body(keys))
        .signed(
            &e.url,
            &job.access_key,
            job.secret_key.expose(),
            OffsetDateTime::now_utc(),
        )
        .await
}

#[tokio::test]
async fn delete_objects_cannot_reach_another_job() {
    let e = Embedded::start().await;
    let (attacker, victim, before) = two_jobs(&e).await;
    let other = victim.bucket.as_str();
    let attacks: Vec<Vec<String>> = vec![
        vec![format!("../{other}/x")],
        vec![
            format!("../{other}/secret.txt"),
            format!("../{other}/dir/deep.bin"),
        ],
        vec![format!("a/../../{other}/x")],
        vec![format!("%2e%2e/{other}/x")],
        vec![format!("%2E%2E%2F{other}%2Fx")],
        vec![format!("..\\{other}\\x")],
        vec![format!("/{other}/x")],
        vec![
            e.config
                .data_dir(&e.gateway)
                .join(other)
                .join("x")
                .display()
                .to_string(),
        ],
        vec![format!("../{other}/")],
        vec!["../".into()],
        vec!["./".into()],
        // One bad key among good ones: nothing at all is deleted.
        vec!["mine".into(), format!("../{other}/x")],
    ];
    for keys in &attacks {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let r = delete_objects(&e, &attacker, &keys).await;
        refused(&r, &format!("DeleteObjects {keys:?}"));
        assert_eq!(
            snapshot(&e.storage, &victim.bucket).await,
            before,
            "after DeleteObjects {keys:?}"
        );
    }
    // The attacker's own object survived the mixed request; a plain multi-delete works.
    assert_eq!(e.storage.list(&attacker.bucket).await.unwrap().len(), 1);
    let ok = delete_objects(&e, &attacker, &["mine"]).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(e.storage.list(&attacker.bucket).await.unwrap().is_empty());
    // The admin key follows the same key rules.
    let admin = Raw::new("POST", &format!("/{}", attacker.bucket))
        .query("delete", "")
        .body(delete_body(&[&format!("../{other}/x")]))
        .signed(
            &e.url,
            &e.admin.access_key,
            e.admin.secret_key.expose(),
            OffsetDateTime::now_utc(),
        )
        .await;
    refused(&admin, "DeleteObjects with the admin key");
    assert_eq!(snapshot(&e.storage, &victim.bucket).await, before);
    e.stop().await;
}

#[tokio::test]
async fn request_paths_queries_and_copy_sources_stay_in_the_bucket() {
    let e = Embedded::start().await;
    let (attacker, victim, before) = two_jobs(&e).await;
    let own = attacker.bucket.as_str();
    let other = victim.bucket.as_str();

    // Object keys in the request path, as sent on the wire.
    for path in [
        format!("/{own}/../{other}/x"),
        format!("/{own}/%2e%2e/{other}/x"),
        format!("/{own}/%2E%2E%2F{other}%2Fx"),
        format!("/{own}/a/%2e%2e/%2e%2e/{other}/x"),
        format!("/{own}/%252e%252e%252f{other}%252fx"),
        format!("/{own}/%5c..%5c{other}%5cx"),
        format!("/{own}//{other}/x"),
        format!("/{own}/x%00"),
    ] {
        for method in ["GET", "HEAD", "DELETE"] {
            let r = send(&e.url, &attacker, Raw::new(method, &path)).await;
            // HEAD answers carry no body: the status says it.
            assert_eq!(r.status, 403, "{method} {path}: {r:?}");
            if method != "HEAD" {
                refused(&r, &format!("{method} {path}"));
            }
        }
        let r = send(
            &e.url,
            &attacker,
            Raw::new("PUT", &path).body(b"overwritten".to_vec()),
        )
        .await;
        refused(&r, &format!("PUT {path}"));
    }

    // Key-like query parameters.
    for (name, value) in [
        ("prefix", format!("../{other}/")),
        ("prefix", format!("%2e%2e/{other}")),
        ("start-after", format!("../{other}/a")),
        ("continuation-token", format!("../{other}/a")),
        ("marker", "/etc".to_string()),
    ] {
        let r = send(
            &e.url,
            &attacker,
            Raw::new("GET", &format!("/{own}"))
                .query("list-type", "2")
                .query(name, &value),
        )
        .await;
        refused(&r, &format!("list {name}={value}"));
    }

    // Copy sources: into the attacker's bucket from the victim's, through `..`.
    for source in [
        format!("{own}/../{other}/secret.txt"),
        format!("/{own}/%2e%2e/{other}/secret.txt"),
        format!("{own}/%252e%252e/{other}/secret.txt"),
        format!("{other}/secret.txt"),
    ] {
        let r = send(
            &e.url,
            &attacker,
            Raw::new("PUT", &format!("/{own}/stolen")).header("x-amz-copy-source", &source),
        )
        .await;
        refused(&r, &format!("CopyObject from {source}"));
    }
    assert!(
        e.storage.get(own, "stolen").await.is_err(),
        "nothing was copied"
    );

    // Multipart: a part copied from the victim, and the parts of someone else's upload.
    let created = send(
        &e.url,
        &attacker,
        Raw::new("POST", &format!("/{own}/big")).query("uploads", ""),
    )
    .await;
    assert_eq!(created.status, 200, "{created:?}");
    let upload_id = created
        .body
        .split("<UploadId>")
        .nth(1)
        .and_then(|s| s.split("</UploadId>").next())
        .unwrap()
        .to_string();
    let r = send(
        &e.url,
        &attacker,
        Raw::new("PUT", &format!("/{own}/big"))
            .query("partNumber", "1")
            .query("uploadId", &upload_id)
            .header("x-amz-copy-source", &format!("{own}/../{other}/secret.txt")),
    )
    .await;
    refused(&r, "UploadPartCopy through ..");
    // An empty upload id would match every upload's part files.
    let r = send(
        &e.url,
        &attacker,
        Raw::new("GET", &format!("/{own}/big")).query("uploadId", ""),
    )
    .await;
    refused(&r, "ListParts without an upload id");
    // The victim's key may not list the attacker's upload.
    let r = Raw::new("GET", &format!("/{other}/big"))
        .query("uploadId", &upload_id)
        .signed(
            &e.url,
            &victim.access_key,
            victim.secret_key.expose(),
            OffsetDateTime::now_utc(),
        )
        .await;
    refused(&r, "ListParts of another key's upload");
    // Its own upload it may list.
    let r = send(
        &e.url,
        &attacker,
        Raw::new("GET", &format!("/{own}/big")).query("uploadId", &upload_id),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    assert_eq!(snapshot(&e.storage, other).await, before);
    // Nothing was written outside the buckets' directories either.
    let data = e.config.data_dir(&e.gateway);
    assert!(!data.join("x").exists());
    assert!(!data.join("stolen").exists());
    e.stop().await;
}

/// The same client calls that worked before still work: keys with dots, percent signs,
/// spaces and unicode are ordinary keys.
#[tokio::test]
async fn ordinary_odd_keys_still_work() {
    let e = Embedded::start().await;
    let job = e.storage.create_job_bucket("odd").await.unwrap();
    let dut = e.dut_client(&job);
    for k in [
        "a..b",
        ".hidden/x",
        "100%25 done",
        "50%",
        "dir/ü+&=.bin",
        "x.",
    ] {
        dut.put_bytes(&job.bucket, k, Bytes::from(k.as_bytes().to_vec()))
            .await
            .unwrap_or_else(|err| panic!("{k}: {err}"));
    }
    let got = snapshot(&e.storage, &job.bucket).await;
    assert_eq!(got.len(), 6, "{got:?}");
    for (k, v) in &got {
        assert_eq!(k.as_bytes(), &v[..]);
    }
    e.stop().await;
}

/// A job key issued for its DUT's address works from there only; the DUT is 127.0.0.2 and
/// the other machine 127.0.0.1 (both loopback, so both are on the DUT networks).
#[tokio::test]
async fn job_keys_work_only_from_their_machine() {
    let e = Embedded::start().await;
    let dut_ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let elsewhere: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let job = e
        .storage
        .create_job_bucket_for("bound", Some(ipnet::IpNet::from(dut_ip)))
        .await
        .unwrap();
    let from_dut = e.dut_client(&job).with_local_address(dut_ip).unwrap();
    from_dut
        .put_bytes(&job.bucket, "result", Bytes::from_static(b"from the DUT"))
        .await
        .unwrap();
    assert_eq!(from_dut.list(&job.bucket).await.unwrap().len(), 1);

    let from_other = e.dut_client(&job).with_local_address(elsewhere).unwrap();
    for r in [
        from_other.list(&job.bucket).await.map(drop),
        from_other.get(&job.bucket, "result").await.map(drop),
        from_other
            .put_bytes(&job.bucket, "result", Bytes::from_static(b"forged"))
            .await,
        from_other.delete_object(&job.bucket, "result").await,
    ] {
        assert!(
            matches!(&r, Err(dutgate_storage::StorageError::Server { status: 403, code, message, .. })
                if code == "AccessDenied" && message.contains("127.0.0.2/32") && message.contains("127.0.0.1")),
            "{r:?}"
        );
    }
    let r = Raw::new("GET", &format!("/{}/result", job.bucket))
        .from(elsewhere)
        .signed(
            &e.url,
            &job.access_key,
            job.secret_key.expose(),
            OffsetDateTime::now_utc(),
        )
        .await;
    refused(&r, "GET from another address");
    assert_eq!(
        snapshot(&e.storage, &job.bucket).await,
        vec![("result".to_string(), b"from the DUT".to_vec())]
    );

    // A network works the same way: 127.0.0.2/31 is .2 and .3.
    let net = e
        .storage
        .create_job_bucket_for("bound-net", Some("127.0.0.2/31".parse().unwrap()))
        .await
        .unwrap();
    for (ip, ok) in [
        ("127.0.0.2", true),
        ("127.0.0.3", true),
        ("127.0.0.1", false),
    ] {
        let c = e
            .dut_client(&net)
            .with_local_address(ip.parse().unwrap())
            .unwrap();
        assert_eq!(c.list(&net.bucket).await.is_ok(), ok, "from {ip}");
    }
    // Keys without a restriction keep working from any DUT-network address.
    let free = e.storage.create_job_bucket("free").await.unwrap();
    for ip in [dut_ip, elsewhere] {
        let c = e.dut_client(&free).with_local_address(ip).unwrap();
        assert!(c.list(&free.bucket).await.is_ok(), "from {ip}");
    }
    // The admin listing shows the restriction; a bad one is refused when issuing.
    let listing = Raw::new("GET", "/dutgate-admin/v1/keys")
        .signed(
            &e.url,
            &e.admin.access_key,
            e.admin.secret_key.expose(),
            OffsetDateTime::now_utc(),
        )
        .await;
    assert_eq!(listing.status, 200, "{listing:?}");
    assert!(
        listing.body.contains("\"source\":\"127.0.0.2/32\""),
        "{listing:?}"
    );
    let bad = Raw::new("POST", "/dutgate-admin/v1/keys")
        .query("bucket", &job.bucket)
        .query("source", "10.0.2")
        .signed(
            &e.url,
            &e.admin.access_key,
            e.admin.secret_key.expose(),
            OffsetDateTime::now_utc(),
        )
        .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    assert!(bad.body.contains("InvalidArgument"), "{bad:?}");
    e.stop().await;
}

/// boto3 (SigV4, path-style) as the attacking DUT: a third-party client's multi-delete,
/// copy and get with keys that leave the bucket. Prints one `<call> <status> <code>` line
/// per call.
const BOTO3_ATTACKS: &str = r#"
import sys
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
url, ak, sk, own, other = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=ak, aws_secret_access_key=sk,
                  region_name="us-east-1",
                  config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                retries={"max_attempts": 1}, connect_timeout=10, read_timeout=10))
def attempt(name, call):
    try:
        call()
        print(name, 200, "OK")
    except ClientError as e:
        print(name, e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"])
attempt("delete_objects", lambda: s3.delete_objects(Bucket=own, Delete={"Objects": [{"Key": "../" + other + "/x"}, {"Key": "../" + other + "/secret.txt"}]}))
attempt("copy_object", lambda: s3.copy_object(Bucket=own, Key="stolen", CopySource=own + "/../" + other + "/secret.txt"))
attempt("list_prefix", lambda: s3.list_objects_v2(Bucket=own, Prefix="../" + other + "/"))
attempt("own_delete", lambda: s3.delete_objects(Bucket=own, Delete={"Objects": [{"Key": "mine"}]}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_cannot_reach_another_job() {
    let python = common::venv_bin("python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask test` (it installs services/storage/tests/requirements.txt)",
        python.display()
    );
    let e = Embedded::start().await;
    let (attacker, victim, before) = two_jobs(&e).await;
    let args = [
        "-c".to_string(),
        BOTO3_ATTACKS.to_string(),
        e.url.clone(),
        attacker.access_key.clone(),
        attacker.secret_key.expose().to_string(),
        attacker.bucket.clone(),
        victim.bucket.clone(),
    ];
    // A child process blocks its thread: off the runtime's workers.
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new(python).args(args).output())
            .await
            .unwrap()
            .unwrap();
    assert!(
        out.status.success(),
        "boto3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        lines.lines().collect::<Vec<_>>(),
        [
            "delete_objects 403 AccessDenied",
            "copy_object 403 AccessDenied",
            "list_prefix 403 AccessDenied",
            "own_delete 200 OK",
        ],
        "{lines}"
    );
    assert_eq!(snapshot(&e.storage, &victim.bucket).await, before);
    assert!(e.storage.list(&attacker.bucket).await.unwrap().is_empty());
    e.stop().await;
}
